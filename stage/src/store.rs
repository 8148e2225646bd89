//! The S3 calls the stage tool and the operator make, through `object_store` (ADR 0016):
//! download an object to a file, upload a file (in parts above the part size, with its SHA-256 as
//! metadata), read an object's size and checksum. Path-style URLs (`<endpoint>/<bucket>/<key>`),
//! which every S3-compatible store serves.
//!
//! The HTTP client is built here, not by `object_store`: it follows no redirect (an endpoint check
//! made on the first URL must hold for every request) and has a read timeout, so a transfer that
//! stalls fails instead of hanging the attempt.

use std::{path::Path, sync::Arc, time::Duration};

use aws_lc_rs::digest;
use futures::StreamExt;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
    aws::{AmazonS3, AmazonS3Builder},
    client::{HttpClient, HttpConnector},
    path::Path as Key,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The user metadata key (`x-amz-meta-sha256`) that carries the SHA-256 the tool computed.
pub const SHA256_METADATA: &str = "sha256";
/// How many parts of one upload are in flight at once (memory: about one part more than this).
const PART_CONCURRENCY: usize = 2;
/// S3 takes at most this many parts per upload; larger files get larger parts.
const MAX_PARTS: u64 = 10_000;

/// Credentials of one artifact.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// STS session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    // Never print the secret parts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("session_token", &self.session_token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Long-term credentials (no session token).
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }
}

/// One object and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// `http(s)://host[:port]`, no trailing `/`.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Region used to sign.
    pub region: String,
    /// Anonymous (unsigned requests) when `None`.
    pub credentials: Option<Credentials>,
}

/// How transfers behave.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// A download that waits longer than this for the next bytes fails the request (retried);
    /// an upload request gets this plus its bytes at [`Transfer::min_upload_rate`].
    pub read_timeout: Duration,
    /// Bytes per second an upload request must average, or it counts as stalled: reqwest's read
    /// timeout runs from the start of a request to its answer, so it cannot time an upload.
    pub min_upload_rate: u64,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Files up to this size go in one PUT; larger ones in parts of this size.
    pub part_size: u64,
    /// Retries of one request (a part, a GET) before the transfer fails.
    pub request_retries: usize,
    /// A time limit for one whole request, `None` for none (the operator's HEADs have one; the
    /// tool's transfers may take hours).
    pub request_timeout: Option<Duration>,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            read_timeout: Duration::from_secs(60),
            min_upload_rate: 256 << 10,
            connect_timeout: Duration::from_secs(30),
            part_size: 64 << 20,
            request_retries: 3,
            request_timeout: None,
        }
    }
}

/// Why an S3 call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// 404: no such object (or bucket).
    #[error("not found")]
    NotFound,
    /// The store refused the credentials or the request (401/403).
    #[error("refused: {0}")]
    Refused(String),
    /// The store failed, could not be reached, or the transfer broke or stalled.
    #[error("{0}")]
    Transfer(String),
    /// A local file could not be read or written.
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
    /// The endpoint, bucket or key cannot be used.
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Worth trying again: not a refusal, a missing object or a wrong name.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transfer(_) | StoreError::Io(_))
    }
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => StoreError::NotFound,
            E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
                StoreError::Refused(with_sources(source.as_ref()))
            }
            E::InvalidPath { source } => StoreError::Invalid(with_sources(&source)),
            // With its causes: "error sending request" alone does not tell a refused connection
            // from an unknown name or a timeout.
            other => StoreError::Transfer(with_sources(&other)),
        }
    }
}

/// Size and checksum of a stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Bytes.
    pub size: u64,
    /// The SHA-256 recorded at upload, when there is one.
    pub sha256: Option<String>,
    /// The store's ETag (S3: `"<md5>-<parts>"` for an object uploaded in parts).
    pub etag: Option<String>,
}

/// Hands `object_store` a client built by us.
#[derive(Debug)]
struct Connector(reqwest::Client);

impl HttpConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

/// Which certificate authorities the HTTP client trusts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The system's (the image's CA bundle, `SSL_CERT_FILE`).
    System,
    /// The Mozilla roots built into the tool: the image has no CA certificates at all (many
    /// minimal HPC images), which would otherwise fail every transfer, HTTP ones too.
    BuiltIn,
}

/// The HTTP client for object stores: no redirects, the transfer's timeouts (downloads, HEADs).
pub fn http_client(transfer: &Transfer) -> Result<(reqwest::Client, Trust), StoreError> {
    client(transfer, Some(transfer.read_timeout), transfer.request_timeout)
}

/// The HTTP client for uploading a file of `size` bytes: each request (the single PUT, or one
/// part) must finish within the read timeout plus its bytes at the minimum upload rate.
pub fn upload_client(transfer: &Transfer, size: u64) -> Result<(reqwest::Client, Trust), StoreError> {
    client(transfer, None, Some(upload_request_timeout(transfer, size)))
}

/// The time one upload request of a file of `size` bytes may take (pure).
fn upload_request_timeout(transfer: &Transfer, size: u64) -> Duration {
    let per_request = size.min(part_size(size, transfer.part_size));
    transfer.read_timeout + Duration::from_secs(per_request / transfer.min_upload_rate.max(1))
}

fn client(
    transfer: &Transfer,
    read_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
) -> Result<(reqwest::Client, Trust), StoreError> {
    let builder = || {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(transfer.connect_timeout)
            // Sizes come from Content-Length; a compressed body would break them.
            .no_gzip();
        if let Some(t) = read_timeout {
            b = b.read_timeout(t);
        }
        if let Some(t) = request_timeout {
            b = b.timeout(t);
        }
        b
    };
    let system = match builder().build() {
        Ok(c) => return Ok((c, Trust::System)),
        Err(e) => e,
    };
    let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .filter_map(|c| reqwest::Certificate::from_der(c.as_ref()).ok());
    builder()
        .tls_certs_only(roots)
        .build()
        .map(|c| (c, Trust::BuiltIn))
        .map_err(|e| {
            StoreError::Invalid(format!(
                "cannot build an HTTP client: {} (with built-in roots: {})",
                with_sources(&system),
                with_sources(&e)
            ))
        })
}

/// An error with its causes, `a: b: c` (reqwest's own text is often just "builder error"), each
/// text once.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors repeat their source's text in their own.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A client for one object's bucket.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<AmazonS3>,
    key: Key,
    transfer: Transfer,
    /// The secret key and session token, kept out of error texts.
    secrets: Vec<String>,
}

impl Object {
    /// `s3://bucket/key`.
    pub fn s3_url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// A client for this object, sending its requests through `http`.
    pub fn store(&self, http: &reqwest::Client, transfer: &Transfer) -> Result<Store, StoreError> {
        let key = Key::parse(&self.key)
            .map_err(|e| StoreError::Invalid(format!("key {:?} is not supported: {e}", self.key)))?;
        let endpoint = self.endpoint.trim_end_matches('/');
        let mut builder = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_http_connector(Connector(http.clone()))
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: transfer.request_retries,
                retry_timeout: Duration::from_secs(600),
            });
        builder = match &self.credentials {
            Some(c) => {
                let b = builder
                    .with_access_key_id(&c.access_key_id)
                    .with_secret_access_key(&c.secret_access_key);
                match &c.session_token {
                    Some(t) => b.with_token(t),
                    None => b,
                }
            }
            // Anonymous: no instance-metadata lookup, which would hang at an HPC site.
            None => builder.with_skip_signature(true),
        };
        let inner = builder.build().map_err(|e| StoreError::Invalid(e.to_string()))?;
        let secrets = self
            .credentials
            .iter()
            .flat_map(|c| std::iter::once(c.secret_access_key.clone()).chain(c.session_token.clone()))
            .collect();
        Ok(Store {
            inner: Arc::new(inner),
            key,
            transfer: transfer.clone(),
            secrets,
        })
    }
}

impl Store {
    /// Downloads the object to `dest` (written beside it first, renamed when complete); returns
    /// its size and SHA-256.
    pub async fn get_to_file(&self, dest: &Path) -> Result<(u64, String), StoreError> {
        let result = self.inner.get(&self.key).await.map_err(|e| self.error(e))?;
        let partial = dest.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial).await?;
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut size = 0u64;
        let mut body = result.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.error(e))?;
            hash.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&partial, dest).await?;
        Ok((size, hex(hash.finish().as_ref())))
    }

    /// Uploads `src`, in one PUT up to the part size and in parts above it, with its SHA-256 as
    /// metadata ([`SHA256_METADATA`]); with credentials every request's payload hash is signed,
    /// so the store checks each part's bytes. Returns size, SHA-256 and the number of parts (1
    /// for a single PUT).
    pub async fn put_file(&self, src: &Path) -> Result<Uploaded, StoreError> {
        let size = tokio::fs::metadata(src).await?.len();
        if size <= self.transfer.part_size {
            // Read once: the checksum is of the very bytes sent.
            let data = tokio::fs::read(src).await?;
            let size = data.len() as u64;
            let sha = sha256_hex(&data);
            let opts = PutOptions {
                attributes: sha256_attribute(&sha),
                ..PutOptions::default()
            };
            self.inner
                .put_opts(&self.key, PutPayload::from(data), opts)
                .await
                .map_err(|e| self.error(e))?;
            return Ok(Uploaded {
                size,
                sha256: sha,
                parts: 1,
            });
        }
        // The metadata goes with the first request, so the file is hashed first, and hashed again
        // while it is sent: a file that changed in between is not uploaded under a wrong checksum.
        let (size, sha) = file_sha256(src).await?;
        let part = part_size(size, self.transfer.part_size);
        let opts = PutMultipartOptions {
            attributes: sha256_attribute(&sha),
            ..PutMultipartOptions::default()
        };
        let upload = self
            .inner
            .put_multipart_opts(&self.key, opts)
            .await
            .map_err(|e| self.error(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part as usize);
        let written = write_parts(&mut writer, src, size, part, &sha)
            .await
            .map_err(|e| match e {
                StoreError::Transfer(t) => StoreError::Transfer(self.redact(&t)),
                other => other,
            });
        match written {
            // finish() aborts the upload itself when a part or the completion fails.
            Ok(()) => {
                writer.finish().await.map_err(|e| self.error(e))?;
            }
            Err(e) => {
                // Leaves no parts behind at the store (they are billed on AWS).
                return Err(match writer.abort().await {
                    Ok(()) => e,
                    Err(abort) => StoreError::Transfer(format!(
                        "{e}; aborting the upload failed too, parts may remain at the store: {}",
                        self.redact(&with_sources(&abort))
                    )),
                });
            }
        }
        Ok(Uploaded {
            size,
            sha256: sha,
            parts: size.div_ceil(part),
        })
    }

    /// An `object_store` error as ours, without the credentials' secret parts (an S3 error body
    /// such as SignatureDoesNotMatch echoes the signed headers, the session token among them).
    fn error(&self, e: object_store::Error) -> StoreError {
        match StoreError::from(e) {
            StoreError::Refused(t) => StoreError::Refused(self.redact(&t)),
            StoreError::Transfer(t) => StoreError::Transfer(self.redact(&t)),
            other => other,
        }
    }

    fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in self.secrets.iter().filter(|s| s.len() >= 4) {
            text = text.replace(secret.as_str(), "<redacted>");
        }
        text
    }

    /// Size and recorded checksum of the object.
    pub async fn head(&self) -> Result<ObjectInfo, StoreError> {
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let result = self
            .inner
            .get_opts(&self.key, opts)
            .await
            .map_err(|e| self.error(e))?;
        let sha256 = result
            .attributes
            .get(&Attribute::Metadata(SHA256_METADATA.into()))
            .map(|v| v.to_string());
        Ok(ObjectInfo {
            size: result.meta.size,
            sha256,
            etag: result.meta.e_tag,
        })
    }
}

/// What an upload sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: String,
    /// Requests that carried the data (1 for a single PUT).
    pub parts: u64,
}

/// The configured part size, grown so that `size` fits in S3's part count.
fn part_size(size: u64, configured: u64) -> u64 {
    configured.max(1).max(size.div_ceil(MAX_PARTS))
}

async fn write_parts(
    writer: &mut WriteMultipart,
    src: &Path,
    size: u64,
    part: u64,
    sha: &str,
) -> Result<(), StoreError> {
    let mut file = tokio::fs::File::open(src).await?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; (part as usize).min(8 << 20)];
    let mut sent = 0u64;
    loop {
        writer.wait_for_capacity(PART_CONCURRENCY).await?;
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        if sent > size {
            break;
        }
        hash.update(&buf[..n]);
        writer.write(&buf[..n]);
    }
    if sent != size || hex(hash.finish().as_ref()) != sha {
        return Err(StoreError::Transfer(format!(
            "{} changed while being uploaded (not uploaded: its checksum would be wrong)",
            src.display()
        )));
    }
    Ok(())
}

fn sha256_attribute(sha: &str) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(
        Attribute::Metadata(SHA256_METADATA.into()),
        sha.to_string().into(),
    );
    attributes
}

/// SHA-256 and size of a file, read once.
pub async fn file_sha256(path: &Path) -> Result<(u64, String), StoreError> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(hash.finish().as_ref())))
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Percent-encodes a key for a path-style URL (`/` kept), as S3 expects in paths.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_to_fit_the_part_limit() {
        assert_eq!(part_size(10, 64 << 20), 64 << 20);
        let huge = 2 * MAX_PARTS * (64 << 20);
        assert_eq!(part_size(huge, 64 << 20), 2 * (64 << 20));
        assert!(huge.div_ceil(part_size(huge, 64 << 20)) <= MAX_PARTS);
    }

    #[test]
    fn keys_are_path_encoded() {
        assert_eq!(encode_path("/b/dir/a b.txt"), "/b/dir/a%20b.txt");
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn credentials_do_not_print_their_secrets() {
        let c = Credentials {
            session_token: Some("tok-secret".into()),
            ..Credentials::new("AKID", "very-secret")
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("AKID"));
        assert!(
            !shown.contains("very-secret") && !shown.contains("tok-secret"),
            "{shown}"
        );
    }

    #[test]
    fn error_texts_lose_the_secret_parts() {
        let o = Object {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            key: "k".into(),
            region: "us-east-1".into(),
            credentials: Some(Credentials {
                session_token: Some("the-session-token".into()),
                ..Credentials::new("AKID", "the-secret-key")
            }),
        };
        let (http, _) = http_client(&Transfer::default()).unwrap();
        let store = o.store(&http, &Transfer::default()).unwrap();
        let body =
            "<CanonicalRequest>x-amz-security-token:the-session-token</CanonicalRequest> the-secret-key";
        let text = store.redact(body);
        assert!(
            !text.contains("the-session-token") && !text.contains("the-secret-key"),
            "{text}"
        );
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn uploads_get_time_for_their_bytes() {
        let t = Transfer {
            read_timeout: Duration::from_secs(2),
            min_upload_rate: 1 << 20,
            part_size: 8 << 20,
            ..Transfer::default()
        };
        // One 8 MiB part at 1 MiB/s, plus the read timeout; a small file, the read timeout alone.
        assert_eq!(upload_request_timeout(&t, 100 << 20), Duration::from_secs(10));
        assert_eq!(upload_request_timeout(&t, 7), Duration::from_secs(2));
        assert_eq!(upload_request_timeout(&t, 4 << 20), Duration::from_secs(6));
        assert!(upload_client(&t, 100 << 20).is_ok());
    }

    #[test]
    fn unsupported_keys_are_named() {
        let o = Object {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            key: "a//b".into(),
            region: "us-east-1".into(),
            credentials: None,
        };
        let (http, _) = http_client(&Transfer::default()).unwrap();
        let e = o.store(&http, &Transfer::default()).unwrap_err();
        assert!(e.to_string().contains("a//b"), "{e}");
        assert!(!e.is_transient());
    }
}
