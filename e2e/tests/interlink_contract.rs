//! Contract tests: the interLink client against `offload-sitesim` over real HTTP(S) on loopback.
//! No Kubernetes cluster is involved.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use offload_e2e::sitesim::{
    self, FaultKind, GpuSpec, SimConfig, SimHandle,
    faults::{Fault, delay, slow_answer, status},
};
use offload_operator::interlink::{
    Error, RetryPolicy, SiteClient, SiteConfig, Timeouts,
    wire::{LogOpts, LogStruct, PodCreateRequests, PodStatus},
};
use serde_json::json;

fn work_dir(test: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("offload-contract-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn start_sim(test: &str, f: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut config = SimConfig {
        work_dir: work_dir(test),
        ..SimConfig::default()
    };
    f(&mut config);
    SimHandle::start(config).await.expect("simulator starts")
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    }
}

fn client(url: &str) -> SiteClient {
    SiteClient::new(SiteConfig {
        endpoint: url.into(),
        retry: quick_retry(),
        ..Default::default()
    })
    .expect("client")
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn pod(name: &str, n: u32, script: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "contract", "uid": uid(n)},
        "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]}
    }))
    .expect("pod")
}

fn simulated(name: &str, n: u32, seconds: f64) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "contract", "uid": uid(n), "annotations": {
            sitesim::ANNOTATION_SIMULATE: "true", sitesim::ANNOTATION_DURATION: seconds.to_string()}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod")
}

fn request(pod: &Pod) -> PodCreateRequests {
    PodCreateRequests {
        pod: pod.clone(),
        ..Default::default()
    }
}

async fn status_of(c: &SiteClient, pod: &Pod) -> PodStatus {
    let all = c.status(std::slice::from_ref(pod)).await.expect("status");
    all.into_iter().next().expect("the site knows the pod")
}

/// Polls until `pred` holds for the pod's status.
async fn wait_status(c: &SiteClient, pod: &Pod, what: &str, pred: impl Fn(&PodStatus) -> bool) -> PodStatus {
    for _ in 0..150 {
        let s = status_of(c, pod).await;
        if pred(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {:?}", status_of(c, pod).await);
}

#[tokio::test]
async fn create_then_waiting_running_terminated_with_exit_code() {
    let sim = start_sim("lifecycle", |c| c.queue_delay = Duration::from_millis(500)).await;
    let c = client(&sim.url);
    let p = pod("job", 1, "echo hello; sleep 1; exit 3");
    let created = c.create(&request(&p)).await.expect("create");
    assert_eq!(created.pod_uid, uid(1));
    assert!(!created.pod_jid.is_empty());

    let s = status_of(&c, &p).await;
    assert!(s.containers[0].state.waiting.is_some(), "queued first: {s:?}");
    assert_eq!(s.jid, created.pod_jid);
    let s = wait_status(&c, &p, "running", |s| s.containers[0].state.running.is_some()).await;
    let started = s.containers[0]
        .state
        .running
        .as_ref()
        .and_then(|r| r.started_at.clone())
        .expect("startedAt");
    let s = wait_status(&c, &p, "terminated", |s| {
        s.containers[0].state.terminated.is_some()
    })
    .await;
    let t = s.containers[0].state.terminated.clone().expect("terminated");
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason, "Error");
    assert_eq!(t.started_at, Some(started.clone()));
    let finished = t.finished_at.expect("finishedAt");
    assert!(finished.0 >= started.0);
    assert!(
        finished.0.duration_since(started.0).as_secs_f64() >= 0.9,
        "ran about a second"
    );
}

#[tokio::test]
async fn pods_beyond_the_slots_wait_in_the_queue() {
    let sim = start_sim("queue", |c| c.slots = 1).await;
    let c = client(&sim.url);
    let (a, b) = (simulated("a", 1, 1.5), simulated("b", 2, 0.1));
    c.create(&request(&a)).await.expect("a");
    wait_status(&c, &a, "a running", |s| s.containers[0].state.running.is_some()).await;
    c.create(&request(&b)).await.expect("b");
    let s = status_of(&c, &b).await;
    let w = s.containers[0].state.waiting.as_ref().expect("b waits");
    assert_eq!(w.reason, "Queued");
    wait_status(&c, &b, "b done", |s| s.containers[0].state.terminated.is_some()).await;
    let a_done = status_of(&c, &a).await;
    assert!(
        a_done.containers[0].state.terminated.is_some(),
        "b ran only after a"
    );
}

#[tokio::test]
async fn one_status_request_carries_many_pods_and_large_sets_are_chunked() {
    let sim = start_sim("batch", |c| c.slots = 1000).await;
    let pods: Vec<Pod> = (0..120).map(|i| simulated(&format!("p{i}"), i, 30.0)).collect();
    let c = client(&sim.url);
    for p in &pods {
        c.create(&request(p)).await.expect("create");
    }
    let before = sim.stats();
    let statuses = c.status(&pods).await.expect("status");
    assert_eq!(statuses.len(), 120);
    let after = sim.stats();
    assert_eq!(
        after.status_requests - before.status_requests,
        1,
        "one request for 120 pods"
    );
    assert_eq!(after.max_pods_per_status, 120);

    let chunked = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        status_chunk: 50,
        ..Default::default()
    })
    .expect("client");
    let before = sim.stats();
    assert_eq!(chunked.status(&pods).await.expect("status").len(), 120);
    assert_eq!(
        sim.stats().status_requests - before.status_requests,
        3,
        "50 + 50 + 20"
    );
    assert!(c.status::<Pod>(&[]).await.expect("nothing to ask").is_empty());
    assert_eq!(c.status_all().await.expect("whole cache").len(), 120);
}

#[tokio::test]
async fn logs_tail_limit_bytes_and_follow() {
    let sim = start_sim("logs", |_| {}).await;
    let c = client(&sim.url);
    let p = pod("talk", 1, "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done");
    c.create(&request(&p)).await.expect("create");
    wait_status(&c, &p, "running", |s| s.containers[0].state.running.is_some()).await;
    let req = |opts: LogOpts| LogStruct {
        namespace: "contract".into(),
        pod_uid: uid(1),
        pod_name: "talk".into(),
        container_name: "main".into(),
        opts,
    };
    // Follow while it runs: the stream ends when the container does, with every line.
    let mut stream = Box::pin(
        c.logs(&req(LogOpts {
            follow: true,
            ..Default::default()
        }))
        .await
        .expect("follow"),
    );
    let mut followed = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream ends")
    {
        followed.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(
        String::from_utf8_lossy(&followed),
        "line 1\nline 2\nline 3\nline 4\nline 5\n"
    );

    let collect = |opts| {
        let c = c.clone();
        let r = req(opts);
        async move {
            let mut s = Box::pin(c.logs(&r).await.expect("logs"));
            let mut out = Vec::new();
            while let Some(chunk) = s.next().await {
                out.extend_from_slice(&chunk.expect("chunk"));
            }
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    assert_eq!(
        collect(LogOpts {
            tail: 2,
            ..Default::default()
        })
        .await,
        "line 4\nline 5\n"
    );
    assert_eq!(
        collect(LogOpts {
            bytes: 6,
            ..Default::default()
        })
        .await,
        "line 1"
    );
    let both = c
        .logs(&req(LogOpts {
            tail: 1,
            bytes: 1,
            ..Default::default()
        }))
        .await;
    assert!(
        matches!(both, Err(Error::InvalidRequest { .. })),
        "refused before sending"
    );
}

#[tokio::test]
async fn delete_stops_the_process() {
    let dir = work_dir("delete");
    let sim = start_sim("delete", |c| c.work_dir = dir.clone()).await;
    let c = client(&sim.url);
    let p = pod("sleeper", 1, "echo $$ > pid; exec sleep 60");
    c.create(&request(&p)).await.expect("create");
    wait_status(&c, &p, "running", |s| s.containers[0].state.running.is_some()).await;
    let pid_file = dir.join(uid(1)).join("pid");
    let mut pid = String::new();
    for _ in 0..50 {
        pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .trim()
            .to_string();
        if !pid.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the process runs (pid {pid:?})"
    );
    c.delete(&p).await.expect("delete");
    assert!(
        c.status(std::slice::from_ref(&p))
            .await
            .expect("status")
            .is_empty(),
        "the site forgot the pod"
    );
    for _ in 0..50 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("process {pid} still runs after delete");
}

#[tokio::test]
async fn volumes_and_env_reach_the_process() {
    let sim = start_sim("volumes", |_| {}).await;
    let c = client(&sim.url);
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "cfg", "namespace": "contract", "uid": uid(1)},
        "spec": {
            "volumes": [{"name": "conf", "configMap": {"name": "app-config"}}, {"name": "creds", "secret": {"secretName": "app-secret"}}],
            "containers": [{"name": "main", "image": "busybox",
                "command": ["sh", "-c", "cat $SITESIM_ROOT/etc/app/greeting; cat $SITESIM_ROOT/etc/creds/password; echo; echo $FROM_SECRET $POD"],
                "env": [{"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "password"}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": "conf", "mountPath": "/etc/app"}, {"name": "creds", "mountPath": "/etc/creds"}]}]}
    }))
    .expect("pod");
    let mut req = request(&p);
    req.configmaps = vec![
        serde_json::from_value(json!({"metadata": {"name": "app-config"}, "data": {"greeting": "hi\n"}}))
            .expect("cm"),
    ];
    req.secrets = vec![
        serde_json::from_value(json!({"metadata": {"name": "app-secret"}, "data": {"password": "czNjcjN0"}}))
            .expect("secret"),
    ];
    c.create(&req).await.expect("create");
    let s = wait_status(&c, &p, "done", |s| s.containers[0].state.terminated.is_some()).await;
    assert_eq!(
        s.containers[0].state.terminated.as_ref().map(|t| t.exit_code),
        Some(0)
    );
    let mut out = Vec::new();
    let logs = LogStruct {
        namespace: "contract".into(),
        pod_uid: uid(1),
        pod_name: "cfg".into(),
        container_name: "main".into(),
        opts: LogOpts::default(),
    };
    let mut stream = Box::pin(c.logs(&logs).await.expect("logs"));
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(String::from_utf8_lossy(&out), "hi\ns3cr3t\ns3cr3t cfg\n");
}

/// Each failure yields its error kind and retry verdict; the client's retries give up on the
/// final ones at once and ride out the transient ones.
#[tokio::test]
async fn injected_failures_map_to_error_kinds_and_retry_verdicts() {
    let sim = start_sim("failures", |_| {}).await;
    let no_retry = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        retry: RetryPolicy {
            attempts: 1,
            ..quick_retry()
        },
        timeouts: Timeouts {
            status: Duration::from_millis(300),
            ..Timeouts::default()
        },
        ..Default::default()
    })
    .expect("client");
    let p = simulated("x", 1, 0.1);

    sim.inject(status(
        "status",
        500,
        "HTTP InterLink session x: call exit status: 500. Body: squeue failed",
    ));
    let e = no_retry.status(std::slice::from_ref(&p)).await.expect_err("500");
    assert!(
        matches!(&e, Error::Status { code: 500, body, .. } if body.contains("squeue failed")),
        "{e}"
    );
    assert!(!e.is_retryable());

    sim.inject(status(
        "create",
        504,
        "HTTP InterLink session x: call exit status: 504. Body: sbatch: error: invalid partition",
    ));
    let e = no_retry.create(&request(&p)).await.expect_err("504");
    assert!(matches!(&e, Error::Status { code: 504, .. }), "{e}");
    assert!(
        e.to_string().contains("invalid partition"),
        "the site's text is kept: {e}"
    );
    assert!(!e.is_retryable(), "a plugin refusal is final");

    sim.inject(Fault {
        op: "status".into(),
        kind: FaultKind::Garbage,
        count: 1,
    });
    let e = no_retry
        .status(std::slice::from_ref(&p))
        .await
        .expect_err("garbage");
    assert!(
        matches!(&e, Error::Decode { body, .. } if body.contains("not json")),
        "{e}"
    );
    assert!(!e.is_retryable());

    // A site answering its ping with garbage is not healthy (reason InvalidResponse).
    sim.inject(Fault {
        op: "pinglink".into(),
        kind: FaultKind::Garbage,
        count: 1,
    });
    let e = no_retry.ping_once().await.expect_err("garbage ping");
    assert_eq!(e.reason(), "InvalidResponse", "{e}");
    no_retry.ping_once().await.expect("the next ping is fine");

    sim.inject(delay("status", Duration::from_secs(2)));
    let e = no_retry
        .status(std::slice::from_ref(&p))
        .await
        .expect_err("timeout");
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.is_retryable());
    assert_eq!(e.reason(), "Timeout");

    sim.inject(status("status", 503, "overloaded"));
    let e = no_retry.status(std::slice::from_ref(&p)).await.expect_err("503");
    assert!(e.is_retryable());

    // With retries, two 503s in a row are ridden out.
    let c = client(&sim.url);
    sim.inject(status("status", 503, "").times(2));
    let before = sim.stats().status_requests;
    c.status(std::slice::from_ref(&p))
        .await
        .expect("retried past two 503s");
    assert_eq!(
        sim.stats().status_requests - before,
        1,
        "the 503s were answered before reaching the handler"
    );

    // Connection refused: nothing listens there any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let e = SiteClient::new(SiteConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        retry: RetryPolicy {
            attempts: 1,
            ..quick_retry()
        },
        ..Default::default()
    })
    .expect("client")
    .ping()
    .await
    .expect_err("refused");
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert!(e.is_retryable());
    assert_eq!(e.reason(), "ConnectionFailed");
}

#[tokio::test]
async fn wrong_or_missing_token_is_unauthorized() {
    let sim = start_sim("token", |c| c.token = Some("right-token".into())).await;
    let with = |t: Option<&str>| {
        SiteClient::new(SiteConfig {
            endpoint: sim.url.clone(),
            bearer_token: t.map(String::from),
            ..Default::default()
        })
        .expect("client")
    };
    for t in [None, Some("wrong-token")] {
        let e = with(t).ping().await.expect_err("refused");
        assert!(matches!(e, Error::Status { code: 401, .. }), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(e.reason(), "Unauthorized");
    }
    with(Some("right-token\n"))
        .ping()
        .await
        .expect("a trailing newline is trimmed");
    assert_eq!(sim.stats().unauthorized, 2);
}

#[tokio::test]
async fn tls_is_verified_against_the_configured_ca() {
    let dir = work_dir("tls-pki");
    let (ca, tls) = offload_e2e::pki::make_tls(&dir);
    let sim = start_sim("tls", |c| c.tls = Some(tls)).await;
    assert!(sim.url.starts_with("https://"));
    let one = RetryPolicy {
        attempts: 1,
        ..quick_retry()
    };
    // Unknown CA (the system roots do not know it): refused, and retrying cannot help.
    let e = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        retry: one.clone(),
        ..Default::default()
    })
    .expect("client")
    .ping()
    .await
    .expect_err("unknown CA");
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert_eq!(e.reason(), "TLSFailure", "{e}");
    assert!(!e.is_retryable());
    // With the CA: verified.
    let pem = std::fs::read(&ca).expect("ca");
    SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        ca_pem: Some(pem),
        retry: one.clone(),
        ..Default::default()
    })
    .expect("client")
    .ping()
    .await
    .expect("trusted");
    // The explicit insecure switch.
    SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        insecure_skip_tls_verify: true,
        retry: one,
        ..Default::default()
    })
    .expect("client")
    .ping()
    .await
    .expect("insecure");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The answer to `/create` is lost (503 after the site created the pod, or a timeout): the
/// client's retry asks the site first and never submits twice.
#[tokio::test]
async fn create_retries_never_submit_twice() {
    let sim = start_sim("exactly-once", |_| {}).await;
    let c = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        retry: quick_retry(),
        timeouts: Timeouts {
            create: Duration::from_millis(300),
            // This site shows new pods at once; waiting longer would only slow the test.
            create_settle: Duration::from_millis(300),
            ..Timeouts::default()
        },
        ..Default::default()
    })
    .expect("client");

    let lost = simulated("lost-answer", 1, 5.0);
    sim.inject(Fault {
        op: "create".into(),
        kind: FaultKind::LoseAnswer,
        count: 1,
    });
    let (created, adopted) = c.create_idempotent(&request(&lost)).await.expect("created once");
    assert!(adopted, "found by status after the lost answer");
    assert_eq!(created.pod_uid, uid(1));
    assert!(!created.pod_jid.is_empty(), "the site's job id, from its status");

    let slow = simulated("slow-answer", 2, 5.0);
    sim.inject(slow_answer("create", Duration::from_millis(800)));
    let (_, adopted) = c.create_idempotent(&request(&slow)).await.expect("created once");
    assert!(adopted);

    let refused = simulated("refused", 3, 5.0);
    sim.inject(status("create", 503, "").times(2));
    let (_, adopted) = c
        .create_idempotent(&request(&refused))
        .await
        .expect("created after two refusals");
    assert!(!adopted, "nothing was created by the refused attempts");

    let stats = sim.stats();
    for n in [1, 2, 3] {
        assert_eq!(
            stats.creates_per_uid.get(&uid(n)),
            Some(&1),
            "pod {n}: {:?}",
            stats.creates_per_uid
        );
    }
}

#[tokio::test]
async fn ping_reports_capacity_and_survives_an_outage() {
    let sim = start_sim("ping", |c| {
        c.cpu = Some("64".into());
        c.memory = Some("256Gi".into());
        c.gpus = vec![GpuSpec {
            resource_type: "nvidia.com/gpu".into(),
            model: "A100".into(),
            count: 8,
        }];
    })
    .await;
    let c = client(&sim.url);
    let ping = c.ping().await.expect("ping");
    let r = ping.response.and_then(|p| p.resources).expect("resources");
    assert_eq!(r.cpu.map(|q| q.0), Some("64".into()));
    assert_eq!(
        r.accelerators[0].available.as_ref().map(|q| q.0.as_str()),
        Some("8")
    );

    let legacy = start_sim("ping-legacy", |c| c.legacy_ping = true).await;
    assert!(
        client(&legacy.url)
            .ping()
            .await
            .expect("healthy")
            .response
            .is_none(),
        "`[]` is no PingResponse"
    );

    sim.go_down(Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let one = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        retry: RetryPolicy {
            attempts: 1,
            ..quick_retry()
        },
        ..Default::default()
    })
    .expect("client");
    let e = one.ping().await.expect_err("down");
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    one.ping().await.expect("back up");
}

#[tokio::test]
async fn simulated_pods_take_exit_codes_from_annotations_and_env() {
    let sim = start_sim("simulated", |c| c.simulate = true).await;
    let c = client(&sim.url);
    let by_annotation: Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "contract", "uid": uid(1), "annotations": {
            sitesim::ANNOTATION_DURATION: "0.2", sitesim::ANNOTATION_EXIT_CODE: "7"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod");
    let by_env: Pod = serde_json::from_value(json!({
        "metadata": {"name": "b", "namespace": "contract", "uid": uid(2)},
        "spec": {"containers": [{"name": "main", "image": "busybox", "env": [
            {"name": "SITESIM_DURATION_SECONDS", "value": "0.1"}, {"name": "SITESIM_EXIT_CODE", "value": "42"}]}]}
    }))
    .expect("pod");
    for (p, code) in [(&by_annotation, 7), (&by_env, 42)] {
        c.create(&request(p)).await.expect("create");
        let s = wait_status(&c, p, "done", |s| s.containers[0].state.terminated.is_some()).await;
        assert_eq!(
            s.containers[0].state.terminated.as_ref().map(|t| t.exit_code),
            Some(code)
        );
    }
}

#[tokio::test]
async fn mutual_tls_requires_the_client_certificate() {
    let dir = work_dir("mtls-pki");
    let (ca, mut tls) = offload_e2e::pki::make_tls(&dir);
    tls.client_ca = Some(ca.clone());
    let sim = start_sim("mtls", |c| c.tls = Some(tls)).await;
    let ca_pem = std::fs::read(&ca).expect("ca");
    let one = RetryPolicy {
        attempts: 1,
        ..quick_retry()
    };
    let without = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        ca_pem: Some(ca_pem.clone()),
        retry: one.clone(),
        ..Default::default()
    })
    .expect("client");
    let e = without.ping().await.expect_err("no client certificate");
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    let mut identity = std::fs::read(dir.join("client.crt")).expect("crt");
    identity.extend(std::fs::read(dir.join("client.key")).expect("key"));
    let with = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        ca_pem: Some(ca_pem),
        client_identity_pem: Some(identity),
        retry: one,
        ..Default::default()
    })
    .expect("client");
    with.ping().await.expect("client certificate accepted");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unix_socket_endpoint() {
    let dir = work_dir("unix");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("interlink.sock");
    let sim = start_sim("unix-site", |c| c.unix_socket = Some(socket.clone())).await;
    assert_eq!(sim.url, format!("unix://{}", socket.display()));
    let c = client(&sim.url);
    c.ping().await.expect("ping over the socket");
    let p = simulated("over-unix", 1, 0.1);
    c.create(&request(&p)).await.expect("create over the socket");
    wait_status(&c, &p, "done", |s| s.containers[0].state.terminated.is_some()).await;
    assert_eq!(sim.stats().creates_per_uid.get(&uid(1)), Some(&1));
    drop(sim);
    let _ = std::fs::remove_dir_all(&dir);
}

/// interLink 0.6.2 in front of its SLURM plugin: a new pod appears in `/status` only after a lag,
/// an unknown pod is echoed back with empty states and no job id, deleting an unknown pod answers
/// a bare 500, and `/pinglink` answers `sinfo` text. None of it may make the client submit a pod
/// twice, or take a pod for created when it is not.
#[tokio::test]
async fn slurm_plugin_answers_cause_no_second_and_no_phantom_submission() {
    let sim = start_sim("slurm-plugin", |c| c.slurm_plugin = true).await;
    let c = SiteClient::new(SiteConfig {
        endpoint: sim.url.clone(),
        retry: quick_retry(),
        timeouts: Timeouts {
            create: Duration::from_millis(300),
            create_settle: sitesim::SLURM_STATUS_LAG * 2,
            ..Timeouts::default()
        },
        ..Default::default()
    })
    .expect("client");

    // Never created: echoed, but not known.
    let never = simulated("never", 20, 1.0);
    let echoed = c.status(std::slice::from_ref(&never)).await.expect("status");
    assert_eq!(echoed.len(), 1, "{echoed:?}");
    assert!(!echoed[0].is_known(), "{echoed:?}");

    // The answer to a create is lost; the pod shows up only after the lag: no second submission.
    let lost = simulated("lost", 21, 30.0);
    sim.inject(Fault {
        op: "create".into(),
        kind: FaultKind::LoseAnswer,
        count: 1,
    });
    let (_, adopted) = c.create_idempotent(&request(&lost)).await.expect("created once");
    assert!(adopted, "found once the site showed it");
    assert_eq!(sim.stats().creates_per_uid.get(&uid(21)), Some(&1));

    // Refused before anything happened (a bare 503 the simulator answers without creating):
    // the echo is not taken for the pod, which is then submitted once.
    let refused = simulated("refused", 22, 1.0);
    sim.inject(status("create", 503, ""));
    let (_, adopted) = c.create_idempotent(&request(&refused)).await.expect("created");
    assert!(!adopted);
    assert_eq!(sim.stats().creates_per_uid.get(&uid(22)), Some(&1));

    // Deleting a pod the site does not have: a bare 500, which alone looks transient; the
    // status answer (an echo) says the pod is not there.
    let err = c.delete(&never).await.expect_err("unknown pod");
    assert!(matches!(err, Error::Status { code: 500, .. }), "{err:?}");
    let after = c.status(std::slice::from_ref(&never)).await.expect("status");
    assert!(after.iter().all(|s| !s.is_known()));

    // `sinfo` text on /pinglink is a healthy answer without capacity.
    let ping = c.ping().await.expect("ping");
    assert!(ping.response.is_none());
}
