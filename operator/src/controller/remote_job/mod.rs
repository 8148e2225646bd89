//! The RemoteJob controller: one pod per attempt, retries with backoff, failover away from sites
//! that failed, deadline, suspend and time to live. It observes (the job, its pods read straight
//! from the API server, the sites' readiness), decides with the pure [`plan`], acts, and reports.

pub mod data;
pub mod egress;
mod outputs;
pub mod plan;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy},
    runtime::{
        Controller,
        controller::Action,
        reflector::{ObjectRef, Store},
    },
};
use serde_json::json;

use self::{data::JobData, plan::SiteView};
use super::scheduler::snapshot::site_data;
use super::{Context, Error, backoff::Backoff, events::Reason};
use crate::crd::{LABEL_JOB_UID, OffloadSite, RemoteJob, conditions, remote_job::RemoteJobPhase};

const MANAGER: &str = "offload-operator";
const CONTROLLER: &str = "remotejob";

/// The RemoteJob controller's own state beside the shared context.
struct Ctx {
    shared: Arc<Context>,
    backoff: Backoff,
    /// Reads the size and checksum of outputs from their stores.
    stores: Option<reqwest::Client>,
}

/// Runs the RemoteJob controller until the process ends (jobs and sites within the operator's
/// `--site-selector`, from the shared caches).
pub async fn run(shared: Arc<Context>) {
    // A job whose `inputsFrom` names another is looked at again when that one changes.
    let jobs = shared.jobs.store().clone();
    let downstream = move |upstream: Arc<RemoteJob>| {
        let (ns, name) = (upstream.namespace(), upstream.name_any());
        jobs.state()
            .into_iter()
            .filter(|j| j.namespace() == ns && j.spec.inputs_from.iter().any(|f| f.remote_job == name))
            .map(|j| ObjectRef::from_obj(j.as_ref()))
            .collect::<Vec<_>>()
    };
    let controller = Controller::for_shared_stream(shared.jobs.subscribe(), shared.jobs.store().clone())
        .owns_shared_stream(shared.pods.subscribe())
        .watches_shared_stream(shared.jobs.subscribe(), downstream);
    let ctx = Arc::new(Ctx {
        shared,
        backoff: Backoff::default(),
        stores: outputs::client(),
    });
    let results = controller.shutdown_on_signal().run(reconcile, error_policy, ctx);
    super::drain(results, CONTROLLER).await;
}

fn error_policy(job: Arc<RemoteJob>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = job.uid().unwrap_or_default();
    super::on_error(&ctx.shared, &ctx.backoff, CONTROLLER, &key, err)
}

/// Each site's readiness, from its `Ready` condition.
fn site_views(store: &Store<OffloadSite>) -> Vec<SiteView> {
    store
        .state()
        .iter()
        .map(|s| {
            let ready = s
                .status
                .as_ref()
                .and_then(|st| st.conditions.iter().find(|c| c.type_ == conditions::READY));
            SiteView {
                name: s.name_any(),
                ready: ready.is_some_and(|c| c.status == "True"),
                not_ready_since: ready
                    .map(|c| c.last_transition_time.0)
                    .or_else(|| s.metadata.creation_timestamp.as_ref().map(|t| t.0)),
                data: site_data(
                    s.spec.data.as_ref(),
                    s.status.as_ref().and_then(|st| st.observed_remote_bandwidth),
                ),
            }
        })
        .collect()
}

async fn reconcile(job: Arc<RemoteJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let action = apply(&job, &ctx.shared, ctx.stores.as_ref()).await?;
    ctx.backoff.succeeded(&job.uid().unwrap_or_default());
    Ok(action)
}

async fn apply(job: &RemoteJob, ctx: &Context, stores: Option<&reqwest::Client>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        // Its pods are deleted by garbage collection; their remote jobs by the execution controller.
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    let uid = job.uid().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    // Read from the API server, not a cache: the attempt count must never run ahead of the pods.
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{LABEL_JOB_UID}={uid}")))
        .await?
        .items;
    let now = jiff::Timestamp::now();
    let all_jobs = ctx.jobs.store().state();
    let upstream: Vec<&RemoteJob> = all_jobs
        .iter()
        .filter(|j| j.namespace().as_deref() == Some(ns.as_str()))
        .map(AsRef::as_ref)
        .collect();
    let mut decision = plan::plan(job, &pods, &site_views(ctx.sites.store()), &upstream, now);
    let data = JobData::of(job, &decision.status.inputs);

    for action in &decision.actions {
        match action {
            plan::Action::CreatePod { index, exclude } => {
                let pod = plan::attempt_pod(job, *index, exclude, &data, &ctx.settings.stage);
                let name = pod.name_any();
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        // Made before a restart, or taken by someone else.
                        let existing = pods_api.get(&name).await?;
                        if existing.labels().get(LABEL_JOB_UID) != Some(&uid) {
                            let note = format!("cannot create attempt pod {name}: the name is taken");
                            publish(ctx, job, Reason::FailedCreate, &note).await;
                            return Err(Error::NameTaken(name));
                        }
                    }
                    Err(e) => {
                        let note = format!("cannot create attempt pod {name}: {e}");
                        publish(ctx, job, Reason::FailedCreate, &note).await;
                        return Err(e.into());
                    }
                }
            }
            plan::Action::DeletePod { name } => match pods_api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            },
            plan::Action::DeleteJob => {
                let jobs: Api<RemoteJob> = Api::namespaced(ctx.client.clone(), &ns);
                let dp = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..DeleteParams::default()
                };
                match jobs.delete(&job.name_any(), &dp).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(job = %job.name_any(), namespace = %ns, "finished job deleted after its TTL");
                return Ok(Action::await_change());
            }
        }
    }

    // The outputs the job just recorded: their size and checksum, read from the store.
    let measured = decision
        .status
        .outputs
        .iter()
        .any(|o| o.size.is_none() && o.message.is_none());
    if measured {
        outputs::measure(ctx, stores, &ns, &mut decision.status.outputs).await;
    }

    if job.status.as_ref() != Some(&decision.status) {
        let jobs: Api<RemoteJob> = Api::namespaced(ctx.client.clone(), &ns);
        let patch =
            json!({"apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob", "status": decision.status});
        jobs.patch_status(
            &job.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }

    // Report only after the status that records it was written, so a retry does not count twice.
    if measured {
        outputs::count_stage_out(ctx, &decision.status.outputs);
    }
    outputs::count_stage_in(ctx, &decision.ended, &pods, &data).await;
    for note in &decision.notes {
        tracing::info!(job = %job.name_any(), namespace = %ns, reason = note.reason.as_str(), "{}", note.message);
        publish(ctx, job, note.reason, &note.message).await;
    }
    for a in &decision.ended {
        let outcome = format!(
            "{:?}",
            a.outcome
                .unwrap_or(crate::crd::remote_job::AttemptOutcome::Running)
        );
        ctx.metrics
            .remotejob_attempts
            .with_label_values(&[a.site.as_deref().unwrap_or(""), &outcome])
            .inc();
    }
    if let Some((ok, secs)) = decision.finished {
        ctx.metrics
            .remotejob_duration
            .with_label_values(&[if ok { "Succeeded" } else { "Failed" }])
            .observe(secs);
    }
    count_phases(ctx, job, decision.status.phase);
    ctx.metrics
        .reconciles
        .with_label_values(&["remotejob", "ok"])
        .inc();
    Ok(decision
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// Jobs by phase, from the controller's cache (with this job's new phase).
fn count_phases(ctx: &Context, job: &RemoteJob, phase: Option<RemoteJobPhase>) {
    let uid = job.uid();
    let mut counts = std::collections::BTreeMap::new();
    for p in [
        RemoteJobPhase::Pending,
        RemoteJobPhase::Scheduled,
        RemoteJobPhase::Running,
        RemoteJobPhase::Succeeded,
        RemoteJobPhase::Failed,
    ] {
        counts.insert(format!("{p:?}"), 0i64);
    }
    for j in ctx.jobs.store().state() {
        let ph = if j.uid() == uid {
            phase
        } else {
            j.status.as_ref().and_then(|s| s.phase)
        };
        *counts.entry(format!("{:?}", ph.unwrap_or_default())).or_default() += 1;
    }
    for (phase, n) in counts {
        ctx.metrics.remotejobs.with_label_values(&[&phase]).set(n);
    }
}

async fn publish(ctx: &Context, job: &RemoteJob, reason: Reason, note: &str) {
    ctx.events
        .publish(&job.object_ref(&()), reason, note, "Reconcile")
        .await;
}
