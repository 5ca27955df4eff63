//! agent-vm: a Lima VM for AI coding agents, with one git clone per branch.
//!
//! The CLI (`cli`) is a thin layer over these modules: `vm` (the VM
//! lifecycle, per the `config` file), `ssh` (russh sessions), `shell`
//! (remote command lines), `transport`, `pack` and `workspace` (git), `mount`
//! (sshfs) and `provision` (the template and what goes into the VM).

pub mod cli;
pub mod config;
pub mod gateway;
pub mod mount;
pub mod pack;
mod printable;
pub mod provision;
pub mod run;
pub mod shell;
pub mod ssh;
pub mod transport;
pub mod vm;
pub mod workspace;

pub use printable::{printable, printable_lines};

#[cfg(test)]
mod test_git;

use std::path::PathBuf;

use anyhow::{Result, anyhow};

/// The user's home directory, from $HOME.
pub fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).ok_or_else(|| anyhow!("HOME is not set"))
}

/// Human-facing progress messages on stderr, silenced by `--quiet`.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub quiet: bool,
}

impl Ui {
    /// Messages may quote the VM (a warning's cause): never raw escapes.
    pub fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{}", printable_lines(msg));
        }
    }
}
