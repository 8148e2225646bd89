//! Sites backed by simulators, as the end-to-end tests declare them, and their cleanup.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use offload_operator::crd::OffloadSite;
use serde_json::{Value, json};

use crate::{TestNamespace, operator::TEST_LABEL, wait};

const TIMEOUT: Duration = Duration::from_secs(90);

/// An `OffloadSite` for test namespace `ns` at `endpoint`: open to every namespace, large, probed
/// and synced every second; `extra` overrides spec keys.
pub fn site(ns: &str, name: &str, endpoint: &str, extra: Value) -> anyhow::Result<OffloadSite> {
    let mut spec = json!({"endpoint": endpoint, "namespaceSelector": {}, "statusSyncIntervalSeconds": 1,
        "capacity": {"cpu": "1000", "memory": "4Ti", "pods": 5000},
        "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}});
    spec.as_object_mut()
        .context("spec")?
        .extend(extra.as_object().cloned().unwrap_or_default());
    Ok(serde_json::from_value(
        json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
        "metadata": {"name": name, "labels": {TEST_LABEL: ns}}, "spec": spec}),
    )?)
}

/// Waits until the site's `Ready` condition is true.
pub async fn wait_site_ready(sites: &Api<OffloadSite>, name: &str) -> anyhow::Result<()> {
    wait::until(&format!("{name} Ready"), TIMEOUT, || async {
        let s = sites.get(name).await?;
        Ok::<_, kube::Error>(
            s.status
                .filter(|st| {
                    st.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
                .map(|_| ()),
        )
    })
    .await
}

/// Deletes the namespace's pods, then the sites, and waits until the sites are gone. Run it while
/// the operator still runs: it removes the sites' finalizers.
pub async fn delete_sites(t: &TestNamespace, sites: &Api<OffloadSite>, names: &[&str]) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    for p in pods.list(&ListParams::default()).await?.items {
        let _ = pods.delete(&p.name_any(), &DeleteParams::default()).await;
    }
    for n in names {
        let _ = sites.delete(n, &DeleteParams::default()).await;
    }
    for n in names {
        wait::until("site gone", TIMEOUT, || async {
            Ok::<_, kube::Error>(sites.get_opt(n).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}
