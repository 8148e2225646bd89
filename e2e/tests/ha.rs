//! High availability: two operator replicas with `--leader-elect` on one Lease. Only the leader
//! acts; a standby takes over when the leader is killed or stops gracefully, in the middle of a
//! burst, and every pod still completes, created exactly once at its site. Real control plane,
//! real operator binaries, a simulated site over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use anyhow::ensure;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use offload_e2e::{
    burst::{all_succeeded, burst, slow_site},
    fixtures::{pod_builder, site_builder, wait_site_ready},
    nodes::ZONE_LABEL,
    operator::{Operator, TEST_LABEL},
    scenario::Scenario,
    sitesim::{SimConfig, exactly_once},
    wait,
};
use serde_json::json;

/// Leader election, and node leases renewed well inside the test cluster's 8 s node-monitor grace
/// period (the 10 s default, a kubelet's, suits a production cluster's 50 s).
const HA: &[&str] = &["--leader-elect", "--node-lease-renew-seconds", "2"];
const PODS: usize = 200;

/// Waits until `/readyz` of `op` answers `ok: <role>`; returns how long that took.
async fn wait_role(op: &Operator, role: &str, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let want = format!("ok: {role}");
    wait::until(&format!("/readyz to say {want:?}"), within, || async {
        let (code, body) = op.probe("/readyz").await.map_err(|e| e.to_string())?;
        if code == 200 && body == want {
            Ok(Some(()))
        } else {
            Err(format!("HTTP {code}: {body}"))
        }
    })
    .await?;
    Ok(start.elapsed())
}

/// Waits until the scenario's operator says `ok: <role>`.
async fn wait_scenario_role(s: &Scenario, role: &str) -> anyhow::Result<()> {
    let want = format!("ok: {role}");
    wait::until(
        &format!("the operator to say {want:?}"),
        Duration::from_secs(60),
        || async {
            match s.operator_readyz().await {
                Ok(body) if body == want => Ok(Some(())),
                Ok(body) => Err(body),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// The leader Lease's holder and transitions.
async fn lease(s: &Scenario) -> anyhow::Result<(String, i32)> {
    let leases: Api<Lease> = Api::namespaced(s.t.client.clone(), &s.t.name);
    let spec = leases.get("offload-operator").await?.spec.unwrap_or_default();
    Ok((
        spec.holder_identity.unwrap_or_default(),
        spec.lease_transitions.unwrap_or_default(),
    ))
}

/// The value of an unlabelled metric on `op`'s `/metrics`.
async fn metric(op: &Operator, name: &str) -> anyhow::Result<f64> {
    let text = op.get("/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics"))
}

/// The leader is killed (SIGKILL) in the middle of a burst of 200 pods: the standby takes over
/// once the lease expires, and every pod completes, created exactly once.
#[tokio::test]
async fn a_standby_takes_over_from_a_killed_leader() {
    Scenario::run_with("ha-kill", HA, |s| async move {
        wait_scenario_role(&s, "leader").await?;
        let mut standby = s.replica().await?;
        wait_role(&standby, "standby", Duration::from_secs(10)).await?;
        ensure!(
            metric(&standby, "offload_leader").await? == 0.0,
            "a standby reports offload_leader 1"
        );
        let (first_holder, _) = lease(&s).await?;
        let (sim, site) = slow_site(&s).await?;
        let seen = || sim.stats().creates_per_uid.len();
        let kill = async {
            while seen() < 20 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            s.stop_operator().await;
            (Instant::now(), seen())
        };
        let (made, (killed_at, at_kill)) = tokio::join!(burst(&s, &site, PODS), kill);
        made?;
        ensure!(
            at_kill < PODS,
            "every pod was created before the kill: the takeover would prove nothing"
        );
        wait_role(&standby, "leader", Duration::from_secs(60)).await?;
        let takeover = killed_at.elapsed();
        eprintln!(
            "leader killed with {at_kill}/{PODS} pods at the site; the standby led {:.1}s later",
            takeover.as_secs_f64()
        );
        let (holder, transitions) = lease(&s).await?;
        ensure!(
            holder != first_holder && !holder.is_empty(),
            "the lease still names {holder:?}"
        );
        ensure!(transitions == 1, "{transitions} lease transitions, expected 1");
        all_succeeded(&s, PODS).await?;
        exactly_once(&[sim.stats()], PODS)?;
        ensure!(
            metric(&standby, "offload_leader").await? == 1.0,
            "the new leader reports offload_leader 0"
        );
        ensure!(
            metric(&standby, "offload_leader_transitions_total").await? == 1.0,
            "the new leader counts other than one acquisition"
        );
        // Graceful stop: the lease is released, so the scenario's cleanup operator leads at once.
        ensure!(
            standby.terminate(Duration::from_secs(30)).await,
            "the new leader ignored SIGTERM"
        );
        Ok(())
    })
    .await;
}

/// A rolling upgrade of both replicas during a burst of 200 pods, as a Deployment does it: the
/// standby is replaced, then the leader gets SIGTERM, drains, releases the lease, and the new
/// standby leads within seconds. Every pod completes, created exactly once.
#[tokio::test]
async fn a_rolling_upgrade_hands_over_in_seconds_without_losing_a_pod() {
    Scenario::run_with("ha-roll", HA, |s| async move {
        wait_scenario_role(&s, "leader").await?;
        let mut old_standby = s.replica().await?;
        wait_role(&old_standby, "standby", Duration::from_secs(10)).await?;
        let (sim, site) = slow_site(&s).await?;
        let seen = || sim.stats().creates_per_uid.len();
        let upgrade = async {
            while seen() < 20 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ensure!(
                old_standby.terminate(Duration::from_secs(30)).await,
                "the standby ignored SIGTERM"
            );
            let new = s.replica().await?;
            wait_role(&new, "standby", Duration::from_secs(10)).await?;
            let at = seen();
            let sent = Instant::now();
            s.terminate_operator().await?;
            let drained = sent.elapsed();
            wait_role(&new, "leader", Duration::from_secs(60)).await?;
            let handover = sent.elapsed();
            // The replacement of the old leader: the next standby.
            s.start_operator().await?;
            Ok::<_, anyhow::Error>((new, at, drained, handover))
        };
        let (made, upgraded) = tokio::join!(burst(&s, &site, PODS), upgrade);
        made?;
        let (mut new_leader, at, drained, handover) = upgraded?;
        eprintln!(
            "leader stopped with {at}/{PODS} pods at the site: it exited {:.1}s after SIGTERM, and the new replica led {:.1}s after it",
            drained.as_secs_f64(),
            handover.as_secs_f64()
        );
        ensure!(at < PODS, "every pod was created before the handover: it would prove nothing");
        wait_scenario_role(&s, "standby").await?;
        all_succeeded(&s, PODS).await?;
        exactly_once(&[sim.stats()], PODS)?;
        ensure!(new_leader.terminate(Duration::from_secs(30)).await, "the new leader ignored SIGTERM");
        // Released: the last replica (the scenario's) takes over for the cleanup.
        wait_scenario_role(&s, "leader").await?;
        Ok(())
    })
    .await;
}

/// The operator is down (SIGKILL, no replica) for twice the time after which kube-controller-
/// manager evicts the pods of a silent Node (its node-monitor grace period plus the default
/// toleration): the Node gets NoExecute taints, a plain pod pinned to it without tolerations is
/// evicted (so the outage was long enough), and the 20 running RemoteJob attempts, which carry
/// outage tolerations from their creation (ADR 0009), are neither evicted nor deleted; all complete
/// once the operator is back, each created once at the site.
#[tokio::test]
async fn running_attempts_survive_an_operator_outage_past_the_node_grace_period() {
    use offload_operator::crd::{RemoteJob, remote_job::RemoteJobPhase};
    const JOBS: usize = 20;
    Scenario::run_with(
        "ha-outage",
        &["--node-lease-renew-seconds", "2"],
        |s| async move {
            let cluster = s.t.cluster;
            let evict_after = Duration::from_secs(cluster.node_grace_seconds + cluster.toleration_seconds);
            let outage = evict_after * 2;
            let sim = s
                .sim(SimConfig {
                    simulate: true,
                    slots: 100,
                    ..SimConfig::default()
                })
                .await?;
            // The site's Node and its peers in a zone of their own (see offload_e2e::nodes).
            let zone = json!({"node": {"labels": {ZONE_LABEL: s.t.name}}});
            let site = s.create_site(&site_builder("hpc").merge(zone), &sim.url).await?;
            wait_site_ready(&s.sites, &site).await?;
            let policy = s
                .policy(offload_e2e::fixtures::policy_builder("jobs").sites(&[&site]))
                .await?;
            let peers = offload_e2e::nodes::Peers::start(s.t.client.clone(), &s.t.name);
            let jobs: Api<RemoteJob> = Api::namespaced(s.t.client.clone(), &s.t.name);
            let result = async {
                // Long enough to still run when the operator comes back.
                let runs_for = (outage + Duration::from_secs(30)).as_secs().to_string();
                for i in 0..JOBS {
                    let job: RemoteJob = serde_json::from_value(json!({
                        "apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob",
                        "metadata": {"name": format!("job-{i}"), "namespace": s.t.name,
                            "labels": {TEST_LABEL: s.t.name}},
                        "spec": {"policy": policy, "template": {
                            "metadata": {"annotations": {"sitesim.offload.dev/duration-seconds": runs_for}},
                            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}}}))?;
                    jobs.create(&PostParams::default(), &job).await?;
                }
                let control = pod_builder("no-tolerations").on_node(&site).build()?;
                s.pods.create(&PostParams::default(), &control).await?;
                wait::until("21 running pods", Duration::from_secs(120), || async {
                    let (running, _) = offload_e2e::burst::in_phase(&s.pods, "Running").await?;
                    if running == JOBS + 1 {
                        Ok(Some(()))
                    } else {
                        Err(format!("{running} running"))
                    }
                })
                .await?;
                s.stop_operator().await;
                eprintln!(
                    "operator stopped for {outage:?} (node grace {}s + default toleration {}s, twice)",
                    cluster.node_grace_seconds, cluster.toleration_seconds
                );
                tokio::time::sleep(outage).await;
                let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.t.client.clone());
                let node = nodes.get(&format!("offload-{site}")).await?;
                let taints: Vec<String> = node
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.effect == "NoExecute")
                    .map(|t| t.key)
                    .collect();
                ensure!(
                    !taints.is_empty(),
                    "kube-controller-manager put no NoExecute taint on the silent Node"
                );
                let l = s.pods.list(&ListParams::default()).await?;
                let control = l
                    .items
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some("no-tolerations"));
                ensure!(
                    control.is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
                    "the pod without tolerations was not evicted: the outage proves nothing"
                );
                let evicted: Vec<String> = l
                    .items
                    .iter()
                    .filter(|p| p.metadata.name.as_deref() != Some("no-tolerations"))
                    .filter(|p| p.metadata.deletion_timestamp.is_some())
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                let attempts = l.items.len() - usize::from(control.is_some());
                eprintln!(
                    "after the outage: taints {taints:?}; {attempts} attempt pods, {} being deleted",
                    evicted.len()
                );
                ensure!(
                    attempts == JOBS && evicted.is_empty(),
                    "attempts evicted or gone: {attempts} left, deleting {evicted:?}"
                );
                s.start_operator().await?;
                wait::until("20 succeeded RemoteJobs", Duration::from_secs(180), || async {
                    let l = jobs
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let done = l
                        .items
                        .iter()
                        .filter(|j| {
                            j.status.as_ref().and_then(|s| s.phase) == Some(RemoteJobPhase::Succeeded)
                        })
                        .count();
                    if done == JOBS {
                        Ok(Some(()))
                    } else {
                        Err(format!("{done}/{JOBS} succeeded"))
                    }
                })
                .await?;
                // One create per attempt, and one for the control pod: no retry, no duplicate.
                exactly_once(&[sim.stats()], JOBS + 1)?;
                Ok(())
            }
            .await;
            peers.remove().await;
            result
        },
    )
    .await;
}

/// Every replica down past the pods' toleration with the chart's MutatingAdmissionPolicy in place:
/// a pod naming the offload scheduler, an interLink-style pod (nodeSelector and the interLink
/// toleration, bound by kube-scheduler) and a pod created on a site's Node get untimed outage
/// tolerations from the API server itself (no webhook, no operator), so none is evicted and all
/// complete after the restart; a pod that opts out (`offload.dev/outage-tolerations: "false"`)
/// is evicted, which shows the outage was long enough.
#[tokio::test]
async fn no_opted_in_pod_is_evicted_while_every_replica_is_down() {
    Scenario::run_with(
        "ha-policy",
        &["--node-lease-renew-seconds", "2"],
        |s| async move {
            let cluster = s.t.cluster;
            let evict_after = Duration::from_secs(cluster.node_grace_seconds + cluster.toleration_seconds);
            let outage = evict_after * 2;
            // The chart's policy, bound to this test's namespace only (the cluster is shared with
            // tests that need evictions).
            let policy_file = offload_e2e::helm::apply_template(
                cluster,
                "outage-tolerations",
                &s.t.name,
                &["admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"],
                &[(
                    "outageTolerations.namespaceSelector",
                    json!({"matchLabels": {"kubernetes.io/metadata.name": s.t.name}}),
                )],
            )?;
            let sim = s
                .sim(SimConfig {
                    simulate: true,
                    ..SimConfig::default()
                })
                .await?;
            let zone = json!({"node": {"labels": {ZONE_LABEL: s.t.name}}});
            let site = s.create_site(&site_builder("hpc").merge(zone), &sim.url).await?;
            wait_site_ready(&s.sites, &site).await?;
            let peers = offload_e2e::nodes::Peers::start(s.t.client.clone(), &s.t.name);
            let result = async {
                let runs_for = (outage + Duration::from_secs(30)).as_secs() as u32;
                let interlink_style = pod_builder("interlink")
                    .without_scheduler()
                    .runs_for(runs_for)
                    .merge_spec(json!({
                        "nodeSelector": {"offload.dev/site": site},
                        "tolerations": [
                            {"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "offload.dev/site", "operator": "Exists", "effect": "NoSchedule"}]}));
                let pods = [
                    s.pod("named").runs_for(runs_for),
                    interlink_style,
                    pod_builder("pinned").on_node(&site).runs_for(runs_for),
                    pod_builder("opted-out")
                        .on_node(&site)
                        .annotate("offload.dev/outage-tolerations", "false"),
                ];
                // The policy takes effect once the API server has loaded it: a dry-run shows when.
                wait::until("the outage policy in effect", Duration::from_secs(30), || async {
                    let p = pods[0].build().map_err(|e| e.to_string())?;
                    let dry = s
                        .pods
                        .create(&PostParams { dry_run: true, ..Default::default() }, &p)
                        .await
                        .map_err(|e| e.to_string())?;
                    let untimed = dry.spec.and_then(|s| s.tolerations).unwrap_or_default().iter().any(|t| {
                        t.key.as_deref() == Some("node.kubernetes.io/unreachable") && t.toleration_seconds.is_none()
                    });
                    Ok::<_, String>(untimed.then_some(()))
                })
                .await?;
                for p in &pods {
                    s.pods.create(&PostParams::default(), &p.build()?).await?;
                }
                for name in ["named", "interlink", "pinned", "opted-out"] {
                    s.running(name, Duration::from_secs(90)).await?;
                }
                s.stop_operator().await;
                let stopped = Instant::now();
                let deleting = |l: &kube::core::ObjectList<k8s_openapi::api::core::v1::Pod>, name: &str| {
                    l.items
                        .iter()
                        .find(|p| p.metadata.name.as_deref() == Some(name))
                        .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
                };
                // The control plane evicts the pod with the default tolerations once the Node has
                // been NotReady past them; on a loaded machine that takes longer than the sum of
                // the two, so wait for it rather than for a fixed time (it proves the outage).
                wait::until("the opted-out pod evicted (the outage proves something)", outage * 4, || async {
                    let l = s.pods.list(&ListParams::default()).await?;
                    Ok::<_, kube::Error>(deleting(&l, "opted-out").then_some(()))
                })
                .await?;
                // Then past the defaults again for every other pod.
                tokio::time::sleep(evict_after).await;
                eprintln!(
                    "operator stopped for {:.1}s (eviction of the opted-out pod, then node grace + default toleration)",
                    stopped.elapsed().as_secs_f64()
                );
                let l = s.pods.list(&ListParams::default()).await?;
                for name in ["named", "interlink", "pinned"] {
                    ensure!(!deleting(&l, name), "{name} was evicted");
                }
                s.start_operator().await?;
                for name in ["named", "interlink", "pinned"] {
                    s.phase(name, "Succeeded", Duration::from_secs(120)).await?;
                }
                // Each created once: no retry, no duplicate.
                exactly_once(&[sim.stats()], 4)?;
                Ok(())
            }
            .await;
            peers.remove().await;
            let _ = cluster.kubectl().arg("delete").arg("-f").arg(&policy_file).output();
            result
        },
    )
    .await;
}
