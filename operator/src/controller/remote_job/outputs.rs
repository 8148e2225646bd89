//! What the RemoteJob controller reads from object stores and pod statuses about a job's data: the
//! size and checksum of the outputs an attempt uploaded (HEAD, with the job's credentials), and the
//! stage-in metrics of attempts that ended.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use super::data::{JobData, SESSION_TOKEN_KEY};
use crate::{
    controller::{Context, scheduler::snapshot::site_data},
    crd::{
        OffloadSite,
        data::{ArtifactStatus, split_s3_url},
        remote_job::Attempt,
    },
    placement::data::{self as placement_data, is_local},
};
use offload_stage::{
    STAGE_IN_CONTAINER,
    store::{self, Credentials, Object, StoreError, Transfer},
};

/// How long one HEAD may take: the status write waits for it.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How the operator's HEADs behave: one retry, bounded by [`TIMEOUT`].
fn transfer() -> Transfer {
    Transfer {
        read_timeout: TIMEOUT,
        connect_timeout: TIMEOUT,
        request_retries: 1,
        request_timeout: Some(TIMEOUT),
        ..Transfer::default()
    }
}
/// Field manager of `OffloadSite.status.observedRemoteBandwidth` (the site controller writes the
/// rest of the status).
const BANDWIDTH_MANAGER: &str = "offload-operator-data";

/// The credentials in the Secret `name` of `namespace` (keys `accessKeyId`, `secretAccessKey`,
/// `sessionToken` when the credentials are temporary).
async fn credentials(ctx: &Context, namespace: &str, name: &str) -> Result<Credentials, String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets
        .get(name)
        .await
        .map_err(|e| format!("Secret {name}: {e}"))?;
    let key = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
            .ok_or_else(|| format!("Secret {name} has no key {k}"))
    };
    Ok(Credentials {
        access_key_id: key("accessKeyId")?,
        secret_access_key: key("secretAccessKey")?,
        session_token: key(SESSION_TOKEN_KEY).ok().filter(|t| !t.is_empty()),
    })
}

/// The HTTP client of the object stores, made once for the controller (`None`, logged, when it
/// cannot be built: outputs then say so in their message).
pub fn client() -> Option<reqwest::Client> {
    // It follows no redirect: one could lead anywhere the endpoint check refused.
    store::http_client(&transfer())
        .map(|(client, _)| client)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot build the object-store client"))
        .ok()
}

/// Fills in size and checksum of each output that has neither, or says why it cannot.
pub async fn measure(
    ctx: &Context,
    client: Option<&reqwest::Client>,
    namespace: &str,
    outputs: &mut [ArtifactStatus],
) {
    for o in outputs
        .iter_mut()
        .filter(|o| o.size.is_none() && o.message.is_none())
    {
        let Some((bucket, key)) = split_s3_url(&o.url) else {
            o.message = Some("not an s3:// URL".into());
            continue;
        };
        let creds = match &o.credentials_secret {
            Some(name) => match credentials(ctx, namespace, name).await {
                Ok(c) => Some(c),
                Err(e) => {
                    o.message = Some(format!("cannot read its size: {e}"));
                    continue;
                }
            },
            None => None,
        };
        let obj = Object {
            endpoint: o.endpoint.trim_end_matches('/').to_string(),
            bucket: bucket.into(),
            key: key.into(),
            region: o.region.clone().unwrap_or_else(|| "us-east-1".into()),
            credentials: creds,
        };
        let Some(client) = client else {
            o.message = Some("cannot read its size: no object-store client".into());
            continue;
        };
        if let Err(why) = super::egress::allowed(&obj.endpoint, &ctx.settings.data_endpoints_allowed).await {
            o.message = Some(format!(
                "cannot read its size: the operator does not call this endpoint ({why}; an operator \
                 flag, --data-endpoints-allowed, can allow it)"
            ));
            continue;
        }
        let head = match obj.store(client, &transfer()) {
            Ok(store) => store.head().await,
            Err(e) => Err(e),
        };
        match head {
            Ok(info) => {
                o.size = Some(i64::try_from(info.size).unwrap_or(i64::MAX));
                o.sha256 = info.sha256;
            }
            Err(StoreError::NotFound) => o.message = Some("not uploaded".into()),
            Err(e) => o.message = Some(format!("cannot read its size: {e}")),
        }
    }
}

/// Counts the bytes of the outputs just measured, at the site that wrote them.
pub fn count_stage_out(ctx: &Context, outputs: &[ArtifactStatus]) {
    for o in outputs {
        if let (Some(site), Some(size)) = (&o.site, o.size) {
            ctx.metrics
                .data_staged_bytes
                .with_label_values(&[site, "out"])
                .inc_by(size.max(0) as u64);
        }
    }
}

/// Counts the stage-in of attempts that ended now: the bytes of the inputs of known size and the
/// time the stage-in container ran, when it completed; a stage-in large enough also updates the
/// site's measured bandwidth (`status.observedRemoteBandwidth`).
pub async fn count_stage_in(ctx: &Context, ended: &[Attempt], pods: &[Pod], data: &JobData) {
    if data.inputs.is_empty() {
        return;
    }
    for a in ended {
        let (Some(site), Some(pod)) = (
            a.site.as_deref(),
            pods.iter()
                .find(|p| p.metadata.name.as_deref() == a.pod.as_deref()),
        ) else {
            continue;
        };
        let done = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == STAGE_IN_CONTAINER))
            .and_then(|c| c.state.as_ref()?.terminated.clone())
            .filter(|t| t.exit_code == 0);
        let Some(t) = done else { continue };
        let bytes: i64 = data.inputs.iter().filter_map(|i| i.bytes).sum();
        ctx.metrics
            .data_staged_bytes
            .with_label_values(&[site, "in"])
            .inc_by(bytes.max(0) as u64);
        let (Some(start), Some(end)) = (t.started_at, t.finished_at) else {
            continue;
        };
        let secs = end.0.duration_since(start.0).as_secs_f64().max(0.0);
        ctx.metrics
            .stage_in_duration
            .with_label_values(&[site])
            .observe(secs);
        observe_bandwidth(ctx, site, data, secs).await;
    }
}

/// Folds one stage-in into the site's measured bandwidth (inputs of known size from stores that
/// are not local to it).
async fn observe_bandwidth(ctx: &Context, site: &str, data: &JobData, secs: f64) {
    let Some(current) = ctx
        .sites
        .store()
        .get(&kube::runtime::reflector::ObjectRef::new(site))
    else {
        return;
    };
    let previous = current.status.as_ref().and_then(|s| s.observed_remote_bandwidth);
    let view = site_data(current.spec.data.as_ref(), previous);
    let remote: i64 = data
        .objects()
        .iter()
        .filter(|o| !o.output && o.bytes.is_some() && !is_local(&view, o))
        .filter_map(|o| o.bytes)
        .sum();
    let Some(bandwidth) = placement_data::observe_bandwidth(previous, remote, secs) else {
        return;
    };
    let api: Api<OffloadSite> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
        "status": {"observedRemoteBandwidth": bandwidth}});
    match api
        .patch_status(
            site,
            &PatchParams::apply(BANDWIDTH_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => tracing::info!(
            site,
            bandwidth,
            bytes = remote,
            seconds = secs,
            "measured the site's bandwidth to remote stores"
        ),
        Err(e) => tracing::warn!(site, error = %e, "cannot record the site's measured bandwidth"),
    }
}
