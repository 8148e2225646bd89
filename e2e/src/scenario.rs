//! One runner for operator scenarios: a test namespace, a running operator, simulated sites and
//! policies declared with the [`crate::fixtures`] builders, cleanup of everything it made, and the
//! operator's log tail when the scenario fails.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{Api, api::PostParams};
use offload_operator::crd::{OffloadPolicy, OffloadSite};
use tokio::sync::Mutex;

use crate::{
    TestNamespace,
    fixtures::{self, PodBuilder, PolicyBuilder, SiteBuilder},
    operator::{Operator, TEST_LABEL},
    sitesim::{SimConfig, SimHandle},
    wait,
};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A running scenario (see [`Scenario::run`]).
pub struct Scenario {
    /// The test namespace.
    pub t: TestNamespace,
    op: Mutex<Option<Operator>>,
    /// The log of the operator last started (kept when it is stopped).
    log: Mutex<std::path::PathBuf>,
    operator_args: Vec<String>,
    sims: Mutex<Vec<Arc<SimHandle>>>,
    site_names: Mutex<Vec<String>>,
    default_policy: String,
    /// Cluster-wide sites, policies, and the namespace's pods.
    pub sites: Api<OffloadSite>,
    /// Policies.
    pub policies: Api<OffloadPolicy>,
    /// Pods of the test namespace.
    pub pods: Api<Pod>,
}

impl Scenario {
    /// Runs `body` in a new namespace with an operator started for it; afterwards deletes the
    /// sites (their pods first) while the operator still runs, and on failure prints the
    /// operator's log tail.
    pub async fn run<F, Fut>(test: &str, body: F)
    where
        F: FnOnce(Arc<Scenario>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        Scenario::run_with(test, &[], body).await;
    }

    /// [`Scenario::run`] with extra operator arguments (kept across restarts).
    pub async fn run_with<F, Fut>(test: &str, operator_args: &[&str], body: F)
    where
        F: FnOnce(Arc<Scenario>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let operator_args: Vec<String> = operator_args.iter().map(|a| a.to_string()).collect();
        TestNamespace::run(test, |t| async move {
            let args: Vec<&str> = operator_args.iter().map(String::as_str).collect();
            let op = Operator::start_with(t.cluster, &t.name, &args).await?;
            t.default_service_account().await?;
            // Pods of this scenario name its own default policy: in a cluster shared with other
            // tests, another operator would otherwise be as entitled to place them.
            let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
            let default_policy = format!("{}-default", t.name);
            policies
                .create(
                    &PostParams::default(),
                    &fixtures::policy_builder("default").build(&t.name, &default_policy)?,
                )
                .await?;
            let s = Arc::new(Scenario {
                default_policy,
                sites: Api::all(t.client.clone()),
                policies: Api::all(t.client.clone()),
                pods: Api::namespaced(t.client.clone(), &t.name),
                t,
                log: Mutex::new(op.log.clone()),
                op: Mutex::new(Some(op)),
                operator_args,
                sims: Mutex::default(),
                site_names: Mutex::default(),
            });
            let result = body(s.clone()).await;
            // Cleanup needs an operator (site finalizers): start one if the body left it stopped.
            if s.op.lock().await.is_none() {
                s.start_operator().await?;
            }
            let names = s.site_names.lock().await.clone();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut cleanup = fixtures::delete_sites(&s.t, &s.sites, &refs).await;
            let mine = kube::api::ListParams::default().labels(&format!("{TEST_LABEL}={}", s.t.name));
            if let Err(e) = s.policies.delete_collection(&Default::default(), &mine).await {
                cleanup = cleanup.and(Err(e.into()));
            }
            if (result.is_err() || cleanup.is_err())
                && let Some(op) = s.op.lock().await.as_ref()
            {
                eprintln!("{}", op.log_tail(120));
            }
            result.and(cleanup)
        })
        .await;
    }

    /// The cluster-wide name of a scenario object (`<namespace>-<name>`).
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.t.name)
    }

    /// The scenario's default policy (every site, default weights): its cluster-wide name.
    pub fn default_policy(&self) -> &str {
        &self.default_policy
    }

    /// A pod of this scenario under its default policy (every site, default weights).
    pub fn pod(&self, name: &str) -> PodBuilder {
        fixtures::pod_builder(name).policy(&self.default_policy)
    }

    /// Starts a simulator kept for the scenario's lifetime (for a site created with
    /// [`Scenario::create_site`]).
    pub async fn sim(&self, config: SimConfig) -> anyhow::Result<Arc<SimHandle>> {
        let sim = Arc::new(SimHandle::start(config).await?);
        self.sims.lock().await.push(sim.clone());
        Ok(sim)
    }

    /// Creates the site at `endpoint` without waiting for it (deleted with the scenario); returns
    /// its cluster-wide name.
    pub async fn create_site(&self, b: &SiteBuilder, endpoint: &str) -> anyhow::Result<String> {
        let name = self.name(&b.name);
        self.sites
            .create(&PostParams::default(), &b.build(&self.t.name, &name, endpoint)?)
            .await
            .with_context(|| format!("creating site {name}"))?;
        self.site_names.lock().await.push(name.clone());
        Ok(name)
    }

    /// Starts a simulator for the site, creates the site there, and waits until it is Ready.
    pub async fn site(&self, b: SiteBuilder) -> anyhow::Result<Arc<SimHandle>> {
        self.site_with(b, |_| {}).await
    }

    /// The site's condition `type_` once its status is `status` (`"True"`/`"False"`); `site` is
    /// the cluster-wide name.
    pub async fn condition(&self, site: &str, type_: &str, status: &str) -> anyhow::Result<Condition> {
        fixtures::site_condition(&self.sites, site, type_, status).await
    }

    /// The pod once its phase is `want`.
    pub async fn phase(&self, pod: &str, want: &str, within: Duration) -> anyhow::Result<Pod> {
        fixtures::wait_phase(&self.pods, pod, want, within).await
    }

    /// [`Scenario::site`] with the simulator's configuration changed by `configure` first (TLS,
    /// a required token).
    pub async fn site_with(
        &self,
        b: SiteBuilder,
        configure: impl FnOnce(&mut SimConfig),
    ) -> anyhow::Result<Arc<SimHandle>> {
        let mut config = SimConfig {
            simulate: true,
            queue_delay: b.sim_queue_delay,
            ..SimConfig::default()
        };
        configure(&mut config);
        let sim = self.sim(config).await?;
        let name = self.create_site(&b, &sim.url).await?;
        fixtures::wait_site_ready(&self.sites, &name).await?;
        Ok(sim)
    }

    /// Creates the policy; returns its cluster-wide name.
    pub async fn policy(&self, b: PolicyBuilder) -> anyhow::Result<String> {
        let name = self.name(&b.name);
        self.policies
            .create(&PostParams::default(), &b.build(&self.t.name, &name)?)
            .await
            .with_context(|| format!("creating policy {name}"))?;
        Ok(name)
    }

    /// Creates the pod and returns the site it was bound to.
    pub async fn place(&self, b: PodBuilder) -> anyhow::Result<String> {
        let pod = b.build()?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.pods.create(&PostParams::default(), &pod).await?;
        self.site_of(&name).await
    }

    /// The site (short name) the pod is bound to, once it is.
    pub async fn site_of(&self, pod: &str) -> anyhow::Result<String> {
        let node = wait::until(&format!("pod {pod} to be bound"), TIMEOUT, || async {
            let p = self.pods.get(pod).await?;
            Ok::<_, kube::Error>(p.spec.and_then(|s| s.node_name))
        })
        .await?;
        let prefix = format!("offload-{}-", self.t.name);
        Ok(node.strip_prefix(&prefix).unwrap_or(&node).to_string())
    }

    /// Waits until the pod runs.
    pub async fn running(&self, pod: &str, within: Duration) -> anyhow::Result<Pod> {
        self.phase(pod, "Running", within).await
    }

    /// The operator's log so far (of the running one, or of the last one stopped, until the next
    /// start rewrites it).
    pub async fn operator_log(&self) -> String {
        let path = self.log.lock().await.clone();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The running operator's process id.
    pub async fn operator_pid(&self) -> Option<u32> {
        self.op.lock().await.as_ref().and_then(Operator::pid)
    }

    /// The running operator's metrics and health server (`http://127.0.0.1:<port>`).
    pub async fn metrics_url(&self) -> anyhow::Result<String> {
        let op = self.op.lock().await;
        Ok(op
            .as_ref()
            .context("the operator is stopped")?
            .metrics_url
            .clone())
    }

    /// `GET` of a path on the operator's metrics and health server (e.g. `/metrics`).
    pub async fn operator_get(&self, path: &str) -> anyhow::Result<String> {
        let op = self.op.lock().await;
        op.as_ref().context("the operator is stopped")?.get(path).await
    }

    /// Kills the operator (SIGKILL: no cleanup), until [`Scenario::start_operator`].
    pub async fn stop_operator(&self) {
        if let Some(mut op) = self.op.lock().await.take() {
            op.kill().await;
        }
    }

    /// Stops the operator gracefully (SIGTERM; see [`Operator::terminate`]), until
    /// [`Scenario::start_operator`]; fails if it did not exit within 30 s.
    pub async fn terminate_operator(&self) -> anyhow::Result<()> {
        if let Some(mut op) = self.op.lock().await.take() {
            anyhow::ensure!(
                op.terminate(Duration::from_secs(30)).await,
                "the operator did not exit within 30 s of SIGTERM\n{}",
                op.log_tail(40)
            );
        }
        Ok(())
    }

    /// Another replica (same namespace, selector and arguments) beside the scenario's operator,
    /// owned by the caller: with `--leader-elect` it stands by.
    pub async fn replica(&self) -> anyhow::Result<Operator> {
        let args: Vec<&str> = self.operator_args.iter().map(String::as_str).collect();
        Operator::start_with(self.t.cluster, &self.t.name, &args).await
    }

    /// The `/readyz` answer of the scenario's operator (`ok: leader`, `ok: standby`, ...).
    pub async fn operator_readyz(&self) -> anyhow::Result<String> {
        let op = self.op.lock().await;
        let (_, body) = op
            .as_ref()
            .context("the operator is stopped")?
            .probe("/readyz")
            .await?;
        Ok(body)
    }

    /// Starts an operator (same namespace, selector and arguments) if none runs.
    pub async fn start_operator(&self) -> anyhow::Result<()> {
        let mut op = self.op.lock().await;
        if op.is_none() {
            let args: Vec<&str> = self.operator_args.iter().map(String::as_str).collect();
            let started = Operator::start_with(self.t.cluster, &self.t.name, &args).await?;
            *self.log.lock().await = started.log.clone();
            *op = Some(started);
        }
        Ok(())
    }

    /// Kills the operator and starts a new one (same namespace, selector and arguments).
    pub async fn restart_operator(&self) -> anyhow::Result<()> {
        self.stop_operator().await;
        self.start_operator().await
    }

    /// `offload-operator explain --pod <namespace>/<pod>` as text, limited to this scenario's sites.
    pub async fn explain(&self, pod: &str) -> anyhow::Result<String> {
        let bin = crate::cluster::workspace_binary("offload-operator")?;
        let selector = format!("{TEST_LABEL}={}", self.t.name);
        let out = tokio::process::Command::new(&bin)
            .args([
                "explain",
                "--pod",
                &format!("{}/{pod}", self.t.name),
                "--site-selector",
                &selector,
            ])
            .arg("--kubeconfig")
            .arg(&self.t.cluster.admin_kubeconfig)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "explain failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
