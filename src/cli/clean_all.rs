use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use super::destroy::confirm;
use crate::workspace::{HostRepo, Probe, Vm, Workspace};

/// Delete every workspace of this repository in the VM (the VM stays)
///
/// Refuses (unless --force) when any of them holds commits the host has not
/// fetched or uncommitted changes. Workspaces of other repositories are
/// left alone: run clean-all in those repositories.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(short, long)]
    yes: bool,
    /// Delete even workspaces with unfetched commits or uncommitted changes
    #[arg(long)]
    force: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let host = HostRepo::discover()?;
    let (backend, session) = super::session(ctx, false).await?;
    let vm = Vm::new(session)?;
    // Lock every branch that has a workspace (as run, push and fetch do),
    // then look again: what was listed before the locks may have changed.
    let branches: Vec<String> = vm.list(true).await?.into_iter().map(|l| l.branch).collect();
    let valid: Vec<&str> =
        branches.iter().map(String::as_str).filter(|b| crate::workspace::validate_branch(b).is_ok()).collect();
    let _locks = host.lock_branches(&valid, &ctx.ui)?;
    let mut doomed = Vec::new();
    let mut refusals = Vec::new();
    for listed in vm.list(true).await? {
        if !valid.contains(&listed.branch.as_str()) {
            continue; // made after the locks were taken: not ours to delete now
        }
        // The VM's record of the branch is only a hint: the workspace must be
        // where this repository would put that branch, or it is not ours.
        let ws = Workspace::new(&host, &listed.branch);
        if ws.dir != listed.dir {
            continue;
        }
        let probe = Probe::Present { tip: listed.tip, changes: listed.changes };
        let losses = super::clean::losses(Some(&host), &ws.branch, &probe)?;
        if !losses.is_empty() {
            refusals.push(format!("~/{} has {}", ws.dir, losses.join(" and ")));
        }
        doomed.push(ws);
    }
    if doomed.is_empty() {
        ctx.ui.say("No workspaces of this repository in the VM.");
        return Ok(ExitCode::SUCCESS);
    }
    if !refusals.is_empty() && !args.force {
        bail!("{}; fetch first, or pass --force to delete anyway", refusals.join("; "));
    }
    if !args.yes && !confirm(&format!("Delete {} workspace(s) of this repository?", doomed.len()))? {
        bail!("not confirmed; nothing was deleted");
    }
    // Editors must not keep working in directories about to vanish.
    if super::unmount(backend.as_ref(), true)? {
        ctx.ui.say("Unmounted the workspace mount (`agent-vm mount` or `connect` brings it back).");
    }
    for ws in &doomed {
        vm.remove(ws).await?;
        ctx.ui.say(&format!("Deleted workspace ~/{} ({:?}).", ws.dir, ws.branch));
    }
    Ok(ExitCode::SUCCESS)
}
