use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};

use super::Context;
use crate::ssh::{Endpoint, HostKeyPolicy};

/// Print an OpenSSH Host entry for the VM (for editors and plain ssh)
///
/// The entry is named after the instance (`agent-vm` by default), so
/// `ssh agent-vm`, VS Code Remote-SSH and Zed can open the VM. With
/// --install, agent-vm keeps the entry in its own file (rewritten whenever
/// it starts the VM, since the SSH port changes) and adds one `Include`
/// line for such files at the top of ~/.ssh/config, once.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  agent-vm ssh-config --install && ssh agent-vm\n  \
code --remote ssh-remote+agent-vm /home/$USER.linux/workspace")]
pub struct Args {
    /// Write the entry to agent-vm's ssh directory and include it from ~/.ssh/config
    #[arg(long)]
    install: bool,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let backend = ctx.backend()?;
    crate::vm::existing(backend.as_ref())?;
    let endpoint = backend.ssh_endpoint()?;
    if !args.install {
        crate::out!("{}", entry(backend.instance(), &endpoint)?);
        return Ok(ExitCode::SUCCESS);
    }
    let file = write_entry(backend.instance(), &endpoint)?;
    let config = crate::home_dir()?.join(".ssh/config");
    if add_include(&config, &include_line()?)? {
        ctx.ui.say(&format!("Added `{}` to {}.", include_line()?, config.display()));
    } else {
        ctx.ui.say(&format!("{} already includes agent-vm's entries.", config.display()));
    }
    ctx.ui.say(&format!("Wrote {}: `ssh {}` opens the VM.", file.display(), backend.instance()));
    Ok(ExitCode::SUCCESS)
}

/// Where installed entries live, one file per instance.
fn dir() -> Result<PathBuf> {
    Ok(crate::config::dir()?.join("ssh"))
}

fn include_line() -> Result<String> {
    Ok(format!("Include {}", value(&dir()?.join("*.conf"))?))
}

/// Rewrites the instance's installed entry if there is one (after a start
/// the port differs). Not installed: nothing to do.
pub(super) fn refresh(instance: &str, endpoint: &Endpoint) -> Result<()> {
    if dir()?.join(format!("{instance}.conf")).exists() {
        write_entry(instance, endpoint)?;
    }
    Ok(())
}

fn write_entry(instance: &str, endpoint: &Endpoint) -> Result<PathBuf> {
    let dir = dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join(format!("{instance}.conf"));
    write_atomically(&file, entry(instance, endpoint)?.as_bytes(), 0o600)?;
    Ok(file)
}

/// The Host entry, from what agent-vm itself connects with. It comes first
/// in ~/.ssh/config (the Include is the top line) and OpenSSH takes the
/// first value it reads, so a `Host *` with `ForwardAgent yes` below it
/// forwards nothing into the VM.
fn entry(instance: &str, ep: &Endpoint) -> Result<String> {
    let mut out = format!(
        "# agent-vm instance '{instance}' (rewritten by agent-vm when it starts the VM)\nHost {instance}\n  \
         HostName {}\n  Port {}\n  User {}\n  IdentitiesOnly yes\n  \
         ForwardAgent no\n  ForwardX11 no\n  ClearAllForwardings yes\n",
        value(Path::new(&ep.host))?,
        ep.port,
        value(Path::new(&ep.user))?
    );
    for key in &ep.identity_files {
        out.push_str(&format!("  IdentityFile {}\n", value(key)?));
    }
    match &ep.host_key {
        HostKeyPolicy::AcceptAny => {
            out.push_str("  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        }
        HostKeyPolicy::KnownHosts(file) => out.push_str(&format!("  UserKnownHostsFile {}\n", value(file)?)),
    }
    Ok(out)
}

/// One ssh_config value: double-quoted when it has spaces. ssh_config has
/// no escape for `"`, so such values are refused.
fn value(v: &Path) -> Result<String> {
    let v = v.to_str().with_context(|| format!("{} is not UTF-8", v.display()))?;
    if v.contains(['"', '\n', '\r']) || v.is_empty() {
        bail!("{v:?} cannot be written into an ssh config file");
    }
    Ok(if v.contains([' ', '\t']) { format!("\"{v}\"") } else { v.to_owned() })
}

/// Puts `line` first in the ssh config (an `Include` after a `Host` line
/// would only apply to that host) unless it is there already. Returns
/// whether the file changed.
fn add_include(config: &Path, line: &str) -> Result<bool> {
    let ssh_dir = config.parent().expect("a file in ~/.ssh");
    if !ssh_dir.exists() {
        std::fs::create_dir_all(ssh_dir)?;
        std::fs::set_permissions(ssh_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    let (text, mode) = match std::fs::read_to_string(config) {
        Ok(t) => (t, std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(config)?.permissions()) & 0o7777),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o600),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", config.display())),
    };
    if text.lines().any(|l| l.trim() == line) {
        return Ok(false);
    }
    let new = format!("# Added by agent-vm (`agent-vm ssh-config --install`)\n{line}\n\n{text}");
    write_atomically(config, new.as_bytes(), mode)?;
    Ok(true)
}

/// Replaces `path` with `data` so that no reader sees half a file and an
/// interruption leaves the old one.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("a file in a directory");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_goes_first_once_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join(".ssh/config");
        assert!(add_include(&config, "Include /x/*.conf").unwrap());
        std::fs::write(&config, format!("{}Host a\n  Port 1\n", std::fs::read_to_string(&config).unwrap())).unwrap();
        assert!(!add_include(&config, "Include /x/*.conf").unwrap());
        let text = std::fs::read_to_string(&config).unwrap();
        assert_eq!(text.matches("Include /x/*.conf").count(), 1);
        assert!(text.find("Include").unwrap() < text.find("Host a").unwrap());
        assert!(text.ends_with("Host a\n  Port 1\n"));
    }

    /// OpenSSH's own reading of the user's config (`ssh -G`, no connection):
    /// a `Host *` asking for agent and X11 forwarding and a port forward
    /// below the Include forwards nothing into the VM.
    #[test]
    fn the_entry_forwards_nothing_whatever_host_star_says() {
        let dir = tempfile::tempdir().unwrap();
        let ep = Endpoint::for_tests("lima-vm1", dir.path().join("ssh.config"));
        let entry_file = dir.path().join("vm1.conf");
        std::fs::write(&entry_file, entry("vm1", &ep).unwrap()).unwrap();
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            format!(
                "Include {}\nHost *\n  ForwardAgent yes\n  ForwardX11 yes\n  LocalForward 5000 localhost:5000\n",
                entry_file.display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new("ssh").arg("-G").arg("-F").arg(&config).arg("vm1").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let seen = String::from_utf8_lossy(&out.stdout).to_lowercase();
        for line in ["forwardagent no", "forwardx11 no", "clearallforwardings yes", "port 2222"] {
            assert!(seen.lines().any(|l| l == line), "ssh -G lacks {line:?}:\n{seen}");
        }
    }

    #[test]
    fn values_with_quotes_are_refused() {
        assert_eq!(value(Path::new("/a b/k")).unwrap(), "\"/a b/k\"");
        assert!(value(Path::new("/a\"b")).is_err());
    }
}
