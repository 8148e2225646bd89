//! The pod cache: only the pods the operator can act on, narrowed on the server.
//!
//! No single field selector says "names offload-scheduler or is bound to one of our Nodes", so the
//! cache is the union of several watches ("sources"), as a virtual kubelet per site would have
//! them: one of `spec.schedulerName=offload-scheduler` (pods to place, and RemoteJob pods), and one
//! of `spec.nodeName=<node>` per site's virtual Node (pods bound there, however they were
//! scheduled: interLink-style pinning included). A pod in several sources is cached once.
//!
//! [`Union`] is the pure part: it turns each source's watch events into the events of the union
//! (an object leaves the union when a source deletes it, or when every source that had it
//! re-listed or stopped without it).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        reflector::{ObjectRef, store::Writer},
        watcher,
    },
};
use tokio::sync::{Notify, mpsc};

use super::Cache;
use crate::{controller::node::node_name, crd::OffloadSite, health::Health};

/// `spec.schedulerName` that opts a pod in (also in `scheduler`).
const SCHEDULER_NAME: &str = "offload-scheduler";

/// One narrowed watch of the union.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Pods naming the offload scheduler.
    Scheduler,
    /// Pods bound to this Node.
    Node(String),
}

impl Source {
    /// The name its watch has in `/healthz` and `/readyz`.
    fn watch_name(&self) -> String {
        match self {
            Source::Scheduler => format!("Pod schedulerName={SCHEDULER_NAME}"),
            Source::Node(n) => format!("Pod nodeName={n}"),
        }
    }
}

/// Deleted objects remembered (their last resourceVersion), so a lagging source cannot bring one
/// back; cleared when it grows past this.
const TOMBSTONES_MAX: usize = 10_000;

#[derive(Default)]
struct Member {
    sources: BTreeSet<Source>,
    version: Option<u64>,
}

/// The union of the sources' watch events (pure: no I/O, no clock).
#[derive(Default)]
pub struct Union {
    members: HashMap<ObjectRef<Pod>, Member>,
    /// Per source in a re-list: what it has listed so far.
    listing: HashMap<Source, HashSet<ObjectRef<Pod>>>,
    tombstones: HashMap<ObjectRef<Pod>, u64>,
}

fn version(pod: &Pod) -> Option<u64> {
    pod.resource_version()?.parse().ok()
}

/// A pod carrying only what a cache needs to find it, for deletes the union derives.
fn stub(r: &ObjectRef<Pod>) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some(r.name.clone());
    p.metadata.namespace = r.namespace.clone();
    p
}

impl Union {
    /// The union's events for one event of `source`. Applies are kept only when not older than
    /// what the union has (resourceVersions compared as numbers when both are).
    pub fn apply(&mut self, source: &Source, event: watcher::Event<Pod>) -> Vec<watcher::Event<Pod>> {
        match event {
            watcher::Event::Apply(pod) => self.upsert(source, pod).into_iter().collect(),
            watcher::Event::InitApply(pod) => {
                self.listing
                    .entry(source.clone())
                    .or_default()
                    .insert(ObjectRef::from_obj(&pod));
                self.upsert(source, pod).into_iter().collect()
            }
            watcher::Event::Delete(pod) => {
                let r = ObjectRef::from_obj(&pod);
                let newer = self
                    .members
                    .get(&r)
                    .and_then(|m| m.version)
                    .zip(version(&pod))
                    .is_some_and(|(have, got)| got < have);
                if newer || !self.members.contains_key(&r) {
                    // Already gone, or re-created since (a newer object under the same name).
                    return vec![];
                }
                self.members.remove(&r);
                if let Some(v) = version(&pod) {
                    if self.tombstones.len() >= TOMBSTONES_MAX {
                        self.tombstones.clear();
                    }
                    self.tombstones.insert(r, v);
                }
                vec![watcher::Event::Delete(pod)]
            }
            watcher::Event::Init => {
                self.listing.insert(source.clone(), HashSet::new());
                vec![]
            }
            watcher::Event::InitDone => {
                let listed = self.listing.remove(source).unwrap_or_default();
                self.drop_source_except(source, &listed)
            }
        }
    }

    /// The union's events when `source` stops (its site was removed): pods only it had leave.
    pub fn remove_source(&mut self, source: &Source) -> Vec<watcher::Event<Pod>> {
        self.listing.remove(source);
        self.drop_source_except(source, &HashSet::new())
    }

    fn upsert(&mut self, source: &Source, pod: Pod) -> Option<watcher::Event<Pod>> {
        let r = ObjectRef::from_obj(&pod);
        let v = version(&pod);
        if let (Some(dead), Some(v)) = (self.tombstones.get(&r), v) {
            if v <= *dead {
                return None;
            }
            self.tombstones.remove(&r);
        }
        let m = self.members.entry(r).or_default();
        m.sources.insert(source.clone());
        if let (Some(have), Some(got)) = (m.version, v)
            && got < have
        {
            return None;
        }
        m.version = v;
        Some(watcher::Event::Apply(pod))
    }

    fn drop_source_except(
        &mut self,
        source: &Source,
        keep: &HashSet<ObjectRef<Pod>>,
    ) -> Vec<watcher::Event<Pod>> {
        let mut out = vec![];
        self.members.retain(|r, m| {
            if keep.contains(r) || !m.sources.remove(source) || !m.sources.is_empty() {
                return true;
            }
            out.push(watcher::Event::Delete(stub(r)));
            false
        });
        out
    }

    /// How many pods the union holds.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the union holds no pod.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

enum Feed {
    Event(Source, Box<watcher::Event<Pod>>),
    Stopped(Source),
    /// The Node sources of the sites present at the start (sent once).
    Initial(BTreeSet<Source>),
}

/// Whether the union is synced: the scheduler's source and every initial Node source listed.
#[derive(Default)]
struct Sync {
    initial: Option<BTreeSet<Source>>,
    listed: BTreeSet<Source>,
}

impl Sync {
    fn done(&self) -> bool {
        self.listed.contains(&Source::Scheduler)
            && self
                .initial
                .as_ref()
                .is_some_and(|i| i.iter().all(|s| self.listed.contains(s)))
    }
}

/// Starts the pod cache: the scheduler's watch now, a watch per site Node as `sites` lists them.
/// Synced once the scheduler's watch and those of the sites present at the start have listed.
/// Every watch, and the union's own tasks, report to `health`.
pub fn spawn(client: Client, sites: Cache<OffloadSite>, wake: Arc<Notify>, health: &Health) -> Cache<Pod> {
    let mut writer: Writer<Pod> = Writer::default();
    // The union's readiness is `synced`; the store itself is ready (empty) from the start.
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (cache, fanout, synced_tx) = Cache::feeding(&writer);
    let (tx, mut rx) = mpsc::channel::<Feed>(1024);
    let api: Api<Pod> = Api::all(client);
    let scheduler = watcher::Config::default().fields(&format!("spec.schedulerName={SCHEDULER_NAME}"));
    // Lives as long as the process: the scheduler's source never stops.
    drop(start(&api, Source::Scheduler, scheduler, tx.clone(), health));
    tokio::spawn(follow_sites(api, sites, tx, health.clone()));
    // The union task is reported like a watch: if it stops, the cache stops changing.
    let guard = health.watch("Pod union");
    tokio::spawn(async move {
        let mut union = Union::default();
        let mut sync = Sync::default();
        while let Some(feed) = rx.recv().await {
            let events = match feed {
                Feed::Event(source, event) => {
                    if matches!(*event, watcher::Event::InitDone) {
                        sync.listed.insert(source.clone());
                    }
                    union.apply(&source, *event)
                }
                Feed::Stopped(source) => {
                    sync.listed.insert(source.clone());
                    union.remove_source(&source)
                }
                Feed::Initial(sources) => {
                    sync.initial = Some(sources);
                    vec![]
                }
            };
            for event in &events {
                super::apply(&mut writer, &fanout, event).await;
            }
            if !events.is_empty() {
                wake.notify_one();
            }
            if !*synced_tx.borrow() && sync.done() {
                tracing::info!(pods = union.len(), "pod cache synced");
                let _ = synced_tx.send(true);
            }
        }
        guard.ended("every source's sender is gone");
    });
    cache
}

/// One source's watch, forwarded into the union until aborted.
fn start(
    api: &Api<Pod>,
    source: Source,
    cfg: watcher::Config,
    tx: mpsc::Sender<Feed>,
    health: &Health,
) -> tokio::task::JoinHandle<()> {
    let api = api.clone();
    // Aborting the task (its site was deleted) drops the guard: the watch is forgotten.
    let guard = health.watch(source.watch_name());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(super::stripped_watch(api, cfg));
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if !matches!(event, watcher::Event::Init) {
                        // `Init` comes before every list request, failing or not: no proof.
                        guard.event();
                    }
                    if tx
                        .send(Feed::Event(source.clone(), Box::new(event)))
                        .await
                        .is_err()
                    {
                        guard.ended("the pod union is gone");
                        return;
                    }
                }
                Err(e) => {
                    guard.error(&e);
                    tracing::warn!(source = ?source, error = %e, "pod watch failed; retrying with backoff")
                }
            }
        }
        guard.ended("the watch stream ended");
    })
}

/// Keeps one Node source per site in the site cache: started when a site appears, stopped when it
/// goes. Checks every second (sites change rarely; a new site's Node has no pods yet anyway).
async fn follow_sites(api: Api<Pod>, sites: Cache<OffloadSite>, tx: mpsc::Sender<Feed>, health: Health) {
    let guard = health.watch("Pod sources");
    sites.synced().await;
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut first = true;
    loop {
        let want: BTreeSet<String> = sites
            .store()
            .state()
            .iter()
            .map(|s| node_name(&s.name_any()))
            .collect();
        let new: Vec<String> = want
            .iter()
            .filter(|n| !running.contains_key(*n))
            .cloned()
            .collect();
        for node in new {
            let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
            let task = start(&api, Source::Node(node.clone()), cfg, tx.clone(), &health);
            running.insert(node, task);
        }
        let gone: Vec<String> = running.keys().filter(|n| !want.contains(*n)).cloned().collect();
        for node in gone {
            if let Some(task) = running.remove(&node) {
                task.abort();
            }
            if tx.send(Feed::Stopped(Source::Node(node))).await.is_err() {
                guard.ended("the pod union is gone");
                return;
            }
        }
        if first {
            first = false;
            let initial = want.into_iter().map(Source::Node).collect();
            if tx.send(Feed::Initial(initial)).await.is_err() {
                guard.ended("the pod union is gone");
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, rv: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}))
            .expect("pod")
    }

    fn names(events: &[watcher::Event<Pod>]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                watcher::Event::Apply(p) => format!(
                    "apply {}@{}",
                    p.name_any(),
                    p.resource_version().unwrap_or_default()
                ),
                watcher::Event::Delete(p) => format!("delete {}", p.name_any()),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn a_pod_in_two_sources_is_one_object_and_a_stale_copy_does_not_overwrite_it() {
        let mut u = Union::default();
        let node = Source::Node("offload-a".into());
        assert_eq!(
            names(&u.apply(&Source::Scheduler, watcher::Event::Apply(pod("p", "5")))),
            ["apply p@5"]
        );
        assert_eq!(
            names(&u.apply(&node, watcher::Event::Apply(pod("p", "7")))),
            ["apply p@7"]
        );
        // The scheduler's watch lags: its older copy is not applied.
        assert!(
            u.apply(&Source::Scheduler, watcher::Event::Apply(pod("p", "6")))
                .is_empty()
        );
        assert_eq!(u.len(), 1);
    }

    #[test]
    fn a_delete_from_any_source_removes_the_pod_and_a_lagging_source_cannot_bring_it_back() {
        let mut u = Union::default();
        let node = Source::Node("offload-a".into());
        u.apply(&Source::Scheduler, watcher::Event::Apply(pod("p", "5")));
        u.apply(&node, watcher::Event::Apply(pod("p", "5")));
        assert_eq!(
            names(&u.apply(&node, watcher::Event::Delete(pod("p", "9")))),
            ["delete p"]
        );
        assert!(u.is_empty());
        // The other watch still delivers its older events, then its delete.
        assert!(
            u.apply(&Source::Scheduler, watcher::Event::Apply(pod("p", "8")))
                .is_empty()
        );
        assert!(
            u.apply(&Source::Scheduler, watcher::Event::Delete(pod("p", "9")))
                .is_empty()
        );
        // Re-created under the same name: a newer object.
        assert_eq!(
            names(&u.apply(&Source::Scheduler, watcher::Event::Apply(pod("p", "12")))),
            ["apply p@12"]
        );
    }

    #[test]
    fn a_relist_drops_what_only_that_source_had_and_keeps_what_another_has() {
        let mut u = Union::default();
        let node = Source::Node("offload-a".into());
        u.apply(&node, watcher::Event::Apply(pod("only-node", "1")));
        u.apply(&node, watcher::Event::Apply(pod("both", "1")));
        u.apply(&Source::Scheduler, watcher::Event::Apply(pod("both", "1")));
        u.apply(&node, watcher::Event::Apply(pod("kept", "1")));
        // The node's watch re-lists (after a 410): "kept" is still there, the others are not.
        assert!(u.apply(&node, watcher::Event::Init).is_empty());
        assert_eq!(
            names(&u.apply(&node, watcher::Event::InitApply(pod("kept", "3")))),
            ["apply kept@3"]
        );
        assert_eq!(
            names(&u.apply(&node, watcher::Event::InitDone)),
            ["delete only-node"]
        );
        assert_eq!(u.len(), 2, "'both' stays: the scheduler's watch has it");
    }

    #[test]
    fn a_stopped_source_takes_only_its_own_pods_with_it() {
        let mut u = Union::default();
        let node = Source::Node("offload-a".into());
        u.apply(&node, watcher::Event::Apply(pod("pinned", "1")));
        u.apply(&node, watcher::Event::Apply(pod("placed", "1")));
        u.apply(&Source::Scheduler, watcher::Event::Apply(pod("placed", "1")));
        assert_eq!(names(&u.remove_source(&node)), ["delete pinned"]);
        assert_eq!(u.len(), 1);
    }

    #[test]
    fn synced_needs_the_scheduler_source_and_every_initial_node_source() {
        let mut s = Sync::default();
        s.listed.insert(Source::Scheduler);
        assert!(!s.done(), "the initial sites are not known yet");
        s.initial = Some([Source::Node("offload-a".into())].into());
        assert!(!s.done());
        s.listed.insert(Source::Node("offload-a".into()));
        assert!(s.done());
    }
}
