//! Renews each virtual Node's Lease in `kube-node-lease`, as a kubelet does, so the node lifecycle
//! controller keeps the Node Ready (and never evicts its pods) while the operator runs.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use super::{Context, node::node_name};

/// Seconds a lease is valid (as a kubelet's); it is renewed every `--node-lease-renew-seconds`
/// (default 10 s, as a kubelet).
pub const DURATION_SECONDS: i32 = 40;

/// Longest one renewal may take before it is given up until the next round.
const RENEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Renewals in flight at once.
const RENEW_CONCURRENCY: usize = 8;

/// Renews the leases of every site in the cache every `--node-lease-renew-seconds`, forever;
/// beats the `node-leases` heartbeat once per round (a renewer that hangs makes `/healthz` fail
/// before the leases expire for long).
pub async fn renew_forever(ctx: Arc<Context>) {
    let heartbeat = ctx.health.heartbeat("node-leases");
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    loop {
        heartbeat.beat();
        let nodes: Vec<String> = ctx
            .sites
            .store()
            .state()
            .iter()
            .filter(|site| site.metadata.deletion_timestamp.is_none())
            .map(|site| node_name(site.metadata.name.as_deref().unwrap_or_default()))
            // Only the operator's own Nodes (the site controller writes each, and its first
            // Lease, once it is sure the name is not a real node's).
            .filter(|node| {
                ctx.nodes
                    .store()
                    .get(&kube::runtime::reflector::ObjectRef::new(node))
                    .is_some()
            })
            .collect();
        // Several at once, each with a deadline: one hung request does not hold the others past
        // their leases' expiry.
        futures::stream::iter(nodes)
            .for_each_concurrent(RENEW_CONCURRENCY, |name| {
                let leases = leases.clone();
                async move {
                    match tokio::time::timeout(RENEW_TIMEOUT, renew(&leases, &name)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(node = %name, error = %e, "cannot renew the node lease"),
                        Err(_) => tracing::warn!(node = %name, timeout = ?RENEW_TIMEOUT, "node lease renewal timed out"),
                    }
                }
            })
            .await;
        tokio::time::sleep(ctx.settings.lease_renew).await;
    }
}

/// Creates or renews one lease.
pub async fn renew(leases: &Api<Lease>, node: &str) -> Result<(), kube::Error> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(DURATION_SECONDS),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    let mut value = serde_json::to_value(&lease).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "coordination.k8s.io/v1".into();
    value["kind"] = "Lease".into();
    leases
        .patch(
            node,
            &PatchParams::apply("offload-operator").force(),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(())
}
