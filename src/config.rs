//! agent-vm's own configuration file: which backend runs each instance.
//!
//! `$AGENT_VM_CONFIG`, else `$XDG_CONFIG_HOME/agent-vm/config.yaml`, else
//! `~/.config/agent-vm/config.yaml`. A missing file means every instance is
//! a Lima VM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub instances: BTreeMap<String, Instance>,
}

/// One instance's entry: its backend, and what its agent may do.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(try_from = "RawInstance")]
pub struct Instance {
    pub backend: InstanceConfig,
    pub network: Network,
    pub agent: Agent,
    pub credentials: Credentials,
    /// CA certificate files (PEM) the VM is to trust besides its own.
    pub ca_certificates: Vec<PathBuf>,
}

/// How the agent's API keys and GCP credentials reach it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialMode {
    /// They stay on the host; the gateway adds them on the way out.
    #[default]
    Broker,
    /// Copied into the VM (keys in the session environment, GCP
    /// credentials in /etc/google): the agent can read them.
    Copy,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Credentials {
    /// As configured; [`Instance::credential_mode`] says what applies.
    pub mode: Option<CredentialMode>,
    /// The broker's endpoints per provider (and `google-token`), instead
    /// of the usual ones.
    pub upstreams: BTreeMap<String, String>,
}

/// How one instance is run.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum InstanceConfig {
    /// A Lima VM that agent-vm creates, starts, stops and deletes.
    #[default]
    Lima,
    /// An existing machine reached over SSH; agent-vm never creates, stops
    /// or deletes it.
    Ssh {
        /// The Host alias to connect to.
        host: String,
        /// The OpenSSH config file that defines it (default ~/.ssh/config).
        ssh_config: Option<PathBuf>,
    },
}

/// What the agent may reach through the gateway (see `crate::gateway`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Network {
    pub mode: crate::gateway::policy::Mode,
    /// Destinations added to the default allowlist.
    pub allow: Vec<String>,
    /// Destinations refused whatever else says.
    pub deny: Vec<String>,
    /// Host names the gateway resolves to a fixed address (and may then
    /// dial even when the address is private).
    pub resolve: BTreeMap<String, std::net::IpAddr>,
}

/// The agent user in the VM.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Give the agent root again (sudo): the VM is then not contained.
    #[serde(default)]
    pub sudo: bool,
}

/// The entry as written: every key in one flat map, checked for typos.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    #[serde(default)]
    backend: Option<String>,
    host: Option<String>,
    ssh_config: Option<PathBuf>,
    #[serde(default)]
    network: crate::gateway::policy::Mode,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    resolve: BTreeMap<String, std::net::IpAddr>,
    #[serde(default)]
    agent: Agent,
    #[serde(default)]
    credentials: Option<CredentialMode>,
    #[serde(default)]
    upstreams: BTreeMap<String, String>,
    #[serde(default)]
    ca_certificates: Vec<PathBuf>,
}

impl Instance {
    /// The broker whenever the agent is contained, unless `credentials:
    /// copy`; copied when the agent has sudo (it could read anything).
    pub fn credential_mode(&self) -> CredentialMode {
        self.credentials.mode.unwrap_or(if self.agent.sudo { CredentialMode::Copy } else { CredentialMode::Broker })
    }
}

impl TryFrom<RawInstance> for Instance {
    type Error = String;

    fn try_from(raw: RawInstance) -> std::result::Result<Instance, String> {
        let backend = match (raw.backend.as_deref().unwrap_or("lima"), raw.host) {
            ("lima", None) if raw.ssh_config.is_none() => InstanceConfig::Lima,
            ("lima", _) => return Err("`host` and `ssh_config` belong to `backend: ssh`".into()),
            ("ssh", Some(host)) => InstanceConfig::Ssh { host, ssh_config: raw.ssh_config },
            ("ssh", None) => return Err("`backend: ssh` needs `host` (a Host alias of your SSH config)".into()),
            (other, _) => return Err(format!("unknown backend {other:?} (lima or ssh)")),
        };
        for rule in raw.allow.iter().chain(&raw.deny) {
            crate::gateway::policy::Rule::parse(rule).map_err(|e| format!("{e:#}"))?;
        }
        for (name, url) in &raw.upstreams {
            if name != "google-token" && crate::gateway::broker::providers::find(name).is_none() {
                let names: Vec<&str> = crate::gateway::broker::providers::PROVIDERS.iter().map(|p| p.name).collect();
                return Err(format!("upstreams: unknown provider {name:?} ({} or google-token)", names.join(", ")));
            }
            crate::gateway::broker::https::Url::parse(url).map_err(|e| format!("upstreams: {name}: {e:#}"))?;
        }
        let network = Network { mode: raw.network, allow: raw.allow, deny: raw.deny, resolve: raw.resolve };
        let credentials = Credentials { mode: raw.credentials, upstreams: raw.upstreams };
        Ok(Instance { backend, network, agent: raw.agent, credentials, ca_certificates: raw.ca_certificates })
    }
}

/// Where the configuration file is.
pub fn path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("AGENT_VM_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => crate::home_dir()?.join(".config"),
    };
    Ok(base.join("agent-vm").join("config.yaml"))
}

/// The directory of the configuration file (agent-vm keeps other
/// user-facing files there, such as its ssh entries).
pub fn dir() -> Result<PathBuf> {
    let p = path()?;
    Ok(p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")))
}

impl Config {
    /// Reads the configuration file; a missing file is the empty config.
    pub fn load() -> Result<Config> {
        Self::load_from(&path()?)
    }

    pub fn load_from(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read the config file {}", path.display()));
            }
        };
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml_ng::from_str(&text).with_context(|| {
            format!("invalid config file {} (see the README's \"Configuration\" section)", path.display())
        })
    }

    /// How `instance` is run: as configured, else a Lima VM.
    pub fn instance(&self, instance: &str) -> InstanceConfig {
        self.entry(instance).backend
    }

    /// The whole entry of `instance` (defaults when it has none).
    pub fn entry(&self, instance: &str) -> Instance {
        self.instances.get(instance).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        Config::load_from(f.path())
    }

    #[test]
    fn backends_per_instance() {
        let c = parse("instances:\n  big:\n    backend: ssh\n    host: box\n    ssh_config: /x/cfg\n  agent-vm:\n    backend: lima\n")
            .unwrap();
        assert_eq!(c.instance("big"), InstanceConfig::Ssh { host: "box".into(), ssh_config: Some("/x/cfg".into()) });
        assert_eq!(c.instance("agent-vm"), InstanceConfig::Lima);
        assert_eq!(c.instance("unlisted"), InstanceConfig::Lima);
    }

    #[test]
    fn network_and_agent_settings() {
        let c = parse(
            "instances:\n  agent-vm:\n    network: open\n    allow: [example.com, '*.corp.test:443']\n    deny: [10.0.0.0/8]\n    resolve: {local.test: 127.0.0.1}\n    agent: {sudo: true}\n",
        )
        .unwrap();
        let e = c.entry("agent-vm");
        assert_eq!(e.backend, InstanceConfig::Lima);
        assert_eq!(e.network.mode, crate::gateway::policy::Mode::Open);
        assert_eq!(e.network.allow, ["example.com", "*.corp.test:443"]);
        assert_eq!(e.network.resolve["local.test"].to_string(), "127.0.0.1");
        assert!(e.agent.sudo);
        let d = c.entry("other");
        assert_eq!((d.network.mode, d.agent.sudo), (crate::gateway::policy::Mode::Allowlist, false));
    }

    #[test]
    fn missing_or_empty_file_is_the_default() {
        assert!(Config::load_from(Path::new("/nonexistent/agent-vm.yaml")).unwrap().instances.is_empty());
        assert!(parse("").unwrap().instances.is_empty());
    }

    #[test]
    fn mistakes_are_errors() {
        for bad in [
            "instances:\n  big:\n    backend: ssh\n",                           // no host
            "instances:\n  big:\n    backend: vbox\n",                          // unknown backend
            "instances:\n  big:\n    backend: ssh\n    host: b\n    hots: c\n", // typo
            "instances:\n  big:\n    network: closed\n",                        // unknown mode
            "instances:\n  big:\n    allow: ['a b']\n",                         // not a rule
            "instances:\n  big:\n    agent: {root: true}\n",                    // typo
            "instancez: {}\n",
            "instances: [",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(format!("{err:#}").contains("invalid config file"), "{bad}: {err:#}");
        }
    }
}
