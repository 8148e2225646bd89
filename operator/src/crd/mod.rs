//! The custom resources of `offload.dev/v1alpha1`: [`OffloadSite`], [`OffloadPolicy`] and
//! [`RemoteJob`], the annotations the product reads and writes, and the generated CRD YAML.
//!
//! Field docs become `kubectl explain` text; validation is in the schema (ranges, lengths, enums) and
//! in CEL rules the API server evaluates, so `kubectl apply` rejects a wrong manifest and names the
//! field. `docs/crds.md` is the reference.

// clippy reads the repeated `type_ = "string"` of several `printcolumn(...)` entries as duplicated
// attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod conditions;
pub mod data;
pub mod policy;
pub mod reference;
pub mod remote_job;
pub mod site;

pub use common::{Architecture, SiteKind};
pub use policy::{OffloadPolicy, OffloadPolicySpec, OffloadPolicyStatus};
pub use remote_job::{RemoteJob, RemoteJobSpec, RemoteJobStatus};
pub use site::{OffloadSite, OffloadSiteSpec, OffloadSiteStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every kind.
pub const GROUP: &str = "offload.dev";

/// Pod annotation: name of the `OffloadPolicy` that governs the pod (else the highest-priority
/// policy whose selectors match).
pub const ANNOTATION_POLICY: &str = "offload.dev/policy";
/// Pod annotation: pin the pod to this `OffloadSite`, bypassing scoring (filters still apply).
pub const ANNOTATION_SITE: &str = "offload.dev/site";
/// Pod annotation written by the operator: the remote job id the site returned from `/create`.
pub const ANNOTATION_REMOTE_ID: &str = "offload.dev/remote-id";
/// Pod annotation written by the operator: the placement explanation (chosen site, ranking,
/// reasons for rejected sites), as JSON.
pub const ANNOTATION_PLACEMENT: &str = "offload.dev/placement";
/// Pod annotation written by the operator just before it sends the pod to its site. After a
/// restart it says a create may have reached the site unrecorded, so the operator gives the site
/// time to show the pod (some sites show new pods only seconds later) before sending it again.
pub const ANNOTATION_CREATE_SENT: &str = "offload.dev/create-sent";
/// Pod annotation written by the operator: when the earliest service-account token it sent to the
/// site with the pod expires (RFC 3339). interLink has no way to refresh a running pod's files
/// (docs/adr/0005), so a `TokenExpiring` Warning Event says so before that time.
pub const ANNOTATION_TOKEN_EXPIRES: &str = "offload.dev/token-expires";
/// Pod annotation: comma-separated sites the pod must not be placed at (set by the RemoteJob
/// controller on a retry after site failures, so the retry fails over).
pub const ANNOTATION_EXCLUDE_SITES: &str = "offload.dev/exclude-sites";
/// Pod annotation set by the RemoteJob controller: the attempt's inputs and outputs as JSON (a
/// list of `{name, endpoint, bucket, key, bytes, output}`), for placement near the data.
pub const ANNOTATION_DATA: &str = "offload.dev/data";
/// Pod label set by the RemoteJob controller: the UID of the RemoteJob that owns the pod.
pub const LABEL_JOB_UID: &str = "offload.dev/remote-job-uid";
/// Pod label set by the RemoteJob controller: the RemoteJob's name (when it fits in a label).
pub const LABEL_JOB_NAME: &str = "offload.dev/remote-job";
/// Pod label set by the RemoteJob controller: the attempt's index (0 for the first).
pub const LABEL_ATTEMPT: &str = "offload.dev/attempt";

/// The three CRDs, in the order they are printed and installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![OffloadSite::crd(), OffloadPolicy::crd(), remote_job::crd()]
}

/// File name under `crds/` for a CRD: `<group>_<plural>.yaml`, as controller-gen names them.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// One CRD as YAML, as committed under `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd)
}

#[cfg(test)]
mod tests;
