//! interLink's JSON bodies, with its exact keys (`pkg/interlink/types.go`).
//!
//! Encoding emits exactly interLink's keys. Decoding of what a site sends is lenient where real
//! servers are: keys match case-insensitively (as Go's `encoding/json` does), `null` lists are empty,
//! `null` or zero timestamps are absent, and fields Python plugins omit default. It is strict where
//! leniency would lose data: a timestamp that does not parse is an error, not a silent `None`.

use std::collections::HashMap;

use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod, Secret},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time},
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Body of `POST /create`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodCreateRequests {
    /// The pod as the operator prepared it.
    pub pod: Pod,
    /// Every ConfigMap the pod mounts, in full.
    #[serde(default, deserialize_with = "null_as_default")]
    pub configmaps: Vec<ConfigMap>,
    /// Every Secret the pod mounts, in full (data base64-encoded, as in Kubernetes JSON).
    #[serde(default, deserialize_with = "null_as_default")]
    pub secrets: Vec<Secret>,
    /// One synthetic ConfigMap per projected or downwardAPI volume, named after the volume; its data
    /// maps each path to its content (service-account token, `ca.crt`, downward-API fields).
    #[serde(default, deserialize_with = "null_as_default")]
    pub projectedvolumesmaps: Vec<ConfigMap>,
    /// Job-script builder URL; empty when unused.
    #[serde(rename = "jobscriptURL", default)]
    pub jobscript_url: String,
}

/// Answer to `/create`: the pod's UID and its remote job id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateStruct {
    /// Pod UID.
    #[serde(rename = "PodUID", default)]
    pub pod_uid: String,
    /// Remote job id (a SLURM job id, an HTCondor cluster id, a PID...).
    #[serde(rename = "PodJID", default)]
    pub pod_jid: String,
}

/// One pod's state at the site, an element of every `/status` answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodStatus {
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Pod UID: how answers are matched to pods.
    #[serde(rename = "UID", default)]
    pub uid: String,
    /// Pod namespace.
    #[serde(default)]
    pub namespace: String,
    /// Remote job id; often empty (the SLURM plugin does not fill it).
    #[serde(rename = "JID", default, deserialize_with = "null_as_default")]
    pub jid: String,
    /// App containers.
    #[serde(default, deserialize_with = "null_as_default")]
    pub containers: Vec<ContainerStatus>,
    /// Init containers.
    #[serde(rename = "initContainers", default, deserialize_with = "null_as_default")]
    pub init_containers: Vec<ContainerStatus>,
}

impl PodStatus {
    /// Whether the site knows the pod: a job id, or any container in some state. interLink's
    /// SLURM plugin answers for a pod it never saw with an entry whose JID is empty and whose
    /// containers have an empty `state: {}`; such an entry means "unknown", not "created".
    pub fn is_known(&self) -> bool {
        !self.jid.is_empty()
            || self
                .containers
                .iter()
                .chain(&self.init_containers)
                .any(|c| !c.state.is_empty())
    }
}

impl ContainerState {
    /// No state at all (`{}`).
    pub fn is_empty(&self) -> bool {
        self.waiting.is_none() && self.running.is_none() && self.terminated.is_none()
    }
}

/// A container's state, as Kubernetes' `ContainerStatus` but with every field optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Current state; empty when the site does not know it yet.
    #[serde(default, deserialize_with = "null_as_default")]
    pub state: ContainerState,
    /// Previous state.
    #[serde(default, deserialize_with = "null_as_default")]
    pub last_state: ContainerState,
    /// Readiness as the site reports it.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ready: bool,
    /// Restarts at the site.
    #[serde(default, deserialize_with = "null_as_default")]
    pub restart_count: i32,
    /// Image.
    #[serde(default, deserialize_with = "null_as_default")]
    pub image: String,
    /// Image id.
    #[serde(rename = "imageID", default, deserialize_with = "null_as_default")]
    pub image_id: String,
}

/// One of waiting, running, terminated (none when unknown).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Not started yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<StateWaiting>,
    /// Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<StateRunning>,
    /// Finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<StateTerminated>,
}

/// Waiting state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateWaiting {
    /// Short reason.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub reason: String,
    /// Message.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub message: String,
}

/// Running state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateRunning {
    /// When it started.
    #[serde(rename = "startedAt", default, deserialize_with = "time_or_none")]
    pub started_at: Option<Time>,
}

/// Terminated state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateTerminated {
    /// Exit code.
    #[serde(default, deserialize_with = "null_as_default")]
    pub exit_code: i32,
    /// Signal, if killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Short reason.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub reason: String,
    /// Message.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub message: String,
    /// When it started.
    #[serde(default, deserialize_with = "time_or_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, deserialize_with = "time_or_none")]
    pub finished_at: Option<Time>,
}

/// Body of `/getLogs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogStruct {
    /// Pod namespace.
    #[serde(rename = "Namespace")]
    pub namespace: String,
    /// Pod UID (lowercase UUID).
    #[serde(rename = "PodUID")]
    pub pod_uid: String,
    /// Pod name.
    #[serde(rename = "PodName")]
    pub pod_name: String,
    /// Container name.
    #[serde(rename = "ContainerName")]
    pub container_name: String,
    /// Options.
    #[serde(rename = "Opts", default)]
    pub opts: LogOpts,
}

/// Options of a log request. interLink refuses `Tail` with `Bytes`, and `SinceSeconds` with
/// `SinceTime`; [`LogOpts::validate`] checks that before sending.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogOpts {
    /// Last N lines (0: all).
    #[serde(rename = "Tail", default, skip_serializing_if = "is_zero")]
    pub tail: i64,
    /// At most N bytes (0: no limit). interLink's key is `Bytes`, not `LimitBytes`.
    #[serde(
        rename = "Bytes",
        default,
        alias = "LimitBytes",
        skip_serializing_if = "is_zero"
    )]
    pub bytes: i64,
    /// Prefix lines with timestamps.
    #[serde(rename = "Timestamps", default)]
    pub timestamps: bool,
    /// Keep the stream open while the container runs.
    #[serde(rename = "Follow", default)]
    pub follow: bool,
    /// The previous instance's logs.
    #[serde(rename = "Previous", default)]
    pub previous: bool,
    /// Only the last N seconds (0: all).
    #[serde(rename = "SinceSeconds", default, skip_serializing_if = "is_zero")]
    pub since_seconds: i64,
    /// Only since this time.
    #[serde(
        rename = "SinceTime",
        default,
        deserialize_with = "time_or_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub since_time: Option<Time>,
}

impl LogOpts {
    /// The combinations interLink answers with 400.
    pub fn validate(&self) -> Result<(), String> {
        if self.tail != 0 && self.bytes != 0 {
            return Err("tail and limit-bytes cannot be used together".into());
        }
        if self.since_seconds != 0 && self.since_time.is_some() {
            return Err("since-seconds and since-time cannot be used together".into());
        }
        if self.tail < 0 || self.bytes < 0 || self.since_seconds < 0 {
            return Err("tail, limit-bytes and since-seconds must not be negative".into());
        }
        Ok(())
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Optional JSON body of `/pinglink` (interLink 0.6.2 and later).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PingResponse {
    /// Free-form status word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Capacity the site reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<PingResources>,
    /// When present (even empty), replaces the site's non-system taints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taints: Option<Vec<PingTaint>>,
}

/// Capacity in a ping answer; quantities are strings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PingResources {
    /// CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Quantity>,
    /// Accelerators by resource type.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub accelerators: Vec<PingAccelerator>,
}

/// One accelerator type in a ping answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PingAccelerator {
    /// Extended resource name, e.g. `nvidia.com/gpu`.
    #[serde(rename = "resourceType", default)]
    pub resource_type: String,
    /// How many (a quantity string).
    #[serde(default)]
    pub available: Option<Quantity>,
    /// Model, when the site says (an extension; interLink ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// One taint in a ping answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PingTaint {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    #[serde(default)]
    pub effect: String,
}

/// Every key a site's answer may carry, in interLink's spelling; decoding maps any case variant to it.
const CANONICAL_KEYS: &[&str] = &[
    "name",
    "UID",
    "namespace",
    "JID",
    "containers",
    "initContainers",
    "state",
    "lastState",
    "ready",
    "restartCount",
    "image",
    "imageID",
    "containerID",
    "started",
    "waiting",
    "running",
    "terminated",
    "reason",
    "message",
    "startedAt",
    "finishedAt",
    "exitCode",
    "signal",
    "PodUID",
    "PodJID",
    "status",
    "resources",
    "cpu",
    "memory",
    "pods",
    "accelerators",
    "resourceType",
    "available",
    "model",
    "taints",
    "key",
    "value",
    "effect",
];

/// Renames object keys that differ from a canonical key only in case (recursively).
pub fn canonicalize_keys(value: Value) -> Value {
    thread_local! {
        static BY_LOWER: HashMap<String, &'static str> =
            CANONICAL_KEYS.iter().map(|k| (k.to_ascii_lowercase(), *k)).collect();
    }
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = BY_LOWER.with(|m| m.get(&k.to_ascii_lowercase()).map(|c| c.to_string()));
                    (key.unwrap_or(k), canonicalize_keys(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(canonicalize_keys).collect()),
        other => other,
    }
}

/// Decodes a site's answer leniently (see the module docs).
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    serde_json::from_value(canonicalize_keys(value))
}

/// Decodes a body that must be one JSON object (serde would also take an array for a struct).
pub fn decode_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    if !value.is_object() {
        return Err(serde::de::Error::custom(format!(
            "expected a JSON object, got {}",
            kind_of(&value)
        )));
    }
    serde_json::from_value(canonicalize_keys(value))
}

/// Decodes a `/pinglink` answer. Sites answer in three shapes, all healthy: interLink 0.6.2's
/// `PingResponse` object (`Some`); an empty body, `[]` or `null` (older plugins); or the plugin's
/// plain text (the SLURM plugin relays `sinfo -s`). Anything else is an error, so a site that
/// answers garbage is not Ready: a body that starts like JSON (`{`, `[`, `}`, `]`, `"`) but is not
/// one of those shapes (broken or wrongly shaped JSON), markup (`<`: a proxy's or login page's
/// HTML), or bytes that are not UTF-8 text.
pub fn decode_ping(body: &[u8]) -> Result<Option<PingResponse>, String> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err("the answer is not UTF-8 text".into());
    };
    let text = text.trim();
    match text.chars().next() {
        None => Ok(None),
        Some('{' | '[' | '}' | ']' | '"') => match serde_json::from_str::<Value>(text) {
            Ok(Value::Null) => Ok(None),
            Ok(Value::Array(items)) if items.is_empty() => Ok(None),
            Ok(Value::Object(_)) => decode_object::<PingResponse>(text.as_bytes())
                .map(Some)
                .map_err(|e| format!("not an interLink PingResponse: {e}")),
            Ok(other) => Err(format!("expected a PingResponse object, got {}", kind_of(&other))),
            Err(e) => Err(format!("not JSON: {e}")),
        },
        Some('<') => Err("the answer is markup (HTML or XML), not an interLink answer".into()),
        Some(c) if c.is_control() => Err("the answer is not text".into()),
        Some(_) => Ok(None),
    }
}

/// Decodes a `/create` answer: one `CreateStruct`, or (interLink 0.4 and older) a one-element list.
pub fn decode_create(body: &[u8]) -> Result<CreateStruct, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    let value = match value {
        Value::Array(mut items) if items.len() == 1 => items.remove(0),
        other => other,
    };
    if !value.is_object() {
        return Err(serde::de::Error::custom(format!(
            "expected a JSON object, got {}",
            kind_of(&value)
        )));
    }
    serde_json::from_value(canonicalize_keys(value))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Decodes a `/status` answer: `null` means no pods.
pub fn decode_statuses(body: &[u8]) -> Result<Vec<PodStatus>, serde_json::Error> {
    let statuses: Option<Vec<PodStatus>> = decode(body)?;
    Ok(statuses.unwrap_or_default())
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `null`, `""` and Go's zero time (`0001-01-01T00:00:00Z`) are absent; anything else must parse.
fn time_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Time>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    if s.is_empty() || s.starts_with("0001-01-01") {
        return Ok(None);
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| Some(Time(t)))
        .map_err(|e| serde::de::Error::custom(format!("invalid timestamp {s:?}: {e}")))
}
