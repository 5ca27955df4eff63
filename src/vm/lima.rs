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
    #[serde(default)]
    errors: Vec<String>,
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
        let home = lima_home()?;
        check_socket_path(&home, instance)?;
        if is_root() {
            bail!(
                "agent-vm is running as root, and limactl refuses to run as root: run agent-vm as your own user \
                 (the VM's user gets your login name and uid)"
            );
        }
        Ok(Lima { limactl, home, instance: instance.to_owned(), verbose })
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
                // Lima relays guest output in some lines: never raw escapes.
                eprintln!("  {}", crate::printable(&lima_message(&line)));
            }
            tail.push(line);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
        let status = child.wait()?;
        let _ = out_thread.join();
        if !status.success() {
            let said: Vec<String> = tail.iter().map(|l| crate::printable(&lima_message(l))).collect();
            bail!("{what} failed: limactl {} exited with {status}:\n  {}", args.join(" "), said.join("\n  "));
        }
        Ok(())
    }
}

impl Lima {
    /// `limactl start`, which can fail while the VM keeps running: when a
    /// requirement (SSH, the guest agent, the boot scripts) times out, Lima
    /// calls the VM "degraded" and exits 1, and when `--timeout` expires it
    /// gives up waiting but leaves the VM up. Say which it is and what to do.
    fn run_start(&self, args: &[String], what: &str, creating: bool) -> Result<()> {
        let Err(err) = self.run(args, what) else { return Ok(()) };
        let running = matches!(self.inspect(), Ok(Some(i)) if i.state == State::Running);
        if !running {
            return Err(err);
        }
        let log = self.dir().join("ha.stderr.log");
        let next = if creating {
            "agent-vm did not provision it. Look at the log, then either `agent-vm provision` (to use it as it is) \
             or `agent-vm destroy` and `agent-vm start` (to create it again)"
        } else {
            "Look at the log, then `agent-vm stop` and `agent-vm start` to boot it again"
        };
        Err(err.context(format!(
            "VM '{}' is running, but Lima did not finish starting it (degraded or timed out), so agent-vm does not \
             use it: Lima's log is {}. {next}",
            self.instance,
            log.display()
        )))
    }
}

/// Lima logs logfmt lines (`time=… level=info msg="…" key=value…`): show
/// the message, then any fields after it (an `error=` says what failed).
fn lima_message(line: &str) -> String {
    let Some(i) = line.find("msg=") else { return line.to_owned() };
    let (msg, rest) = logfmt_value(&line[i + 4..]);
    let fields = rest.trim();
    if fields.is_empty() { msg } else { format!("{msg} ({fields})") }
}

/// One logfmt value (quoted with `\"` escapes, or bare up to a space) and
/// what follows it.
fn logfmt_value(s: &str) -> (String, &str) {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s.find(' ').unwrap_or(s.len());
        return (s[..end].to_owned(), &s[end..]);
    };
    let mut out = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, &quoted[i + 1..]),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push(' '),
                Some((_, c)) => out.push(c),
                None => break,
            },
            c => out.push(c),
        }
    }
    (out, "")
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
                "Broken" => State::Broken,
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
                errors: entry.errors,
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
        self.run_start(&args, &format!("creating VM '{}'", self.instance), true)
    }

    fn start(&self) -> Result<()> {
        let args = vec!["start".to_owned(), "--timeout=30m".to_owned(), self.instance.clone()];
        self.run_start(&args, &format!("starting VM '{}'", self.instance), false)
    }

    fn stop(&self, force: bool) -> Result<()> {
        let mut args = vec!["stop".to_owned()];
        if force {
            args.push("--force".to_owned());
        }
        args.push(self.instance.clone());
        self.run(&args, &format!("stopping VM '{}'", self.instance))
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
            .map(|e| e.shared_in(self.state_dir()))
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

/// The longest Unix socket path the OS takes (`sun_path`, with its NUL).
const SOCKET_PATH_MAX: usize = if cfg!(target_os = "macos") { 104 } else { 108 };

/// Lima keeps sockets in the instance directory (`ssh.sock`, and a
/// temporary `ssh.sock.<16 digits>` while OpenSSH sets the master up), and
/// refuses to create an instance whose longest one would not fit; check it
/// first, with a message that says what to shorten.
fn check_socket_path(home: &Path, instance: &str) -> Result<()> {
    let longest = home.join(instance).join("ssh.sock.1234567890123456");
    let len = longest.as_os_str().len();
    if len >= SOCKET_PATH_MAX {
        bail!(
            "instance name {instance:?} is too long for LIMA_HOME {}: Lima's SSH socket would be {} (a {len}-byte path), \
             and this OS takes Unix socket paths under {SOCKET_PATH_MAX} bytes. Choose a shorter --instance name or a \
             shorter LIMA_HOME",
            home.display(),
            home.join(instance).join("ssh.sock").display()
        );
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
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
    fn names_follow_lima() {
        use super::super::validate_name;
        for good in ["agent-vm", "a", "A.b_c-9", &"x".repeat(76)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(77);
        for bad in ["", "-x", "x-", "a--b", "a._b", "a/b", "a b", "../x", "a;b", "ü", "t.yaml", "t.yml", &long] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_name(&long).unwrap_err().to_string().contains("at most 76"));
    }

    #[test]
    fn socket_paths_must_fit() {
        let home = Path::new("/home/someone/.lima");
        assert!(check_socket_path(home, "agent-vm").is_ok());
        let deep = PathBuf::from(format!("/{}", "d".repeat(60)));
        let err = check_socket_path(&deep, "agent-vm-with-a-name").unwrap_err().to_string();
        assert!(err.contains("shorter") && err.contains("ssh.sock"), "{err}");
    }

    #[test]
    fn lima_messages_are_extracted() {
        assert_eq!(
            lima_message(r#"time="2024-01-01T00:00:00Z" level=info msg="Waiting for \"ssh\"""#),
            r#"Waiting for "ssh""#
        );
        assert_eq!(lima_message("plain"), "plain");
        // Fields after the message, quoted ones included, stay apart from it.
        assert_eq!(
            lima_message(
                r#"time="t" level=info msg="Attempting to download the image" arch=x86_64 digest= location="/a b""#
            ),
            r#"Attempting to download the image (arch=x86_64 digest= location="/a b")"#
        );
        assert_eq!(
            lima_message(r#"level=fatal msg="failed: \"x\" is bad" error="exit status 1""#),
            r#"failed: "x" is bad (error="exit status 1")"#
        );
    }

    #[test]
    fn list_entry_tolerates_missing_fields() {
        let e: ListEntry = serde_json::from_str(r#"{"name":"x","status":"Stopped","unknown":1}"#).unwrap();
        assert_eq!(e.name, "x");
        assert!(e.ssh_local_port.is_none());
    }
}
