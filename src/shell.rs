//! Remote shell command lines. Every string that reaches a remote shell is
//! built here, and every word in it goes through [`quote`].

use anyhow::{Result, anyhow};

/// Quotes `words` for a POSIX shell so that each arrives as exactly one
/// argument, whatever it contains. The only quoting function in agent-vm.
pub fn quote<S: AsRef<str>>(words: &[S]) -> Result<String> {
    shlex::try_join(words.iter().map(|w| w.as_ref()))
        .map_err(|e| anyhow!("cannot pass {:?} to a shell: {e}", first_bad(words)))
}

fn first_bad<S: AsRef<str>>(words: &[S]) -> &str {
    words.iter().map(|w| w.as_ref()).find(|w| w.contains('\0')).unwrap_or("")
}

/// Read by agent-vm's sessions in place of a login shell's startup, where
/// provisioning wrote it: the same files a login bash reads, without the
/// processes Debian's /etc/profile starts (`id`, `run-parts`; tens of
/// milliseconds each on a slow guest). It returns 1 when it does not apply
/// (not bash, or /etc/profile is not the one it stands for), and a real
/// login shell runs.
pub const LOGIN_PROFILE: &str = "/etc/agent-vm/login.sh";

/// Shell text exporting the $2 `NAME=value` words after $2 and leaving
/// what follows them as $1…: [`in_dir`]'s words, its directory taken.
macro_rules! exports {
    () => {
        r#"n=$2
shift 2
while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n - 1)); done
"#
    };
}
pub(crate) use exports;

/// Shell text running $3… in directory $1 (relative to the remote home;
/// the home itself when empty), with the $2 `NAME=value` words after $2
/// exported first (`export` is a builtin: no `env` process to start on a
/// slow guest). Its arguments come from [`in_dir`].
pub const IN_DIR: &str = concat!(
    r#"[ -z "$1" ] || cd -- "$1" || exit
"#,
    exports!(),
    r#"exec "$@""#
);

/// [`IN_DIR`]'s arguments: `argv` in `cwd` when given, with `exports`.
pub fn in_dir<S: AsRef<str>>(cwd: Option<&str>, exports: &[String], argv: &[S]) -> Vec<String> {
    let mut words = vec![cwd.unwrap_or("").to_owned(), exports.len().to_string()];
    words.extend(exports.iter().cloned());
    words.extend(argv.iter().map(|a| a.as_ref().to_owned()));
    words
}

/// A command line running `argv` as [`IN_DIR`] does, after what a login
/// shell reads (so /etc/profile.d and ~/.profile apply, as in an
/// interactive session, and the agents' tools are on PATH).
pub fn login_command<S: AsRef<str>>(cwd: Option<&str>, exports: &[String], argv: &[S]) -> Result<String> {
    login_script(IN_DIR, &in_dir(cwd, exports, argv))
}

/// [`login_command`] without the profile, for an `argv` that is itself a
/// login shell.
pub fn in_dir_command<S: AsRef<str>>(cwd: Option<&str>, exports: &[String], argv: &[S]) -> Result<String> {
    Ok(format!("set -- {}\n{IN_DIR}", quote(&in_dir(cwd, exports, argv))?))
}

/// A command line running a fixed `script` with `args` as $1…, after what a
/// login shell reads. It is read by the remote account's own shell, which
/// must be a POSIX one (the agent's is bash): one shell fewer to start. The
/// arguments appear once in it, the script twice (for the fallback).
pub fn login_script<S: AsRef<str>>(script: &str, args: &[S]) -> Result<String> {
    login_script_after("", script, args)
}

/// [`login_script`], with `check` run first, before the profile, in the
/// same shell and with the same $1… (it may `shift` them, or `exit`).
pub fn login_script_after<S: AsRef<str>>(check: &str, script: &str, args: &[S]) -> Result<String> {
    let profile = quote(&[LOGIN_PROFILE])?;
    Ok(format!(
        "set -- {}\n{check}\n[ -r {profile} ] && . {profile} || exec bash --login -c {} agent-vm \"$@\"\n{script}",
        quote(args)?,
        quote(&[script])?
    ))
}

/// A command line that runs a fixed `script` with `args` as its positional
/// parameters ($1, $2, …): the script text is ours, the arguments may be
/// anything and are never parsed as shell syntax.
pub fn script<S: AsRef<str>>(script: &str, args: &[S]) -> Result<String> {
    prefixed_script(&[], script, args)
}

/// [`script`], run as root through `sudo -n` (the VM user has
/// passwordless sudo; -n makes a missing rule an error, not a prompt).
pub fn script_as_root<S: AsRef<str>>(script: &str, args: &[S]) -> Result<String> {
    prefixed_script(&["sudo", "-n"], script, args)
}

/// A command line running `first` (its stdout sent to stderr) and then,
/// only if it succeeded, `then` in the shell's place. Both come from this
/// module.
pub fn then_exec(first: &str, then: &str) -> String {
    format!("{first} >&2 && exec {then}")
}

/// A command line running `command` unless `path` exists (succeeding
/// without running it when it does).
pub fn unless_exists(path: &str, command: &str) -> Result<String> {
    Ok(format!("[ -e {} ] || {command}", quote(&[path])?))
}

fn prefixed_script<S: AsRef<str>>(prefix: &[&str], script: &str, args: &[S]) -> Result<String> {
    let mut words: Vec<&str> = prefix.to_vec();
    words.extend(["sh", "-c", script, "agent-vm"]);
    words.extend(args.iter().map(|a| a.as_ref()));
    quote(&words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh_words(line: &str) -> Vec<String> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("for w in {line}; do printf '%s\\0' \"$w\"; done"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().split_terminator('\0').map(str::to_owned).collect()
    }

    fn nul_split(out: &[u8]) -> Vec<String> {
        String::from_utf8(out.to_vec()).unwrap().split_terminator('\0').map(str::to_owned).collect()
    }

    const HOSTILE: &[&str] = &[
        "plain",
        "with space",
        "it's",
        "\"dq\"",
        "$(touch /tmp/x)",
        "`id`",
        "a;b",
        "a&&b",
        "-rf",
        "*",
        "~",
        "back\\slash",
        "new\nline",
        "ünïcødé ✓",
        "",
        "$HOME",
        "!bang",
        "{a,b}",
        "#hash",
    ];

    #[test]
    fn quote_round_trips_through_a_real_shell() {
        assert_eq!(sh_words(&quote(HOSTILE).unwrap()), HOSTILE);
    }

    #[test]
    fn quote_rejects_nul() {
        assert!(quote(&["a\0b"]).is_err());
    }

    #[test]
    fn script_passes_arguments_verbatim() {
        let line = script("printf '%s\\0' \"$@\"", HOSTILE).unwrap();
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(nul_split(&out.stdout), HOSTILE);
    }

    /// `line` run by `sh` (dash or bash) with a home of its own, so no
    /// profile of the developer's changes what it prints.
    fn run_line(sh: &str, line: &str) -> std::process::Output {
        let home = tempfile::tempdir().unwrap();
        Command::new(sh).arg("-c").arg(line).env("HOME", home.path()).current_dir(home.path()).output().unwrap()
    }

    /// By sh and by bash (the agent's shell), after a check that shifts;
    /// through the fallback, a real login shell, on a host without
    /// agent-vm's login profile.
    #[test]
    fn login_script_passes_arguments_verbatim() {
        for sh in ["sh", "bash"] {
            let line = login_script("printf '%s\\0' \"$@\"", HOSTILE).unwrap();
            assert_eq!(nul_split(&run_line(sh, &line).stdout), HOSTILE, "{sh}");
            let line = login_script_after("printf 'check:%s\\0' \"$1\"; shift", "printf '%s\\0' \"$@\"", HOSTILE);
            let want: Vec<String> =
                std::iter::once("check:plain").chain(HOSTILE[1..].iter().copied()).map(str::to_owned).collect();
            assert_eq!(nul_split(&run_line(sh, &line.unwrap()).stdout), want, "{sh}");
        }
    }

    #[test]
    fn login_command_runs_in_dir_with_its_words_intact() {
        let dir = tempfile::tempdir().unwrap();
        let weird = dir.path().join("a dir; $(x)");
        std::fs::create_dir(&weird).unwrap();
        let argv = ["sh", "-c", "pwd; printf '%s\\0' \"$@\"", "sh"];
        let argv: Vec<&str> = argv.into_iter().chain(HOSTILE.iter().copied()).collect();
        for line in [
            login_command(Some(weird.to_str().unwrap()), &[], &argv).unwrap(),
            in_dir_command(Some(weird.to_str().unwrap()), &[], &argv).unwrap(),
        ] {
            let out = String::from_utf8(run_line("sh", &line).stdout).unwrap();
            let (pwd, words) = out.split_once('\n').unwrap();
            assert_eq!(pwd, weird.to_str().unwrap());
            assert_eq!(nul_split(words.as_bytes()), HOSTILE);
        }
        // No directory: the home. A directory that is not there: nothing runs.
        let out =
            run_line("sh", &login_command(None, &[], &["sh", "-c", "[ \"$PWD\" = \"$HOME\" ] && echo home"]).unwrap());
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "home\n");
        let out = run_line("sh", &login_command(Some("/nonexistent"), &[], &["echo", "ran"]).unwrap());
        assert!(out.stdout.is_empty() && !out.status.success());
    }

    /// A command's words appear once in its line (the line has a size limit).
    #[test]
    fn a_long_command_is_not_repeated() {
        let long = "x".repeat(100_000);
        assert!(login_command(Some("dir"), &[], &["echo", &long]).unwrap().len() < long.len() + 4096);
    }

    #[test]
    fn exported_values_arrive_verbatim() {
        let exports: Vec<String> = HOSTILE.iter().enumerate().map(|(i, v)| format!("V{i}={v}")).collect();
        let line = login_command(None, &exports, &["env", "-0"]).unwrap();
        let env = String::from_utf8(run_line("sh", &line).stdout).unwrap();
        for (i, v) in HOSTILE.iter().enumerate() {
            assert!(env.split('\0').any(|e| e == format!("V{i}={v}")), "V{i} did not arrive as {v:?}");
        }
    }

    #[test]
    fn then_exec_runs_the_second_only_after_the_first_succeeded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("it's here");
        let run = |first: &str, guarded: bool| {
            let mut first = script(first, &["a b"]).unwrap();
            if guarded {
                first = unless_exists(path.to_str().unwrap(), &first).unwrap();
            }
            let line = then_exec(&first, &quote(&["printf", "then:%s", "x;y"]).unwrap());
            let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
            (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
        };
        // The first one's stdout is kept off the second one's (a protocol stream).
        assert_eq!(run("echo \"first:$1\"", false), (Some(0), "then:x;y".into(), "first:a b\n".into()));
        assert_eq!(run("echo no; exit 3", false), (Some(3), String::new(), "no\n".into()));
        assert_eq!(run("echo no; exit 3", true), (Some(3), String::new(), "no\n".into()));
        std::fs::create_dir(&path).unwrap();
        assert_eq!(run("echo no; exit 3", true), (Some(0), "then:x;y".into(), String::new()));
    }
}
