//! Pod statuses this process wrote that its watch cache may not show yet.
//!
//! The status sync compares each site answer with the pod's status in the watch cache and writes
//! only on a change. Under load the cache can lag a write by more than one sync interval; compared
//! with the stale copy, an unchanged pod looks changed and is written again, with new condition
//! transition times: a real, useless API write (and a resource version that moves for nothing).
//! This remembers, per pod, the status last written and the resource versions known to be older
//! than it, so the sync compares with what the API server already has.

use std::{borrow::Cow, collections::HashMap};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::ResourceExt;

#[derive(Debug)]
struct Written {
    /// The status the API server answered the last write with.
    status: Option<PodStatus>,
    /// The resource version that write produced: once the cache shows it, the entry is done.
    version: String,
    /// Resource versions older than that write (the cache may still show any of them).
    older: Vec<String>,
}

/// Keyed by pod UID.
#[derive(Debug, Default)]
pub struct WrittenStatuses {
    by_uid: HashMap<String, Written>,
}

impl WrittenStatuses {
    /// The pod as the API server has it: `cached` itself, or with the status this process last
    /// wrote when the cache still shows an older version. Forgets entries the cache has caught up
    /// with, or that another writer has since superseded.
    pub fn current<'a>(&mut self, cached: &'a Pod) -> Cow<'a, Pod> {
        let uid = cached.uid().unwrap_or_default();
        let version = cached.resource_version().unwrap_or_default();
        match self.by_uid.get(&uid) {
            Some(w) if w.older.contains(&version) => {
                let mut pod = cached.clone();
                pod.status = w.status.clone();
                Cow::Owned(pod)
            }
            Some(_) => {
                self.by_uid.remove(&uid);
                Cow::Borrowed(cached)
            }
            None => Cow::Borrowed(cached),
        }
    }

    /// Records a successful status write for the pod `cached` (as the watch cache showed it);
    /// `after` is the API server's answer to the write.
    pub fn record(&mut self, cached: &Pod, after: &Pod) {
        let uid = cached.uid().unwrap_or_default();
        let mut older = self
            .by_uid
            .remove(&uid)
            .map(|w| {
                let mut o = w.older;
                o.push(w.version);
                o
            })
            .unwrap_or_default();
        older.extend(cached.resource_version());
        self.by_uid.insert(
            uid,
            Written {
                status: after.status.clone(),
                version: after.resource_version().unwrap_or_default(),
                older,
            },
        );
    }

    /// Drops every pod not in `keep` (pods that left the sync set).
    pub fn retain(&mut self, keep: &std::collections::HashSet<String>) {
        self.by_uid.retain(|uid, _| keep.contains(uid));
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    use super::*;
    use crate::{controller::status_map, interlink::wire};

    fn pod(rv: &str, phase: &str, ready: bool) -> Pod {
        let t = |s: &str| json!(s);
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": rv},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
            "status": {"phase": phase, "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t("2026-12-03T10:00:00Z")},
                {"type": "Ready", "status": if ready {"True"} else {"False"}, "lastTransitionTime": t("2026-12-03T10:00:00Z")}]}
        }))
        .unwrap()
    }

    fn running_answer() -> wire::PodStatus {
        serde_json::from_value(json!({"name": "p", "UID": "u1", "namespace": "ns", "JID": "7",
            "containers": [{"name": "main", "state": {"running": {"startedAt": "2026-12-03T10:00:01Z"}}}]}))
        .unwrap()
    }

    /// The sync's rule: write when the mapped status differs from the current one.
    fn needs_write(current: &Pod, now: &Time) -> Option<PodStatus> {
        let new = status_map::map(current, &running_answer(), now);
        status_map::changed(current.status.as_ref(), &new).then_some(new)
    }

    #[test]
    fn a_pod_whose_cached_status_lags_our_own_write_is_not_written_again() {
        let mut w = WrittenStatuses::default();
        let now = Time(jiff::Timestamp::now());
        let stale = pod("10", "Pending", false);
        let first = needs_write(&w.current(&stale), &now).expect("Pending -> Running is a change");
        let mut answer = stale.clone();
        answer.metadata.resource_version = Some("11".into());
        answer.status = Some(first);
        w.record(&stale, &answer);
        // The next sync still sees resourceVersion 10 in the cache.
        let later = Time(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1));
        assert!(
            needs_write(&stale, &later).is_some(),
            "compared with the stale cache alone, the pod would be written again"
        );
        assert_eq!(
            needs_write(&w.current(&stale), &later),
            None,
            "compared with our own write, nothing changed"
        );
        // The cache catches up: the entry is forgotten, and nothing is written either.
        assert_eq!(needs_write(&w.current(&answer), &later), None);
        assert!(w.is_empty());
    }

    #[test]
    fn another_writers_newer_version_wins() {
        let mut w = WrittenStatuses::default();
        let stale = pod("10", "Pending", false);
        let mut ours = stale.clone();
        ours.metadata.resource_version = Some("11".into());
        ours.status = Some(pod("11", "Running", true).status.unwrap());
        w.record(&stale, &ours);
        // Someone else (kube-controller-manager marking the pod not Ready) wrote after us.
        let theirs = pod("12", "Running", false);
        let seen = w.current(&theirs);
        assert_eq!(seen.resource_version().as_deref(), Some("12"));
        assert!(w.is_empty());
    }

    #[test]
    fn two_writes_before_the_cache_catches_up_keep_the_latest() {
        let mut w = WrittenStatuses::default();
        let v10 = pod("10", "Pending", false);
        let mut v11 = pod("11", "Running", false);
        w.record(&v10, &v11);
        let base = w.current(&v10);
        assert_eq!(
            base.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running")
        );
        let v12 = pod("12", "Running", true);
        w.record(&v10, &v12);
        // The cache may show 10 or 11 for a while: both are older than our last write.
        for cached in [&v10, &{
            v11.metadata.resource_version = Some("11".into());
            v11.clone()
        }] {
            let seen = w.current(cached);
            assert_eq!(seen.status, v12.status, "rv {:?}", cached.resource_version());
        }
        w.current(&v12);
        assert!(w.is_empty());
    }
}
