//! Git workspaces against a real guest: connect / push / fetch / clean /
//! clean-all, hostile branch names, and what never leaves or changes the host.

use crate::common::{World, git, noise, refs};
use std::path::Path;

fn head_of(dir: &Path, rev: &str) -> String {
    git(dir, &["rev-parse", rev]).trim().to_owned()
}

/// Polls the guest until `script` succeeds; panics after `secs` seconds.
fn wait_in_guest(w: &World, script: &str, secs: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while w.guest(script).code != Some(0) {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn workspaces_against_a_real_guest() {
    let w = World::with_vm("ws");
    w.run(&["start", "--vcpu", "1", "--memory", "2"]).ok();
    let repo = w.repo("app");

    connect_creates_branch_and_workspace(&w, &repo);
    fetch_fast_forwards_checked_out_clean_branch(&w, &repo);
    fetch_leaves_dirty_host_tree_alone(&w, &repo);
    fetch_moves_a_branch_that_is_not_checked_out(&w, &repo);
    push_updates_the_vm_tree_and_refuses_over_agent_changes(&w, &repo);
    diverged_branches_lose_nothing(&w, &repo);
    only_the_branch_history_leaves_the_host(&w, &repo);
    hostile_branch_names_inject_nothing(&w, &repo);
    clean_refuses_to_drop_unfetched_commits(&w, &repo);
    status_lists_workspaces(&w, &repo);
    clean_all_removes_this_repositorys_workspaces(&w, &repo);
    kill_9_during_push_leaves_everything_consistent(&w, &repo);
    ship_all_objects_is_an_explicit_choice(&w);
    first_push_of_a_packed_repo_ships_only_the_branch(&w);
    kill_9_during_the_first_seed_leaves_nothing_behind(&w);
}

fn connect_creates_branch_and_workspace(w: &World, repo: &Path) {
    let r = w.run_in(repo, &["connect", "feature/x", "--", "sh", "-c", "git symbolic-ref HEAD; pwd; cat README"]);
    r.ok();
    assert!(r.stderr.contains("Created branch \"feature/x\" on the host from HEAD"), "{}", r.stderr);
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("refs/heads/feature/x"));
    assert!(lines.next().unwrap().contains("/workspace/app-feature-x-"), "{}", r.stdout);
    assert_eq!(lines.next(), Some("hello"));
    assert_eq!(head_of(repo, "feature/x"), head_of(repo, "main"));

    // feature-x is another branch: another workspace.
    w.run_in(repo, &["push", "feature-x"]).ok();
    let a = w.workspace_dir(repo, "feature/x");
    let b = w.workspace_dir(repo, "feature-x");
    assert_ne!(a, b);
    w.agent_commit(&b, "only-in-feature-x", "x");
    assert!(w.guest_args("test -e \"$1/only-in-feature-x\"", &[&a]).code != Some(0));
}

fn fetch_fast_forwards_checked_out_clean_branch(w: &World, repo: &Path) {
    git(repo, &["checkout", "-q", "feature/x"]);
    let ws = w.workspace_dir(repo, "feature/x");
    let agent = w.agent_commit(&ws, "agent.txt", "from the agent\n");
    // Uncommitted work in the VM is reported, not transferred.
    w.guest_args("echo scratch > \"$1/scratch\"", &[&ws]).ok();
    let r = w.run_in(repo, &["fetch", "feature/x"]);
    r.ok();
    assert!(r.stderr.contains("uncommitted change"), "{}", r.stderr);
    assert!(r.stderr.contains("Fast-forwarded"), "{}", r.stderr);
    assert_eq!(head_of(repo, "HEAD"), agent);
    assert_eq!(head_of(repo, "refs/remotes/agent-vm/feature/x"), agent);
    assert_eq!(std::fs::read_to_string(repo.join("agent.txt")).unwrap(), "from the agent\n");
    assert!(!repo.join("scratch").exists());
    assert_eq!(git(repo, &["status", "--porcelain"]), "");
    w.guest_args("rm \"$1/scratch\"", &[&ws]).ok();
}

fn fetch_leaves_dirty_host_tree_alone(w: &World, repo: &Path) {
    let ws = w.workspace_dir(repo, "feature/x");
    let before = head_of(repo, "HEAD");
    let agent = w.agent_commit(&ws, "agent.txt", "second edit\n");
    std::fs::write(repo.join("README"), "host edit in progress\n").unwrap();
    let r = w.run_in(repo, &["fetch", "feature/x"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("uncommitted changes") && r.stderr.contains("git merge --ff-only agent-vm/feature/x"),
        "{}",
        r.stderr
    );
    assert_eq!(head_of(repo, "HEAD"), before, "host branch moved");
    assert_eq!(std::fs::read_to_string(repo.join("README")).unwrap(), "host edit in progress\n");
    assert_eq!(std::fs::read_to_string(repo.join("agent.txt")).unwrap(), "from the agent\n");
    assert_eq!(head_of(repo, "refs/remotes/agent-vm/feature/x"), agent);
    // Once clean, the same fetch fast-forwards.
    git(repo, &["checkout", "-q", "--", "README"]);
    w.run_in(repo, &["fetch", "feature/x"]).ok();
    assert_eq!(head_of(repo, "HEAD"), agent);
}

fn fetch_moves_a_branch_that_is_not_checked_out(w: &World, repo: &Path) {
    git(repo, &["checkout", "-q", "main"]);
    let ws = w.workspace_dir(repo, "feature-x");
    let agent = w.agent_commit(&ws, "more", "y");
    w.run_in(repo, &["fetch", "feature-x"]).ok();
    assert_eq!(head_of(repo, "feature-x"), agent);
    assert_eq!(git(repo, &["symbolic-ref", "HEAD"]).trim(), "refs/heads/main");
    assert!(!repo.join("more").exists(), "the checked-out tree must not change");
}

fn push_updates_the_vm_tree_and_refuses_over_agent_changes(w: &World, repo: &Path) {
    git(repo, &["checkout", "-q", "feature/x"]);
    std::fs::write(repo.join("host.txt"), "from the host\n").unwrap();
    git(repo, &["add", "host.txt"]);
    git(repo, &["commit", "-q", "-m", "host commit"]);
    let ws = w.workspace_dir(repo, "feature/x");
    w.run_in(repo, &["push", "feature/x"]).ok();
    assert_eq!(w.guest_args("cat \"$1/host.txt\"", &[&ws]).ok().stdout, "from the host\n");
    assert_eq!(w.guest_args("git -C \"$1\" status --porcelain", &[&ws]).ok().stdout, "");

    // The agent is editing host.txt: the push must not clobber that.
    w.guest_args("echo agent-wip > \"$1/host.txt\"", &[&ws]).ok();
    std::fs::write(repo.join("host.txt"), "second host version\n").unwrap();
    git(repo, &["commit", "-q", "-am", "host commit 2"]);
    let vm_tip = w.guest_args("git -C \"$1\" rev-parse HEAD", &[&ws]).ok().stdout.clone();
    let r = w.run_in(repo, &["push", "feature/x"]);
    r.fails_with("the VM refused to update refs/heads/feature/x");
    assert_eq!(w.guest_args("cat \"$1/host.txt\"", &[&ws]).ok().stdout, "agent-wip\n");
    assert_eq!(w.guest_args("git -C \"$1\" rev-parse HEAD", &[&ws]).ok().stdout, vm_tip);
    // After the agent drops its edit, the push goes through.
    w.guest_args("git -C \"$1\" checkout -- host.txt", &[&ws]).ok();
    w.run_in(repo, &["push", "feature/x"]).ok();
    assert_eq!(w.guest_args("cat \"$1/host.txt\"", &[&ws]).ok().stdout, "second host version\n");
}

fn diverged_branches_lose_nothing(w: &World, repo: &Path) {
    let ws = w.workspace_dir(repo, "feature/x");
    let agent = w.agent_commit(&ws, "agent-side", "a");
    std::fs::write(repo.join("host-side"), "h").unwrap();
    git(repo, &["add", "host-side"]);
    git(repo, &["commit", "-q", "-m", "host side"]);
    let host_tip = head_of(repo, "HEAD");

    w.run_in(repo, &["push", "feature/x"]).fails_with("run `agent-vm fetch feature/x` first");
    assert_eq!(w.guest_args("git -C \"$1\" rev-parse HEAD", &[&ws]).ok().stdout.trim(), agent);

    let r = w.run_in(repo, &["fetch", "feature/x"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("diverged") && r.stderr.contains("git merge agent-vm/feature/x"), "{}", r.stderr);
    assert_eq!(head_of(repo, "HEAD"), host_tip);
    assert_eq!(head_of(repo, "refs/remotes/agent-vm/feature/x"), agent);

    // The user merges; then push works and both sides' work is in the VM.
    git(repo, &["merge", "-q", "--no-edit", "agent-vm/feature/x"]);
    w.run_in(repo, &["push", "feature/x"]).ok();
    w.guest_args("cd \"$1\" && test -e agent-side && test -e host-side", &[&ws]).ok();
}

fn only_the_branch_history_leaves_the_host(w: &World, repo: &Path) {
    // Secrets in a stash, another branch and a dangling commit on the host.
    std::fs::write(repo.join("README"), "stashed secret\n").unwrap();
    git(repo, &["stash", "-q"]);
    let stash = head_of(repo, "refs/stash");
    git(repo, &["checkout", "-q", "-b", "private", "main"]);
    std::fs::write(repo.join("secret"), "branch secret\n").unwrap();
    git(repo, &["add", "secret"]);
    git(repo, &["commit", "-q", "-m", "private"]);
    let private = head_of(repo, "HEAD");
    git(repo, &["tag", "v-private"]);
    git(repo, &["checkout", "-q", "main"]);
    let before = refs(repo);

    w.run_in(repo, &["push", "shipped"]).ok();
    let ws = w.workspace_dir(repo, "shipped");
    for oid in [&stash, &private] {
        for place in [ws.as_str(), ".agent-vm/cache"] {
            let r = w.guest_args(
                "for d in \"$1\" \"$1\"/*.git; do [ -d \"$d\" ] && git -C \"$d\" cat-file -e \"$2\" 2>/dev/null && echo LEAKED; done; true",
                &[place, oid],
            );
            assert!(!r.ok().stdout.contains("LEAKED"), "{oid} reached the VM at {place}");
        }
    }
    let vm_refs = w.guest_args("git -C \"$1\" for-each-ref --format='%(refname)'", &[&ws]).ok().stdout.clone();
    assert_eq!(vm_refs, "refs/heads/shipped\n");

    // Fetch touches only the fetched branch and refs/remotes/agent-vm/*.
    w.agent_commit(&ws, "f", "1");
    w.guest_args("git -C \"$1\" tag vm-tag && git -C \"$1\" branch vm-extra", &[&ws]).ok();
    w.run_in(repo, &["fetch", "shipped"]).ok();
    let unrelated = |refs: Vec<String>| -> Vec<String> {
        refs.into_iter()
            .filter(|r| !r.starts_with("refs/remotes/agent-vm/") && !r.starts_with("refs/heads/shipped "))
            .collect()
    };
    assert_eq!(unrelated(refs(repo)), unrelated(before), "fetch changed unrelated host refs");
    assert!(!refs(repo).iter().any(|r| r.contains("vm-tag") || r.contains("vm-extra")));
}

fn hostile_branch_names_inject_nothing(w: &World, repo: &Path) {
    let marker_dir = tempfile::Builder::new().prefix("marker").tempdir().unwrap();
    let m = marker_dir.path().display().to_string();
    let names = [
        format!("sub$(touch${{IFS}}{m}/m1)"),
        format!("semi;touch${{IFS}}{m}/m2;x"),
        format!("back`touch${{IFS}}{m}/m3`tick"),
        "q'uote\"s".to_owned(),
        "-leading-dash".to_owned(),
        "ünïcødé/✓".to_owned(),
        "a|b&c>d<e".to_owned(),
    ];
    let mut dirs = std::collections::HashSet::new();
    for name in &names {
        // `--` ends options, so a name may start with `-`.
        w.run_in(repo, &["push", "--", name]).ok();
        let ws = w.workspace_dir(repo, name);
        assert!(dirs.insert(ws.clone()), "{name} collided");
        let head = w.guest_args("git -C \"$1\" symbolic-ref HEAD", &[&ws]).ok().stdout.clone();
        assert_eq!(head.trim_end(), format!("refs/heads/{name}"));
        let agent = w.agent_commit(&ws, "n", name);
        w.run_in(repo, &["fetch", "--", name]).ok();
        assert_eq!(head_of(repo, &format!("refs/heads/{name}")), agent);
        w.run_in(repo, &["clean", "--yes", "--", name]).ok();
    }
    let m1 = std::path::Path::new(&m);
    for f in ["m1", "m2", "m3"] {
        assert!(!m1.join(f).exists(), "{f}: injection on the host");
        let r = w.guest_args("test -e \"$1\" && echo INJECTED; true", &[&format!("{m}/{f}")]);
        assert!(!r.ok().stdout.contains("INJECTED"), "{f}: injection in the guest");
    }
    w.run_in(repo, &["push", "with space"]).fails_with("not a valid branch name");
}

fn clean_refuses_to_drop_unfetched_commits(w: &World, repo: &Path) {
    w.run_in(repo, &["push", "doomed"]).ok();
    let ws = w.workspace_dir(repo, "doomed");
    w.agent_commit(&ws, "unfetched", "precious");
    w.run_in(repo, &["clean", "doomed", "--yes"]).fails_with("commits the host has not fetched");
    w.guest_args("test -d \"$1\"", &[&ws]).ok();
    w.run_in(repo, &["clean", "doomed"]).fails_with("commits the host has not fetched");
    w.run_in(repo, &["fetch", "doomed"]).ok();
    w.guest_args("echo wip > \"$1/README\"", &[&ws]).ok();
    w.run_in(repo, &["clean", "doomed", "--yes"]).fails_with("uncommitted change");
    w.run_in(repo, &["clean", "doomed", "--yes", "--force"]).ok();
    assert_ne!(w.guest_args("test -d \"$1\"", &[&ws]).code, Some(0));
    w.run_in(repo, &["clean", "doomed", "--yes"]).fails_with("no workspace");
    // Nothing to fetch from: said so, and the host branch is left as it was.
    let before = head_of(repo, "refs/heads/doomed");
    w.run_in(repo, &["fetch", "doomed"]).fails_with("there is no workspace for \"doomed\"");
    assert_eq!(head_of(repo, "refs/heads/doomed"), before);
}

fn status_lists_workspaces(w: &World, repo: &Path) {
    let ws = w.workspace_dir(repo, "feature-x");
    w.agent_commit(&ws, "ahead", "1");
    let status = w.run_in(repo, &["status", "--json"]).json();
    let entry = status["workspaces"].as_array().unwrap().iter().find(|e| e["branch"] == "feature-x").unwrap();
    assert_eq!(entry["this_repo"], true);
    assert!(entry["ahead"].is_null(), "host lacks the commit: no count: {entry}");
    w.run_in(repo, &["fetch", "feature-x"]).ok();
    git(repo, &["branch", "-f", "feature-x", "feature-x~1"]);
    let status = w.run_in(repo, &["status", "--json"]).json();
    let entry = status["workspaces"].as_array().unwrap().iter().find(|e| e["branch"] == "feature-x").unwrap();
    assert_eq!((entry["ahead"].as_u64(), entry["behind"].as_u64()), (Some(1), Some(0)), "{entry}");
    let text = w.run_in(repo, &["status"]);
    assert!(text.ok().stdout.contains("1 ahead, 0 behind host"), "{}", text.stdout);
    status_comes_from_the_watcher(w, &ws);
    // Another repository's view: not this repo's workspace.
    let other = w.repo("other");
    let status = w.run_in(&other, &["status", "--json"]).json();
    assert!(status["workspaces"].as_array().unwrap().iter().all(|e| e["this_repo"] == false));
}

/// The workspace watcher answers status in the guest (the shell listing,
/// which would stamp `.since` anew, does not run), and an edit made just
/// before shows; with the watcher killed, status still lists, by itself.
fn status_comes_from_the_watcher(w: &World, ws: &str) {
    wait_in_guest(w, "systemctl is-active -q agent-vm-watch && test -s .agent-vm/watch.port", 120, "the watcher");
    let changes = |w: &World| {
        let status = w.run(&["status", "--json"]).json();
        let entry = status["workspaces"].as_array().unwrap().iter().find(|e| e["dir"] == ws).unwrap().clone();
        entry["changes"].as_u64().unwrap()
    };
    let since = || w.guest("cat .agent-vm/status/.since 2>/dev/null || echo none").stdout.clone();
    let before = since();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for (i, text) in ["edited", "1"].iter().enumerate() {
        w.guest_args("printf %s \"$2\" > \"$1/ahead\"", &[ws, text]).ok();
        assert_eq!(changes(w), [1, 0][i], "edit {i}");
    }
    assert_eq!(since(), before, "the shell listing ran");
    // Another version's watcher (its token differs): the shell lists.
    let port_file = w.guest("cat .agent-vm/watch.port").ok().stdout.clone();
    w.guest(r#"read -r p t < .agent-vm/watch.port && echo "$p 0000000000000000" > .agent-vm/watch.port"#).ok();
    w.guest_args("printf x > \"$1/ahead\"", &[ws]).ok();
    assert_eq!(changes(w), 1, "listed by the shell");
    assert_ne!(since(), before, "the shell listing did not run");
    w.guest_args("printf 1 > \"$1/ahead\"", &[ws]).ok();
    w.guest_args("printf %s \"$1\" > .agent-vm/watch.port", &[&port_file]).ok();
    // Killed, systemd starts it again, and it answers.
    let pid = || w.guest("pgrep -u agent -f '[w]orkspace-watch.py' || true").stdout.trim().to_owned();
    let old = pid();
    assert!(!old.is_empty());
    w.guest_args("kill -9 \"$1\"", &[&old]).ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while pid().is_empty() || pid() == old || w.guest("cat .agent-vm/watch.port").stdout == port_file {
        assert!(std::time::Instant::now() < deadline, "no new watcher");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let before = since();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(changes(w), 0);
    assert_eq!(since(), before, "the new watcher did not answer");
}

fn clean_all_removes_this_repositorys_workspaces(w: &World, repo: &Path) {
    let other = w.home.path().join("other");
    w.run_in(&other, &["push", "main"]).ok();
    let ws = w.workspace_dir(repo, "feature/x");
    w.agent_commit(&ws, "unfetched", "precious");
    // The agent rewrites status's kept answer for the workspace: the host's
    // tip, nothing uncommitted, never stale, and hides the workspace
    // watcher (whose answers it could forge as well). status shows the lie
    // (it is kept), clean-all must not believe it.
    let host_tip = head_of(repo, "refs/heads/feature/x");
    w.run_in(repo, &["status"]).ok();
    w.guest_args(
        r#"mkdir -p .agent-vm/status && printf '1\n\0%s\0feature/x\0%s\0present\n# branch.oid %s\n# branch.head feature/x\n# changes 0\n\0' "$1" "$2" "$3" > ".agent-vm/status/${1#workspace/}" && echo 99999999999 > .agent-vm/status/.since && rm -f .agent-vm/watch.port"#,
        &[&ws, &repo.display().to_string(), &host_tip],
    )
    .ok();
    let status = w.run_in(repo, &["status", "--json"]).json();
    let entry = status["workspaces"].as_array().unwrap().iter().find(|e| e["dir"] == ws.as_str()).unwrap();
    assert_eq!(entry["tip"], host_tip.as_str(), "the kept answer is what status shows: {entry}");
    w.run_in(repo, &["clean-all", "--yes"]).fails_with("fetch first");
    w.guest_args("test -d \"$1\"", &[&ws]).ok();
    let r = w.run_in(repo, &["clean-all", "--yes", "--force"]);
    r.ok();
    let status = w.run_in(repo, &["status", "--json"]).json();
    let left: Vec<_> = status["workspaces"].as_array().unwrap().iter().map(|e| e["this_repo"].clone()).collect();
    assert_eq!(left, vec![serde_json::Value::Bool(false)], "{status:#}");
}

fn kill_9_during_push_leaves_everything_consistent(w: &World, repo: &Path) {
    git(repo, &["checkout", "-q", "-b", "big", "main"]);
    // Incompressible data, so the push takes a while.
    std::fs::write(repo.join("big.bin"), noise(48 << 20, 0x9E3779B97F4A7C15)).unwrap();
    git(repo, &["add", "big.bin"]);
    git(repo, &["commit", "-q", "-m", "big"]);
    let before = refs(repo);
    let mut child = w.agent_vm(&["push", "big"]).current_dir(repo).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(refs(repo), before, "an interrupted push changed host refs");
    git(repo, &["fsck", "--full", "--no-progress"]);
    // The next push recovers and delivers the commit.
    w.run_in(repo, &["push", "big"]).ok();
    let ws = w.workspace_dir(repo, "big");
    let got = w.guest_args("git -C \"$1\" rev-parse HEAD && sha1sum < \"$1/big.bin\"", &[&ws]).ok().stdout.clone();
    assert!(got.starts_with(&head_of(repo, "HEAD")), "{got}");
}

fn ship_all_objects_is_an_explicit_choice(w: &World) {
    let repo = w.repo("packed");
    for i in 0..20 {
        std::fs::write(repo.join("file"), format!("version {i}\n")).unwrap();
        git(&repo, &["add", "file"]);
        git(&repo, &["commit", "-q", "-m", &format!("v{i}")]);
    }
    git(&repo, &["gc", "-q"]);
    std::fs::write(repo.join("file"), "stashed secret\n").unwrap();
    git(&repo, &["stash", "-q"]);
    let stash = head_of(&repo, "refs/stash");
    let r = w.run_in(&repo, &["push", "--ship-all-objects", "main"]);
    r.ok();
    let ws = w.workspace_dir(&repo, "main");
    assert_eq!(w.guest_args("git -C \"$1\" rev-parse HEAD", &[&ws]).ok().stdout.trim(), head_of(&repo, "main"));
    w.guest_args("git -C \"$1\" fsck --no-progress", &[&ws]).ok();
    // The documented cost of the choice: the stash reached the VM's cache.
    let r = w.guest_args(
        "for d in .agent-vm/cache/packed-*.git; do git --git-dir=\"$d\" cat-file -e \"$1\" && echo SHIPPED; done; true",
        &[&stash],
    );
    assert!(r.ok().stdout.contains("SHIPPED"), "--ship-all-objects should copy every object");
    // Later pushes are ordinary incremental pushes.
    std::fs::write(repo.join("file"), "after\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "after"]);
    w.run_in(&repo, &["push", "main"]).ok();
    assert_eq!(w.guest_args("cat \"$1/file\"", &[&ws]).ok().stdout, "after\n");
}

/// The first workspace of a packed repository is seeded with a pack built
/// from the host's packs: the branch's objects only, even where the host
/// stores a branch blob as a delta against another branch's secret.
fn first_push_of_a_packed_repo_ships_only_the_branch(w: &World) {
    let repo = w.repo("gcd");
    let body: String = (0..300).map(|i| format!("configuration line {i}\n")).collect();
    for i in 0..15 {
        std::fs::write(repo.join("conf"), format!("{body}v{i}\n")).unwrap();
        git(&repo, &["add", "conf"]);
        git(&repo, &["commit", "-q", "-m", &format!("v{i}")]);
    }
    git(&repo, &["checkout", "-q", "-b", "private"]);
    std::fs::write(repo.join("conf"), format!("{body}v14\nPRIVATE-TOKEN\n")).unwrap();
    git(&repo, &["commit", "-q", "-am", "private"]);
    git(&repo, &["checkout", "-q", "main"]);
    std::fs::write(repo.join("conf"), "stashed secret\n").unwrap();
    git(&repo, &["stash", "-q"]);
    git(&repo, &["repack", "-adq", "--window=50"]);
    let secrets = [head_of(&repo, "private"), head_of(&repo, "private:conf"), head_of(&repo, "refs/stash")];

    w.run_in(&repo, &["push", "main"]).ok();
    let ws = w.workspace_dir(&repo, "main");
    assert_eq!(w.guest_args("git -C \"$1\" rev-parse HEAD", &[&ws]).ok().stdout.trim(), head_of(&repo, "main"));
    let check = "set -e; for d in .agent-vm/cache/gcd-*.git; do git --git-dir=\"$d\" fsck --full --strict --no-dangling; \
                 ls \"$d\"/objects/pack/*.idx >/dev/null; git --git-dir=\"$d\" rev-list --objects --all | wc -l; done";
    let vm_count: usize = w.guest_args(check, &[]).ok().stdout.trim().parse().unwrap();
    let host_count = git(&repo, &["rev-list", "--objects", "main"]).lines().count();
    assert_eq!(vm_count, host_count);
    for oid in &secrets {
        let r = w.guest_args(
            "for d in \"$2/.git\" .agent-vm/cache/gcd-*.git; do git --git-dir=\"$d\" cat-file -e \"$1\" 2>/dev/null && echo LEAKED; done; true",
            &[oid, &ws],
        );
        assert!(!r.ok().stdout.contains("LEAKED"), "{oid} reached the VM");
    }
}

/// kill -9 while a repository's cache is being seeded: host refs unchanged,
/// no partial pack or stray files left in the VM, and the next push seeds
/// the cache again.
fn kill_9_during_the_first_seed_leaves_nothing_behind(w: &World) {
    let repo = w.repo("seeded");
    std::fs::write(repo.join("big.bin"), noise(32 << 20, 0x9E3779B97F4A7C15)).unwrap();
    git(&repo, &["add", "big.bin"]);
    git(&repo, &["commit", "-q", "-m", "big"]);
    git(&repo, &["gc", "-q"]);
    let before = refs(&repo);
    // The VM's tar waits before reading: the kill lands mid-transfer.
    let slow_tar = "#!/bin/sh\ntouch /tmp/seed-started\nsleep 5\nexec /usr/bin/tar \"$@\"\n";
    w.guest("rm -f /tmp/seed-started").ok();
    w.install_in_guest("/usr/local/bin/tar", slow_tar);
    let mut child = w.agent_vm(&["push", "main"]).current_dir(&repo).spawn().unwrap();
    wait_in_guest(w, "test -e /tmp/seed-started", 300, "the seed to start");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(refs(&repo), before, "an interrupted seed changed host refs");
    git(&repo, &["fsck", "--full", "--no-progress"]);
    // The VM's side reads a cut stream, fails, and removes what it unpacked.
    let cache = ".agent-vm/cache/seeded-*.git/objects";
    wait_in_guest(w, &format!("! ls -d {cache}/incoming.* >/dev/null 2>&1"), 120, "the VM to clean up");
    assert_eq!(w.guest(&format!("ls -A {cache}/pack | wc -l")).ok().stdout.trim(), "0", "a partial pack was left");
    w.admin("sudo rm -f /usr/local/bin/tar").ok();

    w.run_in(&repo, &["push", "main"]).ok();
    let ws = w.workspace_dir(&repo, "main");
    let got = w.guest_args("git -C \"$1\" rev-parse HEAD && sha1sum < \"$1/big.bin\"", &[&ws]).ok().stdout.clone();
    let host_sum =
        std::process::Command::new("sh").arg("-c").arg("sha1sum < big.bin").current_dir(&repo).output().unwrap();
    let host_sum = String::from_utf8(host_sum.stdout).unwrap();
    assert_eq!(got, format!("{}\n{host_sum}", head_of(&repo, "HEAD")));
}
