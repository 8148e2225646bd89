//! What a `/create` carries besides the pod: every ConfigMap and Secret it mounts or reads, and
//! its projected and downward-API volumes, read when the pod is created at its site.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Pod, Secret},
};
use kube::{Api, Client, Resource, ResourceExt};

use crate::interlink::wire::PodCreateRequests;

/// Every ConfigMap and Secret the pod mounts or reads in env, in full; projected and downwardAPI
/// volumes as ConfigMaps named after the volume, as interLink sends them.
/// What `/create` carries for `pod`, and when the earliest service-account token in it expires.
pub async fn gather(
    client: &Client,
    pod: &Pod,
) -> Result<(PodCreateRequests, Option<jiff::Timestamp>), String> {
    let mut expires: Option<jiff::Timestamp> = None;
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let (mut cm_names, mut secret_names) = (Vec::<String>::new(), Vec::<String>::new());
    let mut projected = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            cm_names.push(c.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secret_names.push(s);
        }
        if let Some(p) = &v.projected {
            let mut data = BTreeMap::new();
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    let cm = get::<ConfigMap>(client, &ns, &c.name).await?;
                    data.extend(cm.data.unwrap_or_default());
                }
                if let Some(s) = &src.secret {
                    let sec = get::<Secret>(client, &ns, &s.name).await?;
                    for (k, ByteString(b)) in sec.data.unwrap_or_default() {
                        data.insert(k, String::from_utf8_lossy(&b).into_owned());
                    }
                }
                if let Some(tok) = &src.service_account_token {
                    let t = token(client, pod, tok).await?;
                    if let Some(at) = super::token::expiry(&t) {
                        expires = Some(expires.map_or(at, |e| e.min(at)));
                    }
                    data.insert(tok.path.clone(), t);
                }
                if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            data.insert(item.path.clone(), field(pod, &f.field_path));
                        }
                    }
                }
            }
            projected.push(synthetic(&v.name, data));
        }
        if let Some(d) = &v.downward_api {
            let data = d
                .items
                .iter()
                .flatten()
                .filter_map(|i| Some((i.path.clone(), field(pod, &i.field_ref.as_ref()?.field_path))))
                .collect();
            projected.push(synthetic(&v.name, data));
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten().filter_map(|e| e.value_from.as_ref()) {
            cm_names.extend(e.config_map_key_ref.as_ref().map(|r| r.name.clone()));
            secret_names.extend(e.secret_key_ref.as_ref().map(|r| r.name.clone()));
        }
        for e in c.env_from.iter().flatten() {
            cm_names.extend(e.config_map_ref.as_ref().map(|r| r.name.clone()));
            secret_names.extend(e.secret_ref.as_ref().map(|r| r.name.clone()));
        }
    }
    cm_names.sort();
    cm_names.dedup();
    secret_names.sort();
    secret_names.dedup();
    let mut configmaps = Vec::new();
    for n in &cm_names {
        configmaps.push(get::<ConfigMap>(client, &ns, n).await?);
    }
    let mut secrets = Vec::new();
    for n in &secret_names {
        secrets.push(get::<Secret>(client, &ns, n).await?);
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
        for e in c.env.iter_mut().flatten() {
            let Some(from) = &e.value_from else { continue };
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
            if let Some(v) = value {
                e.value = Some(v);
                e.value_from = None;
            }
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

fn synthetic(name: &str, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
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

async fn get<K>(client: &Client, ns: &str, name: &str) -> Result<K, String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    match Api::<K>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(o)) => Ok(o),
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
                    {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x"}}}]}]}
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
    }
}
