//! The kubelet API of the virtual nodes, as far as `kubectl logs` needs it: HTTPS on the port the
//! Nodes advertise, callers authenticated by a client certificate from the configured CA (the API
//! server's kubelet client certificate); anonymous requests are refused during the TLS handshake.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::TryStreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};
use kube::{Api, ResourceExt};
use serde::Deserialize;

use crate::{
    controller::{SiteClients, site_client},
    interlink::wire::{LogOpts, LogStruct},
};

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
}

/// Serves the kubelet endpoint until the process ends.
pub async fn serve(
    addr: SocketAddr,
    tls: &KubeletTls,
    client: kube::Client,
    sites: SiteClients,
) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error + Send + Sync>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(&tls.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.client_ca)? {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let rustls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    let app = router(App { client, sites });
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
        .route("/containerLogs/{namespace}/{pod}/{container}", get(logs))
        .with_state(app)
}

/// The query kube-apiserver sends for `kubectl logs`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    tail_lines: Option<i64>,
    limit_bytes: Option<i64>,
    #[serde(default)]
    timestamps: bool,
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    previous: bool,
    since_seconds: Option<i64>,
    since_time: Option<String>,
}

async fn logs(
    State(app): State<App>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let pods: Api<Pod> = Api::namespaced(app.client.clone(), &namespace);
    let pod = match pods.get_opt(&pod).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return (StatusCode::NOT_FOUND, format!("pod {namespace}/{pod} not found")).into_response();
        }
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("cannot read the pod: {e}")).into_response(),
    };
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let Some(site) = crate::controller::node::site_of_node(&node) else {
        return (
            StatusCode::NOT_FOUND,
            format!("pod is not on an offload node ({node})"),
        )
            .into_response();
    };
    let Some((client, _)) = site_client(&app.sites, site) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("site {site} is not connected yet"),
        )
            .into_response();
    };
    let since_time = match q.since_time.as_deref().map(|t| t.parse::<jiff::Timestamp>()) {
        Some(Ok(t)) => Some(Time(t)),
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("sinceTime: {e}")).into_response(),
        None => None,
    };
    let request = LogStruct {
        namespace,
        pod_uid: pod.uid().unwrap_or_default(),
        pod_name: pod.name_any(),
        container_name: container,
        opts: LogOpts {
            tail: q.tail_lines.unwrap_or(0),
            bytes: q.limit_bytes.unwrap_or(0),
            timestamps: q.timestamps,
            follow: q.follow,
            previous: q.previous,
            since_seconds: q.since_seconds.unwrap_or(0),
            since_time,
        },
    };
    match client.logs(&request).await {
        Ok(stream) => {
            let body = Body::from_stream(stream.map_err(std::io::Error::other));
            ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
        }
        Err(e) => {
            let code = match &e {
                crate::interlink::Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
                crate::interlink::Error::Status { code: 404, .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            };
            (code, format!("site {site}: {e}")).into_response()
        }
    }
}
