//! The credential broker against a real guest (the contained agent's):
//! API keys and GCP's refresh token stay on the host; the gateway puts the
//! keys into requests on the way out and mints short-lived GCP tokens.
//! Providers and Google's token endpoint are TLS stubs of the test's own on
//! the host's loopback, reached through names the gateway resolves there.

use crate::common::{Run, World};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};

const ANTHROPIC_KEY: &str = "sk-ant-r3al-8f2a61";
const ROTATED_KEY: &str = "sk-ant-r0tated-44b1e0";
const OPENAI_KEY: &str = "sk-0penai-r3al-91c2";
const GEMINI_KEY: &str = "AIza-g3mini-r3al-57d0";
const REFRESH_TOKEN: &str = "1//r3fresh-t0ken-c9e4";
const CLIENT_SECRET: &str = "cl1ent-s3cret-a7b3";
const SECRETS: &[&str] = &[ANTHROPIC_KEY, ROTATED_KEY, OPENAI_KEY, GEMINI_KEY, REFRESH_TOKEN, CLIENT_SECRET];

static MINTED: AtomicUsize = AtomicUsize::new(0);

/// Every provider and the token endpoint, told apart by the Host header.
fn respond(r: &crate::tls::Request) -> (&'static str, &'static str, String) {
    if r.header("host").is_some_and(|h| h.starts_with("oauth2.test")) {
        let n = MINTED.fetch_add(1, Ordering::SeqCst);
        // Short-lived, so that the test sees one renewed.
        return ("200 OK", "application/json", format!("{{\"access_token\": \"ya29.minted-{n}\", \"expires_in\": 4}}"));
    }
    ("200 OK", "application/json", "{\"answer\": \"from the provider\"}".into())
}

/// Google's client library in the guest, as an agent's tools use it: the
/// default credentials, a token, and a second one after the first expired.
const GOOGLE_AUTH: &str = r#"import sys, time, google.auth, google.auth.transport.requests as tr
creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
req = tr.Request()
creds.refresh(req)
first = creds.token
time.sleep(5)
creds.refresh(req)
# An API call with it, as a client of Vertex AI makes.
r = tr.AuthorizedSession(creds).get(sys.argv[1])
print(type(creds).__module__, project, first, creds.token, r.status_code)
"#;

/// The secrets reversed, one per line: the guest turns them back in a pipe,
/// so no file or command line there holds them but what leaked.
fn reversed() -> String {
    SECRETS.iter().map(|s| s.chars().rev().collect::<String>() + "\n").collect()
}

fn with_env(w: &World, dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = w.agent_vm(args);
    cmd.current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::from(cmd.output().unwrap(), args)
}

/// Runs in the contained guest once its other checks are done; rewrites
/// the instance's config for the stubs.
pub fn credentials_stay_on_the_host(w: &World, config: &std::path::Path) {
    let stub = crate::tls::Ca::new().serve(
        &["anthropic.test", "openai.test", "gemini.test", "openrouter.test", "oauth2.test", "vertex.test"],
        respond,
    );
    let p = stub.port;
    std::fs::write(
        config,
        format!(
            "instances:\n  contain:\n    allow: ['*.test:{p}']\n    resolve: {{anthropic.test: 127.0.0.1, openai.test: \
             127.0.0.1, gemini.test: 127.0.0.1, openrouter.test: 127.0.0.1, oauth2.test: 127.0.0.1, vertex.test: 127.0.0.1}}\n    upstreams: \
             {{anthropic: 'https://anthropic.test:{p}', openai: 'https://openai.test:{p}', gemini: \
             'https://gemini.test:{p}/g', google-token: 'https://oauth2.test:{p}/token'}}\n"
        ),
    )
    .unwrap();
    let ca = w.home.path().join("broker-ca.pem");
    std::fs::write(&ca, &stub.ca_pem).unwrap();
    let adc = w.home.path().join("adc-user.json");
    std::fs::write(
        &adc,
        format!(
            "{{\"type\": \"authorized_user\", \"client_id\": \"cid.apps.test\", \"client_secret\": \"{CLIENT_SECRET}\", \
             \"refresh_token\": \"{REFRESH_TOKEN}\", \"quota_project_id\": \"proj-under-test\"}}\n"
        ),
    )
    .unwrap();
    let home = w.home.path().to_owned();
    let (ca, adc) = (ca.to_str().unwrap().to_owned(), adc.to_str().unwrap().to_owned());
    let env: Vec<(&str, &str)> = vec![
        ("SSL_CERT_FILE", &ca),
        ("GOOGLE_APPLICATION_CREDENTIALS", &adc),
        ("ANTHROPIC_API_KEY", ANTHROPIC_KEY),
        ("OPENAI_API_KEY", OPENAI_KEY),
        ("GEMINI_API_KEY", GEMINI_KEY),
    ];
    // An earlier copy of GCP credentials in the VM goes with provisioning;
    // the gateway it starts has the keys of its environment.
    w.admin("sudo mkdir -p /etc/google && echo '{}' | sudo tee /etc/google/application_default_credentials.json").ok();
    // The host's extra CA (named by SSL_CERT_FILE, as behind a TLS-inspecting
    // proxy) is not the VM's yet: its HTTPS fails there.
    let trusted = format!(
        "curl -sS https://anthropic.test:{p}/trusted && python3 -c 'import requests; print(requests.get(\"https://openai.test:{p}/py\").status_code)' && echo \"$NODE_EXTRA_CA_CERTS\""
    );
    assert_ne!(w.guest(&trusted).code, Some(0), "the VM trusted the test's CA already");
    let state = w.lima_home.join("_agent-vm/contain/gateway.json");
    let pid = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["pid"].clone();
    let gateway = pid(&std::fs::read_to_string(&state).unwrap());
    assert!(std::process::Command::new("kill").arg(gateway.to_string()).status().unwrap().success());
    let r = with_env(w, &home, &["provision", "--allow-host-access"], &env);
    assert!(r.ok().stderr.contains("trusting 1 extra CA certificate(s) of this machine (from SSL_CERT_FILE)"), "{r:?}");
    // Now it is, for the system, Python and Node (pointed at the system bundle).
    let r = w.guest(&trusted);
    assert_eq!(r.ok().stdout, "{\"answer\": \"from the provider\"}200\n/etc/ssl/certs/ca-certificates.crt\n", "{r:?}");
    let status = with_env(w, &home, &["status", "--json"], &env).json();
    assert_eq!(status["credentials"]["mode"], "broker", "{status:#}");
    assert_eq!(status["credentials"]["gcp"], "brokered", "{status:#}");
    assert_eq!(status["credentials"]["api_keys"]["anthropic"], "brokered", "{status:#}");
    assert_eq!(w.guest("test -e /etc/google/application_default_credentials.json || echo gone").stdout, "gone\n");

    // Each provider through its base URL, with the placeholder the session got.
    let calls = r#"set -e
curl -sS -X POST "$ANTHROPIC_BASE_URL/v1/messages" -H "Authorization: Bearer $ANTHROPIC_AUTH_TOKEN" -d '{}'; echo
curl -sS "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY"; echo
curl -sS "$GOOGLE_GEMINI_BASE_URL/v1beta/models?key=$GEMINI_API_KEY&alt=sse" -H "x-goog-api-key: $GEMINI_API_KEY"; echo
echo "$ANTHROPIC_AUTH_TOKEN ${ANTHROPIC_API_KEY:-no-key}""#;
    let earlier = stub.requests().len();
    let r = with_env(w, &home, &["connect", "--no-mount", "--", "bash", "-c", calls], &env);
    let answer = "{\"answer\": \"from the provider\"}";
    assert_eq!(r.ok().stdout, format!("{answer}\n{answer}\n{answer}\nagent-vm-brokered no-key\n"), "{r:?}");
    // Those of the calls above (the trust checks came first).
    let seen = stub.requests().split_off(earlier);
    let find = |host: &str| seen.iter().find(|r| r.header("host").is_some_and(|h| h.starts_with(host))).cloned();
    let anthropic = find("anthropic.test").expect("the Anthropic stub got nothing");
    assert_eq!(anthropic.line(), "POST /v1/messages");
    assert_eq!(anthropic.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(anthropic.header("authorization"), None);
    let openai = find("openai.test").expect("the OpenAI stub got nothing");
    assert_eq!(
        (openai.line(), openai.header("authorization")),
        ("GET /v1/chat/completions", Some(&*format!("Bearer {OPENAI_KEY}")))
    );
    let gemini = find("gemini.test").expect("the Gemini stub got nothing");
    assert_eq!((gemini.line(), gemini.header("x-goog-api-key")), ("GET /g/v1beta/models?alt=sse", Some(GEMINI_KEY)));
    let log = w.run(&["network", "log", "--json"]).ok().stdout.clone();
    assert!(log.contains("broker: anthropic") && log.contains("anthropic.test"), "{log}");

    // GCP: Google's library in the guest takes the gateway for the metadata
    // server; the host mints from the refresh token, and again on expiry.
    w.install_in_guest("/tmp/agent-vm-gauth.py", GOOGLE_AUTH);
    let api = format!("https://vertex.test:{p}/v1/projects/proj-under-test/locations/x");
    let r = with_env(w, &home, &["connect", "--no-mount", "--", "python3", "/tmp/agent-vm-gauth.py", &api], &env);
    let words: Vec<String> = r.ok().stdout.split_whitespace().map(str::to_owned).collect();
    assert_eq!(words.len(), 5, "{r:?}");
    assert_eq!(words[4], "200");
    let bearer = stub.requests().into_iter().find(|r| r.header("host").is_some_and(|h| h.starts_with("vertex.test")));
    let bearer = bearer.and_then(|r| r.header("authorization").map(str::to_owned));
    assert_eq!(bearer, Some(format!("Bearer {}", words[3])), "the API did not get the renewed token");
    assert_eq!(words[0], "google.auth.compute_engine.credentials");
    assert_eq!(words[1], "proj-under-test");
    assert!(words[2].starts_with("ya29.minted-") && words[3].starts_with("ya29.minted-"), "{words:?}");
    assert_ne!(words[2], words[3], "the expired token was not renewed");
    let grants: Vec<_> = stub.requests().into_iter().filter(|r| r.line() == "POST /token").collect();
    assert!(grants.len() >= 2, "{grants:?}");
    for g in &grants {
        assert!(
            g.body.contains("grant_type=refresh_token") && g.body.contains("refresh_token=1%2F%2Fr3fresh"),
            "{}",
            g.body
        );
        assert!(g.body.contains(CLIENT_SECRET));
    }

    // A key changed on the host applies to the next session's requests,
    // with no provisioning and no gateway restart.
    let gateway = pid(&std::fs::read_to_string(&state).unwrap());
    let rotated: Vec<(&str, &str)> =
        env.iter().map(|&(k, v)| if k == "ANTHROPIC_API_KEY" { (k, ROTATED_KEY) } else { (k, v) }).collect();
    let call = r#"curl -sS -X POST "$ANTHROPIC_BASE_URL/v1/messages" -H "Authorization: Bearer $ANTHROPIC_AUTH_TOKEN" -d '{}'"#;
    with_env(w, &home, &["connect", "--no-mount", "--", "bash", "-c", call], &rotated).ok();
    let last = stub.requests().into_iter().rfind(|r| r.line() == "POST /v1/messages").unwrap();
    assert_eq!(last.header("x-api-key"), Some(ROTATED_KEY));
    assert_eq!(pid(&std::fs::read_to_string(&state).unwrap()), gateway, "the gateway was restarted");

    // Nothing in the VM holds a secret: files, the environment and command
    // lines of every process while a session runs, the journal; nor the
    // host's most verbose logs and the gateway's own.
    w.admin_args(r#"printf '%s' "$1" > /tmp/agent-vm-reversed"#, &[&reversed()]).ok();
    let session = w
        .agent_vm(&["-vv", "connect", "--no-mount", "--", "sleep", "20"])
        .current_dir(&home)
        .envs(rotated.iter().copied())
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(crate::common::eventually(60, || w.guest("ps -eo args").stdout.contains("sleep 20")), "no session");
    let scan = r#"pats() { rev /tmp/agent-vm-reversed; }
# Wherever anything is written (not the packaged files of /usr).
sudo grep -rlF -f <(pats) /etc /home /root /tmp /var /run /dev/shm /opt /srv /usr/local 2>/dev/null
for p in /proc/[0-9]*; do sudo cat "$p/environ" "$p/cmdline" 2>/dev/null | tr '\0' '\n'; done | grep -F -f <(pats) | sed 's/^/process: /'
sudo journalctl -b -o cat 2>/dev/null | grep -F -f <(pats) | sed 's/^/journal: /'
echo scanned"#;
    let found = w.admin(&format!("bash -c {}", shlex::try_quote(scan).unwrap()));
    let out = session.wait_with_output().unwrap();
    assert_eq!(found.stdout, "scanned\n", "secrets in the VM: {found:?}");
    let host_logs = String::from_utf8_lossy(&out.stderr).into_owned()
        + &std::fs::read_to_string(w.lima_home.join("_agent-vm/contain/gateway.stderr")).unwrap_or_default()
        + &std::fs::read_to_string(w.lima_home.join("_agent-vm/contain/network.log")).unwrap_or_default();
    assert!(host_logs.contains("exec"), "the -vv log is not there");
    for s in SECRETS {
        assert!(!host_logs.contains(s), "{s} is in the host's logs");
    }
}
