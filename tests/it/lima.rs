//! What real Lima does that agent-vm must cope with: its port forwarding,
//! Broken and degraded instances, and its own SSH master. (Snapshots:
//! runs_and_editors.)

use crate::common::{World, host_user};
use std::time::{Duration, Instant};

/// One guest for both (each boot costs minutes on an emulated CPU): the
/// session variables first, while the master Lima opened at boot is fresh.
#[test]
fn session_variables_arrive_and_nothing_is_forwarded() {
    let w = World::with_vm("pf");
    w.run(&["start"]).ok();
    session_variables_arrive_whoever_opened_the_ssh_master(&w);
    commands_share_one_connection_and_a_stalled_one_holds_up_no_other(&w);
    what_the_vm_makes_ssh_print_is_kept_nowhere(&w);
    nothing_in_the_guest_is_forwarded_to_the_host(&w);
}

/// The VM's SSH connection of the command that runs it: the nearest
/// sshd-session above it (one per connection, whatever its channels).
const CONNECTION_PID: &str = r#"p=$$; while [ "$p" -gt 1 ]; do [ "$(cat /proc/$p/comm)" = sshd-session ] && { echo "$p"; exit 0; }; p=$(awk '/^PPid:/ {print $2}' /proc/$p/status); done; exit 1"#;

/// agent-vm's commands ride one SSH connection (a handshake costs seconds on
/// a slow guest), and one whose output nobody reads holds up no other: each
/// session on it is flow-controlled on its own.
fn commands_share_one_connection_and_a_stalled_one_holds_up_no_other(w: &World) {
    let first = w.run(&["connect", "--no-mount", "--", "sh", "-c", CONNECTION_PID]);
    let second = w.run(&["connect", "--no-mount", "--", "sh", "-c", CONNECTION_PID]);
    let pid = first.ok().stdout.trim().to_owned();
    assert!(!pid.is_empty(), "no connection found: {}", first.stderr);
    assert_eq!(pid, second.ok().stdout.trim(), "two commands, two SSH connections");
    // Endless output into a pipe nobody reads: it fills, and stays full.
    let mut stalled = w
        .agent_vm(&["connect", "--no-mount", "--", "sh", "-c", &format!("{CONNECTION_PID}; exec yes")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    std::io::Read::read(stalled.stdout.as_mut().unwrap(), &mut head).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&head).lines().next(),
        Some(pid.as_str()),
        "the stalled command's own connection"
    );
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let alive = w.run(&["connect", "--no-mount", "--", "sh", "-c", &format!("({CONNECTION_PID}) && echo alive")]);
    assert_eq!(alive.ok().stdout, format!("{pid}\nalive\n"), "a command beside the stalled one");
    eprintln!("a command beside a stalled one took {:?}", started.elapsed());
    let _ = stalled.kill();
    let _ = stalled.wait();
}

/// The shared connection outlives its command, and the VM can make it print
/// without end (a login banner, refused forwarding requests): none of it
/// collects in a file on the host.
fn what_the_vm_makes_ssh_print_is_kept_nowhere(w: &World) {
    const BANNER: usize = 200 << 10;
    w.admin_args(
        r#"head -c "$1" /dev/zero | tr '\0' b | fold -w 100 | sudo tee /etc/issue.agent-vm-test >/dev/null &&
echo 'Banner /etc/issue.agent-vm-test' | sudo tee /etc/ssh/sshd_config.d/zz-banner.conf >/dev/null && sudo systemctl reload ssh"#,
        &[&BANNER.to_string()],
    )
    .ok();
    // New masters, which log in under the banner.
    let state = w.lima_home.join("_agent-vm").join(&w.instance);
    let sockets = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                use std::os::unix::fs::FileTypeExt;
                let ssh = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ssh-"));
                ssh && p.symlink_metadata().is_ok_and(|m| m.file_type().is_socket())
            })
            .collect()
    };
    assert!(!sockets().is_empty(), "no shared connection in {}", state.display());
    for sock in sockets() {
        std::process::Command::new("ssh")
            .arg("-o")
            .arg(format!("ControlPath={}", sock.display()))
            .args(["-O", "exit", "x"])
            .output()
            .unwrap();
    }
    assert!(crate::common::eventually(10, || sockets().is_empty()), "the masters did not exit");
    // sshd takes its new settings in a moment of its own.
    assert!(crate::common::eventually(30, || w.guest_once("true").code == Some(0)), "sshd did not come back");
    assert_eq!(w.run(&["connect", "--no-mount", "--", "echo", "in"]).ok().stdout, "in\n");
    w.admin("sudo rm /etc/ssh/sshd_config.d/zz-banner.conf /etc/issue.agent-vm-test && sudo systemctl reload ssh").ok();
    assert!(!sockets().is_empty(), "the command made no shared connection");
    let mut biggest = (0, std::path::PathBuf::new());
    for dir in [state.clone(), w.lima_home.join("_agent-vm")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            if e.file_type().is_ok_and(|t| t.is_file()) && len > biggest.0 {
                biggest = (len, e.path());
            }
        }
    }
    assert!(biggest.0 < (BANNER / 4) as u64, "{} holds {} bytes", biggest.1.display(), biggest.0);
}

/// Guest sockets on every loopback and wildcard address, TCP and UDP: the
/// guest agent reports each to Lima's host agent (its debug log shows it),
/// and none may appear on the host.
fn nothing_in_the_guest_is_forwarded_to_the_host(w: &World) {
    // Below the ephemeral range, so no outgoing host socket happens to use them.
    const BASE: u16 = 23410;
    let listeners = r#"
import socket, sys, time
base = int(sys.argv[1])
socks = []
for i, (family, ip) in enumerate([(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                                  (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]):
    for j, kind in enumerate([socket.SOCK_STREAM, socket.SOCK_DGRAM]):
        s = socket.socket(family, kind)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((ip, base + 2 * i + j))
        if kind == socket.SOCK_STREAM:
            s.listen()
        socks.append(s)
print("bound", flush=True)
time.sleep(3600)
"#;
    w.guest_args(
        r#"printf '%s' "$1" > /tmp/listen.py && (setsid python3 /tmp/listen.py "$2" > /tmp/listen.out 2>&1 &) && sleep 2 && cat /tmp/listen.out"#,
        &[listeners, &BASE.to_string()],
    )
    .ok();
    let expected: Vec<(&str, &str, u16)> = ["127.0.0.1", "::1", "0.0.0.0", "::"]
        .iter()
        .enumerate()
        .flat_map(|(i, ip)| [("tcp", *ip, BASE + 2 * i as u16), ("udp", *ip, BASE + 2 * i as u16 + 1)])
        .collect();
    // The host agent has heard of every socket: forwarding was decided.
    let log_path = w.instance_dir().join("ha.stderr.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap().replace('\\', "");
        let missing: Vec<_> = expected
            .iter()
            .filter(|(proto, ip, port)| !log.contains(&format!(r#"protocol:"{proto}"  ip:"{ip}"  port:{port}}}"#)))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the guest agent never reported {missing:?}; log:\n{log}");
        std::thread::sleep(Duration::from_secs(2));
    }
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("Forwarding TCP from") && !log.contains("Forwarding UDP from"), "Lima forwarded:\n{log}");
    // Nothing listens on those ports on the host, on any address.
    let control = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listening = host_listeners();
    assert!(listening.contains(&control.local_addr().unwrap().port()), "the host's listeners are not read right");
    for (proto, ip, port) in &expected {
        assert!(!listening.contains(port), "{proto} {ip}:{port} from the guest is open on the host: {listening:?}");
        assert!(std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(), "host 127.0.0.1:{port} answers");
    }
}

/// Local ports of the host's listening TCP sockets and bound, unconnected
/// UDP sockets, IPv4 and IPv6 (what a forward would open).
fn host_listeners() -> Vec<u16> {
    let mut ports = Vec::new();
    for (table, listening) in [("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")] {
        let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if fields[3] == listening
                && let Some(port) = port
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// A VM whose host agent died is Broken in Lima's eyes: agent-vm says so and
/// what to run, starts nothing, and `stop --force` then `start` bring it back
/// with its workspaces.
#[test]
fn broken_and_degraded_vms_are_named_and_recovered() {
    let w = World::with_vm("brk");
    let repo = w.repo("proj");
    w.run_in(&repo, &["push", "main"]).ok();
    let ha_pid: i32 = std::fs::read_to_string(w.instance_dir().join("ha.pid")).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) on a pid this test's own limactl started.
    assert_eq!(unsafe { libc::kill(ha_pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.lima_list()[0]["status"] != "Broken" {
        assert!(Instant::now() < deadline, "Lima never called the VM Broken: {:?}", w.lima_list());
        std::thread::sleep(Duration::from_millis(500));
    }
    // status reports it (exit 0, it is a report) with what to run …
    let r = w.run(&["status"]);
    assert!(r.ok().stdout.contains("(Broken)") && r.stdout.contains("agent-vm stop --force"), "{}", r.stdout);
    assert!(w.run(&["status", "--json"]).json()["problem"].as_str().unwrap().contains("stop --force"));
    // … start refuses, starting nothing; a command that only needs SSH
    // still works (QEMU, which forwards the SSH port, is alive).
    let r = w.run_in(&repo, &["start"]);
    r.fails_with("Broken");
    assert!(r.stderr.contains("agent-vm stop --force"), "start should say what to run:\n{}", r.stderr);
    w.run_in(&repo, &["connect", "--no-mount", "--", "true"]).ok();
    assert_eq!(w.lima_list()[0]["status"], "Broken", "nothing may have restarted it");
    w.run(&["stop"]).fails_with("stop --force");
    w.run(&["stop", "--force"]).ok();
    assert_eq!(w.lima_list()[0]["status"], "Stopped");
    // The workspace survived on the VM's disk.
    w.run(&["start"]).ok();
    w.run_in(&repo, &["fetch", "main"]).ok();
    let ws = w.workspace_dir(&repo, "main");
    assert_eq!(w.guest(&format!("cat {ws}/README")).ok().stdout, "hello\n");

    // Degraded: the guest agent cannot start on the next boot (its unit is
    // masked, so Lima's boot script cannot enable it), so Lima waits a
    // minute for it, calls the VM degraded and exits 1 with the VM running.
    // agent-vm must not claim success.
    w.admin("sudo rm /etc/systemd/system/lima-guestagent.service && sudo systemctl mask lima-guestagent.service").ok();
    w.run(&["stop"]).ok();
    let r = w.run(&["start"]);
    r.fails_with("did not finish starting it");
    assert!(r.stderr.contains("ha.stderr.log") && r.stderr.contains("agent-vm stop"), "{}", r.stderr);
    assert!(!r.stderr.contains("started ("), "{}", r.stderr);
    assert_eq!(w.lima_list()[0]["status"], "Running");
}

/// The interactive path (system ssh with Lima's ssh.config) gets the session
/// variables even when an SSH master already exists: Lima's host agent opens
/// one at boot, before agent-vm provisions sshd's AcceptEnv, and a session
/// riding on it would silently lose them.
fn session_variables_arrive_whoever_opened_the_ssh_master(w: &World) {
    // As a new user would: a plain ssh first (it opens or reuses the master).
    let ssh = std::process::Command::new("ssh")
        .arg("-F")
        .arg(w.instance_dir().join("ssh.config"))
        .args([format!("lima-{}", w.instance).as_str(), "true"])
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ssh.success());
    assert!(w.instance_dir().join("ssh.sock").exists(), "a master should be up");
    // `connect` with a terminal takes the system ssh path.
    let out = std::process::Command::new("script")
        .args([
            "-qec",
            &format!(
                "{} connect -- sh -c 'echo $CLOUD_ML_REGION $ANTHROPIC_AUTH_TOKEN $ANTHROPIC_BASE_URL ${{ANTHROPIC_API_KEY:-no-key}}'",
                crate::common::BIN
            ),
            "/dev/null",
        ])
        .envs(w.env_vars())
        .env("CLOUD_ML_REGION", "region-arrives")
        .env("ANTHROPIC_API_KEY", "sk-test-stays")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // A listed variable arrives; a brokered key stays on the host, the
    // session gets the gateway's base URL and a placeholder instead.
    assert!(
        text.contains("region-arrives agent-vm-brokered http://127.0.0.1:3128/anthropic no-key"),
        "the variables did not arrive as they should: {text}"
    );
    assert_eq!("agent", w.guest("id -un").ok().stdout.trim());
    assert_eq!(host_user(), w.admin("id -un").ok().stdout.trim());
}
