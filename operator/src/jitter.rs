//! Jitter for retries: many objects or requests that failed together (a site or the API server
//! back after an outage) retry spread out instead of arriving together.

use std::time::Duration;

/// `base` plus a random part of up to a fifth more.
pub fn jitter(base: Duration) -> Duration {
    use std::hash::BuildHasher;
    // A randomly keyed hasher is the standard library's source of randomness.
    let random = std::collections::hash_map::RandomState::new().hash_one(base);
    let fifth = base.as_millis() as u64 / 5;
    base + Duration::from_millis(if fifth == 0 { 0 } else { random % fifth })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_adds_at_most_a_fifth() {
        let base = Duration::from_secs(10);
        let all: std::collections::HashSet<Duration> = (0..50).map(|_| jitter(base)).collect();
        assert!(
            all.iter()
                .all(|d| *d >= base && *d < base + Duration::from_secs(2)),
            "{all:?}"
        );
        assert!(all.len() > 1, "random: {all:?}");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
