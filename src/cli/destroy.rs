use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use crate::vm;

/// Stop and delete the VM, with every workspace in it
///
/// Commits that were not fetched back to the host are lost with the VM.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(short, long)]
    yes: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    let instance = vm::existing(backend.as_ref())?;
    if !args.yes && !confirm(&format!("Delete VM '{}' and every workspace in it?", instance.name))? {
        bail!("not confirmed; nothing was deleted");
    }
    // Detach the mount first so nothing is left pointing at a dead VM.
    if super::unmount(backend.as_ref(), true)? {
        ctx.ui.say("Unmounted the workspace mount.");
    }
    ctx.ui.say(&format!("Deleting VM '{}'…", instance.name));
    backend.delete()?;
    let state = backend.state_dir();
    if state.exists() {
        std::fs::remove_dir_all(&state)?;
    }
    ctx.ui.say(&format!("VM '{}' deleted.", instance.name));
    Ok(ExitCode::SUCCESS)
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
