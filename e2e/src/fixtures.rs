//! Sites backed by simulators, as the end-to-end tests declare them, and their cleanup.

use std::time::Duration;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use offload_operator::crd::{OffloadPolicy, OffloadSite, RemoteJob};
use serde_json::{Value, json};

use crate::{TestNamespace, operator::TEST_LABEL, wait};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A RemoteJob of test namespace `ns` running `script` (`sh -c`) in a container `main`, placed by
/// `policy`, retried after 1 s; `extra` overrides spec keys.
pub fn remote_job(
    ns: &str,
    name: &str,
    policy: &str,
    script: &str,
    extra: Value,
) -> anyhow::Result<RemoteJob> {
    let mut spec = json!({"policy": policy, "backoffSeconds": 1,
        "template": {"spec": {"containers": [{"name": "main", "image": "busybox",
            "command": ["sh", "-c", script]}]}}});
    merge(&mut spec, &extra);
    Ok(serde_json::from_value(
        json!({"apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob",
        "metadata": {"name": name, "namespace": ns, "labels": {TEST_LABEL: ns}}, "spec": spec}),
    )?)
}

/// An `OffloadSite` for test namespace `ns` at `endpoint`: open to every namespace, large, probed
/// and synced every second; `extra` overrides spec keys.
pub fn site(ns: &str, name: &str, endpoint: &str, extra: Value) -> anyhow::Result<OffloadSite> {
    site_builder(name).merge(extra).build(ns, name, endpoint)
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

/// The site's condition `type_` once its status is `status` (`"True"`/`"False"`).
pub async fn site_condition(
    sites: &Api<OffloadSite>,
    name: &str,
    type_: &str,
    status: &str,
) -> anyhow::Result<Condition> {
    wait::until(&format!("site {name} {type_}={status}"), TIMEOUT, || async {
        let s = sites.get(name).await?;
        Ok::<_, kube::Error>(
            s.status
                .into_iter()
                .flat_map(|st| st.conditions)
                .find(|c| c.type_ == type_ && c.status == status),
        )
    })
    .await
}

/// The pod once its phase is `want`; on timeout the error says where it is stuck.
pub async fn wait_phase(pods: &Api<Pod>, name: &str, want: &str, within: Duration) -> anyhow::Result<Pod> {
    wait::until(&format!("pod {name} {want}"), within, || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let status = p.status.clone().unwrap_or_default();
        let phase = status.phase.clone().unwrap_or_default();
        if phase == want {
            return Ok(Some(p));
        }
        let states: Vec<String> = status
            .container_statuses
            .unwrap_or_default()
            .iter()
            .map(|c| format!("{:?}", c.state))
            .collect();
        Err(format!("phase {phase:?}, containers {states:?}"))
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

/// Every key of `extra` (an object) replaces the key of that name in `spec` (an object).
fn merge(spec: &mut Value, extra: &Value) {
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
}

/// Builds an `OffloadSite` for a scenario: `site("hpc").kind("HPC").gpus("A100", 8).queue(300)`.
/// Defaults as [`site`]: open to every namespace, large, probed and synced every second.
#[derive(Clone, Debug)]
pub struct SiteBuilder {
    /// Short name (the scenario prefixes it with the test namespace).
    pub name: String,
    spec: Value,
    /// The simulator's queue delay at the start.
    pub sim_queue_delay: Duration,
}

/// A [`SiteBuilder`] named `name`.
pub fn site_builder(name: &str) -> SiteBuilder {
    SiteBuilder {
        name: name.into(),
        spec: json!({"namespaceSelector": {}, "statusSyncIntervalSeconds": 1,
            "capacity": {"cpu": "1000", "memory": "4Ti", "pods": 5000},
            "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}}),
        sim_queue_delay: Duration::ZERO,
    }
}

impl SiteBuilder {
    /// `spec.kind` (`HPC`, `HTC`, `Cloud`, `Kubernetes`).
    pub fn kind(mut self, kind: &str) -> Self {
        self.spec["kind"] = kind.into();
        self
    }

    /// Adds `count` GPUs of `model` (`nvidia.com/gpu`) with `memory` each.
    pub fn gpus(mut self, model: &str, count: u32, memory: &str) -> Self {
        let gpus = &mut self.spec["capacity"]["gpus"];
        if !gpus.is_array() {
            *gpus = json!([]);
        }
        if let Some(list) = gpus.as_array_mut() {
            list.push(json!({"model": model, "count": count, "memoryPerGpu": memory}));
        }
        self
    }

    /// `spec.typicalQueueWaitSeconds`.
    pub fn queue(mut self, seconds: u32) -> Self {
        self.spec["typicalQueueWaitSeconds"] = seconds.into();
        self
    }

    /// `spec.relativeCost`.
    pub fn cost(mut self, cost: f64) -> Self {
        self.spec["relativeCost"] = cost.into();
        self
    }

    /// Only namespaces with these labels may use the site.
    pub fn tenants(mut self, labels: &[(&str, &str)]) -> Self {
        let m: serde_json::Map<String, Value> =
            labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        self.spec["namespaceSelector"] = json!({"matchLabels": m});
        self
    }

    /// `spec.maxConcurrentPods`.
    pub fn slots(mut self, n: u32) -> Self {
        self.spec["maxConcurrentPods"] = n.into();
        self
    }

    /// `spec.statusSyncIntervalSeconds`.
    pub fn sync_every(mut self, seconds: u32) -> Self {
        self.spec["statusSyncIntervalSeconds"] = seconds.into();
        self
    }

    /// Any other spec key.
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.spec[key] = value;
        self
    }

    /// Every key of `extra` (an object) replaces the spec key of that name.
    pub fn merge(mut self, extra: Value) -> Self {
        merge(&mut self.spec, &extra);
        self
    }

    /// Removes a default spec key (e.g. `capacity`, to let the site report its own).
    pub fn unset(mut self, key: &str) -> Self {
        if let Some(spec) = self.spec.as_object_mut() {
            spec.remove(key);
        }
        self
    }

    /// The simulator holds every pod this long before it starts.
    pub fn sim_queue_delay(mut self, d: Duration) -> Self {
        self.sim_queue_delay = d;
        self
    }

    /// The object, named `full_name`, labelled for test namespace `ns`, at `endpoint`.
    pub fn build(&self, ns: &str, full_name: &str, endpoint: &str) -> anyhow::Result<OffloadSite> {
        let mut spec = self.spec.clone();
        spec["endpoint"] = endpoint.into();
        Ok(serde_json::from_value(
            json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
            "metadata": {"name": full_name, "labels": {TEST_LABEL: ns}}, "spec": spec}),
        )?)
    }
}

/// Builds an `OffloadPolicy`: `policy("gpu").gpu_models(&["A100"]).weights(60, 10, 10, 20)`.
#[derive(Clone, Debug)]
pub struct PolicyBuilder {
    /// Short name.
    pub name: String,
    spec: Value,
}

/// A [`PolicyBuilder`] named `name`.
pub fn policy_builder(name: &str) -> PolicyBuilder {
    PolicyBuilder {
        name: name.into(),
        spec: json!({}),
    }
}

impl PolicyBuilder {
    /// `spec.priority`.
    pub fn priority(mut self, p: i32) -> Self {
        self.spec["priority"] = p.into();
        self
    }

    /// `spec.requirements.gpuModels`.
    pub fn gpu_models(mut self, models: &[&str]) -> Self {
        self.spec["requirements"]["gpuModels"] = json!(models);
        self
    }

    /// `spec.requirements.minGpuMemory`.
    pub fn min_gpu_memory(mut self, q: &str) -> Self {
        self.spec["requirements"]["minGpuMemory"] = q.into();
        self
    }

    /// `spec.podRequests.gpus` (`Any`, `Required`, `None`).
    pub fn pod_gpus(mut self, which: &str) -> Self {
        self.spec["podRequests"]["gpus"] = which.into();
        self
    }

    /// Every key of `extra` (an object) replaces the spec key of that name.
    pub fn merge(mut self, extra: Value) -> Self {
        merge(&mut self.spec, &extra);
        self
    }

    /// `spec.sites`: only these sites (full names), in this order.
    pub fn sites(mut self, full_names: &[&str]) -> Self {
        self.spec["sites"] = json!(full_names);
        self
    }

    /// `spec.weights`: queue time, cost, free capacity, GPU fit.
    pub fn weights(mut self, queue: u32, cost: u32, free: u32, gpu: u32) -> Self {
        self.spec["weights"] = json!({"queueTime": queue, "cost": cost, "freeCapacity": free, "gpuFit": gpu});
        self
    }

    /// The object, named `full_name`, labelled for test namespace `ns`.
    pub fn build(&self, ns: &str, full_name: &str) -> anyhow::Result<OffloadPolicy> {
        Ok(serde_json::from_value(
            json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy",
            "metadata": {"name": full_name, "labels": {TEST_LABEL: ns}}, "spec": self.spec}),
        )?)
    }
}

/// Builds a pod for the offload scheduler: `pod("train").policy(p).cpu("2").gpus(1)`.
#[derive(Clone, Debug)]
pub struct PodBuilder {
    name: String,
    annotations: serde_json::Map<String, Value>,
    requests: serde_json::Map<String, Value>,
    command: Option<String>,
    spec: serde_json::Map<String, Value>,
}

/// A [`PodBuilder`] named `name`, asking for 1 CPU and 1Gi, that runs for an hour at a simulated
/// site (until deleted).
pub fn pod_builder(name: &str) -> PodBuilder {
    PodBuilder {
        name: name.into(),
        annotations: [("sitesim.offload.dev/duration-seconds".to_string(), json!("3600"))]
            .into_iter()
            .collect(),
        requests: [
            ("cpu".to_string(), json!("1")),
            ("memory".to_string(), json!("1Gi")),
        ]
        .into_iter()
        .collect(),
        command: None,
        spec: [("schedulerName".to_string(), json!("offload-scheduler"))]
            .into_iter()
            .collect(),
    }
}

impl PodBuilder {
    /// Runs `sh -c script` (the simulator runs it for real unless it simulates).
    pub fn script(mut self, script: &str) -> Self {
        self.command = Some(script.into());
        self
    }

    /// Bound straight to the virtual Node of site `full_name` (as kube-scheduler binds a pod
    /// pinned the interLink way), instead of naming the offload scheduler.
    pub fn on_node(mut self, full_name: &str) -> Self {
        self.spec.remove("schedulerName");
        self.spec
            .insert("nodeName".into(), format!("offload-{full_name}").into());
        self
    }

    /// Names no scheduler (the API server defaults it to `default-scheduler`), as a manifest
    /// written for the webhook's opt-in does.
    pub fn without_scheduler(mut self) -> Self {
        self.spec.remove("schedulerName");
        self
    }

    /// Every key of `extra` (an object) replaces the pod spec key of that name.
    pub fn merge_spec(mut self, extra: Value) -> Self {
        if let Some(extra) = extra.as_object() {
            self.spec.extend(extra.clone());
        }
        self
    }

    /// Adds an annotation.
    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Names the policy (`offload.dev/policy`).
    pub fn policy(mut self, full_name: &str) -> Self {
        self.annotations
            .insert("offload.dev/policy".into(), full_name.into());
        self
    }

    /// How long it runs at a simulated site.
    pub fn runs_for(mut self, seconds: u32) -> Self {
        self.annotations.insert(
            "sitesim.offload.dev/duration-seconds".into(),
            seconds.to_string().into(),
        );
        self
    }

    /// CPU request.
    pub fn cpu(mut self, q: &str) -> Self {
        self.requests.insert("cpu".into(), q.into());
        self
    }

    /// `nvidia.com/gpu` request (and limit).
    pub fn gpus(mut self, n: u32) -> Self {
        self.requests
            .insert("nvidia.com/gpu".into(), n.to_string().into());
        self
    }

    /// The pod.
    pub fn build(&self) -> anyhow::Result<Pod> {
        let limits: serde_json::Map<String, Value> = self
            .requests
            .iter()
            .filter(|(k, _)| k.contains('/'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut main = json!({"name": "main", "image": "busybox",
                              "resources": {"requests": self.requests, "limits": limits}});
        if let Some(script) = &self.command {
            main["command"] = json!(["sh", "-c", script]);
        }
        let mut spec = json!({"restartPolicy": "Never", "containers": [main]});
        if let Some(s) = spec.as_object_mut() {
            s.extend(self.spec.clone());
        }
        Ok(serde_json::from_value(json!({
            "metadata": {"name": self.name, "annotations": self.annotations},
            "spec": spec
        }))?)
    }
}
