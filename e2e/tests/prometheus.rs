//! A real Prometheus (Debian's package, on loopback) scrapes the real operator during a small
//! scenario: one reachable and one unreachable site, two pods placed and running, one pod no site
//! fits, then a RemoteJob. Site-up, pods-by-phase, placement, RemoteJob and process values are
//! asserted through Prometheus's HTTP API;
//! every scraped metric is one `docs/metrics.md` lists, and no series carries a per-object label.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, anyhow, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    cluster::repo_root,
    operator::{Operator, TEST_LABEL, free_port},
    prometheus::{JOB, Prometheus},
    sitesim::{SimConfig, SimHandle},
    wait,
};
use offload_operator::crd::{OffloadPolicy, OffloadSite, RemoteJob};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

/// Labels a series may carry: Prometheus's own, and the operator's bounded label sets.
const ALLOWED_LABELS: [&str; 11] = [
    "__name__",
    "job",
    "instance",
    "le",
    "site",
    "operation",
    "result",
    "controller",
    "policy",
    "outcome",
    "phase",
];

fn site(ns: &str, name: &str, endpoint: &str) -> anyhow::Result<OffloadSite> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
        "metadata": {"name": name, "labels": {TEST_LABEL: ns}},
        "spec": {"endpoint": endpoint, "namespaceSelector": {}, "statusSyncIntervalSeconds": 1,
            "capacity": {"cpu": "100", "memory": "1Ti", "pods": 100},
            "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}}
    }))?)
}

fn pod(name: &str, policy: &str, cpu: &str, script: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"offload.dev/policy": policy}},
        "spec": {"schedulerName": "offload-scheduler", "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]}
    }))?)
}

/// `{name: type}` of the tables in docs/metrics.md.
fn documented() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = *cells.get(2)?;
            ["counter", "gauge", "histogram"]
                .contains(&kind)
                .then(|| (name.to_string(), kind.to_string()))
        })
        .collect())
}

#[tokio::test]
async fn prometheus_scrapes_site_pod_and_placement_metrics() {
    TestNamespace::run("prometheus", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let target = op.metrics_url.trim_start_matches("http://").to_string();
        let prom = Prometheus::start(&t.cluster.dir, &[target]).await?;
        let sim = SimHandle::start(SimConfig::default()).await?;
        let (up, down) = (format!("{}-up", t.name), format!("{}-down", t.name));
        let policy_name = format!("{}-batch", t.name);
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        let pp = PostParams::default();
        sites.create(&pp, &site(&t.name, &up, &sim.url)?).await?;
        // Nothing listens there: the site is never up.
        let closed = format!("http://127.0.0.1:{}", free_port()?);
        sites.create(&pp, &site(&t.name, &down, &closed)?).await?;
        policies
            .create(
                &pp,
                &serde_json::from_value(json!({
                    "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy",
                    "metadata": {"name": policy_name, "labels": {TEST_LABEL: t.name}},
                    "spec": {"priority": 10}
                }))?,
            )
            .await?;
        t.default_service_account().await?;

        let result = async {
            let q = |s: &str| {
                s.replace("UP", &up)
                    .replace("DOWN", &down)
                    .replace("POLICY", &policy_name)
            };
            prom.wait_value(&q(r#"offload_site_up{site="UP"}"#), |v| v == 1.0)
                .await?;
            prom.wait_value(&q(r#"offload_site_up{site="DOWN"}"#), |v| v == 0.0)
                .await?;

            // Two pods placed at the reachable site, running; one that no site fits.
            for name in ["sleeper-1", "sleeper-2"] {
                pods.create(&pp, &pod(name, &policy_name, "100m", "sleep 60")?)
                    .await?;
            }
            pods.create(&pp, &pod("too-big", &policy_name, "500", "true")?)
                .await?;
            for name in ["sleeper-1", "sleeper-2"] {
                wait::until(&format!("{name} Running"), TIMEOUT, || async {
                    let p = pods.get(name).await?;
                    let phase = p.status.and_then(|s| s.phase);
                    Ok::<_, kube::Error>((phase.as_deref() == Some("Running")).then_some(()))
                })
                .await?;
            }
            prom.wait_value(&q(r#"offload_pods{site="UP", phase="Running"}"#), |v| v == 2.0)
                .await?;
            prom.wait_value(&q(r#"offload_pods{site="UP", phase="Pending"}"#), |v| v == 0.0)
                .await?;
            prom.wait_value(&q(r#"sum(offload_pods{site="DOWN"}) or vector(0)"#), |v| v == 0.0)
                .await?;
            prom.wait_value(
                &q(r#"offload_placements_total{policy="POLICY", site="UP", outcome="scheduled"}"#),
                |v| v == 2.0,
            )
            .await?;
            prom.wait_value(
                &q(r#"sum(offload_placements_total{policy="POLICY", site="DOWN"}) or vector(0)"#),
                |v| v == 0.0,
            )
            .await?;
            prom.wait_value(
                &q(r#"sum(offload_placements_total{policy="POLICY", outcome="unschedulable"})"#),
                |v| v >= 1.0,
            )
            .await?;
            prom.wait_value("offload_pending_pods", |v| v == 1.0).await?;
            prom.wait_value(
                &q(r#"offload_site_requests_total{site="UP", operation="create", result="ok"}"#),
                |v| v == 2.0,
            )
            .await?;
            prom.wait_value(
                &q(r#"time() - offload_status_sync_last_success_timestamp_seconds{site="UP"}"#),
                |v| v < 30.0,
            )
            .await?;

            // Deleted pods leave the gauge.
            for name in ["sleeper-1", "sleeper-2", "too-big"] {
                pods.delete(name, &DeleteParams::default()).await?;
            }
            prom.wait_value(&q(r#"offload_pods{site="UP", phase="Running"}"#), |v| v == 0.0)
                .await?;
            prom.wait_value("offload_pending_pods", |v| v == 0.0).await?;

            // A RemoteJob that succeeds at its first attempt.
            let jobs: Api<RemoteJob> = Api::namespaced(t.client.clone(), &t.name);
            jobs.create(
                &pp,
                &serde_json::from_value(json!({
                    "apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob",
                    "metadata": {"name": "job", "namespace": t.name, "labels": {TEST_LABEL: t.name}},
                    "spec": {"policy": policy_name, "template": {"spec": {"containers": [
                        {"name": "main", "image": "busybox", "command": ["sh", "-c", "true"]}]}}}
                }))?,
            )
            .await?;
            prom.wait_value(r#"offload_remotejobs{phase="Succeeded"}"#, |v| v == 1.0)
                .await?;
            prom.wait_value(r#"offload_remotejobs{phase="Running"}"#, |v| v == 0.0)
                .await?;
            prom.wait_value(
                &q(r#"offload_remotejob_attempts_total{site="UP", outcome="Succeeded"}"#),
                |v| v == 1.0,
            )
            .await?;
            prom.wait_value(
                r#"offload_remotejob_duration_seconds_count{outcome="Succeeded"}"#,
                |v| v == 1.0,
            )
            .await?;
            prom.wait_value(
                r#"offload_reconciles_total{controller="remotejob", result="ok"}"#,
                |v| v >= 1.0,
            )
            .await?;
            // The process collector.
            prom.wait_value("process_resident_memory_bytes", |v| v > 1e6)
                .await?;
            prom.wait_value("time() - process_start_time_seconds", |v| v > 0.0 && v < 600.0)
                .await?;
            jobs.delete("job", &DeleteParams::default()).await?;

            // Everything scraped is documented, and no series has a per-object label.
            let docs = documented()?;
            let mut allowed = BTreeSet::new();
            for (name, kind) in &docs {
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        allowed.insert(format!("{name}{suffix}"));
                    }
                } else {
                    allowed.insert(name.clone());
                }
            }
            let series = prom.query(&format!(r#"{{job="{JOB}"}}"#)).await?;
            ensure!(series.len() > 20, "too few series scraped: {}", series.len());
            let mut undocumented = BTreeSet::new();
            for s in &series {
                let name = s.labels.get("__name__").context("__name__")?;
                if name == "up" || name.starts_with("scrape_") {
                    continue;
                }
                if !allowed.contains(name) {
                    undocumented.insert(name.clone());
                }
                for label in s.labels.keys() {
                    ensure!(
                        ALLOWED_LABELS.contains(&label.as_str()),
                        "{name} has the label {label}: {:?}",
                        s.labels
                    );
                }
            }
            ensure!(
                undocumented.is_empty(),
                "exported but not in docs/metrics.md: {undocumented:?}"
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        for p in pods.list(&ListParams::default()).await?.items {
            let _ = pods.delete(&p.name_any(), &DeleteParams::default()).await;
        }
        let _ = policies.delete(&policy_name, &DeleteParams::default()).await;
        for name in [&up, &down] {
            let _ = sites.delete(name, &DeleteParams::default()).await;
        }
        for name in [&up, &down] {
            wait::until("site gone", TIMEOUT, || async {
                Ok::<_, kube::Error>(sites.get_opt(name).await?.is_none().then_some(()))
            })
            .await?;
        }
        result.map_err(|e| anyhow!("{e:#}\n{}\n{}", op.log_tail(60), prom.log_tail(20)))
    })
    .await;
}

/// The query helper itself: a Prometheus with no targets answers an empty vector, and a scalar
/// comparison through vector().
#[tokio::test]
async fn prometheus_answers_queries() {
    let dir = std::env::temp_dir().join(format!("offload-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prom = Prometheus::start(&dir, &[]).await.unwrap();
    assert!(prom.query("offload_site_up").await.unwrap().is_empty());
    let v: Value = json!(prom.query("vector(3)").await.unwrap()[0].value);
    assert_eq!(v, json!(3.0));
    drop(prom);
    let _ = std::fs::remove_dir_all(&dir);
}
