//! Data a RemoteJob reads and writes (objects in S3-compatible stores), and where a site has its
//! data: the types shared by `RemoteJob.spec.inputs/outputs/inputsFrom`, `RemoteJob.status.outputs`
//! and `OffloadSite.spec.data` (docs/data.md).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::quantity_schema;

/// One object in an S3-compatible store: an input the job reads or an output it writes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Name, unique among the job's inputs (and `inputsFrom`) or among its outputs. The container
    /// finds an input at `/var/run/offload/inputs/<name>` and writes an output to `/var/run/offload/outputs/<name>`;
    /// both paths are also in the environment as `OFFLOAD_INPUT_<NAME>` / `OFFLOAD_OUTPUT_<NAME>`
    /// (upper case, `-` as `_`).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("name must be lower-case letters, digits and '-', starting and ending with a letter or digit"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// The object: `s3://<bucket>/<key>`.
    #[x_kube(validation = Rule::new("self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^/].*$') && !self.endsWith('/') && !self.matches('^s3://.*//') && !self.matches('/[.][.]?(/|$)') && !self.matches('[[:cntrl:]]')")
        .message("url must be s3://<bucket>/<key>: a bucket of 3-63 lower-case letters, digits, '.' or '-'; a key with no empty, '.' or '..' segment, no control character, not ending in '/'"))]
    #[schemars(length(min = 8, max = 1024))]
    pub url: String,

    /// The S3 API endpoint of the store that holds the bucket: `http(s)://host[:port]`. Sites name
    /// the stores they have local access to by this endpoint (`OffloadSite.spec.data`).
    #[x_kube(validation = Rule::new("(self.startsWith('https://') || self.startsWith('http://')) && isURL(self) && url(self).getHostname() != ''")
        .message("endpoint must be an http:// or https:// URL with a host"))]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: String,

    /// The store's region, for request signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,

    /// Size of an input, when known (e.g. `2Gi`, `500M`, `1048576`): placement estimates the
    /// stage-in time from it. Unknown sizes count as 1Gi. Ignored on outputs (their size is
    /// measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "size_schema")]
    pub size: Option<Quantity>,

    /// A Secret in the job's namespace with the keys `accessKeyId` and `secretAccessKey`, and
    /// `sessionToken` for temporary (STS) credentials; without it the object is read or written
    /// anonymously. Like every Secret a pod uses, it is sent only to sites the namespace may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
}

/// A byte count: an integer, or a decimal with a binary or decimal suffix. A pattern, not the CEL
/// `isQuantity` of other quantity fields: a RemoteJob has up to 64 artifacts and the API server
/// would price a CEL rule on each above its budget.
fn size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "maxLength": 32, "pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"}
        ]
    })
}

/// An input that is another RemoteJob's output: the job waits (`WaitingForInputs`) until that
/// RemoteJob has succeeded, then reads the object it wrote.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InputFrom {
    /// Name of the input, as for `inputs[].name` (unique among inputs and `inputsFrom`).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("name must be lower-case letters, digits and '-', starting and ending with a letter or digit"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The RemoteJob, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub remote_job: String,
    /// The name of one of its `outputs`.
    #[schemars(length(min = 1, max = 63))]
    pub output: String,
}

/// An object as the job knows it now: an output an attempt uploaded, or an input taken from
/// another RemoteJob's output.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStatus {
    /// The output's (or input's) name.
    pub name: String,
    /// Where it is: `s3://<bucket>/<key>`.
    pub url: String,
    /// The store's S3 endpoint.
    pub endpoint: String,
    /// Size in bytes, as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// SHA-256 of the content, hex, as the stage tool computed it while uploading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The attempt that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// The site that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The store's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The Secret with the store's credentials, in the job's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// For an input: the RemoteJob whose output it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_remote_job: Option<String>,
    /// Why size or checksum are missing (the store could not be read by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// Where a site has its data: the object stores it reads at local speed, how fast it reads the
/// others, and whether its pods reach other stores at all.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteData {
    /// Object stores (or some of their buckets) the site reads at local speed: staging from them
    /// counts as free in placement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub local_stores: Vec<LocalStore>,

    /// Bytes per second the site reads from stores that are not local (e.g. `100Mi`); 100Mi when
    /// unset. Stage-in time estimates use it until the operator has measured transfers there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_schema")]
    pub remote_bandwidth: Option<Quantity>,

    /// Whether the site's pods can reach stores other than its local ones. When false, a job
    /// whose inputs or outputs live elsewhere is never placed here.
    #[serde(default = "default_true")]
    pub external_access: bool,
}

fn default_true() -> bool {
    true
}

/// A store a site has local access to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalStore {
    /// The store's S3 endpoint, as artifacts name it.
    #[x_kube(validation = Rule::new("(self.startsWith('https://') || self.startsWith('http://')) && isURL(self) && url(self).getHostname() != ''")
        .message("endpoint must be an http:// or https:// URL with a host"))]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: String,
    /// Only these buckets are local; every bucket of the store when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub buckets: Vec<String>,
}

/// An endpoint as compared: scheme and host lower-cased, no trailing `/`.
pub fn normalize_endpoint(endpoint: &str) -> String {
    endpoint.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// `(bucket, key)` of an `s3://bucket/key` URL.
pub fn split_s3_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

/// The environment variable that names an artifact's path (`OFFLOAD_INPUT_<NAME>` or
/// `OFFLOAD_OUTPUT_<NAME>`): the stage tool's rule.
pub use offload_stage::env_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_key() {
        assert_eq!(split_s3_url("s3://b/k/x.bin"), Some(("b", "k/x.bin")));
        assert_eq!(split_s3_url("s3://b/"), None);
        assert_eq!(split_s3_url("http://b/k"), None);
    }

    #[test]
    fn endpoints_compare_without_case_or_trailing_slash() {
        assert_eq!(
            normalize_endpoint("HTTP://S3.Example:9000/"),
            normalize_endpoint("http://s3.example:9000")
        );
    }

    #[test]
    fn env_names_are_upper_case_with_underscores() {
        assert_eq!(env_name("OFFLOAD_INPUT", "my-model"), "OFFLOAD_INPUT_MY_MODEL");
    }
}
