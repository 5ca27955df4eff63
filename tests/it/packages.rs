//! scripts/check-packages against an npm registry of the test's own on
//! loopback: a pinned agent whose native-binary package is not published
//! for one of the VM's CPUs fails the check (npm would skip it and the
//! agent's install script fail in the VM).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;

/// Serves `docs` (path → JSON) over HTTP/1.0 on loopback; 404 otherwise.
fn registry(docs: &'static [(&'static str, &'static str)]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            reader.read_line(&mut line).unwrap();
            while let Ok(n) = reader.read_line(&mut String::new()) {
                if n <= 2 {
                    break;
                }
            }
            let path = line.split(' ').nth(1).unwrap_or("");
            let reply = match docs.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
                None => "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
            };
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    url
}

fn check(url: &str, npm_list: &str, pins: &str) -> (Option<i32>, String) {
    let common = tempfile::tempdir().unwrap();
    let packages = common.path().join("packages");
    std::fs::create_dir_all(&packages).unwrap();
    std::fs::write(packages.join("npm-packages.txt"), npm_list).unwrap();
    std::fs::write(packages.join("versions.txt"), pins).unwrap();
    let out = Command::new("python3")
        .arg(crate::common::repo().join("scripts/check-packages"))
        .arg("--common")
        .arg(common.path())
        .env("NPM_CONFIG_REGISTRY", url)
        .env("no_proxy", "127.0.0.1")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

const DOCS: &[(&str, &str)] = &[
    // All there but the musl builds, which a Debian VM does not need.
    (
        "/agent/1.0",
        r#"{"version":"1.0","optionalDependencies":{"agent-linux-x64":"1.0","agent-linux-arm64":"1.0","agent-linux-x64-musl":"1.0","agent-darwin-arm64":"1.0"}}"#,
    ),
    ("/agent-linux-x64/1.0", r#"{"version":"1.0","os":["linux"],"cpu":["x64"],"libc":["glibc"]}"#),
    ("/agent-linux-arm64/1.0", r#"{"version":"1.0","os":["linux"],"cpu":["arm64"],"libc":["glibc"]}"#),
    // The arm64 build of 2.0 was never published; only musl stands in.
    (
        "/agent/2.0",
        r#"{"version":"2.0","optionalDependencies":{"agent-linux-x64":"2.0","agent-linux-arm64":"2.0","agent-linux-arm64-musl":"2.0"}}"#,
    ),
    ("/agent-linux-x64/2.0", r#"{"version":"2.0","os":["linux"],"cpu":["x64"]}"#),
    ("/agent-linux-arm64-musl/2.0", r#"{"version":"2.0","os":["linux"],"cpu":["arm64"],"libc":["musl"]}"#),
    // An optional helper built for one CPU only is no requirement for the other.
    ("/tool/3.0", r#"{"version":"3.0","optionalDependencies":{"pty-linux-x64":"1.1"}}"#),
    ("/pty-linux-x64/1.1", r#"{"version":"1.1","os":["linux"],"cpu":["x64"]}"#),
];

#[test]
fn check_packages_wants_each_cpus_native_binary() {
    let url = registry(DOCS);
    let (code, out) = check(&url, "agent\ntool\n", "agent=1.0\ntool=3.0\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("npm: 2 pinned versions found"), "{out}");

    let (code, out) = check(&url, "agent\ntool\n", "agent=2.0\ntool=3.0\n");
    assert_eq!(code, Some(1), "{out}");
    let missing: Vec<&str> = out.lines().filter(|l| l.starts_with("MISSING:")).collect();
    assert_eq!(missing.len(), 1, "{out}");
    assert!(
        missing[0].contains("agent@2.0")
            && missing[0].contains("linux-arm64")
            && missing[0].contains("agent-linux-arm64@2.0 not published"),
        "{out}"
    );
    assert!(!missing[0].contains("x64"), "x64 is there: {out}");
}
