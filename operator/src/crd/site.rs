//! `OffloadSite`: where a site is and what it offers (cluster-scoped).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Taint,
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{Condition, LabelSelector, Time},
    },
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    Architecture, ConfigMapKeyRef, SecretKeyRef, SiteKind, conditions_schema, quantity_schema,
};

/// A remote site reached through an interLink API server. The operator pings it, registers one
/// virtual Node for it, and places opted-in pods there.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "offload.dev",
    version = "v1alpha1",
    doc = "An OffloadSite is a remote site (SLURM, HTCondor, cloud, another cluster) reached through an interLink API server; the operator gives it a virtual Node and places opted-in pods there.",
    kind = "OffloadSite",
    plural = "offloadsites",
    shortname = "osite",
    category = "offload",
    status = "OffloadSiteStatus",
    derive = "PartialEq",
    printcolumn(name = "Kind", type_ = "string", json_path = ".spec.kind"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.activePods"),
    printcolumn(
        name = "Queue(s)",
        type_ = "integer",
        json_path = ".status.observedQueueWaitSeconds"
    ),
    printcolumn(name = "Cost", type_ = "number", json_path = ".spec.relativeCost"),
    printcolumn(name = "Cordoned", type_ = "boolean", json_path = ".spec.cordoned"),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.endpoint",
        priority = 1
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: it is the value of the offload.dev/site label and taint of the site's Node")
)]
#[x_kube(validation = Rule::new("!has(self.auth) || !has(self.auth.clientCertificate) || self.endpoint.startsWith('https://')")
    .message("auth.clientCertificate needs an https:// endpoint").field_path(".auth.clientCertificate"))]
#[x_kube(validation = Rule::new("!has(self.auth) || !has(self.auth.insecureSkipTLSVerify) || !self.auth.insecureSkipTLSVerify || self.endpoint.startsWith('https://')")
    .message("auth.insecureSkipTLSVerify only applies to an https:// endpoint").field_path(".auth"))]
#[serde(rename_all = "camelCase")]
pub struct OffloadSiteSpec {
    /// URL of the site's interLink API server: `https://host[:port][/prefix]`, `http://...` (trusted
    /// networks only: the bearer token travels in clear), or `unix:///path/to/socket`.
    #[x_kube(validation = Rule::new("self.startsWith('unix:///') || ((self.startsWith('https://') || self.startsWith('http://')) && isURL(self) && url(self).getHostname() != '')")
        .message("endpoint must be an http:// or https:// URL with a host, or a unix:/// socket path"))]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: String,

    /// How the operator authenticates to the site and verifies it. Secrets and ConfigMaps named here
    /// are read from the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SiteAuth>,

    /// What runs behind the API server: `HPC` (e.g. SLURM), `HTC` (e.g. HTCondor), `Cloud`, or
    /// `Kubernetes`.
    #[serde(default)]
    pub kind: SiteKind,

    /// CPU architecture of the site's worker nodes (`amd64`, `arm64`, `ppc64le`, `s390x`).
    #[serde(default)]
    pub architecture: Architecture,

    /// What the site can run at once. The site's ping answer overrides these numbers when it
    /// reports capacity.
    #[serde(default)]
    pub capacity: SiteCapacity,

    /// Free-form labels describing the site (e.g. `region: eu-west`, `facility: cineca`) that an
    /// OffloadPolicy's `siteSelector` matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub site_labels: BTreeMap<String, String>,

    /// Typical time, in seconds, a job waits in the site's queue before it starts. Combined with the
    /// wait the operator observes once pods run there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2_592_000))]
    pub typical_queue_wait_seconds: Option<i32>,

    /// Relative cost of running here; lower is cheaper. Only the ratio between sites matters. A
    /// decimal number (`0.5`, `1.25`, `300`), used to a thousandth.
    #[serde(default = "default_cost")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub relative_cost: f64,

    /// Most pods the operator keeps at the site at once (running or queued); unlimited when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_concurrent_pods: Option<i32>,

    /// Namespaces whose pods may run at this site, and so whose Secrets and ConfigMaps may be sent
    /// there. Required: `{}` allows every namespace.
    pub namespace_selector: LabelSelector,

    /// How the site's health is probed (`/pinglink`).
    #[serde(default)]
    pub health_check: HealthCheck,

    /// Seconds a pod the site accepted may go without starting. Past that the site is taken for
    /// one that does not start pods (a black hole): condition `PodsStarting=False`, and no new pods
    /// are placed there until its pods start or are deleted. Before that, the longest wait of an
    /// unstarted pod already counts as the site's expected queue wait.
    #[serde(default = "default_pod_start_timeout")]
    #[schemars(range(min = 5, max = 2_592_000))]
    pub pod_start_timeout_seconds: i32,

    /// Seconds between two status requests for all of the site's pods.
    #[serde(default = "default_sync_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub status_sync_interval_seconds: i32,

    /// Seconds a pod may be left out of the site's status answers (three answers in a row at
    /// least) before it is failed with reason `OffloadLost` (the site forgot its job). An answer
    /// with no entry at all (a plugin restarting answers with nothing for a while) is not proof:
    /// then the pods are failed only after ten times as long.
    #[serde(default = "default_lost_after")]
    #[schemars(range(min = 10, max = 86_400))]
    pub lost_after_seconds: i32,

    /// Extra labels and taints for the site's virtual Node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<VirtualNodeSpec>,

    /// When true, no new pods are placed here; pods already at the site keep running.
    #[serde(default)]
    pub cordoned: bool,

    /// Where the site has its data: the object stores it reads at local speed, its bandwidth to
    /// the others, and whether its pods reach them at all. Placement uses it for RemoteJobs with
    /// inputs and outputs (docs/data.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<super::data::SiteData>,
}

fn default_cost() -> f64 {
    100.0
}

fn default_pod_start_timeout() -> i32 {
    3600
}

fn default_sync_interval() -> i32 {
    5
}

fn default_lost_after() -> i32 {
    30
}

/// Credentials and TLS settings for one site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.insecureSkipTLSVerify) && self.insecureSkipTLSVerify && has(self.caBundle))")
    .message("caBundle and insecureSkipTLSVerify are mutually exclusive"))]
#[serde(rename_all = "camelCase")]
pub struct SiteAuth {
    /// Secret key holding the bearer token sent as `Authorization: Bearer <token>` (surrounding
    /// whitespace is trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SecretKeyRef>,
    /// CA certificates (PEM) that sign the site's serving certificate, instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundle>,
    /// Client certificate for mutual TLS: a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<TlsSecretRef>,
    /// Skip verification of the site's TLS certificate. Off by default; for test sites only.
    #[serde(default, rename = "insecureSkipTLSVerify")]
    pub insecure_skip_tls_verify: bool,
}

/// Where a CA bundle comes from: exactly one of `secret` and `configMap`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("has(self.secret) != has(self.configMap)")
    .message("set exactly one of caBundle.secret and caBundle.configMap"))]
#[serde(rename_all = "camelCase")]
pub struct CaBundle {
    /// Secret key holding PEM certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretKeyRef>,
    /// ConfigMap key holding PEM certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,
}

/// A `kubernetes.io/tls` Secret in the operator's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecretRef {
    /// Name of the Secret; its `tls.crt` and `tls.key` are used.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Declared capacity of a site.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteCapacity {
    /// CPU cores the operator may use at the site (a quantity: `512`, `1500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub cpu: Option<Quantity>,
    /// Memory the operator may use at the site (a quantity: `2Ti`, `512Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub memory: Option<Quantity>,
    /// Pods the site's virtual Node advertises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub pods: Option<i32>,
    /// GPUs by model (at most 8 models, each listed once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"]))]
    pub gpus: Vec<GpuCapacity>,
}

/// One kind of GPU a site offers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuCapacity {
    /// Extended resource name pods request, e.g. `nvidia.com/gpu` or `amd.com/gpu`.
    #[serde(default = "default_gpu_resource")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub resource_name: String,
    /// GPU model, e.g. `A100`, `H100`, `MI250X`; what policies' `gpuModels` match.
    #[schemars(length(min = 1, max = 63))]
    pub model: String,
    /// Number of GPUs of this model.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub count: i32,
    /// Memory of one GPU (a quantity: `80Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub memory_per_gpu: Option<Quantity>,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}

/// Health probing of a site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.timeoutSeconds) ? self.timeoutSeconds : 5) <= (has(self.intervalSeconds) ? self.intervalSeconds : 10)")
    .message("healthCheck.timeoutSeconds must not exceed healthCheck.intervalSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Seconds between two pings.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: i32,
    /// Seconds a ping may take before it counts as failed.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: i32,
    /// Consecutive failed pings after which the site is marked not ready.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval_seconds: default_interval(),
            timeout_seconds: default_timeout(),
            failure_threshold: default_threshold(),
        }
    }
}

fn default_interval() -> i32 {
    10
}
fn default_timeout() -> i32 {
    5
}
fn default_threshold() -> i32 {
    3
}

/// Extra metadata for the site's virtual Node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeSpec {
    /// Labels added to the Node (the operator's own `offload.dev/site` label always wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
    /// Taints added to the Node, besides `offload.dev/site=<site>:NoSchedule` and interLink's
    /// `virtual-node.interlink/no-schedule=true:NoSchedule`. Each key and effect at most once;
    /// effects are `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["key", "effect"]))]
    #[x_kube(validation = Rule::new("self.all(t, t.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])")
        .message("a taint effect must be NoSchedule, PreferNoSchedule or NoExecute"))]
    pub taints: Vec<Taint>,
    /// Apply `NoExecute` taints that the site's ping asks for (interLink 0.6.2 sends `taints`)
    /// as `NoExecute`: the site's admin or plugin can then make Kubernetes evict every running pod
    /// here that does not tolerate them, and their jobs are deleted. Off by default: they are
    /// applied as `NoSchedule` (no new pods, running pods kept) and the `SiteTaintsApplied`
    /// condition says so. Taints declared in `taints` above are always applied as written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_site_eviction: bool,
}

/// Observed state of a site, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OffloadSiteStatus {
    /// `Ready` (the site answers its health check) and others, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the site was last pinged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
    /// Round-trip time of the last successful ping, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_latency_milliseconds: Option<i64>,
    /// Bytes per second the operator measured staging RemoteJob inputs in from stores that are not
    /// local to the site (a moving average over stage-ins of at least 16 MiB and 5 s). Placement uses it
    /// instead of `spec.data.remoteBandwidth` once it is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_remote_bandwidth: Option<i64>,
    /// Observed time from `/create` to first Running, averaged, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_queue_wait_seconds: Option<i64>,
    /// Pods the operator has at the site (queued or running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_pods: Option<i32>,
    /// Resources requested by the pods at the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<ResourceAmounts>,
    /// Capacity minus allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<ResourceAmounts>,
    /// Name of the site's virtual Node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node_name: Option<String>,
    /// A human-readable summary of the site's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub message: Option<String>,
}

/// An amount of each resource the operator tracks.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    /// CPU (a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub cpu: Option<Quantity>,
    /// Memory (a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub memory: Option<Quantity>,
    /// Pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<i32>,
    /// GPUs by resource name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub gpus: BTreeMap<String, i32>,
}
