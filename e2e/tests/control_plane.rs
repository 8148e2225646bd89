//! Proves that each control-plane component is real and alive. Every test here fails when one of
//! the four components is not running; this was checked by stopping each in turn with
//! `kill -STOP $(cat $OFFLOAD_E2E_CLUSTER/<component>.pid)` while `make e2e` ran (see
//! docs/development.md, "Proving the harness"):
//! - etcd stopped: every API write times out, so all tests fail;
//! - kube-apiserver stopped: every request fails, so all tests fail;
//! - kube-controller-manager stopped: `controller_manager_creates_default_service_account` and
//!   `garbage_collector_deletes_dependents_of_deleted_owner` time out;
//! - kube-scheduler stopped: `scheduler_marks_unfittable_pod_unschedulable` times out.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use offload_e2e::{Cluster, TestNamespace, cluster::workspace_binary, wait};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

/// etcd and kube-apiserver: objects are stored, read back, patched and listed, and the server is
/// the version the harness built.
#[tokio::test]
async fn objects_round_trip_through_apiserver_and_etcd() {
    TestNamespace::run("objects-round-trip", |t| async move {
        let version = t.client.apiserver_version().await?;
        ensure!(
            version.git_version == "v1.37.2",
            "API server is {}",
            version.git_version
        );

        let cms: Api<ConfigMap> = Api::namespaced(t.client.clone(), &t.name);
        cms.create(&PostParams::default(), &config_map("round-trip", &[("k", "v1")]))
            .await?;
        let read = cms.get("round-trip").await?;
        ensure!(read.data.as_ref().and_then(|d| d.get("k")).map(String::as_str) == Some("v1"));

        let patch = json!({"data": {"k": "v2", "other": "x"}});
        cms.patch("round-trip", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let read = cms.get("round-trip").await?;
        let data = read.data.unwrap_or_default();
        ensure!(
            data.get("k").map(String::as_str) == Some("v2"),
            "patched data: {data:?}"
        );
        ensure!(
            data.get("other").map(String::as_str) == Some("x"),
            "patched data: {data:?}"
        );

        let listed = cms.list(&ListParams::default()).await?;
        ensure!(
            listed.items.iter().any(|c| c.name_any() == "round-trip"),
            "not listed"
        );
        Ok(())
    })
    .await;
}

/// kube-controller-manager (serviceaccount controller): a new namespace gets its `default`
/// ServiceAccount. The API server alone never creates it.
#[tokio::test]
async fn controller_manager_creates_default_service_account() {
    TestNamespace::run("default-sa", |t| async move {
        let sas: Api<ServiceAccount> = Api::namespaced(t.client.clone(), &t.name);
        wait::until("the default ServiceAccount", TIMEOUT, || async {
            sas.get_opt("default").await
        })
        .await?;
        Ok(())
    })
    .await;
}

/// kube-controller-manager (garbage collector): deleting an owner deletes its dependents.
#[tokio::test]
async fn garbage_collector_deletes_dependents_of_deleted_owner() {
    TestNamespace::run("garbage-collector", |t| async move {
        let cms: Api<ConfigMap> = Api::namespaced(t.client.clone(), &t.name);
        let owner = cms
            .create(&PostParams::default(), &config_map("owner", &[]))
            .await?;
        let mut dependent = config_map("dependent", &[]);
        dependent.metadata.owner_references = Some(vec![OwnerReference {
            api_version: ConfigMap::api_version(&()).into(),
            kind: ConfigMap::kind(&()).into(),
            name: owner.name_any(),
            uid: owner.uid().context("owner has no uid")?,
            ..Default::default()
        }]);
        cms.create(&PostParams::default(), &dependent).await?;

        // Background propagation: the API server deletes the owner at once and leaves the
        // dependents to the garbage collector.
        cms.delete("owner", &DeleteParams::background()).await?;
        wait::until("the dependent to be garbage-collected", TIMEOUT, || async {
            cms.get_opt("dependent").await.map(|d| d.is_none().then_some(()))
        })
        .await?;
        Ok(())
    })
    .await;
}

/// kube-scheduler: a pod that fits no node is marked `PodScheduled=False`, reason `Unschedulable`.
#[tokio::test]
async fn scheduler_marks_unfittable_pod_unschedulable() {
    TestNamespace::run("unschedulable", |t| async move {
        // The ServiceAccount admission plugin rejects pods until the namespace's `default` SA exists.
        t.default_service_account().await?;

        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "too-big"},
            "spec": {"containers": [{
                "name": "main", "image": "busybox",
                "resources": {"requests": {"cpu": "1000", "memory": "1Ti"}}
            }]}
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let condition = wait::until("PodScheduled=False", TIMEOUT, || async {
            let pod = pods.get("too-big").await?;
            let cond = pod
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled");
            Ok::<_, kube::Error>(cond)
        })
        .await?;
        ensure!(
            condition.status == "False",
            "PodScheduled is {:?}",
            condition.status
        );
        ensure!(
            condition.reason.as_deref() == Some("Unschedulable"),
            "reason {:?}",
            condition.reason
        );
        Ok(())
    })
    .await;
}

/// The operator's identity is authenticated but holds no rights until RBAC grants them, so tests
/// of the chart's ClusterRole are meaningful.
#[tokio::test]
async fn operator_identity_is_not_an_admin() {
    TestNamespace::run("operator-identity", |t| async move {
        let operator = t.cluster.operator_client().await?;
        let secrets: Api<Secret> = Api::namespaced(operator, &t.name);
        match secrets.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => {
                ensure!(status.code == 403, "expected 403, got {status:?}")
            }
            other => anyhow::bail!("operator identity could list secrets: {other:?}"),
        }
        Ok(())
    })
    .await;
}

/// The real operator binary reaches the API server with the operator's kubeconfig.
#[tokio::test]
async fn operator_binary_connects_with_its_identity() {
    TestNamespace::run("operator-binary", |t| async move {
        let cluster: &Cluster = t.cluster;
        let out = tokio::process::Command::new(workspace_binary("offload-operator")?)
            .arg("check")
            .arg("--kubeconfig")
            .arg(&cluster.operator_kubeconfig)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "check failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(stdout.contains("api server: v1.37.2"), "{stdout}");
        // Its rights come only from RBAC: refused unless the operator's ClusterRoleBinding (installed
        // by the site tests of a shared cluster) exists.
        let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(t.client.clone());
        let granted = bindings.get_opt("offload-operator").await?.is_some();
        let expected = if granted {
            "list nodes: allowed"
        } else {
            "list nodes: forbidden"
        };
        ensure!(stdout.contains(expected), "expected {expected:?}: {stdout}");
        Ok(())
    })
    .await;
}
