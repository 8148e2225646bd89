//! The site controller: probes each site, keeps its virtual Node and its status true.
//!
//! Observe (the site, its credentials, its pods from the shared cache), decide ([`assess`] the
//! probe, [`status::build`] the status and [`status::transitions`] the Events), act (the Node, its
//! Lease, the status when it changed), report (Events, metrics). It alone writes
//! `OffloadSite.status` (docs/architecture.md, status ownership).

pub mod assess;
pub mod status;

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Node, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;

use self::assess::{Assessment, Probe};
use super::{Context, Error, backoff::Backoff, credentials, events::Reason, load, node};
use crate::{
    crd::{OffloadSite, OffloadSiteStatus},
    interlink::{SiteClient, Timeouts},
};

const FINALIZER: &str = "offload.dev/site-cleanup";
const MANAGER: &str = "offload-operator";
const CONTROLLER: &str = "site";

/// What the operator remembers about a site between probes (the site registry's entry).
#[derive(Default)]
pub struct SiteHealth {
    fingerprint: u64,
    client: Option<SiteClient>,
    health: assess::Health,
    /// When the last probe ran, and for which object (UID) and `metadata.generation`.
    last_probe: Option<(Instant, Option<String>, Option<i64>)>,
    /// A referenced Secret or ConfigMap changed: probe at the next reconcile, not at the interval.
    refresh: bool,
    /// Observed create-to-running moving average, in seconds: the execution controller adds
    /// samples ([`SiteHealth::observe_start`]); the site controller alone writes it into
    /// `status.observedQueueWaitSeconds`, from where it is read back after a restart.
    observed_wait: Option<f64>,
}

impl SiteHealth {
    /// The site's client, once built.
    pub fn client(&self) -> Option<SiteClient> {
        self.client.clone()
    }

    /// Whether the site passes its health check.
    pub fn is_reachable(&self) -> bool {
        self.health.reachable
    }

    /// Adds one create-to-running sample to the observed average, continuing from `persisted`
    /// (the site's status) when this process has none yet. Returns the new average.
    pub fn observe_start(&mut self, persisted: Option<i64>, sample_seconds: f64) -> f64 {
        let previous = self.observed_wait.or(persisted.map(|s| s as f64));
        let avg = crate::placement::queue::observe(previous, sample_seconds);
        self.observed_wait = Some(avg);
        avg
    }

    /// The observed average to report: this process's, else the persisted one.
    pub fn observed_wait(&self, persisted: Option<i64>) -> Option<i64> {
        self.observed_wait.map(|a| a.round() as i64).or(persisted)
    }
}

/// The site controller's own state beside the shared context.
struct Ctx {
    shared: Arc<Context>,
    backoff: Backoff,
}

/// Runs the site controller until a shutdown signal.
pub async fn run(shared: Arc<Context>) {
    let ns = shared.settings.namespace.clone();
    let client = shared.client.clone();
    let store = shared.sites.store().clone();
    let on_credentials = {
        let shared = shared.clone();
        move |name: String| refresh_referencing(&shared, &store, &name)
    };
    let on_secret = on_credentials.clone();
    let controller = Controller::for_shared_stream(shared.sites.subscribe(), shared.sites.store().clone())
        .owns_shared_stream(shared.nodes.subscribe())
        .watches(
            Api::<Secret>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
            move |s| on_secret(s.name_any()),
        )
        .watches(
            Api::<ConfigMap>::namespaced(client, &ns),
            watcher::Config::default(),
            move |c| on_credentials(c.name_any()),
        );
    let ctx = Arc::new(Ctx {
        shared,
        backoff: Backoff::default(),
    });
    let results = controller.shutdown_on_signal().run(reconcile, error_policy, ctx);
    super::drain(results, CONTROLLER).await;
}

/// The sites that reference Secret or ConfigMap `name`, marked to probe at once.
fn refresh_referencing(ctx: &Context, store: &Store<OffloadSite>, name: &str) -> Vec<ObjectRef<OffloadSite>> {
    let sites: Vec<_> = store
        .state()
        .into_iter()
        .filter(|s| credentials::referenced(&s.spec).iter().any(|r| r == name))
        .collect();
    let mut registry = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
    for s in &sites {
        registry.entry(s.name_any()).or_default().refresh = true;
    }
    sites.iter().map(|s| ObjectRef::from_obj(&**s)).collect()
}

async fn reconcile(site: Arc<OffloadSite>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let api: Api<OffloadSite> = Api::all(ctx.shared.client.clone());
    let key = site.name_any();
    let result = finalizer(&api, FINALIZER, site, |event| async {
        match event {
            Finalizer::Apply(site) => apply(site, &ctx.shared).await,
            Finalizer::Cleanup(site) => cleanup(site, &ctx.shared).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.backoff.succeeded(&key);
        ctx.shared
            .metrics
            .reconciles
            .with_label_values(&[CONTROLLER, "ok"])
            .inc();
    }
    result
}

fn error_policy(site: Arc<OffloadSite>, err: &Error, ctx: Arc<Ctx>) -> Action {
    super::on_error(&ctx.shared, &ctx.backoff, CONTROLLER, &site.name_any(), err)
}

/// How long until the next probe is due, or `None` when it is due now (and then marks it done).
/// Reconciles come far more often than probes (the Node changes at every heartbeat, status writes
/// echo back); between probes they do nothing, unless the spec or a credential changed.
fn next_probe_in(ctx: &Context, site: &OffloadSite, every: Duration) -> Option<Duration> {
    let mut registry = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
    let h = registry.entry(site.name_any()).or_default();
    if let Some((at, uid, generation)) = &h.last_probe
        && !h.refresh
        && *uid == site.metadata.uid
        && *generation == site.metadata.generation
        && at.elapsed() < every
    {
        return Some(every - at.elapsed());
    }
    h.refresh = false;
    h.last_probe = Some((
        Instant::now(),
        site.metadata.uid.clone(),
        site.metadata.generation,
    ));
    None
}

async fn apply(site: Arc<OffloadSite>, ctx: &Context) -> Result<Action, Error> {
    let name = site.name_any();
    let every = Duration::from_secs(site.spec.health_check.interval_seconds.max(1) as u64);
    if let Some(wait) = next_probe_in(ctx, &site, every) {
        return Ok(Action::requeue(wait));
    }
    // Observe.
    let probe = probe(&site, ctx).await;
    let node_name = node::node_name(&name);
    let active = super::load::active_pods_cached(ctx.pods.store(), &node_name);
    // Decide.
    let threshold = site.spec.health_check.failure_threshold;
    let (assessment, observed_wait) = {
        let mut registry = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
        let h = registry.entry(name.clone()).or_default();
        let a = assess::assess(&h.health, &probe, threshold);
        h.health = a.health.clone();
        let persisted = site.status.as_ref().and_then(|s| s.observed_queue_wait_seconds);
        (a, h.observed_wait(persisted))
    };
    // A Node of that name the operator does not own (a real node named like the site's) is
    // never taken over: the site stays not ready and says why.
    let taken = foreign_node(ctx, &site, &node_name).await?;
    let assessment = match &taken {
        None => assessment,
        Some(message) => {
            let a = assess::node_taken(assessment, message);
            let mut registry = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
            registry.entry(name.clone()).or_default().health = a.health.clone();
            a
        }
    };
    let ping = assessment.health.last_ping.as_ref();
    let capacity = node::capacity(&site, ping);
    let assumed = node::assumed_capacity(&site, ping);
    let site_taints = node::applied_site_taints(&site, ping);
    let now = Time(jiff::Timestamp::now());
    let old = site.status.clone().unwrap_or_default();
    let observed = status::Observed {
        assessment: &assessment,
        capacity: &capacity,
        assumed: &assumed,
        active: &active,
        observed_wait,
        node_name: &node_name,
        pod_start_timeout_seconds: site.spec.pod_start_timeout_seconds,
        site_taints: site_taints.as_ref(),
    };
    let new = status::build(&old, site.metadata.generation, &observed, &now);
    // Act.
    if taken.is_none() {
        write_node(ctx, &site, &assessment, &now).await?;
    }
    if status::changed(&old, &new) {
        let api: Api<OffloadSite> = Api::all(ctx.client.clone());
        // The measured bandwidth is the RemoteJob controller's field (its own field manager).
        let status = OffloadSiteStatus {
            observed_remote_bandwidth: None,
            ..new.clone()
        };
        let patch = json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite", "status": status});
        api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await?;
    }
    // Report.
    record_probe(ctx, &name, &probe, &assessment);
    let reference = site.object_ref(&());
    for (reason, note) in status::transitions(&old, &new, &assessment) {
        ctx.events.publish(&reference, reason, &note, "Probe").await;
    }
    Ok(Action::requeue(every))
}

/// Why the Node `node_name` is not the site's to write, if it exists and the operator does not
/// own it (read from the cache of the operator's Nodes, else from the API server).
async fn foreign_node(ctx: &Context, site: &OffloadSite, node_name: &str) -> Result<Option<String>, Error> {
    let cached = ctx
        .nodes
        .store()
        .get(&kube::runtime::reflector::ObjectRef::new(node_name));
    let node = match cached {
        Some(n) => Some((*n).clone()),
        None => Api::<Node>::all(ctx.client.clone()).get_opt(node_name).await?,
    };
    Ok(node.and_then(|n| node::not_owned(&n, &site.name_any())))
}

/// The virtual Node, its status and its Lease.
async fn write_node(ctx: &Context, site: &OffloadSite, a: &Assessment, now: &Time) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node_name = node::node_name(&site.name_any());
    let ping = a.health.last_ping.as_ref();
    let mut value = serde_json::to_value(node::desired_node(site, ping, a.health.reachable))
        .map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Node".into();
    let pp = PatchParams::apply(MANAGER).force();
    nodes.patch(&node_name, &pp, &Patch::Apply(&value)).await?;
    let status = node::desired_status(
        site,
        ping,
        (a.health.reachable, &a.ready_reason, &a.ready_message),
        &ctx.settings.kubelet,
        now,
    );
    let status_patch = json!({"apiVersion": "v1", "kind": "Node", "status": status});
    nodes
        .patch_status(&node_name, &pp, &Patch::Apply(&status_patch))
        .await?;
    // The lease exists as soon as the node does; the renewer keeps it fresh.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    super::lease::renew(&leases, &node_name).await?;
    Ok(())
}

fn record_probe(ctx: &Context, name: &str, probe: &Probe, a: &Assessment) {
    let m = &ctx.metrics;
    m.site_up
        .with_label_values(&[name])
        .set(i64::from(a.health.reachable));
    match probe {
        Probe::Ok { latency, .. } => {
            m.probe_latency
                .with_label_values(&[name])
                .observe(latency.as_secs_f64());
            m.site_requests.with_label_values(&[name, "ping", "ok"]).inc();
        }
        Probe::Failed { reason, .. } => m.site_requests.with_label_values(&[name, "ping", reason]).inc(),
        Probe::Credentials(_) => {}
    }
}

/// Pings the site, building (or reusing) its client from the resolved credentials.
async fn probe(site: &OffloadSite, ctx: &Context) -> Probe {
    let name = site.name_any();
    let mut config = match credentials::resolve(&ctx.client, &ctx.settings.namespace, &site.spec).await {
        Ok(c) => c,
        Err(e) => return Probe::Credentials(e),
    };
    let timeout = Duration::from_secs(site.spec.health_check.timeout_seconds.max(1) as u64);
    config.timeouts = Timeouts {
        ping: timeout,
        connect: timeout,
        ..Timeouts::default()
    };
    // The client keeps its retries for status, delete and logs; the health check itself pings
    // once per interval (`ping_once`): the failure threshold, not client retries, decides.
    let fp = fingerprint(&config);
    let client = {
        let mut registry = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
        let h = registry.entry(name).or_default();
        if h.fingerprint != fp || h.client.is_none() {
            match SiteClient::new(config) {
                Ok(c) => {
                    h.client = Some(c);
                    h.fingerprint = fp;
                }
                Err(e) => {
                    return Probe::Failed {
                        reason: "InvalidConfiguration".into(),
                        message: e.to_string(),
                    };
                }
            }
        }
        h.client.clone()
    };
    let Some(client) = client else {
        return Probe::Failed {
            reason: "InvalidConfiguration".into(),
            message: "no client".into(),
        };
    };
    match client.ping_once().await {
        Ok(p) => Probe::Ok {
            latency: p.latency,
            ping: p.response,
        },
        Err(e) => Probe::Failed {
            reason: e.reason().into(),
            message: e.to_string(),
        },
    }
}

/// A hash of everything that makes a client (the token is hashed, never stored or printed).
fn fingerprint(c: &crate::interlink::SiteConfig) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &c.endpoint,
        &c.bearer_token,
        &c.ca_pem,
        &c.client_identity_pem,
        c.insecure_skip_tls_verify,
    )
        .hash(&mut h);
    (c.timeouts.ping, c.timeouts.connect).hash(&mut h);
    h.finish()
}

/// Deleting a site (ADR 0002): its pods are deleted first (so their remote jobs are cancelled by the
/// execution controller, never orphaned), then its Node and Lease.
async fn cleanup(site: Arc<OffloadSite>, ctx: &Context) -> Result<Action, Error> {
    let name = site.name_any();
    let node_name = node::node_name(&name);
    if let Some(why) = foreign_node(ctx, &site, &node_name).await? {
        // Not the site's Node: its pods and its Lease are its kubelet's; nothing to drain.
        tracing::info!(site = %name, "{why}; removing the site without touching that Node");
        ctx.metrics.forget_site(&name);
        ctx.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let bound = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
        .await?;
    if !bound.items.is_empty() {
        for p in &bound.items {
            let finished = load::is_finished(p);
            let ns = p.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            // A finished pod is only a record: removed at once, as a kubelet would.
            let dp = if finished {
                DeleteParams::default().grace_period(0)
            } else {
                DeleteParams::default()
            };
            if p.metadata.deletion_timestamp.is_none() || finished {
                let _ = api.delete(&p.name_any(), &dp).await;
            }
        }
        let note = format!(
            "deleting {} pod(s) on node {node_name} before removing the site",
            bound.items.len()
        );
        ctx.events
            .publish(&site.object_ref(&()), Reason::Draining, &note, "Delete")
            .await;
        return Err(Error::Draining(bound.items.len()));
    }
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    match nodes.delete(&node_name, &DeleteParams::default()).await {
        Ok(_) | Err(kube::Error::Api(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let _ = leases.delete(&node_name, &DeleteParams::default()).await;
    ctx.metrics.forget_site(&name);
    ctx.registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_queue_wait_continues_from_the_persisted_value_after_a_restart() {
        let mut h = SiteHealth::default();
        assert_eq!(
            h.observed_wait(Some(300)),
            Some(300),
            "the persisted value before any sample"
        );
        assert_eq!(h.observed_wait(None), None);
        // 300 s persisted, a new sample of 100 s: the average moves from 300, not from 100.
        assert_eq!(h.observe_start(Some(300), 100.0), 260.0);
        assert_eq!(
            h.observed_wait(Some(999)),
            Some(260),
            "this process's own value wins"
        );
        assert_eq!(h.observe_start(None, 260.0), 260.0);
    }
}
