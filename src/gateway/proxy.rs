//! The gateway's HTTP proxy: `CONNECT host:port` (HTTPS, git, anything over
//! TCP) and plain `http://` requests, each checked against the policy,
//! resolved and dialled on the host, and logged. Every byte of a request
//! comes from the (hostile) agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::broker::Origin;
use super::log::{Log, Record};
use super::policy::{Policy, Verdict, host_name};

/// The longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 << 10;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection needs: the current policy (read afresh for each
/// connection, so live rule changes apply at once), the log, and how to
/// name the instance in messages.
pub struct Context {
    pub policy: Box<dyn Fn() -> anyhow::Result<Policy> + Send + Sync>,
    pub log: Log,
    /// `agent-vm` or `agent-vm --instance NAME`: the command prefix that
    /// refusals tell the user to run.
    pub command: String,
    pub broker: super::broker::Broker,
}

/// One request as the agent sent it.
#[derive(Debug, PartialEq)]
struct Request {
    method: String,
    host: String,
    port: u16,
    /// For plain HTTP: the head to send on, in origin form.
    forward: Option<Vec<u8>>,
    workspace: Option<String>,
    /// A request to the gateway itself: for the credential broker.
    to_broker: Option<Origin>,
}

/// Serves one proxy connection from the agent to its end.
pub async fn serve<S>(mut client: S, ctx: Arc<Context>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf = Vec::new();
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client, &mut buf)).await {
        Ok(Ok(n)) => n,
        Ok(Err(why)) => return respond(&mut client, 400, &why).await,
        Err(_) => return respond(&mut client, 408, "no request within 30 s").await,
    };
    let req = match parse(&buf[..head]) {
        Ok(r) => r,
        Err(why) => return respond(&mut client, 400, &why).await,
    };
    let rest = buf[head..].to_vec();
    if let Some(origin) = &req.to_broker {
        let done = super::broker::serve(&mut client, origin, &rest, &ctx).await;
        let record = Record {
            time: now(),
            host: done.host,
            port: done.port,
            verdict: if done.allowed { "allowed" } else { "refused" }.into(),
            rule: done.rule,
            up: done.up,
            down: done.down,
            workspace: req.workspace.clone(),
            method: req.method.clone(),
            error: done.error,
        };
        return log(&ctx, &record);
    }
    let mut record = Record {
        time: now(),
        host: req.host.clone(),
        port: req.port,
        verdict: "refused".into(),
        rule: String::new(),
        up: 0,
        down: 0,
        workspace: req.workspace.clone(),
        method: req.method.clone(),
        error: None,
    };
    let policy = match (ctx.policy)() {
        Ok(p) => p,
        Err(e) => {
            // Fail closed: a broken rules file refuses, it never opens.
            record.rule = format!("rules unreadable: {e:#}");
            log(&ctx, &record);
            return respond(&mut client, 503, "the gateway's rules cannot be read; see `agent-vm network log`").await;
        }
    };
    let upstream = match decide(&policy, &req.host, req.port).await {
        Ok((addrs, rule)) => {
            record.rule = rule;
            record.verdict = "allowed".into();
            match dial(&addrs).await {
                Ok(s) => s,
                Err(e) => {
                    record.error = Some(e.clone());
                    log(&ctx, &record);
                    return respond(&mut client, 502, &format!("cannot reach {}:{}: {e}", req.host, req.port)).await;
                }
            }
        }
        Err(Denied::Unreachable(why)) => {
            record.verdict = "allowed".into();
            record.error = Some(why.clone());
            log(&ctx, &record);
            return respond(
                &mut client,
                502,
                &format!("agent-vm's gateway cannot reach {}:{}: {why}", req.host, req.port),
            )
            .await;
        }
        Err(Denied::Refused(rule)) => {
            record.rule = rule.clone();
            log(&ctx, &record);
            let allow = format!("{} network allow {}", ctx.command, req.host);
            let why = format!(
                "agent-vm's gateway refused {}:{} ({rule}). To allow it, run on the host: {allow}",
                req.host, req.port
            );
            return respond(&mut client, 403, &why).await;
        }
    };
    let mut upstream = upstream;
    let started = match &req.forward {
        None => client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await,
        Some(head) => {
            record.up += head.len() as u64;
            upstream.write_all(head).await
        }
    };
    if started.is_ok() && !rest.is_empty() && upstream.write_all(&rest).await.is_ok() {
        record.up += rest.len() as u64;
    }
    let relayed = super::relay::relay(&mut client, &mut upstream, super::relay::IDLE).await;
    record.up += relayed.up;
    record.down += relayed.down;
    if relayed.idle {
        record.error = Some(super::relay::idle_note());
    }
    log(&ctx, &record);
}

fn log(ctx: &Context, record: &Record) {
    if let Err(e) = ctx.log.append(record) {
        tracing::warn!("cannot write the network log: {e:#}");
    }
}

fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Millisecond).map(|t| t.to_string()).unwrap_or_default()
}

/// Reads until the end of the request head; returns its length.
async fn read_head<S: AsyncRead + Unpin>(client: &mut S, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut chunk = [0u8; 4096];
    loop {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|e| e + 4);
        if end.unwrap_or(buf.len()) > MAX_HEAD {
            return Err(format!("request head over {MAX_HEAD} bytes"));
        }
        if let Some(end) = end {
            return Ok(end);
        }
        let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before a whole request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse(head: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(head).map_err(|_| "the request is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return Err("malformed request line".into());
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err("not an HTTP/1 proxy request".into());
    }
    // What is sent on must mean the same to every parser after us: no
    // bare CR or LF, NUL or other control byte anywhere (a bare LF would
    // end a header for some servers and smuggle a request of the agent's
    // ahead of what the gateway adds), header names that are tokens, no
    // folded lines.
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("control or space bytes in the request target".into());
    }
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').ok_or_else(|| format!("malformed header line {:?}", crate::printable(l)))?;
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if k.is_empty() || !k.bytes().all(token) {
            return Err(format!("malformed header name {:?}", crate::printable(k)));
        }
        if !v.bytes().all(|b| b == b'\t' || b == b' ' || (b >= 0x21 && b != 0x7f)) {
            return Err(format!("control bytes in header {k}"));
        }
        headers.push((k, v.trim()));
    }
    let workspace =
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization")).and_then(|(_, v)| basic_user(v));
    let owned = || headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if target.starts_with('/') {
        let origin = Origin { method: method.into(), target: target.into(), version: version.into(), headers: owned() };
        return Ok(Request::broker(origin, workspace));
    }
    if method == "CONNECT" {
        let (host, port) = authority(target, None)?;
        return Ok(Request { method: method.into(), host, port, forward: None, workspace, to_broker: None });
    }
    let rest = target
        .strip_prefix("http://")
        .ok_or_else(|| "a plain request must name an http:// URL (use CONNECT for https)".to_owned())?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.contains('@') {
        return Err("user names in proxied URLs are not passed on".into());
    }
    let (host, port) = authority(auth, Some(80))?;
    // The gateway's own address in the VM, asked through the proxy.
    if port == super::VM_PORT && matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1") {
        let origin = Origin { method: method.into(), target: path.into(), version: version.into(), headers: owned() };
        return Ok(Request::broker(origin, workspace));
    }
    // Origin form, without the proxy's own headers; one request per connection.
    let mut forward = format!("{method} {path} {version}\r\n").into_bytes();
    for (k, v) in &headers {
        let k_lower = k.to_ascii_lowercase();
        if k_lower.starts_with("proxy-") || k_lower == "connection" || k_lower == "keep-alive" {
            continue;
        }
        forward.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    forward.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Request { method: method.into(), host, port, forward: Some(forward), workspace, to_broker: None })
}

impl Request {
    fn broker(origin: Origin, workspace: Option<String>) -> Request {
        let method = origin.method.clone();
        Request {
            method,
            host: "gateway".into(),
            port: super::VM_PORT,
            forward: None,
            workspace,
            to_broker: Some(origin),
        }
    }
}

/// `host:port`, `[v6]:port`, or a bare host when there is a default port.
fn authority(text: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("{text:?} is not host:port");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        (h, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        (None, Some(d)) => d,
        (None, None) => return Err(bad()),
    };
    let host = match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host_name(host).ok_or_else(bad)?,
    };
    Ok((host, port))
}

/// The user of `Basic base64(user:password)`: the session's workspace.
fn basic_user(value: &str) -> Option<String> {
    use base64::Engine;
    let b64 = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let user = text.split(':').next()?.chars().take(200).collect::<String>();
    (!user.is_empty()).then_some(user)
}

pub(super) enum Denied {
    /// By this rule.
    Refused(String),
    /// Allowed, but the name does not resolve.
    Unreachable(String),
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::Refused(rule) => write!(f, "refused by {rule}"),
            Denied::Unreachable(why) => f.write_str(why),
        }
    }
}

/// The addresses the request may be dialled at, and the deciding rule.
pub(super) async fn decide(policy: &Policy, host: &str, port: u16) -> Result<(Vec<SocketAddr>, String), Denied> {
    let rule = match policy.check_name(host, port) {
        Verdict::Allowed { rule } => rule,
        Verdict::Refused { rule } => return Err(Denied::Refused(rule)),
    };
    let candidates: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
        vec![ip]
    } else if let Some(ip) = policy.resolve.get(host) {
        vec![*ip]
    } else {
        let lookup = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port))).await;
        match lookup {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            Ok(Err(e)) => return Err(Denied::Unreachable(format!("{} does not resolve: {e}", host))),
            Err(_) => return Err(Denied::Unreachable(format!("{} did not resolve within 30 s", host))),
        }
    };
    // Every address is checked, and only checked ones are dialled: a name
    // that resolves to this machine or the LAN gets nowhere.
    let mut refusal = None;
    let mut ok = Vec::new();
    for ip in candidates {
        match policy.check_addr(host, ip, port) {
            Verdict::Allowed { .. } => ok.push(SocketAddr::new(ip, port)),
            Verdict::Refused { rule } => refusal = refusal.or(Some(rule)),
        }
    }
    if ok.is_empty() {
        return Err(match refusal {
            Some(rule) => Denied::Refused(rule),
            None => Denied::Unreachable(format!("{} has no address", host)),
        });
    }
    Ok((ok, rule))
}

async fn dial(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                s.set_nodelay(true).ok();
                return Ok(s);
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    Err(last)
}

async fn respond<S: AsyncWrite + Unpin>(client: &mut S, code: u16, why: &str) {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let body = format!("{why}\n");
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.write_all(body.as_bytes()).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::policy::Mode;
    use std::collections::BTreeMap;
    use tokio::net::TcpListener;

    fn ctx(dir: &std::path::Path, mode: Mode, allow: &[&str], resolve: &[(&str, &str)]) -> Arc<Context> {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let resolve: BTreeMap<String, IpAddr> =
            resolve.iter().map(|(n, ip)| (n.to_string(), ip.parse().unwrap())).collect();
        Arc::new(Context {
            policy: Box::new(move || Policy::new(mode, &allow, &[], resolve.clone())),
            log: Log::new(dir.join("network.log")),
            command: "agent-vm".into(),
            broker: crate::gateway::broker::Broker::with_keys(Default::default()),
        })
    }

    /// A server on loopback answering each connection with what it got
    /// (up to the end of a request head) and a fixed body.
    async fn upstream() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let _ = read_head(&mut s, &mut buf).await;
                    let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
                });
            }
        });
        (port, rx)
    }

    /// Sends `request` through the proxy; what comes back.
    async fn through(ctx: Arc<Context>, request: String) -> String {
        let (mut agent, gateway_side) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(serve(gateway_side, ctx));
        agent.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), agent.read_to_end(&mut out)).await;
        drop(agent);
        let _ = task.await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn plain_http_to_an_allowed_host_goes_through_and_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let (port, mut seen) = upstream().await;
        let c = ctx(dir.path(), Mode::Allowlist, &["allowed.test"], &[("allowed.test", "127.0.0.1")]);
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "ws-one:x");
        let got = through(
            c,
            format!(
                "GET http://allowed.test:{port}/path?q=1 HTTP/1.1\r\nHost: allowed.test\r\nProxy-Authorization: Basic {auth}\r\nProxy-Connection: keep-alive\r\n\r\n"
            ),
        )
        .await;
        assert!(got.ends_with("hello"), "{got}");
        let req = seen.recv().await.unwrap();
        assert!(req.starts_with("GET /path?q=1 HTTP/1.1\r\n"), "{req}");
        assert!(!req.to_ascii_lowercase().contains("proxy-"), "proxy headers leaked upstream: {req}");
        let log = crate::gateway::log::read(&dir.path().join("network.log"));
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!((log[0].verdict.as_str(), log[0].host.as_str(), log[0].port), ("allowed", "allowed.test", port));
        assert_eq!(log[0].workspace.as_deref(), Some("ws-one"));
        assert!(log[0].up > 0 && log[0].down > 0, "{log:?}");
    }

    #[tokio::test]
    async fn connect_tunnels_bytes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (port, mut seen) = upstream().await;
        let c = ctx(dir.path(), Mode::Allowlist, &["tunnel.test"], &[("tunnel.test", "127.0.0.1")]);
        let got = through(
            c,
            format!("CONNECT tunnel.test:{port} HTTP/1.1\r\nHost: tunnel.test:{port}\r\n\r\nPING / HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200 Connection established\r\n\r\n"), "{got}");
        assert!(got.ends_with("hello"), "{got}");
        assert_eq!(seen.recv().await.unwrap(), "PING / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn refusals_name_the_host_and_the_command_and_are_logged() {
        let dir = tempfile::tempdir().unwrap();
        let (port, _seen) = upstream().await;
        let c = ctx(dir.path(), Mode::Allowlist, &[], &[("elsewhere.test", "127.0.0.1")]);
        let got = through(c, format!("CONNECT elsewhere.test:{port} HTTP/1.1\r\n\r\n")).await;
        assert!(got.starts_with("HTTP/1.1 403 "), "{got}");
        assert!(got.contains("agent-vm network allow elsewhere.test"), "{got}");
        let log = crate::gateway::log::read(&dir.path().join("network.log"));
        assert_eq!((log[0].verdict.as_str(), log[0].rule.as_str()), ("refused", "not in the allowlist"));
    }

    #[tokio::test]
    async fn loopback_and_private_addresses_stay_out_of_reach() {
        let dir = tempfile::tempdir().unwrap();
        let (port, mut seen) = upstream().await;
        // Open mode, yet this machine's services are not the internet:
        // by address, by a name that resolves there, by a mapped address.
        let c = ctx(dir.path(), Mode::Open, &[], &[]);
        for target in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::ffff:127.0.0.1]:{port}"),
            format!("[::1]:{port}"),
        ] {
            let got = through(c.clone(), format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
            assert!(got.starts_with("HTTP/1.1 403 "), "{target}: {got}");
            assert!(got.contains("loopback, private or link-local"), "{target}: {got}");
        }
        let got = through(c.clone(), format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n")).await;
        assert!(got.starts_with("HTTP/1.1 403 "), "{got}");
        assert!(seen.try_recv().is_err(), "a request reached the loopback server");
        // The control: a rule naming the address opens it.
        let named = ctx(dir.path(), Mode::Open, &[&format!("127.0.0.1:{port}")], &[]);
        let got = through(named, format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n")).await;
        assert!(got.ends_with("hello"), "{got}");
    }

    #[tokio::test]
    async fn malformed_requests_are_answered_not_obeyed() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), Mode::Open, &[], &[]);
        for bad in [
            "CONNECT nohost HTTP/1.1\r\n\r\n".to_owned(),
            "CONNECT a b HTTP/1.1\r\n\r\n".into(),
            "GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n".into(),
            "GET https://example.com/ HTTP/1.1\r\n\r\n".into(),
            "SSH-2.0-x\r\n\r\n".into(),
            format!("GET http://x.test/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD)),
        ] {
            let got = through(c.clone(), bad.clone()).await;
            assert!(got.starts_with("HTTP/1.1 400 "), "{bad:.60}: {got}");
        }
    }

    /// A head whose bytes could mean something else to the server after the
    /// gateway (bare LF or CR, NUL, a folded or nameless line) is refused
    /// before anything is sent on: nothing is smuggled in ahead of what the
    /// broker adds.
    #[tokio::test]
    async fn heads_that_parsers_could_read_differently_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), Mode::Open, &[], &[]);
        for bad in [
            "POST /anthropic/v1/messages HTTP/1.1\r\nX: a\n\nPOST /v1/files HTTP/1.1\r\n\r\n",
            "POST /anthropic/v1/messages HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "POST /anthropic/v1/messages HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "POST /anthropic/v1/messages HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "POST /anthropic/v1/messages HTTP/1.1\r\nX a: b\r\n\r\n",
            "POST /anthropic/v1/messages HTTP/1.1\r\nno colon\r\n\r\n",
            "GET http://x.test/\x01 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.2\r\n\r\n",
        ] {
            let got = through(c.clone(), bad.into()).await;
            assert!(got.starts_with("HTTP/1.1 400 "), "{bad:?}: {got}");
        }
    }

    /// Requests to the gateway itself (origin form, or its own address
    /// through the proxy) go to the broker, which answers them itself when
    /// it cannot send them on.
    #[tokio::test]
    async fn requests_to_the_gateway_itself_reach_the_broker() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), Mode::Open, &[], &[]);
        let got = through(c.clone(), "GET / HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\r\n".into()).await;
        assert!(got.starts_with("HTTP/1.1 403 ") && got.contains("Metadata-Flavor"), "{got}");
        let got = through(c.clone(), "GET / HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n".into()).await;
        assert!(got.starts_with("HTTP/1.1 200 ") && got.contains("\r\nMetadata-Flavor: Google\r\n"), "{got}");
        let got = through(c.clone(), "POST http://127.0.0.1:3128/anthropic/v1/messages HTTP/1.1\r\n\r\n".into()).await;
        assert!(got.starts_with("HTTP/1.1 503 ") && got.contains("ANTHROPIC_API_KEY"), "{got}");
        let got = through(c.clone(), "GET /elsewhere/x HTTP/1.1\r\n\r\n".into()).await;
        assert!(got.starts_with("HTTP/1.1 404 ") && got.contains("anthropic"), "{got}");
        let log = std::fs::read_to_string(dir.path().join("network.log")).unwrap_or_default();
        assert!(log.contains("broker: anthropic") && log.contains("no key on the host"), "{log}");
    }

    #[test]
    fn authorities_parse_strictly() {
        assert_eq!(authority("example.com:443", None), Ok(("example.com".into(), 443)));
        assert_eq!(authority("[::1]:8080", None), Ok(("::1".into(), 8080)));
        assert_eq!(authority("Example.COM.", Some(80)), Ok(("example.com".into(), 80)));
        for bad in ["example.com", "example.com:0", "example.com:99999", "ex ample:1", "[::1:80"] {
            assert!(authority(bad, None).is_err(), "{bad}");
        }
    }
}
