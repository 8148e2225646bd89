//! The floor of `make bench-compare`: the least a kubelet for offloaded pods must write to the API
//! server, talking to no site. It owns one Node (created Ready, its Lease renewed every 10 s) and,
//! for each pod bound there, writes one status (Running, as if the site had started it at once) and,
//! when the pod is deleted, the final delete. Binding is left to kube-scheduler, as for pinned pods.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
#[command(
    about = "Minimal kubelet for benchmarks: Node, Lease, one status write and the final delete per pod"
)]
struct Args {
    /// Kubeconfig to use.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Name of the Node to own.
    #[arg(long)]
    node: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    offload_operator::install_crypto_provider();
    let args = Args::parse();
    let kc = Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    register(&client, &args.node).await?;
    tokio::spawn(renew(client.clone(), args.node.clone()));
    let pods: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node));
    let started: Arc<Mutex<HashSet<String>>> = Arc::default();
    let deleted: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Writes in parallel, as a kubelet's pod workers do; the API server sets the pace.
    let slots = Arc::new(Semaphore::new(32));
    let mut stream = std::pin::pin!(watcher(pods, cfg).default_backoff().applied_objects());
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            next = stream.next() => {
                let pod = match next {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => { eprintln!("watch: {e}"); continue; }
                    None => return Ok(()),
                };
                let uid = pod.uid().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
                let permit = slots.clone().acquire_owned().await?;
                if pod.metadata.deletion_timestamp.is_some() {
                    if deleted.lock().await.insert(uid) {
                        tokio::spawn(async move {
                            let _permit = permit;
                            let _ = api.delete(&pod.name_any(), &DeleteParams::default().grace_period(0)).await;
                        });
                    }
                    continue;
                }
                let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if running || !started.lock().await.insert(uid) {
                    continue;
                }
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = start(&api, &pod).await {
                        eprintln!("status of {}: {e}", pod.name_any());
                    }
                });
            }
        }
    }
}

/// One status write: Running, every container started and ready.
async fn start(api: &Api<Pod>, pod: &Pod) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now().to_string();
    let containers: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": true, "started": true,
            "restartCount": 0, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    let status = json!({"status": {"phase": "Running", "startTime": now, "containerStatuses": containers,
        "conditions": [cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")]}});
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Strategic(&status),
    )
    .await
    .context("patch status")?;
    Ok(())
}

/// Creates the Node (replacing a stale one) and marks it Ready.
async fn register(client: &Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes.delete(name, &DeleteParams::default()).await;
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "type": "virtual-kubelet"}},
        "spec": {"taints": [{"key": "virtual-node.interlink/no-schedule", "value": "true", "effect": "NoSchedule"}]}
    }))?;
    for _ in 0..50 {
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e.into()),
        }
    }
    let now = jiff::Timestamp::now().to_string();
    let capacity = json!({"cpu": "100000", "memory": "1000Ti", "pods": "5000"});
    let status = json!({"status": {"capacity": capacity, "allocatable": capacity,
        "conditions": [{"type": "Ready", "status": "True", "reason": "FloorReady", "message": "floor",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await?;
    Ok(())
}

/// Renews the Node's Lease every 10 s (kube-controller-manager reads node health from it).
async fn renew(client: Client, name: String) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                     "renewTime": MicroTime(jiff::Timestamp::now())}});
        let pp = PatchParams::apply("offload-floor").force();
        if let Err(e) = leases.patch(&name, &pp, &Patch::Apply(&lease)).await {
            eprintln!("lease: {e}");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
