//! Offload sites as Kueue capacity, with the real Kueue (v0.17, `e2e/bin/kueue-up`): the operator
//! (`--kueue`) keeps one ResourceFlavor per site; a ClusterQueue gives quota on a local flavor and
//! on two site flavors; of ten Jobs, the first fill the local quota and the rest are admitted on
//! the site flavors, whose pods kube-scheduler binds to the sites' virtual Nodes and the operator
//! runs at the simulated sites. The operator's AdmissionCheck (`offload.dev/site-capacity`) lets
//! those through and rejects, with the reason, a Job its site could never run.
//!
//! Alone in its binary: Kueue's Job webhook is cluster-wide while it runs.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams,
    },
};
use offload_e2e::{
    fixtures::{delete_sites, site_builder},
    kueue::Kueue,
    scenario::Scenario,
    sitesim::exactly_once,
    wait,
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn kueue_api(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", kind), plural)
}

#[tokio::test]
async fn jobs_admitted_on_site_flavors_run_at_the_sites() {
    Scenario::run_with("kueue", &["--kueue"], |s| async move {
        let cluster = s.t.cluster;
        let kueue = tokio::task::spawn_blocking(move || Kueue::up(cluster)).await??;
        let result = run(&s).await;
        if result.is_err() {
            eprintln!("{}", kueue.log_tail(60));
        }
        // Everything Kueue puts finalizers on goes while it still runs.
        let cleanup = cleanup(&s).await;
        let down = {
            let kueue = kueue.clone();
            tokio::task::spawn_blocking(move || kueue.down()).await?
        };
        result.and(cleanup).and(down)
    })
    .await;
}

/// Deletes the Jobs, the queues, the local flavor and the sites (whose flavors the garbage
/// collector then deletes), waiting for each, while Kueue can still remove its finalizers.
async fn cleanup(s: &Scenario) -> anyhow::Result<()> {
    let client = s.t.client.clone();
    let ns = &s.t.name;
    let gone = |api: Api<DynamicObject>, what: String| async move {
        wait::until(&what, TIMEOUT, || async {
            Ok::<_, kube::Error>(
                api.list(&ListParams::default())
                    .await?
                    .items
                    .is_empty()
                    .then_some(()),
            )
        })
        .await
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    jobs.delete_collection(&DeleteParams::background(), &ListParams::default())
        .await?;
    gone(
        Api::namespaced_with(client.clone(), ns, &kueue_api("Workload", "workloads")),
        "the Workloads gone".into(),
    )
    .await?;
    let lqs: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &kueue_api("LocalQueue", "localqueues"));
    lqs.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    gone(lqs, "the LocalQueue gone".into()).await?;
    let cqs: Api<DynamicObject> = Api::all_with(client.clone(), &kueue_api("ClusterQueue", "clusterqueues"));
    let cq = format!("{ns}-cq");
    cqs.delete(&cq, &DeleteParams::default()).await?;
    wait::until("the ClusterQueue gone", TIMEOUT, || async {
        Ok::<_, kube::Error>(cqs.get_opt(&cq).await?.is_none().then_some(()))
    })
    .await?;
    let acs: Api<DynamicObject> =
        Api::all_with(client.clone(), &kueue_api("AdmissionCheck", "admissionchecks"));
    let _ = acs
        .delete(&format!("{ns}-site-capacity"), &DeleteParams::default())
        .await;
    let sites = [s.name("hpc"), s.name("htc")];
    let names: Vec<&str> = sites.iter().map(String::as_str).collect();
    delete_sites(&s.t, &s.sites, &names).await?;
    let flavors: Api<DynamicObject> =
        Api::all_with(client.clone(), &kueue_api("ResourceFlavor", "resourceflavors"));
    let local = format!("{ns}-local");
    flavors.delete(&local, &DeleteParams::default()).await?;
    for name in [
        local,
        format!("offload-{}", sites[0]),
        format!("offload-{}", sites[1]),
    ] {
        wait::until(&format!("ResourceFlavor {name} gone"), TIMEOUT, || async {
            Ok::<_, kube::Error>(flavors.get_opt(&name).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

async fn run(s: &Scenario) -> anyhow::Result<()> {
    let client = s.t.client.clone();
    // The operator's identity may write flavors (the chart grants the same with kueue.enabled).
    let out =
        s.t.cluster
            .kubectl()
            .args(["apply", "-f"])
            .arg(offload_e2e::cluster::repo_root().join("e2e/testdata/operator-rbac-kueue.yaml"))
            .output()?;
    ensure!(
        out.status.success(),
        "RBAC: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let big = json!({"cpu": "4", "memory": "16Gi", "pods": 20});
    let hpc_sim = s.site(site_builder("hpc").set("capacity", big.clone())).await?;
    let htc_sim = s.site(site_builder("htc").set("capacity", big)).await?;
    let (hpc, htc) = (s.name("hpc"), s.name("htc"));

    // The operator's flavors.
    let flavors: Api<DynamicObject> =
        Api::all_with(client.clone(), &kueue_api("ResourceFlavor", "resourceflavors"));
    for site in [&hpc, &htc] {
        let name = format!("offload-{site}");
        let f = wait::until(&format!("ResourceFlavor {name}"), TIMEOUT, || async {
            flavors.get_opt(&name).await
        })
        .await?;
        ensure!(
            f.data["spec"]["nodeLabels"]["offload.dev/site"] == site.as_str(),
            "flavor {name}: {}",
            f.data["spec"]
        );
    }

    // A local flavor (no node behind it here: what Kueue admits on it just waits) and the queues.
    let local = format!("{}-local", s.t.name);
    let pp = PostParams::default();
    let apply = PatchParams::apply("offload-e2e").force();
    flavors
        .patch(
            &local,
            &apply,
            &Patch::Apply(
                json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                "metadata": {"name": local}, "spec": {"nodeLabels": {"offload.dev/e2e-local": s.t.name}}}),
            ),
        )
        .await?;
    let quota = |flavor: &str, cpu: &str| json!({"name": flavor, "resources": [{"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": "64Gi"}]});
    // The operator's AdmissionCheck: Kueue admits on a site's flavor only once the site can run
    // the pods; the operator marks the check Active.
    let check = format!("{}-site-capacity", s.t.name);
    let acs: Api<DynamicObject> =
        Api::all_with(client.clone(), &kueue_api("AdmissionCheck", "admissionchecks"));
    acs.patch(
        &check,
        &apply,
        &Patch::Apply(
            json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "AdmissionCheck",
            "metadata": {"name": check}, "spec": {"controllerName": "offload.dev/site-capacity"}}),
        ),
    )
    .await?;
    wait::until("the AdmissionCheck Active", TIMEOUT, || async {
        let ac = acs.get(&check).await?;
        let active = ac.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Active" && c["status"] == "True"));
        Ok::<_, kube::Error>(active.then_some(()))
    })
    .await?;
    let cq = format!("{}-cq", s.t.name);
    let cqs: Api<DynamicObject> = Api::all_with(client.clone(), &kueue_api("ClusterQueue", "clusterqueues"));
    cqs.patch(
        &cq,
        &apply,
        &Patch::Apply(json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
            "metadata": {"name": cq},
            "spec": {"namespaceSelector": {}, "resourceGroups": [{"coveredResources": ["cpu", "memory"],
                "flavors": [quota(&local, "2"), quota(&format!("offload-{hpc}"), "4"), quota(&format!("offload-{htc}"), "16")]}],
                "admissionChecksStrategy": {"admissionChecks": [{"name": check,
                    "onFlavors": [format!("offload-{hpc}"), format!("offload-{htc}")]}]}}})),
    )
    .await?;
    let lqs: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &s.t.name, &kueue_api("LocalQueue", "localqueues"));
    lqs.patch(
        "lq",
        &apply,
        &Patch::Apply(
            json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": "lq", "namespace": s.t.name}, "spec": {"clusterQueue": cq}}),
        ),
    )
    .await?;

    // Ten Jobs of one 1-CPU pod each, created one after the other (Kueue admits in order). Each
    // runs 20 s at its site, so no quota is released while the others are created.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &s.t.name);
    for i in 0..10 {
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": format!("job-{i}"), "labels": {"kueue.x-k8s.io/queue-name": "lq"}},
            "spec": {"backoffLimit": 0, "template": {
                "metadata": {"annotations": {"sitesim.offload.dev/duration-seconds": "20"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox",
                    "command": ["sh", "-c", "echo queued by kueue"],
                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}}}
        }))?;
        jobs.create(&pp, &job)
            .await
            .with_context(|| format!("creating job-{i}"))?;
        let name = format!("job-{i}");
        // Kueue's webhook suspends it at creation.
        let created = jobs.get(&name).await?;
        ensure!(
            created.spec.as_ref().and_then(|s| s.suspend) == Some(true),
            "Kueue's webhook did not suspend {name}"
        );
        wait::until(&format!("{name} admitted"), TIMEOUT, || async {
            admitted_flavor(&client, &s.t.name, &name).await
        })
        .await?;
    }

    // Where each was admitted.
    let mut by_flavor: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..10 {
        let name = format!("job-{i}");
        let flavor = admitted_flavor(&client, &s.t.name, &name)
            .await?
            .context("not admitted")?;
        by_flavor.entry(flavor).or_default().push(name);
    }
    eprintln!("admitted: {by_flavor:?}");
    let hpc_flavor = format!("offload-{hpc}");
    let htc_flavor = format!("offload-{htc}");
    ensure!(
        by_flavor.get(&local).map(Vec::len) == Some(2)
            && by_flavor.get(&hpc_flavor).map(Vec::len) == Some(4)
            && by_flavor.get(&htc_flavor).map(Vec::len) == Some(4),
        "expected 2 local, 4 hpc, 4 htc: {by_flavor:?}"
    );
    ensure!(
        by_flavor[&local] == ["job-0", "job-1"],
        "the first jobs did not fill the local quota: {by_flavor:?}"
    );

    // The site flavors' Jobs complete at the sites; their pods ran on the sites' Nodes.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &s.t.name);
    for (flavor, site) in [(&hpc_flavor, &hpc), (&htc_flavor, &htc)] {
        for name in &by_flavor[flavor] {
            wait::until(&format!("{name} complete"), TIMEOUT, || async {
                let j = jobs.get(name).await?;
                let done = j
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True");
                Ok::<_, kube::Error>(done.then_some(()))
            })
            .await?;
            let list = pods
                .list(&ListParams::default().labels(&format!("job-name={name}")))
                .await?;
            let pod = list.items.first().context("the Job's pod is gone")?;
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            ensure!(
                node == format!("offload-{site}"),
                "{} ran on {node}",
                pod.name_any()
            );
        }
    }
    ensure!(
        hpc_sim.stats().creates_per_uid.len() == 4 && htc_sim.stats().creates_per_uid.len() == 4,
        "each site should have run four pods"
    );
    exactly_once(&[hpc_sim.stats(), htc_sim.stats()], 8)?;
    // A Job too big for its site: Kueue has quota for it on htc's flavor (16 CPUs), but the site
    // has 4. The operator's check rejects it with the reason; it never runs.
    let big: Job = serde_json::from_value(json!({
        "metadata": {"name": "too-big", "labels": {"kueue.x-k8s.io/queue-name": "lq"}},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": "busybox", "command": ["true"],
             "resources": {"requests": {"cpu": "8", "memory": "1Gi"}}}]}}}
    }))?;
    jobs.create(&pp, &big).await?;
    // Kueue deactivates a Workload whose check was rejected and says why in a Warning Event
    // (`AdmissionCheckRejected`, with the check's message: `kubectl get events`); the check's own
    // state is reset with the eviction.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &s.t.name);
    let rejected = wait::until("too-big's check Rejected", TIMEOUT, || async {
        let list = events
            .list(&ListParams::default().fields("reason=AdmissionCheckRejected"))
            .await?;
        Ok::<_, kube::Error>(
            list.items
                .into_iter()
                .find(|e| {
                    e.involved_object
                        .name
                        .as_deref()
                        .is_some_and(|n| n.contains("too-big"))
                })
                .and_then(|e| e.message),
        )
    })
    .await?;
    eprintln!("too-big: Rejected: {rejected}");
    ensure!(
        rejected.contains("insufficient cpu") && rejected.contains(&htc),
        "the rejection does not say why: {rejected}"
    );
    ensure!(
        jobs.get("too-big").await?.spec.and_then(|s| s.suspend) == Some(true),
        "the rejected Job runs"
    );
    // What a user sees: `kubectl describe workload` shows the Workload deactivated by the check
    // and the check's reason among its Events.
    let workload = workload_of(&client, &s.t.name, "too-big")
        .await?
        .context("too-big has no Workload")?;
    let out =
        s.t.cluster
            .kubectl()
            .args(["describe", "workload", "-n", &s.t.name, &workload])
            .output()?;
    let described = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && described.contains("DeactivatedDueToAdmissionCheck")
            && described.contains("AdmissionCheckRejected")
            && described.contains(&rejected),
        "kubectl describe workload {workload} does not show the rejection ({}):\n{described}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = s.operator_get("/metrics").await?;
    let decided = |state: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "offload_kueue_admission_checks_total{{state=\"{state}\"}} "
                ))?
                .trim()
                .parse::<f64>()
                .ok()
            })
            .unwrap_or(0.0)
    };
    ensure!(
        decided("Ready") >= 8.0 && decided("Rejected") >= 1.0,
        "offload_kueue_admission_checks_total: Ready {}, Rejected {}",
        decided("Ready"),
        decided("Rejected")
    );

    // The local ones are admitted but have no node: they wait, unbound.
    for name in &by_flavor[&local] {
        let list = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await?;
        ensure!(
            list.items
                .iter()
                .all(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()).is_none()),
            "a local-flavor pod was bound to a node"
        );
    }
    Ok(())
}

/// The flavor the Job's Workload was admitted on (its cpu), once it is.
async fn admitted_flavor(client: &kube::Client, ns: &str, job: &str) -> anyhow::Result<Option<String>> {
    Ok(owned_workload(client, ns, job).await?.and_then(|w| {
        w.data["status"]["admission"]["podSetAssignments"][0]["flavors"]["cpu"]
            .as_str()
            .map(String::from)
    }))
}

/// The name of the Workload Kueue made for the Job.
async fn workload_of(client: &kube::Client, ns: &str, job: &str) -> anyhow::Result<Option<String>> {
    Ok(owned_workload(client, ns, job).await?.map(|w| w.name_any()))
}

async fn owned_workload(client: &kube::Client, ns: &str, job: &str) -> anyhow::Result<Option<DynamicObject>> {
    let workloads: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &kueue_api("Workload", "workloads"));
    Ok(workloads
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|w| {
            w.metadata
                .owner_references
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|o| o.kind == "Job" && o.name == job)
        }))
}
