//! Measuring systems side by side (`make bench-compare`): a process's CPU time and peak memory
//! from `/proc`, the API server's request counters from its `/metrics`, and latency percentiles.

use std::collections::BTreeMap;

use anyhow::Context;

/// CPU time and peak resident memory of one process so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcUsage {
    /// User plus system CPU seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size (`VmHWM`), bytes.
    pub peak_rss_bytes: u64,
}

impl std::ops::Add for ProcUsage {
    type Output = ProcUsage;
    fn add(self, o: ProcUsage) -> ProcUsage {
        ProcUsage {
            cpu_seconds: self.cpu_seconds + o.cpu_seconds,
            peak_rss_bytes: self.peak_rss_bytes + o.peak_rss_bytes,
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The usage of process `pid` (read before it exits).
pub fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses: utime is field 14,
    // stime 15 (1-based over the whole line).
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11).context("utime")?.parse::<f64>()? + fields.get(12).context("stime")?.parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcUsage {
        cpu_seconds: ticks / clock_ticks(),
        peak_rss_bytes: hwm_kb * 1024,
    })
}

/// `apiserver_request_total` summed by (verb, resource, subresource).
pub type RequestCounts = BTreeMap<(String, String, String), f64>;

/// The API server's request counters now.
pub async fn apiserver_requests(client: &kube::Client) -> anyhow::Result<RequestCounts> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(parse_request_counts(&text))
}

/// Parses `apiserver_request_total{...} value` lines of a Prometheus text exposition.
pub fn parse_request_counts(text: &str) -> RequestCounts {
    let mut out = RequestCounts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let mut verb = String::new();
        let mut resource = String::new();
        let mut subresource = String::new();
        for pair in labels.split("\",") {
            let Some((k, v)) = pair.split_once("=\"") else {
                continue;
            };
            let v = v.trim_end_matches('"').to_string();
            match k {
                "verb" => verb = v,
                "resource" => resource = v,
                "subresource" => subresource = v,
                _ => {}
            }
        }
        *out.entry((verb, resource, subresource)).or_default() += value;
    }
    out
}

/// `after - before`, only what changed.
pub fn delta(before: &RequestCounts, after: &RequestCounts) -> RequestCounts {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Whether a verb writes.
pub fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "DELETECOLLECTION"
    )
}

/// The `q` quantile (0..=1) of `values` (nearest rank); 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counts_sum_by_verb_resource_and_subresource() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="binding",verb="POST",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="status",verb="PATCH",version="v1"} 5
apiserver_request_total{code="409",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="status",verb="PATCH",version="v1"} 1
apiserver_request_total_other{verb="GET"} 9
"#;
        let c = parse_request_counts(text);
        let key = |v: &str, r: &str, s: &str| (v.to_string(), r.to_string(), s.to_string());
        assert_eq!(c[&key("POST", "pods", "binding")], 3.0);
        assert_eq!(c[&key("PATCH", "pods", "status")], 6.0);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
