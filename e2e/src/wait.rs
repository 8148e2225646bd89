//! Polling for a condition with a deadline, reporting the last observation on timeout.

use std::{fmt::Debug, future::Future, time::Duration};

use anyhow::bail;

/// Calls `probe` every 200 ms until it returns `Some`, or fails after `timeout` with `what` and the
/// last error the probe reported.
pub async fn until<T, E, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:?}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
