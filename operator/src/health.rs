//! What `/healthz` and `/readyz` answer: the operator's own view of whether it works.
//!
//! - **Liveness** (`/healthz`) fails when restarting the process is the fix: a periodic loop that
//!   has not completed a round for [`STALE_AFTER`] (it hangs), or a watch task that ended or
//!   panicked (its cache will never change again).
//! - **Readiness** (`/readyz`) fails until every cache has listed once, and while any watch has
//!   been failing for [`WATCH_FAILING_AFTER`] (the API server refuses or is unreachable: caches go
//!   stale, but a restart would not help, so liveness does not fail).
//!
//! kube-runtime's watcher reports errors but not a successful reconnect, so a watch counts as
//! failing while its last error is newer than its last event and younger than
//! [`WATCH_ERROR_REPEAT`] (the watcher's retry interval is at most 30 s, doubled by jitter: a watch
//! that still fails reports an error at least that often).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// A loop that has not beaten for this long makes `/healthz` fail (the kubelet then restarts the
/// operator): several times any loop's period, so a slow API server is not mistaken for a hang.
pub const STALE_AFTER: Duration = Duration::from_secs(120);

/// A watch failing without a break for this long makes `/readyz` fail. One dropped connection
/// (an API server restart) recovers well within it.
pub const WATCH_FAILING_AFTER: Duration = Duration::from_secs(30);

/// A failing watch reports an error at least this often (kube's default watcher backoff: at most
/// 30 s, with jitter up to as much again); an error older than this, with nothing since, means the
/// watch reconnected.
pub const WATCH_ERROR_REPEAT: Duration = Duration::from_secs(75);

/// Shared with the controllers and the caches (cheap to clone).
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    role: Arc<Mutex<Option<&'static str>>>,
    beats: Arc<Mutex<BTreeMap<&'static str, Instant>>>,
    watches: Arc<Mutex<BTreeMap<String, WatchState>>>,
}

/// What one watch last did.
#[derive(Clone, Debug, Default, PartialEq)]
struct WatchState {
    /// When the current run of errors began (cleared by an event, or by a quiet
    /// [`WATCH_ERROR_REPEAT`]).
    failing_since: Option<Instant>,
    /// The last error and when it came.
    last_error: Option<(Instant, String)>,
    /// The watch task is gone (its stream ended, or it panicked).
    ended: Option<String>,
}

impl WatchState {
    /// How long the watch has been failing at `now`, if it is.
    fn failing_for(&self, now: Instant) -> Option<Duration> {
        let (at, _) = self.last_error.as_ref()?;
        if now.saturating_duration_since(*at) >= WATCH_ERROR_REPEAT {
            return None;
        }
        self.failing_since
            .map(|since| now.saturating_duration_since(since))
    }
}

/// Why the operator is not live or not ready: the text `/healthz` or `/readyz` answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Nothing wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl Health {
    /// Marks the operator ready (every cache has listed once).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Sets this replica's role in leader election (`leader`, `standby`), which `/readyz` names
    /// when it answers 200. `None`: no election (the one replica leads).
    pub fn set_role(&self, role: Option<&'static str>) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = role;
    }

    /// This replica's role in leader election, if it takes part in one.
    pub fn role(&self) -> Option<&'static str> {
        *self.role.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The heartbeat of the loop `name`, which must call [`Heartbeat::beat`] once per round.
    /// Registering counts as a first beat. When the last clone is dropped (the loop stopped on
    /// purpose: a replica that lost the leadership), the loop is forgotten; dropped while its
    /// task panics, it stays, goes stale and makes liveness fail.
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        let h = Heartbeat {
            inner: Arc::new(BeatInner {
                name,
                beats: self.beats.clone(),
            }),
        };
        h.beat();
        h
    }

    /// The guard of the watch `name`, held by the task that polls it (see [`WatchGuard`]).
    pub fn watch(&self, name: impl Into<String>) -> WatchGuard {
        let name = name.into();
        self.lock_watches().insert(name.clone(), WatchState::default());
        WatchGuard {
            name,
            watches: self.watches.clone(),
        }
    }

    fn lock_watches(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WatchState>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why `/healthz` fails at `now` (empty: live).
    pub fn liveness(&self, now: Instant) -> Problems {
        let mut out = Vec::new();
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        for (name, at) in beats.iter() {
            let ago = now.saturating_duration_since(*at);
            if ago >= STALE_AFTER {
                out.push(format!("{name} last completed a round {}s ago", ago.as_secs()));
            }
        }
        for (name, w) in self.lock_watches().iter() {
            if let Some(why) = &w.ended {
                out.push(format!("watch {name} stopped: {why}"));
            }
        }
        Problems(out)
    }

    /// Why `/readyz` fails at `now` (empty: ready).
    pub fn readiness(&self, now: Instant) -> Problems {
        let mut out = Vec::new();
        if !self.ready.load(Ordering::Relaxed) {
            out.push("starting: caches have not listed yet".to_string());
        }
        for (name, w) in self.lock_watches().iter() {
            match w.failing_for(now) {
                Some(d) if d >= WATCH_FAILING_AFTER => {
                    let err = w.last_error.as_ref().map(|(_, e)| e.as_str()).unwrap_or("");
                    out.push(format!("watch {name} failing for {}s: {err}", d.as_secs()));
                }
                _ => {}
            }
        }
        Problems(out)
    }
}

/// One loop's heartbeat (see [`Health::heartbeat`]).
#[derive(Clone)]
pub struct Heartbeat {
    inner: Arc<BeatInner>,
}

struct BeatInner {
    name: &'static str,
    beats: Arc<Mutex<BTreeMap<&'static str, Instant>>>,
}

impl Heartbeat {
    /// One round done.
    pub fn beat(&self) {
        self.inner
            .beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.inner.name, Instant::now());
    }
}

impl Drop for BeatInner {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.beats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(self.name);
        }
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// Reports one watch's events and errors. Dropped while the task panics, or after
/// [`WatchGuard::ended`], it makes liveness fail; dropped otherwise (the task was aborted because
/// the watch is no longer wanted, e.g. its site was deleted) it forgets the watch.
pub struct WatchGuard {
    name: String,
    watches: Arc<Mutex<BTreeMap<String, WatchState>>>,
}

impl WatchGuard {
    fn update(&self, f: impl FnOnce(&mut WatchState)) {
        let mut map = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(self.name.clone()).or_default());
    }

    /// An event arrived: the watch works.
    pub fn event(&self) {
        self.update(|w| {
            w.failing_since = None;
            w.last_error = None;
        });
    }

    /// The watch failed with `error` (it retries on its own).
    pub fn error(&self, error: &dyn std::fmt::Display) {
        self.error_at(Instant::now(), error.to_string());
    }

    fn error_at(&self, now: Instant, error: String) {
        self.update(|w| {
            // Not failing yet, or a quiet gap since the last error (it reconnected in between):
            // a new run of errors begins.
            if w.failing_for(now).is_none() {
                w.failing_since = Some(now);
            }
            w.last_error = Some((now, error));
        });
    }

    /// The watch stream ended for good (`why`): liveness fails from now on.
    pub fn ended(self, why: &str) {
        self.update(|w| w.ended = Some(why.to_string()));
        std::mem::forget(self);
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut map = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if std::thread::panicking() {
            map.entry(self.name.clone()).or_default().ended = Some("its task panicked".into());
        } else {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn liveness_fails_when_a_loop_stops_beating() {
        let h = Health::default();
        assert!(h.liveness(Instant::now()).is_empty(), "no loop registered yet");
        let sync = h.heartbeat("status-sync");
        let _leases = h.heartbeat("node-leases");
        let now = Instant::now();
        assert!(h.liveness(now).is_empty());
        // Two minutes later, only the status sync has beaten again.
        let later = now + Duration::from_secs(130);
        h.beats.lock().unwrap().insert("status-sync", later);
        let p = h.liveness(later);
        assert_eq!(p.0.len(), 1, "{p}");
        assert!(p.0[0].starts_with("node-leases last completed a round"), "{p}");
        sync.beat();
    }

    #[test]
    fn a_loop_stopped_on_purpose_is_forgotten() {
        let h = Health::default();
        let sync = h.heartbeat("status-sync");
        let clone = sync.clone();
        drop(sync);
        let later = Instant::now() + Duration::from_secs(130);
        assert_eq!(h.liveness(later).0.len(), 1, "a clone still runs the loop");
        drop(clone);
        assert!(h.liveness(later).is_empty(), "{}", h.liveness(later));
    }

    #[test]
    fn not_ready_until_the_caches_listed() {
        let h = Health::default();
        assert_eq!(
            h.readiness(Instant::now()).0,
            ["starting: caches have not listed yet"]
        );
        h.set_ready();
        assert!(h.readiness(Instant::now()).is_empty());
    }

    #[test]
    fn a_watch_failing_without_a_break_makes_readiness_fail_and_an_event_clears_it() {
        let h = Health::default();
        h.set_ready();
        let w = h.watch("Pod scheduler");
        let t0 = Instant::now();
        // Errors as the watcher's backoff retries: 1 s, 3 s, 7 s, 15 s, 31 s, 61 s.
        for s in [0, 1, 3, 7, 15] {
            w.error_at(at(t0, s), "403 Forbidden".into());
        }
        assert!(h.readiness(at(t0, 20)).is_empty(), "20 s of errors is a blip");
        w.error_at(at(t0, 31), "403 Forbidden".into());
        let p = h.readiness(at(t0, 40));
        assert_eq!(p.0, ["watch Pod scheduler failing for 40s: 403 Forbidden"]);
        // Liveness is not affected: a restart would not fix the API server.
        assert!(h.liveness(at(t0, 40)).is_empty());
        w.event();
        assert!(h.readiness(Instant::now()).is_empty());
    }

    #[test]
    fn a_watch_that_reconnected_without_an_event_is_not_failing_once_errors_stop() {
        let h = Health::default();
        h.set_ready();
        let w = h.watch("OffloadSite");
        let t0 = Instant::now();
        for s in [0, 10, 30, 60] {
            w.error_at(at(t0, s), "connection refused".into());
        }
        assert!(!h.readiness(at(t0, 70)).is_empty());
        // No error (and no event: nothing changed) for longer than the retry interval.
        assert!(h.readiness(at(t0, 60 + 75)).is_empty());
        // A new error later starts a new run: a blip again, not 3 minutes of failure.
        w.error_at(at(t0, 200), "connection refused".into());
        assert!(h.readiness(at(t0, 201)).is_empty());
    }

    #[test]
    fn a_watch_that_ends_or_panics_makes_liveness_fail_and_an_aborted_one_is_forgotten() {
        let h = Health::default();
        let ended = h.watch("Node");
        ended.ended("the stream ended");
        assert_eq!(
            h.liveness(Instant::now()).0,
            ["watch Node stopped: the stream ended"]
        );

        let h = Health::default();
        let guard = h.watch("Pod node=offload-a");
        let panicked = std::thread::spawn(move || {
            let _g = guard;
            panic!("boom");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(
            h.liveness(Instant::now()).0,
            ["watch Pod node=offload-a stopped: its task panicked"]
        );

        let h = Health::default();
        let aborted = h.watch("Pod node=offload-b");
        aborted.error(&"x");
        drop(aborted);
        assert!(h.liveness(Instant::now()).is_empty());
        assert!(h.lock_watches().is_empty());
    }
}
