//! The host repository agent-vm works for: finding it, its branch locks,
//! its tracking refs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use git2::{Oid, Repository};

use super::TRACKING_PREFIX;
use super::names::short_hash;

/// The host repository agent-vm works for.
pub struct HostRepo {
    pub repo: Repository,
    /// The repository's common git dir, canonical: its identity.
    pub git_dir: PathBuf,
    /// A short readable name (the work tree's directory name).
    pub name: String,
}

impl HostRepo {
    /// The repository containing the current directory.
    pub fn discover() -> Result<HostRepo> {
        let repo = Repository::discover(".").map_err(|e| {
            anyhow!(
                "not in a git repository ({}): run agent-vm inside the repository whose branch you want",
                e.message()
            )
        })?;
        Self::from_repo(repo)
    }

    /// The repository at exactly `git_dir` (as a workspace records it).
    pub fn open(git_dir: &Path) -> Result<HostRepo> {
        let repo = Repository::open_ext(git_dir, git2::RepositoryOpenFlags::NO_SEARCH, std::iter::empty::<&Path>())
            .with_context(|| format!("cannot open the repository {}", git_dir.display()))?;
        Self::from_repo(repo)
    }

    fn from_repo(repo: Repository) -> Result<HostRepo> {
        let git_dir = repo.commondir().canonicalize().context("cannot resolve the repository's git dir")?;
        let base = match repo.workdir() {
            Some(w) => w.to_path_buf(),
            None => git_dir.clone(),
        };
        let base = base.canonicalize().unwrap_or(base);
        let name =
            base.file_name().map(|n| n.to_string_lossy().trim_end_matches(".git").to_owned()).unwrap_or_default();
        Ok(HostRepo { repo, git_dir, name })
    }

    /// The tip of host branch `branch`, if it exists.
    pub fn branch_tip(&self, branch: &str) -> Result<Option<Oid>> {
        match self.repo.find_reference(&format!("refs/heads/{branch}")) {
            Ok(r) => Ok(Some(r.peel_to_commit()?.id())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The branch's tip, creating the branch from HEAD when it does not exist.
    /// Returns the tip and whether the branch was created.
    pub fn ensure_branch(&self, branch: &str) -> Result<(Oid, bool)> {
        if let Some(tip) = self.branch_tip(branch)? {
            return Ok((tip, false));
        }
        let head = self
            .repo
            .head()
            .and_then(|h| h.peel_to_commit())
            .map_err(|_| anyhow!("branch {branch:?} does not exist and HEAD has no commit to create it from"))?;
        // A plain ref, not `branch()`: libgit2 refuses names git accepts as
        // refs (a leading `-`) there.
        self.repo
            .reference(&format!("refs/heads/{branch}"), head.id(), false, "agent-vm: branch from HEAD")
            .with_context(|| format!("cannot create branch {branch:?}"))?;
        Ok((head.id(), true))
    }

    /// Serialises agent-vm commands on one branch of this repository: a
    /// second one waits rather than interleaving ref updates.
    pub fn lock_branch(&self, branch: &str, ui: &crate::Ui) -> Result<std::fs::File> {
        let dir = self.git_dir.join("agent-vm").join("locks");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.lock", short_hash(branch.as_bytes())));
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        if file.try_lock().is_err() {
            ui.say(&format!("Waiting for another agent-vm command on branch {branch:?}…"));
            file.lock()?;
        }
        Ok(file)
    }

    /// The locks of several branches, taken in one order (sorted) so that
    /// two commands locking overlapping sets cannot deadlock.
    pub fn lock_branches(&self, branches: &[&str], ui: &crate::Ui) -> Result<Vec<std::fs::File>> {
        let mut sorted = branches.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.into_iter().map(|b| self.lock_branch(b, ui)).collect()
    }

    pub(super) fn tracking_ref(branch: &str) -> String {
        format!("{TRACKING_PREFIX}{branch}")
    }
}
