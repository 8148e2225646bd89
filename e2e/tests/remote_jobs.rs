//! RemoteJobs: one object for a workflow engine to create and watch, with retries and failover.
//! Real control plane, real operator binary, simulators as sites over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    fixtures::{delete_sites, site, wait_site_ready},
    operator::{Operator, TEST_LABEL},
    sitesim::{SimConfig, SimHandle, faults},
    wait,
};
use offload_operator::crd::{
    OffloadPolicy, OffloadSite, RemoteJob,
    remote_job::{AttemptOutcome, RemoteJobPhase},
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A RemoteJob running `script`, placed by `policy`; `extra` overrides spec keys.
fn job(ns: &str, name: &str, policy: &str, script: &str, extra: Value) -> anyhow::Result<RemoteJob> {
    let mut spec = json!({"policy": policy, "backoffSeconds": 1,
        "template": {"spec": {"containers": [{"name": "main", "image": "busybox",
            "command": ["sh", "-c", script]}]}}});
    spec.as_object_mut()
        .context("spec")?
        .extend(extra.as_object().cloned().unwrap_or_default());
    Ok(serde_json::from_value(
        json!({"apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob",
        "metadata": {"name": name, "namespace": ns, "labels": {TEST_LABEL: ns}}, "spec": spec}),
    )?)
}

/// A policy over `sites`, tried in that order.
fn policy(ns: &str, name: &str, sites: &[&str]) -> anyhow::Result<OffloadPolicy> {
    Ok(serde_json::from_value(
        json!({"apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy",
        "metadata": {"name": name, "labels": {TEST_LABEL: ns}},
        "spec": {"sites": sites, "strategy": "OrderedFallback"}}),
    )?)
}

async fn finished(jobs: &Api<RemoteJob>, name: &str, want: RemoteJobPhase) -> anyhow::Result<RemoteJob> {
    wait::until(&format!("job {name} {want:?}"), TIMEOUT, || async {
        let j = jobs.get(name).await.map_err(|e| e.to_string())?;
        let phase = j.status.as_ref().and_then(|s| s.phase);
        if phase == Some(want) {
            return Ok(Some(j));
        }
        Err(format!(
            "phase {phase:?}, message {:?}",
            j.status.and_then(|s| s.message)
        ))
    })
    .await
}

/// The site-side PID the job's script wrote, and whether that process still lives.
fn alive(pid_file: &Path) -> anyhow::Result<bool> {
    let pid = std::fs::read_to_string(pid_file)?.trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Ok(status
        .lines()
        .any(|l| l.starts_with("State:") && !l.contains("zombie")))
}

/// The one pid file a job's attempt wrote under the simulator's work folder.
fn pid_file(work: &Path) -> anyhow::Result<std::path::PathBuf> {
    for entry in std::fs::read_dir(work)? {
        let f = entry?.path().join("root/pid");
        if f.exists() {
            return Ok(f);
        }
    }
    anyhow::bail!("no pid file under {}", work.display())
}

/// A test's sites, one per simulator and in the policy's order, named `<namespace>-<suffix>`, and
/// its policy (named after the namespace); removed by `finish` while the operator still runs.
struct Bench<'a> {
    t: &'a TestNamespace,
    sites: Vec<String>,
    jobs: Api<RemoteJob>,
}

impl<'a> Bench<'a> {
    async fn new(t: &'a TestNamespace, sims: &[(&str, &String)]) -> anyhow::Result<Bench<'a>> {
        let api: Api<OffloadSite> = Api::all(t.client.clone());
        let mut sites = Vec::new();
        for (suffix, url) in sims {
            let name = format!("{}-{suffix}", t.name);
            api.create(&PostParams::default(), &site(&t.name, &name, url, json!({}))?)
                .await?;
            sites.push(name);
        }
        let names: Vec<&str> = sites.iter().map(String::as_str).collect();
        Api::<OffloadPolicy>::all(t.client.clone())
            .create(&PostParams::default(), &policy(&t.name, &t.name, &names)?)
            .await?;
        t.default_service_account().await?;
        Ok(Bench {
            t,
            sites,
            jobs: Api::namespaced(t.client.clone(), &t.name),
        })
    }

    /// Waits until every site is Ready.
    async fn ready(&self) -> anyhow::Result<()> {
        let api: Api<OffloadSite> = Api::all(self.t.client.clone());
        for s in &self.sites {
            wait_site_ready(&api, s).await?;
        }
        Ok(())
    }

    /// Removes the sites and the policy, then reports `result` with the operator's log on failure.
    async fn finish(self, result: anyhow::Result<()>, op: &Operator) -> anyhow::Result<()> {
        let api: Api<OffloadSite> = Api::all(self.t.client.clone());
        let names: Vec<&str> = self.sites.iter().map(String::as_str).collect();
        delete_sites(self.t, &api, &names).await?;
        Api::<OffloadPolicy>::all(self.t.client.clone())
            .delete(&self.t.name, &DeleteParams::default())
            .await?;
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail(80)))
    }
}

#[tokio::test]
async fn a_job_succeeds_and_kubectl_wait_returns() {
    TestNamespace::run("rjob-ok", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let sim = SimHandle::start(SimConfig::default()).await?;
        let bench = Bench::new(&t, &[("site", &sim.url)]).await?;
        let s = bench.sites[0].clone();
        let jobs = bench.jobs.clone();
        let result = async {
            bench.ready().await?;
            jobs.create(
                &PostParams::default(),
                &job(&t.name, "hello", &t.name, "echo hello; sleep 1", json!({}))?,
            )
            .await?;
            // What a workflow engine does: wait for the Complete condition.
            // (Off the test's runtime thread: the simulator is served from it.)
            let mut wait_cmd = t.cluster.kubectl();
            wait_cmd.args([
                "wait",
                "--for=condition=Complete",
                "remotejob/hello",
                "-n",
                &t.name,
                "--timeout=120s",
            ]);
            let out = tokio::task::spawn_blocking(move || wait_cmd.output()).await??;
            ensure!(
                out.status.success(),
                "kubectl wait: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let j = jobs.get("hello").await?;
            let st = j.status.context("status")?;
            ensure!(st.phase == Some(RemoteJobPhase::Succeeded), "{st:?}");
            ensure!(st.site.as_deref() == Some(s.as_str()), "{st:?}");
            ensure!(st.remote_id.as_deref().is_some_and(|r| !r.is_empty()), "{st:?}");
            ensure!(st.exit_code == Some(0), "{st:?}");
            ensure!(st.attempt_count == Some(1) && st.attempts.len() == 1, "{st:?}");
            let (start, end) = (
                st.start_time.context("start")?.0,
                st.completion_time.context("end")?.0,
            );
            ensure!(end > start, "{start} {end}");
            let a = &st.attempts[0];
            ensure!(
                a.outcome == Some(AttemptOutcome::Succeeded) && a.finish_time.is_some(),
                "{a:?}"
            );
            ensure!(a.pod.as_deref() == Some("hello-0"), "{a:?}");
            // The pod is owned by the job and was placed by the offload scheduler.
            let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
            let pod = pods.get("hello-0").await?;
            ensure!(
                pod.owner_references()
                    .iter()
                    .any(|o| o.kind == "RemoteJob" && o.name == "hello")
            );
            ensure!(pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()) == Some("offload-scheduler"));
            ensure!(sim.stats().creates_per_uid.len() == 1, "{:?}", sim.stats());
            // Events tell the story.
            let out = t
                .cluster
                .kubectl()
                .args(["get", "events", "-n", &t.name, "-o", "json"])
                .output()?;
            let events = String::from_utf8_lossy(&out.stdout);
            ensure!(
                events.contains("AttemptCreated") && events.contains("Completed"),
                "{events}"
            );
            // The metrics count the job and its attempt.
            let metrics = op.get("/metrics").await?;
            ensure!(
                metrics.contains("offload_remotejobs{phase=\"Succeeded\"} 1"),
                "{metrics}"
            );
            let attempt = format!("offload_remotejob_attempts_total{{outcome=\"Succeeded\",site=\"{s}\"}} 1");
            ensure!(metrics.contains(&attempt), "{metrics}");
            ensure!(metrics.contains("offload_remotejob_duration_seconds_count{outcome=\"Succeeded\"} 1"));
            Ok(())
        }
        .await;
        bench.finish(result, &op).await
    })
    .await;
}

#[tokio::test]
async fn a_failing_command_is_retried_up_to_the_limit() {
    TestNamespace::run("rjob-retry", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let sim = SimHandle::start(SimConfig::default()).await?;
        let bench = Bench::new(&t, &[("site", &sim.url)]).await?;
        let s = bench.sites[0].clone();
        let jobs = bench.jobs.clone();
        let result = async {
            bench.ready().await?;
            jobs.create(
                &PostParams::default(),
                &job(&t.name, "flaky", &t.name, "exit 7", json!({"retryLimit": 2}))?,
            )
            .await?;
            let j = finished(&jobs, "flaky", RemoteJobPhase::Failed).await?;
            let st = j.status.context("status")?;
            ensure!(st.attempt_count == Some(3) && st.attempts.len() == 3, "{st:?}");
            ensure!(
                st.attempts
                    .iter()
                    .all(|a| a.outcome == Some(AttemptOutcome::ApplicationFailure)
                        && a.exit_code == Some(7)
                        && a.site.as_deref() == Some(s.as_str())),
                "{st:?}"
            );
            ensure!(st.exit_code == Some(7), "{st:?}");
            let failed = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Failed")
                .context("Failed condition")?;
            ensure!(
                failed.status == "True" && failed.reason == "ApplicationFailure",
                "{failed:?}"
            );
            ensure!(failed.message.contains("exit code 7"), "{failed:?}");
            // Exactly three pods, three creates at the site, and no fourth attempt later.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
            let names: Vec<String> = pods
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            ensure!(names == ["flaky-0", "flaky-1", "flaky-2"], "{names:?}");
            let creates = sim.stats().creates_per_uid;
            ensure!(
                creates.len() == 3 && creates.values().all(|n| *n == 1),
                "{creates:?}"
            );
            // The backoff doubled: attempt 2 started at least 1 + 2 s after attempt 0 ended.
            let gap = st.attempts[2]
                .start_time
                .clone()
                .context("t2")?
                .0
                .duration_since(st.attempts[0].finish_time.clone().context("t0")?.0);
            ensure!(gap.as_secs_f64() >= 2.5, "{gap:?}");
            Ok(())
        }
        .await;
        bench.finish(result, &op).await
    })
    .await;
}

#[tokio::test]
async fn a_site_failure_fails_over_to_another_site() {
    TestNamespace::run("rjob-failover", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let bad = SimHandle::start(SimConfig::default()).await?;
        let good = SimHandle::start(SimConfig::default()).await?;
        // The first choice refuses every create (as the SLURM plugin does on an sbatch error).
        bad.inject(
            faults::status(
                "create",
                500,
                "sbatch: error: Batch job submission failed: Invalid account",
            )
            .times(u32::MAX),
        );
        let bench = Bench::new(&t, &[("first", &bad.url), ("second", &good.url)]).await?;
        let (first, second) = (bench.sites[0].clone(), bench.sites[1].clone());
        let jobs = bench.jobs.clone();
        let result = async {
            bench.ready().await?;
            jobs.create(
                &PostParams::default(),
                &job(&t.name, "mover", &t.name, "echo done", json!({"retryLimit": 3}))?,
            )
            .await?;
            let j = finished(&jobs, "mover", RemoteJobPhase::Succeeded).await?;
            let st = j.status.context("status")?;
            ensure!(st.attempts.len() == 2, "{st:?}");
            let (a0, a1) = (&st.attempts[0], &st.attempts[1]);
            ensure!(
                a0.site.as_deref() == Some(first.as_str()) && a0.outcome == Some(AttemptOutcome::SiteFailure),
                "{a0:?}"
            );
            ensure!(a0.reason.as_deref() == Some("OffloadCreateFailed"), "{a0:?}");
            ensure!(
                a0.message
                    .as_deref()
                    .is_some_and(|m| m.contains("Invalid account")),
                "{a0:?}"
            );
            ensure!(
                a1.site.as_deref() == Some(second.as_str()) && a1.outcome == Some(AttemptOutcome::Succeeded),
                "{a1:?}"
            );
            ensure!(st.site.as_deref() == Some(second.as_str()), "{st:?}");
            // The retry's pod told the scheduler to avoid the failed site.
            let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
            let retry = pods.get("mover-1").await?;
            ensure!(
                retry.annotations().get("offload.dev/exclude-sites") == Some(&first),
                "{:?}",
                retry.annotations()
            );
            ensure!(good.stats().creates_per_uid.len() == 1, "{:?}", good.stats());
            Ok(())
        }
        .await;
        bench.finish(result, &op).await
    })
    .await;
}

#[tokio::test]
async fn deadline_ttl_and_deletion_clean_up_at_the_site() {
    TestNamespace::run("rjob-lifetime", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let work = t.cluster.dir.join(format!("sim-{}", t.name));
        let sim = SimHandle::start(SimConfig {
            work_dir: work.clone(),
            ..SimConfig::default()
        })
        .await?;
        let bench = Bench::new(&t, &[("site", &sim.url)]).await?;
        let jobs = bench.jobs.clone();
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        let sleeper = "echo $$ > $SITESIM_ROOT/pid; exec sleep 300";
        let result = async {
            bench.ready().await?;

            // Deadline: the job fails DeadlineExceeded and its process at the site is stopped.
            jobs.create(
                &PostParams::default(),
                &job(
                    &t.name,
                    "slow",
                    &t.name,
                    sleeper,
                    json!({"activeDeadlineSeconds": 6}),
                )?,
            )
            .await?;
            let j = finished(&jobs, "slow", RemoteJobPhase::Failed).await?;
            let st = j.status.context("status")?;
            let failed = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Failed")
                .context("Failed")?;
            ensure!(failed.reason == "DeadlineExceeded", "{failed:?}");
            ensure!(
                st.attempts.len() == 1 && st.attempts[0].outcome == Some(AttemptOutcome::DeadlineExceeded),
                "{st:?}"
            );
            let pid = pid_file(&work)?;
            wait::until("the process to stop", TIMEOUT, || async {
                Ok::<_, anyhow::Error>((!alive(&pid)?).then_some(()))
            })
            .await?;
            wait::until("the attempt pod to go", TIMEOUT, || async {
                Ok::<_, kube::Error>(pods.get_opt("slow-0").await?.is_none().then_some(()))
            })
            .await?;
            std::fs::remove_file(&pid)?;

            // Deleting a running job deletes its pod and the remote job.
            jobs.create(
                &PostParams::default(),
                &job(&t.name, "doomed", &t.name, sleeper, json!({}))?,
            )
            .await?;
            finished(&jobs, "doomed", RemoteJobPhase::Running).await?;
            let pid = wait::until("the pid file", TIMEOUT, || async {
                Ok::<_, anyhow::Error>(pid_file(&work).ok())
            })
            .await?;
            ensure!(alive(&pid)?, "running before the delete");
            let deletes = sim.stats().deletes;
            jobs.delete("doomed", &DeleteParams::default()).await?;
            wait::until("the process to stop", TIMEOUT, || async {
                Ok::<_, anyhow::Error>((!alive(&pid)?).then_some(()))
            })
            .await?;
            wait::until("the pod to go", TIMEOUT, || async {
                Ok::<_, kube::Error>(pods.get_opt("doomed-0").await?.is_none().then_some(()))
            })
            .await?;
            ensure!(sim.stats().deletes > deletes, "{:?}", sim.stats());

            // A finished job with a TTL disappears with its pods.
            jobs.create(
                &PostParams::default(),
                &job(
                    &t.name,
                    "brief",
                    &t.name,
                    "echo bye",
                    json!({"ttlSecondsAfterFinished": 3}),
                )?,
            )
            .await?;
            finished(&jobs, "brief", RemoteJobPhase::Succeeded).await?;
            ensure!(
                pods.get_opt("brief-0").await?.is_some(),
                "the pod stays until the TTL"
            );
            wait::until("the job and its pod to go", TIMEOUT, || async {
                let gone = jobs.get_opt("brief").await?.is_none() && pods.get_opt("brief-0").await?.is_none();
                Ok::<_, kube::Error>(gone.then_some(()))
            })
            .await?;
            Ok(())
        }
        .await;
        bench.finish(result, &op).await
    })
    .await;
}

#[tokio::test]
async fn status_stays_correct_across_an_operator_restart_during_a_retry() {
    TestNamespace::run("rjob-restart", |t| async move {
        let mut op = Operator::start(t.cluster, &t.name).await?;
        let sim = SimHandle::start(SimConfig::default()).await?;
        let bench = Bench::new(&t, &[("site", &sim.url)]).await?;
        let jobs = bench.jobs.clone();
        let result = async {
            bench.ready().await?;
            // Fails twice (a marker file per attempt in a shared folder), then succeeds.
            let marks = t.cluster.dir.join(format!("marks-{}", t.name));
            std::fs::create_dir_all(&marks)?;
            let script = format!(
                "n=$(ls {m} | wc -l); touch {m}/$(date +%s%N); [ \"$n\" -ge 2 ]",
                m = marks.display()
            );
            jobs.create(
                &PostParams::default(),
                &job(
                    &t.name,
                    "phoenix",
                    &t.name,
                    &script,
                    json!({"retryLimit": 4, "backoffSeconds": 4}),
                )?,
            )
            .await?;
            // In the backoff after the first failure: kill the operator.
            wait::until("the first failure", TIMEOUT, || async {
                let j = jobs.get("phoenix").await?;
                let failed = j
                    .status
                    .map(|s| {
                        s.attempts
                            .iter()
                            .any(|a| a.outcome == Some(AttemptOutcome::ApplicationFailure))
                    })
                    .unwrap_or(false);
                Ok::<_, kube::Error>(failed.then_some(()))
            })
            .await?;
            op.kill().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            op = Operator::start(t.cluster, &t.name).await?;
            let j = finished(&jobs, "phoenix", RemoteJobPhase::Succeeded).await?;
            let st = j.status.context("status")?;
            let outcomes: Vec<_> = st.attempts.iter().map(|a| (a.index, a.outcome)).collect();
            ensure!(
                outcomes
                    == [
                        (0, Some(AttemptOutcome::ApplicationFailure)),
                        (1, Some(AttemptOutcome::ApplicationFailure)),
                        (2, Some(AttemptOutcome::Succeeded))
                    ],
                "{outcomes:?}"
            );
            ensure!(st.attempt_count == Some(3), "{st:?}");
            let creates = sim.stats().creates_per_uid;
            ensure!(
                creates.len() == 3 && creates.values().all(|n| *n == 1),
                "each attempt created once: {creates:?}"
            );
            ensure!(std::fs::read_dir(&marks)?.count() == 3, "three runs at the site");
            Ok(())
        }
        .await;
        bench.finish(result, &op).await
    })
    .await;
}

/// Sites answering as interLink in front of the SLURM plugin does. The first loses the job's pod
/// (purged: its status answers echo the pod back with empty states): the pod fails `OffloadLost`,
/// and the job fails over to the second site.
#[tokio::test]
async fn a_pod_lost_by_its_site_fails_over() {
    TestNamespace::run("rjob-lost", |t| async move {
        let op = Operator::start(t.cluster, &t.name).await?;
        let slurm = || SimConfig {
            slurm_plugin: true,
            ..SimConfig::default()
        };
        let (a, b) = (SimHandle::start(slurm()).await?, SimHandle::start(slurm()).await?);
        let bench = Bench::new(&t, &[("a", &a.url), ("b", &b.url)]).await?;
        let (first, second) = (bench.sites[0].clone(), bench.sites[1].clone());
        let jobs = bench.jobs.clone();
        let result = async {
            bench.ready().await?;
            // The first run waits to be lost; the second finishes.
            let mark = t.cluster.dir.join(format!("lost-{}", t.name));
            let script = format!(
                "if [ -e {m} ]; then echo second run; exit 0; fi; touch {m}; exec sleep 300",
                m = mark.display()
            );
            jobs.create(
                &PostParams::default(),
                &job(&t.name, "castaway", &t.name, &script, json!({}))?,
            )
            .await?;
            finished(&jobs, "castaway", RemoteJobPhase::Running).await?;
            ensure!(a.forget_all() == 1, "the job ran at the first site");
            let j = finished(&jobs, "castaway", RemoteJobPhase::Succeeded).await?;
            let st = j.status.context("status")?;
            ensure!(st.attempts.len() == 2, "{st:?}");
            let a0 = &st.attempts[0];
            ensure!(a0.site.as_deref() == Some(first.as_str()), "{a0:?}");
            ensure!(
                a0.outcome == Some(AttemptOutcome::SiteFailure)
                    && a0.reason.as_deref() == Some("OffloadLost"),
                "{a0:?}"
            );
            ensure!(st.attempts[1].site.as_deref() == Some(second.as_str()), "{st:?}");
            // Each site got the pod once: the echoes were never taken for a created pod.
            for sim in [&a, &b] {
                let creates = sim.stats().creates_per_uid;
                ensure!(
                    creates.len() == 1 && creates.values().all(|n| *n == 1),
                    "{creates:?}"
                );
            }
            Ok(())
        }
        .await;
        bench.finish(result, &op).await
    })
    .await;
}
