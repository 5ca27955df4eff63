//! The network gateway: the agent's only way out of the VM. agent-vm runs
//! it on the host, for as long as the VM runs, and exposes it inside the VM
//! on 127.0.0.1:[`VM_PORT`] through a remote forward over an SSH connection
//! of its own (the VM never connects to the host). The guest's firewall lets
//! the agent user reach nothing else, so without the gateway the agent has
//! no egress at all; the gateway checks each destination against the
//! instance's policy and logs every connection.
//!
//! It runs as a background process (`agent-vm gateway`, started by any
//! command that reaches the running VM), holding a lock in the instance's
//! state directory; `stop` and `destroy` end it.

pub mod broker;
pub mod log;
pub mod policy;
pub mod proxy;
pub mod relay;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::vm::Backend;

/// Where agent sessions find the gateway in the VM.
pub const VM_PORT: u16 = 3128;

/// `env` assignments that point a session in `workspace` at the gateway
/// with the workspace's name as the proxy user, so the log can say which
/// workspace a connection came from. The name is the session's own claim
/// (an agent can send another): it labels the log, it grants nothing.
pub fn workspace_env(workspace: &str) -> Vec<String> {
    let user = percent_encode(workspace.rsplit('/').next().unwrap_or(workspace));
    // A password too: some clients (Python's urllib) send no credentials
    // for a user alone.
    let url = format!("http://{user}:ws@127.0.0.1:{VM_PORT}");
    ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"].iter().map(|v| format!("{v}={url}")).collect()
}

/// `text` with every byte but RFC 3986's unreserved ones as `%XX`: safe in
/// a URL's user name and in a form.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The gateway's files in an instance's state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    dir: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Paths {
        Paths { dir: state_dir.to_owned() }
    }
    fn lock(&self) -> PathBuf {
        self.dir.join("gateway.lock")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("gateway.json")
    }
    fn stderr(&self) -> PathBuf {
        self.dir.join("gateway.stderr")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("network.log")
    }
    fn rules(&self) -> PathBuf {
        self.dir.join("network-rules.json")
    }
    /// Where later commands hand the gateway their API keys.
    fn keys(&self) -> PathBuf {
        self.dir.join("gateway.sock")
    }
}

/// The longest Unix socket path every host takes (macOS: 104 bytes).
const MAX_SOCKET_PATH: usize = 103;

/// Hands the running gateway the provider keys of this command's
/// environment, so that a key changed on the host applies to the next
/// request without a restart. Through a socket only this user can open;
/// nothing is written to disk.
pub fn hand_keys(backend: &dyn Backend) -> Result<()> {
    use std::io::{Read, Write};
    let keys: std::collections::BTreeMap<&str, String> =
        broker::host_variables().filter_map(|v| std::env::var(v).ok().map(|k| (v, k))).collect();
    let path = Paths::new(&backend.state_dir()).keys();
    if keys.is_empty() || path.as_os_str().len() > MAX_SOCKET_PATH {
        return Ok(());
    }
    let mut sock = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("cannot reach the gateway at {}", path.display()))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.write_all(&serde_json::to_vec(&keys)?)?;
    sock.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    sock.read_to_string(&mut answer)?;
    if answer != "ok" {
        bail!("the gateway did not take the API keys: {}", crate::printable(&answer));
    }
    Ok(())
}

/// Takes keys from [`hand_keys`] for as long as the gateway runs.
fn take_keys(paths: &Paths, ctx: Arc<proxy::Context>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = paths.keys();
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        tracing::warn!("{} is too long for a socket: keys changed on the host apply after a restart", path.display());
        return Ok(());
    }
    // Ours alone: we hold the lock, so a socket left here is stale.
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).with_context(|| format!("cannot listen at {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        let me = unsafe { libc::geteuid() };
        while let Ok((mut conn, _)) = listener.accept().await {
            // Only this user's own commands hand over keys, whatever the
            // directory's permissions were when the socket was made.
            if !conn.peer_cred().is_ok_and(|c| c.uid() == me) {
                continue;
            }
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut text = Vec::new();
                let mut limited = (&mut conn).take(64 << 10);
                let answer = match tokio::time::timeout(Duration::from_secs(5), limited.read_to_end(&mut text)).await {
                    Ok(Ok(_)) => match serde_json::from_slice(&text) {
                        Ok(keys) => {
                            ctx.broker.set_keys(keys);
                            "ok"
                        }
                        Err(_) => "not a JSON object of strings",
                    },
                    _ => "nothing read",
                };
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// What the running gateway says of itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pid: u32,
    /// `starting`, `ready` (listening in the VM) or `error`.
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub since: String,
}

/// Destinations added and refused with `agent-vm network allow/deny`,
/// applied at once by the running gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveRules {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

impl LiveRules {
    pub fn load(paths: &Paths) -> Result<LiveRules> {
        match std::fs::read_to_string(paths.rules()) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("{} is not valid", paths.rules().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LiveRules::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", paths.rules().display())),
        }
    }

    /// Puts `rule` on the allow list (or the deny list), off the other.
    pub fn set(&mut self, rule: &str, allow: bool) {
        let (on, off) = if allow { (&mut self.allow, &mut self.deny) } else { (&mut self.deny, &mut self.allow) };
        off.retain(|r| r != rule);
        if !on.iter().any(|r| r == rule) {
            on.push(rule.to_owned());
        }
    }

    /// Written whole and renamed into place: the gateway never reads half.
    pub fn save(&self, paths: &Paths) -> Result<()> {
        std::fs::create_dir_all(&paths.dir)?;
        let tmp = paths.rules().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, paths.rules())?;
        Ok(())
    }
}

/// The policy the gateway applies for `instance` now: config file, then
/// live rules, then the default allowlist.
pub fn current_policy(instance: &str, paths: &Paths) -> Result<policy::Policy> {
    let entry = crate::config::Config::load()?.entry(instance);
    let (net, live) = (entry.network, LiveRules::load(paths)?);
    let allow: Vec<String> = net.allow.iter().chain(&live.allow).cloned().collect();
    let deny: Vec<String> = net.deny.iter().chain(&live.deny).cloned().collect();
    let mut policy = policy::Policy::new(net.mode, &allow, &deny, net.resolve)?;
    policy.upstreams = entry.credentials.upstreams;
    Ok(policy)
}

/// The gateway's state, when one runs for these paths.
pub fn running(paths: &Paths) -> Option<State> {
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(paths.lock()).ok()?;
    if lock.try_lock().is_ok() {
        return None; // nobody holds it
    }
    let state = std::fs::read_to_string(paths.state()).ok()?;
    serde_json::from_str(&state).ok()
}

/// Starts the gateway for the running VM unless it already runs, and waits
/// until it listens in the VM.
pub fn ensure(backend: &dyn Backend) -> Result<()> {
    let paths = Paths::new(&backend.state_dir());
    if running(&paths).is_some_and(|s| s.phase == "ready") {
        return Ok(());
    }
    std::fs::create_dir_all(&paths.dir).with_context(|| format!("cannot create {}", paths.dir.display()))?;
    // A gateway that is running but not ready (starting, or reconnecting
    // after the VM restarted) is waited for, not joined by a second one:
    // one is started only while none holds the lock.
    let mut child: Option<std::process::Child> = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = running(&paths);
        if let Some(s) = &state {
            match s.phase.as_str() {
                "ready" => return Ok(()),
                "error" => bail!(
                    "the network gateway cannot start: {}; the agent has no network until it does",
                    s.error.clone().unwrap_or_default()
                ),
                _ => {}
            }
        }
        match &mut child {
            Some(c) => {
                if let Some(status) = c.try_wait()? {
                    // Another gateway may have taken the lock first: it will do.
                    if state.is_some() {
                        child = None;
                        continue;
                    }
                    let said = std::fs::read_to_string(paths.stderr()).unwrap_or_default();
                    bail!(
                        "the network gateway exited ({status}) before it was ready: {}",
                        crate::printable_lines(said.trim())
                    );
                }
            }
            // None holds the lock (at first, or the one waited for has gone).
            None if state.is_none() => child = Some(spawn(backend, &paths)?),
            None => {}
        }
        if std::time::Instant::now() > deadline {
            bail!("the network gateway did not become ready within 60 s (see {})", paths.stderr().display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `agent-vm gateway` in a session of its own (it outlives this
/// command and its terminal).
fn spawn(backend: &dyn Backend, paths: &Paths) -> Result<std::process::Child> {
    let exe = std::env::current_exe().context("cannot find agent-vm's own path to start the gateway")?;
    let stderr = std::fs::File::create(paths.stderr())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--instance", backend.instance(), "gateway"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("cannot start the gateway")
}

/// Ends the gateway of `backend`'s instance, if one runs.
pub fn stop(backend: &dyn Backend) -> Result<bool> {
    let paths = Paths::new(&backend.state_dir());
    let Some(state) = running(&paths) else { return Ok(false) };
    unsafe {
        libc::kill(state.pid as libc::pid_t, libc::SIGTERM);
    }
    for _ in 0..100 {
        if running(&paths).is_none() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the network gateway (pid {}) did not stop", state.pid)
}

/// Connections the gateway serves at once.
const MAX_CONNECTIONS: usize = 512;

/// How long the gateway keeps trying to reach a VM that stopped answering
/// before it exits (the next agent-vm command starts it again).
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// The gateway process itself: holds the lock, keeps an SSH connection
/// with the remote forward up while the VM runs, serves each connection.
pub async fn serve(backend: &dyn Backend, command_prefix: String) -> Result<()> {
    let paths = Paths::new(&backend.state_dir());
    std::fs::create_dir_all(&paths.dir)?;
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(paths.lock())?;
    if lock.try_lock().is_err() {
        return Ok(()); // another gateway serves this instance
    }
    let instance = backend.instance().to_owned();
    let policy_paths = paths.clone();
    let ctx = Arc::new(proxy::Context {
        policy: Box::new(move || current_policy(&instance, &policy_paths)),
        log: log::Log::new(paths.log()),
        command: command_prefix,
        broker: broker::Broker::from_env(),
    });
    let write_state = |phase: &str, error: Option<String>| {
        let state = State {
            pid: std::process::id(),
            phase: phase.to_owned(),
            error,
            since: jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default(),
        };
        let tmp = paths.state().with_extension("json.tmp");
        let _ = std::fs::write(&tmp, serde_json::to_vec(&state).unwrap_or_default());
        let _ = std::fs::rename(&tmp, paths.state());
    };
    take_keys(&paths, ctx.clone())?;
    write_state("starting", None);
    // On `stop`: no state left that says a gateway runs.
    let stopped = || {
        let _ = std::fs::remove_file(paths.state());
        Ok(())
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut unreachable_since: Option<std::time::Instant> = None;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let connected = async {
            let endpoint = backend.ssh_endpoint()?;
            crate::ssh::Session::connect_forwarding(&endpoint, crate::ssh::CONNECT_TIMEOUT).await
        };
        // A VM that answers but will not listen (the port taken) is an
        // error to report at once; one that does not answer may be booting.
        // `stop` is obeyed while connecting and reconnecting too.
        let connected = tokio::select! {
            c = connected => c,
            _ = term.recv() => return stopped(),
        };
        let outcome = match connected {
            Ok((session, rx)) => match session.forward_from_vm("127.0.0.1", VM_PORT).await {
                Ok(()) => Ok((session, rx)),
                Err(e) => Err((e, true)),
            },
            Err(e) => Err((e, false)),
        };
        let (session, mut rx) = match outcome {
            Ok(c) => c,
            Err((e, refused)) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                tracing::warn!("gateway: {e:#}");
                if refused || since.elapsed() > GIVE_UP_AFTER {
                    write_state("error", Some(format!("{e:#}")));
                }
                if since.elapsed() > GIVE_UP_AFTER {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = term.recv() => return stopped(),
                }
                continue;
            }
        };
        unreachable_since = None;
        write_state("ready", None);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                conn = rx.recv() => match conn {
                    // Past the bound, connections are closed at once: the
                    // VM cannot make the host hold unbounded sockets.
                    Some(f) => if let Ok(permit) = connections.clone().try_acquire_owned() {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            proxy::serve(f.channel.into_stream(), ctx).await;
                            drop(permit);
                        });
                    },
                    None => break,
                },
                _ = tick.tick() => if session.is_closed() { break },
                _ = term.recv() => return stopped(),
            }
        }
        write_state("starting", Some("the SSH connection to the VM ended; reconnecting".into()));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_workspace_is_named_in_every_proxy_variable_and_url_safe() {
        let env = super::workspace_env("workspace/proj-a b@c:d");
        assert_eq!(env.len(), 4);
        for (var, line) in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"].iter().zip(&env) {
            assert_eq!(line, &format!("{var}=http://proj-a%20b%40c%3Ad:ws@127.0.0.1:3128"));
        }
    }
}
