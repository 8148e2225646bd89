//! Data locality (pure): which of a pod's objects are local to a site, how long staging the others
//! in would take, and whether the site can reach them at all.

use serde::{Deserialize, Serialize};

use super::SiteSnapshot;

/// Bytes counted for an input whose size is not known.
pub const DEFAULT_INPUT_BYTES: i64 = 1 << 30;
/// Bytes per second a site reads from stores that are not local, when it declares nothing.
pub const DEFAULT_BANDWIDTH: i64 = 100 << 20;

/// Estimates are capped here (a year), so scores stay within integer range.
pub const MAX_STAGE_SECONDS: i64 = 365 * 24 * 3600;

/// One object a pod reads (an input) or writes (an output), as placement weighs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataObject {
    /// The store's S3 endpoint, normalised ([`crate::crd::data::normalize_endpoint`]).
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Size in bytes, when known (inputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// An output (written at the end), not an input.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output: bool,
}

/// A store, or some of its buckets, local to a site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalStore {
    /// Normalised endpoint.
    pub endpoint: String,
    /// Local buckets; every bucket when empty.
    pub buckets: Vec<String>,
}

/// Where a site has its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteData {
    /// Stores it reads at local speed.
    pub local: Vec<LocalStore>,
    /// Bytes per second from other stores (declared, or measured once transfers were seen).
    pub bandwidth: i64,
    /// Its pods reach stores that are not local.
    pub external_access: bool,
}

impl Default for SiteData {
    fn default() -> Self {
        Self {
            local: Vec::new(),
            bandwidth: DEFAULT_BANDWIDTH,
            external_access: true,
        }
    }
}

/// Stage-ins smaller than this say more about container start-up than about bandwidth: they are
/// not measured.
pub const MIN_OBSERVED_BYTES: i64 = 16 << 20;
/// Nor are shorter ones: container times have whole seconds, so a stage-in of at least 5 s is
/// measured to within 20 %.
pub const MIN_OBSERVED_SECONDS: f64 = 5.0;

/// The site's measured bandwidth after a stage-in of `bytes` from stores that are not local took
/// `seconds`: the first measurement, then a moving average (the new one weighs 30 %). `None` when
/// the stage-in was too small or too short to say anything ([`MIN_OBSERVED_BYTES`],
/// [`MIN_OBSERVED_SECONDS`]).
pub fn observe_bandwidth(previous: Option<i64>, bytes: i64, seconds: f64) -> Option<i64> {
    if bytes < MIN_OBSERVED_BYTES || !seconds.is_finite() || seconds < MIN_OBSERVED_SECONDS {
        return None;
    }
    let sample = bytes as f64 / seconds;
    let value = match previous.filter(|p| *p > 0) {
        Some(p) => 0.7 * p as f64 + 0.3 * sample,
        None => sample,
    };
    Some(value.round().clamp(1.0, i64::MAX as f64) as i64)
}

/// Whether `object` is in a store local to the site.
pub fn is_local(site: &SiteData, object: &DataObject) -> bool {
    site.local.iter().any(|s| {
        s.endpoint == object.endpoint
            && (s.buckets.is_empty() || s.buckets.iter().any(|b| b == &object.bucket))
    })
}

/// The first object the site cannot reach (its pods have no external access and the object is
/// not local), if any.
pub fn unreachable<'a>(site: &SiteSnapshot, objects: &'a [DataObject]) -> Option<&'a DataObject> {
    if site.data.external_access {
        return None;
    }
    objects.iter().find(|o| !is_local(&site.data, o))
}

/// Bytes of the inputs that are not local to the site (unknown sizes count as
/// [`DEFAULT_INPUT_BYTES`]).
pub fn remote_input_bytes(site: &SiteData, objects: &[DataObject]) -> i64 {
    objects
        .iter()
        .filter(|o| !o.output && !is_local(site, o))
        .map(|o| o.bytes.unwrap_or(DEFAULT_INPUT_BYTES).max(0))
        .fold(0i64, i64::saturating_add)
}

/// Estimated seconds to stage the inputs in at the site: the bytes that are not local divided by
/// its bandwidth, rounded up (0 when every input is local), at most [`MAX_STAGE_SECONDS`].
pub fn stage_in_seconds(site: &SiteData, objects: &[DataObject]) -> i64 {
    let bytes = remote_input_bytes(site, objects);
    let bandwidth = site.bandwidth.max(1);
    (bytes / bandwidth + i64::from(bytes % bandwidth != 0)).min(MAX_STAGE_SECONDS)
}
