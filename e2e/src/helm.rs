//! The Helm binary, built once from the Go module proxy by `e2e/bin/build-helm`.

use std::{path::PathBuf, sync::OnceLock};

use anyhow::anyhow;

use crate::cluster::script_last_line;

/// The path of `helm` (built on first use).
pub fn binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        script_last_line("build-helm")
            .map(|dir| PathBuf::from(dir).join("helm"))
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}
