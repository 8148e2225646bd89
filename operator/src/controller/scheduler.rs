//! The offload scheduler: binds pods with `schedulerName: offload-scheduler` to the virtual Node of
//! the site the placement engine chooses, and explains every decision.
//!
//! It works in cycles (on a pod, site or policy change, and every few seconds): observe (pending
//! pods, sites, policies, namespaces, and each site's bound pods), decide (the pure engine, pod by
//! pod, reserving each placed pod's resources in the snapshot so a burst never over-commits a
//! site), act (annotate and bind, or mark unschedulable), report (Events, policy status, metrics).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Binding, Namespace, Node, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        events::{EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use serde_json::json;
use tokio::sync::Notify;

use super::node::{SITE_LABEL, node_name};
use crate::{
    ANNOTATION_PLACEMENT_MAX,
    crd::{
        ANNOTATION_EXCLUDE_SITES, ANNOTATION_PLACEMENT, ANNOTATION_POLICY, ANNOTATION_SITE, OffloadPolicy,
        OffloadSite,
        common::{is_true, set_condition},
        policy::OffloadPolicyStatus,
    },
    metrics::Metrics,
    placement::{self, Decision, GpuOffer, PodNeeds, PolicyView, Resources, SiteSnapshot, queue},
};

/// `spec.schedulerName` that opts a pod in.
pub const SCHEDULER_NAME: &str = "offload-scheduler";
const MANAGER: &str = "offload-scheduler";
const TICK: Duration = Duration::from_secs(5);

struct Stores {
    pods: Store<Pod>,
    sites: Store<OffloadSite>,
    policies: Store<OffloadPolicy>,
    namespaces: Store<Namespace>,
}

/// Runs the scheduler until the process ends. `selector` limits the sites and policies it uses.
pub async fn run(client: Client, metrics: Metrics, selector: Option<String>) {
    let wake = Arc::new(Notify::new());
    let mut scoped = watcher::Config::default().any_semantic();
    if let Some(s) = &selector {
        scoped = scoped.labels(s);
    }
    let pending =
        watcher::Config::default().fields(&format!("spec.schedulerName={SCHEDULER_NAME},spec.nodeName="));
    let stores = Stores {
        pods: spawn_reflector(Api::<Pod>::all(client.clone()), pending, wake.clone()),
        sites: spawn_reflector(
            Api::<OffloadSite>::all(client.clone()),
            scoped.clone(),
            wake.clone(),
        ),
        policies: spawn_reflector(Api::<OffloadPolicy>::all(client.clone()), scoped, wake.clone()),
        namespaces: spawn_reflector(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
        ),
    };
    for s in [&stores.pods] {
        let _ = s.wait_until_ready().await;
    }
    let _ = stores.sites.wait_until_ready().await;
    let _ = stores.policies.wait_until_ready().await;
    let _ = stores.namespaces.wait_until_ready().await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    );
    let mut told: HashMap<String, String> = HashMap::new();
    loop {
        if let Err(e) = cycle(
            &client,
            &stores,
            &metrics,
            &recorder,
            &mut told,
            selector.is_some(),
        )
        .await
        {
            tracing::warn!(error = %e, "scheduling cycle failed");
        }
        let _ = tokio::time::timeout(TICK, wake.notified()).await;
        // Let a burst of events settle into one cycle.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn_reflector<K>(api: Api<K>, cfg: watcher::Config, wake: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::debug!(error = %e, "watch error (retried)");
            }
            wake.notify_one();
        }
    });
    reader
}

async fn cycle(
    client: &Client,
    stores: &Stores,
    metrics: &Metrics,
    recorder: &Recorder,
    told: &mut HashMap<String, String>,
    sharded: bool,
) -> Result<(), kube::Error> {
    let mut pending: Vec<Arc<Pod>> = stores
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
        })
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed" | "Succeeded")
            )
        })
        .collect();
    metrics.pending_pods.set(pending.len() as i64);
    let sites = stores.sites.state();
    let policies = stores.policies.state();
    let mut snapshots = snapshot(client, &sites).await?;
    update_policy_status(client, &policies, &snapshots).await;
    if pending.is_empty() {
        return Ok(());
    }
    pending.sort_by_key(|p| (p.metadata.creation_timestamp.clone().map(|t| t.0), p.name_any()));
    for pod in pending {
        let start = Instant::now();
        let ns = pod.namespace().unwrap_or_default();
        let ns_labels = stores
            .namespaces
            .state()
            .into_iter()
            .find(|n| n.name_any() == ns)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        let needs = needs(&pod, ns_labels);
        if sharded && !in_shard(&pod, &sites, &policies) {
            continue;
        }
        let policy = match choose_policy(&pod, &needs, &policies) {
            Ok(p) => p,
            Err(message) => {
                unschedulable(client, recorder, &pod, &message, false, told).await;
                metrics.placements.with_label_values(&["", "", "refused"]).inc();
                continue;
            }
        };
        let decision = placement::place(&needs, &policy, &snapshots, &excluded(&pod));
        metrics.placement_duration.observe(start.elapsed().as_secs_f64());
        match &decision.chosen {
            Some(site) => {
                if let Err(e) = bind(client, &pod, site, &decision).await {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "binding failed; retried next cycle");
                    continue;
                }
                reserve(&mut snapshots, site, &decision.policy, &needs.requests);
                told.remove(&pod.uid().unwrap_or_default());
                let best = &decision.ranking[0];
                let note = format!(
                    "bound to site {site} (node {}) by policy {}: score {} (queue {}, cost {}, free {}, gpu {}); {} other site(s) rejected",
                    node_name(site),
                    decision.policy,
                    best.score,
                    best.queue,
                    best.cost,
                    best.free_capacity,
                    best.gpu_fit,
                    decision.rejected.len()
                );
                publish(recorder, &pod, EventType::Normal, "Scheduled", &note).await;
                metrics
                    .placements
                    .with_label_values(&[&decision.policy, site, "scheduled"])
                    .inc();
            }
            None => {
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
                let fail = matches!(
                    policies
                        .iter()
                        .find(|p| p.name_any() == policy.name)
                        .map(|p| p.spec.when_nothing_fits),
                    Some(crate::crd::policy::WhenNothingFits::Fail)
                );
                unschedulable(client, recorder, &pod, &message, fail, told).await;
                metrics
                    .placements
                    .with_label_values(&[&decision.policy, "", "unschedulable"])
                    .inc();
            }
        }
    }
    Ok(())
}

/// Sites as the engine sees them: status from the site controller, load from the pods bound to
/// their Nodes now.
async fn snapshot(client: &Client, sites: &[Arc<OffloadSite>]) -> Result<Vec<SiteSnapshot>, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&ListParams::default().labels(SITE_LABEL)).await?;
    let mut out = Vec::new();
    for site in sites {
        let name = site.name_any();
        let node = node_name(&name);
        let capacity = node_list
            .items
            .iter()
            .find(|n| n.name_any() == node)
            .and_then(|n| n.status.as_ref()?.allocatable.clone())
            .unwrap_or_default();
        let cap = Resources {
            cpu_milli: capacity
                .get("cpu")
                .map(|q| crate::quantity::milli(&q.0))
                .unwrap_or(0),
            memory_bytes: capacity
                .get("memory")
                .map(|q| crate::quantity::int(&q.0))
                .unwrap_or(0),
            pods: capacity
                .get("pods")
                .map(|q| crate::quantity::int(&q.0))
                .unwrap_or(0),
            gpus: capacity
                .iter()
                .filter(|(k, _)| k.contains('/'))
                .map(|(k, q)| (k.clone(), crate::quantity::int(&q.0)))
                .collect(),
        };
        let active = super::load::active_pods(client, &node).await?;
        let mut free = cap.clone();
        let mut not_started = 0;
        for p in &active {
            let r = super::load::requests(p);
            free.cpu_milli -= r.cpu_milli;
            free.memory_bytes -= r.memory_bytes;
            free.pods -= 1;
            for (g, n) in r.gpus {
                *free.gpus.entry(g).or_default() -= n;
            }
            if p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_none_or(|ph| ph == "Pending")
            {
                not_started += 1;
            }
        }
        let status = site.status.clone().unwrap_or_default();
        let unstarted = super::load::longest_unstarted(&active, jiff::Timestamp::now());
        let slots = site.spec.max_concurrent_pods.map(i64::from).unwrap_or(cap.pods);
        out.push(SiteSnapshot {
            name: name.clone(),
            labels: site.spec.site_labels.clone(),
            kind: site.spec.kind,
            architecture: site.spec.architecture,
            ready: is_true(&status.conditions, "Ready"),
            cordoned: site.spec.cordoned,
            namespace_selector: site.spec.namespace_selector.clone(),
            relative_cost: crate::placement::cost_milli(site.spec.relative_cost),
            max_concurrent_pods: site.spec.max_concurrent_pods.map(i64::from),
            active_pods: active.len() as i64,
            pods_by_policy: pods_by_policy(&active),
            capacity: cap,
            free,
            gpus: site
                .spec
                .capacity
                .gpus
                .iter()
                .map(|g| GpuOffer {
                    resource: g.resource_name.clone(),
                    model: g.model.clone(),
                    memory_bytes: g.memory_per_gpu.as_ref().map(|q| crate::quantity::int(&q.0)),
                })
                .collect(),
            expected_wait_seconds: queue::with_unstarted(
                queue::expected_wait(
                    site.spec.typical_queue_wait_seconds.map(i64::from),
                    status.observed_queue_wait_seconds.map(|s| s as f64),
                    not_started,
                    slots,
                ),
                unstarted,
                i64::from(site.spec.status_sync_interval_seconds),
            ),
            not_starting: unstarted >= i64::from(site.spec.pod_start_timeout_seconds),
        });
    }
    Ok(out)
}

fn needs(pod: &Pod, namespace_labels: BTreeMap<String, String>) -> PodNeeds {
    PodNeeds {
        namespace: pod.namespace().unwrap_or_default(),
        namespace_labels,
        requests: super::load::requests(pod),
        pinned_site: pod.annotations().get(ANNOTATION_SITE).cloned(),
    }
}

/// Sites the pod must avoid (`offload.dev/exclude-sites`, set on RemoteJob retries).
fn excluded(pod: &Pod) -> Vec<String> {
    pod.annotations()
        .get(ANNOTATION_EXCLUDE_SITES)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// For a sharded operator (`--site-selector`): whether the pod's named policy or pinned site is
/// one this operator manages. A pod naming neither is placed by any shard with a site for it.
fn in_shard(pod: &Pod, sites: &[Arc<OffloadSite>], policies: &[Arc<OffloadPolicy>]) -> bool {
    let a = pod.annotations();
    a.get(ANNOTATION_POLICY)
        .is_none_or(|n| policies.iter().any(|p| &p.name_any() == n))
        && a.get(ANNOTATION_SITE)
            .is_none_or(|n| sites.iter().any(|s| &s.name_any() == n))
}

/// The named policy (when the pod may use it), else the highest-priority matching one, else the
/// built-in default (every site, default weights).
fn choose_policy(pod: &Pod, needs: &PodNeeds, policies: &[Arc<OffloadPolicy>]) -> Result<PolicyView, String> {
    let requests_mismatch = |p: &OffloadPolicy| {
        p.spec
            .pod_requests
            .as_ref()
            .and_then(|r| placement::selector::requests_mismatch(r, &needs.requests))
    };
    let governs = |p: &OffloadPolicy| {
        p.spec
            .namespace_selector
            .as_ref()
            .is_none_or(|s| placement::selector::matches(s, &needs.namespace_labels))
            && p.spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| placement::selector::matches(s, pod.labels()))
            && requests_mismatch(p).is_none()
    };
    if let Some(name) = pod.annotations().get(ANNOTATION_POLICY) {
        let Some(p) = policies.iter().find(|p| &p.name_any() == name) else {
            return Err(format!(
                "the pod names OffloadPolicy {name:?}, which does not exist"
            ));
        };
        if !p
            .spec
            .namespace_selector
            .as_ref()
            .is_none_or(|s| placement::selector::matches(s, &needs.namespace_labels))
        {
            return Err(format!(
                "OffloadPolicy {name:?} does not allow namespace {:?}",
                needs.namespace
            ));
        }
        if let Some(why) = requests_mismatch(p) {
            return Err(format!("the pod names OffloadPolicy {name:?}, but {why}"));
        }
        return Ok(view(p));
    }
    let mut matching: Vec<&Arc<OffloadPolicy>> = policies.iter().filter(|p| governs(p)).collect();
    matching.sort_by(|a, b| {
        (std::cmp::Reverse(a.spec.priority), a.name_any())
            .cmp(&(std::cmp::Reverse(b.spec.priority), b.name_any()))
    });
    Ok(matching.first().map(|p| view(p)).unwrap_or_else(|| PolicyView {
        name: "default".into(),
        ..PolicyView::default()
    }))
}

fn view(p: &OffloadPolicy) -> PolicyView {
    PolicyView {
        name: p.name_any(),
        site_selector: p.spec.site_selector.clone(),
        sites: p.spec.sites.clone(),
        requirements: p.spec.requirements.clone(),
        min_gpu_memory_bytes: p
            .spec
            .requirements
            .min_gpu_memory
            .as_ref()
            .map(|q| crate::quantity::int(&q.0)),
        weights: p.spec.weights.clone(),
        strategy: p.spec.strategy,
    }
}

/// Pods by the policy that placed them, from their placement annotation (pods bound some other
/// way, e.g. interLink-style by kube-scheduler, count for no policy).
fn pods_by_policy(pods: &[Pod]) -> BTreeMap<String, i64> {
    #[derive(serde::Deserialize)]
    struct PlacedBy {
        policy: String,
    }
    let mut out = BTreeMap::new();
    for p in pods {
        let placed = p
            .annotations()
            .get(ANNOTATION_PLACEMENT)
            .and_then(|a| serde_json::from_str::<PlacedBy>(a).ok());
        if let Some(PlacedBy { policy }) = placed {
            *out.entry(policy).or_default() += 1;
        }
    }
    out
}

fn reserve(snapshots: &mut [SiteSnapshot], site: &str, policy: &str, r: &Resources) {
    if let Some(s) = snapshots.iter_mut().find(|s| s.name == site) {
        s.free.cpu_milli -= r.cpu_milli;
        s.free.memory_bytes -= r.memory_bytes;
        s.free.pods -= 1;
        s.active_pods += 1;
        *s.pods_by_policy.entry(policy.to_string()).or_default() += 1;
        for (g, n) in &r.gpus {
            *s.free.gpus.entry(g.clone()).or_default() -= n;
        }
    }
}

/// Writes the explanation, then binds through `pods/binding`.
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
    let patch = json!({"metadata": {"annotations": {ANNOTATION_PLACEMENT: explanation}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            uid: None,
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

/// `PodScheduled=False` (or `Failed` under a "fail" policy), with an Event when the reasons change.
async fn unschedulable(
    client: &Client,
    recorder: &Recorder,
    pod: &Pod,
    message: &str,
    fail: bool,
    told: &mut HashMap<String, String>,
) {
    let uid = pod.uid().unwrap_or_default();
    if told.get(&uid).map(String::as_str) == Some(message) {
        return;
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let now = Time(jiff::Timestamp::now());
    let mut status = json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastTransitionTime": now, "lastProbeTime": null}]}});
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
    publish(recorder, pod, EventType::Warning, "FailedScheduling", message).await;
    told.insert(uid, message.to_string());
}

async fn publish(recorder: &Recorder, pod: &Pod, type_: EventType, reason: &str, note: &str) {
    super::publish_event(recorder, &pod.object_ref(&()), type_, reason, note, "Scheduling").await;
}

/// `Ready` and the eligible sites of each policy (site-level filters only), written on change.
async fn update_policy_status(client: &Client, policies: &[Arc<OffloadPolicy>], sites: &[SiteSnapshot]) {
    let api: Api<OffloadPolicy> = Api::all(client.clone());
    let now = Time(jiff::Timestamp::now());
    for p in policies {
        let view = view(p);
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
            "Ready",
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
    let sites: Vec<Arc<OffloadSite>> = Api::<OffloadSite>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("cannot list OffloadSites: {e}"))?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let policies: Vec<Arc<OffloadPolicy>> = Api::<OffloadPolicy>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("cannot list OffloadPolicies: {e}"))?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let ns = pod.namespace().unwrap_or_else(|| "default".into());
    let ns_labels = Api::<Namespace>::all(client.clone())
        .get_opt(&ns)
        .await
        .map_err(|e| format!("cannot read namespace {ns}: {e}"))?
        .and_then(|n| n.metadata.labels)
        .unwrap_or_default();
    let mut needs = needs(pod, ns_labels);
    needs.namespace = ns;
    let policy = choose_policy(pod, &needs, &policies)?;
    let snapshots = snapshot(client, &sites)
        .await
        .map_err(|e| format!("cannot read the sites' load: {e}"))?;
    Ok(placement::place(&needs, &policy, &snapshots, &excluded(pod)))
}
