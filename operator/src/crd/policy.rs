//! `OffloadPolicy`: which pods go where, and how sites are ranked (cluster-scoped).

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{Condition, LabelSelector},
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Architecture, SiteKind, conditions_schema, quantity_schema};

/// Governs the placement of the pods it selects: candidate sites, hard requirements, how the
/// remaining sites are scored, and what happens when none fits.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "offload.dev",
    version = "v1alpha1",
    doc = "An OffloadPolicy decides where the pods it selects are offloaded: candidate sites, requirements, score weights and strategy.",
    kind = "OffloadPolicy",
    plural = "offloadpolicies",
    shortname = "opol",
    category = "offload",
    status = "OffloadPolicyStatus",
    derive = "PartialEq",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.strategy"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Eligible", type_ = "string", json_path = ".status.eligibleSites"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.strategy) || self.strategy != 'OrderedFallback' || (has(self.sites) && self.sites.size() > 0)")
    .message("strategy OrderedFallback needs the ordered list in sites").field_path(".sites"))]
#[serde(rename_all = "camelCase")]
pub struct OffloadPolicySpec {
    /// Namespaces whose pods this policy governs; every namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Pods (by label) this policy governs; every pod of the selected namespaces when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Pods this policy governs by what they request (GPUs or none, named resources), so a "GPU
    /// pods" or "CPU-only pods" policy needs no labels on the pods. A pod that names this policy
    /// in `offload.dev/policy` but does not match is not placed (its condition says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_requests: Option<PodRequestSelector>,

    /// Among policies that match a pod, the highest priority governs it (ties: by name). A pod can
    /// also name its policy with the `offload.dev/policy` annotation.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Candidate sites by their `spec.siteLabels`; all sites when neither this nor `sites` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_selector: Option<LabelSelector>,

    /// Candidate sites by name. With strategy `OrderedFallback` this is the order of preference; with
    /// `siteSelector` too, a site must satisfy both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "minLength": 1, "maxLength": 253}))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t == s))").message("sites must not repeat a site"))]
    pub sites: Vec<String>,

    /// Hard requirements: a site that fails one is never chosen.
    #[serde(default)]
    pub requirements: Requirements,

    /// Weights of the normalised scores used to rank the sites that pass the filters.
    #[serde(default)]
    pub weights: Weights,

    /// How the ranking picks a site.
    #[serde(default)]
    pub strategy: Strategy,

    /// What happens to a pod when no site fits it.
    #[serde(default)]
    pub when_nothing_fits: WhenNothingFits,
}

/// Requirements a site must meet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requirements {
    /// GPU models a pod that requests GPUs may get (e.g. `A100`, `H100`); any model when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("items" = {"type": "string", "minLength": 1, "maxLength": 63}, "x-kubernetes-list-type" = "set"))]
    pub gpu_models: Vec<String>,
    /// Minimum memory per GPU (a quantity: `40Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub min_gpu_memory: Option<Quantity>,
    /// Longest expected queue wait, in seconds, a site may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2_592_000))]
    pub max_queue_wait_seconds: Option<i32>,
    /// Site kinds allowed; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub site_kinds: Vec<SiteKind>,
    /// Architectures allowed; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub architectures: Vec<Architecture>,
}

/// Score weights, each 0 to 100; at least one must be positive.
// The rule repeats the defaults so it also holds on a manifest before the API server defaults it
// (client-side checks, `kubectl apply --dry-run=client`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.queueTime) ? self.queueTime : 40) + (has(self.cost) ? self.cost : 20) + (has(self.freeCapacity) ? self.freeCapacity : 30) + (has(self.gpuFit) ? self.gpuFit : 10) + (has(self.dataLocality) ? self.dataLocality : 40) > 0")
    .message("at least one of weights.queueTime, cost, freeCapacity, gpuFit and dataLocality must be positive"))]
#[serde(rename_all = "camelCase")]
pub struct Weights {
    /// Weight of a short expected queue wait.
    #[serde(default = "default_queue_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub queue_time: i32,
    /// Weight of a low relative cost.
    #[serde(default = "default_cost_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub cost: i32,
    /// Weight of free capacity left after placing the pod.
    #[serde(default = "default_capacity_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub free_capacity: i32,
    /// Weight of a close GPU fit (the least GPU memory and count above what the pod needs).
    #[serde(default = "default_gpu_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub gpu_fit: i32,
    /// Weight of a short estimated stage-in time: the bytes of the pod's inputs that are not local
    /// to the site divided by the site's bandwidth to where they are (0 when all are local).
    #[serde(default = "default_data_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub data_locality: i32,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            queue_time: default_queue_weight(),
            cost: default_cost_weight(),
            free_capacity: default_capacity_weight(),
            gpu_fit: default_gpu_weight(),
            data_locality: default_data_weight(),
        }
    }
}

fn default_queue_weight() -> i32 {
    40
}
fn default_cost_weight() -> i32 {
    20
}
fn default_capacity_weight() -> i32 {
    30
}
fn default_data_weight() -> i32 {
    40
}
fn default_gpu_weight() -> i32 {
    10
}

/// Which pods a policy governs, by their resource requests. Every set field must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRequestSelector {
    /// `Required`: only pods that request a GPU (a resource whose name contains `gpu`, such as
    /// `nvidia.com/gpu` or `amd.com/gpu`); `None`: only pods that request no GPU; `Any` (default).
    #[serde(default)]
    pub gpus: GpuRequest,
    /// Only pods that request every one of these resources (e.g. `example.com/fpga`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("items" = {"type": "string", "minLength": 1, "maxLength": 253}, "x-kubernetes-list-type" = "set"))]
    pub resource_names: Vec<String>,
}

/// Whether a policy governs pods that request GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GpuRequest {
    /// Pods with or without GPUs.
    #[default]
    Any,
    /// Only pods that request at least one GPU.
    Required,
    /// Only pods that request no GPU.
    None,
}

/// How a site is picked among those that pass the filters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Strategy {
    /// The highest weighted score; ties broken by site name.
    #[default]
    BestScore,
    /// The site with the fewest of this policy's pods, then the best score: spreads load.
    Spread,
    /// The first site of `sites`, in order, that passes the filters.
    OrderedFallback,
}

/// What happens to a pod that no site can take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WhenNothingFits {
    /// Keep the pod Pending (`PodScheduled=False`) and retry as sites change, like kube-scheduler.
    #[default]
    Pending,
    /// Fail the pod at once, with the reasons in its status.
    Fail,
}

/// Observed state of a policy, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OffloadPolicyStatus {
    /// `Ready` when the policy is valid and at least one site is eligible.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Sites that currently pass the policy's site-level filters, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub eligible_sites: Vec<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
