use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::Result;
use serde::Serialize;

use super::Context;
use crate::vm::find_on_path;

/// Check that everything agent-vm needs on this machine is installed
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the checks as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    required: bool,
    detail: String,
    /// How to fix it on this OS, when it is not ok.
    fix: Option<String>,
}

const MACOS: bool = cfg!(target_os = "macos");

fn install(brew: &str, apt: &str) -> String {
    if MACOS { format!("brew install {brew}") } else { format!("sudo apt-get install {apt}") }
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let limactl = std::env::var_os("AGENT_VM_LIMACTL").map(PathBuf::from).or_else(|| find_on_path("limactl"));
    let lima_fix = if MACOS {
        "brew install lima".to_owned()
    } else {
        "install Lima from https://lima-vm.io/docs/installation/ (or set AGENT_VM_LIMACTL)".to_owned()
    };
    let checks = vec![
        user(),
        lima(limactl, lima_fix),
        tool("ssh", find_on_path("ssh"), &["-V"], true, install("openssh", "openssh-client")),
        sshfs(),
        fuse(),
        tool("git", find_on_path("git"), &["--version"], false, install("git", "git")),
    ];
    let mut checks = checks;
    checks.extend(gateway(ctx));
    let failed = checks.iter().any(|c| c.required && !c.ok);
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok     ",
                (false, true) => "MISSING",
                (false, false) => "missing",
            };
            crate::outln!("{mark}  {:<8} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                crate::outln!("         {:<8} fix: {fix}", "");
            }
        }
        if failed {
            crate::outln!("\nSomething agent-vm needs is missing: see the fixes above.");
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// agent-vm runs as the user: limactl exits at once as root, and the VM's
/// user takes the host user's name and uid.
fn user() -> Check {
    let root = crate::vm::is_root();
    Check {
        name: "user",
        ok: !root,
        required: true,
        detail: if root { "running as root".to_owned() } else { whoami::username().unwrap_or_default() },
        fix: root.then(|| "run agent-vm as your own user: limactl refuses to run as root".to_owned()),
    }
}

/// limactl runs, and is at least the template's `minimumLimaVersion`.
fn lima(path: Option<PathBuf>, install_fix: String) -> Check {
    let Some(path) = path.filter(|p| p.is_file()) else { return tool("limactl", None, &[], true, install_fix) };
    let out = Command::new(&path).arg("--version").stdin(Stdio::null()).output();
    let said = match &out {
        Ok(o) => String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).trim().to_owned(),
        Err(e) => format!("cannot run: {e}"),
    };
    let minimum = minimum_lima_version();
    let problem = match (&out, parse_version(&said)) {
        (Ok(o), _) if !o.status.success() => Some(format!("`limactl --version` failed: {}", crate::printable(&said))),
        (Err(_), _) => Some(said.clone()),
        (_, None) => Some(format!("cannot tell the version from {:?}", crate::printable(&said))),
        (_, Some(v)) if minimum.is_some_and(|m| v < m) => {
            let m = minimum.unwrap();
            Some(format!(
                "Lima {}.{}.{} is older than {}.{}.{}, which agent-vm's template needs",
                v.0, v.1, v.2, m.0, m.1, m.2
            ))
        }
        _ => None,
    };
    let detail = format!("{} ({})", path.display(), problem.as_deref().unwrap_or(said.lines().next().unwrap_or("")));
    Check {
        name: "limactl",
        ok: problem.is_none(),
        required: true,
        detail,
        fix: problem.map(|_| "install a current Lima: https://lima-vm.io/docs/installation/".to_owned()),
    }
}

type Version = (u64, u64, u64);

/// The first `X.Y[.Z]` in a version line (`limactl version 2.2.0`, `v2.2.0-3-gabc`).
fn parse_version(text: &str) -> Option<Version> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.')).find_map(|word| {
        let mut parts = word.split('.').map(|p| p.parse::<u64>().ok());
        let (major, minor) = (parts.next()??, parts.next()??);
        Some((major, minor, parts.next().flatten().unwrap_or(0)))
    })
}

fn minimum_lima_version() -> Option<Version> {
    crate::provision::TEMPLATE
        .lines()
        .find_map(|l| l.strip_prefix("minimumLimaVersion:"))
        .and_then(|v| parse_version(v.trim().trim_matches('"')))
}

/// The instance's network gateway, once the VM has an agent user: without
/// it the agent has no network (not a host prerequisite: never required).
fn gateway(ctx: &Context) -> Option<Check> {
    let backend = ctx.backend().ok()?;
    crate::vm::agent_user(backend.as_ref())?;
    let state = crate::gateway::running(&crate::gateway::Paths::new(&backend.state_dir()));
    let (ok, detail) = match state {
        Some(s) if s.phase == "ready" => (true, format!("ready (pid {}, since {})", s.pid, s.since)),
        Some(s) => (false, crate::printable(&format!("{}: {}", s.phase, s.error.unwrap_or_default()))),
        None => (false, "not running: the agent has no network".to_owned()),
    };
    let fix = (!ok).then(|| "any command that reaches the running VM starts it, e.g. `agent-vm status`".to_owned());
    Some(Check { name: "gateway", ok, required: false, detail, fix })
}

/// sshfs, and whether it guards symlinks itself besides agent-vm's relay.
fn sshfs() -> Check {
    let mut check =
        tool("sshfs", find_on_path("sshfs"), &["--version"], true, install("gromgit/fuse/sshfs-mac", "sshfs"));
    if check.ok {
        let own = match crate::mount::sshfs_contains_symlinks() {
            Ok(true) => "and by sshfs's contain_symlinks",
            Ok(false) => "sshfs itself has no contain_symlinks (CVE-2026-47187): upgrading it adds a second guard",
            Err(_) => "sshfs -h failed",
        };
        check.detail = format!("{}; symlinks kept in the mount by agent-vm's SFTP relay, {own}", check.detail);
    }
    check
}

fn tool(name: &'static str, path: Option<PathBuf>, version_args: &[&str], required: bool, fix: String) -> Check {
    let Some(path) = path.filter(|p| p.is_file()) else {
        return Check { name, ok: false, required, detail: "not found".to_owned(), fix: Some(fix) };
    };
    let version = version_of(&path, version_args);
    Check { name, ok: true, required, detail: format!("{} ({version})", path.display()), fix: None }
}

fn version_of(path: &Path, args: &[&str]) -> String {
    match Command::new(path).args(args).stdin(Stdio::null()).output() {
        Ok(out) => {
            // Some tools (ssh -V) print their version on stderr.
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        }
        Err(e) => format!("cannot run: {e}"),
    }
}

fn fuse() -> Check {
    let (ok, detail, fix) = if MACOS {
        let found = ["/Library/Filesystems/macfuse.fs", "/Library/Application Support/fuse-t"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        (
            found.is_some(),
            found.unwrap_or("neither macFUSE nor FUSE-T found").to_owned(),
            "brew install --cask macfuse (or fuse-t)",
        )
    } else {
        let dev = Path::new("/dev/fuse").exists();
        let helper = find_on_path("fusermount3").or_else(|| find_on_path("fusermount"));
        let detail = match (&helper, dev) {
            (Some(h), true) => format!("/dev/fuse, {}", h.display()),
            (None, _) => "fusermount3/fusermount not found".to_owned(),
            (_, false) => "/dev/fuse missing (load the fuse module: sudo modprobe fuse)".to_owned(),
        };
        (dev && helper.is_some(), detail, "sudo apt-get install fuse3")
    };
    Check { name: "fuse", ok, required: true, detail, fix: (!ok).then(|| fix.to_owned()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_limactl_says() {
        assert_eq!(parse_version("limactl version 2.2.0"), Some((2, 2, 0)));
        assert_eq!(parse_version("limactl version v2.2.0-153-g183a60d7"), Some((2, 2, 0)));
        assert_eq!(parse_version("limactl version 1.10"), Some((1, 10, 0)));
        assert_eq!(parse_version("limactl version <unknown>"), None);
        assert!(minimum_lima_version().is_some(), "the template names its minimum Lima version");
    }
}
