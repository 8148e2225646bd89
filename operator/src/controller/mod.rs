//! Controllers: each observes, decides with pure functions, acts, and reports.

pub mod credentials;
pub mod execution;
pub mod lease;
pub mod load;
pub mod node;
pub mod remote_job;
pub mod scheduler;
pub mod site;
pub mod status_map;
pub mod written;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use kube::{Client, runtime::events::Recorder};

use crate::metrics::Metrics;

/// Why a reconciliation failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A deleted site still has pods; they are being deleted first.
    #[error("waiting for {0} pod(s) on the site's node to be deleted")]
    Draining(usize),
}

/// Settings of the `run` command the controllers need.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace: where site credentials are read.
    pub namespace: String,
    /// Address and port written into each virtual Node for the kubelet API.
    pub kubelet: node::KubeletEndpoint,
    /// Only sites with these labels (a label selector), for sharding or tests.
    pub site_selector: Option<String>,
    /// How often node leases are renewed; must be well below kube-controller-manager's
    /// `--node-monitor-grace-period`.
    pub lease_renew: std::time::Duration,
}

/// What every reconciliation shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub settings: Settings,
    /// Per-site health and client, kept between probes (shared with the execution controller).
    pub sites: SiteClients,
}

/// Each site's client and health, built by the site controller and used by the others.
pub type SiteClients = Arc<Mutex<HashMap<String, site::SiteHealth>>>;

/// The client of a site and whether it is reachable, once the site controller has built it.
pub fn site_client(clients: &SiteClients, site: &str) -> Option<(crate::interlink::SiteClient, bool)> {
    let map = clients.lock().unwrap_or_else(|p| p.into_inner());
    map.get(site)
        .and_then(|h| h.client().map(|c| (c, h.is_reachable())))
}

/// Publishes an Event about `reference`; a failure is logged, never fatal (Events are best effort).
/// The note is cut to 1000 characters, well within the API's limit.
pub(crate) async fn publish_event(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: kube::runtime::events::EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "cannot publish an Event");
    }
}
