use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Delete every workspace in the VM (the VM itself stays)
#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_ctx: &Context, _args: Args) -> Result<ExitCode> {
    super::not_yet("clean-all")
}
