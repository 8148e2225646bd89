//! `RemoteJob`: one job for a workflow engine to create and watch, with retries and failover
//! across sites (namespaced).

use k8s_openapi::{
    api::core::v1::PodTemplateSpec,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    common::conditions_schema,
    data::{Artifact, ArtifactStatus, InputFrom},
};

/// A job run at a remote site: the operator creates one pod per attempt from `template`, places it
/// (by `policy`, or at the pinned `site`), retries failed attempts and fails over to another site
/// after a site failure.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "offload.dev",
    version = "v1alpha1",
    doc = "A RemoteJob runs one pod template at a remote site, with retries and failover across sites, for workflow engines.",
    kind = "RemoteJob",
    plural = "remotejobs",
    shortname = "rjob",
    category = "offload",
    namespaced,
    status = "RemoteJobStatus",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Site", type_ = "string", json_path = ".status.site"),
    printcolumn(name = "Attempts", type_ = "integer", json_path = ".status.attemptCount"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.pod", priority = 1),
    printcolumn(
        name = "Remote ID",
        type_ = "string",
        json_path = ".status.remoteId",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!(has(self.site) && has(self.policy))")
    .message("set at most one of site and policy: a pinned site bypasses policy selection").field_path(".site"))]
#[x_kube(validation = Rule::new("has(self.template.spec) && self.template.spec.containers.size() > 0")
    .message("template.spec.containers must list at least one container").field_path(".template.spec.containers"))]
#[x_kube(validation = Rule::new("!has(self.template.spec) || !has(self.template.spec.restartPolicy) || self.template.spec.restartPolicy == 'Never'")
    .message("template.spec.restartPolicy must be Never (retries are the RemoteJob's job)").field_path(".template.spec.restartPolicy"))]
#[x_kube(validation = Rule::new("!has(self.inputsFrom) || !has(self.inputs) || self.inputsFrom.all(f, !self.inputs.exists(i, i.name == f.name))")
    .message("an inputsFrom entry has the name of an input: input names must be unique").field_path(".inputsFrom"))]
#[x_kube(validation = Rule::new("!has(self.outputs) || size(self.outputs) == 0 || (has(self.template.spec) && size(self.template.spec.containers) > 0 && has(self.template.spec.containers[0].command))")
    .message("with outputs, the first container must set command: the operator runs it under the stage tool, which uploads the outputs when it ends").field_path(".template.spec.containers"))]
#[serde(rename_all = "camelCase")]
pub struct RemoteJobSpec {
    /// The pod to run. The operator sets `schedulerName: offload-scheduler`, `restartPolicy: Never`,
    /// an owner reference and labels linking the pod to this job and attempt.
    pub template: PodTemplateSpec,

    /// Name of the OffloadPolicy that places the pods; by default the policy that matches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub policy: Option<String>,

    /// Name of the OffloadSite every attempt runs at (no placement, no failover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub site: Option<String>,

    /// Attempts allowed after the first one fails.
    #[serde(default = "default_retry_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub retry_limit: i32,

    /// After a site failure, retry at a site that has not failed this job yet.
    #[serde(default = "default_true")]
    pub failover: bool,

    /// Seconds to wait before the first retry; each further retry waits twice as long, up to
    /// one hour.
    #[serde(default = "default_backoff_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub backoff_seconds: i32,

    /// Seconds an attempt may wait on a site that is not ready (unreachable, or refusing to take
    /// the pod with retryable errors) before the attempt counts as a site failure and is retried
    /// elsewhere.
    #[serde(default = "default_site_failure_grace_seconds")]
    #[schemars(range(min = 1, max = 86_400))]
    pub site_failure_grace_seconds: i32,

    /// Seconds the job may run, counted from its first attempt's start; then it fails with reason
    /// `DeadlineExceeded` and its running attempt is deleted at its site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the job finished when it is deleted with its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// While true, no attempt is created and a running attempt is deleted, as for Kubernetes Jobs.
    #[serde(default)]
    pub suspend: bool,

    /// Objects the job reads: fetched to `/var/run/offload/inputs/<name>` before its containers start. A
    /// missing one fails the job with reason `InputMissing`. Placement prefers sites where they
    /// are local (`OffloadSite.spec.data`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub inputs: Vec<Artifact>,

    /// Inputs that are other RemoteJobs' outputs: the job waits (condition `WaitingForInputs`)
    /// until those have succeeded, then is placed seeing where their outputs are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub inputs_from: Vec<InputFrom>,

    /// Objects the job writes: each file the first container leaves at `/var/run/offload/outputs/<name>`
    /// is uploaded when it ends, whether it succeeded or failed, with its SHA-256; `status.outputs`
    /// lists them. An upload that still fails after retries fails the attempt with reason
    /// `OutputUploadFailed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub outputs: Vec<Artifact>,
}

fn default_retry_limit() -> i32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_backoff_seconds() -> i32 {
    10
}
fn default_site_failure_grace_seconds() -> i32 {
    300
}

/// The RemoteJob CRD. The pod template's schema is Kubernetes' own; its descriptions are dropped
/// (as controller-gen's `maxDescLen=0` does) so the CRD stays small enough for client-side
/// `kubectl apply`; `kubectl explain pod.spec` documents those fields.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = RemoteJob::crd();
    for version in &mut crd.spec.versions {
        let template = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|root| root.properties.as_mut())
            .and_then(|p| p.get_mut("spec"))
            .and_then(|spec| spec.properties.as_mut())
            .and_then(|p| p.get_mut("template"));
        if let Some(template) = template {
            let keep = template.description.take();
            strip_descriptions(template);
            template.description = keep;
        }
    }
    crd
}

fn strip_descriptions(schema: &mut JSONSchemaProps) {
    schema.description = None;
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_descriptions(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_descriptions(items);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        strip_descriptions(extra);
    }
    for sub in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flatten()
    {
        sub.iter_mut().for_each(strip_descriptions);
    }
}

/// Where a RemoteJob is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RemoteJobPhase {
    /// Waiting for an attempt to be placed (or for the retry backoff).
    #[default]
    Pending,
    /// The current attempt is bound to a site and queued there.
    Scheduled,
    /// The current attempt runs at its site.
    Running,
    /// An attempt completed successfully.
    Succeeded,
    /// The job failed for good: retries exhausted, deadline exceeded, or nowhere to run.
    Failed,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AttemptOutcome {
    /// Still in progress.
    Running,
    /// Every container exited 0.
    Succeeded,
    /// A container exited non-zero: the application failed.
    ApplicationFailure,
    /// The site refused or lost the pod, or stayed unreachable past the grace period.
    SiteFailure,
    /// The job's `activeDeadlineSeconds` passed.
    DeadlineExceeded,
    /// Deleted because the job was suspended or deleted.
    Cancelled,
}

/// One attempt of a RemoteJob.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// 0 for the first attempt.
    pub index: i32,
    /// Site the attempt was placed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Name of the attempt's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Remote job id at the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// When the attempt's pod was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    /// Why, in a word (e.g. `Error`, `SiteUnreachable`, `CreateRefused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub reason: Option<String>,
    /// Exit code of the first container that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What happened, in a sentence (e.g. the site's error text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub message: Option<String>,
}

/// Observed state of a RemoteJob, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteJobStatus {
    /// Summary of where the job is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RemoteJobPhase>,
    /// `Scheduled`, `Running`, `Complete`, `Failed` and `Suspended` (so `kubectl wait
    /// --for=condition=Complete` works).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Site of the current (or last) attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Pod of the current (or last) attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Remote job id of the current (or last) attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// Number of attempts so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_count: Option<i32>,
    /// The attempts, oldest first (the last 100; `attemptCount` counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 101))]
    pub attempts: Vec<Attempt>,
    /// Exit code of the last finished attempt (the first container that failed, else 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// A human-readable summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub message: Option<String>,
    /// The `inputsFrom` entries, resolved once their RemoteJobs succeeded (kept if those are
    /// deleted later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub inputs: Vec<ArtifactStatus>,
    /// The outputs of the attempt that succeeded (or of the last one that failed), with size and
    /// checksum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub outputs: Vec<ArtifactStatus>,
}
