//! Leader election on a `coordination.k8s.io/v1` Lease (ADR 0008), so two or more replicas can
//! run and only one acts: the leader schedules, creates, deletes and syncs; a standby keeps its
//! caches warm and reads the Lease every retry period. Writes are optimistic (`replace` with the
//! resourceVersion read), so two standbys racing for a free lease cannot both win.
//!
//! [`Elector::run`] starts the leader's work when this replica acquires the lease and drops it
//! (every controller and task it started) when leadership is lost, then contends again: the
//! process never exits for it. On a shutdown signal the work drains, then the lease is released
//! at once so a standby takes over within one retry period instead of a lease duration.

pub mod decide;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

pub use self::decide::Timing;
use self::decide::{Decision, Observed, Record};
use crate::{health::Health, metrics::Metrics};

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
}

/// Why a lease request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server answered with an error.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// No answer within the retry period.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Elector {
    /// An elector for lease `name` in `namespace`, as `identity` (unique per replica).
    pub fn new(client: Client, namespace: &str, name: &str, identity: String, timing: Timing) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity,
            timing,
        }
    }

    /// This replica's identity in the lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Runs `lead()` while this replica leads, until a shutdown signal ends it (or ends the wait
    /// of a standby); then releases the lease if held.
    pub async fn run<F, Fut>(self, health: &Health, metrics: &Metrics, lead: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        // Until when this replica leads (None: it does not).
        let (tx, mut rx) = watch::channel(None::<Instant>);
        let work = async {
            loop {
                tokio::select! {
                    changed = rx.wait_for(|until| until.is_some_and(|u| u > now())) => {
                        if changed.is_err() { return }
                    }
                    _ = shutdown_signal() => return,
                }
                tracing::info!(lease = %self.name, identity = %self.identity, "leading: starting the controllers");
                tokio::select! {
                    _ = lead() => return,
                    _ = lost(&mut rx) => {
                        metrics.clear_leader_series();
                        tracing::warn!(lease = %self.name, "lost the leadership: controllers stopped; contending again");
                    }
                }
            }
        };
        tokio::select! {
            _ = self.campaign(tx, health, metrics) => {}
            _ = work => {}
        }
        health.set_role(Some("standby"));
        metrics.leader.set(0);
        match self.release().await {
            Ok(true) => tracing::info!(lease = %self.name, "lease released"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "cannot release the lease; a standby takes over when it expires")
            }
        }
    }

    /// Reads and writes the lease forever, publishing until when this replica leads.
    async fn campaign(&self, tx: watch::Sender<Option<Instant>>, health: &Health, metrics: &Metrics) {
        let mut seen = Observed::default();
        let mut current: Option<Lease> = None;
        let mut was_leading = false;
        health.set_role(Some("standby"));
        metrics.leader.set(0);
        loop {
            match self.bounded(self.api.get_opt(&self.name)).await {
                Ok(lease) => {
                    seen.saw(lease.as_ref().map(record), now());
                    current = lease;
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot read the lease"),
            }
            let decision = decide::decide(&self.identity, &seen, now(), &self.timing);
            if decision != Decision::Wait {
                let sent = now();
                match self.bounded(self.write(decision, current.as_ref())).await {
                    Ok(lease) => {
                        seen.saw(Some(record(&lease)), now());
                        seen.renewed_at = Some(sent);
                        current = Some(lease);
                        if decision != Decision::Renew {
                            tracing::info!(lease = %self.name, identity = %self.identity, "acquired the lease");
                        }
                    }
                    // Another replica wrote first: read again next round.
                    Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
                        tracing::debug!(lease = %self.name, "lost a race for the lease")
                    }
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, ?decision, "cannot write the lease")
                    }
                }
            }
            let until = decide::leading_until(&self.identity, &seen, &self.timing);
            let leads = until.is_some_and(|u| u > now());
            if leads != was_leading {
                health.set_role(Some(if leads { "leader" } else { "standby" }));
                metrics.leader.set(i64::from(leads));
                if leads {
                    metrics.leader_transitions.inc();
                }
                was_leading = leads;
            }
            tx.send_replace(until);
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// `request`, abandoned after one retry period: a hung request must not hold the loop past
    /// the renew deadline.
    async fn bounded<T>(&self, request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Error> {
        match tokio::time::timeout(self.timing.retry, request).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Timeout(self.timing.retry)),
        }
    }

    /// Creates, acquires or renews the lease (optimistically, on the resourceVersion read).
    async fn write(&self, decision: Decision, current: Option<&Lease>) -> Result<Lease, kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let duration = i32::try_from(self.timing.duration.as_secs()).unwrap_or(i32::MAX);
        match (decision, current) {
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (_, Some(current)) => {
                let mut lease = current.clone();
                let spec = lease.spec.get_or_insert_with(Default::default);
                if decision == Decision::Acquire {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                }
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(now);
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        }
    }

    /// Frees the lease if this replica holds it (`true` when it did).
    async fn release(&self) -> Result<bool, Error> {
        let Some(mut lease) = self.bounded(self.api.get_opt(&self.name)).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        self.bounded(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await?;
        Ok(true)
    }
}

/// Resolves when the leadership published on `rx` ends: the campaign says this replica no
/// longer holds the lease, or the deadline it published passes without a renewal moving it.
async fn lost(rx: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let until = *rx.borrow_and_update();
        let Some(until) = until else { return };
        if until <= now() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {}
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Now, on tokio's clock (which tests can pause), as the `Instant` the pure decision takes.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The decision's view of a Lease.
fn record(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
        renewed: spec.renew_time.map(|t| t.0.to_string()),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

/// A unique identity: `base` (the pod name, or the host name) and a random suffix, so a replica
/// restarted under the same name never mistakes its predecessor's claim for its own.
pub fn identity(base: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{base}_{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Resolves on SIGTERM or SIGINT (what kube-runtime's `shutdown_on_signal` also listens for).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_unique_and_keep_their_base() {
        let a = identity("offload-operator-7d9f-abc");
        let b = identity("offload-operator-7d9f-abc");
        assert!(a.starts_with("offload-operator-7d9f-abc_"));
        assert_ne!(a, b);
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_at_its_deadline_unless_renewed() {
        let t0 = now();
        let (tx, mut rx) = watch::channel(Some(t0 + Duration::from_secs(10)));
        let ended = tokio::spawn(async move {
            lost(&mut rx).await;
            now()
        });
        // A renewal at 8 s moves the deadline to 18 s.
        tokio::time::sleep(Duration::from_secs(8)).await;
        tx.send_replace(Some(t0 + Duration::from_secs(18)));
        let at = ended.await.expect("the task ends");
        assert_eq!(at.duration_since(t0).as_secs(), 18);
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_at_once_when_the_lease_shows_another_holder() {
        let t0 = now();
        let (tx, mut rx) = watch::channel(Some(t0 + Duration::from_secs(10)));
        let ended = tokio::spawn(async move {
            lost(&mut rx).await;
            now()
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send_replace(None);
        let at = ended.await.expect("the task ends");
        assert_eq!(at.duration_since(t0).as_secs(), 3);
    }

    #[test]
    fn an_empty_holder_reads_as_free() {
        let lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(record(&lease).holder, None);
        assert_eq!(record(&lease).duration, Duration::from_secs(15));
    }
}
