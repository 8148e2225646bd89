//! Shared caches: one watch per kind for the whole operator, read by every controller.
//!
//! Each [`Cache`] is a kube-runtime [`Store`] fed by one watch, plus a fan-out of the objects each
//! watch event applies, so a controller can be triggered by the same watch that fills the cache
//! (`Controller::for_shared_stream`) instead of opening its own. The pod cache is a union of
//! narrowed watches ([`pods`]).

pub mod pods;
pub mod retry;

use std::{
    fmt::Debug,
    hash::Hash,
    sync::{Arc, Mutex},
};

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};

use crate::health::Health;

/// How many applied objects a subscriber may fall behind before the watch waits for it
/// (backpressure, as kube-runtime's shared streams: nothing is dropped).
const SUBSCRIBER_BUFFER: usize = 1024;

/// A cache of one kind, filled by one watch, with subscriptions to what it applies.
pub struct Cache<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    fanout: Fanout<K>,
    synced: watch::Receiver<bool>,
}

impl<K: Resource + 'static> Clone for Cache<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn clone(&self) -> Self {
        Cache {
            store: self.store.clone(),
            fanout: self.fanout.clone(),
            synced: self.synced.clone(),
        }
    }
}

impl<K> Cache<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// The cached objects.
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// Every object in the cache now, then every object a watch event applies from now on (and
    /// all of them after each re-list), for triggering a controller. The snapshot matters to a
    /// controller that starts after the cache has synced (a standby that became leader): without
    /// it, objects that do not change again would never be reconciled. An object may come twice;
    /// reconcilers are idempotent. A subscriber must be polled: a full buffer holds the watch back.
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        // Register first, then take the snapshot: an object applied in between comes twice, never
        // not at all.
        let live = self.fanout.subscribe();
        futures::stream::iter(self.store.state()).chain(live)
    }

    /// Whether the first list has completed.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first list has completed.
    pub async fn synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Sends applied objects to every live subscriber.
pub(crate) struct Fanout<K> {
    senders: Arc<Mutex<Vec<mpsc::Sender<Arc<K>>>>>,
}

impl<K> Clone for Fanout<K> {
    fn clone(&self) -> Self {
        Fanout {
            senders: self.senders.clone(),
        }
    }
}

impl<K: Send + Sync + 'static> Fanout<K> {
    pub(crate) fn new() -> Self {
        Fanout {
            senders: Arc::default(),
        }
    }

    fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        self.senders.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|o| (o, rx)) })
    }

    /// Sends `obj` to every subscriber, waiting for room; subscribers that went away are dropped.
    pub(crate) async fn send(&self, obj: Arc<K>) {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut gone = false;
        for s in &senders {
            gone |= s.send(obj.clone()).await.is_err();
        }
        if gone {
            self.senders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s| !s.is_closed());
        }
    }
}

impl<K> Cache<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// A cache reading `writer`'s store, with the fan-out and the synced flag its feeder uses.
    pub(crate) fn feeding(writer: &Writer<K>) -> (Cache<K>, Fanout<K>, watch::Sender<bool>) {
        let fanout = Fanout::new();
        let (synced_tx, synced) = watch::channel(false);
        let cache = Cache {
            store: writer.as_reader(),
            fanout: fanout.clone(),
            synced,
        };
        (cache, fanout, synced_tx)
    }
}

/// Applies `event` to the store and sends what it applied to the subscribers: the object of an
/// `Apply`, every object after a re-list (`InitDone`).
pub(crate) async fn apply<K>(writer: &mut Writer<K>, fanout: &Fanout<K>, event: &watcher::Event<K>)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    writer.apply_watcher_event(event);
    let store = writer.as_reader();
    match event {
        watcher::Event::Apply(o) => {
            if let Some(o) = store.get(&ObjectRef::from_obj(o)) {
                fanout.send(o).await;
            }
        }
        watcher::Event::InitDone => {
            for o in store.state() {
                fanout.send(o).await;
            }
        }
        _ => {}
    }
}

/// The watch of `api` with `cfg`, retried with [`retry::with_backoff`] (a relist at once after
/// `410 Gone`), without managed fields (nothing reads them from a cache; they are often half an
/// object's size).
pub(crate) fn stripped_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    retry::with_backoff(watcher(api, cfg).modify(|o| {
        o.meta_mut().managed_fields = None;
    }))
}

/// Starts the watch of `api` with `cfg` (retried as [`retry`] says) into a new cache,
/// reported to `health` as the watch `kind`. `wake` is notified after every event (the
/// scheduler's cycle trigger).
pub fn spawn<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    wake: Arc<Notify>,
    health: &Health,
) -> Cache<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let mut writer: Writer<K> = Writer::default();
    let (cache, fanout, synced_tx) = Cache::feeding(&writer);
    let guard = health.watch(kind);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stripped_watch(api, cfg));
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if !matches!(event, watcher::Event::Init) {
                        // `Init` comes before every list request, failing or not: no proof.
                        guard.event();
                    }
                    apply(&mut writer, &fanout, &event).await;
                    if matches!(event, watcher::Event::InitDone) {
                        let _ = synced_tx.send(true);
                    }
                    wake.notify_one();
                }
                Err(e) => {
                    guard.error(&e);
                    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff")
                }
            }
        }
        guard.ended("the watch stream ended");
    });
    cache
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };

    use axum::{
        Router,
        body::Body,
        extract::{Request, State},
        http::StatusCode,
        response::{IntoResponse, Response},
    };
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    /// An API server that refuses everything (403) until `refuse` is cleared, then lists no
    /// ConfigMaps and holds every watch open.
    async fn api_server(refuse: Arc<AtomicBool>) -> String {
        async fn handle(State(refuse): State<Arc<AtomicBool>>, req: Request) -> Response {
            if refuse.load(Ordering::SeqCst) {
                let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"configmaps is forbidden","reason":"Forbidden","code":403}"#;
                return (StatusCode::FORBIDDEN, body).into_response();
            }
            if req.uri().query().is_some_and(|q| q.contains("watch=true")) {
                let never = futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
                return Body::from_stream(never).into_response();
            }
            let list =
                r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}"#;
            ([("content-type", "application/json")], list).into_response()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(refuse);
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_refused_watch_makes_readiness_fail_naming_it_and_recovers_when_it_lists() {
        let refuse = Arc::new(AtomicBool::new(true));
        let url = api_server(refuse.clone()).await;
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let health = Health::default();
        health.set_ready();
        let cache = spawn(
            Api::<ConfigMap>::all(client),
            watcher::Config::default(),
            "ConfigMap",
            Arc::new(Notify::new()),
            &health,
        );
        // A few seconds of retries (each preceded by the watcher's `Init`), all refused: the run of
        // errors still counts from the first one, so 31 s after the start it is reported.
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let problems = health.readiness(t0 + Duration::from_secs(31));
        assert_eq!(problems.0.len(), 1, "{problems}");
        assert!(
            problems.0[0].starts_with("watch ConfigMap failing for") && problems.0[0].contains("forbidden"),
            "{problems}"
        );
        assert!(
            health.liveness(Instant::now()).is_empty(),
            "an API refusal is not a reason to restart"
        );
        assert!(!cache.is_synced());

        refuse.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(20), cache.synced())
            .await
            .expect("the cache lists once the API server answers");
        assert!(
            health
                .readiness(Instant::now() + Duration::from_secs(40))
                .is_empty()
        );
    }

    fn config_map(name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("default".into());
        cm
    }

    async fn next_name(s: &mut (impl Stream<Item = Arc<ConfigMap>> + Unpin)) -> String {
        let o = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an object within 5 s")
            .expect("the stream goes on");
        o.metadata.name.clone().unwrap_or_default()
    }

    #[tokio::test]
    async fn a_subscriber_that_joins_after_the_sync_gets_what_the_cache_holds_then_what_changes() {
        let mut writer: Writer<ConfigMap> = Writer::default();
        let (cache, fanout, _synced) = Cache::feeding(&writer);
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(config_map("a")),
            watcher::Event::InitApply(config_map("b")),
            watcher::Event::InitDone,
        ] {
            apply(&mut writer, &fanout, &event).await;
        }
        // A controller started now (a standby that just became leader) sees both objects
        // although neither changes again.
        let mut late = Box::pin(cache.subscribe());
        let mut first = vec![next_name(&mut late).await, next_name(&mut late).await];
        first.sort();
        assert_eq!(first, ["a", "b"]);
        apply(&mut writer, &fanout, &watcher::Event::Apply(config_map("c"))).await;
        assert_eq!(next_name(&mut late).await, "c");
    }
}
