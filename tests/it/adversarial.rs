//! The adversarial suite: a hostile VM, hostile input, faults and secrets,
//! against a real guest. Every case is recorded; the suite prints a table
//! per category (`scripts/adversarial` shows it) and fails if any case
//! failed. Pass means: no marker file ever appears on the host, no host
//! file outside the mount changes, no host branch is rewound, and each
//! command succeeds, fails or warns clearly.

use crate::common::{Run, World, git, host_cmdlines, noise, refs};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Outcome = Result<(), String>;

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

struct Suite {
    results: Vec<(&'static str, String, Outcome)>,
}

impl Suite {
    fn case(&mut self, category: &'static str, name: &str, f: impl FnOnce() -> Outcome) {
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default())
        });
        let verdict = if outcome.is_ok() { "pass" } else { "FAIL" };
        eprintln!("[{verdict}] {category}: {name} ({:.1}s)", started.elapsed().as_secs_f64());
        if let Err(e) = &outcome {
            eprintln!("       {e}");
        }
        self.results.push((category, name.to_owned(), outcome));
    }

    fn finish(self) {
        let mut categories: Vec<&str> = Vec::new();
        for (c, _, _) in &self.results {
            if !categories.contains(c) {
                categories.push(c);
            }
        }
        let mut table = String::from("| category | cases tried | cases passed |\n|---|---:|---:|\n");
        for c in &categories {
            let tried = self.results.iter().filter(|r| r.0 == *c).count();
            let passed = self.results.iter().filter(|r| r.0 == *c && r.2.is_ok()).count();
            table.push_str(&format!("| {c} | {tried} | {passed} |\n"));
        }
        let passed = self.results.iter().filter(|r| r.2.is_ok()).count();
        table.push_str(&format!("| **all** | **{}** | **{passed}** |\n", self.results.len()));
        println!("{table}");
        if let Some(path) = std::env::var_os("AGENT_VM_ADVERSARIAL_TABLE") {
            // Two tests (the suite and the branch names) each add a table.
            let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
            std::io::Write::write_all(&mut f, format!("{table}\n").as_bytes()).unwrap();
        }
        let failed: Vec<String> =
            self.results.iter().filter(|r| r.2.is_err()).map(|r| format!("{}: {}", r.0, r.1)).collect();
        assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    }
}

/// What must never change on the host: sentinel secrets and a marker
/// directory that planted payloads try to create.
struct Host {
    marker: PathBuf,
    sentinels: Vec<(PathBuf, Vec<u8>)>,
}

impl Host {
    fn new(w: &World) -> Host {
        let home = w.home.path();
        let ssh = home.join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::write(ssh.join("id_ed25519"), "HOST-PRIVATE-KEY-not-for-the-vm\n").unwrap();
        std::fs::write(home.join(".bashrc"), "# host bashrc\n").unwrap();
        std::fs::write(home.join(".gitconfig"), "[user]\n\tname = Host\n").unwrap();
        let sentinels = [ssh.join("id_ed25519"), home.join(".bashrc"), home.join(".gitconfig")]
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).unwrap();
                (p, data)
            })
            .collect();
        Host { marker: home.join("pwned"), sentinels }
    }

    /// No marker, no sentinel changed, nothing new in ~/.ssh.
    fn clean(&self) -> Outcome {
        if self.marker.exists() {
            let found: Vec<_> = std::fs::read_dir(&self.marker).unwrap().map(|e| e.unwrap().file_name()).collect();
            return Err(format!("code from the VM ran on the host: {found:?}"));
        }
        for (path, data) in &self.sentinels {
            check!(std::fs::read(path).ok().as_ref() == Some(data), "{} changed", path.display());
        }
        let ssh: Vec<_> = std::fs::read_dir(self.sentinels[0].0.parent().unwrap()).unwrap().collect();
        check!(ssh.len() == 1, "files appeared in the host's ~/.ssh");
        Ok(())
    }
}

fn fsck(repo: &Path) -> Outcome {
    let out = Command::new("git").args(["fsck", "--no-dangling", "--no-progress"]).current_dir(repo).output().unwrap();
    check!(out.status.success(), "git fsck failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn tip(repo: &Path, rev: &str) -> String {
    git(repo, &["rev-parse", rev]).trim().to_owned()
}

/// Host refs other than `branch` and its tracking ref are as before.
fn other_refs_untouched(before: &[String], after: &[String], branch: &str) -> Outcome {
    let keep = |r: &&String| {
        !r.starts_with(&format!("refs/heads/{branch} ")) && !r.starts_with(&format!("refs/remotes/agent-vm/{branch} "))
    };
    let b: Vec<_> = before.iter().filter(keep).collect();
    let a: Vec<_> = after.iter().filter(keep).collect();
    check!(a == b, "host refs changed:\nbefore {b:?}\nafter  {a:?}");
    Ok(())
}

fn ok(r: &Run) -> Outcome {
    check!(r.code == Some(0), "`{}` failed:\n{}\n{}", r.what, r.stdout, r.stderr);
    Ok(())
}

fn fails_clearly(r: &Run, needle: &str) -> Outcome {
    check!(r.code != Some(0), "`{}` should have failed:\n{}", r.what, r.stdout);
    check!(r.stderr.contains(needle), "`{}` should say {needle:?}:\n{}", r.what, r.stderr);
    Ok(())
}

fn spawn_in(w: &World, dir: &Path, args: &[&str]) -> Child {
    w.agent_vm(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Spawns agent-vm with debug logs and returns once it has started the
/// VM-side git program `program` (so a fault injected then lands mid-
/// transfer, not while connecting), with the log so far; Err with the log
/// when it never does.
fn spawn_transferring(
    w: &World,
    dir: &Path,
    args: &[&str],
    program: &str,
) -> Result<(Child, std::sync::mpsc::Receiver<Vec<u8>>), String> {
    use std::io::Read;
    let mut child = w
        .agent_vm(args)
        .current_dir(dir)
        .env("RUST_LOG", "agent_vm=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            log.extend(chunk);
        }
        let text = String::from_utf8_lossy(&log);
        if text.contains(program) {
            return Ok((child, rx));
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
    }
    kill9(&mut child);
    Err(format!("{args:?} never started {program}: {}", String::from_utf8_lossy(&log)))
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn finish(child: Child, what: &str) -> Run {
    Run::from(child.wait_with_output().unwrap(), &[what])
}

/// Commits `mib` MiB of random data to `branch` of the host repo.
fn host_big_commit(repo: &Path, branch: &str, mib: usize, name: &str) {
    git(repo, &["checkout", "-q", branch]);
    let seed = 0x9e3779b97f4a7c15 ^ name.len() as u64 ^ (std::process::id() as u64);
    std::fs::write(repo.join(name), noise(mib << 20, seed)).unwrap();
    git(repo, &["add", name]);
    git(repo, &["commit", "-q", "-m", name]);
    git(repo, &["checkout", "-q", "main"]);
}

fn guest_big_commit(w: &World, ws: &str, mib: usize, name: &str) -> String {
    w.guest_args(
        r#"cd "$1" && head -c "$2"M /dev/urandom > "$3" && git add "$3" && git -c user.name=A -c user.email=a@vm commit -qm "$3" && git rev-parse HEAD"#,
        &[ws, &mib.to_string(), name],
    )
    .ok()
    .stdout
    .trim()
    .to_owned()
}

/// The branch-name corpus: its own guest, so it runs beside the rest of
/// the suite (it is the longest part) instead of after it.
#[test]
fn adversarial_branch_names() {
    let w = World::with_vm("names");
    w.run(&["start", "--vcpu", "1", "--memory", "2"]).ok();
    let host = Host::new(&w);
    let mut s = Suite { results: Vec::new() };
    hostile_names(&w, &host, &mut s);
    s.finish();
}

#[test]
fn adversarial_suite() {
    let w = World::with_vm("adv");
    w.run(&["start", "--vcpu", "1", "--memory", "2"]).ok();
    let host = Host::new(&w);
    let mut s = Suite { results: Vec::new() };
    // AGENT_VM_ADVERSARIAL_ONLY="faults,secrets" runs only those categories.
    let only = std::env::var("AGENT_VM_ADVERSARIAL_ONLY").unwrap_or_default();
    let want = |c: &str| only.is_empty() || only.split(',').any(|o| o.trim() == c);
    if want("hostile VM") {
        hostile_vm(&w, &host, &mut s);
    }
    if want("hostile input") {
        hostile_input(&w, &mut s);
    }
    if want("faults") {
        faults(&w, &host, &mut s);
    }
    if want("secrets") {
        secrets(&w, &mut s);
    }
    if want("network") {
        network(&w, &mut s);
    }
    s.finish();
}

// ---------------------------------------------------------------- hostile VM

/// Plants what a prompt-injected agent would: configs, hooks, attributes,
/// symlinks to host paths, extra refs. $1 marker dir, $2 workspace, $3 host home.
const PLANT: &str = r#"set -e
cd "$2"
m="$1"
p="mkdir -p $m && touch $m"
mkdir -p .evil-hooks
for h in post-checkout post-merge pre-commit post-commit post-update pre-receive update reference-transaction pre-push fsmonitor-watchman post-rewrite; do
  printf '#!/bin/sh\ncat >/dev/null 2>&1\n%s/hook-%s\n' "$p" "$h" > ".evil-hooks/$h"
done
chmod +x .evil-hooks/*
echo '* filter=evil diff=evil' > .gitattributes
ln -sfn "$3/.ssh" ssh-link
ln -sfn /etc etc-link
ln -sfn "$3/.bashrc" bashrc-link
git add -A
git -c user.name=A -c user.email=a@vm commit -qm planted
git tag -f evil-tag
git branch -f other-branch
git update-ref refs/remotes/agent-vm/other HEAD
git update-ref refs/heads/main HEAD
git update-ref refs/stash HEAD
cp .evil-hooks/* .git/hooks/
git config core.fsmonitor "$p/fsmonitor"
git config core.hooksPath "$PWD/.evil-hooks"
git config core.sshCommand "$p/sshcommand"
git config core.pager "$p/pager; cat"
git config core.editor "$p/editor"
git config alias.st "!$p/alias"
git config filter.evil.clean "$p/filter-clean; cat"
git config filter.evil.smudge "$p/filter-smudge; cat"
git config diff.evil.textconv "$p/textconv; cat"
git config diff.external "$p/diff-external"
git config uploadpack.packObjectsHook "$p/packobjectshook""#;

fn hostile_vm(w: &World, host: &Host, s: &mut Suite) {
    const C: &str = "hostile VM";
    let repo = w.repo("app");
    let marker = host.marker.to_str().unwrap().to_owned();
    let home = w.home.path().to_str().unwrap().to_owned();
    w.run_in(&repo, &["push", "victim"]).ok();
    let ws = w.workspace_dir(&repo, "victim");
    w.guest_args(PLANT, &[&marker, &ws, &home]).ok();
    let before = refs(&repo);

    s.case(C, "status and status --json over a planted workspace", || {
        ok(&w.run_in(&repo, &["status"]))?;
        ok(&w.run_in(&repo, &["status", "--json"]))?;
        host.clean()
    });
    s.case(C, "fetch of a planted branch: only that branch and its tracking ref move", || {
        ok(&w.run_in(&repo, &["fetch", "victim"]))?;
        host.clean()?;
        other_refs_untouched(&before, &refs(&repo), "victim")?;
        check!(!refs(&repo).iter().any(|r| r.contains("evil-tag") || r.contains("other-branch")), "VM refs arrived");
        fsck(&repo)
    });
    s.case(C, "host git over fetched attributes, hooks and symlinks stays inert", || {
        git(&repo, &["checkout", "-q", "victim"]);
        git(&repo, &["status"]);
        git(&repo, &["diff", "HEAD~1"]);
        git(&repo, &["log", "-p", "-1"]);
        std::fs::write(repo.join("host-file"), "x\n").unwrap();
        git(&repo, &["add", "host-file"]);
        git(&repo, &["commit", "-qm", "host commit"]);
        git(&repo, &["checkout", "-q", "main"]);
        host.clean()
    });
    s.case(C, "push into a workspace with VM-side hooks", || {
        ok(&w.run_in(&repo, &["push", "victim"]))?;
        host.clean()
    });
    s.case(C, "connect into a planted workspace", || {
        ok(&w.run_in(&repo, &["connect", "victim", "--no-mount", "--", "true"]))?;
        host.clean()
    });
    s.case(C, "host git inside the mount refuses or ignores VM config", || {
        ok(&w.run_in(&repo, &["mount"]))?;
        let dir = w.home.path().join(".agent-vm-mounts/adv/workspace").join(ws.strip_prefix("workspace/").unwrap());
        for args in [&["status"][..], &["log", "-1"], &["diff"], &["st"], &["fetch"]] {
            let _ = Command::new("git").args(args).current_dir(&dir).env("GIT_PAGER", "").output().unwrap();
        }
        host.clean()
    });
    s.case(C, "symlinks to host paths do not expose or change host files", || {
        let dir = w.home.path().join(".agent-vm-mounts/adv/workspace").join(ws.strip_prefix("workspace/").unwrap());
        let read = std::fs::read_to_string(dir.join("ssh-link/id_ed25519")).unwrap_or_default();
        check!(!read.contains("HOST-PRIVATE-KEY"), "the host key was readable through the mount");
        let _ = std::fs::write(dir.join("ssh-link/planted"), "x");
        let _ = std::fs::write(dir.join("bashrc-link"), "echo pwned\n");
        let etc = std::fs::read_to_string(dir.join("etc-link/hostname")).unwrap_or_default();
        check!(
            etc.is_empty() || etc.trim() == format!("lima-{}", w.instance),
            "etc-link showed the host's /etc: {etc}"
        );
        host.clean()
    });
    s.case(C, "a rewritten (non-fast-forward) VM branch never rewinds the host", || {
        let host_tip = tip(&repo, "victim");
        w.guest_args(
            r#"cd "$1" && git reset -q --hard HEAD~2 && echo r > rewritten && git add rewritten && git -c core.hooksPath=/dev/null -c user.name=A -c user.email=a@vm commit -qm rewritten"#,
            &[&ws],
        )
        .ok();
        let r = w.run_in(&repo, &["fetch", "victim"]);
        check!(r.code == Some(2), "fetch should leave the host branch alone (exit 2): {}", r.stderr);
        check!(tip(&repo, "victim") == host_tip, "the host branch moved");
        host.clean()?;
        fsck(&repo)
    });
    s.case(C, "fetch negotiation names only the fetched branch's history", || {
        // A host-only commit on another branch, and a tag on it: the VM
        // must not learn their ids from the fetch's "have" lines.
        let secret = git(&repo, &["commit-tree", "HEAD^{tree}", "-m", "host-private"]).trim().to_owned();
        git(&repo, &["update-ref", "refs/heads/host-private", &secret]);
        git(&repo, &["tag", "private-tag", &secret]);
        w.guest_args(r#"cd "$1" && git reset -q --hard refs/heads/victim"#, &[&ws]).ok();
        w.agent_commit(&ws, "negotiate.txt", "new\n");
        let r = fetch_through(
            w,
            &repo,
            "victim",
            "#!/bin/sh\ntee -a /tmp/negotiation.log | /usr/bin/git-upload-pack \"$@\"\n",
        );
        let said = w.guest("cat /tmp/negotiation.log; rm -f /tmp/negotiation.log").stdout;
        git(&repo, &["tag", "-d", "private-tag"]);
        git(&repo, &["update-ref", "-d", "refs/heads/host-private"]);
        check!(r.code == Some(0) || r.code == Some(2), "fetch failed: {}", r.stderr);
        check!(said.contains("want "), "the fetch asked for nothing: {said}");
        check!(!said.contains(&secret), "the VM learnt the id of a host-only commit:\n{said}");
        host.clean()?;
        fsck(&repo)
    });
    s.case(C, "a malformed pack from the VM fails the fetch cleanly", || {
        let before = refs(&repo);
        let r = fetch_through(w, &repo, "victim", "#!/bin/sh\nhead -c 100000 /dev/urandom\n");
        check!(r.code != Some(0) && !r.stderr.is_empty(), "fetch should fail: {}", r.stderr);
        check!(refs(&repo) == before, "refs changed after a malformed pack");
        host.clean()?;
        fsck(&repo)
    });
    s.case(C, "an enormous pack stops at the receive limit", || {
        let before = refs(&repo);
        // The agent-side branch gets 24 MiB; the limit is 4 MB.
        w.guest_args(r#"cd "$1" && git reset -q --hard refs/heads/victim"#, &[&ws]).ok();
        guest_big_commit(w, &ws, 24, "huge.bin");
        let r = fetch_with(w, &repo, "victim", ("AGENT_VM_MAX_RECEIVE_BYTES", "4000000"));
        fails_clearly(&r, "more than 4000000 bytes")?;
        check!(refs(&repo) == before, "refs changed after an over-limit pack");
        host.clean()?;
        fsck(&repo)
    });
    s.case(C, "a small pack that inflates to a huge file is refused before it lands", || {
        let before = refs(&repo);
        let start = tip_in_guest(w, &ws);
        // On the host's tip (earlier cases left big files on the VM's
        // branch): 64 MiB of zeros, a few hundred KB packed. The limit is 16 MB.
        let blob = w
            .guest_args(
                r#"cd "$1" && git reset -q --hard "$2" && head -c 64M /dev/zero > zeros.bin && git add zeros.bin &&
                   git -c user.name=A -c user.email=a@vm commit -qm zeros && git rev-parse HEAD:zeros.bin"#,
                &[&ws, &tip(&repo, "victim")],
            )
            .ok()
            .stdout
            .trim()
            .to_owned();
        let objects_before = dir_size(&repo.join(".git/objects"));
        let r = fetch_with(w, &repo, "victim", ("AGENT_VM_MAX_OBJECT_BYTES", "16000000"));
        w.guest_args(r#"cd "$1" && git reset -q --hard "$2""#, &[&ws, &start]).ok();
        fails_clearly(&r, "\"zeros.bin\" of 64 MiB, over the limit")?;
        check!(r.stderr.contains("AGENT_VM_MAX_OBJECT_BYTES"), "no way forward named: {}", r.stderr);
        check!(refs(&repo) == before, "refs changed after an over-limit file");
        check!(!has_object(&repo, &blob), "the refused file reached the host's objects");
        let grown = dir_size(&repo.join(".git/objects")).saturating_sub(objects_before);
        check!(grown < 4 << 20, "the host's objects grew by {grown} bytes");
        host.clean()?;
        fsck(&repo)
    });
    s.case(C, "a pack whose commit lacks its tree moves no ref", || {
        let before = refs(&repo);
        let start = tip_in_guest(w, &ws);
        let commit = w.agent_commit(&ws, "orphan.txt", "its tree never leaves the VM\n");
        // git-upload-pack's pack-objects replaced (the agent's own global
        // git config) by one that sends the wanted commit alone.
        w.install_in_guest(
            "/usr/local/bin/commit-only-pack",
            "#!/bin/sh\ncat >/dev/null\ngit rev-parse HEAD | exec git pack-objects --stdout -q\n",
        );
        w.guest("git config --global uploadpack.packObjectsHook /usr/local/bin/commit-only-pack").ok();
        let r = w.run_in(&repo, &["fetch", "victim"]);
        w.guest("git config --global --unset uploadpack.packObjectsHook").ok();
        w.guest_args(r#"cd "$1" && git reset -q --hard "$2""#, &[&ws, &start]).ok();
        fails_clearly(&r, "incomplete history")?;
        check!(refs(&repo) == before, "a ref moved to incomplete history");
        check!(!has_object(&repo, &commit), "the incomplete commit reached the host's objects");
        host.clean()?;
        fsck(&repo)
    });
    s.case(C, "a workspace deleted during fetch: clear error, then recovery", || {
        let before = refs(&repo);
        let r = fetch_through(w, &repo, "victim", "#!/bin/sh\nrm -rf \"$1\"\nexec /usr/bin/git-upload-pack \"$@\"\n");
        check!(r.code != Some(0), "fetch from a vanished workspace should fail");
        check!(refs(&repo) == before, "refs changed");
        fsck(&repo)?;
        // The next push recreates the workspace.
        ok(&w.run_in(&repo, &["push", "victim"]))?;
        host.clean()
    });
    s.case(C, "clean of a planted workspace", || {
        ok(&w.run_in(&repo, &["unmount"]))?;
        ok(&w.run_in(&repo, &["clean", "victim", "--yes", "--force"]))?;
        host.clean()
    });
}

/// `fetch BRANCH` with one more variable in its environment (a limit).
fn fetch_with(w: &World, repo: &Path, branch: &str, (var, value): (&str, &str)) -> Run {
    Run::from(w.agent_vm(&["fetch", branch]).current_dir(repo).env(var, value).output().unwrap(), &["fetch"])
}

fn tip_in_guest(w: &World, ws: &str) -> String {
    w.guest_args(r#"git -C "$1" rev-parse HEAD"#, &[ws]).ok().stdout.trim().to_owned()
}

fn has_object(repo: &Path, id: &str) -> bool {
    Command::new("git").args(["cat-file", "-e", id]).current_dir(repo).status().unwrap().success()
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = e.metadata().unwrap();
        total += if meta.is_dir() { dir_size(&e.path()) } else { meta.len() };
    }
    total
}

/// `fetch BRANCH` with the VM's git-upload-pack replaced (the agent has
/// sudo) by `script` for that one fetch.
fn fetch_through(w: &World, repo: &Path, branch: &str, script: &str) -> Run {
    w.install_in_guest("/usr/local/bin/git-upload-pack", script);
    let r = w.run_in(repo, &["fetch", branch]);
    w.admin("sudo rm -f /usr/local/bin/git-upload-pack").ok();
    r
}

// ------------------------------------------------------------- hostile input

/// 200+ branch names git accepts, each trying to run code that creates the
/// marker (with `${IFS}` for spaces, which branch names cannot hold).
fn full_corpus() -> bool {
    std::env::var_os("AGENT_VM_FULL_CORPUS").is_some_and(|v| !v.is_empty() && v != "0")
}

fn corpus(marker: &str) -> Vec<String> {
    let m = marker;
    let payloads = [
        format!("$(mkdir${{IFS}}-p${{IFS}}{m})"),
        format!("`mkdir${{IFS}}-p${{IFS}}{m}`"),
        format!(";mkdir${{IFS}}-p${{IFS}}{m};"),
        format!("|mkdir${{IFS}}-p${{IFS}}{m}"),
        format!("&&mkdir${{IFS}}-p${{IFS}}{m}"),
        format!("'$(mkdir${{IFS}}-p${{IFS}}{m})'"),
        format!("\"$(mkdir${{IFS}}-p${{IFS}}{m})\""),
        format!("$IFS$(mkdir${{IFS}}-p${{IFS}}{m})"),
        "'".into(),
        "\"".into(),
        "''".into(),
        "$HOME".into(),
        "${PATH}".into(),
        "<in".into(),
        ">out".into(),
        "!bang".into(),
        "#hash".into(),
        "%pct".into(),
        "=eq".into(),
        "&amp".into(),
        "(paren)".into(),
        "{brace}".into(),
        "semi;colon".into(),
        "ü".into(),
        "日本語".into(),
        "🙂".into(),
        "e\u{301}".into(),
        "\u{e9}".into(),
        "-".into(),
        "--help".into(),
        "-rf".into(),
        "x,y".into(),
        "a.b".into(),
        "a+b".into(),
        "@".into(),
        "Case".into(),
        "case".into(),
        "CASE".into(),
    ];
    let shapes: [fn(&str) -> String; 6] = [
        |p| p.to_owned(),
        |p| format!("feature/{p}"),
        |p| format!("x{p}y"),
        |p| format!("-{p}"),
        |p| format!("a/b/{p}/c"),
        |p| format!("{p}-{p}"),
    ];
    // Every payload plain and in one other shape (in turn): the whole
    // product of shapes costs half an hour of emulated guest, so it runs
    // with AGENT_VM_FULL_CORPUS=1.
    let full = full_corpus();
    let mut names = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        for (j, shape) in shapes.iter().enumerate() {
            if !(full || j == 0 || j == 1 + i % (shapes.len() - 1)) {
                continue;
            }
            let n = shape(p);
            // `--` itself separates run's command: the one name no command
            // line can carry as a branch.
            if git2::Reference::is_valid_name(&format!("refs/heads/{n}"))
                && n != "HEAD"
                && n != "--"
                && !names.contains(&n)
            {
                names.push(n);
            }
        }
    }
    names.push(format!("long/{}", "l".repeat(200)));
    names.push(format!("{}end", "d/".repeat(60)));
    names.push("feature-x".into());
    names.push("feature_x".into());
    names.push("Feature-X".into());
    names
}

#[test]
fn the_corpus_covers_every_payload() {
    let names = corpus("/m");
    assert!(names.len() >= 70, "{}", names.len());
    assert!(names.iter().any(|n| n == "Case") && names.iter().any(|n| n == "CASE"), "collisions are tried");
}

fn hostile_names(w: &World, host: &Host, s: &mut Suite) {
    const C: &str = "hostile input";
    let repo = w.repo("names");
    // Under the host marker (so the host check sees it) but a path of its
    // own: planted VM payloads above already created the marker in the VM.
    let marker = host.marker.join("by-name").to_str().unwrap().to_owned();
    let names = corpus(&marker);
    let least = if full_corpus() { 200 } else { 70 };
    assert!(names.len() >= least, "the corpus has only {} names", names.len());

    s.case(C, &format!("{} hostile branch names through run --fetch: 0 injections, 0 collisions", names.len()), || {
        // Each workspace commits its own branch name (as the message: two
        // processes, no file to add); fetching it back proves every name
        // reached its own workspace and returned.
        let record =
            r#"git -c user.name=A -c user.email=a@vm commit -q --allow-empty -m "$(git symbolic-ref --short HEAD)""#;
        let mut args: Vec<&str> = vec!["run", "-j", "4", "--fetch"];
        args.extend(names.iter().map(String::as_str));
        args.extend(["--", "sh", "-c", record]);
        let r = w.run_in(&repo, &args);
        ok(&r)?;
        host.clean()?;
        let in_guest = w.guest_args(r#"test -e "$1" && echo injected || true"#, &[&marker]);
        check!(!in_guest.stdout.contains("injected"), "a branch name ran code in the VM");
        for n in &names {
            let content = git(&repo, &["log", "-1", "--format=%B", &format!("refs/heads/{n}")]);
            check!(content.trim_end_matches('\n') == n, "branch {n:?} came back with {content:?}");
        }
        let status = w.run_in(&repo, &["status", "--json"]).json();
        let dirs: std::collections::HashSet<String> = status["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|ws| ws["this_repo"] == true)
            .map(|ws| ws["dir"].as_str().unwrap().to_owned())
            .collect();
        check!(dirs.len() == names.len(), "{} workspaces for {} names", dirs.len(), names.len());
        fsck(&repo)
    });
    s.case(C, "hostile names through push, fetch, connect and clean", || {
        // `--` makes any name a branch, even one spelled like an option.
        for n in names.iter().step_by(24) {
            ok(&w.run_in(&repo, &["push", "--", n]))?;
            if !n.starts_with("--") {
                ok(&w.run_in(&repo, &["connect", "--no-mount", n, "--", "true"]))?;
            }
            ok(&w.run_in(&repo, &["fetch", "--", n]))?;
            ok(&w.run_in(&repo, &["clean", "--yes", "--", n]))?;
        }
        host.clean()
    });
}

fn hostile_input(w: &World, s: &mut Suite) {
    const C: &str = "hostile input";
    let repo = w.repo("input");
    s.case(C, "malformed ssh.config: clear error, nothing changed", || {
        let path = w.instance_dir().join("ssh.config");
        let good = std::fs::read_to_string(&path).unwrap();
        let before = refs(&repo);
        std::fs::write(&path, good.replace("  Port ", "  Port x")).unwrap();
        let r = w.run_in(&repo, &["push", "main"]);
        std::fs::write(&path, &good).unwrap();
        check!(r.code != Some(0) && r.stderr.contains("ssh.config") || r.stderr.contains("SSH config"), "{}", r.stderr);
        check!(refs(&repo) == before, "refs changed");
        Ok(())
    });
    s.case(C, "limactl list JSON with missing fields: clear error", || {
        let fake = w.home.path().join("fake-limactl");
        std::fs::write(&fake, "#!/bin/sh\necho '{\"status\":\"Running\"}'\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let r = Run::from(w.agent_vm(&["status"]).env("AGENT_VM_LIMACTL", &fake).output().unwrap(), &["status"]);
        fails_clearly(&r, "unexpected output from `limactl list --json`")
    });
    s.case(C, "config file errors: clear error", || {
        let cfg = w.home.path().join(".config/agent-vm/config.yaml");
        std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        std::fs::write(&cfg, "instances:\n  adv: {backend: ssh}\n").unwrap();
        let r = w.run_in(&repo, &["push", "main"]);
        std::fs::remove_file(&cfg).unwrap();
        fails_clearly(&r, "invalid config file")
    });
    s.case(C, "unreadable credentials file: clear error, VM unchanged", || {
        let before = w.admin("sudo ls -l --time-style=+%s /etc/profile.d/ai-agent-env.sh 2>&1").stdout.clone();
        let r = Run::from(
            w.agent_vm(&["provision"])
                .env("GOOGLE_APPLICATION_CREDENTIALS", w.home.path().join("nope.json"))
                .output()
                .unwrap(),
            &["provision"],
        );
        fails_clearly(&r, "cannot read GCP credentials")?;
        check!(
            w.admin("sudo ls -l --time-style=+%s /etc/profile.d/ai-agent-env.sh 2>&1").stdout == before,
            "the VM changed"
        );
        Ok(())
    });
}

// -------------------------------------------------------------------- faults

fn faults(w: &World, host: &Host, s: &mut Suite) {
    const C: &str = "faults";
    let repo = w.repo("faulty");
    w.run_in(&repo, &["push", "f"]).ok();
    let ws = w.workspace_dir(&repo, "f");

    s.case(C, "kill -9 during push", || {
        host_big_commit(&repo, "f", 24, "push-big.bin");
        let before_vm = w.guest_args(r#"git -C "$1" rev-parse HEAD"#, &[&ws]).stdout.clone();
        let (mut child, _) = spawn_transferring(w, &repo, &["push", "f"], "receive-pack")?;
        kill9(&mut child);
        fsck(&repo)?;
        let vm = w.guest_args(r#"git -C "$1" rev-parse HEAD && git -C "$1" fsck --no-dangling --no-progress"#, &[&ws]);
        check!(vm.code == Some(0), "the VM workspace is broken: {}", vm.stderr);
        let head = vm.stdout.lines().next().unwrap_or_default().to_owned();
        check!(head == before_vm.trim() || head == tip(&repo, "f"), "VM branch neither old nor new");
        ok(&w.run_in(&repo, &["push", "f"]))?;
        host.clean()
    });
    s.case(C, "kill -9 during fetch", || {
        let before = tip(&repo, "f");
        let new = guest_big_commit(w, &ws, 24, "fetch-big.bin");
        let (mut child, _) = spawn_transferring(w, &repo, &["fetch", "f"], "upload-pack")?;
        kill9(&mut child);
        fsck(&repo)?;
        let now = tip(&repo, "f");
        check!(now == before || now == new, "host branch neither old nor new");
        ok(&w.run_in(&repo, &["fetch", "f"]))?;
        check!(tip(&repo, "f") == new, "the next fetch did not finish the job");
        Ok(())
    });
    s.case(C, "kill -9 during provision", || {
        let mut child = spawn_in(w, &repo, &["provision"]);
        std::thread::sleep(Duration::from_secs(3));
        kill9(&mut child);
        ok(&w.run(&["provision"]))
    });
    s.case(C, "kill -9 during mount", || {
        let mut child = spawn_in(w, &repo, &["mount"]);
        std::thread::sleep(Duration::from_millis(700));
        kill9(&mut child);
        ok(&w.run(&["mount"]))?;
        let st = w.run(&["status", "--json"]).json();
        check!(st["mount"]["mounted"] == true, "not mounted: {}", st["mount"]);
        ok(&w.run(&["unmount"]))
    });
    s.case(C, "disk full in the guest: push fails clearly, then recovers", || {
        let before_refs = refs(&repo);
        w.admin("sudo fallocate -l $(( $(df --output=avail -B1 / | tail -1) - 4096 )) /fill || true").ok();
        host_big_commit(&repo, "f", 8, "disk-full.bin");
        let r = w.run_in(&repo, &["push", "f"]);
        w.admin("sudo rm -f /fill").ok();
        check!(r.code != Some(0), "push to a full disk should fail");
        check!(!r.stderr.trim().is_empty(), "no error message");
        check!(refs(&repo) == before_refs || refs(&repo).len() == before_refs.len(), "host refs changed");
        fsck(&repo)?;
        ok(&w.run_in(&repo, &["push", "f"]))
    });
    s.case(C, "10 concurrent pushes of new branches (fresh repo) and 2 of the same", || {
        let fresh = w.repo("crowd");
        let mut children: Vec<(String, Child)> = (0..10)
            .map(|i| {
                let b = format!("c{i}");
                (b.clone(), spawn_in(w, &fresh, &["push", &b]))
            })
            .collect();
        children.push(("same".into(), spawn_in(w, &fresh, &["push", "same"])));
        children.push(("same".into(), spawn_in(w, &fresh, &["push", "same"])));
        for (b, child) in children {
            let r = finish(child, &b);
            check!(r.code == Some(0), "push {b}: {}", r.stderr);
        }
        fsck(&fresh)?;
        let status = w.run_in(&fresh, &["status", "--json"]).json();
        for i in 0..10 {
            let b = format!("c{i}");
            let ws = status["workspaces"]
                .as_array()
                .unwrap()
                .iter()
                .find(|ws| ws["branch"] == b.as_str() && ws["this_repo"] == true);
            let head = ws.map(|ws| ws["tip"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
            check!(head == tip(&fresh, "main"), "workspace {b} at {head:?}");
        }
        Ok(())
    });
    s.case(C, "the guest killed mid-checkout of a push: host intact, next push undoes it and succeeds", || {
        // The workspace's checkout of the pushed commit is held up in a
        // filter (the agent's own config) while the guest dies, with what
        // it had written on disk: its lock, a file, the hook's marker.
        w.guest_args(
            r#"git -C "$1" config filter.slow.smudge 'if [ -e /tmp/agent-vm-slow ]; then sleep 600; fi; cat' && touch /tmp/agent-vm-slow"#,
            &[&ws],
        )
        .ok();
        git(&repo, &["checkout", "-q", "f"]);
        std::fs::write(repo.join(".gitattributes"), "*.slow filter=slow\n").unwrap();
        std::fs::write(repo.join("held.slow"), "held up\n").unwrap();
        git(&repo, &["add", ".gitattributes", "held.slow"]);
        git(&repo, &["commit", "-q", "-m", "held up"]);
        git(&repo, &["checkout", "-q", "main"]);
        let before = refs(&repo);
        let mut child = spawn_in(w, &repo, &["push", "f"]);
        let deadline = Instant::now() + Duration::from_secs(240);
        while !w.guest("ps -eo args").stdout.contains("sleep 600") {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                kill9(&mut child);
                return Err("the checkout never reached the filter".into());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        w.admin("sync").ok();
        let pid = std::fs::read_to_string(w.instance_dir().join("qemu.pid")).unwrap();
        Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
        // The connection is gone with the guest: the push must end by itself.
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                kill9(&mut child);
                return Err("push hung after the guest died".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        check!(!status.success(), "the push succeeded though the guest died during it");
        check!(refs(&repo) == before, "host refs changed");
        fsck(&repo)?;
        ok(&w.run(&["start"]))?;
        w.guest("rm -f /tmp/agent-vm-slow").ok();
        ok(&w.run_in(&repo, &["push", "f"]))?;
        let vm = w.guest_args(r#"cd "$1" && cat held.slow && git status --porcelain && git rev-parse HEAD"#, &[&ws]);
        check!(vm.stdout == format!("held up\n{}\n", tip(&repo, "f")), "the workspace after the push: {}", vm.stdout);
        host.clean()
    });
}

// ------------------------------------------------------------------- secrets

/// Runs agent-vm with a secret in its environment at the most verbose
/// level, sampling host and guest command lines once the remote command
/// (`sleep 30`, or provisioning) is running.
fn watch_for_secret(w: &World, dir: &Path, args: &[&str], env: (&str, &str), secret: &str) -> Outcome {
    // Output goes to files: trace logs would fill a pipe nobody reads yet.
    let (out_file, err_file) = (tempfile::NamedTempFile::new().unwrap(), tempfile::NamedTempFile::new().unwrap());
    let mut cmd = w.agent_vm(args);
    cmd.current_dir(dir).env(env.0, env.1).env("RUST_LOG", "trace");
    cmd.stdout(out_file.reopen().unwrap()).stderr(err_file.reopen().unwrap());
    let mut child = cmd.spawn().unwrap();
    let busy = if args.contains(&"provision") { "lima-provision" } else { "sleep 30" };
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut guest, mut hostp) = (String::new(), String::new());
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        guest = w.guest("ps -eo args").stdout.clone();
        hostp = host_cmdlines();
        if guest.contains(busy) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = child.wait().unwrap();
    let logs = std::fs::read_to_string(err_file.path()).unwrap_or_default();
    let printed = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    check!(status.success(), "{args:?} failed: {}", &logs[logs.len().saturating_sub(2000)..]);
    check!(guest.contains(busy), "never saw {busy:?} running in the VM");
    check!(!guest.contains(secret), "the secret is on a guest command line");
    check!(!hostp.contains(secret), "the secret is on a host command line");
    check!(!logs.contains(secret), "the secret is in the -vv logs");
    check!(!printed.contains(secret), "the secret was printed");
    Ok(())
}

fn secrets(w: &World, s: &mut Suite) {
    const C: &str = "secrets";
    let repo = w.repo("secret");
    // Copied credentials (`credentials: copy`) are the ones that travel to
    // the VM: they must still stay off command lines and out of logs.
    let cfg = w.home.path().join(".config/agent-vm/config.yaml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, "instances:\n  adv:\n    credentials: copy\n").unwrap();
    s.case(C, "connect: API key not in argv or -vv logs", || {
        let env = ("ANTHROPIC_API_KEY", "sk-ant-c0nnect-5ecret");
        watch_for_secret(w, &repo, &["-vv", "connect", "s1", "--no-mount", "--", "sleep", "30"], env, env.1)
    });
    s.case(C, "run: API key not in argv or -vv logs", || {
        let env = ("OPENAI_API_KEY", "sk-0penai-run-5ecret");
        watch_for_secret(w, &repo, &["-vv", "run", "s1", "s2", "--", "sleep", "30"], env, env.1)
    });
    s.case(C, "provision: credentials not in argv or -vv logs; files 0640 / 0600", || {
        let adc = w.home.path().join("adc.json");
        std::fs::write(&adc, "{\"client_secret\": \"adc-pr0vision-5ecret\"}\n").unwrap();
        let env = ("GOOGLE_APPLICATION_CREDENTIALS", adc.to_str().unwrap());
        watch_for_secret(w, &repo, &["-vv", "provision"], env, "adc-pr0vision-5ecret")?;
        let mode = w.guest("stat -c '%a %U' /etc/google/application_default_credentials.json").ok().stdout.clone();
        check!(mode == "640 root\n", "credentials mode {mode}");
        let profile = w.guest("cat /etc/profile.d/ai-agent-env.sh").ok().stdout.clone();
        check!(!profile.contains("adc-pr0vision-5ecret"), "the secret is in the profile");
        ok(&w.run(&["ssh-config", "--install"]))?;
        let entry = w.home.path().join(".config/agent-vm/ssh/adv.conf");
        let m = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&entry).unwrap().permissions()) & 0o777;
        check!(m == 0o600, "ssh entry mode {m:o}");
        Ok(())
    });
    std::fs::remove_file(&cfg).unwrap();
}

// ------------------------------------------------------------------- network

fn network(w: &World, s: &mut Suite) {
    s.case("network", "a service on the host's loopback is unreachable from the guest", || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let _ = std::io::Write::write_all(&mut conn.unwrap(), b"host-only-service\n");
            }
        });
        let gateway = w.admin("ip -4 route show default | awk '{ print $3; exit }'").ok().stdout.trim().to_owned();
        for addr in ["192.168.5.2", gateway.as_str()] {
            let r = w.admin(&format!("timeout 10 bash -c 'exec 3<>/dev/tcp/{addr}/{port} && head -n1 <&3' 2>&1"));
            check!(!r.stdout.contains("host-only-service"), "the guest reached the host through {addr}");
        }
        Ok(())
    });
}
