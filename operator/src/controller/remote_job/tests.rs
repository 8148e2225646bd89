//! Table tests of the RemoteJob decision: classification, retries, backoff, failover, deadline,
//! suspend, time to live, and restart safety.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::{
    data::StageSettings,
    plan::{Action, SiteView, attempt_pod, backoff_seconds, plan, pod_name},
};
use crate::crd::{
    RemoteJob,
    remote_job::{AttemptOutcome, RemoteJobPhase},
};

const T0: &str = "2026-11-26T10:00:00Z";

fn at(secs: i64) -> Timestamp {
    T0.parse::<Timestamp>().unwrap() + jiff::SignedDuration::from_secs(secs)
}

fn job(extra: Value) -> RemoteJob {
    let mut spec = json!({"template": {"spec": {"containers": [{"name": "main", "image": "busybox"}]}},
        "retryLimit": 2, "backoffSeconds": 10, "siteFailureGraceSeconds": 60});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    serde_json::from_value(json!({"apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "u-1", "generation": 1,
            "creationTimestamp": T0}, "spec": spec}))
    .unwrap()
}

/// Applies a plan's status to the job, as the controller's write does.
fn with_status(mut j: RemoteJob, p: &super::plan::Plan) -> RemoteJob {
    j.status = Some(p.status.clone());
    j
}

fn pod(index: i32, node: Option<&str>, status: Value) -> Pod {
    let mut spec = json!({"containers": [{"name": "main", "image": "busybox"}]});
    if let Some(n) = node {
        spec["nodeName"] = n.into();
    }
    serde_json::from_value(
        json!({"metadata": {"name": pod_name("job", index), "namespace": "ns",
        "creationTimestamp": T0,
        "labels": {"offload.dev/attempt": index.to_string(), "offload.dev/remote-job-uid": "u-1"},
        "annotations": {"offload.dev/remote-id": format!("jid-{index}")}},
        "spec": spec, "status": status}),
    )
    .unwrap()
}

fn exited(code: i32) -> Value {
    exited_at(code, 0)
}

fn exited_at(code: i32, secs: i64) -> Value {
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    json!({"phase": phase, "containerStatuses": [{"name": "main", "image": "busybox", "imageID": "",
        "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code,
        "reason": if code == 0 { "Completed" } else { "Error" }, "finishedAt": at(secs).to_string()}}}]})
}

fn site_failed(reason: &str) -> Value {
    json!({"phase": "Failed", "reason": reason, "message": "site said no",
        "containerStatuses": [{"name": "main", "image": "busybox", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"terminated": {"exitCode": 1, "reason": reason}}}]})
}

fn running() -> Value {
    json!({"phase": "Running", "containerStatuses": [{"name": "main", "image": "busybox", "imageID": "",
        "ready": true, "restartCount": 0, "state": {"running": {"startedAt": T0}}}]})
}

fn ready(name: &str) -> SiteView {
    SiteView {
        name: name.into(),
        ready: true,
        not_ready_since: None,
        data: Default::default(),
    }
}

fn creates(p: &super::plan::Plan) -> Vec<(i32, Vec<String>)> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::CreatePod { index, exclude } => Some((*index, exclude.clone())),
            _ => None,
        })
        .collect()
}

fn condition(j: &super::plan::Plan, type_: &str) -> Option<(String, String)> {
    j.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[test]
fn first_reconcile_creates_attempt_zero() {
    let p = plan(&job(json!({})), &[], &[], &[], at(0));
    assert_eq!(creates(&p), vec![(0, vec![])]);
    assert_eq!(p.status.attempt_count, Some(1));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Pending));
    assert_eq!(p.status.pod.as_deref(), Some("job-0"));
    assert!(
        p.notes
            .iter()
            .any(|n| n.reason == crate::controller::events::Reason::AttemptCreated)
    );
}

#[test]
fn attempt_pod_is_owned_placed_by_the_offload_scheduler_and_never_restarted() {
    let j = job(
        json!({"policy": "gpu", "template": {"metadata": {"labels": {"app": "x"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}], "nodeName": "sneaky"}}}),
    );
    let p = attempt_pod(
        &j,
        2,
        &["a".into(), "b".into()],
        &Default::default(),
        &StageSettings::with_image("stage:1"),
    );
    let spec = p.spec.unwrap();
    assert_eq!(spec.scheduler_name.as_deref(), Some("offload-scheduler"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.node_name, None);
    let tolerated: Vec<_> = spec
        .tolerations
        .iter()
        .flatten()
        .filter(|t| t.effect.as_deref() == Some("NoExecute") && t.toleration_seconds.is_none())
        .filter_map(|t| t.key.as_deref())
        .collect();
    assert_eq!(
        tolerated,
        ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"],
        "an operator outage must not evict an attempt"
    );
    let labels = p.metadata.labels.unwrap();
    assert_eq!(labels["app"], "x");
    assert_eq!(labels["offload.dev/attempt"], "2");
    assert_eq!(labels["offload.dev/remote-job-uid"], "u-1");
    assert_eq!(labels["offload.dev/remote-job"], "job");
    let ann = p.metadata.annotations.unwrap();
    assert_eq!(ann["offload.dev/policy"], "gpu");
    assert_eq!(ann["offload.dev/exclude-sites"], "a,b");
    let owner = &p.metadata.owner_references.unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("RemoteJob", "u-1", Some(true))
    );
    assert_eq!(p.metadata.name.as_deref(), Some("job-2"));
}

#[test]
fn pod_names_fit_and_are_deterministic() {
    let long = "j".repeat(253);
    assert_eq!(pod_name(&long, 12).len(), 253);
    assert!(pod_name(&long, 12).ends_with("-12"));
    assert_eq!(pod_name("a", 0), pod_name("a", 0));
}

#[test]
fn progress_is_mirrored_from_the_pod() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let unbound = pod(
        0,
        None,
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
        "status": "False", "reason": "Unschedulable", "message": "0/2 sites"}]}),
    );
    let p = plan(&j, &[unbound], &[ready("hpc")], &[], at(1));
    assert!(creates(&p).is_empty());
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Pending));
    assert_eq!(
        condition(&p, "Scheduled"),
        Some(("False".into(), "Unschedulable".into()))
    );

    let queued = pod(0, Some("offload-hpc"), json!({"phase": "Pending"}));
    let p = plan(&j, &[queued], &[ready("hpc")], &[], at(2));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Scheduled));
    assert_eq!(p.status.site.as_deref(), Some("hpc"));
    assert_eq!(p.status.remote_id.as_deref(), Some("jid-0"));
    assert_eq!(
        condition(&p, "Scheduled"),
        Some(("True".into(), "Scheduled".into()))
    );

    let p = plan(
        &j,
        &[pod(0, Some("offload-hpc"), running())],
        &[ready("hpc")],
        &[],
        at(3),
    );
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Running));
    assert_eq!(condition(&p, "Running"), Some(("True".into(), "Running".into())));
}

#[test]
fn success_completes_the_job_once() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), exited(0))];
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(5));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Succeeded));
    assert_eq!(
        condition(&p, "Complete"),
        Some(("True".into(), "Succeeded".into()))
    );
    assert_eq!(p.status.exit_code, Some(0));
    assert!(p.status.completion_time.is_some());
    assert_eq!(p.ended.len(), 1);
    assert!(p.finished.is_some_and(|(ok, secs)| ok && secs == 5.0));
    assert!(creates(&p).is_empty());
    // Looking again changes nothing and reports nothing.
    let j = with_status(j, &p);
    let again = plan(&j, &pods, &[ready("hpc")], &[], at(50));
    assert_eq!(again.status, p.status);
    assert!(again.notes.is_empty() && again.ended.is_empty() && again.finished.is_none());
    assert_eq!(again.requeue, None);
}

#[test]
fn application_failure_retries_with_backoff_until_the_limit() {
    let mut j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let mut pods = vec![pod(0, Some("offload-hpc"), exited(3))];
    // Attempt 0 failed at t=0 (finishedAt): the first retry waits 10 s.
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(1));
    assert_eq!(
        p.status.attempts[0].outcome,
        Some(AttemptOutcome::ApplicationFailure)
    );
    assert_eq!(p.status.attempts[0].exit_code, Some(3));
    assert!(creates(&p).is_empty());
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Pending));
    assert!(p.requeue.unwrap() <= std::time::Duration::from_secs(10));
    j = with_status(j, &p);
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(10));
    assert_eq!(
        creates(&p),
        vec![(1, vec![])],
        "an application failure excludes no site"
    );
    j = with_status(j, &p);
    pods.push(pod(1, Some("offload-hpc"), exited_at(3, 11)));
    // The second retry waits 20 s after the second failure.
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(30));
    assert!(creates(&p).is_empty());
    j = with_status(j, &p);
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(31));
    assert_eq!(creates(&p), vec![(2, vec![])]);
    j = with_status(j, &p);
    pods.push(pod(2, Some("offload-hpc"), exited_at(4, 35)));
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(40));
    assert!(creates(&p).is_empty(), "retry limit 2 means 3 attempts");
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Failed));
    assert_eq!(p.status.attempt_count, Some(3));
    assert_eq!(p.status.exit_code, Some(4));
    let (status, reason) = condition(&p, "Failed").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "ApplicationFailure"));
    assert!(p.status.message.unwrap().contains("exit code 4"));
}

#[test]
fn backoff_doubles_and_is_capped() {
    assert_eq!(backoff_seconds(10, 1), 10);
    assert_eq!(backoff_seconds(10, 2), 20);
    assert_eq!(backoff_seconds(10, 3), 40);
    assert_eq!(backoff_seconds(10, 50), 3600);
    assert_eq!(backoff_seconds(0, 5), 0);
}

#[test]
fn site_failure_fails_over_to_another_site() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), site_failed("OffloadCreateFailed"))];
    let p = plan(&j, &pods, &[ready("hpc"), ready("cloud")], &[], at(30));
    assert_eq!(p.status.attempts[0].outcome, Some(AttemptOutcome::SiteFailure));
    assert_eq!(
        p.status.attempts[0].reason.as_deref(),
        Some("OffloadCreateFailed")
    );
    assert_eq!(p.status.attempts[0].message.as_deref(), Some("site said no"));
    assert_eq!(
        creates(&p),
        vec![(1, vec!["hpc".to_string()])],
        "failing over to another site needs no backoff"
    );
}

#[test]
fn without_failover_or_with_a_pinned_site_nothing_is_excluded() {
    for extra in [json!({"failover": false}), json!({"site": "hpc"})] {
        let j0 = job(extra);
        let j = with_status(j0.clone(), &plan(&j0, &[], &[], &[], at(0)));
        let pods = [pod(0, Some("offload-hpc"), site_failed("OffloadLost"))];
        // The same site again: after the backoff.
        let p = plan(&j, &pods, &[ready("hpc")], &[], at(30));
        assert!(creates(&p).is_empty());
        let j = with_status(j, &p);
        let p = plan(&j, &pods, &[ready("hpc")], &[], at(41));
        assert_eq!(creates(&p), vec![(1, vec![])]);
    }
}

#[test]
fn a_site_down_past_the_grace_period_is_a_site_failure() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), running())];
    let down = SiteView {
        name: "hpc".into(),
        ready: false,
        not_ready_since: Some(at(10)),
        data: Default::default(),
    };
    let p = plan(&j, &pods, std::slice::from_ref(&down), &[], at(69));
    assert!(p.actions.is_empty(), "within the grace period: wait");
    assert!(p.requeue.unwrap() <= std::time::Duration::from_secs(2));
    let p = plan(&j, &pods, &[down], &[], at(70));
    assert_eq!(p.status.attempts[0].reason.as_deref(), Some("SiteUnreachable"));
    assert!(p.actions.contains(&Action::DeletePod { name: "job-0".into() }));
    // The retry avoids the failed site, at once.
    assert_eq!(creates(&p), vec![(1, vec!["hpc".to_string()])]);
}

#[test]
fn waiting_on_an_unavailable_site_past_the_grace_period_is_a_site_failure() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let waiting = json!({"phase": "Pending", "containerStatuses": [{"name": "main", "image": "busybox",
        "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "SiteUnavailable",
        "message": "creating at site hpc failed, retrying: 503"}}}]});
    let pods = [pod(0, Some("offload-hpc"), waiting)];
    assert!(plan(&j, &pods, &[ready("hpc")], &[], at(59)).actions.is_empty());
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(61));
    assert_eq!(p.status.attempts[0].reason.as_deref(), Some("SiteUnavailable"));
    assert!(p.status.attempts[0].message.as_deref().unwrap().contains("503"));
}

#[test]
fn a_deleted_pod_is_a_site_failure_and_retried() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let p = plan(&j, &[], &[], &[], at(5));
    assert_eq!(p.status.attempts[0].reason.as_deref(), Some("PodDeleted"));
    assert!(
        creates(&p).is_empty(),
        "it never reached a site: the retry waits for its backoff"
    );
}

#[test]
fn deadline_fails_the_job_and_deletes_the_running_attempt() {
    let j0 = job(json!({"activeDeadlineSeconds": 30}));
    let j = with_status(j0.clone(), &plan(&j0, &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), running())];
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(29));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Running));
    assert!(p.requeue.unwrap() <= std::time::Duration::from_secs(2));
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(30));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Failed));
    assert_eq!(
        condition(&p, "Failed"),
        Some(("True".into(), "DeadlineExceeded".into()))
    );
    assert_eq!(
        p.status.attempts[0].outcome,
        Some(AttemptOutcome::DeadlineExceeded)
    );
    assert_eq!(p.actions, vec![Action::DeletePod { name: "job-0".into() }]);
    assert!(
        p.notes
            .iter()
            .any(|n| n.reason == crate::controller::events::Reason::DeadlineExceeded)
    );
    // Still running at the next look (the delete is in flight): delete again, nothing else.
    let j = with_status(j, &p);
    let again = plan(&j, &pods, &[ready("hpc")], &[], at(31));
    assert_eq!(again.actions, vec![Action::DeletePod { name: "job-0".into() }]);
    assert!(again.notes.is_empty());
}

#[test]
fn suspend_cancels_the_attempt_and_resume_starts_a_new_one_not_counted_as_a_failure() {
    let j0 = job(json!({"retryLimit": 0}));
    let j = with_status(j0.clone(), &plan(&j0, &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), running())];
    let mut suspended = j.clone();
    suspended.spec.suspend = true;
    let p = plan(&suspended, &pods, &[ready("hpc")], &[], at(5));
    assert_eq!(p.status.attempts[0].outcome, Some(AttemptOutcome::Cancelled));
    assert_eq!(p.actions, vec![Action::DeletePod { name: "job-0".into() }]);
    assert_eq!(
        condition(&p, "Suspended"),
        Some(("True".into(), "Suspended".into()))
    );
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Pending));
    let suspended = with_status(suspended, &p);
    // The pod is gone; nothing is created while suspended.
    let p = plan(&suspended, &[], &[ready("hpc")], &[], at(6));
    assert!(p.actions.is_empty());
    let mut resumed = with_status(suspended, &p);
    resumed.spec.suspend = false;
    let p = plan(&resumed, &[], &[ready("hpc")], &[], at(7));
    assert_eq!(
        creates(&p),
        vec![(1, vec![])],
        "a cancelled attempt is no failure"
    );
    assert_eq!(
        condition(&p, "Suspended"),
        Some(("False".into(), "Resumed".into()))
    );
}

#[test]
fn a_suspended_new_job_creates_nothing() {
    let p = plan(&job(json!({"suspend": true})), &[], &[], &[], at(0));
    assert!(p.actions.is_empty());
    assert_eq!(p.status.attempt_count, None);
}

#[test]
fn ttl_deletes_the_finished_job() {
    let j0 = job(json!({"ttlSecondsAfterFinished": 20}));
    let j = with_status(j0.clone(), &plan(&j0, &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), exited(0))];
    let p = plan(&j, &pods, &[], &[], at(10));
    assert!(!p.actions.contains(&Action::DeleteJob));
    assert!(p.requeue.unwrap() <= std::time::Duration::from_secs(21));
    let j = with_status(j, &p);
    let p = plan(&j, &pods, &[], &[], at(30));
    assert_eq!(p.actions, vec![Action::DeleteJob]);
}

#[test]
fn a_pod_created_before_a_restart_is_adopted_not_duplicated() {
    // The status was never written (the operator died right after creating the pod).
    let pods = [pod(0, Some("offload-hpc"), running())];
    let p = plan(&job(json!({})), &pods, &[ready("hpc")], &[], at(3));
    assert!(creates(&p).is_empty());
    assert_eq!(p.status.attempt_count, Some(1));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Running));
}

#[test]
fn a_restart_during_backoff_keeps_the_count_and_the_wait() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), exited(1))];
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(1));
    let j = with_status(j, &p);
    // A new process reads the same job and pods.
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(5));
    assert!(creates(&p).is_empty());
    assert_eq!(p.status, j.status.clone().unwrap(), "waiting writes nothing");
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(11));
    assert_eq!(creates(&p), vec![(1, vec![])]);
}

#[test]
fn an_unchanged_running_job_writes_nothing() {
    let j = with_status(job(json!({})), &plan(&job(json!({})), &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), running())];
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(3));
    let j = with_status(j, &p);
    let p2 = plan(&j, &pods, &[ready("hpc")], &[], at(9));
    assert_eq!(p2.status, p.status);
    assert!(p2.notes.is_empty());
}

// --- data: inputsFrom, stage failures, the stage steps in the pod ---

const S3: &str = "http://s3:8333";

fn data_job(name: &str, extra: Value) -> RemoteJob {
    let mut j = job(extra);
    j.metadata.name = Some(name.into());
    j.metadata.uid = Some(format!("u-{name}"));
    j
}

fn with_outputs(mut j: RemoteJob, phase: RemoteJobPhase, outputs: Value) -> RemoteJob {
    let mut st = j.status.clone().unwrap_or_default();
    st.phase = Some(phase);
    st.outputs = serde_json::from_value(outputs).unwrap();
    j.status = Some(st);
    j
}

fn stage_in_exited(code: i32) -> Value {
    json!({"phase": "Failed", "initContainerStatuses": [{"name": "offload-stage-in", "image": "op",
        "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": code, "reason": "Error"}}}],
        "containerStatuses": [{"name": "main", "image": "busybox", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}]})
}

#[test]
fn a_job_waits_for_its_inputs_from_then_takes_the_upstream_output() {
    let down = data_job(
        "report",
        json!({"inputsFrom": [{"name": "model", "remoteJob": "train", "output": "model"}]}),
    );
    let up = data_job(
        "train",
        json!({"outputs": [{"name": "model", "url": "s3://htc/m.bin", "endpoint": S3, "credentialsSecret": "s3"}]}),
    );
    // Missing, then running: waiting, nothing created, one Event.
    for upstream in [vec![], vec![&up]] {
        let p = plan(&down, &[], &[ready("htc")], &upstream, at(0));
        assert!(creates(&p).is_empty(), "{:?}", p.actions);
        assert_eq!(
            condition(&p, "WaitingForInputs").map(|c| c.0),
            Some("True".into())
        );
        assert_eq!(p.status.phase, Some(RemoteJobPhase::Pending));
        assert!(p.notes.iter().any(|n| n.message.contains("train")));
    }
    // Succeeded with its output measured: resolved, recorded, attempt created with the data.
    let done = with_outputs(
        up.clone(),
        RemoteJobPhase::Succeeded,
        json!([{"name": "model", "url": "s3://htc/m.bin", "endpoint": S3, "size": 1234,
            "sha256": "ab", "credentialsSecret": "s3", "site": "gpu", "attempt": 0}]),
    );
    let p = plan(&down, &[], &[ready("htc")], &[&done], at(1));
    assert_eq!(creates(&p).len(), 1);
    assert_eq!(
        condition(&p, "WaitingForInputs"),
        Some(("False".into(), "InputsReady".into()))
    );
    let input = &p.status.inputs[0];
    assert_eq!(
        (input.name.as_str(), input.size, input.from_remote_job.as_deref()),
        ("model", Some(1234), Some("train"))
    );
    // Once resolved, the upstream job may go.
    let later = with_status(down.clone(), &p);
    let p = plan(&later, &[], &[ready("htc")], &[], at(2));
    assert_eq!(p.status.inputs.len(), 1);
    assert_ne!(
        condition(&p, "WaitingForInputs").map(|c| c.0),
        Some("True".into())
    );
    // A failed upstream fails the job.
    let failed = with_outputs(up, RemoteJobPhase::Failed, json!([]));
    let p = plan(&down, &[], &[ready("htc")], &[&failed], at(1));
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Failed));
    assert_eq!(condition(&p, "Failed").map(|c| c.1), Some("InputsFailed".into()));
}

#[test]
fn a_missing_input_fails_the_job_without_a_retry_unless_the_site_held_it() {
    let j0 = job(json!({"retryLimit": 3,
        "inputs": [{"name": "data", "url": "s3://shared/d", "endpoint": S3}]}));
    let j = with_status(j0.clone(), &plan(&j0, &[], &[], &[], at(0)));
    let pods = [pod(0, Some("offload-hpc"), stage_in_exited(10))];
    let p = plan(&j, &pods, &[ready("hpc")], &[], at(5));
    assert!(creates(&p).is_empty());
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Failed));
    assert_eq!(condition(&p, "Failed").map(|c| c.1), Some("InputMissing".into()));
    assert_eq!(p.status.attempts[0].reason.as_deref(), Some("InputMissing"));
    // The same at a site whose local store held the input: a site failure, retried elsewhere.
    let mut holder = ready("hpc");
    holder.data.local = vec![crate::placement::data::LocalStore {
        endpoint: S3.into(),
        buckets: vec!["shared".into()],
    }];
    let p = plan(&j, &pods, &[holder], &[], at(5));
    assert_eq!(creates(&p), vec![(1, vec!["hpc".to_string()])]);
    assert_eq!(p.status.attempts[0].outcome, Some(AttemptOutcome::SiteFailure));
    // A fetch that failed otherwise is retried where it may.
    let p = plan(
        &j,
        &[pod(0, Some("offload-hpc"), stage_in_exited(11))],
        &[ready("hpc")],
        &[],
        at(5),
    );
    assert_eq!(p.status.attempts[0].reason.as_deref(), Some("StageInFailed"));
    assert_ne!(p.status.phase, Some(RemoteJobPhase::Failed));
}

#[test]
fn an_upload_failure_names_the_job_failure_and_outputs_are_recorded() {
    let j0 = job(json!({"retryLimit": 0,
        "outputs": [{"name": "out", "url": "s3://shared/o", "endpoint": S3, "credentialsSecret": "ro"}]}));
    let j = with_status(j0.clone(), &plan(&j0, &[], &[], &[], at(0)));
    let p = plan(
        &j,
        &[pod(0, Some("offload-hpc"), exited(221))],
        &[ready("hpc")],
        &[],
        at(5),
    );
    assert_eq!(p.status.phase, Some(RemoteJobPhase::Failed));
    assert_eq!(
        condition(&p, "Failed").map(|c| c.1),
        Some("OutputUploadFailed".into())
    );
    let out = &p.status.outputs[0];
    assert_eq!(
        (out.url.as_str(), out.attempt, out.site.as_deref(), out.size),
        ("s3://shared/o", Some(0), Some("hpc"), None),
        "the controller fills in size and checksum"
    );
    // Without outputs, 221 is the command's own exit code.
    let plain = with_status(
        job(json!({"retryLimit": 0})),
        &plan(&job(json!({"retryLimit": 0})), &[], &[], &[], at(0)),
    );
    let p = plan(
        &plain,
        &[pod(0, Some("offload-hpc"), exited(221))],
        &[ready("hpc")],
        &[],
        at(5),
    );
    assert_eq!(
        condition(&p, "Failed").map(|c| c.1),
        Some("ApplicationFailure".into())
    );
}

#[test]
fn the_attempt_pod_stages_its_data() {
    let j = job(json!({
        "inputs": [{"name": "my-data", "url": "s3://shared/a b", "endpoint": "http://s3:8333/", "size": "1Gi", "credentialsSecret": "s3"}],
        "outputs": [{"name": "out", "url": "s3://htc/o", "endpoint": S3, "region": "eu"}],
        "template": {"spec": {"containers": [{"name": "main", "image": "app", "command": ["run"], "args": ["--x"]}]}}}));
    let data = super::data::JobData::of(&j, &[]);
    let p = attempt_pod(&j, 0, &[], &data, &StageSettings::with_image("op:1"));
    let spec = p.spec.as_ref().unwrap();
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.name, "offload-stage-in");
    assert_eq!(init.image.as_deref(), Some("op:1"));
    assert_eq!(
        init.args.as_ref().unwrap(),
        &[
            "in",
            "--root",
            "/var/run/offload",
            "--read-timeout-seconds",
            "60",
            "--input",
            "my-data=http://s3:8333/shared/a%20b"
        ]
    );
    let env_names: Vec<&str> = init.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        env_names,
        [
            "OFFLOAD_S3_IN_MY_DATA_ACCESS_KEY_ID",
            "OFFLOAD_S3_IN_MY_DATA_SECRET_ACCESS_KEY",
            "OFFLOAD_S3_IN_MY_DATA_SESSION_TOKEN"
        ]
    );
    let main = &spec.containers[0];
    assert_eq!(
        main.command.as_ref().unwrap(),
        &[
            "/var/run/offload/bin/offload-stage",
            "run",
            "--root",
            "/var/run/offload",
            "--part-size-mib",
            "64",
            "--read-timeout-seconds",
            "60",
            "--output",
            "out=http://s3:8333/htc/o",
            "--",
            "run",
            "--x"
        ]
    );
    assert!(main.args.is_none());
    let env = |k: &str| {
        main.env
            .iter()
            .flatten()
            .find(|e| e.name == k)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env("OFFLOAD_INPUT_MY_DATA").as_deref(),
        Some("/var/run/offload/inputs/my-data")
    );
    assert_eq!(
        env("OFFLOAD_OUTPUT_OUT").as_deref(),
        Some("/var/run/offload/outputs/out")
    );
    assert_eq!(env("OFFLOAD_S3_OUT_OUT_REGION").as_deref(), Some("eu"));
    assert!(
        spec.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == "offload-data" && v.empty_dir.is_some())
    );
    let objects: Vec<crate::placement::data::DataObject> =
        serde_json::from_str(&p.metadata.annotations.as_ref().unwrap()["offload.dev/data"]).unwrap();
    assert_eq!(objects.len(), 2);
    assert_eq!(
        (objects[0].endpoint.as_str(), objects[0].bytes, objects[1].output),
        ("http://s3:8333", Some(1 << 30), true)
    );
    // A job without data gets none of it.
    let plain = job(json!({}));
    let p = attempt_pod(
        &plain,
        0,
        &[],
        &Default::default(),
        &StageSettings::with_image("op:1"),
    );
    assert!(p.spec.unwrap().init_containers.is_none());
}
