//! The offload scheduler on the real control plane with the real operator binary and three
//! simulated sites shaped like `examples/`: a GPU HPC site with a long queue, a CPU HTC site, and a
//! costly cloud site with short queues.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    events::v1::Event,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    operator::{Operator, TEST_LABEL},
    sitesim::{SimConfig, SimHandle},
    wait,
};
use offload_operator::crd::{OffloadPolicy, OffloadSite};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

async fn sim() -> SimHandle {
    SimHandle::start(SimConfig {
        simulate: true,
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

fn site(ns: &str, name: &str, endpoint: &str, spec: Value) -> anyhow::Result<OffloadSite> {
    let mut full = json!({"endpoint": endpoint, "namespaceSelector": {},
        "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}});
    full.as_object_mut()
        .context("object")?
        .extend(spec.as_object().cloned().unwrap_or_default());
    Ok(serde_json::from_value(json!({
        "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
        "metadata": {"name": name, "labels": {TEST_LABEL: ns}}, "spec": full
    }))?)
}

fn policy(ns: &str, name: &str, spec: Value) -> anyhow::Result<OffloadPolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy",
        "metadata": {"name": name, "labels": {TEST_LABEL: ns}}, "spec": spec
    }))?)
}

fn pod(name: &str, policy: &str, cpu: &str, gpus: u32) -> anyhow::Result<Pod> {
    let mut requests = json!({"cpu": cpu, "memory": "1Gi"});
    if gpus > 0 {
        requests["nvidia.com/gpu"] = gpus.to_string().into();
    }
    let limits = if gpus > 0 {
        json!({"nvidia.com/gpu": gpus.to_string()})
    } else {
        json!({})
    };
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"offload.dev/policy": policy}},
        "spec": {"schedulerName": "offload-scheduler", "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": "busybox", "resources": {"requests": requests, "limits": limits}}]}
    }))?)
}

async fn node_of(pods: &Api<Pod>, name: &str) -> anyhow::Result<String> {
    wait::until(&format!("pod {name} to be bound"), TIMEOUT, || async {
        let p = pods.get(name).await?;
        Ok::<_, kube::Error>(p.spec.and_then(|s| s.node_name))
    })
    .await
}

#[tokio::test]
async fn pods_go_to_the_best_site_and_explain_why() {
    TestNamespace::run("placement", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let (hpc_sim, htc_sim, cloud_sim) = (sim().await, sim().await, sim().await);
        let (hpc, htc, cloud) = (format!("{}-hpc", t.name), format!("{}-htc", t.name), format!("{}-cloud", t.name));
        let (gpu_pol, cheap_pol) = (format!("{}-gpu-training", t.name), format!("{}-cheap-batch", t.name));
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        let pp = PostParams::default();
        // Tenancy: the HPC site only takes namespaces labelled hpc-allowed=true.
        let namespaces: Api<Namespace> = Api::all(t.client.clone());
        let gpu_site = |queue: i64, cost: i64| json!({"kind": "HPC", "typicalQueueWaitSeconds": queue, "relativeCost": cost,
            "capacity": {"cpu": "256", "memory": "1Ti", "pods": 100, "gpus": [{"model": "A100", "count": 8, "memoryPerGpu": "80Gi"}]}});
        let mut hpc_spec = gpu_site(3600, 40);
        hpc_spec["namespaceSelector"] = json!({"matchLabels": {"hpc-allowed": "true"}});
        sites.create(&pp, &site(&t.name, &hpc, &hpc_sim.url, hpc_spec)?).await?;
        sites.create(&pp, &site(&t.name, &htc, &htc_sim.url, json!({"kind": "HTC", "typicalQueueWaitSeconds": 600,
            "relativeCost": 10, "maxConcurrentPods": 3, "capacity": {"cpu": "1000", "memory": "4Ti", "pods": 1000}}))?).await?;
        let mut cloud_spec = gpu_site(30, 300);
        cloud_spec["kind"] = "Cloud".into();
        sites.create(&pp, &site(&t.name, &cloud, &cloud_sim.url, cloud_spec)?).await?;
        policies.create(&pp, &policy(&t.name, &gpu_pol, json!({"priority": 100,
            "requirements": {"gpuModels": ["A100", "H100"], "minGpuMemory": "40Gi"},
            "weights": {"queueTime": 60, "cost": 10, "freeCapacity": 10, "gpuFit": 20}}))?).await?;
        policies.create(&pp, &policy(&t.name, &cheap_pol, json!({"priority": 10,
            "weights": {"queueTime": 0, "cost": 90, "freeCapacity": 10, "gpuFit": 0}}))?).await?;
        t.default_service_account().await?;

        let result = async {
            for name in [&hpc, &htc, &cloud] {
                wait::until(&format!("{name} Ready"), TIMEOUT, || async {
                    let s = sites.get(name).await?;
                    let ready = s.status.map(|st| st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                    Ok::<_, kube::Error>(ready.unwrap_or(false).then_some(()))
                })
                .await?;
            }
            // Policy status: ready, with its eligible sites.
            let p = wait::until("policy status", TIMEOUT, || async {
                let p = policies.get(&cheap_pol).await?;
                Ok::<_, kube::Error>(p.status.filter(|s| s.eligible_sites.len() == 3))
            })
            .await?;
            ensure!(p.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            // The GPU policy lists only the sites with an allowed GPU model (not the HTC site).
            let mut want = vec![cloud.clone(), hpc.clone()];
            want.sort();
            wait::until("the GPU policy's eligible sites", TIMEOUT, || async {
                let p = policies.get(&gpu_pol).await.map_err(|e| e.to_string())?;
                let got = p.status.map(|s| s.eligible_sites).unwrap_or_default();
                if got == want { Ok(Some(())) } else { Err(format!("{got:?}")) }
            })
            .await?;

            // 1. Not allowed on HPC (namespace unlabelled), the GPU pod goes to the cloud site.
            pods.create(&pp, &pod("gpu-1", &gpu_pol, "2", 1)?).await?;
            ensure!(node_of(&pods, "gpu-1").await? == format!("offload-{cloud}"));
            let placed = pods.get("gpu-1").await?;
            let explanation: Value = serde_json::from_str(placed.annotations().get("offload.dev/placement").context("explanation")?)?;
            ensure!(explanation["chosen"] == cloud.as_str(), "{explanation}");
            // Every failing filter of each rejected site, in order.
            ensure!(explanation["rejected"][&hpc][0]["reason"] == "namespaceNotAllowed", "{explanation}");
            ensure!(explanation["rejected"][&htc][0]["reason"] == "noAllowedGpuModel", "{explanation}");

            // 2. Allowed on HPC now; with its long queue the GPU policy still prefers the cloud...
            let label = json!({"metadata": {"labels": {"hpc-allowed": "true"}}});
            namespaces.patch(&t.name, &PatchParams::default(), &Patch::Merge(&label)).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pods.create(&pp, &pod("gpu-2", &gpu_pol, "2", 1)?).await?;
            ensure!(node_of(&pods, "gpu-2").await? == format!("offload-{cloud}"));
            // ...until the HPC queue drops: then the HPC site wins.
            // Declared 0 s: below the cloud site's blend of its declared 30 s and observed waits, which
            // is at least 7.5 s whatever the pods there took to start (a 10 s value raced it).
            let shorter = json!({"spec": {"typicalQueueWaitSeconds": 0}});
            sites.patch(&hpc, &PatchParams::default(), &Patch::Merge(&shorter)).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pods.create(&pp, &pod("gpu-3", &gpu_pol, "2", 1)?).await?;
            let node = node_of(&pods, "gpu-3").await?;
            let why = pods.get("gpu-3").await?.annotations().get("offload.dev/placement").cloned().unwrap_or_default();
            ensure!(node == format!("offload-{hpc}"), "gpu-3 on {node}: {why}");

            // 3. CPU work under the cheap policy goes to the cheapest site; a burst beyond its
            //    concurrency limit (3) spills over instead of over-committing it.
            for i in 0..5 {
                pods.create(&pp, &pod(&format!("batch-{i}"), &cheap_pol, "1", 0)?).await?;
            }
            let mut on_htc = 0;
            for i in 0..5 {
                if node_of(&pods, &format!("batch-{i}")).await? == format!("offload-{htc}") {
                    on_htc += 1;
                }
            }
            ensure!(on_htc == 3, "{on_htc} of 5 on the HTC site (limit 3)");

            // 4. Nothing has 16 GPUs: Pending with every site's reason, and an Event.
            pods.create(&pp, &pod("too-big", &gpu_pol, "1", 16)?).await?;
            let cond = wait::until("PodScheduled=False", TIMEOUT, || async {
                let p = pods.get("too-big").await?;
                Ok::<_, kube::Error>(p.status.and_then(|s| s.conditions).and_then(|cs| cs.into_iter().find(|c| c.type_ == "PodScheduled")))
            })
            .await?;
            ensure!(cond.status == "False" && cond.reason.as_deref() == Some("Unschedulable"), "{cond:?}");
            let msg = cond.message.unwrap_or_default();
            for s in [&hpc, &htc, &cloud] {
                ensure!(msg.contains(s.as_str()), "{s} missing from: {msg}");
            }
            ensure!(msg.contains("insufficient nvidia.com/gpu"), "{msg}");
            let events: Api<Event> = Api::namespaced(t.client.clone(), &t.name);
            wait::until("a FailedScheduling Event", TIMEOUT, || async {
                let l = events.list(&ListParams::default().fields("regarding.name=too-big")).await?;
                Ok::<_, kube::Error>(l.items.iter().any(|e| e.reason.as_deref() == Some("FailedScheduling")).then_some(()))
            })
            .await?;

            // `offload-operator explain` shows the same reasons without binding anything.
            let bin = offload_e2e::cluster::workspace_binary("offload-operator")?;
            let selector = format!("{TEST_LABEL}={}", t.name);
            let out = tokio::process::Command::new(&bin)
                .args(["explain", "--pod", &format!("{}/too-big", t.name), "--site-selector", &selector, "--kubeconfig"])
                .arg(&t.cluster.admin_kubeconfig)
                .output()
                .await?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            ensure!(out.status.success(), "explain failed: {}", String::from_utf8_lossy(&out.stderr));
            ensure!(text.contains("chosen: none") && text.contains("insufficient nvidia.com/gpu"), "{text}");
            let manifest = t.cluster.dir.join(format!("explain-{}.yaml", t.name));
            let mut what_if = pod("what-if", &gpu_pol, "1", 1)?;
            what_if.metadata.namespace = Some(t.name.clone());
            std::fs::write(&manifest, serde_json::to_string(&what_if)?)?;
            let out = tokio::process::Command::new(&bin)
                .args(["explain", "--json", "--site-selector", &selector, "-f"])
                .arg(&manifest)
                .arg("--kubeconfig")
                .arg(&t.cluster.admin_kubeconfig)
                .output()
                .await?;
            let decision: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
            ensure!(decision["chosen"] == hpc.as_str(), "{decision}");
            ensure!(pods.get_opt("what-if").await?.is_none(), "explain creates nothing");

            // 5. A cordoned site receives nothing.
            let cordon = json!({"spec": {"cordoned": true}});
            sites.patch(&htc, &PatchParams::default(), &Patch::Merge(&cordon)).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pods.create(&pp, &pod("after-cordon", &cheap_pol, "1", 0)?).await?;
            let node = node_of(&pods, "after-cordon").await?;
            ensure!(node != format!("offload-{htc}"), "placed on the cordoned site");

            // 6. A not-ready site receives nothing.
            cloud_sim.go_down(Duration::from_secs(600));
            wait::until("cloud not ready", TIMEOUT, || async {
                let s = sites.get(&cloud).await?;
                Ok::<_, kube::Error>(s.status.filter(|st| st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "False")).map(|_| ()))
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pods.create(&pp, &pod("after-outage", &cheap_pol, "1", 0)?).await?;
            let node = node_of(&pods, "after-outage").await?;
            ensure!(node == format!("offload-{hpc}"), "only the HPC site is left: {node}");
            Ok(())
        }
        .await;
        // Cleanup while the operator runs: pods (no execution controller yet: force), then sites.
        for p in pods.list(&ListParams::default()).await?.items {
            let _ = pods.delete(&p.name_any(), &DeleteParams::default().grace_period(0)).await;
        }
        for p in [&gpu_pol, &cheap_pol] {
            let _ = policies.delete(p, &DeleteParams::default()).await;
        }
        for s in [&hpc, &htc, &cloud] {
            let _ = sites.delete(s, &DeleteParams::default()).await;
        }
        for s in [&hpc, &htc, &cloud] {
            wait::until("site gone", TIMEOUT, || async { Ok::<_, kube::Error>(sites.get_opt(s).await?.is_none().then_some(())) }).await?;
        }
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))
    })
    .await;
}

/// The site's condition `type` once it has status `want`; its reason.
async fn condition(sites: &Api<OffloadSite>, name: &str, type_: &str, want: &str) -> anyhow::Result<String> {
    wait::until(&format!("{name} {type_}={want}"), TIMEOUT, || async {
        let s = sites.get(name).await?;
        let c = s
            .status
            .into_iter()
            .flat_map(|st| st.conditions)
            .find(|c| c.type_ == type_ && c.status == want);
        Ok::<_, kube::Error>(c.map(|c| c.reason))
    })
    .await
}

/// A site that accepts pods and never starts them (a black hole) stops receiving new pods once a
/// pod has waited there past its `podStartTimeoutSeconds`, and says why on its OffloadSite; when
/// its pods start again it takes pods again.
#[tokio::test]
async fn a_black_hole_site_stops_receiving_pods_and_says_why() {
    TestNamespace::run("black-hole", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let hole_sim = SimHandle::start(SimConfig {
            simulate: true,
            queue_delay: Duration::from_secs(3600),
            ..SimConfig::default()
        })
        .await?;
        let good_sim = sim().await;
        let (hole, good) = (format!("{}-hole", t.name), format!("{}-good", t.name));
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        let pp = PostParams::default();
        // The hole is the cheaper site, and the policy weighs cost alone: only the black-hole
        // rule can move pods away from it.
        sites
            .create(
                &pp,
                &site(
                    &t.name,
                    &hole,
                    &hole_sim.url,
                    json!({"relativeCost": 1, "podStartTimeoutSeconds": 8}),
                )?,
            )
            .await?;
        sites
            .create(
                &pp,
                &site(&t.name, &good, &good_sim.url, json!({"relativeCost": 100}))?,
            )
            .await?;
        let weights = json!({"queueTime": 0, "cost": 100, "freeCapacity": 0, "gpuFit": 0});
        policies
            .create(
                &pp,
                &policy(
                    &t.name,
                    &t.name,
                    json!({"sites": [&hole, &good], "weights": weights}),
                )?,
            )
            .await?;
        t.default_service_account().await?;
        let result = async {
            condition(&sites, &hole, "Ready", "True").await?;
            condition(&sites, &good, "Ready", "True").await?;
            pods.create(&pp, &pod("first", &t.name, "1", 0)?).await?;
            ensure!(
                node_of(&pods, "first").await? == format!("offload-{hole}"),
                "the cheap site first"
            );
            let reason = condition(&sites, &hole, "PodsStarting", "False").await?;
            ensure!(reason == "PodsNotStarting", "{reason}");
            let first = pods.get("first").await?;
            let phase = first.status.as_ref().and_then(|s| s.phase.clone());
            ensure!(
                phase.as_deref() == Some("Pending"),
                "the first pod still waits there: {phase:?}"
            );

            pods.create(&pp, &pod("second", &t.name, "1", 0)?).await?;
            ensure!(
                node_of(&pods, "second").await? == format!("offload-{good}"),
                "no new pods for the black hole"
            );
            let second = pods.get("second").await?;
            let explanation: Value = serde_json::from_str(
                second
                    .annotations()
                    .get("offload.dev/placement")
                    .context("explanation")?,
            )?;
            ensure!(
                explanation["rejected"][&hole][0]["reason"] == "podsNotStarting",
                "{explanation}"
            );
            let hole_site = sites.get(&hole).await?;
            let message = hole_site
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .find(|c| c.type_ == "PodsStarting")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            ensure!(message.contains("podStartTimeoutSeconds"), "{message}");

            // The site starts pods again, and the stuck one goes: it is a candidate again.
            hole_sim.set_queue_delay(Duration::ZERO);
            pods.delete("first", &DeleteParams::default()).await?;
            condition(&sites, &hole, "PodsStarting", "True").await?;
            pods.create(&pp, &pod("third", &t.name, "1", 0)?).await?;
            ensure!(
                node_of(&pods, "third").await? == format!("offload-{hole}"),
                "the cheap site again"
            );
            Ok(())
        }
        .await;
        let cleanup = offload_e2e::fixtures::delete_sites(&t, &sites, &[&hole, &good]).await;
        let _ = policies.delete(&t.name, &DeleteParams::default()).await;
        result.map_err(|e: anyhow::Error| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))?;
        cleanup
    })
    .await;
}
