use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::Context;
use crate::shell;
use crate::workspace::host_path;

/// Open a shell (or run a command) in the VM
///
/// Starts (or creates) the VM first if needed. With BRANCH, pushes the
/// branch into its workspace first (as `agent-vm push` does, creating the
/// branch from HEAD if the host lacks it) and works in that workspace. With `-- CMD…`, runs CMD instead of a shell and exits
/// with its status; CMD's words are passed exactly as given (no shell
/// parsing): write `-- bash -c 'make && make test'` for shell syntax.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  agent-vm connect                      # login shell in the VM\n  \
agent-vm connect feature-x            # shell in the feature-x workspace\n  \
agent-vm connect -- uname -a          # run a command, exit with its status\n  \
cd \"$(agent-vm connect --print-path feature-x)\"   # the workspace, on this machine")]
pub struct Args {
    /// Branch whose workspace to open (one starting with `-` works too)
    #[arg(allow_hyphen_values = true)]
    branch: Option<String>,
    /// Fail instead of starting the VM when it is not running
    #[arg(long, conflicts_with = "branch")]
    no_start: bool,
    #[command(flatten)]
    objects: super::push::ObjectsArg,
    /// Do not mount the VM's ~/workspace on this machine
    #[arg(long)]
    no_mount: bool,
    /// Only print where BRANCH's workspace appears on this machine (through
    /// the mount), for `cd "$(agent-vm connect --print-path BRANCH)"`
    #[arg(long, requires = "branch", conflicts_with_all = ["command", "no_start", "no_mount"])]
    print_path: bool,
    /// Command to run instead of an interactive shell
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    if args.print_path {
        let branch = args.branch.as_deref().expect("clap requires BRANCH");
        crate::workspace::validate_branch(branch)?;
        let host = crate::workspace::HostRepo::discover()?;
        let mount = super::mount_of(ctx.backend()?.as_ref())?;
        if !matches!(mount.state()?, crate::mount::State::Mounted) {
            ctx.ui.say(&format!("note: {} is not mounted now; `agent-vm mount` mounts it", mount.point.display()));
        }
        crate::outln!("{}", host_path(&mount.point, &crate::workspace::Workspace::new(&host, branch)).display());
        return Ok(ExitCode::SUCCESS);
    }
    let branch_ws = match &args.branch {
        Some(branch) => {
            crate::workspace::validate_branch(branch)?;
            let host = crate::workspace::HostRepo::discover()?;
            let ws = crate::workspace::Workspace::new(&host, branch);
            Some((host, ws))
        }
        None => None,
    };
    let (backend, session) = super::session(ctx, branch_ws.is_some() || !args.no_start).await?;
    let ws = branch_ws.as_ref().map(|(_, ws)| ws);
    match crate::vm::agent_contained(backend.as_ref()) {
        Some(true) => {}
        Some(false) => ctx.ui.say(
            "warning: the agent in this VM is NOT contained: it has sudo (config.yaml `agent: {sudo: true}`), so it \
             can lift the firewall and reach the network directly.",
        ),
        None => ctx.ui.say(
            "warning: the agent in this VM is NOT contained: the VM was provisioned before agent-vm ran agents as \
             an unprivileged user with egress only through its gateway. Run `agent-vm provision` to switch it over.",
        ),
    }
    if !args.no_mount {
        // The shell is still useful without the mount: warn, do not fail.
        let mount = super::mount_of(backend.as_ref())?;
        match mount.ensure(&session, &ctx.ui).await {
            Ok(_) => match ws {
                Some(ws) => ctx.ui.say(&format!("On this machine: {}", host_path(&mount.point, ws).display())),
                None => ctx.ui.say(&format!("VM workspaces on this machine: {}", mount.point.display())),
            },
            Err(e) => ctx.ui.say(&format!("warning: no workspace mount: {e:#}")),
        }
    }
    // Sessions in a workspace name it to the gateway, for its log.
    let exports = match ws {
        Some(ws) if crate::vm::agent_user(backend.as_ref()).is_some() => crate::gateway::workspace_env(&ws.dir),
        _ => Vec::new(),
    };
    let cwd = ws.map(|w| w.dir.as_str());
    // A shell is itself a login shell; a command gets what one reads.
    let command = shell::in_dir(cwd, &exports, &args.command);
    let line = match args.command.is_empty() {
        true => shell::in_dir_command(cwd, &exports, &["bash", "--login"])?,
        false => shell::login_script(shell::IN_DIR, &command)?,
    };
    // API keys and the like from envvars.txt travel in the SSH session's
    // environment, never on a command line.
    let env = crate::provision::session_env(&ctx.instance)?;
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let session = Arc::new(session);
    if let Some((host, ws)) = &branch_ws {
        let vm = crate::workspace::Vm::from_session(session.clone())?;
        // A command in a workspace the push would not change, the usual
        // case: checked and run in one round trip.
        if !args.command.is_empty()
            && !interactive
            && let Some(tip) = host.branch_tip(&ws.branch)?
        {
            let up_to_date = || ctx.ui.say(&format!("~/{} is up to date with {:?}.", ws.dir, ws.branch));
            let (mut out, mut err) = (tokio::io::stdout(), tokio::io::stderr());
            let ran = vm.exec_if_current(ws, tip, &command, &env, up_to_date, tokio::io::stdin(), &mut out, &mut err);
            if let Some(status) = ran.await? {
                return Ok(exit_code(status));
            }
        }
        super::push::push_branch(ctx, host, &vm, &ws.branch, args.objects.objects()).await?;
    }
    let endpoint = session.endpoint().clone();
    if args.command.is_empty() || interactive {
        // A terminal session: OpenSSH handles the tty, window size and
        // signals natively, so hand the process over to it.
        let mut ssh = ssh_command(&endpoint, session.control_path(), &env, interactive);
        if !args.command.is_empty() || cwd.is_some() || !exports.is_empty() {
            ssh.arg("--").arg(&line);
        }
        let err = ssh.exec();
        return Err(err).context("cannot run ssh (install OpenSSH; `agent-vm doctor` checks)");
    }
    // Scripts and pipes: run over SSH with exact stdin/stdout/stderr and
    // exit status, and no ssh process.
    let status = session
        .exec_io_env(&line, &env, tokio::io::stdin(), &mut tokio::io::stdout(), &mut tokio::io::stderr())
        .await?;
    Ok(exit_code(status))
}

/// The system ssh for a terminal session: `ssh … <alias>`, the remote
/// command to be added.
fn ssh_command(
    endpoint: &crate::ssh::Endpoint,
    shared: Option<&std::path::Path>,
    env: &[(String, String)],
    interactive: bool,
) -> std::process::Command {
    let mut ssh = std::process::Command::new("ssh");
    ssh.arg("-F").arg(&endpoint.config_file);
    ssh.arg(if interactive { "-t" } else { "-T" });
    // On agent-vm's shared connection when there is one, else a connection
    // of its own; never Lima's master (ControlMaster auto in its
    // ssh.config): a session on a master opened by someone else (Lima's host
    // agent does at boot, before provisioning sets sshd's AcceptEnv)
    // silently loses the variables below. Nothing of the host is forwarded,
    // whatever the user's own ssh config says for `Host *` (the ssh backend
    // reads it).
    ssh.args(["-o", "ControlMaster=no", "-o"]);
    ssh.arg(match shared {
        Some(path) => format!("ControlPath={}", path.display()),
        None => "ControlPath=none".to_owned(),
    });
    ssh.args(["-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes"]);
    // Errors only: no "Shared connection … closed." after every session.
    ssh.args(["-o", "LogLevel=ERROR"]);
    // The agent user, whatever the config's User says.
    ssh.arg("-l").arg(&endpoint.user);
    // The session's values, not whatever this process inherited under the
    // same names: a brokered key's placeholder must never become the
    // host's real key.
    for (name, value) in env {
        ssh.arg("-o").arg(format!("SendEnv={name}"));
        ssh.env(name, value);
    }
    ssh.arg(&endpoint.alias);
    ssh
}

fn exit_code(status: u32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(255))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What OpenSSH makes of the session's options (`ssh -G`, no
    /// connection) over a user config that forwards everything.
    #[test]
    fn the_session_forwards_nothing_and_shares_no_master() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            "Host big\n  HostName 127.0.0.1\n  ControlMaster auto\n  ControlPath ~/.ssh/cm-%r@%h:%p\n\
             Host *\n  ForwardAgent yes\n  ForwardX11 yes\n  RemoteForward 6000 localhost:6000\n",
        )
        .unwrap();
        let ep = crate::ssh::Endpoint::for_tests("big", config);
        let cmd = ssh_command(&ep, None, &[("ANTHROPIC_API_KEY".into(), "secret".into())], true);
        let out = std::process::Command::new("ssh").arg("-G").args(cmd.get_args()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let seen = String::from_utf8_lossy(&out.stdout).to_lowercase();
        for line in ["forwardagent no", "forwardx11 no", "clearallforwardings yes", "controlmaster false"] {
            assert!(seen.lines().any(|l| l == line), "ssh -G lacks {line:?}:\n{seen}");
        }
        assert!(!seen.lines().any(|l| l.starts_with("controlpath ")), "a shared master's socket: {seen}");
        assert!(seen.contains("sendenv anthropic_api_key"), "{seen}");
        assert!(!cmd.get_args().any(|a| a.to_string_lossy().contains("secret")), "a value on the command line");
        // The session's value goes, whatever this process has under the name
        // (here: the test's own environment, whichever it is).
        let cmd = ssh_command(&ep, None, &[("ANTHROPIC_AUTH_TOKEN".into(), "agent-vm-brokered".into())], false);
        let set: Vec<_> = cmd.get_envs().collect();
        let name = std::ffi::OsStr::new("ANTHROPIC_AUTH_TOKEN");
        assert_eq!(set, vec![(name, Some(std::ffi::OsStr::new("agent-vm-brokered")))]);
    }
}
