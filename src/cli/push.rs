use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::workspace::{HostRepo, Objects, Progress, Pushed, Vm, Workspace};

/// Push a host branch into its workspace in the VM (never forced)
///
/// Creates the branch from HEAD if it does not exist on the host, and the
/// workspace if it does not exist in the VM; starts the VM if needed. Only
/// the branch's history is sent. Refuses when the VM's branch has commits
/// the host lacks (run `agent-vm fetch` first) and, when the branch is
/// checked out in the VM, when the agent has uncommitted changes there.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Branch (its name on the host; one starting with `-` works too)
    #[arg(allow_hyphen_values = true)]
    branch: String,
    #[command(flatten)]
    pub objects: ObjectsArg,
}

/// `--ship-all-objects`, shared with `connect`.
#[derive(Debug, clap::Args)]
pub struct ObjectsArg {
    /// When this repository's first workspace is created, copy the host
    /// repository's pack files to the VM verbatim instead of a pack of only
    /// the branch's history. Skips walking that history (a little faster for
    /// large repositories), but other branches, stashes and unreachable
    /// objects (which can hold secrets) reach the VM, where the agent can
    /// read them.
    #[arg(long, env = "AGENT_VM_SHIP_ALL_OBJECTS")]
    ship_all_objects: bool,
}

impl ObjectsArg {
    pub fn objects(&self) -> Objects {
        if self.ship_all_objects { Objects::All } else { Objects::Branch }
    }
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    push(ctx, &args.branch, args.objects.objects()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Shared by `push` and `connect BRANCH`.
pub(super) async fn push(
    ctx: &Context,
    branch: &str,
    objects: Objects,
) -> Result<(Box<dyn crate::vm::Backend>, Vm, Workspace)> {
    crate::workspace::validate_branch(branch)?;
    let host = HostRepo::discover()?;
    let (backend, session) = super::session(ctx, true).await?;
    let vm = Vm::new(session)?;
    let (ws, _) = push_branch(ctx, &host, &vm, branch, objects).await?;
    Ok((backend, vm, ws))
}

/// Pushes one branch (created from HEAD if the host lacks it) into its
/// workspace, under the branch's lock. Returns the workspace and the tip
/// pushed.
pub(super) async fn push_branch(
    ctx: &Context,
    host: &HostRepo,
    vm: &Vm,
    branch: &str,
    objects: Objects,
) -> Result<(Workspace, git2::Oid)> {
    crate::workspace::validate_branch(branch)?;
    let _lock = host.lock_branch(branch, &ctx.ui)?;
    push_locked(ctx, host, vm, branch, objects).await
}

/// [`push_branch`] for a caller that holds the branch's lock.
pub(super) async fn push_locked(
    ctx: &Context,
    host: &HostRepo,
    vm: &Vm,
    branch: &str,
    objects: Objects,
) -> Result<(Workspace, git2::Oid)> {
    let ws = Workspace::new(host, branch);
    let (tip, created) = host.ensure_branch(branch)?;
    if created {
        ctx.ui.say(&format!("Created branch {branch:?} on the host from HEAD ({:.10}).", tip.to_string()));
    }
    let outcome = vm.push(host, &ws, objects, &Progress::new(&ctx.ui)).await?;
    ctx.ui.say(&match outcome {
        Pushed::Created => format!("Created workspace ~/{} for {branch:?} at {:.10}.", ws.dir, tip.to_string()),
        Pushed::Updated => format!("Pushed {branch:?} ({:.10}) to ~/{}.", tip.to_string(), ws.dir),
        Pushed::UpToDate => format!("~/{} is up to date with {branch:?}.", ws.dir),
    });
    Ok((ws, tip))
}
