//! The VM lifecycle end to end against a real Debian 13 guest:
//! start → status → connect (russh) → stop/restart → destroy.

use crate::common::World;
use std::io::Write;
use std::process::Stdio;

#[test]
fn lifecycle_against_a_real_guest() {
    let w = World::with_vm("life");

    // start creates the VM from the embedded template, with the asked resources.
    let r = w.run(&["start", "--vcpu", "2", "--memory", "2"]);
    r.ok();
    assert!(r.stderr.contains("created and running"), "{}", r.stderr);
    // Lima writes the edit flags into the template (re-indenting it): the
    // same document with the asked resources.
    let yaml = |s: &str| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(s).unwrap();
    let created = yaml(&std::fs::read_to_string(w.instance_dir().join("lima.yaml")).unwrap());
    let mut expected = yaml(include_str!("../../vm-template/agent-vm.yaml"));
    expected["cpus"] = 2.into();
    expected["memory"] = "2GiB".into();
    assert_eq!(created, expected, "VM not created from the template");

    // status --json agrees with Lima's own view, and the port is live.
    let status = w.run(&["status", "--json"]).json();
    let lima = &w.lima_list()[0];
    assert_eq!(status["state"], "Running");
    assert_eq!(status["running"], true);
    assert_eq!(status["cpus"], 2);
    assert_eq!(status["memory_bytes"], 2u64 << 30);
    assert_eq!(status["ssh"]["port"], lima["sshLocalPort"]);
    assert_eq!(status["ssh"]["host_alias"], "lima-life");
    let text = w.run(&["status"]);
    assert!(text.ok().stdout.contains("life (Running)"), "{}", text.stdout);

    // connect -- CMD over russh: stdin in, stdout/stderr apart, exit status out.
    let mut child = w
        .agent_vm(&["connect", "--", "sh", "-c", "tr a-z A-Z; echo to-stderr >&2; exit 7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello from the host\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO FROM THE HOST\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));

    // The command really ran in the guest, with its words intact.
    let tricky = "it's $(touch /tmp/pwned) `id`; \"quoted\" ünï";
    w.run(&["connect", "--", "sh", "-c", "printf %s \"$1\" > marker", "sh", tricky]).ok();
    assert_eq!(w.guest("cat marker").ok().stdout, tricky);
    assert_eq!(w.guest("ls /tmp/pwned 2>/dev/null; echo done").stdout, "done\n");
    // Lima's guest user is the host user, with a home of its own.
    // Agent sessions run as the agent user, not as Lima's (the host user's
    // name and uid, with sudo).
    let who = w.run(&["connect", "--", "sh", "-c", "echo $(id -un) $HOME; sudo -n true 2>&1 || echo no sudo"]);
    assert_eq!(who.ok().stdout.lines().next(), Some("agent /home/agent"), "{}", who.stdout);
    assert!(who.stdout.contains("no sudo"), "{}", who.stdout);
    // What a login shell reads, read by agent-vm's login profile instead
    // (no `bash --login` to start): the same environment, while /etc/profile
    // is the one it stands for, whatever its file times say.
    w.admin(
        "echo 'shopt -q login_shell && by=bash || by=agent-vm; export LOGIN_BY=$by' | sudo tee /etc/profile.d/zz-by.sh",
    )
    .ok();
    let env = |argv: &[&str]| {
        let mut words = vec!["connect", "--"];
        words.extend(argv);
        let out = w.run(&words).ok().stdout.clone();
        let mut vars: Vec<String> =
            out.lines().filter(|l| !l.starts_with("_=") && !l.starts_with("SHLVL=")).map(str::to_owned).collect();
        vars.sort();
        vars
    };
    let ours = env(&["env"]);
    assert!(ours.iter().any(|v| v == "LOGIN_BY=agent-vm"), "{ours:#?}");
    assert!(ours.iter().any(|v| v.starts_with("PATH=/home/agent/.local/bin:")), "~/.profile applies: {ours:#?}");
    let login = env(&["bash", "--login", "-c", "env"]);
    let by = |v: &String| !v.starts_with("LOGIN_BY=");
    assert_eq!(ours.iter().filter(|v| by(v)).collect::<Vec<_>>(), login.iter().filter(|v| by(v)).collect::<Vec<_>>());
    w.admin("sudo touch /etc/profile").ok();
    assert!(env(&["env"]).iter().any(|v| v == "LOGIN_BY=agent-vm"), "only a time changed");
    w.admin("sudo cp -p /etc/profile /etc/profile.orig && echo 'export CHANGED=1' | sudo tee -a /etc/profile && sudo touch -r /etc/profile.orig /etc/profile").ok();
    let changed = env(&["env"]);
    assert!(changed.iter().any(|v| v == "LOGIN_BY=bash") && changed.iter().any(|v| v == "CHANGED=1"), "{changed:#?}");
    w.admin("sudo mv /etc/profile.orig /etc/profile && sudo rm /etc/profile.d/zz-by.sh").ok();
    let user = crate::common::host_user();
    let admin = w.admin("echo $(id -un) $(id -u) $HOME").ok().stdout.clone();
    assert_eq!(admin, format!("{user} {} /home/{user}.guest\n", crate::common::host_uid()));

    // Starting a running VM changes nothing and says so; resources are creation-only.
    let again = w.run(&["start", "--memory", "4"]);
    again.ok();
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    assert!(again.stderr.contains("apply when the VM is created"), "{}", again.stderr);

    // A VM stopped behind our back: status says so, --no-start refuses clearly.
    w.limactl(&["stop", "life"]).ok();
    let status = w.run(&["status", "--json"]).json();
    assert_eq!(status["state"], "Stopped");
    assert!(status["ssh"].is_null());
    w.run(&["connect", "--no-start", "--", "true"]).fails_with("is not running");

    // connect boots it again and finds the new SSH port.
    let r = w.run(&["connect", "--", "cat", "/etc/hostname"]);
    assert_eq!(r.ok().stdout, "lima-life\n");
    let status = w.run(&["status", "--json"]).json();
    assert_eq!(status["ssh"]["port"], w.lima_list()[0]["sshLocalPort"]);

    // A missing SSH key is named, with what to do.
    let key = w.lima_home.join("_config/user");
    let aside = w.lima_home.join("_config/user.aside");
    std::fs::rename(&key, &aside).unwrap();
    let r = w.run(&["connect", "--", "true"]);
    r.fails_with("SSH key");
    assert!(r.stderr.contains("is missing") && r.stderr.contains(key.to_str().unwrap()), "{}", r.stderr);
    std::fs::rename(&aside, &key).unwrap();
    // A key the guest does not accept: authentication fails, naming the key.
    std::fs::copy(w.lima_home.join("_config/user"), &aside).unwrap();
    let other = w.home.path().join("other");
    assert!(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other)
            .status()
            .unwrap()
            .success()
    );
    std::fs::copy(&other, &key).unwrap();
    w.run(&["connect", "--", "true"]).fails_with("authentication failed");
    // Failed attempts do not shut the host out: every connection comes from
    // one address, and sshd's per-source penalties would refuse the next
    // command (with the right key) for as long as they add up to.
    for _ in 0..4 {
        w.run(&["connect", "--", "true"]).fails_with("authentication failed");
    }
    std::fs::rename(&aside, &key).unwrap();
    assert_eq!(w.guest_once("echo back").ok().stdout, "back\n");

    // destroy refuses while a workspace of any repository holds what its
    // host repository lacks, wherever destroy runs; --force overrides.
    let repo = w.repo("proj");
    w.run_in(&repo, &["push", "main"]).ok();
    let ws = w.workspace_dir(&repo, "main");
    w.agent_commit(&ws, "agent.txt", "work\n");
    let r = w.run(&["destroy", "--yes"]);
    r.fails_with("commits the host has not fetched");
    assert!(r.stderr.contains(&ws) && r.stderr.contains("--force"), "{}", r.stderr);
    w.run_in(&repo, &["fetch", "main"]).ok();
    w.guest_args(r#"echo draft > "$1/draft.txt" && git -C "$1" add draft.txt"#, &[&ws]).ok();
    w.run(&["destroy", "--yes"]).fails_with("uncommitted change");
    w.guest_args(r#"git -C "$1" reset -q --hard"#, &[&ws]).ok();
    // destroy needs confirmation; without a terminal that means --yes.
    w.run(&["destroy"]).fails_with("--yes");
    assert_eq!(w.lima_list().len(), 1, "destroy without --yes must not delete");
    w.run(&["destroy", "--yes"]).ok();
    assert!(w.lima_list().is_empty());
    assert!(!w.instance_dir().exists());
    w.run(&["status"]).fails_with("does not exist");
}
