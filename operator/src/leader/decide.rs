//! The pure part of leader election: from what the last read of the Lease showed and when, what
//! to write next and whether this replica leads now. No I/O and no clock: `now` is an argument.
//!
//! Expiry is judged on this replica's own monotonic clock, as client-go's leader election does: a
//! holder's lease has expired when its record has not changed for the holder's declared duration
//! since this replica *saw* it change, so clock skew between nodes does not matter. The holder
//! stops leading when it has not renewed for the renew deadline (shorter than the duration) on
//! its own clock, so it stops before any standby may take over.

use std::time::{Duration, Instant};

/// What one read of the Lease showed (the fields that matter; `renewed` only compares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The holder's identity; `None` when the lease is free (released, or never held).
    pub holder: Option<String>,
    /// How long the holder's claim lasts after its last renewal (`leaseDurationSeconds`).
    pub duration: Duration,
    /// `renewTime`, as text: a change means the holder renewed.
    pub renewed: Option<String>,
    /// `leaseTransitions`.
    pub transitions: i32,
}

/// The timing of the election (`run --leader-elect-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The duration written into the lease: how long a standby waits for a silent holder.
    pub duration: Duration,
    /// The holder stops leading when its last successful renewal is this old.
    pub renew_deadline: Duration,
    /// How often a standby reads the lease and the holder tries to renew it.
    pub retry: Duration,
}

impl Timing {
    /// Checks the timing is safe: `retry < renew_deadline < duration`, none zero.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry.is_zero() {
            return Err("the retry period must be above zero".into());
        }
        if self.retry >= self.renew_deadline {
            return Err("the retry period must be shorter than the renew deadline".into());
        }
        if self.renew_deadline >= self.duration {
            return Err(
                "the renew deadline must be shorter than the lease duration (or two replicas could lead at once)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What this replica knows of the election.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The last record read; `None` before the first read or when the lease does not exist.
    pub record: Option<Record>,
    /// Whether the lease exists (known after a first read).
    pub exists: bool,
    /// When the record last changed, on this replica's clock.
    pub changed_at: Option<Instant>,
    /// When this replica's last successful acquire or renew was sent.
    pub renewed_at: Option<Instant>,
}

impl Observed {
    /// Takes in a read at `now`: the change time moves only when the record changed.
    pub fn saw(&mut self, record: Option<Record>, now: Instant) {
        if !self.exists || self.record != record {
            self.changed_at = Some(now);
        }
        self.exists = record.is_some();
        self.record = record;
    }
}

/// The next write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The lease does not exist: create it, held by this replica.
    Create,
    /// The lease is free or its holder went silent: take it (a new transition).
    Acquire,
    /// This replica holds it and a renewal is due.
    Renew,
    /// Nothing to write now.
    Wait,
}

/// What to write now, as replica `me`.
pub fn decide(me: &str, seen: &Observed, now: Instant, timing: &Timing) -> Decision {
    let Some(record) = &seen.record else {
        return Decision::Create;
    };
    match record.holder.as_deref() {
        None | Some("") => Decision::Acquire,
        Some(holder) if holder == me => match seen.renewed_at {
            Some(at) if now.saturating_duration_since(at) < timing.retry => Decision::Wait,
            _ => Decision::Renew,
        },
        Some(_) => {
            let silent_for = seen
                .changed_at
                .map(|at| now.saturating_duration_since(at))
                .unwrap_or_default();
            if silent_for >= record.duration {
                Decision::Acquire
            } else {
                Decision::Wait
            }
        }
    }
}

/// Until when replica `me` leads, if the last read shows it as holder: its last successful
/// renewal plus the renew deadline. The leader's work stops at that instant unless a renewal
/// moves it.
pub fn leading_until(me: &str, seen: &Observed, timing: &Timing) -> Option<Instant> {
    let holds = seen
        .record
        .as_ref()
        .is_some_and(|r| r.holder.as_deref() == Some(me));
    if !holds {
        return None;
    }
    seen.renewed_at.map(|at| at + timing.renew_deadline)
}

/// Whether replica `me` leads at `now` ([`leading_until`] is later than `now`).
pub fn leading(me: &str, seen: &Observed, now: Instant, timing: &Timing) -> bool {
    leading_until(me, seen, timing).is_some_and(|until| now < until)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };

    fn held_by(holder: &str, renewed: &str) -> Option<Record> {
        Some(Record {
            holder: Some(holder.into()),
            duration: Duration::from_secs(15),
            renewed: Some(renewed.into()),
            transitions: 0,
        })
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_missing_lease_is_created() {
        let t0 = Instant::now();
        let mut seen = Observed::default();
        assert_eq!(decide("a", &seen, t0, &TIMING), Decision::Create);
        seen.saw(None, t0);
        assert_eq!(decide("a", &seen, t0, &TIMING), Decision::Create);
        assert!(!leading("a", &seen, t0, &TIMING));
    }

    #[test]
    fn a_free_lease_is_acquired_at_once() {
        let t0 = Instant::now();
        let mut seen = Observed::default();
        let mut free = held_by("", "t1");
        seen.saw(free.clone(), t0);
        assert_eq!(decide("a", &seen, t0, &TIMING), Decision::Acquire);
        if let Some(r) = free.as_mut() {
            r.holder = None;
        }
        seen.saw(free, t0);
        assert_eq!(decide("a", &seen, t0, &TIMING), Decision::Acquire);
    }

    #[test]
    fn another_holder_is_waited_for_until_silent_for_its_duration() {
        let t0 = Instant::now();
        let mut seen = Observed::default();
        seen.saw(held_by("b", "t1"), t0);
        assert_eq!(decide("a", &seen, t0 + s(14), &TIMING), Decision::Wait);
        // It renewed at t0 + 10: the silence starts again from when it was seen.
        seen.saw(held_by("b", "t2"), t0 + s(10));
        assert_eq!(decide("a", &seen, t0 + s(24), &TIMING), Decision::Wait);
        // The same record read again does not reset the silence.
        seen.saw(held_by("b", "t2"), t0 + s(20));
        assert_eq!(decide("a", &seen, t0 + s(25), &TIMING), Decision::Acquire);
        assert!(!leading("a", &seen, t0 + s(25), &TIMING));
    }

    #[test]
    fn a_longer_declared_duration_is_respected() {
        let t0 = Instant::now();
        let mut seen = Observed::default();
        let mut rec = held_by("b", "t1");
        if let Some(r) = rec.as_mut() {
            r.duration = s(60);
        }
        seen.saw(rec, t0);
        assert_eq!(decide("a", &seen, t0 + s(59), &TIMING), Decision::Wait);
        assert_eq!(decide("a", &seen, t0 + s(60), &TIMING), Decision::Acquire);
    }

    #[test]
    fn the_holder_renews_every_retry_period_and_leads_until_the_deadline() {
        let t0 = Instant::now();
        let mut seen = Observed::default();
        seen.saw(held_by("a", "t1"), t0);
        assert_eq!(
            decide("a", &seen, t0, &TIMING),
            Decision::Renew,
            "never renewed yet"
        );
        assert!(!leading("a", &seen, t0, &TIMING), "not before a successful write");
        seen.renewed_at = Some(t0);
        assert!(leading("a", &seen, t0, &TIMING));
        assert_eq!(decide("a", &seen, t0 + s(1), &TIMING), Decision::Wait);
        assert_eq!(decide("a", &seen, t0 + s(2), &TIMING), Decision::Renew);
        // Renewals fail (the API server is down): it still leads just before the deadline, not at it.
        assert!(leading("a", &seen, t0 + Duration::from_millis(9_999), &TIMING));
        assert!(!leading("a", &seen, t0 + s(10), &TIMING));
    }

    #[test]
    fn a_holder_that_reads_another_holder_stops_leading_at_once() {
        let t0 = Instant::now();
        let mut seen = Observed {
            renewed_at: Some(t0),
            ..Default::default()
        };
        seen.saw(held_by("a", "t1"), t0);
        assert!(leading("a", &seen, t0 + s(1), &TIMING));
        seen.saw(held_by("b", "t9"), t0 + s(1));
        assert!(!leading("a", &seen, t0 + s(1), &TIMING));
        assert_eq!(decide("a", &seen, t0 + s(2), &TIMING), Decision::Wait);
    }

    #[test]
    fn the_holder_stops_before_any_standby_may_take_over() {
        // Whatever the moment of its last renewal, the holder's leadership ends before a standby
        // that saw that renewal may acquire: renew deadline < duration, and the standby's clock
        // starts at or after the renewal was sent.
        for sent_ms in [0u64, 500, 1_999] {
            let t0 = Instant::now();
            let holder = Observed {
                record: held_by("a", "t1"),
                exists: true,
                changed_at: Some(t0),
                renewed_at: Some(t0 + Duration::from_millis(sent_ms)),
            };
            let mut standby = Observed::default();
            standby.saw(held_by("a", "t1"), t0 + Duration::from_millis(sent_ms + 10));
            for ms in (0..20_000u64).step_by(50) {
                let now = t0 + Duration::from_millis(ms);
                if decide("b", &standby, now, &TIMING) == Decision::Acquire {
                    assert!(!leading("a", &holder, now, &TIMING), "two leaders at {ms} ms");
                }
            }
        }
    }

    #[test]
    fn unsafe_timings_are_refused() {
        assert!(TIMING.validate().is_ok());
        let bad = [
            Timing {
                renew_deadline: s(15),
                ..TIMING
            },
            Timing {
                retry: s(10),
                ..TIMING
            },
            Timing {
                retry: s(0),
                ..TIMING
            },
        ];
        for t in bad {
            assert!(t.validate().is_err(), "{t:?}");
        }
    }
}
