//! Workspaces: one independent clone per (host repository, branch) in the
//! VM at `~/workspace/<repo>-<branch>-<hash>`, and the push / fetch / clean
//! logic that moves commits between it and the host with git2.
//!
//! The VM is hostile: everything read from it (ref tips, names, exit
//! statuses) is treated as untrusted input, host refs other than
//! `refs/remotes/agent-vm/*` and a fast-forward of the fetched branch are
//! never touched, and only the pushed branch's history leaves the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use git2::{Oid, Repository};
use serde::Serialize;

use crate::shell;
use crate::ssh::Session;
use crate::transport;

mod integrate;
mod view;

pub use integrate::{Integrated, ahead_behind, contains, integrate, unfetched};

/// Where the workspaces live in the VM, relative to the user's home.
pub const WORKSPACE_ROOT: &str = "workspace";
/// Per-repository object caches in the VM (bare repositories).
const CACHE_ROOT: &str = ".agent-vm/cache";
/// Host refs that fetch may update at will.
pub const TRACKING_PREFIX: &str = "refs/remotes/agent-vm/";

/// The host repository agent-vm works for.
pub struct HostRepo {
    pub repo: Repository,
    /// The repository's common git dir, canonical: its identity.
    pub git_dir: PathBuf,
    /// A short readable name (the work tree's directory name).
    pub name: String,
}

impl HostRepo {
    /// The repository containing the current directory.
    pub fn discover() -> Result<HostRepo> {
        let repo = Repository::discover(".").map_err(|e| {
            anyhow!(
                "not in a git repository ({}): run agent-vm inside the repository whose branch you want",
                e.message()
            )
        })?;
        Self::from_repo(repo)
    }

    /// The repository at exactly `git_dir` (as a workspace records it).
    pub fn open(git_dir: &Path) -> Result<HostRepo> {
        let repo = Repository::open_ext(git_dir, git2::RepositoryOpenFlags::NO_SEARCH, std::iter::empty::<&Path>())
            .with_context(|| format!("cannot open the repository {}", git_dir.display()))?;
        Self::from_repo(repo)
    }

    fn from_repo(repo: Repository) -> Result<HostRepo> {
        let git_dir = repo.commondir().canonicalize().context("cannot resolve the repository's git dir")?;
        let base = match repo.workdir() {
            Some(w) => w.to_path_buf(),
            None => git_dir.clone(),
        };
        let base = base.canonicalize().unwrap_or(base);
        let name =
            base.file_name().map(|n| n.to_string_lossy().trim_end_matches(".git").to_owned()).unwrap_or_default();
        Ok(HostRepo { repo, git_dir, name })
    }

    /// The tip of host branch `branch`, if it exists.
    pub fn branch_tip(&self, branch: &str) -> Result<Option<Oid>> {
        match self.repo.find_reference(&format!("refs/heads/{branch}")) {
            Ok(r) => Ok(Some(r.peel_to_commit()?.id())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The branch's tip, creating the branch from HEAD when it does not exist.
    /// Returns the tip and whether the branch was created.
    pub fn ensure_branch(&self, branch: &str) -> Result<(Oid, bool)> {
        if let Some(tip) = self.branch_tip(branch)? {
            return Ok((tip, false));
        }
        let head = self
            .repo
            .head()
            .and_then(|h| h.peel_to_commit())
            .map_err(|_| anyhow!("branch {branch:?} does not exist and HEAD has no commit to create it from"))?;
        // A plain ref, not `branch()`: libgit2 refuses names git accepts as
        // refs (a leading `-`) there.
        self.repo
            .reference(&format!("refs/heads/{branch}"), head.id(), false, "agent-vm: branch from HEAD")
            .with_context(|| format!("cannot create branch {branch:?}"))?;
        Ok((head.id(), true))
    }

    /// Serialises agent-vm commands on one branch of this repository: a
    /// second one waits rather than interleaving ref updates.
    pub fn lock_branch(&self, branch: &str, ui: &crate::Ui) -> Result<std::fs::File> {
        let dir = self.git_dir.join("agent-vm").join("locks");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.lock", short_hash(branch.as_bytes())));
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        if file.try_lock().is_err() {
            ui.say(&format!("Waiting for another agent-vm command on branch {branch:?}…"));
            file.lock()?;
        }
        Ok(file)
    }

    /// The locks of several branches, taken in one order (sorted) so that
    /// two commands locking overlapping sets cannot deadlock.
    pub fn lock_branches(&self, branches: &[&str], ui: &crate::Ui) -> Result<Vec<std::fs::File>> {
        let mut sorted = branches.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.into_iter().map(|b| self.lock_branch(b, ui)).collect()
    }

    fn tracking_ref(branch: &str) -> String {
        format!("{TRACKING_PREFIX}{branch}")
    }
}

/// Checks that `branch` is a name git accepts for a branch.
pub fn validate_branch(branch: &str) -> Result<()> {
    if branch.is_empty() || branch == "HEAD" || !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
        bail!("{branch:?} is not a valid branch name");
    }
    Ok(())
}

/// The paths of one branch's workspace and its repository's object cache
/// in the VM, relative to the VM home.
#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub branch: String,
    pub dir: String,
    pub cache: String,
}

impl Workspace {
    /// Names are derived, never taken from the VM: a readable part and a hash
    /// of the exact (repository, branch) pair, so `feature/x`, `feature-x`
    /// and `Feature-X` never share a directory, and any branch git accepts
    /// makes a safe path.
    pub fn new(host: &HostRepo, branch: &str) -> Workspace {
        let repo_id = host.git_dir.to_string_lossy();
        let repo = readable(&host.name, 24);
        let key = format!("{repo_id}\n{branch}");
        Workspace {
            branch: branch.to_owned(),
            dir: format!("{WORKSPACE_ROOT}/{repo}-{}-{}", readable(branch, 40), short_hash(key.as_bytes())),
            cache: format!("{CACHE_ROOT}/{repo}-{}.git", short_hash(repo_id.as_bytes())),
        }
    }
}

/// The first 10 hex digits of the SHA-1 of `data`.
fn short_hash(data: &[u8]) -> String {
    let oid = Oid::hash_object(git2::ObjectType::Blob, data).expect("hashing memory cannot fail");
    oid.to_string()[..10].to_owned()
}

/// `text` reduced to `[A-Za-z0-9._-]`, other runs turned into one `-`, at
/// most `max` characters, never starting with `.` or `-`.
fn readable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    let out: String = out.trim_start_matches(['-', '.']).chars().take(max).collect();
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() { "x".to_owned() } else { out }
}

/// Removes control characters from text that came from the VM before it
/// reaches the terminal (no escape-sequence games: ESC, OSC 52, CR, C1
/// codes), and the bidirectional overrides that make text read otherwise
/// than it is. One line: a newline from the VM cannot fake a line of ours.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if unsafe_char(c) { '?' } else { c }).collect()
}

/// [`printable`] for whole messages of agent-vm's own, which may hold VM
/// text and their own line breaks and tabs.
pub fn printable_lines(text: &str) -> String {
    text.chars().map(|c| if unsafe_char(c) && c != '\n' && c != '\t' { '?' } else { c }).collect()
}

fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

// VM-side scripts. Fixed text; every variable part is a positional argument.

/// Shell text that clones cache $1 locally (hard links, no copy) into a new
/// workspace $2 on branch $3 (host repo $4, for display), configured in the
/// same step (each process costs on a slow guest: none that is not needed).
///
/// Workspaces get their hooks from agent-vm's template (made once): a
/// `push-to-checkout` hook that does what git's updateInstead does (refuse
/// when the work tree or index differs from HEAD, else move the tree to the
/// pushed commit) in two git processes instead of four.
macro_rules! clone_workspace {
    () => {
        r#"tmp="$2.agent-vm-new"
[ ! -e "$tmp" ] || rm -rf -- "$tmp"
[ -d "${2%/*}" ] || mkdir -p -- "${2%/*}"
tpl=.agent-vm/template
if [ ! -x "$tpl/hooks/push-to-checkout" ]; then
  mkdir -p "$tpl/hooks"
  cat > "$tpl/hooks/push-to-checkout.new" <<'HOOK'
#!/bin/sh
# agent-vm: receive.denyCurrentBranch=updateInstead, with fewer processes.
cd "$GIT_WORK_TREE" || exit 1
if [ -n "$(git status --porcelain --untracked-files=no --ignore-submodules)" ]; then
  echo "the workspace has uncommitted changes" >&2
  exit 1
fi
exec git read-tree -u -m HEAD "$1"
HOOK
  chmod +x "$tpl/hooks/push-to-checkout.new"
  mv -f "$tpl/hooks/push-to-checkout.new" "$tpl/hooks/push-to-checkout"
fi
git clone -q --local --template="$tpl" --branch="$3" -c receive.denyCurrentBranch=updateInstead \
    -c core.untrackedCache=true -c "agent-vm.branch=$3" -c "agent-vm.hostRepo=$4" -- "$1" "$tmp"
git -C "$tmp" remote remove origin
mv -T -- "$tmp" "$2"
"#
    };
}

/// $1 cache, $2 workspace, $3 branch, $4 host repo (for display), $5 the
/// host's tip: run before each push into a workspace, in the push's own
/// connection. A missing workspace is created when the cache has the tip
/// (another branch's workspace brought it, or the host just sent it),
/// saying "created". Else exits 3: the host prepares the cache
/// ([`ENSURE_CACHE`]) and runs this again.
const PREPARE_WORKSPACE: &str = concat!(
    r#"set -e
[ ! -d "$2/.git" ] || exit 0
git --git-dir="$1" update-ref "refs/heads/$3" "$5" 2>/dev/null || exit 3
"#,
    clone_workspace!(),
    "echo created"
);

/// $1 cache, $2 workspace: says "present" when the workspace exists. Else
/// makes sure the bare cache exists (built aside and renamed into place, so
/// concurrent first pushes never see a half-made cache) and says "new" (no
/// pack yet: seed it) or "missing" (push the branch into the cache).
const ENSURE_CACHE: &str = r#"set -e
if [ -d "$2/.git" ]; then echo present; exit 0; fi
if [ ! -d "$1/objects" ]; then
  mkdir -p "${1%/*}"
  t="$1.new.$$"
  rm -rf -- "$t"
  git init -q --bare "$t"
  git --git-dir="$t" config gc.auto 0
  mv -T -- "$t" "$1" 2>/dev/null || rm -rf -- "$t"
fi
for f in "$1"/objects/pack/*.idx; do if [ -e "$f" ]; then echo missing; exit 0; fi; done
echo new"#;

/// $1 cache: unpack a tar of pack files (`pack/…`) and loose objects
/// (`xx/…`) from stdin into it. Unpacked aside, then moved in with each
/// index last: an interrupted transfer never leaves git an index whose pack
/// is incomplete.
const UNPACK_OBJECTS: &str = r#"set -e
o=$(cd -- "$1/objects" && pwd)
tmp=$(mktemp -d "$o/incoming.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM PIPE
tar -x --no-same-owner --no-same-permissions -f - -C "$tmp"
cd "$tmp"
for d in ??; do
  if [ -d "$d" ]; then mkdir -p "$o/$d" && find "$d" -type f -exec mv -f -t "$o/$d" -- {} +; fi
done
mkdir -p "$o/pack"
for f in pack/*.pack pack/*.idx; do
  if [ -f "$f" ]; then mv -f -- "$f" "$o/pack/"; fi
done"#;

/// $1 workspace, $2 branch: "absent", or "present" then the "# branch.*"
/// headers of `git status --porcelain=v2 --branch`, "# changes <how many
/// uncommitted>", and "# tip <commit or ->" when the branch is not the one
/// checked out. One git process in the usual case: each costs on a slow
/// guest.
macro_rules! probe {
    () => {
        r##"if [ ! -d "$1/.git" ]; then echo absent; else
echo present
s=$(git -C "$1" status --porcelain=v2 --branch 2>/dev/null) || s=
n=0
while IFS= read -r l; do
  case $l in "# "*) printf '%s\n' "$l" ;; ?*) n=$((n+1)) ;; esac
done <<EOF
$s
EOF
echo "# changes $n"
case "
$s
" in
  *"
# branch.head $2
"*) ;;
  *) echo "# tip $(git -C "$1" rev-parse --verify -q "refs/heads/$2^{commit}" || echo -)" ;;
esac
fi"##
    };
}
const PROBE: &str = probe!();

/// [`PROBE`] run before a fetch's upload-pack, in its connection, then an
/// end marker: git's own messages follow it.
macro_rules! end_of_probe {
    () => {
        "# end of probe"
    };
}
const PROBE_BEFORE_FETCH: &str = concat!(probe!(), "\necho '", end_of_probe!(), "'");

/// $1 workspace: delete it.
const REMOVE: &str = r#"case "$1" in workspace/?*) rm -rf -- "$1" "$1.agent-vm-new" ;; *) exit 2 ;; esac"#;

/// Every workspace: path, branch, host repo and what [`PROBE`] says of it,
/// each field ending in NUL.
const LIST: &str = concat!(
    "probe() {\n",
    probe!(),
    r#"
}
for d in workspace/*; do
  [ -d "$d/.git" ] || continue
  b=$(git -C "$d" config agent-vm.branch) || continue
  r=$(git -C "$d" config agent-vm.hostRepo || true)
  printf '%s\0%s\0%s\0' "$d" "$b" "$r"
  probe "$d" "$b"
  printf '\0'
done"#
);

/// What the VM says about one workspace (untrusted).
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Absent,
    Present { tip: Option<Oid>, changes: u64 },
}

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

/// Refs the VM rejected in a push, and why.
type Rejected = Vec<(String, String)>;

/// Pushes through `remote` (connected or not), with progress.
fn push_through(remote: &mut git2::Remote, refspec: &str, bar: &Progress) -> Result<Rejected> {
    let mut rejected = Vec::new();
    let mut callbacks = git2::RemoteCallbacks::new();
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
    Ok(rejected)
}

impl Vm {
    pub fn new(session: Session) -> Result<Vm> {
        let session = Arc::new(session);
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
        let writer = Counted { inner: writer, sent: 0, total, progress: progress.clone() };
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
        if let Some((name, why)) = rejected.first() {
            let hint = if why.contains("changes") || why.contains("push-to-checkout") {
                " (the agent has uncommitted changes in the workspace: have them committed or \
                 discarded there, fetch, then push again; nothing was changed)"
            } else {
                ""
            };
            bail!("the VM refused to update {}: {}{hint}", printable(name), printable(why));
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

    /// Every workspace in the VM, as the VM describes it.
    pub async fn list(&self) -> Result<Vec<Listed>> {
        let out = self.session.exec(&shell::script(LIST, &[] as &[&str])?).await?.check("listing workspaces")?;
        Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Reads [`LIST`]'s answer (untrusted, for display).
fn parse_list(text: &str) -> Vec<Listed> {
    let fields: Vec<&str> = text.split_terminator('\0').collect();
    fields
        .chunks_exact(4)
        .map(|f| {
            let (tip, changes) = match parse_probe(f[3], f[1]) {
                Some(Probe::Present { tip, changes }) => (tip, changes),
                _ => (None, 0),
            };
            Listed { dir: f[0].to_owned(), branch: f[1].to_owned(), host_repo: f[2].to_owned(), tip, changes }
        })
        .collect()
}

/// One workspace as listed by the VM (untrusted, for display).
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub dir: String,
    pub branch: String,
    pub host_repo: String,
    #[serde(serialize_with = "ser_oid")]
    pub tip: Option<Oid>,
    pub changes: u64,
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

/// Reads [`PROBE`]'s answer (untrusted: anything malformed is None).
fn parse_probe(out: &str, branch: &str) -> Option<Probe> {
    let mut lines = out.lines();
    match lines.next()? {
        "absent" => return Some(Probe::Absent),
        "present" => {}
        _ => return None,
    }
    let (mut head, mut head_oid, mut tip, mut changes) = (None, None, None, None);
    for line in lines {
        if let Some(oid) = line.strip_prefix("# branch.oid ") {
            head_oid = parse_oid(oid).ok();
        } else if let Some(name) = line.strip_prefix("# branch.head ") {
            head = Some(name);
        } else if let Some(t) = line.strip_prefix("# tip ") {
            tip = Some(if t == "-" { None } else { Some(parse_oid(t).ok()?) });
        } else if let Some(n) = line.strip_prefix("# changes ") {
            changes = Some(n.parse().ok()?);
        }
    }
    let changes = changes?;
    let tip = match tip {
        Some(t) => t,
        None if head == Some(branch) => head_oid,
        None => return None,
    };
    Some(Probe::Present { tip, changes })
}

/// What [`PROBE_BEFORE_FETCH`] said, and the remote git's messages after it.
fn split_probe<'a>(stderr: &'a str, branch: &str) -> (Option<Probe>, &'a str) {
    match stderr
        .split_once(concat!("\n", end_of_probe!(), "\n"))
        .or_else(|| stderr.strip_suffix(concat!("\n", end_of_probe!())).map(|said| (said, "")))
    {
        Some((said, rest)) => (parse_probe(said, branch), rest),
        None => (None, stderr),
    }
}

fn ser_oid<S: serde::Serializer>(oid: &Option<Oid>, s: S) -> Result<S::Ok, S::Error> {
    match oid {
        Some(o) => s.serialize_str(&o.to_string()),
        None => s.serialize_none(),
    }
}

fn parse_oid(text: &str) -> Result<Oid> {
    let text = text.trim();
    if text.len() != 40 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the VM sent a malformed commit id");
    }
    Ok(Oid::from_str(text)?)
}

fn with_remote_stderr(e: anyhow::Error, stderr: &str) -> anyhow::Error {
    if stderr.is_empty() { e } else { e.context(format!("the VM said: {}", printable(stderr))) }
}

/// Progress on stderr: a bar or spinner on a terminal, nothing otherwise.
/// Each phase gets a fresh bar of its kind; `finish` clears it.
#[derive(Clone)]
pub struct Progress {
    target: Arc<dyn Fn() -> indicatif::ProgressDrawTarget + Send + Sync>,
    current: Arc<std::sync::Mutex<Option<(Phase, indicatif::ProgressBar)>>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Objects,
    Bytes,
    Waiting,
}

impl Progress {
    pub fn new(ui: &crate::Ui) -> Progress {
        use std::io::IsTerminal;
        let shown = !ui.quiet && std::io::stderr().is_terminal();
        Progress::drawing_to(move || {
            if shown { indicatif::ProgressDrawTarget::stderr() } else { indicatif::ProgressDrawTarget::hidden() }
        })
    }

    fn drawing_to(target: impl Fn() -> indicatif::ProgressDrawTarget + Send + Sync + 'static) -> Progress {
        Progress { target: Arc::new(target), current: Default::default() }
    }

    /// The bar of the current phase, a new one when the phase changes.
    fn bar(&self, phase: Phase, stage: &str) -> indicatif::ProgressBar {
        let mut current = self.current.lock().unwrap();
        let bar = match current.take() {
            Some((p, bar)) if p == phase => bar,
            old => {
                if let Some((_, bar)) = old {
                    bar.finish_and_clear();
                }
                let bar = indicatif::ProgressBar::with_draw_target(None, (self.target)());
                let template = match phase {
                    Phase::Objects => "{prefix:>9} [{bar:30}] {pos}/{len} objects {msg}",
                    Phase::Bytes => "{prefix:>9} [{bar:30}] {bytes}/{total_bytes}, {bytes_per_sec}",
                    Phase::Waiting => "{spinner} {prefix} ({elapsed})",
                };
                bar.set_style(
                    indicatif::ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "),
                );
                if phase == Phase::Waiting {
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                }
                bar
            }
        };
        bar.set_prefix(stage.to_owned());
        *current = Some((phase, bar.clone()));
        bar
    }

    fn objects(&self, stage: &str, current: usize, total: usize) -> indicatif::ProgressBar {
        let bar = self.bar(Phase::Objects, stage);
        bar.set_length(total as u64);
        bar.set_position(current as u64);
        bar
    }

    fn transfer(&self, stage: &str, current: usize, total: usize, bytes: usize) -> bool {
        let bar = self.objects(stage, current, total);
        let secs = bar.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!(
            "{}, {}/s",
            indicatif::HumanBytes(bytes as u64),
            indicatif::HumanBytes((bytes as f64 / secs) as u64)
        ));
        true
    }

    fn bytes(&self, stage: &str, current: u64, total: u64) {
        let bar = self.bar(Phase::Bytes, stage);
        bar.set_length(total);
        bar.set_position(current);
    }

    /// A spinner while the VM works on something that reports no progress.
    fn waiting(&self, what: &str) {
        self.bar(Phase::Waiting, what);
    }

    fn finish(&self) {
        if let Some((_, bar)) = self.current.lock().unwrap().take() {
            bar.finish_and_clear();
        }
    }
}

/// A writer that reports the bytes through it as progress.
struct Counted<W> {
    inner: W,
    sent: u64,
    total: u64,
    progress: Progress,
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        self.progress.bytes("Sending", self.sent, self.total);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The host path the VM's workspace shows up at through the mount.
pub fn host_path(mount_root: &Path, ws: &Workspace) -> PathBuf {
    mount_root.join(ws.dir.trim_start_matches(&format!("{WORKSPACE_ROOT}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(path: &str, name: &str) -> HostRepo {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        std::mem::forget(dir);
        HostRepo { repo, git_dir: PathBuf::from(path), name: name.to_owned() }
    }

    #[test]
    fn workspace_names_never_collide() {
        let h = host("/home/u/src/app/.git", "app");
        let names = ["feature/x", "feature-x", "Feature-X", "feature x", "feature_x", "-x", "x", "ünï", "a..b"];
        let dirs: std::collections::HashSet<String> = names.iter().map(|b| Workspace::new(&h, b).dir).collect();
        assert_eq!(dirs.len(), names.len());
        for d in &dirs {
            let leaf = d.strip_prefix("workspace/").unwrap();
            assert!(leaf.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)), "{d}");
            assert!(!leaf.starts_with(['-', '.']), "{d}");
        }
    }

    #[test]
    fn same_branch_of_two_repos_differs() {
        let a = Workspace::new(&host("/a/app/.git", "app"), "main");
        let b = Workspace::new(&host("/b/app/.git", "app"), "main");
        assert_ne!(a.dir, b.dir);
        assert_ne!(a.cache, b.cache);
        assert!(a.dir.starts_with("workspace/app-main-"), "{}", a.dir);
    }

    #[test]
    fn readable_is_bounded_and_tidy() {
        assert_eq!(readable("feature/auth", 40), "feature-auth");
        assert_eq!(readable("--..x", 40), "x");
        assert_eq!(readable("$(rm -rf /)", 40), "rm-rf");
        assert_eq!(readable("", 40), "x");
        assert_eq!(readable(&"a".repeat(300), 40).len(), 40);
    }

    #[test]
    fn branch_validation_follows_git() {
        for ok in ["main", "feature/x", "-x", "ünï", "$(x)", "a;b", "`x`", "it's"] {
            validate_branch(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "HEAD", "with space", "a..b", "a~b", "a^b", "a:b", "x.lock", "/x", "x/", "a\\b", "a\x07b"] {
            assert!(validate_branch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oids_from_the_vm_are_parsed_strictly() {
        assert!(parse_oid("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(parse_oid("0123").is_err());
        assert!(parse_oid("zz23456789abcdef0123456789abcdef01234567").is_err());
    }

    /// Runs the host's git in `dir`; its trimmed stdout.
    fn host_git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=T", "-c", "user.email=t@e"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A new repository at `dir` on `branch`, with file `a` ("1")
    /// committed; returns the commit.
    fn one_commit(dir: &Path, branch: &str) -> String {
        std::fs::create_dir_all(dir).unwrap();
        host_git(dir, &["init", "-q", "-b", branch]);
        std::fs::write(dir.join("a"), "1").unwrap();
        host_git(dir, &["add", "a"]);
        host_git(dir, &["commit", "-q", "-m", "a"]);
        host_git(dir, &["rev-parse", "HEAD"])
    }

    /// The probe script run by sh with the host's git, as the VM runs it.
    #[test]
    fn probe_reports_tip_and_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let git = |args: &[&str]| host_git(&ws, args);
        let probe = |branch: &str| {
            let line = shell::script(PROBE, &[ws.to_str().unwrap(), branch]).unwrap();
            let out = std::process::Command::new("sh").arg("-c").arg(line).output().unwrap();
            parse_probe(&String::from_utf8(out.stdout).unwrap(), branch)
        };
        assert_eq!(probe("feature"), Some(Probe::Absent));
        std::fs::create_dir(&ws).unwrap();
        git(&["init", "-q", "-b", "feature"]);
        assert_eq!(probe("feature"), Some(Probe::Present { tip: None, changes: 0 }));
        std::fs::write(ws.join("a"), "1").unwrap();
        git(&["add", "a"]);
        git(&["commit", "-q", "-m", "a"]);
        let head = Oid::from_str(&git(&["rev-parse", "HEAD"])).unwrap();
        git(&["branch", "feat"]);
        std::fs::write(ws.join("a"), "2").unwrap();
        std::fs::write(ws.join("new file"), "x").unwrap();
        assert_eq!(probe("feature"), Some(Probe::Present { tip: Some(head), changes: 2 }));
        // A branch that is not checked out (a prefix of the one that is).
        assert_eq!(probe("feat"), Some(Probe::Present { tip: Some(head), changes: 2 }));
        assert_eq!(probe("gone"), Some(Probe::Present { tip: None, changes: 2 }));
        // Nonsense from the VM is refused, not guessed at.
        assert_eq!(parse_probe("present\n# tip nonsense\n", "b"), None);
        assert_eq!(parse_probe("maybe\n", "b"), None);
    }

    /// The probe a fetch runs first, by sh with the host's git, then what
    /// upload-pack would say: the two are told apart.
    #[test]
    fn the_probe_before_a_fetch_is_told_apart_from_git() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let head = Oid::from_str(&one_commit(&ws, "b")).unwrap();
        std::fs::write(ws.join("new"), "x").unwrap();
        let run = |dir: &Path, git_says: &str| {
            let probe = shell::script(PROBE_BEFORE_FETCH, &[dir.to_str().unwrap(), "b"]).unwrap();
            let git = shell::script("printf '%s' \"$1\" >&2", &[git_says]).unwrap();
            let out = std::process::Command::new("sh").arg("-c").arg(shell::then_exec(&probe, &git)).output().unwrap();
            assert!(out.stdout.is_empty());
            // Trimmed, as the transport hands it over.
            String::from_utf8(out.stderr).unwrap().trim().to_owned()
        };
        let text = run(&ws, "");
        assert_eq!(split_probe(&text, "b"), (Some(Probe::Present { tip: Some(head), changes: 1 }), ""));
        let text = run(&tmp.path().join("gone"), "fatal: not a git repository");
        assert_eq!(split_probe(&text, "b"), (Some(Probe::Absent), "fatal: not a git repository"));
        // No marker: the probe did not finish; git's words are all there is.
        assert_eq!(split_probe("fatal: x", "b"), (None, "fatal: x"));
    }

    /// The listing script run by sh with the host's git, in a directory
    /// laid out like the VM user's home.
    #[test]
    fn list_reports_each_workspace() {
        let home = tempfile::tempdir().unwrap();
        let git = |dir: &str, args: &[&str]| host_git(&home.path().join(dir), args);
        for (dir, branch) in [("workspace/r-a", "a"), ("workspace/r-b", "f/b'$(x)")] {
            std::fs::create_dir_all(home.path().join(dir)).unwrap();
            git(dir, &["init", "-q", "-b", branch]);
            git(dir, &["config", "agent-vm.branch", branch]);
            git(dir, &["config", "agent-vm.hostRepo", "/h/r\nx"]);
            std::fs::write(home.path().join(dir).join("f"), "1").unwrap();
            git(dir, &["add", "f"]);
            git(dir, &["commit", "-q", "-m", "f"]);
        }
        // Not a workspace: no agent-vm.branch.
        std::fs::create_dir_all(home.path().join("workspace/other")).unwrap();
        git("workspace/other", &["init", "-q"]);
        std::fs::write(home.path().join("workspace/r-b/f"), "2").unwrap();
        git("workspace/r-b", &["checkout", "-q", "-b", "elsewhere"]);
        let out = std::process::Command::new("sh")
            .current_dir(home.path())
            .arg("-c")
            .arg(shell::script(LIST, &[] as &[&str]).unwrap())
            .output()
            .unwrap();
        let listed = parse_list(&String::from_utf8(out.stdout).unwrap());
        let tip = |dir: &str| Some(Oid::from_str(&git(dir, &["rev-parse", "HEAD"])).unwrap());
        let got: Vec<_> = listed
            .iter()
            .map(|l| (l.dir.as_str(), l.branch.as_str(), l.host_repo.as_str(), l.tip, l.changes))
            .collect();
        assert_eq!(
            got,
            [
                ("workspace/r-a", "a", "/h/r\nx", tip("workspace/r-a"), 0),
                ("workspace/r-b", "f/b'$(x)", "/h/r\nx", tip("workspace/r-b"), 1),
            ]
        );
    }

    /// The push's preparation and the cache check run by sh with the
    /// host's git, in a directory laid out like the VM user's home.
    #[test]
    fn a_missing_workspace_is_made_before_the_push_once_the_cache_has_the_tip() {
        let home = tempfile::tempdir().unwrap();
        let src = home.path().join("src");
        let tip = one_commit(&src, "main");
        let branch = "f/x'$(touch${IFS}pwned)`id`";
        let ws = Workspace::new(&host("/h/r", "r"), branch);
        let args = [ws.cache.as_str(), &ws.dir, branch, "/h/r", &tip];
        let run = |script: &str, args: &[&str]| {
            let out = std::process::Command::new("sh")
                .current_dir(home.path())
                .arg("-c")
                .arg(shell::script(script, args).unwrap())
                .output()
                .unwrap();
            (out.status.code(), String::from_utf8(out.stdout).unwrap())
        };
        // No cache, then a cache without the tip: the host must bring it.
        assert_eq!(run(PREPARE_WORKSPACE, &args).0, Some(3));
        assert_eq!(run(ENSURE_CACHE, &args[..2]), (Some(0), "new\n".into()));
        assert_eq!(run(PREPARE_WORKSPACE, &args).0, Some(3));
        let cache = home.path().join(&ws.cache);
        host_git(&src, &["push", "-q", cache.to_str().unwrap(), "HEAD:refs/heads/other"]);
        host_git(&cache, &["repack", "-adq"]);
        assert_eq!(run(ENSURE_CACHE, &args[..2]), (Some(0), "missing\n".into()));
        // The cache has it (another branch brought it): made in place.
        assert_eq!(run(PREPARE_WORKSPACE, &args), (Some(0), "created\n".into()));
        let dir = home.path().join(&ws.dir);
        assert_eq!(host_git(&dir, &["rev-parse", "HEAD"]), tip);
        assert_eq!(host_git(&dir, &["symbolic-ref", "HEAD"]), format!("refs/heads/{branch}"));
        assert_eq!(host_git(&dir, &["config", "agent-vm.branch"]), branch);
        assert_eq!(host_git(&dir, &["remote"]), "");
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert!(!home.path().join("pwned").exists() && !dir.join("pwned").exists());
        // Present: nothing more to do.
        assert_eq!(run(PREPARE_WORKSPACE, &args), (Some(0), String::new()));
        assert_eq!(run(ENSURE_CACHE, &args[..2]), (Some(0), "present\n".into()));
    }

    /// What a terminal shows: each phase in turn, nothing once finished.
    #[test]
    fn progress_shows_each_phase_then_clears() {
        let term = indicatif::InMemoryTerm::new(4, 100);
        let t = term.clone();
        let progress = Progress::drawing_to(move || indicatif::ProgressDrawTarget::term_like(Box::new(t.clone())));
        progress.objects("Counting", 5, 10);
        assert!(
            term.contents().contains("Counting [") && term.contents().contains("5/10 objects"),
            "{}",
            term.contents()
        );
        progress.bytes("Sending", 3 << 20, 8 << 20);
        let shown = term.contents();
        assert!(shown.contains("Sending") && shown.contains("3.00 MiB/8.00 MiB"), "{shown}");
        assert!(!shown.contains("Counting"), "{shown}");
        progress.waiting("Checking out");
        let shown = term.contents();
        assert!(shown.contains("Checking out (") && !shown.contains("Sending"), "{shown}");
        progress.finish();
        assert_eq!(term.contents().trim(), "");
        // A later phase draws again (a finished bar would not).
        progress.objects("Packing", 1, 2);
        assert!(term.contents().contains("Packing"), "{}", term.contents());
    }

    #[test]
    fn printable_lines_keeps_our_line_breaks_only() {
        assert_eq!(
            printable_lines("error: x\n\tthe VM said: \x1b]52;c;Zm9v\x07 \u{202e}txt.exe\r"),
            "error: x\n\tthe VM said: ?]52;c;Zm9v? ?txt.exe?"
        );
        assert_eq!(printable("a\nb\u{2066}"), "a?b?");
    }

    #[test]
    fn printable_strips_escapes() {
        assert_eq!(printable("a\x1b[31mb\n"), "a?[31mb?");
    }
}
