use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

use super::Context;
use crate::printable;
use crate::ssh::Session;
use crate::vm::{self, State};
use crate::workspace::{self, HostRepo, Listed, Vm, Workspace};

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
    mount: MountStatus,
    credentials: CredentialsStatus,
    /// Workspaces in the VM (empty when it is not running).
    workspaces: Vec<WorkspaceStatus>,
    /// What is wrong with the VM and what to run, when it is not usable.
    problem: Option<String>,
    network: NetworkStatus,
}

/// Which credentials stay on the host and which are in the VM.
#[derive(Serialize)]
struct CredentialsStatus {
    mode: crate::config::CredentialMode,
    /// Where the VM's GCP access comes from (when running).
    gcp: Option<crate::provision::Gcp>,
    /// Each provider whose key this machine has: `brokered` or `copied`.
    api_keys: std::collections::BTreeMap<&'static str, &'static str>,
}

#[derive(Serialize)]
struct NetworkStatus {
    /// The instance's mode: allowlist, open or none.
    mode: String,
    /// The VM user agent sessions run as (none: a VM provisioned before
    /// agent-vm had one; `agent-vm provision` makes it).
    agent_user: Option<String>,
    /// Whether the agent is contained: no sudo, egress only through the gateway.
    contained: bool,
    /// The gateway: "ready", "starting", "error: …" or "not running".
    gateway: String,
    gateway_pid: Option<u32>,
}

#[derive(Serialize)]
struct WorkspaceStatus {
    #[serde(flatten)]
    listed: Listed,
    /// Whether the workspace belongs to the repository status runs in.
    this_repo: bool,
    /// Commits the VM branch has that the host branch lacks, and the reverse
    /// (this repository only, when the host has the VM's commits).
    ahead: Option<usize>,
    behind: Option<usize>,
}

#[derive(Serialize)]
struct MountStatus {
    path: String,
    /// "mounted", "not mounted", "stale (…)" or "occupied by another mount (…)".
    state: String,
    mounted: bool,
}

#[derive(Serialize)]
struct Ssh {
    host: String,
    port: u16,
    user: String,
    config_file: String,
    host_alias: String,
}

/// The VM's answers for status, on `session`: where GCP access comes
/// from, and the workspaces.
async fn ask_vm(session: Session) -> Result<(String, Vec<Listed>)> {
    let vm = Vm::new(session)?;
    // One round trip and one shell for both questions.
    vm.list_after(crate::provision::GCP_CHECK, &crate::provision::GCP_ARGS, false).await
}

/// A spawned task, aborted when dropped (on every way out of status).
struct Asked(tokio::task::JoinHandle<Result<(String, Vec<Listed>)>>);

impl Drop for Asked {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    // A VM in use (its shared SSH connection answers) is asked while
    // limactl, a process of its own, says whether it runs: one wait instead
    // of two. Nothing is dialled for this: a VM that turns out not to run
    // has its question dropped.
    let mut early = None;
    if let Ok(ep) = crate::vm::agent_endpoint(backend.as_ref())
        && let Some(session) = Session::attach(&ep).await
    {
        early = Some((ep, Asked(tokio::spawn(ask_vm(session)))));
    }
    let instance = vm::existing(backend.as_ref())?;
    let running = instance.state == State::Running;
    let mut workspaces = Vec::new();
    let mode = crate::config::Config::load()?.entry(backend.instance()).credential_mode();
    let mut credentials = CredentialsStatus {
        mode,
        gcp: None,
        api_keys: crate::gateway::broker::providers::PROVIDERS
            .iter()
            .filter(|p| p.key(|v| std::env::var(v).ok()).is_some())
            .map(|p| (p.name, if mode == crate::config::CredentialMode::Copy { "copied" } else { "brokered" }))
            .collect(),
    };
    let ssh = if running {
        let ep = crate::vm::agent_endpoint(backend.as_ref())?;
        let (gcp, listed) = match early {
            // Asked where the VM answers now (a restart moves its port).
            Some((asked, mut task)) if asked == ep => {
                (&mut task.0).await.map_err(|e| anyhow::anyhow!("asking the VM: {e}"))??
            }
            _ => ask_vm(Session::connect(&ep, crate::ssh::CONNECT_TIMEOUT).await?).await?,
        };
        super::after_connect(ctx, backend.as_ref(), &ep);
        credentials.gcp = Some(crate::provision::parse_gcp(&gcp));
        let host = HostRepo::discover().ok();
        for listed in listed {
            let this_repo = host.as_ref().is_some_and(|h| Workspace::new(h, &listed.branch).dir == listed.dir);
            let (ahead, behind) = match (&host, listed.tip) {
                (Some(h), Some(tip)) if this_repo => workspace::ahead_behind(h, &listed.branch, tip).unzip(),
                _ => (None, None),
            };
            workspaces.push(WorkspaceStatus { listed, this_repo, ahead, behind });
        }
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
    let mount = super::mount_of(backend.as_ref())?;
    let mount_state = mount.state()?;
    let mount = MountStatus {
        path: mount.point.display().to_string(),
        mounted: mount_state == crate::mount::State::Mounted,
        state: mount_state.to_string(),
    };
    let problem = (instance.state == State::Broken).then(|| format!("{:#}", crate::vm::broken(&instance)));
    let gateway = crate::gateway::running(&crate::gateway::Paths::new(&backend.state_dir()));
    let network = NetworkStatus {
        mode: crate::config::Config::load()?.entry(backend.instance()).network.mode.to_string(),
        agent_user: crate::vm::agent_user(backend.as_ref()),
        contained: crate::vm::agent_contained(backend.as_ref()) == Some(true),
        gateway: match &gateway {
            Some(g) => match &g.error {
                Some(e) if g.phase != "ready" => format!("{}: {e}", g.phase),
                _ => g.phase.clone(),
            },
            None => "not running".into(),
        },
        gateway_pid: gateway.map(|g| g.pid),
    };
    let status = Status {
        problem,
        instance: instance.name,
        state: instance.state.to_string(),
        running,
        cpus: instance.cpus,
        memory_bytes: instance.memory_bytes,
        disk_bytes: instance.disk_bytes,
        ssh,
        mount,
        credentials,
        workspaces,
        network,
    };
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    crate::outln!("VM:        {} ({})", status.instance, status.state);
    if let Some(problem) = &status.problem {
        crate::outln!("Problem:   {problem}");
    }
    let gib = |b: Option<u64>| b.map_or("?".to_owned(), |b| format!("{} GiB", b >> 30));
    crate::outln!(
        "Resources: {} vCPU, {} memory, {} disk",
        status.cpus.map_or("?".to_owned(), |c| c.to_string()),
        gib(status.memory_bytes),
        gib(status.disk_bytes)
    );
    match &status.ssh {
        Some(s) => {
            crate::outln!("SSH:       {}@{}:{} (ssh -F {} {})", s.user, s.host, s.port, s.config_file, s.host_alias)
        }
        None => crate::outln!("SSH:       - (start the VM with `agent-vm start`)"),
    }
    crate::outln!("Mount:     {} ({})", status.mount.path, status.mount.state);
    let n = &status.network;
    let who = match (&n.agent_user, n.contained) {
        (Some(u), true) => format!("contained: agent runs as {u}, no sudo, network only through the gateway"),
        (Some(u), false) => format!("NOT CONTAINED: agent runs as {u} with sudo (config.yaml agent: {{sudo: true}})"),
        (None, _) => "NOT CONTAINED: this VM predates the agent user; run `agent-vm provision`".to_owned(),
    };
    crate::outln!("Agent:     {who}");
    crate::outln!("Network:   {} mode; gateway {}", n.mode, crate::printable(&n.gateway));
    let c = &status.credentials;
    let keys: Vec<String> = c.api_keys.iter().map(|(p, how)| format!("{p} {how}")).collect();
    crate::outln!(
        "Keys:      {}",
        if keys.is_empty() { "no provider keys on this machine".to_owned() } else { keys.join(", ") }
    );
    if let Some(gcp) = c.gcp {
        crate::outln!(
            "GCP:       {}",
            match gcp {
                crate::provision::Gcp::Brokered =>
                    "brokered: short-lived tokens from the gateway, no credentials in the VM",
                crate::provision::Gcp::Copied => "COPIED: application-default credentials in the VM",
                crate::provision::Gcp::None => "no credentials (absent on this machine when provisioned)",
            }
        );
    }
    if c.mode == crate::config::CredentialMode::Copy || c.gcp == Some(crate::provision::Gcp::Copied) {
        crate::outln!("warning:   {}", crate::provision::COPY_WARNING);
    }
    if running {
        crate::outln!("Workspaces:{}", if status.workspaces.is_empty() { " none" } else { "" });
    }
    for w in &status.workspaces {
        let sync = match (w.ahead, w.behind) {
            (Some(0), Some(0)) => "in sync with host".to_owned(),
            (Some(a), Some(b)) => format!("{a} ahead, {b} behind host"),
            _ if w.this_repo => "has commits the host lacks".to_owned(),
            _ => format!("repo {}", printable(&w.listed.host_repo)),
        };
        let dirty = if w.listed.changes > 0 { format!(", {} uncommitted", w.listed.changes) } else { String::new() };
        crate::outln!(
            "  ~/{}  {}  {}  {sync}{dirty}",
            printable(&w.listed.dir),
            printable(&w.listed.branch),
            w.listed.tip.map_or("-".to_owned(), |t| format!("{:.10}", t.to_string())),
        );
    }
    Ok(ExitCode::SUCCESS)
}
