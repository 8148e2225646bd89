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

/// Renders one template of the chart (`templates/<name>.yaml`) for the API versions given, with
/// `--set-json` values and every object named after `fullname` (unique per test: the objects are
/// cluster-wide), applies it with kubectl, and returns the rendered file (for the cleanup:
/// `kubectl delete -f`).
pub fn apply_template(
    cluster: &crate::Cluster,
    template: &str,
    fullname: &str,
    api_versions: &[&str],
    set_json: &[(&str, serde_json::Value)],
) -> anyhow::Result<PathBuf> {
    let mut cmd = std::process::Command::new(binary()?);
    cmd.args(["template", "x"])
        .arg(crate::cluster::repo_root().join("helm/offload-operator"))
        .args(["--show-only", &format!("templates/{template}.yaml")])
        .args(["--set", &format!("fullnameOverride={fullname}")]);
    for v in api_versions {
        cmd.args(["--api-versions", v]);
    }
    for (key, value) in set_json {
        cmd.args(["--set-json", &format!("{key}={value}")]);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = cluster.dir.join(format!("{template}-{fullname}.yaml"));
    std::fs::write(&path, &out.stdout)?;
    let applied = cluster.kubectl().arg("apply").arg("-f").arg(&path).output()?;
    anyhow::ensure!(
        applied.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    Ok(path)
}
