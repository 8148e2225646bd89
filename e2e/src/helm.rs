//! The Helm binary, built once from the Go module proxy by `e2e/bin/build-helm`.

use std::{path::PathBuf, process::Stdio, sync::OnceLock};

use anyhow::anyhow;

use crate::cluster::repo_root;

/// The path of `helm` (built on first use).
pub fn binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = repo_root().join("e2e/bin/build-helm");
        let out = std::process::Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        match (out.status.success(), text.lines().last()) {
            (true, Some(dir)) => Ok(PathBuf::from(dir.trim()).join("helm")),
            _ => Err(format!("{} failed ({})", script.display(), out.status)),
        }
    })
    .clone()
    .map_err(|e| anyhow!(e))
}
