//! Talking to one VM for workspace operations: push (creating the
//! workspace as needed), fetch, list, remove.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use git2::{Oid, Repository};

use super::progress::Counted;
use super::scripts::*;
use super::{HostRepo, Progress, Workspace, contains, integrate, view};
use crate::printable;
use crate::shell;
use crate::ssh::Session;
use crate::transport;

/// Talks to one VM for workspace operations.
pub struct Vm {
    session: Arc<Session>,
    remote: transport::Remote,
}

/// Which objects may leave the host when a repository's cache is seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objects {
    /// Only what the pushed branch's history needs (the default).
    Branch,
    /// Every object in the host repository, its packs copied verbatim (no
    /// walk over the history), but other branches, stashes and unreachable
    /// objects reach the VM too, and the agent can read them.
    All,
}

/// How a push ended.
#[derive(Debug, PartialEq)]
pub enum Pushed {
    Created,
    Updated,
    UpToDate,
}

/// What a push checks on its own connection before sending anything.
struct Guard {
    refname: String,
    tip: Oid,
}

/// Refs the VM rejected in a push: name, git's reason, and what the VM
/// printed.
type Rejected = Vec<(String, String, String)>;

/// Pushes through `remote` (connected or not), with progress.
fn push_through(remote: &mut git2::Remote, refspec: &str, bar: &Progress) -> Result<Rejected> {
    let mut rejected = Vec::new();
    // What the VM's git and hooks print ("remote: …"): the reason behind a
    // rejection. Untrusted and bounded; shown only through `printable`.
    let mut said = Vec::new();
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.sideband_progress(|text| {
        let room = MAX_REMOTE_SAID.saturating_sub(said.len());
        said.extend_from_slice(&text[..text.len().min(room)]);
        true
    });
    callbacks.push_update_reference(|name, status| {
        if let Some(msg) = status {
            rejected.push((name.to_owned(), msg.to_owned()));
        }
        Ok(())
    });
    callbacks.pack_progress(|_stage, current, total| {
        bar.objects("Packing", current, total);
    });
    callbacks.push_transfer_progress(|current, total, bytes| {
        bar.transfer("Pushing", current, total, bytes);
    });
    let mut opts = git2::PushOptions::new();
    opts.remote_callbacks(callbacks);
    remote.push(&[refspec], Some(&mut opts))?;
    drop(opts);
    let said = remote_said(&said);
    Ok(rejected.into_iter().map(|(name, why)| (name, why, said.clone())).collect())
}

const MAX_REMOTE_SAID: usize = 8 << 10;

/// The VM's sideband text as lines, progress meters (carriage-return
/// redraws) dropped.
fn remote_said(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split('\n')
        .filter_map(|l| l.rsplit('\r').find(|p| !p.trim().is_empty()))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Vm {
    pub fn new(session: Session) -> Result<Vm> {
        Self::from_session(Arc::new(session))
    }

    /// A [`Vm`] on a session shared with the caller.
    pub fn from_session(session: Arc<Session>) -> Result<Vm> {
        let remote = transport::Remote::new(session.clone())?;
        Ok(Vm { session, remote })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn into_session(self) -> Arc<Session> {
        self.session.clone()
    }

    async fn script(&self, script: &str, args: &[&str], what: &str) -> Result<String> {
        let out = self.session.exec(&shell::script(script, args)?).await?.check(what)?;
        Ok(out.stdout_str())
    }

    /// Runs `command` (the words of [`shell::in_dir`]) in a login session
    /// in the VM if `ws`'s branch there
    /// is at `tip`, as a push of the host's branch would leave it, streaming
    /// its input and output: one round trip where a push and then the command
    /// would take two. `None`: the workspace is elsewhere or missing, and
    /// nothing ran (its input untouched).
    #[allow(clippy::too_many_arguments)] // the command's three streams
    pub async fn exec_if_current<R, W, E>(
        &self,
        ws: &Workspace,
        tip: Oid,
        command: &[String],
        env: &[(String, String)],
        on_current: impl FnOnce(),
        stdin: R,
        stdout: &mut W,
        stderr: &mut E,
    ) -> Result<Option<u32>>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin,
        E: tokio::io::AsyncWrite + Unpin,
    {
        use crate::ssh::Event;
        use tokio::io::AsyncWriteExt;
        let t = tip.to_string();
        let mut args = vec![ws.dir.as_str(), ws.branch.as_str(), t.as_str()];
        args.extend(command.iter().map(String::as_str));
        let line = shell::login_script_after(IF_CURRENT, shell::IN_DIR, &args)?;
        let (mut read, write) = self.session.open_exec_env(&line, env).await?;
        // The answer's first line, before any of the command's output.
        let mut head = Vec::new();
        while head.len() < CURRENT.len() {
            match read.next().await {
                Some(Event::Stdout(data)) => head.extend_from_slice(&data),
                Some(Event::Stderr(data)) => stderr.write_all(&data).await?,
                Some(Event::Exit(_)) => {}
                None => break,
            }
            if !CURRENT.starts_with(&head[..head.len().min(CURRENT.len())]) {
                return Ok(None);
            }
        }
        if !head.starts_with(CURRENT) {
            return Ok(None);
        }
        on_current();
        stdout.write_all(&head[CURRENT.len()..]).await?;
        Ok(Some(crate::ssh::relay(read, write, stdin, stdout, stderr).await?))
    }

    /// Which of the workspaces have their branch at the given tip (a push
    /// would change nothing), in one round trip. The VM's word: a `true` only
    /// saves a push the agent could undo anyway.
    pub async fn at_tips(&self, wanted: &[(Workspace, Oid)]) -> Result<Vec<bool>> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let tips: Vec<String> = wanted.iter().map(|(_, t)| t.to_string()).collect();
        let mut args = Vec::new();
        for ((ws, _), t) in wanted.iter().zip(&tips) {
            args.extend([ws.dir.as_str(), ws.branch.as_str(), t.as_str()]);
        }
        let out = self.script(AT_TIPS, &args, "checking the workspaces").await?;
        let said: Vec<bool> = out.lines().map(|l| l == "current").collect();
        if said.len() != wanted.len() {
            bail!("unexpected answer from the VM while checking the workspaces");
        }
        Ok(said)
    }

    /// What the VM says about the workspace, with its uncommitted changes
    /// counted.
    pub async fn probe(&self, ws: &Workspace) -> Result<Probe> {
        let out = self.script(PROBE, &[&ws.dir, &ws.branch], "inspecting the workspace").await?;
        parse_probe(&out, &ws.branch)
            .ok_or_else(|| anyhow!("unexpected answer from the VM while inspecting {}", ws.dir))
    }

    /// Pushes the host branch into its workspace, creating the workspace
    /// (seeded through the repository's cache) when needed. Never forced:
    /// refuses when the VM branch has commits the host lacks.
    pub async fn push(&self, host: &HostRepo, ws: &Workspace, objects: Objects, progress: &Progress) -> Result<Pushed> {
        let tip = host.branch_tip(&ws.branch)?.ok_or_else(|| anyhow!("host branch {:?} does not exist", ws.branch))?;
        // The usual cases first, in one round trip: the VM's tip comes from
        // the ref advertisement of the push's own connection, and a missing
        // workspace whose objects the VM has is created in that connection
        // first. Uncommitted changes need no check here: the VM's
        // updateInstead refuses the push itself when they are in the way.
        let label = host.git_dir.to_string_lossy().into_owned();
        let t = tip.to_string();
        let args = [ws.cache.as_str(), &ws.dir, &ws.branch, &label, &t];
        let spec = format!("refs/heads/{0}:refs/heads/{0}", ws.branch);
        let guard = Guard { refname: format!("refs/heads/{}", ws.branch), tip };
        let prepare = shell::unless_exists(&ws.dir, &shell::script(PREPARE_WORKSPACE, &args)?)?;
        // A new workspace may be checked out before the push can start.
        progress.waiting("Opening the workspace in the VM");
        let pushed = match self.git_push(host, &ws.dir, Some(prepare), &spec, progress, Some(guard)).await {
            Ok(pushed) => pushed,
            Err(e) => {
                return self.create(host, &args, tip, objects, progress).await?.ok_or(e);
            }
        };
        // None: the guard found commits in the VM that the host lacks.
        let Some(pushed) = pushed else {
            bail!(
                "the VM's {0:?} has commits the host does not have: run `agent-vm fetch {0}` first, \
                 then push again (nothing was changed)",
                ws.branch
            );
        };
        Ok(pushed)
    }

    /// Creates the workspace if it does not exist (None when it does),
    /// after seeding the repository's cache (when new) or pushing the
    /// branch into it. `args` as for [`PREPARE_WORKSPACE`].
    async fn create(
        &self,
        host: &HostRepo,
        args: &[&str; 5],
        tip: Oid,
        objects: Objects,
        progress: &Progress,
    ) -> Result<Option<Pushed>> {
        let [cache, dir, branch, ..] = *args;
        match self.script(ENSURE_CACHE, &[cache, dir], "preparing the workspace").await?.trim() {
            "present" => return Ok(None),
            "new" => {
                // Seed the cache with a ready-made pack and its index: no
                // packing by libgit2, no `git index-pack` in the VM.
                // (The branch pack's directory lives until the files are sent.)
                let (_dir, files) = match objects {
                    Objects::All => (None, all_object_files(host.git_dir.join("objects")).await?),
                    Objects::Branch => {
                        let (dir, files) = branch_pack(host.git_dir.clone(), tip, progress).await?;
                        (Some(dir), files)
                    }
                };
                self.send_objects(files, cache, progress).await?;
            }
            _ => {
                // The cache is agent-vm's own: overwrite its ref freely.
                let spec = format!("+refs/heads/{branch}:refs/heads/{branch}");
                self.git_push(host, cache, None, &spec, progress, None).await?;
            }
        }
        progress.waiting("Checking out the workspace in the VM");
        let made = self.script(PREPARE_WORKSPACE, args, "creating the workspace").await;
        progress.finish();
        made?;
        Ok(Some(Pushed::Created))
    }

    /// Streams a tar of host files, under the given names (see
    /// [`UNPACK_OBJECTS`]), into `cache`. The tar is written into a pipe as
    /// the channel sends it: the objects are never copied on the host.
    async fn send_objects(&self, files: Vec<(String, PathBuf)>, cache: &str, progress: &Progress) -> Result<()> {
        let mut total = 0;
        for (_, path) in &files {
            total += std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        }
        let (reader, writer) = std::io::pipe()?;
        let writer = Counted::new(writer, total, progress);
        let writing = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, writer));
            for (name, path) in files {
                tar.append_path_with_name(&path, &name)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            }
            std::io::Write::flush(&mut tar.into_inner()?)
        });
        let input = tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(reader)));
        let command = shell::script(UNPACK_OBJECTS, &[cache])?;
        let mut stderr = Vec::new();
        let status = self.session.exec_io(&command, input, &mut tokio::io::sink(), &mut stderr).await;
        let written = writing.await?;
        progress.finish();
        // A host-side failure explains itself; a broken pipe means the VM
        // stopped reading, and its own message says why.
        if let Err(e) = &written
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            bail!("cannot send the repository's objects: {e}");
        }
        let status = status?;
        if status != 0 || written.is_err() {
            bail!(
                "unpacking the repository's objects in the VM failed: {}",
                printable(String::from_utf8_lossy(&stderr).trim())
            );
        }
        Ok(())
    }

    /// Pushes `refspec` to the repository at `path`, after running the
    /// `prepare` command line in the VM if given (Created when it says
    /// "created"). With a guard, first reads the VM's tip of the guarded ref
    /// from the same connection and pushes only if the host tip is new and
    /// contains it (None when not).
    async fn git_push(
        &self,
        host: &HostRepo,
        path: &str,
        prepare: Option<String>,
        refspec: &str,
        progress: &Progress,
        guard: Option<Guard>,
    ) -> Result<Option<Pushed>> {
        let preparing = prepare.is_some();
        let url = match prepare {
            Some(prepare) => self.remote.url_with_step(path, prepare),
            None => self.remote.url(path),
        };
        let git_dir = host.git_dir.clone();
        let refspec = refspec.to_owned();
        let bar = progress.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(Option<Pushed>, Rejected)> {
            let repo = Repository::open(&git_dir)?;
            let mut remote = repo.remote_anonymous(&url)?;
            let Some(guard) = guard else {
                return Ok((Some(Pushed::Updated), push_through(&mut remote, &refspec, &bar)?));
            };
            let mut conn = remote.connect_auth(git2::Direction::Push, None, None)?;
            let vm_tip = conn.list()?.iter().find(|h| h.name() == guard.refname).map(|h| h.oid());
            match vm_tip {
                Some(t) if t == guard.tip => Ok((Some(Pushed::UpToDate), Vec::new())),
                Some(t) if !contains(&repo, guard.tip, t) => Ok((None, Vec::new())),
                _ => Ok((Some(Pushed::Updated), push_through(conn.remote(), &refspec, &bar)?)),
            }
        })
        .await?;
        progress.finish();
        let stderr = self.remote.take_stderr();
        let (pushed, rejected) = result.map_err(|e| with_remote_stderr(e, &stderr))?;
        if let Some((name, why, said)) = rejected.first() {
            let hint = if said.contains("uncommitted changes") {
                " (the agent has uncommitted changes in the workspace: have them committed or \
                 discarded there, fetch, then push again; nothing was changed)"
            } else {
                " (nothing was changed)"
            };
            let said: String = said.lines().map(|l| format!("\n  remote: {}", printable(l))).collect();
            bail!("the VM refused to update {}: {}{hint}{said}", printable(name), printable(why));
        }
        if preparing && stderr.lines().any(|l| l == "created") {
            return Ok(pushed.map(|_| Pushed::Created));
        }
        Ok(pushed)
    }

    /// Fetches the workspace's branch into `refs/remotes/agent-vm/<branch>`
    /// (that ref only: no tags, no other refs). Returns what the VM said of
    /// the workspace just before (asked in the same connection: uncommitted
    /// changes are counted there) and how the fetch went: its new tip.
    pub async fn fetch(&self, host: &HostRepo, ws: &Workspace, progress: &Progress) -> Result<(Probe, Result<Oid>)> {
        let url = self.remote.url_with_step(&ws.dir, shell::script(PROBE_BEFORE_FETCH, &[&ws.dir, &ws.branch])?);
        let git_dir = host.git_dir.clone();
        let tracking = HostRepo::tracking_ref(&ws.branch);
        // No destination: libgit2 moves no ref itself. The tracking ref
        // moves below, once the history it would point at is complete.
        let wanted = format!("refs/heads/{}", ws.branch);
        let progress2 = progress.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<Oid> {
            let repo = Repository::open(&git_dir)?;
            // Only this branch's history is offered to the VM in negotiation.
            let known: Vec<(String, Oid)> = [wanted.clone(), tracking.clone()]
                .into_iter()
                .filter_map(|r| repo.refname_to_id(&r).ok().map(|id| (r, id)))
                .collect();
            let view = view::View::new(&git_dir, &known)?;
            let mut remote = view.repo.remote_anonymous(&url)?;
            let mut callbacks = git2::RemoteCallbacks::new();
            callbacks.transfer_progress(|p| {
                progress2.transfer("Fetching", p.received_objects(), p.total_objects(), p.received_bytes())
            });
            let mut opts = git2::FetchOptions::new();
            opts.remote_callbacks(callbacks)
                .download_tags(git2::AutotagOption::None)
                .update_fetchhead(false)
                .prune(git2::FetchPrune::Off);
            remote.fetch(&[wanted.as_str()], Some(&mut opts), Some("agent-vm fetch"))?;
            let oid = remote
                .list()?
                .iter()
                .find(|h| h.name() == wanted)
                .map(|h| h.oid())
                .context("the VM's branch did not arrive")?;
            drop(remote);
            // Checked in the view: what is refused never enters the host.
            view.check_sizes(&git_dir, oid, view::max_object_bytes())?;
            let known: Vec<Oid> = known.iter().map(|(_, id)| *id).collect();
            integrate::check_complete(&view.reopen()?, oid, &known)?;
            view.move_objects_into(&git_dir)?;
            let repo = Repository::open(&git_dir)?;
            repo.reference(&tracking, oid, true, "agent-vm fetch")?;
            Ok(oid)
        })
        .await?;
        progress.finish();
        let stderr = self.remote.take_stderr();
        let (said, git_stderr) = split_probe(&stderr, &ws.branch);
        let result = result.map_err(|e| with_remote_stderr(e, git_stderr));
        match said {
            Some(probe) => Ok((probe, result)),
            None => Err(result
                .err()
                .unwrap_or_else(|| anyhow!("unexpected answer from the VM while inspecting {}", ws.dir))),
        }
    }

    pub async fn remove(&self, ws: &Workspace) -> Result<()> {
        self.script(REMOVE, &[&ws.dir], "deleting the workspace").await?;
        Ok(())
    }

    /// Every workspace in the VM, as the VM describes it: answers kept from
    /// the last listing for workspaces where nothing changed since, unless
    /// `fresh` (a decision rests on it, such as deleting).
    pub async fn list(&self, fresh: bool) -> Result<Vec<Listed>> {
        Ok(self.list_after("", &[], fresh).await?.1)
    }

    /// [`Vm::list`], after `first`, a script with `args` that prints one
    /// line, in the same shell (a process costs on a slow guest): that line,
    /// and the workspaces.
    pub async fn list_after(&self, first: &str, args: &[&str], fresh: bool) -> Result<(String, Vec<Listed>)> {
        let out = self.session.exec(&list_script(first, args, fresh)?).await?.check("listing workspaces")?;
        Ok(parse_list_after(first, &String::from_utf8_lossy(&out.stdout)))
    }
}

/// The branch's pack and index ([`crate::pack`]), only objects reachable
/// from `tip`, written into a temporary directory (kept while it lives),
/// under their names in the tar.
async fn branch_pack(
    git_dir: PathBuf,
    tip: Oid,
    progress: &Progress,
) -> Result<(tempfile::TempDir, Vec<(String, PathBuf)>)> {
    let bar = progress.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<_> {
        let repo = Repository::open(&git_dir)?;
        let dir = tempfile::tempdir()?;
        let written = crate::pack::write_branch_pack(&repo, tip, dir.path(), &|stage, n, total| {
            bar.objects(stage, n, total);
        })?;
        tracing::debug!(objects = written.objects, reused = written.reused, "branch pack written");
        let name = |path: &Path| format!("pack/{}", path.file_name().unwrap_or_default().to_string_lossy());
        let files = vec![(name(&written.pack), written.pack.clone()), (name(&written.idx), written.idx.clone())];
        Ok((dir, files))
    })
    .await;
    progress.finish();
    written?
}

/// Every object file of the host repository, its pack files and loose
/// objects, to be copied verbatim (no packing on the host): fast, but it
/// ships other branches, stashes and unreachable objects too. Only on
/// request ([`Objects::All`]).
async fn all_object_files(objects_dir: PathBuf) -> Result<Vec<(String, PathBuf)>> {
    tokio::task::spawn_blocking(move || -> Result<Vec<(String, PathBuf)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&objects_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_pack = name == "pack";
            let is_loose = name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if !(is_pack || is_loose) || !entry.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(entry.path())? {
                let f = f?;
                let fname = f.file_name().to_string_lossy().into_owned();
                // Whole packs with their index; no temporary or partial files.
                let wanted = if is_pack {
                    fname.starts_with("pack-") && (fname.ends_with(".pack") || fname.ends_with(".idx"))
                } else {
                    fname.len() == 38 && fname.bytes().all(|b| b.is_ascii_hexdigit())
                };
                if wanted && f.file_type()?.is_file() {
                    files.push((format!("{name}/{fname}"), f.path()));
                }
            }
        }
        Ok(files)
    })
    .await?
}

fn with_remote_stderr(e: anyhow::Error, stderr: &str) -> anyhow::Error {
    if stderr.is_empty() { e } else { e.context(format!("the VM said: {}", printable(stderr))) }
}
