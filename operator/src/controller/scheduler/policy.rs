//! Which policy governs a pod, and what the pod needs (pure).

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::{
    controller::load,
    crd::{
        ANNOTATION_DATA, ANNOTATION_EXCLUDE_SITES, ANNOTATION_POLICY, ANNOTATION_SITE, OffloadPolicy,
        OffloadSite,
    },
    placement::{self, PodNeeds, PolicyView},
};

/// What `pod`, in a namespace with these labels, needs from a site.
pub fn needs(pod: &Pod, namespace_labels: BTreeMap<String, String>) -> PodNeeds {
    PodNeeds {
        namespace: pod.namespace().unwrap_or_default(),
        namespace_labels,
        requests: load::requests(pod),
        pinned_site: pod.annotations().get(ANNOTATION_SITE).cloned(),
        data: data_objects(pod),
    }
}

/// The objects a RemoteJob attempt reads and writes (`offload.dev/data`); none when the
/// annotation is absent or not understood (the pod is then placed as if it had no data).
pub fn data_objects(pod: &Pod) -> Vec<placement::data::DataObject> {
    pod.annotations()
        .get(ANNOTATION_DATA)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// Sites the pod must avoid (`offload.dev/exclude-sites`, set on RemoteJob retries).
pub fn excluded(pod: &Pod) -> Vec<String> {
    pod.annotations()
        .get(ANNOTATION_EXCLUDE_SITES)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// For a sharded operator (`--site-selector`): whether the pod's named policy or pinned site is
/// one this operator manages. A pod naming neither is placed by any shard with a site for it.
pub fn in_shard(pod: &Pod, sites: &[Arc<OffloadSite>], policies: &[Arc<OffloadPolicy>]) -> bool {
    let a = pod.annotations();
    a.get(ANNOTATION_POLICY)
        .is_none_or(|n| policies.iter().any(|p| &p.name_any() == n))
        && a.get(ANNOTATION_SITE)
            .is_none_or(|n| sites.iter().any(|s| &s.name_any() == n))
}

/// Whether the pod names a policy or pins a site: in a sharded operator, only such a pod belongs
/// to one shard for certain. One naming neither may be placed by any shard, so no shard fails it
/// when nothing of its own fits (`whenNothingFits: Fail` applies to pinned pods only).
pub fn pinned(pod: &Pod) -> bool {
    let a = pod.annotations();
    a.contains_key(ANNOTATION_POLICY) || a.contains_key(ANNOTATION_SITE)
}

/// The named policy (when the pod may use it), else the highest-priority matching one, else the
/// built-in default (every site, default weights).
pub fn choose_policy(
    pod: &Pod,
    needs: &PodNeeds,
    policies: &[Arc<OffloadPolicy>],
) -> Result<PolicyView, String> {
    let requests_mismatch = |p: &OffloadPolicy| {
        p.spec
            .pod_requests
            .as_ref()
            .and_then(|r| placement::selector::requests_mismatch(r, &needs.requests))
    };
    let governs = |p: &OffloadPolicy| {
        p.spec
            .namespace_selector
            .as_ref()
            .is_none_or(|s| placement::selector::matches(s, &needs.namespace_labels))
            && p.spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| placement::selector::matches(s, pod.labels()))
            && requests_mismatch(p).is_none()
    };
    if let Some(name) = pod.annotations().get(ANNOTATION_POLICY) {
        let Some(p) = policies.iter().find(|p| &p.name_any() == name) else {
            return Err(format!(
                "the pod names OffloadPolicy {name:?}, which does not exist"
            ));
        };
        if !p
            .spec
            .namespace_selector
            .as_ref()
            .is_none_or(|s| placement::selector::matches(s, &needs.namespace_labels))
        {
            return Err(format!(
                "OffloadPolicy {name:?} does not allow namespace {:?}",
                needs.namespace
            ));
        }
        if let Some(why) = requests_mismatch(p) {
            return Err(format!("the pod names OffloadPolicy {name:?}, but {why}"));
        }
        return Ok(view(p));
    }
    let mut matching: Vec<&Arc<OffloadPolicy>> = policies.iter().filter(|p| governs(p)).collect();
    matching.sort_by(|a, b| {
        (std::cmp::Reverse(a.spec.priority), a.name_any())
            .cmp(&(std::cmp::Reverse(b.spec.priority), b.name_any()))
    });
    Ok(matching.first().map(|p| view(p)).unwrap_or_else(|| PolicyView {
        name: "default".into(),
        ..PolicyView::default()
    }))
}

pub fn view(p: &OffloadPolicy) -> PolicyView {
    PolicyView {
        name: p.name_any(),
        site_selector: p.spec.site_selector.clone(),
        sites: p.spec.sites.clone(),
        requirements: p.spec.requirements.clone(),
        min_gpu_memory_bytes: p
            .spec
            .requirements
            .min_gpu_memory
            .as_ref()
            .map(|q| crate::quantity::int(&q.0)),
        weights: p.spec.weights.clone(),
        strategy: p.spec.strategy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "annotations": annotations}}))
            .expect("pod")
    }

    fn named<K: serde::de::DeserializeOwned>(kind: &str, name: &str) -> Arc<K> {
        Arc::new(
            serde_json::from_value(
                serde_json::json!({"apiVersion": "offload.dev/v1alpha1", "kind": kind,
                "metadata": {"name": name}, "spec": {"endpoint": "https://x", "namespaceSelector": {}}}),
            )
            .expect("object"),
        )
    }

    #[test]
    fn only_a_pod_naming_a_policy_or_a_site_belongs_to_one_shard() {
        let sites = [named::<OffloadSite>("OffloadSite", "hpc")];
        let policies = [named::<OffloadPolicy>("OffloadPolicy", "gpu")];
        let free = pod(serde_json::json!({}));
        assert!(!pinned(&free));
        assert!(in_shard(&free, &sites, &policies), "any shard may place it");
        let mine = pod(serde_json::json!({ANNOTATION_POLICY: "gpu"}));
        assert!(pinned(&mine) && in_shard(&mine, &sites, &policies));
        let theirs = pod(serde_json::json!({ANNOTATION_SITE: "htc"}));
        assert!(pinned(&theirs) && !in_shard(&theirs, &sites, &policies));
    }
}
