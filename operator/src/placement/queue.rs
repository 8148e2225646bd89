//! Expected queue wait per site (pure).

/// Weight of a new sample in the observed moving average.
pub const ALPHA: f64 = 0.2;

/// Exponentially weighted moving average of create-to-running times, in seconds.
pub fn observe(previous: Option<f64>, sample_seconds: f64) -> f64 {
    match previous {
        None => sample_seconds,
        Some(p) => p + ALPHA * (sample_seconds - p),
    }
}

/// The wait a new pod should expect: the site's typical wait (the observed average once pods have
/// run there, blended 3:1 with the declared one; the declared one alone before), plus the backlog
/// of pods already placed there that have not started, each adding `base / slots`, where `slots` is
/// what the site runs at once (its concurrency limit, else its pod capacity).
pub fn expected_wait(declared: Option<i64>, observed: Option<f64>, pending: i64, slots: i64) -> i64 {
    let base = match (declared, observed) {
        (Some(d), Some(o)) => (d as f64 + 3.0 * o) / 4.0,
        (None, Some(o)) => o,
        (Some(d), None) => d as f64,
        (None, None) => 0.0,
    };
    let backlog = pending.max(0) as f64 * base / slots.max(1) as f64;
    (base + backlog).round() as i64
}

/// The expected wait, raised to what the longest-waiting unstarted pod at the site already shows:
/// its wait so far, less `status_lag` (a pod that started within the last status-sync interval
/// still looks unstarted, and must not count against the site). A site whose pods never start
/// (a black hole) sees this grow without bound.
pub fn with_unstarted(expected: i64, longest_unstarted: i64, status_lag: i64) -> i64 {
    expected.max(longest_unstarted - status_lag.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstarted_pod_raises_the_expected_wait_beyond_the_status_lag() {
        assert_eq!(with_unstarted(30, 0, 5), 30);
        assert_eq!(
            with_unstarted(30, 6, 5),
            30,
            "a pod that may have started meanwhile"
        );
        assert_eq!(with_unstarted(3, 6, 5), 3);
        assert_eq!(with_unstarted(30, 605, 5), 600, "a pod stuck for ten minutes");
    }

    #[test]
    fn moving_average() {
        assert_eq!(observe(None, 100.0), 100.0);
        assert_eq!(observe(Some(100.0), 200.0), 120.0);
    }

    #[test]
    fn expected_wait_blends_and_counts_backlog() {
        assert_eq!(expected_wait(Some(3600), None, 0, 10), 3600);
        assert_eq!(
            expected_wait(Some(3600), Some(400.0), 0, 10),
            1200,
            "observed weighs 3:1"
        );
        assert_eq!(
            expected_wait(None, Some(60.0), 10, 5),
            180,
            "10 pending on 5 slots add 2 waits"
        );
        assert_eq!(expected_wait(None, None, 100, 1), 0);
    }
}
