//! What the simulated site knows: pods, their containers' states, and request counts.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use offload_operator::interlink::wire::{
    ContainerState, ContainerStatus, PingTaint, PodStatus, StateWaiting,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use super::faults::Faults;

/// A GPU type the site declares (returned in the ping answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// Extended resource name, e.g. `nvidia.com/gpu`.
    pub resource_type: String,
    /// Model, e.g. `A100`.
    pub model: String,
    /// How many.
    pub count: u32,
}

/// Request counts, served at `/debug/stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `/create` calls per pod UID (a count above 1 is a duplicate submission).
    pub creates_per_uid: BTreeMap<String, u32>,
    /// `/status` calls.
    pub status_requests: u64,
    /// Pods asked for, summed over `/status` calls.
    pub status_pods: u64,
    /// Most pods in one `/status` call.
    pub max_pods_per_status: u64,
    /// `/delete` calls.
    pub deletes: u64,
    /// `/getLogs` calls.
    pub log_requests: u64,
    /// `/pinglink` calls.
    pub pings: u64,
    /// Requests refused for a missing or wrong bearer token.
    pub unauthorized: u64,
    /// `namespace/name` of every Secret a `/create` request carried.
    pub secrets_received: std::collections::BTreeSet<String>,
}

impl Stats {
    /// The pod UIDs created more than once, with their counts.
    pub fn duplicates(&self) -> Vec<(&String, &u32)> {
        self.creates_per_uid.iter().filter(|(_, n)| **n > 1).collect()
    }
}

/// Fails unless `n` distinct pods were created across `stats`, each exactly once (a duplicate and a
/// missing pod would cancel out in a plain count).
pub fn exactly_once(stats: &[Stats], n: usize) -> anyhow::Result<()> {
    let mut per_uid: BTreeMap<&String, u32> = BTreeMap::new();
    for s in stats {
        for (uid, c) in &s.creates_per_uid {
            *per_uid.entry(uid).or_default() += c;
        }
    }
    let dupes: Vec<_> = per_uid.iter().filter(|(_, c)| **c > 1).collect();
    anyhow::ensure!(dupes.is_empty(), "created more than once: {dupes:?}");
    anyhow::ensure!(
        per_uid.len() == n,
        "{} distinct pods created for {n}",
        per_uid.len()
    );
    Ok(())
}

/// One container at the site.
#[derive(Clone, Debug)]
pub(crate) struct SimContainer {
    pub name: String,
    pub state: ContainerState,
    pub log: PathBuf,
}

/// One pod at the site.
#[derive(Debug)]
pub(crate) struct SimPod {
    pub name: String,
    pub namespace: String,
    pub jid: String,
    pub init: Vec<SimContainer>,
    pub containers: Vec<SimContainer>,
    /// Set to true to stop the pod's processes.
    pub cancel: watch::Sender<bool>,
    /// When it was submitted.
    pub created: std::time::Instant,
}

impl SimPod {
    pub(crate) fn status(&self, uid: &str) -> PodStatus {
        let conv = |c: &SimContainer| ContainerStatus {
            name: c.name.clone(),
            state: c.state.clone(),
            ready: c.state.running.is_some(),
            ..Default::default()
        };
        PodStatus {
            name: self.name.clone(),
            uid: uid.to_string(),
            namespace: self.namespace.clone(),
            jid: self.jid.clone(),
            containers: self.containers.iter().map(conv).collect(),
            init_containers: self.init.iter().map(conv).collect(),
        }
    }

    pub(crate) fn container_mut(&mut self, name: &str) -> Option<&mut SimContainer> {
        self.init
            .iter_mut()
            .chain(self.containers.iter_mut())
            .find(|c| c.name == name)
    }

    pub(crate) fn container(&self, name: &str) -> Option<&SimContainer> {
        self.init
            .iter()
            .chain(self.containers.iter())
            .find(|c| c.name == name)
    }
}

pub(crate) fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(StateWaiting {
            reason: reason.into(),
            message: message.into(),
        }),
        ..Default::default()
    }
}

/// Everything the handlers and runners share.
#[derive(Debug)]
pub(crate) struct Inner {
    /// Replaces `SimConfig::queue_delay` for pods created from now on (`/debug/queue-delay`).
    pub queue_delay: Option<std::time::Duration>,
    /// Replaces `SimConfig::token` from now on (a rotated credential).
    pub token: Option<Option<String>>,
    /// The `taints` of `/pinglink` answers (`None`: none sent, as before interLink 0.6.2).
    pub ping_taints: Option<Vec<PingTaint>>,
    pub pods: HashMap<String, SimPod>,
    pub stats: Stats,
    pub faults: Faults,
    pub next_jid: u64,
}

/// Shared state; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct State {
    inner: Arc<Mutex<Inner>>,
    pub slots: Arc<Semaphore>,
}

impl State {
    pub(crate) fn new(slots: usize) -> State {
        State {
            inner: Arc::new(Mutex::new(Inner {
                queue_delay: None,
                token: None,
                ping_taints: None,
                pods: HashMap::new(),
                stats: Stats::default(),
                faults: Faults::default(),
                next_jid: 1000,
            })),
            slots: Arc::new(Semaphore::new(slots.max(1))),
        }
    }

    /// The lock; a panicked holder cannot leave the simulator wedged (tests would hang).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
