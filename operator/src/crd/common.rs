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
