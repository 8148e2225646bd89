//! The kubelet API of the virtual nodes, as far as `kubectl logs` needs it: HTTPS on the port the
//! Nodes advertise; every request authenticated (a client certificate from the configured CA, or
//! a bearer token) and authorised for its node subresource, as a kubelet does it ([`auth`]).

pub mod auth;
mod interactive;
mod logs;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Router,
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use axum_server::tls::TlsInfo;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use self::auth::{Attributes, Gate, Refused};
use crate::controller::SiteClients;

/// TLS material of the kubelet endpoint.
#[derive(Clone, Debug)]
pub struct KubeletTls {
    /// Serving certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (the API server's kubelet client CA).
    pub client_ca: PathBuf,
}

#[derive(Clone)]
struct App {
    client: kube::Client,
    sites: SiteClients,
    gate: Gate,
}

/// Serves the kubelet endpoint until the process ends.
pub async fn serve(
    addr: SocketAddr,
    tls: &KubeletTls,
    client: kube::Client,
    sites: SiteClients,
    mode: auth::Mode,
) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error + Send + Sync>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(&tls.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.client_ca)? {
        roots.add(c?)?;
    }
    // A certificate, when presented, must chain to the CA; callers without one may still use a
    // bearer token (checked per request, like a kubelet's token webhook).
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let rustls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    let gate = Gate::new(client.clone(), mode);
    let app = router(App { client, sites, gate });
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let server = axum_server::from_tcp_rustls(listener, rustls)?;
    Ok(tokio::spawn(async move {
        if let Err(e) = server.serve(app.into_make_service()).await {
            tracing::error!(error = %e, "kubelet endpoint stopped");
        }
    }))
}

fn router(app: App) -> Router {
    Router::new()
        .route("/containerLogs/{namespace}/{pod}/{container}", get(logs::logs))
        // The kubelet's forms: with the container (exec, attach, run) or without (port-forward),
        // each also with the pod's UID before it; GET (WebSocket) and POST (SPDY).
        .route("/exec/{namespace}/{pod}/{container}", any(interactive::interactive))
        .route("/exec/{namespace}/{pod}/{uid}/{container}", any(interactive::interactive))
        .route("/attach/{namespace}/{pod}/{container}", any(interactive::interactive))
        .route("/attach/{namespace}/{pod}/{uid}/{container}", any(interactive::interactive))
        .route("/run/{namespace}/{pod}/{container}", any(interactive::interactive))
        .route("/run/{namespace}/{pod}/{uid}/{container}", any(interactive::interactive))
        .route("/portForward/{namespace}/{pod}", any(interactive::interactive))
        .route("/portForward/{namespace}/{pod}/{uid}", any(interactive::interactive))
        .with_state(app)
}

/// A refusal as the kubelet answers it.
fn refusal(r: &Refused) -> Response {
    let code = match r {
        Refused::Unauthenticated => StatusCode::UNAUTHORIZED,
        Refused::Forbidden { .. } => StatusCode::FORBIDDEN,
        Refused::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, r.to_string()).into_response()
}

/// The pod a request names, once its caller is authenticated and authorised for the pod's node:
/// the request is answered here (401, 403, 404, 503) otherwise. A pod that does not exist is
/// authorised against every node, so only callers allowed everywhere learn that it does not.
async fn admit(app: &App, req: &Parts, namespace: &str, name: &str) -> Result<Pod, Response> {
    let certificate = req
        .extensions
        .get::<Arc<TlsInfo>>()
        .and_then(|info| info.peer_certificates.first().cloned());
    let authorization = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = app
        .gate
        .authenticate(certificate.as_deref(), authorization)
        .await
        .map_err(|r| refusal(&r))?;
    // Names as the API server allows them, before they go into a request of the operator's own.
    if !dns_label(namespace) || !dns_subdomain(name) {
        return Err((StatusCode::BAD_REQUEST, "invalid namespace or pod name").into_response());
    }
    let pods: Api<Pod> = Api::namespaced(app.client.clone(), namespace);
    let pod = pods.get_opt(name).await.map_err(|e| {
        // Not authorised yet: the details go to the log only.
        tracing::warn!(error = %e, pod = %format!("{namespace}/{name}"), "kubelet endpoint: cannot read the pod");
        (StatusCode::BAD_GATEWAY, "cannot read the pod").into_response()
    })?;
    let attrs = Attributes {
        verb: auth::verb(&req.method),
        subresource: auth::subresource(req.uri.path()),
        node: pod.as_ref().map(node_of).unwrap_or_default(),
    };
    app.gate
        .authorize(&caller, &attrs)
        .await
        .map_err(|r| refusal(&r))?;
    pod.ok_or_else(|| (StatusCode::NOT_FOUND, format!("pod {namespace}/{name} not found")).into_response())
}

/// The Node a pod is bound to (empty when it is not bound).
fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// A DNS-1123 label (namespace names).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (pod names): labels joined by dots, at most 253 characters.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_use() {
        assert!(dns_label("team-a") && dns_subdomain("job-0.x"));
        for bad in ["", "-a", "a-", "A", "a/b", "a?watch=true", "a%2Fb", "..", "a b"] {
            assert!(!dns_subdomain(bad), "{bad:?}");
        }
    }
}
