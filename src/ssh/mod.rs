//! SSH to the VM, configured from the ssh.config file Lima writes for the
//! instance. A [`Session`] runs a command's channels on the connection the
//! VM user's commands share ([`mux`]), or on a russh connection of its own.

pub mod mux;

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, load_secret_key};
use russh::{ChannelMsg, Disconnect};
use ssh2_config::{ParseRule, SshConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Where and as whom to connect, as resolved from an ssh.config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// The Host alias in the config (`lima-<instance>` for Lima).
    pub alias: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub identity_files: Vec<PathBuf>,
    /// The file the endpoint was read from: system `ssh`/`sshfs` get it with `-F`.
    pub config_file: PathBuf,
    /// How the server's host key is checked.
    pub host_key: HostKeyPolicy,
    /// Where the connection commands share has its socket (the instance's
    /// state directory); without one, each command connects on its own.
    pub shared_dir: Option<PathBuf>,
}

impl Endpoint {
    /// An endpoint to test command lines and config entries with (nothing
    /// listens there).
    #[cfg(test)]
    pub(crate) fn for_tests(alias: &str, config_file: PathBuf) -> Endpoint {
        Endpoint {
            alias: alias.into(),
            host: "127.0.0.1".into(),
            port: 2222,
            user: "me".into(),
            identity_files: vec![config_file.with_file_name("key")],
            config_file,
            host_key: HostKeyPolicy::AcceptAny,
            shared_dir: None,
        }
    }
}

/// The most output agent-vm collects from one command in the VM (its own
/// scripts answer in kilobytes; a hostile VM could answer forever).
const MAX_OUTPUT: usize = 64 << 20;

/// A buffer that refuses to grow past its cap.
struct Capped(Vec<u8>, usize);

impl Capped {
    fn new(cap: usize) -> Capped {
        Capped(Vec::new(), cap)
    }
}

/// An in-memory sink for what the VM sends: `write` takes each buffer.
macro_rules! memory_sink {
    ($t:ty, $write:expr) => {
        impl tokio::io::AsyncWrite for $t {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::task::Poll::Ready($write(self.get_mut(), buf))
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
    };
}

memory_sink!(Capped, |this: &mut Capped, buf: &[u8]| {
    if this.0.len() + buf.len() > this.1 {
        let cap = this.1;
        return Err(std::io::Error::other(format!("the VM sent more than {cap} bytes of output for one command")));
    }
    this.0.extend_from_slice(buf);
    Ok(buf.len())
});

/// The last `cap` bytes written to it (at most twice that held): a VM that
/// writes without end costs no more memory than that.
pub struct Tail {
    data: Vec<u8>,
    cap: usize,
    cut: bool,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail { data: Vec::new(), cap, cut: false }
    }

    /// How many bytes it holds.
    pub fn held(&self) -> usize {
        self.data.len()
    }

    pub fn push(&mut self, buf: &[u8]) {
        self.data.extend_from_slice(buf);
        if self.data.len() > 2 * self.cap {
            let drop = self.data.len() - self.cap;
            self.data.drain(..drop);
            self.cut = true;
        }
    }

    /// The last `cap` bytes written, as text (untrusted: neutralise to show).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data[self.data.len().saturating_sub(self.cap)..]).into_owned()
    }

    /// The last `n` non-blank lines (untrusted text: neutralise to show).
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.data);
        let mut lines: Vec<&str> = text.split('\n').collect();
        if self.cut {
            lines.remove(0); // the kept bytes start mid-line
        }
        let lines: Vec<&str> = lines.into_iter().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
    }
}

memory_sink!(Tail, |this: &mut Tail, buf: &[u8]| {
    this.push(buf);
    Ok::<usize, std::io::Error>(buf.len())
});

/// Whether and against what the server's host key is checked, following the
/// config's `StrictHostKeyChecking` and `UserKnownHostsFile`.
#[derive(Debug, Clone, PartialEq)]
pub enum HostKeyPolicy {
    /// `StrictHostKeyChecking no` or `UserKnownHostsFile /dev/null` (Lima's
    /// loopback port forward: the guest could change its key at will, so
    /// pinning it would protect nothing).
    AcceptAny,
    /// The key must be recorded in this known_hosts file.
    KnownHosts(PathBuf),
}

/// What to assume for settings a config file leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defaults {
    /// Nothing: Lima always writes every setting, so a missing one means a
    /// broken file.
    None,
    /// OpenSSH's: port 22, the local user, ~/.ssh/id_* keys, the alias as
    /// the host name, ~/.ssh/known_hosts.
    OpenSsh,
}

impl Endpoint {
    /// Reads `alias` from an OpenSSH config file such as Lima's ssh.config.
    pub fn from_config_file(path: &Path, alias: &str, defaults: Defaults) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read the SSH config {}", path.display()))?;
        let config = SshConfig::default()
            .parse(&mut BufReader::new(file), ParseRule::ALLOW_UNKNOWN_FIELDS | ParseRule::ALLOW_UNSUPPORTED_FIELDS)
            .with_context(|| format!("malformed SSH config {}", path.display()))?;
        // Only a Host line naming the alias counts: the implicit `Host *`
        // matches anything and would hide a config for another instance.
        let named = |h: &ssh2_config::Host| h.pattern.iter().any(|c| c.pattern == alias && !c.negated);
        if !config.get_hosts().iter().any(named) {
            bail!("SSH config {} has no `Host {alias}` entry", path.display());
        }
        let params = config.query(alias);
        let missing = |what: &str| anyhow::anyhow!("SSH config {} sets no {what} for {alias}", path.display());
        let field = |name: &str| params.unsupported_fields.get(name).and_then(|v| v.first()).cloned();
        let known_hosts = field("userknownhostsfile");
        let strict = field("stricthostkeychecking").map(|v| v.to_ascii_lowercase());
        let host_key = if matches!(strict.as_deref(), Some("no" | "off")) || known_hosts.as_deref() == Some("/dev/null")
        {
            HostKeyPolicy::AcceptAny
        } else {
            HostKeyPolicy::KnownHosts(match known_hosts {
                Some(f) => expand_tilde(&f)?,
                None => crate::home_dir()?.join(".ssh/known_hosts"),
            })
        };
        let (host, port, user, identity_files) = match defaults {
            Defaults::None => (
                params.host_name.ok_or_else(|| missing("HostName"))?,
                params.port.ok_or_else(|| missing("Port"))?,
                params.user.ok_or_else(|| missing("User"))?,
                params.identity_file.filter(|f| !f.is_empty()).ok_or_else(|| missing("IdentityFile"))?,
            ),
            Defaults::OpenSsh => {
                let home = crate::home_dir()?;
                let default_keys = || ["id_ed25519", "id_ecdsa", "id_rsa"].map(|k| home.join(".ssh").join(k)).to_vec();
                (
                    params.host_name.unwrap_or_else(|| alias.to_owned()),
                    params.port.unwrap_or(22),
                    match params.user {
                        Some(u) => u,
                        None => whoami::username().map_err(|_| missing("User (and the local user has no name)"))?,
                    },
                    params.identity_file.filter(|f| !f.is_empty()).unwrap_or_else(default_keys),
                )
            }
        };
        Ok(Endpoint {
            alias: alias.to_owned(),
            host,
            port,
            user,
            identity_files,
            config_file: path.to_owned(),
            host_key,
            shared_dir: None,
        })
    }

    /// This endpoint, its commands sharing one connection with a socket in `dir`.
    pub fn shared_in(self, dir: PathBuf) -> Endpoint {
        Endpoint { shared_dir: Some(dir), ..self }
    }
}

fn expand_tilde(path: &str) -> Result<PathBuf> {
    Ok(match path.strip_prefix("~/") {
        Some(rest) => crate::home_dir()?.join(rest),
        None => PathBuf::from(path),
    })
}

/// The result of a command run to completion.
#[derive(Debug)]
pub struct Output {
    /// The remote exit status; 255 when the command died of a signal or the
    /// channel closed without a status (as OpenSSH reports it).
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Fails with the remote stderr unless the command succeeded.
    pub fn check(self, what: &str) -> Result<Self> {
        if self.status != 0 {
            bail!(
                "{what} failed in the VM (exit status {}): {}",
                self.status,
                crate::printable(String::from_utf8_lossy(&self.stderr).trim())
            );
        }
        Ok(self)
    }
}

struct Client {
    host: String,
    port: u16,
    policy: HostKeyPolicy,
    /// Why the host key was refused, for the error message.
    refusal: Arc<std::sync::Mutex<Option<String>>>,
    /// Where connections to a remote forward this session asked for go;
    /// without one, the server may open none.
    forwarded: Option<tokio::sync::mpsc::UnboundedSender<Forwarded>>,
}

/// A connection the VM made to a port this session forwards.
pub struct Forwarded {
    pub channel: russh::Channel<client::Msg>,
    /// The VM-side address and port it was made to.
    pub to: (String, u32),
}

impl client::Handler for Client {
    type Error = russh::Error;

    /// Only a session that asked for a remote forward takes such channels
    /// (dropping `reply` refuses): a VM cannot open them at will.
    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = &self.forwarded {
            reply.accept().await;
            let _ = tx.send(Forwarded { channel, to: (connected_address.to_owned(), connected_port) });
        }
        Ok(())
    }

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let HostKeyPolicy::KnownHosts(file) = &self.policy else {
            return Ok(true);
        };
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.refusal.lock().unwrap() =
                Some("it presented a certificate; agent-vm checks plain host keys only".into());
            return Ok(false);
        };
        let why = match russh::keys::known_hosts::check_known_hosts_path(&self.host, self.port, key, file) {
            Ok(true) => return Ok(true),
            Ok(false) => {
                format!("its host key is not in {}: connect once with `ssh` to check and record it", file.display())
            }
            Err(russh::keys::Error::KeyChanged { line }) => format!(
                "ITS HOST KEY CHANGED (it differs from {} line {line}): someone may be impersonating it. \
                 If the change is expected, remove that line",
                file.display()
            ),
            Err(e) => format!("cannot check its host key against {}: {e}", file.display()),
        };
        *self.refusal.lock().unwrap() = Some(why);
        Ok(false)
    }
}

/// How long a command waits for the VM's SSH server before giving up: a
/// busy VM (a dozen commands connecting at once to a small guest) can take
/// tens of seconds to finish every handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The TCP stream under a handshake, noting when the server first sends
/// anything: a server that answers is alive, however slow its key exchange.
struct Answered<S> {
    inner: S,
    flag: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Answered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.flag.store(true, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Answered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct Session {
    link: Link,
    endpoint: Endpoint,
}

enum Link {
    /// A russh connection of the session's own.
    Direct(Handle<Client>),
    /// The VM user's shared connection, at its master's socket; and a
    /// connection of the session's own once the server opens no more
    /// sessions on the shared one.
    Shared { path: PathBuf, own: tokio::sync::OnceCell<Handle<Client>> },
}

/// `AGENT_VM_SHARED_SSH=0`: every command makes a connection of its own.
fn sharing_wanted() -> bool {
    std::env::var_os("AGENT_VM_SHARED_SSH").is_none_or(|v| v != "0")
}

/// AES-GCM first: fastest with AES instructions, and measured faster than
/// ChaCha20 even in an emulated guest without them (`scripts/bench`). The
/// sshfs mount offers the same list.
pub(crate) const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];

impl Session {
    /// A session to `endpoint`: on the connection its commands share
    /// (started when none runs), or else on a connection of its own,
    /// authenticated with the endpoint's identity files. The VM's SSH server
    /// must start answering within `answer_within`; once it has, a slow
    /// handshake (a busy guest) may take up to [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &Endpoint, answer_within: Duration) -> Result<Session> {
        if sharing_wanted() && mux::control_path(endpoint).is_some() {
            match mux::ensure(endpoint, answer_within).await {
                Ok(path) => {
                    return Ok(Session {
                        link: Link::Shared { path, own: tokio::sync::OnceCell::new() },
                        endpoint: endpoint.clone(),
                    });
                }
                Err(e) => tracing::debug!("no shared SSH connection, connecting on our own: {e:#}"),
            }
        }
        Ok(Session { link: Link::Direct(handshake(endpoint, answer_within, None).await?), endpoint: endpoint.clone() })
    }

    /// A session on the endpoint's shared connection if its master answers
    /// now; nothing is started or dialled otherwise (for a question worth
    /// asking only of a VM already in use).
    pub async fn attach(endpoint: &Endpoint) -> Option<Session> {
        if !sharing_wanted() {
            return None;
        }
        let path = mux::live(endpoint).await?;
        Some(Session { link: Link::Shared { path, own: tokio::sync::OnceCell::new() }, endpoint: endpoint.clone() })
    }

    /// A session on a connection of its own that forwards VM ports to this
    /// side ([`Session::forward_from_vm`]): their connections arrive on the
    /// returned receiver.
    pub async fn connect_forwarding(
        endpoint: &Endpoint,
        answer_within: Duration,
    ) -> Result<(Session, tokio::sync::mpsc::UnboundedReceiver<Forwarded>)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let handle = handshake(endpoint, answer_within, Some(tx)).await?;
        Ok((Session { link: Link::Direct(handle), endpoint: endpoint.clone() }, rx))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The shared connection's socket, for `ssh -o ControlPath=…` to run
    /// a terminal session on it.
    pub fn control_path(&self) -> Option<&Path> {
        match &self.link {
            Link::Shared { path, .. } => Some(path),
            Link::Direct(_) => None,
        }
    }

    /// Asks the VM's sshd to listen on `address:port` in the VM and pass
    /// each connection back over this session (a remote forward: the VM
    /// never connects to the host).
    pub async fn forward_from_vm(&self, address: &str, port: u16) -> Result<()> {
        let Link::Direct(handle) = &self.link else {
            bail!("a remote forward needs a connection of its own");
        };
        handle.tcpip_forward(address, u32::from(port)).await.with_context(|| {
            format!("the VM's SSH server would not listen on {address}:{port} (is something else there?)")
        })?;
        Ok(())
    }

    /// Whether a connection of the session's own has ended.
    pub fn is_closed(&self) -> bool {
        match &self.link {
            Link::Direct(handle) => handle.is_closed(),
            Link::Shared { .. } => false,
        }
    }

    /// Starts `command` (built with [`crate::shell`]): its output to read,
    /// its input to write.
    pub async fn open_exec(&self, command: &str) -> Result<(Reader, Writer)> {
        self.open_exec_env(command, &[]).await
    }

    /// Like [`Session::open_exec`], with environment variables passed in the
    /// SSH session (the VM's sshd must `AcceptEnv` them): values never
    /// appear on a command line or in logs.
    pub async fn open_exec_env(&self, command: &str, env: &[(String, String)]) -> Result<(Reader, Writer)> {
        tracing::debug!(command, env = ?env.iter().map(|(k, _)| k).collect::<Vec<_>>(), "exec");
        let (path, own) = match &self.link {
            Link::Direct(handle) => return open_channel(handle, command, env).await,
            Link::Shared { path, own } => (path, own),
        };
        if let Some(handle) = own.get() {
            return open_channel(handle, command, env).await;
        }
        let opened = match mux::open(path, command, env).await {
            Err(e) if mux::is_refused(&e) => {
                tracing::debug!("{e:#}; opening a connection of our own");
                let handle = own.get_or_try_init(|| handshake(&self.endpoint, CONNECT_TIMEOUT, None)).await?;
                return open_channel(handle, command, env).await;
            }
            // The master went (the VM restarted, provisioning ended it):
            // once more on a new one.
            Err(e) => {
                tracing::debug!("{e:#}; starting the shared connection again");
                mux::ensure(&self.endpoint, CONNECT_TIMEOUT).await?;
                mux::open(path, command, env).await?
            }
            Ok(p) => p,
        };
        let mux::Process { stdin, stdout, stderr, exit, control } = opened;
        Ok((
            Reader(ReadSide::Shared {
                stdout: Some(stdout),
                stderr: Some(stderr),
                exit: Some(exit),
                control,
                buf: vec![0; 32 << 10].into_boxed_slice(),
            }),
            Writer(WriteSide::Shared(tokio::sync::Mutex::new(Some(stdin)))),
        ))
    }

    /// Runs `command` with no input and collects its output.
    pub async fn exec(&self, command: &str) -> Result<Output> {
        self.exec_with_input(command, &[][..]).await
    }

    /// Runs `command` with `input` as its stdin and collects its output.
    pub async fn exec_with_input(&self, command: &str, input: &[u8]) -> Result<Output> {
        let mut stdout = Capped::new(MAX_OUTPUT);
        let mut stderr = Capped::new(MAX_OUTPUT);
        let status = self.exec_io(command, std::io::Cursor::new(input.to_vec()), &mut stdout, &mut stderr).await?;
        Ok(Output { status, stdout: stdout.0, stderr: stderr.0 })
    }

    /// Runs `command`, streaming `stdin` to it and its output to `stdout` and
    /// `stderr` as it comes. Returns the exit status (255 for a signal).
    pub async fn exec_io<R, W, E>(&self, command: &str, stdin: R, stdout: &mut W, stderr: &mut E) -> Result<u32>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.exec_io_env(command, &[], stdin, stdout, stderr).await
    }

    /// [`Session::exec_io`] with session environment variables.
    pub async fn exec_io_env<R, W, E>(
        &self,
        command: &str,
        env: &[(String, String)],
        stdin: R,
        stdout: &mut W,
        stderr: &mut E,
    ) -> Result<u32>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let (read, write) = self.open_exec_env(command, env).await?;
        relay(read, write, stdin, stdout, stderr).await
    }

    /// Writes `data` to `path` in the VM (relative to the home directory)
    /// with `mode`, atomically: a reader never sees a half-written file.
    pub async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let script = r#"umask 077; tmp="$1.agent-vm-tmp.$$"; cat > "$tmp" && chmod "$2" "$tmp" && mv -f "$tmp" "$1""#;
        let mode = format!("{mode:o}");
        let command = crate::shell::script(script, &[path, mode.as_str()])?;
        self.exec_with_input(&command, data).await?.check(&format!("writing {path}"))?;
        Ok(())
    }

    /// Ends a connection of the session's own (a shared one stays up).
    pub async fn close(self) {
        let own = match self.link {
            Link::Direct(handle) => Some(handle),
            Link::Shared { own, .. } => own.into_inner(),
        };
        if let Some(handle) = own {
            let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
        }
    }
}

/// Streams `stdin` to a started command and its output to `stdout` and
/// `stderr` as it comes, until it ends. Returns its exit status (255 for a
/// signal, or when none came).
pub async fn relay<R, W, E>(mut read: Reader, write: Writer, stdin: R, stdout: &mut W, stderr: &mut E) -> Result<u32>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    // Input is pumped by its own task so a command that produces output
    // before reading all its input cannot deadlock us.
    let pump = tokio::spawn(async move {
        let result = write.data(stdin).await;
        let _ = write.eof().await;
        result
    });
    let mut status = None;
    while let Some(event) = read.next().await {
        match event {
            Event::Stdout(data) => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            Event::Stderr(data) => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            Event::Exit(code) => status = Some(code),
        }
    }
    pump.abort();
    Ok(status.unwrap_or(255))
}

/// What a command in the VM sends.
#[derive(Debug)]
pub enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Its exit status (255 when a signal killed it).
    Exit(u32),
}

/// The output side of a command started with [`Session::open_exec`].
pub struct Reader(ReadSide);

enum ReadSide {
    Channel(russh::ChannelReadHalf),
    Shared {
        stdout: Option<tokio::net::UnixStream>,
        stderr: Option<tokio::net::UnixStream>,
        exit: Option<tokio::sync::oneshot::Receiver<u32>>,
        /// Holds the session open on the master: ended with the reader.
        control: tokio::task::JoinHandle<()>,
        buf: Box<[u8]>,
    },
}

impl Reader {
    /// The next thing the command sent; `None` once it has ended and all
    /// its output is read.
    pub async fn next(&mut self) -> Option<Event> {
        use tokio::io::AsyncReadExt;
        match &mut self.0 {
            ReadSide::Channel(read) => loop {
                match read.wait().await? {
                    ChannelMsg::Data { data } => return Some(Event::Stdout(data.to_vec())),
                    ChannelMsg::ExtendedData { data, ext: 1 } => return Some(Event::Stderr(data.to_vec())),
                    ChannelMsg::ExitStatus { exit_status } => return Some(Event::Exit(exit_status)),
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        tracing::debug!(?signal_name, "remote command killed by signal");
                        return Some(Event::Exit(255));
                    }
                    _ => {}
                }
            },
            ReadSide::Shared { stdout, stderr, exit, buf, .. } => loop {
                if stdout.is_none() && stderr.is_none() && exit.is_none() {
                    return None;
                }
                let half = buf.len() / 2;
                let (out_buf, err_buf) = buf.split_at_mut(half);
                tokio::select! {
                    n = async { stdout.as_mut().expect("guarded").read(out_buf).await }, if stdout.is_some() => match n {
                        Ok(n) if n > 0 => return Some(Event::Stdout(out_buf[..n].to_vec())),
                        _ => *stdout = None,
                    },
                    n = async { stderr.as_mut().expect("guarded").read(err_buf).await }, if stderr.is_some() => match n {
                        Ok(n) if n > 0 => return Some(Event::Stderr(err_buf[..n].to_vec())),
                        _ => *stderr = None,
                    },
                    code = async { exit.as_mut().expect("guarded").await }, if exit.is_some() => {
                        *exit = None;
                        if let Ok(code) = code {
                            return Some(Event::Exit(code));
                        }
                    }
                }
            },
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let ReadSide::Shared { control, .. } = &self.0 {
            control.abort();
        }
    }
}

/// The input side of a command started with [`Session::open_exec`].
pub struct Writer(WriteSide);

enum WriteSide {
    Channel(russh::ChannelWriteHalf<client::Msg>),
    Shared(tokio::sync::Mutex<Option<tokio::net::UnixStream>>),
}

impl Writer {
    /// Sends all of `input` to the command's stdin.
    pub async fn data<R: AsyncRead + Unpin>(&self, mut input: R) -> Result<()> {
        match &self.0 {
            WriteSide::Channel(write) => write.data(input).await?,
            WriteSide::Shared(stdin) => {
                let mut stdin = stdin.lock().await;
                let stdin = stdin.as_mut().ok_or_else(|| anyhow!("the command's input is closed"))?;
                tokio::io::copy(&mut input, stdin).await?;
            }
        }
        Ok(())
    }

    /// Ends the command's stdin.
    pub async fn eof(&self) -> Result<()> {
        match &self.0 {
            WriteSide::Channel(write) => write.eof().await?,
            WriteSide::Shared(stdin) => {
                if let Some(mut stdin) = stdin.lock().await.take() {
                    stdin.shutdown().await?;
                }
            }
        }
        Ok(())
    }
}

async fn open_channel(handle: &Handle<Client>, command: &str, env: &[(String, String)]) -> Result<(Reader, Writer)> {
    let channel = handle.channel_open_session().await.context("cannot open an SSH channel to the VM")?;
    for (name, value) in env {
        channel.set_env(false, name.as_str(), value.as_str()).await?;
    }
    channel.exec(true, command).await.context("the VM refused to run a command")?;
    let (read, write) = channel.split();
    Ok((Reader(ReadSide::Channel(read)), Writer(WriteSide::Channel(write))))
}

/// Connects and authenticates a russh connection of a command's own.
async fn handshake(
    endpoint: &Endpoint,
    answer_within: Duration,
    forwarded: Option<tokio::sync::mpsc::UnboundedSender<Forwarded>>,
) -> Result<Handle<Client>> {
    let keys = load_keys(endpoint)?;
    let config = Arc::new(client::Config {
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        preferred: russh::Preferred { cipher: std::borrow::Cow::Borrowed(CIPHERS), ..Default::default() },
        ..Default::default()
    });
    let refusal = Arc::new(std::sync::Mutex::new(None));
    let answered = Arc::new(AtomicBool::new(false));
    let started = tokio::time::Instant::now();
    let quick = started + answer_within;
    let full = started + CONNECT_TIMEOUT.max(answer_within);
    let timed_out = || {
        anyhow!(
            "timed out after {} s connecting to the VM at {}:{}; check `agent-vm status`",
            started.elapsed().as_secs(),
            endpoint.host,
            endpoint.port
        )
    };
    let mut attempt = 0u32;
    let mut handle = loop {
        attempt += 1;
        let client = Client {
            host: endpoint.host.clone(),
            port: endpoint.port,
            policy: endpoint.host_key.clone(),
            refusal: refusal.clone(),
            forwarded: forwarded.clone(),
        };
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
            tcp.set_nodelay(true).ok();
            client::connect_stream(config.clone(), Answered { inner: tcp, flag: answered.clone() }, client).await
        };
        tokio::pin!(handshake);
        let outcome = match tokio::time::timeout_at(quick, &mut handshake).await {
            Ok(outcome) => outcome,
            // The server is alive and working on it: give it the full time.
            Err(_) if answered.load(Ordering::Relaxed) => {
                tokio::time::timeout_at(full, &mut handshake).await.map_err(|_| timed_out())?
            }
            Err(_) => return Err(timed_out()),
        };
        let reset = matches!(&outcome, Err(russh::Error::IO(e)) if e.kind() == std::io::ErrorKind::ConnectionReset);
        match outcome {
            // Lima's forwarder took the connection but sshd was not
            // listening (reloading its settings, still starting): shortly.
            Err(_) if reset && attempt < 8 => {
                tracing::debug!(attempt, "the connection to the SSH server was reset; retrying");
                let pause = tokio::time::Instant::now() + Duration::from_millis(250 * u64::from(attempt));
                if pause >= quick {
                    bail!(
                        "the VM's SSH server at {}:{} kept resetting the connection (still starting?); \
                         check `agent-vm status`",
                        endpoint.host,
                        endpoint.port
                    );
                }
                tokio::time::sleep_until(pause).await;
            }
            Err(russh::Error::IO(e)) => bail!(
                "cannot reach the VM's SSH server at {}:{} ({e}): the VM is not running. Start it with `agent-vm start`",
                endpoint.host,
                endpoint.port
            ),
            // sshd drops handshakes beyond MaxStartups when many
            // commands connect at once: try again shortly.
            Err(russh::Error::Disconnect) if attempt < 8 && refusal.lock().unwrap().is_none() => {
                tracing::debug!(attempt, "the SSH server dropped the handshake; retrying");
                let pause = tokio::time::Instant::now() + Duration::from_millis(250 * u64::from(attempt));
                let limit = if answered.load(Ordering::Relaxed) { full } else { quick };
                if pause >= limit {
                    return Err(timed_out());
                }
                tokio::time::sleep_until(pause).await;
            }
            Err(e) => {
                if let Some(why) = refusal.lock().unwrap().take() {
                    bail!("refusing to connect to {}:{}: {why}", endpoint.host, endpoint.port);
                }
                return Err(e).with_context(|| {
                    format!("SSH handshake with the VM at {}:{} failed", endpoint.host, endpoint.port)
                });
            }
            Ok(h) => break h,
        }
    };
    for (path, key) in keys {
        let hash = handle.best_supported_rsa_hash().await?.flatten();
        let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
        if handle.authenticate_publickey(&endpoint.user, key).await?.success() {
            tracing::debug!(key = %path.display(), user = %endpoint.user, "authenticated");
            return Ok(handle);
        }
    }
    bail!(
        "authentication failed: the VM did not accept key {} for user {}",
        endpoint.identity_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        endpoint.user
    )
}

fn load_keys(endpoint: &Endpoint) -> Result<Vec<(PathBuf, russh::keys::PrivateKey)>> {
    let mut keys = Vec::new();
    for path in &endpoint.identity_files {
        if !path.exists() {
            continue;
        }
        let key = load_secret_key(path, None).with_context(|| {
            format!("cannot load SSH key {} (IdentityFile in {})", path.display(), endpoint.config_file.display())
        })?;
        keys.push((path.clone(), key));
    }
    if keys.is_empty() {
        bail!(
            "SSH key {} is missing (IdentityFile in {}). Lima creates it with the first instance; \
             if it was deleted, recreate the VM (`agent-vm destroy`, then `agent-vm start`)",
            endpoint.identity_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            endpoint.config_file.display()
        );
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn collected_output_is_capped() {
        use tokio::io::AsyncWriteExt;
        let mut out = Capped::new(10);
        out.write_all(b"0123456789").await.unwrap();
        let err = out.write_all(b"x").await.unwrap_err().to_string();
        assert!(err.contains("more than 10 bytes"), "{err}");
        assert_eq!(out.0, b"0123456789");
    }

    use super::*;

    const LIMA_CONFIG: &str = r#"# This SSH config file can be passed to 'ssh -F'.
Host lima-agent-vm
  IdentityFile "/home/u/.lima/_config/user"
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  NoHostAuthenticationForLocalhost yes
  PreferredAuthentications publickey
  Compression no
  BatchMode yes
  IdentitiesOnly yes
  Ciphers "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
  User alice
  ControlMaster auto
  ControlPath "/home/u/.lima/agent-vm/ssh.sock"
  ControlPersist yes
  Hostname 127.0.0.1
  Port 60022
"#;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_lima_ssh_config() {
        let f = write(LIMA_CONFIG);
        let ep = Endpoint::from_config_file(f.path(), "lima-agent-vm", Defaults::None).unwrap();
        assert_eq!(ep.host, "127.0.0.1");
        assert_eq!(ep.port, 60022);
        assert_eq!(ep.user, "alice");
        assert_eq!(ep.identity_files, vec![PathBuf::from("/home/u/.lima/_config/user")]);
    }

    #[test]
    fn wrong_alias_is_an_error() {
        let f = write(LIMA_CONFIG);
        let err = Endpoint::from_config_file(f.path(), "lima-other", Defaults::None).unwrap_err();
        assert!(format!("{err:#}").contains("no `Host lima-other` entry"), "{err:#}");
    }

    #[test]
    fn missing_port_is_an_error() {
        let f = write(&LIMA_CONFIG.replace("  Port 60022\n", ""));
        let err = Endpoint::from_config_file(f.path(), "lima-agent-vm", Defaults::None).unwrap_err();
        assert!(format!("{err:#}").contains("sets no Port"), "{err:#}");
    }

    #[test]
    fn garbage_port_is_an_error() {
        let f = write(&LIMA_CONFIG.replace("Port 60022", "Port sixty"));
        assert!(Endpoint::from_config_file(f.path(), "lima-agent-vm", Defaults::None).is_err());
    }

    #[test]
    fn lima_config_accepts_any_host_key() {
        let f = write(LIMA_CONFIG);
        let ep = Endpoint::from_config_file(f.path(), "lima-agent-vm", Defaults::None).unwrap();
        assert_eq!(ep.host_key, HostKeyPolicy::AcceptAny);
    }

    #[test]
    fn user_config_gets_openssh_defaults_and_checks_host_keys() {
        let f = write("Host box\n  HostName 10.0.0.7\n\nHost other\n  Port 2222\n  UserKnownHostsFile /tmp/kh\n");
        let ep = Endpoint::from_config_file(f.path(), "box", Defaults::OpenSsh).unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("10.0.0.7", 22));
        assert!(ep.identity_files.iter().any(|k| k.ends_with(".ssh/id_ed25519")));
        assert_eq!(ep.host_key, HostKeyPolicy::KnownHosts(crate::home_dir().unwrap().join(".ssh/known_hosts")));
        let ep = Endpoint::from_config_file(f.path(), "other", Defaults::OpenSsh).unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("other", 2222));
        assert_eq!(ep.host_key, HostKeyPolicy::KnownHosts(PathBuf::from("/tmp/kh")));
        // Lima's strictness: a user config lacking settings is an error there.
        assert!(Endpoint::from_config_file(f.path(), "box", Defaults::None).is_err());
    }

    /// An endpoint on loopback `port` with a fresh key, for handshake tests.
    fn loopback(port: u16, dir: &Path) -> Endpoint {
        let key = dir.join("id");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(made.success());
        Endpoint {
            alias: "t".into(),
            host: "127.0.0.1".into(),
            port,
            user: "u".into(),
            identity_files: vec![key],
            config_file: dir.join("ssh.config"),
            host_key: HostKeyPolicy::AcceptAny,
            shared_dir: None,
        }
    }

    /// A listener whose connections get `greeting` and are then held open, silent.
    async fn stalling_server(greeting: &'static [u8]) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                socket.write_all(greeting).await.ok();
                held.push(socket);
            }
        });
        port
    }

    #[tokio::test]
    async fn a_silent_server_is_given_up_on_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let ep = loopback(stalling_server(b"").await, dir.path());
        let started = std::time::Instant::now();
        let err = Session::connect(&ep, Duration::from_secs(1)).await.err().expect("connected to a silent server");
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_server_that_answered_gets_the_full_handshake_time() {
        let dir = tempfile::tempdir().unwrap();
        let ep = loopback(stalling_server(b"SSH-2.0-OpenSSH_10.0\r\n").await, dir.path());
        // Still waiting well after `answer_within`: the server is alive, only slow.
        let waited = tokio::time::timeout(Duration::from_secs(4), Session::connect(&ep, Duration::from_secs(1))).await;
        if let Ok(result) = waited {
            panic!("gave up on a server that answered: {:?}", result.err());
        }
    }
}
