//! The placement engine: pure and synchronous (no I/O, no clock). Given a pod's needs, the
//! governing policy and a snapshot of the sites, it filters the sites, scores the rest, applies the
//! policy's strategy and explains the choice: the chosen site, the ranking with scores, and for every
//! rejected site the first filter it failed.

pub mod data;
mod engine;
pub mod queue;
pub mod resources;
pub mod selector;

use std::collections::BTreeMap;

pub use engine::{gpu_models, place};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};

use crate::crd::{
    Architecture, SiteKind,
    policy::{Requirements, Strategy, Weights},
};

/// Amounts of the resources placement tracks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_milli: i64,
    /// Memory in bytes.
    pub memory_bytes: i64,
    /// Pods.
    pub pods: i64,
    /// Extended resources (GPUs) by name.
    pub gpus: BTreeMap<String, i64>,
}

/// What a pod needs and where it comes from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodNeeds {
    /// The pod's namespace.
    pub namespace: String,
    /// Labels of that namespace (for the sites' tenancy selectors).
    pub namespace_labels: BTreeMap<String, String>,
    /// Summed container requests (the pod counts as one pod).
    pub requests: Resources,
    /// `offload.dev/site`: only this site may be chosen (filters still apply).
    pub pinned_site: Option<String>,
    /// Objects the pod reads and writes (`offload.dev/data`, set on RemoteJob attempts).
    pub data: Vec<data::DataObject>,
}

/// One GPU type a site offers.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuOffer {
    /// Extended resource name.
    pub resource: String,
    /// Model.
    pub model: String,
    /// Memory of one GPU, in bytes, when declared.
    pub memory_bytes: Option<i64>,
    /// GPUs of this model not used by pods placed on it (declared count minus the pods whose
    /// placement recorded this model); pods with no recorded model count only against the
    /// resource's total in [`SiteSnapshot::free`].
    pub free: i64,
}

/// A site as the engine sees it, built from its spec and observed state.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSnapshot {
    /// Site name.
    pub name: String,
    /// `spec.siteLabels`.
    pub labels: BTreeMap<String, String>,
    /// Kind.
    pub kind: SiteKind,
    /// Architecture.
    pub architecture: Architecture,
    /// Passes its health check.
    pub ready: bool,
    /// `spec.cordoned`.
    pub cordoned: bool,
    /// Namespaces allowed (tenancy).
    pub namespace_selector: LabelSelector,
    /// `spec.relativeCost` in thousandths (`0.5` is 500), so scores stay integer and exact.
    pub relative_cost: i64,
    /// `spec.maxConcurrentPods`.
    pub max_concurrent_pods: Option<i64>,
    /// Pods at the site now, including ones just bound and not yet reported.
    pub active_pods: i64,
    /// Pods at the site by the policy that placed them (for the spread strategy, which counts
    /// only the deciding policy's pods).
    pub pods_by_policy: BTreeMap<String, i64>,
    /// Capacity.
    pub capacity: Resources,
    /// Free capacity (capacity minus what is placed there, reservations included).
    pub free: Resources,
    /// GPU types offered.
    pub gpus: Vec<GpuOffer>,
    /// Expected queue wait before a new pod starts, in seconds (see [`queue::expected_wait`]),
    /// at least as long as the longest wait of a pod there that has not started.
    pub expected_wait_seconds: i64,
    /// A pod the site accepted has gone without starting past `podStartTimeoutSeconds`.
    pub not_starting: bool,
    /// Where the site has its data.
    pub data: data::SiteData,
}

/// A `relativeCost` in thousandths, as the engine compares costs. The CRD bounds it to
/// 0..=1,000,000; anything outside (or not a number) is clamped.
pub fn cost_milli(relative_cost: f64) -> i64 {
    if relative_cost.is_nan() {
        return 0;
    }
    (relative_cost.clamp(0.0, 1_000_000.0) * 1000.0).round() as i64
}

/// Whether the site offers a GPU model the policy allows (`gpuModels`), with at least
/// `minGpuMemory` per GPU: a policy about GPU pods lists only such sites as eligible.
pub fn offers_allowed_gpu(policy: &PolicyView, site: &SiteSnapshot) -> bool {
    site.gpus.iter().any(|g| {
        let models = &policy.requirements.gpu_models;
        (models.is_empty() || models.iter().any(|m| m.eq_ignore_ascii_case(&g.model)))
            && policy
                .min_gpu_memory_bytes
                .is_none_or(|min| g.memory_bytes.is_some_and(|m| m >= min))
    })
}

impl SiteSnapshot {
    /// Pods the policy `policy` has at the site.
    pub fn policy_pods(&self, policy: &str) -> i64 {
        self.pods_by_policy.get(policy).copied().unwrap_or(0)
    }
}

/// The policy as the engine uses it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyView {
    /// Policy name (for explanations).
    pub name: String,
    /// Candidate sites by `siteLabels`.
    pub site_selector: Option<LabelSelector>,
    /// Candidate sites by name, in order of preference.
    pub sites: Vec<String>,
    /// Hard requirements, with `minGpuMemory` in bytes.
    pub requirements: Requirements,
    /// `requirements.minGpuMemory`, parsed.
    pub min_gpu_memory_bytes: Option<i64>,
    /// Score weights.
    pub weights: Weights,
    /// Strategy.
    pub strategy: Strategy,
}

/// Why a site was not chosen: the first filter it failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum Rejection {
    /// The pod is pinned elsewhere.
    NotPinned,
    /// A previous attempt failed here (RemoteJob failover).
    Excluded,
    /// Not in the policy's `sites` or not matched by its `siteSelector`.
    NotSelectedByPolicy,
    /// Fails its health check.
    NotReady,
    /// `cordoned: true`.
    Cordoned,
    /// The pod's namespace may not use this site.
    NamespaceNotAllowed,
    /// The policy does not allow this kind of site.
    KindNotAllowed,
    /// The policy does not allow this architecture.
    ArchitectureNotAllowed,
    /// The site offers none of the allowed GPU models for this resource.
    NoAllowedGpuModel {
        /// Resource name.
        resource: String,
    },
    /// The site's GPUs have less memory than the policy requires.
    GpuMemoryTooSmall {
        /// Resource name.
        resource: String,
    },
    /// Not enough of a resource is free.
    Insufficient {
        /// `cpu`, `memory`, `pods` or a GPU resource name.
        resource: String,
        /// What the pod needs.
        needed: i64,
        /// What is free.
        free: i64,
    },
    /// The expected queue wait exceeds the policy's maximum.
    QueueTooLong {
        /// Expected seconds.
        expected: i64,
        /// Allowed seconds.
        max: i64,
    },
    /// The site's `maxConcurrentPods` is reached.
    ConcurrencyLimit {
        /// The limit.
        limit: i64,
    },
    /// A pod the site accepted has not started within `podStartTimeoutSeconds` (a black hole).
    PodsNotStarting,
    /// The site's pods cannot reach a store the pod reads or writes (no external access, and the
    /// store is not local there).
    DataUnreachable {
        /// The store's endpoint.
        endpoint: String,
        /// The bucket.
        bucket: String,
    },
    /// Feasible, but the ordered-fallback strategy took an earlier site.
    LaterInOrder,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::NotPinned => write!(f, "the pod is pinned to another site"),
            Rejection::Excluded => write!(f, "excluded after a failed attempt there"),
            Rejection::NotSelectedByPolicy => write!(f, "not a candidate of the policy"),
            Rejection::NotReady => write!(f, "site not ready"),
            Rejection::Cordoned => write!(f, "site cordoned"),
            Rejection::NamespaceNotAllowed => write!(f, "namespace not allowed by the site"),
            Rejection::KindNotAllowed => write!(f, "site kind not allowed by the policy"),
            Rejection::ArchitectureNotAllowed => write!(f, "architecture not allowed by the policy"),
            Rejection::NoAllowedGpuModel { resource } => write!(f, "no allowed GPU model for {resource}"),
            Rejection::GpuMemoryTooSmall { resource } => {
                write!(f, "{resource} memory below the policy's minimum")
            }
            Rejection::Insufficient {
                resource,
                needed,
                free,
            } => {
                write!(f, "insufficient {resource}: needs {needed}, {free} free")
            }
            Rejection::QueueTooLong { expected, max } => {
                write!(f, "expected queue wait {expected}s exceeds {max}s")
            }
            Rejection::ConcurrencyLimit { limit } => write!(f, "at its limit of {limit} concurrent pods"),
            Rejection::PodsNotStarting => write!(f, "accepted pods are not starting there"),
            Rejection::DataUnreachable { endpoint, bucket } => {
                write!(
                    f,
                    "cannot reach bucket {bucket} at {endpoint} (no external access)"
                )
            }
            Rejection::LaterInOrder => write!(f, "an earlier site in the policy's order fits"),
        }
    }
}

/// The score of one feasible site, each part normalised to 0..=1000 before weighting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ranked {
    /// Site.
    pub site: String,
    /// Weighted total (sum of weight × part).
    pub score: i64,
    /// Short queue (1000 = shortest).
    pub queue: i64,
    /// Low cost (1000 = cheapest).
    pub cost: i64,
    /// Free capacity left after placing the pod (1000 = all).
    pub free_capacity: i64,
    /// GPU fit (1000 = least waste).
    pub gpu_fit: i64,
    /// The expected queue wait the queue score was computed from, in seconds.
    #[serde(default)]
    pub expected_wait_seconds: i64,
    /// Short stage-in (1000 = shortest; every site 1000 for a pod without inputs).
    #[serde(default)]
    pub data: i64,
    /// The estimated stage-in time the data score was computed from, in seconds.
    #[serde(default)]
    pub stage_in_seconds: i64,
}

/// The engine's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The chosen site, if any fits.
    pub chosen: Option<String>,
    /// Policy that decided.
    pub policy: String,
    /// Feasible sites, best first.
    pub ranking: Vec<Ranked>,
    /// Every other site with every reason it failed, by site name.
    pub rejected: BTreeMap<String, Rejections>,
    /// The GPU model the pod uses at the chosen site, by GPU resource name (GPUs are counted
    /// per model: a site with 8 A100 and 8 T4 takes 8 A100 pods, not 16).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpu_models: BTreeMap<String, String>,
    /// The site the pod would have gone to without the data-locality score, when that differs
    /// from `chosen` (the data moved the placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_without_data: Option<String>,
}

/// Every reason one site was rejected, in filter order (never empty in a [`Decision`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rejections(pub Vec<Rejection>);

impl Rejections {
    /// The first reason.
    pub fn first(&self) -> Option<&Rejection> {
        self.0.first()
    }
}

impl std::fmt::Display for Rejections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl Decision {
    /// One line per rejected site: `site: reason`, for conditions and Events.
    pub fn rejection_summary(&self) -> String {
        self.rejected
            .iter()
            .map(|(s, r)| format!("{s}: {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests;
