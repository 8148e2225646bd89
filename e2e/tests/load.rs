//! Load benchmarks end to end: the real control plane, the operator binary, simulated sites. They
//! print numbers and assert only correctness (everything finishes, each pod is created once), never
//! a timing. `#[ignore]`d so `make test` does not pay for them: `make bench-e2e` runs them.
//! Sizes: `OFFLOAD_LOAD_JOBS` (default 300), `OFFLOAD_LOAD_PODS` (default 500).

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    fixtures::{policy_builder, site_builder},
    operator::TEST_LABEL,
    scenario::Scenario,
    sitesim::SimHandle,
    wait,
};
use offload_operator::crd::{RemoteJob, remote_job::RemoteJobPhase};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(900);

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two simulated sites that run every container as a timer, each Ready: the simulators and the
/// sites' full names.
async fn sites(s: &Scenario) -> anyhow::Result<(Vec<Arc<SimHandle>>, Vec<String>)> {
    let (mut sims, mut names) = (Vec::new(), Vec::new());
    for suffix in ["a", "b"] {
        // `site_with` runs the simulator with `simulate: true`.
        let sim = s.site_with(site_builder(suffix), |c| c.slots = 100_000).await?;
        sims.push(sim);
        names.push(s.name(suffix));
    }
    Ok((sims, names))
}

/// The operator's CPU seconds and resident memory, from its own process metrics.
async fn process(s: &Scenario) -> anyhow::Result<(f64, f64)> {
    let text = s.operator_get("/metrics").await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((
        value("process_cpu_seconds_total "),
        value("process_resident_memory_bytes ") / 1_048_576.0,
    ))
}

#[tokio::test]
#[ignore = "a load benchmark: make bench-e2e"]
async fn remote_jobs_under_load() {
    Scenario::run("load-jobs", |s| async move {
        let n = size("OFFLOAD_LOAD_JOBS", 300);
        let (sims, names) = sites(&s).await?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let policy = s
            .policy(policy_builder("jobs").sites(&refs).merge(json!({"strategy": "Spread"})))
            .await?;
        let jobs: Api<RemoteJob> = Api::namespaced(s.t.client.clone(), &s.t.name);
        let result = async {
            let (cpu0, _) = process(&s).await?;
            let start = Instant::now();
            for i in 0..n {
                let job: RemoteJob = serde_json::from_value(json!({"apiVersion": "offload.dev/v1alpha1",
                    "kind": "RemoteJob", "metadata": {"name": format!("j{i}"), "labels": {TEST_LABEL: s.t.name}},
                    "spec": {"policy": policy, "template": {"metadata": {"annotations": {
                        "sitesim.offload.dev/duration-seconds": "2"}},
                        "spec": {"containers": [{"name": "main", "image": "busybox"}]}}}}))?;
                jobs.create(&PostParams::default(), &job).await?;
            }
            let created = start.elapsed();
            wait::until(&format!("{n} jobs Succeeded"), TIMEOUT, || async {
                let done = jobs
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(RemoteJobPhase::Succeeded))
                    .count();
                Ok::<_, kube::Error>((done == n).then_some(()))
            })
            .await?;
            let all = start.elapsed();
            let (cpu1, rss) = process(&s).await?;
            let stats: Vec<_> = sims.iter().map(|sim| sim.stats()).collect();
            offload_e2e::sitesim::exactly_once(&stats, n)?;
            let creates: usize = stats.iter().map(|s| s.creates_per_uid.len()).sum();
            println!(
                "remote_jobs_under_load: {n} RemoteJobs (2 s containers, 2 sites): created in {:.1} s, all Succeeded after {:.1} s \
                 ({:.1} jobs/s end to end); operator CPU {:.1} s ({:.1} ms per job), RSS {rss:.0} MiB; {creates} creates at the sites",
                created.as_secs_f64(),
                all.as_secs_f64(),
                n as f64 / all.as_secs_f64(),
                cpu1 - cpu0,
                (cpu1 - cpu0) * 1000.0 / n as f64,
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        // The jobs go first, so that no job makes a new attempt pod while the runner deletes the
        // pods and the sites.
        for j in jobs.list(&ListParams::default()).await?.items {
            let _ = jobs.delete(&j.name_any(), &DeleteParams::background()).await;
        }
        wait::until("the attempt pods to go", TIMEOUT, || async {
            Ok::<_, kube::Error>(s.pods.list(&ListParams::default()).await?.items.is_empty().then_some(()))
        })
        .await?;
        result
    })
    .await;
}

#[tokio::test]
#[ignore = "a load benchmark: make bench-e2e"]
async fn offloaded_pods_under_load() {
    Scenario::run("load-pods", |s| async move {
        let n = size("OFFLOAD_LOAD_PODS", 500);
        let (sims, _) = sites(&s).await?;
        let pods = &s.pods;
        let result = async {
            let (cpu0, _) = process(&s).await?;
            let status0: u64 = sims.iter().map(|s| s.stats().status_requests).sum();
            let start = Instant::now();
            for i in 0..n {
                // Placed by the offload scheduler under the scenario's default policy (every
                // site), so no other test's operator is entitled to them.
                let p = s.pod(&format!("p{i}")).cpu("100m").runs_for(600).build()?;
                pods.create(&PostParams::default(), &p).await?;
            }
            let created = start.elapsed();
            wait::until(&format!("{n} pods Running"), TIMEOUT, || async {
                let running = pods
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                    .count();
                Ok::<_, kube::Error>((running == n).then_some(()))
            })
            .await?;
            let all = start.elapsed();
            // A quiet minute-fraction with every pod running: what steady state costs.
            let (cpu1, _) = process(&s).await?;
            let status1: u64 = sims.iter().map(|s| s.stats().status_requests).sum();
            tokio::time::sleep(Duration::from_secs(20)).await;
            let (cpu2, rss) = process(&s).await?;
            let status2: u64 = sims.iter().map(|s| s.stats().status_requests).sum();
            let stats: Vec<_> = sims.iter().map(|s| s.stats()).collect();
            offload_e2e::sitesim::exactly_once(&stats, n)?;
            let per_site: Vec<usize> = sims.iter().map(|s| s.stats().creates_per_uid.len()).collect();
            println!(
                "offloaded_pods_under_load: {n} pods over 2 sites {per_site:?}: created in {:.1} s, all Running after {:.1} s \
                 ({:.1} pods/s placed, created at the site and reported Running); operator CPU {:.1} s for the burst \
                 ({:.1} ms per pod) and {:.2} s per minute at steady state, RSS {rss:.0} MiB; {} status requests during the burst, \
                 {} in the 20 s after (one per site per second, each for all its pods)",
                created.as_secs_f64(),
                all.as_secs_f64(),
                n as f64 / all.as_secs_f64(),
                cpu1 - cpu0,
                (cpu1 - cpu0) * 1000.0 / n as f64,
                (cpu2 - cpu1) * 3.0,
                status1 - status0,
                status2 - status1,
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result.context("load benchmark")
    })
    .await;
}
