//! The SFTP relay between sshfs and the VM: sshfs runs `agent-vm
//! sftp-relay <ssh arguments>` instead of `ssh` (its `ssh_command`), and the
//! relay runs ssh, passing requests through and checking every answer.
//!
//! The agent can replace the VM's SFTP server, so answers are the VM's
//! words. The relay enforces on the host, whatever sshfs build is installed:
//! - no FIFO, socket or device node reaches the host kernel (a FIFO there
//!   is a local pipe: opening it blocks the host reader for ever); such
//!   files are left out of listings and answer "no such file";
//! - no symlink target leaves the mount (absolute, or with a `..`), even
//!   if the server answers STAT with a link;
//! - no listed name holds a `/` or a NUL, or is empty;
//! - no answer is larger than sshfs itself accepts;
//! - no answer reaches sshfs that does not belong to a request in flight
//!   (sshfs files a request before it sends it: an answer sent ahead of the
//!   request would otherwise skip the checks).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

/// The subcommand sshfs runs.
pub const SUBCOMMAND: &str = "sftp-relay";

/// sshfs refuses answers longer than this (its MAX_REPLY_LEN).
const MAX_PACKET: usize = 1 << 17;

const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_READDIR: u8 = 12;
const FXP_READLINK: u8 = 19;
const FXP_STATUS: u8 = 101;
const FXP_NAME: u8 = 104;
const FXP_ATTRS: u8 = 105;

const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;
const ATTR_ACMODTIME: u32 = 0x8;
const ATTR_EXTENDED: u32 = 0x8000_0000;

const FX_NO_SUCH_FILE: u32 = 2;
const FX_PERMISSION_DENIED: u32 = 3;
const FX_BAD_MESSAGE: u32 = 5;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// The ssh_command sshfs is given: this program, then the subcommand.
/// sshfs splits it at spaces, so a path holding one cannot be passed.
pub fn ssh_command() -> Result<String> {
    let exe = std::env::current_exe().context("cannot find agent-vm's own path for sshfs")?;
    let exe = exe.to_str().context("agent-vm's path is not UTF-8: sshfs cannot run it")?;
    // Linux names a replaced binary (an upgrade while this runs) so; the
    // path itself holds the new one.
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
    if exe.chars().any(|c| c.is_whitespace() || c == ',') {
        bail!(
            "agent-vm is installed at a path with a space or comma ({exe}), which sshfs cannot pass as its ssh command: \
             install it elsewhere (for example ~/.cargo/bin), or use `connect --no-mount`"
        );
    }
    Ok(format!("{exe} {SUBCOMMAND}"))
}

/// Runs ssh with `args` (what sshfs passes), relaying stdin to it and its
/// checked answers to stdout. Returns ssh's exit status.
pub fn run(args: &[OsString]) -> Result<ExitCode> {
    let mut child = Command::new("ssh")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run ssh")?;
    let mut to_ssh = child.stdin.take().context("ssh stdin")?;
    let mut from_ssh = child.stdout.take().context("ssh stdout")?;
    let pending = Pending::default();
    let requests = pending.clone();
    // Requests pass unchanged; their types are remembered for the answers.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        while let Ok(Some(packet)) = read_packet(&mut stdin, usize::MAX) {
            requests.record(&packet);
            if to_ssh.write_all(&packet).is_err() {
                break;
            }
        }
        // Dropping to_ssh ends ssh's input: it exits, and so do we.
    });
    let mut stdout = std::io::stdout().lock();
    let result = relay_answers(&mut from_ssh, &mut stdout, &pending);
    let _ = child.kill();
    let status = child.wait().context("waiting for ssh")?;
    if let Err(e) = result {
        eprintln!("agent-vm sftp-relay: {}", crate::printable(&format!("{e:#}")));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8))
}

fn relay_answers(from: &mut impl Read, to: &mut impl Write, pending: &Pending) -> Result<()> {
    while let Some(packet) = read_packet(from, MAX_PACKET).context("reading the VM's SFTP answer")? {
        if let Some(answer) = check_answer(&packet, pending) {
            to.write_all(&answer)?;
            to.flush()?;
        }
    }
    Ok(())
}

/// Request ids in flight, with the request's type: a NAME answer means a
/// listing, a link target or a resolved path depending on what was asked.
#[derive(Clone, Default)]
struct Pending(Arc<Mutex<InFlight>>);

#[derive(Default)]
struct InFlight {
    requests: HashMap<u32, u8>,
    /// Whether the server's one VERSION answer has passed.
    versioned: bool,
}

impl Pending {
    fn record(&self, packet: &[u8]) {
        if let (Some(&kind), Some(id)) = (packet.get(4), be32(packet, 5))
            && kind != FXP_INIT
        {
            self.0.lock().unwrap().requests.insert(id, kind);
        }
    }

    fn take(&self, id: u32) -> Option<u8> {
        self.0.lock().unwrap().requests.remove(&id)
    }

    /// True the first time only.
    fn first_version(&self) -> bool {
        !std::mem::replace(&mut self.0.lock().unwrap().versioned, true)
    }
}

/// One whole packet (length prefix included), or None at a clean EOF.
fn read_packet(from: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match from.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > max {
        bail!("an SFTP packet of {n} bytes (at most {max} are accepted)");
    }
    let mut packet = Vec::with_capacity(4 + n);
    packet.extend_from_slice(&len);
    packet.resize(4 + n, 0);
    from.read_exact(&mut packet[4..])?;
    Ok(Some(packet))
}

/// The answer sshfs gets for `packet`: the packet itself, a filtered copy,
/// a status in its place, or nothing (an answer to no request in flight).
fn check_answer(packet: &[u8], pending: &Pending) -> Option<Vec<u8>> {
    let kind = packet[4];
    if kind == FXP_VERSION {
        return pending.first_version().then(|| packet.to_vec());
    }
    let id = be32(packet, 5)?;
    let asked = pending.take(id)?;
    let body = &packet[9..];
    Some(match kind {
        FXP_ATTRS => match Attrs::parse(body) {
            Some((attrs, _)) if attrs.hidden() => status(id, FX_NO_SUCH_FILE, "not a regular file, directory or link"),
            Some(_) => packet.to_vec(),
            None => status(id, FX_BAD_MESSAGE, "malformed attributes"),
        },
        FXP_NAME => match (asked, names(body)) {
            (_, None) => status(id, FX_BAD_MESSAGE, "malformed name list"),
            (FXP_READLINK, Some(list)) => match list.as_slice() {
                [one] if contained(one.name) => packet.to_vec(),
                [_] => status(id, FX_PERMISSION_DENIED, "symlink target outside the mount"),
                _ => status(id, FX_BAD_MESSAGE, "readlink answered with several names"),
            },
            (FXP_READDIR, Some(list)) => {
                let kept: Vec<&Name> = list.iter().filter(|n| listable(n)).collect();
                if kept.len() == list.len() { packet.to_vec() } else { name_packet(id, &kept) }
            }
            // REALPATH and extensions: absolute paths of the VM, as asked.
            (_, Some(_)) => packet.to_vec(),
        },
        _ => packet.to_vec(),
    })
}

fn listable(n: &Name) -> bool {
    !n.name.is_empty() && !n.name.contains(&b'/') && !n.name.contains(&0) && !n.attrs.hidden()
}

/// A link target that stays inside the directory tree it is in: relative,
/// without `..`, and without a NUL (sshfs would cut the text there).
fn contained(target: &[u8]) -> bool {
    !target.is_empty() && target[0] != b'/' && !target.contains(&0) && !target.split(|&b| b == b'/').any(|c| c == b"..")
}

struct Attrs {
    mode: Option<u32>,
}

impl Attrs {
    /// The attributes at the start of `b`, and their length.
    fn parse(b: &[u8]) -> Option<(Attrs, usize)> {
        let flags = be32(b, 0)?;
        let mut at = 4;
        if flags & ATTR_SIZE != 0 {
            at += 8;
        }
        if flags & ATTR_UIDGID != 0 {
            at += 8;
        }
        let mut mode = None;
        if flags & ATTR_PERMISSIONS != 0 {
            mode = Some(be32(b, at)?);
            at += 4;
        }
        if flags & ATTR_ACMODTIME != 0 {
            at += 8;
        }
        if flags & ATTR_EXTENDED != 0 {
            let count = be32(b, at)?;
            at += 4;
            for _ in 0..count.saturating_mul(2) {
                at += 4 + be32(b, at)? as usize;
            }
        }
        (at <= b.len()).then_some((Attrs { mode }, at))
    }

    /// FIFOs, sockets, devices (and types no server should send). Without
    /// a mode, sshfs takes a regular file.
    fn hidden(&self) -> bool {
        self.mode.is_some_and(|m| !matches!(m & S_IFMT, S_IFREG | S_IFDIR | S_IFLNK))
    }
}

struct Name<'a> {
    /// The whole entry as sent: name, long name, attributes.
    raw: &'a [u8],
    name: &'a [u8],
    attrs: Attrs,
}

fn names(body: &[u8]) -> Option<Vec<Name<'_>>> {
    let count = be32(body, 0)?;
    let mut at = 4;
    let mut list = Vec::new();
    for _ in 0..count {
        let start = at;
        let name = string(body, &mut at)?;
        string(body, &mut at)?;
        let (attrs, n) = Attrs::parse(body.get(at..)?)?;
        at += n;
        list.push(Name { raw: &body[start..at], name, attrs });
    }
    (at == body.len()).then_some(list)
}

fn string<'a>(b: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let n = be32(b, *at)? as usize;
    let s = b.get(*at + 4..(*at + 4).checked_add(n)?)?;
    *at += 4 + n;
    Some(s)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn frame(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(9 + body.len());
    p.extend_from_slice(&((5 + body.len()) as u32).to_be_bytes());
    p.push(kind);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(body);
    p
}

fn status(id: u32, code: u32, message: &str) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    for s in [message.as_bytes(), b"en"] {
        body.extend_from_slice(&(s.len() as u32).to_be_bytes());
        body.extend_from_slice(s);
    }
    frame(FXP_STATUS, id, &body)
}

fn name_packet(id: u32, list: &[&Name]) -> Vec<u8> {
    let mut body = (list.len() as u32).to_be_bytes().to_vec();
    for n in list {
        body.extend_from_slice(n.raw);
    }
    frame(FXP_NAME, id, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sftp_string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    /// Attributes as OpenSSH's sftp-server sends them (size, ids, mode,
    /// times), with one extension pair.
    fn attrs(mode: u32) -> Vec<u8> {
        let mut v =
            (ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED).to_be_bytes().to_vec();
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&[0, 0, 3, 232, 0, 0, 3, 232]);
        v.extend_from_slice(&mode.to_be_bytes());
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend(sftp_string(b"ext@example"));
        v.extend(sftp_string(b"data"));
        v
    }

    fn entry(name: &[u8], mode: u32) -> Vec<u8> {
        let mut v = sftp_string(name);
        v.extend(sftp_string(b"-rw-r--r-- 1 u u 7 Jan 1 00:00 x"));
        v.extend(attrs(mode));
        v
    }

    fn name_answer(id: u32, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut body = (entries.len() as u32).to_be_bytes().to_vec();
        for e in entries {
            body.extend_from_slice(e);
        }
        frame(FXP_NAME, id, &body)
    }

    fn asked(kind: u8, id: u32) -> Pending {
        let p = Pending::default();
        p.record(&frame(kind, id, b"path"));
        p
    }

    fn status_code(packet: &Option<Vec<u8>>) -> Option<u32> {
        let packet = packet.as_ref().expect("an answer");
        (packet[4] == FXP_STATUS).then(|| be32(packet, 9).unwrap())
    }

    fn listed(packet: &Option<Vec<u8>>) -> Vec<String> {
        let packet = packet.as_ref().expect("an answer");
        assert_eq!(packet[4], FXP_NAME);
        names(&packet[9..]).unwrap().iter().map(|n| String::from_utf8_lossy(n.name).into_owned()).collect()
    }

    const FIFO: u32 = 0o010644;
    const CHR: u32 = 0o020644;
    const BLK: u32 = 0o060644;
    const SOCK: u32 = 0o140755;

    #[test]
    fn special_files_are_left_out_of_listings() {
        let answer = name_answer(
            9,
            &[
                entry(b".", S_IFDIR | 0o755),
                entry(b"file", S_IFREG | 0o644),
                entry(b"fifo", FIFO),
                entry(b"link", S_IFLNK | 0o777),
                entry(b"tty", CHR),
                entry(b"disk", BLK),
                entry(b"sock", SOCK),
                entry(b"dir", S_IFDIR | 0o755),
            ],
        );
        let got = check_answer(&answer, &asked(FXP_READDIR, 9));
        assert_eq!(listed(&got), [".", "file", "link", "dir"]);
        // Untouched listings pass as they are.
        let plain = name_answer(10, &[entry(b"file", S_IFREG | 0o644)]);
        assert_eq!(check_answer(&plain, &asked(FXP_READDIR, 10)), Some(plain));
    }

    #[test]
    fn names_that_are_not_names_are_left_out() {
        let answer = name_answer(
            3,
            &[entry(b"ok", S_IFREG), entry(b"../../etc/passwd", S_IFREG), entry(b"", S_IFREG), entry(b"a\0b", S_IFREG)],
        );
        assert_eq!(listed(&check_answer(&answer, &asked(FXP_READDIR, 3))), ["ok"]);
    }

    #[test]
    fn stat_of_a_special_file_is_no_such_file() {
        for mode in [FIFO, CHR, BLK, SOCK, 0o070000] {
            let answer = frame(FXP_ATTRS, 4, &attrs(mode));
            assert_eq!(status_code(&check_answer(&answer, &asked(7, 4))), Some(FX_NO_SUCH_FILE), "{mode:o}");
        }
        for mode in [S_IFREG | 0o644, S_IFDIR | 0o755, S_IFLNK | 0o777] {
            let answer = frame(FXP_ATTRS, 4, &attrs(mode));
            assert_eq!(check_answer(&answer, &asked(17, 4)), Some(answer), "{mode:o}");
        }
        // No mode at all: sshfs takes a regular file.
        let answer = frame(FXP_ATTRS, 5, &0u32.to_be_bytes());
        assert_eq!(check_answer(&answer, &asked(8, 5)), Some(answer));
    }

    #[test]
    fn link_targets_stay_in_the_mount() {
        for bad in [&b"/home/user/.ssh/id_ed25519"[..], b"../../../etc", b"a/../../b", b"..", b"", b"..\0x", b"a\0/b"] {
            let answer = name_answer(6, &[entry(bad, S_IFREG)]);
            assert_eq!(
                status_code(&check_answer(&answer, &asked(FXP_READLINK, 6))),
                Some(FX_PERMISSION_DENIED),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [&b"README"[..], b"sub/dir/file", b"..x/y", b"./a"] {
            let answer = name_answer(6, &[entry(good, S_IFREG)]);
            assert_eq!(check_answer(&answer, &asked(FXP_READLINK, 6)), Some(answer));
        }
        let two = name_answer(6, &[entry(b"a", S_IFREG), entry(b"b", S_IFREG)]);
        assert_eq!(status_code(&check_answer(&two, &asked(FXP_READLINK, 6))), Some(FX_BAD_MESSAGE));
        // A resolved path (REALPATH) is absolute by nature, and passes.
        let real = name_answer(8, &[entry(b"/home/u.linux/workspace", S_IFDIR)]);
        assert_eq!(check_answer(&real, &asked(16, 8)), Some(real));
    }

    #[test]
    fn malformed_answers_become_errors() {
        let mut short = name_answer(2, &[entry(b"file", S_IFREG)]);
        short.truncate(short.len() - 3);
        let len = (short.len() - 4) as u32;
        short[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(status_code(&check_answer(&short, &asked(FXP_READDIR, 2))), Some(FX_BAD_MESSAGE));
        let huge_ext = {
            let mut a = ATTR_EXTENDED.to_be_bytes().to_vec();
            a.extend_from_slice(&u32::MAX.to_be_bytes());
            frame(FXP_ATTRS, 1, &a)
        };
        assert_eq!(status_code(&check_answer(&huge_ext, &asked(7, 1))), Some(FX_BAD_MESSAGE));
    }

    #[test]
    fn answers_to_no_request_in_flight_never_reach_sshfs() {
        // Sent ahead of the request it pretends to answer (sshfs files a
        // request before sending it), or twice, or never asked for.
        let forged = name_answer(11, &[entry(b"fifo", FIFO)]);
        assert_eq!(check_answer(&forged, &Pending::default()), None);
        let pending = asked(FXP_READDIR, 11);
        assert_eq!(listed(&check_answer(&forged, &pending)), Vec::<String>::new());
        assert_eq!(check_answer(&forged, &pending), None, "a second answer to one request");
        // One VERSION, at the start.
        let version = [0, 0, 0, 5, FXP_VERSION, 0, 0, 0, 3].to_vec();
        let p = Pending::default();
        assert_eq!(check_answer(&version, &p), Some(version.clone()));
        assert_eq!(check_answer(&version, &p), None);
        // Too short to carry an id.
        assert_eq!(check_answer(&[0, 0, 0, 2, FXP_ATTRS, 0], &asked(7, 0)), None);
    }

    #[test]
    fn packets_are_framed_and_bounded() {
        let a = frame(FXP_ATTRS, 1, &attrs(S_IFREG));
        let b = frame(FXP_ATTRS, 2, &attrs(FIFO));
        let mut stream = [a.clone(), b].concat();
        stream.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut out = Vec::new();
        let pending = asked(7, 1);
        pending.record(&frame(7, 2, b"p"));
        let err = relay_answers(&mut stream.as_slice(), &mut out, &pending).unwrap_err();
        assert!(format!("{err:#}").contains("at most"), "{err:#}");
        assert_eq!(&out[..a.len()], &a[..]);
        assert_eq!(status_code(&Some(out[a.len()..].to_vec())), Some(FX_NO_SUCH_FILE));
    }
}
