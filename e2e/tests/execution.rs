//! The kubelet role: pods bound to a site's virtual Node run at the (simulated) site and their
//! status follows it. Real control plane, real operator binary, simulators over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    fixtures::{pod_builder, site_builder, wait_site_ready},
    scenario::Scenario,
    sitesim::{SimConfig, faults},
    wait,
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

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
    Scenario::run("exec-run", |s| async move {
        // Both simulators run the pods' scripts for real (not simulated): the pods' duration
        // annotation is not looked at.
        let work = s.t.cluster.dir.join(format!("sim-{}", s.t.name));
        let sim = s
            .sim(SimConfig {
                work_dir: work.clone(),
                ..SimConfig::default()
            })
            .await?;
        let closed = s.sim(SimConfig::default()).await?;
        let open_site = s.create_site(&site_builder("site"), &sim.url).await?;
        let closed_site = s
            .create_site(
                &site_builder("closed").tenants(&[("tenant", "someone-else")]),
                &closed.url,
            )
            .await?;
        wait_site_ready(&s.sites, &open_site).await?;
        wait_site_ready(&s.sites, &closed_site).await?;
        let pp = PostParams::default();
        // A pod bound straight to the site's node (as kube-scheduler binds interLink-style pods).
        let pod = |name: &str, script: &str| pod_builder(name).on_node(&open_site).script(script);
        // Success and failure with exit codes.
        s.pods.create(&pp, &pod("ok", "echo hello from the site").build()?).await?;
        s.pods.create(&pp, &pod("three", "echo failing; exit 3").build()?).await?;
        let ok = s.phase("ok", "Succeeded", TIMEOUT).await?;
        ensure!(exit_code(&ok) == Some(0));
        ensure!(ok.annotations().contains_key("offload.dev/remote-id"), "remote id recorded");
        let three = s.phase("three", "Failed", TIMEOUT).await?;
        ensure!(exit_code(&three) == Some(3), "{:?}", three.status);
        let uid = ok.uid().context("uid")?;
        let out = std::fs::read_to_string(work.join(&uid).join("main.log"))?;
        ensure!(out == "hello from the site\n", "{out:?}");

        // Deleting finished pods deletes them at the site too: it keeps no job of theirs.
        let (held, deletes) = (sim.pod_count(), sim.stats().deletes);
        for name in ["ok", "three"] {
            s.pods.delete(name, &DeleteParams::default()).await?;
        }
        wait::until("the finished pods to disappear", TIMEOUT, || async {
            let left = s.pods.get_opt("ok").await?.is_some() || s.pods.get_opt("three").await?.is_some();
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
        s.pods.create(&pp, &pod("garbled", "echo garbled answer").build()?).await?;
        let g = s.phase("garbled", "Succeeded", TIMEOUT).await?;
        let creates = sim.stats().creates_per_uid.get(&g.uid().context("uid")?).copied();
        ensure!(creates == Some(1), "created {creates:?} times");
        ensure!(g.annotations().contains_key("offload.dev/remote-id"), "remote id recorded");

        // ConfigMap and Secret contents reach the command.
        let cms: Api<ConfigMap> = Api::namespaced(s.t.client.clone(), &s.t.name);
        cms.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hi"}}))?).await?;
        let secrets: Api<Secret> = Api::namespaced(s.t.client.clone(), &s.t.name);
        secrets.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}}))?).await?;
        let mounts = json!({
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "creds", "secret": {"secretName": "creds"}}],
            "containers": [{"name": "main", "image": "busybox",
                "command": ["sh", "-c", "cat $SITESIM_ROOT/etc/cfg/greeting $SITESIM_ROOT/etc/creds/password"],
                "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "creds", "mountPath": "/etc/creds"}]}]});
        s.pods.create(&pp, &pod_builder("mounts").on_node(&open_site).merge_spec(mounts).build()?).await?;
        let m = s.phase("mounts", "Succeeded", TIMEOUT).await?;
        let out = std::fs::read_to_string(work.join(m.uid().context("uid")?).join("main.log"))?;
        ensure!(out == "his3cr3t", "{out:?}");

        // The projected service-account volume every pod gets (token, ca.crt, namespace).
        let sa_dir = "$SITESIM_ROOT/var/run/secrets/kubernetes.io/serviceaccount";
        let script = format!("test -s {sa_dir}/token && grep -q 'BEGIN CERTIFICATE' {sa_dir}/ca.crt && cat {sa_dir}/namespace");
        s.pods.create(&pp, &pod("sa-token", &script).build()?).await?;
        let sa = s.phase("sa-token", "Succeeded", TIMEOUT).await?;
        let out = std::fs::read_to_string(work.join(sa.uid().context("uid")?).join("main.log"))?;
        ensure!(out == s.t.name, "{out:?}");

        // A site the namespace may not use receives nothing.
        let forbidden = pod_builder("forbidden")
            .on_node(&closed_site)
            .script("echo never")
            .merge_spec(json!({"volumes": [{"name": "creds", "secret": {"secretName": "creds"}}]}));
        s.pods.create(&pp, &forbidden.build()?).await?;
        let f = s.phase("forbidden", "Failed", TIMEOUT).await?;
        let reason = f.status.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
        ensure!(reason == "NamespaceNotAllowed", "{reason}");
        ensure!(closed.stats().creates_per_uid.is_empty(), "nothing was sent: {:?}", closed.stats());

        // Deleting a running pod stops it at the site, then the pod disappears.
        s.pods.create(&pp, &pod("sleeper", "sleep 300").build()?).await?;
        s.phase("sleeper", "Running", TIMEOUT).await?;
        let before = sim.pod_count();
        s.pods.delete("sleeper", &DeleteParams::default()).await?;
        wait::until("the pod to disappear", TIMEOUT, || async { Ok::<_, kube::Error>(s.pods.get_opt("sleeper").await?.is_none().then_some(())) }).await?;
        ensure!(sim.pod_count() == before - 1, "the site forgot it");
        ensure!(sim.stats().deletes >= 1);

        // A create the site refuses with a text body fails the pod with that text.
        sim.inject(faults::status("create", 500, "HTTP InterLink session x: call exit status: 500. Body: sbatch: error: invalid partition"));
        s.pods.create(&pp, &pod("refused", "echo never").build()?).await?;
        let r = s.phase("refused", "Failed", TIMEOUT).await?;
        let msg = r.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
        ensure!(msg.contains("invalid partition"), "{msg}");

        // A site refusing connections for a while: the pod waits, then runs.
        sim.go_down(Duration::from_secs(4));
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.pods.create(&pp, &pod("patient", "echo made it").build()?).await?;
        let p = s.phase("patient", "Succeeded", TIMEOUT).await?;
        ensure!(exit_code(&p) == Some(0));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_is_synced_in_one_request_per_site_and_interval() {
    Scenario::run("exec-batch", |s| async move {
        let sim = s
            .site_with(site_builder("big"), |c| {
                c.slots = 1000;
            })
            .await?;
        let name = s.name("big");
        for i in 0..200 {
            let p = pod_builder(&format!("p{i}"))
                .on_node(&name)
                .script("")
                .runs_for(600)
                .build()?;
            s.pods.create(&PostParams::default(), &p).await?;
        }
        wait::until("200 running pods", Duration::from_secs(180), || async {
            let l = s.pods.list(&ListParams::default()).await?;
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
        let before_list = s.pods.list(&ListParams::default()).await?.items;
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
        let after_list = s.pods.list(&ListParams::default()).await?.items;
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
        let metrics = s.operator_get("/metrics").await?;
        ensure!(
            metrics.contains(&format!("offload_pods{{phase=\"Running\",site=\"{name}\"}} 200")),
            "{metrics}"
        );
        ensure!(metrics.contains(&format!(
            "offload_status_sync_last_success_timestamp_seconds{{site=\"{name}\"}}"
        )));
        Ok(())
    })
    .await;
}

/// The operator is killed (SIGKILL) in the middle of a burst of 100 pods over two sites and
/// restarted: every pod completes, each created at its site exactly once.
#[tokio::test]
async fn a_killed_operator_resumes_without_duplicates() {
    Scenario::run("exec-restart", |s| async move {
        // Every answer takes 300 ms, so creates are still in flight when the operator dies.
        let a = s
            .sim(SimConfig {
                simulate: true,
                slots: 1000,
                latency: Duration::from_millis(300),
                ..SimConfig::default()
            })
            .await?;
        // Answers as interLink with its SLURM plugin: a new pod shows up in /status only
        // seconds later, so a create cut short by the kill must not be sent again blindly.
        let b = s
            .sim(SimConfig {
                simulate: true,
                slots: 1000,
                slurm_plugin: true,
                ..SimConfig::default()
            })
            .await?;
        let sa = s.create_site(&site_builder("a"), &a.url).await?;
        let sb = s.create_site(&site_builder("b"), &b.url).await?;
        wait_site_ready(&s.sites, &sa).await?;
        wait_site_ready(&s.sites, &sb).await?;
        // Kill it in the middle of its work: once the sites have taken a few creates, while
        // pods are still being made and the rest are unsent or unanswered.
        let seen = || a.stats().creates_per_uid.len() + b.stats().creates_per_uid.len();
        let make = async {
            for i in 0..100 {
                let target = if i % 2 == 0 { &sa } else { &sb };
                let p = pod_builder(&format!("burst-{i}"))
                    .on_node(target)
                    .script("")
                    .runs_for(2)
                    .build()?;
                s.pods.create(&PostParams::default(), &p).await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        let kill = async {
            while seen() < 5 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            s.stop_operator().await;
            seen()
        };
        let (made, at_kill) = tokio::join!(make, kill);
        made?;
        // The killed operator's log, read before a new operator replaces the file.
        let logged = s.operator_log().await.matches("created at the site").count();
        eprintln!(
            "killed with {at_kill}/100 pods at the sites, {logged} creates recorded in the operator's log"
        );
        ensure!(
            at_kill < 100,
            "every pod was created before the kill: the restart would prove nothing"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.start_operator().await?;
        wait::until("100 succeeded pods", Duration::from_secs(240), || async {
            let (done, _) = offload_e2e::burst::in_phase(&s.pods, "Succeeded").await?;
            if done == 100 {
                Ok(Some(()))
            } else {
                Err(format!("{done}/100 succeeded"))
            }
        })
        .await?;
        offload_e2e::sitesim::exactly_once(&[a.stats(), b.stats()], 100)?;
        Ok(())
    })
    .await;
}

/// An interLink-style pod (nodeSelector for the site's node, tolerations for its taints, the
/// default scheduler) is bound by kube-scheduler and runs to completion like any other.
#[tokio::test]
async fn an_interlink_style_pod_runs_to_completion() {
    Scenario::run("exec-interlink", |s| async move {
        s.site_with(site_builder("vk"), |c| {
            c.simulate = false;
        })
        .await?;
        let name = s.name("vk");
        // Written out in full: the pod under test is exactly what interLink users write (no
        // scheduler name, its own container name and requests), not a `pod_builder` pod.
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "interlink-style"},
            "spec": {"restartPolicy": "Never", "nodeSelector": {"offload.dev/site": name},
                "tolerations": [{"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"},
                                {"key": "offload.dev/site", "operator": "Equal", "value": name, "effect": "NoSchedule"}],
                "containers": [{"name": "hello", "image": "busybox", "command": ["sh", "-c", "echo hello"],
                                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
        }))?;
        s.pods.create(&PostParams::default(), &p).await?;
        let done = s.phase("interlink-style", "Succeeded", TIMEOUT).await?;
        let node = done.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        ensure!(node == format!("offload-{name}"), "bound by kube-scheduler to {node}");
        ensure!(exit_code(&done) == Some(0));
        Ok(())
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
    Scenario::run("exec-logs", |s| async move {
        ensure!(
            s.t.cluster.kubelet_tls.is_some(),
            "the control plane has no kubelet client certificate"
        );
        // The pods' scripts run for real: their output is what the logs show.
        s.site_with(site_builder("logs"), |c| {
            c.simulate = false;
        })
        .await?;
        let name = s.name("logs");
        let pod = |pod: &str, script: &str| pod_builder(pod).on_node(&name).script(script);
        s.pods
            .create(
                &PostParams::default(),
                &pod("done", "echo one; echo two; echo three").build()?,
            )
            .await?;
        s.phase("done", "Succeeded", TIMEOUT).await?;
        ensure!(kubectl_logs(&s.t, &["done"]).await? == "one\ntwo\nthree\n");
        ensure!(kubectl_logs(&s.t, &["done", "--tail=1"]).await? == "three\n");
        ensure!(kubectl_logs(&s.t, &["done", "-c", "main", "--limit-bytes=3"]).await? == "one");
        // Follow a running pod until it ends.
        let script = "for i in 1 2 3; do echo tick $i; sleep 1; done";
        s.pods
            .create(&PostParams::default(), &pod("ticking", script).build()?)
            .await?;
        s.phase("ticking", "Running", TIMEOUT).await?;
        let followed =
            tokio::time::timeout(Duration::from_secs(60), kubectl_logs(&s.t, &["-f", "ticking"])).await??;
        ensure!(followed == "tick 1\ntick 2\ntick 3\n", "{followed:?}");
        // No client certificate: refused during the handshake. The operator's kubelet port, as
        // its virtual Node advertises it (where the API server just reached it for the logs).
        let nodes: Api<Node> = Api::all(s.t.client.clone());
        let kubelet_port = nodes
            .get(&format!("offload-{name}"))
            .await?
            .status
            .and_then(|st| st.daemon_endpoints)
            .and_then(|d| d.kubelet_endpoint)
            .map(|e| e.port)
            .filter(|port| *port > 0)
            .context("the virtual Node's kubelet endpoint")?;
        let url = format!(
            "https://127.0.0.1:{kubelet_port}/containerLogs/{}/done/main",
            s.t.name
        );
        // Every caller is authenticated and authorised as a kubelet does it (SubjectAccessReview
        // for nodes/proxy on the pod's Node), not only the API server.
        let (ca, ca_key) = {
            let (_, _, ca) = s.t.cluster.kubelet_tls.as_ref().context("kubelet TLS")?;
            (ca.clone(), ca.with_file_name("ca.key"))
        };
        let pki = s.t.cluster.dir.join(format!("pki-{}", s.t.name));
        std::fs::create_dir_all(&pki)?;
        let get = |who: Caller| {
            let (url, ca) = (url.clone(), ca.clone());
            async move { kubelet_get(&url, &ca, who).await }
        };
        let (code, body) = get(Caller::Anonymous).await?;
        ensure!(code == 401, "anonymous: {code} {body}");
        // A certificate from the right CA, for a user without rights: refused, for logs as for
        // everything else.
        let intruder = client_certificate(&pki, &ca, &ca_key, &format!("intruder-{}", s.t.name))?;
        let (code, body) = get(Caller::Certificate(intruder.clone())).await?;
        ensure!(
            code == 403
                && body.contains("verb=get, resource=nodes, subresource(s)=[proxy]")
                && !body.contains("three"),
            "a certificate without rights: {code} {body}"
        );
        // The same user once RBAC grants nodes/proxy on that Node.
        let reader = format!("reader-{}", s.t.name);
        let reader_cert = client_certificate(&pki, &ca, &ca_key, &reader)?;
        let token_user = format!("system:serviceaccount:{}:default", s.t.name);
        let (code, _) = get(Caller::Token(service_account_token(&s.t).await?)).await?;
        ensure!(code == 403, "a service-account token without rights: {code}");
        grant_node_proxy(&s.t, &format!("offload-{name}"), &[&reader, &token_user]).await?;
        // RBAC reaches the API server's authorizer a moment after the write, and a denial is
        // cached for 30 s (as a kubelet caches it): both within the wait.
        wait::until(
            "a certificate with rights served",
            Duration::from_secs(45),
            || {
                let cert = reader_cert.clone();
                async move {
                    let (code, body) = get(Caller::Certificate(cert)).await.map_err(|e| e.to_string())?;
                    if code == 200 && body == "one\ntwo\nthree\n" {
                        Ok(Some(()))
                    } else {
                        Err(format!("{code} {body}"))
                    }
                }
            },
        )
        .await?;
        // A new token is a new caller (its credential id differs), so no cached denial applies.
        let token = service_account_token(&s.t).await?;
        wait::until("a token with rights served", Duration::from_secs(45), || {
            let token = token.clone();
            async move {
                let (code, body) = get(Caller::Token(token)).await.map_err(|e| e.to_string())?;
                if code == 200 && body.contains("three") {
                    Ok(Some(()))
                } else {
                    Err(format!("{code} {body}"))
                }
            }
        })
        .await?;
        Ok(())
    })
    .await;
}

/// `kubectl exec`, `attach` and `port-forward` to an offloaded pod end at once with the reason
/// (the kubelet endpoint answers 501 before any stream is set up), through the real API server
/// and kubectl; a user without `pods/exec` is refused by the API server itself.
#[tokio::test]
async fn kubectl_exec_attach_and_port_forward_say_why_they_are_unavailable() {
    Scenario::run("exec-unavailable", |s| async move {
        s.site_with(site_builder("interactive"), |c| {
            c.simulate = false;
        })
        .await?;
        let name = s.name("interactive");
        s.pods
            .create(
                &PostParams::default(),
                &pod_builder("sleeper")
                    .on_node(&name)
                    .script("sleep 120")
                    .build()?,
            )
            .await?;
        s.phase("sleeper", "Running", TIMEOUT).await?;
        let ns = s.t.name.clone();
        let cases: [(&str, Vec<&str>); 3] = [
            ("kubectl exec", vec!["exec", "-n", &ns, "sleeper", "--", "true"]),
            ("kubectl attach", vec!["attach", "-n", &ns, "sleeper"]),
            (
                "kubectl port-forward",
                vec!["port-forward", "-n", &ns, "pod/sleeper", ":8080"],
            ),
        ];
        for (what, args) in cases {
            let started = std::time::Instant::now();
            let out = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::process::Command::from(s.t.cluster.kubectl())
                    .args(&args)
                    .output(),
            )
            .await
            .with_context(|| format!("{what} hung"))??;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success(), "{what} succeeded: {stderr}");
            ensure!(
                stderr.contains(&format!("{what} is not available for pod {ns}/sleeper"))
                    && stderr.contains(&format!("site {name}")),
                "{what}: {stderr}"
            );
            eprintln!(
                "{what}: answered in {:.2}s: {}",
                started.elapsed().as_secs_f64(),
                stderr.trim()
            );
        }
        // The API server's own check comes first: a ServiceAccount that may read pods but not
        // exec into them is refused there, before the kubelet endpoint is asked.
        {
            use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
            let role: Role = serde_json::from_value(json!({"metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}))?;
            let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "pod-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]}))?;
            Api::<Role>::namespaced(s.t.client.clone(), &ns)
                .create(&PostParams::default(), &role)
                .await?;
            Api::<RoleBinding>::namespaced(s.t.client.clone(), &ns)
                .create(&PostParams::default(), &binding)
                .await?;
        }
        let kubeconfig = s.t.cluster.service_account_kubeconfig(&ns, "default")?;
        // The RoleBinding takes effect a moment after it is written.
        wait::until(
            "exec refused for want of pods/exec",
            Duration::from_secs(30),
            || async {
                let out = tokio::process::Command::new(s.t.cluster.bin.join("kubectl"))
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["exec", "-n", &ns, "sleeper", "--", "true"])
                    .output()
                    .await
                    .map_err(|e| e.to_string())?;
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                if !out.status.success() && stderr.contains("forbidden") && stderr.contains("pods/exec") {
                    Ok(Some(()))
                } else {
                    Err(format!("exec without pods/exec: {stderr}"))
                }
            },
        )
        .await?;
        Ok(())
    })
    .await;
}

/// Who calls the kubelet endpoint directly.
#[derive(Clone)]
enum Caller {
    Anonymous,
    /// Certificate and key files.
    Certificate((std::path::PathBuf, std::path::PathBuf)),
    /// A bearer token.
    Token(String),
}

/// `GET url` on the operator's kubelet endpoint as `who`: status code and body.
async fn kubelet_get(url: &str, ca: &std::path::Path, who: Caller) -> anyhow::Result<(u16, String)> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-s", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}"]);
    match &who {
        Caller::Anonymous => {}
        Caller::Certificate((crt, key)) => {
            cmd.arg("--cert").arg(crt).arg("--key").arg(key);
        }
        Caller::Token(t) => {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
    }
    let out = cmd.arg(url).output().await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// A client certificate for user `cn`, signed by the cluster's CA (as the API server's is).
fn client_certificate(
    dir: &std::path::Path,
    ca: &std::path::Path,
    ca_key: &std::path::Path,
    cn: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (key, csr, crt, ext) = (
        dir.join(format!("{cn}.key")),
        dir.join(format!("{cn}.csr")),
        dir.join(format!("{cn}.crt")),
        dir.join("client.ext"),
    );
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n")?;
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl").args(args).output()?;
        ensure!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let subj = format!("/CN={cn}");
    run(&[
        "req".as_ref(),
        "-newkey".as_ref(),
        "rsa:2048".as_ref(),
        "-nodes".as_ref(),
        "-keyout".as_ref(),
        key.as_os_str(),
        "-out".as_ref(),
        csr.as_os_str(),
        "-subj".as_ref(),
        subj.as_ref(),
    ])?;
    run(&[
        "x509".as_ref(),
        "-req".as_ref(),
        "-in".as_ref(),
        csr.as_os_str(),
        "-CA".as_ref(),
        ca.as_os_str(),
        "-CAkey".as_ref(),
        ca_key.as_os_str(),
        "-CAcreateserial".as_ref(),
        "-CAserial".as_ref(),
        dir.join("ca.srl").as_os_str(),
        "-out".as_ref(),
        crt.as_os_str(),
        "-days".as_ref(),
        "1".as_ref(),
        "-extfile".as_ref(),
        ext.as_os_str(),
    ])?;
    Ok((crt, key))
}

/// A fresh token of the namespace's default ServiceAccount.
async fn service_account_token(t: &TestNamespace) -> anyhow::Result<String> {
    let out = tokio::process::Command::from(t.cluster.kubectl())
        .args(["create", "token", "default", "-n", &t.name, "--duration=10m"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "kubectl create token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// RBAC: `get` on `nodes/proxy` of `node` for these users: a ClusterRole and its binding named
/// after the test's namespace (unique per run).
async fn grant_node_proxy(t: &TestNamespace, node: &str, users: &[&str]) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let name = format!("kubelet-reader-{}", t.name);
    let label = offload_e2e::operator::TEST_LABEL;
    let role: ClusterRole = serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {label: t.name}},
        "rules": [{"apiGroups": [""], "resources": ["nodes/proxy"], "resourceNames": [node], "verbs": ["get"]}]}))?;
    let subjects: Vec<_> = users
        .iter()
        .map(|u| {
            match u
                .strip_prefix("system:serviceaccount:")
                .and_then(|r| r.split_once(':'))
            {
                Some((ns, sa)) => json!({"kind": "ServiceAccount", "namespace": ns, "name": sa}),
                None => json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u}),
            }
        })
        .collect();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {label: t.name}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": subjects}))?;
    Api::<ClusterRole>::all(t.client.clone())
        .create(&PostParams::default(), &role)
        .await?;
    Api::<ClusterRoleBinding>::all(t.client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}
