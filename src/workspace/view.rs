//! What a fetch shows the VM of the host repository. libgit2 tells the
//! remote about every local ref while negotiating (up to 256 commits of
//! other branches, tags, the stash). A fetch therefore runs in a view: a
//! bare repository holding only the branch's refs, borrowing the host's
//! objects through `objects/info/alternates`. What arrives is moved into
//! the host repository afterwards.

use std::path::Path;

use anyhow::{Context, Result};
use git2::{Oid, Repository};

pub struct View {
    dir: tempfile::TempDir,
    pub repo: Repository,
}

impl View {
    /// A view of `host_git_dir` with `refs` (name, id) only. It lives in the
    /// host's git dir, so what it receives moves by rename.
    pub fn new(host_git_dir: &Path, refs: &[(String, Oid)]) -> Result<View> {
        let parent = host_git_dir.join("agent-vm");
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        remove_abandoned(&parent);
        let dir = tempfile::Builder::new().prefix("fetch-").tempdir_in(&parent)?;
        let repo = Repository::init_bare(dir.path())?;
        let objects = host_git_dir.join("objects").canonicalize()?;
        std::fs::write(dir.path().join("objects/info/alternates"), format!("{}\n", objects.display()))?;
        for (name, id) in refs {
            repo.reference(name, *id, true, "agent-vm fetch view")?;
        }
        Ok(View { dir, repo })
    }

    /// Moves the packs (each before its index, so git never sees an index
    /// without its pack) and any loose objects the view received into the
    /// host repository.
    pub fn move_objects_into(self, host_git_dir: &Path) -> Result<()> {
        let from = self.dir.path().join("objects");
        let to = host_git_dir.join("objects");
        let pack_dir = from.join("pack");
        let mut packs: Vec<_> = std::fs::read_dir(&pack_dir)?.flatten().map(|e| e.path()).collect();
        // `.pack` sorts before `.idx` only by this key.
        packs.sort_by_key(|p| (p.extension().is_some_and(|e| e == "idx"), p.clone()));
        std::fs::create_dir_all(to.join("pack"))?;
        for p in packs {
            let name = p.file_name().context("pack file name")?;
            std::fs::rename(&p, to.join("pack").join(name))?;
        }
        for entry in std::fs::read_dir(&from)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            std::fs::create_dir_all(to.join(&*name))?;
            for obj in std::fs::read_dir(entry.path())?.flatten() {
                let dest = to.join(&*name).join(obj.file_name());
                if !dest.exists() {
                    std::fs::rename(obj.path(), dest)?;
                }
            }
        }
        Ok(())
    }
}

/// Views left behind by a fetch that was killed: an hour old is long past
/// any fetch still running.
fn remove_abandoned(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if e.file_name().to_string_lossy().starts_with("fetch-") && old.is_some_and(|a| a.as_secs() > 3600) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
