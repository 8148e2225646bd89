//! What the pod-mutating webhook does to one pod at creation (pure: no I/O, no clock).
//!
//! A pod opts in by the annotation `offload.dev/offload: "true"` or `offload.dev/policy: <name>`,
//! or by being created in a namespace labelled `offload.dev/offload=enabled`. The API server only
//! calls the webhook for such pods (a namespace selector, and CEL match conditions on the
//! annotations: ADR 0012), and says which of the two matched by the path it calls.

use k8s_openapi::api::core::v1::{Pod, Toleration};

use crate::controller::{
    node::{OUTAGE_TAINTS, outage_tolerations},
    scheduler::SCHEDULER_NAME,
};

/// Pod annotation (`"true"`, `"false"`) and namespace label (`enabled`) that opt in or out.
pub const OPT_IN: &str = "offload.dev/offload";
/// The namespace label's value that opts every pod of the namespace in.
pub const NAMESPACE_ENABLED: &str = "enabled";
/// Annotation the webhook leaves on every pod it changed (what it did, for `kubectl describe`).
pub const ANNOTATION_MUTATED: &str = "offload.dev/mutated-by";
/// The schedulers a pod may name and still be taken over: none, or the default one.
const DEFAULT_SCHEDULERS: [&str; 2] = ["", "default-scheduler"];

/// Which webhook entry the API server called (one path each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The pod's namespace carries `offload.dev/offload=enabled`.
    Namespace,
    /// The pod carries one of the opt-in annotations (in any other namespace).
    Annotated,
}

/// The outcome for one pod; [`Decision::result`] is the metric label.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Offload it: the pod as it should be created.
    Mutate(Box<Pod>),
    /// Already what offloading needs (it names `offload-scheduler` and tolerates outages).
    Unchanged,
    /// Not taken over, and why (a warning returned to the client that created the pod).
    LeaveAlone {
        /// Metric label: `other_scheduler`, `bound`, `opted_out`, `not_opted_in`.
        result: &'static str,
        /// Shown by kubectl as `Warning: ...`; `None` when there is nothing to warn about.
        warning: Option<String>,
    },
}

impl Decision {
    /// The `result` label of `offload_webhook_admissions_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Decision::Mutate(_) => "mutated",
            Decision::Unchanged => "unchanged",
            Decision::LeaveAlone { result, .. } => result,
        }
    }
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether the pod asks to be offloaded, given the route that matched.
fn opted_in(pod: &Pod, route: Route) -> Result<(), Decision> {
    match annotation(pod, OPT_IN) {
        Some("false") => {
            return Err(Decision::LeaveAlone {
                result: "opted_out",
                warning: None,
            });
        }
        Some("true") => return Ok(()),
        _ => {}
    }
    let policy = annotation(pod, crate::crd::ANNOTATION_POLICY).is_some_and(|p| !p.is_empty());
    if route == Route::Namespace || policy {
        Ok(())
    } else {
        Err(Decision::LeaveAlone {
            result: "not_opted_in",
            warning: None,
        })
    }
}

/// Decides for a pod being created: name `offload-scheduler`, and tolerate the operator's outage
/// taints without a time limit (its work runs at the site: ADR 0009). kube-apiserver has already
/// added its 300 s default tolerations of those taints by the time a webhook runs, so a time-limited
/// toleration of them is replaced: for an offloaded pod, eviction deletes the work at the site.
pub fn decide(pod: &Pod, route: Route) -> Decision {
    if let Err(leave) = opted_in(pod, route) {
        return leave;
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Decision::LeaveAlone {
            result: "not_opted_in",
            warning: Some("offload.dev: the pod has no spec; not offloaded".into()),
        };
    };
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Decision::LeaveAlone {
            result: "bound",
            warning: Some(format!("offload.dev: the pod names node {node}; not offloaded")),
        };
    }
    let scheduler = spec.scheduler_name.as_deref().unwrap_or_default();
    if scheduler != SCHEDULER_NAME && !DEFAULT_SCHEDULERS.contains(&scheduler) {
        return Decision::LeaveAlone {
            result: "other_scheduler",
            warning: Some(format!(
                "offload.dev: the pod names scheduler {scheduler}; it is left to it and not offloaded"
            )),
        };
    }

    let existing = spec.tolerations.clone().unwrap_or_default();
    let mut tolerations: Vec<Toleration> = existing
        .iter()
        .filter(|t| !time_limited_outage_toleration(t))
        .cloned()
        .collect();
    tolerations.extend(outage_tolerations(&tolerations));
    if scheduler == SCHEDULER_NAME && tolerations == existing {
        return Decision::Unchanged;
    }

    let mut out = pod.clone();
    let mut changed = Vec::new();
    if scheduler != SCHEDULER_NAME {
        changed.push("schedulerName");
    }
    if tolerations != existing {
        changed.push("tolerations");
    }
    if let Some(spec) = out.spec.as_mut() {
        spec.scheduler_name = Some(SCHEDULER_NAME.into());
        spec.tolerations = Some(tolerations);
    }
    out.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            ANNOTATION_MUTATED.into(),
            format!("offload-operator webhook: {}", changed.join(", ")),
        );
    Decision::Mutate(Box::new(out))
}

/// Whether a pod that is still unbound and names the default scheduler had asked to be offloaded
/// (by its annotations, or `namespace_enabled`): it was created while the webhook could not
/// answer (`failurePolicy: Ignore`), and its scheduler name can no longer be changed.
pub fn missed(pod: &Pod, namespace_enabled: bool) -> bool {
    let route = if namespace_enabled {
        Route::Namespace
    } else {
        Route::Annotated
    };
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    opted_in(pod, route).is_ok()
        && spec.node_name.as_deref().unwrap_or_default().is_empty()
        && DEFAULT_SCHEDULERS.contains(&spec.scheduler_name.as_deref().unwrap_or_default())
}

/// A NoExecute toleration of exactly one outage taint with a time limit.
fn time_limited_outage_toleration(t: &Toleration) -> bool {
    t.toleration_seconds.is_some()
        && t.key.as_deref().is_some_and(|k| OUTAGE_TAINTS.contains(&k))
        && t.effect.as_deref() == Some("NoExecute")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;

    use super::*;

    fn pod(annotations: &[(&str, &str)], scheduler: Option<&str>, tolerations: Vec<Toleration>) -> Pod {
        let mut p = Pod::default();
        if !annotations.is_empty() {
            p.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        p.spec = Some(PodSpec {
            scheduler_name: scheduler.map(String::from),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            ..Default::default()
        });
        p
    }

    fn toleration(key: &str, seconds: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: seconds,
            ..Default::default()
        }
    }

    /// kube-apiserver's DefaultTolerationSeconds, as a pod has them when the webhook sees it.
    fn apiserver_defaults() -> Vec<Toleration> {
        OUTAGE_TAINTS.iter().map(|k| toleration(k, Some(300))).collect()
    }

    fn mutated(d: Decision) -> Pod {
        match d {
            Decision::Mutate(p) => *p,
            other => panic!("expected a mutation, got {other:?}"),
        }
    }

    #[test]
    fn an_annotated_pod_gets_the_scheduler_and_untimed_outage_tolerations() {
        let p = pod(
            &[(OPT_IN, "true")],
            Some("default-scheduler"),
            apiserver_defaults(),
        );
        let out = mutated(decide(&p, Route::Annotated));
        let spec = out.spec.unwrap();
        assert_eq!(spec.scheduler_name.as_deref(), Some(SCHEDULER_NAME));
        let tolerations = spec.tolerations.unwrap();
        assert_eq!(tolerations.len(), 2);
        for key in OUTAGE_TAINTS {
            assert!(
                tolerations
                    .iter()
                    .any(|t| t.key.as_deref() == Some(key) && t.toleration_seconds.is_none()),
                "{key} untimed in {tolerations:?}"
            );
        }
        let note = &out.metadata.annotations.unwrap()[ANNOTATION_MUTATED];
        assert!(
            note.contains("schedulerName") && note.contains("tolerations"),
            "{note}"
        );
    }

    #[test]
    fn a_policy_annotation_opts_in_and_a_labelled_namespace_opts_in_every_pod() {
        let by_policy = pod(&[("offload.dev/policy", "gpu")], None, vec![]);
        assert_eq!(decide(&by_policy, Route::Annotated).result(), "mutated");
        let plain = pod(&[], None, vec![]);
        assert_eq!(decide(&plain, Route::Namespace).result(), "mutated");
        assert_eq!(decide(&plain, Route::Annotated).result(), "not_opted_in");
        let empty_policy = pod(&[("offload.dev/policy", "")], None, vec![]);
        assert_eq!(decide(&empty_policy, Route::Annotated).result(), "not_opted_in");
    }

    #[test]
    fn a_pod_can_opt_out_of_its_namespace() {
        let p = pod(&[(OPT_IN, "false")], None, vec![]);
        assert_eq!(
            decide(&p, Route::Namespace),
            Decision::LeaveAlone {
                result: "opted_out",
                warning: None
            }
        );
    }

    #[test]
    fn a_pod_naming_another_scheduler_is_left_alone_with_a_warning() {
        let p = pod(&[(OPT_IN, "true")], Some("volcano"), vec![]);
        match decide(&p, Route::Annotated) {
            Decision::LeaveAlone {
                result: "other_scheduler",
                warning: Some(w),
            } => assert!(w.contains("volcano"), "{w}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pod_already_bound_to_a_node_is_left_alone() {
        let mut p = pod(&[(OPT_IN, "true")], None, vec![]);
        p.spec.as_mut().unwrap().node_name = Some("worker-1".into());
        assert_eq!(decide(&p, Route::Annotated).result(), "bound");
    }

    #[test]
    fn a_pod_that_already_has_it_all_is_unchanged() {
        let untimed: Vec<Toleration> = OUTAGE_TAINTS.iter().map(|k| toleration(k, None)).collect();
        let p = pod(&[(OPT_IN, "true")], Some(SCHEDULER_NAME), untimed);
        assert_eq!(decide(&p, Route::Annotated), Decision::Unchanged);
    }

    #[test]
    fn a_pod_that_opted_in_but_kept_the_default_scheduler_was_missed() {
        let annotated = pod(&[(OPT_IN, "true")], Some("default-scheduler"), vec![]);
        assert!(missed(&annotated, false));
        let plain = pod(&[], Some("default-scheduler"), vec![]);
        assert!(missed(&plain, true));
        assert!(!missed(&plain, false));
        let opted_out = pod(&[(OPT_IN, "false")], Some("default-scheduler"), vec![]);
        assert!(!missed(&opted_out, true));
        let offloaded = pod(&[(OPT_IN, "true")], Some(SCHEDULER_NAME), vec![]);
        assert!(!missed(&offloaded, true));
        let mut bound = annotated.clone();
        bound.spec.as_mut().unwrap().node_name = Some("worker".into());
        assert!(!missed(&bound, true));
    }

    #[test]
    fn other_tolerations_are_kept() {
        let mut own = toleration("gpu", Some(30));
        own.effect = Some("NoSchedule".into());
        let mut tolerations = apiserver_defaults();
        tolerations.push(own.clone());
        let p = pod(&[(OPT_IN, "true")], None, tolerations);
        let out = mutated(decide(&p, Route::Namespace));
        let got = out.spec.unwrap().tolerations.unwrap();
        assert!(got.contains(&own), "{got:?}");
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn only_the_scheduler_changes_when_the_tolerations_are_there() {
        let untimed: Vec<Toleration> = OUTAGE_TAINTS.iter().map(|k| toleration(k, None)).collect();
        let p = pod(&[(OPT_IN, "true")], None, untimed.clone());
        let out = mutated(decide(&p, Route::Annotated));
        assert_eq!(out.spec.as_ref().unwrap().tolerations.as_ref(), Some(&untimed));
        assert_eq!(
            out.metadata.annotations.unwrap()[ANNOTATION_MUTATED],
            "offload-operator webhook: schedulerName"
        );
    }
}
