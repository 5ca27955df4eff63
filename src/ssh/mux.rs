//! One SSH connection per VM user, shared by every agent-vm command: an
//! OpenSSH master (`ssh -M -N`) kept in the background while the VM runs,
//! and sessions opened on it with OpenSSH's multiplexing protocol
//! (PROTOCOL.mux, passenger mode: the command's stdin, stdout and stderr are
//! handed to the master as file descriptors). A command then costs a channel
//! instead of a handshake, which takes seconds on a slow guest. OpenSSH
//! windows each channel by what its descriptor takes, so a command whose
//! output nobody reads stalls no other command on the connection.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::Endpoint;

const MUX_MSG_HELLO: u32 = 0x0000_0001;
const MUX_C_NEW_SESSION: u32 = 0x1000_0002;
const MUX_C_ALIVE_CHECK: u32 = 0x1000_0004;
const MUX_C_TERMINATE: u32 = 0x1000_0005;
const MUX_S_OK: u32 = 0x8000_0001;
const MUX_S_PERMISSION_DENIED: u32 = 0x8000_0002;
const MUX_S_FAILURE: u32 = 0x8000_0003;
const MUX_S_EXIT_MESSAGE: u32 = 0x8000_0004;
const MUX_S_ALIVE: u32 = 0x8000_0005;
const MUX_S_SESSION_OPENED: u32 = 0x8000_0006;
const MUX_S_TTY_ALLOC_FAIL: u32 = 0x8000_0008;
const PROTOCOL_VERSION: u32 = 4;

/// The longest message taken from a master (its replies are a few words).
const MAX_PACKET: usize = 256 << 10;
/// Unix socket paths are short (104 bytes on macOS), and OpenSSH first binds
/// the path with a 17-character suffix before renaming it into place.
const MAX_CONTROL_PATH: usize = 104 - 18;
/// How long a master may take to answer over its socket.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the master for `endpoint` listens, when it has a place: a socket
/// per user, port and key (a VM restarted on another port gets a master of
/// its own, the old one ending with its connection; a replaced or deleted
/// key is not bypassed by a connection made with the old one).
pub fn control_path(endpoint: &Endpoint) -> Option<PathBuf> {
    use sha1::Digest;
    let dir = endpoint.shared_dir.as_ref()?;
    let mut keys = sha1::Sha1::new();
    let mut any = false;
    for file in &endpoint.identity_files {
        if let Ok(bytes) = std::fs::read(file) {
            keys.update(&bytes);
            any = true;
        }
    }
    // No key: the caller's own connection says what is missing.
    if !any {
        return None;
    }
    let key = keys.finalize();
    let path = dir.join(format!(
        "ssh-{}-{}-{:02x}{:02x}{:02x}{:02x}",
        endpoint.port, endpoint.user, key[0], key[1], key[2], key[3]
    ));
    // OpenSSH expands `%` in the path and splits an option's value at blanks.
    let plain = path.to_str().is_some_and(|p| !p.contains(|c: char| c == '%' || c == '"' || c.is_whitespace()));
    (plain && path.as_os_str().len() <= MAX_CONTROL_PATH).then_some(path)
}

/// A master's socket, as [`control_path`] names it (not its lock, nor
/// the temporary name OpenSSH binds first).
fn is_control_name(name: &str) -> bool {
    let hash = name.rsplit('-').next().unwrap_or("");
    name.starts_with("ssh-") && hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<socket>.<suffix>`: the socket's name may hold a dot (a user name can).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// Whether a session failed because the server would open no more channels
/// on the shared connection (sshd's `MaxSessions`): a connection of the
/// command's own does then.
pub fn is_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.to_string().contains("refused by peer"))
}

/// The master for `endpoint` if one answers now; none is started.
pub async fn live(endpoint: &Endpoint) -> Option<PathBuf> {
    let path = control_path(endpoint)?;
    alive(&path).await.ok().map(|_| path)
}

/// The master for `endpoint`, started if none answers. Fails when OpenSSH
/// cannot connect within `answer_within` (the caller then connects itself,
/// with its own error messages).
pub async fn ensure(endpoint: &Endpoint, answer_within: Duration) -> Result<PathBuf> {
    let path = control_path(endpoint).ok_or_else(|| anyhow!("no place for a shared connection's socket"))?;
    if alive(&path).await.is_ok() {
        return Ok(path);
    }
    // One command starts the master; the others wait and use it. Two would
    // fight over the socket, and the loser would stay behind as a plain
    // background connection.
    let lock = lock(&path).await?;
    if alive(&path).await.is_ok() {
        return Ok(path);
    }
    let started = start(endpoint, &path, answer_within).await;
    drop(lock);
    started.map(|()| path)
}

/// The lock held while a master at `path` starts or is ended.
async fn lock(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let lock_path = beside(path, "lock");
    tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        if let Some(dir) = lock_path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path)?;
        file.lock()?;
        Ok(file)
    })
    .await?
}

/// Whether `path` is a socket nobody listens on (left by a master that
/// died). A master that is merely slow to answer keeps its socket.
fn is_dead_socket(path: &Path) -> bool {
    matches!(std::os::unix::net::UnixStream::connect(path), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

async fn start(endpoint: &Endpoint, path: &Path, answer_within: Duration) -> Result<()> {
    // A socket left by a master that died: OpenSSH would refuse to listen
    // there and carry on unshared. A live one that did not answer in time
    // is left alone; this command connects on its own.
    if is_dead_socket(path) {
        let _ = std::fs::remove_file(path);
    } else if path.exists() {
        bail!("the shared SSH connection at {} does not answer", path.display());
    }
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-F").arg(&endpoint.config_file);
    cmd.args(["-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no"]);
    cmd.arg("-o").arg(format!("ControlPath={}", path.display()));
    // Nothing of this machine is forwarded, whatever a user config says for
    // `Host *`. The variables sessions pass are chosen by agent-vm (and
    // filtered by the VM's AcceptEnv); the master forwards those it is given.
    cmd.args(["-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes"]);
    cmd.args(["-o", "PermitLocalCommand=no", "-o", "BatchMode=yes", "-o", "SendEnv=*"]);
    cmd.args(["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]);
    // Only the endpoint's key files, as agent-vm's own connections: no
    // agent's keys or defaults offered to the VM, so a key replaced on disk
    // is not bypassed by another one that happens to be accepted. The VM
    // does not rewrite known_hosts, and no debug log spells out the
    // variables sent (API keys among them).
    cmd.args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "UpdateHostKeys=no"]);
    cmd.args(["-o", "LogLevel=ERROR"]);
    for file in &endpoint.identity_files {
        cmd.arg("-i").arg(file);
    }
    cmd.arg("-o").arg(format!("ConnectTimeout={}", answer_within.as_secs().max(1)));
    cmd.arg("-l").arg(&endpoint.user).arg(&endpoint.alias);
    // What ssh says goes to a pipe read while this command lives, keeping
    // only the last few lines: the VM can make the master print (banners,
    // refused forwarding) without end, so no file collects it. Once this
    // command exits the writes fail, and ssh ignores SIGPIPE.
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    // A session of its own: the master outlives this command and its terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot run ssh")?;
    let said = Said::drain(child.stderr.take());
    let deadline = tokio::time::Instant::now() + super::CONNECT_TIMEOUT.max(answer_within);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("ssh exited ({status}): {}", crate::printable_lines(said.text().trim()));
        }
        if alive(path).await.is_ok() {
            tracing::debug!(path = %path.display(), pid = child.id(), "shared SSH connection up");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ssh did not connect within {} s", deadline.elapsed().as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The end of what a master printed, read from its stderr in a thread.
struct Said {
    kept: std::sync::Arc<std::sync::Mutex<super::Tail>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Said {
    const KEEP: usize = 4096;

    fn drain(from: Option<std::process::ChildStderr>) -> Said {
        use std::io::Read;
        let kept = std::sync::Arc::new(std::sync::Mutex::new(super::Tail::new(Self::KEEP)));
        let reader = from.map(|mut from| {
            let keep = kept.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    keep.lock().unwrap().push(&buf[..n]);
                }
            })
        });
        Said { kept, reader }
    }

    /// What it said, once ssh has exited (the pipe then ends).
    fn text(&self) -> String {
        for _ in 0..50 {
            if self.reader.as_ref().is_none_or(|r| r.is_finished()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kept.lock().unwrap().text()
    }
}

/// Ends every master under `dir` (after provisioning, whose sshd settings
/// apply to connections made afterwards only; and before the VM stops).
pub async fn terminate_all(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let sockets = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_control_name));
    for path in sockets {
        // Not while a command is starting this master: it would be left
        // running with its socket gone.
        let Ok(_lock) = lock(&path).await else { continue };
        match request(&path, MUX_C_TERMINATE).await {
            Ok(reply) if reply.kind == MUX_S_OK => {
                tracing::debug!(path = %path.display(), "shared SSH connection ended")
            }
            Ok(reply) => tracing::debug!(path = %path.display(), kind = reply.kind, "unexpected answer to terminate"),
            Err(e) => tracing::debug!(path = %path.display(), "no shared SSH connection to end: {e:#}"),
        }
        // The master removes its socket as it exits; one that died left it.
        if is_dead_socket(&path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The master's pid, if one answers at `path`.
async fn alive(path: &Path) -> Result<u32> {
    let mut reply = request(path, MUX_C_ALIVE_CHECK).await?;
    match reply.kind {
        MUX_S_ALIVE => reply.u32(),
        other => bail!("unexpected answer {other:#x} to an alive check"),
    }
}

/// One request and its answer on a fresh control connection.
async fn request(path: &Path, kind: u32) -> Result<Packet> {
    tokio::time::timeout(LOCAL_TIMEOUT, async {
        let mut sock = hello(path).await?;
        let mut m = Vec::new();
        put_u32(&mut m, kind);
        put_u32(&mut m, 1);
        write_packet(&mut sock, &m).await?;
        let mut reply = read_packet(&mut sock).await?;
        if reply.u32()? != 1 {
            bail!("an answer to another request");
        }
        if matches!(reply.kind, MUX_S_PERMISSION_DENIED | MUX_S_FAILURE) {
            bail!("{}", crate::printable(&reply.string()?));
        }
        Ok(reply)
    })
    .await
    .map_err(|_| anyhow!("the shared SSH connection did not answer"))?
}

/// A control connection past the protocol greeting.
async fn hello(path: &Path) -> Result<UnixStream> {
    let mut sock = UnixStream::connect(path).await?;
    let mut m = Vec::new();
    put_u32(&mut m, MUX_MSG_HELLO);
    put_u32(&mut m, PROTOCOL_VERSION);
    write_packet(&mut sock, &m).await?;
    let mut theirs = read_packet(&mut sock).await?;
    if theirs.kind != MUX_MSG_HELLO || theirs.u32()? != PROTOCOL_VERSION {
        bail!("the master speaks another multiplexing protocol");
    }
    Ok(sock)
}

/// A command running on the shared connection: its stdin to write, its
/// stdout and stderr to read, and the control connection that brings its
/// exit status (and ends the session when dropped).
pub struct Process {
    pub stdin: UnixStream,
    pub stdout: UnixStream,
    pub stderr: UnixStream,
    pub exit: tokio::sync::oneshot::Receiver<u32>,
    pub control: tokio::task::JoinHandle<()>,
}

/// Runs `command` on the master at `path`, with `env` as the session's
/// environment.
pub async fn open(path: &Path, command: &str, env: &[(String, String)]) -> Result<Process> {
    let (mut sock, session) = tokio::time::timeout(LOCAL_TIMEOUT + super::CONNECT_TIMEOUT, async {
        let mut sock = hello(path).await?;
        let mut m = Vec::new();
        put_u32(&mut m, MUX_C_NEW_SESSION);
        put_u32(&mut m, 1);
        put_string(&mut m, b""); // reserved
        for flag in [0, 0, 0, 0] {
            put_u32(&mut m, flag); // tty, X11, agent, subsystem
        }
        put_u32(&mut m, 0xffff_ffff); // no escape character
        put_string(&mut m, b""); // terminal type
        put_string(&mut m, command.as_bytes());
        for (name, value) in env {
            put_string(&mut m, format!("{name}={value}").as_bytes());
        }
        write_packet(&mut sock, &m).await?;
        let (stdin, theirs_in) = std::os::unix::net::UnixStream::pair()?;
        let (stdout, theirs_out) = std::os::unix::net::UnixStream::pair()?;
        let (stderr, theirs_err) = std::os::unix::net::UnixStream::pair()?;
        // The master's ends: our copies close once sent, so their EOF is the
        // master's.
        for fd in [theirs_in, theirs_out, theirs_err] {
            send_fd(&sock, &fd).await?;
        }
        let mut reply = read_packet(&mut sock).await?;
        if reply.u32()? != 1 {
            bail!("an answer to another request");
        }
        match reply.kind {
            MUX_S_SESSION_OPENED => {}
            MUX_S_PERMISSION_DENIED | MUX_S_FAILURE => {
                bail!("the shared SSH connection opened no session: {}", crate::printable(&reply.string()?))
            }
            other => bail!("unexpected answer {other:#x} to a session request"),
        }
        let sid = reply.u32()?;
        let wrap = |s: std::os::unix::net::UnixStream| -> Result<UnixStream> {
            s.set_nonblocking(true)?;
            Ok(UnixStream::from_std(s)?)
        };
        Ok::<_, anyhow::Error>((sock, (sid, wrap(stdin)?, wrap(stdout)?, wrap(stderr)?)))
    })
    .await
    .map_err(|_| anyhow!("the shared SSH connection did not open a session"))??;
    let (sid, stdin, stdout, stderr) = session;
    let (tx, exit) = tokio::sync::oneshot::channel();
    let control = tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Ok(mut m) = read_packet(&mut sock).await {
            match m.kind {
                MUX_S_EXIT_MESSAGE => {
                    if m.u32().ok() != Some(sid) {
                        break;
                    }
                    if let (Some(tx), Ok(status)) = (tx.take(), m.u32()) {
                        let _ = tx.send(status);
                    }
                }
                MUX_S_TTY_ALLOC_FAIL => {}
                _ => break,
            }
        }
    });
    Ok(Process { stdin, stdout, stderr, exit, control })
}

/// Sends `fd` as OpenSSH's mm_send_fd does: one byte carrying one descriptor.
async fn send_fd(sock: &UnixStream, fd: &impl AsRawFd) -> Result<()> {
    let fd = fd.as_raw_fd();
    loop {
        sock.writable().await?;
        match sock.try_io(tokio::io::Interest::WRITABLE, || {
            let mut byte = [0u8; 1];
            let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
            let mut control = vec![0u8; space];
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
            }
            match unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) } {
                1 => Ok(()),
                -1 => Err(std::io::Error::last_os_error()),
                _ => Err(std::io::Error::other("short write of a file descriptor")),
            }
        }) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("cannot hand a file descriptor to the shared SSH connection"),
        }
    }
}

struct Packet {
    kind: u32,
    body: Vec<u8>,
    at: usize,
}

impl Packet {
    fn u32(&mut self) -> Result<u32> {
        let bytes = self.body.get(self.at..self.at + 4).ok_or_else(|| anyhow!("a short message"))?;
        self.at += 4;
        Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u32()? as usize;
        let bytes = self.body.get(self.at..self.at + len).ok_or_else(|| anyhow!("a short message"))?;
        self.at += len;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

fn put_u32(m: &mut Vec<u8>, v: u32) {
    m.extend_from_slice(&v.to_be_bytes());
}

fn put_string(m: &mut Vec<u8>, s: &[u8]) {
    put_u32(m, s.len() as u32);
    m.extend_from_slice(s);
}

async fn write_packet(sock: &mut UnixStream, body: &[u8]) -> Result<()> {
    let mut m = Vec::with_capacity(body.len() + 4);
    put_string(&mut m, body);
    sock.write_all(&m).await?;
    Ok(())
}

async fn read_packet(sock: &mut UnixStream) -> Result<Packet> {
    let len = sock.read_u32().await? as usize;
    if !(4..=MAX_PACKET).contains(&len) {
        bail!("a message of {len} bytes from the shared SSH connection");
    }
    let mut body = vec![0; len];
    sock.read_exact(&mut body).await?;
    let mut packet = Packet { kind: 0, body, at: 0 };
    packet.kind = packet.u32()?;
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_port_and_key_has_a_socket_of_its_own_and_only_sockets_are_ended() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "one").unwrap();
        let mut ep = Endpoint::for_tests("vm", dir.path().join("ssh.config")).shared_in(dir.path().to_owned());
        ep.identity_files = vec![key.clone()];
        ep.user = "john.doe".into();
        let path = control_path(&ep).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with("ssh-2222-john.doe-") && is_control_name(&name), "{name}");
        for other in [beside(&path, "lock"), beside(&path, "log"), beside(&path, "a1B2c3D4e5F6g7H8")] {
            assert!(!is_control_name(other.file_name().unwrap().to_str().unwrap()), "{}", other.display());
        }
        ep.port = 2223;
        assert_ne!(control_path(&ep).unwrap(), path);
        ep.port = 2222;
        std::fs::write(&key, "two").unwrap();
        assert_ne!(control_path(&ep).unwrap(), path, "a replaced key shares the old key's connection");
        std::fs::remove_file(&key).unwrap();
        assert_eq!(control_path(&ep), None, "no key, no shared connection");
    }
}
