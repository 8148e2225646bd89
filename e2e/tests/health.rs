//! `/readyz` and `/healthz` of the real operator binary tell the truth about its watches: an
//! operator whose identity may not watch one of its kinds is not ready and says which watch and
//! why, stays live (a restart would not fix RBAC), and becomes ready without a restart once it is
//! granted the right.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding},
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    operator::{Operator, install_rbac},
    wait,
};
use serde_json::json;

/// Long enough for a watch to fail for 30 s and for kube's watcher backoff (at most 30 s, with
/// jitter) to retry after the grant.
const TIMEOUT: Duration = Duration::from_secs(150);

#[tokio::test]
async fn an_operator_that_may_not_watch_remote_jobs_is_not_ready_and_says_why() {
    TestNamespace::run("health-rbac", |t| async move {
        // The operator's rules, as the e2e RBAC (the chart's) grants them, minus RemoteJobs.
        install_rbac(t.cluster, &t.name)?;
        let roles: Api<ClusterRole> = Api::all(t.client.clone());
        let rules: Vec<_> = roles
            .get("offload-operator")
            .await?
            .rules
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !r.resources.iter().flatten().any(|x| x == "remotejobs"))
            .collect();
        let sa = "partial";
        let pp = PostParams::default();
        Api::<ServiceAccount>::namespaced(t.client.clone(), &t.name)
            .create(&pp, &serde_json::from_value(json!({"metadata": {"name": sa}}))?)
            .await?;
        let subject = json!([{"kind": "ServiceAccount", "name": sa, "namespace": t.name}]);
        let partial = format!("{}-partial", t.name);
        let remote_jobs = format!("{}-remotejobs", t.name);
        roles
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": partial}, "rules": rules}))?,
            )
            .await?;
        let bindings: Api<ClusterRoleBinding> = Api::all(t.client.clone());
        bindings
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": partial}, "subjects": subject,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": partial}}))?,
            )
            .await?;
        // The namespaced Roles the e2e RBAC installs: node leases, and credentials here.
        let leases: Api<RoleBinding> = Api::namespaced(t.client.clone(), "kube-node-lease");
        let local: Api<RoleBinding> = Api::namespaced(t.client.clone(), &t.name);
        for (api, role) in [
            (&leases, "offload-operator-leases"),
            (&local, "offload-operator-credentials"),
        ] {
            api.create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": partial}, "subjects": subject,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}}))?,
            )
            .await?;
        }
        let kubeconfig = t.cluster.service_account_kubeconfig(&t.name, sa)?;

        let result = async {
            let op = Operator::launch_as(t.cluster, &t.name, &kubeconfig, &[]).await?;
            let body = wait::until("/readyz to name the RemoteJob watch", TIMEOUT, || async {
                let (code, body) = op.probe("/readyz").await.map_err(|e| e.to_string())?;
                if code == 503 && body.contains("watch RemoteJob failing for") {
                    Ok(Some(body))
                } else {
                    Err(format!("{code} {body}"))
                }
            })
            .await?;
            ensure!(body.contains("forbidden"), "the API server's refusal is named: {body}");
            ensure!(
                !body.contains("watch OffloadSite") && !body.contains("watch Pod"),
                "only the refused watch is named: {body}"
            );
            let (code, live) = op.probe("/healthz").await?;
            ensure!(code == 200, "a refused watch is no reason to restart: {code} {live}");

            roles
                .create(
                    &pp,
                    &serde_json::from_value(json!({"metadata": {"name": remote_jobs},
                    "rules": [{"apiGroups": ["offload.dev"], "resources": ["remotejobs"],
                               "verbs": ["get", "list", "watch", "delete"]}]}))?,
                )
                .await?;
            bindings
                .create(
                    &pp,
                    &serde_json::from_value(json!({"metadata": {"name": remote_jobs}, "subjects": subject,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": remote_jobs}}))?,
                )
                .await?;
            wait::until("/readyz 200 once granted, without a restart", TIMEOUT, || async {
                let (code, body) = op.probe("/readyz").await.map_err(|e| e.to_string())?;
                if code == 200 { Ok(Some(())) } else { Err(format!("{code} {body}")) }
            })
            .await?;
            let logged = std::fs::read_to_string(&op.log)?;
            ensure!(
                logged.contains("watch failed; retrying with backoff"),
                "the refusal is in the log too"
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        // Cluster-scoped objects do not go with the namespace.
        let dp = DeleteParams::default();
        for name in [&partial, &remote_jobs] {
            let _ = bindings.delete(name, &dp).await;
            let _ = roles.delete(name, &dp).await;
        }
        let _ = leases.delete(&partial, &dp).await;
        result
    })
    .await;
}
