//! The custom resources against the real API server: the generated CRDs install, every example
//! applies and reads back unchanged, every invalid manifest is rejected with a message naming its
//! field, and `kubectl get` / `kubectl explain` show what users rely on.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, ensure};
use offload_e2e::{Cluster, TestNamespace, cluster::repo_root, wait};
use serde_json::Value;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn kubectl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::from(cluster.kubectl());
    Ok(cmd.args(args).output().await?)
}

async fn install_crds(cluster: &'static Cluster) -> anyhow::Result<()> {
    offload_e2e::operator::install_crds(cluster).await
}

/// Every key the manifest sets is in the server's copy with the same value (the server may add
/// defaults and metadata).
fn assert_subset(path: &str, want: &Value, got: &Value) -> anyhow::Result<()> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let gv = g
                    .get(k)
                    .with_context(|| format!("{path}.{k} missing from the server's copy"))?;
                assert_subset(&format!("{path}.{k}"), wv, gv)?;
            }
            Ok(())
        }
        // Admission appends the not-ready/unreachable tolerations to every pod.
        (Value::Array(w), Value::Array(g)) if path.ends_with(".tolerations") => {
            for (i, wv) in w.iter().enumerate() {
                ensure!(
                    g.iter().any(|gv| assert_subset(path, wv, gv).is_ok()),
                    "{path}[{i}] missing from the server's copy"
                );
            }
            Ok(())
        }
        (Value::Array(w), Value::Array(g)) => {
            ensure!(
                w.len() == g.len(),
                "{path}: {} items sent, {} read back",
                w.len(),
                g.len()
            );
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                assert_subset(&format!("{path}[{i}]"), wv, gv)?;
            }
            Ok(())
        }
        _ => {
            ensure!(want == got, "{path}: sent {want}, read back {got}");
            Ok(())
        }
    }
}

#[tokio::test]
async fn examples_apply_and_read_back_unchanged() {
    TestNamespace::run("crd-examples", |t| async move {
        install_crds(t.cluster).await?;
        // Pods are admitted only once the namespace's default ServiceAccount exists.
        t.default_service_account().await?;
        let files = yaml_files(&repo_root().join("examples"));
        ensure!(
            files.len() >= 8,
            "expected at least 8 examples, found {}",
            files.len()
        );
        let mut cluster_scoped = Vec::new();
        for file in &files {
            let f = file.to_str().context("path")?;
            // What kubectl sends, as JSON, to compare with what the server stored.
            let sent = kubectl(
                t.cluster,
                &["create", "--dry-run=client", "-o", "json", "-n", &t.name, "-f", f],
            )
            .await?;
            ensure!(sent.status.success(), "{f}: {}", text(&sent));
            let sent: Value = serde_json::from_slice(&sent.stdout)?;

            let out = kubectl(t.cluster, &["apply", "-n", &t.name, "-f", f]).await?;
            ensure!(out.status.success(), "applying {f}: {}", text(&out));
            let got = kubectl(t.cluster, &["get", "-n", &t.name, "-o", "json", "-f", f]).await?;
            ensure!(got.status.success(), "reading back {f}: {}", text(&got));
            let got: Value = serde_json::from_slice(&got.stdout)?;
            for key in ["spec", "metadata"] {
                let mut want = sent[key].clone();
                if let Some(m) = want.as_object_mut() {
                    m.remove("namespace"); // added by -n for cluster-scoped objects only in the request
                    m.remove("annotations"); // apply adds last-applied-configuration
                }
                assert_subset(key, &want, &got[key]).with_context(|| f.to_string())?;
            }
            if let Some(ann) = sent["metadata"]["annotations"].as_object() {
                for (k, v) in ann {
                    ensure!(
                        &got["metadata"]["annotations"][k] == v,
                        "{f}: annotation {k} changed"
                    );
                }
            }
            if got["metadata"]["namespace"].is_null() {
                cluster_scoped.push(f.to_string());
            }
        }
        // Defaults the API server filled in from the schema.
        let site = kubectl(t.cluster, &["get", "offloadsite", "htc-condor", "-o", "json"]).await?;
        let site: Value = serde_json::from_slice(&site.stdout)?;
        ensure!(
            site["spec"]["healthCheck"]["intervalSeconds"] == 10,
            "default healthCheck: {}",
            site["spec"]
        );
        ensure!(
            site["spec"]["architecture"] == "amd64",
            "default architecture: {}",
            site["spec"]
        );
        ensure!(site["spec"]["statusSyncIntervalSeconds"] == 5);
        let job = kubectl(
            t.cluster,
            &["get", "-n", &t.name, "remotejob", "reco-042", "-o", "json"],
        )
        .await?;
        let job: Value = serde_json::from_slice(&job.stdout)?;
        ensure!(
            job["spec"]["suspend"] == false,
            "default suspend: {}",
            job["spec"]
        );

        // kubectl get by plural, short name and category shows the informative columns.
        let out = kubectl(t.cluster, &["get", "offloadsites"]).await?;
        let table = text(&out);
        for col in [
            "NAME",
            "KIND",
            "READY",
            "PODS",
            "QUEUE(S)",
            "COST",
            "CORDONED",
            "AGE",
            "hpc-leonardo",
            "HPC",
            "40",
        ] {
            ensure!(
                table.contains(col),
                "`kubectl get offloadsites` lacks {col}:\n{table}"
            );
        }
        let out = kubectl(t.cluster, &["get", "opol"]).await?;
        let table = text(&out);
        for col in [
            "PRIORITY",
            "STRATEGY",
            "ELIGIBLE",
            "gpu-training",
            "OrderedFallback",
        ] {
            ensure!(table.contains(col), "`kubectl get opol` lacks {col}:\n{table}");
        }
        let out = kubectl(t.cluster, &["get", "rjob", "-n", &t.name]).await?;
        let table = text(&out);
        for col in ["PHASE", "SITE", "ATTEMPTS", "reco-042"] {
            ensure!(table.contains(col), "`kubectl get rjob` lacks {col}:\n{table}");
        }
        let out = kubectl(t.cluster, &["get", "offload", "-A"]).await?;
        let table = text(&out);
        for name in [
            "offloadsite.offload.dev/cloud-burst",
            "offloadpolicy.offload.dev/cheap-batch",
            "remotejob.offload.dev/reco-042",
        ] {
            ensure!(
                table.contains(name),
                "`kubectl get offload -A` lacks {name}:\n{table}"
            );
        }
        for f in cluster_scoped {
            let _ = kubectl(t.cluster, &["delete", "--wait=false", "-f", &f]).await;
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn invalid_manifests_are_rejected_naming_the_field() {
    TestNamespace::run("crd-invalid", |t| async move {
        install_crds(t.cluster).await?;
        let files = yaml_files(&repo_root().join("e2e/testdata/invalid"));
        ensure!(
            files.len() >= 12,
            "expected at least 12 invalid manifests, found {}",
            files.len()
        );
        let mut failures = Vec::new();
        for file in &files {
            let f = file.to_str().context("path")?;
            let header = std::fs::read_to_string(file)?;
            let field = header
                .lines()
                .find_map(|l| l.strip_prefix("# field: "))
                .with_context(|| format!("{f} has no `# field:` header"))?;
            let out = kubectl(t.cluster, &["apply", "-n", &t.name, "-f", f]).await?;
            let msg = text(&out);
            if out.status.success() {
                failures.push(format!("{f}: accepted, but it should be rejected at {field}"));
            } else if !msg.contains(field) {
                failures.push(format!("{f}: rejected without naming {field}: {msg}"));
            } else if !msg.contains("Invalid value")
                && !msg.contains("Required value")
                && !msg.contains("Unsupported value")
                && !msg.contains("Duplicate value")
            {
                failures.push(format!("{f}: rejected for another reason: {msg}"));
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn kubectl_explain_documents_the_fields() {
    TestNamespace::run("crd-explain", |t| async move {
        install_crds(t.cluster).await?;
        let out = wait::until(
            "kubectl explain offloadsite.spec",
            Duration::from_secs(60),
            || async {
                let out = kubectl(t.cluster, &["explain", "offloadsite.spec"]).await?;
                Ok::<_, anyhow::Error>(out.status.success().then_some(out))
            },
        )
        .await?;
        let doc = text(&out);
        for needle in [
            "endpoint",
            "interLink API server",
            "namespaceSelector",
            "cordoned",
            "healthCheck",
        ] {
            ensure!(doc.contains(needle), "explain lacks {needle}:\n{doc}");
        }
        let out = kubectl(t.cluster, &["explain", "offloadpolicy.spec.weights"]).await?;
        ensure!(text(&out).contains("queueTime"), "{}", text(&out));
        let out = kubectl(t.cluster, &["explain", "remotejob.status.attempts"]).await?;
        ensure!(text(&out).contains("exitCode"), "{}", text(&out));
        let out = kubectl(t.cluster, &["explain", "remotejob.spec.inputs"]).await?;
        ensure!(text(&out).contains("credentialsSecret"), "{}", text(&out));
        let out = kubectl(t.cluster, &["explain", "offloadsite.spec.data"]).await?;
        ensure!(text(&out).contains("remoteBandwidth"), "{}", text(&out));
        Ok(())
    })
    .await;
}
