use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::vm::{self, State};

/// Shut the VM down (workspaces stay on its disk)
///
/// Unmounts the workspace mount first. `--force` kills the VM instead of
/// shutting it down: for a VM that Lima reports as Broken, or one that does
/// not shut down; files being written in the VM at that moment may be lost.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kill the VM instead of shutting it down cleanly
    #[arg(short, long)]
    force: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    let instance = vm::existing(backend.as_ref())?;
    if instance.state == State::Stopped {
        ctx.ui.say(&format!("VM '{}' is already stopped.", instance.name));
        return Ok(ExitCode::SUCCESS);
    }
    if instance.state == State::Other("Broken".into()) && !args.force {
        return Err(vm::broken(&instance));
    }
    if super::unmount(backend.as_ref(), true)? {
        ctx.ui.say("Unmounted the workspace mount.");
    }
    ctx.ui.say(&format!("Stopping VM '{}'…", instance.name));
    backend.stop(args.force)?;
    ctx.ui.say(&format!(
        "VM '{}' stopped. `agent-vm start` (or any command that needs it) boots it again.",
        instance.name
    ));
    Ok(ExitCode::SUCCESS)
}
