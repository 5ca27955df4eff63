//! The VM lifecycle behind a backend trait, so the rest of agent-vm does not
//! care how the VM is run: a Lima VM ([`Lima`]) or an existing machine
//! reached over SSH ([`SshHost`]), chosen per instance in the config file.

mod lima;
mod ssh_host;

pub(crate) use lima::find_on_path;

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
    /// Anything else the backend reports (Lima: Broken, Installing, …).
    Other(String),
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Running => f.write_str("Running"),
            State::Stopped => f.write_str("Stopped"),
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
    fn stop(&self) -> Result<()>;
    /// Stops (if needed) and deletes the instance and its disk.
    fn delete(&self) -> Result<()>;
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
    if i.state != State::Running {
        anyhow::bail!("VM '{}' is not running (it is {}). Start it with `agent-vm start`", i.name, i.state);
    }
    Ok(i)
}

/// Lima's rule for instance names (it rejects others itself, but later and
/// less clearly); the name also becomes part of host paths.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 76
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        anyhow::bail!(
            "invalid instance name {name:?}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        );
    }
    Ok(())
}
