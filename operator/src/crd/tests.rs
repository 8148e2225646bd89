//! CRD tests: the committed YAML is current, the schema has what `kubectl` users rely on, and the
//! CEL rules accept the examples and reject the invalid manifests of `e2e/testdata/invalid`.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;
use serde_json::Value;

use super::*;

fn repo() -> PathBuf {
    // At run time first: a cached test binary built in another checkout has that one's path.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

fn crd_for(kind: &str) -> CustomResourceDefinition {
    crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("known kind")
}

fn schema_of(kind: &str) -> Value {
    let crd = crd_for(kind);
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.expect("schema")).expect("json")
}

/// YAML documents of a file, with the `# key: value` header comments.
fn load(path: &Path) -> (Vec<(String, String)>, Value) {
    let text = std::fs::read_to_string(path).expect("readable test file");
    let header = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.trim_start_matches('#').trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let value: Value = serde_saphyr::from_str(&text).expect("valid YAML");
    (header, value)
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join(dir)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn committed_crds_are_current() {
    for crd in crds() {
        let path = repo().join("crds").join(file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = to_yaml(&crd).expect("yaml");
        assert!(
            committed == generated,
            "{} is out of date: run `make crds` and commit the result",
            path.display()
        );
    }
}

/// The Helm chart ships the generated CRDs: its `crds/` holds exactly the files of `crds/`.
#[test]
fn chart_crds_are_the_generated_ones() {
    let chart = repo().join("helm/offload-operator/crds");
    let mut names: Vec<String> = std::fs::read_dir(&chart)
        .expect("helm/offload-operator/crds")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = crds().iter().map(file_name).collect();
    want.sort();
    assert_eq!(names, want, "helm/offload-operator/crds: run `make crds`");
    for crd in crds() {
        let path = chart.join(file_name(&crd));
        let generated = to_yaml(&crd).expect("yaml");
        assert!(
            std::fs::read_to_string(&path).unwrap_or_default() == generated,
            "{} differs from the generated CRD: run `make crds` and commit the result",
            path.display()
        );
    }
}

#[test]
fn crd_yaml_round_trips() {
    for crd in crds() {
        let yaml = to_yaml(&crd).expect("yaml");
        let back: CustomResourceDefinition = serde_saphyr::from_str(&yaml).expect("parses back");
        assert_eq!(back, crd);
    }
}

#[test]
fn names_scope_and_columns() {
    let site = crd_for("OffloadSite");
    assert_eq!(site.spec.scope, "Cluster");
    assert_eq!(site.spec.names.short_names, Some(vec!["osite".to_string()]));
    assert_eq!(site.spec.names.categories, Some(vec!["offload".to_string()]));
    let policy = crd_for("OffloadPolicy");
    assert_eq!(policy.spec.scope, "Cluster");
    let job = crd_for("RemoteJob");
    assert_eq!(job.spec.scope, "Namespaced");
    for crd in [&site, &policy, &job] {
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "status subresource"
        );
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.len() >= 4, "{}: {columns:?}", crd.spec.names.kind);
        assert_eq!(columns.last(), Some(&"Age"));
    }
}

/// Every field of every spec and status has a description (`kubectl explain`), except inside the
/// RemoteJob's pod template, whose fields Kubernetes documents.
#[test]
fn every_field_is_documented() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if path.ends_with(".spec.template") || path.ends_with(".metadata") {
            return;
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let p = format!("{path}.{name}");
                if child.get("description").is_none() && !matches!(name.as_str(), "apiVersion" | "kind") {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for kind in ["OffloadSite", "OffloadPolicy", "RemoteJob"] {
        walk(kind, &schema_of(kind), &mut missing);
    }
    // Kubernetes' own types (Condition, LabelSelector, Taint) carry their upstream docs.
    assert!(missing.is_empty(), "fields without a description: {missing:#?}");
}

#[test]
fn remote_job_crd_fits_client_side_apply() {
    // `kubectl apply` stores the object in an annotation limited to 256 KiB.
    let yaml = to_yaml(&crd_for("RemoteJob")).expect("yaml");
    assert!(yaml.len() < 200 * 1024, "RemoteJob CRD is {} bytes", yaml.len());
}

#[test]
fn examples_pass_the_cel_rules() {
    let validator = Validator::new();
    let mut checked = 0;
    for path in files("examples") {
        let (_, value) = load(&path);
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        if !["OffloadSite", "OffloadPolicy", "RemoteJob"].contains(&kind.as_str()) {
            continue;
        }
        if let Err(errors) = validator.validate(&schema_of(&kind), &value, None) {
            panic!("{} fails CEL validation: {errors}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} examples checked");
}

/// The same manifests the end-to-end test sends to the API server: those whose header names a CEL
/// message must fail client-side with it; the others are caught by the schema (ranges, enums,
/// required fields), which the API server checks and the end-to-end test covers.
#[test]
fn invalid_manifests_fail_their_cel_rule() {
    let validator = Validator::new();
    let mut checked = 0;
    for path in files("e2e/testdata/invalid") {
        let (header, value) = load(&path);
        let Some((_, expected)) = header.iter().find(|(k, _)| k == "cel") else {
            continue;
        };
        let kind = value["kind"].as_str().expect("kind");
        match validator.validate(&schema_of(kind), &value, None) {
            Ok(()) => panic!("{} passed CEL validation; expected: {expected}", path.display()),
            Err(errors) => {
                let text = errors.to_string();
                assert!(text.contains(expected.as_str()), "{}: got {text}", path.display());
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} CEL cases");
}

#[test]
fn typed_cel_validation_matches() {
    let site: OffloadSite = serde_saphyr::from_str(
        "apiVersion: offload.dev/v1alpha1\nkind: OffloadSite\nmetadata: {name: s}\n\
         spec: {endpoint: 'http://site:3000', namespaceSelector: {}, auth: {clientCertificate: {secretName: c}}}\n",
    )
    .expect("parses");
    // The typed object, serialized as the operator would send it, fails the same rule.
    let value = serde_json::to_value(&site).expect("json");
    let errors = Validator::new()
        .validate(&schema_of("OffloadSite"), &value, None)
        .expect_err("mTLS over http is refused");
    assert!(
        errors.to_string().contains("needs an https:// endpoint"),
        "{errors}"
    );
}

#[test]
fn defaults_are_sensible() {
    let spec: OffloadSiteSpec =
        serde_json::from_value(serde_json::json!({"endpoint": "https://x", "namespaceSelector": {}}))
            .expect("minimal spec");
    assert_eq!(spec.health_check.interval_seconds, 10);
    assert_eq!(spec.health_check.timeout_seconds, 5);
    assert_eq!(spec.health_check.failure_threshold, 3);
    assert_eq!(spec.status_sync_interval_seconds, 5);
    assert_eq!(spec.relative_cost, 100.0);
    assert!(!spec.cordoned);
    assert!(spec.auth.is_none());
    // The schema carries the same defaults, so the API server fills them in.
    let schema = schema_of("OffloadSite");
    let hc = &schema["properties"]["spec"]["properties"]["healthCheck"];
    assert_eq!(hc["properties"]["intervalSeconds"]["default"], 10);
}

#[test]
fn reference_doc_is_current() {
    let path = repo().join("docs/crds.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == reference::markdown(),
        "{} is out of date: run `make crds`",
        path.display()
    );
}

#[test]
fn reference_doc_covers_every_field_and_rule() {
    let doc = reference::markdown();
    for needle in [
        "`spec.endpoint`",
        "`spec.capacity.gpus[].memoryPerGpu`",
        "`spec.weights.gpuFit`",
        "`status.attempts[].exitCode`",
        "caBundle and insecureSkipTLSVerify are mutually exclusive",
        "`offload.dev/placement`",
    ] {
        assert!(doc.contains(needle), "docs/crds.md lacks {needle}");
    }
}
