//! CLI behaviour that needs no VM: help, bad input, missing tools.

use crate::common::{BIN, Run, World};
use std::process::{Command, Stdio};

fn bare(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).env_remove("AGENT_VM_LIMACTL").env_remove("AGENT_VM_INSTANCE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Run::from(cmd.output().unwrap(), args)
}

/// `dir/limactl`, a shell script with `body`: a limactl that misbehaves.
fn fake_limactl(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let fake = dir.join("limactl");
    std::fs::write(&fake, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fake
}

#[test]
fn help_lists_every_subcommand() {
    let r = bare(&["--help"], &[]);
    r.ok();
    for sub in [
        "start",
        "stop",
        "status",
        "connect",
        "push",
        "fetch",
        "run",
        "clean",
        "clean-all",
        "destroy",
        "snapshot",
        "ssh-config",
        "doctor",
        "completions",
        "man",
    ] {
        assert!(r.stdout.contains(&format!("\n  {sub} ")), "--help lacks {sub}:\n{}", r.stdout);
    }
}

#[test]
fn limactl_missing_is_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    let path = empty.path().to_str().unwrap();
    for args in [&["status"][..], &["start"], &["destroy", "--yes"], &["connect", "--", "true"]] {
        bare(args, &[("PATH", path)]).fails_with("limactl not found on PATH");
    }
    bare(&["status"], &[("AGENT_VM_LIMACTL", "/nonexistent/limactl")]).fails_with("AGENT_VM_LIMACTL points to");
}

#[test]
fn doctor_reports_missing_tools_and_fails() {
    let empty = tempfile::tempdir().unwrap();
    let r = bare(&["doctor", "--json"], &[("PATH", empty.path().to_str().unwrap())]);
    assert_eq!(r.code, Some(1));
    let checks = r.json();
    let lima = checks.as_array().unwrap().iter().find(|c| c["name"] == "limactl").unwrap();
    assert_eq!(lima["ok"], false);
    assert!(lima["fix"].as_str().unwrap().contains("lima"));
}

#[test]
fn doctor_passes_with_everything_present() {
    // The real limactl (scripts/build-lima); ssh, sshfs and FUSE come from scripts/test.
    let w = World::new("doc");
    let r = w.run(&["doctor", "--json"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let checks = r.json();
    let check = |name: &str| checks.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    assert_eq!(check("limactl")["ok"], true);
    assert!(check("limactl")["detail"].as_str().unwrap().contains("2.2.0"), "{checks:#}");
    assert_eq!(check("user")["ok"], true);
    assert!(w.run(&["doctor"]).stdout.contains("ok       limactl"));
}

#[test]
fn doctor_refuses_a_limactl_older_than_the_template_needs() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_limactl(dir.path(), "echo 'limactl version 0.9.1'");
    let r = bare(&["doctor", "--json"], &[("AGENT_VM_LIMACTL", fake.to_str().unwrap())]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    let lima = r.json().as_array().unwrap().iter().find(|c| c["name"] == "limactl").unwrap().clone();
    assert_eq!(lima["ok"], false);
    assert!(lima["detail"].as_str().unwrap().contains("older than"), "{lima:#}");
    // One that cannot run (limactl exits at once as root, for instance).
    fake_limactl(dir.path(), "echo 'limactl: must not run as the root user' >&2; exit 1");
    let r = bare(&["doctor", "--json"], &[("AGENT_VM_LIMACTL", fake.to_str().unwrap())]);
    let lima = r.json().as_array().unwrap().iter().find(|c| c["name"] == "limactl").unwrap().clone();
    assert!(lima["detail"].as_str().unwrap().contains("must not run as the root user"), "{lima:#}");
}

#[test]
fn doctor_says_when_sshfs_cannot_contain_symlinks_itself() {
    let w = World::new("oldsshfs");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("sshfs");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'SSHFS version 3.7.1'\necho '    -o follow_symlinks     follow symlinks on the server'\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut path = std::ffi::OsString::from(dir.path());
    path.push(":");
    path.push(w.path_var());
    let r = Run::from(w.agent_vm(&["doctor", "--json"]).env("PATH", path).output().unwrap(), &["doctor"]);
    // agent-vm's relay contains links either way: usable, with a word.
    let sshfs = r.json().as_array().unwrap().iter().find(|c| c["name"] == "sshfs").unwrap().clone();
    assert_eq!(sshfs["ok"], true, "{sshfs:#}");
    let detail = sshfs["detail"].as_str().unwrap();
    assert!(detail.contains("CVE-2026-47187") && detail.contains("relay"), "{sshfs:#}");
    // The real (Debian) sshfs has the option.
    let r = w.run(&["doctor", "--json"]);
    let sshfs = r.json().as_array().unwrap().iter().find(|c| c["name"] == "sshfs").unwrap().clone();
    assert!(sshfs["detail"].as_str().unwrap().contains("and by sshfs's contain_symlinks"), "{sshfs:#}");
}

#[test]
fn the_template_passes_limactl_validate() {
    let w = World::new("validate");
    let template = crate::common::repo().join("vm-template/agent-vm.yaml");
    w.limactl(&["validate", template.to_str().unwrap()]).ok();
}

#[test]
fn unknown_instance_is_a_clear_error() {
    let w = World::new("nope");
    w.run(&["status"]).fails_with("VM 'nope' does not exist");
    w.run(&["status", "--json"]).fails_with("does not exist");
    w.run(&["destroy", "--yes"]).fails_with("VM 'nope' does not exist");
    w.run(&["connect", "--no-start", "--", "true"]).fails_with("does not exist");
}

#[test]
fn invalid_instance_names_are_refused() {
    let w = World::new("x");
    for bad in ["../etc", "a b", "-rf", "a;b", "a--b", "x.", "t.yaml", &"n".repeat(77)] {
        w.run(&[&format!("--instance={bad}"), "status"]).fails_with("invalid instance name");
        w.run(&[&format!("--instance={bad}"), "start"]).fails_with("invalid instance name");
    }
    // A name whose Lima sockets would not fit under LIMA_HOME: refused
    // before anything is created, saying what to shorten.
    let deep = w.home.path().join("d".repeat(60));
    let r = Run::from(
        w.agent_vm(&["--instance", "a-rather-long-instance-name", "start"]).env("LIMA_HOME", &deep).output().unwrap(),
        &["start"],
    );
    r.fails_with("shorter");
    assert!(!deep.join("a-rather-long-instance-name").exists());
    assert!(w.lima_list().is_empty());
}

#[test]
fn garbage_from_limactl_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_limactl(dir.path(), "echo '{not json'");
    bare(&["status"], &[("AGENT_VM_LIMACTL", fake.to_str().unwrap())])
        .fails_with("unexpected output from `limactl list --json`");
    fake_limactl(dir.path(), "echo 'lima exploded' >&2\nexit 3");
    bare(&["status"], &[("AGENT_VM_LIMACTL", fake.to_str().unwrap())]).fails_with("lima exploded");
    // Whatever an error quotes reaches the terminal as text: no clipboard
    // write (OSC 52), no title change, no screen clearing.
    fake_limactl(dir.path(), "printf 'bad \\033]52;c;cHduZWQ=\\007 \\033]0;title\\007 \\033[2J\\n' >&2\nexit 3");
    let r = bare(&["status"], &[("AGENT_VM_LIMACTL", fake.to_str().unwrap())]);
    r.fails_with("bad ?]52;c;cHduZWQ=?");
    assert!(!r.stderr.contains('\u{1b}') && !r.stderr.contains('\u{7}'), "{:?}", r.stderr);
}

#[test]
fn bad_resource_values_are_refused_before_anything_runs() {
    let w = World::new("res");
    w.run(&["start", "--memory", "0"]).fails_with("--memory");
    w.run(&["start", "--vcpu", "lots"]).fails_with("--vcpu");
    assert!(w.lima_list().is_empty());
}

#[test]
fn workspace_commands_outside_a_repository_say_so() {
    let w = World::new("norepo");
    for args in [&["push", "main"][..], &["fetch", "main"], &["clean", "main", "--yes"], &["clean-all", "--yes"]] {
        let r = Run::from(w.agent_vm(args).current_dir(w.home.path()).output().unwrap(), args);
        r.fails_with("not in a git repository");
    }
}

#[test]
fn invalid_branch_names_are_refused_before_anything_runs() {
    let w = World::new("badbranch");
    for bad in ["with space", "a..b", "x.lock", "HEAD", "a:b"] {
        w.run(&["push", bad]).fails_with("is not a valid branch name");
    }
    assert!(w.lima_list().is_empty());
}

/// Output into a pipe nobody reads (`agent-vm doctor | head -0`) ends the
/// command as SIGPIPE ends a shell tool: quietly, no panic.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN).args(["doctor", "--json"]).stdin(Stdio::null()).stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// An option where the branches are is refused, not made a branch.
#[test]
fn run_refuses_options_among_its_branches() {
    let w = World::new("runopts");
    for run_together in ["-vj2", "-qj2", "-v2", "-j2x"] {
        w.run(&["run", run_together, "a", "--", "true"]).fails_with("give each option on its own");
    }
    w.run(&["run", "a", "--fetch", "--", "true"]).fails_with("after a branch");
    assert!(w.lima_list().is_empty());
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    for (shell, needle) in [("bash", "complete -F"), ("zsh", "#compdef agent-vm"), ("fish", "complete -c agent-vm")] {
        let r = bare(&["completions", shell], &[]);
        r.ok();
        assert!(r.stdout.contains(needle), "{shell}: {}", &r.stdout[..r.stdout.len().min(300)]);
        assert!(r.stdout.contains("ssh-config") && r.stdout.contains("snapshot"), "{shell} lacks subcommands");
    }
    bare(&["completions", "tcsh"], &[]).fails_with("invalid value");
    let r = bare(&["man"], &[]);
    r.ok();
    assert!(r.stdout.contains(".TH agent-vm 1") && r.stdout.contains("connect"), "{}", r.stdout);
    let dir = tempfile::tempdir().unwrap();
    bare(&["man", "--dir", dir.path().to_str().unwrap()], &[]).ok();
    for page in ["agent-vm.1", "agent-vm-connect.1", "agent-vm-run.1", "agent-vm-snapshot.1"] {
        assert!(dir.path().join(page).is_file(), "{page} missing");
    }
}

#[test]
fn config_file_mistakes_are_clear_errors_and_change_nothing() {
    let w = World::new("cfg");
    let cfg = w.home.path().join(".config/agent-vm/config.yaml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    for bad in ["instances:\n  cfg:\n    backend: ssh\n", "instances:\n  cfg: {backend: vbox}\n", "instances: ["] {
        std::fs::write(&cfg, bad).unwrap();
        w.run(&["status"]).fails_with("invalid config file");
    }
    // The ssh backend never creates, stops or deletes the machine.
    std::fs::write(&cfg, "instances:\n  cfg:\n    backend: ssh\n    host: nowhere\n    ssh_config: /nonexistent\n")
        .unwrap();
    w.run(&["status"]).fails_with("cannot read the SSH config /nonexistent");
    let ssh_cfg = w.home.path().join("ssh_config");
    std::fs::write(&ssh_cfg, "Host nowhere\n  HostName 127.0.0.1\n  Port 9\n  User u\n").unwrap();
    std::fs::write(
        &cfg,
        format!("instances:\n  cfg:\n    backend: ssh\n    host: nowhere\n    ssh_config: {}\n", ssh_cfg.display()),
    )
    .unwrap();
    w.run(&["destroy", "--yes"]).fails_with("agent-vm cannot delete it");
    w.run(&["start"]).fails_with("does not start machines of the ssh backend");
    w.run(&["snapshot", "list"]).fails_with("agent-vm cannot snapshot it");
    assert!(w.lima_list().is_empty());
}

#[test]
fn run_needs_branches_and_a_command() {
    let w = World::new("runargs");
    w.run(&["run", "a", "b"]).fails_with("COMMAND");
    w.run(&["run", "--", "true"]).fails_with("BRANCH");
    w.run(&["run", "a", "a", "--", "true"]).fails_with("given twice");
    w.run(&["run", "ok", "a..b", "--", "true"]).fails_with("is not a valid branch name");
    assert!(w.lima_list().is_empty());
}
