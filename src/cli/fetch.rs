use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Bring the agent's commits on a branch back to the host
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Branch (its name on the host)
    branch: String,
}

pub async fn run(_ctx: &Context, _args: Args) -> Result<ExitCode> {
    super::not_yet("fetch")
}
