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

/// The label kube-controller-manager groups nodes into zones by. A test that expects an eviction
/// puts its site's Node and its peers in a zone of their own: in the shared cluster's one
/// unlabelled zone, other tests' NotReady Nodes can put the zone in partial disruption, where a
/// small cluster evicts nothing.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Plays the kubelet of plain nodes `names` in zone `zone` (`None`: unlabelled): Ready status and
/// a fresh Lease every second, until the task is aborted.
pub async fn keep_healthy(client: kube::Client, names: Vec<String>, zone: Option<String>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let pp = PatchParams::apply("e2e-peer").force();
    loop {
        let now = jiff::Timestamp::now().to_string();
        for n in &names {
            let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}});
            if let Some(zone) = &zone {
                node["metadata"]["labels"] = json!({ZONE_LABEL: zone});
            }
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

/// Two healthy peer Nodes in zone `zone`, kept Ready by a task until [`Peers::remove`]: beside a
/// site's Node in that zone they keep the zone "normal", so kube-controller-manager evicts there.
pub struct Peers {
    client: kube::Client,
    names: Vec<String>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Peers {
    /// Starts keeping `<zone>-peer-1` and `<zone>-peer-2` healthy in zone `zone`.
    pub fn start(client: kube::Client, zone: &str) -> Peers {
        let names: Vec<String> = (1..=2).map(|i| format!("{zone}-peer-{i}")).collect();
        let keeper = tokio::spawn(keep_healthy(
            client.clone(),
            names.clone(),
            Some(zone.to_string()),
        ));
        Peers {
            client,
            names,
            keeper,
        }
    }

    /// Stops keeping them and deletes them.
    pub async fn remove(self) {
        self.keeper.abort();
        let nodes: Api<Node> = Api::all(self.client);
        for n in &self.names {
            let _ = nodes.delete(n, &Default::default()).await;
        }
    }
}
