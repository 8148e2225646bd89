//! The site controller: probes each site, keeps its virtual Node and its status true.

use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Node, Pod, Secret},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use serde_json::json;

use super::{
    Context, Error, Settings, credentials,
    node::{self, KubeletEndpoint, SITE_LABEL},
};
use crate::{
    crd::{
        OffloadSite,
        common::{is_true, set_condition},
        site::{OffloadSiteStatus, ResourceAmounts},
    },
    interlink::{SiteClient, Timeouts, wire::PingResponse},
    metrics::Metrics,
};

const FINALIZER: &str = "offload.dev/site-cleanup";
const MANAGER: &str = "offload-operator";
/// Probe time and latency alone are written at most this often (other changes at once).
const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// What the operator remembers about a site between probes.
#[derive(Default)]
pub struct SiteHealth {
    fingerprint: u64,
    client: Option<SiteClient>,
    failures: i32,
    reachable: bool,
    last_ping: Option<PingResponse>,
    /// When the last probe ran, and for which object (UID) and `metadata.generation`.
    last_probe: Option<(std::time::Instant, Option<String>, Option<i64>)>,
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
        self.reachable
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

/// The result of one probe.
enum Probe {
    Ok {
        latency: Duration,
        ping: Option<PingResponse>,
    },
    Failed {
        reason: String,
        message: String,
    },
    Credentials(credentials::CredentialsError),
}

/// Runs the site controller and the lease renewer until a shutdown signal.
pub async fn run(
    client: Client,
    metrics: Metrics,
    settings: Settings,
    clients: super::SiteClients,
    leases_heartbeat: crate::server::Heartbeat,
    ready: impl Fn() + Send + 'static,
) {
    let sites: Api<OffloadSite> = Api::all(client.clone());
    let mut cfg = watcher::Config::default().any_semantic();
    if let Some(sel) = &settings.site_selector {
        cfg = cfg.labels(sel);
    }
    let controller = Controller::new(sites, cfg);
    let store = controller.store();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    );
    let ns = settings.namespace.clone();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics,
        settings,
        sites: clients,
    });
    tokio::spawn(super::lease::renew_forever(
        client.clone(),
        store.clone(),
        ctx.settings.lease_renew,
        leases_heartbeat,
    ));
    let (s1, s2) = (store.clone(), store.clone());
    let health = ctx.sites.clone();
    let refs = move |store: &kube::runtime::reflector::Store<OffloadSite>, name: String| {
        let sites: Vec<_> = store
            .state()
            .into_iter()
            .filter(|s| credentials::referenced(&s.spec).contains(&name))
            .collect();
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        for s in &sites {
            h.entry(s.name_any()).or_default().refresh = true;
        }
        sites
            .iter()
            .map(|s| ObjectRef::from_obj(&**s))
            .collect::<Vec<_>>()
    };
    let ready_store = store.clone();
    tokio::spawn(async move {
        // Re-poll: the store's readiness future wakes only its latest waiter, and the controller
        // waits on it too (kube-runtime's DelayedInit keeps one waker).
        loop {
            match tokio::time::timeout(Duration::from_millis(500), ready_store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    tracing::info!("site cache filled; ready");
                    ready();
                    return;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the site cache will never fill");
                    return;
                }
                Err(_) => continue,
            }
        }
    });
    controller
        .owns(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(SITE_LABEL),
        )
        .watches(
            Api::<Secret>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
            {
                let refs = refs.clone();
                move |s| refs(&s1, s.name_any())
            },
        )
        .watches(
            Api::<ConfigMap>::namespaced(client, &ns),
            watcher::Config::default(),
            move |c| refs(&s2, c.name_any()),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(site = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

async fn reconcile(site: Arc<OffloadSite>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<OffloadSite> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, site, |event| async {
        match event {
            Finalizer::Apply(site) => apply(site, &ctx).await,
            Finalizer::Cleanup(site) => cleanup(site, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.with_label_values(&["site", label]).inc();
    result
}

fn error_policy(site: Arc<OffloadSite>, err: &Error, _ctx: Arc<Context>) -> Action {
    match err {
        Error::Finalizer(inner)
            if matches!(
                **inner,
                kube::runtime::finalizer::Error::CleanupFailed(Error::Draining(_))
            ) =>
        {
            tracing::info!(site = %site.name_any(), "{err}");
        }
        _ => tracing::warn!(site = %site.name_any(), error = %err, "site reconcile failed"),
    }
    Action::requeue(Duration::from_secs(5))
}

async fn apply(site: Arc<OffloadSite>, ctx: &Context) -> Result<Action, Error> {
    let name = site.name_any();
    let spec = &site.spec;
    // Probe once per interval. Reconciles come far more often (the Node this controller owns
    // changes at every heartbeat, status writes echo back); between probes they do nothing,
    // unless the spec or a referenced Secret or ConfigMap changed.
    let every = Duration::from_secs(spec.health_check.interval_seconds.max(1) as u64);
    {
        let mut sites = ctx.sites.lock().unwrap_or_else(|p| p.into_inner());
        let h = sites.entry(name.clone()).or_default();
        if let Some((at, uid, generation)) = &h.last_probe
            && !h.refresh
            && *uid == site.metadata.uid
            && *generation == site.metadata.generation
            && at.elapsed() < every
        {
            return Ok(Action::requeue(every - at.elapsed()));
        }
        h.refresh = false;
        h.last_probe = Some((
            std::time::Instant::now(),
            site.metadata.uid.clone(),
            site.metadata.generation,
        ));
    }
    let probe = probe(&site, ctx).await;
    let threshold = spec.health_check.failure_threshold.max(1);
    let (reachable, ping) = {
        let mut sites = ctx.sites.lock().unwrap_or_else(|p| p.into_inner());
        let h = sites.entry(name.clone()).or_default();
        match &probe {
            Probe::Ok { ping, .. } => {
                h.failures = 0;
                h.reachable = true;
                if ping.is_some() {
                    h.last_ping = ping.clone();
                }
            }
            Probe::Failed { .. } => {
                h.failures += 1;
                if h.failures >= threshold {
                    h.reachable = false;
                }
            }
            Probe::Credentials(_) => h.reachable = false,
        }
        (h.reachable, h.last_ping.clone())
    };
    let (reason, message) = match &probe {
        Probe::Ok { latency, .. } => (
            "PingSucceeded".to_string(),
            format!("the site answered its ping in {} ms", latency.as_millis()),
        ),
        Probe::Failed { reason, message } => (reason.clone(), message.clone()),
        Probe::Credentials(e) => (e.reason.to_string(), e.message.clone()),
    };
    // Until the threshold is reached a failing site stays Ready; say why anyway.
    let (ready_reason, ready_message) = if reachable && !matches!(probe, Probe::Ok { .. }) {
        (
            "PingFailing".to_string(),
            format!("probe failed, still within the failure threshold: {message}"),
        )
    } else {
        (reason.clone(), message.clone())
    };
    let metrics = &ctx.metrics;
    metrics
        .site_up
        .with_label_values(&[&name])
        .set(i64::from(reachable));
    match &probe {
        Probe::Ok { latency, .. } => {
            metrics
                .probe_latency
                .with_label_values(&[&name])
                .observe(latency.as_secs_f64());
            metrics
                .site_requests
                .with_label_values(&[&name, "ping", "ok"])
                .inc();
        }
        Probe::Failed { reason, .. } => metrics
            .site_requests
            .with_label_values(&[&name, "ping", reason])
            .inc(),
        Probe::Credentials(_) => {}
    }

    // The virtual Node and its status.
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node_name = node::node_name(&name);
    let desired = node::desired_node(&site, ping.as_ref(), reachable);
    let mut value = serde_json::to_value(&desired).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Node".into();
    let pp = PatchParams::apply(MANAGER).force();
    nodes.patch(&node_name, &pp, &Patch::Apply(&value)).await?;
    let now = Time(jiff::Timestamp::now());
    let status = node::desired_status(
        &site,
        ping.as_ref(),
        (reachable, &ready_reason, &ready_message),
        &ctx.settings.kubelet,
        &now,
    );
    let status_patch = json!({"apiVersion": "v1", "kind": "Node", "status": status});
    nodes
        .patch_status(&node_name, &pp, &Patch::Apply(&status_patch))
        .await?;
    // The lease exists as soon as the node does; the renewer keeps it fresh.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    super::lease::renew(&leases, &node_name).await?;

    // Load: pods bound to the node.
    let active = super::load::active_pods(&ctx.client, &node_name).await?;
    let capacity = node::capacity(&site, ping.as_ref());
    let allocated = allocated(&active);
    let free = free(&capacity, &allocated);

    // Site status, written only when something changed.
    let old = site.status.clone().unwrap_or_default();
    let mut new = old.clone();
    let generation = site.metadata.generation;
    set_condition(
        &mut new.conditions,
        "Ready",
        reachable,
        &ready_reason,
        &ready_message,
        generation,
        &now,
    );
    let creds_ok = !matches!(probe, Probe::Credentials(_));
    let (cr, cm) = match &probe {
        Probe::Credentials(e) => (e.reason, e.message.clone()),
        _ => (
            "CredentialsResolved",
            "every referenced Secret and ConfigMap key was found".to_string(),
        ),
    };
    set_condition(
        &mut new.conditions,
        "CredentialsReady",
        creds_ok,
        cr,
        &cm,
        generation,
        &now,
    );
    let (starting, sr, sm) = pods_starting(
        super::load::longest_unstarted(&active, now.0),
        site.spec.pod_start_timeout_seconds,
    );
    set_condition(
        &mut new.conditions,
        "PodsStarting",
        starting,
        sr,
        &sm,
        generation,
        &now,
    );
    new.observed_generation = generation;
    new.observed_queue_wait_seconds = {
        let sites = ctx.sites.lock().unwrap_or_else(|p| p.into_inner());
        sites.get(&name).map_or(old.observed_queue_wait_seconds, |h| {
            h.observed_wait(old.observed_queue_wait_seconds)
        })
    };
    new.active_pods = Some(active.len() as i32);
    new.allocated = Some(allocated);
    new.free = Some(free);
    new.node_name = Some(node_name.clone());
    new.message = Some(if reachable {
        format!("{} ({} active pods)", ready_message, active.len())
    } else {
        message.clone()
    });
    if let Probe::Ok { latency, .. } = &probe {
        new.probe_latency_milliseconds = Some(latency.as_millis() as i64);
    }
    new.last_probe_time = Some(now.clone());
    if status_changed(&old, &new) {
        let api: Api<OffloadSite> = Api::all(ctx.client.clone());
        let patch = json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite", "status": new});
        api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await?;
    }

    // Events on transitions.
    let was_starting = old
        .conditions
        .iter()
        .all(|c| c.type_ != "PodsStarting" || c.status == "True");
    if !starting && was_starting {
        let reference = site.object_ref(&());
        publish(&ctx.recorder, &reference, EventType::Warning, sr, &sm).await;
    }
    let was_ready = is_true(&old.conditions, "Ready");
    let was_creds = old
        .conditions
        .iter()
        .all(|c| c.type_ != "CredentialsReady" || c.status == "True");
    let reference = site.object_ref(&());
    if reachable && !was_ready {
        publish(
            &ctx.recorder,
            &reference,
            EventType::Normal,
            "SiteReady",
            &ready_message,
        )
        .await;
    } else if !reachable && (was_ready || old.conditions.is_empty()) {
        publish(
            &ctx.recorder,
            &reference,
            EventType::Warning,
            "SiteUnreachable",
            &format!("{reason}: {message}"),
        )
        .await;
    }
    if let Probe::Credentials(e) = &probe
        && (was_creds || old.conditions.is_empty())
    {
        publish(
            &ctx.recorder,
            &reference,
            EventType::Warning,
            "CredentialsMissing",
            &e.message,
        )
        .await;
    }
    Ok(Action::requeue(every))
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
        let mut sites = ctx.sites.lock().unwrap_or_else(|p| p.into_inner());
        let h = sites.entry(name.clone()).or_default();
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

/// The `PodsStarting` condition (status, reason, message) from the longest wait of an accepted pod
/// that has not started and the site's `podStartTimeoutSeconds`. The message stays the same while
/// the state does, so the status is not rewritten every probe.
fn pods_starting(longest_unstarted: i64, timeout_seconds: i32) -> (bool, &'static str, String) {
    if longest_unstarted < i64::from(timeout_seconds) {
        (
            true,
            "PodsStart",
            format!("no accepted pod has waited more than {timeout_seconds}s to start"),
        )
    } else {
        (
            false,
            "PodsNotStarting",
            format!(
                "a pod the site accepted more than {timeout_seconds}s ago (podStartTimeoutSeconds) has not started; \
                 no new pods are placed here until its pods start or are deleted"
            ),
        )
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

/// Whether the status differs in anything but probe time and latency, or those are stale.
fn status_changed(old: &OffloadSiteStatus, new: &OffloadSiteStatus) -> bool {
    let strip = |s: &OffloadSiteStatus| {
        let mut s = s.clone();
        s.last_probe_time = None;
        s.probe_latency_milliseconds = None;
        s.message = None;
        s
    };
    if strip(old) != strip(new) {
        return true;
    }
    match (&old.last_probe_time, &new.last_probe_time) {
        (Some(o), Some(n)) => n.0.duration_since(o.0).as_secs_f64() >= STATUS_REFRESH.as_secs_f64(),
        _ => true,
    }
}

fn allocated(pods: &[Pod]) -> ResourceAmounts {
    let sum = super::load::total(pods);
    ResourceAmounts {
        cpu: Some(Quantity(format!("{}m", sum.cpu_milli))),
        memory: Some(Quantity(sum.memory_bytes.to_string())),
        pods: Some(sum.pods as i32),
        gpus: sum.gpus.into_iter().map(|(k, v)| (k, v as i32)).collect(),
    }
}

fn free(capacity: &BTreeMap<String, Quantity>, allocated: &ResourceAmounts) -> ResourceAmounts {
    let cap = |k: &str| capacity.get(k).map(|q| q.0.clone()).unwrap_or_default();
    let used = |q: &Option<Quantity>| q.as_ref().map(|q| q.0.clone()).unwrap_or_default();
    ResourceAmounts {
        cpu: Some(Quantity(format!(
            "{}m",
            (crate::quantity::milli(&cap("cpu")) - crate::quantity::milli(&used(&allocated.cpu))).max(0)
        ))),
        memory: Some(Quantity(
            (crate::quantity::int(&cap("memory")) - crate::quantity::int(&used(&allocated.memory)))
                .max(0)
                .to_string(),
        )),
        pods: Some((crate::quantity::int(&cap("pods")) as i32 - allocated.pods.unwrap_or(0)).max(0)),
        gpus: capacity
            .iter()
            .filter(|(k, _)| k.contains('/'))
            .map(|(k, q)| {
                let n = crate::quantity::int(&q.0) as i32 - allocated.gpus.get(k).copied().unwrap_or(0);
                (k.clone(), n.max(0))
            })
            .collect(),
    }
}

async fn publish(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    super::publish_event(recorder, reference, type_, reason, note, "Probe").await;
}

/// Deleting a site (ADR 0002): its pods are deleted first (so their remote jobs are cancelled by the
/// execution controller, never orphaned), then its Node and Lease.
async fn cleanup(site: Arc<OffloadSite>, ctx: &Context) -> Result<Action, Error> {
    let name = site.name_any();
    let node_name = node::node_name(&name);
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let bound = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
        .await?;
    if !bound.items.is_empty() {
        for p in &bound.items {
            let finished = matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
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
        publish(
            &ctx.recorder,
            &site.object_ref(&()),
            EventType::Normal,
            "Draining",
            &note,
        )
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
    ctx.sites.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
    Ok(Action::await_change())
}

/// The kubelet endpoint setting, re-exported for the binary.
pub type Endpoint = KubeletEndpoint;

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

    #[test]
    fn pods_starting_turns_false_past_the_timeout_and_back() {
        assert!(pods_starting(0, 600).0);
        assert!(pods_starting(599, 600).0);
        let (ok, reason, message) = pods_starting(600, 600);
        assert!(!ok);
        assert_eq!(reason, "PodsNotStarting");
        assert_eq!(
            message,
            pods_starting(9000, 600).2,
            "a stable message: no rewrite every probe"
        );
    }

    #[test]
    fn status_is_rewritten_only_on_change_or_when_stale() {
        let t = |s: &str| Some(Time(s.parse().expect("time")));
        let old = OffloadSiteStatus {
            last_probe_time: t("2026-01-01T00:00:00Z"),
            active_pods: Some(1),
            ..Default::default()
        };
        let mut new = old.clone();
        new.last_probe_time = t("2026-01-01T00:00:10Z");
        new.probe_latency_milliseconds = Some(3);
        assert!(!status_changed(&old, &new), "a probe alone does not write");
        new.last_probe_time = t("2026-01-01T00:01:10Z");
        assert!(
            status_changed(&old, &new),
            "but the probe time is refreshed every minute"
        );
        new.last_probe_time = t("2026-01-01T00:00:10Z");
        new.active_pods = Some(2);
        assert!(status_changed(&old, &new));
    }
}
