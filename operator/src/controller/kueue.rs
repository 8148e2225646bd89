//! Offload sites as Kueue capacity (`run --kueue`): one `ResourceFlavor` per OffloadSite, so a
//! ClusterQueue can give quota on sites. A flavor carries the site Node's label and the
//! tolerations its taints need, so Kueue puts them into the pods of the Jobs it admits on that
//! flavor; kube-scheduler then binds those pods to the site's virtual Node and the execution
//! controller runs them at the site, as it runs interLink-style pods.
//!
//! Observe: the site cache. Decide: [`flavor`] (pure). Act: server-side apply, owned by the site,
//! so the garbage collector deletes the flavor with its site.

use std::sync::Arc;

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{
    Context,
    node::{INTERLINK_TAINT, OUTAGE_TAINTS, SITE_LABEL, node_name},
};
use crate::crd::OffloadSite;

/// Kueue's API group and the version the operator writes (v0.17's storage version).
pub const GROUP: &str = "kueue.x-k8s.io";
/// See [`GROUP`].
pub const VERSION: &str = "v1beta2";
const MANAGER: &str = "offload-operator";

/// The ResourceFlavor API.
pub fn flavor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "ResourceFlavor"),
        "resourceflavors",
    )
}

/// The name of a site's flavor: its virtual Node's name (`offload-<site>`).
pub fn flavor_name(site: &str) -> String {
    node_name(site)
}

/// The ResourceFlavor of site `site` (whose uid is `uid`, for the owner reference).
pub fn flavor(site: &str, uid: &str) -> Value {
    let outage: Vec<Value> = OUTAGE_TAINTS
        .iter()
        .map(|k| json!({"key": k, "operator": "Exists", "effect": "NoExecute"}))
        .collect();
    let mut tolerations = vec![
        json!({"key": SITE_LABEL, "operator": "Equal", "value": site, "effect": "NoSchedule"}),
        json!({"key": INTERLINK_TAINT, "operator": "Exists", "effect": "NoSchedule"}),
    ];
    tolerations.extend(outage);
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "ResourceFlavor",
        "metadata": {
            "name": flavor_name(site),
            "labels": {SITE_LABEL: site, "app.kubernetes.io/managed-by": "offload-operator"},
            "ownerReferences": [{
                "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite", "name": site, "uid": uid,
                "blockOwnerDeletion": false, "controller": true,
            }],
        },
        "spec": {
            "nodeLabels": {SITE_LABEL: site},
            "tolerations": tolerations,
        },
    })
}

/// Keeps one flavor per site in the cache, while this replica leads and `--kueue` is set.
pub async fn run(ctx: Arc<Context>) {
    if !ctx.settings.kueue {
        return std::future::pending().await;
    }
    let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &flavor_resource());
    let mut sites = ctx.sites.subscribe().boxed();
    while let Some(site) = sites.next().await {
        apply(&ctx, &api, &site).await;
    }
}

async fn apply(ctx: &Context, api: &Api<DynamicObject>, site: &OffloadSite) {
    if site.metadata.deletion_timestamp.is_some() {
        return;
    }
    let name = site.name_any();
    let desired = flavor(&name, site.metadata.uid.as_deref().unwrap_or_default());
    let params = PatchParams::apply(MANAGER).force();
    match api
        .patch(&flavor_name(&name), &params, &Patch::Apply(&desired))
        .await
    {
        Ok(_) => tracing::debug!(site = %name, "Kueue ResourceFlavor applied"),
        Err(e) => {
            ctx.metrics
                .reconcile_errors
                .with_label_values(&["kueue", super::backoff::Category::of_kube(&e).as_str()])
                .inc();
            tracing::warn!(site = %name, error = %e, "cannot apply the site's Kueue ResourceFlavor (are Kueue's CRDs installed, and may the operator write resourceflavors?)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flavor_selects_the_site_node_and_tolerates_its_taints() {
        let f = flavor("hpc", "u-1");
        assert_eq!(f["metadata"]["name"], "offload-hpc");
        assert_eq!(f["spec"]["nodeLabels"][SITE_LABEL], "hpc");
        let tolerations = f["spec"]["tolerations"].as_array().unwrap();
        // Kueue allows at most 8.
        assert!(tolerations.len() <= 8);
        let has = |key: &str, effect: &str| {
            tolerations
                .iter()
                .any(|t| t["key"] == key && t["effect"] == effect && t.get("tolerationSeconds").is_none())
        };
        assert!(has(SITE_LABEL, "NoSchedule"));
        assert!(has(INTERLINK_TAINT, "NoSchedule"));
        for k in OUTAGE_TAINTS {
            assert!(has(k, "NoExecute"), "{k}");
        }
        // The site toleration matches this site only.
        let site = tolerations.iter().find(|t| t["key"] == SITE_LABEL).unwrap();
        assert_eq!(site["operator"], "Equal");
        assert_eq!(site["value"], "hpc");
        assert_eq!(f["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(f["metadata"]["ownerReferences"][0]["kind"], "OffloadSite");
    }
}
