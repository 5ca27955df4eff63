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

pub async fn run(_ctx: &Context, args: Args) -> Result<ExitCode> {
    let limactl = std::env::var_os("AGENT_VM_LIMACTL").map(PathBuf::from).or_else(|| find_on_path("limactl"));
    let lima_fix = if MACOS {
        "brew install lima".to_owned()
    } else {
        "install Lima from https://lima-vm.io/docs/installation/ (or set AGENT_VM_LIMACTL)".to_owned()
    };
    let checks = vec![
        tool("limactl", limactl, &["--version"], true, lima_fix),
        tool("ssh", find_on_path("ssh"), &["-V"], true, install("openssh", "openssh-client")),
        tool("sshfs", find_on_path("sshfs"), &["--version"], true, install("gromgit/fuse/sshfs-mac", "sshfs")),
        fuse(),
        tool("git", find_on_path("git"), &["--version"], false, install("git", "git")),
    ];
    let failed = checks.iter().any(|c| c.required && !c.ok);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok     ",
                (false, true) => "MISSING",
                (false, false) => "missing",
            };
            println!("{mark}  {:<8} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("         {:<8} fix: {fix}", "");
            }
        }
        if failed {
            println!("\nSomething agent-vm needs is missing: see the fixes above.");
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
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
