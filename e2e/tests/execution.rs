//! The kubelet role: pods bound to a site's virtual Node run at the (simulated) site and their
//! status follows it. Real control plane, real operator binary, simulators over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    fixtures::{delete_sites, site, wait_site_ready},
    operator::Operator,
    sitesim::{SimConfig, SimHandle, faults},
    wait,
};
use offload_operator::crd::OffloadSite;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A pod bound straight to the site's node (as kube-scheduler binds interLink-style pods).
fn pod(name: &str, site: &str, script: &str, extra_spec: Value) -> anyhow::Result<Pod> {
    let mut spec = json!({"nodeName": format!("offload-{site}"), "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]});
    spec.as_object_mut()
        .context("spec")?
        .extend(extra_spec.as_object().cloned().unwrap_or_default());
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": spec}),
    )?)
}

async fn phase(pods: &Api<Pod>, name: &str, want: &str) -> anyhow::Result<Pod> {
    wait::until(&format!("pod {name} {want}"), TIMEOUT, || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let ph = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if ph == want {
            return Ok(Some(p));
        }
        // Shown on timeout: where the pod is stuck.
        let c = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .map(|c| format!("{:?}", c[0].state));
        Err(format!("phase {ph:?}, container {c:?}"))
    })
    .await
}

fn exit_code(p: &Pod) -> Option<i32> {
    p.status.as_ref()?.container_statuses.as_ref()?[0]
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

#[tokio::test]
async fn pods_run_at_the_site_and_report_back() {
    TestNamespace::run("exec-run", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let work = t.cluster.dir.join(format!("sim-{}", t.name));
        let sim = SimHandle::start(SimConfig { work_dir: work.clone(), ..SimConfig::default() }).await?;
        let closed = SimHandle::start(SimConfig::default()).await?;
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let (open_site, closed_site) = (format!("{}-site", t.name), format!("{}-closed", t.name));
        sites.create(&PostParams::default(), &site(&t.name, &open_site, &sim.url, json!({}))?).await?;
        let other_tenants = json!({"namespaceSelector": {"matchLabels": {"tenant": "someone-else"}}});
        sites.create(&PostParams::default(), &site(&t.name, &closed_site, &closed.url, other_tenants)?).await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        t.default_service_account().await?;
        let pp = PostParams::default();
        let result = async {
            wait_site_ready(&sites, &open_site).await?;
            wait_site_ready(&sites, &closed_site).await?;
            // Success and failure with exit codes.
            pods.create(&pp, &pod("ok", &open_site, "echo hello from the site", json!({}))?).await?;
            pods.create(&pp, &pod("three", &open_site, "echo failing; exit 3", json!({}))?).await?;
            let ok = phase(&pods, "ok", "Succeeded").await?;
            ensure!(exit_code(&ok) == Some(0));
            ensure!(ok.annotations().contains_key("offload.dev/remote-id"), "remote id recorded");
            let three = phase(&pods, "three", "Failed").await?;
            ensure!(exit_code(&three) == Some(3), "{:?}", three.status);
            let uid = ok.uid().context("uid")?;
            let out = std::fs::read_to_string(work.join(&uid).join("main.log"))?;
            ensure!(out == "hello from the site\n", "{out:?}");

            // Deleting finished pods deletes them at the site too: it keeps no job of theirs.
            let (held, deletes) = (sim.pod_count(), sim.stats().deletes);
            for name in ["ok", "three"] {
                pods.delete(name, &DeleteParams::default()).await?;
            }
            wait::until("the finished pods to disappear", TIMEOUT, || async {
                let left = pods.get_opt("ok").await?.is_some() || pods.get_opt("three").await?.is_some();
                Ok::<_, kube::Error>((!left).then_some(()))
            })
            .await?;
            wait::until("the site to forget the finished pods", TIMEOUT, || async {
                let left = sim.pod_count();
                if left == held - 2 {
                    Ok(Some(()))
                } else {
                    Err(format!("{left} of {held} left, {} deletes", sim.stats().deletes - deletes))
                }
            })
            .await?;
            ensure!(sim.stats().deletes == deletes + 2, "one delete each: {}", sim.stats().deletes - deletes);

            // A create the site performed but answered with garbage: the pod runs, created once.
            sim.inject(faults::Fault { op: "create".into(), kind: faults::FaultKind::Garbage, count: 1 });
            pods.create(&pp, &pod("garbled", &open_site, "echo garbled answer", json!({}))?).await?;
            let g = phase(&pods, "garbled", "Succeeded").await?;
            let creates = sim.stats().creates_per_uid.get(&g.uid().context("uid")?).copied();
            ensure!(creates == Some(1), "created {creates:?} times");
            ensure!(g.annotations().contains_key("offload.dev/remote-id"), "remote id recorded");

            // ConfigMap and Secret contents reach the command.
            let cms: Api<ConfigMap> = Api::namespaced(t.client.clone(), &t.name);
            cms.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hi"}}))?).await?;
            let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.name);
            secrets.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}}))?).await?;
            let mounts = json!({
                "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "creds", "secret": {"secretName": "creds"}}],
                "containers": [{"name": "main", "image": "busybox",
                    "command": ["sh", "-c", "cat $SITESIM_ROOT/etc/cfg/greeting $SITESIM_ROOT/etc/creds/password"],
                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "creds", "mountPath": "/etc/creds"}]}]});
            pods.create(&pp, &pod("mounts", &open_site, "", mounts)?).await?;
            let m = phase(&pods, "mounts", "Succeeded").await?;
            let out = std::fs::read_to_string(work.join(m.uid().context("uid")?).join("main.log"))?;
            ensure!(out == "his3cr3t", "{out:?}");

            // The projected service-account volume every pod gets (token, ca.crt, namespace).
            let sa_dir = "$SITESIM_ROOT/var/run/secrets/kubernetes.io/serviceaccount";
            let script = format!("test -s {sa_dir}/token && grep -q 'BEGIN CERTIFICATE' {sa_dir}/ca.crt && cat {sa_dir}/namespace");
            pods.create(&pp, &pod("sa-token", &open_site, &script, json!({}))?).await?;
            let sa = phase(&pods, "sa-token", "Succeeded").await?;
            let out = std::fs::read_to_string(work.join(sa.uid().context("uid")?).join("main.log"))?;
            ensure!(out == t.name, "{out:?}");

            // A site the namespace may not use receives nothing.
            pods.create(&pp, &pod("forbidden", &closed_site, "echo never", json!({"volumes": [{"name": "creds", "secret": {"secretName": "creds"}}]}))?).await?;
            let f = phase(&pods, "forbidden", "Failed").await?;
            let reason = f.status.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
            ensure!(reason == "NamespaceNotAllowed", "{reason}");
            ensure!(closed.stats().creates_per_uid.is_empty(), "nothing was sent: {:?}", closed.stats());

            // Deleting a running pod stops it at the site, then the pod disappears.
            pods.create(&pp, &pod("sleeper", &open_site, "sleep 300", json!({}))?).await?;
            phase(&pods, "sleeper", "Running").await?;
            let before = sim.pod_count();
            pods.delete("sleeper", &DeleteParams::default()).await?;
            wait::until("the pod to disappear", TIMEOUT, || async { Ok::<_, kube::Error>(pods.get_opt("sleeper").await?.is_none().then_some(())) }).await?;
            ensure!(sim.pod_count() == before - 1, "the site forgot it");
            ensure!(sim.stats().deletes >= 1);

            // A create the site refuses with a text body fails the pod with that text.
            sim.inject(faults::status("create", 500, "HTTP InterLink session x: call exit status: 500. Body: sbatch: error: invalid partition"));
            pods.create(&pp, &pod("refused", &open_site, "echo never", json!({}))?).await?;
            let r = phase(&pods, "refused", "Failed").await?;
            let msg = r.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            ensure!(msg.contains("invalid partition"), "{msg}");

            // A site refusing connections for a while: the pod waits, then runs.
            sim.go_down(Duration::from_secs(4));
            tokio::time::sleep(Duration::from_millis(300)).await;
            pods.create(&pp, &pod("patient", &open_site, "echo made it", json!({}))?).await?;
            let p = phase(&pods, "patient", "Succeeded").await?;
            ensure!(exit_code(&p) == Some(0));
            Ok(())
        }
        .await;
        delete_sites(&t, &sites, &[&open_site, &closed_site]).await?;
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))
    })
    .await;
}

#[tokio::test]
async fn status_is_synced_in_one_request_per_site_and_interval() {
    TestNamespace::run("exec-batch", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let sim = SimHandle::start(SimConfig {
            simulate: true,
            slots: 1000,
            ..SimConfig::default()
        })
        .await?;
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let name = format!("{}-big", t.name);
        sites
            .create(
                &PostParams::default(),
                &site(&t.name, &name, &sim.url, json!({}))?,
            )
            .await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        t.default_service_account().await?;
        let result = async {
            wait_site_ready(&sites, &name).await?;
            for i in 0..200 {
                let mut p = pod(&format!("p{i}"), &name, "", json!({}))?;
                p.metadata.annotations = Some(
                    [(
                        "sitesim.offload.dev/duration-seconds".to_string(),
                        "600".to_string(),
                    )]
                    .into(),
                );
                pods.create(&PostParams::default(), &p).await?;
            }
            wait::until("200 running pods", Duration::from_secs(180), || async {
                let l = pods.list(&ListParams::default()).await?;
                let running = l
                    .items
                    .iter()
                    .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                    .count();
                Ok::<_, kube::Error>((running == 200).then_some(()))
            })
            .await?;
            let stats = sim.stats();
            ensure!(
                stats.creates_per_uid.len() == 200 && stats.creates_per_uid.values().all(|n| *n == 1),
                "created once each"
            );
            // Over a quiet window: about one status request per second, each for all 200 pods, and
            // no pod status rewritten.
            let before_list = pods.list(&ListParams::default()).await?.items;
            let rv: Vec<String> = before_list
                .iter()
                .map(|p| p.resource_version().unwrap_or_default())
                .collect();
            let before = sim.stats().status_requests;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let requests = sim.stats().status_requests - before;
            // At most one per interval (a loaded machine may skip one), never one per pod.
            ensure!(
                (1..=7).contains(&requests),
                "{requests} status requests in 5 s at a 1 s interval"
            );
            ensure!(sim.stats().max_pods_per_status >= 200, "{:?}", sim.stats());
            let after_list = pods.list(&ListParams::default()).await?.items;
            let rv2: Vec<String> = after_list
                .iter()
                .map(|p| p.resource_version().unwrap_or_default())
                .collect();
            // Which pods were written, and what changed in them (for the diagnosis).
            let rewritten: Vec<String> = before_list
                .iter()
                .zip(&after_list)
                .filter(|(a, b)| a.resource_version() != b.resource_version())
                .map(|(a, b)| {
                    let fields = |p: &Pod| {
                        p.metadata
                            .managed_fields
                            .iter()
                            .flatten()
                            .map(|m| {
                                format!(
                                    "{:?}/{:?}@{:?}",
                                    m.manager,
                                    m.subresource,
                                    m.time.as_ref().map(|t| t.0.to_string())
                                )
                            })
                            .collect::<Vec<_>>()
                    };
                    format!(
                        "{}: status {} -> {}; managers {:?}",
                        a.name_any(),
                        serde_json::to_string(&a.status).unwrap_or_default(),
                        serde_json::to_string(&b.status).unwrap_or_default(),
                        fields(b)
                    )
                })
                .collect();
            ensure!(
                rv == rv2,
                "{} unchanged pods were patched; first: {:?}",
                rewritten.len(),
                rewritten.first()
            );
            let metrics = op.get("/metrics").await?;
            ensure!(
                metrics.contains(&format!("offload_pods{{phase=\"Running\",site=\"{name}\"}} 200")),
                "{metrics}"
            );
            ensure!(metrics.contains(&format!(
                "offload_status_sync_last_success_timestamp_seconds{{site=\"{name}\"}}"
            )));
            Ok(())
        }
        .await;
        delete_sites(&t, &sites, &[&name]).await?;
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))
    })
    .await;
}

/// The operator is killed (SIGKILL) in the middle of a burst of 100 pods over two sites and
/// restarted: every pod completes, each created at its site exactly once.
#[tokio::test]
async fn a_killed_operator_resumes_without_duplicates() {
    TestNamespace::run("exec-restart", |t| async move {
        let mut op = Operator::start(t.cluster, &t.name).await?;
        let (a, b) = (
            // Every answer takes 300 ms, so creates are still in flight when the operator dies.
            SimHandle::start(SimConfig {
                simulate: true,
                slots: 1000,
                latency: Duration::from_millis(300),
                ..SimConfig::default()
            })
            .await?,
            // Answers as interLink with its SLURM plugin: a new pod shows up in /status only
            // seconds later, so a create cut short by the kill must not be sent again blindly.
            SimHandle::start(SimConfig {
                simulate: true,
                slots: 1000,
                slurm_plugin: true,
                ..SimConfig::default()
            })
            .await?,
        );
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let (sa, sb) = (format!("{}-a", t.name), format!("{}-b", t.name));
        sites
            .create(&PostParams::default(), &site(&t.name, &sa, &a.url, json!({}))?)
            .await?;
        sites
            .create(&PostParams::default(), &site(&t.name, &sb, &b.url, json!({}))?)
            .await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        t.default_service_account().await?;
        let result = async {
            wait_site_ready(&sites, &sa).await?;
            wait_site_ready(&sites, &sb).await?;
            // Kill it in the middle of its work: once the sites have taken a few creates, while
            // pods are still being made and the rest are unsent or unanswered.
            let seen = || a.stats().creates_per_uid.len() + b.stats().creates_per_uid.len();
            let make = async {
                for i in 0..100 {
                    let target = if i % 2 == 0 { &sa } else { &sb };
                    let mut p = pod(&format!("burst-{i}"), target, "", json!({}))?;
                    p.metadata.annotations = Some(
                        [(
                            "sitesim.offload.dev/duration-seconds".to_string(),
                            "2".to_string(),
                        )]
                        .into(),
                    );
                    pods.create(&PostParams::default(), &p).await?;
                }
                Ok::<_, anyhow::Error>(())
            };
            let kill = async {
                while seen() < 5 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                op.kill().await;
                seen()
            };
            let (made, at_kill) = tokio::join!(make, kill);
            made?;
            let logged = std::fs::read_to_string(&op.log)
                .unwrap_or_default()
                .matches("created at the site")
                .count();
            eprintln!(
                "killed with {at_kill}/100 pods at the sites, {logged} creates recorded in the operator's log"
            );
            ensure!(
                at_kill < 100,
                "every pod was created before the kill: the restart would prove nothing"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            op = Operator::start(t.cluster, &t.name).await?;
            wait::until("100 succeeded pods", Duration::from_secs(240), || async {
                let l = pods
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let done = l
                    .items
                    .iter()
                    .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
                    .count();
                if done == 100 {
                    Ok(Some(()))
                } else {
                    Err(format!("{done}/100 succeeded"))
                }
            })
            .await?;
            offload_e2e::sitesim::exactly_once(&[a.stats(), b.stats()], 100)?;
            Ok(())
        }
        .await;
        delete_sites(&t, &sites, &[&sa, &sb]).await?;
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))
    })
    .await;
}

/// An interLink-style pod (nodeSelector for the site's node, tolerations for its taints, the
/// default scheduler) is bound by kube-scheduler and runs to completion like any other.
#[tokio::test]
async fn an_interlink_style_pod_runs_to_completion() {
    TestNamespace::run("exec-interlink", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let sim = SimHandle::start(SimConfig::default()).await?;
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let name = format!("{}-vk", t.name);
        sites.create(&PostParams::default(), &site(&t.name, &name, &sim.url, json!({}))?).await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        t.default_service_account().await?;
        let result = async {
            wait_site_ready(&sites, &name).await?;
            let p: Pod = serde_json::from_value(json!({
                "metadata": {"name": "interlink-style"},
                "spec": {"restartPolicy": "Never", "nodeSelector": {"offload.dev/site": name},
                    "tolerations": [{"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"},
                                    {"key": "offload.dev/site", "operator": "Equal", "value": name, "effect": "NoSchedule"}],
                    "containers": [{"name": "hello", "image": "busybox", "command": ["sh", "-c", "echo hello"],
                                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
            }))?;
            pods.create(&PostParams::default(), &p).await?;
            let done = phase(&pods, "interlink-style", "Succeeded").await?;
            let node = done.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            ensure!(node == format!("offload-{name}"), "bound by kube-scheduler to {node}");
            ensure!(exit_code(&done) == Some(0));
            Ok(())
        }
        .await;
        delete_sites(&t, &sites, &[&name]).await?;
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))
    })
    .await;
}

async fn kubectl_logs(t: &TestNamespace, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(t.cluster.kubectl());
    let out = cmd.args(["logs", "-n", &t.name]).args(args).output().await?;
    ensure!(
        out.status.success(),
        "kubectl logs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl logs` (with `--tail` and `-f`) through the API server to the operator's kubelet
/// endpoint; an anonymous request to that endpoint is refused.
#[tokio::test]
async fn kubectl_logs_reach_the_site() {
    TestNamespace::run("exec-logs", |t| async move {
        ensure!(
            t.cluster.kubelet_tls.is_some(),
            "the control plane has no kubelet client certificate"
        );
        let op = Operator::start(t.cluster, &t.name).await?;
        let sim = SimHandle::start(SimConfig::default()).await?;
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let name = format!("{}-logs", t.name);
        sites
            .create(
                &PostParams::default(),
                &site(&t.name, &name, &sim.url, json!({}))?,
            )
            .await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        t.default_service_account().await?;
        let result = async {
            wait_site_ready(&sites, &name).await?;
            pods.create(
                &PostParams::default(),
                &pod("done", &name, "echo one; echo two; echo three", json!({}))?,
            )
            .await?;
            phase(&pods, "done", "Succeeded").await?;
            ensure!(kubectl_logs(&t, &["done"]).await? == "one\ntwo\nthree\n");
            ensure!(kubectl_logs(&t, &["done", "--tail=1"]).await? == "three\n");
            ensure!(kubectl_logs(&t, &["done", "-c", "main", "--limit-bytes=3"]).await? == "one");
            // Follow a running pod until it ends.
            let script = "for i in 1 2 3; do echo tick $i; sleep 1; done";
            pods.create(&PostParams::default(), &pod("ticking", &name, script, json!({}))?)
                .await?;
            phase(&pods, "ticking", "Running").await?;
            let followed =
                tokio::time::timeout(Duration::from_secs(60), kubectl_logs(&t, &["-f", "ticking"])).await??;
            ensure!(followed == "tick 1\ntick 2\ntick 3\n", "{followed:?}");
            // No client certificate: refused during the handshake.
            let url = format!(
                "https://127.0.0.1:{}/containerLogs/{}/done/main",
                op.kubelet_port, t.name
            );
            let anon = tokio::process::Command::new("curl")
                .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &url])
                .output()
                .await?;
            ensure!(
                !anon.status.success(),
                "anonymous request served: {}",
                String::from_utf8_lossy(&anon.stdout)
            );
            Ok(())
        }
        .await;
        delete_sites(&t, &sites, &[&name]).await?;
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(60)))
    })
    .await;
}
