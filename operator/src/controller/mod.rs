//! Controllers: each observes (the shared caches of [`Context`]), decides with pure functions,
//! acts, and reports. [`run`] starts them all on one context.
//!
//! | controller | triggered by | pure decision |
//! |---|---|---|
//! | [`site`] | OffloadSites, their Nodes, credential Secrets/ConfigMaps | [`site::assess`], [`site::status`] |
//! | [`execution`] | pods bound to site Nodes | [`execution::decide`] |
//! | [`scheduler`] | any cache change, every few seconds | [`crate::placement`], [`scheduler::snapshot`] |
//! | [`remote_job`] | RemoteJobs and their pods | [`remote_job::plan`] |
//! | [`kueue`] | OffloadSites (with `--kueue`) | [`kueue::flavor`] |
//! | [`site_capacity`] | Workloads with a pending `offload.dev/site-capacity` check (with `--kueue`) | [`site_capacity::check`] |
//! | [`missed`] | unbound pods of the default scheduler (with the webhook on) | [`crate::webhook::decide::missed`] |

pub mod backoff;
pub mod context;
pub mod credentials;
pub mod events;
pub mod execution;
pub mod kueue;
pub mod lease;
pub mod load;
pub mod missed;
pub mod node;
pub mod remote_job;
pub mod scheduler;
pub mod site;
pub mod site_capacity;
pub mod status_map;
pub mod written;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use self::backoff::Category;
pub use self::context::{Context, Settings};

/// Why a reconciliation failed (it is retried, with a backoff by [`Category`]).
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
    /// A site could not be reached or answered with an error worth retrying.
    #[error("site {site}: {source}")]
    Site {
        /// The site.
        site: String,
        /// What it answered.
        #[source]
        source: crate::interlink::Error,
    },
    /// An attempt pod's name is taken by a pod another object owns.
    #[error("pod {0} exists and does not belong to this RemoteJob")]
    NameTaken(String),
    /// The object refers to something that does not exist or is not allowed.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The category that decides the retry delay.
    pub fn category(&self) -> Category {
        match self {
            Error::Kube(e) => Category::of_kube(e),
            Error::Finalizer(inner) => match &**inner {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                kube::runtime::finalizer::Error::AddFinalizer(e)
                | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Category::of_kube(e),
                _ => Category::Internal,
            },
            Error::Draining(_) => Category::Transient,
            Error::Site { source, .. } if source.is_retryable() || source.is_credentials() => {
                Category::Transient
            }
            Error::Site { .. } => Category::SiteRefused,
            Error::NameTaken(_) | Error::Invalid(_) => Category::InvalidSpec,
        }
    }
}

/// Logs and counts a failed reconcile of `key` by `controller`, and returns when to retry it.
pub(crate) fn on_error(
    ctx: &Context,
    backoff: &backoff::Backoff,
    controller: &'static str,
    key: &str,
    err: &Error,
) -> kube::runtime::controller::Action {
    let category = err.category();
    let delay = backoff.failed(key, category);
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[controller, category.as_str()])
        .inc();
    ctx.metrics
        .reconciles
        .with_label_values(&[controller, "error"])
        .inc();
    if matches!(err, Error::Draining(_))
        || matches!(err, Error::Finalizer(i) if matches!(**i, kube::runtime::finalizer::Error::CleanupFailed(Error::Draining(_))))
    {
        tracing::info!(controller, object = key, retry_in = ?delay, "{err}");
    } else {
        tracing::warn!(controller, object = key, category = category.as_str(), retry_in = ?delay, error = %err, "reconcile failed");
    }
    kube::runtime::controller::Action::requeue(backoff::jitter(delay))
}

/// Drives a controller's result stream to its end, logging each result at debug level. An object
/// gone from the cache by the time its turn came (deleted; or a pod owned by a job outside this
/// operator's selector) is not worth a line.
pub(crate) async fn drain<K, E, S>(results: S, controller: &'static str)
where
    K: kube::Resource + 'static,
    E: std::error::Error + 'static,
    S: futures::Stream<
            Item = Result<
                (
                    kube::runtime::reflector::ObjectRef<K>,
                    kube::runtime::controller::Action,
                ),
                kube::runtime::controller::Error<E, kube::runtime::watcher::Error>,
            >,
        >,
{
    use futures::StreamExt;
    results
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(controller, object = %obj.name, "reconciled"),
                Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {}
                Err(e) => tracing::debug!(controller, error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// Each site's client and health, built by the site controller and used by the others.
pub type SiteClients = Arc<Mutex<HashMap<String, site::SiteHealth>>>;

/// The client of a site and whether it is reachable, once the site controller has built it.
pub fn site_client(clients: &SiteClients, site: &str) -> Option<(crate::interlink::SiteClient, bool)> {
    let map = clients.lock().unwrap_or_else(|p| p.into_inner());
    map.get(site)
        .and_then(|h| h.client().map(|c| (c, h.is_reachable())))
}

/// Runs the operator on `ctx` until a shutdown signal: marks it ready once every cache has
/// listed (a standby too: its caches stay warm), and runs the controllers ([`lead`]) always
/// without an `elector`, or only while this replica leads with one.
pub async fn run(ctx: Arc<Context>, elector: Option<crate::leader::Elector>) {
    let ready = {
        let ctx = ctx.clone();
        async move {
            ctx.synced().await;
            tracing::info!("caches synced; ready");
            ctx.health.set_ready();
            std::future::pending::<()>().await
        }
    };
    let work = async {
        match elector {
            None => lead(ctx.clone()).await,
            Some(elector) => elector.run(&ctx.health, &ctx.metrics, || lead(ctx.clone())).await,
        }
    };
    tokio::select! {
        _ = work => {}
        _ = ready => {}
    }
}

/// Runs every controller on `ctx` until one ends (a shutdown signal ends them all). Dropping the
/// future stops them all, with every task they started (a replica that lost the leadership).
pub async fn lead(ctx: Arc<Context>) {
    tokio::select! {
        _ = site::run(ctx.clone()) => {}
        _ = execution::run(ctx.clone()) => {}
        _ = scheduler::run(ctx.clone()) => {}
        _ = remote_job::run(ctx.clone()) => {}
        _ = lease::renew_forever(ctx.clone()) => {}
        _ = missed::run(ctx.clone()) => {}
        _ = kueue::run(ctx.clone()) => {}
        _ = site_capacity::run(ctx.clone()) => {}
    }
}
