use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use super::destroy::confirm;
use crate::vm::{self, State};

/// Save and restore the VM's disk (Lima QEMU VMs)
///
/// A snapshot holds the whole VM disk: every workspace, installed tool and
/// setting. The VM is stopped for `create` and `apply` (so the disk is
/// consistent and no memory image is written) and started again if it was
/// running. Applying a snapshot discards everything done in the VM since,
/// including commits that were not fetched.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  agent-vm snapshot create clean-setup\n  agent-vm snapshot list\n  \
agent-vm snapshot apply clean-setup   # back to that state\n  agent-vm snapshot delete clean-setup")]
pub struct Args {
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, clap::Subcommand)]
enum Op {
    /// Save the VM's disk under NAME
    Create { name: String },
    /// List the snapshots
    List,
    /// Put the VM's disk back to the state saved as NAME
    Apply {
        name: String,
        /// Do not ask for confirmation (required when stdin is not a terminal)
        #[arg(short, long)]
        yes: bool,
    },
    /// Delete the snapshot NAME
    Delete { name: String },
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    let snapshots = backend.snapshots()?;
    match &args.op {
        Op::List => {
            vm::existing(backend.as_ref())?;
            for tag in snapshots.list()? {
                crate::outln!("{tag}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Op::Delete { name } => {
            check_name(name)?;
            require(snapshots.list()?.contains(name), name)?;
            snapshots.delete(name)?;
            ctx.ui.say(&format!("Deleted snapshot {name:?}."));
            return Ok(ExitCode::SUCCESS);
        }
        Op::Create { name } => {
            check_name(name)?;
            if snapshots.list()?.contains(name) {
                bail!("a snapshot named {name:?} exists already; delete it first or pick another name");
            }
        }
        Op::Apply { name, yes } => {
            check_name(name)?;
            require(snapshots.list()?.contains(name), name)?;
            if !yes
                && !confirm(&format!(
                    "Put VM '{}' back to snapshot {name:?}, losing everything done since?",
                    backend.instance()
                ))?
            {
                bail!("not confirmed; nothing changed");
            }
        }
    }
    let was_running = vm::existing(backend.as_ref())?.state == State::Running;
    if was_running {
        // The mount would go stale with the VM: detach it now.
        super::unmount(backend.as_ref(), true)?;
        ctx.ui.say(&format!("Stopping VM '{}' for the snapshot…", backend.instance()));
        backend.stop(false)?;
    }
    let result = match &args.op {
        Op::Create { name } => snapshots.create(name).map(|_| format!("Saved snapshot {name:?}.")),
        Op::Apply { name, .. } => {
            snapshots.apply(name).map(|_| format!("VM '{}' is back to snapshot {name:?}.", backend.instance()))
        }
        _ => unreachable!("handled above"),
    };
    // Start the VM again even when the snapshot failed: leave it as found.
    if was_running {
        ctx.ui.say(&format!("Starting VM '{}' again…", backend.instance()));
        backend.start()?;
        // A new boot, a new SSH port: keep an installed ssh-config entry current.
        super::ssh_config::refresh(backend.instance(), &backend.ssh_endpoint()?)?;
    }
    ctx.ui.say(&result?);
    Ok(ExitCode::SUCCESS)
}

fn require(exists: bool, name: &str) -> Result<()> {
    if !exists {
        bail!("there is no snapshot named {name:?} (`agent-vm snapshot list` shows them)");
    }
    Ok(())
}

/// QEMU snapshot tags: keep to a safe, unambiguous set.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.']);
    if !ok {
        bail!("invalid snapshot name {name:?}: use up to 64 letters, digits, '-', '_' and '.'");
    }
    Ok(())
}
