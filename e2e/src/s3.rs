//! A real S3-compatible object store for the data tests: SeaweedFS (`e2e/bin/s3-up`, built from
//! the Go module proxy by `e2e/bin/build-seaweedfs`) on 127.0.0.1, with one bucket per simulated
//! site plus a shared one, an admin identity and a read-only one. Stopped by [`ObjectStore::down`],
//! or by a reaper when the test binary exits.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use offload_stage::store::{Credentials, Object, StoreError, Transfer, http_client};

use crate::cluster::{EnvFile, log_tails, run_script};

/// A running object store.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    root: PathBuf,
    /// Its state folder (data, identities, `weed.log`).
    pub dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The identity that may read and write.
    pub admin: Credentials,
    /// The identity that may only read (uploads with it are refused: 403).
    pub read_only: Credentials,
}

impl ObjectStore {
    /// Starts one under `root` with these buckets (`s3-up --owner-pid <this process>`).
    pub fn up(root: &Path, buckets: &[&str]) -> anyhow::Result<ObjectStore> {
        std::fs::create_dir_all(root)?;
        let pid = std::process::id().to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec!["--owner-pid".as_ref(), pid.as_ref(), root.as_os_str()];
        args.extend(buckets.iter().map(|b| std::ffi::OsStr::new(*b)));
        let out = run_script("s3-up", &args, &[])?;
        let dir = PathBuf::from(out.lines().last().unwrap_or_default().trim());
        let env = EnvFile::read(&dir.join("env"))?;
        let get = |k: &str| env.get(k);
        Ok(ObjectStore {
            root: root.to_path_buf(),
            endpoint: get("S3_ENDPOINT")?,
            admin: Credentials::new(get("S3_ACCESS_KEY")?, get("S3_SECRET_KEY")?),
            read_only: Credentials::new(get("S3_RO_ACCESS_KEY")?, get("S3_RO_SECRET_KEY")?),
            dir,
        })
    }

    /// Stops it and removes its data (`s3-down`).
    pub fn down(&self) -> anyhow::Result<()> {
        run_script("s3-down", &[self.root.as_os_str()], &[]).map(drop)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tails(&self.dir, &["weed"], lines)
    }

    /// The object `bucket/key`, reached as the admin.
    pub fn object(&self, bucket: &str, key: &str) -> Object {
        Object {
            endpoint: self.endpoint.clone(),
            bucket: bucket.into(),
            key: key.into(),
            region: "us-east-1".into(),
            credentials: Some(self.admin.clone()),
        }
    }

    /// Writes `content` to `bucket/key`; returns its SHA-256.
    pub async fn put(&self, bucket: &str, key: &str, content: &[u8]) -> anyhow::Result<String> {
        let file = tempfile(content)?;
        let uploaded = self
            .object(bucket, key)
            .store(&http_client(&Transfer::default())?.0, &Transfer::default())?
            .put_file(&file)
            .await
            .with_context(|| format!("uploading s3://{bucket}/{key}"))?;
        let _ = std::fs::remove_file(file);
        Ok(uploaded.sha256)
    }

    /// The ETag of `bucket/key` (`"<md5>-<parts>"` for an object uploaded in parts).
    pub async fn etag(&self, bucket: &str, key: &str) -> anyhow::Result<Option<String>> {
        let store = self
            .object(bucket, key)
            .store(&http_client(&Transfer::default())?.0, &Transfer::default())?;
        Ok(store.head().await?.etag)
    }

    /// The content of `bucket/key`, or `None` when it does not exist.
    pub async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let file = tempfile(b"")?;
        let store = self
            .object(bucket, key)
            .store(&http_client(&Transfer::default())?.0, &Transfer::default())?;
        match store.get_to_file(&file).await {
            Ok(_) => {
                let content = std::fs::read(&file)?;
                let _ = std::fs::remove_file(file);
                Ok(Some(content))
            }
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(anyhow!("downloading s3://{bucket}/{key}: {e}")),
        }
    }
}

/// A new file under the system's temp folder with `content`.
fn tempfile(content: &[u8]) -> anyhow::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "offload-e2e-s3-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, content)?;
    Ok(path)
}
