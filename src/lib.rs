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

/// `print!` for command output. A reader that went away (`agent-vm status |
/// head`) ends the process quietly with the status a shell tool killed by
/// SIGPIPE has (141), instead of a panic; another write error ends it with
/// a message.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_out(format_args!($($arg)*)) };
}

/// [`out!`] with a newline.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

#[doc(hidden)]
pub fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
        std::process::exit(141);
    }
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
