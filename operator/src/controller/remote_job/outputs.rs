//! What the RemoteJob controller reads from object stores and pod statuses about a job's data: the
//! size and checksum of the outputs an attempt uploaded (HEAD, with the job's credentials), and the
//! stage-in metrics of attempts that ended.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;

use super::data::JobData;
use crate::{
    controller::Context,
    crd::{
        data::{ArtifactStatus, split_s3_url},
        remote_job::Attempt,
    },
    stage::{
        STAGE_IN_CONTAINER,
        s3::{self, Object, S3Error},
        sigv4::Credentials,
    },
};

/// How long one HEAD may take: the status write waits for it.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The credentials in the Secret `name` of `namespace` (keys `accessKeyId`, `secretAccessKey`).
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
    })
}

/// Fills in size and checksum of each output that has neither, or says why it cannot.
pub async fn measure(ctx: &Context, namespace: &str, outputs: &mut [ArtifactStatus]) {
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the object-store client");
            return;
        }
    };
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
        match s3::head(&client, &obj).await {
            Ok(info) => {
                o.size = Some(i64::try_from(info.size).unwrap_or(i64::MAX));
                o.sha256 = info.sha256;
            }
            Err(S3Error::NotFound) => o.message = Some("not uploaded".into()),
            Err(e) => o.message = Some(format!("cannot read its size: {e}")),
        }
    }
}

/// Counts the stage-in of attempts that ended now: the bytes of the inputs of known size and the
/// time the stage-in container ran, when it completed.
pub fn count_stage_in(ctx: &Context, ended: &[Attempt], pods: &[Pod], data: &JobData) {
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
        if let (Some(start), Some(end)) = (t.started_at, t.finished_at) {
            let secs = end.0.duration_since(start.0).as_secs_f64().max(0.0);
            ctx.metrics
                .stage_in_duration
                .with_label_values(&[site])
                .observe(secs);
        }
    }
}
