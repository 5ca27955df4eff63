//! The Lima backend: drives `limactl` and reads the files Lima keeps in
//! `$LIMA_HOME/<instance>/`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use super::{Backend, Instance, Resources, Snapshots, State};
use crate::ssh::Endpoint;

pub struct Lima {
    limactl: PathBuf,
    home: PathBuf,
    instance: String,
    /// Echo limactl's progress lines to stderr.
    verbose: bool,
}

/// One line of `limactl list --json` (Lima's store.Instance); fields we do
/// not use are ignored, and empty ones may be missing.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListEntry {
    name: String,
    #[serde(default)]
    status: String,
    cpus: Option<u64>,
    memory: Option<u64>,
    disk: Option<u64>,
    ssh_local_port: Option<u16>,
    vm_type: Option<String>,
}

impl Lima {
    /// Finds `limactl` ($AGENT_VM_LIMACTL, else PATH) and `$LIMA_HOME`.
    pub fn new(instance: &str, verbose: bool) -> Result<Lima> {
        super::validate_name(instance)?;
        let limactl = match std::env::var_os("AGENT_VM_LIMACTL") {
            Some(p) => {
                let p = PathBuf::from(p);
                if !p.is_file() {
                    bail!("AGENT_VM_LIMACTL points to {}, which does not exist", p.display());
                }
                p
            }
            None => find_on_path("limactl").ok_or_else(|| {
                anyhow!(
                    "limactl not found on PATH: install Lima (macOS: `brew install lima`; Linux: see \
                     https://lima-vm.io/docs/installation/) or set AGENT_VM_LIMACTL. `agent-vm doctor` checks everything"
                )
            })?,
        };
        Ok(Lima { limactl, home: lima_home()?, instance: instance.to_owned(), verbose })
    }

    fn dir(&self) -> PathBuf {
        self.home.join(&self.instance)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.limactl);
        cmd.arg("--tty=false").stdin(Stdio::null());
        cmd
    }

    /// Runs limactl, streaming its log lines (as progress) when verbose, and
    /// turns a failure into an error that quotes what limactl said.
    fn run(&self, args: &[String], what: &str) -> Result<()> {
        tracing::debug!(?args, "limactl");
        let mut child = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.limactl.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let out_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
            s
        });
        let mut tail: Vec<String> = Vec::new();
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let line = line.unwrap_or_default();
            if self.verbose {
                eprintln!("  {}", lima_message(&line));
            }
            tail.push(line);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
        let status = child.wait()?;
        let _ = out_thread.join();
        if !status.success() {
            let said: Vec<String> = tail.iter().map(|l| lima_message(l)).collect();
            bail!("{what} failed: limactl {} exited with {status}:\n  {}", args.join(" "), said.join("\n  "));
        }
        Ok(())
    }
}

/// Lima logs logfmt lines (`time=… level=info msg="…"`): show the message.
fn lima_message(line: &str) -> String {
    match line.find("msg=") {
        Some(i) => {
            let rest = &line[i + 4..];
            let msg = rest.strip_prefix('"').and_then(|r| r.rfind('"').map(|end| &r[..end])).unwrap_or(rest);
            msg.replace("\\\"", "\"")
        }
        None => line.to_owned(),
    }
}

impl Backend for Lima {
    fn instance(&self) -> &str {
        &self.instance
    }

    fn inspect(&self) -> Result<Option<Instance>> {
        // Listing all instances (rather than naming ours) distinguishes "no
        // such instance" (absent from the list) from a failure (non-zero exit).
        let out = self
            .command()
            .args(["list", "--json"])
            .output()
            .with_context(|| format!("cannot run {}", self.limactl.display()))?;
        if !out.status.success() {
            bail!("`limactl list --json` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
            let entry: ListEntry = serde_json::from_str(line)
                .with_context(|| format!("unexpected output from `limactl list --json`: {line:.200}"))?;
            if entry.name != self.instance {
                continue;
            }
            let state = match entry.status.as_str() {
                "Running" => State::Running,
                "Stopped" => State::Stopped,
                other => State::Other(other.to_owned()),
            };
            return Ok(Some(Instance {
                name: entry.name,
                ssh_port: entry.ssh_local_port.filter(|p| *p != 0 && state == State::Running),
                state,
                cpus: entry.cpus,
                memory_bytes: entry.memory,
                disk_bytes: entry.disk,
                vm_type: entry.vm_type,
            }));
        }
        Ok(None)
    }

    fn create(&self, template: &Path, res: &Resources) -> Result<()> {
        let mut args = vec![
            "start".to_owned(),
            format!("--name={}", self.instance),
            format!("--cpus={}", res.cpus),
            format!("--memory={}", res.memory_gib),
            format!("--disk={}", res.disk_gib),
            // The first boot downloads the image and provisions it.
            "--timeout=30m".to_owned(),
        ];
        if nested_virtualization_available() {
            // Agents can then run VMs (Lima, QEMU) inside the VM.
            args.push("--set=.nestedVirtualization = true".to_owned());
        }
        args.push(template.display().to_string());
        self.run(&args, &format!("creating VM '{}'", self.instance))
    }

    fn start(&self) -> Result<()> {
        let args = vec!["start".to_owned(), "--timeout=30m".to_owned(), self.instance.clone()];
        self.run(&args, &format!("starting VM '{}'", self.instance))
    }

    fn stop(&self) -> Result<()> {
        self.run(&["stop".to_owned(), self.instance.clone()], &format!("stopping VM '{}'", self.instance))
    }

    fn delete(&self) -> Result<()> {
        let args = vec!["delete".to_owned(), "--force".to_owned(), self.instance.clone()];
        self.run(&args, &format!("deleting VM '{}'", self.instance))
    }

    fn ssh_endpoint(&self) -> Result<Endpoint> {
        let path = self.dir().join("ssh.config");
        if !path.exists() {
            bail!("{} does not exist: the VM has not been started. Run `agent-vm start`", path.display());
        }
        Endpoint::from_config_file(&path, &self.ssh_alias(), crate::ssh::Defaults::None)
    }

    fn ssh_alias(&self) -> String {
        host_alias(&self.instance)
    }

    fn state_dir(&self) -> PathBuf {
        // Lima skips names starting with `_` when it lists instances.
        self.home.join("_agent-vm").join(&self.instance)
    }

    fn snapshots(&self) -> Result<&dyn Snapshots> {
        Ok(self)
    }
}

/// `limactl snapshot`: QEMU VMs only; agent-vm stops the VM around create
/// and apply, so a snapshot is the disk alone (no memory image).
impl Snapshots for Lima {
    fn create(&self, tag: &str) -> Result<()> {
        self.snapshot("create", Some(tag))
    }

    fn apply(&self, tag: &str) -> Result<()> {
        self.snapshot("apply", Some(tag))
    }

    fn delete(&self, tag: &str) -> Result<()> {
        self.snapshot("delete", Some(tag))
    }

    fn list(&self) -> Result<Vec<String>> {
        self.snapshot_supported()?;
        let out = self
            .command()
            .args(["snapshot", "list", "--quiet", &self.instance])
            .output()
            .with_context(|| format!("cannot run {}", self.limactl.display()))?;
        if !out.status.success() {
            let said: Vec<String> = String::from_utf8_lossy(&out.stderr).lines().map(lima_message).collect();
            // Lima fails to list an image that has no snapshot table yet.
            if said.iter().any(|l| l.contains("no snapshot")) {
                return Ok(Vec::new());
            }
            bail!("listing snapshots failed: {}", said.join("; "));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

impl Lima {
    fn snapshot(&self, op: &str, tag: Option<&str>) -> Result<()> {
        self.snapshot_supported()?;
        let mut args = vec!["snapshot".to_owned(), op.to_owned()];
        if let Some(tag) = tag {
            args.push(format!("--tag={tag}"));
        }
        args.push(self.instance.clone());
        self.run(&args, &format!("snapshot {op}"))
    }

    fn snapshot_supported(&self) -> Result<()> {
        match super::existing(self)?.vm_type.as_deref() {
            None | Some("qemu") => Ok(()),
            Some(other) => bail!(
                "VM '{}' uses Lima's {other} VM type, and Lima supports snapshots for QEMU VMs only \
                 (vmType: qemu, chosen when the VM is created)",
                self.instance
            ),
        }
    }
}

/// Whether Lima can give the VM nested virtualization here: QEMU on Linux
/// with nested KVM enabled. (Lima also supports it with vz on Apple M3 and
/// later; agent-vm does not detect that yet.)
fn nested_virtualization_available() -> bool {
    cfg!(target_os = "linux")
        && ["kvm_intel", "kvm_amd"].iter().any(|m| {
            std::fs::read_to_string(format!("/sys/module/{m}/parameters/nested"))
                .is_ok_and(|v| matches!(v.trim(), "Y" | "1"))
        })
}

/// Lima's Host alias for an instance: `lima-<name>` with `.` and `_` as `-`.
pub fn host_alias(instance: &str) -> String {
    format!("lima-{}", instance.replace(['.', '_'], "-"))
}

fn lima_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("LIMA_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    Ok(crate::home_dir()?.join(".lima"))
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_follows_lima() {
        assert_eq!(host_alias("agent-vm"), "lima-agent-vm");
        assert_eq!(host_alias("a.b_c"), "lima-a-b-c");
    }

    #[test]
    fn names_are_checked() {
        assert!(super::super::validate_name("agent-vm").is_ok());
        for bad in ["", "-x", "a/b", "a b", "../x", "a;b"] {
            assert!(super::super::validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lima_messages_are_extracted() {
        assert_eq!(
            lima_message(r#"time="2024-01-01T00:00:00Z" level=info msg="Waiting for \"ssh\"""#),
            r#"Waiting for "ssh""#
        );
        assert_eq!(lima_message("plain"), "plain");
    }

    #[test]
    fn list_entry_tolerates_missing_fields() {
        let e: ListEntry = serde_json::from_str(r#"{"name":"x","status":"Stopped","unknown":1}"#).unwrap();
        assert_eq!(e.name, "x");
        assert!(e.ssh_local_port.is_none());
    }
}
