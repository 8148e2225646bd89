//! Placement scenarios end to end, written with the fixture builders and the one scenario runner:
//! four sites and four policies placing as docs/placement.md predicts; a site made slow losing
//! pods and the operator remembering it across a restart; a hanging site delaying no other.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use offload_e2e::{
    fixtures::{PodBuilder, pod_builder, policy_builder, site_builder},
    scenario::Scenario,
    sitesim::{Fault, FaultKind},
    wait,
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn four_sites_and_four_policies_place_as_the_docs_predict() {
    Scenario::run("four-sites", |s| async move {
        s.site(
            site_builder("a100")
                .kind("HPC")
                .gpus("A100", 8, "80Gi")
                .queue(3600)
                .cost(1.0)
                .tenants(&[("hpc-allowed", "true")]),
        )
        .await?;
        s.site(
            site_builder("h100")
                .kind("HPC")
                .gpus("H100", 4, "80Gi")
                .queue(600)
                .cost(2.0),
        )
        .await?;
        s.site(site_builder("htc").kind("HTC").queue(300).cost(0.5).slots(50))
            .await?;
        s.site(
            site_builder("t4")
                .kind("Cloud")
                .gpus("T4", 8, "16Gi")
                .queue(30)
                .cost(10.0),
        )
        .await?;
        let training = s
            .policy(
                policy_builder("training")
                    .priority(100)
                    .gpu_models(&["A100", "H100"])
                    .min_gpu_memory("40Gi")
                    .pod_gpus("Required")
                    .weights(70, 10, 10, 10),
            )
            .await?;
        let inference = s
            .policy(
                policy_builder("inference")
                    .priority(50)
                    .gpu_models(&["T4"])
                    .pod_gpus("Required")
                    .weights(50, 50, 0, 0),
            )
            .await?;
        let cheap_gpu = s
            .policy(
                policy_builder("cheap-gpu")
                    .gpu_models(&["A100", "H100", "T4"])
                    .weights(0, 100, 0, 0),
            )
            .await?;
        let cpu_batch = s
            .policy(policy_builder("cpu-batch").pod_gpus("None").weights(0, 90, 10, 0))
            .await?;
        let pod = |name: &str, policy: &str, gpus: u32| {
            let b: PodBuilder = pod_builder(name).policy(policy);
            if gpus > 0 { b.gpus(gpus) } else { b }
        };

        // The namespace may not use the A100 site (tenancy) yet.
        // Training: A100/H100 only, the A100 site refuses the namespace: H100.
        ensure!(s.place(pod("train-1", &training, 1)).await? == "h100");
        let why = s.explain("train-1").await?;
        ensure!(why.contains("namespace not allowed by the site"), "{why}");
        ensure!(
            why.contains("no allowed GPU model for nvidia.com/gpu"),
            "the T4 and HTC sites: {why}"
        );
        // Inference: T4 only.
        ensure!(s.place(pod("infer-1", &inference, 1)).await? == "t4");
        // CPU batch: the cheapest site that takes the namespace.
        ensure!(s.place(pod("batch-1", &cpu_batch, 0)).await? == "htc");
        // Cheapest GPU site open to the namespace: H100 (2) before T4 (10).
        ensure!(s.place(pod("cheap-1", &cheap_gpu, 1)).await? == "h100");

        // The namespace may now use the A100 site.
        let namespaces: kube::Api<Namespace> = kube::Api::all(s.t.client.clone());
        namespaces
            .patch(
                &s.t.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"hpc-allowed": "true"}}})),
            )
            .await?;
        let ready = || async {
            let ns = namespaces.get(&s.t.name).await?;
            Ok::<_, kube::Error>(ns.labels().get("hpc-allowed").map(|_| ()))
        };
        wait::until("the namespace label", TIMEOUT, ready).await?;
        tokio::time::sleep(Duration::from_secs(1)).await; // the scheduler's namespace cache
        // Cheapest GPU site: now the A100 site (1).
        ensure!(s.place(pod("cheap-2", &cheap_gpu, 1)).await? == "a100");
        // Training weighs the queue: H100 (600 s) before A100 (3600 s), though A100 is cheaper.
        ensure!(s.place(pod("train-2", &training, 1)).await? == "h100");
        let why = s.explain("train-2").await?;
        ensure!(
            why.contains("a100") && why.contains("h100") && why.contains("WAIT(s)"),
            "{why}"
        );

        // A CPU-only pod naming the GPU training policy is refused, with the reason.
        s.pods
            .create(
                &PostParams::default(),
                &pod("cpu-in-training", &training, 0).build()?,
            )
            .await?;
        let message = wait::until("the refusal", TIMEOUT, || async {
            let p: Pod = s.pods.get("cpu-in-training").await?;
            Ok::<_, kube::Error>(p.status.and_then(|st| st.conditions).and_then(|c| {
                c.into_iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                    .and_then(|c| c.message)
            }))
        })
        .await?;
        ensure!(
            message.contains("it governs only pods that request GPUs"),
            "{message}"
        );
        Ok(())
    })
    .await;
}

use kube::ResourceExt;

/// `status.observedQueueWaitSeconds` of a site.
async fn observed_wait(s: &Scenario, site: &str) -> anyhow::Result<Option<i64>> {
    let st = s.sites.get(&s.name(site)).await?.status.context("status")?;
    Ok(st.observed_queue_wait_seconds)
}

#[tokio::test]
async fn a_slow_site_loses_pods_and_the_operator_remembers_it_across_a_restart() {
    Scenario::run("slow-site", |s| async move {
        // "fast" declares no wait and is preferred until it shows one; "steady" declares 5 s.
        let fast = s.site(site_builder("fast").kind("Cloud")).await?;
        s.site(site_builder("steady").kind("Cloud").queue(5)).await?;
        let queue_only = s
            .policy(policy_builder("queue-only").weights(100, 0, 0, 0))
            .await?;
        let pod = |name: &str| pod_builder(name).policy(&queue_only);
        ensure!(s.place(pod("p0")).await? == "fast");
        s.running("p0", TIMEOUT).await?;
        // The site slows down: its pods now wait 40 s before they start.
        fast.set_queue_delay(Duration::from_secs(40));
        ensure!(s.place(pod("p1")).await? == "fast", "no wait observed yet");
        // While p1 waits, the site's unstarted pod raises its expected wait past steady's 5 s.
        let moved = wait::until("a pod placed away from the slow site", TIMEOUT, || async {
            let name = format!("probe-{}", jiff::Timestamp::now().as_second());
            let site = s.place(pod(&name)).await.map_err(|e| e.to_string())?;
            if site == "steady" {
                Ok(Some(name))
            } else {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, String>(None)
            }
        })
        .await?;
        eprintln!("first pod placed away from the slow site: {moved}");
        // p1's start is one sample of 40 s: the observed wait (EWMA 0.2) passes 5 s.
        s.running("p1", Duration::from_secs(120)).await?;
        let before = wait::until("the slow site's observed wait", TIMEOUT, || async {
            let w = observed_wait(&s, "fast").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(w.filter(|w| *w > 5))
        })
        .await?;
        // Without pods waiting there, only the observed wait speaks against the slow site: a
        // restart that forgot it would see a site with no wait at all and choose it again.
        for p in s.pods.list(&Default::default()).await?.items {
            let name = p.name_any();
            if name.starts_with("probe-") && name != moved {
                s.pods
                    .delete(&name, &kube::api::DeleteParams::default().grace_period(0))
                    .await?;
            }
        }
        // Restart: the observed wait is read back from the site's status, not forgotten.
        s.restart_operator().await?;
        offload_e2e::fixtures::wait_site_ready(&s.sites, &s.name("fast")).await?;
        ensure!(
            observed_wait(&s, "fast").await? == Some(before),
            "the persisted wait survives the restart"
        );
        ensure!(s.place(pod("after-restart")).await? == "steady");
        let why = s.explain("after-restart").await?;
        eprintln!("{why}");
        ensure!(why.contains("chosen: ") && why.contains("steady"), "{why}");
        Ok(())
    })
    .await;
}

/// Seconds from the site's `startedAt` of the pod's container to the pod's `Ready` transition:
/// how long the operator took to report what the site said.
fn report_lag(p: &Pod) -> Option<i64> {
    let st = p.status.as_ref()?;
    let started = st
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()?
        .0;
    let ready = st
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        ready
            .last_transition_time
            .as_ref()?
            .0
            .duration_since(started)
            .as_secs(),
    )
}

#[tokio::test]
async fn a_hanging_site_delays_no_other_site_s_status() {
    Scenario::run("hanging-site", |s| async move {
        let interval = 2;
        let hanging = s.site(site_builder("hanging").sync_every(interval)).await?;
        s.site(site_builder("healthy").sync_every(interval)).await?;
        let (hang_to, heal_to) = (s.name("hanging"), s.name("healthy"));
        let pinned = |name: &str, site: &str| {
            let mut p = s.pod(name).build().expect("pod");
            p.metadata.annotations.get_or_insert_default().insert("offload.dev/site".into(), site.into());
            p
        };
        s.pods.create(&PostParams::default(), &pinned("h-0", &hang_to)).await?;
        s.running("h-0", TIMEOUT).await?;
        // The hanging site answers nothing for 60 s: every request is held that long.
        hanging.inject(Fault { op: "*".into(), kind: FaultKind::Delay { millis: 60_000 }, count: 10_000 });
        let hang_started = std::time::Instant::now();
        let mut lags = Vec::new();
        // What each lag was computed from, for the failure message (a lag longer than the whole
        // measurement was seen once in CI and could not be reproduced: this names its parts).
        let mut seen = Vec::new();
        for i in 0..5 {
            let name = format!("ok-{i}");
            let created = jiff::Timestamp::now();
            s.pods.create(&PostParams::default(), &pinned(&name, &heal_to)).await?;
            let p = s.running(&name, TIMEOUT).await?;
            let lag = report_lag(&p).context("timestamps")?;
            lags.push(lag);
            let status = p.status.as_ref();
            seen.push(format!(
                "{name}: created {created}, read {}, startedAt {:?}, conditions {:?}",
                jiff::Timestamp::now(),
                status
                    .and_then(|st| st.container_statuses.as_ref())
                    .and_then(|cs| cs.first())
                    .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.clone()),
                status.and_then(|st| st.conditions.clone())
            ));
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let during = hang_started.elapsed();
        hanging.clear_faults();
        eprintln!("healthy site's report lags while the other hangs ({during:?}): {lags:?} s (interval {interval} s)");
        ensure!(during < Duration::from_secs(60), "the measurement ran within the hang");
        // Timestamps have one-second resolution: one interval plus that rounding.
        let worst = lags.iter().max().copied().unwrap_or_default();
        ensure!(
            worst <= i64::from(interval) + 1,
            "a status was delayed {worst} s, more than one interval:\n{}",
            seen.join("\n")
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_whose_token_expires_while_it_runs_gets_a_warning() {
    Scenario::run("token-expiry", |s| async move {
        s.site(site_builder("site")).await?;
        // A projected token valid for the API server's minimum, 10 minutes: the site cannot be
        // given a new one (interLink has no update path), so the operator warns at once.
        let mut pod = s.pod("short-token").build()?;
        let spec = pod.spec.as_mut().context("spec")?;
        spec.volumes = Some(vec![serde_json::from_value(
            json!({"name": "token", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 600, "audience": "vault"}}]}}),
        )?]);
        spec.containers[0].volume_mounts = Some(vec![serde_json::from_value(
            json!({"name": "token", "mountPath": "/var/run/token"}),
        )?]);
        s.pods.create(&PostParams::default(), &pod).await?;
        let p = s.running("short-token", TIMEOUT).await?;
        let expires = p
            .annotations()
            .get("offload.dev/token-expires")
            .cloned()
            .context("token-expires annotation")?;
        let at: jiff::Timestamp = expires.parse()?;
        let left = at.duration_since(jiff::Timestamp::now()).as_secs();
        ensure!(
            (0..=600).contains(&left),
            "the token expires in {left}s, not within its 600 s"
        );
        let events: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(s.t.client.clone(), &s.t.name);
        let note = wait::until("a TokenExpiring Event", TIMEOUT, || async {
            let list = events.list(&Default::default()).await?;
            Ok::<_, kube::Error>(
                list.items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("TokenExpiring")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("short-token")
                    })
                    .and_then(|e| e.note),
            )
        })
        .await?;
        ensure!(note.contains(&expires) && note.contains("cannot"), "{note}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn credentials_come_from_secrets_and_config_maps_and_a_rotated_token_is_used_at_once() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    Scenario::run("credentials", |s| async move {
        // Mutual TLS: the site's CA from a ConfigMap, the client certificate from a TLS Secret,
        // the bearer token from a Secret; all in the operator's namespace.
        let dir = s.t.cluster.dir.join(format!("pki-{}", s.t.name));
        let (ca, mut tls) = offload_e2e::pki::make_tls(&dir);
        tls.client_ca = Some(ca.clone());
        let (first, second) = (format!("tok-{}-a1", s.t.name), format!("tok-{}-b2", s.t.name));
        let pp = PostParams::default();
        let secrets: kube::Api<Secret> = kube::Api::namespaced(s.t.client.clone(), &s.t.name);
        let maps: kube::Api<ConfigMap> = kube::Api::namespaced(s.t.client.clone(), &s.t.name);
        maps.create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "site-ca"},
            "data": {"ca.crt": std::fs::read_to_string(&ca)?}}))?,
        )
        .await?;
        secrets
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "site-client"},
            "type": "kubernetes.io/tls", "stringData": {
                "tls.crt": std::fs::read_to_string(dir.join("client.crt"))?,
                "tls.key": std::fs::read_to_string(dir.join("client.key"))?}}))?,
            )
            .await?;
        secrets
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "site-token"},
            "stringData": {"token": first.clone()}}))?,
            )
            .await?;
        let auth = json!({"bearerToken": {"name": "site-token", "key": "token"},
            "caBundle": {"configMap": {"name": "site-ca", "key": "ca.crt"}},
            "clientCertificate": {"secretName": "site-client"}});
        let token = first.clone();
        // A high failure threshold keeps the site Ready while the rotation is half done, so a
        // pod is bound and sent with the old token (the case a rotation must not lose a pod in).
        let health = json!({"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 60});
        let sim = s
            .site_with(
                site_builder("secure")
                    .set("auth", auth)
                    .set("healthCheck", health),
                move |c| {
                    c.tls = Some(tls);
                    c.token = Some(token);
                },
            )
            .await?;
        ensure!(sim.url.starts_with("https://"));
        ensure!(s.place(s.pod("before")).await? == "secure");
        s.running("before", TIMEOUT).await?;

        // Rotation, half done: the site accepts only the new token; the Secret still has the old.
        sim.set_token(Some(second.clone()));
        ensure!(s.place(s.pod("during")).await? == "secure");
        let waiting = wait::until(
            "the pod waiting for the site to accept the operator",
            TIMEOUT,
            || async {
                let p: Pod = s.pods.get("during").await?;
                let st = p.status.unwrap_or_default();
                ensure!(
                    st.phase.as_deref() != Some("Failed"),
                    "the pod was failed for the site's credentials: {:?}",
                    st.message
                );
                let w = st
                    .container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|c| c.state.and_then(|s| s.waiting))
                    .and_then(|w| w.message);
                Ok::<_, anyhow::Error>(w.filter(|m| m.contains("Unauthorized") || m.contains("401")))
            },
        )
        .await?;
        eprintln!("during the rotation: {waiting}");
        // Rotation done: the Secret holds the new token; the waiting pod and a new one run.
        secrets
            .patch(
                "site-token",
                &PatchParams::default(),
                &Patch::Merge(&json!({"stringData": {"token": second.clone()}})),
            )
            .await?;
        s.running("during", TIMEOUT).await?;
        ensure!(s.place(s.pod("after")).await? == "secure");
        s.running("after", TIMEOUT).await?;
        let rejected = sim.stats().unauthorized;
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(
            sim.stats().unauthorized == rejected,
            "requests after the rotation still carry the old token"
        );
        let log = s.operator_log().await;
        ensure!(
            !log.contains(&first) && !log.contains(&second),
            "a token was logged"
        );
        Ok(())
    })
    .await;
}
