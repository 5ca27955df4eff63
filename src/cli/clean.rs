use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Delete a branch's workspace in the VM
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Branch (its name on the host)
    branch: String,
}

pub async fn run(_ctx: &Context, _args: Args) -> Result<ExitCode> {
    super::not_yet("clean")
}
