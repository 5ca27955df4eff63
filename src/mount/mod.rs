//! The host's view of the VM's `~/workspace`: a forward sshfs mount (the
//! host mounts the VM; the VM never sees the host), detected, healed and
//! unmounted here.
//!
//! The VM is hostile, so the mount is set up so that what the agent writes
//! cannot act on the host: files appear owned by another user (host git then
//! refuses the repositories instead of obeying VM-written config and hooks),
//! symlinks are resolved inside the VM (a link to `~/.ssh` shows the VM's
//! file, never the host's), setuid bits, devices and execution are off, and
//! every answer of the VM's SFTP server passes agent-vm's relay
//! ([`sftp_relay`]), which keeps links, FIFOs and devices out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub mod sftp_relay;

use crate::ssh::Session;
use crate::workspace::WORKSPACE_ROOT;

/// The uid/gid files in the mount appear to belong to, unless the user opts
/// into seeing them as their own: any id but the host user's will do.
const FOREIGN_ID: u32 = 65534;

/// Set to 1 to see mounted files as your own (host git will then obey
/// VM-written `.git/config` and hooks in the mount).
pub const OWNED_BY_ME_ENV: &str = "AGENT_VM_MOUNT_OWNED_BY_ME";

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    NotMounted,
    Mounted,
    /// Ours, but not answering (VM stopped or restarted, network gone).
    Stale(String),
    /// Something else is mounted there: never touched.
    Foreign(String),
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::NotMounted => f.write_str("not mounted"),
            State::Mounted => f.write_str("mounted"),
            State::Stale(why) => write!(f, "stale ({why})"),
            State::Foreign(what) => write!(f, "occupied by another mount ({what})"),
        }
    }
}

pub struct Mount {
    pub point: PathBuf,
    /// `[<user>@]<host alias>:workspace`, what sshfs and the mount table
    /// call it.
    source: String,
}

/// Where the VM's workspaces appear on the host: `$AGENT_VM_MOUNT_DIR`, else
/// `~/.agent-vm-mounts/workspace` (`~/.agent-vm-mounts/<instance>/workspace`
/// for instances other than the default).
pub fn mount_point(instance: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("AGENT_VM_MOUNT_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = crate::home_dir()?.join(".agent-vm-mounts");
    Ok(if instance == "agent-vm" { base.join("workspace") } else { base.join(instance).join("workspace") })
}

impl Mount {
    /// The mount of the VM reached through SSH host alias `alias`, as
    /// `user` when it is not the alias's own (the agent user).
    pub fn new(point: PathBuf, alias: &str, user: Option<&str>) -> Mount {
        let user = user.map(|u| format!("{u}@")).unwrap_or_default();
        Mount { point, source: format!("{user}{alias}:{WORKSPACE_ROOT}") }
    }

    pub fn state(&self) -> Result<State> {
        let Some((fstype, source)) = mounted_at(&self.point)? else {
            return Ok(State::NotMounted);
        };
        if !is_ours(&fstype, &source, &self.source) {
            return Ok(State::Foreign(format!("{source}, {fstype}")));
        }
        // A dead sshfs answers with ENOTCONN, or not at all: ask in a thread.
        let point = self.point.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::read_dir(&point).map(|_| ()));
        });
        Ok(match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => State::Mounted,
            Ok(Err(e)) => State::Stale(e.to_string()),
            Err(_) => State::Stale("not answering".to_owned()),
        })
    }

    /// Mounts if needed, replacing a stale mount of ours. Returns whether it
    /// mounted anything.
    pub async fn ensure(&self, session: &Session, ui: &crate::Ui) -> Result<bool> {
        match self.state()? {
            State::Mounted => return Ok(false),
            State::Foreign(what) => bail!(
                "{} is already a mount point for something else ({what}); agent-vm will not touch it. \
                 Unmount it yourself or set AGENT_VM_MOUNT_DIR to another directory",
                self.point.display()
            ),
            State::Stale(why) => {
                ui.say(&format!("Remounting {} (the old mount is stale: {why}).", self.point.display()));
                self.unmount(true)?;
            }
            State::NotMounted => {}
        }
        std::fs::create_dir_all(&self.point).with_context(|| format!("cannot create {}", self.point.display()))?;
        if std::fs::read_dir(&self.point)?.next().is_some() {
            bail!(
                "{} is not empty and not mounted: agent-vm will not mount over files. Move them away, \
                 or set AGENT_VM_MOUNT_DIR to another directory",
                self.point.display()
            );
        }
        let contain = sshfs_contains_symlinks()?;
        let mkdir = crate::shell::quote(&["mkdir", "-p", WORKSPACE_ROOT])?;
        session.exec(&mkdir).await?.check("creating ~/workspace")?;
        let owned_by_me = std::env::var(OWNED_BY_ME_ENV).is_ok_and(|v| v == "1");
        if owned_by_me {
            ui.say(&format!(
                "warning: {OWNED_BY_ME_ENV}=1: files in {} appear as yours, so git on this machine will obey \
                 .git/config and hooks the agent writes there. Only do this if you trust the VM.",
                self.point.display()
            ));
        }
        let out = Command::new("sshfs")
            .arg("-F")
            .arg(&session.endpoint().config_file)
            .arg(&self.source)
            .arg(&self.point)
            .args(["-o", &options(owned_by_me, contain)])
            // Every answer of the VM's SFTP server goes through agent-vm's relay.
            .arg("-o")
            .arg(format!("ssh_command={}", sftp_relay::ssh_command()?))
            .stdin(Stdio::null())
            .output()
            .context("cannot run sshfs: install it (`agent-vm doctor` says how)")?;
        if !out.status.success() {
            bail!(
                "sshfs could not mount the VM's ~/workspace on {}: {}",
                self.point.display(),
                crate::printable(String::from_utf8_lossy(&out.stderr).trim())
            );
        }
        Ok(true)
    }

    /// Unmounts our mount (lazily: detach now, finish when no longer busy).
    /// Refuses to touch a mount that is not ours.
    pub fn unmount(&self, lazy: bool) -> Result<bool> {
        match self.state()? {
            State::NotMounted => return Ok(false),
            State::Foreign(what) => {
                bail!("{} is not agent-vm's mount ({what}); not unmounting it", self.point.display())
            }
            State::Mounted | State::Stale(_) => {}
        }
        let out =
            unmount_command(&self.point, lazy).stdin(Stdio::null()).output().context("cannot run the unmount tool")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if err.contains("busy") {
                bail!(
                    "{} is busy (a shell or editor has files open in it): close them, or run \
                     `agent-vm unmount --lazy` to detach it now and finish when they close",
                    self.point.display()
                );
            }
            bail!("cannot unmount {}: {err}", self.point.display());
        }
        Ok(true)
    }
}

/// Whether a mount of `fstype` from `source` is agent-vm's mount of
/// `ours`. On macOS, FUSE-T serves FUSE file systems over NFS: its sshfs
/// mounts show as `nfs`, the source prefixed with FUSE-T's own name.
fn is_ours(fstype: &str, source: &str, ours: &str) -> bool {
    if fstype.contains("sshfs") || fstype.contains("fuse") {
        return source == ours;
    }
    cfg!(target_os = "macos") && fstype == "nfs" && source.rsplit_once(['/', ' ']).map_or(source, |(_, s)| s) == ours
}

/// Whether this sshfs can itself refuse symlinks that point out of the
/// mount (`-o contain_symlinks`, sshfs 3.7.6 and distributions' fixes of
/// CVE-2026-47187). agent-vm's relay refuses them either way; the option is
/// a second guard where the installed sshfs has it.
pub fn sshfs_contains_symlinks() -> Result<bool> {
    let help = Command::new("sshfs").arg("-h").stdin(Stdio::null()).output();
    match help {
        Ok(o) => Ok(String::from_utf8_lossy(&o.stdout).contains("contain_symlinks")
            || String::from_utf8_lossy(&o.stderr).contains("contain_symlinks")),
        Err(e) => bail!("cannot run sshfs: {e}; install it (`agent-vm doctor` says how)"),
    }
}

/// sshfs options, chosen for safety first, then speed (see scripts/bench).
fn options(owned_by_me: bool, contain_symlinks: bool) -> String {
    let mut o = vec![
        // Survive VM restarts: ssh re-reads ssh.config (new port) on reconnect.
        "reconnect",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        // One plain connection per mount; never a shared ControlMaster.
        "ControlMaster=no",
        "ControlPath=none",
        // Resolve symlinks in the VM: a link can never lead to a host file
        // (and should a lying SFTP server answer with one anyway, the relay
        // refuses targets that leave the mount).
        "follow_symlinks",
        // Nothing in the mount runs or acts as a device on the host.
        "nosuid",
        "nodev",
        "noexec",
        // Speed, by measurement (scripts/bench): file data stays cached until
        // it changes; names and attributes for sshfs's default 20 s; one
        // connection (several lose on a small guest); AES-GCM first.
        "auto_cache",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    // The SSH layer's cipher preference (`\,`: a comma inside one option,
    // for FUSE's option parser).
    if contain_symlinks {
        o.push("contain_symlinks".to_owned());
    }
    o.push(format!("Ciphers={}", crate::ssh::CIPHERS.iter().map(|c| c.as_ref()).collect::<Vec<_>>().join(r"\,")));
    if cfg!(target_os = "macos") {
        // macOS checks permissions against the mapped uid itself; without
        // this, files owned by the foreign id are read-only to the user.
        o.push("defer_permissions".to_owned());
    }
    if owned_by_me {
        // Map the VM user to the host user: files look like the user's own.
        o.push("idmap=user".to_owned());
    } else {
        o.push(format!("uid={FOREIGN_ID}"));
        o.push(format!("gid={FOREIGN_ID}"));
    }
    o.join(",")
}

/// macOS has no lazy unmount: "lazy" is forced there, and files still open
/// in the mount fail from then on (`unmount --help` says so).
#[cfg(target_os = "macos")]
fn unmount_command(point: &Path, lazy: bool) -> Command {
    let mut c = Command::new("umount");
    if lazy {
        c.arg("-f");
    }
    c.arg(point);
    c
}

#[cfg(not(target_os = "macos"))]
fn unmount_command(point: &Path, lazy: bool) -> Command {
    let tool = if crate::vm::find_on_path("fusermount3").is_some() { "fusermount3" } else { "fusermount" };
    let mut c = Command::new(tool);
    c.arg(if lazy { "-uz" } else { "-u" }).arg(point);
    c
}

/// The filesystem type and source mounted exactly at `point`, if any.
#[cfg(not(target_os = "macos"))]
fn mounted_at(point: &Path) -> Result<Option<(String, String)>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&table, point))
}

#[cfg(target_os = "macos")]
fn mounted_at(point: &Path) -> Result<Option<(String, String)>> {
    let out = Command::new("mount").output().context("cannot run mount")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = point.to_string_lossy();
    // "<source> on <point> (<type>, …)"
    Ok(text.lines().rev().find_map(|line| {
        let (source, rest) = line.split_once(" on ")?;
        let (at, opts) = rest.rsplit_once(" (")?;
        (at == want).then(|| (opts.split(',').next().unwrap_or("").to_owned(), source.to_owned()))
    }))
}

/// The last (topmost) entry of a mountinfo table at `point`.
#[cfg(not(target_os = "macos"))]
fn parse_mountinfo(table: &str, point: &Path) -> Option<(String, String)> {
    let want = point.to_string_lossy();
    table.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape(fields.get(4)?) != want {
            return None;
        }
        Some((unescape(fields.get(sep + 1)?), unescape(fields.get(sep + 2)?)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
#[cfg(not(target_os = "macos"))]
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push(u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(target_os = "macos"))]
    const TABLE: &str = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
        90 27 0:50 / /home/u/.agent-vm-mounts/workspace rw,nosuid,nodev,noexec - fuse.sshfs lima-agent-vm:workspace rw,user_id=0\n\
        91 27 0:51 / /home/u/with\\040space rw - fuse.sshfs lima-x:workspace rw\n";

    #[test]
    #[cfg(not(target_os = "macos"))]
    fn finds_our_mount() {
        let got = parse_mountinfo(TABLE, Path::new("/home/u/.agent-vm-mounts/workspace"));
        assert_eq!(got, Some(("fuse.sshfs".to_owned(), "lima-agent-vm:workspace".to_owned())));
        assert_eq!(parse_mountinfo(TABLE, Path::new("/home/u/.agent-vm-mounts")), None);
    }

    #[test]
    #[cfg(not(target_os = "macos"))]
    fn decodes_escaped_paths() {
        let got = parse_mountinfo(TABLE, Path::new("/home/u/with space"));
        assert_eq!(got.map(|g| g.1), Some("lima-x:workspace".to_owned()));
    }

    #[test]
    fn only_our_source_is_ours() {
        assert!(is_ours("fuse.sshfs", "lima-agent-vm:workspace", "lima-agent-vm:workspace"));
        assert!(!is_ours("fuse.sshfs", "lima-other:workspace", "lima-agent-vm:workspace"));
        assert!(!is_ours("ext4", "lima-agent-vm:workspace", "lima-agent-vm:workspace"));
        // FUSE-T's NFS view counts on macOS only.
        let fuse_t = is_ours("nfs", "fuse-t:/lima-agent-vm:workspace", "lima-agent-vm:workspace");
        assert_eq!(fuse_t, cfg!(target_os = "macos"));
        assert!(!is_ours("nfs", "fuse-t:/lima-other:workspace", "lima-agent-vm:workspace"));
    }

    #[test]
    fn options_are_safe_by_default() {
        let o = options(false, true);
        for must in
            ["follow_symlinks", "contain_symlinks", "nosuid", "nodev", "noexec", "uid=65534", "gid=65534", "reconnect"]
        {
            assert!(o.split(',').any(|x| x == must), "{must} missing from {o}");
        }
        assert!(!options(true, true).contains("uid="));
        assert!(!options(false, false).contains("contain_symlinks"));
        // One FUSE option (escaped commas), OpenSSH's names, AES-GCM first.
        assert!(
            o.contains(r",Ciphers=aes128-gcm@openssh.com\,aes256-gcm@openssh.com\,chacha20-poly1305@openssh.com\,"),
            "{o}"
        );
    }
}
