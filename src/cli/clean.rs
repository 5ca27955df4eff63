use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use super::destroy::confirm;
use crate::workspace::{self, HostRepo, Probe};

/// Delete a branch's workspace in the VM
///
/// Refuses (unless --force) when the workspace holds commits the host has
/// not fetched or uncommitted changes. The host branch is not touched.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Branch (its name on the host; one starting with `-` works too)
    #[arg(allow_hyphen_values = true)]
    branch: String,
    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(short, long)]
    yes: bool,
    /// Delete even if the workspace has unfetched commits or uncommitted changes
    #[arg(long)]
    force: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let branch = args.branch.as_str();
    let super::BranchOp { host, vm, ws, _lock, .. } = super::branch_op(ctx, branch, false).await?;
    let probe = vm.probe(&ws).await?;
    if probe == Probe::Absent {
        bail!("there is no workspace for {branch:?} in the VM");
    }
    let losses = losses(Some(&host), &ws.branch, &probe)?;
    if !losses.is_empty() && !args.force {
        bail!("~/{} has {}; fetch first, or pass --force to delete anyway", ws.dir, losses.join(" and "));
    }
    for loss in &losses {
        ctx.ui.say(&format!("warning: deleting {loss}"));
    }
    if !args.yes && !confirm(&format!("Delete workspace ~/{} ({branch:?})?", ws.dir))? {
        bail!("not confirmed; nothing was deleted");
    }
    vm.remove(&ws).await?;
    ctx.ui.say(&format!("Deleted workspace ~/{}.", ws.dir));
    Ok(ExitCode::SUCCESS)
}

/// What deleting `branch`'s workspace would lose, in words. Without `host`
/// (the repository it came from is not on this machine) any commit counts.
pub(super) fn losses(host: Option<&HostRepo>, branch: &str, probe: &Probe) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if let Probe::Present { tip, changes } = probe {
        if let Some(tip) = tip {
            match host.map(|h| workspace::unfetched(h, branch, *tip)).transpose()? {
                None => out.push("commits of a repository this machine does not have".to_owned()),
                Some(None) => out.push("commits the host has not fetched".to_owned()),
                Some(Some(0)) => {}
                Some(Some(n)) => out.push(format!("{n} commit(s) the host has not fetched")),
            }
        }
        if *changes > 0 {
            out.push(format!("{changes} uncommitted change(s)"));
        }
    }
    Ok(out)
}
