use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use crate::workspace::{self, HostRepo, Integrated, Probe, Progress, Vm, Workspace};

/// Bring the agent's commits on a branch back to the host
///
/// Fetches the workspace's branch into `refs/remotes/agent-vm/BRANCH`. Then,
/// if the host branch is checked out with a clean tree, fast-forwards it
/// (files too); if it is not checked out, fast-forwards the ref. A host
/// branch is never rewound or rewritten: when a fast-forward is not possible
/// nothing changes and agent-vm says what to run. Uncommitted changes in the
/// VM are reported, not transferred: only commits travel.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Branch (its name on the host; one starting with `-` works too)
    #[arg(allow_hyphen_values = true)]
    branch: String,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let branch = args.branch.as_str();
    crate::workspace::validate_branch(branch)?;
    let host = HostRepo::discover()?;
    let (_backend, session) = super::session(ctx, false).await?;
    fetch_branch(ctx, &host, &Vm::new(session)?, branch).await
}

/// Fetches one branch and integrates it on the host, under the branch's
/// lock. Exit status 2: fetched, but the host branch was left alone.
pub(super) async fn fetch_branch(ctx: &Context, host: &HostRepo, vm: &Vm, branch: &str) -> Result<ExitCode> {
    let _lock = host.lock_branch(branch, &ctx.ui)?;
    fetch_locked(ctx, host, vm, branch).await
}

/// [`fetch_branch`] for a caller that holds the branch's lock.
pub(super) async fn fetch_locked(ctx: &Context, host: &HostRepo, vm: &Vm, branch: &str) -> Result<ExitCode> {
    let ws = Workspace::new(host, branch);
    let (probe, fetched) = vm.fetch(host, &ws, &Progress::new(&ctx.ui)).await?;
    match probe {
        Probe::Absent => bail!("there is no workspace for {branch:?} in the VM; `agent-vm push {branch}` creates one"),
        Probe::Present { tip: None, .. } => {
            bail!("the workspace ~/{} has no branch {branch:?} (did the agent delete or rename it?)", ws.dir)
        }
        Probe::Present { changes, .. } if changes > 0 => {
            ctx.ui.say(&format!("warning: ~/{} has {changes} uncommitted change(s); only commits are fetched.", ws.dir))
        }
        Probe::Present { .. } => {}
    }
    let new = fetched?;
    let short = |o: git2::Oid| format!("{:.10}", o.to_string());
    match workspace::integrate(host, branch, new)? {
        Integrated::UpToDate => ctx.ui.say(&format!("{branch:?} is up to date ({}).", short(new))),
        Integrated::FastForwardedCheckout { from, to } => ctx.ui.say(&format!(
            "Fast-forwarded {branch:?} {}..{} (checked out: files updated).",
            short(from),
            short(to)
        )),
        Integrated::FastForwardedRef { from: Some(from), to } => {
            ctx.ui.say(&format!("Fast-forwarded {branch:?} {}..{}.", short(from), short(to)))
        }
        Integrated::FastForwardedRef { from: None, to } => {
            ctx.ui.say(&format!("Created {branch:?} at {} from the VM.", short(to)))
        }
        Integrated::LeftAlone(why) => {
            eprintln!("warning: fetched into agent-vm/{branch}, but {}", crate::printable_lines(&why));
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}
