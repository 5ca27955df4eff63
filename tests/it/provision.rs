//! Provisioning against a real guest: home files, credentials, environment
//! pass-through, idempotence, the sentinel — and the template's invariants.

use crate::common::{Run, World};
use std::process::Stdio;

#[test]
fn template_keeps_the_vm_away_from_the_host() {
    let t: serde_yaml_ng::Value = serde_yaml_ng::from_str(include_str!("../../vm-template/agent-vm.yaml")).unwrap();
    assert_eq!(t["mounts"], serde_yaml_ng::Value::Sequence(vec![]), "the VM must mount nothing of the host");
    assert_eq!(t["ssh"]["forwardAgent"], false);
    assert_eq!(t["ssh"]["loadDotSSHPubKeys"], false);
    assert_eq!(t["containerd"]["system"], false);
    assert_eq!(t["containerd"]["user"], false);
    assert!(t.get("base").is_none(), "no base template: it could bring a home mount back");
    // `portForwards: []` is not enough (Lima appends a catch-all rule).
    let rules = t["portForwards"].as_sequence().expect("portForwards rules");
    assert!(
        rules.iter().any(|r| r["guestIP"] == "0.0.0.0" && r["ignore"] == true && r["proto"] == "any"),
        "no rule ignoring every guest port: {rules:?}"
    );
    assert_eq!((t["cpus"].as_u64(), t["memory"].as_str(), t["disk"].as_str()), (Some(4), Some("8GiB"), Some("100GiB")));
}

#[test]
fn provisioning_against_a_real_guest() {
    let w = World::with_vm("prov");
    // Today's behaviour, by choice: credentials copied into the VM.
    let config = w.home.path().join(".config/agent-vm/config.yaml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "instances:\n  prov:\n    credentials: copy\n").unwrap();
    let secret = "gcp-secret-4c1d9e";
    let adc = w.home.path().join("adc.json");
    let adc_json = format!("{{\"type\": \"authorized_user\", \"client_secret\": \"{secret}\"}}\n");
    std::fs::write(&adc, &adc_json).unwrap();

    // Created and provisioned in one go, with the most verbose logs.
    let r = Run::from(
        w.agent_vm(&["-vv", "start"])
            .env("GOOGLE_APPLICATION_CREDENTIALS", &adc)
            .env("CLOUD_ML_REGION", "europe-west4")
            .env("RUST_LOG", "trace")
            .output()
            .unwrap(),
        &["start"],
    );
    r.ok();
    assert!(!r.stderr.contains(secret) && !r.stdout.contains(secret), "the secret reached the logs");
    assert!(r.stderr.contains("warning: credentials: copy: the agent can read"), "{}", r.stderr);

    // Home files with their modes; the sentinel is there.
    let modes = w.guest("stat -c '%a %n' .claude.json .gitconfig .local/bin/start-claude .claude/statusline-command.sh .claude/settings.json .config/opencode/opencode.jsonc").ok().stdout.clone();
    assert_eq!(
        modes,
        "644 .claude.json\n644 .gitconfig\n755 .local/bin/start-claude\n755 .claude/statusline-command.sh\n644 .claude/settings.json\n644 .config/opencode/opencode.jsonc\n"
    );
    assert_eq!(
        w.guest("cat .gitconfig").ok().stdout,
        std::fs::read_to_string(crate::common::repo().join("common/homedir/.gitconfig")).unwrap()
    );

    // Credentials: exact content, root-owned, readable by the VM user's group only.
    assert_eq!(
        w.guest("stat -c '%a %U %G' /etc/google/application_default_credentials.json").ok().stdout,
        "640 root agent\n"
    );
    assert_eq!(w.guest("cat /etc/google/application_default_credentials.json").ok().stdout, adc_json);
    let profile = w.guest("bash -lc 'echo $GOOGLE_APPLICATION_CREDENTIALS $CLOUD_ML_REGION'").ok().stdout.clone();
    assert_eq!(profile, "/etc/google/application_default_credentials.json europe-west4\n");
    let status = w.run(&["status"]);
    assert!(
        status.ok().stdout.contains("COPIED") && status.stdout.contains("warning:   credentials: copy"),
        "{status:?}"
    );
    assert_eq!(w.run(&["status", "--json"]).json()["credentials"]["gcp"], "copied");

    // Listed variables reach a connected session; others do not; values never in argv.
    let child = w
        .agent_vm(&[
            "connect",
            "--no-mount",
            "--",
            "sh",
            "-c",
            // Running until the guest's command lines have been read.
            "echo ${ANTHROPIC_API_KEY:-unset} ${NOT_LISTED_VAR:-unset}; while [ ! -e /tmp/ps-taken ]; do sleep 0.2; done",
        ])
        .env("ANTHROPIC_API_KEY", "sk-test-7f3a")
        .env("NOT_LISTED_VAR", "leak-me")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let guest_ps = w.guest("ps -eo args; touch /tmp/ps-taken").ok().stdout.clone();
    let host_ps = crate::common::host_cmdlines();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sk-test-7f3a unset\n");
    assert!(guest_ps.contains("ps-taken ]"), "the session was not running: {guest_ps}");
    assert!(!guest_ps.contains("sk-test-7f3a"), "the key is on a guest command line");
    assert!(!host_ps.contains("sk-test-7f3a"), "the key is on a host command line");

    guest_cannot_reach_host_services(&w, &adc);

    // Provisioning again changes nothing.
    let snapshot = "stat -c '%n %Y %a' /etc/ssh/sshd_config.d/agent-vm.conf /etc/google/application_default_credentials.json /etc/profile.d/ai-agent-env.sh .gitconfig .local/bin/start-claude .claude.json";
    let before = w.guest(snapshot).ok().stdout.clone();
    std::thread::sleep(std::time::Duration::from_secs(1));
    w.guest("echo '{\"agent\": \"state\"}' > .claude.json").ok();
    let before_claude = w.guest("stat -c '%Y' .claude.json").ok().stdout.clone();
    let r = Run::from(
        w.agent_vm(&["provision"])
            .env("GOOGLE_APPLICATION_CREDENTIALS", &adc)
            .env("CLOUD_ML_REGION", "europe-west4")
            .output()
            .unwrap(),
        &["provision"],
    );
    r.ok();
    let after = w.guest(snapshot).ok().stdout.clone();
    let strip_claude = |s: &str| s.lines().filter(|l| !l.starts_with(".claude.json")).collect::<Vec<_>>().join("\n");
    assert_eq!(strip_claude(&after), strip_claude(&before), "a second provision changed files");
    assert_eq!(
        w.guest("stat -c '%Y' .claude.json").ok().stdout,
        before_claude,
        "the agent's own .claude.json was overwritten"
    );
    assert_eq!(w.guest("cat .claude.json").ok().stdout, "{\"agent\": \"state\"}\n");

    // Rotated credentials are picked up.
    std::fs::write(&adc, "{\"rotated\": true}\n").unwrap();
    Run::from(w.agent_vm(&["provision"]).env("GOOGLE_APPLICATION_CREDENTIALS", &adc).output().unwrap(), &["provision"])
        .ok();
    assert_eq!(w.guest("cat /etc/google/application_default_credentials.json").ok().stdout, "{\"rotated\": true}\n");

    // An unreadable credentials file: clear error, nothing changed.
    let r = Run::from(
        w.agent_vm(&["provision"])
            .env("GOOGLE_APPLICATION_CREDENTIALS", w.home.path().join("missing.json"))
            .output()
            .unwrap(),
        &["provision"],
    );
    r.fails_with("cannot read GCP credentials");

    // A home directory without the sentinel stops provisioning with a clear error.
    let broken = tempfile::tempdir().unwrap();
    copy_tree(&crate::common::repo().join("tests/fixtures/common"), broken.path());
    std::fs::remove_file(broken.path().join("homedir/.claude.json")).unwrap();
    let r = Run::from(
        w.agent_vm(&["provision"]).env("AGENT_VM_COMMON_DIR", broken.path()).output().unwrap(),
        &["provision"],
    );
    r.fails_with("sentinel .claude.json");

    packages_install_in_one_run_with_progress(&w);
}

/// Debian packages from a repository of the test's own in the guest (the
/// only source apt has then): one apt run with a line per package, and a
/// failure that names the package.
fn packages_install_in_one_run_with_progress(w: &World) {
    w.admin(
        r#"set -e
repo=/srv/agent-vm-test-apt; sudo mkdir -p "$repo"; cd "$repo"
for p in avm-test-one avm-test-two avm-test-three; do
    d=$(mktemp -d); mkdir -p "$d/DEBIAN" "$d/usr/share/$p"
    printf 'Package: %s
Version: 1.0
Architecture: all
Maintainer: t <t@example.org>
Description: test
' "$p" > "$d/DEBIAN/control"
    echo "$p" > "$d/usr/share/$p/marker"
    sudo dpkg-deb --root-owner-group -b "$d" "$repo/$p.deb" >/dev/null
done
for f in *.deb; do dpkg-deb -f "$f"; echo "Filename: ./$f"; echo "Size: $(stat -c %s "$f")"; echo "SHA256: $(sha256sum "$f" | cut -d' ' -f1)"; echo; done | sudo tee Packages >/dev/null
printf 'Suite: test
Codename: test
Architectures: all amd64
SHA256:
 %s %s Packages
' "$(sha256sum Packages | cut -d' ' -f1)" "$(stat -c %s Packages)" | sudo tee Release >/dev/null
sudo mkdir -p /etc/apt/agent-vm-test-off
sudo sh -c 'mv /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/apt/agent-vm-test-off/ 2>/dev/null || true'
echo "deb [trusted=yes] file:$repo ./" | sudo tee /etc/apt/sources.list.d/agent-vm-test.list >/dev/null"#,
    )
    .ok();
    let common = tempfile::tempdir().unwrap();
    copy_tree(&crate::common::repo().join("tests/fixtures/common"), common.path());
    let list = common.path().join("packages/apt-packages.txt");
    let base = std::fs::read_to_string(&list).unwrap();
    let provision = |extra: &str| {
        std::fs::write(&list, format!("{base}{extra}")).unwrap();
        Run::from(
            w.agent_vm(&["provision"]).env("AGENT_VM_COMMON_DIR", common.path()).output().unwrap(),
            &["provision"],
        )
    };
    let r = provision("avm-test-one\navm-test-two\n");
    r.ok();
    assert!(r.stderr.contains("installing 2 listed package(s): avm-test-one avm-test-two"), "{}", r.stderr);
    assert!(r.stderr.contains("  [1/2, ") && r.stderr.contains("  [2/2, "), "no progress lines: {}", r.stderr);
    assert_eq!(
        w.admin("cat /usr/share/avm-test-one/marker /usr/share/avm-test-two/marker").ok().stdout,
        "avm-test-one\navm-test-two\n"
    );
    // One package apt cannot find: the failure names it.
    let r = provision("avm-test-three\navm-test-missing\n");
    r.fails_with("apt: installing avm-test-missing failed");
    // It is among the last lines of the VM's errors, each shown on a line of its own.
    let shown: Vec<&str> = r.stderr.lines().skip_while(|l| !l.ends_with("the end of its errors:")).skip(1).collect();
    assert!(
        shown.iter().any(|l| l.starts_with("    ") && l.contains("apt: installing avm-test-missing failed")),
        "{}",
        r.stderr
    );
}

/// A service bound to the host's loopback is out of the guest's reach
/// unless the user opts out.
fn guest_cannot_reach_host_services(w: &World, adc: &std::path::Path) {
    // Provision as the test does elsewhere, so only the guard differs.
    let provision = |extra: &[&str]| {
        let mut args = vec!["provision"];
        args.extend(extra);
        let cmd = w
            .agent_vm(&args)
            .env("GOOGLE_APPLICATION_CREDENTIALS", adc)
            .env("CLOUD_ML_REGION", "europe-west4")
            .output();
        Run::from(cmd.unwrap(), &args)
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let _ = std::io::Write::write_all(&mut conn.unwrap(), b"host-secret-service\n");
        }
    });
    let probe = format!("timeout 10 bash -c 'exec 3<>/dev/tcp/192.168.5.2/{port} && head -n1 <&3'");
    let r = w.admin(&probe);
    assert!(!r.stdout.contains("host-secret-service"), "the guest reached a host loopback service");
    assert_ne!(r.code, Some(0));
    // DNS still works for the VM's own users: a query to the resolver in
    // resolv.conf (Lima's, which it forwards to its host agent's port) for
    // a name Lima answers itself, past /etc/hosts.
    assert_eq!(w.admin(DNS_QUERY).ok().stdout, "answers 1 192.168.5.2\n", "no DNS behind the guard");
    assert_eq!(w.guest("systemctl is-enabled agent-vm-guard.service").ok().stdout, "enabled\n");
    // The control: with the opt-out the same probe gets through (so the
    // check above can fail), and provisioning again restores the guard.
    provision(&["--allow-host-access"]).ok();
    assert_eq!(w.admin(&probe).ok().stdout, "host-secret-service\n");
    provision(&[]).ok();
    assert!(!w.admin(&probe).stdout.contains("host-secret-service"), "the guard did not come back");
}

/// Asks the resolver in /etc/resolv.conf for host.lima.internal's address.
const DNS_QUERY: &str = r#"python3 - <<'EOF'
import socket, struct
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p for p in b"host.lima.internal".split(b".")) + b"\0" + struct.pack(">HH", 1, 1)
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(q, (ns, 53))
r = s.recv(512)
print("answers", struct.unpack(">H", r[6:8])[0], socket.inet_ntoa(r[-4:]))
EOF"#;

/// Copies a tree, following symlinks (the fixture links to common/).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let meta = std::fs::metadata(e.path()).unwrap();
        if meta.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
