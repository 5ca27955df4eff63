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
/// (not bash, or /etc/profile changed since), and a real login shell runs.
pub const LOGIN_PROFILE: &str = "/etc/agent-vm/login.sh";

/// Shell text running `argv` in `cwd` when given (relative paths are
/// relative to the remote home directory), with `exports` (`NAME=value`)
/// added to its environment. Not itself a login session: give it to
/// [`login_script`], or make `argv` a login shell.
pub fn in_dir<S: AsRef<str>>(cwd: Option<&str>, exports: &[String], argv: &[S]) -> Result<String> {
    let mut text = String::new();
    if let Some(dir) = cwd {
        text += &format!("cd {} && ", quote(&[dir])?);
    }
    // `export` is a builtin: no `env` process to start on a slow guest.
    if !exports.is_empty() {
        text += &format!("export {} && ", quote(exports)?);
    }
    text += &format!("exec {}", quote(argv)?);
    Ok(text)
}

/// A command line running `argv` as [`in_dir`] does, after what a login
/// shell reads (so /etc/profile.d and ~/.profile apply, as in an
/// interactive session, and the agents' tools are on PATH).
pub fn login_command<S: AsRef<str>>(cwd: Option<&str>, exports: &[String], argv: &[S]) -> Result<String> {
    login_script(&in_dir(cwd, exports, argv)?, &[] as &[&str])
}

/// A command line running a fixed `script` with `args` as $1…, after what a
/// login shell reads. It is read by the remote account's own shell, which
/// must be a POSIX one (the agent's is bash): one shell fewer to start.
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
    use std::path::Path;
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

    /// Through the fallback (this host has no login profile of agent-vm's),
    /// by sh and by bash (the agent's shell), after a check that shifts.
    #[test]
    fn login_script_passes_arguments_verbatim() {
        assert!(!Path::new(LOGIN_PROFILE).exists());
        for sh in ["sh", "bash"] {
            let line = login_script("printf '%s\\0' \"$@\"", HOSTILE).unwrap();
            let out = Command::new(sh).arg("-c").arg(&line).output().unwrap();
            assert_eq!(nul_split(&out.stdout), HOSTILE, "{sh}");
            let line = login_script_after("printf 'check:%s\\0' \"$1\"; shift", "printf '%s\\0' \"$@\"", HOSTILE);
            let out = Command::new(sh).arg("-c").arg(line.unwrap()).output().unwrap();
            let want: Vec<String> =
                std::iter::once("check:plain").chain(HOSTILE[1..].iter().copied()).map(str::to_owned).collect();
            assert_eq!(nul_split(&out.stdout), want, "{sh}");
        }
    }

    #[test]
    fn login_command_runs_in_dir() {
        let dir = tempfile::tempdir().unwrap();
        let weird = dir.path().join("a dir; $(x)");
        std::fs::create_dir(&weird).unwrap();
        let line = login_command(Some(weird.to_str().unwrap()), &[], &["pwd"]).unwrap();
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end(), weird.to_str().unwrap());
    }

    #[test]
    fn exported_values_arrive_verbatim() {
        let exports: Vec<String> = HOSTILE.iter().enumerate().map(|(i, v)| format!("V{i}={v}")).collect();
        let line = login_command(None, &exports, &["env", "-0"]).unwrap();
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
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
