//! RemoteJobs: one object for a workflow engine to create and watch, with retries and failover.
//! Real control plane, real operator binary, simulators as sites over HTTP.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, time::Duration};

use anyhow::{Context, ensure};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use offload_e2e::{
    fixtures::{PolicyBuilder, policy_builder, remote_job as job, site_builder, wait_site_ready},
    scenario::Scenario,
    sitesim::{SimConfig, faults},
    wait,
};
use offload_operator::crd::{
    RemoteJob,
    remote_job::{AttemptOutcome, RemoteJobPhase},
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The jobs' policy over `sites` (full names), tried in that order.
fn ordered(sites: &[&str]) -> PolicyBuilder {
    policy_builder("jobs")
        .sites(sites)
        .merge(json!({"strategy": "OrderedFallback"}))
}

/// The scenario's RemoteJobs.
fn jobs(s: &Scenario) -> Api<RemoteJob> {
    Api::namespaced(s.t.client.clone(), &s.t.name)
}

/// The simulator runs the jobs' scripts as real processes (pid files, exit codes), as
/// `SimConfig::default()` does; [`Scenario::site_with`] starts it simulating.
fn processes(c: &mut SimConfig) {
    c.simulate = false;
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

#[tokio::test]
async fn a_job_succeeds_and_kubectl_wait_returns() {
    Scenario::run("rjob-ok", |s| async move {
        let sim = s.site_with(site_builder("site"), processes).await?;
        let site = s.name("site");
        let policy = s.policy(ordered(&[&site])).await?;
        let jobs = jobs(&s);
        jobs.create(
            &PostParams::default(),
            &job(&s.t.name, "hello", &policy, "echo hello; sleep 1", json!({}))?,
        )
        .await?;
        // What a workflow engine does: wait for the Complete condition.
        // (Off the test's runtime thread: the simulator is served from it.)
        let mut wait_cmd = s.t.cluster.kubectl();
        wait_cmd.args([
            "wait",
            "--for=condition=Complete",
            "remotejob/hello",
            "-n",
            &s.t.name,
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
        ensure!(st.site.as_deref() == Some(site.as_str()), "{st:?}");
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
        let pod = s.pods.get("hello-0").await?;
        ensure!(
            pod.owner_references()
                .iter()
                .any(|o| o.kind == "RemoteJob" && o.name == "hello")
        );
        ensure!(pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()) == Some("offload-scheduler"));
        ensure!(sim.stats().creates_per_uid.len() == 1, "{:?}", sim.stats());
        // Events tell the story.
        let out =
            s.t.cluster
                .kubectl()
                .args(["get", "events", "-n", &s.t.name, "-o", "json"])
                .output()?;
        let events = String::from_utf8_lossy(&out.stdout);
        ensure!(
            events.contains("AttemptCreated") && events.contains("Completed"),
            "{events}"
        );
        // The metrics count the job and its attempt.
        let metrics = s.operator_get("/metrics").await?;
        ensure!(
            metrics.contains("offload_remotejobs{phase=\"Succeeded\"} 1"),
            "{metrics}"
        );
        let attempt = format!("offload_remotejob_attempts_total{{outcome=\"Succeeded\",site=\"{site}\"}} 1");
        ensure!(metrics.contains(&attempt), "{metrics}");
        ensure!(metrics.contains("offload_remotejob_duration_seconds_count{outcome=\"Succeeded\"} 1"));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_failing_command_is_retried_up_to_the_limit() {
    Scenario::run("rjob-retry", |s| async move {
        let sim = s.site_with(site_builder("site"), processes).await?;
        let site = s.name("site");
        let policy = s.policy(ordered(&[&site])).await?;
        let jobs = jobs(&s);
        jobs.create(
            &PostParams::default(),
            &job(&s.t.name, "flaky", &policy, "exit 7", json!({"retryLimit": 2}))?,
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
                    && a.site.as_deref() == Some(site.as_str())),
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
        let names: Vec<String> = s
            .pods
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
    })
    .await;
}

#[tokio::test]
async fn a_site_failure_fails_over_to_another_site() {
    Scenario::run("rjob-failover", |s| async move {
        let bad = s.sim(SimConfig::default()).await?;
        // The first choice refuses every create (as the SLURM plugin does on an sbatch error).
        bad.inject(
            faults::status(
                "create",
                500,
                "sbatch: error: Batch job submission failed: Invalid account",
            )
            .times(u32::MAX),
        );
        let first = s.create_site(&site_builder("first"), &bad.url).await?;
        wait_site_ready(&s.sites, &first).await?;
        let good = s.site_with(site_builder("second"), processes).await?;
        let second = s.name("second");
        let policy = s.policy(ordered(&[&first, &second])).await?;
        let jobs = jobs(&s);
        jobs.create(
            &PostParams::default(),
            &job(&s.t.name, "mover", &policy, "echo done", json!({"retryLimit": 3}))?,
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
        let retry = s.pods.get("mover-1").await?;
        ensure!(
            retry.annotations().get("offload.dev/exclude-sites") == Some(&first),
            "{:?}",
            retry.annotations()
        );
        ensure!(good.stats().creates_per_uid.len() == 1, "{:?}", good.stats());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn deadline_ttl_and_deletion_clean_up_at_the_site() {
    Scenario::run("rjob-lifetime", |s| async move {
        let work = s.t.cluster.dir.join(format!("sim-{}", s.t.name));
        let sim = s
            .site_with(site_builder("site"), |c| {
                processes(c);
                c.work_dir = work.clone();
            })
            .await?;
        let site = s.name("site");
        let policy = s.policy(ordered(&[&site])).await?;
        let jobs = jobs(&s);
        let pods = &s.pods;
        let sleeper = "echo $$ > $SITESIM_ROOT/pid; exec sleep 300";

        // Deadline: the job fails DeadlineExceeded and its process at the site is stopped.
        jobs.create(
            &PostParams::default(),
            &job(
                &s.t.name,
                "slow",
                &policy,
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
            &job(&s.t.name, "doomed", &policy, sleeper, json!({}))?,
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
                &s.t.name,
                "brief",
                &policy,
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
    })
    .await;
}

#[tokio::test]
async fn status_stays_correct_across_an_operator_restart_during_a_retry() {
    Scenario::run("rjob-restart", |s| async move {
        let sim = s.site_with(site_builder("site"), processes).await?;
        let policy = s.policy(ordered(&[&s.name("site")])).await?;
        let jobs = jobs(&s);
        // Fails twice (a marker file per attempt in a shared folder), then succeeds.
        let marks = s.t.cluster.dir.join(format!("marks-{}", s.t.name));
        std::fs::create_dir_all(&marks)?;
        let script = format!(
            "n=$(ls {m} | wc -l); touch {m}/$(date +%s%N); [ \"$n\" -ge 2 ]",
            m = marks.display()
        );
        jobs.create(
            &PostParams::default(),
            &job(
                &s.t.name,
                "phoenix",
                &policy,
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
        s.stop_operator().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.start_operator().await?;
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
    })
    .await;
}

/// Sites answering as interLink in front of the SLURM plugin does. The first loses the job's pod
/// (purged: its status answers echo the pod back with empty states): the pod fails `OffloadLost`,
/// and the job fails over to the second site.
#[tokio::test]
async fn a_pod_lost_by_its_site_fails_over() {
    Scenario::run("rjob-lost", |s| async move {
        let slurm = |c: &mut SimConfig| {
            processes(c);
            c.slurm_plugin = true;
        };
        let a = s.site_with(site_builder("a"), slurm).await?;
        let b = s.site_with(site_builder("b"), slurm).await?;
        let (first, second) = (s.name("a"), s.name("b"));
        let policy = s.policy(ordered(&[&first, &second])).await?;
        let jobs = jobs(&s);
        // The first run waits to be lost; the second finishes.
        let mark = s.t.cluster.dir.join(format!("lost-{}", s.t.name));
        let script = format!(
            "if [ -e {m} ]; then echo second run; exit 0; fi; touch {m}; exec sleep 300",
            m = mark.display()
        );
        jobs.create(
            &PostParams::default(),
            &job(&s.t.name, "castaway", &policy, &script, json!({}))?,
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
            a0.outcome == Some(AttemptOutcome::SiteFailure) && a0.reason.as_deref() == Some("OffloadLost"),
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
    })
    .await;
}
