//! Plain nodes for tests of kube-controller-manager's node lifecycle: it stops evicting when every
//! node of a zone is unhealthy (it assumes a partition), so tests that expect, or rule out, an
//! eviction keep healthy peer nodes beside the site's Node, and the zone "normal".

use std::time::Duration;

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

/// Plays the kubelet of plain nodes `names`: Ready status and a fresh Lease every second, until
/// the task is aborted.
pub async fn keep_healthy(client: kube::Client, names: Vec<String>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let pp = PatchParams::apply("e2e-peer").force();
    loop {
        let now = jiff::Timestamp::now().to_string();
        for n in &names {
            let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}});
            let _ = nodes.patch(n, &pp, &Patch::Apply(&node)).await;
            let status = json!({"apiVersion": "v1", "kind": "Node", "status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "e2e peer",
                "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
            let _ = nodes.patch_status(n, &pp, &Patch::Apply(&status)).await;
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": n},
                "spec": {"holderIdentity": n, "leaseDurationSeconds": 40, "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}});
            let _ = leases.patch(n, &pp, &Patch::Apply(&lease)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
