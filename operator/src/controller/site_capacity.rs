//! Kueue's AdmissionCheck `offload.dev/site-capacity` (with `run --kueue`): a Workload that Kueue
//! has given quota on a site's flavor is admitted only when that site can run all of its pods.
//!
//! Observe: AdmissionChecks naming this controller, Workloads whose check of them is `Pending`, the
//! site, node and pod caches. Decide: [`check`] (pure), with the placement engine on each pod set
//! pinned to its flavor's site. Act: the check's state in the Workload's status (`Ready`, `Retry`
//! while a site is down or full, `Rejected` with the reasons when the site could never run it),
//! and `Active` on the AdmissionCheck, by server-side apply.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};

use super::{
    Context,
    kueue::{GROUP, VERSION},
    node::{node_name, site_of_node},
};
use crate::placement::{self, PodNeeds, PolicyView, Rejection, Resources, SiteSnapshot};

/// The `controllerName` of AdmissionChecks this controller answers.
pub const CONTROLLER_NAME: &str = "offload.dev/site-capacity";
const MANAGER: &str = "offload-operator-site-capacity";
/// Workloads with a pending check are looked at again this often (a site may come back).
const TICK: Duration = Duration::from_secs(5);

/// One pod set of a Workload with quota reserved: its pods and the site of its flavor, if the
/// flavor is a site's.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSet {
    /// Pod set name.
    pub name: String,
    /// Pods in it.
    pub count: i64,
    /// What one pod requests.
    pub per_pod: Resources,
    /// The site of its assigned flavor (`offload-<site>`); `None`: not a site's flavor.
    pub site: Option<String>,
}

/// The check's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every site can run its pods now.
    Ready(String),
    /// A site cannot now (down, full, queue too long): Kueue releases the quota and tries again.
    Retry(String),
    /// A site never could (too small, tenancy, GPU model): Kueue deactivates the Workload.
    Rejected(String),
}

impl Verdict {
    /// The Workload's `CheckState`.
    pub fn state(&self) -> &'static str {
        match self {
            Verdict::Ready(_) => "Ready",
            Verdict::Retry(_) => "Retry",
            Verdict::Rejected(_) => "Rejected",
        }
    }

    /// Its message.
    pub fn message(&self) -> &str {
        match self {
            Verdict::Ready(m) | Verdict::Retry(m) | Verdict::Rejected(m) => m,
        }
    }
}

/// Whether a rejection can never go away by waiting: the site is too small for the pod set, or
/// may not run it at all.
fn permanent(r: &Rejection, site: &SiteSnapshot) -> bool {
    match r {
        Rejection::NamespaceNotAllowed
        | Rejection::KindNotAllowed
        | Rejection::ArchitectureNotAllowed
        | Rejection::NoAllowedGpuModel { .. }
        | Rejection::GpuMemoryTooSmall { .. } => true,
        Rejection::Insufficient { resource, needed, .. } => {
            let cap = &site.capacity;
            let total = match resource.as_str() {
                "cpu" => cap.cpu_milli,
                "memory" => cap.memory_bytes,
                "pods" => site.max_concurrent_pods.unwrap_or(cap.pods).min(cap.pods),
                gpu => cap
                    .gpus
                    .get(gpu.split(' ').next().unwrap_or(gpu))
                    .copied()
                    .unwrap_or(0),
            };
            *needed > total
        }
        _ => false,
    }
}

/// Decides the check for a Workload in `namespace` (labelled `namespace_labels`) from its pod sets
/// and the sites: all of a pod set's pods must fit its site at once.
pub fn check(
    pod_sets: &[PodSet],
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    sites: &[SiteSnapshot],
) -> Verdict {
    let (mut ready, mut retry, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    for ps in pod_sets {
        let Some(site) = &ps.site else { continue };
        let Some(snapshot) = sites.iter().find(|s| &s.name == site) else {
            rejected.push(format!("{}: site {site} does not exist", ps.name));
            continue;
        };
        let mut requests = Resources::default();
        for _ in 0..ps.count.max(1) {
            requests.add(&ps.per_pod);
        }
        requests.pods = ps.count.max(1);
        let needs = PodNeeds {
            namespace: namespace.into(),
            namespace_labels: namespace_labels.clone(),
            requests,
            pinned_site: Some(site.clone()),
            data: Vec::new(),
        };
        let policy = PolicyView {
            name: CONTROLLER_NAME.into(),
            ..PolicyView::default()
        };
        let decision = placement::place(&needs, &policy, std::slice::from_ref(snapshot), &[]);
        if decision.chosen.is_some() {
            ready.push(format!("{}: {} pod(s) fit {site}", ps.name, ps.count));
            continue;
        }
        let reasons = decision
            .rejected
            .get(site)
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let line = format!(
            "{}: {} pod(s) at {site}: {}",
            ps.name,
            ps.count,
            crate::placement::Rejections(reasons.clone())
        );
        if reasons.iter().any(|r| permanent(r, snapshot)) {
            rejected.push(line);
        } else {
            retry.push(line);
        }
    }
    if !rejected.is_empty() {
        Verdict::Rejected(rejected.join("; "))
    } else if !retry.is_empty() {
        Verdict::Retry(retry.join("; "))
    } else if ready.is_empty() {
        Verdict::Ready("no pod set on an offload site's flavor".into())
    } else {
        Verdict::Ready(ready.join("; "))
    }
}

fn api(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// The pod sets of a Workload with quota reserved (`status.admission`), each with its site.
pub fn pod_sets(workload: &Value) -> Vec<PodSet> {
    let specs = workload["spec"]["podSets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let assignments = workload["status"]["admission"]["podSetAssignments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assignments
        .iter()
        .filter_map(|a| {
            let name = a["name"].as_str()?.to_string();
            let spec = specs.iter().find(|s| s["name"] == name.as_str())?;
            let count = a["count"]
                .as_i64()
                .or_else(|| spec["count"].as_i64())
                .unwrap_or(1);
            let pod: k8s_openapi::api::core::v1::PodTemplateSpec =
                serde_json::from_value(spec["template"].clone()).ok()?;
            let per_pod = super::load::requests(&k8s_openapi::api::core::v1::Pod {
                spec: pod.spec,
                ..Default::default()
            });
            // Every resource of a pod set is assigned a flavor; a site's flavor is its Node's name.
            let site = a["flavors"]
                .as_object()
                .and_then(|f| f.values().find_map(|v| v.as_str().and_then(site_of_node)));
            Some(PodSet {
                name,
                count,
                per_pod,
                site: site.map(String::from),
            })
        })
        .collect()
}

/// Runs while this replica leads, with `--kueue`.
pub async fn run(ctx: Arc<Context>) {
    if !ctx.settings.kueue {
        return std::future::pending().await;
    }
    let checks: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &api("AdmissionCheck", "admissionchecks"));
    let workloads: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &api("Workload", "workloads"));
    // One watch of Workloads feeds a store (for the periodic pass) and the event-driven pass; the
    // list of our AdmissionChecks is refreshed on the tick, not per event.
    let writer = kube::runtime::reflector::store::Writer::<DynamicObject>::new(api("Workload", "workloads"));
    let store = writer.as_reader();
    let mut events = kube::runtime::reflector(writer, watcher(workloads, watcher::Config::default()))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut ours: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(w)) => review(&ctx, &ours, &w).await,
                Some(Err(e)) => tracing::debug!(error = %e, "Workload watch (are Kueue's CRDs installed?)"),
                None => return,
            },
            _ = tick.tick() => {
                ours = list_ours(&checks).await;
                activate(&checks, &ours).await;
                for w in store.state() {
                    review(&ctx, &ours, &w).await;
                }
            }
        }
    }
}

/// The names of the AdmissionChecks that name this controller.
async fn list_ours(checks: &Api<DynamicObject>) -> Vec<String> {
    match checks.list(&Default::default()).await {
        Ok(l) => l
            .items
            .iter()
            .filter(|c| c.data["spec"]["controllerName"] == CONTROLLER_NAME)
            .map(|c| c.name_any())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Marks our AdmissionChecks `Active` (Kueue leaves a ClusterQueue inactive until they are).
async fn activate(checks: &Api<DynamicObject>, ours: &[String]) {
    for name in ours {
        let Ok(current) = checks.get(name).await else {
            continue;
        };
        let active = current.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Active" && c["status"] == "True"));
        if active {
            continue;
        }
        let patch = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "AdmissionCheck", "metadata": {"name": name},
            "status": {"conditions": [{"type": "Active", "status": "True", "reason": "Active",
                "message": "offload-operator checks that the site of each offload flavor can run the pods",
                "lastTransitionTime": jiff::Timestamp::now().to_string(),
                "observedGeneration": current.metadata.generation.unwrap_or_default()}]}
        });
        if let Err(e) = checks
            .patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await
        {
            tracing::warn!(check = %name, error = %e, "cannot mark the AdmissionCheck active");
        }
    }
}

/// Decides and writes the state of our checks that are `Pending` on a Workload with quota.
async fn review(ctx: &Context, ours: &[String], w: &DynamicObject) {
    if w.data["status"]["admission"].is_null() {
        return;
    }
    let pending: Vec<String> = w.data["status"]["admissionChecks"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter(|c| c["state"] == "Pending")
                .filter_map(|c| c["name"].as_str().map(String::from))
                .filter(|n| ours.contains(n))
                .collect()
        })
        .unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    let ns = w.namespace().unwrap_or_default();
    let sets = pod_sets(&w.data);
    let sites = snapshots(ctx, &sets);
    let verdict = check(&sets, &ns, &ctx.namespace_labels(&ns), &sites);
    let now = jiff::Timestamp::now().to_string();
    let states: Vec<Value> = pending
        .iter()
        .map(|n| json!({"name": n, "state": verdict.state(), "message": verdict.message(), "lastTransitionTime": now}))
        .collect();
    let patch = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "Workload",
        "metadata": {"name": w.name_any(), "namespace": ns},
        "status": {"admissionChecks": states}
    });
    let namespaced: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ns, &api("Workload", "workloads"));
    match namespaced
        .patch_status(
            &w.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {
            ctx.metrics
                .admission_checks
                .with_label_values(&[verdict.state()])
                .inc();
            tracing::info!(workload = %format!("{ns}/{}", w.name_any()), state = verdict.state(), message = verdict.message(), "site capacity check");
        }
        Err(e) => {
            tracing::warn!(workload = %format!("{ns}/{}", w.name_any()), error = %e, "cannot write the site capacity check")
        }
    }
}

/// Snapshots of the sites the pod sets use, from the caches.
fn snapshots(ctx: &Context, sets: &[PodSet]) -> Vec<SiteSnapshot> {
    let now = jiff::Timestamp::now();
    sets.iter()
        .filter_map(|ps| ps.site.as_deref())
        .filter_map(|name| {
            let site = ctx.site(name)?;
            let node = node_name(name);
            let allocatable = ctx
                .nodes
                .store()
                .get(&kube::runtime::reflector::ObjectRef::new(&node))
                .and_then(|n| n.status.as_ref()?.allocatable.clone());
            let active = super::load::active_pods_cached(ctx.pods.store(), &node);
            Some(super::scheduler::snapshot::site(
                &site,
                allocatable.as_ref(),
                &active,
                now,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Architecture, SiteKind};

    fn site(name: &str, cpu: i64, free_cpu: i64, ready: bool) -> SiteSnapshot {
        let cap = Resources {
            cpu_milli: cpu * 1000,
            memory_bytes: 1 << 40,
            pods: 100,
            gpus: BTreeMap::new(),
        };
        let mut free = cap.clone();
        free.cpu_milli = free_cpu * 1000;
        SiteSnapshot {
            name: name.into(),
            labels: BTreeMap::new(),
            kind: SiteKind::Hpc,
            architecture: Architecture::default(),
            ready,
            cordoned: false,
            namespace_selector: Default::default(),
            relative_cost: 1000,
            max_concurrent_pods: None,
            active_pods: 0,
            pods_by_policy: BTreeMap::new(),
            capacity: cap,
            free,
            gpus: vec![],
            expected_wait_seconds: 0,
            not_starting: false,
            data: Default::default(),
        }
    }

    fn set(site: Option<&str>, count: i64, cpu: i64) -> PodSet {
        PodSet {
            name: "main".into(),
            count,
            per_pod: Resources {
                cpu_milli: cpu * 1000,
                memory_bytes: 1 << 30,
                pods: 1,
                gpus: BTreeMap::new(),
            },
            site: site.map(String::from),
        }
    }

    fn verdict(sets: &[PodSet], sites: &[SiteSnapshot]) -> Verdict {
        check(sets, "team-a", &BTreeMap::new(), sites)
    }

    #[test]
    fn all_pods_fitting_the_site_are_ready() {
        let v = verdict(&[set(Some("hpc"), 4, 1)], &[site("hpc", 8, 8, true)]);
        assert_eq!(v.state(), "Ready", "{v:?}");
    }

    #[test]
    fn a_site_too_small_for_all_pods_at_once_is_rejected_with_the_reason() {
        let v = verdict(&[set(Some("hpc"), 4, 4)], &[site("hpc", 8, 8, true)]);
        assert_eq!(v.state(), "Rejected", "{v:?}");
        assert!(v.message().contains("insufficient cpu"), "{}", v.message());
        assert!(v.message().contains("hpc"), "{}", v.message());
    }

    #[test]
    fn a_site_that_is_down_or_full_now_is_retried() {
        assert_eq!(
            verdict(&[set(Some("hpc"), 1, 1)], &[site("hpc", 8, 8, false)]).state(),
            "Retry"
        );
        let v = verdict(&[set(Some("hpc"), 2, 2)], &[site("hpc", 8, 1, true)]);
        assert_eq!(v.state(), "Retry", "{v:?}");
    }

    #[test]
    fn a_missing_site_is_rejected_and_other_flavors_are_not_checked() {
        assert_eq!(verdict(&[set(Some("gone"), 1, 1)], &[]).state(), "Rejected");
        assert_eq!(verdict(&[set(None, 100, 100)], &[]).state(), "Ready");
    }

    #[test]
    fn a_rejection_wins_over_a_retry() {
        let sets = [
            set(Some("hpc"), 1, 1),
            PodSet {
                name: "workers".into(),
                ..set(Some("htc"), 10, 1)
            },
        ];
        let v = verdict(&sets, &[site("hpc", 8, 8, false), site("htc", 4, 4, true)]);
        assert_eq!(v.state(), "Rejected", "{v:?}");
        assert!(v.message().starts_with("workers:"), "{}", v.message());
    }

    #[test]
    fn pod_sets_read_the_assignment_and_the_template() {
        let w = json!({
            "spec": {"podSets": [{"name": "main", "count": 3, "template": {"spec": {"containers": [
                {"name": "c", "image": "x", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}]}}}]},
            "status": {"admission": {"clusterQueue": "cq", "podSetAssignments": [
                {"name": "main", "count": 3, "flavors": {"cpu": "offload-hpc", "memory": "offload-hpc"}}]}}
        });
        let sets = pod_sets(&w);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].count, 3);
        assert_eq!(sets[0].per_pod.cpu_milli, 2000);
        assert_eq!(sets[0].site.as_deref(), Some("hpc"));
        let local = json!({
            "spec": {"podSets": [{"name": "main", "count": 1, "template": {"spec": {"containers": []}}}]},
            "status": {"admission": {"podSetAssignments": [{"name": "main", "count": 1, "flavors": {"cpu": "on-prem"}}]}}
        });
        assert_eq!(pod_sets(&local)[0].site, None);
    }
}
