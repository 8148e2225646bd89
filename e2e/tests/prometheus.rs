//! A real Prometheus (Debian's package, on loopback) scrapes the real operator during a small
//! scenario: one reachable and one unreachable site, two pods placed and running, one pod no site
//! fits, then a RemoteJob. Site-up, pods-by-phase, placement, RemoteJob and process values are
//! asserted through Prometheus's HTTP API;
//! every scraped metric is one `docs/metrics.md` lists, and no series carries a per-object label;
//! every query of the Grafana dashboard parses and returns a series.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, anyhow, ensure};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use offload_e2e::{
    cluster::repo_root,
    fixtures::{pod_builder, policy_builder, site_builder},
    operator::{TEST_LABEL, free_port},
    prometheus::{JOB, Prometheus},
    scenario::Scenario,
    wait,
};
use offload_operator::crd::RemoteJob;
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

/// `(panel title, PromQL)` of the Grafana dashboard, its template variables first, as Grafana sends
/// them with "All" selected: `$job` and `$site` their `allValue`, `$__rate_interval` a window that
/// covers the scenario. A variable's `label_values(m, l)` becomes `count by (l) (m)`.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let path = repo_root().join("helm/offload-operator/files/dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = Vec::new();
    let vars = d["templating"]["list"].as_array().context("templating.list")?;
    // Sites first: the test reads its answer.
    for v in vars.iter().rev().filter(|v| v["type"] == "query") {
        let q = v["definition"].as_str().context("definition")?;
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .with_context(|| format!("variable query {q}"))?;
        let (metric, label) = inner.rsplit_once(',').context("label_values(metric, label)")?;
        out.push((
            format!("variable {}", v["name"]),
            format!("count by ({}) ({})", label.trim(), metric.trim()),
        ));
    }
    fn panels(p: &Value, out: &mut Vec<(String, String)>) {
        for panel in p.as_array().into_iter().flatten() {
            for t in panel["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((panel["title"].as_str().unwrap_or("?").to_string(), e.to_string()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    panels(&d["panels"], &mut out);
    for (title, q) in &mut out {
        *q = q
            .replace("$__rate_interval", "5m")
            .replace("$job", ".+")
            .replace("$site", ".*");
        ensure!(!q.contains('$'), "{title}: a variable the test does not set: {q}");
    }
    Ok(out)
}

#[tokio::test]
async fn prometheus_scrapes_site_pod_and_placement_metrics() {
    Scenario::run("prometheus", |s| async move {
        let t = &s.t;
        let target = s.metrics_url().await?.trim_start_matches("http://").to_string();
        let prom = Prometheus::start(&t.cluster.dir, &[target]).await?;
        let pods = &s.pods;
        let pp = PostParams::default();
        let capacity = json!({"cpu": "100", "memory": "1Ti", "pods": 100});
        // Scripts run for real at the simulator.
        s.site_with(site_builder("up").set("capacity", capacity.clone()), |c| {
            c.simulate = false
        })
        .await?;
        // Nothing listens there: the site is never up.
        let closed = format!("http://127.0.0.1:{}", free_port()?);
        s.create_site(&site_builder("down").set("capacity", capacity), &closed)
            .await?;
        let (up, down) = (s.name("up"), s.name("down"));
        let policy_name = s.policy(policy_builder("batch").priority(10)).await?;
        let pod = |name: &str, cpu: &str, script: &str| {
            pod_builder(name)
                .policy(&policy_name)
                .cpu(cpu)
                .script(script)
                .build()
        };

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
                pods.create(&pp, &pod(name, "100m", "sleep 60")?).await?;
            }
            pods.create(&pp, &pod("too-big", "500", "true")?).await?;
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

            // The dashboard: every query parses, and on this scenario (which exercises every
            // panel) returns a series.
            let queries = dashboard_queries()?;
            ensure!(queries.len() >= 25, "too few dashboard queries: {queries:?}");
            let mut empty = Vec::new();
            for (title, promql) in &queries {
                // A rate needs two samples of a series: one that appeared a moment ago (the
                // RemoteJob's) has one until the next scrape, 1 s later.
                let answered = wait::until(title, Duration::from_secs(10), || async {
                    let r = prom
                        .query(promql)
                        .await
                        .with_context(|| format!("dashboard panel {title:?}"))
                        .map_err(|e| format!("{e:#}"))?;
                    Ok::<_, String>((!r.is_empty()).then_some(()))
                })
                .await;
                if answered.is_err() {
                    // A query Prometheus refuses is an error at once, not a missing series.
                    prom.query(promql)
                        .await
                        .with_context(|| format!("dashboard panel {title:?}"))?;
                    empty.push(format!("{title}: {promql}"));
                }
            }
            ensure!(
                empty.is_empty(),
                "dashboard queries without a series on this scenario:\n{}",
                empty.join("\n")
            );
            let sites = prom.query(&queries[0].1).await?;
            let sites: BTreeSet<_> = sites.iter().filter_map(|s| s.labels.get("site")).collect();
            ensure!(
                sites.contains(&up) && sites.contains(&down),
                "the dashboard's site variable offers {sites:?}"
            );
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
        // The runner prints the operator's log; Prometheus's is ours to add.
        result.map_err(|e| anyhow!("{e:#}\n{}", prom.log_tail(20)))
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
