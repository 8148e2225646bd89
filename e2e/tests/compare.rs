//! `make bench-compare`: one workload through three systems on one control plane, with the same
//! simulated site type, printing what each costs.
//!
//! - **A, interLink's virtual kubelet** (0.6.2, built by `e2e/bin/build-interlink`), configured as
//!   its docs say, one process per site; pods pinned with a nodeSelector and a toleration.
//! - **B, offload-operator**: pods pinned the same way to its virtual Node (B1), and placed by the
//!   offload scheduler (B2).
//! - **C, the floor** (`offload-floor`): only the API writes a kubelet cannot avoid (one status write
//!   per pod and the final delete), talking to no site.
//!
//! Workloads (one test each; every pod is created in a burst, held Running for
//! `OFFLOAD_COMPARE_STEADY_SECONDS` (300), then deleted):
//! - `burst_on_one_site`: `OFFLOAD_COMPARE_PODS` (1,000) pods on one site, all four systems;
//! - `twenty_sites`: `OFFLOAD_COMPARE_SITES` (20) sites × `OFFLOAD_COMPARE_PODS_PER_SITE` (100),
//!   one virtual kubelet (and one floor) per site against one operator;
//! - `operator_at_scale` (`make bench-scale`): the operator alone, `OFFLOAD_SCALE_PODS` (10,000)
//!   pods over `OFFLOAD_SCALE_SITES` (10) sites.
//!
//! Per system: creation to Running (p50, p99, max; watched, and from the pods' Ready condition),
//! site requests per pod per minute at steady state (simulator counts), API-server requests by
//! verb and resource (`apiserver_request_total` delta), API writes per pod lifecycle, CPU seconds
//! and peak RSS of the system's processes (summed), and for the operator the mean time of one
//! site's status sync at steady state. `OFFLOAD_COMPARE_SYSTEMS` (`A,B1,B2,C`) picks systems.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use offload_e2e::{
    TestNamespace,
    bench::{self, ProcUsage, RequestCounts},
    cluster::workspace_binary,
    fixtures::site_builder,
    operator::{free_port, http_get},
    scenario::Scenario,
    sitesim::{SimConfig, SimHandle},
    wait,
};
use serde_json::json;

fn setting(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the workload's pods go.
#[derive(Clone)]
enum Target {
    /// Pinned to this Node the interLink way (nodeSelector on the hostname, tolerations).
    Node(String),
    /// Placed by the offload scheduler under this policy.
    Scheduler(String),
}

/// One pod of the workload: tiny requests, no service-account token (the same API work for every
/// system), running an hour at a simulated site.
fn pod(name: &str, target: &Target) -> anyhow::Result<Pod> {
    let mut p = json!({
        "metadata": {"name": name, "annotations": {"sitesim.offload.dev/duration-seconds": "3600"}},
        "spec": {"automountServiceAccountToken": false, "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": "busybox",
                                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}
    });
    match target {
        Target::Node(node) => {
            p["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
            p["spec"]["tolerations"] = json!([{"operator": "Exists"}]);
        }
        Target::Scheduler(policy) => {
            p["spec"]["schedulerName"] = "offload-scheduler".into();
            p["metadata"]["annotations"]["offload.dev/policy"] = policy.as_str().into();
        }
    }
    Ok(serde_json::from_value(p)?)
}

/// A workload: `sites` sites with `pods_per_site` pods each.
#[derive(Clone, Copy, Debug)]
struct Workload {
    sites: usize,
    pods_per_site: usize,
}

impl Workload {
    fn pods(&self) -> usize {
        self.sites * self.pods_per_site
    }
}

/// What one system cost.
#[derive(Clone, Debug, Default)]
struct Row {
    system: String,
    sites: usize,
    pods: usize,
    /// Seconds from creation to Running as watched: p50, p99, max.
    watched: [f64; 3],
    /// Seconds from `creationTimestamp` to the Ready condition: p50, p99, max.
    conditions: [f64; 3],
    site_requests_per_pod_minute: f64,
    pod_writes_per_pod: f64,
    all_writes_per_pod: f64,
    steady_api_requests_per_minute: f64,
    steady_cores: f64,
    usage: ProcUsage,
    /// The operator's status sync at steady state: mean seconds of one site's sync, the slowest
    /// site's (NaN for systems without that metric).
    sync_seconds: f64,
    top: Vec<(String, f64)>,
}

fn site_requests(sims: &[Arc<SimHandle>]) -> u64 {
    sims.iter()
        .map(|s| {
            let st = s.stats();
            st.status_requests
                + st.pings
                + st.deletes
                + st.log_requests
                + st.creates_per_uid.values().map(|n| u64::from(*n)).sum::<u64>()
        })
        .sum()
}

fn usage(pids: &[u32]) -> ProcUsage {
    pids.iter()
        .filter_map(|p| bench::proc_usage(*p).ok())
        .fold(ProcUsage::default(), |a, b| a + b)
}

fn total(c: &RequestCounts) -> f64 {
    c.values().sum()
}

/// p50, p99, max; NaN (printed `-`) when there is nothing to measure.
fn stats3(v: &[f64]) -> [f64; 3] {
    if v.is_empty() {
        return [f64::NAN; 3];
    }
    [
        bench::quantile(v, 0.5),
        bench::quantile(v, 0.99),
        bench::quantile(v, 1.0),
    ]
}

/// The operator's status-sync histogram per site: (sum of seconds, count).
async fn sync_totals(metrics: Option<&str>) -> anyhow::Result<HashMap<String, (f64, f64)>> {
    let Some(url) = metrics else {
        return Ok(HashMap::new());
    };
    let (code, text) = http_get(&format!("{url}/metrics")).await?;
    ensure!(code == 200, "operator /metrics: HTTP {code}");
    let mut out: HashMap<String, (f64, f64)> = HashMap::new();
    for line in text.lines() {
        for (suffix, sum) in [("_sum{", true), ("_count{", false)] {
            let Some(rest) = line.strip_prefix(&format!("offload_status_sync_duration_seconds{suffix}"))
            else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let site = labels
                .split("site=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or_default()
                .to_string();
            let v: f64 = value.trim().parse().unwrap_or(0.0);
            let e = out.entry(site).or_default();
            if sum { e.0 += v } else { e.1 += v }
        }
    }
    Ok(out)
}

/// The slowest site's mean sync time between two [`sync_totals`]; NaN without syncs.
fn slowest_mean_sync(before: &HashMap<String, (f64, f64)>, after: &HashMap<String, (f64, f64)>) -> f64 {
    after
        .iter()
        .filter_map(|(site, (sum, count))| {
            let (s0, c0) = before.get(site).copied().unwrap_or_default();
            (count - c0 > 0.0).then(|| (sum - s0) / (count - c0))
        })
        .fold(f64::NAN, f64::max)
}

/// The system under test: its processes, its sites' simulators, where its pods go (round robin),
/// and the operator's metrics server if it is the operator.
struct System<'a> {
    name: &'a str,
    targets: Vec<Target>,
    sims: &'a [Arc<SimHandle>],
    pids: &'a [u32],
    metrics: Option<String>,
}

/// Runs the workload through `sys` and measures it.
async fn measure(t: &TestNamespace, sys: System<'_>, w: Workload) -> anyhow::Result<Row> {
    let System {
        name: system,
        targets,
        sims,
        pids,
        metrics,
    } = sys;
    let n = w.pods();
    let steady = Duration::from_secs(setting("OFFLOAD_COMPARE_STEADY_SECONDS", 300));
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    let api_start = bench::apiserver_requests(&t.client).await?;

    // First time each pod is seen Running.
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let (pods, running) = (pods.clone(), running.clone());
        tokio::spawn(async move {
            let mut s = std::pin::pin!(
                watcher(pods, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
            );
            while let Some(Ok(p)) = s.next().await {
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    running
                        .lock()
                        .unwrap()
                        .entry(p.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let burst = Instant::now();
    let created: HashMap<String, Instant> = futures::stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            let target = targets[i % targets.len()].clone();
            async move {
                let name = format!("p{i}");
                let at = Instant::now();
                pods.create(&PostParams::default(), &pod(&name, &target)?).await?;
                Ok::<_, anyhow::Error>((name, at))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    eprintln!(
        "{system}: {n} pods created in {:.1}s",
        burst.elapsed().as_secs_f64()
    );
    let deadline = burst + Duration::from_secs(3600);
    loop {
        let seen = running.lock().unwrap().len();
        if seen >= n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{system}: only {seen}/{n} pods Running after an hour"
        );
        if burst.elapsed().as_secs().is_multiple_of(30) {
            eprintln!(
                "{system}: {seen}/{n} Running after {:.0}s",
                burst.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let watched: Vec<f64> = {
        let r = running.lock().unwrap();
        created
            .iter()
            .filter_map(|(name, at)| Some(r.get(name)?.duration_since(*at).as_secs_f64()))
            .collect()
    };
    watch.abort();
    let listed = pods.list(&ListParams::default()).await?;
    let conditions: Vec<f64> = listed
        .items
        .iter()
        .filter_map(|p| {
            let created = p.metadata.creation_timestamp.as_ref()?.0;
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "True")?
                .last_transition_time
                .as_ref()?
                .0;
            Some((ready.as_second() - created.as_second()) as f64)
        })
        .collect();
    eprintln!(
        "{system}: all Running after {:.1}s; steady state for {}s",
        burst.elapsed().as_secs_f64(),
        steady.as_secs()
    );

    let (site0, api0, use0, sync0, t0) = (
        site_requests(sims),
        bench::apiserver_requests(&t.client).await?,
        usage(pids),
        sync_totals(metrics.as_deref()).await?,
        Instant::now(),
    );
    tokio::time::sleep(steady).await;
    let (site1, api1, use1, sync1) = (
        site_requests(sims),
        bench::apiserver_requests(&t.client).await?,
        usage(pids),
        sync_totals(metrics.as_deref()).await?,
    );
    let minutes = t0.elapsed().as_secs_f64() / 60.0;

    pods.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    wait::until(
        &format!("{system}: pods gone"),
        Duration::from_secs(1800),
        || async {
            Ok::<_, kube::Error>(
                pods.list(&ListParams::default())
                    .await?
                    .items
                    .is_empty()
                    .then_some(()),
            )
        },
    )
    .await?;
    let lifecycle = bench::delta(&api_start, &bench::apiserver_requests(&t.client).await?);
    let writes = |only_pods: bool| -> f64 {
        lifecycle
            .iter()
            .filter(|((verb, resource, _), _)| bench::is_write(verb) && (!only_pods || resource == "pods"))
            .map(|(_, v)| v)
            .sum()
    };
    let mut top: Vec<(String, f64)> = lifecycle
        .iter()
        .map(|((v, r, s), c)| {
            (
                if s.is_empty() {
                    format!("{v} {r}")
                } else {
                    format!("{v} {r}/{s}")
                },
                *c,
            )
        })
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(10);
    let row = Row {
        system: system.into(),
        sites: w.sites,
        pods: n,
        watched: stats3(&watched),
        conditions: stats3(&conditions),
        site_requests_per_pod_minute: (site1 - site0) as f64 / n as f64 / minutes,
        pod_writes_per_pod: writes(true) / n as f64,
        all_writes_per_pod: writes(false) / n as f64,
        steady_api_requests_per_minute: total(&bench::delta(&api0, &api1)) / minutes,
        steady_cores: (use1.cpu_seconds - use0.cpu_seconds) / (minutes * 60.0),
        usage: usage(pids),
        sync_seconds: slowest_mean_sync(&sync0, &sync1),
        top,
    };
    eprintln!("{row:#?}");
    Ok(row)
}

/// A child process logging to `log`, killed when dropped.
fn spawn(cmd: &mut tokio::process::Command, log: &std::path::Path) -> anyhow::Result<tokio::process::Child> {
    let file = std::fs::File::create(log)?;
    Ok(cmd
        .stdout(std::process::Stdio::from(file.try_clone()?))
        .stderr(std::process::Stdio::from(file))
        .kill_on_drop(true)
        .spawn()?)
}

/// A kubelet process to start: its command, the Node it owns, its log file.
struct KubeletSpec {
    cmd: tokio::process::Command,
    node: String,
    log: std::path::PathBuf,
}

/// The last lines of a log file.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Starts the kubelet and waits until its Node is Ready; fails early, with its log's tail, if the
/// process exits first.
async fn start_kubelet(
    t: &TestNamespace,
    mut spec: KubeletSpec,
    children: &mut Vec<(tokio::process::Child, String)>,
) -> anyhow::Result<()> {
    let child = spawn(&mut spec.cmd, &spec.log)?;
    children.push((child, spec.node.clone()));
    let nodes: Api<Node> = Api::all(t.client.clone());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = nodes
            .get_opt(&spec.node)
            .await?
            .and_then(|n| n.status?.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return Ok(());
        }
        if let Some(status) = children.last_mut().and_then(|(c, _)| c.try_wait().ok().flatten()) {
            anyhow::bail!(
                "the kubelet of Node {} exited ({status}) before its Node was Ready; its log ends:\n{}",
                spec.node,
                log_tail(&spec.log)
            );
        }
        ensure!(
            Instant::now() < deadline,
            "Node {} not Ready after 180 s; its kubelet's log ends:\n{}",
            spec.node,
            log_tail(&spec.log)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Starts kubelet processes (virtual kubelets, floors), one per Node and one after another (each
/// once the previous one's Node is Ready), measures them, then stops them and removes their Nodes
/// and Leases, whatever the outcome.
async fn measure_kubelets(
    t: &TestNamespace,
    system: &str,
    specs: Vec<KubeletSpec>,
    sims: &[Arc<SimHandle>],
    w: Workload,
) -> anyhow::Result<Row> {
    let mut children = Vec::new();
    let result = async {
        for spec in specs {
            start_kubelet(t, spec, &mut children).await?;
        }
        let pids: Vec<u32> = children
            .iter()
            .map(|(c, _)| c.id().with_context(|| format!("{system}: no pid")))
            .collect::<anyhow::Result<_>>()?;
        let sys = System {
            name: system,
            targets: children.iter().map(|(_, n)| Target::Node(n.clone())).collect(),
            sims,
            pids: &pids,
            metrics: None,
        };
        measure(t, sys, w).await
    }
    .await;
    for (child, node) in &mut children {
        let _ = child.kill().await;
        forget_node(t, node).await;
    }
    result
}

/// Deletes a Node and its Lease (neither the virtual kubelet nor the floor removes them).
async fn forget_node(t: &TestNamespace, name: &str) {
    let _ = Api::<Node>::all(t.client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let _ = Api::<Lease>::namespaced(t.client.clone(), "kube-node-lease")
        .delete(name, &DeleteParams::default())
        .await;
}

fn simulator() -> SimConfig {
    SimConfig {
        simulate: true,
        slots: 100_000,
        ..SimConfig::default()
    }
}

/// A: interLink's virtual kubelet, one process per site, each with its own simulated site.
async fn virtual_kubelet(rows: Arc<Mutex<Vec<Row>>>, w: Workload) {
    TestNamespace::run("compare-vk", |t| async move {
        let bin = std::env::var("OFFLOAD_VK_BIN").context("OFFLOAD_VK_BIN: the virtual-kubelet binary (make bench-compare sets it)")?;
        let kubeconfig = std::fs::canonicalize(&t.cluster.admin_kubeconfig)?;
        let (mut sims, mut specs) = (Vec::new(), Vec::new());
        for i in 0..w.sites {
            let sim = Arc::new(SimHandle::start(simulator()).await?);
            let port = sim.url.rsplit_once(':').context("simulator port")?.1.to_string();
            let node = format!("vk-{}-{i}", t.name);
            // As interLink's docs configure it, with what running many on one machine needs: a
            // self-signed kubelet certificate (no CSR to approve), room for the pods, quiet logs.
            let config = t.cluster.dir.join(format!("{node}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "InterlinkURL: \"http://127.0.0.1\"\nInterlinkPort: \"{port}\"\nVerboseLogging: false\n\
                     ErrorsOnlyLogging: true\nDisableCSR: true\nResources:\n  CPU: \"100000\"\n  Memory: \"1000Ti\"\n  Pods: \"5000\"\n"
                ),
            )?;
            let mut cmd = tokio::process::Command::new(&bin);
            cmd.env("NODENAME", &node)
                .env("CONFIGPATH", &config)
                .env("KUBECONFIG", &kubeconfig)
                .env("KUBELET_URL", "127.0.0.1")
                .env("KUBELET_PORT", free_port()?.to_string())
                .env("POD_IP", "127.0.0.1");
            sims.push(sim);
            let log = t.cluster.dir.join(format!("{node}.log"));
            specs.push(KubeletSpec { cmd, node, log });
        }
        let row = measure_kubelets(&t, "A interLink VK", specs, &sims, w).await?;
        rows.lock().unwrap().push(row);
        Ok(())
    })
    .await;
}

/// B: offload-operator with the workload's sites, pods pinned (`scheduled` false) or placed by
/// its scheduler.
async fn operator(rows: Arc<Mutex<Vec<Row>>>, w: Workload, scheduled: bool) {
    let test = if scheduled {
        "compare-op-sched"
    } else {
        "compare-op-pinned"
    };
    Scenario::run(test, |s| async move {
        let mut sims = Vec::new();
        for i in 0..w.sites {
            // Production defaults: status sync and health probes at their default intervals.
            let site = site_builder(&format!("site{i}"))
                .unset("statusSyncIntervalSeconds")
                .unset("healthCheck");
            sims.push(s.site_with(site, |c| *c = simulator()).await?);
        }
        let pid = s.operator_pid().await.context("operator pid")?;
        let (system, targets) = if scheduled {
            (
                "B2 offload-operator, scheduled",
                vec![Target::Scheduler(s.default_policy().to_string())],
            )
        } else {
            (
                "B1 offload-operator, pinned",
                (0..w.sites)
                    .map(|i| Target::Node(format!("offload-{}", s.name(&format!("site{i}")))))
                    .collect(),
            )
        };
        let sys = System {
            name: system,
            targets,
            sims: &sims,
            pids: &[pid],
            metrics: Some(s.metrics_url().await?),
        };
        let row = measure(&s.t, sys, w).await?;
        rows.lock().unwrap().push(row);
        Ok(())
    })
    .await;
}

/// C: the floor, one process per Node.
async fn floor(rows: Arc<Mutex<Vec<Row>>>, w: Workload) {
    TestNamespace::run("compare-floor", |t| async move {
        let mut specs = Vec::new();
        for i in 0..w.sites {
            let node = format!("floor-{}-{i}", t.name);
            let mut cmd = tokio::process::Command::new(workspace_binary("offload-floor")?);
            cmd.arg("--kubeconfig")
                .arg(&t.cluster.admin_kubeconfig)
                .args(["--node", &node]);
            let log = t.cluster.dir.join(format!("{node}.log"));
            specs.push(KubeletSpec { cmd, node, log });
        }
        let row = measure_kubelets(&t, "C floor", specs, &[], w).await?;
        rows.lock().unwrap().push(row);
        Ok(())
    })
    .await;
}

/// A number, or `-` where there is none.
fn or_dash(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn print(rows: &[Row]) {
    println!(
        "\n| system | sites × pods | to Running p50 / p99 / max (watched, s) | (Ready condition, s) | site requests / pod / min (steady) | API writes / pod lifecycle (pods; all) | API requests / min (steady) | CPU cores (steady) | CPU s (total) | peak RSS MiB | one site's status sync (steady, s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} × {} | {:.1} / {:.1} / {:.1} | {} | {:.3} | {:.2}; {:.2} | {:.0} | {:.3} | {:.1} | {:.1} | {} |",
            r.system,
            r.sites,
            r.pods / r.sites.max(1),
            r.watched[0],
            r.watched[1],
            r.watched[2],
            if r.conditions[0].is_nan() {
                "- (no Ready condition)".to_string()
            } else {
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    r.conditions[0], r.conditions[1], r.conditions[2]
                )
            },
            r.site_requests_per_pod_minute,
            r.pod_writes_per_pod,
            r.all_writes_per_pod,
            r.steady_api_requests_per_minute,
            r.steady_cores,
            r.usage.cpu_seconds,
            r.usage.peak_rss_bytes as f64 / 1_048_576.0,
            or_dash(r.sync_seconds, 3)
        );
    }
    for r in rows {
        println!("\n{}: API requests over the lifecycle, top 10:", r.system);
        for (what, n) in &r.top {
            println!("  {n:>8.0}  {what}");
        }
    }
    let find = |p: &str| rows.iter().find(|r| r.system.starts_with(p));
    for b in ["B1", "B2"] {
        let Some(b_row) = find(b) else { continue };
        if let Some(a) = find("A") {
            println!(
                "\n{b}/A: site requests {:.4}, p99 to Running {:.2}, pod writes {:.2}, peak RSS {:.3}, steady CPU {:.2}",
                b_row.site_requests_per_pod_minute / a.site_requests_per_pod_minute,
                b_row.watched[1] / a.watched[1],
                b_row.pod_writes_per_pod / a.pod_writes_per_pod,
                b_row.usage.peak_rss_bytes as f64 / a.usage.peak_rss_bytes as f64,
                b_row.steady_cores / a.steady_cores
            );
        }
        if let Some(c) = find("C") {
            println!(
                "{b}/C: p99 to Running {:.2}, pod writes {:.2}",
                b_row.watched[1] / c.watched[1],
                b_row.pod_writes_per_pod / c.pod_writes_per_pod
            );
        }
    }
}

/// Runs the systems named in `OFFLOAD_COMPARE_SYSTEMS` (default `default`) on `w`, then prints
/// the table.
async fn compare(w: Workload, default: &str) {
    let rows: Arc<Mutex<Vec<Row>>> = Arc::default();
    let only = std::env::var("OFFLOAD_COMPARE_SYSTEMS").unwrap_or_else(|_| default.into());
    eprintln!(
        "workload: {} site(s) × {} pods; systems {only}",
        w.sites, w.pods_per_site
    );
    for system in only.split(',') {
        match system.trim() {
            "A" => virtual_kubelet(rows.clone(), w).await,
            "B1" => operator(rows.clone(), w, false).await,
            "B2" => operator(rows.clone(), w, true).await,
            "C" => floor(rows.clone(), w).await,
            other => panic!("unknown system {other} (A, B1, B2, C)"),
        }
    }
    let rows = rows.lock().unwrap().clone();
    assert_eq!(rows.len(), only.split(',').count(), "every system ran");
    print(&rows);
}

#[tokio::test]
#[ignore = "a comparison benchmark: make bench-compare"]
async fn burst_on_one_site() {
    let w = Workload {
        sites: 1,
        pods_per_site: setting("OFFLOAD_COMPARE_PODS", 1000) as usize,
    };
    compare(w, "A,B1,B2,C").await;
}

#[tokio::test]
#[ignore = "a comparison benchmark: make bench-compare"]
async fn twenty_sites() {
    let w = Workload {
        sites: setting("OFFLOAD_COMPARE_SITES", 20) as usize,
        pods_per_site: setting("OFFLOAD_COMPARE_PODS_PER_SITE", 100) as usize,
    };
    compare(w, "A,B1,B2,C").await;
}

#[tokio::test]
#[ignore = "the operator alone at scale: make bench-scale"]
async fn operator_at_scale() {
    let sites = setting("OFFLOAD_SCALE_SITES", 10).max(1) as usize;
    let w = Workload {
        sites,
        pods_per_site: setting("OFFLOAD_SCALE_PODS", 10_000) as usize / sites,
    };
    compare(w, "B1").await;
}
