//! The shell scripts agent-vm runs in the VM, and the reading of their
//! (untrusted) answers. Fixed text; every variable part is a positional
//! argument.

use anyhow::{Result, bail};
use git2::Oid;
use serde::Serialize;

/// Shell text that clones cache $1 locally (hard links, no copy) into a new
/// workspace $2 on branch $3 (host repo $4, for display), configured in the
/// same step (each process costs on a slow guest: none that is not needed).
///
/// Workspaces get their hooks from agent-vm's template (made once): a
/// `push-to-checkout` hook that does what git's updateInstead does (refuse
/// when the work tree or index differs from HEAD, else move the tree to the
/// pushed commit) in fewer git processes, and first undoes a checkout that
/// a crash cut short (`hooks/`).
macro_rules! clone_workspace {
    () => {
        concat!(
            r#"tmp="$2.agent-vm-new"
[ ! -e "$tmp" ] || rm -rf -- "$tmp"
[ -d "${2%/*}" ] || mkdir -p -- "${2%/*}"
tpl=.agent-vm/template
if [ ! -x "$tpl/hooks/agent-vm-undo-checkout" ]; then
  mkdir -p "$tpl/hooks"
  cat > "$tpl.$$.p" <<'HOOK'
"#,
            include_str!("hooks/push-to-checkout"),
            r#"HOOK
  cat > "$tpl.$$.u" <<'HOOK'
"#,
            include_str!("hooks/agent-vm-undo-checkout"),
            r#"HOOK
  chmod +x "$tpl.$$.p" "$tpl.$$.u"
  mv -f "$tpl.$$.p" "$tpl/hooks/push-to-checkout"
  mv -f "$tpl.$$.u" "$tpl/hooks/agent-vm-undo-checkout"
fi
git clone -q --local --template="$tpl" --branch="$3" -c receive.denyCurrentBranch=updateInstead \
    -c core.untrackedCache=true -c "agent-vm.branch=$3" -c "agent-vm.hostRepo=$4" -- "$1" "$tmp"
git -C "$tmp" remote remove origin
mv -T -- "$tmp" "$2"
"#
        )
    };
}

/// $1 cache, $2 workspace, $3 branch, $4 host repo (for display), $5 the
/// host's tip: run before each push into a workspace, in the push's own
/// connection. A missing workspace is created when the cache has the tip
/// (another branch's workspace brought it, or the host just sent it),
/// saying "created". Else exits 3: the host prepares the cache
/// ([`ENSURE_CACHE`]) and runs this again.
pub(super) const PREPARE_WORKSPACE: &str = concat!(
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
pub(super) const ENSURE_CACHE: &str = r#"set -e
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
pub(super) const UNPACK_OBJECTS: &str = r#"set -e
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
s=$(git --no-optional-locks -C "$1" status --porcelain=v2 --branch 2>/dev/null) || s=
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
pub(super) const PROBE: &str = probe!();

/// [`PROBE`] run before a fetch's upload-pack, in its connection, then an
/// end marker: git's own messages follow it.
macro_rules! end_of_probe {
    () => {
        "# end of probe"
    };
}
pub(super) const PROBE_BEFORE_FETCH: &str = concat!(probe!(), "\necho '", end_of_probe!(), "'");

/// `at_tip DIR BRANCH TIP`: whether the workspace's branch is at TIP. The
/// shell reads the ref itself (no process to start) unless git packed it.
macro_rules! at_tip {
    () => {
        r#"at_tip() {
  { read -r ref < "$1/.git/refs/heads/$2"; } 2>/dev/null || ref=$(git -C "$1" rev-parse -q --verify "refs/heads/$2^{commit}" 2>/dev/null)
  [ "$ref" = "$3" ]
}"#
    };
}

/// Shell text saying on stdout whether workspace $1's branch $2 is at $3
/// (the host's tip: a push would change nothing), and going on (to the
/// command that follows it, with $4…) only if it is.
pub(super) const IF_CURRENT: &str = concat!(
    at_tip!(),
    r#"
at_tip "$1" "$2" "$3" || { echo stale; exit 0; }
echo current
shift 3"#
);

/// For each workspace, branch and tip in $1…: a line `current` when the
/// branch there is at that tip, `stale` when not (or no workspace).
pub(super) const AT_TIPS: &str = concat!(
    at_tip!(),
    r#"
while [ $# -ge 3 ]; do
  if at_tip "$1" "$2" "$3"; then echo current; else echo stale; fi
  shift 3
done"#
);

/// The first line of [`IF_CURRENT`]'s answer when the command runs.
pub(super) const CURRENT: &[u8] = b"current\n";

/// $1 workspace: delete it.
pub(super) const REMOVE: &str = r#"case "$1" in workspace/?*) rm -rf -- "$1" "$1.agent-vm-new" ".agent-vm/status/${1#workspace/}" ;; *) exit 2 ;; esac"#;

/// `record DIR`: whether DIR is a workspace of agent-vm's; if so sets `b`
/// (its branch), `r` (its host repository) and `p` (what [`PROBE`] says).
macro_rules! record {
    () => {
        r#"record() {
  g=$(git -C "$1" config --get-regexp '^agent-vm\.(branch|hostrepo)$') || return 1
  b= r= k=
  while IFS= read -r l; do
    case $l in
      "agent-vm.branch "*) k=b b=${l#* } ;;
      "agent-vm.hostrepo "*) k=r r=${l#* } ;;
      # A value's next line (a path can hold a newline).
      *) if [ "$k" = r ]; then r="$r
$l"; fi ;;
    esac
  done <<EOF
$g
EOF
  [ -n "$b" ] || return 1
  p=$(probe "$1" "$b") || :
}"#
    };
}

/// The shell functions `probe` ([`PROBE`]) and `record`, for the listing
/// and the watcher's probe alike.
macro_rules! probe_functions {
    () => {
        concat!("probe() {\n", probe!(), "\n}\n", record!())
    };
}

/// $1 workspace: its record as [`LIST`] prints it (stamp 0), or nothing
/// when it is not one. The workspace watcher in the VM
/// (vm-template/workspace-watch.py) runs it for each workspace that changed.
pub const WATCH_PROBE: &str = concat!(
    probe_functions!(),
    r#"
record "$1" || exit 0
printf '%s\n\0%s\0%s\0%s\0%s\n\0' 0 "$1" "$b" "$r" "$p""#
);

/// What names [`WATCH_PROBE`] to the watcher and its clients: a watcher
/// provisioned with another version answers no listing of this one.
pub(super) fn watch_token() -> String {
    use sha1::Digest;
    sha1::Sha1::digest(WATCH_PROBE.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A listing from the workspace watcher, for the agent's login shell (bash:
/// builtins only, no process): $1 the token, $2 [`LIST`], run by sh in the
/// shell's place when the watcher does not answer in full. The watcher
/// drains its change events before it answers, so a change made before the
/// listing began is in it. Its answer escapes backslashes and NULs for
/// `printf %b` (bash's `read` keeps no NUL).
const WATCHED: &str = r#"export LC_ALL=C
w= end='agent-vm-watch: end'
if [ -n "${BASH_VERSION-}" ] && { read -r port token < .agent-vm/watch.port; } 2>/dev/null && [ "$token" = "$1" ] &&
   { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
  # A time limit for the first byte only: with one, bash reads a byte a
  # time (40 ms for 17 KB on the test guest against 3).
  if printf 'list %s\n' "$token" >&3 && IFS= read -r -N 1 -t 60 w <&3; then
    IFS= read -r -N 16777216 rest <&3; w=$w$rest
  fi
  exec 3<&-
fi
case $w in
  *"$end") printf '%b' "${w%"$end"}" ;;
  *) exec sh -c "$2" agent-vm ;;
esac"#;

/// Every workspace: a stamp, path, branch, host repo and what [`PROBE`]
/// says of it, each field ending in NUL. Probing costs processes (git's
/// config and status) per workspace, so each answer is kept in
/// `.agent-vm/status/` and reused while nothing in that workspace (its
/// `.git` included, objects aside) nor git's global config changed since
/// the last listing: one `find` over every workspace says which did (ctime:
/// a restored mtime still counts). The stamp is a second before find
/// starts, so coarse file times never hide a change made as it ran. $1
/// `fresh` probes every workspace (for a decision that must not rest on a
/// kept answer). One listing at a time keeps answers (a lock naming its
/// shell); any other only reads them.
pub(super) const LIST: &str = concat!(
    probe_functions!(),
    r#"
c=.agent-vm/status
[ -d "$c" ] || mkdir -p -- "$c"
nl='
'
keep=
{ read -r holder < "$c/.lock"; } 2>/dev/null || holder=
if [ -z "$holder" ] || ! kill -0 "$holder" 2>/dev/null; then
  echo $$ > "$c/.lock" && { read -r holder < "$c/.lock"; } 2>/dev/null && [ "$holder" = $$ ] && keep=1
fi
if [ -n "$keep" ]; then trap ': > "$c/.lock"' EXIT; trap 'exit 1' HUP INT TERM PIPE; fi
since=
[ "$1" = fresh ] || { read -r since < "$c/.since"; } 2>/dev/null || since=
: > "$c/.now"
if [ -n "$since" ]; then
  changed=$(find "$c/.now" workspace/* "$HOME/.gitconfig" "$HOME/.config/git" /etc/gitconfig \
      \( -path "$c/.now" -printf 'now %C@\n' \) -o \( -path '*/.git/objects' -prune \) -o \
      \( -newerct "@$since" -printf '%H\n' \) 2>/dev/null | uniq)
  case "$nl$changed$nl" in
    *"$nl$HOME/.gitconfig$nl"*|*"$nl$HOME/.config/git$nl"*|*"$nl/etc/gitconfig$nl"*) since= ;;
  esac
else
  changed=$(find "$c/.now" -printf 'now %C@\n' 2>/dev/null)
fi
stamp=
case $changed in "now "[0-9]*) stamp=${changed%%"$nl"*}; stamp=${stamp#now }; stamp=$((${stamp%.*} - 1)) ;; esac
# No time from find (it failed): nothing kept is trusted, nothing is kept.
[ -n "$stamp" ] || keep= since=
set --
for d in workspace/*; do
  [ -d "$d/.git" ] || continue
  f="$c/${d#workspace/}"
  if [ -n "$since" ] && [ -s "$f" ]; then
    case "$nl$changed$nl" in *"$nl$d$nl"*) ;; *) set -- "$@" "$f"; continue ;; esac
  fi
  record "$d" || continue
  printf '%s\n\0%s\0%s\0%s\0%s\n\0' "$stamp" "$d" "$b" "$r" "$p"
  # One write: a reader never sees half an answer.
  if [ -n "$keep" ]; then printf '%s\n\0%s\0%s\0%s\0%s\n\0' "$stamp" "$d" "$b" "$r" "$p" > "$f"; fi
done
if [ -n "$keep" ]; then echo "$stamp" > "$c/.since"; fi
[ $# -eq 0 ] || cat -- "$@""#
);

/// The command line of [`LIST`] (`fresh` or not), after `first`, a script
/// with `args` printing one line, in the same shell.
///
/// Not fresh, the listing comes from the workspace watcher when it answers
/// ([`WATCHED`], read by the agent's login shell itself), else from [`LIST`].
pub(super) fn list_script(first: &str, args: &[&str], fresh: bool) -> anyhow::Result<String> {
    let first = match first {
        "" => String::new(),
        _ => format!("first() {{\n{first}\n}}\nfirst {}\n", crate::shell::quote(args)?),
    };
    if fresh {
        return crate::shell::script(&format!("{first}{LIST}"), &["fresh"]);
    }
    Ok(format!("set -- {}\n{first}{WATCHED}", crate::shell::quote(&[watch_token().as_str(), LIST])?))
}

/// [`list_script`]'s answer: `first`'s line, and the workspaces.
pub(super) fn parse_list_after(first: &str, text: &str) -> (String, Vec<Listed>) {
    let (head, rest) = match first {
        "" => ("", text),
        _ => text.split_once('\n').unwrap_or((text, "")),
    };
    (head.to_owned(), parse_list(rest))
}

/// What the VM says about one workspace (untrusted).
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Absent,
    Present { tip: Option<Oid>, changes: u64 },
}

/// Reads [`LIST`]'s answer (untrusted, for display).
pub(super) fn parse_list(text: &str) -> Vec<Listed> {
    let fields: Vec<&str> = text.split_terminator('\0').collect();
    let mut listed: Vec<Listed> = fields
        .chunks_exact(5)
        .map(|f| {
            let (tip, changes) = match parse_probe(f[4], f[2]) {
                Some(Probe::Present { tip, changes }) => (tip, changes),
                _ => (None, 0),
            };
            Listed { dir: f[1].to_owned(), branch: f[2].to_owned(), host_repo: f[3].to_owned(), tip, changes }
        })
        .collect();
    // Probed ones come first, kept ones after: back in the order of names.
    listed.sort_by(|a, b| a.dir.cmp(&b.dir));
    listed
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

/// Reads [`PROBE`]'s answer (untrusted: anything malformed is None).
pub(super) fn parse_probe(out: &str, branch: &str) -> Option<Probe> {
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
pub(super) fn split_probe<'a>(stderr: &'a str, branch: &str) -> (Option<Probe>, &'a str) {
    match stderr
        .split_once(concat!("\n", end_of_probe!(), "\n"))
        .or_else(|| stderr.strip_suffix(concat!("\n", end_of_probe!())).map(|said| (said, "")))
    {
        Some((said, rest)) => (parse_probe(said, branch), rest),
        None => (None, stderr),
    }
}

pub(super) fn ser_oid<S: serde::Serializer>(oid: &Option<Oid>, s: S) -> Result<S::Ok, S::Error> {
    match oid {
        Some(o) => s.serialize_str(&o.to_string()),
        None => s.serialize_none(),
    }
}

pub(super) fn parse_oid(text: &str) -> Result<Oid> {
    let text = text.trim();
    if text.len() != 40 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the VM sent a malformed commit id");
    }
    Ok(Oid::from_str(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell;
    use crate::workspace::Workspace;
    use crate::workspace::names::tests::host;
    use std::path::Path;
    #[test]
    fn oids_from_the_vm_are_parsed_strictly() {
        assert!(parse_oid("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(parse_oid("0123").is_err());
        assert!(parse_oid("zz23456789abcdef0123456789abcdef01234567").is_err());
    }

    /// Runs the host's git in `dir`; its trimmed stdout.
    fn host_git(dir: &Path, args: &[&str]) -> String {
        crate::test_git::git(dir, args).trim().to_owned()
    }

    /// A VM script run by sh with the host's git in `home` (laid out like
    /// the VM user's home).
    fn sh_in(home: &Path, script: &str, args: &[&str]) -> std::process::Output {
        let line = shell::script(script, args).unwrap();
        std::process::Command::new("sh").current_dir(home).arg("-c").arg(line).output().unwrap()
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

    /// The check before a command in a workspace, by sh with the host's git
    /// (and a real login shell, the host having no login profile of ours):
    /// the command runs only when the branch is at the host's tip, however
    /// git stores the ref.
    #[test]
    fn a_command_runs_only_in_a_workspace_at_the_hosts_tip() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let marker = tmp.path().join("ran");
        let run = |branch: &str, tip: &str| {
            let _ = std::fs::remove_file(&marker);
            let argv = ["sh", "-c", "touch \"$1\"; echo \"$2\"", "sh", marker.to_str().unwrap(), "it's $(me)"];
            let mut args = vec![ws.to_str().unwrap().to_owned(), branch.to_owned(), tip.to_owned()];
            args.extend(shell::in_dir(None, &[], &argv));
            let line = shell::login_script_after(IF_CURRENT, shell::IN_DIR, &args).unwrap();
            let out = std::process::Command::new("sh").arg("-c").arg(line).env("HOME", tmp.path()).output();
            (String::from_utf8(out.unwrap().stdout).unwrap(), marker.exists())
        };
        let zeros = "0".repeat(40);
        assert_eq!(run("feature/x", &zeros), ("stale\n".into(), false), "no workspace");
        let tip = one_commit(&ws, "feature/x");
        assert_eq!(run("feature/x", &tip), ("current\nit's $(me)\n".into(), true));
        assert_eq!(run("feature/x", &zeros), ("stale\n".into(), false), "another tip");
        assert_eq!(run("feature", &tip), ("stale\n".into(), false), "another branch");
        host_git(&ws, &["pack-refs", "--all"]);
        assert!(!ws.join(".git/refs/heads/feature/x").exists());
        assert_eq!(run("feature/x", &tip), ("current\nit's $(me)\n".into(), true), "a packed ref");
        assert_eq!(run("feature/x", &zeros), ("stale\n".into(), false), "a packed ref, another tip");
    }

    /// The check before `run`, by sh with the host's git: one line per
    /// workspace, `current` only where the branch is at the tip given.
    #[test]
    fn each_workspace_is_told_current_or_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let tip_a = one_commit(&a, "x");
        let tip_b = one_commit(&b, "y/z");
        host_git(&b, &["pack-refs", "--all"]);
        let zeros = "0".repeat(40);
        let (a, b, none) = (a.to_str().unwrap(), b.to_str().unwrap(), tmp.path().join("none"));
        let none = none.to_str().unwrap();
        let args = [a, "x", &tip_a, b, "y/z", &tip_b, a, "x", &zeros, b, "x", &tip_b, none, "x", &tip_a];
        let out = std::process::Command::new("sh").arg("-c").arg(shell::script(AT_TIPS, &args).unwrap()).output();
        assert_eq!(String::from_utf8(out.unwrap().stdout).unwrap(), "current\ncurrent\nstale\nstale\nstale\n");
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
        // A PATH without git: only answers kept from before can list anything.
        let no_git = home.path().join("no-git");
        std::fs::create_dir(&no_git).unwrap();
        for tool in ["sh", "find", "uniq", "cat", "mkdir"] {
            let path = String::from_utf8(
                std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().stdout,
            )
            .unwrap();
            std::os::unix::fs::symlink(path.trim(), no_git.join(tool)).unwrap();
        }
        let list_after = |first: &str, args: &[&str], path: Option<&Path>| {
            let mut cmd = std::process::Command::new("sh");
            let line = list_script(first, &["a b", "it's"], args == ["fresh"]).unwrap();
            cmd.current_dir(home.path()).env("HOME", home.path()).arg("-c").arg(line);
            if let Some(p) = path {
                cmd.env("PATH", p);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let (head, listed) = parse_list_after(first, &String::from_utf8(out.stdout).unwrap());
            let rows = listed
                .iter()
                .map(|l| (l.dir.clone(), l.branch.clone(), l.host_repo.clone(), l.tip, l.changes))
                .collect::<Vec<_>>();
            (head, rows)
        };
        let list = |args: &[&str], path: Option<&Path>| list_after("", args, path).1;
        let tip = |dir: &str| Some(Oid::from_str(&git(dir, &["rev-parse", "HEAD"])).unwrap());
        let row = |d: &str, b: &str, n| (d.to_owned(), b.to_owned(), "/h/r\nx".to_owned(), tip(d), n);
        // Changes less than a second or two before a listing count as new.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let first = list(&[], None);
        assert_eq!(first, [row("workspace/r-a", "a", 0), row("workspace/r-b", "f/b'$(x)", 1)]);
        // Nothing changed: the kept answers, no git needed.
        assert_eq!(list(&[], Some(&no_git)), first);
        // A change in one workspace is seen at once, the other stays kept.
        std::fs::write(home.path().join("workspace/r-a/f"), "changed").unwrap();
        assert_eq!(list(&[], Some(&no_git)), [row("workspace/r-b", "f/b'$(x)", 1)], "the changed one needs git");
        assert_eq!(list(&[], None), [row("workspace/r-a", "a", 1), row("workspace/r-b", "f/b'$(x)", 1)]);
        // So is a commit (only .git changes).
        let kept_b = list(&[], Some(&no_git));
        git("workspace/r-a", &["commit", "-qam", "two"]);
        assert_eq!(list(&[], None), [row("workspace/r-a", "a", 0), row("workspace/r-b", "f/b'$(x)", 1)]);
        assert!(kept_b.contains(&row("workspace/r-b", "f/b'$(x)", 1)), "{kept_b:?}");
        // Fresh: every workspace probed, nothing kept is used.
        assert_eq!(list(&["fresh"], Some(&no_git)), []);
        // A stamp find cannot read: nothing kept is trusted.
        assert!(!list(&[], Some(&no_git)).is_empty());
        std::fs::write(home.path().join(".agent-vm/status/.since"), "garbage\n").unwrap();
        assert_eq!(list(&[], Some(&no_git)), []);
        // Another question first, in the same shell: its line, then the list.
        let plain = list(&[], None);
        let first = r#"printf '%s|%s\n' "$1" "$2""#;
        assert_eq!(list_after(first, &[], None), ("a b|it's".to_owned(), plain));
    }

    /// The workspace watcher (python3, inotify) in a directory laid out like
    /// the VM user's home, asked by the listing as the agent's login shell
    /// runs it (bash) with an empty PATH: an answer there came from the
    /// watcher with builtins only. Each change shows in the next listing.
    #[test]
    fn the_watcher_answers_listings_and_sees_each_change_at_once() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let git = |dir: &str, args: &[&str]| host_git(&h.join(dir), args);
        let make = |dir: &str, branch: &str| {
            std::fs::create_dir_all(h.join(dir)).unwrap();
            git(dir, &["init", "-q", "-b", branch]);
            git(dir, &["config", "agent-vm.branch", branch]);
            git(dir, &["config", "agent-vm.hostRepo", "/h/r\\0\nx"]);
            std::fs::write(h.join(dir).join("f"), "1").unwrap();
            git(dir, &["add", "f"]);
            git(dir, &["commit", "-q", "-m", "f"]);
        };
        make("workspace/r-a", "a");
        make("workspace/r-b", "f/b'$(x)%c");
        std::fs::write(h.join("probe.sh"), WATCH_PROBE).unwrap();
        let watcher = |budget: &str| {
            std::process::Command::new("python3")
                .env("AGENT_VM_WATCH_BUDGET", budget)
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/vm-template/workspace-watch.py"))
                .arg(h.join("probe.sh"))
                .current_dir(h)
                .env("HOME", h)
                .spawn()
                .unwrap()
        };
        let port_file = h.join(".agent-vm/watch.port");
        let started = |child: &mut std::process::Child| {
            for _ in 0..200 {
                if port_file.exists() {
                    return;
                }
                assert!(child.try_wait().unwrap().is_none(), "the watcher exited");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            panic!("no port file");
        };
        let mut w = watcher("100000");
        started(&mut w);
        let empty = h.join("empty");
        std::fs::create_dir(&empty).unwrap();
        type Row = (String, String, String, Option<Oid>, u64);
        let run = |shell: &str, fresh: bool, path: Option<&Path>| -> Option<Vec<Row>> {
            let mut cmd = std::process::Command::new(shell);
            let line = list_script("", &[], fresh).unwrap();
            cmd.current_dir(h).env("HOME", h).arg("-c").arg(line);
            if let Some(p) = path {
                cmd.env("PATH", p);
            }
            let out = cmd.output().unwrap();
            if !out.status.success() {
                return None;
            }
            let rows = parse_list(&String::from_utf8(out.stdout).unwrap())
                .into_iter()
                .map(|l| (l.dir, l.branch, l.host_repo, l.tip, l.changes))
                .collect();
            Some(rows)
        };
        let watched = || run("/bin/bash", false, Some(&empty)).expect("no answer from the watcher");
        let fresh = || run("sh", true, None).unwrap();
        let check = |why: &str| {
            let (a, b) = (watched(), fresh());
            assert_eq!(a, b, "{why}");
            a
        };
        let rows = check("first");
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].1.as_str(), rows[1].2.as_str()), ("f/b'$(x)%c", "/h/r\\0\nx"));
        // Edits, each listed at once (no wait for the watcher).
        for i in 0..10 {
            std::fs::write(h.join("workspace/r-a/f"), if i % 2 == 0 { "edited" } else { "1" }).unwrap();
            assert_eq!(watched()[0].4, if i % 2 == 0 { 1 } else { 0 }, "edit {i}");
        }
        // Only .git changes: a commit.
        std::fs::write(h.join("workspace/r-a/f"), "two").unwrap();
        git("workspace/r-a", &["commit", "-qam", "two"]);
        check("a commit");
        // A directory made and filled at once, then a change deep in it:
        // the new directory is watched too.
        std::fs::create_dir_all(h.join("workspace/r-b/x/y")).unwrap();
        std::fs::write(h.join("workspace/r-b/x/y/g"), "1").unwrap();
        check("a new directory");
        git("workspace/r-b", &["add", "-A"]);
        git("workspace/r-b", &["commit", "-qm", "g"]);
        check("its commit");
        std::fs::write(h.join("workspace/r-b/x/y/g"), "2").unwrap();
        assert_eq!(check("an edit in the new directory")[1].4, 1);
        // Git's global config changes what every workspace says.
        std::fs::write(h.join("workspace/r-a/untracked"), "u").unwrap();
        assert_eq!(check("untracked")[0].4, 1);
        std::fs::write(h.join(".gitconfig"), "[status]\n\tshowUntrackedFiles = no\n").unwrap();
        assert_eq!(check("global config")[0].4, 0);
        // A workspace made, one renamed, one removed.
        make("workspace/r-c", "c");
        assert_eq!(check("a new workspace").len(), 3);
        std::fs::rename(h.join("workspace/r-c"), h.join("workspace/r-d")).unwrap();
        assert_eq!(check("renamed")[2].0, "workspace/r-d");
        std::fs::remove_dir_all(h.join("workspace/r-d")).unwrap();
        assert_eq!(check("removed").len(), 2);
        // Unchanged, nothing is probed again (a probe now only leaves a mark),
        // and a change probes only its workspace.
        let kept = watched();
        std::fs::write(h.join("probe.sh"), "echo \"$1\" >> \"$HOME/probed\"").unwrap();
        assert_eq!(watched(), kept);
        assert!(!h.join("probed").exists(), "probed again");
        std::fs::write(h.join("workspace/r-b/f"), "3").unwrap();
        assert_eq!(watched(), kept[..1]);
        assert_eq!(std::fs::read_to_string(h.join("probed")).unwrap(), "workspace/r-b\n");
        std::fs::write(h.join("probe.sh"), WATCH_PROBE).unwrap();
        std::fs::write(h.join("workspace/r-b/f"), "4").unwrap();
        // Another version's watcher, or none: the shell lists by itself.
        let text = std::fs::read_to_string(&port_file).unwrap();
        let (port, _) = text.trim().split_once(' ').unwrap();
        std::fs::write(&port_file, format!("{port} 0123456789abcdef\n")).unwrap();
        assert_eq!(run("/bin/bash", false, Some(&empty)), None, "no process, so no listing");
        assert_eq!(run("/bin/bash", false, None), Some(fresh()));
        std::fs::write(&port_file, text).unwrap();
        assert_eq!(run("/bin/bash", false, Some(&empty)), Some(fresh()));
        w.kill().unwrap();
        w.wait().unwrap();
        assert_eq!(run("/bin/bash", false, Some(&empty)), None);
        std::fs::write(h.join("workspace/r-a/f"), "after").unwrap();
        assert_eq!(run("/bin/bash", false, None), Some(fresh()), "the watcher gone");
        // Out of watches (its share of the agent's): a workspace not fully
        // watched is probed on every listing, so its changes still show.
        std::fs::remove_file(&port_file).unwrap();
        let mut w = watcher("3");
        started(&mut w);
        assert_eq!(check("few watches")[1].4, 2, "f and x/y/g");
        std::fs::write(h.join("workspace/r-b/x/y/g"), "1").unwrap();
        assert_eq!(check("a change where no watch is")[1].4, 1);
        // ~/workspace moved away (its watch would follow it): the watcher
        // ends, for systemd to start one watching the new one.
        std::fs::rename(h.join("workspace"), h.join("moved")).unwrap();
        let ended = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            w.try_wait().unwrap().is_some()
        });
        if !ended {
            w.kill().unwrap();
        }
        w.wait().unwrap();
        assert!(ended, "the watcher outlived its ~/workspace");
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
            let out = sh_in(home.path(), script, args);
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

    /// A push's checkout that a crash cut short (its marker names a hook
    /// that is gone; files half written) is undone by the next push, and
    /// only what it wrote: the agent's own changes stay and still stop a
    /// push that would overwrite them.
    #[test]
    fn a_checkout_cut_short_is_undone_by_the_next_push() {
        let home = tempfile::tempdir().unwrap();
        let src = home.path().join("src");
        let write = |dir: &Path, files: &[(&str, &str)]| {
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
        };
        one_commit(&src, "w");
        write(&src, &[("m", "old m\n"), ("d", "doomed\n"), ("k", "kept\n")]);
        host_git(&src, &["add", "-A"]);
        host_git(&src, &["commit", "-q", "-m", "base"]);
        let base = host_git(&src, &["rev-parse", "HEAD"]);
        let ws = Workspace::new(&host("/h/r", "r"), "w");
        let cache = home.path().join(&ws.cache);
        let run = |script: &str, args: &[&str]| {
            let out = sh_in(home.path(), script, args);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        };
        run(ENSURE_CACHE, &[&ws.cache, &ws.dir]);
        host_git(&src, &["push", "-q", cache.to_str().unwrap(), "HEAD:refs/heads/w"]);
        run(PREPARE_WORKSPACE, &[&ws.cache, &ws.dir, "w", "/h/r", &base]);
        let dir = home.path().join(&ws.dir);
        let big_m: String = (0..5000).map(|i| format!("new m line {i}\n")).collect();
        write(&src, &[("m", &big_m), ("n", "new n\n")]);
        host_git(&src, &["rm", "-q", "d"]);
        host_git(&src, &["add", "-A"]);
        host_git(&src, &["commit", "-q", "-m", "target"]);
        let target = host_git(&src, &["rev-parse", "HEAD"]);
        let push = |rev: &str| {
            let out = std::process::Command::new("git")
                .current_dir(&src)
                .args(["push", "-q", dir.to_str().unwrap(), &format!("{rev}:refs/heads/w")])
                .output()
                .unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let gone = {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            child.wait().unwrap();
            child.id()
        };
        let marker = |pid: u32, commit: &str| dir.join(format!(".git/agent-vm-checkout.{pid}.{commit}"));
        // The objects arrived, then the checkout stopped: m half written,
        // d deleted, n written; plus an untracked file of the agent's.
        host_git(&src, &["push", "-q", dir.to_str().unwrap(), "HEAD:refs/heads/incoming"]);
        write(&dir, &[("m", &big_m[..700]), ("n", "new n\n"), ("notes", "mine\n")]);
        std::fs::remove_file(dir.join("d")).unwrap();
        std::fs::write(marker(gone, &target), "").unwrap();
        // A live checkout's marker stops the push, touching nothing.
        std::fs::write(marker(std::process::id(), &target), "").unwrap();
        let (pushed, said) = push(&target);
        assert!(!pushed && said.contains("another push"), "{said}");
        assert_eq!(std::fs::read_to_string(dir.join("m")).unwrap(), &big_m[..700]);
        std::fs::remove_file(marker(std::process::id(), &target)).unwrap();
        let (pushed, said) = push(&target);
        assert!(pushed, "{said}");
        assert_eq!(host_git(&dir, &["rev-parse", "HEAD"]), target);
        assert_eq!(host_git(&dir, &["status", "--porcelain"]), "?? notes");
        assert_eq!(std::fs::read_to_string(dir.join("m")).unwrap(), big_m);
        assert!(!dir.join("d").exists());
        assert_eq!(std::fs::read_to_string(dir.join("notes")).unwrap(), "mine\n");
        assert!(
            std::fs::read_dir(dir.join(".git"))
                .unwrap()
                .all(|e| { !e.unwrap().file_name().to_string_lossy().starts_with("agent-vm-checkout") })
        );
        // Cut short again, but the agent has since edited a file the push
        // changes and one it does not: both edits stay, the push is refused.
        write(&src, &[("k", "kept, v2\n"), ("n", "newer n\n")]);
        host_git(&src, &["commit", "-q", "-am", "next"]);
        let next = host_git(&src, &["rev-parse", "HEAD"]);
        write(&dir, &[("k", "agent's k\n"), ("n", "agent's n\n"), ("m", "")]);
        std::fs::write(marker(gone, &next), "").unwrap();
        let (pushed, said) = push(&next);
        assert!(!pushed && said.contains("uncommitted changes"), "{said}");
        assert_eq!(host_git(&dir, &["rev-parse", "HEAD"]), target);
        assert_eq!(std::fs::read_to_string(dir.join("k")).unwrap(), "agent's k\n");
        assert_eq!(std::fs::read_to_string(dir.join("n")).unwrap(), "agent's n\n");
    }
}
