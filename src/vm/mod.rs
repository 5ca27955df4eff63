//! The VM lifecycle behind a backend trait, so the rest of agent-vm does not
//! care how the VM is run: a Lima VM ([`Lima`]) or an existing machine
//! reached over SSH ([`SshHost`]), chosen per instance in the config file.

mod lima;
mod ssh_host;

pub(crate) use lima::{find_on_path, is_root};

pub use lima::Lima;
pub use ssh_host::SshHost;

use crate::config::{Config, InstanceConfig};

/// The backend that runs `instance`, as the config file says.
pub fn backend(instance: &str, verbose: bool) -> Result<Box<dyn Backend>> {
    Ok(match Config::load()?.instance(instance) {
        InstanceConfig::Lima => Box::new(Lima::new(instance, verbose)?),
        InstanceConfig::Ssh { host, ssh_config } => Box::new(SshHost::new(instance, &host, ssh_config)?),
    })
}

use anyhow::Result;
use serde::Serialize;
use std::path::Path;

use crate::ssh::Endpoint;

/// Resources asked for when the VM is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory_gib: u32,
    pub disk_gib: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cpus: 4, memory_gib: 8, disk_gib: 100 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum State {
    Running,
    Stopped,
    /// Lima's Broken: only one of its host agent and QEMU is alive, or the
    /// host agent does not answer ([`broken`] says what to do).
    Broken,
    /// Anything else the backend reports (Lima: Installing, …).
    Other(String),
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Running => f.write_str("Running"),
            State::Stopped => f.write_str("Stopped"),
            State::Broken => f.write_str("Broken"),
            State::Other(s) if s.is_empty() => f.write_str("Unknown"),
            State::Other(s) => f.write_str(s),
        }
    }
}

/// What the backend knows about an existing instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub state: State,
    pub cpus: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub ssh_port: Option<u16>,
    /// Lima's vmType (qemu, vz, …), or "ssh".
    pub vm_type: Option<String>,
    /// What the backend says is wrong with it (Lima: why it is Broken).
    pub errors: Vec<String>,
}

pub trait Backend {
    /// The instance's name.
    fn instance(&self) -> &str;
    /// The instance, or `None` when it does not exist.
    fn inspect(&self) -> Result<Option<Instance>>;
    /// Creates and boots the instance from `template`.
    fn create(&self, template: &Path, resources: &Resources) -> Result<()>;
    /// Boots an existing, stopped instance.
    fn start(&self) -> Result<()>;
    /// Shuts the instance down; `force` kills it (for a Broken one).
    fn stop(&self, force: bool) -> Result<()>;
    /// Stops (if needed) and deletes the instance and its disk.
    fn delete(&self) -> Result<()>;
    /// Whether agent-vm creates and deletes the machine (not so for a
    /// machine of the ssh backend: [`Backend::delete`] says why).
    fn manages_machine(&self) -> bool {
        true
    }
    /// How to reach the running instance over SSH. Re-read after every start:
    /// the port changes.
    fn ssh_endpoint(&self) -> Result<Endpoint>;
    /// The Host alias in the instance's SSH config.
    fn ssh_alias(&self) -> String;
    /// A directory of agent-vm's own for this instance (templates, locks).
    fn state_dir(&self) -> std::path::PathBuf;
    /// The instance's snapshots, or why it has none.
    fn snapshots(&self) -> Result<&dyn Snapshots>;
}

/// Disk snapshots of a stopped instance.
pub trait Snapshots {
    fn create(&self, tag: &str) -> Result<()>;
    fn apply(&self, tag: &str) -> Result<()>;
    fn delete(&self, tag: &str) -> Result<()>;
    fn list(&self) -> Result<Vec<String>>;
}

/// What [`ensure_running`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    Created,
    Booted,
    AlreadyRunning,
}

/// Creates the VM from the embedded template if it does not exist, boots it
/// if it is stopped, and leaves it alone if it runs.
pub fn ensure_running(backend: &dyn Backend, resources: &Resources, ui: &crate::Ui) -> Result<Started> {
    match backend.inspect()? {
        None => {
            ui.say(&format!(
                "Creating VM '{}' ({} vCPU, {} GiB memory, {} GiB disk). The first start downloads \
                 Debian 13 and provisions it: this takes a few minutes.",
                backend.instance(),
                resources.cpus,
                resources.memory_gib,
                resources.disk_gib
            ));
            let template = crate::provision::write_template(&backend.state_dir())?;
            backend.create(&template, resources)?;
            Ok(Started::Created)
        }
        Some(i) if i.state == State::Running => Ok(Started::AlreadyRunning),
        Some(i) if i.state == State::Broken => Err(broken(&i)),
        Some(i) => {
            if let State::Other(s) = &i.state {
                ui.say(&format!("VM '{}' is {s}; trying to start it.", backend.instance()));
            } else {
                ui.say(&format!("Starting VM '{}'…", backend.instance()));
            }
            backend.start()?;
            Ok(Started::Booted)
        }
    }
}

/// Lima calls an instance Broken when only one of its host agent and QEMU
/// is alive, or the host agent does not answer: starting it again fails,
/// and only the user should decide to pull the plug.
pub fn broken(i: &Instance) -> anyhow::Error {
    let why = if i.errors.is_empty() {
        String::new()
    } else {
        format!(" (Lima: {})", i.errors.iter().map(|e| crate::printable(e)).collect::<Vec<_>>().join("; "))
    };
    anyhow::anyhow!(
        "VM '{0}' is Broken{why}: its QEMU process or Lima's host agent has died or hangs, so Lima cannot start \
         or stop it normally. Run `agent-vm stop --force` (it asks the VM to write its files to disk when it still \
         answers, then kills what is left of it), then `agent-vm start`; the workspaces are on the VM's disk",
        i.name
    )
}

/// The file in an instance's state directory that names the VM user agent
/// sessions log in as, once provisioning has made it (`agent`). VMs
/// provisioned before there was an agent user have none: their sessions use
/// the admin (Lima's user) until `agent-vm provision` runs.
const AGENT_USER_FILE: &str = "agent-user";

/// The VM user agent sessions run as, if provisioning made one.
pub fn agent_user(backend: &dyn Backend) -> Option<String> {
    agent_record(backend).map(|(user, _)| user)
}

/// Whether the agent was provisioned contained (no sudo), when there is an
/// agent user.
pub fn agent_contained(backend: &dyn Backend) -> Option<bool> {
    agent_record(backend).map(|(_, contained)| contained)
}

fn agent_record(backend: &dyn Backend) -> Option<(String, bool)> {
    let text = std::fs::read_to_string(backend.state_dir().join(AGENT_USER_FILE)).ok()?;
    let mut words = text.split_whitespace();
    let name = words.next()?;
    let contained = words.next() != Some("sudo");
    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_').then(|| (name.to_owned(), contained))
}

/// Records (or, with None, forgets) the agent user of the instance, and
/// whether it has sudo.
pub fn set_agent_user(backend: &dyn Backend, user: Option<(&str, bool)>) -> Result<()> {
    let path = backend.state_dir().join(AGENT_USER_FILE);
    match user {
        Some((u, sudo)) => {
            std::fs::create_dir_all(backend.state_dir())?;
            std::fs::write(&path, format!("{u} {}\n", if sudo { "sudo" } else { "contained" }))?;
        }
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Where agent sessions connect: the VM's SSH endpoint, as the agent user
/// when there is one.
pub fn agent_endpoint(backend: &dyn Backend) -> Result<Endpoint> {
    let mut endpoint = backend.ssh_endpoint()?;
    if let Some(user) = agent_user(backend) {
        endpoint.user = user;
    }
    Ok(endpoint)
}

/// The instance, or an error telling how to create it.
pub fn existing(backend: &dyn Backend) -> Result<Instance> {
    backend.inspect()?.ok_or_else(|| {
        anyhow::anyhow!(
            "VM '{0}' does not exist. Create it with `agent-vm start` (or pass the right --instance)",
            backend.instance()
        )
    })
}

/// The instance if it runs, or an error telling how to start it.
pub fn running(backend: &dyn Backend) -> Result<Instance> {
    let i = existing(backend)?;
    if i.state == State::Broken {
        return Err(broken(&i));
    }
    if i.state != State::Running {
        anyhow::bail!("VM '{}' is not running (it is {}). Start it with `agent-vm start`", i.name, i.state);
    }
    Ok(i)
}

/// Lima's rule for instance names (`pkg/identifiers`): letters and digits,
/// with single `.`, `_` or `-` between them, at most 76 characters, and no
/// `.yaml`/`.yml` ending. Checked before anything is created, for every
/// backend, as the name also becomes part of host paths.
pub fn validate_name(name: &str) -> Result<()> {
    let words_ok = name.split(['.', '_', '-']).all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric()));
    let problem = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if !words_ok {
        Some("use letters and digits, with single '.', '_' or '-' between them".to_owned())
    } else if name.len() > MAX_NAME {
        Some(format!("it has {} characters, and Lima allows at most {MAX_NAME}", name.len()))
    } else if name.ends_with(".yaml") || name.ends_with(".yml") {
        Some("Lima takes a name ending in .yaml or .yml for a template file".to_owned())
    } else {
        None
    };
    match problem {
        Some(why) => anyhow::bail!("invalid instance name {name:?}: {why}"),
        None => Ok(()),
    }
}

const MAX_NAME: usize = 76;
