//! Data-aware RemoteJobs with a real object store (SeaweedFS, `e2e/bin/s3-up`): a two-stage
//! pipeline across sites chained with `inputsFrom`, placement near the data, and the failures a
//! user must see (`InputMissing`, `OutputUploadFailed`). Real control plane, real operator binary,
//! simulators running the pods' commands (and the stage tool) as processes.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use offload_e2e::{
    fixtures::{policy_builder, remote_job as job, site_builder},
    s3::ObjectStore,
    scenario::Scenario,
    sitesim::SimConfig,
    wait,
};
use offload_operator::crd::{
    RemoteJob,
    remote_job::{RemoteJobPhase, RemoteJobStatus},
};
use offload_stage::store::sha256_hex;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

fn processes(c: &mut SimConfig) {
    c.simulate = false;
}

async fn finished(
    jobs: &Api<RemoteJob>,
    name: &str,
    want: RemoteJobPhase,
) -> anyhow::Result<RemoteJobStatus> {
    finished_within(jobs, name, want, TIMEOUT).await
}

async fn finished_within(
    jobs: &Api<RemoteJob>,
    name: &str,
    want: RemoteJobPhase,
    timeout: Duration,
) -> anyhow::Result<RemoteJobStatus> {
    wait::until(&format!("RemoteJob {name} {want:?}"), timeout, || async {
        let j = jobs.get(name).await.map_err(|e| e.to_string())?;
        let st = j.status.unwrap_or_default();
        if st.phase == Some(want) {
            return Ok(Some(st));
        }
        if matches!(st.phase, Some(RemoteJobPhase::Succeeded | RemoteJobPhase::Failed)) {
            return Err(format!("ended {:?}: {:?}", st.phase, st.message));
        }
        Err(format!(
            "phase {:?}, message {:?}, attempts {:?}",
            st.phase, st.message, st.attempts
        ))
    })
    .await
}

fn condition<'a>(
    st: &'a RemoteJobStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

fn artifact(name: &str, endpoint: &str, url: &str, secret: &str) -> Value {
    json!({"name": name, "url": url, "endpoint": endpoint, "credentialsSecret": secret})
}

#[tokio::test]
async fn a_two_stage_pipeline_moves_its_data_between_sites() {
    // The store listens on loopback, which the operator refuses to call unless allowed.
    Scenario::run_with(
        "data",
        &["--data-endpoints-allowed", "127.0.0.1"],
        |s| async move {
            let store = store_up(&s, &["shared", "gpu-site", "htc-site", "cloud-site"]).await?;
            let result = pipeline(&s, &store).await;
            store_down(store, result).await
        },
    )
    .await;
}

/// A store for this test (its own folder), with these buckets.
async fn store_up(s: &Scenario, buckets: &'static [&'static str]) -> anyhow::Result<ObjectStore> {
    let root = s.t.cluster.dir.join(format!("s3-{}", s.t.name));
    tokio::task::spawn_blocking(move || ObjectStore::up(&root, buckets)).await?
}

/// Stops the store, with its log when the test failed; the test's result first.
async fn store_down(store: ObjectStore, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if result.is_err() {
        eprintln!("{}", store.log_tail(40));
    }
    let down = tokio::task::spawn_blocking(move || store.down()).await?;
    result.and(down)
}

async fn pipeline(s: &Scenario, store: &ObjectStore) -> anyhow::Result<()> {
    let ns = &s.t.name;
    let ep = store.endpoint.as_str();
    // The store's credentials, as a user would keep them: one Secret that may write, one that may
    // only read.
    let secrets: Api<Secret> = Api::namespaced(s.t.client.clone(), ns);
    for (name, c) in [("s3", &store.admin), ("s3-read-only", &store.read_only)] {
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name},
            "stringData": {"accessKeyId": c.access_key_id, "secretAccessKey": c.secret_access_key}}))?;
        secrets.create(&PostParams::default(), &secret).await?;
    }

    // Three sites, each with its own bucket in the store; htc and cloud alike in everything else,
    // so only where the data is can tell them apart. A fourth site this namespace may not use.
    let local = |bucket: &str| json!({"localStores": [{"endpoint": ep, "buckets": [bucket]}], "remoteBandwidth": "10Mi"});
    let gpu_sim = s
        .site_with(
            site_builder("gpu")
                .kind("HPC")
                .gpus("A100", 4, "80Gi")
                .set("data", local("gpu-site")),
            processes,
        )
        .await?;
    let htc_sim = s
        .site_with(
            site_builder("htc").kind("HTC").set("data", local("htc-site")),
            processes,
        )
        .await?;
    let cloud_sim = s
        .site_with(
            site_builder("cloud")
                .kind("Cloud")
                .set("data", local("cloud-site")),
            processes,
        )
        .await?;
    let closed_sim = s
        .site_with(
            site_builder("closed").tenants(&[("team", "someone-else")]),
            processes,
        )
        .await?;
    let (gpu, htc, cloud) = (s.name("gpu"), s.name("htc"), s.name("cloud"));
    let on_gpu = s.policy(policy_builder("train").sites(&[&gpu])).await?;
    // Only the data decides between htc and cloud (other scores could differ by a second of
    // observed queue wait, which the normalised queue score would make as large as the data's).
    let analyse = s
        .policy(
            policy_builder("analyse")
                .sites(&[&htc, &cloud, &s.name("closed")])
                .merge(json!({"weights": {"queueTime": 0, "cost": 0, "freeCapacity": 0, "gpuFit": 0, "dataLocality": 100}})),
        )
        .await?;

    // The dataset both pipelines train on, its size declared.
    let dataset = b"measurements 1 2 3 5 8 13 21\n".repeat(4096);
    store.put("shared", &format!("{ns}/dataset"), &dataset).await?;
    let mut dataset_in = artifact("dataset", ep, &format!("s3://shared/{ns}/dataset"), "s3");
    dataset_in["size"] = dataset.len().into();

    // Two pipelines: stage 1 on the GPU site writes its model into htc's bucket (a) or cloud's (b);
    // stage 2 reads it on htc or cloud and writes a report. Both stages are created at once: stage 2
    // waits for stage 1.
    let jobs: Api<RemoteJob> = Api::namespaced(s.t.client.clone(), ns);
    let pp = PostParams::default();
    for (p, bucket) in [("a", "htc-site"), ("b", "cloud-site")] {
        let train = job(
            ns,
            &format!("train-{p}"),
            &on_gpu,
            "sleep 2; cat \"$OFFLOAD_INPUT_DATASET\" > \"$OFFLOAD_OUTPUT_MODEL\"; echo trained >> \"$OFFLOAD_OUTPUT_MODEL\"",
            json!({"inputs": [dataset_in],
                "outputs": [artifact("model", ep, &format!("s3://{bucket}/{ns}/model-{p}.bin"), "s3")],
                "template": {"spec": {"containers": [{"name": "main", "image": "busybox",
                    "command": ["sh", "-c", "sleep 2; cat \"$OFFLOAD_INPUT_DATASET\" > \"$OFFLOAD_OUTPUT_MODEL\"; echo trained >> \"$OFFLOAD_OUTPUT_MODEL\""],
                    "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}}),
        )?;
        jobs.create(&pp, &train).await?;
        let report = job(
            ns,
            &format!("report-{p}"),
            &analyse,
            "wc -c < \"$OFFLOAD_INPUT_MODEL\" > \"$OFFLOAD_OUTPUT_REPORT\"; tail -n 1 \"$OFFLOAD_INPUT_MODEL\" >> \"$OFFLOAD_OUTPUT_REPORT\"",
            json!({"inputsFrom": [{"name": "model", "remoteJob": format!("train-{p}"), "output": "model"}],
                "outputs": [artifact("report", ep, &format!("s3://shared/{ns}/report-{p}.txt"), "s3")]}),
        )?;
        jobs.create(&pp, &report).await?;
    }
    // Stage 2 waits while stage 1 runs.
    let waiting = wait::until("report-a WaitingForInputs", TIMEOUT, || async {
        let st = jobs.get("report-a").await?.status.unwrap_or_default();
        Ok::<_, kube::Error>(
            condition(&st, "WaitingForInputs")
                .filter(|c| c.status == "True")
                .cloned(),
        )
    })
    .await?;
    ensure!(
        waiting.message.contains("train-a"),
        "WaitingForInputs does not name the job: {waiting:?}"
    );

    let mut model = dataset.clone();
    model.extend_from_slice(b"trained\n");
    for (p, bucket, site) in [("a", "htc-site", &htc), ("b", "cloud-site", &cloud)] {
        let train = finished(&jobs, &format!("train-{p}"), RemoteJobPhase::Succeeded).await?;
        ensure!(
            train.site.as_deref() == Some(gpu.as_str()),
            "train-{p} ran at {:?}",
            train.site
        );
        // The model's bytes are in the store, and the status says so with size and checksum.
        let stored = store
            .get(bucket, &format!("{ns}/model-{p}.bin"))
            .await?
            .context("the model was not uploaded")?;
        ensure!(
            stored == model,
            "the model's bytes differ ({} stored)",
            stored.len()
        );
        let out = train.outputs.first().context("train has no status.outputs")?;
        ensure!(
            out.size == Some(model.len() as i64)
                && out.sha256.as_deref() == Some(sha256_hex(&model).as_str()),
            "status.outputs: {out:?}"
        );
        let report = finished(&jobs, &format!("report-{p}"), RemoteJobPhase::Succeeded).await?;
        ensure!(
            report.site.as_deref() == Some(site.as_str()),
            "report-{p} read a model in {bucket} but ran at {:?}",
            report.site
        );
        ensure!(
            condition(&report, "WaitingForInputs")
                .is_some_and(|c| c.status == "False" && c.reason == "InputsReady"),
            "{:?}",
            report.conditions
        );
        ensure!(
            report.inputs.first().and_then(|i| i.size) == Some(model.len() as i64),
            "the resolved input: {:?}",
            report.inputs
        );
        let text = store
            .get("shared", &format!("{ns}/report-{p}.txt"))
            .await?
            .context("no report")?;
        ensure!(
            String::from_utf8_lossy(&text) == format!("{}\ntrained\n", model.len()),
            "report-{p}: {:?}",
            String::from_utf8_lossy(&text)
        );
    }
    // Placement explained the data: the pod of report-a says where staging would have been slow.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.t.client.clone(), ns);
    let placed = pods.get("report-a-0").await?;
    let explanation = placed
        .metadata
        .annotations
        .unwrap_or_default()
        .remove("offload.dev/placement")
        .unwrap_or_default();
    let decision: Value = serde_json::from_str(&explanation)?;
    let stage_at = |site: &str| {
        decision["ranking"]
            .as_array()
            .and_then(|r| r.iter().find(|x| x["site"] == site))
            .map(|x| x["stageInSeconds"].as_i64().unwrap_or(-1))
    };
    ensure!(
        stage_at(&htc) == Some(0) && stage_at(&cloud).is_some_and(|t| t >= 1),
        "placement of report-a: {decision}"
    );

    // Deleting an upstream job leaves its data.
    jobs.delete("train-a", &DeleteParams::default()).await?;
    wait::until("train-a gone", TIMEOUT, || async {
        Ok::<_, kube::Error>(jobs.get_opt("train-a").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        store
            .get("htc-site", &format!("{ns}/model-a.bin"))
            .await?
            .is_some(),
        "deleting train-a deleted its model"
    );

    // A missing input fails the job at once: retrying elsewhere would read the same store.
    jobs.create(
        &pp,
        &job(
            ns,
            "missing",
            &analyse,
            "cat \"$OFFLOAD_INPUT_DATA\"",
            json!({"retryLimit": 3,
                "inputs": [artifact("data", ep, &format!("s3://shared/{ns}/no-such-object"), "s3")]}),
        )?,
    )
    .await?;
    let missing = finished(&jobs, "missing", RemoteJobPhase::Failed).await?;
    let failed = condition(&missing, "Failed").context("no Failed condition")?;
    ensure!(
        failed.reason == "InputMissing" && missing.attempt_count == Some(1),
        "missing: {failed:?}, {} attempt(s)",
        missing.attempt_count.unwrap_or_default()
    );

    // An upload the store refuses (read-only credentials) is retried, then fails the job.
    jobs.create(
        &pp,
        &job(
            ns,
            "refused",
            &analyse,
            "echo result > \"$OFFLOAD_OUTPUT_RESULT\"",
            json!({"retryLimit": 0,
                "outputs": [artifact("result", ep, &format!("s3://shared/{ns}/refused.txt"), "s3-read-only")]}),
        )?,
    )
    .await?;
    let refused = finished(&jobs, "refused", RemoteJobPhase::Failed).await?;
    let failed = condition(&refused, "Failed").context("no Failed condition")?;
    ensure!(failed.reason == "OutputUploadFailed", "refused: {failed:?}");
    ensure!(
        refused.attempts.first().and_then(|a| a.reason.as_deref()) == Some("OutputUploadFailed"),
        "{:?}",
        refused.attempts
    );
    ensure!(
        store.get("shared", &format!("{ns}/refused.txt")).await?.is_none(),
        "the refused upload is in the store"
    );

    // The store's credentials went only where the namespace may run: never to the closed site.
    let secret = format!("{ns}/s3");
    ensure!(
        gpu_sim.stats().secrets_received.contains(&secret)
            && htc_sim.stats().secrets_received.contains(&secret)
            && cloud_sim.stats().secrets_received.contains(&secret),
        "the sites that ran the jobs did not get the credentials"
    );
    ensure!(
        closed_sim.stats().secrets_received.is_empty() && closed_sim.stats().creates_per_uid.is_empty(),
        "the closed site got {:?}",
        closed_sim.stats().secrets_received
    );

    // Metrics: bytes in and out per site, and the placement the data moved (report-a: without the
    // data score it would have gone to cloud, first by name).
    let metrics = s.operator_get("/metrics").await?;
    let value = |series: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let htc_in = value(&format!(
        "offload_data_staged_bytes_total{{direction=\"in\",site=\"{htc}\"}}"
    ));
    let gpu_out = value(&format!(
        "offload_data_staged_bytes_total{{direction=\"out\",site=\"{gpu}\"}}"
    ));
    let moved = value(&format!(
        "offload_data_locality_placements_changed_total{{site=\"{htc}\"}}"
    ));
    ensure!(
        htc_in >= model.len() as f64 && gpu_out >= 2.0 * model.len() as f64 && moved >= 1.0,
        "metrics: htc in {htc_in}, gpu out {gpu_out}, moved by data {moved}"
    );
    Ok(())
}

/// A TCP listener that accepts connections and never answers: a store whose transfers stall.
/// Stops when dropped.
struct StallingStore {
    endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl StallingStore {
    async fn start() -> anyhow::Result<StallingStore> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Ok(StallingStore { endpoint, task })
    }
}

impl Drop for StallingStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn large_outputs_go_in_parts_and_stalled_transfers_fail_and_retry() {
    // Parts of 5 MiB and a 2 s read timeout, so a 12 MiB output takes three parts and a stall is
    // seen quickly.
    Scenario::run_with(
        "data-parts",
        &[
            "--data-endpoints-allowed",
            "127.0.0.1",
            "--stage-part-size-mib",
            "5",
            "--stage-read-timeout-seconds",
            "2",
        ],
        |s| async move {
            let store = store_up(&s, &["shared"]).await?;
            let result = parts_and_stalls(&s, &store).await;
            store_down(store, result).await
        },
    )
    .await;
}

async fn parts_and_stalls(s: &Scenario, store: &ObjectStore) -> anyhow::Result<()> {
    let ns = &s.t.name;
    let ep = store.endpoint.as_str();
    let secrets: Api<Secret> = Api::namespaced(s.t.client.clone(), ns);
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "s3"},
        "stringData": {"accessKeyId": store.admin.access_key_id,
            "secretAccessKey": store.admin.secret_access_key}}))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let site = s.site_with(site_builder("hpc"), processes).await?;
    let policy = s.policy(policy_builder("data").sites(&[&s.name("hpc")])).await?;
    let jobs: Api<RemoteJob> = Api::namespaced(s.t.client.clone(), ns);
    let pp = PostParams::default();

    // 12 MiB, above the 5 MiB part size: three parts. The command also says whether it can see
    // the upload credentials in its environment (it must not).
    let size = 12 << 20;
    let script = format!(
        "yes offload | head -c {size} > \"$OFFLOAD_OUTPUT_BIG\"; \
         env | grep -c '^OFFLOAD_S3_' > \"$OFFLOAD_OUTPUT_ENV\" || true"
    );
    jobs.create(
        &pp,
        &job(
            ns,
            "big",
            &policy,
            &script,
            json!({"outputs": [
                artifact("big", ep, &format!("s3://shared/{ns}/big.bin"), "s3"),
                artifact("env", ep, &format!("s3://shared/{ns}/env.txt"), "s3")]}),
        )?,
    )
    .await?;
    let big = finished(&jobs, "big", RemoteJobPhase::Succeeded).await?;
    let expected: Vec<u8> = b"offload\n".iter().copied().cycle().take(size).collect();
    let stored = store
        .get("shared", &format!("{ns}/big.bin"))
        .await?
        .context("big.bin was not uploaded")?;
    ensure!(
        stored.len() == expected.len() && stored == expected,
        "big.bin: {} bytes stored, {} written",
        stored.len(),
        expected.len()
    );
    let out = big
        .outputs
        .iter()
        .find(|o| o.name == "big")
        .context("no status.outputs for big")?;
    ensure!(
        out.size == Some(size as i64) && out.sha256.as_deref() == Some(sha256_hex(&expected).as_str()),
        "status.outputs: {out:?}"
    );
    let etag = store.etag("shared", &format!("{ns}/big.bin")).await?;
    ensure!(
        etag.as_deref()
            .is_some_and(|e| e.trim_matches('"').ends_with("-3")),
        "big.bin was not uploaded in three parts: ETag {etag:?}"
    );
    let seen = store
        .get("shared", &format!("{ns}/env.txt"))
        .await?
        .context("env.txt was not uploaded")?;
    ensure!(
        String::from_utf8_lossy(&seen).trim() == "0",
        "the command saw {} OFFLOAD_S3_ variable(s)",
        String::from_utf8_lossy(&seen).trim()
    );

    // A store that accepts connections and never answers: the input's transfer stalls, times
    // out, and the attempt is retried (retryLimit 1: two attempts), then the job fails with
    // StageInFailed. The same for an output.
    let stalling = StallingStore::start().await?;
    jobs.create(
        &pp,
        &job(
            ns,
            "stalled-in",
            &policy,
            "cat \"$OFFLOAD_INPUT_DATA\"",
            json!({"retryLimit": 1,
                "inputs": [artifact("data", &stalling.endpoint, "s3://shared/never", "s3")]}),
        )?,
    )
    .await?;
    jobs.create(
        &pp,
        &job(
            ns,
            "stalled-out",
            &policy,
            "echo result > \"$OFFLOAD_OUTPUT_RESULT\"",
            json!({"retryLimit": 1,
                "outputs": [artifact("result", &stalling.endpoint, "s3://shared/never", "s3")]}),
        )?,
    )
    .await?;
    for (name, reason) in [
        ("stalled-in", "StageInFailed"),
        ("stalled-out", "OutputUploadFailed"),
    ] {
        let st = finished_within(&jobs, name, RemoteJobPhase::Failed, Duration::from_secs(240)).await?;
        let failed = condition(&st, "Failed").context("no Failed condition")?;
        ensure!(failed.reason == reason, "{name}: {failed:?}");
        ensure!(
            st.attempt_count == Some(2) && st.attempts.iter().all(|a| a.reason.as_deref() == Some(reason)),
            "{name}: attempts {:?}",
            st.attempts
        );
    }
    ensure!(
        site.stats().secrets_received.contains(&format!("{ns}/s3")),
        "the site did not get the credentials"
    );
    Ok(())
}
