//! The real operator binary as a child process, with the CRDs and its RBAC installed.

use std::{path::PathBuf, process::Stdio, sync::OnceLock, time::Duration};

use anyhow::{Context, ensure};

use crate::{
    Cluster,
    cluster::{repo_root, workspace_binary},
    wait,
};

/// Label put on a test's sites; the test's operator only manages sites carrying its value.
pub const TEST_LABEL: &str = "offload.dev/e2e-test";

/// Installs the committed CRDs (server-side apply, as for any large CRD) once per test binary and
/// waits until they are served.
pub async fn install_crds(cluster: &Cluster) -> anyhow::Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    let dir = repo_root().join("crds");
    let out = cluster
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&dir)
        .output()?;
    ensure!(
        out.status.success(),
        "applying crds/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s"])
        .args([
            "crd/offloadsites.offload.dev",
            "crd/offloadpolicies.offload.dev",
            "crd/remotejobs.offload.dev",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "waiting for the CRDs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait::until(
        "the offload category in discovery",
        Duration::from_secs(60),
        || async {
            let out = cluster
                .kubectl()
                .args(["api-resources", "--categories=offload", "-o", "name"])
                .output()?;
            Ok::<_, anyhow::Error>((String::from_utf8_lossy(&out.stdout).lines().count() == 3).then_some(()))
        },
    )
    .await?;
    let _ = DONE.set(());
    Ok(())
}

/// Grants the operator identity its least-privilege RBAC, with `namespace` as its namespace.
/// Tests of one binary run in parallel: a lock keeps two first-time `kubectl apply` of the shared
/// ClusterRole from racing (the loser would get AlreadyExists).
pub fn install_rbac(cluster: &Cluster, namespace: &str) -> anyhow::Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let text = std::fs::read_to_string(repo_root().join("e2e/testdata/operator-rbac.yaml"))?;
    let path = cluster.dir.join(format!("rbac-{namespace}.yaml"));
    std::fs::write(&path, text.replace("NAMESPACE", namespace))?;
    let out = cluster.kubectl().args(["apply", "-f"]).arg(&path).output()?;
    ensure!(
        out.status.success(),
        "applying RBAC: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A running `offload-operator run`, killed when dropped.
pub struct Operator {
    child: tokio::process::Child,
    /// Its log file.
    pub log: PathBuf,
    /// Base URL of its metrics/health server.
    pub metrics_url: String,
    /// Port of its kubelet endpoint (HTTPS, client certificates required).
    pub kubelet_port: u16,
}

impl Operator {
    /// Starts the operator with the operator identity, `namespace` as its namespace, managing only
    /// sites labelled `offload.dev/e2e-test=<namespace>`; waits until `/readyz` answers 200.
    pub async fn start(cluster: &Cluster, namespace: &str) -> anyhow::Result<Operator> {
        Self::start_with(cluster, namespace, &[]).await
    }

    /// [`Operator::start`] with extra command-line arguments.
    pub async fn start_with(cluster: &Cluster, namespace: &str, extra: &[&str]) -> anyhow::Result<Operator> {
        install_rbac(cluster, namespace)?;
        Self::start_as(cluster, namespace, &cluster.operator_kubeconfig, extra).await
    }

    /// [`Operator::start_with`] with the identity of another kubeconfig (e.g. the Helm chart's
    /// ServiceAccount token), whose RBAC the caller has installed; the test RBAC is not installed.
    pub async fn start_as(
        cluster: &Cluster,
        namespace: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Operator> {
        Self::start_until(cluster, namespace, kubeconfig, extra, "/readyz").await
    }

    /// [`Operator::start_as`], returning once the operator is live (`/healthz`), ready or not: for
    /// tests of an operator that cannot become ready.
    pub async fn launch_as(
        cluster: &Cluster,
        namespace: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Operator> {
        Self::start_until(cluster, namespace, kubeconfig, extra, "/healthz").await
    }

    async fn start_until(
        cluster: &Cluster,
        namespace: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
        answers: &str,
    ) -> anyhow::Result<Operator> {
        install_crds(cluster).await?;
        // A port found free may be taken (by a simulator binding port 0) before the operator binds
        // it: then the operator exits at once, and is started again on new ports.
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::spawn(cluster, namespace, kubeconfig, extra, answers).await {
                Ok(op) => return Ok(op),
                Err(e) if tries < 4 && format!("{e:#}").contains("Address already in use") => {
                    tracing::warn!("operator could not bind its ports; starting it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn(
        cluster: &Cluster,
        namespace: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
        answers: &str,
    ) -> anyhow::Result<Operator> {
        let port = free_port()?;
        let kubelet_port = free_port()?;
        // One file per process: replicas of one namespace (leader election) run side by side.
        let log = cluster.dir.join(format!("operator-{namespace}-{port}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(workspace_binary("offload-operator")?);
        cmd.arg("run").args(["--kubelet-port", &kubelet_port.to_string()]);
        if let Some((cert, key, ca)) = &cluster.kubelet_tls {
            cmd.arg("--kubelet-tls-cert")
                .arg(cert)
                .arg("--kubelet-tls-key")
                .arg(key)
                .arg("--kubelet-client-ca")
                .arg(ca);
        }
        let child = cmd
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--namespace",
                namespace,
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--site-selector", &format!("{TEST_LABEL}={namespace}")])
            .args(extra)
            .env("RUST_LOG", "info,offload_operator=debug")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .context("starting offload-operator")?;
        let mut op = Operator {
            child,
            log,
            metrics_url: format!("http://127.0.0.1:{port}"),
            kubelet_port,
        };
        let url = format!("{}{answers}", op.metrics_url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let ready = loop {
            if let Some(status) = op.child.try_wait()? {
                break Err(anyhow::anyhow!("the operator exited: {status}"));
            }
            if http_get(&url).await.ok().is_some_and(|(code, _)| code == 200) {
                // Still running a moment later (a failed bind ends it just after the metrics
                // server starts)?
                tokio::time::sleep(Duration::from_millis(200)).await;
                match op.child.try_wait()? {
                    Some(status) => break Err(anyhow::anyhow!("the operator exited: {status}")),
                    None => break Ok(()),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(anyhow::anyhow!(
                    "timed out after 60s waiting for the operator's {answers}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if let Err(e) = ready {
            let _ = op.child.start_kill();
            anyhow::bail!("{e}\n{}", op.log_tail(60));
        }
        Ok(op)
    }

    /// Its process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops it at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops it gracefully (SIGTERM, as the kubelet does) and waits up to `within` for it to
    /// exit; kills it if it has not. Returns whether it exited on its own.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        let Some(pid) = self.child.id() else {
            return true;
        };
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(_) => true,
            Err(_) => {
                let _ = self.child.kill().await;
                false
            }
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "----- {} -----\n{}",
            self.log.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// `GET <metrics server><path>`: status code and body, whatever the code.
    pub async fn probe(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&format!("{}{path}", self.metrics_url)).await
    }

    /// `GET <metrics server><path>`.
    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let (code, body) = http_get(&format!("{}{path}", self.metrics_url)).await?;
        ensure!(code == 200, "{path}: HTTP {code}");
        Ok(body)
    }
}

/// A free TCP port on 127.0.0.1, chosen by the kernel.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET on loopback (no client library needed for two endpoints).
pub async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
