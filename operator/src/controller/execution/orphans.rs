//! Orphaned jobs: jobs a site holds whose pod no longer exists in the cluster. A pod force-deleted
//! while its site was down, removed while no operator ran, or left behind by a delete the site
//! refused leaves its job running at the site, burning an allocation nobody sees. Each site is
//! asked what it holds (interLink's `/status` with `[]`: every status its API server has cached;
//! docs/adr/0015) on start, on taking the leadership, and periodically; a job whose pod is gone
//! is deleted there once a grace window has passed and the API server confirms the pod is gone.
//!
//! [`judge`] is the pure half (which held jobs are due); [`reconcile_site`] asks, confirms and
//! deletes.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, ResourceExt};

use super::Ctx;
use crate::interlink::{SiteClient, wire::PodStatus};

/// Most orphans deleted at one site in one pass: a pass runs inside the site's sync deadline.
const MOST_PER_PASS: usize = 100;

/// How often each site is asked and how long a job must stay without a pod.
#[derive(Clone, Copy, Debug)]
pub struct OrphanTiming {
    /// Between two passes over a site (the first runs when the controller starts).
    pub every: Duration,
    /// How long a job must be seen without its pod before it is deleted: covers a pod the watch
    /// cache does not show yet (being created) and a site whose answers lag.
    pub grace: Duration,
}

impl Default for OrphanTiming {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(300),
            grace: Duration::from_secs(60),
        }
    }
}

/// One site's reconciliation state: when it last ran, and the jobs seen without a pod, since when.
#[derive(Debug, Default)]
pub(super) struct SiteOrphans {
    last_pass: Option<Instant>,
    suspects: HashMap<String, Instant>,
}

impl SiteOrphans {
    /// Whether a pass is due at `now`: the first one at once, then every `every`, and sooner
    /// (after `grace`) while suspects wait for their grace window to end.
    pub(super) fn due(&self, now: Instant, timing: OrphanTiming) -> bool {
        let Some(last) = self.last_pass else {
            return true;
        };
        let wait = if self.suspects.is_empty() {
            timing.every
        } else {
            timing.grace.min(timing.every)
        };
        now.saturating_duration_since(last) >= wait
    }
}

/// The jobs of `held` whose pod is not in `in_cluster` and has been missing for at least `grace`
/// (to be confirmed with the API server, then deleted). Updates `state`: new suspects are noted
/// at `now`, and suspects the site no longer holds, or whose pod is back, are forgotten (the map
/// never outgrows what the site holds).
pub(super) fn judge<'a>(
    held: &'a [PodStatus],
    in_cluster: &HashSet<String>,
    state: &mut SiteOrphans,
    now: Instant,
    grace: Duration,
) -> Vec<&'a PodStatus> {
    state.last_pass = Some(now);
    let without_pod: Vec<&PodStatus> = held
        .iter()
        .filter(|s| !s.uid.is_empty() && !in_cluster.contains(&s.uid))
        .collect();
    let still: HashSet<&str> = without_pod.iter().map(|s| s.uid.as_str()).collect();
    state.suspects.retain(|uid, _| still.contains(uid.as_str()));
    without_pod
        .into_iter()
        .filter(|s| {
            let since = *state.suspects.entry(s.uid.clone()).or_insert(now);
            now.saturating_duration_since(since) >= grace
        })
        .take(MOST_PER_PASS)
        .collect()
}

/// One pass over `site`: asks what it holds, deletes there every job whose pod is gone for good.
/// Returns how many were deleted.
pub(super) async fn reconcile_site(ctx: &Ctx, site: &str, client: &SiteClient) -> Result<usize, String> {
    let held = client
        .status_all()
        .await
        .map_err(|e| format!("cannot list the site's jobs: {e}"))?;
    let in_cluster: HashSet<String> = ctx
        .shared
        .pods
        .store()
        .state()
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    let due: Vec<PodStatus> = {
        let mut all = ctx.orphans.lock().unwrap_or_else(|p| p.into_inner());
        let state = all.entry(site.to_string()).or_default();
        judge(&held, &in_cluster, state, Instant::now(), ctx.orphan_timing.grace)
            .into_iter()
            .cloned()
            .collect()
    };
    let mut deleted = 0;
    for job in due {
        match pod_exists(ctx, &job).await {
            // The cache lags the API server: the pod is there, the job is not an orphan.
            Ok(true) => {
                forget(ctx, site, &job.uid);
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(site, pod = %job.name, namespace = %job.namespace, error = %e,
                    "cannot tell whether an orphaned job's pod exists; asking again next pass");
                continue;
            }
        }
        let result = client.delete(&stand_in(&job)).await;
        let label = result.as_ref().map_or_else(|e| e.reason(), |_| "ok");
        ctx.shared
            .metrics
            .site_requests
            .with_label_values(&[site, "delete", label])
            .inc();
        match result {
            Ok(_) => {
                deleted += 1;
                forget(ctx, site, &job.uid);
                ctx.shared
                    .metrics
                    .orphans_deleted
                    .with_label_values(&[site])
                    .inc();
                tracing::info!(site, pod = %job.name, namespace = %job.namespace, uid = %job.uid, job = %job.jid,
                    "deleted an orphaned job at the site: its pod no longer exists in the cluster");
            }
            // Kept as a suspect: the next pass tries again (or finds the site has let it go).
            Err(e) => {
                tracing::warn!(site, pod = %job.name, namespace = %job.namespace, uid = %job.uid, error = %e,
                "cannot delete an orphaned job at the site; trying again next pass")
            }
        }
    }
    Ok(deleted)
}

fn forget(ctx: &Ctx, site: &str, uid: &str) {
    if let Some(state) = ctx
        .orphans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(site)
    {
        state.suspects.remove(uid);
    }
}

/// Whether the job's pod (same namespace, name and UID) exists, asked of the API server.
async fn pod_exists(ctx: &Ctx, job: &PodStatus) -> Result<bool, kube::Error> {
    if job.namespace.is_empty() || job.name.is_empty() {
        // Nothing to look up by: only the UID, and the cache does not have it.
        return Ok(false);
    }
    let api: Api<Pod> = Api::namespaced(ctx.shared.client.clone(), &job.namespace);
    Ok(api
        .get_opt(&job.name)
        .await?
        .is_some_and(|p| p.uid().as_deref() == Some(job.uid.as_str())))
}

/// The pod `/delete` is sent for a job whose pod is gone: interLink and its plugins find the job
/// by namespace and UID.
fn stand_in(job: &PodStatus) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(job.name.clone()),
            namespace: Some(job.namespace.clone()),
            uid: Some(job.uid.clone()),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(uids: &[&str]) -> Vec<PodStatus> {
        uids.iter()
            .map(|u| PodStatus {
                uid: u.to_string(),
                name: format!("pod-{u}"),
                namespace: "ns".into(),
                ..PodStatus::default()
            })
            .collect()
    }

    fn uids(v: &[&PodStatus]) -> Vec<String> {
        v.iter().map(|s| s.uid.clone()).collect()
    }

    #[test]
    fn a_job_without_a_pod_is_due_only_after_the_grace_window() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let jobs = held(&["a", "b"]);
        let cluster = HashSet::from(["a".to_string()]);
        let mut state = SiteOrphans::default();
        assert!(
            judge(&jobs, &cluster, &mut state, t0, grace).is_empty(),
            "first seen now"
        );
        assert!(
            judge(&jobs, &cluster, &mut state, t0 + Duration::from_secs(59), grace).is_empty(),
            "inside the window"
        );
        assert_eq!(
            uids(&judge(&jobs, &cluster, &mut state, t0 + grace, grace)),
            vec!["b"],
            "the job with a pod is never due"
        );
    }

    #[test]
    fn a_pod_that_shows_up_or_a_job_the_site_lets_go_is_forgotten() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut state = SiteOrphans::default();
        let none = HashSet::new();
        judge(&held(&["a", "b"]), &none, &mut state, t0, grace);
        assert_eq!(state.suspects.len(), 2);
        // The pod of a shows up (it was being created); the site no longer holds b.
        let with_a = HashSet::from(["a".to_string()]);
        let only_a = held(&["a"]);
        assert!(judge(&only_a, &with_a, &mut state, t0 + grace, grace).is_empty());
        assert!(state.suspects.is_empty(), "{:?}", state.suspects);
        // a's pod goes again: its window starts over.
        let t1 = t0 + grace * 2;
        assert!(judge(&only_a, &none, &mut state, t1, grace).is_empty());
        assert_eq!(
            uids(&judge(&only_a, &none, &mut state, t1 + grace, grace)),
            vec!["a"]
        );
    }

    #[test]
    fn entries_without_a_uid_are_never_due_and_a_pass_is_bounded() {
        let grace = Duration::ZERO;
        let t0 = Instant::now();
        let mut state = SiteOrphans::default();
        let mut jobs = held(&[""]);
        let many: Vec<String> = (0..(MOST_PER_PASS + 5)).map(|i| format!("u{i}")).collect();
        jobs.extend(held(&many.iter().map(String::as_str).collect::<Vec<_>>()));
        let due = judge(&jobs, &HashSet::new(), &mut state, t0, grace);
        assert_eq!(due.len(), MOST_PER_PASS);
        assert!(due.iter().all(|s| !s.uid.is_empty()));
    }

    #[test]
    fn passes_run_at_start_then_every_interval_and_sooner_while_suspects_wait() {
        let timing = OrphanTiming {
            every: Duration::from_secs(300),
            grace: Duration::from_secs(30),
        };
        let t0 = Instant::now();
        let mut state = SiteOrphans::default();
        assert!(state.due(t0, timing), "at start");
        judge(&held(&[]), &HashSet::new(), &mut state, t0, timing.grace);
        assert!(!state.due(t0 + Duration::from_secs(299), timing));
        assert!(state.due(t0 + Duration::from_secs(300), timing));
        judge(&held(&["x"]), &HashSet::new(), &mut state, t0, timing.grace);
        assert!(!state.due(t0 + Duration::from_secs(29), timing));
        assert!(
            state.due(t0 + Duration::from_secs(30), timing),
            "a suspect waits only the grace"
        );
    }
}
