//! Parallel runs, snapshots, editor/ssh integration and the ssh backend,
//! against real guests.

use crate::common::{Run, World, eventually, git};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn guest_count(w: &World, pattern: &str) -> usize {
    let r = w.guest_args(r#"pgrep -f -- "$1" | wc -l"#, &[pattern]);
    r.stdout.trim().parse().unwrap()
}

// What each branch's command does: all three wait for each other (so they
// must run at once), one fails, one makes two commits.
const SCRIPT: &str = r#"b=$(git symbolic-ref --short HEAD)
touch "/tmp/run-started-$b"
for i in $(seq 120); do [ "$(ls /tmp/run-started-* | wc -l)" -ge 3 ] && break; sleep 0.5; done
[ "$(ls /tmp/run-started-* | wc -l)" -ge 3 ] || { echo "not run concurrently" >&2; exit 9; }
case "$b" in
  fail-b) echo "failing on purpose" >&2; exit 3 ;;
  commit-c) for f in one two; do echo $f > $f; git add $f; git -c user.name=A -c user.email=a@vm commit -qm $f; done ;;
esac
echo "done in $b""#;

fn run_in_parallel_and_stop_everything_on_interrupt(w: &World) {
    let repo = w.repo("run-app");

    let logs = w.home.path().join("outputs");
    let logs_arg = format!("--logs={}", logs.display());
    let r = w.run_in(&repo, &["run", "-j", "3", &logs_arg, "ok-a", "fail-b", "commit-c", "--", "bash", "-c", SCRIPT]);
    assert_eq!(r.code, Some(1), "one command failed, so run fails:\n{}\n{}", r.stdout, r.stderr);
    let stamps: Vec<_> = std::fs::read_dir(&logs).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(stamps.len(), 1, "{stamps:?}");
    let name = stamps[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.len() == 15 && name.as_bytes()[8] == b'-', "YYYYMMDD-HHMMSS: {name}");
    let log = |b: &str| std::fs::read_to_string(stamps[0].join(format!("{b}.log"))).unwrap();
    assert_eq!(log("ok-a"), "done in ok-a\n");
    assert_eq!(log("fail-b"), "failing on purpose\n");
    assert_eq!(log("commit-c"), "done in commit-c\n");
    let row = |b: &str| -> Vec<String> {
        let line = r.stdout.lines().find(|l| l.starts_with(&format!("{b} "))).unwrap_or_else(|| panic!("{}", r.stdout));
        line.split_whitespace().map(str::to_owned).collect()
    };
    assert!(r.stdout.starts_with("BRANCH"), "{}", r.stdout);
    assert_eq!((row("ok-a")[1].as_str(), row("ok-a")[3].as_str()), ("ok", "0"));
    assert_eq!(row("fail-b")[1..3], ["exit".to_owned(), "3".to_owned()]);
    assert_eq!((row("commit-c")[1].as_str(), row("commit-c")[3].as_str()), ("ok", "2"));
    assert!(row("ok-a")[2].ends_with('s'));

    // commit-c's workspace now has commits the host lacks: pushing it again
    // (as run does first) refuses, losing nothing.
    w.run_in(&repo, &["run", "commit-c", "--", "true"]).fails_with("run `agent-vm fetch commit-c` first");

    // Streamed output is prefixed with the branch; --fetch brings commits
    // back. A workspace at the host's tip is not pushed again; one the host
    // has moved past is.
    let tree = git(&repo, &["rev-parse", "fail-b^{tree}"]);
    let parent = git(&repo, &["rev-parse", "fail-b"]);
    let ahead = git(
        &repo,
        &[
            "-c",
            "user.name=H",
            "-c",
            "user.email=h@h",
            "commit-tree",
            tree.trim(),
            "-p",
            parent.trim(),
            "-m",
            "host-ahead",
        ],
    );
    git(&repo, &["update-ref", "refs/heads/fail-b", ahead.trim()]);
    let commit = "echo z > z && git add z && git -c user.name=A -c user.email=a@vm commit -qm from-run && git log -1 --format=%s";
    let r = w.run_in(&repo, &["run", "--fetch", "x/y", "ok-a", "fail-b", "--", "bash", "-c", commit]);
    r.ok();
    assert!(r.stdout.contains("x/y    | from-run\n"), "{}", r.stdout);
    assert!(r.stdout.contains("ok-a   | from-run\n"), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!("~/{} is up to date with \"ok-a\"", w.workspace_dir(&repo, "ok-a"))),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("Pushed \"fail-b\""), "{}", r.stderr);
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", "x/y"]).trim(), "from-run");
    assert_eq!(git(&repo, &["log", "-2", "--format=%s", "fail-b"]), "from-run\nhost-ahead\n");

    // Ctrl-C stops every remote command, children included.
    interrupt_leaves_nothing_running(w, &repo, "INT", Some(130));
    // So does agent-vm being killed outright: the VM notices the dropped
    // connection.
    interrupt_leaves_nothing_running(w, &repo, "KILL", None);

    count_the_vm_stalls_is_interrupted(w, &repo);
    clean_all_waits_for_a_running_run(w, &repo);
}

/// The commits made are counted after the commands, from files the agent
/// controls: a HEAD made a FIFO stalls the count in the VM, and Ctrl-C
/// still ends the run, its table shown (before, it waited for ever with
/// Ctrl-C taken by run's own handler).
fn count_the_vm_stalls_is_interrupted(w: &World, repo: &Path) {
    let mut child = w
        .agent_vm(&["run", "fifo-h", "--", "sh", "-c", "rm .git/HEAD && mkfifo .git/HEAD"])
        .current_dir(repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stalled = || w.guest_args(r#"pgrep -f -- "[r]ev-list --count" | wc -l"#, &[]).stdout.trim() != "0";
    assert!(eventually(120, stalled), "the count never started in the VM");
    std::thread::sleep(Duration::from_secs(1));
    assert!(child.try_wait().unwrap().is_none(), "run ended while the VM held its count");
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(status.unwrap().success());
    let out = Run::from(wait_with_timeout(&mut child, 20), &["run"]);
    assert_eq!(out.code, Some(130), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.lines().any(|l| l.starts_with("fifo-h ") && l.ends_with(" -")), "{}", out.stdout);
    // The workspace is whole again for what follows (found by its name: a
    // listing would ask its git).
    let fix = r#"for d in workspace/*-fifo-h-*; do [ -p "$d/.git/HEAD" ] && rm "$d/.git/HEAD" && echo "ref: refs/heads/fifo-h" > "$d/.git/HEAD" && echo fixed; done"#;
    assert_eq!(w.guest_args(fix, &[]).ok().stdout.trim(), "fixed");
}

/// clean-all takes the branch locks run holds: it waits instead of
/// deleting a workspace under a running command.
fn clean_all_waits_for_a_running_run(w: &World, repo: &Path) {
    // Long enough that clean-all, slow to connect on a loaded machine, still finds the run going.
    let marker = "sleep 30.25";
    let child = w
        .agent_vm(&["run", "race-a", "--", "bash", "-c", &format!("{marker} && echo ok > survived && cat survived")])
        .current_dir(repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(120, || guest_count(w, "[s]leep 30.25") >= 1), "the command never started in the VM");
    let clean = w.run_in(repo, &["clean-all", "--yes", "--force"]);
    let run = Run::from(child.wait_with_output().unwrap(), &["run"]);
    run.ok();
    assert!(run.stdout.contains("race-a | ok"), "the command lost its workspace:\n{}\n{}", run.stdout, run.stderr);
    clean.ok();
    assert!(clean.stderr.contains("Waiting for another agent-vm command"), "{}", clean.stderr);
    assert!(
        clean.stderr.contains("\"race-a\""),
        "clean-all did not delete the workspace after the run: {}",
        clean.stderr
    );
}

fn interrupt_leaves_nothing_running(w: &World, repo: &Path, signal: &str, code: Option<i32>) {
    let marker = format!("sleep 4{}", if signal == "INT" { 242 } else { 243 });
    let mut child = w
        .agent_vm(&[
            "run",
            "-j",
            "2",
            "int-a",
            "int-b",
            "--",
            "bash",
            "-c",
            &format!("{marker} & {marker}; echo never"),
        ])
        .current_dir(repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(120, || guest_count(w, &format!("[s]{}", &marker[1..])) >= 4),
        "the commands never started in the VM"
    );
    let status = std::process::Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
    assert!(status.unwrap().success());
    let out = Run::from(wait_with_timeout(&mut child, 60), &["run"]);
    assert_eq!(out.code, code, "{}\n{}", out.stdout, out.stderr);
    if code.is_some() {
        assert!(out.stdout.contains("interrupted"), "{}", out.stdout);
        assert!(!out.stdout.contains("never"), "{}", out.stdout);
    }
    assert!(
        eventually(30, || guest_count(w, &format!("[s]{}", &marker[1..])) == 0),
        "{signal}: commands left running in the VM"
    );
}

fn wait_with_timeout(child: &mut std::process::Child, secs: u64) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "agent-vm did not exit after the signal");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    std::process::Output { status: child.wait().unwrap(), stdout: stdout.into_bytes(), stderr: stderr.into_bytes() }
}

/// One guest for all of it (each boot costs minutes on an emulated CPU).
#[test]
fn runs_ssh_config_ssh_backend_and_snapshots() {
    let w = World::with_vm("edit");
    w.run(&["start", "--vcpu", "1", "--memory", "2"]).ok();
    run_in_parallel_and_stop_everything_on_interrupt(&w);
    let repo = w.repo("app");

    // ssh-config --install, twice: one Include line, and `ssh edit` works.
    let ssh_config = w.home.path().join(".ssh/config");
    std::fs::create_dir_all(ssh_config.parent().unwrap()).unwrap();
    std::fs::write(&ssh_config, "Host elsewhere\n  Port 2222\n").unwrap();
    w.run(&["ssh-config", "--install"]).ok();
    w.run(&["ssh-config", "--install"]).ok();
    let text = std::fs::read_to_string(&ssh_config).unwrap();
    assert_eq!(text.lines().filter(|l| l.starts_with("Include ")).count(), 1, "{text}");
    assert!(text.ends_with("Host elsewhere\n  Port 2222\n"), "{text}");
    let ssh = |args: &[&str]| {
        let out = std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Run::from(out, args)
    };
    assert_eq!(ssh(&["edit", "echo", "reached"]).ok().stdout, "reached\n");
    assert!(w.run(&["ssh-config"]).ok().stdout.starts_with("# agent-vm instance 'edit'"));

    // connect --print-path: where the workspace shows up on this machine.
    let printed = w.run_in(&repo, &["connect", "--print-path", "feature/p"]).ok().stdout.trim().to_owned();
    w.run_in(&repo, &["push", "feature/p"]).ok();
    let ws = w.workspace_dir(&repo, "feature/p");
    let leaf = ws.strip_prefix("workspace/").unwrap();
    assert_eq!(printed, w.home.path().join(".agent-vm-mounts/edit/workspace").join(leaf).to_str().unwrap());

    ssh_backend(&w, &repo);
    snapshots(&w, &ssh_config);
}

/// The same guest, addressed only by an ssh config through the ssh backend.
fn ssh_backend(w: &World, repo: &Path) {
    let lima = std::fs::read_to_string(w.instance_dir().join("ssh.config")).unwrap();
    let field = |k: &str| {
        lima.lines().find_map(|l| l.trim().strip_prefix(&format!("{k} "))).unwrap().trim_matches('"').to_owned()
    };
    let known_hosts = w.home.path().join("big_known_hosts");
    let config = w.home.path().join("big_ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host bigbox\n  HostName 127.0.0.1\n  Port {}\n  User {}\n  IdentityFile {}\n  UserKnownHostsFile {}\n",
            field("Port"),
            field("User"),
            field("IdentityFile"),
            known_hosts.display()
        ),
    )
    .unwrap();
    let cfg = w.home.path().join(".config/agent-vm/config.yaml");
    std::fs::write(
        &cfg,
        format!("instances:\n  big:\n    backend: ssh\n    host: bigbox\n    ssh_config: {}\n", config.display()),
    )
    .unwrap();
    let big = |args: &[&str]| {
        let mut all = vec!["--instance", "big"];
        all.extend(args);
        w.run_in(repo, &all)
    };
    // An unknown host key is refused, and so is a wrong one.
    big(&["push", "remote-b"]).fails_with("is not in");
    let scan = std::process::Command::new("ssh-keyscan")
        .args(["-t", "rsa,ecdsa,ed25519", "-p", &field("Port"), "127.0.0.1"])
        .output()
        .unwrap();
    let keys = String::from_utf8(scan.stdout).unwrap();
    assert!(keys.contains("[127.0.0.1]:"), "ssh-keyscan found no key: {keys}");
    // Another key of every type, as an impostor would present.
    let mut forged = String::new();
    for t in ["rsa", "ecdsa", "ed25519"] {
        let f = w.home.path().join(format!("impostor_{t}"));
        let keygen =
            std::process::Command::new("ssh-keygen").args(["-q", "-N", "", "-t", t, "-f"]).arg(&f).output().unwrap();
        assert!(keygen.status.success());
        let public = std::fs::read_to_string(f.with_extension("pub")).unwrap();
        let words: Vec<&str> = public.split_whitespace().take(2).collect();
        forged.push_str(&format!("[127.0.0.1]:{} {}\n", field("Port"), words.join(" ")));
    }
    std::fs::write(&known_hosts, forged).unwrap();
    big(&["push", "remote-b"]).fails_with("HOST KEY CHANGED");
    std::fs::write(&known_hosts, &keys).unwrap();

    // Provisioned through this backend, its sessions are the agent user's
    // too; then connect, push and fetch work as with Lima.
    big(&["provision"]).ok();
    let status = big(&["status", "--json"]).json();
    assert_eq!(status["network"]["contained"], true, "{status:#}");
    assert_eq!(status["ssh"]["user"], "agent", "{status:#}");
    big(&["push", "remote-b"]).ok();
    let r = big(&["connect", "remote-b", "--no-mount", "--", "sh", "-c", "cat README; git symbolic-ref HEAD"]);
    assert_eq!(r.ok().stdout, "hello\nrefs/heads/remote-b\n");
    let ws = w.workspace_dir(repo, "remote-b");
    let agent = w.agent_commit(&ws, "remote.txt", "from afar\n");
    big(&["fetch", "remote-b"]).ok();
    assert_eq!(git(repo, &["rev-parse", "remote-b"]).trim(), agent);
    let status = big(&["status", "--json"]).json();
    assert_eq!(status["state"], "Running");
    // Lifecycle commands that cannot apply say so.
    big(&["destroy", "--yes"]).fails_with("agent-vm cannot delete it");
    big(&["snapshot", "create", "s"]).fails_with("agent-vm cannot snapshot it");
    std::fs::remove_file(&cfg).unwrap();
}

fn snapshots(w: &World, ssh_config: &Path) {
    // Lima lists none as nothing, exit 0.
    assert_eq!(w.run(&["snapshot", "list"]).ok().stdout, "");
    w.guest("touch before-snapshot").ok();
    w.run(&["snapshot", "create", "base"]).ok();
    assert_eq!(w.run(&["snapshot", "list"]).ok().stdout, "base\n");
    w.run(&["snapshot", "create", "base"]).fails_with("exists already");
    w.guest("touch after-snapshot && sync").ok();
    w.run(&["snapshot", "apply", "base"]).fails_with("pass --yes");
    w.run(&["snapshot", "apply", "base", "--yes"]).ok();
    assert_eq!(w.lima_list()[0]["status"], "Running");
    w.guest("test -e before-snapshot && ! test -e after-snapshot").ok();
    // The installed ssh entry followed the new port.
    let out = std::process::Command::new("ssh").arg("-F").arg(ssh_config).args(["edit", "true"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.run(&["snapshot", "apply", "nope", "--yes"]).fails_with("no snapshot named \"nope\"");
    w.run(&["snapshot", "delete", "base"]).ok();
    assert_eq!(w.run(&["snapshot", "list"]).ok().stdout, "");
}
