//! What a `/create` carries besides the pod: every ConfigMap and Secret it mounts or reads, and
//! its projected and downward-API volumes, read when the pod is created at its site.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, KeyToPath, Pod, Secret},
};
use kube::{Api, Client, Resource, ResourceExt};

use crate::interlink::wire::PodCreateRequests;

/// Every ConfigMap and Secret the pod mounts or reads in env, in full; projected and downwardAPI
/// volumes as ConfigMaps named after the volume, as interLink sends them. References marked
/// `optional` to objects that do not exist are left out, as a kubelet starts such a pod; a missing
/// required one is an error (the pod waits, `CreateContainerConfigError`).
/// What `/create` carries for `pod`, and when the earliest service-account token in it expires.
pub async fn gather(
    client: &Client,
    pod: &Pod,
) -> Result<(PodCreateRequests, Option<jiff::Timestamp>), String> {
    let mut expires: Option<jiff::Timestamp> = None;
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    // Name and whether every reference to it is optional.
    let (mut cm_refs, mut secret_refs) = (Refs::default(), Refs::default());
    let mut projected = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            cm_refs.add(&c.name, c.optional);
        }
        if let Some(s) = &v.secret
            && let Some(name) = &s.secret_name
        {
            secret_refs.add(name, s.optional);
        }
        if let Some(p) = &v.projected {
            let mut files = Files::default();
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map
                    && let Some(cm) = fetch::<ConfigMap>(client, &ns, &c.name, c.optional).await?
                {
                    let text = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()));
                    let binary = cm
                        .binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0));
                    let what = format!("ConfigMap {ns}/{}", c.name);
                    files.extend(project(
                        text.chain(binary).collect(),
                        c.items.as_deref(),
                        c.optional,
                        &what,
                    )?);
                }
                if let Some(sc) = &src.secret
                    && let Some(sec) = fetch::<Secret>(client, &ns, &sc.name, sc.optional).await?
                {
                    let entries = sec
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect();
                    let what = format!("Secret {ns}/{}", sc.name);
                    files.extend(project(entries, sc.items.as_deref(), sc.optional, &what)?);
                }
                if let Some(tok) = &src.service_account_token {
                    let t = token(client, pod, tok).await?;
                    if let Some(at) = super::token::expiry(&t) {
                        expires = Some(expires.map_or(at, |e| e.min(at)));
                    }
                    files.insert(tok.path.clone(), t.into_bytes());
                }
                if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            files.insert(item.path.clone(), field(pod, &f.field_path).into_bytes());
                        }
                    }
                }
            }
            projected.push(files.config_map(&v.name));
        }
        if let Some(d) = &v.downward_api {
            let mut files = Files::default();
            for i in d.items.iter().flatten() {
                if let Some(f) = &i.field_ref {
                    files.insert(i.path.clone(), field(pod, &f.field_path).into_bytes());
                }
            }
            projected.push(files.config_map(&v.name));
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten().filter_map(|e| e.value_from.as_ref()) {
            if let Some(r) = &e.config_map_key_ref {
                cm_refs.add(&r.name, r.optional);
            }
            if let Some(r) = &e.secret_key_ref {
                secret_refs.add(&r.name, r.optional);
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                cm_refs.add(&r.name, r.optional);
            }
            if let Some(r) = &e.secret_ref {
                secret_refs.add(&r.name, r.optional);
            }
        }
    }
    let mut configmaps = Vec::new();
    for (n, optional) in &cm_refs.0 {
        configmaps.extend(fetch::<ConfigMap>(client, &ns, n, Some(*optional)).await?);
    }
    let mut secrets = Vec::new();
    for (n, optional) in &secret_refs.0 {
        secrets.extend(fetch::<Secret>(client, &ns, n, Some(*optional)).await?);
    }
    let mut sent = pod.clone();
    resolve_env(&mut sent, &configmaps, &secrets);
    let request = PodCreateRequests {
        pod: sent,
        configmaps,
        secrets,
        projectedvolumesmaps: projected,
        jobscript_url: String::new(),
    };
    Ok((request, expires))
}

/// Referenced objects by name, each with whether every reference to it is optional.
#[derive(Default)]
struct Refs(BTreeMap<String, bool>);

impl Refs {
    fn add(&mut self, name: &str, optional: Option<bool>) {
        let optional = optional.unwrap_or(false);
        let entry = self.0.entry(name.to_string()).or_insert(optional);
        *entry &= optional;
    }
}

/// The files of one projected or downwardAPI volume, by path.
#[derive(Default)]
struct Files(BTreeMap<String, Vec<u8>>);

impl Files {
    fn insert(&mut self, path: String, content: Vec<u8>) {
        self.0.insert(path, content);
    }

    fn extend(&mut self, files: Vec<(String, Vec<u8>)>) {
        self.0.extend(files);
    }

    /// The ConfigMap interLink sends for the volume: text in `data`, anything that is not UTF-8
    /// in `binaryData`, byte for byte (a plugin reading only `data` does not see it, rather than
    /// a corrupted copy).
    fn config_map(self, volume: &str) -> ConfigMap {
        let (mut data, mut binary) = (BTreeMap::new(), BTreeMap::new());
        for (path, bytes) in self.0 {
            match String::from_utf8(bytes) {
                Ok(text) => {
                    data.insert(path, text);
                }
                Err(e) => {
                    binary.insert(path, ByteString(e.into_bytes()));
                }
            }
        }
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(volume.into()),
                ..Default::default()
            },
            data: Some(data),
            binary_data: (!binary.is_empty()).then_some(binary),
            ..Default::default()
        }
    }
}

/// The files a projected ConfigMap or Secret source gives, as a kubelet lays them out: every key
/// under its own name, or with `items` only the listed keys, each at its `path`. A listed key
/// that is missing is an error unless the source is optional.
fn project(
    entries: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    what: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(entries.into_iter().collect());
    };
    let mut out = Vec::new();
    for item in items {
        match entries.get(&item.key) {
            Some(bytes) => out.push((item.path.clone(), bytes.clone())),
            None if optional.unwrap_or(false) => {}
            None => return Err(format!("{what} has no key {}", item.key)),
        }
    }
    Ok(out)
}

/// Env values taken from the pod's fields, Secrets and ConfigMaps written in as plain values, as
/// interLink's virtual kubelet does before it sends a pod: plugins such as the SLURM one write only
/// `value` into the job's environment. A reference that cannot be resolved is left as it is.
pub fn resolve_env(pod: &mut Pod, configmaps: &[ConfigMap], secrets: &[Secret]) {
    let meta = pod.metadata.clone();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
    let Some(spec) = pod.spec.as_mut() else { return };
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for c in containers {
        // An optional reference that cannot be resolved sets nothing, as on a kubelet.
        let mut unset = Vec::new();
        for e in c.env.iter_mut().flatten() {
            let Some(from) = &e.value_from else { continue };
            let optional = from
                .secret_key_ref
                .as_ref()
                .and_then(|r| r.optional)
                .or_else(|| from.config_map_key_ref.as_ref().and_then(|r| r.optional))
                .unwrap_or(false);
            let value = if let Some(r) = &from.secret_key_ref {
                secrets
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(r.name.as_str()))
                    .and_then(|s| s.data.as_ref()?.get(&r.key))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            } else if let Some(r) = &from.config_map_key_ref {
                configmaps
                    .iter()
                    .find(|m| m.metadata.name.as_deref() == Some(r.name.as_str()))
                    .and_then(|m| m.data.as_ref()?.get(&r.key).cloned())
            } else if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "metadata.name" => meta.name.clone(),
                    "metadata.namespace" => meta.namespace.clone(),
                    "metadata.uid" => meta.uid.clone(),
                    "spec.nodeName" => node.clone(),
                    "status.podIP" => pod_ip.clone(),
                    path => path
                        .strip_prefix("metadata.annotations['")
                        .or_else(|| path.strip_prefix("metadata.annotations[\""))
                        .and_then(|k| k.strip_suffix("']").or_else(|| k.strip_suffix("\"]")))
                        .and_then(|k| meta.annotations.as_ref()?.get(k).cloned()),
                }
            } else {
                None
            };
            match value {
                Some(v) => {
                    e.value = Some(v);
                    e.value_from = None;
                }
                None if optional => unset.push(e.name.clone()),
                None => {}
            }
        }
        if let Some(env) = c.env.as_mut() {
            env.retain(|e| !(e.value_from.is_some() && unset.contains(&e.name)));
        }
    }
}

/// A service-account token requested for the pod (bound to it, as a kubelet requests it).
async fn token(
    client: &Client,
    pod: &Pod,
    src: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
) -> Result<String, String> {
    use k8s_openapi::api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let ns = pod.namespace().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: src.audience.clone().map(|a| vec![a]),
            expiration_seconds: Some(src.expiration_seconds.unwrap_or(3600).max(600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let answer: TokenRequest = api
        .create_subresource("token", &sa, &kube::api::PostParams::default(), &request)
        .await
        .map_err(|e| format!("cannot request a token for ServiceAccount {ns}/{sa}: {e}"))?;
    answer
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| format!("the token request for {ns}/{sa} returned no token"))
}

fn field(pod: &Pod, path: &str) -> String {
    let m = &pod.metadata;
    match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => m
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{v}\"\n"))
            .collect(),
        "metadata.annotations" => m
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{v}\"\n"))
            .collect(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// The object `name`, or `None` when it does not exist and every reference to it is optional.
async fn fetch<K>(client: &Client, ns: &str, name: &str, optional: Option<bool>) -> Result<Option<K>, String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    match Api::<K>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(o)) => Ok(Some(o)),
        Ok(None) if optional.unwrap_or(false) => Ok(None),
        Ok(None) => Err(format!("{kind} {ns}/{name} does not exist")),
        Err(e) => Err(format!("cannot read {kind} {ns}/{name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_references_become_values_as_interlink_sends_them() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": {"a": "b"}},
            "spec": {"nodeName": "offload-x",
                "initContainers": [{"name": "i", "env": [
                    {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "accessKeyId"}}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "PLAIN", "value": "v"},
                    {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}},
                    {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "ANN", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a']"}}},
                    {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x"}}},
                    {"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": true}}}]}]}
        }))
        .unwrap();
        let secrets: Vec<Secret> = vec![
            serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s3"}, "data": {"accessKeyId": "aWQ="}}))
            .unwrap(),
        ];
        let cms: Vec<ConfigMap> = vec![
            serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cfg"}, "data": {"k": "cv"}}))
            .unwrap(),
        ];
        resolve_env(&mut pod, &cms, &secrets);
        let spec = pod.spec.unwrap();
        let env = |c: &k8s_openapi::api::core::v1::Container, n: &str| {
            c.env.iter().flatten().find(|e| e.name == n).cloned().unwrap()
        };
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(env(init, "KEY").value.as_deref(), Some("id"));
        let c = &spec.containers[0];
        assert_eq!(env(c, "PLAIN").value.as_deref(), Some("v"));
        assert_eq!(env(c, "CM").value.as_deref(), Some("cv"));
        assert_eq!(env(c, "NAME").value.as_deref(), Some("p"));
        assert_eq!(env(c, "ANN").value.as_deref(), Some("b"));
        let gone = env(c, "GONE");
        assert!(
            gone.value.is_none() && gone.value_from.is_some(),
            "left as it was"
        );
        assert!(
            c.env.iter().flatten().all(|e| e.name != "MAYBE"),
            "an optional reference to nothing sets nothing"
        );
    }

    #[test]
    fn projected_sources_honour_items_and_optional_keys() {
        let entries = BTreeMap::from([("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())]);
        let all = project(entries.clone(), None, None, "x").unwrap();
        assert_eq!(all.len(), 2);
        let item = |k: &str, p: &str| KeyToPath {
            key: k.into(),
            path: p.into(),
            ..Default::default()
        };
        let mapped = project(entries.clone(), Some(&[item("b", "conf/b.txt")]), None, "x").unwrap();
        assert_eq!(
            mapped,
            vec![("conf/b.txt".to_string(), b"2".to_vec())],
            "only the listed key, at its path"
        );
        let err = project(
            entries.clone(),
            Some(&[item("zz", "z")]),
            Some(false),
            "ConfigMap ns/cm",
        )
        .unwrap_err();
        assert_eq!(err, "ConfigMap ns/cm has no key zz");
        assert!(
            project(entries, Some(&[item("zz", "z")]), Some(true), "x")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn binary_files_travel_byte_for_byte_in_binary_data() {
        let mut files = Files::default();
        files.insert("text".into(), b"hello".to_vec());
        let bytes = vec![0u8, 159, 146, 150, 255, b'\n'];
        files.insert("blob".into(), bytes.clone());
        let cm = files.config_map("vol");
        assert_eq!(cm.metadata.name.as_deref(), Some("vol"));
        assert_eq!(cm.data.unwrap().get("text").map(String::as_str), Some("hello"));
        assert_eq!(
            cm.binary_data.unwrap().get("blob").map(|b| b.0.clone()),
            Some(bytes)
        );
    }

    #[test]
    fn a_name_is_optional_only_when_every_reference_says_so() {
        let mut refs = Refs::default();
        refs.add("a", Some(true));
        refs.add("a", None);
        refs.add("b", Some(true));
        assert_eq!(refs.0.get("a"), Some(&false));
        assert_eq!(refs.0.get("b"), Some(&true));
    }
}
