use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Provision the VM again: tools, agents, home files, credentials
///
/// Runs what creating the VM runs, on the existing VM: new package lists and
/// versions, changed home files (an existing ~/.claude.json, the agents'
/// own state, is kept), rotated GCP credentials, the host's timezone and
/// terminfo. Workspaces are not touched. Running it twice changes nothing
/// the second time. Uses $AGENT_VM_COMMON_DIR instead of the built-in
/// common/ when set.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub host: HostAccessArg,
}

/// `--allow-host-access`, shared with `start`.
#[derive(Debug, clap::Args)]
pub struct HostAccessArg {
    /// Let the VM open connections to this machine, its localhost-only
    /// services included. By default provisioning installs a firewall rule
    /// in the VM that blocks them (see the README's security section)
    #[arg(long, env = crate::provision::HOST_ACCESS_ENV)]
    allow_host_access: bool,
}

impl HostAccessArg {
    pub fn options(&self) -> crate::provision::Options {
        crate::provision::Options { host_access: self.allow_host_access, ..Default::default() }
    }
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let options = args.host.options();
    let backend = ctx.backend()?;
    let (admin, started) = super::admin_session(ctx, backend.as_ref(), true, &Default::default(), &options).await?;
    // A VM created just now was provisioned on the way.
    if started != crate::vm::Started::Created {
        super::provision_vm(ctx, backend.as_ref(), &admin, &options).await?;
    }
    super::after_connect(ctx, backend.as_ref(), &crate::vm::agent_endpoint(backend.as_ref())?);
    ctx.ui.say("The VM is provisioned.");
    Ok(ExitCode::SUCCESS)
}
