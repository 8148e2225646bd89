//! The API server restarted under load: in the middle of a burst of 200 pods at a slow site,
//! kube-apiserver is killed, kept down for 10 s and started again (`e2e/bin/cluster-restart`).
//! The operator recovers by itself: the same process, no pod lost, every pod created exactly once
//! at the site, all completed.
//!
//! This binary holds only this test: it restarts the control plane that the other test binaries
//! share, and cargo runs test binaries one at a time.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use offload_e2e::{
    burst::{all_succeeded, burst, slow_site},
    cluster::repo_root,
    scenario::Scenario,
    sitesim::exactly_once,
    wait,
};

const PODS: usize = 200;
const DOWN_SECONDS: u32 = 10;

/// Kills kube-apiserver (SIGKILL: a crash; a SIGTERM'd one drains for up to a minute before it
/// exits, with its port already closed), keeps it down `DOWN_SECONDS` and starts it again;
/// returns how many seconds it was unreachable.
async fn restart_api_server(s: &Scenario) -> anyhow::Result<f64> {
    let out = tokio::process::Command::new(repo_root().join("e2e/bin/cluster-restart"))
        .arg("--kill")
        .arg(&s.t.cluster.dir)
        .arg("kube-apiserver")
        .arg(DOWN_SECONDS.to_string())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "cluster-restart failed: {stderr}");
    eprint!("{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("cluster-restart printed {stdout:?}"))
}

#[tokio::test]
async fn the_operator_rides_out_an_api_server_restart_under_load() {
    // Node leases renewed inside the test cluster's 8 s node-monitor grace period.
    Scenario::run_with(
        "apiserver-restart",
        &["--node-lease-renew-seconds", "2"],
        |s| async move {
            let (sim, site) = slow_site(&s).await?;
            let pid = s.operator_pid().await.context("the operator's PID")?;
            let seen = || sim.stats().creates_per_uid.len();
            let restart = async {
                while seen() < 20 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let at = seen();
                let down = restart_api_server(&s).await?;
                Ok::<_, anyhow::Error>((at, down, Instant::now()))
            };
            let (made, restarted) = tokio::join!(burst(&s, &site, PODS), restart);
            made?;
            let (at, down, back) = restarted?;
            ensure!(
                at < PODS,
                "every pod was at the site before the restart: it would prove nothing"
            );
            all_succeeded(&s, PODS).await?;
            let settled = back.elapsed();
            exactly_once(&[sim.stats()], PODS)?;
            ensure!(
                s.operator_pid().await == Some(pid),
                "the operator process was replaced (PID {pid} gone)"
            );
            // Every watch is back: /readyz names any that is still failing. A watch whose resource
            // version the new API server no longer has relists at once (cache::retry), so this
            // is a matter of seconds, not of kube-runtime's 30 s backoff.
            wait::until("/readyz ok after the restart", Duration::from_secs(15), || async {
                match s.operator_readyz().await {
                    Ok(body) if body.starts_with("ok") => Ok(Some(())),
                    Ok(body) => Err(body),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await?;
            eprintln!(
                "kube-apiserver killed with {at}/{PODS} pods at the site, unreachable {down:.1}s; \
                 all {PODS} succeeded {:.1}s after it was back, each created once; operator ready again {:.1}s after it was back",
                settled.as_secs_f64(),
                back.elapsed().as_secs_f64()
            );
            Ok(())
        },
    )
    .await;
}
