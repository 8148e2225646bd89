//! Wire (de)serialisation against samples of every body in the interLink reference.

use serde_json::json;

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time};

use super::wire::*;

#[test]
fn create_request_uses_interlink_keys() {
    let req = PodCreateRequests {
        jobscript_url: String::new(),
        ..Default::default()
    };
    let v = serde_json::to_value(&req).expect("json");
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "configmaps",
            "jobscriptURL",
            "pod",
            "projectedvolumesmaps",
            "secrets"
        ]
    );
}

#[test]
fn create_answer_decodes_in_any_case() {
    for body in [
        r#"{"PodUID":"u-1","PodJID":"4242"}"#,
        r#"{"poduid":"u-1","podjid":"4242"}"#,
        r#"{"podUID":"u-1","PodJid":"4242","extra":1}"#,
    ] {
        let c = decode_create(body.as_bytes()).expect(body);
        assert_eq!(
            c,
            CreateStruct {
                pod_uid: "u-1".into(),
                pod_jid: "4242".into()
            },
            "{body}"
        );
    }
    assert!(decode_create(b"").is_err(), "an empty body is an error");
    assert!(
        decode_create(b"Job submitted").is_err(),
        "a text body is an error"
    );
    assert!(
        decode_create(br#"["u-1","4242"]"#).is_err(),
        "a list of strings is not a CreateStruct"
    );
    let old = decode_create(br#"[{"PodUID":"u-1","PodJID":"7"}]"#).expect("interLink <= 0.4 answered a list");
    assert_eq!(old.pod_jid, "7");
}

/// What the Go API server emits (re-marshalled Go structs): zero times as `null`, nil slices as
/// `null`, every ContainerStatus field present.
#[test]
fn go_status_answer_decodes() {
    let body = json!([{
        "name": "train", "UID": "9f1c", "namespace": "ml", "JID": "",
        "containers": [{
            "name": "main",
            "state": {"terminated": {"exitCode": 3, "reason": "Error", "startedAt": "2026-11-26T10:00:00Z", "finishedAt": "2026-11-26T10:05:00Z"}},
            "lastState": {}, "ready": false, "restartCount": 0, "image": "busybox", "imageID": "",
            "started": false
        }],
        "initContainers": null
    }, {
        "name": "queued", "UID": "77aa", "namespace": "ml", "JID": "123",
        "containers": [{"name": "main", "state": {"waiting": {"reason": "Pending"}}, "lastState": {},
                        "ready": false, "restartCount": 0, "image": "", "imageID": ""}],
        "initContainers": []
    }, {
        "name": "running", "UID": "55bb", "namespace": "ml",
        "containers": [{"name": "main", "state": {"running": {"startedAt": null}}, "lastState": {},
                        "ready": true, "restartCount": 0, "image": "", "imageID": ""}]
    }]);
    let statuses = decode_statuses(body.to_string().as_bytes()).expect("decodes");
    assert_eq!(statuses.len(), 3);
    let t = statuses[0].containers[0]
        .state
        .terminated
        .as_ref()
        .expect("terminated");
    assert_eq!(t.exit_code, 3);
    assert_eq!(
        t.started_at.as_ref().map(|t| t.0.to_string()),
        Some("2026-11-26T10:00:00Z".into())
    );
    assert!(statuses[0].init_containers.is_empty());
    assert_eq!(statuses[1].jid, "123");
    assert_eq!(
        statuses[1].containers[0]
            .state
            .waiting
            .as_ref()
            .map(|w| w.reason.as_str()),
        Some("Pending")
    );
    let r = statuses[2].containers[0].state.running.as_ref().expect("running");
    assert_eq!(r.started_at, None, "null startedAt is absent");
    assert!(statuses[2].containers[0].ready);
}

/// Python plugins (interlink-plugin-sdk): ContainerStatus has only `name` and `state`, keys may be
/// aliased differently, no initContainers.
#[test]
fn python_status_answer_decodes() {
    let body = br#"[{"name":"p","uid":"abc","namespace":"d","containers":[{"name":"c","state":{"running":{"startedAt":"2026-01-02T03:04:05Z"}}}]}]"#;
    let s = decode_statuses(body).expect("decodes");
    assert_eq!(s[0].uid, "abc");
    assert_eq!(s[0].containers[0].restart_count, 0);
    assert!(s[0].containers[0].state.running.is_some());
}

#[test]
fn null_and_empty_status_answers_mean_no_pods() {
    assert!(decode_statuses(b"null").expect("null").is_empty());
    assert!(decode_statuses(b"[]").expect("[]").is_empty());
    assert!(
        decode_statuses(b"{\"oops\":true}").is_err(),
        "an object is not a status list"
    );
    assert!(decode_statuses(b"<html>502</html>").is_err());
}

#[test]
fn go_zero_time_is_absent_and_garbage_time_is_an_error() {
    let ok = br#"[{"UID":"u","containers":[{"name":"c","state":{"terminated":{"exitCode":0,"finishedAt":"0001-01-01T00:00:00Z"}}}]}]"#;
    let s = decode_statuses(ok).expect("zero time");
    assert_eq!(
        s[0].containers[0]
            .state
            .terminated
            .as_ref()
            .and_then(|t| t.finished_at.clone()),
        None
    );
    let bad = br#"[{"UID":"u","containers":[{"name":"c","state":{"running":{"startedAt":"yesterday"}}}]}]"#;
    let err = decode_statuses(bad).expect_err("garbage time");
    assert!(err.to_string().contains("yesterday"), "{err}");
}

#[test]
fn log_request_uses_interlink_keys() {
    let req = LogStruct {
        namespace: "ml".into(),
        pod_uid: "9f1c0000-0000-4000-8000-000000000000".into(),
        pod_name: "train".into(),
        container_name: "main".into(),
        opts: LogOpts {
            tail: 10,
            follow: true,
            ..Default::default()
        },
    };
    let v = serde_json::to_value(&req).expect("json");
    assert_eq!(
        v,
        json!({"Namespace":"ml","PodUID":"9f1c0000-0000-4000-8000-000000000000","PodName":"train",
               "ContainerName":"main","Opts":{"Tail":10,"Timestamps":false,"Follow":true,"Previous":false}})
    );
    let limit = LogOpts {
        bytes: 100,
        ..Default::default()
    };
    assert_eq!(serde_json::to_value(&limit).expect("json")["Bytes"], 100);
    let python: LogOpts = serde_json::from_value(json!({"LimitBytes": 7})).expect("alias");
    assert_eq!(python.bytes, 7);
}

#[test]
fn log_options_interlink_refuses_are_caught() {
    assert!(
        LogOpts {
            tail: 1,
            bytes: 1,
            ..Default::default()
        }
        .validate()
        .is_err()
    );
    let since = LogOpts {
        since_seconds: 5,
        since_time: Some(Time("2026-01-01T00:00:00Z".parse().expect("ts"))),
        ..Default::default()
    };
    assert!(since.validate().is_err());
    assert!(
        LogOpts {
            tail: 5,
            follow: true,
            ..Default::default()
        }
        .validate()
        .is_ok()
    );
}

#[test]
fn ping_answers_decode() {
    let full = br#"{"status":"ok","resources":{"cpu":"128","memory":"512Gi","pods":"1000",
        "accelerators":[{"resourceType":"nvidia.com/gpu","available":"8"}]},
        "taints":[{"key":"maintenance","effect":"NoSchedule"}]}"#;
    let p: PingResponse = decode_object(full).expect("full");
    let r = p.resources.expect("resources");
    assert_eq!(r.cpu, Some(Quantity("128".into())));
    assert_eq!(r.accelerators[0].resource_type, "nvidia.com/gpu");
    assert_eq!(p.taints.as_ref().map(Vec::len), Some(1));
    let empty_taints: PingResponse = decode_object(br#"{"taints":[]}"#).expect("empty taints");
    assert_eq!(
        empty_taints.taints,
        Some(vec![]),
        "present-but-empty taints replace all taints"
    );
    let no_taints: PingResponse = decode_object(br#"{"status":"ok"}"#).expect("no taints");
    assert_eq!(no_taints.taints, None, "absent taints leave taints alone");
    // Legacy plugins answer `[]` and old servers an empty body: not a PingResponse.
    assert!(decode_object::<PingResponse>(b"[]").is_err());
    assert!(decode_object::<PingResponse>(b"").is_err());
}

#[test]
fn ping_answers_from_real_sites_are_healthy() {
    let full = br#"{"status":"ok","resources":{"cpu":"128"}}"#;
    let p = decode_ping(full).expect("PingResponse").expect("some");
    assert_eq!(p.resources.and_then(|r| r.cpu), Some(Quantity("128".into())));
    // Older plugins and servers.
    for legacy in [&b""[..], b"[]", b"null", b" \n"] {
        assert_eq!(decode_ping(legacy), Ok(None), "{legacy:?}");
    }
    // The SLURM plugin relays `sinfo -s` (interlink-compatibility.md, 1).
    let sinfo = b"PARTITION AVAIL  TIMELIMIT   NODES(A/I/O/T) NODELIST\ndebug*       up   infinite          0/1/0/1 node\n";
    assert_eq!(decode_ping(sinfo), Ok(None));
}

#[test]
fn garbage_and_wrongly_shaped_ping_answers_are_errors() {
    for garbage in [
        &b"}{ this is not json"[..],
        b"{\"status\": \"ok\"",
        b"[1, 2]",
        b"\"ok\"",
        br#"{"resources": "lots"}"#,
        br#"{"resources": {"cpu": 12}, "taints": {"key": "x"}}"#,
        b"<html><body>Sign in to continue</body></html>",
        b"\x00\x01\x02binary",
        b"\xff\xfe\xfd",
    ] {
        assert!(
            decode_ping(garbage).is_err(),
            "{:?} was accepted",
            String::from_utf8_lossy(garbage)
        );
    }
}

/// Shapes seen from interLink 0.6.2's API server in front of the SLURM plugin 0.6.2-pre5
/// (docs/interlink-compatibility.md).
#[test]
fn slurm_plugin_answers_decode_and_unknown_pods_are_not_known() {
    // A pod the plugin never saw is echoed back with an empty state and no job id.
    let unknown = r#"[{"name":"p","UID":"0f6f4b2e-9d4e-4a43-9b5c-1c7f2d1b8a11","namespace":"ns","JID":"",
        "containers":[{"name":"main","state":{},"lastState":{},"ready":false,"restartCount":0,"image":"","imageID":""}],
        "initContainers":null}]"#;
    let s: Vec<PodStatus> = serde_json::from_str(unknown).unwrap();
    assert!(!s[0].is_known());
    // Queued: `waiting` with no reason; still known.
    let queued = r#"[{"name":"p","UID":"u","namespace":"ns","JID":"","containers":[{"name":"main","state":{"waiting":{}}}]}]"#;
    let s: Vec<PodStatus> = serde_json::from_str(queued).unwrap();
    assert!(s[0].is_known());
    // Finished with `startedAt: null` and no reason.
    let failed = r#"[{"name":"p","UID":"u","namespace":"ns","JID":"","containers":[{"name":"main",
        "state":{"terminated":{"exitCode":3,"startedAt":null,"finishedAt":"2026-11-26T05:40:12Z"}}}]}]"#;
    let s: Vec<PodStatus> = serde_json::from_str(failed).unwrap();
    let t = s[0].containers[0].state.terminated.clone().unwrap();
    assert_eq!(
        (t.exit_code, t.started_at.is_none(), t.finished_at.is_some()),
        (3, true, true)
    );
    assert!(s[0].is_known());
    // A job id alone is enough.
    let with_jid = PodStatus {
        jid: "42".into(),
        ..PodStatus::default()
    };
    assert!(with_jid.is_known());
}
