//! The operator's HTTP server: `/metrics`, `/healthz`, `/readyz`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::metrics::Metrics;

/// Shared with the controllers: readiness flips once their caches are filled; liveness fails when
/// a periodic loop that must keep running (the status sync, the node-lease renewer) has not
/// completed a round for [`STALE_AFTER`].
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    beats: Arc<Mutex<BTreeMap<&'static str, Instant>>>,
}

/// A loop that has not beaten for this long makes `/healthz` fail (the kubelet then restarts the
/// operator): several times any loop's period, so a slow API server is not mistaken for a hang.
pub const STALE_AFTER: Duration = Duration::from_secs(120);

impl Default for Health {
    fn default() -> Self {
        Health {
            ready: Arc::new(AtomicBool::new(false)),
            beats: Arc::default(),
        }
    }
}

impl Health {
    /// Marks the operator ready.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The heartbeat of the loop `name`, which must call [`Heartbeat::beat`] once per round.
    /// Registering counts as a first beat.
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        let h = Heartbeat {
            name,
            beats: self.beats.clone(),
        };
        h.beat();
        h
    }

    /// The loops that have not beaten within `stale_after` at `now`, with how long ago they did.
    pub fn stale(&self, now: Instant, stale_after: Duration) -> Vec<(&'static str, Duration)> {
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats
            .iter()
            .map(|(n, t)| (*n, now.saturating_duration_since(*t)))
            .filter(|(_, ago)| *ago >= stale_after)
            .collect()
    }
}

/// One loop's heartbeat (see [`Health::heartbeat`]).
#[derive(Clone)]
pub struct Heartbeat {
    name: &'static str,
    beats: Arc<Mutex<BTreeMap<&'static str, Instant>>>,
}

impl Heartbeat {
    /// One round done.
    pub fn beat(&self) {
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.name, Instant::now());
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat").field("name", &self.name).finish()
    }
}

/// `/healthz`: 200 while every registered loop beats, else 503 naming the stale ones.
fn liveness(h: &Health) -> (StatusCode, String) {
    let stale = h.stale(Instant::now(), STALE_AFTER);
    if stale.is_empty() {
        return (StatusCode::OK, "ok".into());
    }
    let list: Vec<String> = stale
        .iter()
        .map(|(n, ago)| format!("{n} last completed a round {}s ago", ago.as_secs()))
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("stale: {}", list.join("; ")),
    )
}

/// The router (separate for tests).
pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State((m, _)): State<(Metrics, Health)>| async move { m.encode() }),
        )
        .route(
            "/healthz",
            get(|State((_, h)): State<(Metrics, Health)>| async move { liveness(&h) }),
        )
        .route(
            "/readyz",
            get(|State((_, h)): State<(Metrics, Health)>| async move {
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .with_state((metrics, health))
}

/// Binds and serves; returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, health);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_when_a_loop_stops_beating() {
        let h = Health::default();
        assert_eq!(liveness(&h).0, StatusCode::OK, "no loop registered yet");
        let sync = h.heartbeat("status-sync");
        let _leases = h.heartbeat("node-leases");
        let now = Instant::now();
        assert!(h.stale(now, STALE_AFTER).is_empty());
        // Two minutes later, only the status sync has beaten again.
        let later = now + Duration::from_secs(130);
        {
            let mut beats = h.beats.lock().unwrap();
            beats.insert("status-sync", later);
        }
        let stale = h.stale(later, STALE_AFTER);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0, "node-leases");
        sync.beat();
        let (code, text) = liveness(&h);
        // Real time has not moved two minutes: both are fresh for the real clock.
        assert_eq!(code, StatusCode::OK, "{text}");
    }
}
