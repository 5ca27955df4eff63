use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

use super::Context;
use crate::vm::{self, State};

/// Show the VM's state, resources and SSH endpoint
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object (stable field names) instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Status {
    instance: String,
    state: String,
    running: bool,
    cpus: Option<u64>,
    memory_bytes: Option<u64>,
    disk_bytes: Option<u64>,
    ssh: Option<Ssh>,
}

#[derive(Serialize)]
struct Ssh {
    host: String,
    port: u16,
    user: String,
    config_file: String,
    host_alias: String,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    let instance = vm::existing(backend.as_ref())?;
    let running = instance.state == State::Running;
    let ssh = if running {
        let ep = backend.ssh_endpoint()?;
        Some(Ssh {
            host: ep.host,
            port: ep.port,
            user: ep.user,
            config_file: ep.config_file.display().to_string(),
            host_alias: ep.alias,
        })
    } else {
        None
    };
    let status = Status {
        instance: instance.name,
        state: instance.state.to_string(),
        running,
        cpus: instance.cpus,
        memory_bytes: instance.memory_bytes,
        disk_bytes: instance.disk_bytes,
        ssh,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("VM:        {} ({})", status.instance, status.state);
    let gib = |b: Option<u64>| b.map_or("?".to_owned(), |b| format!("{} GiB", b >> 30));
    println!(
        "Resources: {} vCPU, {} memory, {} disk",
        status.cpus.map_or("?".to_owned(), |c| c.to_string()),
        gib(status.memory_bytes),
        gib(status.disk_bytes)
    );
    match &status.ssh {
        Some(s) => println!("SSH:       {}@{}:{} (ssh -F {} {})", s.user, s.host, s.port, s.config_file, s.host_alias),
        None => println!("SSH:       - (start the VM with `agent-vm start`)"),
    }
    Ok(ExitCode::SUCCESS)
}
