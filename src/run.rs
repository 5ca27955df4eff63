//! Running one command in many workspaces at once, with output streamed
//! (prefixed by branch) or logged, and every remote process stopped when
//! the run is interrupted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::printable;
use crate::shell;
use crate::ssh::{CONNECT_TIMEOUT, Endpoint, Event, Session};

/// Arguments as for [`shell::IN_DIR`] ($1 directory, $2 how many
/// `NAME=value` words follow to export, then the command). Runs the command
/// in a process group of its own (job control, `set -m`: no `setsid`
/// process to start), stdin from /dev/null; a watchdog reads our stdin and,
/// when it closes (we asked to stop, were killed, or the connection
/// dropped), kills the whole group: nothing is left running in the VM.
/// Read by bash ([`shell::login_script`] makes sure): dash turns job
/// control off without a terminal.
const WRAPPER: &str = concat!(
    r#"cd -- "$1" || exit 125
"#,
    shell::exports!(),
    r#"exec 3<&0
set -m
case $- in *m*) ;; *) echo "agent-vm: no job control in this shell" >&2; exit 125 ;; esac
"$@" </dev/null 3<&- &
pid=$!
set +m
{ while read -r _; do :; done
  kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null; } <&3 >/dev/null 2>&1 &
watch=$!
exec 3<&-
wait "$pid"
status=$?
kill "$watch" 2>/dev/null
exit "$status""#
);

/// Pairs of workspace and commit: for each, a line with how many commits
/// HEAD has that the commit lacks, or `-` when git cannot tell. A HEAD
/// still at the commit (the usual case) is read without starting git.
/// The agent can make it hang (a FIFO for HEAD): the host bounds it.
const COUNT_COMMITS: &str = r#"while [ $# -ge 2 ]; do
  head=
  { read -r head < "$1/.git/HEAD"; } 2>/dev/null
  case $head in "ref: refs/heads/"?*) { read -r head < "$1/.git/${head#ref: }"; } 2>/dev/null ;; esac
  if [ "$head" = "$2" ]; then echo 0
  else git -C "$1" rev-list --count "$2..HEAD" 2>/dev/null || echo -
  fi
  shift 2
done"#;

/// One command to run in one workspace.
#[derive(Debug, Clone)]
pub struct Job {
    pub branch: String,
    /// The workspace directory, relative to the VM home.
    pub dir: String,
    /// The workspace's branch tip before the run, to count new commits.
    pub base: String,
    /// `NAME=value` assignments the command runs with.
    pub env: Vec<String>,
}

/// Where a job's output goes.
#[derive(Debug, Clone)]
pub enum Output {
    /// Our stdout/stderr, each line prefixed with the branch.
    Prefixed,
    /// One file per branch in this directory (`<branch>.log`).
    Logs(PathBuf),
}

#[derive(Debug, Clone)]
pub enum Status {
    Exited(u32),
    /// Stopped by an interruption.
    Interrupted,
    /// Never started: the run was interrupted first.
    NotRun,
    /// Could not be run (connection, log file…).
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub job: Job,
    pub status: Status,
    pub duration: Duration,
    /// Commits the command added to the workspace's HEAD, when known.
    pub commits: Option<u64>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self.status, Status::Exited(0))
    }
}

/// Runs `argv` in every job's workspace, at most `parallel` at a time:
/// `parallel` workers, each with its own SSH connection (sshd limits
/// channels per connection, and a handshake is costly on a slow guest),
/// take jobs in order. Setting `stop` to true stops everything: running
/// commands are killed (their process groups), queued ones never start.
pub async fn run_all(
    endpoint: &Endpoint,
    jobs: Vec<Job>,
    argv: &[String],
    env: &[(String, String)],
    parallel: usize,
    output: &Output,
    stop: watch::Receiver<bool>,
) -> Vec<Outcome> {
    let width = jobs.iter().map(|j| printable(&j.branch).chars().count()).max().unwrap_or(0);
    let count = jobs.len();
    let queue =
        Arc::new(std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<std::collections::VecDeque<_>>()));
    let workers: Vec<_> = (0..parallel.clamp(1, count.max(1)))
        .map(|_| {
            let (endpoint, argv, env, output) = (endpoint.clone(), argv.to_vec(), env.to_vec(), output.clone());
            let (queue, stop) = (queue.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut session: Option<Session> = None;
                loop {
                    let Some((index, job)) = queue.lock().unwrap().pop_front() else {
                        break;
                    };
                    if *stop.borrow() {
                        done.push((
                            index,
                            Outcome { job, status: Status::NotRun, duration: Duration::ZERO, commits: None },
                        ));
                        continue;
                    }
                    let started = Instant::now();
                    let result = async {
                        if session.is_none() {
                            session = Some(Session::connect(&endpoint, CONNECT_TIMEOUT).await?);
                        }
                        let s = session.as_ref().expect("just connected");
                        run_one(s, &job, &argv, &env, &output, width, stop.clone()).await
                    }
                    .await;
                    let duration = started.elapsed();
                    done.push((
                        index,
                        match result {
                            Ok(status) => Outcome { job, status, duration, commits: None },
                            Err(e) => {
                                // Start afresh on the next job: the connection may be what failed.
                                session = None;
                                Outcome { job, status: Status::Failed(format!("{e:#}")), duration, commits: None }
                            }
                        },
                    ));
                }
                if let Some(s) = session {
                    s.close().await;
                }
                done
            })
        })
        .collect();
    let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(count);
    for w in workers {
        outcomes.extend(w.await.expect("run worker panicked"));
    }
    outcomes.sort_by_key(|(i, _)| *i);
    let mut outcomes: Vec<Outcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    if !*stop.borrow() {
        // The VM can make the counting take forever: bounded, and ended by
        // a stop like the commands (the table still comes).
        let mut stop = stop.clone();
        tokio::select! {
            counted = tokio::time::timeout(COUNT_TIMEOUT, count_commits(endpoint, &mut outcomes)) => {
                if counted.is_err() {
                    tracing::debug!("counting the commits made took too long");
                }
            }
            _ = stopped(&mut stop) => {}
        }
    }
    outcomes
}

/// How long the VM may take to count the commits made in every workspace.
const COUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// Fills in the commits each finished command made, in one round trip for
/// all (a session each costs more than the counting on a slow guest). Left
/// unknown when the VM cannot be asked or answers out of shape.
async fn count_commits(endpoint: &Endpoint, outcomes: &mut [Outcome]) {
    let finished: Vec<usize> =
        (0..outcomes.len()).filter(|&i| matches!(outcomes[i].status, Status::Exited(_))).collect();
    if finished.is_empty() {
        return;
    }
    let args: Vec<&str> =
        finished.iter().flat_map(|&i| [outcomes[i].job.dir.as_str(), outcomes[i].job.base.as_str()]).collect();
    let Ok(command) = shell::script(COUNT_COMMITS, &args) else { return };
    let answer = async {
        let session = Session::connect(endpoint, CONNECT_TIMEOUT).await?;
        let out = session.exec(&command).await;
        session.close().await;
        anyhow::Ok(out?)
    };
    let out = match answer.await {
        Ok(out) if out.status == 0 => out.stdout_str(),
        Ok(_) => return,
        Err(e) => {
            tracing::debug!("counting the commits made: {e:#}");
            return;
        }
    };
    let lines: Vec<&str> = out.lines().collect();
    if lines.len() != finished.len() {
        return;
    }
    for (&i, line) in finished.iter().zip(lines) {
        outcomes[i].commits = line.parse().ok();
    }
}

/// Resolves once a stop is asked for (never, if nobody can ask any more).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_one(
    session: &Session,
    job: &Job,
    argv: &[String],
    env: &[(String, String)],
    output: &Output,
    width: usize,
    mut stop: watch::Receiver<bool>,
) -> Result<Status> {
    let mut sink = Sink::new(output, &job.branch, width)?;
    let args = shell::in_dir(Some(&job.dir), &job.env, argv);
    let (mut read, write) = session.open_exec_env(&shell::login_script(WRAPPER, &args)?, env).await?;
    let mut status = None;
    let mut interrupted = false;
    loop {
        tokio::select! {
            event = read.next() => match event {
                None => break,
                Some(Event::Stdout(data)) => sink.write(false, &data)?,
                Some(Event::Stderr(data)) => sink.write(true, &data)?,
                Some(Event::Exit(code)) => status = Some(code),
            },
            _ = stopped(&mut stop), if !interrupted => {
                // Closing the command's stdin is the watchdog's signal.
                interrupted = true;
                let _ = write.eof().await;
            }
        }
    }
    sink.finish()?;
    if interrupted {
        return Ok(Status::Interrupted);
    }
    Ok(Status::Exited(status.unwrap_or(255)))
}

/// Where one job's bytes go: whole lines with a prefix on our terminal
/// (VM output is untrusted: control characters are neutralised), or raw
/// into its log file.
enum Sink {
    Prefixed { prefix: String, partial: [Vec<u8>; 2] },
    Log(std::fs::File),
}

impl Sink {
    fn new(output: &Output, branch: &str, width: usize) -> Result<Sink> {
        Ok(match output {
            Output::Prefixed => {
                let name = printable(branch);
                let pad = width.saturating_sub(name.chars().count());
                Sink::Prefixed { prefix: format!("{name}{} | ", " ".repeat(pad)), partial: [Vec::new(), Vec::new()] }
            }
            Output::Logs(dir) => {
                let path = log_path(dir, branch);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
                }
                Sink::Log(std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?)
            }
        })
    }

    fn write(&mut self, stderr: bool, data: &[u8]) -> Result<()> {
        match self {
            Sink::Log(f) => f.write_all(data)?,
            Sink::Prefixed { prefix, partial } => {
                let buf = &mut partial[stderr as usize];
                buf.extend_from_slice(data);
                while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    emit(stderr, prefix, &line[..line.len() - 1]);
                }
                // A command that never ends its line must not fill our memory:
                // past MAX_LINE, what it sent so far is shown as a line.
                if buf.len() > MAX_LINE {
                    emit(stderr, prefix, buf);
                    buf.clear();
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        match self {
            Sink::Log(f) => f.flush()?,
            Sink::Prefixed { prefix, partial } => {
                for (i, buf) in partial.iter_mut().enumerate() {
                    if !buf.is_empty() {
                        emit(i == 1, prefix, buf);
                        buf.clear();
                    }
                }
            }
        }
        Ok(())
    }
}

fn emit(stderr: bool, prefix: &str, line: &[u8]) {
    let text: String =
        String::from_utf8_lossy(line).chars().map(|c| if c.is_control() && c != '\t' { '?' } else { c }).collect();
    if stderr {
        eprintln!("{prefix}{text}");
    } else {
        crate::outln!("{prefix}{text}");
    }
}

/// The longest unfinished line `run` keeps before showing it.
const MAX_LINE: usize = 64 << 10;

/// `<dir>/<branch>.log`: git's rules for branch names (no `..`, no leading
/// `/`, no component starting with `.`) make this a path inside `dir`. A
/// name with capitals or non-ASCII letters gets a short hash of its own
/// (`Fix-A-1f2e3d4c.log`): on a case-insensitive or normalising filesystem
/// (macOS) `Fix-A` and `fix-a`, or two spellings of `é`, would otherwise
/// share one file.
pub fn log_path(dir: &std::path::Path, branch: &str) -> PathBuf {
    if branch.bytes().all(|b| !b.is_ascii_uppercase() && b.is_ascii()) {
        return dir.join(format!("{branch}.log"));
    }
    use sha1::Digest;
    let hash = sha1::Sha1::digest(branch.as_bytes());
    let short: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{branch}-{short}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count script run by sh with the host's git: a line per pair, in
    /// order, `-` where a workspace cannot answer.
    #[test]
    fn commits_are_counted_for_every_workspace_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let git = |dir: &std::path::Path, args: &[&str]| crate::test_git::git(dir, args).trim().to_owned();
        let dirs = ["a", "b", "c"].map(|d| tmp.path().join(d));
        let mut bases = Vec::new();
        for (dir, made) in dirs.iter().zip([2, 0, 1]) {
            std::fs::create_dir(dir).unwrap();
            git(dir, &["init", "-q"]);
            git(dir, &["commit", "-q", "--allow-empty", "-m", "base"]);
            bases.push(git(dir, &["rev-parse", "HEAD"]));
            for i in 0..made {
                git(dir, &["commit", "-q", "--allow-empty", "-m", &format!("c{i}")]);
            }
        }
        // Where the branch's file is gone (packed), git is asked.
        git(&dirs[2], &["pack-refs", "--all"]);
        let [a, b, c] = dirs.each_ref().map(|d| d.to_str().unwrap());
        let args = [a, &bases[0], "/nonexistent", &bases[0], b, &bases[1], a, "not-a-commit", c, &bases[2]];
        let out = std::process::Command::new("sh").arg("-c").arg(shell::script(COUNT_COMMITS, &args).unwrap()).output();
        assert_eq!(String::from_utf8(out.unwrap().stdout).unwrap(), "2\n-\n0\n-\n1\n");
    }

    /// The wrapper run by bash as the VM's account shell runs it: in the
    /// directory, with the exports, the command's status; and once its
    /// stdin closes, every process of the command's group is gone, a
    /// grandchild too.
    #[test]
    fn the_wrapper_runs_the_command_and_its_stdin_closing_ends_the_group() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let exports = vec!["AVM_A=one two".to_owned(), "AVM_B=$(x)".to_owned()];
        let argv = ["sh", "-c", "pwd; printf '%s|%s\\n' \"$AVM_A\" \"$AVM_B\"; exit 7"];
        let line = shell::login_script(WRAPPER, &shell::in_dir(Some(dir.path().to_str().unwrap()), &exports, &argv));
        // Our end of stdin stays open while it runs, as over SSH.
        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(line.unwrap())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(7));
        assert_eq!(out, format!("{}\none two|$(x)\n", dir.path().canonicalize().unwrap().display()));

        // A command that leaves a grandchild behind and waits: closing our
        // end of its stdin must end both.
        let pids = dir.path().join("pids");
        let script = format!("sleep 300 & echo $! > {0}; echo $$ >> {0}; wait", pids.display());
        let argv = ["sh", "-c", script.as_str()];
        let line = shell::login_script(WRAPPER, &shell::in_dir(Some("/"), &[], &argv)).unwrap();
        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(line)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while std::fs::read_to_string(&pids).map_or(true, |p| p.lines().count() < 2) {
            assert!(started.elapsed() < Duration::from_secs(10), "the command never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let listed = std::fs::read_to_string(&pids).unwrap();
        let running =
            |pid: &&str| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert_eq!(listed.lines().filter(running).count(), 2);
        drop(child.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                for pid in listed.lines() {
                    let _ = std::process::Command::new("kill").args(["-KILL", pid]).status();
                }
                let _ = child.kill();
                panic!("still running 5 s after its stdin closed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(143), "ended by TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while listed.lines().any(|p| running(&p)) {
            assert!(std::time::Instant::now() < deadline, "left running: {listed}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn log_paths_stay_inside_the_directory() {
        let dir = std::path::Path::new("/logs");
        assert_eq!(log_path(dir, "feature/x"), PathBuf::from("/logs/feature/x.log"));
        for b in ["-x", "a b", "$(x)", "ü"] {
            let p = log_path(dir, b);
            assert_eq!(p.parent(), Some(dir), "{b}");
        }
    }

    #[test]
    fn log_files_differ_where_the_filesystem_ignores_case_or_normalises() {
        let dir = std::path::Path::new("/logs");
        let folded = |b: &str| log_path(dir, b).to_string_lossy().to_lowercase();
        let names = ["fix-a", "Fix-A", "FIX-A", "feature/x", "Feature/x", "caf\u{e9}", "cafe\u{301}", "cafe"];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            // NFD of both spellings of é is the same: compare without accents too.
            let key = folded(n).replace('\u{301}', "").replace('\u{e9}', "e");
            assert!(seen.insert(key.clone()), "{n} shares a log file with another branch: {key}");
        }
        assert_eq!(log_path(dir, "fix-a"), PathBuf::from("/logs/fix-a.log"), "plain names stay readable");
    }

    #[test]
    fn an_endless_line_is_shown_in_pieces_not_kept() {
        let mut sink = Sink::new(&Output::Prefixed, "b", 1).unwrap();
        for _ in 0..40 {
            sink.write(false, &[b'x'; 8192]).unwrap();
            let Sink::Prefixed { partial, .. } = &sink else { panic!() };
            assert!(partial[0].len() <= MAX_LINE, "{} bytes kept", partial[0].len());
        }
    }

    #[test]
    fn prefixed_output_keeps_partial_lines_until_complete() {
        let mut sink = Sink::new(&Output::Prefixed, "b", 3).unwrap();
        sink.write(false, b"ab").unwrap();
        let Sink::Prefixed { partial, prefix } = &sink else { panic!() };
        assert_eq!(prefix, "b   | ");
        assert_eq!(partial[0], b"ab");
        sink.write(false, b"c\nd").unwrap();
        let Sink::Prefixed { partial, .. } = &sink else { panic!() };
        assert_eq!(partial[0], b"d");
    }
}
