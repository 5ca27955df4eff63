use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};

use super::Context;
use crate::run::{Job, Output, Status};
use crate::workspace::{HostRepo, Vm, Workspace};
use crate::{printable, printable_lines};

/// The most commands `run` runs at once.
const MAX_JOBS: u32 = 256;

/// Run a command in several branches' workspaces at once
///
/// Pushes each branch first (as `agent-vm push` does, creating missing
/// branches and workspaces), then runs COMMAND in every workspace, at most
/// --jobs at a time, and ends with a table of exit status, duration and
/// commits made per branch. Output is streamed with a branch prefix, or
/// written to one log file per branch with --logs. Ctrl-C stops every
/// command (their whole process groups) in the VM. COMMAND's words are
/// passed as given (no shell parsing). Exit status: 0 when every command
/// succeeded, 1 otherwise, 130 when interrupted.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  agent-vm run fix-a fix-b fix-c -- claude -p 'fix the failing test'\n  \
agent-vm run --logs --fetch a b -- make test     # logs in outputs/<YYYYMMDD-HHMMSS>/<branch>.log\n  \
agent-vm run -j 2 a b c d -- bash -c 'make && make check'")]
pub struct Args {
    /// Commands running at once (default: the VM's vCPUs)
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_JOBS as i64))]
    jobs: Option<u32>,
    /// Write each branch's output to DIR/<YYYYMMDD-HHMMSS>/<branch>.log instead of the terminal
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true, default_missing_value = "outputs")]
    logs: Option<PathBuf>,
    /// Fetch each branch back to the host afterwards (as `agent-vm fetch` does)
    #[arg(long)]
    fetch: bool,
    #[command(flatten)]
    objects: super::push::ObjectsArg,
    /// Branches (their names on the host), then `--` and the command to
    /// run in each workspace. Options go before the first branch, so a
    /// branch may start with `-` (but not with `-j`, `-v` or `-q`).
    #[arg(required = true, value_name = "BRANCH... -- COMMAND", trailing_var_arg = true, allow_hyphen_values = true)]
    words: Vec<String>,
}

impl Args {
    /// The commands to run at once (when given), the branches and the
    /// command, split at the first `--`.
    fn split(&self) -> Result<(Option<u32>, &[String], &[String])> {
        let Some(at) = self.words.iter().position(|w| w == "--") else {
            bail!("missing `-- COMMAND`: write `agent-vm run BRANCH... -- COMMAND [ARGS]`");
        };
        let (mut branches, command) = (&self.words[..at], &self.words[at + 1..]);
        // The parser leaves `-j2` (a count run into its option, as cargo
        // and make take it) to the branches.
        let mut jobs = self.jobs;
        // Once the parser has left a word to the branches, it has left all
        // that follow: no first word is then known to be a branch.
        let mut joined = None;
        if let Some(n) = branches.first().and_then(|b| b.strip_prefix("-j")).filter(|n| !n.is_empty())
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            if jobs.is_some() {
                bail!("--jobs is given twice");
            }
            match n.parse::<u32>() {
                Ok(n @ 1..=MAX_JOBS) => jobs = Some(n),
                _ => bail!("-j{n}: the number of commands at once is 1 to {MAX_JOBS}"),
            }
            joined = Some(&branches[0]);
            branches = &branches[1..];
        }
        if branches.is_empty() {
            bail!("no BRANCH given: write `agent-vm run BRANCH... -- COMMAND [ARGS]`");
        }
        if command.is_empty() {
            bail!("no COMMAND after `--`: write `agent-vm run BRANCH... -- COMMAND [ARGS]`");
        }
        // Everything after the first branch is a branch: an option there is
        // a mistake, not a branch to create.
        const OPTIONS: [&str; 10] = [
            "-j",
            "--jobs",
            "--logs",
            "--fetch",
            "--ship-all-objects",
            "--instance",
            "-v",
            "--verbose",
            "-q",
            "--quiet",
        ];
        let option = |b: &String| OPTIONS.iter().any(|o| b == o || b.starts_with(&format!("{o}=")));
        if let Some(j) = joined
            && let Some(o) = branches.iter().find(|b| option(b))
        {
            bail!(
                "{o:?} after {j:?} is not read as an option: write the count after a space (`-j 2`) when options follow"
            );
        }
        if let Some(o) = branches.iter().skip(1).find(|b| option(b)) {
            bail!(
                "{o:?} after a branch: put options before the branches (`agent-vm run [OPTIONS] BRANCH... -- COMMAND`)"
            );
        }
        // The parser leaves what it cannot read as options (`-j2`, `-vj2`)
        // to the branches: short options run together are far likelier
        // there than a branch named so.
        if let Some(o) = branches.iter().find(|b| b.len() > 2 && ["-j", "-v", "-q"].iter().any(|s| b.starts_with(s))) {
            bail!("{o:?} is not an option here: give each option on its own (`-v -j 2`)");
        }
        Ok((jobs, branches, command))
    }
}

pub async fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (at_once, branches, command) = args.split()?;
    let mut seen = std::collections::HashSet::new();
    for b in branches {
        crate::workspace::validate_branch(b)?;
        if !seen.insert(b) {
            bail!("branch {b:?} is given twice");
        }
    }
    let host = HostRepo::discover()?;
    let env = crate::provision::session_env(&ctx.instance)?;
    let (backend, session) = super::session(ctx, true).await?;
    let endpoint = session.endpoint().clone();
    let vm = Vm::new(session)?;
    // Every branch stays locked for the whole run: no push, fetch or clean
    // of these workspaces meanwhile.
    let names: Vec<&str> = branches.iter().map(String::as_str).collect();
    let _locks = host.lock_branches(&names, &ctx.ui)?;
    let gateway_user = crate::vm::agent_user(backend.as_ref()).is_some();
    // Workspaces already at the host's tip need no push: one round trip
    // for all of them instead of a push each.
    let mut known = Vec::new();
    for branch in branches {
        if let Some(tip) = host.branch_tip(branch)? {
            known.push((Workspace::new(&host, branch), tip));
        }
    }
    let current = vm.at_tips(&known).await?;
    let mut up_to_date: std::collections::HashMap<String, _> = known
        .into_iter()
        .zip(current)
        .filter_map(|(found, current)| current.then(|| (found.0.branch.clone(), found)))
        .collect();
    let mut jobs = Vec::new();
    for branch in branches {
        let (ws, tip) = match up_to_date.remove(branch.as_str()) {
            Some(found) => {
                ctx.ui.say(&format!("~/{} is up to date with {branch:?}.", found.0.dir));
                found
            }
            None => super::push::push_locked(ctx, &host, &vm, branch, args.objects.objects()).await?,
        };
        let env = if gateway_user { crate::gateway::workspace_env(&ws.dir) } else { Vec::new() };
        jobs.push(Job { branch: branch.clone(), dir: ws.dir, base: tip.to_string(), env });
    }
    let parallel = match at_once {
        Some(n) => n as usize,
        None => match crate::vm::existing(backend.as_ref())?.cpus {
            Some(n) => n as usize,
            None => vm_cpus(&vm).await.unwrap_or(1),
        },
    };
    let output = match &args.logs {
        Some(dir) => {
            let dir = dir.join(jiff::Zoned::now().strftime("%Y%m%d-%H%M%S").to_string());
            ctx.ui.say(&format!("Logs: {}", dir.display()));
            Output::Logs(dir)
        }
        None => Output::Prefixed,
    };
    ctx.ui.say(&format!("Running in {} workspace(s), {parallel} at a time…", jobs.len()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ui = ctx.ui;
    let _stopper = tokio::spawn(async move {
        interrupted().await;
        ui.say("Interrupted: stopping every command in the VM…");
        let _ = stop_tx.send(true);
        // Stay alive so receivers keep waiting for the stop they saw.
        std::future::pending::<()>().await;
    });
    let mut stop = stop_rx.clone();
    let outcomes = crate::run::run_all(&endpoint, jobs, command, &env, parallel, &output, stop_rx).await;
    let interrupted =
        *stop.borrow() || outcomes.iter().any(|o| matches!(o.status, Status::Interrupted | Status::NotRun));
    print_table(&outcomes);
    let mut code = if interrupted {
        ExitCode::from(130)
    } else if outcomes.iter().all(|o| o.succeeded()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if args.fetch && !interrupted {
        for o in &outcomes {
            // Our handler keeps Ctrl-C from ending the process: it ends the
            // fetches here (a fetch is safe to cut short, as when killed).
            let fetched = tokio::select! {
                fetched = super::fetch::fetch_locked(ctx, &host, &vm, &o.job.branch) => fetched,
                _ = crate::run::stopped(&mut stop) => {
                    eprintln!("Interrupted: the remaining branches were not fetched.");
                    return Ok(ExitCode::from(130));
                }
            };
            match fetched {
                Ok(c) if c == ExitCode::SUCCESS => {}
                Ok(c) => code = c,
                Err(e) => {
                    eprintln!("error: fetching {:?}: {}", o.job.branch, printable_lines(&format!("{e:#}")));
                    code = ExitCode::FAILURE;
                }
            }
        }
    }
    Ok(code)
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

async fn vm_cpus(vm: &Vm) -> Option<usize> {
    let out = vm.session().exec("nproc").await.ok()?;
    out.stdout_str().trim().parse().ok()
}

fn print_table(outcomes: &[crate::run::Outcome]) {
    let rows: Vec<[String; 4]> = outcomes
        .iter()
        .map(|o| {
            let status = match &o.status {
                Status::Exited(0) => "ok".to_owned(),
                Status::Exited(n) => format!("exit {n}"),
                Status::Interrupted => "interrupted".to_owned(),
                Status::NotRun => "not run".to_owned(),
                Status::Failed(e) => format!("error: {}", printable(e)),
            };
            let commits = o.commits.map_or("-".to_owned(), |c| c.to_string());
            [printable(&o.job.branch), status, format!("{:.1}s", o.duration.as_secs_f64()), commits]
        })
        .collect();
    let header = ["BRANCH", "STATUS", "DURATION", "COMMITS"].map(String::from);
    let widths: Vec<usize> =
        (0..4).map(|i| rows.iter().chain([&header]).map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for row in [&header].into_iter().chain(rows.iter()) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        crate::outln!("{}", cells.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// `agent-vm ARGS` parsed as the binary parses it, down to the split.
    fn split(args: &[&str]) -> anyhow::Result<(Option<u32>, Vec<String>, Vec<String>)> {
        let cli = super::super::Cli::try_parse_from(["agent-vm"].iter().chain(args)).map_err(anyhow::Error::from)?;
        let super::super::Command::Run(run) = cli.command else { panic!("not run") };
        let (jobs, branches, command) = run.split()?;
        Ok((jobs, branches.to_vec(), command.to_vec()))
    }

    #[test]
    fn a_count_run_into_j_is_the_jobs_option_not_a_branch() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for args in [
            &["run", "-j2", "a", "b", "--", "true"][..],
            &["run", "-j", "2", "a", "b", "--", "true"],
            &["-v", "run", "-j2", "a", "b", "--", "true"],
        ] {
            let (jobs, branches, command) = split(args).unwrap();
            assert_eq!((jobs, branches, command), (Some(2), words(&["a", "b"]), words(&["true"])), "{args:?}");
        }
        // A branch may still start with `-` (but not `-j`, `-v`, `-q`).
        assert_eq!(split(&["run", "-x", "--", "true"]).unwrap(), (None, words(&["-x"]), words(&["true"])));
        for (args, error) in [
            (&["run", "-j", "3", "-j2", "a", "--", "true"][..], "given twice"),
            (&["run", "-j0", "a", "--", "true"], "1 to 256"),
            (&["run", "-j99999999999", "a", "--", "true"], "1 to 256"),
            (&["run", "-j2", "--", "true"], "no BRANCH"),
            (&["run", "-vj2", "a", "--", "true"], "give each option on its own"),
            (&["run", "-j2x", "a", "--", "true"], "give each option on its own"),
            (&["run", "-x", "-j2", "--", "true"], "give each option on its own"),
            // After `-j2` the parser reads nothing: options there are caught.
            (&["run", "-j2", "--fetch", "a", "--", "true"], "count after a space"),
            (&["run", "-j2", "-v", "a", "--", "true"], "count after a space"),
            (&["run", "-j2", "-j", "3", "a", "--", "true"], "count after a space"),
        ] {
            let e = format!("{:#}", split(args).unwrap_err());
            assert!(e.contains(error), "{args:?}: {e}");
        }
    }
}
