//! The gateway's connection log: one JSON object per line, appended as each
//! connection ends (or is refused). Host names and workspace names in it
//! come from the VM: printed only through [`crate::printable`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The log is rotated (to `network.log.1`) past this size.
const MAX_LOG: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    pub port: u16,
    /// `allowed` or `refused`.
    pub verdict: String,
    /// The rule that decided it.
    pub rule: String,
    /// Bytes from the agent to the destination, and back.
    pub up: u64,
    pub down: u64,
    /// The workspace the agent session named (untrusted: the agent can
    /// name any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// `CONNECT`, or the HTTP method of a plain request.
    pub method: String,
    /// Why a connection that was allowed did not go through, or why the
    /// gateway ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub path: PathBuf,
}

impl Log {
    pub fn new(path: PathBuf) -> Log {
        Log { path }
    }

    pub fn append(&self, record: &Record) -> Result<()> {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() > MAX_LOG) {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
        }
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        // One write per record: appends from concurrent connections never interleave.
        f.write_all(&line)?;
        Ok(())
    }
}

/// Every record in `path` (and its rotated predecessor), oldest first;
/// lines that do not parse are skipped.
pub fn read(path: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    for p in [path.with_extension("log.1"), path.to_owned()] {
        if let Ok(text) = std::fs::read_to_string(&p) {
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

/// One record as a line for people.
pub fn human(r: &Record) -> String {
    let ws = r.workspace.as_deref().map(|w| format!("  [{}]", crate::printable(w))).unwrap_or_default();
    let err = r.error.as_deref().map(|e| format!("  ({})", crate::printable(e))).unwrap_or_default();
    format!(
        "{}  {:<7} {}:{}  {}  up {} B, down {} B{ws}{err}",
        r.time,
        r.verdict,
        crate::printable(&r.host),
        r.port,
        crate::printable(&r.rule),
        r.up,
        r.down
    )
}
