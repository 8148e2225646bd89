//! The operator's HTTP server: `/metrics`, `/healthz`, `/readyz`.

use std::{net::SocketAddr, time::Instant};

use axum::{Router, extract::State, http::StatusCode, routing::get};

pub use crate::health::Health;
use crate::{health::Problems, metrics::Metrics};

/// 200 "ok" when there are no problems, else 503 naming them.
fn answer(problems: Problems) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, "ok".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.to_string())
    }
}

/// `/readyz`: as [`answer`], and a ready replica taking part in leader election says whether it
/// leads (`ok: leader`, `ok: standby`). A standby is ready: it serves metrics and takes over.
fn readiness(health: &Health) -> (StatusCode, String) {
    match (answer(health.readiness(Instant::now())), health.role()) {
        ((StatusCode::OK, _), Some(role)) => (StatusCode::OK, format!("ok: {role}")),
        (other, _) => other,
    }
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
            get(|State((_, h)): State<(Metrics, Health)>| async move { answer(h.liveness(Instant::now())) }),
        )
        .route(
            "/readyz",
            get(|State((_, h)): State<(Metrics, Health)>| async move { readiness(&h) }),
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
