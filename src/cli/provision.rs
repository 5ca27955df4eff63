use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Provision the VM again: tools, agents, home files, credentials
///
/// Runs what creating the VM runs, on the existing VM: new package lists and
/// versions, changed home files (an existing ~/.claude.json, the agents'
/// own state, is kept), rotated GCP credentials, the host's timezone and
/// terminfo. Workspaces are not touched. Running it twice changes nothing
/// the second time. Uses $AGENT_VM_COMMON_DIR instead of the built-in
/// common/ when set.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    let (_backend, session, started) = super::session_with(ctx, true, &Default::default()).await?;
    // A VM created just now was provisioned on the way.
    if started != crate::vm::Started::Created {
        crate::provision::run(&session, &ctx.ui).await?;
    }
    ctx.ui.say("The VM is provisioned.");
    Ok(ExitCode::SUCCESS)
}
