use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory;

use super::{Cli, Context};

/// Print a shell completion script
#[derive(Debug, clap::Args)]
#[command(after_help = "Install (pick your shell):\n  \
agent-vm completions bash > ~/.local/share/bash-completion/completions/agent-vm\n  \
agent-vm completions zsh > \"${fpath[1]}/_agent-vm\"\n  \
agent-vm completions fish > ~/.config/fish/completions/agent-vm.fish")]
pub struct Args {
    shell: clap_complete::Shell,
}

pub async fn run(_ctx: &Context, args: Args) -> Result<ExitCode> {
    clap_complete::generate(args.shell, &mut Cli::command(), "agent-vm", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
