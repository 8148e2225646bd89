//! The status sync: every site's active pods in one `/status` request per interval, each site in
//! its own task; and the sweep of pods that left the cluster without a deletion.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{Ctx, delete_at_site, fail, orphans, patch_status_and_annotations, token};
use crate::{
    controller::{events::Reason, load, node::node_name, site_client, status_map, written::WrittenStatuses},
    crd::{ANNOTATION_TOKEN_EXPIRES, OffloadSite},
    interlink::{Error as SiteError, wire::PodStatus},
};

/// A pod the site's answers have left out this many times in a row, over at least the site's
/// `lostAfterSeconds`, is lost (the site forgot it: restarted without state, purged, or deleted
/// it behind our back).
const LOST_AFTER_ANSWERS: u32 = 3;

/// An answer with no entry at all is not proof that the site lost its pods (a plugin that
/// restarts answers with nothing for a while): pods count as lost from such answers only after
/// this many times the window.
const EMPTY_ANSWERS_SLOWER: u32 = 10;

/// Whether a pod missing from `answers` status answers in a row, first missed `since` ago, is
/// lost, with the site's window `after` and whether the last answer had no entry at all.
pub(super) fn is_lost(answers: u32, since: Duration, after: Duration, answered_nothing: bool) -> bool {
    let after = if answered_nothing {
        after.saturating_mul(EMPTY_ANSWERS_SLOWER)
    } else {
        after
    };
    answers >= LOST_AFTER_ANSWERS && since >= after
}

/// Longest one site's status sync may take (its `/status` requests with their retries, then the
/// pod patches); then it is abandoned and the next interval starts a new one.
const SYNC_DEADLINE: Duration = Duration::from_secs(60);

/// Every second, the sites whose sync interval has passed get one status request for all their
/// active pods. Each site syncs in its own task, so a site that hangs delays no other site; a
/// site whose previous sync is still running is skipped until it ends.
pub(super) async fn sync_forever(ctx: Arc<Ctx>) {
    let heartbeat = ctx.shared.health.heartbeat("status-sync");
    let mut last: HashMap<String, Instant> = HashMap::new();
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Owned here, so dropping this future aborts every site's sync in progress.
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        heartbeat.beat();
        while tasks.try_join_next().is_some() {}
        for site in ctx.shared.sites.store().state() {
            let name = site.name_any();
            let every = Duration::from_secs(site.spec.status_sync_interval_seconds.max(1) as u64);
            if last.get(&name).is_some_and(|t| t.elapsed() < every) {
                continue;
            }
            if !in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
            {
                continue;
            }
            last.insert(name.clone(), Instant::now());
            let (ctx, in_flight) = (ctx.clone(), in_flight.clone());
            tasks.spawn(async move {
                let sync = async {
                    sweep_gone(&ctx, &site).await;
                    reap_orphans(&ctx, &name).await;
                    sync_site(&ctx, &site).await
                };
                match tokio::time::timeout(SYNC_DEADLINE, sync).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(site = %name, error = %e, "status sync failed"),
                    Err(_) => {
                        tracing::warn!(site = %name, deadline = ?SYNC_DEADLINE, "status sync abandoned at its deadline")
                    }
                }
                in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            });
        }
    }
}

/// Pods of the site with a remote job (recorded, or created by this process) and no deletion in
/// progress (those go through `delete`), by UID.
fn recorded_at(ctx: &Ctx, pods: &Store<Pod>, node: &str) -> HashMap<String, Arc<Pod>> {
    let unrecorded = ctx.unrecorded();
    pods.state()
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| p.metadata.deletion_timestamp.is_none() && unrecorded.remote_id(p).is_some())
        .filter_map(|p| Some((p.uid()?, p)))
        .collect()
}

/// Deletes at the site the pods that have left the cluster since the last sync without going
/// through `delete` (finished pods, which the API server deletes at once; force-deleted pods):
/// their jobs, state and logs would stay at the site forever otherwise.
async fn sweep_gone(ctx: &Ctx, site: &OffloadSite) {
    let name = site.name_any();
    let now = recorded_at(ctx, ctx.shared.pods.store(), &node_name(&name));
    let cached: HashMap<String, Arc<Pod>> = ctx
        .shared
        .pods
        .store()
        .state()
        .into_iter()
        .filter_map(|p| Some((p.uid()?, p)))
        .collect();
    // Created here and gone before the first status write recorded them: never tracked below.
    let mut gone_unrecorded = ctx.unrecorded().settle(&name, &cached);
    let mut gone: Vec<Arc<Pod>> = {
        let mut tracked = ctx.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let before = tracked.insert(name.clone(), now.clone()).unwrap_or_default();
        let mut all = ctx.deleted_at_site.lock().unwrap_or_else(|p| p.into_inner());
        let deleted = all.entry(name.clone()).or_default();
        // Gone: no longer in the cache at all (a pod still there is being deleted: `delete`
        // handles it), and not already deleted at the site by `delete`.
        let gone: Vec<Arc<Pod>> = before
            .into_iter()
            .filter(|(uid, _)| !cached.contains_key(uid) && !deleted.contains(uid))
            .map(|(_, p)| p)
            .collect();
        // What `delete` handled is forgotten once the pod has left the cache.
        deleted.retain(|uid| cached.contains_key(uid));
        let listed: HashSet<String> = gone.iter().filter_map(|p| p.uid()).collect();
        gone_unrecorded.retain(|p| {
            p.uid()
                .is_some_and(|u| !deleted.contains(&u) && !listed.contains(&u))
        });
        gone
    };
    gone.append(&mut gone_unrecorded);
    if gone.is_empty() {
        return;
    }
    let Some((client, _)) = site_client(&ctx.shared.registry, &name) else {
        return;
    };
    tracing::debug!(site = %name, pods = gone.len(), "pods left the cluster without a deletion: deleting them at the site");
    for pod in gone {
        let uid = pod.uid().unwrap_or_default();
        if !delete_at_site(&ctx.shared, &pod, &name, &client).await {
            // The site still has it: keep it for the next sweep.
            ctx.tracked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(name.clone())
                .or_default()
                .insert(uid, pod);
        }
    }
}

/// A pass of the reconciliation of the site's jobs against the cluster, when one is due
/// ([`orphans`]): the first right after this replica starts leading, then periodically. A site
/// that cannot be reached is asked again at the next sync.
async fn reap_orphans(ctx: &Ctx, site: &str) {
    // Judged against a partial pod cache, every job would look orphaned.
    if !ctx.shared.pods.is_synced() {
        return;
    }
    let due = ctx
        .orphans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(site.to_string())
        .or_default()
        .due(Instant::now(), ctx.orphan_timing);
    if !due {
        return;
    }
    let Some((client, true)) = site_client(&ctx.shared.registry, site) else {
        return;
    };
    match orphans::reconcile_site(ctx, site, &client).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(site, deleted = n, "orphaned jobs deleted at the site"),
        Err(e) => {
            tracing::warn!(site, error = %e, "orphaned-job check failed; trying again at the next sync")
        }
    }
}

async fn sync_site(ctx: &Ctx, site: &OffloadSite) -> Result<(), SyncError> {
    let name = site.name_any();
    // From the watch cache, not a list per sync: this runs every interval for every site, and a
    // pod a moment stale is corrected at the next sync.
    let active: Vec<Arc<Pod>> = {
        let unrecorded = ctx.unrecorded();
        load::active_pods_cached(ctx.shared.pods.store(), &node_name(&name))
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && unrecorded.remote_id(p).is_some())
            .collect()
    };
    {
        // Forget pods of this site that are no longer active.
        let uids: HashSet<String> = active.iter().filter_map(|p| p.uid()).collect();
        let mut missing = ctx.missing.lock().unwrap_or_else(|p| p.into_inner());
        missing.retain(|uid, (site, _, _)| site != &name || uids.contains(uid));
        drop(missing);
        let mut written = ctx.written.lock().unwrap_or_else(|p| p.into_inner());
        written.entry(name.clone()).or_default().retain(&uids);
        drop(written);
        let mut warned = ctx.token_warned.lock().unwrap_or_else(|p| p.into_inner());
        warned
            .entry(name.clone())
            .or_default()
            .retain(|u| uids.contains(u));
        drop(warned);
        // A pod deleted before it ever ran leaves no queue-time sample to take.
        let mut created = ctx.created.lock().unwrap_or_else(|p| p.into_inner());
        created.retain(|uid, (site, _)| site != &name || uids.contains(uid));
    }
    for phase in ["Pending", "Running"] {
        let n = active.iter().filter(|p| load::phase(p) == phase).count();
        ctx.shared
            .metrics
            .pods
            .with_label_values(&[&name, phase])
            .set(n as i64);
    }
    if active.is_empty() {
        return Ok(());
    }
    let Some((client, _)) = site_client(&ctx.shared.registry, &name) else {
        return Ok(());
    };
    let start = Instant::now();
    // A site that does not answer changes nothing: pods keep their phase until it does.
    let statuses = match client.status(&active).await {
        Ok(s) => s,
        Err(e) => {
            ctx.shared
                .metrics
                .site_requests
                .with_label_values(&[&name, "status", e.reason()])
                .inc();
            return Err(SyncError::Site(e));
        }
    };
    ctx.shared
        .metrics
        .site_requests
        .with_label_values(&[&name, "status", "ok"])
        .inc();
    ctx.shared
        .metrics
        .last_status_sync
        .with_label_values(&[&name])
        .set(jiff::Timestamp::now().as_second());
    ctx.shared
        .metrics
        .status_sync_duration
        .with_label_values(&[&name])
        .observe(start.elapsed().as_secs_f64());
    let now = Time(jiff::Timestamp::now());
    let lost_after = Duration::from_secs(site.spec.lost_after_seconds.max(1) as u64);
    let patched = apply_answers(ctx, &name, &active, &statuses, &now, lost_after).await;
    tracing::debug!(site = %name, pods = active.len(), answered = statuses.len(), patched, took = ?start.elapsed(), "status synced");
    Ok(())
}

/// Writes the status of every pod whose site answer changed it; fails pods the site has lost.
/// Returns how many pods were written.
async fn apply_answers(
    ctx: &Ctx,
    name: &str,
    active: &[Arc<Pod>],
    statuses: &[PodStatus],
    now: &Time,
    lost_after: Duration,
) -> usize {
    let mut patched = 0usize;
    // By UID: one lookup per pod, not a scan of the answers.
    let known: HashMap<&str, &PodStatus> = statuses
        .iter()
        .filter(|s| s.is_known())
        .map(|s| (s.uid.as_str(), s))
        .collect();
    // No entry at all, for pods it held a moment ago: a plugin restarting, a cache being rebuilt.
    // An entry that says "unknown" (the SLURM plugin echoes a purged pod with empty states) is
    // an answer about the pod; silence is not.
    let answered_nothing = !active.is_empty() && statuses.is_empty();
    if answered_nothing {
        tracing::debug!(site = name, pods = active.len(), "the site answered with nothing");
    }
    for pod in active {
        let uid = pod.uid().unwrap_or_default();
        // An entry the site answers with for a pod it does not know (no job id, no state) is as
        // good as none.
        let Some(&remote) = known.get(uid.as_str()) else {
            let lost = {
                let mut missing = ctx.missing.lock().unwrap_or_else(|p| p.into_inner());
                let entry = missing
                    .entry(uid.clone())
                    .or_insert_with(|| (name.to_string(), 0, Instant::now()));
                entry.1 += 1;
                is_lost(entry.1, entry.2.elapsed(), lost_after, answered_nothing)
            };
            if lost {
                let jid = ctx.unrecorded().remote_id(pod).unwrap_or_default();
                let msg = format!("site {name} no longer knows the pod (job {jid}): it was lost there");
                tracing::warn!(pod = %pod.name_any(), site = name, job = %jid, "the site lost the pod");
                if let Err(e) = fail(&ctx.shared, pod, Reason::OffloadLost, &msg).await {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "cannot fail a lost pod");
                } else {
                    ctx.missing.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
                }
            }
            continue;
        };
        ctx.missing.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
        warn_token(ctx, pod, name, &uid, now).await;
        // Compared with what the API server has, which may be newer than the cache.
        let current = written_for(ctx, name, |w| w.current(pod));
        let new = status_map::map(&current, remote, now);
        // A job created by this process is recorded with its first status write (the status
        // subresource keeps annotations), whether or not the status changed.
        let record = ctx.unrecorded().annotations_to_write(pod);
        if record.is_none() && !status_map::changed(current.status.as_ref(), &new) {
            continue;
        }
        if new.phase.as_deref() != Some("Pending") {
            note_started(ctx, &uid, name);
        }
        let api: Api<Pod> = Api::namespaced(ctx.shared.client.clone(), &pod.namespace().unwrap_or_default());
        let patch = json!({"status": new});
        let written = match record {
            Some(annotations) => {
                patch_status_and_annotations(&api, &pod.name_any(), patch, annotations).await
            }
            None => {
                // Strategic: conditions merge by type, so those others wrote are kept.
                api.patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
            }
        };
        match written {
            Ok(after) => {
                patched += 1;
                ctx.unrecorded().written(&uid);
                written_for(ctx, name, |w| w.record(pod, &after));
            }
            Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "cannot patch pod status"),
        }
    }
    patched
}

/// A `TokenExpiring` Warning, once per pod, when a token sent with it expires within
/// [`token::WARN_BEFORE`] (interLink cannot refresh it; docs/adr/0005).
async fn warn_token(ctx: &Ctx, pod: &Pod, site: &str, uid: &str, now: &Time) {
    let Some(expires) = pod
        .annotations()
        .get(ANNOTATION_TOKEN_EXPIRES)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    else {
        return;
    };
    if !token::due(expires, now.0) {
        return;
    }
    let first = ctx
        .token_warned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(site.to_string())
        .or_default()
        .insert(uid.to_string());
    if !first {
        return;
    }
    let note = format!(
        "the service-account token sent to site {site} with this pod expires at {expires}; interLink cannot \
         refresh a running pod's files, so the pod loses its Kubernetes API identity then (docs/adr/0005)"
    );
    ctx.shared
        .events
        .publish(&pod.object_ref(&()), Reason::TokenExpiring, &note, "Offload")
        .await;
}

fn written_for<T>(ctx: &Ctx, site: &str, f: impl FnOnce(&mut WrittenStatuses) -> T) -> T {
    let mut written = ctx.written.lock().unwrap_or_else(|p| p.into_inner());
    f(written.entry(site.to_string()).or_default())
}

/// The first non-Pending status of a pod created by this process: one queue-time sample, added
/// to the site's observed average in the shared registry (the site controller writes it into the
/// site's status: one writer).
fn note_started(ctx: &Ctx, uid: &str, site: &str) {
    let Some((_, created)) = ctx.created.lock().unwrap_or_else(|p| p.into_inner()).remove(uid) else {
        return;
    };
    let sample = created.elapsed().as_secs_f64();
    let persisted = ctx
        .shared
        .site(site)
        .and_then(|s| s.status.as_ref()?.observed_queue_wait_seconds);
    let avg = ctx
        .shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(site.to_string())
        .or_default()
        .observe_start(persisted, sample);
    tracing::debug!(site, sample, average = avg, "observed queue wait");
    ctx.shared
        .metrics
        .bind_to_running
        .with_label_values(&[site])
        .observe(sample);
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SyncError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("site: {0}")]
    Site(SiteError),
}
