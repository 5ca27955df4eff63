//! Which destinations the gateway connects to: the instance's mode, its
//! allow and deny rules (config, live rules, the default allowlist), and
//! the addresses it never dials unless a rule names them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The default allowlist: the four agents' services and the package
/// registries the provisioned tools use. One pattern per line.
pub const DEFAULT_ALLOWLIST: &str = include_str!("allowlist.txt");

/// What the agent may reach through the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The allow rules (the default allowlist included), minus the deny rules.
    #[default]
    Allowlist,
    /// Any public host, minus the deny rules; still logged.
    Open,
    /// Nothing.
    None,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Allowlist => "allowlist",
            Mode::Open => "open",
            Mode::None => "none",
        })
    }
}

/// One destination pattern: `host`, `*.domain` (its subdomains), an IP
/// address or `addr/len` network; each optionally with `:port`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pattern: Pattern,
    port: Option<u16>,
    /// As written, for the log and messages.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Host(String),
    Subdomains(String),
    Net(IpAddr, u8),
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule> {
        let t = text.trim();
        let bad = || {
            format!(
                "{t:?} is not a destination rule (host, *.domain, IP address or network, each with an optional :port)"
            )
        };
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!(bad());
        }
        // [v6]:port, v4:port, host:port; a bare v6 address has several colons.
        let (body, port) = if let Some(rest) = t.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').with_context(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p.parse().ok().with_context(bad)?),
                None if after.is_empty() => None,
                None => bail!(bad()),
            };
            (addr, port)
        } else if t.matches(':').count() == 1 {
            let (b, p) = t.split_once(':').unwrap();
            (b, Some(p.parse().ok().with_context(bad)?))
        } else {
            (t, None)
        };
        let pattern = if let Some((addr, len)) = body.split_once('/') {
            let addr: IpAddr = addr.parse().ok().with_context(bad)?;
            let len: u8 = len.parse().ok().with_context(bad)?;
            if len > if addr.is_ipv4() { 32 } else { 128 } {
                bail!(bad());
            }
            Pattern::Net(addr, len)
        } else if let Ok(addr) = body.parse::<IpAddr>() {
            Pattern::Net(addr, if addr.is_ipv4() { 32 } else { 128 })
        } else if let Some(domain) = body.strip_prefix("*.") {
            Pattern::Subdomains(host_name(domain).with_context(bad)?)
        } else {
            Pattern::Host(host_name(body).with_context(bad)?)
        };
        Ok(Rule { pattern, port, text: t.to_owned() })
    }

    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// Whether the rule names `host` (as the agent asked for it).
    fn matches_name(&self, host: &str, port: u16) -> bool {
        self.port_ok(port)
            && match &self.pattern {
                Pattern::Host(h) => h == host,
                Pattern::Subdomains(d) => {
                    host.strip_suffix(d.as_str()).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1)
                }
                Pattern::Net(..) => host.parse::<IpAddr>().is_ok_and(|ip| self.matches_addr(ip, port)),
            }
    }

    /// Whether the rule names the address `ip`.
    fn matches_addr(&self, ip: IpAddr, port: u16) -> bool {
        let Pattern::Net(net, len) = self.pattern else { return false };
        self.port_ok(port) && in_net(canonical(ip), canonical(net), len)
    }
}

/// A host name as rules and requests are compared: lower case, no trailing
/// dot, only the characters DNS names use.
pub fn host_name(text: &str) -> Option<String> {
    let h = text.trim_end_matches('.').to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(h)
}

/// The instance's rules, as the gateway applies them.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub mode: Mode,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
    /// Names the gateway resolves to these addresses instead of asking DNS
    /// (like curl's --resolve); pinning a name also permits its address.
    pub resolve: BTreeMap<String, IpAddr>,
    /// Where the credential broker sends each provider's requests instead
    /// of its usual endpoint (`https://host[:port][/path]`).
    pub upstreams: BTreeMap<String, String>,
}

/// Why a request went one way or the other.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allowed { rule: String },
    Refused { rule: String },
}

impl Policy {
    /// The policy of one instance: its mode and rules from the config file,
    /// the live rules (`agent-vm network allow/deny`, which come last and
    /// so win over the config), and the default allowlist.
    pub fn new(mode: Mode, allow: &[String], deny: &[String], resolve: BTreeMap<String, IpAddr>) -> Result<Policy> {
        let mut rules = Vec::new();
        for line in
            DEFAULT_ALLOWLIST.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty())
        {
            rules.push(Rule::parse(line)?);
        }
        for a in allow {
            rules.push(Rule::parse(a)?);
        }
        let deny = deny.iter().map(|d| Rule::parse(d)).collect::<Result<Vec<_>>>()?;
        let resolve = resolve
            .into_iter()
            .map(|(name, ip)| Ok((host_name(&name).with_context(|| format!("{name:?} is not a host name"))?, ip)))
            .collect::<Result<_>>()?;
        Ok(Policy { mode, allow: rules, deny, resolve, upstreams: BTreeMap::new() })
    }

    /// The decision on the name the agent asked for, before any lookup.
    pub fn check_name(&self, host: &str, port: u16) -> Verdict {
        if self.mode == Mode::None {
            return Verdict::Refused { rule: "network: none".into() };
        }
        if let Some(d) = self.deny.iter().find(|r| r.matches_name(host, port)) {
            return Verdict::Refused { rule: format!("deny {}", d.text) };
        }
        if self.mode == Mode::Open {
            return Verdict::Allowed { rule: "network: open".into() };
        }
        match self.allow.iter().find(|r| r.matches_name(host, port)) {
            Some(a) => Verdict::Allowed { rule: format!("allow {}", a.text) },
            None => Verdict::Refused { rule: "not in the allowlist".into() },
        }
    }

    /// Whether the gateway may dial `ip` for `host`: public addresses, and
    /// the others (loopback, private, link-local, …) only when a rule names
    /// the address or the name is pinned to it.
    pub fn check_addr(&self, host: &str, ip: IpAddr, port: u16) -> Verdict {
        let ip = canonical(ip);
        if let Some(d) = self.deny.iter().find(|r| r.matches_addr(ip, port)) {
            return Verdict::Refused { rule: format!("deny {}", d.text) };
        }
        if !is_special(ip) {
            return Verdict::Allowed { rule: String::new() };
        }
        if self.resolve.get(host).is_some_and(|pinned| canonical(*pinned) == ip) {
            return Verdict::Allowed { rule: format!("resolve {host}") };
        }
        match self.allow.iter().find(|r| r.matches_addr(ip, port)) {
            Some(a) => Verdict::Allowed { rule: format!("allow {}", a.text) },
            None => Verdict::Refused { rule: format!("{ip} is a loopback, private or link-local address") },
        }
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Addresses that are not the public internet: this machine, its LAN, the
/// VM network, cloud metadata (169.254.169.254), multicast, reserved.
pub fn is_special(ip: IpAddr) -> bool {
    const V4: &[(&str, u8)] = &[
        ("0.0.0.0", 8),
        ("10.0.0.0", 8),
        ("100.64.0.0", 10),
        ("127.0.0.0", 8),
        ("169.254.0.0", 16),
        ("172.16.0.0", 12),
        ("192.0.0.0", 24),
        ("192.168.0.0", 16),
        ("198.18.0.0", 15),
        ("224.0.0.0", 4),
        ("240.0.0.0", 4),
    ];
    const V6: &[(&str, u8)] = &[("::", 127), ("fc00::", 7), ("fe80::", 10), ("ff00::", 8), ("64:ff9b::", 96)];
    let ip = canonical(ip);
    let nets: &[(&str, u8)] = if ip.is_ipv4() { V4 } else { V6 };
    nets.iter().any(|(net, len)| in_net(ip, net.parse().unwrap(), *len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode, allow: &[&str], deny: &[&str]) -> Policy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Policy::new(mode, &s(allow), &s(deny), BTreeMap::new()).unwrap()
    }

    fn allowed(v: Verdict) -> bool {
        matches!(v, Verdict::Allowed { .. })
    }

    #[test]
    fn rules_parse_and_refuse_nonsense() {
        for ok in [
            "example.com",
            "*.example.com",
            "10.0.0.5",
            "10.0.0.0/8:443",
            "[::1]:8080",
            "fd00::/8",
            "h:22",
            "EXAMPLE.com.",
        ] {
            Rule::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a b", "*.", "x:y", "10.0.0.0/33", "[::1", "a..b", "exa$mple.com", "http://x", "a\nb"] {
            assert!(Rule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allowlist_mode_allows_listed_hosts_only() {
        let p = policy(Mode::Allowlist, &["example.com", "*.corp.test", "api.x:8443"], &[]);
        assert!(allowed(p.check_name("example.com", 443)));
        assert!(allowed(p.check_name("a.b.corp.test", 80)));
        assert!(!allowed(p.check_name("corp.test", 80)), "a wildcard names subdomains only");
        assert!(!allowed(p.check_name("evilcorp.test", 80)));
        assert!(!allowed(p.check_name("example.com.evil.test", 443)));
        assert!(allowed(p.check_name("api.x", 8443)));
        assert!(!allowed(p.check_name("api.x", 443)), "the port is part of the rule");
        assert!(!allowed(p.check_name("unlisted.test", 443)));
        // The default allowlist is in: the agents' own services.
        assert!(allowed(p.check_name("api.anthropic.com", 443)));
        assert!(allowed(p.check_name("registry.npmjs.org", 443)));
    }

    #[test]
    fn deny_wins_and_none_refuses_everything() {
        let p = policy(Mode::Allowlist, &["*.example.com"], &["secret.example.com"]);
        assert!(!allowed(p.check_name("secret.example.com", 443)));
        assert!(allowed(p.check_name("www.example.com", 443)));
        let open = policy(Mode::Open, &[], &["*.evil.test"]);
        assert!(allowed(open.check_name("anything.test", 443)));
        assert!(!allowed(open.check_name("x.evil.test", 443)));
        let none = policy(Mode::None, &["example.com"], &[]);
        assert!(!allowed(none.check_name("example.com", 443)));
        assert!(!allowed(none.check_name("api.anthropic.com", 443)));
    }

    #[test]
    fn special_addresses_need_a_rule_naming_them() {
        let p = policy(Mode::Open, &["127.0.0.1:9000", "10.1.0.0/16"], &[]);
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.5.2",
            "169.254.169.254",
            "100.64.1.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd12::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(!allowed(p.check_addr("x.test", ip.parse().unwrap(), 80)), "{ip}");
        }
        assert!(allowed(p.check_addr("x.test", "127.0.0.1".parse().unwrap(), 9000)));
        assert!(!allowed(p.check_addr("x.test", "127.0.0.1".parse().unwrap(), 9001)));
        assert!(allowed(p.check_addr("x.test", "10.1.200.3".parse().unwrap(), 22)));
        assert!(
            allowed(p.check_addr("x.test", "::ffff:10.1.0.9".parse().unwrap(), 22)),
            "mapped addresses are their v4"
        );
        assert!(allowed(p.check_addr("x.test", "93.184.215.14".parse().unwrap(), 443)));
        assert!(allowed(p.check_addr("x.test", "2606:2800::1".parse().unwrap(), 443)));
        // A deny rule on an address holds for any name that resolves to it.
        let d = policy(Mode::Open, &[], &["93.184.215.0/24"]);
        assert!(!allowed(d.check_addr("x.test", "93.184.215.14".parse().unwrap(), 443)));
    }

    #[test]
    fn a_pinned_name_may_reach_its_address_only() {
        let mut resolve = BTreeMap::new();
        resolve.insert("Local.Test".to_owned(), "127.0.0.1".parse().unwrap());
        let p = Policy::new(Mode::Allowlist, &["local.test".into()], &[], resolve).unwrap();
        assert!(allowed(p.check_addr("local.test", "127.0.0.1".parse().unwrap(), 8080)));
        assert!(!allowed(p.check_addr("local.test", "127.0.0.2".parse().unwrap(), 8080)));
        assert!(!allowed(p.check_addr("other.test", "127.0.0.1".parse().unwrap(), 8080)));
    }
}
