use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Run the network gateway for the VM (started by other commands, not by hand)
#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    let prefix = if ctx.instance == "agent-vm" {
        "agent-vm".to_owned()
    } else {
        format!("agent-vm --instance {}", crate::shell::quote(&[ctx.instance.as_str()])?)
    };
    crate::gateway::serve(backend.as_ref(), prefix).await?;
    Ok(ExitCode::SUCCESS)
}
