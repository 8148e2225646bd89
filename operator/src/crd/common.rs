//! Types shared by several kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// What kind of system runs behind a site's interLink API server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SiteKind {
    /// An HPC batch system such as SLURM; usually long queues and GPUs.
    #[default]
    #[serde(rename = "HPC")]
    Hpc,
    /// A high-throughput system such as HTCondor; many CPUs, opportunistic.
    #[serde(rename = "HTC")]
    Htc,
    /// A cloud provider's batch or container service.
    Cloud,
    /// Another Kubernetes cluster.
    Kubernetes,
}

/// CPU architecture, named as in the `kubernetes.io/arch` node label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// x86-64.
    #[default]
    Amd64,
    /// 64-bit ARM.
    Arm64,
    /// 64-bit POWER, little endian.
    Ppc64le,
    /// IBM Z.
    S390x,
}

/// A key of a Secret in the operator's own namespace (site credentials live next to the operator,
/// so its Secret read access is confined to one namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A key of a ConfigMap in the operator's own namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the ConfigMap's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Schema of a Kubernetes quantity field (`64`, `500m`, `256Gi`): an integer or a string that must
/// parse as a non-negative quantity. k8s-openapi's own schema carries a 3 kB description and no
/// validation, so quantity fields use this one.
pub fn quantity_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 64}],
        "x-kubernetes-validations": [{
            "rule": "isQuantity(string(self)) && !string(self).startsWith('-')",
            "message": "must be a non-negative Kubernetes quantity such as 64, 500m or 256Gi"
        }]
    })
}

/// Schema of a status `conditions` list: a map keyed by `type`, at most 16 entries, as the
/// Kubernetes API conventions ask.
pub fn conditions_schema(g: &mut SchemaGenerator) -> Schema {
    let item = g.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "maxItems": 16,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}

/// Sets a condition in a list keyed by type, keeping `lastTransitionTime` when the status did not
/// change. Returns whether anything but `observedGeneration` changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    let message: String = message.chars().take(32 * 1024).collect();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status || c.reason != reason || c.message != message;
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: now.clone(),
            });
            true
        }
    }
}

/// Whether the condition of that type is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod condition_tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0 = Time("2026-01-01T00:00:00Z".parse().expect("t"));
        let t1 = Time("2026-01-01T00:01:00Z".parse().expect("t"));
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs,
            "Ready",
            false,
            "Probing",
            "first",
            Some(1),
            &t0
        ));
        assert!(set_condition(
            &mut cs,
            "Ready",
            false,
            "Timeout",
            "no answer",
            Some(1),
            &t1
        ));
        assert_eq!(cs[0].last_transition_time, t0, "same status: time kept");
        assert!(!set_condition(
            &mut cs,
            "Ready",
            false,
            "Timeout",
            "no answer",
            Some(2),
            &t1
        ));
        assert!(set_condition(
            &mut cs,
            "Ready",
            true,
            "PingSucceeded",
            "ok",
            Some(2),
            &t1
        ));
        assert_eq!(cs[0].last_transition_time, t1);
        assert!(is_true(&cs, "Ready"));
        assert_eq!(cs.len(), 1);
    }
}
