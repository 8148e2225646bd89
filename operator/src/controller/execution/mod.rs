//! The kubelet role: runs pods bound to a site's virtual Node at the site and keeps their status
//! true. Create and delete are per pod ([`decide`] says which, this module applies it); status is
//! synced per site in one batched request ([`sync`]).

pub mod decide;
mod gather;
pub mod orphans;
mod sync;
pub mod token;
mod unrecorded;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{Controller, controller::Action},
};
use serde_json::json;

use self::{
    decide::{Facts, Step},
    unrecorded::Unrecorded,
};
use super::{Context, Error, backoff::Backoff, events::Reason, node, site_client, written::WrittenStatuses};
use crate::crd::{ANNOTATION_CREATE_SENT, OffloadSite};

const CONTROLLER: &str = "pod";

/// The execution controller's own state beside the shared context.
struct Ctx {
    shared: Arc<Context>,
    backoff: Backoff,
    /// When each pod was created at its site, until it first runs (for the observed queue time).
    created: Mutex<HashMap<String, (String, Instant)>>,
    /// Pods a site's status answer left out: how many answers in a row, since when.
    missing: Mutex<HashMap<String, (String, u32, Instant)>>,
    /// Per site, statuses written that the watch cache may not show yet (compared instead of a
    /// stale copy).
    written: Mutex<HashMap<String, WrittenStatuses>>,
    /// Per site, the pods with a remote job seen at the last sync, by UID. The API server deletes
    /// a finished pod at once, and `kubectl delete --force` any pod (no deletionTimestamp, so no
    /// reconcile sees it go): a pod that has left the cache since is deleted at its site from
    /// this copy.
    tracked: Mutex<HashMap<String, HashMap<String, Arc<Pod>>>>,
    /// Per site, UIDs `delete` already deleted there (the sweep skips them).
    deleted_at_site: Mutex<HashMap<String, HashSet<String>>>,
    /// Per site, pods already warned about an expiring token (`TokenExpiring`), by UID.
    token_warned: Mutex<HashMap<String, HashSet<String>>>,
    /// Jobs created at a site whose remote id waits for the pod's first status write.
    unrecorded: Mutex<Unrecorded>,
    /// Pods whose deletion this process completed, by UID, with when: the API server updates a
    /// pod (its grace period) before it removes it, and the reconcile that update triggers must
    /// not send the delete a second time.
    completed: Mutex<HashMap<String, Instant>>,
    /// Per site, the reconciliation of its jobs against the cluster's pods ([`orphans`]).
    orphans: Mutex<HashMap<String, orphans::SiteOrphans>>,
    /// When each site is asked for orphaned jobs.
    orphan_timing: orphans::OrphanTiming,
}

impl Ctx {
    fn unrecorded(&self) -> std::sync::MutexGuard<'_, Unrecorded> {
        self.unrecorded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long a completed deletion is remembered: far longer than the watch takes to show it.
const COMPLETED_FOR: Duration = Duration::from_secs(120);

/// Runs the execution controller and the per-site status sync until the process ends.
pub async fn run(shared: Arc<Context>) {
    let controller = Controller::for_shared_stream(shared.pods.subscribe(), shared.pods.store().clone());
    let ctx = Arc::new(Ctx {
        orphan_timing: shared.settings.orphans,
        shared,
        backoff: Backoff::default(),
        created: Mutex::default(),
        missing: Mutex::default(),
        written: Mutex::default(),
        tracked: Mutex::default(),
        deleted_at_site: Mutex::default(),
        token_warned: Mutex::default(),
        unrecorded: Mutex::default(),
        completed: Mutex::default(),
        orphans: Mutex::default(),
    });
    let results = controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone());
    // The sync runs beside the controller and stops with it (shutdown, or lost leadership).
    tokio::select! {
        _ = sync::sync_forever(ctx) => {}
        _ = super::drain(results, CONTROLLER) => {}
    }
}

fn error_policy(pod: Arc<Pod>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = pod.uid().unwrap_or_default();
    super::on_error(&ctx.shared, &ctx.backoff, CONTROLLER, &key, err)
}

/// The site whose virtual Node the pod is bound to, if any.
fn site_of(ctx: &Context, pod: &Pod) -> Option<Arc<OffloadSite>> {
    let node = pod.spec.as_ref()?.node_name.as_deref()?;
    ctx.site(node::site_of_node(node)?)
}

/// [`Facts::node_taken`]: `None` when `node` is in the cache of the operator's Nodes.
fn node_taken(ctx: &Context, site: Option<&OffloadSite>, node: &str) -> Option<bool> {
    let ours = ctx
        .nodes
        .store()
        .get(&kube::runtime::reflector::ObjectRef::new(node))
        .is_some();
    if ours {
        return None;
    }
    Some(site.is_some_and(node::is_node_taken))
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let shared = &ctx.shared;
    let site = site_of(shared, &pod);
    let site_name = site.as_ref().map(|s| s.name_any()).unwrap_or_default();
    let client = site_client(&shared.registry, &site_name);
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default();
    let ns = pod.namespace().unwrap_or_default();
    let labels = shared.namespace_labels(&ns);
    let step = decide::decide(&Facts {
        pod: &pod,
        site: site.as_deref(),
        node_looks_like_a_site: node::site_of_node(node).is_some(),
        node_taken: node_taken(shared, site.as_deref(), node),
        client: client.as_ref().map(|(_, reachable)| *reachable),
        namespace_labels: &labels,
        created_here: ctx.unrecorded().contains(&pod),
    });
    let action = match step {
        Step::Ignore | Step::Done => Action::await_change(),
        Step::WaitForSite => Action::requeue(Duration::from_secs(2)),
        Step::Delete { recorded, sent_at } => delete(&ctx, &pod, &site_name, recorded, sent_at).await?,
        Step::Refuse { message } => {
            fail(shared, &pod, Reason::NamespaceNotAllowed, &message).await?;
            Action::await_change()
        }
        Step::SiteUnavailable { message } => {
            waiting(shared, &pod, "SiteUnavailable", &message).await?;
            Action::requeue(Duration::from_secs(5))
        }
        Step::Create { ask_first } => match client {
            Some((client, _)) => create(&ctx, &pod, &site_name, &client, ask_first).await?,
            None => Action::requeue(Duration::from_secs(2)),
        },
    };
    ctx.backoff.succeeded(&pod.uid().unwrap_or_default());
    Ok(action)
}

/// Creates the pod at its site (asking first when a create may have arrived unrecorded), records
/// the remote job, and reports.
async fn create(
    ctx: &Ctx,
    pod: &Pod,
    site: &str,
    client: &crate::interlink::SiteClient,
    ask_first: bool,
) -> Result<Action, Error> {
    let shared = &ctx.shared;
    let ns = pod.namespace().unwrap_or_default();
    let (request, token_expires) = match gather::gather(&shared.client, pod).await {
        Ok(r) => r,
        Err(message) => {
            waiting(shared, pod, "CreateContainerConfigError", &message).await?;
            return Err(Error::Invalid(message));
        }
    };
    // A create may have been sent before (the marker below) and reached the site unrecorded, by a
    // process that died or an answer that was lost: ask the site first, giving it the time it may
    // need to show the pod. A pod never sent needs no question.
    let known = if ask_first {
        client.find_created(pod, client.create_settle()).await
    } else {
        None
    };
    let outcome = match known {
        Some(jid) => Ok(jid),
        None => {
            if !ask_first {
                mark_sending(shared, pod, site).await?;
            }
            client.create_idempotent(&request).await.map(|(c, _)| c.pod_jid)
        }
    };
    let result = outcome.as_ref().map_or_else(|e| e.reason(), |_| "ok");
    shared
        .metrics
        .site_requests
        .with_label_values(&[site, "create", result])
        .inc();
    match outcome {
        Ok(jid) => {
            tracing::info!(pod = %pod.name_any(), namespace = %ns, site, job = %jid, "created at the site");
            // Recorded with the pod's first status write (the status sync's next round).
            ctx.unrecorded().created(pod, site, &jid, token_expires);
            ctx.created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pod.uid().unwrap_or_default(), (site.to_string(), Instant::now()));
            let note = format!("created at site {site} as job {jid}");
            publish(shared, pod, Reason::Submitted, &note).await;
            Ok(Action::await_change())
        }
        Err(e) if e.is_retryable() || e.is_credentials() => {
            // A site that refuses the operator's credentials (a rotation half done) is the
            // site's problem, not the pod's: the pod waits and is retried.
            let message = format!("creating at site {site} failed, retrying: {e}");
            waiting(shared, pod, "SiteUnavailable", &message).await?;
            Err(Error::Site {
                site: site.to_string(),
                source: e,
            })
        }
        Err(e) => {
            tracing::warn!(pod = %pod.name_any(), namespace = %ns, site, error = %e, "the site refused the pod");
            let message = format!("site {site} refused the pod: {e}");
            fail(shared, pod, Reason::OffloadCreateFailed, &message).await?;
            Ok(Action::await_change())
        }
    }
}

/// Deletes the pod at its site, then completes its deletion as a kubelet does. A finished pod is
/// deleted at the site too (its job, state and logs would stay there forever otherwise), and so is
/// a pod whose create was sent but never recorded, if the site turns out to have it.
async fn delete(
    ctx: &Ctx,
    pod: &Pod,
    site: &str,
    recorded: bool,
    sent_at: Option<String>,
) -> Result<Action, Error> {
    let uid = pod.uid().unwrap_or_default();
    {
        let mut completed = ctx.completed.lock().unwrap_or_else(|p| p.into_inner());
        completed.retain(|_, at| at.elapsed() < COMPLETED_FOR);
        if completed.contains_key(&uid) {
            return Ok(Action::await_change());
        }
    }
    if recorded || sent_at.is_some() {
        let Some((client, _)) = site_client(&ctx.shared.registry, site) else {
            return Ok(Action::requeue(Duration::from_secs(2)));
        };
        let at_site = recorded || {
            let settle =
                unrecorded_settle(sent_at.as_deref(), jiff::Timestamp::now(), client.create_settle());
            client.find_created(pod, settle).await.is_some()
        };
        if at_site && !delete_at_site(&ctx.shared, pod, site, &client).await {
            let deleting_since = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0);
            if !hand_over(deleting_since, jiff::Timestamp::now()) {
                return Ok(Action::requeue(super::backoff::jitter(Duration::from_secs(5))));
            }
            // The site has not confirmed for long: the pod goes, its job is left to the
            // reconciliation of the site's jobs against the cluster (orphans), which deletes it
            // there once the site answers.
            let note = format!(
                "site {site} has not confirmed the delete for {}s; the pod is removed and its job will be \
                 deleted at the site by the orphaned-job check once the site answers",
                HAND_OVER_AFTER.as_secs()
            );
            tracing::warn!(pod = %pod.name_any(), site, "{note}");
            publish(&ctx.shared, pod, Reason::DeleteRetrying, &note).await;
        }
        if at_site {
            ctx.deleted_at_site
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(site.to_string())
                .or_default()
                .extend(pod.uid());
        }
    }
    let pods: Api<Pod> = Api::namespaced(ctx.shared.client.clone(), &pod.namespace().unwrap_or_default());
    // The UID precondition: a new pod of the same name, created since, is not this one.
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => {}
        // 404: already gone; 409: the precondition failed, the name belongs to another pod now.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        // Anything else (429, 500, a timeout) is retried with the controller's backoff.
        Err(e) => return Err(e.into()),
    }
    ctx.unrecorded().forget(&uid);
    ctx.completed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid, Instant::now());
    Ok(Action::await_change())
}

/// How long a pod being deleted is kept while its site does not confirm the delete; then the
/// pod goes and the orphaned-job check deletes its job once the site answers.
const HAND_OVER_AFTER: Duration = Duration::from_secs(600);

/// Whether a pod deleted at `deleting_since` (its deletionTimestamp) and still not confirmed by
/// its site is handed over to the orphaned-job check at `now`.
pub(crate) fn hand_over(deleting_since: Option<jiff::Timestamp>, now: jiff::Timestamp) -> bool {
    deleting_since.is_some_and(|since| {
        now.duration_since(since)
            .try_into()
            .is_ok_and(|d: Duration| d >= HAND_OVER_AFTER)
    })
}

/// How long to ask a site whether a create sent at `sent_at` (the marker's RFC 3339 value) but
/// never recorded reached it: until the site's status lag has passed since the create, and at
/// least one question. An unreadable marker gets the whole lag.
pub(crate) fn unrecorded_settle(sent_at: Option<&str>, now: jiff::Timestamp, lag: Duration) -> Duration {
    let Some(sent) = sent_at.and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
        return lag;
    };
    let since = now.duration_since(sent).try_into().unwrap_or(Duration::ZERO);
    lag.saturating_sub(since)
}

/// `/delete` for a pod the site has. False when the site still has it after a failed delete (the
/// caller tries again later).
async fn delete_at_site(ctx: &Context, pod: &Pod, site: &str, client: &crate::interlink::SiteClient) -> bool {
    let result = client.delete(pod).await;
    let label = result.as_ref().map_or_else(|e| e.reason(), |_| "ok");
    ctx.metrics
        .site_requests
        .with_label_values(&[site, "delete", label])
        .inc();
    match result {
        Ok(_) => tracing::info!(pod = %pod.name_any(), site, "deleted at the site"),
        // Any failure (a 401 while a token rotates, a TLS error, a 5xx) is retried while the
        // site may still have the job: a delete is never given up on a refusal alone.
        Err(e) if still_at_site(client, pod).await => {
            let note = format!("deleting at site {site} failed, retrying: {e}");
            publish(ctx, pod, Reason::DeleteRetrying, &note).await;
            return false;
        }
        // The site answers that it does not know the pod: nothing is left to stop.
        Err(e) => {
            tracing::info!(pod = %pod.name_any(), error = %e, "site delete refused, and the site no longer has the pod")
        }
    }
    true
}

/// After a failed delete: whether the site still has the pod. interLink's SLURM plugin answers a
/// delete of a pod it no longer has with a bare 500, which looks transient; a status answer that
/// does not know the pod settles it. A site that cannot answer may still have it.
async fn still_at_site(client: &crate::interlink::SiteClient, pod: &Pod) -> bool {
    let uid = pod.uid().unwrap_or_default();
    match client.status(std::slice::from_ref(pod)).await {
        Ok(statuses) => statuses.iter().any(|s| s.uid == uid && s.is_known()),
        Err(_) => true,
    }
}

/// The `offload.dev/create-sent` marker, before the first create: a process that restarts after it
/// asks the site before creating again. It goes through the status subresource (which keeps
/// annotations) with the pod's first status, so the marker costs no write of its own.
async fn mark_sending(ctx: &Context, pod: &Pod, site: &str) -> Result<(), kube::Error> {
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        ANNOTATION_CREATE_SENT.into(),
        jiff::Timestamp::now().to_string().into(),
    );
    let patch = pending_patch(pod, "ContainerCreating", &format!("sending to site {site}"));
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    patch_status_and_annotations(&api, &pod.name_any(), patch, annotations)
        .await
        .map(|_| ())
}

/// One status write that also sets `annotations` (the status subresource of pods keeps metadata
/// changes; docs/adr/0007). Should an API server drop them, they are written by a metadata patch
/// right after, so the marker and the remote id are never lost for it; a warning says so once.
pub(super) async fn patch_status_and_annotations(
    api: &Api<Pod>,
    name: &str,
    mut patch: serde_json::Value,
    annotations: serde_json::Map<String, serde_json::Value>,
) -> Result<Pod, kube::Error> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    patch["metadata"] = json!({"annotations": annotations});
    // Strategic: conditions merge by type, so those others wrote are kept.
    let after = api
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    let kept = annotations
        .iter()
        .all(|(k, v)| after.annotations().get(k).map(|a| json!(a)) == Some(v.clone()));
    if kept {
        return Ok(after);
    }
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            pod = name,
            "the API server dropped annotations sent with a pod status write; writing them separately (one more write per pod)"
        );
    }
    let metadata = json!({"metadata": {"annotations": annotations}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&metadata))
        .await
}

/// Pending, every container waiting with this reason; not written again when every container
/// already says so (a pod waiting for its site is reconciled every few seconds).
async fn waiting(ctx: &Context, pod: &Pod, reason: &str, message: &str) -> Result<(), kube::Error> {
    let says_so = pod.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Pending")
            && s.container_statuses.as_ref().is_some_and(|cs| {
                !cs.is_empty()
                    && cs.iter().all(|c| {
                        c.state
                            .as_ref()
                            .and_then(|st| st.waiting.as_ref())
                            .is_some_and(|w| {
                                w.reason.as_deref() == Some(reason) && w.message.as_deref() == Some(message)
                            })
                    })
            })
    });
    if says_so {
        return Ok(());
    }
    let patch = pending_patch(pod, reason, message);
    Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// A status patch: Pending, every container waiting with this reason and message.
fn pending_patch(pod: &Pod, reason: &str, message: &str) -> serde_json::Value {
    let containers: Vec<_> = pod.spec.iter().flat_map(|s| s.containers.iter()).map(|c| json!({
        "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "", "ready": false, "restartCount": 0,
        "started": false, "state": {"waiting": {"reason": reason, "message": message}}})).collect();
    let now = Time(jiff::Timestamp::now());
    let start = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or(now);
    json!({"status": {"phase": "Pending", "startTime": start, "containerStatuses": containers}})
}

/// Failed, every container terminated with exit code 1 and this reason.
async fn fail(ctx: &Context, pod: &Pod, reason: Reason, message: &str) -> Result<(), kube::Error> {
    let now = Time(jiff::Timestamp::now());
    let reason_str = reason.as_str();
    let containers: Vec<_> = pod.spec.iter().flat_map(|s| s.containers.iter()).map(|c| json!({
        "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "", "ready": false, "restartCount": 0,
        "started": false, "state": {"terminated": {"exitCode": 1, "reason": reason_str, "message": message, "finishedAt": now}}})).collect();
    let patch = json!({"status": {"phase": "Failed", "reason": reason_str, "message": message, "containerStatuses": containers}});
    Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    publish(ctx, pod, reason, message).await;
    Ok(())
}

async fn publish(ctx: &Context, pod: &Pod, reason: Reason, note: &str) {
    ctx.events
        .publish(&pod.object_ref(&()), reason, note, "Offload")
        .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{HAND_OVER_AFTER, hand_over, sync::is_lost, unrecorded_settle};

    #[test]
    fn a_pod_is_lost_only_after_several_answers_over_time() {
        let window = Duration::from_secs(30);
        assert!(
            !is_lost(1, Duration::from_secs(600), window, false),
            "one answer is not enough"
        );
        assert!(
            !is_lost(10, Duration::from_secs(5), window, false),
            "a site's status cache may lag a new job"
        );
        assert!(is_lost(3, Duration::from_secs(30), window, false));
        assert!(
            !is_lost(3, Duration::from_secs(30), Duration::from_secs(120), false),
            "the window is the site's"
        );
    }

    #[test]
    fn answers_that_know_no_pod_count_only_after_ten_windows() {
        let window = Duration::from_secs(30);
        assert!(
            !is_lost(20, Duration::from_secs(60), window, true),
            "a restarting plugin answers with nothing for a while"
        );
        assert!(is_lost(20, Duration::from_secs(300), window, true));
    }

    #[test]
    fn an_unconfirmed_delete_is_handed_over_after_ten_minutes() {
        let since: jiff::Timestamp = "2026-12-03T10:00:00Z".parse().unwrap();
        let at = |s: i64| since + jiff::SignedDuration::from_secs(s);
        assert!(!hand_over(Some(since), at(0)));
        assert!(!hand_over(Some(since), at(HAND_OVER_AFTER.as_secs() as i64 - 1)));
        assert!(hand_over(Some(since), at(HAND_OVER_AFTER.as_secs() as i64)));
        assert!(
            !hand_over(Some(since), at(-60)),
            "a deletion timestamp ahead (the grace period)"
        );
        assert!(!hand_over(None, at(3600)), "not being deleted");
    }

    #[test]
    fn a_deleted_pod_sent_but_unrecorded_is_looked_for_until_the_site_lag_has_passed() {
        let lag = Duration::from_secs(12);
        let now: jiff::Timestamp = "2026-12-03T10:00:20Z".parse().unwrap();
        // Sent 5 s ago: the site may need 7 s more to show it.
        assert_eq!(
            unrecorded_settle(Some("2026-12-03T10:00:15Z"), now, lag),
            Duration::from_secs(7)
        );
        // Sent long ago: one question is enough.
        assert_eq!(
            unrecorded_settle(Some("2026-12-03T09:00:00Z"), now, lag),
            Duration::ZERO
        );
        // A marker that cannot be read, or from the future (clock skew): the whole lag.
        assert_eq!(unrecorded_settle(Some("yesterday"), now, lag), lag);
        assert_eq!(unrecorded_settle(Some("2026-12-03T10:05:00Z"), now, lag), lag);
        assert_eq!(unrecorded_settle(None, now, lag), lag);
    }
}
