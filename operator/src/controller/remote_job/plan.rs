//! The RemoteJob decision (pure: no I/O, no clock). From a job, the pods it owns and the sites'
//! readiness at one instant it computes the status the job should have, what to do (create an
//! attempt's pod, delete a pod, delete the job), the Events to publish and when to look again.

use std::{collections::BTreeMap, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use kube::{Resource, ResourceExt};

use super::data::{INPUT_MISSING, JobData, STAGE_REASONS, Upstream, stage_failure};
use crate::{
    controller::events::Reason,
    controller::{
        load::is_finished,
        node::{outage_tolerations, site_of_node},
    },
    crd::{
        ANNOTATION_EXCLUDE_SITES, ANNOTATION_POLICY, ANNOTATION_REMOTE_ID, ANNOTATION_SITE, LABEL_ATTEMPT,
        LABEL_JOB_NAME, LABEL_JOB_UID, RemoteJob, RemoteJobStatus,
        common::set_condition,
        conditions,
        remote_job::{Attempt, AttemptOutcome, RemoteJobPhase},
    },
    placement::data::SiteData,
};

/// The scheduler that places attempt pods.
pub const SCHEDULER_NAME: &str = "offload-scheduler";
/// Longest wait between retries.
pub const MAX_BACKOFF_SECONDS: i64 = 3600;
/// Attempts kept in `status.attempts` (the CRD allows 101); older ones are dropped.
pub const KEPT_ATTEMPTS: usize = 100;
/// How often an active job is looked at even when nothing it watches changes.
pub const RESYNC: Duration = Duration::from_secs(30);

/// Pod `status.reason`s that mean the site, not the application, failed the attempt.
const SITE_REASONS: &[&str] = &[
    "OffloadCreateFailed",
    "OffloadLost",
    "NamespaceNotAllowed",
    "NodeLost",
    "Evicted",
    "Unschedulable",
    "UnexpectedAdmissionError",
];

/// A site's readiness as the job controller sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteView {
    /// Site name.
    pub name: String,
    /// Its `Ready` condition is true.
    pub ready: bool,
    /// Since when it has not been ready (meaningful when `ready` is false).
    pub not_ready_since: Option<Timestamp>,
    /// Where it has its data (an input missing in a store local to it may be its fault).
    pub data: SiteData,
}

/// What the controller must do, in order, before it writes the status.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create the attempt's pod (see [`attempt_pod`]).
    CreatePod {
        /// Attempt index.
        index: i32,
        /// Sites the attempt must not be placed at.
        exclude: Vec<String>,
    },
    /// Delete a pod (its remote job is deleted at the site by the execution controller).
    DeletePod {
        /// Pod name.
        name: String,
    },
    /// Delete the job (its pods go with it, by garbage collection).
    DeleteJob,
}

/// An Event to publish on the job.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    /// Event reason (its type, Normal or Warning, comes with it).
    pub reason: Reason,
    /// Event note.
    pub message: String,
}

/// The decision for one job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The status the job should have.
    pub status: RemoteJobStatus,
    /// What to do first.
    pub actions: Vec<Action>,
    /// Events for what changed.
    pub notes: Vec<Note>,
    /// When to look again.
    pub requeue: Option<Duration>,
    /// Attempts that ended in this decision (for metrics).
    pub ended: Vec<Attempt>,
    /// The job ended in this decision: succeeded, and seconds from its start.
    pub finished: Option<(bool, f64)>,
}

/// The attempt pod's name: `<job>-<index>`, deterministic so a create after a restart finds the
/// pod it already made.
pub fn pod_name(job: &str, index: i32) -> String {
    let suffix = format!("-{index}");
    let keep = 253 - suffix.len();
    let base: String = job.chars().take(keep).collect();
    format!("{base}{suffix}")
}

/// The pod of one attempt: the template, placed by the offload scheduler (with the job's policy
/// or pinned site and the sites to avoid), owned by the job, never restarted in place, with the
/// stage steps for its data (run as `stage` says).
pub fn attempt_pod(
    job: &RemoteJob,
    index: i32,
    exclude: &[String],
    data: &JobData,
    stage: &super::data::StageSettings,
) -> Pod {
    let template = job.spec.template.clone();
    let mut meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.take().unwrap_or_default();
    labels.insert(LABEL_JOB_UID.into(), job.uid().unwrap_or_default());
    let name = job.name_any();
    if name.len() <= 63 {
        labels.insert(LABEL_JOB_NAME.into(), name.clone());
    }
    labels.insert(LABEL_ATTEMPT.into(), index.to_string());
    let mut annotations: BTreeMap<String, String> = meta.annotations.take().unwrap_or_default();
    if let Some(policy) = &job.spec.policy {
        annotations.insert(ANNOTATION_POLICY.into(), policy.clone());
    }
    if let Some(site) = &job.spec.site {
        annotations.insert(ANNOTATION_SITE.into(), site.clone());
    }
    if !exclude.is_empty() {
        annotations.insert(ANNOTATION_EXCLUDE_SITES.into(), exclude.join(","));
    }
    let owner = OwnerReference {
        api_version: "offload.dev/v1alpha1".into(),
        kind: "RemoteJob".into(),
        name: name.clone(),
        uid: job.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut spec = PodSpec {
        scheduler_name: Some(SCHEDULER_NAME.into()),
        restart_policy: Some("Never".into()),
        node_name: None,
        ..template.spec.unwrap_or_default()
    };
    // Its work runs at the site: an operator outage must not evict it (ADR 0009).
    let mut tolerations = spec.tolerations.take().unwrap_or_default();
    tolerations.extend(outage_tolerations(&tolerations));
    spec.tolerations = Some(tolerations);
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, index)),
            namespace: job.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    };
    super::data::add_stage_steps(&mut pod, data, stage);
    pod
}

/// The attempt index a pod carries.
pub fn attempt_of(pod: &Pod) -> Option<i32> {
    pod.labels().get(LABEL_ATTEMPT)?.parse().ok()
}

/// How a pod of an attempt stands.
#[derive(Clone, Debug, PartialEq)]
enum PodState {
    /// Not finished.
    Active {
        /// Bound to a site's node.
        bound: bool,
        /// When it was bound (or created).
        bound_at: Timestamp,
        /// Running at its site.
        running: bool,
        /// The first container's waiting reason and message.
        waiting: Option<(String, String)>,
        /// The scheduler's reason and message while unbound.
        unscheduled: Option<(String, String)>,
    },
    /// Finished.
    Done {
        outcome: AttemptOutcome,
        reason: String,
        message: String,
        exit_code: i32,
        at: Option<Timestamp>,
    },
}

fn ts(t: &Option<Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

/// Reads a pod: finished or not, and when finished, whose fault it was.
fn pod_state(pod: &Pod, now: Timestamp) -> PodState {
    let status = pod.status.clone().unwrap_or_default();
    let containers = status.container_statuses.clone().unwrap_or_default();
    let terminated: Vec<_> = containers
        .iter()
        .filter_map(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.terminated.clone())
                .map(|t| (c.name.clone(), t))
        })
        .collect();
    let finished_at = terminated
        .iter()
        .filter_map(|(_, t)| ts(&t.finished_at))
        .max()
        .or(Some(now));
    match status.phase.as_deref() {
        Some("Succeeded") => {
            return PodState::Done {
                outcome: AttemptOutcome::Succeeded,
                reason: "Completed".into(),
                message: String::new(),
                exit_code: 0,
                at: finished_at,
            };
        }
        Some("Failed") => {
            let pod_reason = status.reason.clone().unwrap_or_default();
            let pod_message = status.message.clone().unwrap_or_default();
            let failed = terminated.iter().find(|(_, t)| t.exit_code != 0);
            if SITE_REASONS.contains(&pod_reason.as_str()) {
                return PodState::Done {
                    outcome: AttemptOutcome::SiteFailure,
                    reason: pod_reason,
                    message: pod_message,
                    exit_code: failed.map(|(_, t)| t.exit_code).unwrap_or(1),
                    at: finished_at,
                };
            }
            return match failed {
                Some((name, t)) => PodState::Done {
                    outcome: AttemptOutcome::ApplicationFailure,
                    reason: t
                        .reason
                        .clone()
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "Error".into()),
                    message: t
                        .message
                        .clone()
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| format!("container {name} exited with code {}", t.exit_code)),
                    exit_code: t.exit_code,
                    at: finished_at,
                },
                None => PodState::Done {
                    outcome: AttemptOutcome::SiteFailure,
                    reason: if pod_reason.is_empty() {
                        "PodFailed".into()
                    } else {
                        pod_reason
                    },
                    message: pod_message,
                    exit_code: 1,
                    at: finished_at,
                },
            };
        }
        _ => {}
    }
    let conditions = status.conditions.clone().unwrap_or_default();
    let scheduled = conditions.iter().find(|c| c.type_ == "PodScheduled");
    let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    let bound_at = scheduled
        .filter(|c| c.status == "True")
        .and_then(|c| ts(&c.last_transition_time))
        .or_else(|| ts(&pod.metadata.creation_timestamp))
        .unwrap_or(now);
    let waiting = containers
        .iter()
        .find_map(|c| c.state.as_ref().and_then(|s| s.waiting.clone()))
        .map(|w| (w.reason.unwrap_or_default(), w.message.unwrap_or_default()));
    let unscheduled = scheduled.filter(|c| c.status == "False").map(|c| {
        (
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        )
    });
    PodState::Active {
        bound,
        bound_at,
        running: status.phase.as_deref() == Some("Running"),
        waiting,
        unscheduled,
    }
}

fn is_open(a: &Attempt) -> bool {
    matches!(a.outcome, None | Some(AttemptOutcome::Running))
}

fn counts_as_failure(a: &Attempt) -> bool {
    matches!(
        a.outcome,
        Some(AttemptOutcome::ApplicationFailure | AttemptOutcome::SiteFailure)
    )
}

fn after(t: Timestamp, secs: i64) -> Timestamp {
    t.checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::from_secs_f64(t.duration_since(now).as_secs_f64().max(0.0)) + Duration::from_millis(100)
}

/// Wait before the retry that follows `failures` failed attempts.
pub fn backoff_seconds(base: i32, failures: usize) -> i64 {
    let exp = failures.saturating_sub(1).min(20) as u32;
    (i64::from(base.max(0)) << exp).min(MAX_BACKOFF_SECONDS)
}

/// Ends an attempt.
fn close(
    a: &mut Attempt,
    outcome: AttemptOutcome,
    reason: &str,
    message: String,
    exit_code: Option<i32>,
    at: Timestamp,
) {
    a.outcome = Some(outcome);
    a.reason = Some(reason.chars().take(128).collect());
    a.message = (!message.is_empty()).then(|| message.chars().take(4096).collect());
    a.exit_code = exit_code;
    a.finish_time = Some(Time(at));
}

/// Ends every open attempt with `outcome` and deletes its pod (its job at the site goes with it).
fn stop_open(
    st: &mut RemoteJobStatus,
    out: &mut Plan,
    outcome: AttemptOutcome,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    for a in st.attempts.iter_mut().filter(|a| is_open(a)) {
        close(a, outcome, reason, message.to_string(), None, now);
        out.ended.push(a.clone());
        if let Some(name) = &a.pod {
            out.actions.push(Action::DeletePod { name: name.clone() });
        }
    }
}

fn outcome_name(o: Option<AttemptOutcome>) -> &'static str {
    match o {
        Some(AttemptOutcome::Succeeded) => "Succeeded",
        Some(AttemptOutcome::ApplicationFailure) => "ApplicationFailure",
        Some(AttemptOutcome::SiteFailure) => "SiteFailure",
        Some(AttemptOutcome::DeadlineExceeded) => "DeadlineExceeded",
        Some(AttemptOutcome::Cancelled) => "Cancelled",
        Some(AttemptOutcome::Running) | None => "Running",
    }
}

fn describe(a: &Attempt) -> String {
    let mut s = format!(
        "attempt {} at site {}: {} ({})",
        a.index,
        a.site.as_deref().unwrap_or("none"),
        outcome_name(a.outcome),
        a.reason.as_deref().unwrap_or("")
    );
    if let Some(code) = a.exit_code.filter(|c| *c != 0) {
        s.push_str(&format!(", exit code {code}"));
    }
    if let Some(m) = &a.message {
        s.push_str(": ");
        s.push_str(m);
    }
    s
}

/// The planning of one job: the status being built, the plan, and what the steps share.
struct Planner<'a> {
    job: &'a RemoteJob,
    pods: &'a [Pod],
    sites: &'a [SiteView],
    /// The RemoteJobs of the job's namespace its `inputsFrom` may name.
    upstream: &'a [&'a RemoteJob],
    /// Its data, once `inputsFrom` is resolved.
    data: JobData,
    /// Waiting for the RemoteJobs its `inputsFrom` names.
    waiting: bool,
    now: Timestamp,
    generation: Option<i64>,
    st: RemoteJobStatus,
    out: Plan,
    /// Times at which something is due (the requeue is the earliest).
    wake: Vec<Timestamp>,
    /// The open attempt and its pod's state, once known.
    current: Option<(i32, PodState)>,
}

impl Planner<'_> {
    /// Pods the status does not know yet (made just before a restart) become attempts.
    fn adopt(&mut self) {
        let pods = self.pods;
        let now = self.now;
        let now_t = Time(now);
        // Pods the status does not know yet (made just before a restart): adopt them as attempts.
        for pod in pods {
            let Some(index) = attempt_of(pod) else { continue };
            if self.st.attempts.iter().all(|a| a.index != index) {
                self.st.attempts.push(Attempt {
                    index,
                    site: None,
                    pod: Some(pod.name_any()),
                    remote_id: None,
                    start_time: pod.metadata.creation_timestamp.clone().or(Some(now_t.clone())),
                    finish_time: None,
                    outcome: Some(AttemptOutcome::Running),
                    reason: None,
                    exit_code: None,
                    message: None,
                });
            }
        }
        self.st.attempts.sort_by_key(|a| a.index);
    }

    /// Follows each open attempt's pod: closes it when its pod ended, was deleted, or its site failed.
    fn follow_open(&mut self) {
        let job = self.job;
        let pods = self.pods;
        let sites = self.sites;
        let now = self.now;
        let spec = &job.spec;
        // Follow each open attempt's pod.
        let done = self.done();
        for a in self.st.attempts.iter_mut().filter(|a| is_open(a)) {
            let Some(pod) = pods.iter().find(|p| attempt_of(p) == Some(a.index)) else {
                close(
                    a,
                    AttemptOutcome::SiteFailure,
                    "PodDeleted",
                    "the attempt's pod was deleted before it finished".into(),
                    None,
                    now,
                );
                self.out.ended.push(a.clone());
                continue;
            };
            a.pod = Some(pod.name_any());
            if let Some(site) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .and_then(site_of_node)
            {
                a.site = Some(site.to_string());
            }
            if let Some(id) = pod.annotations().get(ANNOTATION_REMOTE_ID) {
                a.remote_id = Some(id.clone());
            }
            let mut state = pod_state(pod, now);
            if let PodState::Done {
                outcome,
                reason,
                message,
                ..
            } = &mut state
                && *outcome != AttemptOutcome::Succeeded
                && let Some((why, text)) = stage_failure(pod, !self.data.outputs.is_empty())
            {
                *reason = why.into();
                *message = text;
                *outcome = AttemptOutcome::ApplicationFailure;
                // A copy local to the site gone missing is the site's fault: another site may
                // still read the original.
                let site_local = a
                    .site
                    .as_ref()
                    .and_then(|s| sites.iter().find(|v| &v.name == s))
                    .is_some_and(|v| self.data.has_local_input(&v.data));
                if why == INPUT_MISSING && site_local {
                    *outcome = AttemptOutcome::SiteFailure;
                }
            }
            match &state {
                PodState::Done {
                    outcome,
                    reason,
                    message,
                    exit_code,
                    at,
                } => {
                    close(
                        a,
                        *outcome,
                        reason,
                        message.clone(),
                        Some(*exit_code),
                        at.unwrap_or(now),
                    );
                    self.out.ended.push(a.clone());
                }
                PodState::Active {
                    bound_at, waiting, ..
                } if !done => {
                    let grace = i64::from(spec.site_failure_grace_seconds);
                    let site = a.site.as_ref().and_then(|s| sites.iter().find(|v| &v.name == s));
                    let down_since = site
                        .filter(|v| !v.ready)
                        .map(|v| v.not_ready_since.map_or(*bound_at, |t| t.max(*bound_at)));
                    let unavailable = waiting.as_ref().filter(|(r, _)| r == "SiteUnavailable");
                    if let Some(since) = down_since {
                        let deadline = after(since, grace);
                        if now >= deadline {
                            let msg = format!(
                                "site {} has not been ready for {grace}s",
                                a.site.as_deref().unwrap_or_default()
                            );
                            close(a, AttemptOutcome::SiteFailure, "SiteUnreachable", msg, None, now);
                            self.out.ended.push(a.clone());
                            self.out.actions.push(Action::DeletePod { name: pod.name_any() });
                            continue;
                        }
                        self.wake.push(deadline);
                    } else if let Some((_, message)) = unavailable {
                        let deadline = after(*bound_at, grace);
                        if now >= deadline {
                            close(
                                a,
                                AttemptOutcome::SiteFailure,
                                "SiteUnavailable",
                                message.clone(),
                                None,
                                now,
                            );
                            self.out.ended.push(a.clone());
                            self.out.actions.push(Action::DeletePod { name: pod.name_any() });
                            continue;
                        }
                        self.wake.push(deadline);
                    }
                    self.current = Some((a.index, state.clone()));
                }
                PodState::Active { .. } => self.current = Some((a.index, state.clone())),
            }
        }
    }

    /// Deletes again the pods of closed attempts that still run (an interrupted delete).
    fn delete_closed_pods(&mut self) {
        let pods = self.pods;
        // Pods of closed attempts that still run (a cancelled or timed-self.out attempt whose delete was
        // interrupted) are deleted again.
        for pod in pods {
            let closed = attempt_of(pod)
                .and_then(|i| self.st.attempts.iter().find(|a| a.index == i))
                .is_some_and(|a| !is_open(a) && a.outcome != Some(AttemptOutcome::Succeeded));
            let deleting = pod.metadata.deletion_timestamp.is_some();
            let name = pod.name_any();
            if closed
                && !deleting
                && !is_finished(pod)
                && !self
                    .out
                    .actions
                    .contains(&Action::DeletePod { name: name.clone() })
            {
                self.out.actions.push(Action::DeletePod { name });
            }
        }
    }

    /// Resolves `inputsFrom`: waits while a RemoteJob it names has not succeeded, fails the job
    /// when one failed, and otherwise records where the inputs are.
    fn resolve_inputs(&mut self) {
        if self.job.spec.inputs_from.is_empty() || self.st.completion_time.is_some() {
            return;
        }
        let now_t = Time(self.now);
        match super::data::resolve(self.job, &self.st.inputs, self.upstream) {
            Upstream::Ready(inputs) => {
                self.st.inputs = inputs;
                self.data = JobData::of(self.job, &self.st.inputs);
                set_condition(
                    &mut self.st.conditions,
                    conditions::WAITING_FOR_INPUTS,
                    false,
                    "InputsReady",
                    "the RemoteJobs of inputsFrom have succeeded",
                    self.generation,
                    &now_t,
                );
            }
            Upstream::Waiting(why) => {
                self.waiting = true;
                let was = crate::crd::common::is_true(&self.st.conditions, conditions::WAITING_FOR_INPUTS);
                set_condition(
                    &mut self.st.conditions,
                    conditions::WAITING_FOR_INPUTS,
                    true,
                    "WaitingForInputs",
                    &why,
                    self.generation,
                    &now_t,
                );
                if !was {
                    self.out.notes.push(Note {
                        reason: Reason::WaitingForInputs,
                        message: format!("waiting for inputs: {why}"),
                    });
                }
            }
            Upstream::Failed(why) => {
                set_condition(
                    &mut self.st.conditions,
                    conditions::WAITING_FOR_INPUTS,
                    false,
                    "InputsFailed",
                    &why,
                    self.generation,
                    &now_t,
                );
                self.finish(false, "InputsFailed", why);
            }
        }
    }

    /// Ends the job: its phase, conditions, Event and duration.
    fn finish(&mut self, ok: bool, reason: &str, message: String) {
        let (now, generation) = (self.now, self.generation);
        let now_t = Time(now);
        // The outputs the last attempt was to write (the controller reads their size and
        // checksum from the store).
        if let Some(last) = self.st.attempts.iter().rev().find(|a| !is_open(a)) {
            self.st.outputs = self
                .job
                .spec
                .outputs
                .iter()
                .map(|o| crate::crd::data::ArtifactStatus {
                    name: o.name.clone(),
                    url: o.url.clone(),
                    endpoint: o.endpoint.clone(),
                    region: o.region.clone(),
                    credentials_secret: o.credentials_secret.clone(),
                    attempt: Some(last.index),
                    site: last.site.clone(),
                    ..Default::default()
                })
                .collect();
        }
        self.st.completion_time = Some(now_t.clone());
        self.st.phase = Some(if ok {
            RemoteJobPhase::Succeeded
        } else {
            RemoteJobPhase::Failed
        });
        let c = &mut self.st.conditions;
        set_condition(c, "Running", false, "Finished", "", generation, &now_t);
        if ok {
            set_condition(c, "Complete", true, reason, &message, generation, &now_t);
        } else {
            set_condition(c, "Failed", true, reason, &message, generation, &now_t);
        }
        self.out.notes.push(Note {
            reason: if ok {
                Reason::Completed
            } else if reason == "DeadlineExceeded" {
                Reason::DeadlineExceeded
            } else {
                Reason::Failed
            },
            message,
        });
        let started = self.st.start_time.as_ref().map_or(now, |t| t.0);
        self.out.finished = Some((ok, now.duration_since(started).as_secs_f64().max(0.0)));
    }

    /// Ends the job past its `activeDeadlineSeconds`, counted from the first attempt.
    fn check_deadline(&mut self) {
        let job = self.job;
        let now = self.now;
        let spec = &job.spec;
        if !self.done() {
            // Deadline, counted from the first attempt's start.
            let started = self
                .st
                .attempts
                .first()
                .and_then(|a| a.start_time.clone())
                .or(self.st.start_time.clone());
            if let (Some(limit), Some(start)) = (spec.active_deadline_seconds, started.as_ref()) {
                let deadline = after(start.0, limit);
                if now >= deadline {
                    let msg = format!("the job ran longer than its activeDeadlineSeconds ({limit}s)");
                    stop_open(
                        &mut self.st,
                        &mut self.out,
                        AttemptOutcome::DeadlineExceeded,
                        "DeadlineExceeded",
                        &msg,
                        now,
                    );
                    self.current = None;
                    self.finish(false, "DeadlineExceeded", msg);
                } else {
                    self.wake.push(deadline);
                }
            }
        }
    }

    /// Stops the open attempt of a suspended job; notes a resume.
    fn suspend_or_resume(&mut self) {
        if self.st.completion_time.is_some() {
            return;
        }
        let now = self.now;
        let was = crate::crd::common::is_true(&self.st.conditions, conditions::SUSPENDED);
        let known = self
            .st
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::SUSPENDED);
        let (suspended, reason, message, note) = if self.job.spec.suspend {
            stop_open(
                &mut self.st,
                &mut self.out,
                AttemptOutcome::Cancelled,
                "Suspended",
                "the job was suspended",
                now,
            );
            self.current = None;
            let note = (!was).then_some((
                Reason::Suspended,
                "job suspended: no attempt runs until it is resumed",
            ));
            (true, "Suspended", "the job is suspended", note)
        } else if known {
            (
                false,
                "Resumed",
                "",
                was.then_some((Reason::Resumed, "job resumed")),
            )
        } else {
            return;
        };
        if let Some((reason, message)) = note {
            self.out.notes.push(Note {
                reason,
                message: message.into(),
            });
        }
        let c = &mut self.st.conditions;
        set_condition(
            c,
            conditions::SUSPENDED,
            suspended,
            reason,
            message,
            self.generation,
            &Time(now),
        );
    }

    /// Ends the job after a success or past the retry limit, else creates the next attempt (after its backoff).
    fn next_attempt(&mut self) {
        let job = self.job;
        let now = self.now;
        let now_t = Time(now);
        let spec = &job.spec;
        let last_ended = self.st.attempts.iter().rev().find(|a| !is_open(a)).cloned();
        if self.st.completion_time.is_none() && self.current.is_none() {
            let failures = self.st.attempts.iter().filter(|a| counts_as_failure(a)).count();
            let input_missing = last_ended.as_ref().filter(|a| {
                a.outcome == Some(AttemptOutcome::ApplicationFailure)
                    && a.reason.as_deref() == Some(INPUT_MISSING)
            });
            if let Some(a) = last_ended
                .as_ref()
                .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
            {
                let msg = format!(
                    "attempt {} succeeded at site {}",
                    a.index,
                    a.site.as_deref().unwrap_or("?")
                );
                self.finish(true, "Succeeded", msg);
            } else if let Some(a) = input_missing {
                // Another attempt would read the same store: no retry.
                let msg = format!("{}; not retried", describe(a));
                self.finish(false, INPUT_MISSING, msg);
            } else if self.waiting {
                self.st.phase = Some(RemoteJobPhase::Pending);
            } else if failures as i64 > i64::from(spec.retry_limit) {
                let last = self
                    .st
                    .attempts
                    .iter()
                    .rev()
                    .find(|a| counts_as_failure(a))
                    .cloned();
                // A stage step's failure names itself; others by their class.
                let reason = match last.as_ref().and_then(|a| a.reason.as_deref()) {
                    Some(r) if STAGE_REASONS.contains(&r) => r,
                    _ => outcome_name(last.as_ref().and_then(|a| a.outcome)),
                };
                let msg = format!(
                    "{failures} attempt(s) failed, retry limit {}; the last: {}",
                    spec.retry_limit,
                    last.as_ref().map(describe).unwrap_or_default()
                );
                self.finish(false, reason, msg);
            } else if !spec.suspend {
                let next = self.st.attempts.iter().map(|a| a.index + 1).max().unwrap_or(0);
                // A site failure retried at another site goes at once; a retry that may land
                // where it failed before (an application failure, or no failover) backs off.
                let fails_over = |a: &Attempt| {
                    a.outcome == Some(AttemptOutcome::SiteFailure)
                        && a.site.is_some()
                        && spec.failover
                        && spec.site.is_none()
                };
                let ready_at = match (&last_ended, failures) {
                    (Some(a), f) if f > 0 && counts_as_failure(a) && !fails_over(a) => {
                        let base = a.finish_time.as_ref().map_or(now, |t| t.0);
                        Some(after(base, backoff_seconds(spec.backoff_seconds, f)))
                    }
                    _ => None,
                };
                match ready_at {
                    Some(t) if now < t => {
                        self.wake.push(t);
                        self.st.phase = Some(RemoteJobPhase::Pending);
                        // A stable message (no countdown), so waiting writes nothing.
                        self.st.message = Some(format!(
                            "retrying at {} after {}",
                            t.round(jiff::Unit::Second).unwrap_or(t),
                            last_ended.as_ref().map(describe).unwrap_or_default()
                        ));
                    }
                    _ => {
                        let exclude: Vec<String> = if spec.failover && spec.site.is_none() {
                            let mut v: Vec<String> = self
                                .st
                                .attempts
                                .iter()
                                .filter(|a| a.outcome == Some(AttemptOutcome::SiteFailure))
                                .filter_map(|a| a.site.clone())
                                .collect();
                            v.sort();
                            v.dedup();
                            v
                        } else {
                            Vec::new()
                        };
                        let name = pod_name(&job.name_any(), next);
                        self.out.actions.push(Action::CreatePod {
                            index: next,
                            exclude: exclude.clone(),
                        });
                        self.st.attempts.push(Attempt {
                            index: next,
                            site: None,
                            pod: Some(name.clone()),
                            remote_id: None,
                            start_time: Some(now_t.clone()),
                            finish_time: None,
                            outcome: Some(AttemptOutcome::Running),
                            reason: None,
                            exit_code: None,
                            message: None,
                        });
                        let mut msg = format!("attempt {next} created as pod {name}");
                        if !exclude.is_empty() {
                            msg.push_str(&format!(", avoiding site(s) {}", exclude.join(", ")));
                        }
                        self.out.notes.push(Note {
                            reason: Reason::AttemptCreated,
                            message: msg,
                        });
                        self.current = Some((
                            next,
                            PodState::Active {
                                bound: false,
                                bound_at: now,
                                running: false,
                                waiting: None,
                                unscheduled: None,
                            },
                        ));
                    }
                }
            }
        }
    }

    /// Events for the attempts that ended now, first.
    fn ended_events(&mut self) {
        // Events for the attempts that ended now.
        for a in &self.out.ended {
            let ok = a.outcome == Some(AttemptOutcome::Succeeded);
            self.out.notes.insert(
                0,
                Note {
                    reason: if ok {
                        Reason::AttemptSucceeded
                    } else {
                        Reason::AttemptFailed
                    },
                    message: describe(a),
                },
            );
        }
    }

    /// Phase, conditions and message of the job.
    fn job_conditions(&mut self) {
        let job = self.job;
        let now = self.now;
        let generation = self.generation;
        let now_t = Time(now);
        let spec = &job.spec;
        // Phase and conditions of the job while it is not finished.
        if self.st.completion_time.is_none() {
            let c = &mut self.st.conditions;
            match &self.current {
                Some((
                    index,
                    PodState::Active {
                        bound,
                        running,
                        unscheduled,
                        ..
                    },
                )) => {
                    let site = self
                        .st
                        .attempts
                        .iter()
                        .find(|a| a.index == *index)
                        .and_then(|a| a.site.clone())
                        .unwrap_or_default();
                    if *bound {
                        let msg = format!("attempt {index} is at site {site}");
                        set_condition(c, "Scheduled", true, "Scheduled", &msg, generation, &now_t);
                    } else {
                        let (reason, msg) = unscheduled.clone().unwrap_or_else(|| {
                            ("Pending".into(), format!("attempt {index} waits for placement"))
                        });
                        let reason = if reason.is_empty() {
                            "Pending".into()
                        } else {
                            reason
                        };
                        set_condition(c, "Scheduled", false, &reason, &msg, generation, &now_t);
                    }
                    if *running {
                        let msg = format!("attempt {index} runs at site {site}");
                        set_condition(c, "Running", true, "Running", &msg, generation, &now_t);
                        self.st.phase = Some(RemoteJobPhase::Running);
                    } else {
                        set_condition(c, "Running", false, "NotRunning", "", generation, &now_t);
                        self.st.phase = Some(if *bound {
                            RemoteJobPhase::Scheduled
                        } else {
                            RemoteJobPhase::Pending
                        });
                    }
                    self.st.message = Some(match (bound, running) {
                        (_, true) => format!("attempt {index} runs at site {site}"),
                        (true, false) => format!("attempt {index} is queued at site {site}"),
                        _ => unscheduled
                            .as_ref()
                            .map(|(_, m)| format!("attempt {index} waits for placement: {m}"))
                            .unwrap_or_else(|| format!("attempt {index} waits for placement")),
                    });
                }
                _ => {
                    self.st.phase = Some(RemoteJobPhase::Pending);
                    if spec.suspend {
                        self.st.message = Some("suspended".into());
                    }
                    set_condition(
                        c,
                        "Scheduled",
                        false,
                        "Pending",
                        "no attempt is placed",
                        generation,
                        &now_t,
                    );
                    set_condition(c, "Running", false, "NotRunning", "", generation, &now_t);
                }
            }
        } else {
            self.st.message = self
                .st
                .conditions
                .iter()
                .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
                .map(|c| c.message.clone());
        }
    }

    /// The summary fields follow the latest attempt; old attempts are dropped.
    fn summary(&mut self) {
        // The job's summary fields follow its latest attempt.
        if self.st.attempts.len() > KEPT_ATTEMPTS {
            let drop = self.st.attempts.len() - KEPT_ATTEMPTS;
            self.st.attempts.drain(..drop);
        }
        let latest = self.st.attempts.last().cloned();
        self.st.attempt_count = self.st.attempts.iter().map(|a| a.index + 1).max();
        self.st.site = latest.as_ref().and_then(|a| a.site.clone());
        self.st.pod = latest.as_ref().and_then(|a| a.pod.clone());
        self.st.remote_id = latest.as_ref().and_then(|a| a.remote_id.clone());
        self.st.exit_code = self
            .st
            .attempts
            .iter()
            .rev()
            .find(|a| !is_open(a) && a.exit_code.is_some())
            .and_then(|a| a.exit_code);
        if self.st.start_time.is_none() {
            self.st.start_time = self.st.attempts.first().and_then(|a| a.start_time.clone());
        }
    }

    /// Deletes the job once its time to live after the end has passed.
    fn time_to_live(&mut self) {
        let job = self.job;
        let now = self.now;
        let spec = &job.spec;
        // Time to live after the end.
        if let (Some(end), Some(ttl)) = (&self.st.completion_time, spec.ttl_seconds_after_finished) {
            let expiry = after(end.0, i64::from(ttl));
            if now >= expiry {
                self.out.actions.push(Action::DeleteJob);
            } else {
                self.wake.push(expiry);
            }
        }
    }

    /// Whether the job had ended before this plan.
    fn done(&self) -> bool {
        self.job
            .status
            .as_ref()
            .is_some_and(|s| s.completion_time.is_some())
    }
}

/// The decision for `job`, owning `pods`, with the sites as in `sites` and the RemoteJobs of its
/// namespace its `inputsFrom` may name (`upstream`), at `now`.
pub fn plan(
    job: &RemoteJob,
    pods: &[Pod],
    sites: &[SiteView],
    upstream: &[&RemoteJob],
    now: Timestamp,
) -> Plan {
    let mut st = job.status.clone().unwrap_or_default();
    st.observed_generation = job.meta().generation;
    let mut p = Planner {
        job,
        pods,
        sites,
        upstream,
        data: JobData::of(job, &st.inputs),
        waiting: false,
        now,
        generation: job.meta().generation,
        st,
        out: Plan::default(),
        wake: Vec::new(),
        current: None,
    };
    p.adopt();
    p.follow_open();
    p.delete_closed_pods();
    p.check_deadline();
    p.suspend_or_resume();
    p.resolve_inputs();
    p.next_attempt();
    p.ended_events();
    p.job_conditions();
    p.summary();
    p.time_to_live();
    let next = p.wake.iter().min().map(|t| until(now, *t));
    let mut out = p.out;
    out.requeue = match (next, p.st.completion_time.is_some()) {
        (Some(d), _) => Some(d.min(RESYNC)),
        (None, false) => Some(RESYNC),
        (None, true) => None,
    };
    // Conditions keep their transition times; nothing else in the status depends on `now`
    // unless something changed, so an unchanged job writes nothing.
    out.status = p.st;
    out
}
