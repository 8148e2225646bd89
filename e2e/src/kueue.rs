//! Kueue (`e2e/bin/kueue-up`): its controller manager on 127.0.0.1 against the e2e control plane,
//! with its CRDs and the webhooks of batch Jobs and its own objects. Started by the test that needs
//! it and stopped by [`Kueue::down`], or by a reaper when the test binary exits.

use std::path::PathBuf;

use crate::{
    Cluster,
    cluster::{log_tails, run_script},
};

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
        let pid = std::process::id().to_string();
        let out = run_script(
            "kueue-up",
            &["--owner-pid".as_ref(), pid.as_ref(), cluster.dir.as_os_str()],
            &[],
        )?;
        let dir = out.lines().last().unwrap_or_default().trim().to_string();
        Ok(Kueue {
            cluster_dir: cluster.dir.clone(),
            dir: PathBuf::from(dir),
        })
    }

    /// Stops it and unregisters its webhooks (`kueue-down`).
    pub fn down(&self) -> anyhow::Result<()> {
        run_script("kueue-down", &[self.cluster_dir.as_os_str()], &[]).map(drop)
    }

    /// The last `lines` lines of Kueue's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tails(&self.dir, &["kueue"], lines)
    }
}
