//! The kubelet role: runs pods bound to a site's virtual Node at the site and keeps their status
//! true. Create and delete are per pod; status is synced per site in one batched request.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{EventType, Recorder, Reporter},
        reflector::Store,
        watcher,
    },
};
use serde_json::json;

use super::{SiteClients, node::node_name, site_client, status_map, written::WrittenStatuses};
use crate::{
    crd::{ANNOTATION_CREATE_SENT, ANNOTATION_REMOTE_ID, OffloadSite},
    interlink::{Error as SiteError, wire::PodCreateRequests},
    metrics::Metrics,
    placement::selector,
};

const MANAGER: &str = "offload-operator";

struct Ctx {
    client: Client,
    /// Every pod, as the controller's watch sees them (the status sync reads its pods here).
    pods: Store<Pod>,
    clients: SiteClients,
    sites: Store<OffloadSite>,
    recorder: Recorder,
    metrics: Metrics,
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
    deleted_at_site: Mutex<HashMap<String, std::collections::HashSet<String>>>,
}

/// A pod the site's answers have left out this many times in a row, over at least this long, is
/// lost (the site forgot it: restarted without state, purged, or deleted it behind our back).
const LOST_AFTER_ANSWERS: u32 = 3;
const LOST_AFTER: Duration = Duration::from_secs(30);

/// Whether a pod missing from `answers` status answers in a row, first missed `since` ago, is lost.
fn is_lost(answers: u32, since: Duration) -> bool {
    answers >= LOST_AFTER_ANSWERS && since >= LOST_AFTER
}

/// Runs the execution controller and the per-site status sync until the process ends.
pub async fn run(
    client: Client,
    metrics: Metrics,
    clients: SiteClients,
    site_selector: Option<String>,
    heartbeat: crate::server::Heartbeat,
) {
    let mut cfg = watcher::Config::default().any_semantic();
    if let Some(s) = &site_selector {
        cfg = cfg.labels(s);
    }
    let (sites, writer) = kube::runtime::reflector::store();
    let site_stream =
        kube::runtime::reflector::reflector(writer, watcher(Api::<OffloadSite>::all(client.clone()), cfg));
    tokio::spawn(async move {
        let mut s = std::pin::pin!(site_stream);
        while s.next().await.is_some() {}
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    );
    let controller = Controller::new(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let ctx = Arc::new(Ctx {
        pods: controller.store(),
        client: client.clone(),
        clients,
        sites,
        recorder,
        metrics,
        created: Mutex::default(),
        missing: Mutex::default(),
        written: Mutex::default(),
        tracked: Mutex::default(),
        deleted_at_site: Mutex::default(),
    });
    tokio::spawn(sync_forever(ctx.clone(), heartbeat));
    controller
        .shutdown_on_signal()
        .run(reconcile, |_, _, _| Action::requeue(Duration::from_secs(5)), ctx)
        .for_each(|_| async {})
        .await;
}

/// The site whose virtual Node the pod is bound to, if any.
fn site_of(ctx: &Ctx, pod: &Pod) -> Option<Arc<OffloadSite>> {
    let node = pod.spec.as_ref()?.node_name.as_deref()?;
    ctx.sites
        .state()
        .into_iter()
        .find(|s| node_name(&s.name_any()) == node)
}

use super::load::is_finished as terminal;

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    let Some(site) = site_of(&ctx, &pod) else {
        // Bound to what looks like a site's node whose site this process has not seen yet (its
        // cache may still be filling): look again shortly rather than forget the pod.
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        return Ok(if super::node::site_of_node(node).is_some() {
            Action::requeue(Duration::from_secs(2))
        } else {
            Action::await_change()
        });
    };
    let site_name = site.name_any();
    let ns = pod.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        return delete(&ctx, &pod, &site_name, &pods).await;
    }
    if terminal(&pod) || pod.annotations().contains_key(ANNOTATION_REMOTE_ID) {
        return Ok(Action::await_change());
    }
    // Tenancy: a pod's Secrets and ConfigMaps only go to sites its namespace may use.
    let ns_labels = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&ns)
        .await?
        .and_then(|n| n.metadata.labels)
        .unwrap_or_default();
    if !selector::matches(&site.spec.namespace_selector, &ns_labels) {
        let msg = format!("namespace {ns} may not use site {site_name}; nothing was sent to it");
        fail(&ctx, &pod, "NamespaceNotAllowed", &msg).await?;
        return Ok(Action::await_change());
    }
    let Some((client, reachable)) = site_client(&ctx.clients, &site_name) else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if !reachable {
        waiting(
            &ctx,
            &pod,
            "SiteUnavailable",
            &format!("site {site_name} is not ready; the pod will be created when it is"),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let request = match gather(&ctx.client, &pod).await {
        Ok(r) => r,
        Err(message) => {
            waiting(&ctx, &pod, "CreateContainerConfigError", &message).await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    };
    // A create may have been sent before (the marker below) and reached the site unrecorded, by a
    // process that died or an answer that was lost: ask the site first, giving it the time it may
    // need to show the pod. A pod never sent needs no question.
    let uid = pod.uid().unwrap_or_default();
    let sent_before = pod.annotations().contains_key(ANNOTATION_CREATE_SENT);
    let known = if sent_before {
        client.find_created(&pod, client.create_settle()).await
    } else {
        None
    };
    let outcome = match known {
        Some(jid) => Ok(jid),
        None => {
            if !sent_before {
                let now = jiff::Timestamp::now().to_string();
                let patch = json!({"metadata": {"annotations": {ANNOTATION_CREATE_SENT: now}}});
                pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            client.create_idempotent(&request).await.map(|(c, _)| c.pod_jid)
        }
    };
    let result = match &outcome {
        Ok(_) => "ok",
        Err(e) => e.reason(),
    };
    ctx.metrics
        .site_requests
        .with_label_values(&[&site_name, "create", result])
        .inc();
    match outcome {
        Ok(jid) => {
            tracing::info!(pod = %pod.name_any(), namespace = %ns, site = %site_name, job = %jid, "created at the site");
            let patch = json!({"metadata": {"annotations": {ANNOTATION_REMOTE_ID: jid}}});
            pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid, (site_name.clone(), Instant::now()));
            waiting(
                &ctx,
                &pod,
                "ContainerCreating",
                &format!("submitted to site {site_name} (job {jid})"),
            )
            .await?;
            publish(
                &ctx,
                &pod,
                EventType::Normal,
                "Submitted",
                &format!("created at site {site_name} as job {jid}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(e) if e.is_retryable() => {
            waiting(
                &ctx,
                &pod,
                "SiteUnavailable",
                &format!("creating at site {site_name} failed, retrying: {e}"),
            )
            .await?;
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Err(e) => {
            tracing::warn!(pod = %pod.name_any(), namespace = %ns, site = %site_name, error = %e, "the site refused the pod");
            fail(
                &ctx,
                &pod,
                "OffloadCreateFailed",
                &format!("site {site_name} refused the pod: {e}"),
            )
            .await?;
            Ok(Action::await_change())
        }
    }
}

/// Deletes the pod at its site, then completes its deletion as a kubelet does. A finished pod is
/// deleted at the site too (its job, state and logs would stay there forever otherwise), and so is
/// a pod whose create was sent but never recorded, if the site turns out to have it.
async fn delete(ctx: &Ctx, pod: &Pod, site: &str, pods: &Api<Pod>) -> Result<Action, kube::Error> {
    let recorded = pod.annotations().contains_key(ANNOTATION_REMOTE_ID);
    let sent_at = pod.annotations().get(ANNOTATION_CREATE_SENT).cloned();
    if recorded || sent_at.is_some() {
        let Some((client, _)) = site_client(&ctx.clients, site) else {
            return Ok(Action::requeue(Duration::from_secs(2)));
        };
        let at_site = recorded || {
            let settle =
                unrecorded_settle(sent_at.as_deref(), jiff::Timestamp::now(), client.create_settle());
            client.find_created(pod, settle).await.is_some()
        };
        if at_site && !delete_at_site(ctx, pod, site, &client).await {
            return Ok(Action::requeue(Duration::from_secs(5)));
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
    match pods
        .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
        .await
    {
        Ok(_) | Err(kube::Error::Api(_)) => Ok(Action::await_change()),
        Err(e) => Err(e),
    }
}

/// How long to ask a site whether a create sent at `sent_at` (the marker's RFC 3339 value) but
/// never recorded reached it: until the site's status lag has passed since the create, and at
/// least one question. An unreadable marker gets the whole lag.
fn unrecorded_settle(sent_at: Option<&str>, now: jiff::Timestamp, lag: Duration) -> Duration {
    let Some(sent) = sent_at.and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
        return lag;
    };
    let since = now.duration_since(sent).try_into().unwrap_or(Duration::ZERO);
    lag.saturating_sub(since)
}

/// `/delete` for a pod the site has. False when the site still has it after a failed delete (the
/// caller tries again later).
async fn delete_at_site(ctx: &Ctx, pod: &Pod, site: &str, client: &crate::interlink::SiteClient) -> bool {
    let result = client.delete(pod).await;
    let label = result.as_ref().map_or_else(|e| e.reason(), |_| "ok");
    ctx.metrics
        .site_requests
        .with_label_values(&[site, "delete", label])
        .inc();
    match result {
        Ok(_) => tracing::info!(pod = %pod.name_any(), site, "deleted at the site"),
        Err(e) if e.is_retryable() && still_at_site(client, pod).await => {
            let note = format!("deleting at site {site} failed, retrying: {e}");
            publish(ctx, pod, EventType::Warning, "DeleteRetrying", &note).await;
            return false;
        }
        // A site that does not know the pod (or refuses) has nothing left to stop.
        Err(e) => {
            tracing::info!(pod = %pod.name_any(), error = %e, "site delete refused; completing the deletion")
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

/// Every ConfigMap and Secret the pod mounts or reads in env, in full; projected and downwardAPI
/// volumes as ConfigMaps named after the volume, as interLink sends them.
async fn gather(client: &Client, pod: &Pod) -> Result<PodCreateRequests, String> {
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let (mut cm_names, mut secret_names) = (Vec::<String>::new(), Vec::<String>::new());
    let mut projected = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            cm_names.push(c.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secret_names.push(s);
        }
        if let Some(p) = &v.projected {
            let mut data = BTreeMap::new();
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    let cm = get::<ConfigMap>(client, &ns, &c.name).await?;
                    data.extend(cm.data.unwrap_or_default());
                }
                if let Some(s) = &src.secret {
                    let sec = get::<Secret>(client, &ns, &s.name).await?;
                    for (k, ByteString(b)) in sec.data.unwrap_or_default() {
                        data.insert(k, String::from_utf8_lossy(&b).into_owned());
                    }
                }
                if let Some(tok) = &src.service_account_token {
                    data.insert(tok.path.clone(), token(client, pod, tok).await?);
                }
                if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            data.insert(item.path.clone(), field(pod, &f.field_path));
                        }
                    }
                }
            }
            projected.push(synthetic(&v.name, data));
        }
        if let Some(d) = &v.downward_api {
            let data = d
                .items
                .iter()
                .flatten()
                .filter_map(|i| Some((i.path.clone(), field(pod, &i.field_ref.as_ref()?.field_path))))
                .collect();
            projected.push(synthetic(&v.name, data));
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten().filter_map(|e| e.value_from.as_ref()) {
            cm_names.extend(e.config_map_key_ref.as_ref().map(|r| r.name.clone()));
            secret_names.extend(e.secret_key_ref.as_ref().map(|r| r.name.clone()));
        }
        for e in c.env_from.iter().flatten() {
            cm_names.extend(e.config_map_ref.as_ref().map(|r| r.name.clone()));
            secret_names.extend(e.secret_ref.as_ref().map(|r| r.name.clone()));
        }
    }
    cm_names.sort();
    cm_names.dedup();
    secret_names.sort();
    secret_names.dedup();
    let mut configmaps = Vec::new();
    for n in &cm_names {
        configmaps.push(get::<ConfigMap>(client, &ns, n).await?);
    }
    let mut secrets = Vec::new();
    for n in &secret_names {
        secrets.push(get::<Secret>(client, &ns, n).await?);
    }
    Ok(PodCreateRequests {
        pod: pod.clone(),
        configmaps,
        secrets,
        projectedvolumesmaps: projected,
        jobscript_url: String::new(),
    })
}

/// A service-account token requested for the pod (bound to it, as a kubelet requests it).
async fn token(
    client: &Client,
    pod: &Pod,
    src: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
) -> Result<String, String> {
    use k8s_openapi::api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let ns = pod.namespace().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: src.audience.clone().map(|a| vec![a]),
            expiration_seconds: Some(src.expiration_seconds.unwrap_or(3600).max(600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let answer: TokenRequest = api
        .create_subresource("token", &sa, &kube::api::PostParams::default(), &request)
        .await
        .map_err(|e| format!("cannot request a token for ServiceAccount {ns}/{sa}: {e}"))?;
    answer
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| format!("the token request for {ns}/{sa} returned no token"))
}

fn synthetic(name: &str, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

fn field(pod: &Pod, path: &str) -> String {
    let m = &pod.metadata;
    match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => m
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{v}\"\n"))
            .collect(),
        "metadata.annotations" => m
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{v}\"\n"))
            .collect(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Result<K, String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    match Api::<K>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err(format!("{kind} {ns}/{name} does not exist")),
        Err(e) => Err(format!("cannot read {kind} {ns}/{name}: {e}")),
    }
}

/// Pending, every container waiting with this reason.
async fn waiting(ctx: &Ctx, pod: &Pod, reason: &str, message: &str) -> Result<(), kube::Error> {
    let containers: Vec<_> = pod.spec.iter().flat_map(|s| s.containers.iter()).map(|c| json!({
        "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "", "ready": false, "restartCount": 0,
        "started": false, "state": {"waiting": {"reason": reason, "message": message}}})).collect();
    let now = Time(jiff::Timestamp::now());
    let start = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or(now);
    let patch = json!({"status": {"phase": "Pending", "startTime": start, "containerStatuses": containers}});
    Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Failed, every container terminated with exit code 1 and this reason.
async fn fail(ctx: &Ctx, pod: &Pod, reason: &str, message: &str) -> Result<(), kube::Error> {
    let now = Time(jiff::Timestamp::now());
    let containers: Vec<_> = pod.spec.iter().flat_map(|s| s.containers.iter()).map(|c| json!({
        "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "", "ready": false, "restartCount": 0,
        "started": false, "state": {"terminated": {"exitCode": 1, "reason": reason, "message": message, "finishedAt": now}}})).collect();
    let patch = json!({"status": {"phase": "Failed", "reason": reason, "message": message, "containerStatuses": containers}});
    Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    publish(ctx, pod, EventType::Warning, reason, message).await;
    Ok(())
}

async fn publish(ctx: &Ctx, pod: &Pod, type_: EventType, reason: &str, note: &str) {
    super::publish_event(
        &ctx.recorder,
        &pod.object_ref(&()),
        type_,
        reason,
        note,
        "Offload",
    )
    .await;
}

/// Longest one site's status sync may take (its `/status` requests with their retries, then the
/// pod patches); then it is abandoned and the next interval starts a new one.
const SYNC_DEADLINE: Duration = Duration::from_secs(60);

/// Every second, the sites whose sync interval has passed get one status request for all their
/// active pods. Each site syncs in its own task, so a site that hangs delays no other site; a
/// site whose previous sync is still running is skipped until it ends.
async fn sync_forever(ctx: Arc<Ctx>, heartbeat: crate::server::Heartbeat) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    let in_flight: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        heartbeat.beat();
        for site in ctx.sites.state() {
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
            tokio::spawn(async move {
                let sync = async {
                    sweep_gone(&ctx, &site).await;
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

/// Pods of the site with a remote job and no deletion in progress (those go through `delete`),
/// by UID.
fn recorded_at(pods: &Store<Pod>, node: &str) -> HashMap<String, Arc<Pod>> {
    pods.state()
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && p.annotations().contains_key(ANNOTATION_REMOTE_ID)
        })
        .filter_map(|p| Some((p.uid()?, p)))
        .collect()
}

/// Deletes at the site the pods that have left the cluster since the last sync without going
/// through `delete` (finished pods, which the API server deletes at once; force-deleted pods):
/// their jobs, state and logs would stay at the site forever otherwise.
async fn sweep_gone(ctx: &Ctx, site: &OffloadSite) {
    let name = site.name_any();
    let now = recorded_at(&ctx.pods, &node_name(&name));
    let gone: Vec<Arc<Pod>> = {
        let mut tracked = ctx.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let before = tracked.insert(name.clone(), now.clone()).unwrap_or_default();
        let mut all = ctx.deleted_at_site.lock().unwrap_or_else(|p| p.into_inner());
        let deleted = all.entry(name.clone()).or_default();
        let cached: std::collections::HashSet<String> =
            ctx.pods.state().iter().filter_map(|p| p.uid()).collect();
        // Gone: no longer in the cache at all (a pod still there is being deleted: `delete`
        // handles it), and not already deleted at the site by `delete`.
        let gone: Vec<Arc<Pod>> = before
            .into_iter()
            .filter(|(uid, _)| !cached.contains(uid) && !deleted.contains(uid))
            .map(|(_, p)| p)
            .collect();
        // What `delete` handled is forgotten once the pod has left the cache.
        deleted.retain(|uid| cached.contains(uid));
        gone
    };
    if gone.is_empty() {
        return;
    }
    let Some((client, _)) = site_client(&ctx.clients, &name) else {
        return;
    };
    tracing::debug!(site = %name, pods = gone.len(), "pods left the cluster without a deletion: deleting them at the site");
    for pod in gone {
        let uid = pod.uid().unwrap_or_default();
        if !delete_at_site(ctx, &pod, &name, &client).await {
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

async fn sync_site(ctx: &Ctx, site: &OffloadSite) -> Result<(), SyncError> {
    let name = site.name_any();
    // From the watch cache, not a list per sync: this runs every interval for every site, and a
    // pod a moment stale is corrected at the next sync.
    let active: Vec<Pod> = super::load::active_pods_cached(&ctx.pods, &node_name(&name))
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && p.annotations().contains_key(ANNOTATION_REMOTE_ID)
        })
        .collect();
    for phase in ["Pending", "Running"] {
        let n = active
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("Pending")
                    == phase
            })
            .count();
        ctx.metrics.pods.with_label_values(&[&name, phase]).set(n as i64);
    }
    if active.is_empty() {
        return Ok(());
    }
    let Some((client, _)) = site_client(&ctx.clients, &name) else {
        return Ok(());
    };
    let start = Instant::now();
    // A site that does not answer changes nothing: pods keep their phase until it does.
    let statuses = match client.status(&active).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics
                .site_requests
                .with_label_values(&[&name, "status", e.reason()])
                .inc();
            return Err(SyncError::Site(e));
        }
    };
    ctx.metrics
        .site_requests
        .with_label_values(&[&name, "status", "ok"])
        .inc();
    ctx.metrics
        .last_status_sync
        .with_label_values(&[&name])
        .set(jiff::Timestamp::now().as_second());
    ctx.metrics
        .status_sync_duration
        .with_label_values(&[&name])
        .observe(start.elapsed().as_secs_f64());
    let now = Time(jiff::Timestamp::now());
    {
        // Forget pods of this site that are no longer active.
        let uids: std::collections::HashSet<String> = active.iter().filter_map(|p| p.uid()).collect();
        let mut missing = ctx.missing.lock().unwrap_or_else(|p| p.into_inner());
        missing.retain(|uid, (site, _, _)| site != &name || uids.contains(uid));
        drop(missing);
        let mut written = ctx.written.lock().unwrap_or_else(|p| p.into_inner());
        written.entry(name.clone()).or_default().retain(&uids);
    }
    let mut patched = 0usize;
    for pod in &active {
        let uid = pod.uid().unwrap_or_default();
        // An entry the site answers with for a pod it does not know (no job id, no state) is as
        // good as none.
        let Some(remote) = statuses.iter().find(|s| s.uid == uid && s.is_known()) else {
            let lost = {
                let mut missing = ctx.missing.lock().unwrap_or_else(|p| p.into_inner());
                let entry = missing
                    .entry(uid.clone())
                    .or_insert_with(|| (name.clone(), 0, Instant::now()));
                entry.1 += 1;
                is_lost(entry.1, entry.2.elapsed())
            };
            if lost {
                let jid = pod
                    .annotations()
                    .get(ANNOTATION_REMOTE_ID)
                    .cloned()
                    .unwrap_or_default();
                let msg = format!("site {name} no longer knows the pod (job {jid}): it was lost there");
                tracing::warn!(pod = %pod.name_any(), site = %name, job = %jid, "the site lost the pod");
                if let Err(e) = fail(ctx, pod, "OffloadLost", &msg).await {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "cannot fail a lost pod");
                } else {
                    ctx.missing.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
                }
            }
            continue;
        };
        ctx.missing.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
        // Compared with what the API server has, which may be newer than the cache.
        let current = written_for(ctx, &name, |w| w.current(pod));
        let new = status_map::map(&current, remote, &now);
        if !status_map::changed(current.status.as_ref(), &new) {
            continue;
        }
        if new.phase.as_deref() != Some("Pending") {
            note_started(ctx, &uid, &name);
        }
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        let patch = json!({"status": new});
        match api
            .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(after) => {
                patched += 1;
                written_for(ctx, &name, |w| w.record(pod, &after));
            }
            Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "cannot patch pod status"),
        }
    }
    tracing::debug!(site = %name, pods = active.len(), answered = statuses.len(), patched, took = ?start.elapsed(), "status synced");
    Ok(())
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
        .sites
        .state()
        .into_iter()
        .find(|s| s.name_any() == site)
        .and_then(|s| s.status.as_ref()?.observed_queue_wait_seconds);
    let avg = ctx
        .clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(site.to_string())
        .or_default()
        .observe_start(persisted, sample);
    tracing::debug!(site, sample, average = avg, "observed queue wait");
    ctx.metrics
        .bind_to_running
        .with_label_values(&[site])
        .observe(sample);
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("site: {0}")]
    Site(SiteError),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{is_lost, unrecorded_settle};

    #[test]
    fn a_pod_is_lost_only_after_several_answers_over_time() {
        assert!(!is_lost(1, Duration::from_secs(600)), "one answer is not enough");
        assert!(
            !is_lost(10, Duration::from_secs(5)),
            "a site's status cache may lag a new job"
        );
        assert!(is_lost(3, Duration::from_secs(30)));
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
