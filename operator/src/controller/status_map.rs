//! A site's view of a pod (interLink `PodStatus`) mapped to the Kubernetes pod status (pure).

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, Pod, PodCondition, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};

use crate::interlink::wire;

/// The pod conditions the operator writes (as a kubelet does); any other type is someone else's
/// and is left as it is: status writes merge conditions by type.
pub const OWN_CONDITIONS: [&str; 4] = ["PodScheduled", "Initialized", "ContainersReady", "Ready"];

/// The pod's new status from the site's answer. `now` stamps condition transitions; `start_time`
/// is kept from the current status.
pub fn map(pod: &Pod, remote: &wire::PodStatus, now: &Time) -> PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let current = pod.status.clone().unwrap_or_default();
    let find = |list: &[wire::ContainerStatus], name: &str| list.iter().find(|c| c.name == name).cloned();
    let init_specs = spec.init_containers.unwrap_or_default();
    let init: Vec<ContainerStatus> = init_specs
        .iter()
        .map(|c| {
            container(
                &c.name,
                &c.image.clone().unwrap_or_default(),
                find(&remote.init_containers, &c.name),
            )
        })
        .collect();
    let init_done = init.iter().all(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0)
    });
    let init_failed = init.iter().any(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0)
    });
    let mut app: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| {
            container(
                &c.name,
                &c.image.clone().unwrap_or_default(),
                find(&remote.containers, &c.name),
            )
        })
        .collect();
    if !init_done && !init_failed {
        for c in &mut app {
            if c.state
                .as_ref()
                .is_none_or(|s| s.running.is_none() && s.terminated.is_none())
            {
                c.state = Some(waiting("PodInitializing", ""));
            }
        }
    }
    let terminated: Vec<&ContainerStateTerminated> = app
        .iter()
        .filter_map(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()))
        .collect();
    let all_done = !app.is_empty() && terminated.len() == app.len();
    let running = app
        .iter()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    let phase = if init_failed || (all_done && terminated.iter().any(|t| t.exit_code != 0)) {
        "Failed"
    } else if all_done {
        "Succeeded"
    } else if running || (!terminated.is_empty()) {
        "Running"
    } else {
        "Pending"
    };
    let all_ready = !app.is_empty() && app.iter().all(|c| c.ready);
    // Readiness gates: conditions others write (a load balancer controller, say) that `Ready`
    // waits for, as a kubelet's does.
    let gates_pass = spec.readiness_gates.iter().flatten().all(|g| {
        current
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == g.condition_type && c.status == "True")
    });
    let cond = |type_: &str, ok: bool| {
        let status = if ok { "True" } else { "False" };
        let previous = current.conditions.iter().flatten().find(|c| c.type_ == type_);
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => Some(now.clone()),
            },
            ..Default::default()
        }
    };
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![
            cond("PodScheduled", true),
            cond("Initialized", init_done),
            cond("ContainersReady", all_ready),
            cond("Ready", all_ready && gates_pass),
        ]),
        container_statuses: Some(app),
        init_container_statuses: if init.is_empty() { None } else { Some(init) },
        start_time: current.start_time.or_else(|| Some(now.clone())),
        host_ip: current.host_ip,
        pod_ip: current.pod_ip,
        ..Default::default()
    }
}

fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: (!message.is_empty()).then(|| message.into()),
        }),
        ..Default::default()
    }
}

fn container(name: &str, image: &str, remote: Option<wire::ContainerStatus>) -> ContainerStatus {
    let state = match remote.as_ref().map(|r| &r.state) {
        Some(s) if s.terminated.is_some() => s.terminated.as_ref().map(|t| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.exit_code,
                signal: t.signal,
                reason: Some(if t.reason.is_empty() {
                    if t.exit_code == 0 {
                        "Completed".into()
                    } else {
                        "Error".into()
                    }
                } else {
                    t.reason.clone()
                }),
                message: (!t.message.is_empty()).then(|| t.message.clone()),
                started_at: t.started_at.clone(),
                finished_at: t.finished_at.clone(),
                container_id: None,
            }),
            ..Default::default()
        }),
        Some(s) if s.running.is_some() => s.running.as_ref().map(|r| ContainerState {
            running: Some(ContainerStateRunning {
                started_at: r.started_at.clone(),
            }),
            ..Default::default()
        }),
        Some(s) if s.waiting.is_some() => s.waiting.as_ref().map(|w| {
            waiting(
                if w.reason.is_empty() {
                    "ContainerCreating"
                } else {
                    &w.reason
                },
                &w.message,
            )
        }),
        _ => Some(waiting(
            "ContainerCreating",
            "the site has not started the container yet",
        )),
    };
    let running = state.as_ref().is_some_and(|s| s.running.is_some());
    ContainerStatus {
        name: name.into(),
        image: image.into(),
        image_id: String::new(),
        ready: running,
        started: Some(running),
        restart_count: remote.map(|r| r.restart_count).unwrap_or(0),
        state,
        ..Default::default()
    }
}

/// Whether two statuses differ in what the operator writes (so unchanged pods are not patched).
pub fn changed(old: Option<&PodStatus>, new: &PodStatus) -> bool {
    let Some(old) = old else { return true };
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        // Only the operator's own conditions: others' (readiness gates, `DisruptionTarget`)
        // are kept by the merge and never call for a write.
        if let Some(conditions) = s.conditions.as_mut() {
            conditions.retain(|c| OWN_CONDITIONS.contains(&c.type_.as_str()));
            conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        }
        for c in s.conditions.iter_mut().flatten() {
            c.last_transition_time = None;
            c.last_probe_time = None;
        }
        s.start_time = None;
        s.host_ip = None;
        s.pod_ip = None;
        s.host_ips = None;
        s.pod_ips = None;
        s.qos_class = None;
        // The API server answers an unset `lastState` as `{}`: the same thing.
        for c in s
            .container_statuses
            .iter_mut()
            .flatten()
            .chain(s.init_container_statuses.iter_mut().flatten())
        {
            if c.last_state.as_ref() == Some(&ContainerState::default()) {
                c.last_state = None;
            }
        }
        s
    };
    strip(old).phase != strip(new).phase
        || strip(old).container_statuses != strip(new).container_statuses
        || strip(old).init_container_statuses != strip(new).init_container_statuses
        || strip(old).conditions != strip(new).conditions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interlink::wire::{ContainerState as W, StateRunning, StateTerminated, StateWaiting};

    fn pod(init: bool) -> Pod {
        let mut spec =
            serde_json::json!({"containers": [{"name": "a", "image": "img"}, {"name": "b", "image": "img"}]});
        if init {
            spec["initContainers"] = serde_json::json!([{"name": "setup", "image": "img"}]);
        }
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).expect("pod")
    }

    #[test]
    fn a_status_as_the_api_server_echoes_it_is_unchanged() {
        let now = t("2026-12-03T10:00:00Z");
        let p = pod(false);
        let r = remote(
            &[(
                "a",
                W {
                    waiting: Some(StateWaiting {
                        reason: "ContainerCreating".into(),
                        message: "queued".into(),
                    }),
                    ..Default::default()
                },
            )],
            &[],
        );
        let written = map(&p, &r, &now);
        // What the API server stores and answers: `lastState: {}` where we sent none.
        let mut echoed = serde_json::to_value(&written).expect("json");
        for c in echoed["containerStatuses"].as_array_mut().expect("list") {
            c["lastState"] = serde_json::json!({});
        }
        let echoed: PodStatus = serde_json::from_value(echoed).expect("status");
        let mut again = p.clone();
        again.status = Some(echoed);
        let next = map(&again, &r, &t("2026-12-03T10:00:05Z"));
        assert!(
            !changed(again.status.as_ref(), &next),
            "an unchanged site answer must not write the pod again"
        );
    }

    fn t(s: &str) -> Time {
        Time(s.parse().expect("time"))
    }

    fn remote(states: &[(&str, W)], init: &[(&str, W)]) -> wire::PodStatus {
        let conv = |l: &[(&str, W)]| {
            l.iter()
                .map(|(n, s)| wire::ContainerStatus {
                    name: n.to_string(),
                    state: s.clone(),
                    ..Default::default()
                })
                .collect()
        };
        wire::PodStatus {
            containers: conv(states),
            init_containers: conv(init),
            ..Default::default()
        }
    }

    fn running() -> W {
        W {
            running: Some(StateRunning {
                started_at: Some(t("2026-01-01T00:00:00Z")),
            }),
            ..Default::default()
        }
    }

    fn done(code: i32) -> W {
        W {
            terminated: Some(StateTerminated {
                exit_code: code,
                finished_at: Some(t("2026-01-01T00:01:00Z")),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn queued() -> W {
        W {
            waiting: Some(StateWaiting {
                reason: "Queued".into(),
                message: "in the queue".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn phases() {
        let now = t("2026-01-01T00:02:00Z");
        let p = pod(false);
        let phase = |r: wire::PodStatus| map(&p, &r, &now).phase;
        assert_eq!(
            phase(remote(&[("a", queued()), ("b", queued())], &[])).as_deref(),
            Some("Pending")
        );
        assert_eq!(
            phase(remote(&[("a", running()), ("b", queued())], &[])).as_deref(),
            Some("Running")
        );
        assert_eq!(
            phase(remote(&[("a", done(0)), ("b", running())], &[])).as_deref(),
            Some("Running")
        );
        assert_eq!(
            phase(remote(&[("a", done(0)), ("b", done(0))], &[])).as_deref(),
            Some("Succeeded")
        );
        assert_eq!(
            phase(remote(&[("a", done(0)), ("b", done(3))], &[])).as_deref(),
            Some("Failed")
        );
        assert_eq!(
            phase(remote(&[], &[])).as_deref(),
            Some("Pending"),
            "unknown containers wait"
        );
    }

    #[test]
    fn containers_carry_reasons_exit_codes_and_times() {
        let now = t("2026-01-01T00:02:00Z");
        let s = map(
            &pod(false),
            &remote(&[("a", done(3)), ("b", queued())], &[]),
            &now,
        );
        let cs = s.container_statuses.expect("statuses");
        let a = cs[0]
            .state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .expect("terminated");
        assert_eq!((a.exit_code, a.reason.as_deref()), (3, Some("Error")));
        assert_eq!(a.finished_at, Some(t("2026-01-01T00:01:00Z")));
        let b = cs[1]
            .state
            .as_ref()
            .and_then(|s| s.waiting.clone())
            .expect("waiting");
        assert_eq!(b.reason.as_deref(), Some("Queued"));
        assert_eq!(s.start_time, Some(now));
    }

    #[test]
    fn init_containers_gate_the_app() {
        let now = t("2026-01-01T00:02:00Z");
        let s = map(&pod(true), &remote(&[], &[("setup", running())]), &now);
        let cond = |s: &PodStatus, ty: &str| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == ty)
                .map(|c| c.status.clone())
        };
        assert_eq!(cond(&s, "Initialized").as_deref(), Some("False"));
        let a = s.container_statuses.as_ref().expect("app")[0]
            .state
            .clone()
            .and_then(|s| s.waiting)
            .expect("waiting");
        assert_eq!(a.reason.as_deref(), Some("PodInitializing"));
        let s = map(&pod(true), &remote(&[], &[("setup", done(1))]), &now);
        assert_eq!(
            s.phase.as_deref(),
            Some("Failed"),
            "a failed init container fails the pod"
        );
        let s = map(
            &pod(true),
            &remote(&[("a", running()), ("b", running())], &[("setup", done(0))]),
            &now,
        );
        assert_eq!(cond(&s, "Initialized").as_deref(), Some("True"));
        assert_eq!(cond(&s, "Ready").as_deref(), Some("True"));
    }

    #[test]
    fn others_conditions_call_for_no_write_and_readiness_gates_hold_ready() {
        let mut p = pod(false);
        if let Some(spec) = p.spec.as_mut() {
            spec.readiness_gates = Some(vec![k8s_openapi::api::core::v1::PodReadinessGate {
                condition_type: "example.com/lb".into(),
            }]);
        }
        let r = remote(&[("a", running()), ("b", running())], &[]);
        let now = t("2026-01-01T00:02:00Z");
        let first = map(&p, &r, &now);
        let ready = |s: &PodStatus| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status.clone())
        };
        assert_eq!(
            ready(&first).as_deref(),
            Some("False"),
            "the gate is not passed yet"
        );
        // Someone else passes the gate and adds a condition of their own.
        let mut current = first.clone();
        for (type_, status) in [("example.com/lb", "True"), ("DisruptionTarget", "False")] {
            current.conditions.get_or_insert_default().push(PodCondition {
                type_: type_.into(),
                status: status.into(),
                ..Default::default()
            });
        }
        p.status = Some(current.clone());
        let second = map(&p, &r, &now);
        assert_eq!(ready(&second).as_deref(), Some("True"));
        // As the API server has it after the merge: ours and theirs. Theirs alone are no reason
        // to write again.
        let mut third_pod = p.clone();
        let mut passed = second.clone();
        let theirs = current
            .conditions
            .iter()
            .flatten()
            .filter(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()))
            .cloned();
        passed.conditions.get_or_insert_default().extend(theirs);
        third_pod.status = Some(passed.clone());
        assert!(!changed(Some(&passed), &map(&third_pod, &r, &now)));
    }

    #[test]
    fn unchanged_status_is_not_rewritten() {
        let p = pod(false);
        let r = remote(&[("a", running()), ("b", running())], &[]);
        let first = map(&p, &r, &t("2026-01-01T00:02:00Z"));
        let mut p2 = p.clone();
        p2.status = Some(first.clone());
        let second = map(&p2, &r, &t("2026-01-01T00:03:00Z"));
        assert!(!changed(Some(&first), &second));
        assert_eq!(first.conditions, second.conditions, "transition times kept");
        let third = map(
            &p2,
            &remote(&[("a", done(0)), ("b", running())], &[]),
            &t("2026-01-01T00:04:00Z"),
        );
        assert!(changed(Some(&first), &third));
    }
}
