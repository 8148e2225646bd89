//! Reads a site's credentials from the operator's namespace and turns them into a client config.

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{Api, Client};

use crate::crd::site::{OffloadSiteSpec, SiteAuth};
use crate::interlink::SiteConfig;

/// Why a site's credentials could not be read. The message names the object and key, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CredentialsError {
    /// CamelCase reason for the condition and Event.
    pub reason: &'static str,
    /// What to fix.
    pub message: String,
}

fn missing(reason: &'static str, message: String) -> CredentialsError {
    CredentialsError { reason, message }
}

/// The client config for a site, with its Secret and ConfigMap references resolved.
pub async fn resolve(
    client: &Client,
    namespace: &str,
    spec: &OffloadSiteSpec,
) -> Result<SiteConfig, CredentialsError> {
    let mut config = SiteConfig {
        endpoint: spec.endpoint.clone(),
        status_chunk: 500,
        ..SiteConfig::default()
    };
    let Some(auth) = &spec.auth else { return Ok(config) };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let SiteAuth {
        bearer_token,
        ca_bundle,
        client_certificate,
        insecure_skip_tls_verify,
    } = auth;
    if let Some(r) = bearer_token {
        let token = secret_key(&secrets, namespace, &r.name, &r.key).await?;
        config.bearer_token = Some(String::from_utf8_lossy(&token).trim().to_string());
    }
    if let Some(ca) = ca_bundle {
        let pem = if let Some(r) = &ca.secret {
            secret_key(&secrets, namespace, &r.name, &r.key).await?
        } else if let Some(r) = &ca.config_map {
            let cm = get(&config_maps, &r.name).await.map_err(|e| {
                missing(
                    "ConfigMapNotReadable",
                    format!("cannot read ConfigMap {namespace}/{}: {e}", r.name),
                )
            })?;
            let cm = cm.ok_or_else(|| {
                missing(
                    "ConfigMapNotFound",
                    format!("ConfigMap {namespace}/{} does not exist", r.name),
                )
            })?;
            cm.data
                .and_then(|d| d.get(&r.key).cloned())
                .map(String::into_bytes)
                .ok_or_else(|| {
                    missing(
                        "KeyNotFound",
                        format!("ConfigMap {namespace}/{} has no key {:?}", r.name, r.key),
                    )
                })?
        } else {
            return Err(missing(
                "InvalidCABundle",
                "caBundle names neither a Secret nor a ConfigMap".into(),
            ));
        };
        if reqwest::Certificate::from_pem_bundle(&pem)
            .map(|c| c.is_empty())
            .unwrap_or(true)
        {
            return Err(missing(
                "InvalidCABundle",
                "the CA bundle holds no PEM certificate".into(),
            ));
        }
        config.ca_pem = Some(pem);
    }
    if let Some(r) = client_certificate {
        let mut pem = secret_key(&secrets, namespace, &r.secret_name, "tls.crt").await?;
        pem.extend(secret_key(&secrets, namespace, &r.secret_name, "tls.key").await?);
        config.client_identity_pem = Some(pem);
    }
    config.insecure_skip_tls_verify = *insecure_skip_tls_verify;
    Ok(config)
}

async fn get<K>(api: &Api<K>, name: &str) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await
}

async fn secret_key(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Vec<u8>, CredentialsError> {
    let secret = get(api, name)
        .await
        .map_err(|e| {
            missing(
                "SecretNotReadable",
                format!("cannot read Secret {namespace}/{name}: {e}"),
            )
        })?
        .ok_or_else(|| {
            missing(
                "SecretNotFound",
                format!("Secret {namespace}/{name} does not exist"),
            )
        })?;
    secret
        .data
        .and_then(|d| d.get(key).cloned())
        .map(|ByteString(b)| b)
        .ok_or_else(|| {
            missing(
                "KeyNotFound",
                format!("Secret {namespace}/{name} has no key {key:?}"),
            )
        })
}

/// Names of the Secrets and ConfigMaps a site reads, to requeue it when one changes.
pub fn referenced(spec: &OffloadSiteSpec) -> Vec<String> {
    let Some(auth) = &spec.auth else { return Vec::new() };
    let mut names = Vec::new();
    names.extend(auth.bearer_token.as_ref().map(|r| r.name.clone()));
    if let Some(ca) = &auth.ca_bundle {
        names.extend(ca.secret.as_ref().map(|r| r.name.clone()));
        names.extend(ca.config_map.as_ref().map(|r| r.name.clone()));
    }
    names.extend(auth.client_certificate.as_ref().map(|r| r.secret_name.clone()));
    names
}
