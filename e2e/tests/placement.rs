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
    fixtures::{PodBuilder, SiteBuilder, pod_builder, policy_builder, site_builder},
    operator::TEST_LABEL,
    scenario::Scenario,
    wait,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A GPU site with 8 A100 (80Gi each).
fn gpu_site(name: &str, kind: &str, queue: u32, cost: f64) -> SiteBuilder {
    site_builder(name)
        .kind(kind)
        .queue(queue)
        .cost(cost)
        .set("capacity", json!({"cpu": "256", "memory": "1Ti", "pods": 100}))
        .gpus("A100", 8, "80Gi")
}

/// A pod under `policy` asking for `cpu` and `gpus`.
fn pod(name: &str, policy: &str, cpu: &str, gpus: u32) -> PodBuilder {
    let p = pod_builder(name).policy(policy).cpu(cpu);
    if gpus > 0 { p.gpus(gpus) } else { p }
}

#[tokio::test]
async fn pods_go_to_the_best_site_and_explain_why() {
    Scenario::run("placement", |s| async move {
        let t = &s.t;
        let (pods, sites, policies) = (&s.pods, &s.sites, &s.policies);
        let pp = PostParams::default();
        // Tenancy: the HPC site only takes namespaces labelled hpc-allowed=true.
        s.site(gpu_site("hpc", "HPC", 3600, 40.0).tenants(&[("hpc-allowed", "true")]))
            .await?;
        s.site(
            site_builder("htc")
                .kind("HTC")
                .queue(600)
                .cost(10.0)
                .slots(3)
                .set("capacity", json!({"cpu": "1000", "memory": "4Ti", "pods": 1000})),
        )
        .await?;
        let cloud_sim = s.site(gpu_site("cloud", "Cloud", 30, 300.0)).await?;
        let (hpc, htc, cloud) = (s.name("hpc"), s.name("htc"), s.name("cloud"));
        let gpu_pol = s
            .policy(
                policy_builder("gpu-training")
                    .priority(100)
                    .gpu_models(&["A100", "H100"])
                    .min_gpu_memory("40Gi")
                    .weights(60, 10, 10, 20),
            )
            .await?;
        let cheap_pol = s
            .policy(policy_builder("cheap-batch").priority(10).weights(0, 90, 10, 0))
            .await?;

        // Policy status: ready, with its eligible sites.
        let p = wait::until("policy status", TIMEOUT, || async {
            let p = policies.get(&cheap_pol).await?;
            Ok::<_, kube::Error>(p.status.filter(|s| s.eligible_sites.len() == 3))
        })
        .await?;
        ensure!(
            p.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
        // The GPU policy lists only the sites with an allowed GPU model (not the HTC site).
        let mut want = vec![cloud.clone(), hpc.clone()];
        want.sort();
        wait::until("the GPU policy's eligible sites", TIMEOUT, || async {
            let p = policies.get(&gpu_pol).await.map_err(|e| e.to_string())?;
            let got = p.status.map(|s| s.eligible_sites).unwrap_or_default();
            if got == want {
                Ok(Some(()))
            } else {
                Err(format!("{got:?}"))
            }
        })
        .await?;

        // 1. Not allowed on HPC (namespace unlabelled), the GPU pod goes to the cloud site.
        ensure!(s.place(pod("gpu-1", &gpu_pol, "2", 1)).await? == "cloud");
        let placed = pods.get("gpu-1").await?;
        let explanation: Value = serde_json::from_str(
            placed
                .annotations()
                .get("offload.dev/placement")
                .context("explanation")?,
        )?;
        ensure!(explanation["chosen"] == cloud.as_str(), "{explanation}");
        // Every failing filter of each rejected site, in order.
        ensure!(
            explanation["rejected"][&hpc][0]["reason"] == "namespaceNotAllowed",
            "{explanation}"
        );
        ensure!(
            explanation["rejected"][&htc][0]["reason"] == "noAllowedGpuModel",
            "{explanation}"
        );

        // 2. Allowed on HPC now; with its long queue the GPU policy still prefers the cloud...
        let namespaces: Api<Namespace> = Api::all(t.client.clone());
        let label = json!({"metadata": {"labels": {"hpc-allowed": "true"}}});
        namespaces
            .patch(&t.name, &PatchParams::default(), &Patch::Merge(&label))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(s.place(pod("gpu-2", &gpu_pol, "2", 1)).await? == "cloud");
        // ...until the HPC queue drops: then the HPC site wins.
        // Declared 0 s: below the cloud site's blend of its declared 30 s and observed waits, which
        // is at least 7.5 s whatever the pods there took to start (a 10 s value raced it).
        let shorter = json!({"spec": {"typicalQueueWaitSeconds": 0}});
        sites
            .patch(&hpc, &PatchParams::default(), &Patch::Merge(&shorter))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let site = s.place(pod("gpu-3", &gpu_pol, "2", 1)).await?;
        let why = pods
            .get("gpu-3")
            .await?
            .annotations()
            .get("offload.dev/placement")
            .cloned()
            .unwrap_or_default();
        ensure!(site == "hpc", "gpu-3 on {site}: {why}");

        // 3. CPU work under the cheap policy goes to the cheapest site; a burst beyond its
        //    concurrency limit (3) spills over instead of over-committing it.
        for i in 0..5 {
            pods.create(&pp, &pod(&format!("batch-{i}"), &cheap_pol, "1", 0).build()?)
                .await?;
        }
        let mut on_htc = 0;
        for i in 0..5 {
            if s.site_of(&format!("batch-{i}")).await? == "htc" {
                on_htc += 1;
            }
        }
        ensure!(on_htc == 3, "{on_htc} of 5 on the HTC site (limit 3)");

        // 4. Nothing has 16 GPUs: Pending with every site's reason, and an Event.
        pods.create(&pp, &pod("too-big", &gpu_pol, "1", 16).build()?)
            .await?;
        let cond = wait::until("PodScheduled=False", TIMEOUT, || async {
            let p = pods.get("too-big").await?;
            Ok::<_, kube::Error>(
                p.status
                    .and_then(|s| s.conditions)
                    .and_then(|cs| cs.into_iter().find(|c| c.type_ == "PodScheduled")),
            )
        })
        .await?;
        ensure!(
            cond.status == "False" && cond.reason.as_deref() == Some("Unschedulable"),
            "{cond:?}"
        );
        let msg = cond.message.unwrap_or_default();
        for site in [&hpc, &htc, &cloud] {
            ensure!(msg.contains(site.as_str()), "{site} missing from: {msg}");
        }
        ensure!(msg.contains("insufficient nvidia.com/gpu"), "{msg}");
        let events: Api<Event> = Api::namespaced(t.client.clone(), &t.name);
        wait::until("a FailedScheduling Event", TIMEOUT, || async {
            let l = events
                .list(&ListParams::default().fields("regarding.name=too-big"))
                .await?;
            Ok::<_, kube::Error>(
                l.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("FailedScheduling"))
                    .then_some(()),
            )
        })
        .await?;

        // `offload-operator explain` shows the same reasons without binding anything.
        let text = s.explain("too-big").await?;
        ensure!(
            text.contains("chosen: none") && text.contains("insufficient nvidia.com/gpu"),
            "{text}"
        );
        let bin = offload_e2e::cluster::workspace_binary("offload-operator")?;
        let selector = format!("{TEST_LABEL}={}", t.name);
        let manifest = t.cluster.dir.join(format!("explain-{}.yaml", t.name));
        let mut what_if: Pod = pod("what-if", &gpu_pol, "1", 1).build()?;
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
        ensure!(
            pods.get_opt("what-if").await?.is_none(),
            "explain creates nothing"
        );

        // 5. A cordoned site receives nothing.
        let cordon = json!({"spec": {"cordoned": true}});
        sites
            .patch(&htc, &PatchParams::default(), &Patch::Merge(&cordon))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let site = s.place(pod("after-cordon", &cheap_pol, "1", 0)).await?;
        ensure!(site != "htc", "placed on the cordoned site");

        // 6. A not-ready site receives nothing.
        cloud_sim.go_down(Duration::from_secs(600));
        s.condition(&cloud, "Ready", "False").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let site = s.place(pod("after-outage", &cheap_pol, "1", 0)).await?;
        ensure!(site == "hpc", "only the HPC site is left: {site}");
        // The cloud site stays down, so its pods cannot be deleted there: remove them at once
        // (as a node's pods are force-deleted), or the runner's cleanup would wait for them.
        for p in pods.list(&ListParams::default()).await?.items {
            pods.delete(&p.name_any(), &DeleteParams::default().grace_period(0))
                .await?;
        }
        Ok(())
    })
    .await;
}

/// A site that accepts pods and never starts them (a black hole) stops receiving new pods once a
/// pod has waited there past its `podStartTimeoutSeconds`, and says why on its OffloadSite; when
/// its pods start again it takes pods again.
#[tokio::test]
async fn a_black_hole_site_stops_receiving_pods_and_says_why() {
    Scenario::run("black-hole", |s| async move {
        // The hole is the cheaper site, and the policy weighs cost alone: only the black-hole
        // rule can move pods away from it.
        let hole_sim = s
            .site(
                site_builder("hole")
                    .cost(1.0)
                    .set("podStartTimeoutSeconds", json!(8))
                    .sim_queue_delay(Duration::from_secs(3600)),
            )
            .await?;
        s.site(site_builder("good").cost(100.0)).await?;
        let (hole, good) = (s.name("hole"), s.name("good"));
        let policy = s
            .policy(
                policy_builder("cost")
                    .sites(&[&hole, &good])
                    .weights(0, 100, 0, 0),
            )
            .await?;

        ensure!(
            s.place(pod("first", &policy, "1", 0)).await? == "hole",
            "the cheap site first"
        );
        let reason = s.condition(&hole, "PodsStarting", "False").await?.reason;
        ensure!(reason == "PodsNotStarting", "{reason}");
        let first = s.pods.get("first").await?;
        let phase = first.status.as_ref().and_then(|s| s.phase.clone());
        ensure!(
            phase.as_deref() == Some("Pending"),
            "the first pod still waits there: {phase:?}"
        );

        ensure!(
            s.place(pod("second", &policy, "1", 0)).await? == "good",
            "no new pods for the black hole"
        );
        let second = s.pods.get("second").await?;
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
        let message = s.condition(&hole, "PodsStarting", "False").await?.message;
        ensure!(message.contains("podStartTimeoutSeconds"), "{message}");

        // The site starts pods again, and the stuck one goes: it is a candidate again.
        hole_sim.set_queue_delay(Duration::ZERO);
        s.pods.delete("first", &DeleteParams::default()).await?;
        s.condition(&hole, "PodsStarting", "True").await?;
        ensure!(
            s.place(pod("third", &policy, "1", 0)).await? == "hole",
            "the cheap site again"
        );
        Ok(())
    })
    .await;
}
