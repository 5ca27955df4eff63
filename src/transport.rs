//! git2 over russh: a libgit2 smart subtransport whose streams are SSH exec
//! channels running `git-upload-pack` / `git-receive-pack` in the VM. No
//! host `git` or `ssh` process takes part.
//!
//! A remote URL `agent-vm://<id>/<path>` names a registered [`Session`] and
//! a repository path relative to the VM user's home.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use crate::ssh::Event;
use anyhow::{Result, bail};
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use git2::{Error, ErrorClass, ErrorCode};
use tokio::sync::mpsc as tmpsc;

use crate::shell;
use crate::ssh::Session;

const SCHEME: &str = "agent-vm";

struct Registered {
    session: Arc<Session>,
    /// What the remote git process wrote on stderr, for error messages.
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Commands run before the git program, by the number in their URL.
    steps: Arc<Mutex<Vec<String>>>,
}

static REGISTRY: Mutex<Option<HashMap<u64, Registered>>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A session made available to git2 for the lifetime of this value.
pub struct Remote {
    id: u64,
    stderr: Arc<Mutex<Vec<u8>>>,
    steps: Arc<Mutex<Vec<String>>>,
}

impl Remote {
    /// Registers `session`; URLs from [`Remote::url`] reach the VM through it.
    pub fn new(session: Arc<Session>) -> Result<Remote> {
        register_scheme()?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let steps = Arc::new(Mutex::new(Vec::new()));
        REGISTRY
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(id, Registered { session, stderr: stderr.clone(), steps: steps.clone() });
        Ok(Remote { id, stderr, steps })
    }

    /// The URL of the repository at `path` (relative to the VM home). Paths
    /// are ones agent-vm derives, never raw user input.
    pub fn url(&self, path: &str) -> String {
        self.url_keyed(&self.id.to_string(), path)
    }

    fn url_keyed(&self, key: &str, path: &str) -> String {
        debug_assert!(path.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c)), "{path}");
        format!("{SCHEME}://{key}/{path}")
    }

    /// [`Remote::url`], with `step` (a command line built with
    /// [`crate::shell`]) run first in the same connection: its stdout joins
    /// the remote stderr ([`Remote::take_stderr`]), and the git program runs
    /// only if it succeeds. One connection instead of two on a slow VM.
    pub fn url_with_step(&self, path: &str, step: String) -> String {
        let mut steps = self.steps.lock().unwrap();
        steps.push(step);
        self.url_keyed(&format!("{}.{}", self.id, steps.len() - 1), path)
    }

    /// What the remote git wrote on stderr so far (taken, not copied).
    pub fn take_stderr(&self) -> String {
        let mut buf = self.stderr.lock().unwrap();
        let text = String::from_utf8_lossy(&buf).trim().to_owned();
        buf.clear();
        text
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(map) = REGISTRY.lock().unwrap().as_mut() {
            map.remove(&self.id);
        }
    }
}

fn register_scheme() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        // SAFETY: runs once, before any agent-vm transport can be created.
        unsafe {
            git2::transport::register(SCHEME, |remote| {
                Transport::smart(remote, false, Subtransport { current: Mutex::new(None) })
            })
        }
        .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        bail!("cannot register the agent-vm git transport: {e}");
    }
    Ok(())
}

fn net_error(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::GenericError, ErrorClass::Net, msg.to_string())
}

struct Subtransport {
    /// The stream opened by an `*Ls` action, reused by the action that
    /// follows it on the same connection (libgit2's stateful protocol).
    current: Mutex<Option<Arc<Mutex<Pipe>>>>,
}

impl SmartSubtransport for Subtransport {
    fn action(&self, url: &str, action: Service) -> Result<Box<dyn SmartSubtransportStream>, Error> {
        let mut current = self.current.lock().unwrap();
        if matches!(action, Service::UploadPack | Service::ReceivePack)
            && let Some(pipe) = current.as_ref()
        {
            return Ok(Box::new(Stream(pipe.clone())));
        }
        let rest = url
            .strip_prefix(&format!("{SCHEME}://"))
            .ok_or_else(|| net_error(format!("not an agent-vm URL: {url}")))?;
        let (id, path) = rest.split_once('/').ok_or_else(|| net_error(format!("no path in {url}")))?;
        let (id, step) = match id.split_once('.') {
            Some((id, step)) => (id, Some(step)),
            None => (id, None),
        };
        let bad = || net_error(format!("bad session in {url}"));
        let id: u64 = id.parse().map_err(|_| bad())?;
        let (session, stderr, step) = {
            let registry = REGISTRY.lock().unwrap();
            let reg = registry
                .as_ref()
                .and_then(|m| m.get(&id))
                .ok_or_else(|| net_error("the SSH session for this transfer is gone"))?;
            let step = match step {
                Some(n) => {
                    let n: usize = n.parse().map_err(|_| bad())?;
                    Some(reg.steps.lock().unwrap().get(n).cloned().ok_or_else(bad)?)
                }
                None => None,
            };
            (reg.session.clone(), reg.stderr.clone(), step)
        };
        let argv: &[&str] = match action {
            Service::UploadPackLs | Service::UploadPack => &["git-upload-pack", path],
            // No `git maintenance --auto` after each push: it costs a process
            // per push, and the agent's own commits run it anyway.
            Service::ReceivePackLs | Service::ReceivePack => {
                &["git", "-c", "receive.autogc=false", "receive-pack", path]
            }
        };
        let program = shell::quote(argv).map_err(net_error)?;
        let command = match step {
            Some(step) => shell::then_exec(&step, &program),
            None => program,
        };
        let pipe = Arc::new(Mutex::new(Pipe::open(session, command, stderr)?));
        *current = Some(pipe.clone());
        Ok(Box::new(Stream(pipe)))
    }

    fn close(&self) -> Result<(), Error> {
        self.current.lock().unwrap().take();
        Ok(())
    }
}

/// One remote git process: a task owns the SSH channel and moves bytes
/// between it and the blocking Read/Write that libgit2 calls.
/// How much a transfer may receive from the VM, unless overridden.
const DEFAULT_MAX_RECEIVE: u64 = 16 << 30;
const MAX_RECEIVE_ENV: &str = "AGENT_VM_MAX_RECEIVE_BYTES";
/// How much of the remote git's stderr is kept for error messages.
const MAX_STDERR: usize = 64 << 10;

fn max_receive_bytes() -> u64 {
    std::env::var(MAX_RECEIVE_ENV).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_MAX_RECEIVE)
}

struct Pipe {
    to_remote: Option<tmpsc::Sender<Vec<u8>>>,
    from_remote: mpsc::Receiver<Result<Vec<u8>, String>>,
    pending: Vec<u8>,
    offset: usize,
}

impl Pipe {
    fn open(session: Arc<Session>, command: String, stderr: Arc<Mutex<Vec<u8>>>) -> Result<Pipe, Error> {
        let rt =
            tokio::runtime::Handle::try_current().map_err(|_| net_error("git transfer outside the async runtime"))?;
        let (mut read, write) = rt.block_on(session.open_exec(&command)).map_err(|e| net_error(format!("{e:#}")))?;
        let (to_remote, mut outgoing) = tmpsc::channel::<Vec<u8>>(16);
        let (incoming, from_remote) = mpsc::sync_channel::<Result<Vec<u8>, String>>(64);
        let limit = max_receive_bytes();
        rt.spawn(async move {
            let writer = async move {
                while let Some(buf) = outgoing.recv().await {
                    if write.data(&buf[..]).await.is_err() {
                        return;
                    }
                }
                let _ = write.eof().await;
            };
            let reader = async move {
                let mut received: u64 = 0;
                while let Some(event) = read.next().await {
                    match event {
                        Event::Stdout(data) => {
                            // A hostile VM could send without end: stop at the limit.
                            received += data.len() as u64;
                            let item = if received > limit {
                                Err(format!(
                                    "the VM sent more than {limit} bytes in one transfer; stopped \
                                     (set {MAX_RECEIVE_ENV} to allow more)"
                                ))
                            } else {
                                Ok(data)
                            };
                            let stop = item.is_err();
                            // The blocking reader may be slow; never block the runtime on it.
                            let incoming = incoming.clone();
                            if tokio::task::spawn_blocking(move || incoming.send(item))
                                .await
                                .map_or(true, |r| r.is_err())
                                || stop
                            {
                                break;
                            }
                        }
                        Event::Stderr(data) => {
                            // Kept for error messages only: bounded.
                            let mut buf = stderr.lock().unwrap();
                            let room = MAX_STDERR.saturating_sub(buf.len());
                            buf.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        Event::Exit(exit_status) if exit_status != 0 => {
                            tracing::debug!(exit_status, "remote git exited");
                        }
                        Event::Exit(_) => {}
                    }
                }
            };
            tokio::join!(writer, reader);
        });
        Ok(Pipe { to_remote: Some(to_remote), from_remote, pending: Vec::new(), offset: 0 })
    }
}

struct Stream(Arc<Mutex<Pipe>>);

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut pipe = self.0.lock().unwrap();
        if pipe.offset == pipe.pending.len() {
            match pipe.from_remote.recv() {
                Ok(Ok(chunk)) => {
                    pipe.pending = chunk;
                    pipe.offset = 0;
                }
                Ok(Err(why)) => return Err(std::io::Error::other(why)),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(pipe.pending.len() - pipe.offset);
        let start = pipe.offset;
        buf[..n].copy_from_slice(&pipe.pending[start..start + n]);
        pipe.offset += n;
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pipe = self.0.lock().unwrap();
        let sender = pipe.to_remote.as_ref().ok_or(std::io::ErrorKind::BrokenPipe)?;
        sender
            .blocking_send(buf.to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the VM closed the git connection"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
