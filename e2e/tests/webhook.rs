//! The pod-mutating admission webhook (ADR 0012) on the real API server, served by the real
//! operator binary on 127.0.0.1 with a certificate from a test CA. The configuration is the
//! chart's, pointed at a URL instead of the Service: two entries, a namespace selector and CEL
//! match conditions, `failurePolicy: Ignore`.
//!
//! One test, in its own binary: the configuration is cluster-wide (limited to the test's
//! namespace, and deleted at the end).

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod},
    events::v1::Event,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use offload_e2e::{
    Cluster,
    fixtures::{pod_builder, site_builder},
    operator::free_port,
    scenario::Scenario,
    wait,
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The chart's two webhook entries, for one namespace, calling `base` (the operator's URL).
fn configuration(
    name: &str,
    namespace: &str,
    base: &str,
    ca: &[u8],
) -> anyhow::Result<MutatingWebhookConfiguration> {
    let ca = serde_json::to_value(k8s_openapi::ByteString(ca.to_vec()))?; // base64, as the API wants
    let entry = |webhook: &str, path: &str, selector: serde_json::Value, conditions: serde_json::Value| {
        json!({
            "name": webhook,
            "clientConfig": {"url": format!("{base}{path}"), "caBundle": ca},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": selector,
            "matchConditions": conditions,
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
        })
    };
    let only_here = json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]});
    Ok(serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            entry("namespace.pods.offload.dev", "/mutate/pods/namespace",
                json!({"matchLabels": {"offload.dev/offload": "enabled"}, "matchExpressions": [only_here]}),
                json!([])),
            entry("annotated.pods.offload.dev", "/mutate/pods/annotated",
                json!({"matchExpressions": [only_here,
                    {"key": "offload.dev/offload", "operator": "NotIn", "values": ["enabled"]}]}),
                json!([{"name": "opted-in", "expression":
                    "has(object.metadata.annotations) && ((\"offload.dev/offload\" in object.metadata.annotations && object.metadata.annotations[\"offload.dev/offload\"] == \"true\") || (\"offload.dev/policy\" in object.metadata.annotations && object.metadata.annotations[\"offload.dev/policy\"] != \"\"))"}])),
        ],
    }))?)
}

/// The sum of a counter's series that carry every one of `labels` (`name="value"`; none: all),
/// from `/metrics`.
fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then_some(())?;
            labels
                .iter()
                .all(|l| rest.contains(l))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn scheduler_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn pods_opt_in_by_annotation_or_namespace_label_through_the_webhook() {
    let cluster = Cluster::shared().expect("a control plane");
    let dir = cluster.dir.join(format!("webhook-{}", std::process::id()));
    // A CA and a serving certificate for 127.0.0.1 (the test PKI the simulator's TLS tests use).
    let (ca_file, tls) = offload_e2e::pki::make_tls(&dir);
    let port = free_port().expect("a port");
    let addr = format!("127.0.0.1:{port}");
    let cert = tls.cert.to_string_lossy().into_owned();
    let key = tls.key.to_string_lossy().into_owned();
    let args = [
        "--webhook-addr",
        &addr,
        "--webhook-tls-cert",
        &cert,
        "--webhook-tls-key",
        &key,
    ];
    Scenario::run_with("webhook", &args, |s| async move {
        let configs: Api<MutatingWebhookConfiguration> = Api::all(s.t.client.clone());
        let config_name = format!("offload-e2e-{}", s.t.name);
        let ca = std::fs::read(&ca_file)?;
        let base = format!("https://127.0.0.1:{port}");
        configs
            .create(
                &PostParams::default(),
                &configuration(&config_name, &s.t.name, &base, &ca)?,
            )
            .await?;
        let result = steps(&s, &dir).await;
        configs.delete(&config_name, &DeleteParams::default()).await?;
        result
    })
    .await;
}

async fn steps(s: &Scenario, dir: &Path) -> anyhow::Result<()> {
    let _sim = s.site(site_builder("site")).await?;
    let metrics = || async { s.operator_get("/metrics").await };

    // An unrelated pod (no annotation, namespace not labelled): the API server does not call the
    // webhook at all. A RemoteJob-style pod naming offload-scheduler is not asked about either.
    let before = metrics().await?;
    let plain = pod_builder("plain").without_scheduler().build()?;
    s.pods.create(&PostParams::default(), &plain).await?;
    let created = s.pods.get("plain").await?;
    ensure!(
        scheduler_of(&created) == "default-scheduler",
        "an unrelated pod was changed: {}",
        scheduler_of(&created)
    );
    let after = metrics().await?;
    let total = "offload_webhook_admissions_total";
    ensure!(
        counter(&after, total, &[]) == counter(&before, total, &[]),
        "the webhook was called for an unrelated pod"
    );

    // Annotated: offloaded with no scheduler name in the manifest, and runs at the site.
    let annotated = pod_builder("annotated")
        .without_scheduler()
        .annotate("offload.dev/offload", "true")
        .script("echo annotated")
        .runs_for(1)
        .build()?;
    s.pods.create(&PostParams::default(), &annotated).await?;
    let pod = s.pods.get("annotated").await?;
    ensure!(
        scheduler_of(&pod) == "offload-scheduler",
        "annotated pod not mutated: {}",
        scheduler_of(&pod)
    );
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    for key in ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"] {
        ensure!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some(key) && t.toleration_seconds.is_none()),
            "{key} is not tolerated without a time limit: {tolerations:?}"
        );
    }
    ensure!(
        pod.annotations()
            .get("offload.dev/mutated-by")
            .is_some_and(|v| v.contains("schedulerName")),
        "no offload.dev/mutated-by annotation: {:?}",
        pod.annotations()
    );
    s.phase("annotated", "Succeeded", TIMEOUT).await?;
    let now = metrics().await?;
    ensure!(
        counter(&now, total, &["route=\"annotated\"", "result=\"mutated\""]) == 1.0,
        "admissions: {}",
        now.lines()
            .filter(|l| l.contains(total))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        counter(
            &now,
            "offload_webhook_admission_duration_seconds_count",
            &["route=\"annotated\""]
        ) == 1.0,
        "no admission latency observed"
    );

    // Another scheduler named: left alone, and kubectl shows the webhook's warning.
    let other = pod_builder("other-scheduler")
        .annotate("offload.dev/offload", "true")
        .merge_spec(json!({"schedulerName": "volcano"}))
        .build()?;
    let file = dir.join("other-scheduler.json");
    std::fs::write(&file, serde_json::to_vec(&other)?)?;
    let out =
        s.t.cluster
            .kubectl()
            .args(["-n", &s.t.name, "create", "-f"])
            .arg(&file)
            .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "kubectl create: {stderr}");
    ensure!(
        stderr.contains("Warning: offload.dev: the pod names scheduler volcano"),
        "no warning from the webhook: {stderr}"
    );
    ensure!(
        scheduler_of(&s.pods.get("other-scheduler").await?) == "volcano",
        "the other scheduler was replaced"
    );

    // A labelled namespace: a pod with no annotation and no scheduler name is offloaded. (The
    // unrelated pod goes first: unbound in a namespace that opts in, it would be reported as not
    // offloaded, as a pod created before its namespace was labelled is.)
    s.pods
        .delete("plain", &DeleteParams::default().grace_period(0))
        .await?;
    let namespaces: Api<Namespace> = Api::all(s.t.client.clone());
    namespaces
        .patch(
            &s.t.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"offload.dev/offload": "enabled"}}})),
        )
        .await?;
    let by_namespace = pod_builder("by-namespace")
        .without_scheduler()
        .script("echo namespace")
        .runs_for(1)
        .build()?;
    wait::until(
        "the namespace label to reach the API server's selector",
        TIMEOUT,
        || async {
            // The webhook's namespace selector reads an informer: retry a dry-run create until it sees
            // the label.
            let pp = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let p = s.pods.create(&pp, &by_namespace).await?;
            Ok::<_, kube::Error>((scheduler_of(&p) == "offload-scheduler").then_some(()))
        },
    )
    .await?;
    s.pods.create(&PostParams::default(), &by_namespace).await?;
    ensure!(
        scheduler_of(&s.pods.get("by-namespace").await?) == "offload-scheduler",
        "the labelled namespace's pod was not mutated"
    );
    s.phase("by-namespace", "Succeeded", TIMEOUT).await?;
    // Opting out of a labelled namespace.
    let opted_out = pod_builder("opted-out")
        .without_scheduler()
        .annotate("offload.dev/offload", "false")
        .build()?;
    s.pods.create(&PostParams::default(), &opted_out).await?;
    ensure!(
        scheduler_of(&s.pods.get("opted-out").await?) == "default-scheduler",
        "an opted-out pod was mutated"
    );

    // The operator down: pod creation still succeeds (failurePolicy Ignore), unchanged; once it is
    // back, the leader says so on the pod and in a metric.
    s.stop_operator().await;
    let missed = pod_builder("while-down").without_scheduler().build()?;
    s.pods
        .create(&PostParams::default(), &missed)
        .await
        .context("creating a pod while the webhook is down")?;
    ensure!(scheduler_of(&s.pods.get("while-down").await?) == "default-scheduler");
    s.start_operator().await?;
    let events: Api<Event> = Api::namespaced(s.t.client.clone(), &s.t.name);
    wait::until("a NotOffloaded Event on while-down", TIMEOUT, || async {
        let l = events
            .list(&ListParams::default().fields("regarding.name=while-down"))
            .await?;
        Ok::<_, kube::Error>(
            l.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("NotOffloaded")),
        )
    })
    .await?;
    let now = metrics().await?;
    ensure!(
        counter(&now, "offload_webhook_missed_pods_total", &[]) == 1.0,
        "missed pods: {}",
        counter(&now, "offload_webhook_missed_pods_total", &[])
    );
    // The opted-out pod, also unbound with the default scheduler, is not reported.
    let l = events
        .list(&ListParams::default().fields("regarding.name=opted-out"))
        .await?;
    ensure!(
        !l.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("NotOffloaded")),
        "an opted-out pod was reported as missed"
    );
    Ok(())
}
