//! A real Prometheus server (Debian's package, unpacked by `e2e/bin/install-prometheus`) on a free
//! loopback port, scraping given targets every second, queried through its HTTP API.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::Value;

use crate::{
    operator::{free_port, http_get},
    wait,
};

/// The job name of every scrape target.
pub const JOB: &str = "offload-operator";

/// The folder holding `prometheus` and `promtool` (installed on first use).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        crate::cluster::script_last_line("install-prometheus")
            .map(PathBuf::from)
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One sample of an instant vector: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Labels, `__name__` included when the query keeps it.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// A running Prometheus, killed and its data removed when dropped.
pub struct Prometheus {
    child: tokio::process::Child,
    dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Prometheus {
    /// Starts Prometheus with its data and log in a new folder under `parent`, scraping `targets`
    /// (`host:port`, path `/metrics`) every second as job [`JOB`]; waits until it is ready.
    pub async fn start(parent: &Path, targets: &[String]) -> anyhow::Result<Prometheus> {
        let bin = bin_dir()?.join("prometheus");
        let port = free_port()?;
        let dir = parent.join(format!("prometheus-{port}"));
        std::fs::create_dir_all(&dir)?;
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: {JOB}\n  \
             scrape_timeout: 1s\n  static_configs:\n  - targets: [{}]\n",
            quoted.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = tokio::process::Command::new(&bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Prometheus {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let ready = format!("{}/-/ready", p.url);
        let started = wait::until("Prometheus /-/ready", Duration::from_secs(30), || async {
            Ok::<_, anyhow::Error>(http_get(&ready).await.ok().filter(|(c, _)| *c == 200).map(|_| ()))
        })
        .await;
        if let Err(e) = started {
            let _ = p.child.start_kill();
            bail!("{e}\n{}", p.log_tail(30));
        }
        Ok(p)
    }

    /// The instant query `promql`, evaluated now, through `/api/v1/query`.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let url = format!("{}/api/v1/query?query={}", self.url, encode(promql));
        let (code, body) = http_get(&url).await?;
        ensure!(code == 200, "{promql}: HTTP {code}: {body}");
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{promql}: {body}"))?;
        ensure!(v["status"] == "success", "{promql}: {body}");
        ensure!(
            v["data"]["resultType"] == "vector",
            "{promql}: not a vector: {body}"
        );
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().context("result")? {
            let labels = r["metric"]
                .as_object()
                .context("metric")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .context("value")?
                .parse::<f64>()
                .with_context(|| format!("{promql}: value of {r}"))?;
            out.push(Sample { labels, value });
        }
        Ok(out)
    }

    /// Waits until `promql` returns exactly one sample, and `want` accepts its value.
    pub async fn wait_value(&self, promql: &str, want: impl Fn(f64) -> bool) -> anyhow::Result<f64> {
        wait::until(
            &format!("Prometheus: {promql}"),
            Duration::from_secs(60),
            || async {
                let r = self.query(promql).await.map_err(|e| format!("{e:#}"))?;
                match r.as_slice() {
                    [one] if want(one.value) => Ok(Some(one.value)),
                    _ => Err(format!("{r:?}")),
                }
            },
        )
        .await
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.dir.join("prometheus.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "----- {} -----\n{}",
            path.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encoding of a query-string value (RFC 3986 unreserved characters kept).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            super::encode(r#"up{job="a b"} > 0"#),
            "up%7Bjob%3D%22a%20b%22%7D%20%3E%200"
        );
    }
}
