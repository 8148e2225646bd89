//! Write storms: pods that fit nowhere cost the API server no write per scheduling cycle while
//! other pods come and go. Alone in its binary, so nothing else writes beside it. Real control
//! plane, real operator binary, a simulator over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::ensure;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};
use offload_e2e::{fixtures::site_builder, scenario::Scenario, sitesim::SimConfig, wait};

const PENDING: usize = 100;
const WINDOW: Duration = Duration::from_secs(60);

fn is_pending_pod(name: &str) -> bool {
    name.starts_with("big-")
}

#[tokio::test]
async fn pending_pods_cost_under_one_write_a_minute_while_others_come_and_go() {
    Scenario::run("write-storm", |s| async move {
        let sim = s
            .sim(SimConfig {
                simulate: true,
                ..SimConfig::default()
            })
            .await?;
        // A 4-CPU site: the 8-CPU pods never fit, the 1-CPU pods come and go.
        let site = s
            .create_site(
                &site_builder("small").merge(serde_json::json!({"capacity": {"cpu": "4", "memory": "64Gi", "pods": 100}})),
                &sim.url,
            )
            .await?;
        offload_e2e::fixtures::wait_site_ready(&s.sites, &site).await?;
        let pp = PostParams::default();
        for i in 0..PENDING {
            s.pods.create(&pp, &s.pod(&format!("big-{i}")).cpu("8").build()?).await?;
        }
        // Each is told once that it does not fit (one status write and one Event each).
        wait::until("every big pod marked unschedulable", Duration::from_secs(120), || async {
            let list = s.pods.list(&ListParams::default()).await?;
            let told = list
                .items
                .iter()
                .filter(|p| is_pending_pod(&p.name_any()))
                .filter(|p| {
                    p.status.iter().flat_map(|st| st.conditions.iter().flatten()).any(|c| {
                        c.type_ == "PodScheduled" && c.status == "False"
                    })
                })
                .count();
            Ok::<_, kube::Error>((told == PENDING).then_some(()))
        })
        .await?;
        // Churn: a 1-CPU pod of 6 s started every 2 s.
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let p = s.pod(&format!("churn-{i}")).runs_for(6).build()?;
                    s.pods.create(&PostParams::default(), &p).await?;
                    i += 1;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Ok::<_, anyhow::Error>(i)
            })
        };
        // Let the churn settle into its rhythm, then count every write that concerns a pending
        // pod: its status (a MODIFIED pod) and its Events (each create or series update).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let events: Api<Event> = Api::namespaced(s.t.client.clone(), &s.t.name);
        let pod_rv = s.pods.list(&ListParams::default()).await?.metadata.resource_version.unwrap_or_default();
        let ev_rv = events.list(&ListParams::default()).await?.metadata.resource_version.unwrap_or_default();
        let wp = WatchParams::default().timeout(WINDOW.as_secs() as u32 + 30);
        let mut pod_watch = s.pods.watch(&wp, &pod_rv).await?.boxed();
        let mut ev_watch = events.watch(&wp, &ev_rv).await?.boxed();
        let (mut status_writes, mut event_writes) = (0u64, 0u64);
        let mut written_pods = HashSet::new();
        let deadline = tokio::time::Instant::now() + WINDOW;
        let start = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                e = pod_watch.try_next() => match e? {
                    Some(WatchEvent::Modified(p)) if is_pending_pod(&p.name_any()) => {
                        status_writes += 1;
                        written_pods.insert(p.name_any());
                    }
                    Some(WatchEvent::Error(e)) => anyhow::bail!("pod watch: {e:?}"),
                    Some(_) => {}
                    None => anyhow::bail!("the pod watch ended early"),
                },
                e = ev_watch.try_next() => match e? {
                    Some(WatchEvent::Added(ev) | WatchEvent::Modified(ev))
                        if ev.regarding.as_ref().and_then(|r| r.name.as_deref()).is_some_and(is_pending_pod) =>
                    {
                        event_writes += 1;
                    }
                    Some(WatchEvent::Error(e)) => anyhow::bail!("event watch: {e:?}"),
                    Some(_) => {}
                    None => anyhow::bail!("the event watch ended early"),
                },
            }
        }
        let minutes = start.elapsed().as_secs_f64() / 60.0;
        stop.store(true, Ordering::Relaxed);
        let started = churn.await??;
        let succeeded = offload_e2e::burst::in_phase(&s.pods, "Succeeded")
            .await
            .map_err(anyhow::Error::msg)?
            .0;
        let per_pod = (status_writes + event_writes) as f64 / PENDING as f64 / minutes;
        eprintln!(
            "write storm: {PENDING} pending 8-CPU pods at a 4-CPU site, {started} churn pods started ({succeeded} succeeded) \
             in {:.0} s: {status_writes} status writes and {event_writes} Event writes to pending pods \
             ({} pods written): {per_pod:.2} writes per pending pod per minute",
            minutes * 60.0,
            written_pods.len()
        );
        ensure!(succeeded >= 10, "the churn ran: {succeeded} pods succeeded");
        ensure!(per_pod < 1.0, "{per_pod:.2} writes per pending pod per minute");
        Ok(())
    })
    .await;
}
