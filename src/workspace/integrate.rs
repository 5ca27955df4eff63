//! The host side of a fetch: bringing the VM's commits onto the host branch
//! without losing anything of the user's (files git does not track, other
//! worktrees, a checkout that cannot complete).

use anyhow::Result;
use git2::{Oid, Repository};

use super::HostRepo;
use crate::printable;

/// Whether `commit` is `tip` or one of its ancestors, in the host repo (an
/// object the host does not have is not contained).
pub fn contains(repo: &Repository, tip: Oid, commit: Oid) -> bool {
    tip == commit || (repo.find_commit(commit).is_ok() && repo.graph_descendant_of(tip, commit).unwrap_or(false))
}

/// What fetch did to the host branch.
#[derive(Debug, PartialEq)]
pub enum Integrated {
    UpToDate,
    /// The branch was checked out and clean: ref, index and files moved.
    FastForwardedCheckout {
        from: Oid,
        to: Oid,
    },
    /// The branch was not checked out: only the ref moved.
    FastForwardedRef {
        from: Option<Oid>,
        to: Oid,
    },
    /// Nothing changed on the host; the message says what to run.
    LeftAlone(String),
}

/// Brings the host branch up to `new` if that is a fast-forward and safe;
/// never rewinds or rewrites it.
pub fn integrate(host: &HostRepo, branch: &str, new: Oid) -> Result<Integrated> {
    let repo = &host.repo;
    let refname = format!("refs/heads/{branch}");
    let tracking = format!("agent-vm/{branch}");
    let current = host.branch_tip(branch)?;
    let Some(old) = current else {
        repo.reference(&refname, new, false, "agent-vm fetch: branch from the VM")?;
        return Ok(Integrated::FastForwardedRef { from: None, to: new });
    };
    if contains(repo, old, new) {
        return Ok(Integrated::UpToDate);
    }
    if !repo.graph_descendant_of(new, old)? {
        return Ok(Integrated::LeftAlone(format!(
            "the host's {branch:?} and the VM's have diverged; nothing on the host changed. \
             Merge or rebase yourself: `git merge {tracking}` or `git rebase {tracking}`"
        )));
    }
    // The branch may be checked out here or in any linked worktree.
    let Some(tree_repo) = checked_out_in(repo, &refname)? else {
        repo.reference_matching(&refname, new, true, old, "agent-vm fetch: fast-forward")?;
        return Ok(Integrated::FastForwardedRef { from: Some(old), to: new });
    };
    let where_ = tree_repo.workdir().map(|w| w.display().to_string()).unwrap_or_default();
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(false).include_ignored(false);
    if !tree_repo.statuses(Some(&mut opts))?.is_empty() {
        return Ok(Integrated::LeftAlone(format!(
            "{branch:?} is checked out in {where_} and has uncommitted changes; nothing on the host changed. \
             Commit or stash them, then run `git merge --ff-only {tracking}` there"
        )));
    }
    let (old_tree, new_tree) = (tree_repo.find_commit(old)?.tree()?, tree_repo.find_commit(new)?.tree()?);
    if let Some(bad) = unsafe_paths(&tree_repo, &new_tree)?.first() {
        return Ok(Integrated::LeftAlone(format!(
            "the VM's {branch:?} has a path this machine cannot check out ({bad}); nothing on the host \
             changed. Its commits are in {tracking}"
        )));
    }
    let clobbered = clobbered(&tree_repo, &old_tree, &new_tree)?;
    if !clobbered.is_empty() {
        let shown: Vec<String> = clobbered.iter().take(10).map(|p| format!("{:?}", printable(p))).collect();
        let more = if clobbered.len() > 10 { format!(" and {} more", clobbered.len() - 10) } else { String::new() };
        return Ok(Integrated::LeftAlone(format!(
            "fast-forwarding the checked-out {branch:?} would overwrite or delete files git does not track \
             in {where_}: {}{more}; nothing on the host changed. Move them aside, then run \
             `git merge --ff-only {tracking}`",
            shown.join(", ")
        )));
    }
    let mut checkout = git2::build::CheckoutBuilder::new();
    // Never over files git does not track (the checks above found none;
    // libgit2 refuses too if one appears meanwhile).
    checkout.safe().overwrite_ignored(false).remove_untracked(false).remove_ignored(false);
    if let Err(e) = tree_repo.checkout_tree(new_tree.as_object(), Some(&mut checkout)) {
        return Ok(Integrated::LeftAlone(format!(
            "the checkout of the VM's {branch:?} failed ({}); the host branch was not moved, and files in \
             {where_} may be partly updated: `git status` there shows them, `git checkout -- .` puts them \
             back. The commits are in {tracking}",
            printable(e.message())
        )));
    }
    // Move the ref only if nobody moved it meanwhile.
    repo.reference_matching(&refname, new, true, old, "agent-vm fetch: fast-forward")?;
    Ok(Integrated::FastForwardedCheckout { from: old, to: new })
}

/// Whether everything reachable from `tip` that is not reachable from
/// `known` (the host's branch and tracking ref) is in the host repository:
/// every commit, its tree and subtrees, every blob. libgit2 does not check
/// connectivity when it fetches, and a ref pointing at a commit whose tree
/// is missing breaks `git fsck`, checkout and gc; so no ref moves before
/// this holds.
pub fn check_complete(repo: &Repository, tip: Oid, known: &[Oid]) -> Result<()> {
    let missing = |what: &str, id: Oid| anyhow::anyhow!("the VM sent incomplete history: {what} {id} is missing");
    let odb = repo.odb()?;
    let mut walk = repo.revwalk()?;
    walk.push(tip).map_err(|_| missing("commit", tip))?;
    for k in known {
        let _ = walk.hide(*k);
    }
    let mut seen = std::collections::HashSet::new();
    for commit in walk {
        let commit = commit.map_err(|e| anyhow::anyhow!("the VM sent incomplete history: {}", e.message()))?;
        let commit = repo.find_commit(commit).map_err(|_| missing("commit", commit))?;
        let mut trees = vec![commit.tree_id()];
        while let Some(id) = trees.pop() {
            if !seen.insert(id) {
                continue;
            }
            let tree = repo.find_tree(id).map_err(|_| missing("tree", id))?;
            for entry in tree.iter() {
                match entry.kind() {
                    Some(git2::ObjectType::Tree) => trees.push(entry.id()),
                    Some(git2::ObjectType::Blob) if seen.insert(entry.id()) && !odb.exists(entry.id()) => {
                        return Err(missing("file", entry.id()));
                    }
                    _ => {} // a blob seen before, or a submodule's commit (another repository's)
                }
            }
        }
    }
    Ok(())
}

/// The repository (this one or a linked worktree) whose HEAD is `refname`.
fn checked_out_in(repo: &Repository, refname: &str) -> Result<Option<Repository>> {
    let head_is = |r: &Repository| {
        !r.is_bare() && r.head().ok().and_then(|h| h.name().ok().map(str::to_owned)).as_deref() == Some(refname)
    };
    if head_is(repo) {
        return Ok(Some(Repository::open(repo.path())?));
    }
    for name in repo.worktrees()?.iter().flatten().flatten() {
        let Ok(wt) = repo.find_worktree(name) else { continue };
        if let Ok(wt_repo) = Repository::open_from_worktree(&wt)
            && head_is(&wt_repo)
        {
            return Ok(Some(wt_repo));
        }
    }
    Ok(None)
}

/// Paths of `tree` that no checkout should write: names git itself refuses
/// (`.git`, `..`, a `/` or NUL inside), names too long for a filesystem, and
/// a name given twice in one tree. Checked before any file is touched.
fn unsafe_paths(repo: &Repository, tree: &git2::Tree) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let mut stack = vec![(String::new(), tree.id())];
    while let Some((prefix, id)) = stack.pop() {
        let tree = repo.find_tree(id)?;
        let mut names = std::collections::HashSet::new();
        for entry in tree.iter() {
            let name = entry.name_bytes();
            let shown = format!("{prefix}{}", String::from_utf8_lossy(name));
            let reserved = name.is_empty()
                || name == b"."
                || name == b".."
                || name.eq_ignore_ascii_case(b".git")
                || name.contains(&b'/')
                || name.contains(&0);
            if reserved || name.len() > 255 || shown.len() > 4000 || !names.insert(name.to_vec()) {
                bad.push(shown);
                continue;
            }
            if entry.kind() == Some(git2::ObjectType::Tree) {
                stack.push((format!("{shown}/"), entry.id()));
            }
        }
    }
    Ok(bad)
}

/// Files in the work tree that moving from `old` to `new` would overwrite,
/// replace or delete although git does not track them at `old`: an ignored
/// `.env` where the VM adds one, an ignored `build/` where it adds a file
/// `build`, an untracked file where the VM needs a directory, or a symlink
/// the checkout would write through.
fn clobbered(repo: &Repository, old: &git2::Tree, new: &git2::Tree) -> Result<Vec<String>> {
    use git2::ObjectType::Tree;
    let Some(workdir) = repo.workdir() else { return Ok(Vec::new()) };
    let diff = repo.diff_tree_to_tree(Some(old), Some(new), None)?;
    let mut out = Vec::new();
    for delta in diff.deltas() {
        let Some(path) = delta.new_file().path() else { continue };
        if delta.status() == git2::Delta::Deleted {
            continue; // tracked at old: git's to remove
        }
        // Every leading directory the new path needs, then the path itself.
        let parts: Vec<_> = path.components().collect();
        let mut here = std::path::PathBuf::new();
        for (i, part) in parts.iter().enumerate() {
            here.push(part);
            let last = i + 1 == parts.len();
            let Ok(meta) = std::fs::symlink_metadata(workdir.join(&here)) else { break };
            let tracked = old.get_path(&here).ok().map(|e| e.kind() == Some(Tree));
            let fine = match (last, tracked) {
                // A tracked directory stays one; a real untracked directory
                // only receives new files; a tracked file git replaces.
                (false, Some(true)) | (false, None) => meta.is_dir(),
                (false, Some(false)) => !meta.is_dir(),
                // The path itself: a tracked file is git's to update; a
                // tracked directory it replaces must hold only tracked files.
                (true, Some(false)) => true,
                (true, Some(true)) => !meta.is_dir() || only_tracked(workdir, &here, old),
                (true, None) => false,
            };
            if !fine {
                out.push(here.to_string_lossy().into_owned());
                break;
            }
            if tracked == Some(false) {
                break; // a tracked file or link becomes a directory: nothing of ours below
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether every file under `dir` in the work tree is tracked at `old`.
fn only_tracked(workdir: &std::path::Path, dir: &std::path::Path, old: &git2::Tree) -> bool {
    let Ok(entries) = std::fs::read_dir(workdir.join(dir)) else { return false };
    entries.flatten().all(|e| {
        let rel = dir.join(e.file_name());
        match e.file_type() {
            Ok(t) if t.is_dir() => only_tracked(workdir, &rel, old),
            Ok(_) => old.get_path(&rel).is_ok(),
            Err(_) => false,
        }
    })
}

/// Commits on `tip` that the host's `branch` (and its tracking ref) lack:
/// `None` when the host does not even have the commit.
pub fn unfetched(host: &HostRepo, branch: &str, tip: Oid) -> Result<Option<usize>> {
    let repo = &host.repo;
    if repo.find_commit(tip).is_err() {
        return Ok(None);
    }
    let mut walk = repo.revwalk()?;
    walk.push(tip)?;
    for r in [format!("refs/heads/{branch}"), HostRepo::tracking_ref(branch)] {
        if let Ok(oid) = repo.refname_to_id(&r) {
            walk.hide(oid)?;
        }
    }
    Ok(Some(walk.count()))
}

/// Ahead/behind of the VM tip relative to the host branch, when both known.
pub fn ahead_behind(host: &HostRepo, branch: &str, vm_tip: Oid) -> Option<(usize, usize)> {
    let host_tip = host.branch_tip(branch).ok()??;
    host.repo.find_commit(vm_tip).ok()?;
    host.repo.graph_ahead_behind(vm_tip, host_tip).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::test_git::git;

    /// A host repository (main checked out: README, .gitignore for `.env`
    /// and `build/`) and a clone standing in for the VM's workspace.
    fn host_and_vm() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        std::fs::create_dir(&host).unwrap();
        git(&host, &["init", "-q"]);
        std::fs::write(host.join("README"), "v1\n").unwrap();
        std::fs::write(host.join(".gitignore"), ".env\nbuild/\n").unwrap();
        git(&host, &["add", "."]);
        git(&host, &["commit", "-qm", "one"]);
        let vm = tmp.path().join("vm");
        git(tmp.path(), &["clone", "-q", host.to_str().unwrap(), vm.to_str().unwrap()]);
        (tmp, host, vm)
    }

    /// Commits in the VM clone, then brings its objects to the host (as a
    /// fetch does) and returns the new tip.
    fn vm_commit(host: &Path, vm: &Path, branch: &str, files: &[(&str, &str)]) -> Oid {
        for (name, text) in files {
            let path = vm.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            git(vm, &["add", "-f", name]);
        }
        git(vm, &["commit", "-qm", "vm"]);
        git(host, &["fetch", "-q", vm.to_str().unwrap(), &format!("+{branch}:refs/remotes/agent-vm/{branch}")]);
        Oid::from_str(git(vm, &["rev-parse", "HEAD"]).trim()).unwrap()
    }

    fn open(dir: &Path) -> HostRepo {
        HostRepo::open(&dir.join(".git")).unwrap()
    }

    /// A commit whose tree never arrived (or a tree missing a file) is
    /// incomplete history; the same history with everything present is not.
    #[test]
    fn incomplete_history_is_found_before_any_ref_moves() {
        let (_tmp, host, vm) = host_and_vm();
        let hr = open(&host);
        let repo = &hr.repo;
        let old = repo.head().unwrap().target().unwrap();
        let complete = vm_commit(&host, &vm, "main", &[("new.txt", "n\n")]);
        assert!(check_complete(repo, complete, &[old]).is_ok());
        assert!(check_complete(repo, complete, &[]).is_ok());
        let odb = repo.odb().unwrap();
        let absent_tree = Oid::from_str("1111111111111111111111111111111111111111").unwrap();
        let raw = format!("tree {absent_tree}\nparent {old}\nauthor a <a> 0 +0000\ncommitter a <a> 0 +0000\n\nvm\n");
        let broken = odb.write(git2::ObjectType::Commit, raw.as_bytes()).unwrap();
        let err = check_complete(repo, broken, &[old]).unwrap_err().to_string();
        assert!(err.contains("tree 1111111"), "{err}");
        // A tree naming a file that is not there.
        let mut tree = Vec::new();
        tree.extend_from_slice(b"100644 ghost\0");
        tree.extend_from_slice(Oid::from_str("2222222222222222222222222222222222222222").unwrap().as_bytes());
        let tree = odb.write(git2::ObjectType::Tree, &tree).unwrap();
        let raw = format!("tree {tree}\nparent {old}\nauthor a <a> 0 +0000\ncommitter a <a> 0 +0000\n\nvm\n");
        let ghost = odb.write(git2::ObjectType::Commit, raw.as_bytes()).unwrap();
        assert!(check_complete(repo, ghost, &[old]).unwrap_err().to_string().contains("file 2222222"));
    }

    #[test]
    fn files_git_does_not_track_are_never_overwritten_or_deleted() {
        let (_tmp, host, vm) = host_and_vm();
        std::fs::write(host.join(".env"), "HOST SECRET\n").unwrap();
        std::fs::create_dir(host.join("build")).unwrap();
        std::fs::write(host.join("build/out.o"), "object\n").unwrap();
        std::fs::write(host.join("notes.txt"), "mine\n").unwrap();
        let before = git(&host, &["rev-parse", "main"]);
        let new = vm_commit(&host, &vm, "main", &[(".env", "VM\n"), ("build", "a file now\n"), ("notes.txt", "vm\n")]);
        match integrate(&open(&host), "main", new).unwrap() {
            Integrated::LeftAlone(why) => {
                for p in [".env", "build", "notes.txt"] {
                    assert!(why.contains(&format!("{p:?}")), "{p} not named: {why}");
                }
            }
            other => panic!("fetch went ahead: {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(host.join(".env")).unwrap(), "HOST SECRET\n");
        assert_eq!(std::fs::read_to_string(host.join("build/out.o")).unwrap(), "object\n");
        assert_eq!(std::fs::read_to_string(host.join("notes.txt")).unwrap(), "mine\n");
        assert_eq!(git(&host, &["rev-parse", "main"]), before, "the branch moved");
        // The control: a commit that touches none of them fast-forwards.
        git(&vm, &["reset", "-q", "--hard", "HEAD~"]);
        let new = vm_commit(&host, &vm, "main", &[("README", "v2\n"), ("src/lib.rs", "fn f() {}\n")]);
        assert!(matches!(integrate(&open(&host), "main", new).unwrap(), Integrated::FastForwardedCheckout { .. }));
        assert_eq!(std::fs::read_to_string(host.join("README")).unwrap(), "v2\n");
        assert_eq!(std::fs::read_to_string(host.join(".env")).unwrap(), "HOST SECRET\n");
        assert_eq!(git(&host, &["status", "--porcelain", "--untracked-files=no"]), "");
    }

    #[test]
    fn a_branch_checked_out_in_another_worktree_is_updated_there() {
        let (tmp, host, vm) = host_and_vm();
        git(&host, &["branch", "feat"]);
        git(&host, &["checkout", "-q", "-b", "other"]);
        let wt = tmp.path().join("wt");
        git(&host, &["worktree", "add", "-q", wt.to_str().unwrap(), "feat"]);
        git(&vm, &["checkout", "-q", "-b", "feat"]);
        let new = vm_commit(&host, &vm, "feat", &[("README", "from the vm\n")]);
        let r = integrate(&open(&host), "feat", new).unwrap();
        assert!(matches!(r, Integrated::FastForwardedCheckout { .. }), "{r:?}");
        assert_eq!(std::fs::read_to_string(wt.join("README")).unwrap(), "from the vm\n");
        assert_eq!(git(&wt, &["status", "--porcelain"]), "", "the worktree shows changes it did not make");
        // With the user's edit there, nothing moves.
        std::fs::write(wt.join("README"), "my edit\n").unwrap();
        let new = vm_commit(&host, &vm, "feat", &[("other.txt", "x\n")]);
        let r = integrate(&open(&host), "feat", new).unwrap();
        assert!(matches!(&r, Integrated::LeftAlone(why) if why.contains("uncommitted")), "{r:?}");
        assert_eq!(std::fs::read_to_string(wt.join("README")).unwrap(), "my edit\n");
        assert!(!wt.join("other.txt").exists());
    }

    #[test]
    fn a_tree_that_cannot_be_checked_out_changes_no_file() {
        let (_tmp, host, _vm) = host_and_vm();
        let hr = open(&host);
        let repo = &hr.repo;
        let old = repo.head().unwrap().peel_to_commit().unwrap();
        let blob = repo.blob(b"v2\n").unwrap();
        // README changes (a half-done checkout would have written it), and
        // the tree also holds a name too long for any filesystem, or a
        // name twice: trees git would not write, the VM can.
        for extra in [vec!["x".repeat(300)], vec!["dup".to_owned(), "dup".to_owned()]] {
            let mut raw = Vec::new();
            let mut names: Vec<(String, Oid)> = vec![("README".into(), blob)];
            names.extend(extra.iter().map(|n| (n.clone(), blob)));
            let gitignore = old.tree().unwrap().get_name(".gitignore").unwrap().id();
            names.push((".gitignore".into(), gitignore));
            names.sort();
            for (name, id) in &names {
                raw.extend_from_slice(format!("100644 {name}\0").as_bytes());
                raw.extend_from_slice(id.as_bytes());
            }
            let tree = repo.odb().unwrap().write(git2::ObjectType::Tree, &raw).unwrap();
            let sig = git2::Signature::now("vm", "vm@vm").unwrap();
            let new = repo.commit(None, &sig, &sig, "vm", &repo.find_tree(tree).unwrap(), &[&old]).unwrap();
            let r = integrate(&hr, "main", new).unwrap();
            assert!(matches!(&r, Integrated::LeftAlone(why) if why.contains("cannot check out")), "{r:?}");
            assert_eq!(std::fs::read_to_string(host.join("README")).unwrap(), "v1\n", "a file changed");
            assert_eq!(repo.head().unwrap().target(), Some(old.id()));
        }
    }
}
