//! The real chain: our operator binary -> the upstream interLink API server (0.6.2) -> its SLURM
//! plugin (0.6.2-pre5) -> a real Slurm 22.05 (slurmctld + slurmd on this host). Only the container
//! runtime is replaced (`e2e/bin/singularity-shim` runs the command on the host).
//!
//! Needs the chain started by `e2e/bin/interlink-up DIR`, named by `OFFLOAD_E2E_INTERLINK=DIR/env`:
//! `make e2e` builds it from the upstream sources in `../shared/upstream` and starts it, and fails
//! when it cannot; without that variable this test fails with the reason (never a silent pass).
//! `E2E_SKIP_INTERLINK=1 make e2e` skips it by name, and says so.
//! The chain is one Slurm cluster, so everything runs in one test function, step by step.
//!
//! Timing: the plugin runs `squeue` at most once every 10 s, so each state change reaches the pod
//! 0-10 s late (docs/interlink-compatibility.md, 3a); the waits are generous.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{process::Command, time::Duration};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};
use offload_e2e::{
    TestNamespace,
    cluster::EnvFile,
    fixtures::{delete_sites, site, wait_site_ready},
    operator::{Operator, TEST_LABEL},
    s3::ObjectStore,
    wait,
};
use offload_operator::crd::{
    ANNOTATION_REMOTE_ID, OffloadPolicy, OffloadSite, RemoteJob, remote_job::RemoteJobPhase,
};
use offload_stage::store::sha256_hex;
use serde_json::json;

/// Names the env file written by `e2e/bin/interlink-up`.
const INTERLINK_ENV: &str = "OFFLOAD_E2E_INTERLINK";
/// One state change can take a Slurm scheduling pass plus a 10 s squeue cycle at the plugin plus
/// one status sync; a loaded 2-core machine stretches all three.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The variables of the env file `interlink-up` wrote.
fn chain_env() -> anyhow::Result<Option<EnvFile>> {
    let Some(path) = std::env::var_os(INTERLINK_ENV) else {
        return Ok(None);
    };
    EnvFile::read(std::path::Path::new(&path))
        .with_context(|| format!("{INTERLINK_ENV}: is interlink-up running?"))
        .map(Some)
}

/// A pod bound straight to the site's node (as in execution.rs), running `script` with `sh -c`.
fn pod(name: &str, site: &str, script: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": format!("offload-{site}"), "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox:1.36", "command": ["sh", "-c", script],
                "env": [{"name": "GREETING", "value": "hello 'slurm'"}]}]}
    }))?)
}

/// `pod` with the ConfigMap `app-config` and the Secret `app-secret` mounted read-only under
/// `/etc/offload-e2e/` (folders that do not exist on the host: the shim overlays them).
fn pod_with_volumes(name: &str, site: &str, script: &str) -> anyhow::Result<Pod> {
    let mut p = pod(name, site, script)?;
    let spec = p.spec.as_mut().context("spec")?;
    spec.volumes = Some(serde_json::from_value(json!([
        {"name": "config", "configMap": {"name": "app-config"}},
        {"name": "secret", "secret": {"secretName": "app-secret"}}
    ]))?);
    spec.containers[0].volume_mounts = Some(serde_json::from_value(json!([
        {"name": "config", "mountPath": "/etc/offload-e2e/config", "readOnly": true},
        {"name": "secret", "mountPath": "/etc/offload-e2e/secret", "readOnly": true}
    ]))?);
    Ok(p)
}

/// A RemoteJob running `script`, placed by `policy` (as in remote_jobs.rs).
fn job(ns: &str, name: &str, policy: &str, script: &str) -> anyhow::Result<RemoteJob> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "offload.dev/v1alpha1", "kind": "RemoteJob",
        "metadata": {"name": name, "namespace": ns, "labels": {TEST_LABEL: ns}},
        "spec": {"policy": policy, "backoffSeconds": 1,
            "template": {"spec": {"containers": [{"name": "main", "image": "busybox:1.36",
                "command": ["sh", "-c", script]}]}}}
    }))?)
}

/// A policy over `sites`, tried in that order.
fn policy(ns: &str, name: &str, sites: &[&str]) -> anyhow::Result<OffloadPolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadPolicy",
        "metadata": {"name": name, "labels": {TEST_LABEL: ns}},
        "spec": {"sites": sites, "strategy": "OrderedFallback"}
    }))?)
}

async fn phase(pods: &Api<Pod>, name: &str, want: &str) -> anyhow::Result<Pod> {
    wait::until(&format!("pod {name} {want}"), TIMEOUT, || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let st = p.status.clone().unwrap_or_default();
        let ph = st.phase.clone().unwrap_or_default();
        if ph == want {
            return Ok(Some(p));
        }
        // Shown on timeout: where the pod is stuck.
        Err(format!(
            "phase {ph:?}, reason {:?}, message {:?}, containers {:?}",
            st.reason,
            st.message,
            st.container_statuses
                .map(|c| c.into_iter().map(|c| c.state).collect::<Vec<_>>())
        ))
    })
    .await
}

fn exit_code(p: &Pod) -> Option<i32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

/// Runs a Slurm client command off the test's runtime thread; its stdout.
async fn slurm(args: &[&str]) -> anyhow::Result<String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || Command::new(&args[0]).args(&args[1..]).output()).await??;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `JOBID STATE` lines of the Slurm jobs named `uid` (the plugin names each job after its pod's
/// UID), finished ones included (`MinJobAge=300` keeps them).
async fn squeue_by_name(uid: &str) -> anyhow::Result<Vec<(String, String)>> {
    let out = slurm(&["squeue", "-h", "-t", "all", "-n", uid, "-o", "%i %T"]).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(j, s)| (j.trim().to_string(), s.trim().to_string()))
        .collect())
}

/// A `Key=Value` field of `scontrol show job JID`; `None` when Slurm no longer knows the job.
async fn scontrol_field(jid: &str, key: &str) -> anyhow::Result<Option<String>> {
    let out = slurm(&["scontrol", "show", "job", jid]).await?;
    Ok(out
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string)))
}

/// The Slurm job ID the operator recorded for a pod, checked against Slurm: exactly one job is
/// named after the pod's UID, and it is that one.
async fn slurm_job_of(p: &Pod) -> anyhow::Result<String> {
    let jid = p
        .annotations()
        .get(ANNOTATION_REMOTE_ID)
        .cloned()
        .with_context(|| format!("pod {} has no {ANNOTATION_REMOTE_ID}", p.name_any()))?;
    let uid = p.uid().context("uid")?;
    let jobs = squeue_by_name(&uid).await?;
    ensure!(
        jobs.len() == 1 && jobs[0].0 == jid,
        "pod {} ({uid}): remote id {jid:?}, Slurm jobs named after its UID: {jobs:?}",
        p.name_any()
    );
    Ok(jid)
}

async fn kubectl_logs(t: &TestNamespace, name: &str) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(t.cluster.kubectl());
    let out = cmd.args(["logs", "-n", &t.name, name]).output().await?;
    ensure!(
        out.status.success(),
        "kubectl logs {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn since(t0: tokio::time::Instant) -> String {
    format!("{:.1}s", t0.elapsed().as_secs_f64())
}

#[tokio::test]
async fn pods_and_remote_jobs_run_as_real_slurm_jobs() {
    let env = match chain_env() {
        Ok(Some(env)) => env,
        Ok(None) => panic!(
            "{INTERLINK_ENV} is not set: start the real chain with e2e/bin/interlink-up DIR and set \
             {INTERLINK_ENV}=DIR/env (docs/interlink-compatibility.md)"
        ),
        Err(e) => panic!("{e:#}"),
    };
    let url = env
        .get("INTERLINK_URL")
        .unwrap_or_else(|e| panic!("{INTERLINK_ENV}: {e:#}"));
    // interlink-up keeps its logs next to the env file.
    let state_dir = std::path::Path::new(&std::env::var_os(INTERLINK_ENV).unwrap_or_default())
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();

    TestNamespace::run("interlink-slurm", |t| async move {
        let t0 = tokio::time::Instant::now();
        // The object store listens on loopback, which the operator refuses to call unless allowed.
        let op = Operator::start_with(t.cluster, &t.name, &["--data-endpoints-allowed", "127.0.0.1"]).await?;
        let sites: Api<OffloadSite> = Api::all(t.client.clone());
        let name = format!("{}-slurm", t.name);
        // The plugin answers the ping by running `sinfo`: allow it a few seconds.
        let spec = json!({"healthCheck": {"intervalSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
            "statusSyncIntervalSeconds": 2});
        sites.create(&PostParams::default(), &site(&t.name, &name, &url, spec)?).await?;
        let policies: Api<OffloadPolicy> = Api::all(t.client.clone());
        policies.create(&PostParams::default(), &policy(&t.name, &t.name, &[&name])?).await?;
        let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.name);
        let jobs: Api<RemoteJob> = Api::namespaced(t.client.clone(), &t.name);
        t.default_service_account().await?;
        let pp = PostParams::default();
        // UIDs of the pods sent to Slurm, for the final check that none is left queued or running.
        let sent = std::sync::Mutex::new(Vec::<String>::new());
        let result = async {
            wait_site_ready(&sites, &name).await?;
            eprintln!("interlink_slurm: site Ready at {}", since(t0));

            // 1. A pod runs as a Slurm job, visible in squeue/scontrol while it runs; its output
            //    and its environment come back through `kubectl logs`. A failing command at the
            //    same time ends its pod Failed with the command's exit code.
            //    Its mounted ConfigMap and Secret files are readable at their mount paths.
            let cms: Api<ConfigMap> = Api::namespaced(t.client.clone(), &t.name);
            cms.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "app-config"},
                "data": {"greeting": "from-a-configmap"}}))?).await?;
            let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.name);
            secrets.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "app-secret"},
                "stringData": {"token": "s3cr3t-value"}}))?).await?;
            let script = "echo \"start $GREETING $((6*7))\"; echo \"config=$(cat /etc/offload-e2e/config/greeting)\"; \
                echo \"secret-bytes=$(wc -c < /etc/offload-e2e/secret/token)\"; sleep 30; echo done-at-slurm";
            pods.create(&pp, &pod_with_volumes("hello", &name, script)?).await?;
            pods.create(&pp, &pod("three", &name, "echo failing >&2; exit 3")?).await?;
            let running = phase(&pods, "hello", "Running").await?;
            eprintln!("interlink_slurm: hello Running at {}", since(t0));
            let jid = slurm_job_of(&running).await?;
            sent.lock().unwrap().extend(running.uid());
            let state = scontrol_field(&jid, "JobState").await?;
            ensure!(state.as_deref() == Some("RUNNING"), "hello is Running but Slurm job {jid} is {state:?}");
            let name_in_slurm = scontrol_field(&jid, "JobName").await?;
            ensure!(name_in_slurm == running.uid(), "job {jid} is named {name_in_slurm:?}");

            let three = phase(&pods, "three", "Failed").await?;
            eprintln!("interlink_slurm: three Failed at {}", since(t0));
            ensure!(exit_code(&three) == Some(3), "three: {:?}", three.status);
            let jid3 = slurm_job_of(&three).await?;
            sent.lock().unwrap().extend(three.uid());
            let (state, code) = (scontrol_field(&jid3, "JobState").await?, scontrol_field(&jid3, "ExitCode").await?);
            ensure!(
                state.as_deref() == Some("FAILED") && code.as_deref() == Some("3:0"),
                "Slurm job {jid3}: {state:?} {code:?}"
            );

            let done = phase(&pods, "hello", "Succeeded").await?;
            eprintln!("interlink_slurm: hello Succeeded at {}", since(t0));
            ensure!(exit_code(&done) == Some(0), "hello: {:?}", done.status);
            let state = scontrol_field(&jid, "JobState").await?;
            ensure!(state.as_deref() == Some("COMPLETED"), "Slurm job {jid}: {state:?}");
            // The plugin wraps the output with its own lines: "contains", never equality.
            let logs = kubectl_logs(&t, "hello").await?;
            ensure!(
                logs.contains("start hello 'slurm' 42")
                    && logs.contains("config=from-a-configmap")
                    && logs.contains("secret-bytes=12")
                    && logs.contains("done-at-slurm"),
                "kubectl logs hello:\n{logs}"
            );

            // 2. Deleting a running pod cancels its Slurm job, and the pod goes away.
            pods.create(&pp, &pod("victim", &name, "echo victim; sleep 600")?).await?;
            let victim = phase(&pods, "victim", "Running").await?;
            eprintln!("interlink_slurm: victim Running at {}", since(t0));
            let vjid = slurm_job_of(&victim).await?;
            sent.lock().unwrap().extend(victim.uid());
            let vuid = victim.uid().context("uid")?;
            pods.delete("victim", &DeleteParams::default()).await?;
            wait::until("the Slurm job of the deleted pod to be cancelled", TIMEOUT, || async {
                let state = scontrol_field(&vjid, "JobState").await?;
                let gone_or_cancelled = matches!(state.as_deref(), None | Some("CANCELLED"));
                if gone_or_cancelled {
                    Ok(Some(()))
                } else {
                    Err(anyhow::anyhow!("Slurm job {vjid} is {state:?}"))
                }
            })
            .await?;
            eprintln!("interlink_slurm: victim's Slurm job cancelled at {}", since(t0));
            let left: Vec<_> = squeue_by_name(&vuid)
                .await?
                .into_iter()
                .filter(|(_, s)| s != "CANCELLED")
                .collect();
            ensure!(left.is_empty(), "Slurm jobs of the deleted pod not cancelled: {left:?}");
            wait::until("the deleted pod to disappear", TIMEOUT, || async {
                let p = pods.get_opt("victim").await.map_err(|e| e.to_string())?;
                match p {
                    None => Ok(Some(())),
                    Some(p) => Err(format!(
                        "still there: deletionTimestamp {:?}, finalizers {:?}, phase {:?}",
                        p.metadata.deletion_timestamp,
                        p.finalizers(),
                        p.status.as_ref().and_then(|s| s.phase.clone())
                    )),
                }
            })
            .await?;
            eprintln!("interlink_slurm: victim gone at {}", since(t0));

            // 3. A RemoteJob placed by a policy on the site completes there as a Slurm job.
            jobs.create(&pp, &job(&t.name, "rjob", &t.name, "echo from a remote job; sleep 2")?).await?;
            let j = wait::until("RemoteJob rjob Succeeded", TIMEOUT, || async {
                let j = jobs.get("rjob").await.map_err(|e| e.to_string())?;
                let st = j.status.clone().unwrap_or_default();
                if st.phase == Some(RemoteJobPhase::Succeeded) {
                    return Ok(Some(j));
                }
                if st.phase == Some(RemoteJobPhase::Failed) {
                    return Ok(Some(j));
                }
                Err(format!("phase {:?}, message {:?}", st.phase, st.message))
            })
            .await?;
            eprintln!("interlink_slurm: RemoteJob finished at {}", since(t0));
            let st = j.status.context("status")?;
            ensure!(st.phase == Some(RemoteJobPhase::Succeeded), "RemoteJob: {st:?}");
            ensure!(st.site.as_deref() == Some(name.as_str()), "RemoteJob: {st:?}");
            ensure!(st.exit_code == Some(0) && st.attempts.len() == 1, "RemoteJob: {st:?}");
            let attempt = pods.get("rjob-0").await?;
            let rjid = slurm_job_of(&attempt).await?;
            sent.lock().unwrap().extend(attempt.uid());
            ensure!(st.remote_id.as_deref() == Some(rjid.as_str()), "RemoteJob remote id {:?}, Slurm job {rjid}", st.remote_id);
            let state = scontrol_field(&rjid, "JobState").await?;
            ensure!(state.as_deref() == Some("COMPLETED"), "Slurm job {rjid}: {state:?}");
            let logs = kubectl_logs(&t, "rjob-0").await?;
            ensure!(logs.contains("from a remote job"), "kubectl logs rjob-0:\n{logs}");

            // 4. The data pipeline of e2e/tests/data.rs as Slurm jobs: stage 1 reads a dataset
            //    and writes a model, stage 2 (inputsFrom) reads the model and writes a report,
            //    through a real object store; the stage tool runs as each job's first step.
            pipeline(&t, &t.name, &jobs, &sent).await?;
            eprintln!("interlink_slurm: data pipeline passed at {}", since(t0));
            eprintln!("interlink_slurm: all steps passed at {}", since(t0));
            Ok(())
        }
        .await;
        let cleanup = async {
            for j in ["rjob", "train", "report"] {
                let _ = jobs.delete(j, &DeleteParams::default()).await;
            }
            delete_sites(&t, &sites, &[&name]).await?;
            policies.delete(&t.name, &DeleteParams::default()).await?;
            // Nothing this test submitted may keep a Slurm slot (an orphan of a doubled create, or
            // a pod deleted without scancel).
            let sent = sent.lock().unwrap().clone();
            let mut left = Vec::new();
            for uid in &sent {
                for (jid, state) in squeue_by_name(uid).await? {
                    if matches!(state.as_str(), "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING") {
                        left.push(format!("{jid} ({uid}) {state}"));
                    }
                }
            }
            ensure!(left.is_empty(), "Slurm jobs left after the test: {left:?}");
            anyhow::Ok(())
        }
        .await;
        eprintln!("interlink_slurm: cleaned up at {} ({cleanup:?})", since(t0));
        match (result, cleanup) {
            (Err(e), _) => bail!(
                "{e:#}\n{}\n(interLink API server and SLURM plugin logs: {state_dir}/interlink.log, {state_dir}/slurm-plugin.log)",
                op.log_tail(80)
            ),
            (Ok(()), Err(e)) => bail!("cleanup: {e:#}\n{}", op.log_tail(80)),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
    .await;
}

/// Step 4: the two-stage pipeline, with its own object store, both stages at the Slurm site.
async fn pipeline(
    t: &TestNamespace,
    policy: &str,
    jobs: &Api<RemoteJob>,
    sent: &std::sync::Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    let root = t.cluster.dir.join(format!("s3-{}", t.name));
    let store = tokio::task::spawn_blocking(move || ObjectStore::up(&root, &["shared"])).await??;
    let result = async {
        let ns = &t.name;
        let ep = store.endpoint.clone();
        let secrets: Api<Secret> = Api::namespaced(t.client.clone(), ns);
        secrets
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "s3"},
                "stringData": {"accessKeyId": store.admin.access_key_id, "secretAccessKey": store.admin.secret_access_key}}))?)
            .await?;
        let dataset = b"events 1 2 3\n".repeat(1000);
        store.put("shared", &format!("{ns}/dataset"), &dataset).await?;
        let art = |name: &str, key: &str| json!({"name": name, "url": format!("s3://shared/{ns}/{key}"), "endpoint": ep, "credentialsSecret": "s3"});
        let pp = PostParams::default();
        jobs.create(&pp, &offload_e2e::fixtures::remote_job(ns, "train", policy,
            "cat \"$OFFLOAD_INPUT_DATASET\" > \"$OFFLOAD_OUTPUT_MODEL\"; echo trained-at-slurm >> \"$OFFLOAD_OUTPUT_MODEL\"",
            json!({"inputs": [art("dataset", "dataset")], "outputs": [art("model", "model.bin")]}))?).await?;
        jobs.create(&pp, &offload_e2e::fixtures::remote_job(ns, "report", policy,
            "wc -c < \"$OFFLOAD_INPUT_MODEL\" > \"$OFFLOAD_OUTPUT_REPORT\"",
            json!({"inputsFrom": [{"name": "model", "remoteJob": "train", "output": "model"}],
                "outputs": [art("report", "report.txt")]}))?).await?;
        for name in ["train", "report"] {
            let st = wait::until(&format!("RemoteJob {name} finished"), TIMEOUT * 2, || async {
                let st = jobs.get(name).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
                match st.phase {
                    Some(RemoteJobPhase::Succeeded | RemoteJobPhase::Failed) => Ok(Some(st)),
                    p => Err(format!("phase {p:?}, message {:?}", st.message)),
                }
            })
            .await?;
            if let Some(pod) = st.pod.as_deref() {
                let pods: Api<Pod> = Api::namespaced(t.client.clone(), ns);
                let uid = pods.get(pod).await?.uid();
                sent.lock().unwrap().extend(uid);
            }
            ensure!(st.phase == Some(RemoteJobPhase::Succeeded), "{name}: {st:?}");
        }
        let mut model = dataset.clone();
        model.extend_from_slice(b"trained-at-slurm\n");
        let stored = store.get("shared", &format!("{ns}/model.bin")).await?.context("no model")?;
        ensure!(stored == model, "the model's bytes differ ({} stored)", stored.len());
        let train = jobs.get("train").await?.status.unwrap_or_default();
        ensure!(
            train.outputs.first().and_then(|o| o.sha256.clone()) == Some(sha256_hex(&model)),
            "train's status.outputs: {:?}",
            train.outputs
        );
        let report = store.get("shared", &format!("{ns}/report.txt")).await?.context("no report")?;
        ensure!(
            String::from_utf8_lossy(&report).trim() == model.len().to_string(),
            "report: {:?}",
            String::from_utf8_lossy(&report)
        );
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("{}", store.log_tail(30));
    }
    let down = tokio::task::spawn_blocking(move || store.down()).await?;
    result.and(down)
}
