//! One namespace per test, deleted afterwards; the component logs when the test fails.

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use futures::FutureExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};

use crate::Cluster;

/// Upper bound for one test, so a wedged component fails the test instead of hanging the run.
/// Override with `OFFLOAD_E2E_TEST_TIMEOUT` (seconds).
fn test_timeout() -> Duration {
    let secs = std::env::var("OFFLOAD_E2E_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(300))
}

/// What a test body receives.
#[derive(Clone)]
pub struct TestNamespace {
    /// The namespace's name, unique per test.
    pub name: String,
    /// Admin client.
    pub client: Client,
    /// The control plane.
    pub cluster: &'static Cluster,
}

impl TestNamespace {
    /// Waits until the namespace's `default` ServiceAccount exists (the controller-manager creates
    /// it; the ServiceAccount admission plugin refuses pods before).
    pub async fn default_service_account(&self) -> anyhow::Result<()> {
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &self.name);
        crate::wait::until("the default ServiceAccount", Duration::from_secs(60), || async {
            sas.get_opt("default").await
        })
        .await?;
        Ok(())
    }

    /// Runs `body` in a fresh namespace named after `test` and deletes the namespace afterwards.
    /// When the body fails or panics, prints the tail of every component's log, then fails.
    pub async fn run<F, Fut>(test: &str, body: F)
    where
        F: FnOnce(TestNamespace) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let cluster = match Cluster::shared() {
            Ok(c) => c,
            Err(e) => panic!("{e:#}"),
        };
        let client = match cluster.admin_client().await {
            Ok(c) => c,
            Err(e) => panic!("admin client: {e:#}"),
        };
        let name = namespace_name(test);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("offload.dev/e2e-test".to_string(), sanitize(test, 63))].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let limit = test_timeout();
        match tokio::time::timeout(limit, namespaces.create(&PostParams::default(), &ns)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                eprintln!("{}", cluster.log_tails(40));
                panic!("creating namespace {name}: {e}");
            }
            Err(_) => {
                eprintln!("{}", cluster.log_tails(40));
                panic!("creating namespace {name}: no answer within {limit:?}");
            }
        }
        let ctx = TestNamespace {
            name: name.clone(),
            client,
            cluster,
        };
        let outcome = match tokio::time::timeout(limit, AssertUnwindSafe(body(ctx)).catch_unwind()).await {
            Ok(outcome) => outcome,
            Err(_) => Ok(Err(anyhow::anyhow!(
                "test {test} did not finish within {limit:?}"
            ))),
        };
        let failed = !matches!(outcome, Ok(Ok(())));
        if failed {
            eprintln!(
                "test {test} failed; control-plane logs follow\n{}",
                cluster.log_tails(40)
            );
        }
        // Leave the namespace of a failed test for inspection only when asked to.
        if !(failed && std::env::var_os("OFFLOAD_E2E_KEEP").is_some()) {
            let params = DeleteParams::background();
            let _ = tokio::time::timeout(Duration::from_secs(30), namespaces.delete(&name, &params)).await;
        }
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e:#}"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// `e2e-<test>-<pid>-<n>`: readable, unique across tests and concurrent test binaries.
fn namespace_name(test: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("-{}-{n}", std::process::id());
    format!("e2e-{}{suffix}", sanitize(test, 63 - 4 - suffix.len()))
}

/// Lower-case alphanumerics and dashes, at most `max` characters, no trailing dash (DNS label).
fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_dns_labels() {
        let name = namespace_name("Some_Very::long test name that goes on and on and on and on forever");
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("e2e-some-very--long-test"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(
            name,
            namespace_name("Some_Very::long test name that goes on and on and on and on forever")
        );
    }
}
