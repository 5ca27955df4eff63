use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use crate::gateway::{self, LiveRules, Paths, log, policy::Rule};

/// The agent's network: what the gateway let through or refused, and live rules
///
/// The agent reaches the network only through agent-vm's gateway, which
/// allows destinations by the instance's mode (`network:` in config.yaml:
/// allowlist, open or none) and rules. `allow` and `deny` change the rules
/// at once, without restarting anything; they are kept for the instance
/// until changed again.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Show the gateway's connection log: time, destination, allowed or refused and by which rule, bytes each way
    Log {
        /// Keep printing new connections as they happen
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Let the agent reach HOST (a host, *.domain, IP address or network, each with an optional :port)
    Allow { host: String },
    /// Refuse HOST to the agent, whatever else allows it
    Deny { host: String },
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    let paths = Paths::new(&backend.state_dir());
    match args.command {
        Sub::Log { follow, json } => {
            let print = |r: &log::Record| {
                if json {
                    crate::outln!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    crate::outln!("{}", log::human(r));
                }
            };
            let mut seen = log::read(&paths.log());
            seen.iter().for_each(print);
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let now = log::read(&paths.log());
                // Rotation makes the file shorter: start over from what is there.
                let skip = if now.len() >= seen.len() { seen.len() } else { 0 };
                now[skip..].iter().for_each(print);
                seen = now;
            }
        }
        Sub::Allow { host } => {
            let rule = set_rule(&paths, &host, true)?;
            let entry = crate::config::Config::load()?.entry(&ctx.instance);
            if entry.network.deny.contains(&rule.text) {
                bail!(
                    "{} is allowed now, but config.yaml denies it for this instance, and that wins: edit the file",
                    rule.text
                );
            }
            ctx.ui.say(&format!("The agent may now reach {} (mode: {}).", rule.text, entry.network.mode));
            if entry.network.mode == gateway::policy::Mode::None {
                ctx.ui.say(
                    "note: this instance's network mode is `none`: nothing is allowed until it changes in config.yaml.",
                );
            }
        }
        Sub::Deny { host } => {
            let rule = set_rule(&paths, &host, false)?;
            ctx.ui.say(&format!("The agent can no longer reach {} (connections already open stay open).", rule.text));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Adds `host` to the live allow (or deny) rules, which the running
/// gateway reads for every connection.
fn set_rule(paths: &Paths, host: &str, allow: bool) -> Result<Rule> {
    let rule = Rule::parse(host)?;
    let mut live = LiveRules::load(paths)?;
    live.set(&rule.text, allow);
    live.save(paths)?;
    Ok(rule)
}
