//! When a watch retries after an error.
//!
//! kube-runtime's `default_backoff` sleeps after every error, up to 30 s. After an API server
//! restart, every watch first fails to connect (the backoff grows while the server is down),
//! then, once it is back, asks for a resource version the new server no longer has and gets
//! `410 Gone`. The watcher relists after a 410, but the backoff delays that relist by up to
//! another 30 s, and the caches stay stale for most of a minute. Here a 410 is a cue to relist
//! now (the relist is one list request, and a real API server answers it); other errors back
//! off, capped at [`MAX`] so a recovered API server is seen within seconds. A server that
//! answered 410 to every watch right after a successful list would be relisted without a pause:
//! no real API server does that, as a fresh list's resource version is the newest it has.

use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use kube::runtime::watcher;

/// First wait after an error.
pub const FIRST: Duration = Duration::from_millis(500);
/// Longest wait between retries.
pub const MAX: Duration = Duration::from_secs(5);

/// Doubling waits from [`FIRST`] to [`MAX`], reset by any success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// How long to wait after `error` before polling the watch again: nothing after `410 Gone`
    /// (the watcher relists next), else the next doubling wait.
    pub fn after(&mut self, error: &watcher::Error) -> Option<Duration> {
        if is_gone(error) {
            return None;
        }
        let wait = FIRST.saturating_mul(2u32.saturating_pow(self.failures)).min(MAX);
        self.failures = self.failures.saturating_add(1);
        Some(wait)
    }

    /// A success: the next error starts again from [`FIRST`].
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Whether the API server said the watch's resource version is gone (410): relist.
pub fn is_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(s) if s.code == 410)
}

/// `events` with [`Backoff`] applied: after an error the next poll waits as it says.
pub fn with_backoff<S, T>(events: S) -> impl Stream<Item = Result<T, watcher::Error>> + Send
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    T: Send + 'static,
{
    let events = Box::pin(events);
    stream::unfold(
        (events, Backoff::default(), None::<Duration>),
        |(mut events, mut backoff, wait)| async move {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            let item = events.next().await?;
            let wait = match &item {
                Ok(_) => {
                    backoff.reset();
                    None
                }
                Err(e) => backoff.after(e),
            };
            Some((item, (events, backoff, wait)))
        },
    )
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn watch_error(code: u16) -> watcher::Error {
        let mut s = Status::failure("gone", "Expired");
        s.code = code;
        watcher::Error::WatchError(Box::new(s))
    }

    #[test]
    fn errors_back_off_doubling_to_the_cap_and_a_success_resets() {
        let mut b = Backoff::default();
        let e = watch_error(500);
        let waits: Vec<_> = (0..6).map(|_| b.after(&e).expect("a wait")).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.after(&e), Some(FIRST));
    }

    #[test]
    fn a_gone_resource_version_relists_at_once_whatever_came_before() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.after(&watch_error(503));
        }
        assert_eq!(b.after(&watch_error(410)), None);
        assert!(is_gone(&watch_error(410)));
        assert!(!is_gone(&watch_error(403)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_waits_after_errors_only() {
        let items = vec![
            Err(watch_error(500)),
            Err(watch_error(500)),
            Ok(1),
            Err(watch_error(410)),
            Ok(2),
        ];
        let start = tokio::time::Instant::now();
        let mut s = std::pin::pin!(with_backoff(stream::iter(items)));
        let mut at = Vec::new();
        while let Some(item) = s.next().await {
            at.push((item.is_ok(), start.elapsed().as_millis()));
        }
        // 500 ms after the first error, 1 s after the second; none after a success or a 410.
        assert_eq!(
            at,
            [
                (false, 0),
                (false, 500),
                (true, 1500),
                (false, 1500),
                (true, 1500)
            ]
        );
    }
}
