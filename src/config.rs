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
    pub instances: BTreeMap<String, InstanceConfig>,
}

/// How one instance is run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum InstanceConfig {
    /// A Lima VM that agent-vm creates, starts, stops and deletes.
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
        self.instances.get(instance).cloned().unwrap_or(InstanceConfig::Lima)
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
            "instancez: {}\n",
            "instances: [",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(format!("{err:#}").contains("invalid config file"), "{bad}: {err:#}");
        }
    }
}
