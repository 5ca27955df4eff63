//! The forward sshfs mount against a real guest: it works both ways, it
//! heals after a VM restart, and nothing the (hostile) VM writes acts on the
//! host.

use crate::common::World;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn mount_point(w: &World) -> PathBuf {
    // Instances other than the default get a directory of their own.
    w.home.path().join(".agent-vm-mounts/mnt/workspace")
}

fn mounted(point: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = point.to_string_lossy().into_owned();
    table.lines().find(|l| l.split(' ').nth(4) == Some(want.as_str())).map(str::to_owned)
}

/// Polls `f` for up to 15 s (sshfs caches names and attributes briefly).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(15), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn mount_against_a_real_guest() {
    let w = World::with_vm("mnt");
    let repo = w.repo("app");
    let point = mount_point(&w);

    // connect mounts, and says where the workspace is on the host.
    let r = w.run_in(&repo, &["connect", "work", "--", "true"]);
    r.ok();
    let line = mounted(&point).unwrap_or_else(|| panic!("connect did not mount:\n{}", r.stderr));
    for opt in ["nosuid", "nodev", "noexec"] {
        assert!(line.split(' ').nth(5).unwrap().split(',').any(|o| o == opt), "{opt} missing: {line}");
    }
    let ws = w.workspace_dir(&repo, "work");
    let host_ws = point.join(ws.strip_prefix("workspace/").unwrap());
    assert!(r.stderr.contains(&host_ws.display().to_string()), "{}", r.stderr);
    let status = w.run_in(&repo, &["status", "--json"]).json();
    assert_eq!(status["mount"]["mounted"], true, "{status:#}");

    // Edits flow both ways.
    assert_eq!(std::fs::read_to_string(host_ws.join("README")).unwrap(), "hello\n");
    std::fs::write(host_ws.join("from-host.txt"), "written on the host\n").unwrap();
    assert_eq!(w.guest_args("cat \"$1/from-host.txt\"", &[&ws]).ok().stdout, "written on the host\n");
    w.guest_args("echo written in the vm > \"$1/from-vm.txt\"", &[&ws]).ok();
    eventually("a VM-written file on the host", || {
        std::fs::read_to_string(host_ws.join("from-vm.txt")).is_ok_and(|s| s == "written in the vm\n")
    });

    hostile_git_config_does_not_run_on_the_host(&w, &ws, &host_ws);
    symlinks_never_reach_host_files(&w, &ws, &host_ws);
    nothing_executes_from_the_mount(&w, &ws, &host_ws);
    special_files_never_reach_the_host(&w, &ws, &host_ws);
    a_lying_sftp_server_cannot_reach_host_files(&w, &repo, &ws, &host_ws);
    a_restarted_vm_gets_its_mount_back(&w, &repo, &point, &host_ws);
    busy_foreign_and_occupied_mount_points(&w, &repo, &point, &host_ws);
    owned_by_me_opt_in_really_is_the_risk(&w, &repo, &ws, &host_ws);

    // The workspace holds the test's edits: --force (vm_lifecycle tests the guard).
    w.run_in(&repo, &["destroy", "--yes", "--force"]).ok();
    assert!(mounted(&point).is_none(), "destroy left the mount behind");
}

/// The agent plants git config that would run a command when host git
/// touches the repository. Host git must refuse the repository.
fn plant_fsmonitor(w: &World, ws: &str, marker: &Path) {
    let cmd = format!("touch {}", marker.display());
    w.guest_args(
        r#"cd "$1" && git config core.fsmonitor "$2" && git config core.hooksPath /tmp && git config alias.st "!$2" && git config core.pager "$2""#,
        &[ws, &cmd],
    )
    .ok();
}

fn hostile_git_config_does_not_run_on_the_host(w: &World, ws: &str, host_ws: &Path) {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("fsmonitor-ran");
    plant_fsmonitor(w, ws, &marker);
    std::thread::sleep(Duration::from_secs(6)); // past the attribute cache
    for args in [&["status"][..], &["log", "-1"], &["st"], &["diff"]] {
        let out = std::process::Command::new("git").args(args).current_dir(host_ws).output().unwrap();
        assert!(!out.status.success(), "host git accepted the VM's repository: {args:?}");
        if args[0] == "status" || args[0] == "log" {
            // (the others fail as outside any repository: diff falls back to
            // --no-index usage, the VM-defined alias does not exist)
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("dubious ownership"), "git {args:?}: {err}");
        }
    }
    assert!(!marker.exists(), "a VM-written core.fsmonitor ran on the host");
    let meta = std::fs::metadata(host_ws.join(".git/config")).unwrap();
    assert_ne!(std::os::unix::fs::MetadataExt::uid(&meta), unsafe_getuid(), "files must not look like the host user's");
}

fn unsafe_getuid() -> u32 {
    // The test user's uid, without a libc dependency.
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap()
}

fn symlinks_never_reach_host_files(w: &World, ws: &str, host_ws: &Path) {
    let secret = w.home.path().join("host-secret.txt");
    std::fs::write(&secret, "host secret\n").unwrap();
    w.guest_args(
        r#"cd "$1" && ln -sf "$2" to-host-secret && ln -sf /etc/hostname to-etc && ln -sf "$3" to-host-dir"#,
        &[ws, &secret.display().to_string(), &w.home.path().display().to_string()],
    )
    .ok();
    eventually("the VM's symlinks", || host_ws.join("to-etc").exists());
    // Resolved in the VM: the VM's /etc/hostname, never the host's.
    assert_eq!(std::fs::read_to_string(host_ws.join("to-etc")).unwrap(), format!("lima-{}\n", w.instance));
    assert!(!std::fs::symlink_metadata(host_ws.join("to-etc")).unwrap().file_type().is_symlink());
    // The host path does not exist in the VM: nothing to read, nothing to write.
    assert!(std::fs::read_to_string(host_ws.join("to-host-secret")).is_err());
    let _ = std::fs::write(host_ws.join("to-host-secret"), "overwritten\n");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret\n");
    assert!(std::fs::read_dir(host_ws.join("to-host-dir")).is_err());
}

fn nothing_executes_from_the_mount(w: &World, ws: &str, host_ws: &Path) {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("executed");
    w.guest_args(
        "cd \"$1\" && printf '#!/bin/sh\\ntouch %s\\n' \"$2\" > run.sh && chmod 4755 run.sh",
        &[ws, &marker.display().to_string()],
    )
    .ok();
    eventually("run.sh", || host_ws.join("run.sh").exists());
    let err = std::process::Command::new(host_ws.join("run.sh")).status().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(!marker.exists());
}

/// Opens `path` for reading in a thread: the result, or None when the
/// open did not come back within 10 s (a FIFO on the host waits for ever).
fn open_within(path: &Path) -> Option<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(&path));
    });
    rx.recv_timeout(Duration::from_secs(10)).ok()
}

fn special_files_never_reach_the_host(w: &World, ws: &str, host_ws: &Path) {
    w.guest_args(
        r#"cd "$1" && mkdir special && cd special && mkfifo fifo &&
           python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")' &&
           ln -s fifo to-fifo && echo plain > plain"#,
        &[ws],
    )
    .ok();
    // A device node needs root in the VM.
    w.admin_args(r#"sudo mknod "$1" c 1 3"#, &[&format!("/home/agent/{ws}/special/null-dev")]).ok();
    let dir = host_ws.join("special");
    eventually("the plain file beside the special ones", || dir.join("plain").exists());
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    // The link is listed (it is a link in the VM); what it leads to is not.
    assert_eq!(names, ["plain", "to-fifo"], "special files reached the host's listing");
    for name in ["fifo", "null-dev", "sock", "to-fifo"] {
        match open_within(&dir.join(name)) {
            None => panic!("opening {name} through the mount hangs the host reader"),
            Some(Ok(text)) => panic!("{name} opened through the mount: {text:?}"),
            Some(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{name}: {e}"),
        }
    }
    assert_eq!(std::fs::read_to_string(dir.join("plain")).unwrap(), "plain\n");
}

/// An SFTP server the agent put in place of the VM's: it passes everything
/// to the real one, except that `…/evil` is a symlink (to STAT as well as
/// LSTAT) whose target is the path in $EVIL_TARGET.
const LYING_SFTP_SERVER: &str = r#"#!/usr/bin/python3
import os, struct, subprocess, sys, threading
target = open("/etc/evil-target").read().encode()
real = subprocess.Popen(["/usr/lib/openssh/sftp-server.real"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
out = sys.stdout.buffer
lock = threading.Lock()
def send(packet):
    with lock:
        out.write(packet); out.flush()
def answers():
    while True:
        head = real.stdout.read(4)
        if len(head) < 4: os._exit(0)
        send(head + real.stdout.read(struct.unpack(">I", head)[0]))
threading.Thread(target=answers, daemon=True).start()
def s(b): return struct.pack(">I", len(b)) + b
while True:
    head = sys.stdin.buffer.read(4)
    if len(head) < 4: break
    body = sys.stdin.buffer.read(struct.unpack(">I", head)[0])
    kind = body[0]
    if kind in (7, 17, 19):
        rid = body[1:5]
        n = struct.unpack(">I", body[5:9])[0]
        path = body[9:9 + n]
        if path.endswith(b"/evil"):
            if kind == 19:
                reply = bytes([104]) + rid + struct.pack(">I", 1) + s(target) + s(b"") + struct.pack(">I", 0)
            else:
                reply = bytes([105]) + rid + struct.pack(">II", 4, 0o120777)
            send(struct.pack(">I", len(reply)) + reply)
            continue
    real.stdin.write(head + body); real.stdin.flush()
real.stdin.close()
real.wait()
"#;

fn a_lying_sftp_server_cannot_reach_host_files(w: &World, repo: &Path, ws: &str, host_ws: &Path) {
    let secret = w.home.path().join("lie-secret.txt");
    std::fs::write(&secret, "host secret\n").unwrap();
    let point = host_ws.parent().unwrap();
    // Absolute, and relative through `..` from the mount back to the file.
    let depth = host_ws.join("x").components().count();
    let relative = format!("{}{}", "../".repeat(depth), secret.display().to_string().trim_start_matches('/'));
    w.admin("sudo mv /usr/lib/openssh/sftp-server /usr/lib/openssh/sftp-server.real").ok();
    w.install_in_guest("/usr/lib/openssh/sftp-server", LYING_SFTP_SERVER);
    w.guest_args(r#"cd "$1" && echo decoy > evil"#, &[ws]).ok();
    for target in [secret.display().to_string(), relative] {
        w.admin_args(r#"printf %s "$1" | sudo tee /etc/evil-target >/dev/null"#, &[&target]).ok();
        // Control: the user's own sshfs, without the guards, does show the
        // host's file: the lie works.
        let control = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("sshfs")
            .arg("-F")
            .arg(w.instance_dir().join("ssh.config"))
            .args(["-o", "ControlMaster=no,ControlPath=none,no_contain_symlinks"])
            .arg(format!("agent@lima-{}:{ws}", w.instance))
            .arg(control.path())
            .status()
            .unwrap();
        assert!(st.success());
        let seen = std::fs::read_to_string(control.path().join("evil"));
        assert!(std::process::Command::new("fusermount3").arg("-u").arg(control.path()).status().unwrap().success());
        assert_eq!(seen.ok().as_deref(), Some("host secret\n"), "control: the lying server should have worked");

        // agent-vm's mount (a new session: a new server).
        w.run_in(repo, &["unmount"]).ok();
        w.run_in(repo, &["mount"]).ok();
        assert!(mounted(point).is_some());
        let got = std::fs::read_to_string(host_ws.join("evil"));
        assert!(got.is_err(), "a lying SFTP server showed {target} through the mount: {got:?}");
        let _ = std::fs::write(host_ws.join("evil"), "overwritten\n");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret\n");
    }
    w.admin("sudo mv /usr/lib/openssh/sftp-server.real /usr/lib/openssh/sftp-server").ok();
    w.run_in(repo, &["unmount"]).ok();
    w.run_in(repo, &["mount"]).ok();
}

fn a_restarted_vm_gets_its_mount_back(w: &World, repo: &Path, point: &Path, host_ws: &Path) {
    let port_before = w.lima_list()[0]["sshLocalPort"].clone();
    w.limactl(&["stop", "mnt"]).ok();
    w.limactl(&["start", "mnt"]).ok();
    assert_ne!(w.lima_list()[0]["sshLocalPort"], port_before, "the stand-in should move the port, as Lima does");
    // The next command notices and heals the mount.
    w.run_in(repo, &["mount"]).ok();
    assert!(mounted(point).is_some());
    eventually("the file through the healed mount", || {
        std::fs::read_to_string(host_ws.join("from-host.txt")).is_ok_and(|s| s == "written on the host\n")
    });
}

fn busy_foreign_and_occupied_mount_points(w: &World, repo: &Path, point: &Path, host_ws: &Path) {
    // Busy: a file is open; a plain unmount refuses, --lazy detaches.
    let open = std::fs::File::open(host_ws.join("README")).unwrap();
    w.run_in(repo, &["unmount"]).fails_with("is busy");
    assert!(mounted(point).is_some());
    w.run_in(repo, &["unmount", "--lazy"]).ok();
    drop(open);
    eventually("the lazy unmount", || mounted(point).is_none());
    w.run_in(repo, &["unmount"]).ok();

    // Occupied: files where the mount would go are never mounted over.
    std::fs::write(point.join("mine"), "x").unwrap();
    w.run_in(repo, &["mount"]).fails_with("is not empty");
    std::fs::remove_file(point.join("mine")).unwrap();

    // Foreign: someone else's mount there (the user's own sshfs of another
    // directory) is left alone.
    let st = std::process::Command::new("sshfs")
        .arg("-F")
        .arg(w.instance_dir().join("ssh.config"))
        .args(["-o", "ControlMaster=no", "-o", "ControlPath=none"])
        .arg(format!("lima-{}:/tmp", w.instance))
        .arg(point)
        .status()
        .unwrap();
    assert!(st.success(), "the user's own sshfs mount");
    w.run_in(repo, &["mount"]).fails_with("mount point for something else");
    w.run_in(repo, &["unmount"]).fails_with("not agent-vm's mount");
    assert!(mounted(point).unwrap().contains(":/tmp"), "{:?}", mounted(point));
    assert!(std::process::Command::new("fusermount3").arg("-u").arg(point).status().unwrap().success());
    w.run_in(repo, &["mount"]).ok();
}

/// The control for the fsmonitor test: with the opt-in, host git trusts the
/// VM's repository and the planted command does run — so the default's
/// refusal is what protects the host.
fn owned_by_me_opt_in_really_is_the_risk(w: &World, repo: &Path, ws: &str, host_ws: &Path) {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("fsmonitor-ran");
    plant_fsmonitor(w, ws, &marker);
    w.run_in(repo, &["unmount"]).ok();
    let r = crate::common::Run::from(
        w.agent_vm(&["mount"]).current_dir(repo).env("AGENT_VM_MOUNT_OWNED_BY_ME", "1").output().unwrap(),
        &["mount"],
    );
    r.ok();
    assert!(r.stderr.contains("git on this machine will obey"), "{}", r.stderr);
    let _ = git_status(host_ws);
    assert!(marker.exists(), "control failed: with the opt-in, host git should have obeyed core.fsmonitor");
    w.run_in(repo, &["unmount"]).ok();
}

fn git_status(dir: &Path) -> std::process::Output {
    std::process::Command::new("git").args(["status"]).current_dir(dir).output().unwrap()
}
