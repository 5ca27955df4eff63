//! HTTPS stand-ins for internet services: TLS servers on the host's
//! loopback with certificates from a CA of the test's own, which records
//! every request it gets and answers through a function of the test's.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request the stub got: its head as sent, and its body (up to 1 MiB).
#[derive(Debug, Clone)]
pub struct Request {
    pub head: String,
    pub body: String,
}

impl Request {
    /// `METHOD PATH`.
    pub fn line(&self) -> &str {
        let first = self.head.lines().next().unwrap_or_default();
        first.rsplit_once(' ').map_or(first, |(l, _)| l)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find_map(|(k, v)| k.trim().eq_ignore_ascii_case(name).then_some(v.trim()))
    }
}

pub struct Stub {
    pub port: u16,
    /// The CA that signed its certificate, PEM.
    pub ca_pem: String,
    pub seen: Arc<Mutex<Vec<Request>>>,
}

impl Stub {
    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

/// A CA of the test's own, and a server certificate for `names` from it.
pub struct Ca {
    pub pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "agent-vm test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), cert, key }
    }

    /// An HTTPS server for `names` on 127.0.0.1; `respond` gets each
    /// request and returns its status (`200 OK`), content type and body.
    pub fn serve(&self, names: &[&str], respond: fn(&Request) -> (&'static str, &'static str, String)) -> Stub {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        crate::common::serve_connections(listener, move |tcp| {
            tcp.set_read_timeout(Some(Duration::from_secs(20))).ok();
            let Ok(tls) = rustls::ServerConnection::new(config.clone()) else { return };
            let mut stream = rustls::StreamOwned::new(tls, tcp);
            // Keep-alive: clients may send several requests.
            while let Some(request) = read_request(&mut stream) {
                log.lock().unwrap().push(request.clone());
                let (status, ctype, body) = respond(&request);
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                if stream.write_all(reply.as_bytes()).and_then(|_| stream.flush()).is_err() || close {
                    stream.conn.send_close_notify();
                    let _ = stream.flush();
                    return;
                }
            }
        });
        Stub { port, ca_pem: self.pem.clone(), seen }
    }
}

fn read_request(stream: &mut impl Read) -> Option<Request> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let mut request = Request { head: String::from_utf8_lossy(&head).into_owned(), body: String::new() };
    let len: usize = request.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    stream.read_exact(&mut body).ok()?;
    request.body = String::from_utf8_lossy(&body).into_owned();
    Some(request)
}
