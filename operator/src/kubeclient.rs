//! Building a Kubernetes client, with errors that say where the configuration came from.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

/// Why no Kubernetes client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file named on the command line could not be read or parsed.
    #[error("cannot read kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: String,
        #[source]
        source: KubeconfigError,
    },
    /// The kubeconfig was read but does not describe a usable cluster and user.
    #[error("kubeconfig {path} is not usable: {source}")]
    LoadKubeconfig {
        path: String,
        #[source]
        source: KubeconfigError,
    },
    /// Neither in-cluster configuration nor `$KUBECONFIG`/`~/.kube/config` worked.
    #[error("no Kubernetes configuration found (in-cluster or KUBECONFIG): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The configuration was valid but the HTTP client could not be built (e.g. bad TLS material).
    #[error("cannot build the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

/// A client from an explicit kubeconfig file, or else inferred (in-cluster, then `KUBECONFIG`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    crate::install_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::ReadKubeconfig {
                path: shown.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::LoadKubeconfig { path: shown, source })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Building a real TLS client must not panic: two rustls crypto providers in the dependency
    /// graph compile fine and only fail here (stack.md, G1). No connection is made.
    #[test]
    fn tls_client_builds_with_one_crypto_provider() {
        crate::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut config = kube::Config::new("https://127.0.0.1:6443".parse().expect("uri"));
            config.accept_invalid_certs = false;
            kube::Client::try_from(config).expect("client builds");
        });
    }

    #[tokio::test]
    async fn missing_kubeconfig_names_the_file() {
        let Err(err) = client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
            panic!("a missing kubeconfig must be an error");
        };
        assert!(matches!(err, ClientError::ReadKubeconfig { .. }));
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    }
}
