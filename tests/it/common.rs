//! Test harness: runs the real agent-vm binary against a real Debian 13
//! guest started by the real limactl (Lima 2.2, built by scripts/build-lima).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub const BIN: &str = env!("CARGO_BIN_EXE_agent-vm");

/// QEMU as the guests run it (`AGENT_VM_TEST_QEMU`, set by scripts/test):
/// Lima leaves `-machine/-cpu/-accel/-smp/-m` to leading arguments in
/// QEMU_SYSTEM_X86_64, so the VM is created with the template's resources
/// (what `limactl list` reports) while each guest is TCG-emulated (KVM hangs
/// guests on the test machines) with a size that lets several run side by
/// side on a small machine.
fn guest_qemu() -> String {
    std::env::var("AGENT_VM_TEST_QEMU").unwrap_or_else(|_| {
        "qemu-system-x86_64 -machine q35 -accel tcg,thread=single -cpu qemu64,-cx16 -smp 1 -m 1536".to_owned()
    })
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a build script that prints the directory it made (cached), or
/// takes the directory from `var`. A test that needs it fails, never skips.
fn built(var: &str, script: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(var) {
        return PathBuf::from(dir);
    }
    let out = Command::new(repo().join("scripts").join(script))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{script}: {e}"));
    assert!(out.status.success(), "scripts/{script} failed: the VM tests cannot run (scripts/test prepares it)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim())
}

/// The cached guest image (disk.qcow2, vmlinuz, initrd.img, cmdline).
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| built("AGENT_VM_TEST_IMAGE", "build-test-image"))
}

/// The real Lima: `<prefix>/bin/limactl` and its guest agent.
pub fn lima_prefix() -> &'static Path {
    static LIMA: OnceLock<PathBuf> = OnceLock::new();
    LIMA.get_or_init(|| built("AGENT_VM_TEST_LIMA", "build-lima"))
}

/// The host user's login name and uid: Lima gives the guest user both.
pub fn host_user() -> String {
    whoami::username().unwrap()
}

pub fn host_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // A file the test process creates is owned by its uid.
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid()
}

pub fn limactl_bin() -> PathBuf {
    lima_prefix().join("bin/limactl")
}

/// An isolated world for one test: its own HOME and LIMA_HOME, and a VM
/// instance that is force-deleted when the test ends, pass or fail.
pub struct World {
    pub home: tempfile::TempDir,
    pub lima_home: PathBuf,
    pub instance: String,
}

impl World {
    /// A world whose VM can be started: Lima's global override points every
    /// instance at the local test image (no download).
    pub fn with_vm(instance: &str) -> World {
        let w = World::new(instance);
        let img = image();
        let cmdline = std::fs::read_to_string(img.join("cmdline")).unwrap();
        w.write_override(&format!(
            "images:\n- location: {disk:?}\n  arch: x86_64\n  kernel:\n    location: {kernel:?}\n    cmdline: {cmdline:?}\n  initrd:\n    location: {initrd:?}\nfirmware:\n  legacyBIOS: true\n",
            disk = img.join("disk.qcow2"),
            kernel = img.join("vmlinuz"),
            initrd = img.join("initrd.img"),
            cmdline = cmdline.trim(),
        ));
        w
    }

    /// A world with no guest image: for tests that must not boot anything.
    /// An image path that does not exist makes any start fail at once,
    /// without reaching for the template's download URL.
    pub fn new(instance: &str) -> World {
        let home = tempfile::Builder::new().prefix("avm-").tempdir().unwrap();
        let lima_home = home.path().join(".lima");
        std::fs::create_dir_all(&lima_home).unwrap();
        let w = World { home, lima_home, instance: instance.to_owned() };
        w.write_override("images:\n- location: /nonexistent/agent-vm-test-image.qcow2\n  arch: x86_64\n");
        w
    }

    /// `$LIMA_HOME/_config/override.yaml`: merged by Lima into every
    /// instance at every start, before the template's own values.
    pub fn write_override(&self, yaml: &str) {
        let dir = self.lima_home.join("_config");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("override.yaml"), yaml).unwrap();
    }

    /// The path the user's commands see: the real limactl first.
    pub fn path_var(&self) -> std::ffi::OsString {
        let mut paths = vec![lima_prefix().join("bin")];
        paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        std::env::join_paths(paths).unwrap()
    }

    /// The environment every command of this world runs with.
    pub fn env_vars(&self) -> Vec<(String, std::ffi::OsString)> {
        let mut vars: Vec<(String, std::ffi::OsString)> = vec![
            ("HOME".into(), self.home.path().into()),
            ("LIMA_HOME".into(), self.lima_home.clone().into()),
            ("PATH".into(), self.path_var()),
            ("QEMU_SYSTEM_X86_64".into(), guest_qemu().into()),
            ("AGENT_VM_INSTANCE".into(), self.instance.clone().into()),
            // Provision from the test package lists: no network from the guest.
            ("AGENT_VM_COMMON_DIR".into(), repo().join("tests/fixtures/common").into()),
        ];
        vars.sort();
        vars
    }

    fn env(&self, cmd: &mut Command) {
        cmd.envs(self.env_vars())
            .env_remove("AGENT_VM_LIMACTL")
            .env_remove("AGENT_VM_CONFIG")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_STATE_HOME")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("RUST_LOG");
    }

    /// `agent-vm ARGS` as the user would run it, stdin closed.
    pub fn agent_vm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        self.env(&mut cmd);
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.agent_vm(args).output().unwrap(), args)
    }

    /// `limactl ARGS`, as the user might run it by hand.
    pub fn limactl(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(limactl_bin());
        self.env(&mut cmd);
        Run::from(cmd.args(args).stdin(Stdio::null()).output().unwrap(), args)
    }

    pub fn instance_dir(&self) -> PathBuf {
        self.lima_home.join(&self.instance)
    }

    /// Runs a shell command in the guest through system OpenSSH and Lima's
    /// ssh.config, as the agent user once agent-vm has made one (else as
    /// Lima's user): an independent path to check what agent-vm did.
    pub fn guest(&self, script: &str) -> Run {
        self.guest_as(self.agent_user().as_deref(), script)
    }

    /// [`World::guest`] as Lima's user, the admin (with sudo).
    pub fn admin(&self, script: &str) -> Run {
        self.guest_as(None, script)
    }

    /// The agent user agent-vm recorded for the instance.
    pub fn agent_user(&self) -> Option<String> {
        let record = std::fs::read_to_string(self.lima_home.join("_agent-vm").join(&self.instance).join("agent-user"));
        record.ok().and_then(|r| r.split_whitespace().next().map(str::to_owned))
    }

    /// Runs `script` in the guest as Lima's user over one connection of its
    /// own, trying only once.
    pub fn guest_once(&self, script: &str) -> Run {
        Run::from(self.guest_command(None, script).output().unwrap(), &[script])
    }

    fn guest_command(&self, user: Option<&str>, script: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(self.instance_dir().join("ssh.config")).args([
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
        ]);
        if let Some(user) = user {
            cmd.arg("-l").arg(user);
        }
        cmd.arg(format!("lima-{}", self.instance)).arg(script).stdin(Stdio::null());
        cmd
    }

    fn guest_as(&self, user: Option<&str>, script: &str) -> Run {
        let mut cmd = self.guest_command(user, script);
        let mut out = cmd.output().unwrap();
        // sshd drops handshakes past MaxStartups while other commands connect:
        // the check's own connection tries again, as agent-vm's does.
        for _ in 0..5 {
            if out.status.code() != Some(255)
                || !String::from_utf8_lossy(&out.stderr).contains("kex_exchange_identification")
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            out = cmd.output().unwrap();
        }
        Run::from(out, &[script])
    }

    /// Lima's own view of the instances (`limactl list --json`).
    pub fn lima_list(&self) -> Vec<serde_json::Value> {
        let r = self.limactl(&["list", "--json"]);
        r.ok();
        r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Detach any FUSE mount left under this world's home.
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let home = self.home.path().to_string_lossy().into_owned();
        for line in table.lines() {
            if let Some(point) = line.split(' ').nth(4).filter(|p| p.starts_with(&home)) {
                let _ = Command::new("fusermount3").args(["-uz", point]).status();
            }
        }
        // The network gateway agent-vm left running for the VM.
        let gateway = self.lima_home.join("_agent-vm").join(&self.instance).join("gateway.json");
        if let Some(pid) = std::fs::read_to_string(gateway)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["pid"].as_u64())
        {
            let _ = Command::new("kill").arg(pid.to_string()).stderr(Stdio::null()).status();
        }
        if self.instance_dir().exists() {
            let _ = self.limactl(&["delete", "--force", &self.instance.clone()]);
        }
    }
}

#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output, args: &[&str]) -> Run {
        Run {
            what: args.join(" "),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "`{}` failed:\n{}\n{}", self.what, self.stdout, self.stderr);
        self
    }

    /// Asserts a failure whose stderr says `needle`.
    #[track_caller]
    pub fn fails_with(&self, needle: &str) -> &Run {
        assert_ne!(self.code, Some(0), "`{}` should fail:\n{}\n{}", self.what, self.stdout, self.stderr);
        assert!(self.stderr.contains(needle), "`{}` stderr should say {needle:?}:\n{}", self.what, self.stderr);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("`{}`: not JSON ({e}): {}", self.what, self.stdout))
    }
}

/// Runs host `git` in `dir` (test side only: agent-vm itself never does).
#[track_caller]
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=Host", "-c", "user.email=host@example.com", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Every host process's command line, one a line: to check that no
/// secret ever sits in an argv.
pub fn host_cmdlines() -> String {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " ") + "\n")
        .collect()
}

/// `len` incompressible bytes (xorshift from `seed`).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x = seed;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// The fields of `git for-each-ref`, one line a ref, for before/after checks.
pub fn refs(dir: &Path) -> Vec<String> {
    git(dir, &["for-each-ref", "--format=%(refname) %(objectname)"]).lines().map(str::to_owned).collect()
}

impl World {
    /// A host repository in this world's home with one commit on main.
    pub fn repo(&self, name: &str) -> PathBuf {
        let dir = self.home.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q"]);
        std::fs::write(dir.join("README"), "hello\n").unwrap();
        git(&dir, &["add", "README"]);
        git(&dir, &["commit", "-q", "-m", "initial"]);
        dir
    }

    /// `agent-vm ARGS` run inside `dir`.
    pub fn run_in(&self, dir: &Path, args: &[&str]) -> Run {
        Run::from(self.agent_vm(args).current_dir(dir).output().unwrap(), args)
    }

    /// The VM path (relative to its home) of `branch`'s workspace of the
    /// repository at `dir`, from `status --json`.
    pub fn workspace_dir(&self, dir: &Path, branch: &str) -> String {
        let status = self.run_in(dir, &["status", "--json"]).json();
        status["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["branch"] == branch && w["this_repo"] == true)
            .unwrap_or_else(|| panic!("no workspace for {branch:?} in {status:#}"))["dir"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Runs `script` in the guest with `args` as $1…, through system ssh.
    pub fn guest_args(&self, script: &str, args: &[&str]) -> Run {
        let mut words = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned(), "sh".to_owned()];
        words.extend(args.iter().map(|a| a.to_string()));
        let line = shlex::try_join(words.iter().map(String::as_str)).unwrap();
        self.guest(&line)
    }

    /// Runs `script` in the guest with `args` as $1…, as the admin.
    pub fn admin_args(&self, script: &str, args: &[&str]) -> Run {
        let mut words = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned(), "sh".to_owned()];
        words.extend(args.iter().map(|a| a.to_string()));
        self.admin(&shlex::try_join(words.iter().map(String::as_str)).unwrap())
    }

    /// Installs `script` as the executable `path` in the guest, as root: a
    /// stand-in for a VM program (what an agent with root could do).
    pub fn install_in_guest(&self, path: &str, script: &str) {
        self.admin_args(r#"printf '%s' "$2" | sudo tee "$1" >/dev/null && sudo chmod 755 "$1""#, &[path, script]).ok();
    }

    /// Commits a file in the guest workspace as the agent would.
    pub fn agent_commit(&self, ws: &str, file: &str, content: &str) -> String {
        self.guest_args(
            r#"cd "$1" && printf %s "$3" > "$2" && git add -- "$2" && git -c user.name=Agent -c user.email=agent@vm commit -q -m "agent: $2" && git rev-parse HEAD"#,
            &[ws, file, content],
        )
        .ok()
        .stdout
        .trim()
        .to_owned()
    }
}

/// Serves each connection to `listener` with `handle`, each in a thread of
/// its own, for as long as the test runs.
pub fn serve_connections(
    listener: std::net::TcpListener,
    handle: impl Fn(std::net::TcpStream) + Clone + Send + 'static,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
}

/// Waits until `cond` holds, for at most `secs` seconds.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    cond()
}
