//! The few S3 calls the stage tool and the operator make: download an object to a file, upload a
//! file (with its SHA-256 as metadata), read an object's size and checksum. Path-style URLs
//! (`<endpoint>/<bucket>/<key>`), which every S3-compatible store serves.

use std::path::Path;

use aws_lc_rs::digest;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::sigv4::{self, Credentials, EMPTY_SHA256, encode_path, hex};

/// Metadata header that carries the SHA-256 the stage tool computed while uploading.
pub const SHA256_HEADER: &str = "x-amz-meta-sha256";

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
    /// Anonymous when `None`.
    pub credentials: Option<Credentials>,
}

/// Why an S3 call failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// 404: no such object (or bucket).
    #[error("not found (HTTP 404)")]
    NotFound,
    /// The store answered with another error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// The S3 error code and message, or the start of the body.
        message: String,
    },
    /// The store could not be reached, or the transfer broke.
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// A local file could not be read or written.
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
    /// The endpoint is not a URL with a host.
    #[error("invalid endpoint {0:?}")]
    Endpoint(String),
}

impl S3Error {
    /// Worth trying again: the store was unreachable or answered 5xx/429.
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Transport(_) => true,
            S3Error::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
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
}

impl Object {
    /// `<endpoint>/<bucket>/<key>`, path-encoded.
    pub fn url(&self) -> String {
        format!("{}{}", self.endpoint.trim_end_matches('/'), self.path())
    }

    fn path(&self) -> String {
        encode_path(&format!("/{}/{}", self.bucket, self.key))
    }

    /// `s3://bucket/key`.
    pub fn s3_url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    fn host(&self) -> Result<String, S3Error> {
        let url =
            reqwest::Url::parse(&self.endpoint).map_err(|_| S3Error::Endpoint(self.endpoint.clone()))?;
        let host = url
            .host_str()
            .ok_or_else(|| S3Error::Endpoint(self.endpoint.clone()))?;
        Ok(match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        })
    }

    /// A request with the auth headers for `method`, the extra signed headers and the payload hash.
    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        extra: &[(&str, &str)],
        payload_sha256: &str,
    ) -> Result<reqwest::RequestBuilder, S3Error> {
        let mut builder = client.request(method.clone(), self.url());
        for (k, v) in extra {
            builder = builder.header(*k, *v);
        }
        if let Some(creds) = &self.credentials {
            let host = self.host()?;
            let mut signed: Vec<(&str, &str)> = vec![("host", host.as_str())];
            signed.extend_from_slice(extra);
            let amz_date = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
            let path = self.path();
            let headers = sigv4::sign(
                &sigv4::Request {
                    method: method.as_str(),
                    path: &path,
                    headers: &signed,
                    payload_sha256,
                    region: &self.region,
                    amz_date: &amz_date,
                },
                creds,
            );
            for (k, v) in headers {
                builder = builder.header(k, v);
            }
        }
        Ok(builder)
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, S3Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(S3Error::NotFound);
    }
    let body = resp.text().await.unwrap_or_default();
    Err(S3Error::Status {
        status: status.as_u16(),
        message: error_message(&body),
    })
}

/// `Code: Message` from an S3 error document, else the start of the body.
fn error_message(body: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&close)? + start;
        Some(body[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => body.chars().take(200).collect(),
    }
}

/// Downloads the object to `dest` (written beside it first, renamed when complete); returns its
/// size and SHA-256.
pub async fn get_to_file(
    client: &reqwest::Client,
    obj: &Object,
    dest: &Path,
) -> Result<(u64, String), S3Error> {
    let resp = check(
        obj.request(client, reqwest::Method::GET, &[], EMPTY_SHA256)?
            .send()
            .await?,
    )
    .await?;
    let partial = dest.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial).await?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut size = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
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

/// SHA-256 and size of a file, read once.
pub async fn file_sha256(path: &Path) -> Result<(u64, String), S3Error> {
    use tokio::io::AsyncReadExt;
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

/// Uploads `src` as the object, its SHA-256 signed as the payload hash (the store verifies it)
/// and kept as metadata ([`SHA256_HEADER`]); returns size and SHA-256.
pub async fn put_file(client: &reqwest::Client, obj: &Object, src: &Path) -> Result<(u64, String), S3Error> {
    let (size, sha) = file_sha256(src).await?;
    let file = tokio::fs::File::open(src).await?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let length = size.to_string();
    let req = obj
        .request(
            client,
            reqwest::Method::PUT,
            &[(SHA256_HEADER, sha.as_str())],
            &sha,
        )?
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(body);
    check(req.send().await?).await?;
    Ok((size, sha))
}

/// Size and recorded checksum of the object.
pub async fn head(client: &reqwest::Client, obj: &Object) -> Result<ObjectInfo, S3Error> {
    let resp = check(
        obj.request(client, reqwest::Method::HEAD, &[], EMPTY_SHA256)?
            .send()
            .await?,
    )
    .await?;
    let size = resp
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let sha256 = resp
        .headers()
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    Ok(ObjectInfo { size, sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_give_code_and_message() {
        let body = "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Access Denied.</Message></Error>";
        assert_eq!(error_message(body), "AccessDenied: Access Denied.");
        assert_eq!(error_message("plain"), "plain");
    }

    #[test]
    fn urls_are_path_style_and_encoded() {
        let o = Object {
            endpoint: "http://127.0.0.1:8333/".into(),
            bucket: "b".into(),
            key: "dir/a b.txt".into(),
            region: "us-east-1".into(),
            credentials: None,
        };
        assert_eq!(o.url(), "http://127.0.0.1:8333/b/dir/a%20b.txt");
        assert_eq!(o.host().unwrap(), "127.0.0.1:8333");
        assert_eq!(o.s3_url(), "s3://b/dir/a b.txt");
    }
}
