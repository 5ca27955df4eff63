//! Workspaces: one independent clone per (host repository, branch) in the
//! VM at `~/workspace/<repo>-<branch>-<hash>`, and the push / fetch / clean
//! logic that moves commits between it and the host with git2.
//!
//! The VM is hostile: everything read from it (ref tips, names, exit
//! statuses) is treated as untrusted input, host refs other than
//! `refs/remotes/agent-vm/*` and a fast-forward of the fetched branch are
//! never touched, and only the pushed branch's history leaves the host.
//!
//! - `host`: the host repository (discovery, branch locks, tracking refs);
//! - `names`: accepted branch names, where workspaces and caches live;
//! - `vm`: push, fetch, list and remove against one VM;
//! - `scripts`: the shell run in the VM, and reading its answers;
//! - `view`: the repository a fetch runs in, and the checks of what came;
//! - `integrate`: bringing fetched commits into the host branch;
//! - `progress`: transfer progress on stderr.

mod host;
mod integrate;
mod names;
mod progress;
mod scripts;
mod view;
mod vm;

pub use host::HostRepo;
pub use integrate::{Integrated, ahead_behind, contains, integrate, unfetched};
pub use names::{Workspace, host_path, validate_branch};
pub use progress::Progress;
pub use scripts::{Listed, Probe, WATCH_PROBE};
pub use vm::{Objects, Pushed, Vm};

/// Where the workspaces live in the VM, relative to the user's home.
pub const WORKSPACE_ROOT: &str = "workspace";
/// Per-repository object caches in the VM (bare repositories).
const CACHE_ROOT: &str = ".agent-vm/cache";
/// Host refs that fetch may update at will.
pub const TRACKING_PREFIX: &str = "refs/remotes/agent-vm/";
