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
    /// Kill the VM instead of shutting it down (after asking it to write its files to disk, if it answers)
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
    if instance.state == State::Broken && !args.force {
        return Err(vm::broken(&instance));
    }
    if super::unmount(backend.as_ref(), true)? {
        ctx.ui.say("Unmounted the workspace mount.");
    }
    if args.force {
        flush_guest(backend.as_ref(), &ctx.ui).await;
    }
    if crate::gateway::stop(backend.as_ref())? {
        ctx.ui.say("Stopped the network gateway.");
    }
    crate::ssh::mux::terminate_all(&backend.state_dir()).await;
    ctx.ui.say(&format!("Stopping VM '{}'…", instance.name));
    backend.stop(args.force)?;
    ctx.ui.say(&format!(
        "VM '{}' stopped. `agent-vm start` (or any command that needs it) boots it again.",
        instance.name
    ));
    Ok(ExitCode::SUCCESS)
}

/// Before the VM is killed: when its SSH server still answers (a Broken VM
/// whose host agent died, QEMU alive), have the guest write what it holds in
/// memory to its disk, so the workspaces' latest commits survive the kill.
async fn flush_guest(backend: &dyn crate::vm::Backend, ui: &crate::Ui) {
    let Ok(endpoint) = backend.ssh_endpoint() else { return };
    let Ok(session) = crate::ssh::Session::connect(&endpoint, std::time::Duration::from_secs(10)).await else {
        ui.say("The VM does not answer over SSH: killing it without saving its memory to disk.");
        return;
    };
    let synced = tokio::time::timeout(std::time::Duration::from_secs(120), session.exec("sync")).await;
    if !matches!(synced, Ok(Ok(_))) {
        ui.say("warning: the VM did not finish writing its files to disk; killing it anyway.");
    }
}
