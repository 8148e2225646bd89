//! Kueue (`e2e/bin/kueue-up`): its controller manager on 127.0.0.1 against the e2e control plane,
//! with its CRDs and the webhooks of batch Jobs and its own objects. Started by the test that needs
//! it and stopped by [`Kueue::down`], or by a reaper when the test binary exits.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{Cluster, cluster::repo_root};

/// A running Kueue.
#[derive(Debug, Clone)]
pub struct Kueue {
    cluster_dir: PathBuf,
    /// Its state folder (config, certificates, `kueue.log`).
    pub dir: PathBuf,
}

impl Kueue {
    /// Starts Kueue on `cluster` (`kueue-up --owner-pid <this process>`).
    pub fn up(cluster: &Cluster) -> anyhow::Result<Kueue> {
        let script = repo_root().join("e2e/bin/kueue-up");
        let out = Command::new(&script)
            .arg("--owner-pid")
            .arg(std::process::id().to_string())
            .arg(&cluster.dir)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}); see the messages above",
                script.display(),
                out.status
            );
        }
        let dir = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok(Kueue {
            cluster_dir: cluster.dir.clone(),
            dir: PathBuf::from(dir),
        })
    }

    /// Stops it and unregisters its webhooks (`kueue-down`).
    pub fn down(&self) -> anyhow::Result<()> {
        let script = repo_root().join("e2e/bin/kueue-down");
        let status = Command::new(&script)
            .arg(&self.cluster_dir)
            .stderr(Stdio::inherit())
            .status()?;
        anyhow::ensure!(status.success(), "{} failed ({status})", script.display());
        Ok(())
    }

    /// The last `lines` lines of Kueue's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("kueue.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
