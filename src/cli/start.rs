use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::vm::{Resources, Started};

/// Create the VM if needed and start it
///
/// The first start creates the VM from agent-vm's template (Debian 13, no
/// host mounts, no port forwards) and provisions it. Later starts boot it;
/// a running VM is left alone.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Memory in GiB (applies when the VM is created)
    #[arg(long, value_name = "GIB", value_parser = clap::value_parser!(u32).range(1..=1024))]
    memory: Option<u32>,
    /// Virtual CPUs (applies when the VM is created)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    vcpu: Option<u32>,
    /// Disk size in GiB (applies when the VM is created)
    #[arg(long, value_name = "GIB", value_parser = clap::value_parser!(u32).range(10..=4096))]
    disk: Option<u32>,
    #[command(flatten)]
    host: super::provision::HostAccessArg,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let defaults = Resources::default();
    let resources = Resources {
        cpus: args.vcpu.unwrap_or(defaults.cpus),
        memory_gib: args.memory.unwrap_or(defaults.memory_gib),
        disk_gib: args.disk.unwrap_or(defaults.disk_gib),
    };
    let asked = args.memory.is_some() || args.vcpu.is_some() || args.disk.is_some();
    // Other commands use a VM whose SSH answers, whatever Lima thinks of it;
    // `start` is asked about the VM itself, so it says when Lima calls it Broken.
    if let Some(i) = ctx.backend()?.inspect()?
        && i.state == crate::vm::State::Broken
    {
        return Err(crate::vm::broken(&i));
    }
    let (backend, session, started) = super::session_with(ctx, true, &resources, &args.host.options()).await?;
    if asked && started != Started::Created {
        ctx.ui.say(
            "note: --memory, --vcpu and --disk apply when the VM is created; this VM already exists and \
             keeps its resources. To change them: `agent-vm destroy`, then `agent-vm start` with new values.",
        );
    }
    let endpoint = session.endpoint();
    let what = match started {
        Started::Created => "created and running",
        Started::Booted => "started",
        Started::AlreadyRunning => "already running",
    };
    ctx.ui.say(&format!(
        "VM '{}' {what} (ssh {}@{}:{}).",
        backend.instance(),
        endpoint.user,
        endpoint.host,
        endpoint.port
    ));
    Ok(ExitCode::SUCCESS)
}
