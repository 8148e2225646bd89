//! Label selector matching (`matchLabels` and `matchExpressions`), as the API server does it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector matches everything; an unknown operator
/// matches nothing (fail closed: tenancy and placement rules must never widen by mistake).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_label
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(&e.key),
                "DoesNotExist" => !labels.contains_key(&e.key),
                _ => false,
            }
        })
}

/// Whether a resource name is a GPU (`nvidia.com/gpu`, `amd.com/gpu`, `gpu.intel.com/i915`).
pub fn is_gpu_resource(name: &str) -> bool {
    name.contains("gpu")
}

/// Why a pod requesting `requests` is not governed by a policy's `podRequests`, or `None` when it
/// is.
pub fn requests_mismatch(
    selector: &crate::crd::policy::PodRequestSelector,
    requests: &super::Resources,
) -> Option<String> {
    use crate::crd::policy::GpuRequest;
    let gpus = requests
        .gpus
        .iter()
        .any(|(name, n)| *n > 0 && is_gpu_resource(name));
    match selector.gpus {
        GpuRequest::Required if !gpus => return Some("it governs only pods that request GPUs".into()),
        GpuRequest::None if gpus => return Some("it governs only pods that request no GPU".into()),
        _ => {}
    }
    let missing: Vec<&str> = selector
        .resource_names
        .iter()
        .filter(|r| match r.as_str() {
            "cpu" => requests.cpu_milli <= 0,
            "memory" => requests.memory_bytes <= 0,
            other => requests.gpus.get(other).is_none_or(|n| *n <= 0),
        })
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then(|| format!("it governs only pods that request {}", missing.join(", ")))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn operators() {
        let l = labels(&[("region", "eu-west"), ("tier", "gold")]);
        assert!(matches(&LabelSelector::default(), &l), "empty matches all");
        assert!(matches(
            &LabelSelector {
                match_labels: Some(labels(&[("tier", "gold")])),
                ..Default::default()
            },
            &l
        ));
        assert!(!matches(
            &LabelSelector {
                match_labels: Some(labels(&[("tier", "bronze")])),
                ..Default::default()
            },
            &l
        ));
        assert!(matches(&expr("region", "In", &["eu-west", "eu-south"]), &l));
        assert!(!matches(&expr("region", "NotIn", &["eu-west"]), &l));
        assert!(
            matches(&expr("zone", "NotIn", &["a"]), &l),
            "NotIn matches a missing key"
        );
        assert!(matches(&expr("tier", "Exists", &[]), &l));
        assert!(matches(&expr("zone", "DoesNotExist", &[]), &l));
        assert!(
            !matches(&expr("region", "Gt", &["1"]), &l),
            "unknown operators match nothing"
        );
    }

    #[test]
    fn policies_select_pods_by_what_they_request() {
        use crate::{
            crd::policy::{GpuRequest, PodRequestSelector},
            placement::Resources,
        };
        let cpu_only = Resources {
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            pods: 1,
            ..Default::default()
        };
        let mut gpu = cpu_only.clone();
        gpu.gpus.insert("nvidia.com/gpu".into(), 1);
        let mut fpga = cpu_only.clone();
        fpga.gpus.insert("example.com/fpga".into(), 1);
        let gpu_pods = PodRequestSelector {
            gpus: GpuRequest::Required,
            ..Default::default()
        };
        let cpu_pods = PodRequestSelector {
            gpus: GpuRequest::None,
            ..Default::default()
        };
        assert_eq!(requests_mismatch(&gpu_pods, &gpu), None);
        assert!(requests_mismatch(&gpu_pods, &cpu_only).is_some_and(|w| w.contains("request GPUs")));
        assert!(
            requests_mismatch(&gpu_pods, &fpga).is_some(),
            "an FPGA is not a GPU"
        );
        assert_eq!(requests_mismatch(&cpu_pods, &cpu_only), None);
        assert_eq!(requests_mismatch(&cpu_pods, &fpga), None);
        assert!(requests_mismatch(&cpu_pods, &gpu).is_some());
        let fpga_pods = PodRequestSelector {
            resource_names: vec!["example.com/fpga".into()],
            ..Default::default()
        };
        assert_eq!(requests_mismatch(&fpga_pods, &fpga), None);
        assert!(requests_mismatch(&fpga_pods, &gpu).is_some_and(|w| w.contains("example.com/fpga")));
        assert_eq!(
            requests_mismatch(&PodRequestSelector::default(), &cpu_only),
            None,
            "Any"
        );
    }
}
