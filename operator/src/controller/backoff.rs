//! Error categories and per-object exponential backoff.
//!
//! kube-runtime's `error_policy` returns one `Action` per error with no memory of earlier
//! failures, so each controller keeps a failure count per object here: the delay doubles with
//! every failure in a row, from a base and up to a cap that depend on the error's category, and
//! the count is forgotten on the next success.

use std::{collections::HashMap, sync::Mutex, time::Duration};

/// What kind of failure a reconcile met: it decides how soon to retry and is shown in logs and in
/// `offload_reconcile_errors_total{category}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// The API server or a site could not be reached, or a write conflicted: retry soon.
    Transient,
    /// A site answered and refused: retry slowly (the site or its configuration must change).
    SiteRefused,
    /// The object (or one it references) is invalid or missing: retry slowly, as a kubelet retries
    /// a missing ConfigMap (up to 5 minutes).
    InvalidSpec,
    /// Anything else: a bug or a misconfigured operator (RBAC, say).
    Internal,
}

impl Category {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Transient => "transient",
            Category::SiteRefused => "site_refused",
            Category::InvalidSpec => "invalid_spec",
            Category::Internal => "internal",
        }
    }

    /// The first delay and the largest.
    fn bounds(self) -> (Duration, Duration) {
        match self {
            Category::Transient => (Duration::from_secs(1), Duration::from_secs(120)),
            Category::SiteRefused => (Duration::from_secs(10), Duration::from_secs(600)),
            Category::InvalidSpec => (Duration::from_secs(10), Duration::from_secs(300)),
            Category::Internal => (Duration::from_secs(5), Duration::from_secs(300)),
        }
    }

    /// The category of a Kubernetes API error.
    pub fn of_kube(e: &kube::Error) -> Category {
        match e {
            kube::Error::Api(s) => match s.code {
                400 | 422 => Category::InvalidSpec,
                401 | 403 => Category::Internal,
                _ => Category::Transient,
            },
            kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => Category::Internal,
            _ => Category::Transient,
        }
    }
}

/// The delay before retry number `failures` (1 for the first failure) of an error of `category`:
/// the base doubled per earlier failure, capped.
pub fn delay(category: Category, failures: u32) -> Duration {
    let (base, cap) = category.bounds();
    let doublings = failures.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(cap)
}

pub use crate::jitter::jitter;

/// An object that has not failed for this long is forgotten (it reconciled, or it is gone: a
/// deleted object never succeeds): longer than the longest delay.
const FORGET_AFTER: Duration = Duration::from_secs(900);

/// Failure counts per object key (a UID or a name), with when each last failed.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

impl Backoff {
    /// Counts one failure of `key` and returns how long to wait before the retry (the category's
    /// delay, without jitter: [`jitter`] is added by the caller).
    pub fn failed(&self, key: &str, category: Category) -> Duration {
        let now = std::time::Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of objects that stopped failing long ago (deleted ones never succeed) go.
        f.retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_AFTER);
        let n = f.entry(key.to_string()).or_insert((0, now));
        n.0 = n.0.saturating_add(1);
        n.1 = now;
        delay(category, n.0)
    }

    /// Forgets the failures of `key` (it reconciled).
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// How many objects have failures on record.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_per_failure_up_to_the_cap_of_its_category() {
        assert_eq!(delay(Category::Transient, 1), Duration::from_secs(1));
        assert_eq!(delay(Category::Transient, 2), Duration::from_secs(2));
        assert_eq!(delay(Category::Transient, 5), Duration::from_secs(16));
        assert_eq!(delay(Category::Transient, 50), Duration::from_secs(120));
        assert_eq!(delay(Category::SiteRefused, 1), Duration::from_secs(10));
        assert_eq!(delay(Category::InvalidSpec, 3), Duration::from_secs(40));
        assert_eq!(delay(Category::InvalidSpec, u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn each_object_backs_off_on_its_own_and_a_success_resets_it() {
        let b = Backoff::default();
        assert_eq!(b.failed("a", Category::Transient), Duration::from_secs(1));
        assert_eq!(b.failed("a", Category::Transient), Duration::from_secs(2));
        assert_eq!(
            b.failed("b", Category::Transient),
            Duration::from_secs(1),
            "b is not a"
        );
        b.succeeded("a");
        assert_eq!(b.failed("a", Category::Transient), Duration::from_secs(1));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn kube_errors_are_categorised_by_status() {
        let api = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert_eq!(Category::of_kube(&api(422)), Category::InvalidSpec);
        assert_eq!(Category::of_kube(&api(403)), Category::Internal);
        assert_eq!(Category::of_kube(&api(409)), Category::Transient);
        assert_eq!(Category::of_kube(&api(503)), Category::Transient);
    }
}
