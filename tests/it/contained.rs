//! The contained agent against a real guest: agent sessions run as an
//! unprivileged user whose only way out of the VM is agent-vm's gateway on
//! the host. The "internet" is servers of this test on the host's loopback,
//! reached through names the gateway is told to resolve there; the guest
//! is provisioned with the host-access opt-out, so the admin user reaches
//! those servers directly: the control that shows the agent's refusals come
//! from its containment, not from the network.

use crate::common::{World, eventually};
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A TCP server on the host's loopback answering every connection with an
/// HTTP response carrying `body`; records the request heads it got.
fn http_server(body: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    crate::common::serve_connections(listener, move |mut conn| {
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        log.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    });
    (port, seen)
}

/// Fetches a URL through the proxy variables of the session (Python's
/// urllib reads HTTP_PROXY), or through CONNECT with `tunnel`; prints the
/// status and the body.
const PROBE: &str = r#"import http.client, os, sys, urllib.error, urllib.request
how, target = sys.argv[1], sys.argv[2]
# Everything through the gateway, loopback included (as an agent trying it would).
os.environ["no_proxy"] = os.environ["NO_PROXY"] = ""
try:
    if how == "get":
        r = urllib.request.urlopen(target, timeout=20)
        print(r.status, r.read().decode())
    else:
        host, port = target.rsplit(":", 1)
        proxy = os.environ["HTTPS_PROXY"].split("//")[1]
        c = http.client.HTTPConnection(proxy, timeout=20)
        c.set_tunnel(host, int(port))
        c.request("GET", "/tunnelled")
        r = c.getresponse()
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except OSError as e:
    print("error", e)
"#;

/// One DNS query (A, host.lima.internal) straight to the first name server
/// of /etc/resolv.conf, over UDP.
const DNS_QUERY: &str = r#"import socket, struct, sys
server = next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
name = b"".join(bytes([len(p)]) + p for p in b"host.lima.internal".split(b".")) + b"\0"
query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(query, (server, 53))
answer = s.recv(512)
print("answered" if answer[:2] == b"\x12\x34" else "garbage")
"#;

fn probe(w: &World, how: &str, target: &str) -> String {
    w.guest_args(r#"python3 /tmp/agent-vm-probe.py "$1" "$2""#, &[how, target]).stdout.trim().to_owned()
}

/// The gateway's log records, from `network log --json`.
fn network_log(w: &World) -> Vec<serde_json::Value> {
    w.run(&["network", "log", "--json"]).ok().stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn doctor_gateway(w: &World) -> serde_json::Value {
    let checks = w.run(&["doctor", "--json"]).json();
    checks.as_array().unwrap().iter().find(|c| c["name"] == "gateway").cloned().expect("doctor checks the gateway")
}

#[test]
fn the_agent_is_contained() {
    let w = World::with_vm("contain");
    let (allowed_port, allowed_seen) = http_server("allowed-service\n");
    let (secret_port, secret_seen) = http_server("host-secret\n");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let tls = crate::tls::Ca::new().serve(&["tls.test"], |r| ("200 OK", "text/plain", format!("tls {}\n", r.line())));
    let config = w.home.path().join(".config/agent-vm/config.yaml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let write_config = |mode: &str| {
        std::fs::write(
            &config,
            format!(
                "instances:\n  contain:\n    network: {mode}\n    allow: ['allowed.test:{allowed_port}', 'tls.test:{}', \
                 'registry.test:{allowed_port}']\n    resolve: {{allowed.test: 127.0.0.1, refused.test: 127.0.0.1, \
                 tls.test: 127.0.0.1, registry.test: 127.0.0.1}}\n",
                tls.port
            ),
        )
        .unwrap()
    };
    write_config("allowlist");
    w.run(&["start", "--vcpu", "1", "--memory", "2", "--allow-host-access"]).ok();
    assert_eq!(w.agent_user().as_deref(), Some("agent"));
    w.install_in_guest("/tmp/agent-vm-probe.py", PROBE);
    w.install_in_guest("/tmp/agent-vm-dns.py", DNS_QUERY);

    // Identity: no sudo, no root-equivalent group, no say over the firewall.
    assert_eq!(w.guest("id -un").ok().stdout, "agent\n");
    assert_ne!(w.guest("sudo -n true").code, Some(0), "the agent can sudo");
    let groups = w.guest("id -nG").ok().stdout.clone();
    for g in ["sudo", "docker", "disk", "adm", "kvm", "libvirt", "lxd", "root", "shadow"] {
        assert!(!groups.split_whitespace().any(|x| x == g), "the agent is in {g}: {groups}");
    }
    let flush = w.guest("/usr/sbin/nft flush ruleset 2>&1");
    assert!(flush.code != Some(0) && flush.stdout.contains("Operation not permitted"), "{flush:?}");
    assert_ne!(w.guest("/usr/sbin/nft delete table inet agent_vm_agent").code, Some(0));
    w.admin("sudo nft list table inet agent_vm_agent").ok();
    let sessions = w.run(&["connect", "--no-mount", "--", "sh", "-c", "id -un; printenv HTTPS_PROXY"]);
    assert_eq!(sessions.ok().stdout, "agent\nhttp://127.0.0.1:3128\n");
    let status = w.run(&["status", "--json"]).json();
    assert_eq!(status["network"]["contained"], true, "{status:#}");
    assert_eq!(status["network"]["gateway"], "ready", "{status:#}");
    assert_eq!(doctor_gateway(&w)["ok"], true);

    // No direct way out: TCP, UDP, ICMP, DNS. The admin's same attempts
    // get through (host access is opted into for this VM).
    let tcp = format!("timeout 10 bash -c 'exec 3<>/dev/tcp/192.168.5.2/{secret_port} && echo connected'");
    assert_eq!(w.admin(&tcp).ok().stdout, "connected\n", "control: the admin reaches the host");
    let r = w.guest(&tcp);
    assert!(r.code != Some(0) && !r.stdout.contains("connected"), "the agent opened a direct TCP connection");
    let send_udp = |payload: &str| {
        format!(
            "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"{payload}\", (\"192.168.5.2\", {udp_port}))'"
        )
    };
    w.admin(&send_udp("from-admin")).ok();
    let mut buf = [0u8; 64];
    let (n, _) = udp.recv_from(&mut buf).expect("control: the admin's datagram arrives");
    assert_eq!(&buf[..n], b"from-admin");
    let _ = w.guest(&send_udp("from-agent"));
    assert!(udp.recv_from(&mut buf).is_err(), "the agent's datagram left the VM");
    let ping = "python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); s.sendto(b\"\\x08\\0\\0\\0\\0\\x01\\0\\x01\", (\"192.168.5.2\", 0))'";
    w.admin(ping).ok();
    assert_ne!(w.guest(ping).code, Some(0), "the agent sent ICMP");
    // A query of its own to the VM's name server (not /etc/hosts).
    let dns = "python3 /tmp/agent-vm-dns.py";
    assert_eq!(w.admin(dns).ok().stdout, "answered\n", "control: the admin's query is answered");
    let r = w.guest(dns);
    assert!(r.code != Some(0) && !r.stdout.contains("answered"), "the agent asked DNS itself: {r:?}");

    // Through the gateway: the allowed host, plain and tunnelled.
    assert_eq!(probe(&w, "get", &format!("http://allowed.test:{allowed_port}/plain")), "200 allowed-service");
    assert_eq!(probe(&w, "tunnel", &format!("allowed.test:{allowed_port}")), "200 allowed-service");
    // HTTPS end to end (curl through HTTPS_PROXY: the gateway tunnels it).
    w.admin_args(r#"printf '%s' "$1" > /tmp/test-ca.pem && chmod 644 /tmp/test-ca.pem"#, &[&tls.ca_pem]).ok();
    let https = w.guest(&format!("curl -sS --cacert /tmp/test-ca.pem https://tls.test:{}/over-tls", tls.port));
    assert_eq!(https.ok().stdout, "tls GET /over-tls\n");
    assert_eq!(tls.requests().len(), 1);
    // A session in a workspace names it to the gateway, for the log.
    let repo = w.repo("proj");
    let url = format!("http://allowed.test:{allowed_port}/from-workspace");
    let r =
        w.run_in(&repo, &["connect", "ws-one", "--no-mount", "--", "python3", "/tmp/agent-vm-probe.py", "get", &url]);
    assert_eq!(r.ok().stdout.trim_end().lines().last(), Some("200 allowed-service"), "{r:?}");
    let ws_name = w.workspace_dir(&repo, "ws-one").rsplit('/').next().unwrap().to_owned();
    let records = network_log(&w);
    assert!(
        records.iter().any(|r| r["workspace"] == ws_name.as_str()),
        "no record names workspace {ws_name}: {records:?}"
    );

    let heads = allowed_seen.lock().unwrap().clone();
    assert!(heads.iter().any(|h| h.starts_with("GET /plain ")), "{heads:?}");
    assert!(heads.iter().any(|h| h.starts_with("GET /tunnelled ")), "{heads:?}");

    // Refused: a host not allowed, with what to run; and the log says so.
    let refused = probe(&w, "get", &format!("http://refused.test:{allowed_port}/"));
    assert!(refused.starts_with("403 "), "{refused}");
    assert!(refused.contains("agent-vm --instance contain network allow refused.test"), "{refused}");
    let records = network_log(&w);
    assert!(
        records
            .iter()
            .any(|r| r["host"] == "refused.test" && r["verdict"] == "refused" && r["rule"] == "not in the allowlist"),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["host"] == "allowed.test" && r["verdict"] == "allowed" && r["down"].as_u64() > Some(0))
    );

    // The host's own services stay out of reach through the gateway, by
    // address or by name, even in open mode; so does the gateway itself.
    for mode in ["allowlist", "open"] {
        write_config(mode);
        for target in [
            format!("http://127.0.0.1:{secret_port}/"),
            format!("http://localhost:{secret_port}/"),
            "http://127.0.0.1:3128/".into(),
        ] {
            let got = probe(&w, "get", &target);
            assert!(got.starts_with("403 "), "{mode}: {target}: {got}");
        }
        let got = probe(&w, "tunnel", &format!("127.0.0.1:{secret_port}"));
        assert!(!got.contains("host-secret"), "{mode}: {got}");
    }
    assert!(
        secret_seen.lock().unwrap().iter().all(|h| h.is_empty() || !h.contains("GET")),
        "the loopback service was reached"
    );
    write_config("allowlist");

    // Live rules apply at once.
    w.run(&["network", "allow", &format!("refused.test:{allowed_port}")]).ok();
    assert_eq!(probe(&w, "get", &format!("http://refused.test:{allowed_port}/")), "200 allowed-service");
    w.run(&["network", "deny", &format!("refused.test:{allowed_port}")]).ok();
    assert!(probe(&w, "get", &format!("http://refused.test:{allowed_port}/")).starts_with("403 "));

    // Containers: rootless Podman as the agent, from a local image, and
    // `docker` against it; a container is no way around the firewall.
    let image = r#"set -e
d=$(mktemp -d); cp /bin/busybox "$d/"; tar -C "$d" -cf "$d.tar" busybox
podman import -q "$d.tar" localhost/bb >/dev/null
podman run --rm localhost/bb /busybox sh -c 'echo in-container; id -u'
podman unshare cat /proc/self/uid_map | awk '$1 == 0 { print "root is uid", $2 }'"#;
    let out = w.guest(image).ok().stdout.clone();
    let agent_uid = w.guest("id -u").ok().stdout.trim().to_owned();
    assert_eq!(out, format!("in-container\n0\nroot is uid {agent_uid}\n"), "{out}");
    assert_eq!(w.guest("docker run --rm localhost/bb /busybox echo via-docker").ok().stdout, "via-docker\n");
    // Pulls go through the gateway too (the Podman service behind `docker`
    // gets no session's environment): the attempt reaches its log.
    let _ = w.guest(&format!("docker pull registry.test:{allowed_port}/probe:1"));
    let records = network_log(&w);
    assert!(records.iter().any(|r| r["host"] == "registry.test"), "the pull did not use the gateway: {records:?}");
    let escape = format!(
        "podman run --rm localhost/bb /busybox nc -w 5 192.168.5.2 {secret_port} </dev/null 2>&1 && echo connected"
    );
    let r = w.guest(&escape);
    assert!(!r.stdout.contains("connected"), "a container opened a direct connection: {r:?}");
    assert!(!r.stdout.contains("applet not found"), "the probe did not run: {r:?}");

    // The agent cannot stop the gateway's end in the VM (the admin's sshd).
    let _ = w.guest(&format!("pkill -u {} sshd", crate::common::host_user()));
    assert_eq!(probe(&w, "get", &format!("http://allowed.test:{allowed_port}/")), "200 allowed-service");

    // Fail closed: with the gateway gone the agent has no way out; the next
    // agent-vm command brings it back.
    let state = w.lima_home.join("_agent-vm/contain/gateway.json");
    let pid =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&state).unwrap()).unwrap()["pid"].clone();
    assert!(std::process::Command::new("kill").arg(pid.to_string()).status().unwrap().success());
    assert!(
        eventually(20, || probe(&w, "get", &format!("http://allowed.test:{allowed_port}/")).starts_with("error")),
        "the agent still had a way out with the gateway gone"
    );
    let gw = doctor_gateway(&w);
    assert!(gw["ok"] == false && gw["detail"].as_str().unwrap().contains("not running"), "{gw:#}");
    w.run(&["status"]).ok();
    assert_eq!(probe(&w, "get", &format!("http://allowed.test:{allowed_port}/")), "200 allowed-service");

    crate::broker::credentials_stay_on_the_host(&w, &config);

    // stop ends the gateway with the VM.
    w.run(&["stop"]).ok();
    assert!(eventually(10, || w.run(&["status", "--json"]).json()["network"]["gateway"] == "not running"));
}
