//! The Helm chart's RBAC is enough, and no more than documented: the chart's ServiceAccount and
//! roles, rendered by `helm template` and installed on the real control plane, and the real
//! operator binary running with that ServiceAccount's token (a TokenRequest, as in a pod), not an
//! admin identity. Sites with bearer-token credentials become Ready, a pod that mounts a ConfigMap,
//! a Secret and its projected service-account token is placed by the offload scheduler, runs at a
//! simulated site and completes, and the operator never meets a Forbidden answer.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, anyhow, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    Cluster, TestNamespace,
    cluster::repo_root,
    operator::{Operator, TEST_LABEL},
    sitesim::{SimConfig, SimHandle},
    wait,
};
use offload_operator::crd::{OffloadPolicy, OffloadSite};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Renders the chart's ServiceAccount and RBAC for a release in `namespace` whose objects are all
/// named `name` (unique per test, so tests running in parallel do not share ClusterRoles).
fn render_rbac(cluster: &Cluster, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new(offload_e2e::helm::binary()?)
        .args(["template", name])
        .arg(repo_root().join("helm/offload-operator"))
        .args([
            "--namespace",
            namespace,
            "--set",
            &format!("fullnameOverride={name}"),
        ])
        .args([
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = cluster.dir.join(format!("chart-rbac-{name}.yaml"));
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

fn kubectl(cluster: &Cluster, kubeconfig: Option<&Path>, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut cmd = cluster.kubectl();
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    let out = cmd.args(args).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text.trim().to_string()))
}

#[tokio::test]
async fn operator_runs_with_the_charts_service_account() {
    TestNamespace::run("chart-rbac", |t| async move {
        // The operator's namespace (the release namespace) is not the workload namespace, so
        // reading the pod's ConfigMap and Secret needs the ClusterRole's cluster-wide `get`.
        let op_ns = format!("{}-op", t.name);
        let namespaces: Api<Namespace> = Api::all(t.client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": op_ns}}))?,
            )
            .await?;
        let rendered = render_rbac(t.cluster, &op_ns, &op_ns)?;
        let result = run(&t, &op_ns, &rendered).await;
        let _ = kubectl(
            t.cluster,
            None,
            &[
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-f",
                &rendered.to_string_lossy(),
            ],
        );
        let _ = namespaces.delete(&op_ns, &DeleteParams::background()).await;
        result
    })
    .await;
}

async fn run(t: &TestNamespace, op_ns: &str, rendered: &Path) -> anyhow::Result<()> {
    let (ok, out) = kubectl(t.cluster, None, &["apply", "-f", &rendered.to_string_lossy()])?;
    ensure!(ok, "applying the chart's RBAC: {out}");
    let kubeconfig = t.cluster.service_account_kubeconfig(op_ns, op_ns)?;

    // The identity is the ServiceAccount, and it has no more than the chart grants.
    let (_, who) = kubectl(
        t.cluster,
        Some(kubeconfig.as_path()),
        &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"],
    )?;
    ensure!(
        who == format!("system:serviceaccount:{op_ns}:{op_ns}"),
        "whoami: {who}"
    );
    let can = |args: &[&str]| -> anyhow::Result<bool> {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        Ok(kubectl(t.cluster, Some(kubeconfig.as_path()), &all)?.1 == "yes")
    };
    ensure!(
        can(&["create", "pods", "--subresource=binding", "-n", &t.name])?,
        "binds pods"
    );
    ensure!(
        can(&["get", "secrets", "-n", &t.name])?,
        "reads a pod's Secret by name"
    );
    ensure!(
        can(&["list", "secrets", "-n", op_ns])?,
        "lists site credentials in its namespace"
    );
    ensure!(
        !can(&["list", "secrets", "-n", &t.name])?,
        "must not list Secrets outside its namespace"
    );
    ensure!(
        !can(&["create", "deployments", "-n", &t.name])?,
        "must not create Deployments"
    );
    ensure!(!can(&["delete", "namespaces"])?, "must not delete namespaces");
    ensure!(!can(&["update", "clusterroles"])?, "must not change RBAC");

    let op = Operator::start_as(t.cluster, op_ns, &kubeconfig, &[]).await?;
    let work = t.cluster.dir.join(format!("sim-{}", t.name));
    let sim = SimHandle::start(SimConfig {
        work_dir: work.clone(),
        token: Some("chart-token".into()),
        ..SimConfig::default()
    })
    .await?;
    let pp = PostParams::default();
    // Site credentials in the operator's namespace (the chart's Role).
    let op_secrets: Api<Secret> = Api::namespaced(t.client.clone(), op_ns);
    op_secrets
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"name": "site-token"}, "stringData": {"token": "chart-token"}}),
            )?,
        )
        .await?;
    let sites: Api<OffloadSite> = Api::all(t.client.clone());
    let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
    let site_name = format!("{}-site", t.name);
    let policy_name = format!("{}-policy", t.name);
    sites
        .create(
            &pp,
            &serde_json::from_value(json!({
                "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
                "metadata": {"name": site_name, "labels": {TEST_LABEL: op_ns}},
                "spec": {"endpoint": sim.url, "namespaceSelector": {}, "statusSyncIntervalSeconds": 1,
                    "auth": {"bearerToken": {"name": "site-token", "key": "token"}},
                    "capacity": {"cpu": "100", "memory": "1Ti", "pods": 100},
                    "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}}
            }))?,
        )
        .await?;
    policies
        .create(
            &pp,
            &serde_json::from_value(json!({
                "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy",
                "metadata": {"name": policy_name, "labels": {TEST_LABEL: op_ns}},
                "spec": {"priority": 10}
            }))?,
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    let result = async {
        wait::until(&format!("{site_name} Ready"), TIMEOUT, || async {
            let s = sites.get(&site_name).await?;
            let ready = s.status.map(|st| st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok::<_, kube::Error>(ready.unwrap_or(false).then_some(()))
        })
        .await?;
        t.default_service_account().await?;
        let cms: Api<ConfigMap> = Api::namespaced(t.client.clone(), &t.name);
        cms.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hi "}}))?)
            .await?;
        let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.name);
        secrets
            .create(&pp, &serde_json::from_value(json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}}))?)
            .await?;
        let sa_dir = "$SITESIM_ROOT/var/run/secrets/kubernetes.io/serviceaccount";
        let script = format!(
            "cat $SITESIM_ROOT/etc/cfg/greeting $SITESIM_ROOT/etc/creds/password; test -s {sa_dir}/token && echo ' token'"
        );
        pods.create(&pp, &serde_json::from_value(json!({
            "metadata": {"name": "job", "annotations": {"offload.dev/policy": policy_name}},
            "spec": {"schedulerName": "offload-scheduler", "restartPolicy": "Never",
                "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "creds", "secret": {"secretName": "creds"}}],
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "creds", "mountPath": "/etc/creds"}]}]}
        }))?)
        .await?;
        let done = wait::until("pod job Succeeded", TIMEOUT, || async {
            let p = pods.get("job").await.map_err(|e| e.to_string())?;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            match phase.as_str() {
                "Succeeded" => Ok(Some(p)),
                "Failed" => Ok(Some(p)),
                other => Err(format!("phase {other:?}, node {:?}", p.spec.as_ref().and_then(|s| s.node_name.clone()))),
            }
        })
        .await?;
        let phase = done.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        ensure!(phase == "Succeeded", "pod failed: {:?}", done.status);
        ensure!(
            done.spec.as_ref().and_then(|s| s.node_name.clone()) == Some(format!("offload-{site_name}")),
            "placed on the site's node: {:?}",
            done.spec.as_ref().map(|s| &s.node_name)
        );
        let out = std::fs::read_to_string(work.join(done.uid().context("uid")?).join("main.log"))?;
        ensure!(out == "hi s3cr3t token\n", "{out:?}");
        ensure!(sim.stats().unauthorized == 0, "the site token from the operator's namespace was used");
        let log = std::fs::read_to_string(&op.log)?;
        let denied: Vec<&str> = log.lines().filter(|l| l.contains("forbidden") || l.contains("Forbidden")).collect();
        ensure!(denied.is_empty(), "the operator was refused:\n{}", denied.join("\n"));
        Ok(())
    }
    .await;
    for p in pods.list(&ListParams::default()).await?.items {
        let _ = pods.delete(&p.name_any(), &DeleteParams::default()).await;
    }
    let _ = policies.delete(&policy_name, &DeleteParams::default()).await;
    let _ = sites.delete(&site_name, &DeleteParams::default()).await;
    wait::until("site gone", TIMEOUT, || async {
        Ok::<_, kube::Error>(sites.get_opt(&site_name).await?.is_none().then_some(()))
    })
    .await?;
    result.map_err(|e| anyhow!("{e:#}\n{}", op.log_tail(60)))
}
