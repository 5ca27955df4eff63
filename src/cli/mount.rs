use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Mount the VM's ~/workspace on this machine (sshfs, host → VM)
///
/// The mount point is ~/.agent-vm-mounts/workspace (or $AGENT_VM_MOUNT_DIR).
/// Files appear owned by another user, so git on this machine refuses the
/// repositories there instead of obeying config and hooks the agent wrote;
/// set AGENT_VM_MOUNT_OWNED_BY_ME=1 to opt out if you trust the VM. A stale
/// mount (VM restarted) is replaced. `connect` mounts automatically.
///
/// Names and attributes are cached for up to 20 s, so a file the agent
/// creates or changes can take that long to show up here. Run tools that
/// read many files (search, builds, tests) in the VM with `agent-vm connect
/// BRANCH -- CMD`: each file read through the mount is a few round trips.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    let (backend, session) = super::session(ctx, false).await?;
    let m = super::mount_of(backend.as_ref())?;
    if m.ensure(&session, &ctx.ui).await? {
        ctx.ui.say(&format!("Mounted the VM's ~/workspace on {}.", m.point.display()));
    } else {
        ctx.ui.say(&format!("Already mounted on {}.", m.point.display()));
    }
    Ok(ExitCode::SUCCESS)
}
