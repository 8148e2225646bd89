//! Nothing left running at a site, and no site evicting the cluster's pods: a pod force-deleted
//! while its site is down or while no operator runs, and a delete the site refuses for a while,
//! all end with the job deleted at the site; a site whose ping asks for a NoExecute taint evicts
//! nothing unless allowed. Real control plane, real operator binary, simulators over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use anyhow::ensure;
use k8s_openapi::api::{
    core::v1::{Node, Pod},
    events::v1::Event,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use offload_e2e::{
    fixtures::{pod_builder, site_builder},
    scenario::Scenario,
    sitesim::{SimConfig, SimHandle, faults},
    wait,
};
use offload_operator::interlink::wire::PingTaint;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Orphaned jobs are looked for every 5 s and deleted after 3 s without a pod (defaults: 300 s
/// and 60 s), so the tests measure the mechanism, not the waiting.
const ORPHAN_ARGS: &[&str] = &["--orphan-sweep-seconds", "5", "--orphan-grace-seconds", "3"];

/// The longest a job may stay at its site after the site (or the operator) is back: a health
/// check to see the site ready, a pass that notes the job, the grace window, the pass that
/// deletes it, with room for a loaded machine.
const DELETED_WITHIN: Duration = Duration::from_secs(60);

/// A long pod bound to `site`'s Node, running at the site.
async fn long_pod(s: &Scenario, name: &str, site: &str) -> anyhow::Result<Pod> {
    let pod = pod_builder(name).on_node(site).runs_for(3600).build()?;
    s.pods.create(&PostParams::default(), &pod).await?;
    s.running(name, TIMEOUT).await
}

async fn gone(s: &Scenario, name: &str) -> anyhow::Result<()> {
    wait::until(&format!("pod {name} to be gone"), TIMEOUT, || async {
        Ok::<_, kube::Error>(s.pods.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Waits until the site holds no job; returns how long that took.
async fn site_empties(sim: &SimHandle, what: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait::until(what, DELETED_WITHIN, || async {
        let n = sim.pod_count();
        if n == 0 {
            Ok(Some(()))
        } else {
            Err(format!("the site still holds {n} job(s)"))
        }
    })
    .await?;
    Ok(start.elapsed())
}

async fn orphans_deleted(s: &Scenario, site: &str) -> anyhow::Result<u64> {
    let metrics = s.operator_get("/metrics").await?;
    let prefix = format!("offload_orphans_deleted_total{{site=\"{site}\"}} ");
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

#[tokio::test]
async fn a_pod_force_deleted_during_a_site_outage_is_deleted_at_the_site_when_it_returns() {
    Scenario::run_with("orphan-outage", ORPHAN_ARGS, |s| async move {
        let sim = s.site(site_builder("hpc")).await?;
        let site = s.name("hpc");
        long_pod(&s, "long", &site).await?;
        ensure!(sim.pod_count() == 1);
        let outage = Duration::from_secs(20);
        sim.go_down(outage);
        let back_at = Instant::now() + outage;
        s.pods.delete("long", &DeleteParams::default()).await?;
        // The site cannot confirm: the pod stays, Terminating, as a kubelet's would ...
        tokio::time::sleep(Duration::from_secs(4)).await;
        let p = s.pods.get("long").await?;
        ensure!(p.metadata.deletion_timestamp.is_some(), "being deleted");
        // ... until its user forces it out (`kubectl delete --force --grace-period=0`).
        s.pods
            .delete("long", &DeleteParams::default().grace_period(0))
            .await?;
        gone(&s, "long").await?;
        ensure!(sim.pod_count() == 1, "the site is down: its job is still there");
        tokio::time::sleep(back_at.saturating_duration_since(Instant::now())).await;
        let took = site_empties(&sim, "the orphaned job to be deleted at the site").await?;
        eprintln!("the job was deleted at the site {took:?} after the site came back");
        ensure!(
            orphans_deleted(&s, &site).await? == 1,
            "counted in offload_orphans_deleted_total"
        );
        let log = s.operator_log().await;
        ensure!(log.contains("deleted an orphaned job at the site"), "logged");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_force_deleted_while_the_operator_is_down_is_deleted_at_the_site_after_the_restart() {
    Scenario::run_with("orphan-restart", ORPHAN_ARGS, |s| async move {
        let sim = s.site(site_builder("hpc")).await?;
        let site = s.name("hpc");
        long_pod(&s, "long", &site).await?;
        // A pod whose job stays: it must survive the check.
        long_pod(&s, "kept", &site).await?;
        ensure!(sim.pod_count() == 2);
        s.stop_operator().await;
        // No kubelet runs for the Node: the user forces the pod out.
        s.pods
            .delete("long", &DeleteParams::default().grace_period(0))
            .await?;
        gone(&s, "long").await?;
        s.start_operator().await?;
        let start = Instant::now();
        wait::until(
            "the orphaned job to be deleted at the site",
            DELETED_WITHIN,
            || async {
                let n = sim.pod_count();
                if n == 1 {
                    Ok(Some(()))
                } else {
                    Err(format!("the site holds {n} jobs"))
                }
            },
        )
        .await?;
        eprintln!(
            "the job was deleted at the site {:?} after the operator restarted",
            start.elapsed()
        );
        // Passes go on: the pod that exists keeps its job.
        tokio::time::sleep(Duration::from_secs(12)).await;
        ensure!(sim.pod_count() == 1, "the job of the existing pod was kept");
        let kept = s.pods.get("kept").await?;
        ensure!(kept.metadata.deletion_timestamp.is_none());
        ensure!(orphans_deleted(&s, &site).await? == 1);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_delete_refused_with_401_is_retried_until_the_site_accepts_it() {
    Scenario::run("orphan-401", |s| async move {
        let sim = s.site(site_builder("hpc")).await?;
        let site = s.name("hpc");
        long_pod(&s, "long", &site).await?;
        // A token mid-rotation: the site refuses every delete for 20 s.
        sim.inject(faults::Fault {
            op: "delete".into(),
            kind: faults::FaultKind::Status {
                code: 401,
                body: "Unauthorized".into(),
            },
            count: 100_000,
        });
        let refused_until = Instant::now() + Duration::from_secs(20);
        s.pods.delete("long", &DeleteParams::default()).await?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let p = s.pods.get_opt("long").await?;
        ensure!(
            p.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
            "the pod is kept (Terminating) while the site refuses the delete"
        );
        ensure!(sim.pod_count() == 1, "the job runs on");
        ensure!(sim.stats().deletes == 0, "refused before the handler");
        tokio::time::sleep(refused_until.saturating_duration_since(Instant::now())).await;
        sim.clear_faults();
        let took = site_empties(&sim, "the job to be deleted at the site").await?;
        gone(&s, "long").await?;
        eprintln!("deleted at the site {took:?} after the site accepted deletes again");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_site_asking_for_no_execute_evicts_nothing_unless_allowed() {
    Scenario::run("site-noexecute", |s| async move {
        let sim = s.site(site_builder("hpc")).await?;
        let site = s.name("hpc");
        long_pod(&s, "a", &site).await?;
        long_pod(&s, "b", &site).await?;
        let taint = |key: &str, effect: &str| PingTaint {
            key: key.into(),
            value: Some("true".into()),
            effect: effect.into(),
        };
        // NoExecute, and the same key twice (which the API server would refuse on a Node).
        sim.set_ping_taints(Some(vec![
            taint("maintenance", "NoExecute"),
            taint("maintenance", "NoExecute"),
            taint("drain", "NoSchedule"),
        ]));
        let c = s.condition(&site, "SiteTaintsApplied", "False").await?;
        ensure!(c.reason == "NoExecuteAppliedAsNoSchedule", "{c:?}");
        ensure!(
            c.message
                .contains("site asked for NoExecute, applied as NoSchedule (maintenance)"),
            "{}",
            c.message
        );
        let nodes: Api<Node> = Api::all(s.t.client.clone());
        let node_name = format!("offload-{site}");
        wait::until("the site's taints on its Node", TIMEOUT, || async {
            let n = nodes.get(&node_name).await?;
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            let has = |k: &str| taints.iter().any(|t| t.key == k && t.effect == "NoSchedule");
            Ok::<_, kube::Error>((has("maintenance") && has("drain")).then_some(()))
        })
        .await?;
        let n = nodes.get(&node_name).await?;
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        ensure!(taints.iter().all(|t| t.effect != "NoExecute"), "{taints:?}");
        // The Node stays Ready: its writes did not fail on the duplicate.
        let site_obj = s.sites.get(&site).await?;
        let ready = site_obj
            .status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        ensure!(ready.as_deref() == Some("True"), "{ready:?}");
        let events: Api<Event> = Api::all(s.t.client.clone());
        wait::until("a SiteTaintsChanged Event on the site", TIMEOUT, || async {
            let list = events
                .list(&ListParams::default().fields(&format!("regarding.name={site}")))
                .await?;
            Ok::<_, kube::Error>(
                list.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("SiteTaintsChanged"))
                    .then_some(()),
            )
        })
        .await?;
        // Nothing is evicted.
        tokio::time::sleep(Duration::from_secs(8)).await;
        for name in ["a", "b"] {
            let p = s.pods.get(name).await?;
            ensure!(p.metadata.deletion_timestamp.is_none(), "{name} was evicted");
        }
        ensure!(sim.pod_count() == 2, "both jobs run on");

        // A site allowed to evict does: kube-controller-manager evicts both pods, whose jobs are
        // then deleted at the site.
        s.sites
            .patch(
                &site,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"node": {"allowSiteEviction": true}}})),
            )
            .await?;
        wait::until("maintenance:NoExecute on the Node", TIMEOUT, || async {
            let n = nodes.get(&node_name).await?;
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            let evicting = taints
                .iter()
                .any(|t| t.key == "maintenance" && t.effect == "NoExecute");
            Ok::<_, kube::Error>(evicting.then_some(()))
        })
        .await?;
        // Still False: the duplicate is left out, and the condition says so.
        let c = s.condition(&site, "SiteTaintsApplied", "False").await?;
        ensure!(
            c.reason == "InvalidTaintsIgnored" && c.message.contains("maintenance (a duplicate)"),
            "{c:?}"
        );
        site_empties(&sim, "the evicted pods' jobs to be deleted at the site").await?;
        gone(&s, "a").await?;
        gone(&s, "b").await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn conditions_written_by_others_survive_the_operator_s_status_writes() {
    Scenario::run("foreign-conditions", |s| async move {
        s.site(site_builder("hpc")).await?;
        let site = s.name("hpc");
        let gate = "example.com/lb-ready";
        let pod = pod_builder("gated")
            .on_node(&site)
            .runs_for(12)
            .merge_spec(json!({"readinessGates": [{"conditionType": gate}]}))
            .build()?;
        s.pods.create(&PostParams::default(), &pod).await?;
        s.running("gated", TIMEOUT).await?;
        let condition = |p: &Pod, type_: &str| {
            p.status
                .as_ref()
                .and_then(|st| st.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
                .map(|c| c.status.clone())
        };
        let p = s.pods.get("gated").await?;
        ensure!(
            condition(&p, "Ready").as_deref() == Some("False"),
            "Ready waits for the readiness gate: {:?}",
            p.status
        );
        // Another controller (a load balancer's, say) passes the gate.
        let now = jiff::Timestamp::now().to_string();
        s.pods
            .patch_status(
                "gated",
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [
                    {"type": gate, "status": "True", "lastTransitionTime": now}]}})),
            )
            .await?;
        wait::until("Ready once the gate passes", TIMEOUT, || async {
            let p = s.pods.get("gated").await?;
            Ok::<_, kube::Error>((condition(&p, "Ready").as_deref() == Some("True")).then_some(()))
        })
        .await?;
        // The operator writes the pod's status again when it ends: the gate's condition stays.
        let done = s.phase("gated", "Succeeded", TIMEOUT).await?;
        ensure!(
            condition(&done, gate).as_deref() == Some("True"),
            "the other controller's condition survives: {:?}",
            done.status.and_then(|st| st.conditions)
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_site_answering_with_nothing_for_a_while_loses_no_pod() {
    Scenario::run("empty-answers", |s| async move {
        // The shortest window a site may set: 10 s (its empty answers count after 100 s).
        let sim = s
            .site(site_builder("hpc").set("lostAfterSeconds", json!(10)))
            .await?;
        let site = s.name("hpc");
        long_pod(&s, "a", &site).await?;
        long_pod(&s, "b", &site).await?;
        // A plugin restarting: every status answer is empty for 45 s or so (one a second).
        sim.inject(faults::Fault {
            op: "status".into(),
            kind: faults::FaultKind::Status {
                code: 200,
                body: "[]".into(),
            },
            count: 45,
        });
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(50)).await;
        // The operator logs each empty answer (at debug, the tests' level).
        let answered = s
            .operator_log()
            .await
            .matches("the site answered with nothing")
            .count();
        for name in ["a", "b"] {
            let p = s.pods.get(name).await?;
            let phase = p.status.as_ref().and_then(|st| st.phase.clone());
            ensure!(
                phase.as_deref() == Some("Running"),
                "{name} after {:?} of empty answers: {phase:?}",
                start.elapsed()
            );
        }
        // Many answers, over far more than the 10 s window.
        ensure!(answered >= 20, "{answered} empty answers");
        ensure!(sim.pod_count() == 2);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_site_named_like_a_real_node_does_not_take_it_over() {
    Scenario::run("node-taken", |s| async move {
        let sim = s
            .sim(SimConfig {
                simulate: true,
                ..SimConfig::default()
            })
            .await?;
        // A real node (a plain Node object here) with the name the site's Node would get, and a
        // pod of its own.
        let node_name = format!("offload-{}", s.name("worker"));
        let nodes: Api<Node> = Api::all(s.t.client.clone());
        let real: Node =
            serde_json::from_value(json!({"metadata": {"name": node_name, "labels": {"team": "real"}}}))?;
        nodes.create(&PostParams::default(), &real).await?;
        let result = async {
            let theirs: Pod = serde_json::from_value(json!({"metadata": {"name": "theirs"},
                "spec": {"nodeName": node_name, "containers": [{"name": "main", "image": "busybox"}]}}))?;
            s.pods.create(&PostParams::default(), &theirs).await?;
            let site = s.create_site(&site_builder("worker"), &sim.url).await?;
            let c = s.condition(&site, "Ready", "False").await?;
            ensure!(c.reason == "NodeNameTaken", "{c:?}");
            ensure!(c.message.contains("does not take it over"), "{}", c.message);
            tokio::time::sleep(Duration::from_secs(5)).await;
            let n = nodes.get(&node_name).await?;
            let labels = n.metadata.labels.clone().unwrap_or_default();
            ensure!(!labels.contains_key("offload.dev/site"), "relabelled: {labels:?}");
            ensure!(
                n.metadata.owner_references.is_none(),
                "adopted: {:?}",
                n.metadata.owner_references
            );
            ensure!(
                n.spec.and_then(|s| s.taints).unwrap_or_default().is_empty(),
                "tainted"
            );
            // The real node's pod is left to its kubelet: nothing sent to the site, no status.
            let p = s.pods.get("theirs").await?;
            ensure!(sim.stats().creates_per_uid.is_empty(), "sent to the site");
            ensure!(p.status.and_then(|st| st.phase).as_deref() == Some("Pending"));
            // Deleting the site leaves the Node alone.
            offload_e2e::fixtures::delete_sites(&s.t, &s.sites, &[&site]).await?;
            ensure!(
                nodes.get_opt(&node_name).await?.is_some(),
                "the real node was deleted with the site"
            );
            Ok(())
        }
        .await;
        let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
        result
    })
    .await;
}

#[tokio::test]
async fn the_operator_may_request_only_pod_bound_tokens() {
    use k8s_openapi::api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    Scenario::run("token-policy", |s| async move {
        // The chart's policy, for the operator's identity in the test PKI, in this namespace only.
        let cluster = s.t.cluster;
        let file = offload_e2e::helm::apply_template(
            cluster,
            "token-request-policy",
            &s.t.name,
            &["admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"],
            &[
                ("tokenRequestPolicy.extraUsernames", json!(["offload-operator"])),
                (
                    "tokenRequestPolicy.namespaceSelector",
                    json!({"matchLabels": {"kubernetes.io/metadata.name": s.t.name}}),
                ),
            ],
        )?;
        let result = async {
            let sas: Api<ServiceAccount> = Api::namespaced(cluster.operator_client().await?, &s.t.name);
            let request = |bound: Option<&Pod>| TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: None,
                    bound_object_ref: bound.map(|p| BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: p.metadata.name.clone(),
                        uid: p.metadata.uid.clone(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            // A free-floating token for the namespace's service account: refused.
            wait::until("the unbound token refused", TIMEOUT, || async {
                match sas
                    .create_subresource::<_, TokenRequest>("token", "default", &PostParams::default(), &request(None))
                    .await
                {
                    Err(kube::Error::Api(e)) if e.message.contains("only bound to a pod") => Ok(Some(())),
                    other => Err(format!("{:?}", other.map(|_| "a token")))
                }
            })
            .await?;
            // Bound to a pod: allowed.
            let holder: Pod = serde_json::from_value(json!({"metadata": {"name": "holder"},
                "spec": {"nodeName": format!("{}-nowhere", s.t.name), "containers": [{"name": "main", "image": "busybox"}]}}))?;
            let holder = s.pods.create(&PostParams::default(), &holder).await?;
            let bound: TokenRequest = sas
                .create_subresource::<_, TokenRequest>("token", "default", &PostParams::default(), &request(Some(&holder)))
                .await?;
            ensure!(bound.status.is_some_and(|st| st.token.is_some_and(|t| !t.is_empty())));
            // The operator works under it: an offloaded pod gets its projected token.
            // Runs the pod's script for real.
            s.site_with(site_builder("hpc"), |c| c.simulate = false).await?;
            let site = s.name("hpc");
            let script = "test -s $SITESIM_ROOT/var/run/secrets/kubernetes.io/serviceaccount/token";
            s.pods
                .create(&PostParams::default(), &pod_builder("sa").on_node(&site).script(script).build()?)
                .await?;
            s.phase("sa", "Succeeded", TIMEOUT).await?;
            Ok(())
        }
        .await;
        let _ = cluster.kubectl().arg("delete").arg("-f").arg(&file).output();
        result
    })
    .await;
}

#[tokio::test]
async fn optional_references_items_and_binary_secrets_behave_as_on_a_kubelet() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    Scenario::run("kubelet-volumes", |s| async move {
        // Runs the pod for real, in a work folder the test reads.
        let work = s.t.cluster.dir.join(format!("sim-{}", s.t.name));
        s.site_with(site_builder("hpc"), |c| {
            c.simulate = false;
            c.work_dir = work.clone();
        })
        .await?;
        let site = s.name("hpc");
        let pp = PostParams::default();
        let cms: Api<ConfigMap> = Api::namespaced(s.t.client.clone(), &s.t.name);
        cms.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "cfg"},
            "data": {"greeting": "hi", "other": "not listed"}}))?)
            .await?;
        // Bytes that are not UTF-8.
        let blob: Vec<u8> = vec![0, 159, 146, 150, 255, 10, 0xc3, 0x28];
        let secrets: Api<Secret> = Api::namespaced(s.t.client.clone(), &s.t.name);
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("blob".into()),
                ..Default::default()
            },
            data: Some([("blob.bin".to_string(), k8s_openapi::ByteString(blob.clone()))].into()),
            ..Default::default()
        };
        secrets.create(&pp, &secret).await?;
        let spec = json!({
            "volumes": [
                {"name": "maybe", "configMap": {"name": "no-such-config", "optional": true}},
                {"name": "proj", "projected": {"sources": [
                    {"configMap": {"name": "cfg", "items": [{"key": "greeting", "path": "conf/hello.txt"}]}},
                    {"configMap": {"name": "no-such-either", "optional": true}},
                    {"secret": {"name": "blob"}}]}}],
            "containers": [{"name": "main", "image": "busybox",
                "command": ["sh", "-c", "test -z \"${MAYBE+set}\" && cat $SITESIM_ROOT/etc/proj/conf/hello.txt"],
                "env": [{"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "no-such-config", "key": "k", "optional": true}}}],
                "volumeMounts": [{"name": "maybe", "mountPath": "/etc/maybe"}, {"name": "proj", "mountPath": "/etc/proj"}]}]});
        s.pods
            .create(&pp, &pod_builder("volumes").on_node(&site).merge_spec(spec).build()?)
            .await?;
        // A kubelet starts it: optional references to nothing are no reason to wait.
        let p = s.phase("volumes", "Succeeded", TIMEOUT).await?;
        let dir = work.join(p.metadata.uid.clone().unwrap_or_default()).join("root/etc/proj");
        ensure!(std::fs::read_to_string(dir.join("conf/hello.txt"))? == "hi", "items: the key at its path");
        ensure!(!dir.join("greeting").exists() && !dir.join("other").exists(), "items: no other key");
        ensure!(std::fs::read(dir.join("blob.bin"))? == blob, "the Secret's bytes, exactly");
        let log = std::fs::read_to_string(work.join(p.metadata.uid.unwrap_or_default()).join("main.log"))?;
        ensure!(log == "hi", "{log:?}");
        Ok(())
    })
    .await;
}
