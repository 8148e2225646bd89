//! The HTTP(S) server: interLink's routes, auth, latency, faults, and the debug routes.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Request, State as AxState},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use k8s_openapi::api::core::v1::Pod;
use offload_operator::interlink::wire::{
    CreateStruct, LogStruct, PingAccelerator, PingResources, PingResponse, PingTaint, PodCreateRequests,
    PodStatus,
};
use serde::Deserialize;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    faults::{Fault, FaultKind},
    runner::{RunSpec, run_pod},
    state::{GpuSpec, SimContainer, SimPod, State, Stats, waiting},
};

/// TLS certificate and key (PEM files), and optionally the CA that client certificates must chain
/// to (mutual TLS: a client without a valid certificate is refused during the handshake).
#[derive(Clone, Debug)]
pub struct Tls {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA for client certificates; `None`: no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

impl Tls {
    async fn rustls(&self) -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let Some(ca) = &self.client_ca else {
            return Ok(axum_server::tls_rustls::RustlsConfig::from_pem_file(&self.cert, &self.key).await?);
        };
        let certs = CertificateDer::pem_file_iter(&self.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)? {
            roots.add(c?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
            config,
        )))
    }
}

/// Numbers the default work folders of the simulators of one process.
static NEXT_SIM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How the simulated site behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address to listen on (port 0: a free port).
    pub listen: SocketAddr,
    /// Folder for per-pod folders (volumes, logs).
    pub work_dir: PathBuf,
    /// Pods that run at once; the rest wait in the queue.
    pub slots: usize,
    /// Extra wait before a pod with a slot starts.
    pub queue_delay: Duration,
    /// Run every pod as timers instead of processes.
    pub simulate: bool,
    /// Declared CPU, memory and pods, returned by `/pinglink`.
    pub cpu: Option<String>,
    /// Memory.
    pub memory: Option<String>,
    /// Pods.
    pub pods: Option<String>,
    /// GPUs.
    pub gpus: Vec<GpuSpec>,
    /// Answer `/pinglink` with `[]` like plugins older than interLink 0.6.2.
    pub legacy_ping: bool,
    /// Delay before every answer.
    pub latency: Duration,
    /// Required bearer token.
    pub token: Option<String>,
    /// Serve HTTPS.
    pub tls: Option<Tls>,
    /// Fail one request in every N with a 500 (0: never).
    pub every_nth_error: u64,
    /// Listen on this unix socket instead of TCP (no TLS, no outages).
    pub unix_socket: Option<PathBuf>,
    /// Remove `work_dir` when the simulator is dropped (tests leave nothing behind).
    pub remove_work_dir: bool,
    /// Answer as interLink 0.6.2's API server in front of the SLURM plugin 0.6.2-pre5 does
    /// (docs/interlink-compatibility.md): no status for a pod's first `SLURM_STATUS_LAG`, then no
    /// job id and `waiting: {}` without a reason while queued; a pod it does not know is echoed
    /// back with empty container states; deleting one answers a bare 500; `/pinglink` answers
    /// `sinfo -s` text.
    pub slurm_plugin: bool,
}

/// How long a new pod is absent from status answers in `slurm_plugin` mode (the plugin runs
/// `squeue` at most every 10 s; shorter here to keep tests quick).
pub const SLURM_STATUS_LAG: Duration = Duration::from_secs(3);

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            // One folder per simulator: a simulator that is dropped removes its folder, and must
            // not take the pods of another one in the same process with it.
            work_dir: std::env::temp_dir().join(format!(
                "offload-sitesim-{}-{}",
                std::process::id(),
                NEXT_SIM.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            slots: 8,
            queue_delay: Duration::ZERO,
            simulate: false,
            cpu: None,
            memory: None,
            pods: None,
            gpus: Vec::new(),
            legacy_ping: false,
            latency: Duration::ZERO,
            token: None,
            tls: None,
            every_nth_error: 0,
            unix_socket: None,
            remove_work_dir: true,
            slurm_plugin: false,
        }
    }
}

#[derive(Clone)]
struct App {
    state: State,
    config: Arc<SimConfig>,
    down: Arc<Mutex<Option<watch::Sender<Option<Duration>>>>>,
}

/// A running simulator.
pub struct SimHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>` or `https://...`.
    pub url: String,
    state: State,
    down: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
    cleanup: Option<PathBuf>,
}

impl SimHandle {
    /// Starts the simulator.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimHandle> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        std::fs::create_dir_all(&config.work_dir)?;
        let state = State::new(config.slots);
        state.lock().faults.every_nth_error = config.every_nth_error;
        let (down_tx, down_rx) = watch::channel(None);
        let app = App {
            state: state.clone(),
            config: Arc::new(config.clone()),
            down: Arc::new(Mutex::new(Some(down_tx.clone()))),
        };
        if let Some(path) = &config.unix_socket {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            let router = router(app);
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!("unix socket server failed: {e}");
                }
            });
            let addr = SocketAddr::from(([127, 0, 0, 1], 0));
            let url = format!("unix://{}", path.display());
            let cleanup = config.remove_work_dir.then(|| config.work_dir.clone());
            return Ok(SimHandle {
                addr,
                url,
                state,
                down: down_tx,
                task,
                cleanup,
            });
        }
        let listener = std::net::TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let scheme = if config.tls.is_some() { "https" } else { "http" };
        let router = router(app);
        let tls = match &config.tls {
            Some(t) => Some(t.rustls().await?),
            None => None,
        };
        let task = tokio::spawn(serve_loop(listener, addr, router, tls, down_rx));
        let cleanup = config.remove_work_dir.then(|| config.work_dir.clone());
        Ok(SimHandle {
            addr,
            url: format!("{scheme}://{addr}"),
            state,
            down: down_tx,
            task,
            cleanup,
        })
    }

    /// Request counts so far.
    pub fn stats(&self) -> Stats {
        self.state.lock().stats.clone()
    }

    /// Queues an injected failure.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    /// Drops every queued injected failure (requests already held keep their delay).
    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    /// Stops accepting connections for `d` (connections are refused), then comes back.
    pub fn go_down(&self, d: Duration) {
        let _ = self.down.send(Some(d));
    }

    /// Forgets every pod the site has, stopping their processes, as a site that lost its state
    /// (a purge, a restart without persistence) would. Returns how many there were.
    pub fn forget_all(&self) -> usize {
        let mut inner = self.state.lock();
        let pods: Vec<_> = inner.pods.drain().collect();
        for (_, p) in &pods {
            let _ = p.cancel.send(true);
        }
        pods.len()
    }

    /// Sets the queue delay of pods created from now on (also `POST /debug/queue-delay
    /// {"seconds": N}`).
    pub fn set_queue_delay(&self, d: Duration) {
        self.state.lock().queue_delay = Some(d);
    }

    /// Accepts only this bearer token from now on (`None`: any), as a site whose credential was
    /// rotated.
    pub fn set_token(&self, token: Option<String>) {
        self.state.lock().token = Some(token);
    }

    /// Sends these taints with every `/pinglink` answer from now on (`None`: no `taints` key), as
    /// an interLink 0.6.2 site whose admin or plugin taints its node.
    pub fn set_ping_taints(&self, taints: Option<Vec<PingTaint>>) {
        self.state.lock().ping_taints = taints;
    }

    /// Number of pods the site knows.
    pub fn pod_count(&self) -> usize {
        self.state.lock().pods.len()
    }

    /// Waits until the server task ends (never, unless it failed).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await?;
        Ok(())
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
        for pod in self.state.lock().pods.values() {
            let _ = pod.cancel.send(true);
        }
        if let Some(dir) = &self.cleanup {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Serves until told to go down, then refuses connections for a while and serves again on the same
/// address.
async fn serve_loop(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    router: Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    mut down: watch::Receiver<Option<Duration>>,
) {
    let mut listener = Some(listener);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => {
                match std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("cannot listen on {addr} again: {e}");
                        return;
                    }
                }
            }
        };
        let handle = axum_server::Handle::new();
        let service = router.clone().into_make_service();
        let server = {
            let handle = handle.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let result = match tls {
                    Some(tls) => match axum_server::from_tcp_rustls(l, tls) {
                        Ok(s) => s.handle(handle).serve(service).await,
                        Err(e) => Err(e),
                    },
                    None => match axum_server::from_tcp(l) {
                        Ok(s) => s.handle(handle).serve(service).await,
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = result {
                    tracing::error!("server on {addr} failed: {e}");
                }
            })
        };
        let pause = loop {
            if down.changed().await.is_err() {
                let _ = server.await;
                return;
            }
            if let Some(d) = *down.borrow_and_update() {
                break d;
            }
        };
        handle.shutdown();
        let _ = server.await;
        tracing::info!("down for {pause:?}");
        tokio::time::sleep(pause).await;
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/create", any(create))
        .route("/delete", any(delete))
        .route("/status", any(status))
        .route("/getLogs", any(logs))
        .route("/pinglink", any(ping))
        .route("/updateCache", any(|| async { "Updated cache" }))
        .layer(middleware::from_fn_with_state(app.clone(), gate))
        .route("/debug/stats", get(stats))
        .route("/debug/faults", post(add_fault).delete(clear_faults))
        .route("/debug/down", post(go_down))
        .route("/debug/queue-delay", post(set_queue_delay))
        .with_state(app)
}

/// Latency, bearer token, injected faults.
async fn gate(AxState(app): AxState<App>, req: Request, next: Next) -> Response {
    if !app.config.latency.is_zero() {
        tokio::time::sleep(app.config.latency).await;
    }
    let required = app
        .state
        .lock()
        .token
        .clone()
        .unwrap_or_else(|| app.config.token.clone());
    if let Some(token) = &required {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if sent != Some(format!("Bearer {token}").as_str()) {
            app.state.lock().stats.unauthorized += 1;
            return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
        }
    }
    let op = req.uri().path().trim_start_matches('/').to_string();
    let fault = app.state.lock().faults.take(&op);
    match fault {
        None => next.run(req).await,
        Some(FaultKind::Status { code, body }) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
            .into_response(),
        Some(FaultKind::Delay { millis }) => {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            next.run(req).await
        }
        Some(FaultKind::SlowAnswer { millis }) => {
            let resp = next.run(req).await;
            tokio::time::sleep(Duration::from_millis(millis)).await;
            resp
        }
        Some(FaultKind::Garbage) => {
            let _ = next.run(req).await;
            (StatusCode::OK, "}{ this is not json").into_response()
        }
        Some(FaultKind::LoseAnswer) => {
            let _ = next.run(req).await;
            (StatusCode::SERVICE_UNAVAILABLE, "").into_response()
        }
    }
}

/// interLink's error text for a failed call.
fn site_error(code: StatusCode, what: &str) -> Response {
    (
        code,
        format!(
            "HTTP InterLink session sitesim: call exit status: {}. Body: {what}",
            code.as_u16()
        ),
    )
        .into_response()
}

async fn create(AxState(app): AxState<App>, body: Bytes) -> Response {
    let request: PodCreateRequests = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return site_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot decode the pod: {e}"),
            );
        }
    };
    let uid = request.pod.metadata.uid.clone().unwrap_or_default();
    if uid.is_empty() {
        return site_error(StatusCode::GATEWAY_TIMEOUT, "the pod has no UID");
    }
    let pod_spec = request.pod.spec.clone().unwrap_or_default();
    let dir = app.config.work_dir.join(&uid);
    let mut inner = app.state.lock();
    *inner.stats.creates_per_uid.entry(uid.clone()).or_default() += 1;
    for secret in &request.secrets {
        inner.stats.secrets_received.insert(format!(
            "{}/{}",
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            secret.metadata.name.as_deref().unwrap_or_default()
        ));
    }
    if let Some(existing) = inner.pods.get(&uid) {
        // A second submission of the same pod: counted above, answered with the same job.
        return Json(CreateStruct {
            pod_uid: uid,
            pod_jid: existing.jid.clone(),
        })
        .into_response();
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return site_error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("cannot prepare the job folder: {e}"),
        );
    }
    inner.next_jid += 1;
    let jid = inner.next_jid.to_string();
    let queued = || waiting("Queued", "waiting for a free slot at the site");
    let to_sim = |c: &k8s_openapi::api::core::v1::Container| SimContainer {
        name: c.name.clone(),
        state: queued(),
        log: dir.join(format!("{}.log", c.name)),
    };
    let (cancel, cancel_rx) = watch::channel(false);
    inner.pods.insert(
        uid.clone(),
        SimPod {
            name: request.pod.metadata.name.clone().unwrap_or_default(),
            namespace: request.pod.metadata.namespace.clone().unwrap_or_default(),
            jid: jid.clone(),
            init: pod_spec.init_containers.iter().flatten().map(to_sim).collect(),
            containers: pod_spec.containers.iter().map(to_sim).collect(),
            cancel,
            created: std::time::Instant::now(),
        },
    );
    drop(inner);
    let spec = RunSpec {
        uid: uid.clone(),
        dir,
        queue_delay: app.state.lock().queue_delay.unwrap_or(app.config.queue_delay),
        simulate: app.config.simulate,
    };
    tokio::spawn(run_pod(app.state.clone(), spec, request, cancel_rx));
    Json(CreateStruct {
        pod_uid: uid,
        pod_jid: jid,
    })
    .into_response()
}

async fn delete(AxState(app): AxState<App>, body: Bytes) -> Response {
    let pod: Pod = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return site_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot decode the pod: {e}"),
            );
        }
    };
    let uid = pod.metadata.uid.unwrap_or_default();
    let mut inner = app.state.lock();
    inner.stats.deletes += 1;
    match inner.pods.remove(&uid) {
        Some(p) => {
            let _ = p.cancel.send(true);
        }
        // The SLURM plugin finds no job folder and answers a bare 500.
        None if app.config.slurm_plugin => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        None => {}
    }
    "All containers for submitted Pods have been deleted".into_response()
}

async fn status(AxState(app): AxState<App>, body: Bytes) -> Response {
    // interLink: an undecodable body is treated as `[]` (the whole cache).
    let pods: Vec<Pod> = serde_json::from_slice(&body).unwrap_or_default();
    let mut inner = app.state.lock();
    inner.stats.status_requests += 1;
    inner.stats.status_pods += pods.len() as u64;
    inner.stats.max_pods_per_status = inner.stats.max_pods_per_status.max(pods.len() as u64);
    let slurm = app.config.slurm_plugin;
    let out: Vec<PodStatus> = if pods.is_empty() {
        inner.pods.iter().map(|(uid, p)| p.status(uid)).collect()
    } else {
        pods.iter()
            .filter_map(|p| {
                let uid = p.metadata.uid.as_deref()?;
                match inner.pods.get(uid) {
                    Some(sim) if slurm && sim.created.elapsed() < SLURM_STATUS_LAG => None,
                    Some(sim) => Some(sim.status(uid)),
                    None if slurm => Some(unknown_pod(p)),
                    None => None,
                }
            })
            .collect()
    };
    if !slurm {
        return Json(out).into_response();
    }
    // The plugin fills no job id and gives no reason while a job waits in the queue.
    let out: Vec<PodStatus> = out
        .into_iter()
        .map(|mut s| {
            s.jid.clear();
            for c in s.containers.iter_mut().chain(s.init_containers.iter_mut()) {
                if let Some(w) = c.state.waiting.as_mut() {
                    *w = Default::default();
                }
            }
            s
        })
        .collect();
    if out.is_empty() {
        return "null".into_response();
    }
    Json(out).into_response()
}

/// What the SLURM plugin answers for a pod it has no job for: the pod, with empty states.
fn unknown_pod(p: &Pod) -> PodStatus {
    let names = |list: Option<&Vec<k8s_openapi::api::core::v1::Container>>| {
        list.into_iter()
            .flatten()
            .map(|c| offload_operator::interlink::wire::ContainerStatus {
                name: c.name.clone(),
                ..Default::default()
            })
            .collect()
    };
    let spec = p.spec.as_ref();
    PodStatus {
        name: p.metadata.name.clone().unwrap_or_default(),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        jid: String::new(),
        containers: names(spec.map(|s| &s.containers)),
        init_containers: names(spec.and_then(|s| s.init_containers.as_ref())),
    }
}

async fn ping(AxState(app): AxState<App>) -> Response {
    app.state.lock().stats.pings += 1;
    let c = &app.config;
    if c.slurm_plugin {
        return "PARTITION AVAIL  TIMELIMIT   NODES(A/I/O/T) NODELIST\ndebug*       up   infinite          0/1/0/1 sitesim\n"
            .into_response();
    }
    if c.legacy_ping {
        return "[]".into_response();
    }
    let q = |s: &Option<String>| {
        s.clone()
            .map(k8s_openapi::apimachinery::pkg::api::resource::Quantity)
    };
    Json(PingResponse {
        status: Some("ok".into()),
        resources: Some(PingResources {
            cpu: q(&c.cpu),
            memory: q(&c.memory),
            pods: q(&c.pods),
            accelerators: c
                .gpus
                .iter()
                .map(|g| PingAccelerator {
                    resource_type: g.resource_type.clone(),
                    available: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                        g.count.to_string(),
                    )),
                    model: Some(g.model.clone()),
                })
                .collect(),
        }),
        taints: app.state.lock().ping_taints.clone(),
    })
    .into_response()
}

async fn logs(AxState(app): AxState<App>, body: Bytes) -> Response {
    app.state.lock().stats.log_requests += 1;
    let req: LogStruct = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("invalid log request: {e}")).into_response(),
    };
    if let Err(e) = req.opts.validate() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    let (log, done) = {
        let inner = app.state.lock();
        let Some(c) = inner
            .pods
            .get(&req.pod_uid)
            .and_then(|p| p.container(&req.container_name))
        else {
            return site_error(StatusCode::NOT_FOUND, "no such pod or container at the site");
        };
        (c.log.clone(), c.state.terminated.is_some())
    };
    let text = std::fs::read(&log).unwrap_or_default();
    if !req.opts.follow || done {
        return (
            [(header::CONTENT_TYPE, "text/plain")],
            select(&text, req.opts.tail, req.opts.bytes),
        )
            .into_response();
    }
    // Follow: what is there, then what is appended, until the container ends.
    let first = select(&text, req.opts.tail, 0);
    let offset = text.len();
    let state = app.state.clone();
    let stream = futures::stream::unfold((Some(first), offset, false), move |(first, offset, finished)| {
        let (state, log, uid, name) = (
            state.clone(),
            log.clone(),
            req.pod_uid.clone(),
            req.container_name.clone(),
        );
        async move {
            if let Some(first) = first {
                return Some((Ok::<_, std::io::Error>(Bytes::from(first)), (None, offset, false)));
            }
            if finished {
                return None;
            }
            loop {
                let ended = {
                    let inner = state.lock();
                    inner
                        .pods
                        .get(&uid)
                        .and_then(|p| p.container(&name))
                        .is_none_or(|c| c.state.terminated.is_some())
                };
                let data = std::fs::read(&log).unwrap_or_default();
                if data.len() > offset {
                    let chunk = Bytes::copy_from_slice(&data[offset..]);
                    return Some((Ok(chunk), (None, data.len(), ended)));
                }
                if ended {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    ([(header::CONTENT_TYPE, "text/plain")], Body::from_stream(stream)).into_response()
}

/// The last `tail` lines, or the first `bytes` bytes (kubectl's `--limit-bytes`).
fn select(text: &[u8], tail: i64, bytes: i64) -> Vec<u8> {
    if bytes > 0 {
        return text[..text.len().min(bytes as usize)].to_vec();
    }
    if tail > 0 {
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        return lines[lines.len().saturating_sub(tail as usize)..].concat();
    }
    text.to_vec()
}

async fn stats(AxState(app): AxState<App>) -> Json<Stats> {
    Json(app.state.lock().stats.clone())
}

async fn add_fault(AxState(app): AxState<App>, Json(fault): Json<Fault>) -> StatusCode {
    app.state.lock().faults.push(fault);
    StatusCode::NO_CONTENT
}

async fn clear_faults(AxState(app): AxState<App>) -> StatusCode {
    app.state.lock().faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Down {
    seconds: f64,
}

async fn go_down(AxState(app): AxState<App>, _headers: HeaderMap, Json(d): Json<Down>) -> StatusCode {
    let guard = app.down.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = guard.as_ref() {
        let _ = tx.send(Some(Duration::from_secs_f64(d.seconds.max(0.0))));
    }
    StatusCode::ACCEPTED
}

#[derive(Deserialize)]
struct QueueDelay {
    seconds: f64,
}

/// Sets the queue delay of pods created from now on: a site slowing down (or speeding up) at run
/// time.
async fn set_queue_delay(AxState(app): AxState<App>, Json(d): Json<QueueDelay>) -> StatusCode {
    app.state.lock().queue_delay = Some(Duration::from_secs_f64(d.seconds.clamp(0.0, 86_400.0)));
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::select;

    #[test]
    fn tail_and_limit_bytes() {
        let text = b"a\nb\nc\n";
        assert_eq!(select(text, 2, 0), b"b\nc\n");
        assert_eq!(select(text, 0, 3), b"a\nb");
        assert_eq!(select(text, 0, 0), text);
        assert_eq!(select(text, 10, 0), text);
    }
}
