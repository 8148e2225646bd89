//! Sites as the placement engine sees them, built from the caches (pure: the caller passes the
//! site, its Node's allocatable, its pods and the time).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::api::resource::Quantity};
use kube::ResourceExt;

use crate::{
    controller::load,
    crd::{ANNOTATION_PLACEMENT, OffloadSite, common::is_true, conditions},
    placement::{self, GpuOffer, Resources, SiteSnapshot, cost_milli, queue},
};

/// A pod this scheduler bound that the pod cache does not show bound yet (kube-scheduler's
/// "assumed" pods): it counts on its site and is not placed again until the cache catches up.
#[derive(Clone, Debug, PartialEq)]
pub struct Assumed {
    /// The site it was bound to.
    pub site: String,
    /// The policy that placed it.
    pub policy: String,
    /// What it requests.
    pub requests: Resources,
    /// The GPU model it uses, by resource.
    pub gpu_models: BTreeMap<String, String>,
}

/// The site as the engine sees it: its status, the capacity its Node advertises, and the load of
/// the `active` pods bound to it.
pub fn site(
    site: &OffloadSite,
    allocatable: Option<&BTreeMap<String, Quantity>>,
    active: &[Arc<Pod>],
    now: jiff::Timestamp,
) -> SiteSnapshot {
    let cap = allocatable.map(Resources::from_quantities).unwrap_or_default();
    let mut free = cap.clone();
    free.subtract(&load::total(active));
    let not_started = active.iter().filter(|p| load::phase(p) == "Pending").count() as i64;
    let status = site.status.clone().unwrap_or_default();
    let spec = &site.spec;
    let unstarted = load::longest_unstarted(active, now);
    let slots = spec.max_concurrent_pods.map(i64::from).unwrap_or(cap.pods);
    SiteSnapshot {
        name: site.name_any(),
        labels: spec.site_labels.clone(),
        kind: spec.kind,
        architecture: spec.architecture,
        ready: is_true(&status.conditions, conditions::READY),
        cordoned: spec.cordoned,
        namespace_selector: spec.namespace_selector.clone(),
        relative_cost: cost_milli(spec.relative_cost),
        max_concurrent_pods: spec.max_concurrent_pods.map(i64::from),
        active_pods: active.len() as i64,
        pods_by_policy: pods_by_policy(active),
        capacity: cap,
        free,
        gpus: spec
            .capacity
            .gpus
            .iter()
            .map(|g| GpuOffer {
                resource: g.resource_name.clone(),
                model: g.model.clone(),
                memory_bytes: g.memory_per_gpu.as_ref().map(|q| crate::quantity::int(&q.0)),
                free: i64::from(g.count) - used_by_model(active, &g.resource_name, &g.model),
            })
            .collect(),
        expected_wait_seconds: queue::with_unstarted(
            queue::expected_wait(
                spec.typical_queue_wait_seconds.map(i64::from),
                status.observed_queue_wait_seconds.map(|s| s as f64),
                not_started,
                slots,
            ),
            unstarted,
            i64::from(spec.status_sync_interval_seconds),
        ),
        not_starting: unstarted >= i64::from(spec.pod_start_timeout_seconds),
        data: site_data(spec.data.as_ref(), status.observed_remote_bandwidth),
    }
}

/// `spec.data` as placement weighs it (defaults when the site declares nothing), with the
/// measured bandwidth over the declared one.
pub fn site_data(
    data: Option<&crate::crd::data::SiteData>,
    observed: Option<i64>,
) -> placement::data::SiteData {
    let observed = observed.filter(|b| *b > 0);
    let Some(d) = data else {
        return placement::data::SiteData {
            bandwidth: observed.unwrap_or(placement::data::DEFAULT_BANDWIDTH),
            ..placement::data::SiteData::default()
        };
    };
    placement::data::SiteData {
        local: d
            .local_stores
            .iter()
            .map(|l| placement::data::LocalStore {
                endpoint: crate::crd::data::normalize_endpoint(&l.endpoint),
                buckets: l.buckets.clone(),
            })
            .collect(),
        bandwidth: observed
            .or_else(|| {
                d.remote_bandwidth
                    .as_ref()
                    .map(|q| crate::quantity::int(&q.0))
                    .filter(|b| *b > 0)
            })
            .unwrap_or(placement::data::DEFAULT_BANDWIDTH),
        external_access: d.external_access,
    }
}

/// Counts a pod placed on `site` by `policy`, using `gpu_models`, in the snapshots (a burst never
/// over-commits a site, nor one of its GPU models).
pub fn reserve(
    snapshots: &mut [SiteSnapshot],
    site: &str,
    policy: &str,
    r: &Resources,
    gpu_models: &BTreeMap<String, String>,
) {
    if let Some(s) = snapshots.iter_mut().find(|s| s.name == site) {
        s.free.subtract(r);
        s.active_pods += 1;
        *s.pods_by_policy.entry(policy.to_string()).or_default() += 1;
        for (resource, model) in gpu_models {
            let n = r.gpus.get(resource).copied().unwrap_or(0);
            for g in s
                .gpus
                .iter_mut()
                .filter(|g| &g.resource == resource && &g.model == model)
            {
                g.free -= n;
            }
        }
    }
}

/// Counts every assumed pod in the snapshots.
pub fn reserve_assumed(snapshots: &mut [SiteSnapshot], assumed: &HashMap<String, Assumed>) {
    for a in assumed.values() {
        reserve(snapshots, &a.site, &a.policy, &a.requests, &a.gpu_models);
    }
}

/// GPUs of `resource` that the `pods` use of `model`, as their placement recorded it.
fn used_by_model(pods: &[Arc<Pod>], resource: &str, model: &str) -> i64 {
    pods.iter()
        .filter(|p| {
            placement_of(p).is_some_and(|d| d.gpu_models.get(resource).map(String::as_str) == Some(model))
        })
        .map(|p| load::requests(p).gpus.get(resource).copied().unwrap_or(0))
        .sum()
}

/// What the pod's placement annotation says (policy, GPU models).
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PlacedBy {
    #[serde(default)]
    policy: String,
    #[serde(default, alias = "gpu_models")]
    gpu_models: BTreeMap<String, String>,
}

fn placement_of(pod: &Pod) -> Option<PlacedBy> {
    serde_json::from_str(pod.annotations().get(ANNOTATION_PLACEMENT)?).ok()
}

/// Forgets the assumed pods the cache now shows bound (they count through their Node) or no
/// longer has; `cached` maps UIDs to whether the cache shows the pod bound.
pub fn settle_assumed(assumed: &mut HashMap<String, Assumed>, cached: &HashMap<String, bool>) {
    assumed.retain(|uid, _| cached.get(uid) == Some(&false));
}

/// Pods by the policy that placed them, from their placement annotation (pods bound some other
/// way, e.g. interLink-style by kube-scheduler, count for no policy).
pub fn pods_by_policy(pods: &[Arc<Pod>]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for p in pods {
        if let Some(placed) = placement_of(p).filter(|d| !d.policy.is_empty()) {
            *out.entry(placed.policy).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn site_obj() -> OffloadSite {
        serde_json::from_value(
            json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
            "metadata": {"name": "hpc"},
            "spec": {"endpoint": "https://x", "namespaceSelector": {}, "typicalQueueWaitSeconds": 60},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "PingSucceeded",
                "message": "", "lastTransitionTime": "2026-12-03T10:00:00Z"}]}}),
        )
        .expect("site")
    }

    fn pod(uid: &str, cpu: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": uid, "uid": uid, "annotations": {
                "offload.dev/placement": "{\"policy\":\"gpu\"}"}},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
            "status": {"phase": phase}}))
        .expect("pod")
    }

    fn alloc() -> BTreeMap<String, Quantity> {
        [("cpu", "10"), ("memory", "10Gi"), ("pods", "5")]
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    }

    #[test]
    fn a_site_snapshot_counts_its_pods_against_its_node_s_capacity() {
        let now: jiff::Timestamp = "2026-12-03T10:00:00Z".parse().expect("time");
        let s = site(
            &site_obj(),
            Some(&alloc()),
            &[pod("a", "2", "Running"), pod("b", "1", "Pending")].map(Arc::new),
            now,
        );
        assert!(s.ready);
        assert_eq!((s.free.cpu_milli, s.free.pods, s.active_pods), (7000, 3, 2));
        assert_eq!(s.pods_by_policy.get("gpu"), Some(&2));
        let none = site(&site_obj(), None, &[], now);
        assert_eq!(none.capacity, Resources::default(), "no Node yet: no capacity");
    }

    #[test]
    fn assumed_pods_count_until_the_cache_shows_them_bound() {
        let now: jiff::Timestamp = "2026-12-03T10:00:00Z".parse().expect("time");
        let mut snaps = vec![site(&site_obj(), Some(&alloc()), &[], now)];
        let mut assumed = HashMap::from([(
            "u1".to_string(),
            Assumed {
                site: "hpc".into(),
                policy: "gpu".into(),
                requests: load::requests(&pod("u1", "4", "Pending")),
                gpu_models: BTreeMap::new(),
            },
        )]);
        reserve_assumed(&mut snaps, &assumed);
        assert_eq!((snaps[0].free.cpu_milli, snaps[0].free.pods), (6000, 4));
        settle_assumed(&mut assumed, &HashMap::from([("u1".to_string(), false)]));
        assert_eq!(assumed.len(), 1, "still pending in the cache: still assumed");
        settle_assumed(&mut assumed, &HashMap::from([("u1".to_string(), true)]));
        assert!(
            assumed.is_empty(),
            "bound in the cache: counted through its Node now"
        );
        assumed.insert("u2".into(), snaps_assumed());
        settle_assumed(&mut assumed, &HashMap::new());
        assert!(assumed.is_empty(), "gone from the cache: forgotten");
    }

    #[test]
    fn gpus_in_use_count_against_the_model_their_placement_recorded() {
        let now: jiff::Timestamp = "2026-12-03T10:00:00Z".parse().expect("time");
        let mut s = site_obj();
        s.spec.capacity.gpus = serde_json::from_value(json!([
            {"model": "A100", "count": 8}, {"model": "T4", "count": 8}]))
        .expect("gpus");
        let gpu_pod = |uid: &str, model: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": uid, "uid": uid, "annotations": {
                    "offload.dev/placement": format!("{{\"policy\":\"p\",\"gpuModels\":{{\"nvidia.com/gpu\":\"{model}\"}}}}")}},
                "spec": {"containers": [{"name": "c", "resources": {"requests": {"nvidia.com/gpu": "3"}}}]},
                "status": {"phase": "Running"}}))
            .expect("pod")
        };
        let mut alloc = alloc();
        alloc.insert("nvidia.com/gpu".into(), Quantity("16".into()));
        let snap = site(
            &s,
            Some(&alloc),
            &[gpu_pod("a", "A100"), gpu_pod("b", "A100"), gpu_pod("c", "T4")].map(Arc::new),
            now,
        );
        let free: Vec<(&str, i64)> = snap.gpus.iter().map(|g| (g.model.as_str(), g.free)).collect();
        assert_eq!(free, [("A100", 2), ("T4", 5)]);
        assert_eq!(snap.free.gpus["nvidia.com/gpu"], 7);
        let mut snaps = vec![snap];
        let mut r = Resources::default();
        r.gpus.insert("nvidia.com/gpu".into(), 2);
        reserve(
            &mut snaps,
            "hpc",
            "p",
            &r,
            &BTreeMap::from([("nvidia.com/gpu".to_string(), "A100".to_string())]),
        );
        assert_eq!(snaps[0].gpus[0].free, 0, "a reservation takes its model's GPUs");
    }

    fn snaps_assumed() -> Assumed {
        Assumed {
            site: "hpc".into(),
            policy: "gpu".into(),
            requests: Resources::default(),
            gpu_models: BTreeMap::new(),
        }
    }
}
