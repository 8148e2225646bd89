//! A burst of short pods pinned to one slow site while something fails underneath (the leader
//! killed, a rolling upgrade, the API server restarted), and the checks that nothing was lost.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::{
    fixtures::{pod_builder, site_builder, wait_site_ready},
    scenario::Scenario,
    sitesim::{SimConfig, SimHandle},
    wait,
};

/// A site whose every answer takes 300 ms, so creates are in flight at any moment of a burst.
pub async fn slow_site(s: &Scenario) -> anyhow::Result<(Arc<SimHandle>, String)> {
    let sim = s
        .sim(SimConfig {
            simulate: true,
            slots: 1000,
            latency: Duration::from_millis(300),
            ..SimConfig::default()
        })
        .await?;
    let site = s.create_site(&site_builder("burst"), &sim.url).await?;
    wait_site_ready(&s.sites, &site).await?;
    Ok((sim, site))
}

/// Creates `n` pods named `burst-<i>`, running 2 s each, on the site's Node, one after another.
///
/// They tolerate a silent Node for 60 s. The test cluster's node-monitor grace period is 8 s and
/// its default toleration 2 s (E2E_FAST_NODE_LIFECYCLE), so a 15 s takeover or API server outage
/// would have every pod evicted; a production cluster's 50 s grace period and 300 s default leave
/// such a gap far inside, and 60 s keeps that relation here.
///
/// A create that fails without an answer from the API server (it is down) is retried for up to
/// 60 s; `AlreadyExists` on a retry means the first attempt was stored.
pub async fn burst(s: &Scenario, site: &str, n: usize) -> anyhow::Result<()> {
    let tolerate =
        |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60});
    let tolerations = json!({"tolerations": [
        tolerate("node.kubernetes.io/unreachable"),
        tolerate("node.kubernetes.io/not-ready"),
    ]});
    for i in 0..n {
        let p = pod_builder(&format!("burst-{i}"))
            .on_node(site)
            .script("")
            .runs_for(2)
            .merge_spec(tolerations.clone())
            .build()?;
        create_retrying(&s.pods, &p).await?;
    }
    Ok(())
}

async fn create_retrying(pods: &Api<Pod>, p: &Pod) -> anyhow::Result<()> {
    let name = p.metadata.name.as_deref().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut retried = false;
    loop {
        match pods.create(&PostParams::default(), p).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && retried => return Ok(()),
            Err(kube::Error::Api(e)) => anyhow::bail!("create {name}: {e}"),
            Err(e) if tokio::time::Instant::now() < deadline => {
                retried = true;
                eprintln!("create {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => anyhow::bail!("create {name}: {e}, for 60 s"),
        }
    }
}

/// How many of the pods in `pods`' namespace are in `phase`, and how many there are.
pub async fn in_phase(pods: &Api<Pod>, phase: &str) -> Result<(usize, usize), String> {
    let l = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let n = l
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase))
        .count();
    Ok((n, l.items.len()))
}

/// Waits up to 300 s until the namespace holds exactly `n` pods, all `Succeeded`.
pub async fn all_succeeded(s: &Scenario, n: usize) -> anyhow::Result<()> {
    wait::until(
        &format!("{n} succeeded pods"),
        Duration::from_secs(300),
        || async {
            let (done, all) = in_phase(&s.pods, "Succeeded").await?;
            if done == n && all == n {
                Ok(Some(()))
            } else {
                Err(format!("{done}/{n} succeeded, {all} pods"))
            }
        },
    )
    .await
}
