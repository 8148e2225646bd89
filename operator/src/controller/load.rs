//! What is running on a site's virtual Node: the pods bound there and what they request.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{Api, Client, api::ListParams};

use crate::{placement::Resources, quantity};

/// The pod's phase; a pod without one (just created, no status yet) is `Pending`.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether the pod has finished (its resources are free again).
pub fn is_finished(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Pods bound to `node` that have not finished.
pub async fn active_pods(client: &Client, node: &str) -> Result<Vec<Arc<Pod>>, kube::Error> {
    let pods: Api<Pod> = Api::all(client.clone());
    let bound = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    Ok(bound
        .items
        .into_iter()
        .filter(|p| !is_finished(p))
        .map(Arc::new)
        .collect())
}

/// Pods bound to `node` that have not finished, from the pod cache (no API call: for loops that
/// run every second).
pub fn active_pods_cached(store: &kube::runtime::reflector::Store<Pod>, node: &str) -> Vec<Arc<Pod>> {
    // Shared with the cache, not copied: this runs per site on every sync, probe and scheduling
    // round, and a deep copy of 1,000 pods costs more than the rest of the work.
    store
        .state()
        .into_iter()
        .filter(|p| bound_to(p, node) && !is_finished(p))
        .collect()
}

/// Whether the pod is bound to `node`.
pub fn bound_to(pod: &Pod, node: &str) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
}

/// How long, in seconds, the longest-waiting pod a site accepted has gone without starting: from
/// its `offload.dev/create-sent` time to `now` (0 when every accepted pod has started). A site
/// whose pods never start (a black hole) shows a value that grows without bound.
pub fn longest_unstarted(pods: &[Arc<Pod>], now: jiff::Timestamp) -> i64 {
    use kube::ResourceExt;

    use crate::crd::{ANNOTATION_CREATE_SENT, ANNOTATION_REMOTE_ID};
    pods.iter()
        .filter(|p| p.annotations().contains_key(ANNOTATION_REMOTE_ID) && phase(p) == "Pending")
        .filter_map(|p| {
            p.annotations()
                .get(ANNOTATION_CREATE_SENT)?
                .parse::<jiff::Timestamp>()
                .ok()
        })
        .map(|sent| now.duration_since(sent).as_secs().max(0))
        .max()
        .unwrap_or(0)
}

/// What the pod asks for: the larger of its app containers' summed requests and its largest init
/// container's (as kube-scheduler computes it); one pod.
pub fn requests(pod: &Pod) -> Resources {
    let mut total = Resources {
        pods: 1,
        ..Default::default()
    };
    let Some(spec) = &pod.spec else { return total };
    let add = |acc: &mut Resources, c: &Container| {
        for (k, q) in c.resources.iter().flat_map(|r| r.requests.iter().flatten()) {
            match k.as_str() {
                "cpu" => acc.cpu_milli += quantity::milli(&q.0),
                "memory" => acc.memory_bytes += quantity::int(&q.0),
                k if k.contains('/') => *acc.gpus.entry(k.into()).or_default() += quantity::int(&q.0),
                _ => {}
            }
        }
    };
    for c in &spec.containers {
        add(&mut total, c);
    }
    for c in spec.init_containers.iter().flatten() {
        let mut one = Resources::default();
        add(&mut one, c);
        total.cpu_milli = total.cpu_milli.max(one.cpu_milli);
        total.memory_bytes = total.memory_bytes.max(one.memory_bytes);
        for (g, n) in one.gpus {
            let e = total.gpus.entry(g).or_default();
            *e = (*e).max(n);
        }
    }
    total
}

/// The summed requests of `pods`.
pub fn total(pods: &[Arc<Pod>]) -> Resources {
    let each: Vec<Resources> = pods.iter().map(|p| requests(p)).collect();
    Resources::sum(&each)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn init_containers_count_at_their_peak() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"spec": {
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "4", "memory": "1Gi"}}}],
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}}},
                           {"name": "b", "resources": {"requests": {"cpu": "500m"}}}]}}))
        .expect("pod");
        let r = requests(&pod);
        assert_eq!((r.cpu_milli, r.memory_bytes, r.pods), (4000, 2 << 30, 1));
        assert_eq!(r.gpus.get("nvidia.com/gpu"), Some(&1));
        let pod = Arc::new(pod);
        let t = total(&[pod.clone(), pod]);
        assert_eq!((t.cpu_milli, t.pods), (8000, 2));
    }

    fn pod(sent: Option<&str>, remote: bool, phase: &str) -> Pod {
        let mut annotations = serde_json::Map::new();
        if let Some(t) = sent {
            annotations.insert("offload.dev/create-sent".into(), json!(t));
        }
        if remote {
            annotations.insert("offload.dev/remote-id".into(), json!("7"));
        }
        serde_json::from_value(json!({"metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": []}, "status": {"phase": phase}}))
        .expect("pod")
    }

    #[test]
    fn the_longest_unstarted_pod_counts_only_accepted_pods_that_have_not_started() {
        let now: jiff::Timestamp = "2026-12-03T10:10:00Z".parse().expect("time");
        let pods = [
            pod(Some("2026-12-03T10:00:00Z"), true, "Running"),
            pod(Some("2026-12-03T10:05:00Z"), true, "Pending"),
            pod(Some("2026-12-03T09:00:00Z"), false, "Pending"),
            pod(None, true, "Pending"),
        ]
        .map(Arc::new);
        // Only the second: the first runs, the third was never accepted, the fourth has no time.
        assert_eq!(longest_unstarted(&pods, now), 300);
        assert_eq!(longest_unstarted(&pods[..1], now), 0);
        assert_eq!(longest_unstarted(&[], now), 0);
    }
}
