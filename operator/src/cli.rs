//! The command line: its arguments and what each command does. `main.rs` only parses and calls
//! [`main`].

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};

use crate::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(name = "offload-operator", version, about)]
pub struct Cli {
    /// Kubeconfig file; default: in-cluster configuration, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long, global = true, env = "OFFLOAD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OFFLOAD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, in RUST_LOG syntax.
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    pub log_filter: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator: the site controller, node leases, the offload scheduler, and the
    /// metrics/health server.
    Run(Box<RunArgs>),
    /// Print where the offload scheduler would place a pod now, and why, without binding it.
    Explain {
        /// A pod manifest (YAML or JSON; `-` for stdin).
        #[arg(short = 'f', long = "filename", conflicts_with = "pod")]
        file: Option<PathBuf>,
        /// An existing pod, as `namespace/name`.
        #[arg(long)]
        pod: Option<String>,
        /// Only sites and policies with these labels, as the operator's `--site-selector`.
        #[arg(long)]
        site_selector: Option<String>,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Connect to the cluster with the operator's identity and report what it can reach.
    Check,
    /// Print the CustomResourceDefinitions as YAML (`offload-operator crds | kubectl apply -f -`),
    /// or write one file per CRD into a folder.
    Crds {
        /// Write `<group>_<plural>.yaml` files into this folder instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Print the field reference (docs/crds.md) as Markdown instead.
        #[arg(long, conflicts_with = "out_dir")]
        reference: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The operator's namespace: site credentials (Secrets, ConfigMaps) are read here only.
    #[arg(long, env = "POD_NAMESPACE", default_value = "offload-system")]
    pub namespace: String,
    /// Address of the metrics and health server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Address written into each virtual Node for its kubelet API (logs).
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    pub kubelet_address: String,
    /// Port of the kubelet API (`kubectl logs`): written into each virtual Node and served here.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: i32,
    /// Serving certificate (PEM) of the kubelet API; without the three kubelet TLS flags the
    /// endpoint is off and `kubectl logs` does not work for offloaded pods.
    #[arg(long, requires_all = ["kubelet_tls_key", "kubelet_client_ca"])]
    pub kubelet_tls_cert: Option<PathBuf>,
    /// Key of the kubelet serving certificate.
    #[arg(long)]
    pub kubelet_tls_key: Option<PathBuf>,
    /// CA of the client certificates accepted by the kubelet API (kube-apiserver's
    /// `--kubelet-client-certificate` issuer).
    #[arg(long)]
    pub kubelet_client_ca: Option<PathBuf>,
    /// How the kubelet API authorises its authenticated callers, as a kubelet's
    /// `--authorization-mode`: `webhook` asks the API server (SubjectAccessReview for `nodes/proxy`,
    /// cached), `always-allow` lets every caller with a certificate from the CA or a valid token in.
    #[arg(long, value_enum, default_value_t = crate::kubelet::auth::Mode::Webhook)]
    pub kubelet_authorization_mode: crate::kubelet::auth::Mode,
    /// Only manage OffloadSites, OffloadPolicies and RemoteJobs matching this label selector
    /// (sharding, tests). Pods naming a policy or site outside it are left to another operator.
    #[arg(long)]
    pub site_selector: Option<String>,
    /// Seconds between node lease renewals (a kubelet's default is 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=30))]
    pub node_lease_renew_seconds: u64,
    /// Run as one of several replicas: only the holder of the Lease `--leader-elect-lease` (in
    /// `--namespace`) schedules, creates, deletes and syncs; the others stay ready with warm
    /// caches and take over when it stops.
    #[arg(long, env = "OFFLOAD_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader Lease, in the operator's namespace. Operators sharded with
    /// `--site-selector` need one name each.
    #[arg(long, default_value = "offload-operator")]
    pub leader_elect_lease: String,
    /// Seconds a standby waits for a silent leader before it takes over (the Lease's duration).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=600))]
    pub leader_elect_lease_duration_seconds: u64,
    /// The leader stops acting when it could not renew the Lease for this many seconds; shorter
    /// than the lease duration, so it stops before a standby may take over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub leader_elect_renew_deadline_seconds: u64,
    /// Seconds between a standby's reads of the Lease, and between the leader's renewals; a
    /// released Lease is taken over within about this long.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub leader_elect_retry_period_seconds: u64,
    /// This replica's identity in the Lease, to which a random suffix is added; default: the pod
    /// name, else the host name.
    #[arg(long, env = "POD_NAME")]
    pub leader_elect_identity: Option<String>,
    /// Address of the pod-mutating admission webhook (HTTPS; on with `--webhook-tls-cert` and
    /// `--webhook-tls-key`): pods annotated `offload.dev/offload: "true"` or
    /// `offload.dev/policy`, or created in a namespace labelled `offload.dev/offload=enabled`,
    /// are given the offload scheduler (ADR 0012).
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub webhook_addr: std::net::SocketAddr,
    /// Serving certificate (PEM) of the webhook, reloaded when the file changes.
    #[arg(long, requires = "webhook_tls_key")]
    pub webhook_tls_cert: Option<PathBuf>,
    /// Key of the webhook's serving certificate.
    #[arg(long, requires = "webhook_tls_cert")]
    pub webhook_tls_key: Option<PathBuf>,
    /// Keep one Kueue ResourceFlavor per OffloadSite (`offload-<site>`), so ClusterQueues can give
    /// quota on sites, and answer AdmissionChecks of `offload.dev/site-capacity` (needs Kueue's
    /// CRDs and the RBAC in docs/kueue.md).
    #[arg(long, env = "OFFLOAD_KUEUE")]
    pub kueue: bool,
    /// Image of the stage tool (`offload-stage`) that RemoteJob pods with inputs or outputs run
    /// as their first init container; the operator's own image ships it (ADR 0014).
    #[arg(long, env = "OFFLOAD_STAGE_IMAGE", default_value = concat!("ghcr.io/offload-operator/offload-operator:", env!("CARGO_PKG_VERSION")))]
    pub stage_image: String,
    /// Seconds a RemoteJob's data transfer may receive nothing before the stage tool fails it
    /// (`StageInFailed`, `OutputUploadFailed`) and the attempt is retried.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stage_read_timeout_seconds: u64,
    /// RemoteJob outputs larger than this many MiB are uploaded in parts of this size (S3
    /// multipart: parts of 5 MiB to 5 GiB). The stage tool holds about three parts in memory.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(5..=5120))]
    pub stage_part_size_mib: u64,
    /// Seconds between two passes that ask each site what jobs it holds and delete there those
    /// whose pod no longer exists (a pass also runs when this replica starts leading).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..=86400))]
    pub orphan_sweep_seconds: u64,
    /// Seconds a job must be seen at its site without a pod in the cluster before it is deleted
    /// there (a pod being created, a watch cache that lags).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub orphan_grace_seconds: u64,
    /// Object-store endpoints the operator may call to check RemoteJob outputs although they are
    /// loopback, link-local or cluster-internal (host names, addresses or CIDR ranges, comma
    /// separated). Others are checked from the operator's network position only when public or
    /// private-range addresses.
    #[arg(long, env = "OFFLOAD_DATA_ENDPOINTS_ALLOWED", value_delimiter = ',')]
    pub data_endpoints_allowed: Vec<String>,
}

impl RunArgs {
    /// The leader elector, if `--leader-elect` is set and its timing is sound.
    fn elector(&self, client: &kube::Client) -> Result<Option<crate::leader::Elector>, String> {
        if !self.leader_elect {
            return Ok(None);
        }
        let timing = crate::leader::Timing {
            duration: std::time::Duration::from_secs(self.leader_elect_lease_duration_seconds),
            renew_deadline: std::time::Duration::from_secs(self.leader_elect_renew_deadline_seconds),
            retry: std::time::Duration::from_secs(self.leader_elect_retry_period_seconds),
        };
        timing.validate()?;
        let base = self
            .leader_elect_identity
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "offload-operator".into());
        Ok(Some(crate::leader::Elector::new(
            client.clone(),
            &self.namespace,
            &self.leader_elect_lease,
            crate::leader::identity(&base),
            timing,
        )))
    }
}

/// Runs the command line `cli` (after the crypto provider is installed).
pub async fn main(cli: Cli) -> ExitCode {
    if let Err(err) = telemetry::init(cli.log_format, &cli.log_filter) {
        eprintln!("offload-operator: cannot set up logging: {err}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Check => check(cli.kubeconfig).await,
        Command::Run(args) => run(cli.kubeconfig, *args).await,
        Command::Explain {
            file,
            pod,
            site_selector,
            json,
        } => explain(cli.kubeconfig, file, pod, site_selector, json).await,
        Command::Crds { reference: true, .. } => emit(&crate::crd::reference::markdown()),
        Command::Crds { out_dir, .. } => print_crds(out_dir.as_deref()),
    }
}

/// Writes `text` to stdout. A reader that went away (`| head`) ends the output quietly; other
/// write errors fail the command (the `print!` macros would panic on both).
fn emit(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offload-operator: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds(out_dir: Option<&std::path::Path>) -> ExitCode {
    let mut all = String::new();
    for crd in crate::crd::crds() {
        let yaml = match crate::crd::to_yaml(&crd) {
            Ok(y) => y,
            Err(err) => {
                eprintln!("offload-operator: cannot render {}: {err}", crd.spec.names.kind);
                return ExitCode::FAILURE;
            }
        };
        match out_dir {
            Some(dir) => {
                let path = dir.join(crate::crd::file_name(&crd));
                if let Err(err) = std::fs::write(&path, yaml) {
                    eprintln!("offload-operator: cannot write {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            None => {
                all.push_str("---\n");
                all.push_str(&yaml);
            }
        }
    }
    emit(&all)
}

async fn run(kubeconfig: Option<PathBuf>, args: RunArgs) -> ExitCode {
    use crate::{controller, metrics::Metrics, server};
    let client = match crate::kubeclient::client(kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(err) => {
            tracing::error!(error = %err, "cannot register metrics");
            return ExitCode::FAILURE;
        }
    };
    let elector = match args.elector(&client) {
        Ok(e) => e,
        Err(err) => {
            tracing::error!("invalid leader election settings: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(e) = &elector {
        tracing::info!(identity = e.identity(), lease = %args.leader_elect_lease, "leader election on");
    }
    let health = server::Health::default();
    let (addr, _server) = match server::serve(args.metrics_addr, metrics.clone(), health.clone()).await {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, addr = %args.metrics_addr, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, namespace = %args.namespace, "offload-operator running; metrics on http://{addr}/metrics");
    let webhook = match (&args.webhook_tls_cert, &args.webhook_tls_key) {
        (Some(cert), Some(key)) => {
            let tls = crate::webhook::WebhookTls {
                cert: cert.clone(),
                key: key.clone(),
            };
            match crate::webhook::serve(args.webhook_addr, &tls, metrics.clone()).await {
                Ok((addr, task)) => {
                    tracing::info!(%addr, "admission webhook on HTTPS");
                    Some(task)
                }
                Err(err) => {
                    tracing::error!(error = %err, addr = %args.webhook_addr, "cannot start the admission webhook");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let kubelet_ip = args.kubelet_address.clone();
    let settings = controller::Settings {
        namespace: args.namespace,
        kubelet: controller::node::KubeletEndpoint {
            address: args.kubelet_address,
            port: args.kubelet_port,
        },
        site_selector: args.site_selector,
        lease_renew: std::time::Duration::from_secs(args.node_lease_renew_seconds),
        webhook: webhook.is_some(),
        kueue: args.kueue,
        stage: controller::remote_job::data::StageSettings {
            image: args.stage_image,
            read_timeout_seconds: args.stage_read_timeout_seconds,
            part_size_mib: args.stage_part_size_mib,
        },
        data_endpoints_allowed: args.data_endpoints_allowed,
        orphans: controller::execution::orphans::OrphanTiming {
            every: std::time::Duration::from_secs(args.orphan_sweep_seconds),
            grace: std::time::Duration::from_secs(args.orphan_grace_seconds),
        },
    };
    let ctx = controller::Context::start(client.clone(), settings, metrics, health);
    match (
        args.kubelet_tls_cert,
        args.kubelet_tls_key,
        args.kubelet_client_ca,
    ) {
        (Some(cert), Some(key), Some(client_ca)) => {
            let tls = crate::kubelet::KubeletTls { cert, key, client_ca };
            // Listen on the address the Nodes advertise (the pod IP in a cluster, loopback in tests).
            let ip = kubelet_ip.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            let listen = std::net::SocketAddr::new(ip, args.kubelet_port as u16);
            if let Err(err) = crate::kubelet::serve(
                listen,
                &tls,
                client,
                ctx.registry.clone(),
                args.kubelet_authorization_mode,
            )
            .await
            {
                tracing::error!(error = %err, "cannot start the kubelet endpoint");
                return ExitCode::FAILURE;
            }
            tracing::info!(
                port = args.kubelet_port,
                "kubelet endpoint (kubectl logs) on HTTPS"
            );
        }
        _ => tracing::warn!("no kubelet TLS configured: kubectl logs is unavailable for offloaded pods"),
    }
    controller::run(ctx, elector).await;
    tracing::info!("shutting down");
    ExitCode::SUCCESS
}

async fn explain(
    kubeconfig: Option<PathBuf>,
    file: Option<PathBuf>,
    pod: Option<String>,
    selector: Option<String>,
    json: bool,
) -> ExitCode {
    use k8s_openapi::api::core::v1::Pod;
    let fail = |msg: String| {
        eprintln!("offload-operator explain: {msg}");
        ExitCode::FAILURE
    };
    let client = match crate::kubeclient::client(kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(err) => return fail(err.to_string()),
    };
    let pod: Pod = match (file, pod) {
        (Some(path), _) => {
            let text = if path.as_os_str() == "-" {
                let mut s = String::new();
                match std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                    Ok(_) => s,
                    Err(e) => return fail(format!("cannot read stdin: {e}")),
                }
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(s) => s,
                    Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
                }
            };
            match serde_saphyr::from_str(&text) {
                Ok(p) => p,
                Err(e) => return fail(format!("not a pod manifest: {e}")),
            }
        }
        (None, Some(id)) => {
            let Some((ns, name)) = id.split_once('/') else {
                return fail(format!("{id:?} is not namespace/name"));
            };
            match Api::<Pod>::namespaced(client.clone(), ns).get(name).await {
                Ok(p) => p,
                Err(e) => return fail(format!("cannot read pod {id}: {e}")),
            }
        }
        (None, None) => return fail("give a manifest (-f) or a pod (--pod namespace/name)".into()),
    };
    let decision = match crate::controller::scheduler::explain(&client, &pod, selector.as_deref()).await {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    if json {
        return emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&decision).unwrap_or_default()
        ));
    }
    emit(&explanation(&decision))
}

/// The human form of `explain`'s answer.
fn explanation(decision: &crate::placement::Decision) -> String {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let mut out = String::new();
    let _ = writeln!(out, "policy: {}", decision.policy);
    let _ = match &decision.chosen {
        Some(site) => writeln!(out, "chosen: {site}"),
        None => writeln!(out, "chosen: none (the pod would stay Pending)"),
    };
    for (resource, model) in &decision.gpu_models {
        let _ = writeln!(out, "gpu model: {model} ({resource})");
    }
    if !decision.ranking.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<32} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9}",
            "SITE", "SCORE", "QUEUE", "COST", "FREE", "GPU", "DATA", "WAIT(s)", "STAGE(s)"
        );
        for r in &decision.ranking {
            let _ = writeln!(
                out,
                "{:<32} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9}",
                r.site,
                r.score,
                r.queue,
                r.cost,
                r.free_capacity,
                r.gpu_fit,
                r.data,
                r.expected_wait_seconds,
                r.stage_in_seconds
            );
        }
    }
    if let Some(other) = &decision.chosen_without_data {
        let _ = writeln!(out, "without the data-locality score: {other}");
    }
    if !decision.rejected.is_empty() {
        let _ = writeln!(out, "\nrejected:");
        for (site, reason) in &decision.rejected {
            let _ = writeln!(out, "  {site}: {reason}");
        }
    }
    out
}

/// Prints the API server's version and whether the identity may list Nodes (the operator needs to).
async fn check(kubeconfig: Option<PathBuf>) -> ExitCode {
    let client = match crate::kubeclient::client(kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(err) => {
            eprintln!("offload-operator: {err}");
            return ExitCode::FAILURE;
        }
    };
    let version = match client.apiserver_version().await {
        Ok(v) => v,
        Err(err) => {
            eprintln!("offload-operator: cannot reach the API server: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("api server: {}", version.git_version);
    match Api::<Node>::all(client)
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => println!("list nodes: allowed"),
        Err(kube::Error::Api(status)) if status.code == 403 => println!("list nodes: forbidden"),
        Err(err) => {
            eprintln!("offload-operator: listing nodes failed: {err}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
