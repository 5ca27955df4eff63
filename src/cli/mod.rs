//! The command line: one file per subcommand, each a thin layer over the
//! library modules.

mod clean;
mod clean_all;
mod completions;
mod connect;
mod destroy;
mod doctor;
mod fetch;
mod gateway;
mod man;
mod mount;
mod network;
mod provision;
mod push;
mod run;
mod sftp_relay;
mod snapshot;
mod ssh_config;
mod start;
mod status;
mod stop;
mod unmount;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::Ui;
use crate::vm::Backend;

#[derive(Debug, Parser)]
#[command(
    name = "agent-vm",
    version,
    about = "Give AI coding agents a real VM to work in, one git clone per branch",
    long_about = "agent-vm runs AI coding agents (Claude Code, Gemini CLI, opencode, Copilot) in a Lima VM \
instead of on your machine. Each branch gets its own clone in the VM at ~/workspace/<repo>-<branch>; \
you push work in, the agent commits there, and you fetch its commits back. The VM is treated as hostile: \
nothing it writes runs on your machine.",
    after_help = "Typical session:\n  agent-vm connect feature-x     # VM + workspace + shell, in one go\n  \
agent-vm fetch feature-x       # bring the agent's commits back\n  agent-vm status                # VM and workspaces\n\n\
Environment: AGENT_VM_INSTANCE (VM name), AGENT_VM_LIMACTL (limactl path), LIMA_HOME, RUST_LOG (log filter)."
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Global {
    /// Name of the VM (Lima instance) to use
    #[arg(long, global = true, env = "AGENT_VM_INSTANCE", default_value = "agent-vm", value_name = "NAME")]
    instance: String,
    /// More detail on stderr (-v: debug logs, -vv: trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    Start(start::Args),
    Stop(stop::Args),
    Status(status::Args),
    Connect(connect::Args),
    Push(push::Args),
    Fetch(fetch::Args),
    Run(run::Args),
    Clean(clean::Args),
    CleanAll(clean_all::Args),
    Provision(provision::Args),
    Mount(mount::Args),
    Unmount(unmount::Args),
    Network(network::Args),
    Destroy(destroy::Args),
    Snapshot(snapshot::Args),
    SshConfig(ssh_config::Args),
    Doctor(doctor::Args),
    Completions(completions::Args),
    Man(man::Args),
    #[command(name = crate::mount::sftp_relay::SUBCOMMAND, hide = true)]
    SftpRelay(sftp_relay::Args),
    #[command(hide = true)]
    Gateway(gateway::Args),
}

/// What every subcommand gets: the global options, resolved.
pub struct Context {
    instance: String,
    ui: Ui,
}

impl Context {
    /// The VM backend. Fails (with what to install) when limactl is missing,
    /// so commands that do not need it never ask for it.
    fn backend(&self) -> Result<Box<dyn Backend>> {
        crate::vm::backend(&self.instance, !self.ui.quiet)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.global);
    if let Command::SftpRelay(args) = cli.command {
        // sshfs's child for the life of a mount: plain threads, no runtime.
        return sftp_relay::run(args).unwrap_or_else(|e| {
            eprintln!("error: {}", crate::printable_lines(&format!("{e:#}")));
            ExitCode::FAILURE
        });
    }
    let ctx = Context { instance: cli.global.instance.clone(), ui: Ui { quiet: cli.global.quiet } };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Start(args) => start::run(&ctx, args).await,
            Command::Stop(args) => stop::run(&ctx, args).await,
            Command::Status(args) => status::run(&ctx, args).await,
            Command::Connect(args) => connect::run(&ctx, args).await,
            Command::Push(args) => push::run(&ctx, args).await,
            Command::Fetch(args) => fetch::run(&ctx, args).await,
            Command::Run(args) => run::run(&ctx, args).await,
            Command::Clean(args) => clean::run(&ctx, args).await,
            Command::CleanAll(args) => clean_all::run(&ctx, args).await,
            Command::Provision(args) => provision::run(&ctx, args).await,
            Command::Mount(args) => mount::run(&ctx, args).await,
            Command::Unmount(args) => unmount::run(&ctx, args).await,
            Command::Network(args) => network::run(&ctx, args).await,
            Command::Gateway(args) => gateway::run(&ctx, args).await,
            Command::Destroy(args) => destroy::run(&ctx, args).await,
            Command::Snapshot(args) => snapshot::run(&ctx, args).await,
            Command::SshConfig(args) => ssh_config::run(&ctx, args).await,
            Command::Doctor(args) => doctor::run(&ctx, args).await,
            Command::Completions(args) => completions::run(&ctx, args).await,
            Command::Man(args) => man::run(&ctx, args).await,
            Command::SftpRelay(_) => unreachable!("handled before the runtime starts"),
        }
    });
    // Do not wait for stray tasks (an SSH input pump blocked on our stdin).
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            // Errors quote the VM (remote stderr, libgit2's relay of the
            // remote's messages): neutralised here whatever their source.
            eprintln!("error: {}", crate::printable_lines(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(global: &Global) {
    use tracing_subscriber::EnvFilter;
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "agent_vm=debug",
        _ => "agent_vm=trace,russh=debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // With -v, seconds since start: where a slow command spends its time.
    if global.verbose > 0 {
        fmt.with_timer(tracing_subscriber::fmt::time::uptime()).init();
    } else {
        fmt.without_time().init();
    }
}

/// Unmounts the instance's workspace mount if it is ours (lazily when
/// asked). Works without the VM.
fn unmount(backend: &dyn Backend, lazy: bool) -> Result<bool> {
    mount_of(backend)?.unmount(lazy)
}

fn mount_of(backend: &dyn Backend) -> Result<crate::mount::Mount> {
    let user = crate::vm::agent_user(backend);
    Ok(crate::mount::Mount::new(crate::mount::mount_point(backend.instance())?, &backend.ssh_alias(), user.as_deref()))
}

/// What every branch command works with, set up the same way: a valid
/// branch name, the host repository, the branch's lock (held while this
/// lives), and a session to the VM.
struct BranchOp {
    host: crate::workspace::HostRepo,
    vm: crate::workspace::Vm,
    ws: crate::workspace::Workspace,
    _lock: std::fs::File,
}

async fn branch_op(ctx: &Context, branch: &str, start: bool) -> Result<BranchOp> {
    crate::workspace::validate_branch(branch)?;
    let host = crate::workspace::HostRepo::discover()?;
    let lock = host.lock_branch(branch, &ctx.ui)?;
    let (_backend, session) = session(ctx, start).await?;
    let ws = crate::workspace::Workspace::new(&host, branch);
    Ok(BranchOp { vm: crate::workspace::Vm::new(session)?, host, ws, _lock: lock })
}

/// The VM backend and an SSH session to the running VM. With `start`, the
/// VM is created or booted as needed; without, a stopped VM is an error.
async fn session(ctx: &Context, start: bool) -> Result<(Box<dyn Backend>, crate::ssh::Session)> {
    session_with(ctx, start, &crate::vm::Resources::default(), &crate::provision::Options::from_env())
        .await
        .map(|(b, s, _)| (b, s))
}

/// How long the VM's SSH server may take to answer the first, optimistic
/// attempt (a server that answers then gets the full handshake time).
const FAST_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An installed ssh-config entry follows the VM's (new) port.
fn refresh_ssh_config(backend: &dyn Backend, endpoint: &crate::ssh::Endpoint) {
    if let Err(e) = ssh_config::refresh(backend.instance(), endpoint) {
        tracing::warn!("cannot update the ssh-config entry: {e:#}");
    }
}

/// [`session`] with the resources for a VM that has to be created; also
/// says what starting took. A VM created here is provisioned before use.
/// The session is the agent user's (the admin's on a VM provisioned before
/// there was one), and the network gateway runs once this returns.
async fn session_with(
    ctx: &Context,
    start: bool,
    resources: &crate::vm::Resources,
    provisioning: &crate::provision::Options,
) -> Result<(Box<dyn Backend>, crate::ssh::Session, crate::vm::Started)> {
    let backend = ctx.backend()?;
    // The common case first: the VM runs and answers where its SSH config
    // says. Asking the backend (a limactl process) comes only when it does not.
    if let Ok(endpoint) = crate::vm::agent_endpoint(backend.as_ref()) {
        match crate::ssh::Session::connect(&endpoint, FAST_CONNECT_TIMEOUT).await {
            Ok(session) => {
                after_connect(ctx, backend.as_ref(), &endpoint);
                return Ok((backend, session, crate::vm::Started::AlreadyRunning));
            }
            Err(e) => tracing::debug!("no quick connection, asking the backend: {e:#}"),
        }
    }
    let (admin, started) = admin_session(ctx, backend.as_ref(), start, resources, provisioning).await?;
    let endpoint = crate::vm::agent_endpoint(backend.as_ref())?;
    let session = if endpoint.user == admin.endpoint().user {
        admin
    } else {
        crate::ssh::Session::connect(&endpoint, crate::ssh::CONNECT_TIMEOUT).await?
    };
    after_connect(ctx, backend.as_ref(), &endpoint);
    Ok((backend, session, started))
}

/// What follows every connection to the running VM: the ssh-config entry
/// follows its (new) port, and the network gateway runs.
fn after_connect(ctx: &Context, backend: &dyn Backend, endpoint: &crate::ssh::Endpoint) {
    refresh_ssh_config(backend, endpoint);
    if let Err(e) = crate::gateway::ensure(backend).and_then(|_| crate::gateway::hand_keys(backend)) {
        ctx.ui.say(&format!("warning: {e:#}"));
    }
}

/// The admin's session (Lima's user, with sudo) to the VM, started (and
/// created and provisioned) as asked.
async fn admin_session(
    ctx: &Context,
    backend: &dyn Backend,
    start: bool,
    resources: &crate::vm::Resources,
    provisioning: &crate::provision::Options,
) -> Result<(crate::ssh::Session, crate::vm::Started)> {
    let started = if start {
        crate::vm::ensure_running(backend, resources, &ctx.ui)?
    } else {
        crate::vm::running(backend)?;
        crate::vm::Started::AlreadyRunning
    };
    if started == crate::vm::Started::Created {
        // A new VM has no agent user until it is provisioned.
        crate::vm::set_agent_user(backend, None)?;
    }
    let session = crate::ssh::Session::connect(&backend.ssh_endpoint()?, crate::ssh::CONNECT_TIMEOUT).await?;
    if started == crate::vm::Started::Created {
        provision_vm(ctx, backend, &session, provisioning).await.map_err(|e| {
            e.context("the VM was created but provisioning failed; fix the cause and run `agent-vm provision`")
        })?;
    }
    Ok((session, started))
}

/// Provisions the VM over the admin's session, with the instance's agent
/// settings from config.yaml, and records the agent user it made.
async fn provision_vm(
    ctx: &Context,
    backend: &dyn Backend,
    admin: &crate::ssh::Session,
    options: &crate::provision::Options,
) -> Result<()> {
    let mut options = options.clone();
    let entry = crate::config::Config::load()?.entry(backend.instance());
    options.agent_sudo = entry.agent.sudo;
    options.credentials = entry.credential_mode();
    options.ca_files = entry.ca_certificates.clone();
    // The mount is the agent user's once there is one: a mount of the
    // admin's home from before goes first.
    let agent = crate::provision::AGENT_USER;
    let before = crate::vm::agent_user(backend);
    let provisioned = crate::provision::run(admin, &ctx.ui, &options).await;
    // sshd's new settings (AcceptEnv, the agent's groups) apply to
    // connections made from now on, also when provisioning stopped half-way
    // (a group taken away stays on a connection made before).
    crate::ssh::mux::terminate_all(&backend.state_dir()).await;
    provisioned?;
    if before.as_deref() != Some(agent) {
        unmount(backend, true)?;
    }
    crate::vm::set_agent_user(backend, Some((agent, options.agent_sudo)))?;
    Ok(())
}
