use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use crate::vm;

/// Stop and delete the VM, with every workspace in it
///
/// Refuses (unless --force) while any workspace, of any repository, holds
/// commits its host repository has not fetched or uncommitted changes, as
/// `clean` does for one workspace; a VM that is not running cannot be
/// checked, so it too needs --force.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(short, long)]
    yes: bool,
    /// Delete even with unfetched commits or uncommitted changes in the VM
    #[arg(long)]
    force: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    if !backend.manages_machine() {
        return backend.delete().map(|_| ExitCode::SUCCESS);
    }
    let instance = vm::existing(backend.as_ref())?;
    if !args.force {
        if instance.state != vm::State::Running {
            bail!(
                "VM '{}' is {}, so agent-vm cannot check its workspaces for commits that were not fetched. \
                 Start it (`agent-vm start`) and run destroy again, or pass --force to delete it unchecked",
                instance.name,
                instance.state
            );
        }
        let losses = losses(ctx).await?;
        if !losses.is_empty() {
            bail!("{}; fetch first (in each repository), or pass --force to delete the VM anyway", losses.join("; "));
        }
    }
    if !args.yes && !confirm(&format!("Delete VM '{}' and every workspace in it?", instance.name))? {
        bail!("not confirmed; nothing was deleted");
    }
    // Detach the mount first so nothing is left pointing at a dead VM.
    if super::unmount(backend.as_ref(), true)? {
        ctx.ui.say("Unmounted the workspace mount.");
    }
    if crate::gateway::stop(backend.as_ref())? {
        ctx.ui.say("Stopped the network gateway.");
    }
    crate::ssh::mux::terminate_all(&backend.state_dir()).await;
    ctx.ui.say(&format!("Deleting VM '{}'…", instance.name));
    backend.delete()?;
    let state = backend.state_dir();
    if state.exists() {
        std::fs::remove_dir_all(&state)?;
    }
    ctx.ui.say(&format!("VM '{}' deleted.", instance.name));
    Ok(ExitCode::SUCCESS)
}

/// What deleting the VM would lose: each workspace with commits its host
/// repository lacks or uncommitted changes. The repository a workspace
/// names is only read, to compare commits.
async fn losses(ctx: &Context) -> Result<Vec<String>> {
    let (_backend, session) = super::session(ctx, false).await?;
    let vm = crate::workspace::Vm::new(session)?;
    let mut out = Vec::new();
    for listed in vm.list(true).await? {
        let probe = crate::workspace::Probe::Present { tip: listed.tip, changes: listed.changes };
        let host = crate::workspace::HostRepo::open(std::path::Path::new(&listed.host_repo));
        let lost = super::clean::losses(host.as_ref().ok(), &listed.branch, &probe)?;
        if !lost.is_empty() {
            let whose = if host.is_err() { format!(" ({:?})", listed.host_repo) } else { String::new() };
            out.push(format!("~/{} has {}{whose}", crate::printable(&listed.dir), lost.join(" and ")));
        }
    }
    Ok(out)
}

/// Asks a yes/no question on the terminal; without one, refuses to guess.
pub(crate) fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{question} Refusing without confirmation: stdin is not a terminal, pass --yes");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}
