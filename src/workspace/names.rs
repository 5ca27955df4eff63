//! Names: which branch names are accepted, and where a branch's workspace
//! and its repository's cache live in the VM (derived on the host, never
//! taken from the VM).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use git2::Oid;

use super::{CACHE_ROOT, HostRepo, WORKSPACE_ROOT};

/// Checks that `branch` is a name git accepts for a branch.
pub fn validate_branch(branch: &str) -> Result<()> {
    if branch.is_empty() || branch == "HEAD" || !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
        bail!("{branch:?} is not a valid branch name");
    }
    Ok(())
}

/// The paths of one branch's workspace and its repository's object cache
/// in the VM, relative to the VM home.
#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub branch: String,
    pub dir: String,
    pub cache: String,
}

impl Workspace {
    /// Names are derived, never taken from the VM: a readable part and a hash
    /// of the exact (repository, branch) pair, so `feature/x`, `feature-x`
    /// and `Feature-X` never share a directory, and any branch git accepts
    /// makes a safe path.
    pub fn new(host: &HostRepo, branch: &str) -> Workspace {
        let repo_id = host.git_dir.to_string_lossy();
        let repo = readable(&host.name, 24);
        let key = format!("{repo_id}\n{branch}");
        Workspace {
            branch: branch.to_owned(),
            dir: format!("{WORKSPACE_ROOT}/{repo}-{}-{}", readable(branch, 40), short_hash(key.as_bytes())),
            cache: format!("{CACHE_ROOT}/{repo}-{}.git", short_hash(repo_id.as_bytes())),
        }
    }
}

/// The first 10 hex digits of the SHA-1 of `data`.
pub(super) fn short_hash(data: &[u8]) -> String {
    let oid = Oid::hash_object(git2::ObjectType::Blob, data).expect("hashing memory cannot fail");
    oid.to_string()[..10].to_owned()
}

/// `text` reduced to `[A-Za-z0-9._-]`, other runs turned into one `-`, at
/// most `max` characters, never starting with `.` or `-`.
pub(super) fn readable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    let out: String = out.trim_start_matches(['-', '.']).chars().take(max).collect();
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() { "x".to_owned() } else { out }
}

/// The host path the VM's workspace shows up at through the mount.
pub fn host_path(mount_root: &Path, ws: &Workspace) -> PathBuf {
    mount_root.join(ws.dir.trim_start_matches(&format!("{WORKSPACE_ROOT}/")))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use git2::Repository;

    /// A HostRepo with a made-up identity (its git dir), for naming.
    pub(in crate::workspace) fn host(path: &str, name: &str) -> HostRepo {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        std::mem::forget(dir);
        HostRepo { repo, git_dir: PathBuf::from(path), name: name.to_owned() }
    }

    #[test]
    fn workspace_names_never_collide() {
        let h = host("/home/u/src/app/.git", "app");
        let names = ["feature/x", "feature-x", "Feature-X", "feature x", "feature_x", "-x", "x", "ünï", "a..b"];
        let dirs: std::collections::HashSet<String> = names.iter().map(|b| Workspace::new(&h, b).dir).collect();
        assert_eq!(dirs.len(), names.len());
        for d in &dirs {
            let leaf = d.strip_prefix("workspace/").unwrap();
            assert!(leaf.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)), "{d}");
            assert!(!leaf.starts_with(['-', '.']), "{d}");
        }
    }

    #[test]
    fn same_branch_of_two_repos_differs() {
        let a = Workspace::new(&host("/a/app/.git", "app"), "main");
        let b = Workspace::new(&host("/b/app/.git", "app"), "main");
        assert_ne!(a.dir, b.dir);
        assert_ne!(a.cache, b.cache);
        assert!(a.dir.starts_with("workspace/app-main-"), "{}", a.dir);
    }

    #[test]
    fn readable_is_bounded_and_tidy() {
        assert_eq!(readable("feature/auth", 40), "feature-auth");
        assert_eq!(readable("--..x", 40), "x");
        assert_eq!(readable("$(rm -rf /)", 40), "rm-rf");
        assert_eq!(readable("", 40), "x");
        assert_eq!(readable(&"a".repeat(300), 40).len(), 40);
    }

    #[test]
    fn branch_validation_follows_git() {
        for ok in ["main", "feature/x", "-x", "ünï", "$(x)", "a;b", "`x`", "it's"] {
            validate_branch(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "HEAD", "with space", "a..b", "a~b", "a^b", "a:b", "x.lock", "/x", "x/", "a\\b", "a\x07b"] {
            assert!(validate_branch(bad).is_err(), "{bad:?}");
        }
    }
}
