//! The offload scheduler: binds pods with `schedulerName: offload-scheduler` to the virtual Node of
//! the site the placement engine chooses, and explains every decision.
//!
//! It works in cycles (on any cache change, and every few seconds): observe (pending pods, sites,
//! policies, namespaces and each site's pods, all from the shared caches), decide ([`policy`], the
//! pure engine, pod by pod, reserving each placed pod's resources in the [`snapshot`] so a burst
//! never over-commits a site), act (annotate and bind, or mark unschedulable), report (Events,
//! policy status, metrics).

pub mod policy;
pub mod snapshot;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Binding, Namespace, Node, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use self::snapshot::Assumed;
use super::{
    Context,
    events::Reason,
    load,
    node::{SITE_LABEL, node_name},
};
use crate::{
    ANNOTATION_PLACEMENT_MAX,
    crd::{
        ANNOTATION_PLACEMENT, OffloadPolicy, OffloadSite,
        common::set_condition,
        conditions,
        policy::{OffloadPolicyStatus, WhenNothingFits},
    },
    placement::{self, Decision, PodNeeds, Resources, SiteSnapshot},
};

/// `spec.schedulerName` that opts a pod in.
pub const SCHEDULER_NAME: &str = "offload-scheduler";
const MANAGER: &str = "offload-scheduler";
/// A cycle runs at least this often (a pod that fit nowhere may fit now).
const TICK: Duration = Duration::from_secs(5);
/// Longest one bind may take (the binding is retried next cycle; the UID in it makes a late
/// success harmless).
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the scheduler keeps between cycles.
#[derive(Default)]
struct State {
    /// Per pod UID, what the pod was last told it is unschedulable for ([`Told`]).
    told: HashMap<String, Told>,
    /// Pods bound in an earlier cycle that the cache does not show bound yet.
    assumed: HashMap<String, Assumed>,
}

/// The unschedulable message last written on a pod: its reasons ([`reasons_of`]) and when.
struct Told {
    reasons: String,
    at: Instant,
}

/// A pod told it is unschedulable for the same reasons is told again, with its numbers brought
/// up to date, at most this often.
const RETELL_AFTER: Duration = Duration::from_secs(300);

/// The reasons of an unschedulable message without its numbers ("needs 8000, 3000 free", a
/// queue wait that grows every second): what decides whether it is worth a write.
fn reasons_of(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_number = false;
    for ch in message.chars() {
        let digit = ch.is_ascii_digit() || (in_number && ch == '.');
        if digit && !in_number {
            out.push('#');
        } else if !digit {
            out.push(ch);
        }
        in_number = digit;
    }
    out
}

/// Whether a pod told `told` is told `message` now: a status write and an Event when its
/// reasons changed; a status write alone when only the numbers changed and the last is old.
fn tell(told: Option<&Told>, message: &str, now: Instant) -> Option<bool> {
    let reasons = reasons_of(message);
    match told {
        None => Some(true),
        Some(t) if t.reasons != reasons => Some(true),
        Some(t) if now.saturating_duration_since(t.at) >= RETELL_AFTER => Some(false),
        Some(_) => None,
    }
}

/// Runs the scheduler until the process ends.
pub async fn run(ctx: Arc<Context>) {
    ctx.synced().await;
    let mut state = State::default();
    loop {
        cycle(&ctx, &mut state).await;
        let _ = tokio::time::timeout(TICK, ctx.wake.notified()).await;
        // Let a burst of events settle into one cycle.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pods waiting for this scheduler, oldest first.
fn pending(pods: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    let mut pending: Vec<Arc<Pod>> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().is_some_and(|s| {
                    s.node_name.is_none() && s.scheduler_name.as_deref() == Some(SCHEDULER_NAME)
                })
                && !load::is_finished(p)
        })
        .cloned()
        .collect();
    pending.sort_by_key(|p| (p.metadata.creation_timestamp.clone().map(|t| t.0), p.name_any()));
    pending
}

async fn cycle(ctx: &Context, state: &mut State) {
    let pods = ctx.pods.store().state();
    let cached: HashMap<String, bool> = pods
        .iter()
        .filter_map(|p| Some((p.uid()?, p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))))
        .collect();
    snapshot::settle_assumed(&mut state.assumed, &cached);
    let waiting = pending(&pods);
    // Pods that left (bound, deleted, finished) are forgotten: the map never outgrows the queue.
    let uids: std::collections::HashSet<String> = waiting.iter().filter_map(|p| p.uid()).collect();
    state.told.retain(|uid, _| uids.contains(uid));
    let pending: Vec<Arc<Pod>> = waiting
        .into_iter()
        .filter(|p| !state.assumed.contains_key(&p.uid().unwrap_or_default()))
        .collect();
    ctx.metrics.pending_pods.set(pending.len() as i64);
    let sites = ctx.sites.store().state();
    let policies = ctx.policies.store().state();
    let now = jiff::Timestamp::now();
    let mut snapshots: Vec<SiteSnapshot> = sites
        .iter()
        .map(|site| {
            let node = node_name(&site.name_any());
            let active = load::active_pods_cached(ctx.pods.store(), &node);
            let allocatable = ctx
                .nodes
                .store()
                .get(&kube::runtime::reflector::ObjectRef::new(&node))
                .and_then(|n| n.status.as_ref()?.allocatable.clone());
            snapshot::site(site, allocatable.as_ref(), &active, now)
        })
        .collect();
    snapshot::reserve_assumed(&mut snapshots, &state.assumed);
    update_policy_status(ctx, &policies, &snapshots).await;
    for pod in pending {
        place_one(ctx, state, &mut snapshots, &sites, &policies, &pod).await;
    }
}

/// Decides one pod and acts on the decision.
async fn place_one(
    ctx: &Context,
    state: &mut State,
    snapshots: &mut [SiteSnapshot],
    sites: &[Arc<OffloadSite>],
    policies: &[Arc<OffloadPolicy>],
    pod: &Pod,
) {
    let start = Instant::now();
    let metrics = &ctx.metrics;
    let uid = pod.uid().unwrap_or_default();
    let needs = policy::needs(pod, ctx.namespace_labels(&pod.namespace().unwrap_or_default()));
    if ctx.settings.site_selector.is_some() && !policy::in_shard(pod, sites, policies) {
        return;
    }
    let chosen = match policy::choose_policy(pod, &needs, policies) {
        Ok(p) => p,
        Err(message) => {
            unschedulable(ctx, pod, &message, false, &mut state.told).await;
            metrics.placements.with_label_values(&["", "", "refused"]).inc();
            return;
        }
    };
    let decision = placement::place(&needs, &chosen, snapshots, &policy::excluded(pod));
    metrics.placement_duration.observe(start.elapsed().as_secs_f64());
    let Some(site) = &decision.chosen else {
        let message = format!(
            "0/{} sites are available under policy {}: {}",
            snapshots.len(),
            decision.policy,
            if decision.rejected.is_empty() {
                "no site exists".into()
            } else {
                decision.rejection_summary()
            }
        );
        // A sharded operator leaves a pod that is not pinned to it pending: another shard may
        // have a site for it.
        let other_shards = ctx.settings.site_selector.is_some() && !policy::pinned(pod);
        let fail = !other_shards
            && policies
                .iter()
                .find(|p| p.name_any() == chosen.name)
                .is_some_and(|p| p.spec.when_nothing_fits == WhenNothingFits::Fail);
        let message = if other_shards {
            format!("{message} (among this operator's shard; another shard may place the pod)")
        } else {
            message
        };
        unschedulable(ctx, pod, &message, fail, &mut state.told).await;
        metrics
            .placements
            .with_label_values(&[&decision.policy, "", "unschedulable"])
            .inc();
        return;
    };
    // A deadline: a hung bind would hold the whole cycle (every other pending pod) with it.
    match tokio::time::timeout(BIND_TIMEOUT, bind(&ctx.client, pod, site, &decision)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(pod = %pod.name_any(), error = %e, "binding failed; retried next cycle");
            return;
        }
        Err(_) => {
            tracing::warn!(pod = %pod.name_any(), timeout = ?BIND_TIMEOUT, "binding timed out; retried next cycle");
            return;
        }
    }
    snapshot::reserve(
        snapshots,
        site,
        &decision.policy,
        &needs.requests,
        &decision.gpu_models,
    );
    state.assumed.insert(
        uid.clone(),
        Assumed {
            site: site.clone(),
            policy: decision.policy.clone(),
            requests: needs.requests.clone(),
            gpu_models: decision.gpu_models.clone(),
        },
    );
    state.told.remove(&uid);
    let best = &decision.ranking[0];
    let mut note = format!(
        "bound to site {site} (node {}) by policy {}: score {} (queue {}, cost {}, free {}, gpu {}, data {}); {} other site(s) rejected",
        node_name(site),
        decision.policy,
        best.score,
        best.queue,
        best.cost,
        best.free_capacity,
        best.gpu_fit,
        best.data,
        decision.rejected.len()
    );
    if !needs.data.is_empty() {
        note.push_str(&format!("; estimated stage-in {}s", best.stage_in_seconds));
    }
    if let Some(other) = &decision.chosen_without_data {
        note.push_str(&format!("; without the data-locality score: {other}"));
        metrics.data_placements_changed.with_label_values(&[site]).inc();
    }
    ctx.events
        .publish(&pod.object_ref(&()), Reason::Scheduled, &note, "Scheduling")
        .await;
    metrics
        .placements
        .with_label_values(&[&decision.policy, site, "scheduled"])
        .inc();
}

/// Binds through `pods/binding`, with the explanation as the binding's annotation.
async fn bind(client: &Client, pod: &Pod, site: &str, decision: &Decision) -> Result<(), kube::Error> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut explanation = serde_json::to_string(decision).unwrap_or_default();
    if explanation.len() > ANNOTATION_PLACEMENT_MAX {
        explanation = serde_json::to_string(&Decision {
            ranking: decision.ranking.iter().take(10).cloned().collect(),
            ..decision.clone()
        })
        .unwrap_or_default();
    }
    // The API server copies a Binding's annotations onto the pod in the same write: the
    // explanation costs no request of its own. The UID makes the binding fail for a pod that was
    // replaced by another of the same name since the decision.
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            uid: pod.uid(),
            annotations: Some(BTreeMap::from([(ANNOTATION_PLACEMENT.to_string(), explanation)])),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node_name(site)),
            ..Default::default()
        },
    };
    let _: serde_json::Value = api
        .create_subresource("binding", &name, &PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// `PodScheduled=False` (or `Failed` under a "fail" policy), with an Event when the reasons
/// change ([`tell`]): a pod that keeps waiting for the same reasons costs no write per cycle.
async fn unschedulable(
    ctx: &Context,
    pod: &Pod,
    message: &str,
    fail: bool,
    told: &mut HashMap<String, Told>,
) {
    let uid = pod.uid().unwrap_or_default();
    let now = Instant::now();
    let Some(with_event) = tell(told.get(&uid), message, now) else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let at = Time(jiff::Timestamp::now());
    let mut status = json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastTransitionTime": at, "lastProbeTime": null}]}});
    if fail {
        status["status"]["phase"] = "Failed".into();
        status["status"]["reason"] = "Unschedulable".into();
        status["status"]["message"] = message.into();
    }
    if let Err(e) = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&status),
        )
        .await
    {
        tracing::warn!(pod = %pod.name_any(), error = %e, "cannot mark the pod unschedulable");
        return;
    }
    if with_event || fail {
        ctx.events
            .publish(
                &pod.object_ref(&()),
                Reason::FailedScheduling,
                message,
                "Scheduling",
            )
            .await;
    }
    told.insert(
        uid,
        Told {
            reasons: reasons_of(message),
            at: now,
        },
    );
}

/// `Ready` and the eligible sites of each policy (site-level filters only), written on change.
async fn update_policy_status(ctx: &Context, policies: &[Arc<OffloadPolicy>], sites: &[SiteSnapshot]) {
    let api: Api<OffloadPolicy> = Api::all(ctx.client.clone());
    let now = Time(jiff::Timestamp::now());
    for p in policies {
        let view = policy::view(p);
        // A policy about GPU pods: a site without an allowed GPU model can never take its pods.
        let gpu_policy = p
            .spec
            .pod_requests
            .as_ref()
            .is_some_and(|r| r.gpus == crate::crd::policy::GpuRequest::Required)
            || !p.spec.requirements.gpu_models.is_empty()
            || p.spec.requirements.min_gpu_memory.is_some();
        let probe = PodNeeds {
            requests: Resources::default(),
            ..Default::default()
        };
        let mut eligible: Vec<String> = sites
            .iter()
            .filter(|s| {
                // Site-level filters: everything but tenancy and per-pod resources.
                let mut s = (*s).clone();
                s.namespace_selector = Default::default();
                s.free = Resources {
                    pods: 1,
                    ..Default::default()
                };
                s.active_pods = 0;
                placement::place(&probe, &view, std::slice::from_ref(&s), &[])
                    .chosen
                    .is_some()
                    && (!gpu_policy || placement::offers_allowed_gpu(&view, &s))
            })
            .map(|s| s.name.clone())
            .collect();
        eligible.sort();
        let old = p.status.clone().unwrap_or_default();
        let mut new = OffloadPolicyStatus {
            eligible_sites: eligible.clone(),
            observed_generation: p.metadata.generation,
            conditions: old.conditions.clone(),
        };
        let (reason, message) = if eligible.is_empty() {
            (
                "NoEligibleSite",
                "no site currently passes the policy's site filters".to_string(),
            )
        } else {
            ("SitesEligible", format!("{} eligible site(s)", eligible.len()))
        };
        set_condition(
            &mut new.conditions,
            conditions::READY,
            !eligible.is_empty(),
            reason,
            &message,
            p.metadata.generation,
            &now,
        );
        if new != old {
            let patch = json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy", "status": new});
            if let Err(e) = api
                .patch_status(
                    &p.name_any(),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                tracing::warn!(policy = %p.name_any(), error = %e, "cannot write policy status");
            }
        }
    }
}

/// What the scheduler would decide for `pod` now, without binding: the policy and the decision.
/// Used by `offload-operator explain`.
pub async fn explain(client: &Client, pod: &Pod, selector: Option<&str>) -> Result<Decision, String> {
    let lp = selector
        .map(|s| ListParams::default().labels(s))
        .unwrap_or_default();
    let sites: Vec<Arc<OffloadSite>> = list_all(client, &lp, "OffloadSites").await?;
    let policies: Vec<Arc<OffloadPolicy>> = list_all(client, &lp, "OffloadPolicies").await?;
    let ns = pod.namespace().unwrap_or_else(|| "default".into());
    let ns_labels = Api::<Namespace>::all(client.clone())
        .get_opt(&ns)
        .await
        .map_err(|e| format!("cannot read namespace {ns}: {e}"))?
        .and_then(|n| n.metadata.labels)
        .unwrap_or_default();
    let mut needs = policy::needs(pod, ns_labels);
    needs.namespace = ns;
    let chosen = policy::choose_policy(pod, &needs, &policies)?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(SITE_LABEL))
        .await
        .map_err(|e| format!("cannot list the sites' Nodes: {e}"))?
        .items;
    let mut snapshots = Vec::new();
    for site in &sites {
        let node = node_name(&site.name_any());
        let active = load::active_pods(client, &node)
            .await
            .map_err(|e| format!("cannot read the load of site {}: {e}", site.name_any()))?;
        let allocatable = nodes
            .iter()
            .find(|n| n.name_any() == node)
            .and_then(|n| n.status.as_ref()?.allocatable.as_ref());
        snapshots.push(snapshot::site(site, allocatable, &active, jiff::Timestamp::now()));
    }
    Ok(placement::place(
        &needs,
        &chosen,
        &snapshots,
        &policy::excluded(pod),
    ))
}

/// Every `K` matching `lp`, for a one-shot command.
async fn list_all<K>(client: &Client, lp: &ListParams, what: &str) -> Result<Vec<Arc<K>>, String>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    Ok(Api::<K>::all(client.clone())
        .list(lp)
        .await
        .map_err(|e| format!("cannot list {what}: {e}"))?
        .items
        .into_iter()
        .map(Arc::new)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reasons_decide_and_numbers_are_refreshed_rarely() {
        let a = "0/2 sites are available under policy p: hpc: insufficient cpu: needs 8000, 3000 free; htc: queue wait 1.5s over 1s";
        let b = "0/2 sites are available under policy p: hpc: insufficient cpu: needs 8000, 2000 free; htc: queue wait 17.25s over 1s";
        assert_eq!(reasons_of(a), reasons_of(b));
        assert_ne!(
            reasons_of(a),
            reasons_of("0/2 sites are available under policy p: hpc: site is not ready")
        );
        let t0 = Instant::now();
        assert_eq!(tell(None, a, t0), Some(true), "first time: a write and an Event");
        let told = Told {
            reasons: reasons_of(a),
            at: t0,
        };
        assert_eq!(
            tell(Some(&told), b, t0 + Duration::from_secs(5)),
            None,
            "numbers only"
        );
        assert_eq!(
            tell(Some(&told), b, t0 + RETELL_AFTER),
            Some(false),
            "numbers refreshed, without an Event"
        );
        assert_eq!(
            tell(Some(&told), "no site exists", t0 + Duration::from_secs(1)),
            Some(true),
            "new reasons: at once"
        );
    }
}
