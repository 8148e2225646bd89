//! The operator installed for real: the chart, with the image `make image` built, on a real node
//! (kubelet, containerd, runc, CNI, kube-proxy: `e2e/bin/node-up`) added to the e2e control plane.
//! Both replicas become Ready through their real probes, one leads; a pod is offloaded to a
//! simulated site on the host and completes; `kubectl logs` of it goes API server -> the leader
//! pod's kubelet API -> the site; `/metrics` answers through the chart's Service; `helm upgrade`
//! to changed values rolls both replicas and offloading goes on, each pod created once at the
//! site; a pod annotated `offload.dev/offload: "true"` is given the offload scheduler by the
//! chart's webhook, called by kube-apiserver through the Service; `helm uninstall` leaves nothing
//! behind but the CRDs.
//!
//! This binary holds only this test: it adds a node to the control plane the other test binaries
//! share (tainted, so no other test's pod lands there), and cargo runs test binaries one at a time.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Namespace, Node, Pod, Secret, Service, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, LogParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    cluster::repo_root,
    fixtures::{delete_sites, pod_builder, policy_builder, site_builder, wait_phase, wait_site_ready},
    helm,
    operator::http_get,
    real_node::{BUSYBOX_IMAGE, RealNode, busybox_image_archive, operator_image_archive, operator_image_ref},
    sitesim::{SimConfig, SimHandle, exactly_once},
    wait,
};
use offload_operator::crd::{OffloadPolicy, OffloadSite};
use serde_json::json;

const RELEASE: &str = "offload";
/// The chart's objects are named after this (`fullnameOverride`).
const FULLNAME: &str = "offload-e2e-incluster";
const INSTANCE: &str = "app.kubernetes.io/instance=offload";
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn the_chart_runs_the_operator_image_on_a_real_node() {
    TestNamespace::run("in-cluster", |t| async move {
        let cluster = t.cluster;
        let node = tokio::task::spawn_blocking(move || RealNode::up(cluster)).await??;
        let result = run(&t, &node).await;
        if result.is_err() {
            eprintln!("{}", operator_logs(&t));
            eprintln!("{}", node.log_tails(60));
            let _ = helm_cmd(&t, &["uninstall", RELEASE, "--wait", "--timeout", "60s"]);
        }
        let down = {
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.down()).await?
        };
        result?;
        down
    })
    .await;
}

async fn run(t: &TestNamespace, node: &RealNode) -> anyhow::Result<()> {
    let archive = operator_image_archive()?;
    node.import_image(&archive)?;
    eprintln!("imported {} into the node's containerd", archive.display());
    stage_tool_needs_nothing_from_the_image(t, node).await?;

    // The kubelet API's TLS: a certificate for the pod addresses, from the CA whose client
    // certificate kube-apiserver presents (the cluster's).
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.name);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("kubelet-tls".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    tls.data = Some(
        [
            ("tls.crt".to_string(), ByteString(read(&node.pod_serving.0)?)),
            ("tls.key".to_string(), ByteString(read(&node.pod_serving.1)?)),
            ("ca.crt".to_string(), ByteString(read(&node.cluster_ca)?)),
        ]
        .into(),
    );
    secrets.create(&PostParams::default(), &tls).await?;

    let values = t.cluster.dir.join("in-cluster-values.yaml");
    std::fs::write(
        &values,
        format!(
            "fullnameOverride: {FULLNAME}\n\
             image: {{pullPolicy: Never}}\n\
             tolerations: [{{key: {taint}, operator: Exists, effect: NoSchedule}}]\n\
             kubelet: {{tls: {{secretName: kubelet-tls}}}}\n\
             webhook: {{enabled: true}}\n\
             operator:\n  siteSelector: offload.dev/e2e-test={ns}\n  nodeLeaseRenewSeconds: 2\n  logFormat: text\n",
            taint = node.taint_key,
            ns = t.name
        ),
    )?;
    let values = values.to_string_lossy().into_owned();

    // Install: helm waits for the Deployment; both replicas must be Ready by their own probes.
    helm::binary()?; // built (once) before the clock starts
    let started = std::time::Instant::now();
    helm_cmd(
        t,
        &[
            "install",
            RELEASE,
            &chart(),
            "-f",
            &values,
            "--wait",
            "--timeout",
            "180s",
        ],
    )?;
    let first = replicas(t, node, None).await?;
    eprintln!(
        "helm install: both replicas Ready on {} after {:.1}s: {first:?}",
        node.name,
        started.elapsed().as_secs_f64()
    );
    let leader = one_leader(&first).await?;
    // Helm saw the API server serve both admission policy kinds: the chart installed them.
    for (kind, name) in [
        (
            "mutatingadmissionpolicy",
            format!("{FULLNAME}-outage-tolerations"),
        ),
        ("validatingadmissionpolicy", format!("{FULLNAME}-token-requests")),
    ] {
        let got = t.cluster.kubectl().args(["get", kind, &name]).output()?;
        ensure!(
            got.status.success(),
            "the chart did not install {kind} {name}: {}",
            String::from_utf8_lossy(&got.stderr)
        );
    }

    // /metrics through the chart's Service (its ClusterIP, kube-proxy's rules).
    let services: Api<Service> = Api::namespaced(t.client.clone(), &t.name);
    let ip = services
        .get(FULLNAME)
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service has no ClusterIP")?;
    // kube-proxy programs the ClusterIP a moment after the endpoints are ready; until then the
    // packet leaves by the bridge and finds no host ("No route to host"), as any client would see.
    wait::until(&format!("/metrics through the Service {ip}"), TIMEOUT, || async {
        let (code, body) = http_get(&format!("http://{ip}:8080/metrics"))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((code == 200 && body.contains("offload_leader ")).then_some(()))
    })
    .await?;

    // A site on the host (the node's bridge address: a pod cannot reach the host's loopback).
    let sim = SimHandle::start(SimConfig {
        listen: format!("{}:0", node.ip).parse()?,
        work_dir: t.cluster.dir.join(format!("sim-{}", t.name)),
        remove_work_dir: true,
        ..SimConfig::default()
    })
    .await?;
    let pp = PostParams::default();
    let sites: Api<OffloadSite> = Api::all(t.client.clone());
    let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
    let site = format!("{}-site", t.name);
    let policy = format!("{}-policy", t.name);
    sites
        .create(&pp, &site_builder("site").build(&t.name, &site, &sim.url)?)
        .await?;
    policies
        .create(&pp, &policy_builder("policy").build(&t.name, &policy)?)
        .await?;
    let result = offload_through_an_upgrade(t, node, &sim, &site, &policy, &leader, &values).await;
    let cleanup = delete_sites(t, &sites, &[&site]).await;
    let _ = policies.delete(&policy, &DeleteParams::default()).await;
    result?;
    cleanup?;

    uninstall_leaves_only_the_crds(t, &site).await
}

async fn offload_through_an_upgrade(
    t: &TestNamespace,
    node: &RealNode,
    sim: &SimHandle,
    site: &str,
    policy: &str,
    leader: &Replica,
    values: &str,
) -> anyhow::Result<()> {
    let sites: Api<OffloadSite> = Api::all(t.client.clone());
    wait_site_ready(&sites, site).await?;
    t.default_service_account().await?;
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    let virtual_node = format!("offload-{site}");
    wait_kubelet_address(t, &virtual_node, &leader.ip).await?;

    offload(&pods, policy, "before-upgrade").await?;

    // An upgrade to changed values rolls both replicas (maxSurge 1, maxUnavailable 0).
    let before: BTreeSet<String> = replicas(t, node, None)
        .await?
        .into_iter()
        .map(|r| r.name)
        .collect();
    let started = std::time::Instant::now();
    helm_cmd(
        t,
        &[
            "upgrade",
            RELEASE,
            &chart(),
            "-f",
            values,
            "--set",
            "operator.logFilter=info\\,offload_operator=debug",
            "--wait",
            "--timeout",
            "180s",
        ],
    )?;
    let after = replicas(t, node, Some(&before)).await?;
    eprintln!(
        "helm upgrade: both replicas replaced and Ready after {:.1}s: {after:?}",
        started.elapsed().as_secs_f64()
    );
    let leader = one_leader(&after).await?;
    // The new leader writes its own address into the virtual Node: logs follow it.
    wait_kubelet_address(t, &virtual_node, &leader.ip).await?;
    let deployments: Api<Deployment> = Api::namespaced(t.client.clone(), &t.name);
    let env = deployments
        .get(FULLNAME)
        .await?
        .spec
        .template
        .spec
        .and_then(|s| s.containers.first().and_then(|c| c.env.clone()))
        .unwrap_or_default();
    ensure!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("info,offload_operator=debug")),
        "the upgrade's value is not in the Deployment: {env:?}"
    );

    offload(&pods, policy, "after-upgrade").await?;
    through_the_webhook(t).await?;
    let first = pods.get("before-upgrade").await?;
    ensure!(
        first.status.and_then(|s| s.phase).as_deref() == Some("Succeeded"),
        "the pod that ran before the upgrade is no longer Succeeded"
    );
    exactly_once(&[sim.stats()], 3)?;
    Ok(())
}

/// Offloads pod `name` (it prints a line naming itself), waits until it succeeded, and reads its
/// log through the API server (`kubectl logs`): API server -> leader pod -> site.
async fn offload(pods: &Api<Pod>, policy: &str, name: &str) -> anyhow::Result<()> {
    let pod = pod_builder(name)
        .policy(policy)
        .cpu("100m")
        .script(&format!("echo offloaded {name} from a real operator pod"))
        .build()?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_phase(pods, name, "Succeeded", TIMEOUT).await?;
    let want = format!("offloaded {name} from a real operator pod");
    let log = wait::until(
        &format!("kubectl logs {name}"),
        Duration::from_secs(30),
        || async {
            let log = pods
                .logs(name, &LogParams::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(log.contains(&want).then_some(log))
        },
    )
    .await?;
    eprintln!("kubectl logs {name}: {}", log.trim());
    Ok(())
}

/// A pod annotated `offload.dev/offload: "true"`, with no scheduler name, in another namespace
/// (the chart never sends its own namespace to the webhook): kube-apiserver calls the webhook
/// through the chart's Service, the pod gets the offload scheduler and runs at the site.
async fn through_the_webhook(t: &TestNamespace) -> anyhow::Result<()> {
    let apps = format!("{}-apps", t.name);
    let namespaces: Api<Namespace> = Api::all(t.client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(apps.clone());
    namespaces.create(&PostParams::default(), &ns).await?;
    let result = async {
        let sas: Api<ServiceAccount> = Api::namespaced(t.client.clone(), &apps);
        wait::until("the default ServiceAccount", TIMEOUT, || async {
            sas.get_opt("default").await
        })
        .await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &apps);
        let pod = pod_builder("annotated")
            .without_scheduler()
            .annotate("offload.dev/offload", "true")
            .cpu("100m")
            .runs_for(1)
            .script("echo through the webhook")
            .build()?;
        // The API server reaches the webhook through the Service's ClusterIP: wait (dry-run
        // creates) until kube-proxy has programmed it; before that, failurePolicy Ignore admits
        // the pod unchanged.
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        wait::until("the webhook through the chart's Service", TIMEOUT, || async {
            let p = pods.create(&dry, &pod).await?;
            let scheduler = p.spec.and_then(|s| s.scheduler_name).unwrap_or_default();
            Ok::<_, kube::Error>((scheduler == "offload-scheduler").then_some(()))
        })
        .await?;
        let created = pods.create(&PostParams::default(), &pod).await?;
        let scheduler = created.spec.and_then(|s| s.scheduler_name).unwrap_or_default();
        ensure!(
            scheduler == "offload-scheduler",
            "not mutated through the chart's Service: {scheduler}"
        );
        wait_phase(&pods, "annotated", "Succeeded", TIMEOUT).await?;
        eprintln!(
            "webhook: an annotated pod in {apps} got the offload scheduler through the Service and succeeded"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    namespaces.delete(&apps, &DeleteParams::default()).await?;
    result
}

#[derive(Debug, Clone)]
struct Replica {
    name: String,
    ip: String,
}

/// The release's two operator pods once both are Ready on `node` (and, with `not`, none of them
/// is in `not`: the rollout replaced them all). Ready means their readiness probe passed.
async fn replicas(
    t: &TestNamespace,
    node: &RealNode,
    not: Option<&BTreeSet<String>>,
) -> anyhow::Result<Vec<Replica>> {
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    wait::until("two Ready operator replicas", TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels(INSTANCE))
            .await
            .map_err(|e| e.to_string())?;
        let live: Vec<&Pod> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let ready: Vec<Replica> = live
            .iter()
            .filter(|p| not.is_none_or(|n| !n.contains(&p.name_any())))
            .filter(|p| {
                let st = p.status.clone().unwrap_or_default();
                st.conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .filter_map(|p| {
                let ip = p.status.as_ref()?.pod_ip.clone()?;
                Some(Replica {
                    name: p.name_any(),
                    ip,
                })
            })
            .collect();
        if ready.len() == 2 && live.len() == 2 {
            for p in &live {
                let on = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                if on != node.name {
                    return Err(format!("{} runs on {on:?}, not {}", p.name_any(), node.name));
                }
            }
            return Ok(Some(ready));
        }
        Err(format!("{} live, {} Ready and new", live.len(), ready.len()))
    })
    .await
}

/// Exactly one replica's `/readyz` says `ok: leader`, the other `ok: standby` (their pod IPs,
/// straight from the host over the node's bridge).
async fn one_leader(replicas: &[Replica]) -> anyhow::Result<Replica> {
    wait::until("one leader and one standby", Duration::from_secs(60), || async {
        let mut roles = Vec::new();
        for r in replicas {
            let (code, body) = http_get(&format!("http://{}:8080/readyz", r.ip))
                .await
                .map_err(|e| e.to_string())?;
            roles.push((r.clone(), code, body.trim().to_string()));
        }
        let leaders: Vec<&Replica> = roles
            .iter()
            .filter(|(_, c, b)| *c == 200 && b.contains("leader"))
            .map(|(r, ..)| r)
            .collect();
        let standbys = roles
            .iter()
            .filter(|(_, c, b)| *c == 200 && b.contains("standby"))
            .count();
        match (leaders.as_slice(), standbys) {
            ([leader], 1) => Ok(Some((*leader).clone())),
            _ => Err(format!("{roles:?}")),
        }
    })
    .await
}

/// Waits until the virtual Node names `ip` as its kubelet address (its InternalIP).
async fn wait_kubelet_address(t: &TestNamespace, node: &str, ip: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(t.client.clone());
    wait::until(&format!("Node {node} at {ip}"), TIMEOUT, || async {
        let n = nodes.get(node).await.map_err(|e| e.to_string())?;
        let addresses = n.status.and_then(|s| s.addresses).unwrap_or_default();
        if addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == ip)
        {
            Ok(Some(()))
        } else {
            Err(format!("{addresses:?}"))
        }
    })
    .await
}

/// After `helm uninstall`: no object of the release, its Lease, the site's Node or that Node's
/// Lease is left; the CRDs are (Helm never deletes them).
async fn uninstall_leaves_only_the_crds(t: &TestNamespace, site: &str) -> anyhow::Result<()> {
    helm_cmd(t, &["uninstall", RELEASE, "--wait", "--timeout", "120s"])?;
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    wait::until("the operator pods gone", TIMEOUT, || async {
        let n = pods
            .list(&ListParams::default().labels(INSTANCE))
            .await?
            .items
            .len();
        Ok::<_, kube::Error>((n == 0).then_some(()))
    })
    .await?;
    let out = t
        .cluster
        .kubectl()
        .args(["get", "-A", "-l", INSTANCE, "-o", "name"])
        .arg(
            "deployments,replicasets,pods,services,serviceaccounts,configmaps,secrets,roles,rolebindings,\
             clusterroles,clusterrolebindings,poddisruptionbudgets,networkpolicies,leases,\
             mutatingwebhookconfigurations,mutatingadmissionpolicies,mutatingadmissionpolicybindings,\
             validatingadmissionpolicies,validatingadmissionpolicybindings",
        )
        .output()?;
    ensure!(
        out.status.success(),
        "kubectl get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(left.is_empty(), "left behind by helm uninstall:\n{left}");
    let leases: Api<Lease> = Api::namespaced(t.client.clone(), &t.name);
    ensure!(
        leases.get_opt(FULLNAME).await?.is_none(),
        "the leader Lease is left behind"
    );
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(t.client.clone());
    ensure!(
        webhooks.get_opt(FULLNAME).await?.is_none(),
        "the webhook configuration is left behind"
    );
    let node = format!("offload-{site}");
    let nodes: Api<Node> = Api::all(t.client.clone());
    ensure!(
        nodes.get_opt(&node).await?.is_none(),
        "the site's Node is left behind"
    );
    let node_leases: Api<Lease> = Api::namespaced(t.client.clone(), "kube-node-lease");
    wait::until("the site's node Lease gone", TIMEOUT, || async {
        Ok::<_, kube::Error>(node_leases.get_opt(&node).await?.is_none().then_some(()))
    })
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(t.client.clone());
    for crd in [
        "offloadsites.offload.dev",
        "offloadpolicies.offload.dev",
        "remotejobs.offload.dev",
    ] {
        ensure!(crds.get_opt(crd).await?.is_some(), "helm uninstall removed {crd}");
    }
    Ok(())
}

fn chart() -> String {
    repo_root()
        .join("helm/offload-operator")
        .to_string_lossy()
        .into_owned()
}

/// Runs helm against the test's namespace with the admin kubeconfig; fails with its output.
fn helm_cmd(t: &TestNamespace, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(helm::binary()?)
        .env("KUBECONFIG", &t.cluster.admin_kubeconfig)
        .args(["--namespace", &t.name])
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "helm {}: {text}", args.join(" "));
    Ok(text)
}

/// What a failing test needs to see of the operator pods: their state and their logs.
fn operator_logs(t: &TestNamespace) -> String {
    let run = |args: &[&str]| {
        t.cluster
            .kubectl()
            .args(["-n", &t.name])
            .args(args)
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| e.to_string())
    };
    format!(
        "----- operator pods -----\n{}\n----- operator logs -----\n{}",
        run(&["describe", "pods", "-l", INSTANCE]),
        run(&[
            "logs",
            "-l",
            INSTANCE,
            "--tail=60",
            "--prefix",
            "--all-containers"
        ])
    )
}

/// The stage tool the image ships is static: copied by `offload-stage in` (from the operator image)
/// into a pod whose main image has no C library at all (busybox-static alone), it wraps the
/// command there and returns its exit code, on a real kubelet and containerd (ADR 0016).
async fn stage_tool_needs_nothing_from_the_image(t: &TestNamespace, node: &RealNode) -> anyhow::Result<()> {
    let busybox = busybox_image_archive()?;
    node.import_image(&busybox)?;
    let mount = json!([{"name": "offload", "mountPath": "/var/run/offload"}]);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "no-libc"},
        "spec": {"restartPolicy": "Never", "nodeName": node.name,
            "tolerations": [{"key": node.taint_key, "operator": "Exists"}],
            "volumes": [{"name": "offload", "emptyDir": {}}],
            "initContainers": [{"name": "offload-stage-in", "image": operator_image_ref()?,
                "imagePullPolicy": "Never", "volumeMounts": mount,
                "command": ["/usr/bin/offload-stage", "in", "--root", "/var/run/offload"]}],
            "containers": [{"name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "volumeMounts": mount,
                "command": ["/var/run/offload/bin/offload-stage", "run", "--root", "/var/run/offload", "--",
                    "/bin/sh", "-c", "echo hello from an image without libc; ls /lib /lib64 /usr/lib; exit 3"]}]}}))?;
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
    pods.create(&PostParams::default(), &pod).await?;
    let done = wait_phase(&pods, "no-libc", "Failed", TIMEOUT).await?;
    let code = done
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "main"))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| t.exit_code);
    ensure!(code == Some(3), "the wrapped command's exit code: {code:?}");
    let log = pods
        .logs(
            "no-libc",
            &LogParams {
                container: Some("main".into()),
                ..LogParams::default()
            },
        )
        .await?;
    ensure!(
        log.contains("hello from an image without libc") && log.contains("/lib: No such file or directory"),
        "the pod's log: {log}"
    );
    eprintln!("the static stage tool ran a command in an image without a C library: exit code 3, {log:?}");
    pods.delete("no-libc", &DeleteParams::default()).await?;
    Ok(())
}
