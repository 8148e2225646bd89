//! The site controller against the real control plane, the real operator binary, and simulated
//! sites over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Secret},
    events::v1::Event,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use offload_e2e::nodes::ZONE_LABEL;
use offload_e2e::{
    fixtures::{SiteBuilder, site_builder},
    scenario::Scenario,
    sitesim::{GpuSpec, SimConfig},
    wait,
};
use offload_operator::crd::OffloadSite;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A site as these tests declare it: the builder's defaults (open to every namespace, probed every
/// second, not ready after 2 failures) without a declared capacity (the site reports its own) and
/// with the default status sync interval.
fn site(name: &str) -> SiteBuilder {
    site_builder(name)
        .unset("capacity")
        .unset("statusSyncIntervalSeconds")
}

/// A simulator running every pod as timers.
fn simulated() -> SimConfig {
    SimConfig {
        simulate: true,
        ..SimConfig::default()
    }
}

fn condition<'a>(
    site: &'a OffloadSite,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    site.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// The site once its `Ready` condition is `ready` (within [`TIMEOUT`]).
async fn wait_ready(sites: &Api<OffloadSite>, name: &str, ready: bool) -> anyhow::Result<OffloadSite> {
    let want = if ready { "True" } else { "False" };
    wait::until(&format!("site {name} Ready={want}"), TIMEOUT, || async {
        let s = sites.get(name).await?;
        Ok::<_, kube::Error>(
            condition(&s, "Ready")
                .filter(|c| c.status == want)
                .is_some()
                .then_some(s),
        )
    })
    .await
}

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == key))
}

/// Deletes the sites and waits until they are gone (within [`TIMEOUT`]), while the operator runs
/// (their finalizer needs it).
async fn delete_sites(sites: &Api<OffloadSite>, names: &[&str]) -> anyhow::Result<()> {
    for n in names {
        let _ = sites.delete(n, &DeleteParams::default()).await;
    }
    for n in names {
        wait::until(&format!("site {n} to be gone"), TIMEOUT, || async {
            Ok::<_, kube::Error>(sites.get_opt(n).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn sites_become_ready_with_nodes_capacity_and_leases() {
    Scenario::run("sites-ready", |s| async move {
        let gpu = s
            .sim(SimConfig {
                cpu: Some("64".into()),
                memory: Some("256Gi".into()),
                gpus: vec![GpuSpec {
                    resource_type: "nvidia.com/gpu".into(),
                    model: "A100".into(),
                    count: 8,
                }],
                ..simulated()
            })
            .await?;
        let legacy = s
            .sim(SimConfig {
                legacy_ping: true,
                ..simulated()
            })
            .await?;
        let declared_gpu = json!({"cpu": "32", "memory": "128Gi", "pods": 100,
            "gpus": [{"model": "A100", "count": 4, "memoryPerGpu": "80Gi"}]});
        let declared_cpu = json!({"cpu": "16", "memory": "64Gi", "pods": 50});
        let a = s
            .create_site(&site("gpu").set("capacity", declared_gpu).kind("HPC"), &gpu.url)
            .await?;
        let b = s
            .create_site(
                &site("cpu").set("capacity", declared_cpu).kind("HTC"),
                &legacy.url,
            )
            .await?;

        for name in [&a, &b] {
            let site = wait_ready(&s.sites, name, true).await?;
            let status = site.status.clone().unwrap_or_default();
            ensure!(
                status.node_name.as_deref() == Some(format!("offload-{name}").as_str()),
                "{status:?}"
            );
            ensure!(status.active_pods == Some(0));
        }
        let nodes: Api<Node> = Api::all(s.t.client.clone());
        // The ping's capacity overrides the declared one; a legacy ping leaves it declared.
        let node_a = nodes.get(&format!("offload-{a}")).await?;
        let cap = node_a
            .status
            .as_ref()
            .and_then(|s| s.capacity.clone())
            .context("capacity")?;
        ensure!(
            cap["cpu"].0 == "64" && cap["memory"].0 == "256Gi",
            "pinged capacity: {cap:?}"
        );
        ensure!(cap["nvidia.com/gpu"].0 == "8", "pinged GPUs: {cap:?}");
        let labels = node_a.metadata.labels.clone().unwrap_or_default();
        ensure!(labels.get("offload.dev/site") == Some(&a), "{labels:?}");
        ensure!(labels.get("nvidia-gpu-type").map(String::as_str) == Some("A100"));
        ensure!(
            has_taint(&node_a, "offload.dev/site")
                && has_taint(&node_a, "virtual-node.interlink/no-schedule")
        );
        ensure!(!has_taint(&node_a, "offload.dev/unreachable"));
        let node_b = nodes.get(&format!("offload-{b}")).await?;
        let cap = node_b
            .status
            .as_ref()
            .and_then(|s| s.capacity.clone())
            .context("capacity")?;
        ensure!(
            cap["cpu"].0 == "16" && cap["pods"].0 == "50",
            "declared capacity: {cap:?}"
        );
        ensure!(!cap.contains_key("nvidia.com/gpu"));

        // Leases are renewed, so the node lifecycle controller keeps the nodes Ready.
        let leases: Api<Lease> = Api::namespaced(s.t.client.clone(), "kube-node-lease");
        let first = leases.get(&format!("offload-{a}")).await?;
        let t0 = first.spec.and_then(|s| s.renew_time).context("renewTime")?;
        let renewed = wait::until("a lease renewal", Duration::from_secs(30), || async {
            let l = leases.get(&format!("offload-{a}")).await?;
            let t1 = l.spec.and_then(|s| s.renew_time);
            Ok::<_, kube::Error>(t1.filter(|t1| t1.0 > t0.0))
        })
        .await?;
        ensure!(renewed.0 > t0.0);
        let node_a = nodes.get(&format!("offload-{a}")).await?;
        let ready = node_a.status.and_then(|s| s.conditions).unwrap_or_default();
        ensure!(
            ready.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
            "{ready:?}"
        );

        // Cordoning the site cordons its node; uncordoning undoes it.
        let cordon = |on: bool| json!({"spec": {"cordoned": on}});
        for on in [true, false] {
            s.sites
                .patch(&a, &PatchParams::default(), &Patch::Merge(&cordon(on)))
                .await?;
            wait::until(&format!("node unschedulable={on}"), TIMEOUT, || async {
                let n = nodes.get(&format!("offload-{a}")).await?;
                let u = n.spec.and_then(|s| s.unschedulable).unwrap_or(false);
                Ok::<_, kube::Error>((u == on).then_some(()))
            })
            .await?;
        }

        // Metrics and Events.
        let metrics = s.operator_get("/metrics").await?;
        ensure!(
            metrics.contains(&format!("offload_site_up{{site=\"{a}\"}} 1")),
            "{metrics}"
        );
        ensure!(
            metrics.contains("offload_site_probe_latency_seconds_bucket"),
            "{metrics}"
        );
        let events: Api<Event> = Api::all(s.t.client.clone());
        let list = events
            .list(&ListParams::default().fields(&format!("regarding.name={a}")))
            .await?;
        ensure!(
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("SiteReady")),
            "{:?}",
            list.items
        );

        // Deleting a site removes its node and lease.
        delete_sites(&s.sites, &[&a, &b]).await?;
        for name in [&a, &b] {
            wait::until("the node to be deleted", TIMEOUT, || async {
                Ok::<_, kube::Error>(
                    nodes
                        .get_opt(&format!("offload-{name}"))
                        .await?
                        .is_none()
                        .then_some(()),
                )
            })
            .await?;
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn unreachable_site_is_tainted_never_evicted_and_recovers() {
    Scenario::run("sites-outage", |s| async move {
        let sim = s.sim(simulated()).await?;
        let name = s.create_site(&site("flaky"), &sim.url).await?;
        wait_ready(&s.sites, &name, true).await?;
        let nodes: Api<Node> = Api::all(s.t.client.clone());
        let node = format!("offload-{name}");
        sim.go_down(Duration::from_secs(15));
        let start = std::time::Instant::now();
        let down = wait_ready(&s.sites, &name, false).await?;
        let took = start.elapsed();
        // threshold (2) x interval (1 s), plus the 1 s probe timeout and a margin.
        ensure!(took < Duration::from_secs(10), "took {took:?} to notice");
        let reason = condition(&down, "Ready")
            .map(|c| c.reason.clone())
            .unwrap_or_default();
        ensure!(reason == "ConnectionFailed", "reason {reason}");
        let n = wait::until("the unreachable taint", TIMEOUT, || async {
            let n = nodes.get(&node).await?;
            Ok::<_, kube::Error>(has_taint(&n, "offload.dev/unreachable").then_some(n))
        })
        .await?;
        let conditions = n.status.and_then(|s| s.conditions).unwrap_or_default();
        ensure!(
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "the node stays Ready (no eviction): {conditions:?}"
        );
        ensure!(
            conditions
                .iter()
                .any(|c| c.type_ == "OffloadSiteReachable" && c.status == "False")
        );
        wait_ready(&s.sites, &name, true).await?;
        wait::until("the taint to go", TIMEOUT, || async {
            let n = nodes.get(&node).await?;
            Ok::<_, kube::Error>((!has_taint(&n, "offload.dev/unreachable")).then_some(()))
        })
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn missing_token_secret_is_reported_then_fixed() {
    Scenario::run("sites-secret", |s| async move {
        let sim = s
            .sim(SimConfig {
                token: Some("sesame".into()),
                ..simulated()
            })
            .await?;
        let auth = json!({"bearerToken": {"name": "site-token", "key": "token"}});
        // Not Ready at first: the Secret is missing.
        let name = s
            .create_site(&site("secured").set("auth", auth), &sim.url)
            .await?;
        let reported = wait::until("CredentialsReady=False", TIMEOUT, || async {
            let site = s.sites.get(&name).await?;
            Ok::<_, kube::Error>(
                condition(&site, "CredentialsReady")
                    .filter(|c| c.status == "False")
                    .cloned(),
            )
        })
        .await?;
        ensure!(reported.reason == "SecretNotFound", "{reported:?}");
        ensure!(reported.message.contains("site-token"), "{reported:?}");
        let events: Api<Event> = Api::all(s.t.client.clone());
        wait::until("a CredentialsMissing Event", TIMEOUT, || async {
            let list = events
                .list(&ListParams::default().fields(&format!("regarding.name={name}")))
                .await?;
            Ok::<_, kube::Error>(
                list.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("CredentialsMissing"))
                    .then_some(()),
            )
        })
        .await?;
        ensure!(sim.stats().pings == 0, "no request without credentials");
        let secrets: Api<Secret> = Api::namespaced(s.t.client.clone(), &s.t.name);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "site-token"}, "stringData": {"token": "sesame\n"}
        }))?;
        secrets.create(&PostParams::default(), &secret).await?;
        let ready = wait_ready(&s.sites, &name, true).await?;
        let creds = condition(&ready, "CredentialsReady").map(|c| c.status.clone());
        ensure!(creds.as_deref() == Some("True"));
        ensure!(sim.stats().unauthorized == 0, "the trimmed token was accepted");
        let logs = s.operator_log().await;
        ensure!(!logs.contains("sesame"), "the token must never be logged");
        Ok(())
    })
    .await;
}

/// An unreachable site never gets its pods evicted: the operator keeps the Node's Lease fresh, so
/// kube-controller-manager keeps the Node Ready for twice its eviction timeout and longer. The same
/// test then kills the operator and sees kube-controller-manager evict the pod, which proves the
/// short timeouts of the test cluster are in force (so the first half could have failed).
#[tokio::test]
async fn pods_of_an_unreachable_site_are_not_evicted() {
    Scenario::run_with(
        "sites-no-eviction",
        &["--node-lease-renew-seconds", "2"],
        |s| async move {
            let sim = s.sim(simulated()).await?;
            // The site's Node and its peers in a zone of their own (see offload_e2e::nodes).
            let zone = json!({"node": {"labels": {ZONE_LABEL: s.t.name}}});
            let name = s.create_site(&site("hpc").merge(zone), &sim.url).await?;
            let node = format!("offload-{name}");
            let evict_after =
                Duration::from_secs(s.t.cluster.node_grace_seconds + s.t.cluster.toleration_seconds);
            // kube-controller-manager stops evicting when every node of a zone is unhealthy (it
            // assumes a partition), so two healthy peer nodes keep the zone "normal" and eviction
            // possible.
            let peers = offload_e2e::nodes::Peers::start(s.t.client.clone(), &s.t.name);
            let result = async {
                wait_ready(&s.sites, &name, true).await?;
                let pod = serde_json::from_value(json!({
                    "metadata": {"name": "long-job"},
                    "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]}
                }))?;
                s.pods.create(&PostParams::default(), &pod).await?;
                sim.go_down(Duration::from_secs(600));
                wait_ready(&s.sites, &name, false).await?;
                tokio::time::sleep(evict_after * 2).await;
                let p = s.pods.get("long-job").await?;
                ensure!(
                    p.metadata.deletion_timestamp.is_none(),
                    "evicted after {:?}",
                    evict_after * 2
                );
                let nodes: Api<Node> = Api::all(s.t.client.clone());
                let n = nodes.get(&node).await?;
                let taints = n.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
                ensure!(
                    taints.iter().all(|t| t.effect != "NoExecute"),
                    "no NoExecute taint: {taints:?}"
                );

                // Negative control: without the operator the lease expires and the pod is evicted.
                s.stop_operator().await;
                wait::until(
                    "eviction once nobody renews the lease",
                    evict_after * 3,
                    || async {
                        let p = s.pods.get_opt("long-job").await?;
                        Ok::<_, kube::Error>(
                            p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
                                .then_some(()),
                        )
                    },
                )
                .await?;
                Ok(())
            }
            .await;
            // A fresh operator finishes the cleanup (the site's finalizer needs one); the pod's
            // deletion is completed by hand, as the site stays down and cannot confirm it.
            s.start_operator().await?;
            let _ = s
                .pods
                .delete("long-job", &DeleteParams::default().grace_period(0))
                .await;
            delete_sites(&s.sites, &[&name]).await?;
            peers.remove().await;
            result
        },
    )
    .await;
}

/// Deleting a site with a running pod on it (ADR 0002): the pod is deleted first, which cancels
/// its job at the site, then the site's Node goes; no remote job is left behind.
#[tokio::test]
async fn deleting_a_site_drains_its_pods_then_removes_its_node() {
    Scenario::run("sites-delete", |s| async move {
        let sim = s.sim(simulated()).await?;
        let name = s.create_site(&site("old"), &sim.url).await?;
        let node = format!("offload-{name}");
        wait_ready(&s.sites, &name, true).await?;
        let pod = serde_json::from_value(json!({
            "metadata": {"name": "still-running", "annotations": {"sitesim.offload.dev/simulate": "true",
                "sitesim.offload.dev/duration-seconds": "600"}},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]}
        }))?;
        s.pods.create(&PostParams::default(), &pod).await?;
        // The job runs at the site.
        s.running("still-running", TIMEOUT).await?;
        ensure!(sim.pod_count() == 1);
        s.sites.delete(&name, &DeleteParams::default()).await?;
        wait::until("the site to be gone", TIMEOUT, || async {
            Ok::<_, kube::Error>(s.sites.get_opt(&name).await?.is_none().then_some(()))
        })
        .await?;
        ensure!(
            s.pods.get_opt("still-running").await?.is_none(),
            "the pod was deleted first"
        );
        ensure!(
            sim.pod_count() == 0 && sim.stats().deletes >= 1,
            "the remote job was cancelled: {:?}",
            sim.stats()
        );
        let nodes: Api<Node> = Api::all(s.t.client.clone());
        ensure!(
            nodes.get_opt(&node).await?.is_none(),
            "the node is removed with the site"
        );
        let events: Api<Event> = Api::all(s.t.client.clone());
        let list = events
            .list(&ListParams::default().fields(&format!("regarding.name={name}")))
            .await?;
        ensure!(
            list.items.iter().any(|e| e.reason.as_deref() == Some("Draining")),
            "a Draining Event"
        );
        Ok(())
    })
    .await;
}
