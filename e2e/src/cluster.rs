//! Starting or reusing the control plane.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, anyhow, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Environment variable naming the state folder of an already running control plane to reuse.
pub const CLUSTER_ENV: &str = "OFFLOAD_E2E_CLUSTER";

/// The control-plane components, in start order; their logs are `<state>/<name>.log`.
pub const COMPONENTS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// A running control plane, described by the `env` file `cluster-up` writes into its state folder.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The state folder (PKI, data, logs, PIDs, kubeconfigs).
    pub dir: PathBuf,
    /// Kubeconfig of the `system:masters` admin identity.
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of the operator's identity (user `offload-operator`, no groups, no rights until
    /// RBAC grants them).
    pub operator_kubeconfig: PathBuf,
    /// Folder holding the control-plane binaries, kubectl included.
    pub bin: PathBuf,
    /// `https://127.0.0.1:<port>` of the API server.
    pub api_url: String,
    /// Serving certificate, key and client CA for the operator's kubelet endpoint.
    pub kubelet_tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// kube-controller-manager's `--node-monitor-grace-period`, in seconds.
    pub node_grace_seconds: u64,
    /// Default not-ready/unreachable toleration of pods, in seconds.
    pub toleration_seconds: u64,
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// The control plane for this test binary: reused from `OFFLOAD_E2E_CLUSTER`, or started on
    /// first use (it then stops when the test binary exits).
    pub fn shared() -> anyhow::Result<&'static Cluster> {
        SHARED
            .get_or_init(|| Self::reuse_or_start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("control plane unavailable: {e}"))
    }

    fn reuse_or_start() -> anyhow::Result<Cluster> {
        match std::env::var_os(CLUSTER_ENV) {
            Some(dir) => Self::from_dir(Path::new(&dir)),
            None => Self::start(),
        }
    }

    fn start() -> anyhow::Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("offload-e2e-{}", std::process::id()));
        eprintln!("e2e: starting a control plane in {}", dir.display());
        let pid = std::process::id().to_string();
        run_script(
            "cluster-up",
            &["--owner-pid".as_ref(), pid.as_ref(), dir.as_os_str()],
            &[("E2E_FAST_NODE_LIFECYCLE", "1")],
        )?;
        Self::from_dir(&dir)
    }

    /// Reads `<dir>/env` written by `cluster-up`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Cluster> {
        let env = EnvFile::read(&dir.join("env")).context("is a control plane running there?")?;
        let get = |k: &str| env.get(k);
        Ok(Cluster {
            dir: dir.to_path_buf(),
            admin_kubeconfig: get("KUBECONFIG")?.into(),
            operator_kubeconfig: get("OPERATOR_KUBECONFIG")?.into(),
            bin: get("BIN")?.into(),
            api_url: get("API_URL")?,
            kubelet_tls: match (
                get("KUBELET_SERVING_CERT"),
                get("KUBELET_SERVING_KEY"),
                get("KUBELET_CLIENT_CA"),
            ) {
                (Ok(c), Ok(k), Ok(ca)) => Some((c.into(), k.into(), ca.into())),
                _ => None,
            },
            node_grace_seconds: get("NODE_GRACE_SECONDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(50),
            toleration_seconds: get("TOLERATION_SECONDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        })
    }

    /// A client with the admin identity.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// A client with the operator's (non-admin) identity.
    pub async fn operator_client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.operator_kubeconfig).await
    }

    /// `kubectl` of the control plane's version, pointed at the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.env("KUBECONFIG", &self.admin_kubeconfig);
        cmd
    }

    /// A kubeconfig for `namespace/sa` with a fresh TokenRequest token (one hour), as a pod of
    /// that ServiceAccount would get.
    pub fn service_account_kubeconfig(&self, namespace: &str, sa: &str) -> anyhow::Result<PathBuf> {
        let out = self
            .kubectl()
            .args(["create", "token", sa, "-n", namespace, "--duration=1h"])
            .output()?;
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        anyhow::ensure!(
            out.status.success() && !token.is_empty(),
            "kubectl create token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = self.dir.join(format!("sa-{namespace}-{sa}.kubeconfig"));
        let ca = self.dir.join("pki/ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {sa}\n  user:\n    token: {token}\ncontexts:\n- name: {sa}\n  \
             context: {{cluster: e2e, user: {sa}, namespace: {namespace}}}\ncurrent-context: {sa}\n",
            self.api_url,
            ca.display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The last `lines` lines of every component's log, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        log_tails(&self.dir, &COMPONENTS, lines)
    }
}

/// The last `lines` lines of `<dir>/<name>.log` for each of `names`, each under a header line.
pub fn log_tails(dir: &Path, names: &[&str], lines: usize) -> String {
    let mut out = String::new();
    for name in names {
        let path = dir.join(format!("{name}.log"));
        out.push_str(&format!("----- {} (last {lines} lines) -----\n", path.display()));
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                for line in &all[all.len().saturating_sub(lines)..] {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            Err(e) => out.push_str(&format!("(unreadable: {e})\n")),
        }
    }
    out
}

/// Runs `e2e/bin/<name>` with `args` and `envs`, its messages going to this process's stderr;
/// returns its stdout, or fails naming the script when it fails.
pub fn run_script(name: &str, args: &[&std::ffi::OsStr], envs: &[(&str, &str)]) -> anyhow::Result<String> {
    let script = repo_root().join("e2e/bin").join(name);
    let out = Command::new(&script)
        .args(args)
        .envs(envs.iter().copied())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); see the messages above",
            script.display(),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last line of `e2e/bin/<name>`'s output, which the build and install scripts make the folder
/// (or file) they produced.
pub fn script_last_line(name: &str) -> anyhow::Result<String> {
    let out = run_script(name, &[], &[])?;
    out.lines()
        .last()
        .map(|l| l.trim().to_string())
        .ok_or_else(|| anyhow!("e2e/bin/{name} printed nothing"))
}

async fn client_from(path: &Path) -> anyhow::Result<kube::Client> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The `KEY=value` lines the harness scripts write (`cluster-up`, `node-up`, `s3-up`,
/// `interlink-up`), with quotes around a value dropped.
#[derive(Clone, Debug)]
pub struct EnvFile {
    path: PathBuf,
    vars: std::collections::BTreeMap<String, String>,
}

impl EnvFile {
    /// Reads `path`.
    pub fn read(path: &Path) -> anyhow::Result<EnvFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Ok(EnvFile {
            path: path.to_path_buf(),
            vars,
        })
    }

    /// The value of `key`, or an error naming the file.
    pub fn get(&self, key: &str) -> anyhow::Result<String> {
        self.vars
            .get(key)
            .cloned()
            .ok_or_else(|| anyhow!("{} has no {key}", self.path.display()))
    }
}

/// The workspace root (this crate lives in `<root>/e2e`).
pub fn repo_root() -> PathBuf {
    // At run time first: cargo sets it for the test binaries it runs, and the compile-time value
    // is stale when a cached build of this crate was made in another checkout (CI's clones share
    // one target folder and reuse a library whose sources did not change).
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a workspace binary (e.g. `offload-operator`), built next to the test binary.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build -p offload-operator` first (make e2e does)",
            path.display()
        );
    }
    Ok(path)
}
