//! Jobs this process created at a site and has not recorded on their pods yet.
//!
//! After a create the pod needs its remote id (`offload.dev/remote-id`) and, soon after, the
//! status the site reports. Writing them apart costs a pod write each; instead the remote id rides
//! on the first status write of the status sync, and until then this map knows it. Exactly-once
//! does not depend on it: the `offload.dev/create-sent` marker, written before the create, makes a
//! restarted process ask the site before creating again.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::{Map, Value};

use crate::crd::{ANNOTATION_REMOTE_ID, ANNOTATION_TOKEN_EXPIRES};

#[derive(Debug)]
struct Entry {
    site: String,
    jid: String,
    token_expires: Option<jiff::Timestamp>,
    /// The pod as it was created (the sweep deletes it at the site if it leaves unrecorded).
    pod: Arc<Pod>,
    /// The annotations were written; the watch cache may not show them yet.
    written: bool,
}

/// Keyed by pod UID.
#[derive(Debug, Default)]
pub struct Unrecorded {
    by_uid: HashMap<String, Entry>,
}

impl Unrecorded {
    /// The site created `pod` as job `jid`.
    pub fn created(&mut self, pod: &Pod, site: &str, jid: &str, token_expires: Option<jiff::Timestamp>) {
        let Some(uid) = pod.uid() else { return };
        self.by_uid.insert(
            uid,
            Entry {
                site: site.to_string(),
                jid: jid.to_string(),
                token_expires,
                pod: Arc::new(pod.clone()),
                written: false,
            },
        );
    }

    /// The pod's remote job: recorded on it, or created by this process and not recorded yet.
    pub fn remote_id(&self, pod: &Pod) -> Option<String> {
        pod.annotations().get(ANNOTATION_REMOTE_ID).cloned().or_else(|| {
            self.by_uid
                .get(&pod.uid().unwrap_or_default())
                .map(|e| e.jid.clone())
        })
    }

    /// Whether this process created the pod at its site and has not seen it recorded.
    pub fn contains(&self, pod: &Pod) -> bool {
        !pod.annotations().contains_key(ANNOTATION_REMOTE_ID)
            && self.by_uid.contains_key(&pod.uid().unwrap_or_default())
    }

    /// The annotations the pod's next write must carry, if it still needs them.
    pub fn annotations_to_write(&self, pod: &Pod) -> Option<Map<String, Value>> {
        if pod.annotations().contains_key(ANNOTATION_REMOTE_ID) {
            return None;
        }
        let e = self.by_uid.get(&pod.uid()?)?;
        if e.written {
            return None;
        }
        let mut annotations = Map::new();
        annotations.insert(ANNOTATION_REMOTE_ID.into(), e.jid.clone().into());
        if let Some(at) = e.token_expires {
            annotations.insert(ANNOTATION_TOKEN_EXPIRES.into(), at.to_string().into());
        }
        Some(annotations)
    }

    /// The pod's annotations were written.
    pub fn written(&mut self, uid: &str) {
        if let Some(e) = self.by_uid.get_mut(uid) {
            e.written = true;
        }
    }

    /// Forgets the pod (its deletion is complete, or it was deleted at the site).
    pub fn forget(&mut self, uid: &str) {
        self.by_uid.remove(uid);
    }

    /// Forgets the pods of `site` whose cached copy shows the record, and returns those that have
    /// left the cache unrecorded (force-deleted before the first status write): the caller deletes
    /// them at the site.
    pub fn settle(&mut self, site: &str, cached: &HashMap<String, Arc<Pod>>) -> Vec<Arc<Pod>> {
        let mut gone = Vec::new();
        self.by_uid.retain(|uid, e| {
            if e.site != site {
                return true;
            }
            match cached.get(uid) {
                Some(p) => !p.annotations().contains_key(ANNOTATION_REMOTE_ID),
                None => {
                    gone.push(e.pod.clone());
                    false
                }
            }
        });
        gone
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(uid: &str, annotations: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": uid, "uid": uid, "annotations": annotations}}))
            .expect("pod")
    }

    #[test]
    fn a_created_job_is_known_until_recorded_and_rides_on_one_write() {
        let mut u = Unrecorded::default();
        let p = pod("a", json!({}));
        assert_eq!(u.remote_id(&p), None);
        let expires: jiff::Timestamp = "2026-12-03T11:00:00Z".parse().unwrap();
        u.created(&p, "hpc", "7", Some(expires));
        assert_eq!(u.remote_id(&p).as_deref(), Some("7"));
        assert!(u.contains(&p));
        let a = u.annotations_to_write(&p).expect("to write");
        assert_eq!(a[ANNOTATION_REMOTE_ID], "7");
        assert_eq!(a[ANNOTATION_TOKEN_EXPIRES], "2026-12-03T11:00:00Z");
        u.written("a");
        assert_eq!(u.annotations_to_write(&p), None, "written once, not again");
        assert_eq!(
            u.remote_id(&p).as_deref(),
            Some("7"),
            "known while the cache lags"
        );
        let recorded = pod("a", json!({ANNOTATION_REMOTE_ID: "7"}));
        assert!(!u.contains(&recorded));
        assert_eq!(u.annotations_to_write(&recorded), None);
    }

    #[test]
    fn settling_forgets_recorded_pods_and_returns_those_gone_unrecorded() {
        let mut u = Unrecorded::default();
        for uid in ["recorded", "waiting", "gone"] {
            u.created(&pod(uid, json!({})), "hpc", uid, None);
        }
        u.created(&pod("elsewhere", json!({})), "htc", "x", None);
        let cached: HashMap<String, Arc<Pod>> = [
            (
                "recorded",
                pod("recorded", json!({ANNOTATION_REMOTE_ID: "recorded"})),
            ),
            ("waiting", pod("waiting", json!({}))),
        ]
        .into_iter()
        .map(|(k, p)| (k.to_string(), Arc::new(p)))
        .collect();
        let gone = u.settle("hpc", &cached);
        assert_eq!(gone.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["gone"]);
        assert!(u.contains(&pod("waiting", json!({}))));
        assert!(
            !u.contains(&pod("recorded", json!({}))),
            "forgotten once recorded"
        );
        assert!(
            u.contains(&pod("elsewhere", json!({}))),
            "another site's pods are untouched"
        );
        assert!(u.settle("hpc", &cached).is_empty(), "returned once");
    }
}
