//! The broker's way to the providers: TLS from the host, verified against
//! the host's trust store (with `SSL_CERT_FILE` / `SSL_CERT_DIR`, as on
//! hosts behind a TLS-inspecting proxy), and a small HTTP/1.1 client for
//! the token endpoint.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const TIMEOUT: Duration = Duration::from_secs(30);
/// The largest token-endpoint answer read.
const MAX_ANSWER: usize = 1 << 20;

/// An `https://host[:port][/base]` upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// The path prefix, without a trailing slash ("" or "/api").
    pub base: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url> {
        let rest = text.strip_prefix("https://").ok_or_else(|| anyhow!("{text:?} is not an https:// URL"))?;
        let (auth, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match auth.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| anyhow!("bad port in {text:?}"))?),
            None => (auth, 443),
        };
        if host.is_empty() || host.contains(['@', '[', ']']) || base.contains(['?', '#']) {
            bail!("{text:?} is not host[:port][/path]");
        }
        Ok(Url { host: host.to_ascii_lowercase(), port, base: base.to_owned() })
    }

    /// The Host header's value.
    pub fn authority(&self) -> String {
        if self.port == 443 { self.host.clone() } else { format!("{}:{}", self.host, self.port) }
    }
}

fn connector() -> Result<TlsConnector> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(format!("no trusted CA certificates on this machine ({:?})", found.errors));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
    });
    config.clone().map(TlsConnector::from).map_err(|e| anyhow!("{e}"))
}

/// A TLS connection to `url`'s host, dialled at one of `addrs` (checked by
/// the policy), its certificate verified for the host name.
pub async fn connect(url: &Url, addrs: &[SocketAddr]) -> Result<TlsStream<TcpStream>> {
    let mut last = anyhow!("no address for {}", url.host);
    for addr in addrs {
        match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                tcp.set_nodelay(true).ok();
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|_| anyhow!("{} is not a valid TLS name", url.host))?;
                return tokio::time::timeout(TIMEOUT, connector()?.connect(name, tcp))
                    .await
                    .map_err(|_| anyhow!("TLS with {} timed out", url.host))?
                    .with_context(|| format!("TLS with {}", url.host));
            }
            Ok(Err(e)) => last = anyhow!("cannot reach {}: {e}", url.host),
            Err(_) => last = anyhow!("cannot reach {}: timed out", url.host),
        }
    }
    Err(last)
}

/// POSTs a form to `url` (+ `path`); the status and body of the answer.
pub async fn post_form(url: &Url, addrs: &[SocketAddr], path: &str, form: &str) -> Result<(u16, Vec<u8>)> {
    let mut tls = connect(url, addrs).await?;
    let head = format!(
        "POST {}{path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        url.base,
        url.authority(),
        form.len()
    );
    let exchange = async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(form.as_bytes()).await?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = match tls.read(&mut chunk).await {
                Ok(n) => n,
                // Servers that close without TLS's close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 || answer.len() > MAX_ANSWER {
                return Ok(answer);
            }
            answer.extend_from_slice(&chunk[..n]);
        }
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{} did not answer within 30 s", url.host))?
        .with_context(|| format!("talking to {}", url.host))?;
    parse_answer(&answer).ok_or_else(|| anyhow!("{} sent a malformed HTTP answer", url.host))
}

/// Status and body (Content-Length, chunked, or to the end).
fn parse_answer(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut body = raw[end + 4..].to_vec();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(len);
    }
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let u = Url::parse("https://openrouter.ai/api/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base.as_str()), ("openrouter.ai", 443, "/api"));
        let u = Url::parse("https://API.test:8443").unwrap();
        assert_eq!((u.authority(), u.base.as_str()), ("api.test:8443".to_owned(), ""));
        for bad in ["http://a.test", "https://", "https://u@a.test", "https://a.test/x?y", "https://a.test:x"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_with_each_framing() {
        let r = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing").unwrap();
        assert_eq!(r, (200, b"{}".to_vec()));
        let r = parse_answer(b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n");
        assert_eq!(r.unwrap(), (400, b"abcd".to_vec()));
        let r = parse_answer(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.1, b"all of it");
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_none());
    }
}
