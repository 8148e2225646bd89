//! A real worker node beside the control plane (`e2e/bin/node-up`): containerd with runc, the CNI
//! bridge plugin, a kubelet and kube-proxy, so the operator's image runs in a real pod. The node
//! is tainted (`NODE_TAINT_KEY`): only pods that tolerate it run there.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{
    Cluster,
    cluster::{log_tails, repo_root, run_script},
};

/// The processes of the node, whose logs are `<dir>/<name>.log`.
pub const COMPONENTS: [&str; 4] = ["containerd", "kubelet", "kube-proxy", "api-forward"];

/// A running real node, as `node-up` describes it in `<cluster>/node/env`.
#[derive(Debug, Clone)]
pub struct RealNode {
    /// The cluster's state folder (node-down takes it).
    pub cluster_dir: PathBuf,
    /// The node's state folder.
    pub dir: PathBuf,
    /// The Node's name.
    pub name: String,
    /// The node's address (on a host-internal bridge); pods get addresses in `pod_cidr`.
    pub ip: String,
    /// The pods' address range.
    pub pod_cidr: String,
    /// The key of the node's NoSchedule taint.
    pub taint_key: String,
    /// A serving certificate and key valid for every pod address of the node (kubelet API of an
    /// operator pod), issued by `cluster_ca`.
    pub pod_serving: (PathBuf, PathBuf),
    /// The cluster's CA (it also issued kube-apiserver's kubelet client certificate).
    pub cluster_ca: PathBuf,
    ctr: Vec<String>,
}

impl RealNode {
    /// Starts the node on `cluster` (`node-up`); it is stopped by [`RealNode::down`], or by a
    /// reaper when this test binary exits.
    pub fn up(cluster: &Cluster) -> anyhow::Result<RealNode> {
        let pid = std::process::id().to_string();
        run_script(
            "node-up",
            &["--owner-pid".as_ref(), pid.as_ref(), cluster.dir.as_os_str()],
            &[],
        )?;
        Self::from_dir(&cluster.dir)
    }

    fn from_dir(cluster_dir: &Path) -> anyhow::Result<RealNode> {
        let dir = cluster_dir.join("node");
        let env = crate::cluster::EnvFile::read(&dir.join("env"))?;
        let get = |k: &str| env.get(k);
        Ok(RealNode {
            cluster_dir: cluster_dir.to_path_buf(),
            name: get("NODE_NAME")?,
            ip: get("NODE_IP")?,
            pod_cidr: get("POD_CIDR")?,
            taint_key: get("NODE_TAINT_KEY")?,
            pod_serving: (get("POD_SERVING_CERT")?.into(), get("POD_SERVING_KEY")?.into()),
            cluster_ca: get("CLUSTER_CA")?.into(),
            ctr: get("CTR")?.split_whitespace().map(String::from).collect(),
            dir,
        })
    }

    /// Imports an OCI archive into the node's containerd (the `k8s.io` namespace the kubelet uses),
    /// as an air-gapped node loads an image: nothing is pulled from a registry here.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        let (ctr, args) = self
            .ctr
            .split_first()
            .context("no ctr command in the node's env")?;
        let out = Command::new(ctr)
            .args(args)
            .args(["images", "import", "--local"])
            .arg(archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}{}",
                archive.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops the node and removes what it made (`node-down`).
    pub fn down(&self) -> anyhow::Result<()> {
        run_script("node-down", &[self.cluster_dir.as_os_str()], &[]).map(drop)
    }

    /// The last `lines` lines of every node component's log, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        log_tails(&self.dir, &COMPONENTS, lines)
    }
}

/// An image with no C library at all (Debian's busybox-static alone), built once by
/// `e2e/bin/build-busybox-image`, named [`BUSYBOX_IMAGE`] once imported.
pub fn busybox_image_archive() -> anyhow::Result<PathBuf> {
    let out = crate::cluster::run_script("build-busybox-image", &[], &[])?;
    Ok(PathBuf::from(out.lines().last().unwrap_or_default().trim()))
}

/// The name of [`busybox_image_archive`]'s image in the node's containerd.
pub const BUSYBOX_IMAGE: &str = "offload-e2e/busybox-static:latest";

/// The operator image's name in the node's containerd once imported (the chart's default).
pub fn operator_image_ref() -> anyhow::Result<String> {
    Ok(format!(
        "ghcr.io/offload-operator/offload-operator:{}",
        app_version()?
    ))
}

fn app_version() -> anyhow::Result<String> {
    let chart = std::fs::read_to_string(repo_root().join("helm/offload-operator/Chart.yaml"))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no appVersion in Chart.yaml")
}

/// The operator image `make image` built for this checkout: `$OFFLOAD_E2E_IMAGE`, else
/// `$OFFLOAD_CACHE/image/offload-operator-<chart appVersion>.oci.tar`.
pub fn operator_image_archive() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("OFFLOAD_E2E_IMAGE") {
        return Ok(PathBuf::from(path));
    }
    let version = app_version()?;
    let cache = std::env::var("OFFLOAD_CACHE").unwrap_or_else(|_| "/var/cache/offload-operator".into());
    let path = PathBuf::from(cache).join(format!("image/offload-operator-{version}.oci.tar"));
    anyhow::ensure!(
        path.is_file(),
        "no operator image at {} (make image builds it; make e2e does before the tests)",
        path.display()
    );
    Ok(path)
}
