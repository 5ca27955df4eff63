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

/// A command line that runs `argv` in a login shell (so /etc/profile.d is
/// read, as in an interactive session), in `cwd` when given (relative paths
/// are relative to the remote home directory).
pub fn login_command<S: AsRef<str>>(cwd: Option<&str>, argv: &[S]) -> Result<String> {
    quote(&login_argv(cwd, &[], argv)?)
}

/// The words of [`login_command`], with `exports` (`NAME=value`) added to
/// the command's environment once the login shell has read its profile.
pub fn login_argv<S: AsRef<str>>(cwd: Option<&str>, exports: &[String], argv: &[S]) -> Result<Vec<String>> {
    let mut inner = String::new();
    if let Some(dir) = cwd {
        inner += &format!("cd {} && ", quote(&[dir])?);
    }
    // `export` is a builtin: no `env` process to start on a slow guest.
    if !exports.is_empty() {
        inner += &format!("export {} && ", quote(exports)?);
    }
    inner += &format!("exec {}", quote(argv)?);
    Ok(vec!["bash".into(), "--login".into(), "-c".into(), inner])
}

/// A command line that runs a fixed `script` with `args` as its positional
/// parameters ($1, $2, …): the script text is ours, the arguments may be
/// anything and are never parsed as shell syntax.
pub fn script<S: AsRef<str>>(script: &str, args: &[S]) -> Result<String> {
    prefixed_script(&[], script, args)
}

/// [`script`], run by a login shell (so /etc/profile.d is read, as for
/// [`login_command`]).
pub fn login_script<S: AsRef<str>>(script: &str, args: &[S]) -> Result<String> {
    let mut words = vec!["bash", "--login", "-c", script, "agent-vm"];
    words.extend(args.iter().map(|a| a.as_ref()));
    quote(&words)
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
        let got: Vec<String> =
            String::from_utf8(out.stdout).unwrap().split_terminator('\0').map(str::to_owned).collect();
        assert_eq!(got, HOSTILE);
    }

    #[test]
    fn login_command_runs_in_dir() {
        let dir = tempfile::tempdir().unwrap();
        let weird = dir.path().join("a dir; $(x)");
        std::fs::create_dir(&weird).unwrap();
        let line = login_command(Some(weird.to_str().unwrap()), &["pwd"]).unwrap();
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end(), weird.to_str().unwrap());
    }

    #[test]
    fn exported_values_arrive_verbatim() {
        let exports: Vec<String> = HOSTILE.iter().enumerate().map(|(i, v)| format!("V{i}={v}")).collect();
        let line = quote(&login_argv(None, &exports, &["env", "-0"]).unwrap()).unwrap();
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
