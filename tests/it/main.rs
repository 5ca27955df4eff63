//! agent-vm's integration tests: one binary, a module per area, so it builds
//! once and its VM tests run side by side as threads (`RUST_TEST_THREADS`).
//! Each VM test boots its own Debian 13 guest with the real limactl. The
//! harness starts tests in name order: the long ones sort first (hence
//! `branch_workspaces`), so the last to start are short.

mod common;

mod adversarial;
mod branch_workspaces;
mod broker;
mod cli;
mod contained;
mod lima;
mod mount;
mod packages;
mod provision;
mod runs_and_editors;
mod tls;
mod vm_lifecycle;
