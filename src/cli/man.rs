use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::CommandFactory;

use super::{Cli, Context};

/// Print the manual page (or write one per subcommand with --dir)
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  agent-vm man | man -l -\n  \
agent-vm man --dir ~/.local/share/man/man1   # agent-vm.1, agent-vm-connect.1, …")]
pub struct Args {
    /// Write agent-vm.1 and a page per subcommand into DIR
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let cmd = Cli::command();
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write pages into {}", dir.display()))?;
            ctx.ui.say(&format!("Wrote the manual pages into {}.", dir.display()));
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
    }
    Ok(ExitCode::SUCCESS)
}
