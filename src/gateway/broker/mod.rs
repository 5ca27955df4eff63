//! The credential broker: requests the agent sends to the gateway itself
//! (`http://127.0.0.1:3128/<provider>/…`, the base URL its session was
//! given) go on to the provider over TLS from the host, with the real key
//! put in on the way; GCE metadata requests get short-lived GCP tokens.
//! The keys live in this process only (from its environment, refreshed by
//! each `connect` and `run`): never in the VM, a file, a command line or a
//! log.

pub mod gce;
pub mod https;
pub mod providers;

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use providers::{Auth, Provider};

/// A request in origin form (`GET /path HTTP/1.1`), as sent to a server.
#[derive(Debug, PartialEq)]
pub struct Origin {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// `HTTP/1.0` or `HTTP/1.1`: sent on as it came.
    pub version: String,
    pub headers: Vec<(String, String)>,
}

impl Origin {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the broker may use: the provider keys it was handed, and the
/// host's base URLs for them.
pub struct Broker {
    keys: RwLock<HashMap<String, String>>,
    minter: gce::Minter,
}

/// The host variables a gateway takes: the keys and the base URLs.
pub fn host_variables() -> impl Iterator<Item = &'static str> {
    providers::key_variables().chain(providers::PROVIDERS.iter().map(|p| p.base_url.0))
}

impl Broker {
    /// With the keys of this process's environment.
    pub fn from_env() -> Broker {
        Broker::with_keys(
            providers::key_variables().filter_map(|v| std::env::var(v).ok().map(|k| (v.to_owned(), k))).collect(),
        )
    }

    pub fn with_keys(keys: HashMap<String, String>) -> Broker {
        let broker = Broker { keys: RwLock::new(HashMap::new()), minter: gce::Minter::default() };
        broker.set_keys(keys);
        broker
    }

    /// Keys handed over by a later command replace the ones held of the
    /// same variables (a command run where a key is unset forgets none).
    pub fn set_keys(&self, keys: HashMap<String, String>) {
        let keys = keys.into_iter().filter(|(k, v)| host_variables().any(|n| n == k) && !v.is_empty());
        self.keys.write().unwrap().extend(keys);
    }

    /// The host's base URL for `provider` as an upstream (its `/v1` style
    /// suffix taken off: the route's path brings it).
    fn base_url(&self, provider: &Provider) -> Option<String> {
        let keys = self.keys.read().unwrap();
        let url = keys.get(provider.base_url.0)?.trim_end_matches('/');
        Some(url.strip_suffix(provider.base_url.1).unwrap_or(url).to_owned())
    }

    fn key(&self, provider: &Provider) -> Option<(String, Auth)> {
        let keys = self.keys.read().unwrap();
        provider.key(|v| keys.get(v).cloned())
    }
}

/// What a brokered request came to, for the log.
pub struct Outcome {
    pub host: String,
    pub port: u16,
    pub rule: String,
    pub allowed: bool,
    pub up: u64,
    pub down: u64,
    pub error: Option<String>,
}

/// Serves one request addressed to the gateway itself.
pub async fn serve<S>(client: &mut S, req: &Origin, rest: &[u8], ctx: &super::proxy::Context) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let mut outcome =
        Outcome { host: "gateway".into(), port: 0, rule: String::new(), allowed: false, up: 0, down: 0, error: None };
    if path == "/" || path.starts_with("/computeMetadata/") || path == "/computeMetadata" {
        metadata(client, req, path, query, ctx, &mut outcome).await;
        return outcome;
    }
    let name = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    let Some(provider) = providers::find(name) else {
        outcome.rule = "broker: no such route".into();
        let names: Vec<&str> = providers::PROVIDERS.iter().map(|p| p.name).collect();
        reply(client, 404, &format!("agent-vm's gateway has no route {path:?}; it brokers {}", names.join(", "))).await;
        return outcome;
    };
    outcome.rule = format!("broker: {}", provider.name);
    let rest_of_path = &path[1 + name.len()..];
    if let Err(why) = check_path(rest_of_path) {
        outcome.error = Some(why.clone());
        reply(client, 400, &format!("agent-vm's gateway does not send on {path:?}: {why}")).await;
        return outcome;
    }
    let Some((key, auth)) = ctx.broker.key(provider) else {
        let vars: Vec<&str> = provider.keys.iter().map(|(v, _)| *v).collect();
        outcome.error = Some("no key on the host".into());
        let why = format!(
            "agent-vm's gateway has no {} key: set {} on the host, then run `{} connect` again",
            provider.name,
            vars.join(" or "),
            ctx.command
        );
        reply(client, 503, &why).await;
        return outcome;
    };
    let policy = match (ctx.policy)() {
        Ok(p) => p,
        Err(e) => {
            outcome.error = Some(format!("rules unreadable: {e:#}"));
            reply(client, 503, "the gateway's rules cannot be read; see `agent-vm network log`").await;
            return outcome;
        }
    };
    // The config's endpoint, else the one the host's own base URL names
    // (a key for a company endpoint goes there, not to the provider), else
    // the provider's.
    let host_base = ctx.broker.base_url(provider);
    let chosen =
        policy.upstreams.get(provider.name).cloned().or(host_base).unwrap_or_else(|| provider.upstream.to_owned());
    let upstream = match https::Url::parse(&chosen) {
        Ok(u) => u,
        Err(e) => {
            outcome.error = Some(format!("{e:#}"));
            reply(client, 503, &format!("the upstream for {} is not valid: {e:#}", provider.name)).await;
            return outcome;
        }
    };
    (outcome.host, outcome.port) = (upstream.host.clone(), upstream.port);
    let addrs = match super::proxy::decide(&policy, &upstream.host, upstream.port).await {
        Ok((addrs, _)) => addrs,
        Err(denied) => {
            let why = denied.to_string();
            outcome.error = Some(why.clone());
            let allow = format!("{} network allow {}", ctx.command, upstream.host);
            reply(client, 403, &format!("agent-vm's gateway refused {} ({why}). To allow it: {allow}", upstream.host))
                .await;
            return outcome;
        }
    };
    outcome.allowed = true;
    let mut tls = match https::connect(&upstream, &addrs).await {
        Ok(t) => t,
        Err(e) => {
            outcome.error = Some(format!("{e:#}"));
            reply(client, 502, &format!("agent-vm's gateway cannot reach {}: {e:#}", upstream.host)).await;
            return outcome;
        }
    };
    let head = upstream_head(req, &upstream, rest_of_path, query, &key, auth);
    let mut sent = tls.write_all(&head).await.is_ok();
    if sent && !rest.is_empty() {
        sent = tls.write_all(rest).await.is_ok();
    }
    outcome.up = (head.len() + rest.len()) as u64;
    if sent {
        let relayed = crate::gateway::relay::relay(client, &mut tls, crate::gateway::relay::IDLE).await;
        outcome.up += relayed.up;
        outcome.down += relayed.down;
        if relayed.idle {
            outcome.error = Some(crate::gateway::relay::idle_note());
        }
    }
    outcome
}

/// The request as the provider gets it: its host, the path under its base,
/// the agent's credentials (placeholders, or anything else) replaced by
/// the key, one request per connection.
fn upstream_head(req: &Origin, upstream: &https::Url, path: &str, query: &str, key: &str, auth: Auth) -> Vec<u8> {
    // Gemini's clients may put the key in the query too.
    let query: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && !p.starts_with("key=")).collect();
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    let path = if path.is_empty() { "/" } else { path };
    let mut head = format!(
        "{} {}{path}{query} {}\r\nHost: {}\r\nConnection: close\r\n",
        req.method,
        upstream.base,
        req.version,
        upstream.authority()
    );
    const DROPPED: &[&str] =
        &["host", "authorization", "x-api-key", "x-goog-api-key", "connection", "keep-alive", "upgrade", "te"];
    for (k, v) in &req.headers {
        let lower = k.to_ascii_lowercase();
        if DROPPED.contains(&lower.as_str()) || lower.starts_with("proxy-") {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match auth {
        Auth::Bearer => head.push_str(&format!("Authorization: Bearer {key}\r\n\r\n")),
        Auth::Header(name) => head.push_str(&format!("{name}: {key}\r\n\r\n")),
    }
    head.into_bytes()
}

/// The path under a provider's route stays under the upstream's base: it
/// is empty or absolute, without `.`/`..` segments (plain or encoded),
/// empty segments or backslashes.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else { return Err("not a path under the route".into()) };
    if path.contains('\\') || path.to_ascii_lowercase().contains("%5c") {
        return Err("a backslash".into());
    }
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        // An empty segment only as the last (a trailing slash).
        if matches!(decoded.as_str(), "." | "..")
            || decoded.contains("%2f")
            || (segment.is_empty() && i + 1 < segments.len())
        {
            return Err(format!("the segment {segment:?}"));
        }
    }
    Ok(())
}

/// The GCE metadata server's part.
async fn metadata<S>(
    client: &mut S,
    req: &Origin,
    path: &str,
    query: &str,
    ctx: &super::proxy::Context,
    outcome: &mut Outcome,
) where
    S: AsyncWrite + Unpin,
{
    outcome.host = "metadata".into();
    outcome.rule = "broker: gce metadata".into();
    // As the real server: only requests that say they want metadata.
    if req.header("metadata-flavor") != Some("Google") {
        return metadata_reply(client, 403, "text/plain", "Missing Metadata-Flavor: Google header\n").await;
    }
    let recursive = query.split('&').any(|p| p == "recursive=true");
    match gce::route(path, recursive) {
        gce::Answer::Text(t) => metadata_reply(client, 200, "application/text", &t).await,
        gce::Answer::Json(v) => metadata_reply(client, 200, "application/json", &v.to_string()).await,
        gce::Answer::NotFound => metadata_reply(client, 404, "text/plain", "not found\n").await,
        gce::Answer::Token => {
            let policy = match (ctx.policy)() {
                Ok(p) => p,
                Err(e) => {
                    outcome.error = Some(format!("rules unreadable: {e:#}"));
                    return metadata_reply(client, 503, "text/plain", "the gateway's rules cannot be read\n").await;
                }
            };
            let url = policy.upstreams.get("google-token").map_or(gce::DEFAULT_TOKEN_URL, |u| u);
            let minted = match https::Url::parse(url) {
                Ok(url) => {
                    let dial = |host: String, port: u16| {
                        let policy = &policy;
                        async move {
                            super::proxy::decide(policy, &host, port)
                                .await
                                .map(|(a, _)| a)
                                .map_err(|d| anyhow::anyhow!("{host}: {d}"))
                        }
                    };
                    ctx.broker.minter.token(&url, dial).await
                }
                Err(e) => Err(e),
            };
            match minted {
                Ok((token, expires_in)) => {
                    outcome.allowed = true;
                    let body =
                        serde_json::json!({ "access_token": token, "expires_in": expires_in, "token_type": "Bearer" });
                    metadata_reply(client, 200, "application/json", &body.to_string()).await
                }
                Err(e) => {
                    outcome.error = Some(format!("{e:#}"));
                    let why = format!("agent-vm's gateway cannot mint a GCP token: {e:#}\n");
                    metadata_reply(client, 503, "text/plain", &why).await
                }
            }
        }
    }
}

/// The metadata server's answers carry its flavour, as clients check.
async fn metadata_reply<S: AsyncWrite + Unpin>(client: &mut S, code: u16, ctype: &str, body: &str) {
    answer(client, code, "Metadata-Flavor: Google\r\n", ctype, body).await
}

/// The broker's own refusals, in words for the agent (and its user).
async fn reply<S: AsyncWrite + Unpin>(client: &mut S, code: u16, why: &str) {
    answer(client, code, "", "text/plain; charset=utf-8", &format!("{why}\n")).await
}

async fn answer<S: AsyncWrite + Unpin>(client: &mut S, code: u16, extra: &str, ctype: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {code} {}\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.write_all(body.as_bytes()).await;
    let _ = client.shutdown().await;
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    }
}

/// The session variables that point an agent at the broker, for the
/// providers whose key `lookup` (the host's environment) has, and the GCE
/// metadata variables when `gcp`. Values are not secret.
pub fn session_env(lookup: impl Fn(&str) -> Option<String>, gcp: bool) -> Vec<(String, String)> {
    let base = format!("http://127.0.0.1:{}", super::VM_PORT);
    let mut env = Vec::new();
    for p in providers::PROVIDERS {
        if p.key(&lookup).is_some() {
            env.push((p.base_url.0.to_owned(), format!("{base}/{}{}", p.name, p.base_url.1)));
            env.extend(p.placeholders.iter().map(|v| (v.to_string(), providers::PLACEHOLDER.to_owned())));
        }
    }
    if gcp {
        let at = format!("127.0.0.1:{}", super::VM_PORT);
        env.push(("GCE_METADATA_HOST".into(), at.clone()));
        env.push(("GCE_METADATA_IP".into(), at));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(target: &str, headers: &[(&str, &str)]) -> Origin {
        Origin {
            method: "POST".into(),
            target: target.into(),
            version: "HTTP/1.1".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn the_agents_credentials_never_reach_the_provider_the_key_does() {
        let req = origin(
            "/gemini/v1beta/models?key=agent-vm-brokered&alt=sse",
            &[
                ("Host", "127.0.0.1:3128"),
                ("x-goog-api-key", "agent-vm-brokered"),
                ("Authorization", "Bearer stolen"),
                ("Proxy-Authorization", "Basic d3M6d3M="),
                ("Connection", "keep-alive"),
                ("Content-Length", "2"),
            ],
        );
        let up = https::Url::parse("https://generativelanguage.test:8443/base").unwrap();
        let head = String::from_utf8(upstream_head(
            &req,
            &up,
            "/v1beta/models",
            "key=agent-vm-brokered&alt=sse",
            "REAL",
            Auth::Header("x-goog-api-key"),
        ))
        .unwrap();
        assert_eq!(
            head,
            "POST /base/v1beta/models?alt=sse HTTP/1.1\r\nHost: generativelanguage.test:8443\r\nConnection: close\r\n\
             Content-Length: 2\r\nx-goog-api-key: REAL\r\n\r\n"
        );
    }

    #[test]
    fn sessions_get_base_urls_and_placeholders_for_the_keys_the_host_has() {
        let host = |v: &str| (v == "ANTHROPIC_API_KEY").then(|| "sk-real".to_owned());
        let env = session_env(host, false);
        assert_eq!(
            env,
            vec![
                ("ANTHROPIC_BASE_URL".to_owned(), "http://127.0.0.1:3128/anthropic".to_owned()),
                ("ANTHROPIC_AUTH_TOKEN".to_owned(), "agent-vm-brokered".to_owned())
            ]
        );
        assert!(!format!("{env:?}").contains("sk-real"));
        let env = session_env(|v| (v == "OPENAI_API_KEY").then(|| "k".into()), true);
        assert!(env.contains(&("OPENAI_BASE_URL".into(), "http://127.0.0.1:3128/openai/v1".into())));
        assert!(env.contains(&("GCE_METADATA_IP".into(), "127.0.0.1:3128".into())));
    }

    #[test]
    fn paths_stay_under_the_upstreams_base() {
        for ok in ["", "/", "/v1/messages", "/v1/models/", "/v1beta/models/gemini:generate", "/a.b/c..d"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in ["x", "/../v1", "/v1/..", "/%2e%2E/x", "/.", "//v1", "/v1//x", "/a\\b", "/a%5cb", "/a%2fb"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_base_url_of_the_hosts_is_the_upstream() {
        let b =
            Broker::with_keys([("OPENAI_BASE_URL".to_owned(), "https://llm.corp.test/openai/v1/".to_owned())].into());
        assert_eq!(b.base_url(providers::find("openai").unwrap()).as_deref(), Some("https://llm.corp.test/openai"));
        assert_eq!(b.base_url(providers::find("anthropic").unwrap()), None);
    }

    #[test]
    fn keys_handed_over_replace_the_held_ones() {
        let b = Broker::with_keys(HashMap::new());
        let anthropic = providers::find("anthropic").unwrap();
        b.set_keys([("ANTHROPIC_API_KEY".to_owned(), "one".to_owned()), ("PATH".to_owned(), "/bin".to_owned())].into());
        assert_eq!(b.key(anthropic), Some(("one".into(), Auth::Header("x-api-key"))));
        assert!(!b.keys.read().unwrap().contains_key("PATH"));
        b.set_keys([("ANTHROPIC_API_KEY".to_owned(), "two".to_owned())].into());
        b.set_keys(HashMap::new());
        assert_eq!(b.key(anthropic), Some(("two".into(), Auth::Header("x-api-key"))));
    }
}
