//! HTTP(S) or unix-socket transport to one site, with per-operation timeouts and retries.

use std::{
    fmt,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use reqwest::{Method, header};
use serde::Serialize;

use super::{
    error::{Error, Op},
    wire::{self, CreateStruct, LogStruct, PingResponse, PodCreateRequests, PodStatus},
};

/// Most bytes of a site's answer kept in an error (interLink error texts are short; a proxy's
/// HTML page is not).
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Largest answer read from a site (logs are streamed, not read whole): a status answer for a
/// chunk of 500 pods is about 1 MiB; a site answering far more is broken and must not exhaust the
/// operator's memory.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Per-operation time limits.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// TCP and TLS connection.
    pub connect: Duration,
    /// `/create` (sites submit synchronously: `sbatch` can be slow).
    pub create: Duration,
    /// `/delete`.
    pub delete: Duration,
    /// One `/status` request.
    pub status: Duration,
    /// `/pinglink`.
    pub ping: Duration,
    /// Until the first byte of `/getLogs` (a followed stream then stays open).
    pub logs: Duration,
    /// After a `/create` whose answer was lost, how long to keep asking `/status` whether the
    /// pod was created anyway before submitting it again. interLink's SLURM plugin shows a new
    /// pod only after its next `squeue` (at most 10 s), and submits a second job for a second
    /// create.
    pub create_settle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            create: Duration::from_secs(120),
            delete: Duration::from_secs(60),
            status: Duration::from_secs(60),
            ping: Duration::from_secs(5),
            logs: Duration::from_secs(30),
            create_settle: Duration::from_secs(12),
        }
    }
}

/// Exponential backoff for status, ping, logs and delete (never for a blind create).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// How to reach and trust one site.
#[derive(Clone, Default)]
pub struct SiteConfig {
    /// `http(s)://host[:port][/prefix]` or `unix:///path/to/socket`.
    pub endpoint: String,
    /// Bearer token (trimmed before use).
    pub bearer_token: Option<String>,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and private key, concatenated, for mutual TLS.
    pub client_identity_pem: Option<Vec<u8>>,
    /// Accept any server certificate (test sites only).
    pub insecure_skip_tls_verify: bool,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Retries.
    pub retry: RetryPolicy,
    /// Most pods per `/status` request; larger sets are split.
    pub status_chunk: usize,
}

// Hand-written so the token never reaches a log line.
impl fmt::Debug for SiteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteConfig")
            .field("endpoint", &self.endpoint)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field("client_identity", &self.client_identity_pem.is_some())
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field("timeouts", &self.timeouts)
            .field("retry", &self.retry)
            .field("status_chunk", &self.status_chunk)
            .finish()
    }
}

/// The answer to a ping.
#[derive(Clone, Debug)]
pub struct Ping {
    /// Round-trip time.
    pub latency: Duration,
    /// The body, when it is interLink 0.6.2's `PingResponse`; older plugins answer `[]` or nothing.
    pub response: Option<PingResponse>,
}

/// A client for one site. Cheap to clone; connections are pooled and reused.
#[derive(Clone)]
pub struct SiteClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    timeouts: Timeouts,
    retry: RetryPolicy,
    status_chunk: usize,
}

impl fmt::Debug for SiteClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl SiteClient {
    /// Builds the client; fails on a malformed endpoint or unusable TLS material.
    pub fn new(config: SiteConfig) -> Result<SiteClient, Error> {
        crate::install_crypto_provider();
        let invalid = |message: String| Error::InvalidRequest {
            op: Op::Ping,
            message,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("offload-operator/", env!("CARGO_PKG_VERSION")));
        let base = if let Some(path) = config.endpoint.strip_prefix("unix://") {
            builder = builder.unix_socket(PathBuf::from(path));
            "http://unix".to_string()
        } else if config.endpoint.starts_with("http://") || config.endpoint.starts_with("https://") {
            reqwest::Url::parse(&config.endpoint)
                .map_err(|e| invalid(format!("endpoint {:?} is not a URL: {e}", config.endpoint)))?;
            config.endpoint.trim_end_matches('/').to_string()
        } else {
            return Err(invalid(format!(
                "endpoint {:?} must start with http://, https:// or unix://",
                config.endpoint
            )));
        };
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| invalid(format!("CA bundle is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(invalid("CA bundle holds no certificate".into()));
            }
            builder = builder.tls_certs_only(certs);
        }
        if let Some(pem) = &config.client_identity_pem {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| invalid(format!("client certificate/key is not usable PEM: {e}")))?;
            builder = builder.identity(identity);
        }
        if config.insecure_skip_tls_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        let token = config
            .bearer_token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Ok(SiteClient {
            http,
            base,
            token,
            timeouts: config.timeouts,
            retry: config.retry,
            status_chunk: if config.status_chunk == 0 {
                500
            } else {
                config.status_chunk
            },
        })
    }

    /// `POST /create`, once. A failure after the request left may mean the pod exists at the site:
    /// callers that retry use [`SiteClient::create_idempotent`].
    pub async fn create(&self, request: &PodCreateRequests) -> Result<CreateStruct, Error> {
        let body = self
            .send(Op::Create, Method::POST, Some(request), self.timeouts.create)
            .await?;
        let body = read_body(Op::Create, body, self.timeouts.create).await?;
        let created = wire::decode_create(&body).map_err(|e| decode_error(Op::Create, &e, &body))?;
        if created.pod_jid.is_empty() && created.pod_uid.is_empty() {
            return Err(decode_error(Op::Create, &"neither PodUID nor PodJID", &body));
        }
        Ok(created)
    }

    /// Creates the pod at most once: after a retryable failure it asks the site (status by UID)
    /// whether the pod arrived before sending `/create` again. A 2xx answer that cannot be decoded
    /// is asked about too (the site accepted the request and may run the job) but never resent.
    /// Returns the answer and whether it came from a status lookup (the remote id may then be
    /// empty: some plugins do not report it).
    pub async fn create_idempotent(
        &self,
        request: &PodCreateRequests,
    ) -> Result<(CreateStruct, bool), Error> {
        let uid = request.pod.metadata.uid.clone().unwrap_or_default();
        let mut attempt = 1;
        loop {
            let err = match self.create(request).await {
                Ok(created) => return Ok((created, false)),
                Err(err) => err,
            };
            let garbled = matches!(err, Error::Decode { .. });
            if !err.is_retryable() && !garbled {
                return Err(err);
            }
            // Did the failed request create it anyway? Only a lost answer can have; then the
            // site gets time to show the pod before it is submitted again.
            let settle = if err.may_have_happened() {
                self.timeouts.create_settle
            } else {
                Duration::ZERO
            };
            if let Some(jid) = self.find_created(&request.pod, settle).await {
                return Ok((
                    CreateStruct {
                        pod_uid: uid,
                        pod_jid: jid,
                    },
                    true,
                ));
            }
            if garbled || attempt >= self.retry.attempts {
                return Err(err);
            }
            tokio::time::sleep(crate::jitter::jitter(self.retry.backoff(attempt))).await;
            attempt += 1;
        }
    }

    /// How long a create whose outcome is unknown is given to show up at the site.
    pub fn create_settle(&self) -> Duration {
        self.timeouts.create_settle
    }

    /// The job id of `pod` if the site knows it, asking until `within` has passed.
    pub async fn find_created(&self, pod: &Pod, within: Duration) -> Option<String> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(statuses) = self.status_once(&[pod]).await
                && let Some(found) = statuses.into_iter().find(|s| s.uid == uid && s.is_known())
            {
                return Some(found.jid);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_secs(1))).await;
        }
    }

    /// `DELETE /delete` with the whole pod; retried on transient failures.
    pub async fn delete(&self, pod: &Pod) -> Result<String, Error> {
        self.with_retry(|| async {
            let resp = self
                .send(Op::Delete, Method::DELETE, Some(pod), self.timeouts.delete)
                .await?;
            let body = read_body(Op::Delete, resp, self.timeouts.delete).await?;
            Ok(String::from_utf8_lossy(&body).into_owned())
        })
        .await
    }

    /// Status of many pods: one request per `status_chunk` pods, each retried on transient
    /// failures. An empty list sends nothing (interLink would answer with its whole cache).
    pub async fn status<P: std::borrow::Borrow<Pod>>(&self, pods: &[P]) -> Result<Vec<PodStatus>, Error> {
        let mut out = Vec::new();
        for chunk in pods.chunks(self.status_chunk) {
            // References, so callers holding `Arc<Pod>`s from a cache need not copy the pods.
            let chunk: Vec<&Pod> = chunk.iter().map(|p| p.borrow()).collect();
            out.extend(self.with_retry(|| self.status_once(&chunk)).await?);
        }
        Ok(out)
    }

    /// Every status the site's API server has cached (`/status` with `[]`), for resync.
    pub async fn status_all(&self) -> Result<Vec<PodStatus>, Error> {
        self.with_retry(|| self.status_once(&[])).await
    }

    async fn status_once(&self, pods: &[&Pod]) -> Result<Vec<PodStatus>, Error> {
        // POST rather than the Go VK's GET-with-body: the API server accepts any method, and POST
        // bodies survive proxies and ingresses that drop GET bodies.
        let resp = self
            .send(Op::Status, Method::POST, Some(&pods), self.timeouts.status)
            .await?;
        let body = read_body(Op::Status, resp, self.timeouts.status).await?;
        wire::decode_statuses(&body).map_err(|e| decode_error(Op::Status, &e, &body))
    }

    /// Streams a container's logs (`/getLogs`). The request is retried until the site answers; the
    /// stream itself ends when the site closes it (with `follow`, when the container ends).
    pub async fn logs(
        &self,
        request: &LogStruct,
    ) -> Result<impl Stream<Item = Result<Bytes, Error>> + Send + 'static, Error> {
        request.opts.validate().map_err(|message| Error::InvalidRequest {
            op: Op::Logs,
            message,
        })?;
        let resp = self
            .with_retry(|| self.send(Op::Logs, Method::POST, Some(request), self.timeouts.logs))
            .await?;
        Ok(resp
            .bytes_stream()
            .map_err(|e| Error::from_reqwest(Op::Logs, Duration::ZERO, &e)))
    }

    /// `POST /pinglink`, retried on transient failures. A 2xx is healthy when its body is one of
    /// the shapes sites answer with ([`wire::decode_ping`]); anything else is
    /// [`Error::Decode`] (`InvalidResponse`).
    pub async fn ping(&self) -> Result<Ping, Error> {
        self.with_retry(|| self.ping_once()).await
    }

    /// One `POST /pinglink`, never retried: a health check whose failure threshold, not client
    /// retries, decides.
    pub async fn ping_once(&self) -> Result<Ping, Error> {
        let start = Instant::now();
        let resp = self
            .send::<()>(Op::Ping, Method::POST, None, self.timeouts.ping)
            .await?;
        let body = read_body(Op::Ping, resp, self.timeouts.ping).await?;
        let response = wire::decode_ping(&body).map_err(|e| decode_error(Op::Ping, &e, &body))?;
        Ok(Ping {
            latency: start.elapsed(),
            response,
        })
    }

    async fn with_retry<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(err) if err.is_retryable() && attempt < self.retry.attempts => {
                    tokio::time::sleep(crate::jitter::jitter(self.retry.backoff(attempt))).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Sends one request and returns the response if it is 2xx.
    async fn send<B: Serialize + ?Sized>(
        &self,
        op: Op,
        method: Method,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<reqwest::Response, Error> {
        let mut req = self
            .http
            .request(method, format!("{}/{}", self.base, op.path()))
            .header("InterLink-Http-Session", session_id(op));
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(body) = body {
            let json = serde_json::to_vec(body).map_err(|e| Error::InvalidRequest {
                op,
                message: format!("cannot encode the request: {e}"),
            })?;
            req = req.header(header::CONTENT_TYPE, "application/json").body(json);
        }
        let resp = match tokio::time::timeout(timeout, req.send()).await {
            Err(_) => return Err(Error::Timeout { op, after: timeout }),
            Ok(Err(e)) => return Err(Error::from_reqwest(op, timeout, &e)),
            Ok(Ok(resp)) => resp,
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let code = resp.status().as_u16();
        let body = read_body(op, resp, timeout).await.unwrap_or_default();
        Err(Error::Status {
            op,
            code,
            body: truncate(&body),
        })
    }
}

async fn read_body(op: Op, mut resp: reqwest::Response, timeout: Duration) -> Result<Bytes, Error> {
    let read = async {
        let mut body = bytes::BytesMut::new();
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(too_large(op));
        }
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Error::from_reqwest(op, timeout, &e))?
        {
            if !fits(body.len(), chunk.len(), MAX_BODY) {
                return Err(too_large(op));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(Error::Timeout { op, after: timeout }),
        Ok(result) => result,
    }
}

/// Whether `more` bytes still fit after `have`, within `max`.
fn fits(have: usize, more: usize, max: usize) -> bool {
    have.checked_add(more).is_some_and(|n| n <= max)
}

fn too_large(op: Op) -> Error {
    Error::Decode {
        op,
        reason: format!("the answer is larger than {} MiB", MAX_BODY / (1024 * 1024)),
        body: String::new(),
    }
}

fn decode_error(op: Op, err: &dyn fmt::Display, body: &[u8]) -> Error {
    Error::Decode {
        op,
        reason: err.to_string(),
        body: truncate(body),
    }
}

/// An error body as text: cut to `MAX_ERROR_BODY` bytes, with the HTML escapes interLink's API
/// server adds to relayed plugin errors (`&#39;`, `&quot;`, …) undone so users read the plugin's
/// words.
fn truncate(body: &[u8]) -> String {
    let text = unescape_html(&String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]));
    if body.len() > MAX_ERROR_BODY {
        format!("{text}... ({} bytes in all)", body.len())
    } else {
        text
    }
}

/// Undoes the five escapes Go's `html.EscapeString` makes (and their numeric forms).
fn unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = text.to_string();
    for (from, to) in [
        ("&#39;", "'"),
        ("&#34;", "\""),
        ("&quot;", "\""),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&amp;", "&"),
    ] {
        out = out.replace(from, to);
    }
    out
}

/// `<Op>#<n>`, n below 100000, as interLink's virtual kubelet sends it.
fn session_id(op: Op) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}#{}",
        op.session_name(),
        (n.wrapping_mul(7919) + u64::from(std::process::id())) % 100_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_error_bodies_are_unescaped() {
        let body = b"HTTP InterLink session CreatePod#7: call exit status: 500. Body: sbatch: unrecognized option &#39;--no-such-flag&#39; &amp; &quot;more&quot;";
        assert_eq!(
            truncate(body),
            "HTTP InterLink session CreatePod#7: call exit status: 500. Body: sbatch: unrecognized option '--no-such-flag' & \"more\""
        );
        assert_eq!(truncate(b"plain"), "plain");
    }

    #[test]
    fn answers_are_read_up_to_the_cap() {
        assert!(fits(0, MAX_BODY, MAX_BODY));
        assert!(!fits(1, MAX_BODY, MAX_BODY));
        assert!(!fits(usize::MAX, 1, MAX_BODY), "no overflow");
        assert_eq!(too_large(Op::Status).reason(), "InvalidResponse");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(9), Duration::from_secs(1));
    }

    #[test]
    fn endpoints_are_checked_and_tokens_never_printed() {
        let bad = SiteClient::new(SiteConfig {
            endpoint: "ftp://x".into(),
            ..Default::default()
        });
        assert!(matches!(bad, Err(Error::InvalidRequest { .. })));
        let config = SiteConfig {
            endpoint: "https://site.example.org:3000/".into(),
            bearer_token: Some("s3cr3t\n".into()),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("s3cr3t"));
        let client = SiteClient::new(config).expect("client");
        assert_eq!(client.base, "https://site.example.org:3000");
        assert_eq!(client.token.as_deref(), Some("s3cr3t"), "trimmed");
        assert!(!format!("{client:?}").contains("s3cr3t"));
        let unix = SiteClient::new(SiteConfig {
            endpoint: "unix:///run/interlink.sock".into(),
            ..Default::default()
        });
        assert_eq!(unix.expect("unix").base, "http://unix");
    }

    #[test]
    fn session_ids_look_like_interlinks() {
        let id = session_id(Op::Create);
        let (name, n) = id.split_once('#').expect("#");
        assert_eq!(name, "CreatePod");
        assert!(n.parse::<u32>().expect("number") < 100_000);
    }

    #[test]
    fn bad_tls_material_is_an_error() {
        let ca = SiteClient::new(SiteConfig {
            endpoint: "https://x".into(),
            ca_pem: Some(b"not pem".to_vec()),
            ..Default::default()
        });
        assert!(matches!(ca, Err(Error::InvalidRequest { .. })), "{ca:?}");
    }
}
