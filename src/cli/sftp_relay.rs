use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// Run ssh for sshfs, checking the VM's SFTP answers (run by sshfs, not by hand)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// ssh's arguments, as sshfs passes them
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    ssh_args: Vec<OsString>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    crate::mount::sftp_relay::run(&args.ssh_args)
}
