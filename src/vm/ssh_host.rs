//! The `ssh` backend: an existing machine (a cloud VM, a big workstation)
//! reached through an OpenSSH config. Workspaces, push/fetch, mounts and
//! provisioning work as with Lima; agent-vm does not manage its lifecycle.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use super::{Backend, Instance, Resources, State};
use crate::ssh::{Defaults, Endpoint};

pub struct SshHost {
    instance: String,
    alias: String,
    config_file: PathBuf,
}

impl SshHost {
    pub fn new(instance: &str, alias: &str, config_file: Option<PathBuf>) -> Result<SshHost> {
        super::validate_name(instance)?;
        let config_file = match config_file {
            Some(f) => f,
            None => crate::home_dir()?.join(".ssh/config"),
        };
        Ok(SshHost { instance: instance.to_owned(), alias: alias.to_owned(), config_file })
    }

    fn unmanaged(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "instance '{}' is the machine `{}` reached over SSH (backend: ssh in {}): agent-vm cannot {what} it; \
             do that with the machine's own tools",
            self.instance,
            self.alias,
            crate::config::path().map(|p| p.display().to_string()).unwrap_or_default()
        )
    }
}

impl Backend for SshHost {
    fn instance(&self) -> &str {
        &self.instance
    }

    /// Running when its SSH port accepts connections; the machine always
    /// "exists".
    fn inspect(&self) -> Result<Option<Instance>> {
        let ep = self.ssh_endpoint()?;
        let reachable = (ep.host.as_str(), ep.port)
            .to_socket_addrs()
            .map(|mut addrs| addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok()))
            .unwrap_or(false);
        Ok(Some(Instance {
            name: self.instance.clone(),
            state: if reachable { State::Running } else { State::Other("Unreachable".into()) },
            cpus: None,
            memory_bytes: None,
            disk_bytes: None,
            ssh_port: Some(ep.port),
            vm_type: Some("ssh".into()),
            errors: Vec::new(),
        }))
    }

    fn create(&self, _template: &Path, _resources: &Resources) -> Result<()> {
        Err(self.unmanaged("create"))
    }

    fn start(&self) -> Result<()> {
        bail!(
            "cannot reach `{}` over SSH (config {}). agent-vm does not start machines of the ssh backend: \
             start it, then check with `ssh -F {} {} true`",
            self.alias,
            self.config_file.display(),
            self.config_file.display(),
            self.alias
        )
    }

    fn stop(&self, _force: bool) -> Result<()> {
        Err(self.unmanaged("stop"))
    }

    fn delete(&self) -> Result<()> {
        Err(self.unmanaged("delete"))
    }

    fn manages_machine(&self) -> bool {
        false
    }

    fn ssh_endpoint(&self) -> Result<Endpoint> {
        Endpoint::from_config_file(&self.config_file, &self.alias, Defaults::OpenSsh)
            .map(|e| e.shared_in(self.state_dir()))
    }

    fn ssh_alias(&self) -> String {
        self.alias.clone()
    }

    fn state_dir(&self) -> PathBuf {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::home_dir().unwrap_or_default().join(".local/state"));
        base.join("agent-vm").join(&self.instance)
    }

    fn snapshots(&self) -> Result<&dyn super::Snapshots> {
        Err(self.unmanaged("snapshot"))
    }
}
