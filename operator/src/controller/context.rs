//! The one [`Context`] every controller shares, built once by [`Context::start`].

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{Api, Client, runtime::watcher};
use tokio::sync::Notify;

use super::{SiteClients, events::Events, node};
use crate::{
    cache::{self, Cache},
    crd::{OffloadPolicy, OffloadSite, RemoteJob},
    metrics::Metrics,
    server::Health,
};

/// Settings of the `run` command the controllers need.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace: where site credentials are read.
    pub namespace: String,
    /// Address and port written into each virtual Node for the kubelet API.
    pub kubelet: node::KubeletEndpoint,
    /// Only sites, policies and RemoteJobs with these labels (a label selector), for sharding or
    /// tests.
    pub site_selector: Option<String>,
    /// How often node leases are renewed; must be well below kube-controller-manager's
    /// `--node-monitor-grace-period`.
    pub lease_renew: Duration,
    /// Whether this operator serves the pod-mutating webhook: then the leader also reports pods
    /// that opted in but were created while the webhook could not answer ([`super::missed`]).
    pub webhook: bool,
    /// Whether to keep a Kueue ResourceFlavor per site ([`super::kueue`]).
    pub kueue: bool,
    /// How RemoteJob pods with data run the stage tool (ADR 0014, ADR 0016).
    pub stage: super::remote_job::data::StageSettings,
    /// Object-store endpoints the operator may call although they are loopback, link-local or
    /// cluster-internal (hosts, addresses or CIDR ranges; [`super::remote_job::egress`]).
    pub data_endpoints_allowed: Vec<String>,
    /// When each site is asked for jobs whose pod is gone (docs/adr/0015).
    pub orphans: super::execution::orphans::OrphanTiming,
}

/// What every controller shares: one client, one cache per kind (one watch each, the pod cache
/// narrowed on the server), one Event publisher, the site registry, metrics and health.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Metrics,
    /// Liveness heartbeats and readiness.
    pub health: Health,
    /// The one Event publisher.
    pub events: Events,
    /// Each site's client and health, built by the site controller, used by the others.
    pub registry: SiteClients,
    /// OffloadSites (within the site selector).
    pub sites: Cache<OffloadSite>,
    /// OffloadPolicies (within the site selector).
    pub policies: Cache<OffloadPolicy>,
    /// RemoteJobs (within the site selector).
    pub jobs: Cache<RemoteJob>,
    /// Namespaces (their labels decide tenancy).
    pub namespaces: Cache<Namespace>,
    /// The sites' virtual Nodes.
    pub nodes: Cache<Node>,
    /// Pods naming the offload scheduler or bound to a site's virtual Node ([`cache::pods`]).
    pub pods: Cache<Pod>,
    /// Wakes the scheduler's cycle: notified on every cache change.
    pub wake: Arc<Notify>,
}

impl Context {
    /// Starts every watch and returns the context; the caches fill in the background
    /// ([`Context::synced`]).
    pub fn start(client: Client, settings: Settings, metrics: Metrics, health: Health) -> Arc<Context> {
        let wake = Arc::new(Notify::new());
        let mut scoped = watcher::Config::default().any_semantic();
        if let Some(s) = &settings.site_selector {
            scoped = scoped.labels(s);
        }
        let sites = cache::spawn(
            Api::<OffloadSite>::all(client.clone()),
            scoped.clone(),
            "OffloadSite",
            wake.clone(),
            &health,
        );
        let policies = cache::spawn(
            Api::<OffloadPolicy>::all(client.clone()),
            scoped.clone(),
            "OffloadPolicy",
            wake.clone(),
            &health,
        );
        let jobs = cache::spawn(
            Api::<RemoteJob>::all(client.clone()),
            scoped,
            "RemoteJob",
            wake.clone(),
            &health,
        );
        let namespaces = cache::spawn(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            "Namespace",
            wake.clone(),
            &health,
        );
        let nodes = cache::spawn(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(node::SITE_LABEL),
            "Node",
            wake.clone(),
            &health,
        );
        let pods = cache::pods::spawn(client.clone(), sites.clone(), wake.clone(), &health);
        Arc::new(Context {
            events: Events::new(client.clone()),
            client,
            settings,
            metrics,
            health,
            registry: SiteClients::default(),
            sites,
            policies,
            jobs,
            namespaces,
            nodes,
            pods,
            wake,
        })
    }

    /// Waits until every cache has listed once.
    pub async fn synced(&self) {
        self.sites.synced().await;
        self.policies.synced().await;
        self.jobs.synced().await;
        self.namespaces.synced().await;
        self.nodes.synced().await;
        self.pods.synced().await;
    }

    /// The labels of namespace `ns`, from the cache.
    pub fn namespace_labels(&self, ns: &str) -> std::collections::BTreeMap<String, String> {
        self.namespaces
            .store()
            .get(&kube::runtime::reflector::ObjectRef::new(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default()
    }

    /// The site `name`, from the cache.
    pub fn site(&self, name: &str) -> Option<Arc<OffloadSite>> {
        self.sites
            .store()
            .get(&kube::runtime::reflector::ObjectRef::new(name))
    }
}
