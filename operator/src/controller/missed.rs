//! Pods that opted in to offloading but were created while the webhook could not answer: with
//! `failurePolicy: Ignore` the API server created them unchanged, and a pod's scheduler name
//! cannot be changed afterwards. The leader tells their owners: one `NotOffloaded` Warning Event
//! per pod and `offload_webhook_missed_pods_total`.
//!
//! Observe: a watch narrowed on the server to unbound pods of the default scheduler (normally a
//! handful: they are bound within seconds). Decide: [`crate::webhook::decide::missed`]. Act and
//! report: the Event and the metric, once per pod.

use std::{collections::HashSet, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use super::{Context, events::Reason};
use crate::webhook::decide::{NAMESPACE_ENABLED, OPT_IN, missed};

/// The watch's field selector: pods nobody has bound yet that kept the default scheduler.
const FIELDS: &str = "spec.schedulerName=default-scheduler,spec.nodeName=";

/// Runs while this replica leads, when the webhook is on (else it waits forever).
pub async fn run(ctx: Arc<Context>) {
    if !ctx.settings.webhook {
        return std::future::pending().await;
    }
    // Namespace labels decide; wait until their cache has listed.
    ctx.namespaces.synced().await;
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let mut told: HashSet<String> = HashSet::new();
    let mut events = watcher(api, watcher::Config::default().fields(FIELDS))
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                report(&ctx, &mut told, &pod).await;
            }
            Ok(watcher::Event::Delete(pod)) => {
                told.remove(&pod.uid().unwrap_or_default());
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(error = %e, "watch of unbound default-scheduler pods failed; retrying"),
        }
    }
}

async fn report(ctx: &Context, told: &mut HashSet<String>, pod: &Pod) {
    let ns = pod.namespace().unwrap_or_default();
    let enabled = ctx.namespace_labels(&ns).get(OPT_IN).map(String::as_str) == Some(NAMESPACE_ENABLED);
    if !missed(pod, enabled) || !told.insert(pod.uid().unwrap_or_default()) {
        return;
    }
    ctx.metrics.webhook_missed.inc();
    tracing::warn!(pod = %format!("{ns}/{}", pod.name_any()), "pod opted in to offloading but was created without the webhook");
    let note = "This pod asks to be offloaded (offload.dev/offload annotation or namespace label) but \
                was created without the offload webhook's change: the webhook could not answer \
                (failurePolicy Ignore), or the namespace was labelled after the pod was created. It \
                keeps the default scheduler and will not be offloaded; delete and recreate it.";
    ctx.events
        .publish(&pod.object_ref(&()), Reason::NotOffloaded, note, "Admit")
        .await;
}
