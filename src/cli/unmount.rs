use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Unmount the VM's ~/workspace from this machine
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Detach now even if files are open; the mount goes when they close
    /// (macOS has no lazy unmount: there it is forced, and open files fail)
    #[arg(long)]
    lazy: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    if super::unmount(backend.as_ref(), args.lazy)? {
        ctx.ui.say("Unmounted.");
    } else {
        ctx.ui.say("Not mounted.");
    }
    Ok(ExitCode::SUCCESS)
}
