//! What goes into the VM: the Lima template agent-vm creates it from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `vm-template/agent-vm.yaml`, built into the binary so an installed
/// agent-vm needs no checkout.
pub const TEMPLATE: &str = include_str!("../vm-template/agent-vm.yaml");

/// Writes the template into `dir` (created if needed) and returns its path.
pub fn write_template(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("agent-vm.yaml");
    std::fs::write(&path, TEMPLATE).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
