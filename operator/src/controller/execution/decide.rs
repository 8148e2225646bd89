//! The pure per-pod decision of the execution controller: from the pod, what is known of its
//! site and the site's client, what to do now (no I/O, no clock).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::{
    controller::load::is_finished,
    crd::{ANNOTATION_CREATE_SENT, ANNOTATION_REMOTE_ID, OffloadSite},
    placement::selector,
};

/// What is known when a pod is reconciled.
pub struct Facts<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// The site whose Node the pod is bound to, if the cache has it.
    pub site: Option<&'a OffloadSite>,
    /// Whether the pod's Node is named like a site's Node (its site may not be cached yet).
    pub node_looks_like_a_site: bool,
    /// Whether the pod's Node is the site's virtual Node: in the cache of the operator's Nodes
    /// (`None`), or not yet (`Some(false)`), or a Node of that name the operator does not own
    /// (`Some(true)`: a real node named like the site's; its pods are its kubelet's).
    pub node_taken: Option<bool>,
    /// The site's client, if built: `Some(reachable)`.
    pub client: Option<bool>,
    /// The labels of the pod's namespace.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// This process created the pod at its site; the record waits for its first status write.
    pub created_here: bool,
}

/// What to do with the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not bound to a site's Node: not this controller's pod.
    Ignore,
    /// Bound to a site's Node whose site or client is not known yet: look again shortly.
    WaitForSite,
    /// Being deleted: delete it at the site when it may be there, then complete the deletion.
    Delete {
        /// The site has its job: recorded (`offload.dev/remote-id`) or created by this process.
        recorded: bool,
        /// When a create was sent (`offload.dev/create-sent`), recorded or not.
        sent_at: Option<String>,
    },
    /// Finished, or created at the site already: the status sync owns it.
    Done,
    /// Its namespace may not use the site: fail it, send nothing there.
    Refuse {
        /// Why, for the pod's status and Event.
        message: String,
    },
    /// The site fails its health check: say so and wait.
    SiteUnavailable {
        /// Why, for the containers' waiting message.
        message: String,
    },
    /// Create it at the site.
    Create {
        /// A create was sent before and may have arrived unrecorded: ask the site first.
        ask_first: bool,
    },
}

/// The step for `f`.
pub fn decide(f: &Facts) -> Step {
    let Some(site) = f.site else {
        return if f.node_looks_like_a_site {
            Step::WaitForSite
        } else {
            Step::Ignore
        };
    };
    match f.node_taken {
        None => {}
        Some(true) => return Step::Ignore,
        Some(false) => return Step::WaitForSite,
    }
    let pod = f.pod;
    let annotations = pod.annotations();
    if pod.metadata.deletion_timestamp.is_some() {
        return Step::Delete {
            recorded: annotations.contains_key(ANNOTATION_REMOTE_ID) || f.created_here,
            sent_at: annotations.get(ANNOTATION_CREATE_SENT).cloned(),
        };
    }
    if is_finished(pod) || annotations.contains_key(ANNOTATION_REMOTE_ID) || f.created_here {
        return Step::Done;
    }
    let name = site.name_any();
    // Tenancy: a pod's Secrets and ConfigMaps only go to sites its namespace may use.
    if !selector::matches(&site.spec.namespace_selector, f.namespace_labels) {
        let ns = pod.namespace().unwrap_or_default();
        return Step::Refuse {
            message: format!("namespace {ns} may not use site {name}; nothing was sent to it"),
        };
    }
    match f.client {
        None => Step::WaitForSite,
        Some(false) => Step::SiteUnavailable {
            message: format!("site {name} is not ready; the pod will be created when it is"),
        },
        Some(true) => Step::Create {
            ask_first: annotations.contains_key(ANNOTATION_CREATE_SENT),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn site() -> OffloadSite {
        serde_json::from_value(
            json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
            "metadata": {"name": "hpc"},
            "spec": {"endpoint": "https://x", "namespaceSelector": {"matchLabels": {"team": "a"}}}}),
        )
        .expect("site")
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "namespace": "ns", "annotations": {}},
            "spec": {"containers": [], "nodeName": "offload-hpc"}});
        json_patch(&mut p, extra);
        serde_json::from_value(p).expect("pod")
    }

    fn json_patch(base: &mut serde_json::Value, extra: serde_json::Value) {
        if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
            for (k, v) in e {
                match (b.get_mut(&k), v) {
                    (Some(bv @ serde_json::Value::Object(_)), v @ serde_json::Value::Object(_)) => {
                        json_patch(bv, v)
                    }
                    (_, v) => {
                        b.insert(k, v);
                    }
                }
            }
        }
    }

    fn decide_for(pod: &Pod, site: Option<&OffloadSite>, client: Option<bool>, team: &str) -> Step {
        decide_with(pod, site, client, team, false)
    }

    fn decide_with(
        pod: &Pod,
        site: Option<&OffloadSite>,
        client: Option<bool>,
        team: &str,
        created_here: bool,
    ) -> Step {
        let labels = BTreeMap::from([("team".to_string(), team.to_string())]);
        decide(&Facts {
            pod,
            site,
            node_looks_like_a_site: true,
            node_taken: None,
            client,
            namespace_labels: &labels,
            created_here,
        })
    }

    #[test]
    fn a_new_pod_is_created_only_at_a_reachable_site_its_namespace_may_use() {
        let s = site();
        let p = pod(json!({}));
        assert_eq!(
            decide_for(&p, Some(&s), Some(true), "a"),
            Step::Create { ask_first: false }
        );
        assert!(matches!(
            decide_for(&p, Some(&s), Some(false), "a"),
            Step::SiteUnavailable { .. }
        ));
        assert_eq!(
            decide_for(&p, Some(&s), None, "a"),
            Step::WaitForSite,
            "no client yet"
        );
        assert!(
            matches!(decide_for(&p, Some(&s), Some(true), "b"), Step::Refuse { message } if message.contains("namespace ns may not use site hpc"))
        );
        assert_eq!(
            decide_for(&p, None, None, "a"),
            Step::WaitForSite,
            "site not cached yet"
        );
        let other = decide(&Facts {
            pod: &p,
            site: None,
            node_looks_like_a_site: false,
            node_taken: None,
            client: None,
            namespace_labels: &BTreeMap::new(),
            created_here: false,
        });
        assert_eq!(other, Step::Ignore);
    }

    #[test]
    fn a_pod_sent_before_is_looked_for_first_and_a_recorded_one_is_left_to_the_sync() {
        let s = site();
        let sent =
            pod(json!({"metadata": {"annotations": {"offload.dev/create-sent": "2026-12-03T10:00:00Z"}}}));
        assert_eq!(
            decide_for(&sent, Some(&s), Some(true), "a"),
            Step::Create { ask_first: true }
        );
        let recorded = pod(json!({"metadata": {"annotations": {"offload.dev/remote-id": "7"}}}));
        assert_eq!(decide_for(&recorded, Some(&s), Some(true), "a"), Step::Done);
        let finished = pod(json!({"status": {"phase": "Succeeded"}}));
        assert_eq!(decide_for(&finished, Some(&s), Some(true), "a"), Step::Done);
    }

    #[test]
    fn a_pod_this_process_created_is_not_created_again_before_its_record_is_written() {
        let s = site();
        let sent =
            pod(json!({"metadata": {"annotations": {"offload.dev/create-sent": "2026-12-03T10:00:00Z"}}}));
        assert_eq!(decide_with(&sent, Some(&s), Some(true), "a", true), Step::Done);
        let deleting = pod(json!({"metadata": {"deletionTimestamp": "2026-12-03T10:01:00Z",
            "annotations": {"offload.dev/create-sent": "2026-12-03T10:00:00Z"}}}));
        assert_eq!(
            decide_with(&deleting, Some(&s), Some(true), "a", true),
            Step::Delete {
                recorded: true,
                sent_at: Some("2026-12-03T10:00:00Z".into())
            },
            "deleted at the site without asking whether it is there"
        );
    }

    #[test]
    fn pods_on_a_node_the_operator_does_not_own_are_left_alone() {
        let s = site();
        let p = pod(json!({}));
        let labels = BTreeMap::from([("team".to_string(), "a".to_string())]);
        let with = |node_taken| {
            decide(&Facts {
                pod: &p,
                site: Some(&s),
                node_looks_like_a_site: true,
                node_taken,
                client: Some(true),
                namespace_labels: &labels,
                created_here: false,
            })
        };
        assert_eq!(
            with(Some(true)),
            Step::Ignore,
            "a real node's pods are its kubelet's"
        );
        assert_eq!(
            with(Some(false)),
            Step::WaitForSite,
            "the site's Node is not written yet"
        );
        assert_eq!(with(None), Step::Create { ask_first: false });
    }

    #[test]
    fn a_deleted_pod_is_deleted_at_the_site_whatever_else_holds() {
        let s = site();
        let p = pod(json!({"metadata": {"deletionTimestamp": "2026-12-03T10:00:00Z",
            "annotations": {"offload.dev/create-sent": "2026-12-03T09:00:00Z"}}, "status": {"phase": "Succeeded"}}));
        assert_eq!(
            decide_for(&p, Some(&s), Some(false), "b"),
            Step::Delete {
                recorded: false,
                sent_at: Some("2026-12-03T09:00:00Z".into())
            },
            "finished, unreachable and another tenant: still deleted there"
        );
    }
}
