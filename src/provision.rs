//! What goes into the VM: the Lima template it is created from, then tools,
//! agents, the home directory, credentials, timezone and terminfo, all
//! copied over SSH. Secrets only ever travel on SSH stdin: never in a
//! command line, a provision script or a log.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::shell;
use crate::ssh::Session;

/// `vm-template/agent-vm.yaml`, built into the binary so an installed
/// agent-vm needs no checkout.
pub const TEMPLATE: &str = include_str!("../vm-template/agent-vm.yaml");

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// Set to a directory laid out like `common/` to provision from it instead
/// of the copy built into agent-vm (your own package lists or home files).
pub const COMMON_DIR_ENV: &str = "AGENT_VM_COMMON_DIR";

/// The file whose presence in the VM home proves the home directory landed.
const SENTINEL: &str = ".claude.json";
/// Where agent-vm keeps its own files in the VM, relative to the home.
const STATE_DIR: &str = ".agent-vm";
const ADC_PATH: &str = "/etc/google/application_default_credentials.json";
const PROFILE_PATH: &str = "/etc/profile.d/ai-agent-env.sh";
/// Host variables written to the profile next to the credentials.
const VERTEX_VARS: &[&str] = &["CLAUDE_CODE_USE_VERTEX", "ANTHROPIC_VERTEX_PROJECT_ID", "CLOUD_ML_REGION"];

/// Writes the template into `dir` (created if needed) and returns its path.
pub fn write_template(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("agent-vm.yaml");
    std::fs::write(&path, TEMPLATE).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// A file to put in the VM: a path relative to the repository layout
/// (`common/…`, `vm-template/…`), its mode and content.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// common/ (built in, or from $AGENT_VM_COMMON_DIR) and the provision script.
pub fn files() -> Result<Vec<File>> {
    let mut files: Vec<File> = embedded::FILES
        .iter()
        .map(|(path, mode, data)| File { path: path.to_string(), mode: *mode, data: data.to_vec() })
        .collect();
    if let Some(dir) = std::env::var_os(COMMON_DIR_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        files.retain(|f| !f.path.starts_with("common/"));
        read_tree(&dir, "common", &mut files)
            .with_context(|| format!("cannot read {COMMON_DIR_ENV}={}", dir.display()))?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn read_tree(dir: &Path, prefix: &str, out: &mut Vec<File>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|n| anyhow!("non-UTF-8 file name {n:?}"))?;
        let path = format!("{prefix}/{name}");
        // Follows symlinks: a customised common/ may link to the stock one.
        let meta = std::fs::metadata(entry.path())?;
        if meta.is_dir() {
            read_tree(&entry.path(), &path, out)?;
        } else {
            let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
            out.push(File { path, mode, data: std::fs::read(entry.path())? });
        }
    }
    Ok(())
}

/// The files under `prefix/`, with the prefix taken off.
fn under(files: &[File], prefix: &str) -> Vec<File> {
    files
        .iter()
        .filter_map(|f| {
            let rest = f.path.strip_prefix(prefix)?.strip_prefix('/')?;
            Some(File { path: rest.to_owned(), ..f.clone() })
        })
        .collect()
}

/// A deterministic tar.gz of `files`: sorted, parents first, fixed times and
/// owners, modes kept, so the same input always gives the same bytes.
pub fn tarball(files: &[File]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&File> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut dirs = std::collections::BTreeSet::new();
    for f in sorted {
        let mut parent = String::new();
        for part in f.path.split('/').collect::<Vec<_>>().split_last().map(|(_, p)| p).unwrap_or(&[]) {
            parent = if parent.is_empty() { part.to_string() } else { format!("{parent}/{part}") };
            if dirs.insert(parent.clone()) {
                tar.append_data(
                    &mut header(tar::EntryType::Directory, 0o755, 0),
                    format!("{parent}/"),
                    std::io::empty(),
                )?;
            }
        }
        tar.append_data(&mut header(tar::EntryType::Regular, f.mode, f.data.len() as u64), &f.path, &f.data[..])?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    Ok(gz.finish()?)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_577_836_800); // 2020-01-01: fixed, for reproducible bytes
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// The variable names in common/packages/envvars.txt.
pub fn envvar_names(files: &[File]) -> Vec<String> {
    files
        .iter()
        .find(|f| f.path == "common/packages/envvars.txt")
        .map(|f| {
            String::from_utf8_lossy(&f.data)
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
                .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .collect()
        })
        .unwrap_or_default()
}

/// The listed variables that are set on the host, for a connected session
/// of `instance`. With the credential broker, a provider whose key the
/// host has gets the gateway's base URL and a placeholder instead of any
/// of its variables.
pub fn session_env(instance: &str) -> Result<Vec<(String, String)>> {
    let listed = envvar_names(&files()?).into_iter().filter_map(|name| std::env::var(&name).ok().map(|v| (name, v)));
    let mode = crate::config::Config::load()?.entry(instance).credential_mode();
    if mode == crate::config::CredentialMode::Copy {
        return Ok(listed.collect());
    }
    let host = |v: &str| std::env::var(v).ok();
    let brokered: Vec<&str> = crate::gateway::broker::providers::PROVIDERS
        .iter()
        .filter(|p| p.key(host).is_some())
        .flat_map(|p| p.variables())
        .collect();
    let mut env: Vec<(String, String)> = listed.filter(|(name, _)| !brokered.contains(&name.as_str())).collect();
    env.extend(crate::gateway::broker::session_env(host, false));
    Ok(env)
}

// VM-side scripts; every variable part is a positional argument.

/// $1 staging dir: replace it with the tarball on stdin.
const UNPACK_STAGE: &str = r#"set -e
rm -rf -- "$1"; mkdir -p -- "$1"; tar -xzf - -C "$1" --no-same-owner"#;

/// $1 staging dir, $2 guard|open, $3 contained|sudo: run the provision
/// script as root.
const RUN_PROVISION: &str = r#"exec sudo -n bash "$1/vm-template/lima-provision.sh" "$HOME/$1" "$(id -un)" "$2" "$3""#;

/// The VM user agent sessions run as (made by lima-provision.sh).
pub const AGENT_USER: &str = "agent";

/// $1 staging dir, $2 sentinel: install the home files from the tarball on
/// stdin, leaving identical files alone and an existing sentinel (the
/// agent's own state) untouched.
const INSTALL_HOME: &str = r#"set -e
rm -rf -- "$1"; mkdir -p -- "$1"; tar -xzf - -C "$1" --no-same-owner
if [ ! -f "$1/$2" ]; then echo "the home directory tarball has no $2" >&2; exit 3; fi
cd "$1"
changed=0
for f in $(find . -type f | sort); do
  dest="$HOME/${f#./}"
  if [ "${f#./}" = "$2" ] && [ -e "$dest" ]; then continue; fi
  if [ -f "$dest" ] && cmp -s "$f" "$dest" && [ "$(stat -c %a "$f")" = "$(stat -c %a "$dest")" ]; then continue; fi
  mkdir -p "$(dirname "$dest")"
  cp -p "$f" "$dest"
  changed=$((changed + 1))
done
cd; rm -rf -- "$1"
[ -f "$HOME/$2" ] || { echo "$2 did not land in $HOME" >&2; exit 3; }
echo "home files changed: $changed""#;

/// $1 destination, $2 mode, $3 group: install stdin as root-owned, in
/// group $3, only if it differs. Run with sudo.
const INSTALL_SYSTEM_FILE: &str = r#"set -e
umask 077
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
group=$3
if [ -f "$1" ] && cmp -s "$tmp" "$1" && [ "$(stat -c %a:%U:%G "$1")" = "$2:root:$group" ]; then echo unchanged; exit 0; fi
install -D -m "$2" -o root -g "$group" "$tmp" "$1"
echo changed"#;

/// $1 zone: set the VM's timezone if the zone exists there. Run with sudo.
const SET_TIMEZONE: &str = r#"set -e
[ -f "/usr/share/zoneinfo/$1" ] || { echo "unknown timezone $1" >&2; exit 0; }
[ "$(readlink /etc/localtime)" = "/usr/share/zoneinfo/$1" ] && exit 0
ln -sf "/usr/share/zoneinfo/$1" /etc/localtime
echo "$1" > /etc/timezone
echo changed"#;

/// Compile the terminfo source on stdin into ~/.terminfo.
const INSTALL_TERMINFO: &str = r#"command -v tic >/dev/null || exit 0
mkdir -p "$HOME/.terminfo" && tic -x -o "$HOME/.terminfo" /dev/stdin"#;

/// Choices the user makes about provisioning.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Let the VM open connections to the host (its loopback services
    /// included) instead of blocking them with a firewall rule in the VM.
    pub host_access: bool,
    /// Give the agent user sudo (config.yaml `agent: {sudo: true}`): the
    /// agent is then not contained.
    pub agent_sudo: bool,
    /// Whether GCP credentials are brokered or copied into the VM
    /// (config.yaml `credentials:`).
    pub credentials: crate::config::CredentialMode,
    /// CA certificate files the VM is to trust (config.yaml
    /// `ca_certificates:`), besides those the host's variables name.
    pub ca_files: Vec<PathBuf>,
}

/// The variable that opts out of the guest→host firewall rule.
pub const HOST_ACCESS_ENV: &str = "AGENT_VM_ALLOW_HOST_ACCESS";

impl Options {
    /// From the environment (`AGENT_VM_ALLOW_HOST_ACCESS=1`), for commands
    /// that create the VM without asking.
    pub fn from_env() -> Options {
        let on = std::env::var(HOST_ACCESS_ENV).is_ok_and(|v| {
            !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off" | "n" | "f")
        });
        Options { host_access: on, ..Options::default() }
    }
}

/// Where the VM's GCP access comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Gcp {
    /// Tokens from the gateway; no credentials in the VM.
    Brokered,
    /// The host's credentials file is in the VM.
    Copied,
    /// Neither (none on the host when provisioned).
    None,
}

/// What provisioning did.
#[derive(Debug)]
pub struct Report {
    pub gcp: Gcp,
}

/// What is said wherever credentials are copied.
pub const COPY_WARNING: &str = "credentials: copy: the agent can read the GCP credentials and API keys it is given, \
     and send them anywhere it can reach";

/// Provisions the VM over `session`: tools and agents (as root, through
/// vm-template/lima-provision.sh), home files, credentials, timezone,
/// terminfo. Idempotent. Progress goes to stderr unless quiet.
pub async fn run(session: &Session, ui: &crate::Ui, options: &Options) -> Result<Report> {
    let files = files()?;
    let home = under(&files, "common/homedir");
    if !home.iter().any(|f| f.path == SENTINEL) {
        bail!(
            "the home directory files lack the sentinel {SENTINEL}: provisioning stopped (check {COMMON_DIR_ENV} or common/homedir)"
        );
    }
    // Credentials are read first: an unreadable file fails before anything changes.
    let adc = credentials()?;

    ui.say("Provisioning the VM: tools and agents (the first time takes a while)…");
    let stage = format!("{STATE_DIR}/stage");
    let mut staged: Vec<File> = files.iter().filter(|f| !f.path.starts_with("common/homedir/")).cloned().collect();
    let (mut certs, mut sources) = extra_ca_certificates(&options.ca_files, |v| std::env::var_os(v))?;
    if !certs.is_empty() {
        // Those the VM's own store has already (a host variable often names
        // the whole system bundle) are left out.
        let out = session.exec("cat /usr/share/ca-certificates/*/*.crt 2>/dev/null").await?;
        let known = pem_certificates(&out.stdout_str());
        certs.retain(|c| !known.contains(c));
        if certs.is_empty() {
            sources.clear();
        }
    }
    if !certs.is_empty() {
        ui.say(&format!(
            "Provisioning the VM: trusting {} extra CA certificate(s) of this machine (from {})…",
            certs.len(),
            sources.join(", ")
        ));
    }
    // The watcher's probe is the listing's own (one copy of the shell text).
    staged.push(File {
        path: "watch/probe.sh".into(),
        mode: 0o644,
        data: crate::workspace::WATCH_PROBE.as_bytes().to_vec(),
    });
    for (i, pem) in certs.into_iter().enumerate() {
        staged.push(File { path: format!("ca/host-{i:03}.crt"), mode: 0o644, data: pem.into_bytes() });
    }
    run_script(session, UNPACK_STAGE, &[&stage], &tarball(&staged)?, "staging the provisioning files").await?;
    // The VM's progress lines reach our stderr line by line, neutralised.
    let (mut out, lines) = tokio::io::duplex(64 << 10);
    let to: Box<dyn tokio::io::AsyncWrite + Unpin + Send> =
        if ui.quiet { Box::new(tokio::io::sink()) } else { Box::new(tokio::io::stderr()) };
    let relay = tokio::spawn(relay_lines(lines, to));
    let mut err = crate::ssh::Tail::new(ERR_KEPT);
    let status = session
        .exec_io(
            &shell::script(
                RUN_PROVISION,
                &[
                    stage.as_str(),
                    if options.host_access { "open" } else { "guard" },
                    if options.agent_sudo { "sudo" } else { "contained" },
                ],
            )?,
            &[][..],
            &mut out,
            &mut err,
        )
        .await;
    drop(out);
    let _ = relay.await;
    let status = status?;
    if status != 0 {
        // The failing step speaks last (the install scripts end with what
        // failed); what came first is warnings of steps that went through.
        bail!("provisioning failed in the VM (exit status {status}){}", end_of_errors(&err, ERR_LINES));
    }

    // The agent's own files go to its home, over a session of its own.
    let mut agent_endpoint = session.endpoint().clone();
    agent_endpoint.user = AGENT_USER.to_owned();
    let agent =
        connect_after_reload(&agent_endpoint).await.context("cannot log in as the agent user the provisioning made")?;
    ui.say("Provisioning the VM: home directory files…");
    let said = run_script(
        &agent,
        INSTALL_HOME,
        &[&format!("{STATE_DIR}/home"), SENTINEL],
        &tarball(&home)?,
        "installing the home directory files",
    )
    .await?;
    tracing::debug!(said = said.trim(), "home");

    let copy = options.credentials == crate::config::CredentialMode::Copy;
    let gcp = match &adc {
        Some((path, data)) if copy => {
            ui.say(&format!("Provisioning the VM: GCP credentials from {}…", path.display()));
            ui.say(&format!("warning: {COPY_WARNING}"));
            run_root(
                session,
                INSTALL_SYSTEM_FILE,
                &[ADC_PATH, "640", AGENT_USER],
                data,
                "installing the GCP credentials",
            )
            .await?;
            Gcp::Copied
        }
        Some((path, _)) => {
            ui.say(&format!(
                "Provisioning the VM: GCP through the gateway's tokens (from {}; no credentials in the VM)…",
                path.display()
            ));
            Gcp::Brokered
        }
        None => {
            ui.say("Provisioning the VM: no GCP application-default credentials on this machine (skipped).");
            Gcp::None
        }
    };
    if gcp != Gcp::Copied {
        // Copied by an earlier provisioning: gone now.
        run_root(session, "rm -f -- \"$1\"", &[ADC_PATH], &[], "removing copied GCP credentials").await?;
    }
    let profile = profile(gcp)?;
    run_root(
        session,
        INSTALL_SYSTEM_FILE,
        &[PROFILE_PATH, "644", "root"],
        profile.as_bytes(),
        "writing the agent environment",
    )
    .await?;

    if let Some(zone) = host_timezone() {
        run_root(session, SET_TIMEZONE, &[&zone], &[], "setting the timezone").await?;
    }
    if let Some(source) = host_terminfo() {
        // A terminal the VM cannot describe is an inconvenience, not a failure.
        if let Err(e) = run_script(&agent, INSTALL_TERMINFO, &[] as &[&str], &source, "installing terminfo").await {
            ui.say(&format!("warning: {e:#}"));
        }
    }
    Ok(Report { gcp })
}

/// A session to the VM just after provisioning reloaded its sshd: sshd
/// re-executes itself on reload, and for a moment new connections are
/// reset; it is back within a second or two.
async fn connect_after_reload(endpoint: &crate::ssh::Endpoint) -> Result<Session> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match Session::connect(endpoint, crate::ssh::CONNECT_TIMEOUT).await {
            Err(e) if attempt < 20 && e.to_string().contains("cannot reach") => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Shell text printing one line that says where the VM's GCP access comes
/// from ([`parse_gcp`] reads it), with its arguments ([`GCP_ARGS`]).
/// Builtins only: it runs before the workspace listing, in its shell.
pub const GCP_CHECK: &str = r#"a=none
if [ -f "$1" ]; then a=copied
elif [ -r "$2" ]; then
  while IFS= read -r l || [ -n "$l" ]; do case $l in "export GCE_METADATA_HOST="*) a=brokered ;; esac; done < "$2"
fi
echo "$a""#;
pub const GCP_ARGS: [&str; 2] = [ADC_PATH, PROFILE_PATH];

/// [`GCP_CHECK`]'s answer (the VM's word, for display).
pub fn parse_gcp(line: &str) -> Gcp {
    match line.trim() {
        "copied" => Gcp::Copied,
        "brokered" => Gcp::Brokered,
        _ => Gcp::None,
    }
}

async fn run_script<S: AsRef<str>>(
    session: &Session,
    script: &str,
    args: &[S],
    input: &[u8],
    what: &str,
) -> Result<String> {
    let out = session.exec_with_input(&shell::script(script, args)?, input).await?.check(what)?;
    Ok(out.stdout_str())
}

async fn run_root(session: &Session, script: &str, args: &[&str], input: &[u8], what: &str) -> Result<String> {
    let out = session.exec_with_input(&shell::script_as_root(script, args)?, input).await?.check(what)?;
    Ok(out.stdout_str())
}

/// Where the host's GCP application-default credentials are:
/// $GOOGLE_APPLICATION_CREDENTIALS (true: named explicitly), else
/// gcloud's default location.
pub fn adc_location() -> Result<(PathBuf, bool)> {
    match std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|p| !p.is_empty()) {
        Some(p) => Ok((PathBuf::from(p), true)),
        None => Ok((crate::home_dir()?.join(".config/gcloud/application_default_credentials.json"), false)),
    }
}

/// The host's GCP application-default credentials, if any: from
/// $GOOGLE_APPLICATION_CREDENTIALS, else gcloud's default location.
fn credentials() -> Result<Option<(PathBuf, Vec<u8>)>> {
    let (path, explicit) = adc_location()?;
    if !explicit && !path.exists() {
        return Ok(None);
    }
    let data = std::fs::read(&path).with_context(|| {
        format!("cannot read GCP credentials {} (GOOGLE_APPLICATION_CREDENTIALS): fix or unset it", path.display())
    })?;
    serde_json::from_slice::<serde_json::Value>(&data)
        .with_context(|| format!("GCP credentials {} are not JSON", path.display()))?;
    Ok(Some((path, data)))
}

/// The host variables that name extra CA certificates on hosts behind a
/// TLS-inspecting proxy.
const CA_VARS: &[&str] = &["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE"];

/// The CA certificates (PEM, one each, no duplicates) of `configured`
/// files and of the files `CA_VARS` name, and where they came from. A
/// configured file must be readable; a variable's is skipped with a note
/// when it is not.
fn extra_ca_certificates(
    configured: &[PathBuf],
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut certs: Vec<String> = Vec::new();
    let mut sources = Vec::new();
    let mut take = |text: &str, source: String| {
        let before = certs.len();
        for pem in pem_certificates(text) {
            if !certs.contains(&pem) {
                certs.push(pem);
            }
        }
        if certs.len() > before {
            sources.push(source);
        }
    };
    for path in configured {
        let path = match path.strip_prefix("~") {
            Ok(rest) => crate::home_dir()?.join(rest),
            Err(_) => path.clone(),
        };
        let path = &path;
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the CA certificates {} (config.yaml ca_certificates)", path.display())
        })?;
        if pem_certificates(&text).is_empty() {
            bail!("{} holds no PEM certificate (config.yaml ca_certificates)", path.display());
        }
        take(&text, path.display().to_string());
    }
    for var in CA_VARS {
        let Some(path) = env(var).filter(|p| !p.is_empty()) else { continue };
        match std::fs::read_to_string(&path) {
            Ok(text) => take(&text, (*var).to_owned()),
            Err(e) => tracing::info!("{var}={}: {e}; not taken into the VM", Path::new(&path).display()),
        }
    }
    Ok((certs, sources))
}

/// Every `CERTIFICATE` block of a PEM text, normalised (nothing else: no
/// private key ever goes to the VM).
fn pem_certificates(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let Some(end) = after.find(END) else { break };
        let body: String = after[..end].chars().filter(|c| !c.is_whitespace()).collect();
        if !body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) {
            let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
            out.push(format!("{BEGIN}\n{}\n{END}\n", lines.join("\n")));
        }
        rest = &after[end + END.len()..];
    }
    out
}

/// /etc/profile.d/ai-agent-env.sh: where GCP access comes from (the copied
/// credentials, or the gateway as metadata server), and the Vertex
/// settings of the host. Not secret.
fn profile(gcp: Gcp) -> Result<String> {
    let mut text = String::from("# Written by `agent-vm provision`.\n");
    match gcp {
        Gcp::Copied => text.push_str(&format!("export GOOGLE_APPLICATION_CREDENTIALS={ADC_PATH}\n")),
        Gcp::Brokered => {
            for (name, value) in crate::gateway::broker::session_env(|_| None, true) {
                text.push_str(&format!("export {name}={}\n", shell::quote(&[value])?));
            }
            if let Some(project) = crate::gateway::broker::gce::project() {
                text.push_str(&format!("export GOOGLE_CLOUD_PROJECT={}\n", shell::quote(&[project])?));
            }
        }
        Gcp::None => {}
    }
    for name in VERTEX_VARS {
        if let Ok(value) = std::env::var(name) {
            text.push_str(&format!("export {name}={}\n", shell::quote(&[value])?));
        }
    }
    Ok(text)
}

/// The host's timezone name (`Europe/Paris`), from /etc/localtime.
fn host_timezone() -> Option<String> {
    let target = std::fs::read_link("/etc/localtime").ok()?;
    let text = target.to_string_lossy();
    let zone = &text[text.find("zoneinfo/")? + "zoneinfo/".len()..];
    zone.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c)).then(|| zone.to_owned())
}

/// The terminfo source of the host's $TERM, for modern terminals the VM
/// does not know.
fn host_terminfo() -> Option<Vec<u8>> {
    let term = std::env::var("TERM").ok().filter(|t| !t.is_empty() && t != "dumb")?;
    let out =
        std::process::Command::new("infocmp").args(["-x", &term]).stderr(std::process::Stdio::null()).output().ok()?;
    out.status.success().then_some(out.stdout)
}

/// Copies text from the VM a line at a time (a line over 64 KiB is cut),
/// with control characters neutralised: the VM's output reaches our stderr
/// as text, never as terminal commands.
async fn relay_lines(from: impl tokio::io::AsyncRead + Unpin, mut to: impl tokio::io::AsyncWrite + Unpin) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut reader = tokio::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(64 << 10).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = crate::printable(String::from_utf8_lossy(&line).trim_end_matches('\n'));
        if to.write_all(format!("{text}\n").as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = to.flush().await;
}

/// How much of the provisioning's stderr is kept, and how many of its last
/// lines an error shows.
const ERR_KEPT: usize = 16 << 10;
const ERR_LINES: usize = 15;

/// The last `n` lines of the VM's errors, each on a line of its own after
/// "; the end of its errors:"; empty when it wrote none.
fn end_of_errors(err: &crate::ssh::Tail, n: usize) -> String {
    let lines = err.last_lines(n);
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("; the end of its errors:");
    for line in lines {
        out.push_str("\n    ");
        out.push_str(&crate::printable(&line));
    }
    out
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_failure_shows_the_end_of_the_errors_bounded() {
        use tokio::io::AsyncWriteExt;
        let mut tail = crate::ssh::Tail::new(1024);
        assert_eq!(super::end_of_errors(&tail, 3), "", "nothing written, nothing said");
        tail.write_all(b"rehash: warning: skipping ca-certificates.crt\nnpm WARN EBADENGINE\n").await.unwrap();
        for i in 0..10_000 {
            tail.write_all(format!("npm ERR! noise {i}\n").as_bytes()).await.unwrap();
        }
        tail.write_all(
            b"install-tools: npm: installing x@1 failed\r\n\n\x1b]52;c;Zm9v\x07lima-provision: failed at line 160\n",
        )
        .await
        .unwrap();
        assert!(tail.held() <= 2048, "kept {} bytes", tail.held());
        assert_eq!(
            super::end_of_errors(&tail, 3),
            "; the end of its errors:\n    npm ERR! noise 9999\n    install-tools: npm: installing x@1 failed\n    \
             ?]52;c;Zm9v?lima-provision: failed at line 160"
        );
        let all = super::end_of_errors(&tail, 1000);
        assert!(!all.contains("EBADENGINE"), "the first lines are gone");
        let noise: Vec<&str> = all.lines().skip(1).filter(|l| l.contains("noise")).collect();
        assert!(noise.len() > 10, "{all}");
        for l in noise {
            let n = l.strip_prefix("    npm ERR! noise ").unwrap_or_else(|| panic!("a cut line: {l:?}"));
            assert!(n.parse::<u32>().is_ok_and(|n| n > 9000), "a cut line: {l:?}");
        }
    }

    /// By sh, with stand-ins for the credentials file and the profile.
    #[test]
    fn gcp_check_says_where_access_comes_from() {
        let dir = tempfile::tempdir().unwrap();
        let (adc, profile) = (dir.path().join("adc.json"), dir.path().join("profile's.sh"));
        let check = || {
            let args = [adc.to_str().unwrap(), profile.to_str().unwrap()];
            let line = crate::shell::script(super::GCP_CHECK, &args).unwrap();
            let out = std::process::Command::new("sh").arg("-c").arg(line).output().unwrap();
            let line = String::from_utf8(out.stdout).unwrap();
            assert_eq!(line.lines().count(), 1, "{line:?}");
            super::parse_gcp(&line)
        };
        assert_eq!(check(), super::Gcp::None, "neither file");
        std::fs::write(&profile, "export A=1\n# export GCE_METADATA_HOST=x\n").unwrap();
        assert_eq!(check(), super::Gcp::None, "a comment is not a setting");
        std::fs::write(&profile, "export A=1\nexport GCE_METADATA_HOST=127.0.0.1:3129").unwrap();
        assert_eq!(check(), super::Gcp::Brokered);
        std::fs::write(&adc, "{}").unwrap();
        assert_eq!(check(), super::Gcp::Copied, "a credentials file in the VM counts first");
    }

    #[tokio::test]
    async fn provisioning_output_is_relayed_as_text() {
        let from: &[u8] = b"==> step\n\x1b]52;c;cHduZWQ=\x07copied\r\n\x1b[2Jcleared\npartial";
        let mut to = Vec::new();
        super::relay_lines(from, &mut to).await;
        assert_eq!(String::from_utf8(to).unwrap(), "==> step\n?]52;c;cHduZWQ=?copied?\n?[2Jcleared\npartial\n");
    }

    use super::*;

    #[test]
    fn only_certificates_go_to_the_vm_once_each() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\r\nabc+/=\n-----END CERTIFICATE-----";
        let text = format!(
            "junk\n{cert}\n-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n{cert}\n\
             -----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
        );
        let found = pem_certificates(&text);
        assert_eq!(found, vec!["-----BEGIN CERTIFICATE-----\nMIIBabc+/=\n-----END CERTIFICATE-----\n"; 2]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, &text).unwrap();
        let env = |v: &str| (v == "NODE_EXTRA_CA_CERTS").then(|| file.clone().into_os_string());
        let (certs, sources) = extra_ca_certificates(&[file.clone(), file.clone()], env).unwrap();
        assert_eq!((certs.len(), sources.len()), (1, 1));
        assert!(!certs[0].contains("secret"));
        let (certs, sources) = extra_ca_certificates(&[], env).unwrap();
        assert_eq!((certs.len(), sources), (1, vec!["NODE_EXTRA_CA_CERTS".to_owned()]));
        let err = extra_ca_certificates(&[dir.path().join("missing.pem")], |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("ca_certificates"), "{err:#}");
    }

    fn f(path: &str, mode: u32, data: &str) -> File {
        File { path: path.to_owned(), mode, data: data.as_bytes().to_vec() }
    }

    #[test]
    fn tarball_is_deterministic_and_keeps_modes() {
        let a = vec![f("b/x.sh", 0o755, "#!/bin/sh\n"), f("a", 0o644, "a")];
        let b = vec![f("a", 0o644, "a"), f("b/x.sh", 0o755, "#!/bin/sh\n")];
        let ta = tarball(&a).unwrap();
        assert_eq!(ta, tarball(&b).unwrap());
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&ta[..]));
        let got: Vec<(String, u32)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(got, vec![("a".into(), 0o644), ("b/".into(), 0o755), ("b/x.sh".into(), 0o755)]);
    }

    #[test]
    fn embedded_files_have_the_sentinel_and_executables() {
        let files = files().unwrap();
        let home = under(&files, "common/homedir");
        assert!(home.iter().any(|f| f.path == SENTINEL));
        let start = home.iter().find(|f| f.path == ".local/bin/start-claude").unwrap();
        assert_eq!(start.mode, 0o755);
        assert!(files.iter().any(|f| f.path == "vm-template/lima-provision.sh" && f.mode == 0o755));
    }

    #[test]
    fn envvar_names_skip_comments() {
        let files = vec![f("common/packages/envvars.txt", 0o644, "# c\nA_B\n\n  C # x\nbad-name\n")];
        assert_eq!(envvar_names(&files), vec!["A_B", "C"]);
    }
}
