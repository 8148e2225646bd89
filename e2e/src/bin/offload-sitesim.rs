//! `offload-sitesim`: an interLink-compatible site for tests, the demo and benchmarks.
//! Prints `listening on <url>` once it accepts connections.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use offload_e2e::sitesim::{GpuSpec, SimConfig, SimHandle, Tls};

#[derive(Parser, Debug)]
#[command(
    name = "offload-sitesim",
    version,
    about = "An interLink-compatible API server with a simulated batch system"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Folder for per-pod folders (volumes, logs); default a new folder under $TMPDIR.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Pods that run at once; the others queue (reported as waiting, reason `Queued`).
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Extra wait, in seconds, before a pod that has a slot starts.
    #[arg(long, default_value_t = 0.0)]
    queue_delay: f64,
    /// Run containers as timers, not processes (duration and exit code from pod annotations).
    #[arg(long)]
    simulate: bool,
    /// Declared CPU (a quantity), returned by /pinglink.
    #[arg(long)]
    cpu: Option<String>,
    /// Declared memory (a quantity).
    #[arg(long)]
    memory: Option<String>,
    /// Declared pods.
    #[arg(long)]
    pods: Option<String>,
    /// Declared GPUs, `resource:model:count` (e.g. `nvidia.com/gpu:A100:8`); repeatable.
    #[arg(long = "gpu", value_parser = parse_gpu)]
    gpus: Vec<GpuSpec>,
    /// Answer /pinglink with `[]`, like plugins before interLink 0.6.2.
    #[arg(long)]
    legacy_ping: bool,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Require `Authorization: Bearer <token>`, read from this file (trimmed).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS; needs --tls-cert).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Listen on this unix socket instead of TCP.
    #[arg(long, conflicts_with_all = ["tls_cert", "listen"])]
    unix_socket: Option<PathBuf>,
    /// Answer as interLink 0.6.2 in front of its SLURM plugin does (no job ids, a status lag after
    /// create, unknown pods echoed with empty states, a bare 500 on deleting an unknown pod,
    /// `sinfo` text on /pinglink).
    #[arg(long)]
    slurm_plugin: bool,
    /// Fail one request in every N with HTTP 500 (0: never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
}

fn parse_gpu(s: &str) -> Result<GpuSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [resource, model, count] => Ok(GpuSpec {
            resource_type: resource.to_string(),
            model: model.to_string(),
            count: count.parse().map_err(|e| format!("count {count:?}: {e}"))?,
        }),
        _ => Err(format!("{s:?} is not resource:model:count")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let token = match &args.token_file {
        Some(f) => Some(std::fs::read_to_string(f)?.trim().to_string()),
        None => None,
    };
    let mut config = SimConfig {
        listen: args.listen,
        slots: args.slots,
        queue_delay: Duration::from_secs_f64(args.queue_delay.max(0.0)),
        simulate: args.simulate,
        cpu: args.cpu,
        memory: args.memory,
        pods: args.pods,
        gpus: args.gpus,
        legacy_ping: args.legacy_ping,
        latency: Duration::from_millis(args.latency_ms),
        token,
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| Tls {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        unix_socket: args.unix_socket,
        every_nth_error: args.fail_every,
        slurm_plugin: args.slurm_plugin,
        ..SimConfig::default()
    };
    if let Some(dir) = args.work_dir {
        // A folder the user named is theirs to keep.
        config.work_dir = dir;
        config.remove_work_dir = false;
    }
    let mut sim = SimHandle::start(config).await?;
    println!("listening on {}", sim.url);
    tokio::select! {
        r = sim.wait() => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
