//! `GET /containerLogs/{namespace}/{pod}/{container}`: `kubectl logs`, read from the pod's site.

use axum::{
    body::Body,
    extract::{Path, Query, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::TryStreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde::Deserialize;

use super::{App, admit, node_of};
use crate::{
    controller::site_client,
    interlink::wire::{LogOpts, LogStruct},
};

/// The query kube-apiserver sends for `kubectl logs`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LogQuery {
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

pub(super) async fn logs(
    State(app): State<App>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let pod = match admit(&app, &parts, &namespace, &pod).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let node = node_of(&pod);
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
