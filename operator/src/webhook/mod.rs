//! The pod-mutating admission webhook: opt-in to offloading by an annotation or a namespace label,
//! with no scheduler name in the manifest (ADR 0012).
//!
//! Served over HTTPS on its own port by every replica (a standby answers too: admission must not
//! wait for a leader). Two paths, one per entry of the MutatingWebhookConfiguration, so the
//! operator knows which selector matched without reading the Namespace: [`PATH_NAMESPACE`] and
//! [`PATH_ANNOTATED`]. [`decide`] is the pure part; this module parses, answers and counts.

pub mod decide;

use std::{net::SocketAddr, path::PathBuf, time::Instant};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};

use self::decide::{Decision, Route};
use crate::metrics::Metrics;

/// Path of the entry for pods in namespaces labelled `offload.dev/offload=enabled`.
pub const PATH_NAMESPACE: &str = "/mutate/pods/namespace";
/// Path of the entry for pods carrying an opt-in annotation.
pub const PATH_ANNOTATED: &str = "/mutate/pods/annotated";
/// How often the serving certificate files are checked for a new version (a Secret volume is
/// updated in place when the certificate is rotated).
const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// TLS material of the webhook endpoint (PEM files, reloaded when they change).
#[derive(Clone, Debug)]
pub struct WebhookTls {
    /// Serving certificate (the chain the API server verifies with the configuration's caBundle).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// What went wrong answering one review (answered as a 400 with the message).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not an AdmissionReview of a pod.
    #[error("not an AdmissionReview with a request: {0}")]
    NotAReview(String),
    /// The pod could not be turned into a JSON patch.
    #[error("building the patch: {0}")]
    Patch(#[from] serde_json::Error),
}

/// Answers one AdmissionReview (pure: no I/O); returns the response and the metric result.
pub fn review(
    body: AdmissionReview<Pod>,
    route: Route,
) -> Result<(AdmissionReview<DynamicObject>, &'static str), Error> {
    let req: AdmissionRequest<Pod> = body
        .try_into()
        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| Error::NotAReview(e.to_string()))?;
    let response = AdmissionResponse::from(&req);
    let Some(pod) = req.object.as_ref().filter(|_| req.operation == Operation::Create) else {
        return Ok((response.into_review(), "not_a_create"));
    };
    let decision = decide::decide(pod, route);
    let result = decision.result();
    let response = match decision {
        Decision::Mutate(new) => {
            let patch = json_patch::diff(&serde_json::to_value(pod)?, &serde_json::to_value(&*new)?);
            response
                .with_patch(patch)
                .map_err(|e| Error::NotAReview(e.to_string()))?
        }
        Decision::Unchanged => response,
        Decision::LeaveAlone { warning, .. } => {
            let mut response = response;
            response.warnings = warning.map(|w| vec![w]);
            response
        }
    };
    Ok((response.into_review(), result))
}

#[derive(Clone)]
struct App {
    metrics: Metrics,
}

async fn handle(app: App, route: Route, body: axum::body::Bytes) -> (StatusCode, Json<serde_json::Value>) {
    let started = Instant::now();
    let label = match route {
        Route::Namespace => "namespace",
        Route::Annotated => "annotated",
    };
    let outcome = serde_json::from_slice::<AdmissionReview<Pod>>(&body)
        .map_err(|e| Error::NotAReview(e.to_string()))
        .and_then(|r| review(r, route));
    let (status, body, result) = match outcome {
        Ok((review, result)) => match serde_json::to_value(&review) {
            Ok(v) => (StatusCode::OK, v, result),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": e.to_string()}),
                "error",
            ),
        },
        Err(e) => {
            tracing::warn!(error = %e, route = label, "cannot answer an admission review");
            (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": e.to_string()}),
                "error",
            )
        }
    };
    app.metrics
        .webhook_admissions
        .with_label_values(&[label, result])
        .inc();
    app.metrics
        .webhook_duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(route = label, result, "admission review");
    (status, Json(body))
}

fn router(app: App) -> Router {
    Router::new()
        .route(
            PATH_NAMESPACE,
            post(|State(app): State<App>, body: axum::body::Bytes| handle(app, Route::Namespace, body)),
        )
        .route(
            PATH_ANNOTATED,
            post(|State(app): State<App>, body: axum::body::Bytes| handle(app, Route::Annotated, body)),
        )
        .with_state(app)
}

/// Binds and serves the webhook until the process ends; returns the bound address. The
/// certificate files are read now (a missing or bad one fails the start) and again whenever they
/// change.
pub async fn serve(
    addr: SocketAddr,
    tls: &WebhookTls,
    metrics: Metrics,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
    let rustls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key).await?;
    tokio::spawn(reload(rustls.clone(), tls.clone()));
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let server = axum_server::from_tcp_rustls(listener, rustls)?;
    let app = router(App { metrics });
    Ok((
        bound,
        tokio::spawn(async move {
            if let Err(e) = server.serve(app.into_make_service()).await {
                tracing::error!(error = %e, "webhook endpoint stopped");
            }
        }),
    ))
}

/// Reloads the certificate when either file's content changes (rotation); a bad new pair is
/// logged and the old one kept.
async fn reload(config: axum_server::tls_rustls::RustlsConfig, tls: WebhookTls) {
    let read = |tls: &WebhookTls| (std::fs::read(&tls.cert).ok(), std::fs::read(&tls.key).ok());
    let mut last = read(&tls);
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let now = read(&tls);
        if now == last {
            continue;
        }
        match config.reload_from_pem_file(&tls.cert, &tls.key).await {
            Ok(()) => tracing::info!(cert = %tls.cert.display(), "webhook certificate reloaded"),
            Err(e) => {
                tracing::warn!(error = %e, "webhook certificate changed but cannot be loaded; keeping the old one")
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_of(pod: serde_json::Value, operation: &str) -> AdmissionReview<Pod> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0b1c",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "p",
                "namespace": "ns",
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": pod,
                "dryRun": false
            }
        }))
        .unwrap()
    }

    fn pod(annotations: serde_json::Value, scheduler: Option<&str>) -> serde_json::Value {
        let mut spec = serde_json::json!({"containers": [{"name": "c", "image": "busybox"}]});
        if let Some(s) = scheduler {
            spec["schedulerName"] = s.into();
        }
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": annotations}, "spec": spec})
    }

    fn response(r: &AdmissionReview<DynamicObject>) -> serde_json::Value {
        serde_json::to_value(r).unwrap()["response"].clone()
    }

    /// Applies the response's JSON patch to `original`, as the API server does (kube writes the
    /// patch's bytes as a JSON array, which Go's decoder accepts for `[]byte` too).
    fn patched(original: &serde_json::Value, resp: &serde_json::Value) -> serde_json::Value {
        let bytes: Vec<u8> = serde_json::from_value(resp["patch"].clone()).expect("a patch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut doc = original.clone();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    #[test]
    fn the_patch_applied_to_the_request_gives_the_offloaded_pod() {
        let original = pod(serde_json::json!({"offload.dev/offload": "true"}), None);
        let (r, result) = review(review_of(original.clone(), "CREATE"), Route::Annotated).unwrap();
        assert_eq!(result, "mutated");
        let resp = response(&r);
        assert_eq!(resp["uid"], "0b1c");
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        let out = patched(&original, &resp);
        assert_eq!(out["spec"]["schedulerName"], "offload-scheduler");
        assert_eq!(out["spec"]["tolerations"].as_array().unwrap().len(), 2);
        // Nothing else of the pod changed.
        assert_eq!(out["spec"]["containers"], original["spec"]["containers"]);
        assert_eq!(out["metadata"]["annotations"]["offload.dev/offload"], "true");
    }

    #[test]
    fn another_scheduler_is_allowed_unchanged_with_a_warning() {
        let original = pod(
            serde_json::json!({"offload.dev/offload": "true"}),
            Some("volcano"),
        );
        let (r, result) = review(review_of(original, "CREATE"), Route::Annotated).unwrap();
        assert_eq!(result, "other_scheduler");
        let resp = response(&r);
        assert_eq!(resp["allowed"], true);
        assert!(resp.get("patch").is_none());
        assert!(resp["warnings"][0].as_str().unwrap().contains("volcano"));
    }

    #[test]
    fn updates_are_allowed_untouched() {
        let original = pod(serde_json::json!({"offload.dev/offload": "true"}), None);
        let (r, result) = review(review_of(original, "UPDATE"), Route::Annotated).unwrap();
        assert_eq!(result, "not_a_create");
        assert!(response(&r).get("patch").is_none());
    }
}
