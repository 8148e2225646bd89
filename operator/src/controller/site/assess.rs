//! The pure half of the site health check: from the previous health and one probe's result, the
//! new health and what to say about it (no I/O, no clock).

use std::time::Duration;

use crate::{controller::credentials::CredentialsError, interlink::wire::PingResponse};

/// The result of one probe.
#[derive(Debug)]
pub enum Probe {
    /// The site answered its ping.
    Ok {
        /// Round trip.
        latency: Duration,
        /// What the ping answer reported, if it said anything.
        ping: Option<PingResponse>,
    },
    /// The ping failed (reason as in the interLink client's errors).
    Failed {
        /// Condition reason.
        reason: String,
        /// What went wrong.
        message: String,
    },
    /// A referenced Secret or ConfigMap key is missing: the site was not even asked.
    Credentials(CredentialsError),
}

/// What is remembered between probes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Failed probes in a row.
    pub failures: i32,
    /// Whether the site counts as reachable (failures below the threshold).
    pub reachable: bool,
    /// The last ping answer that said something (capacity, taints).
    pub last_ping: Option<PingResponse>,
}

/// What the operator says about the site after a probe.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    /// The health after this probe.
    pub health: Health,
    /// The probe's own reason and message (`PingSucceeded`, `TransportError`, ...).
    pub reason: String,
    /// The probe's message.
    pub message: String,
    /// The `Ready` condition's reason and message: a failing probe within the threshold leaves
    /// the site Ready, but says so (`PingFailing`).
    pub ready_reason: String,
    /// See `ready_reason`.
    pub ready_message: String,
    /// `Some((reason, message))` when the credentials could not be resolved.
    pub credentials_error: Option<(&'static str, String)>,
    /// The ping's round trip, when it succeeded.
    pub latency: Option<Duration>,
}

/// `a`, for a site whose Node name belongs to a Node the operator does not own: not ready, so
/// nothing is placed or run there, whatever the ping says.
pub fn node_taken(mut a: Assessment, message: &str) -> Assessment {
    a.health.reachable = false;
    a.reason = crate::controller::node::NODE_TAKEN_REASON.into();
    a.message = message.into();
    a.ready_reason = a.reason.clone();
    a.ready_message = a.message.clone();
    a
}

/// The health after `probe`, given the `previous` one and the failure threshold.
pub fn assess(previous: &Health, probe: &Probe, threshold: i32) -> Assessment {
    let mut health = previous.clone();
    match probe {
        Probe::Ok { ping, .. } => {
            health.failures = 0;
            health.reachable = true;
            if ping.is_some() {
                health.last_ping = ping.clone();
            }
        }
        Probe::Failed { .. } => {
            health.failures += 1;
            if health.failures >= threshold.max(1) {
                health.reachable = false;
            }
        }
        Probe::Credentials(_) => health.reachable = false,
    }
    let (reason, message) = match probe {
        Probe::Ok { latency, .. } => (
            "PingSucceeded".to_string(),
            format!("the site answered its ping in {} ms", latency.as_millis()),
        ),
        Probe::Failed { reason, message } => (reason.clone(), message.clone()),
        Probe::Credentials(e) => (e.reason.to_string(), e.message.clone()),
    };
    let (ready_reason, ready_message) = if health.reachable && !matches!(probe, Probe::Ok { .. }) {
        (
            "PingFailing".to_string(),
            format!("probe failed, still within the failure threshold: {message}"),
        )
    } else {
        (reason.clone(), message.clone())
    };
    Assessment {
        health,
        reason,
        message,
        ready_reason,
        ready_message,
        credentials_error: match probe {
            Probe::Credentials(e) => Some((e.reason, e.message.clone())),
            _ => None,
        },
        latency: match probe {
            Probe::Ok { latency, .. } => Some(*latency),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Probe {
        Probe::Failed {
            reason: "TransportError".into(),
            message: "connection refused".into(),
        }
    }

    fn ok() -> Probe {
        Probe::Ok {
            latency: Duration::from_millis(7),
            ping: None,
        }
    }

    #[test]
    fn a_site_stays_ready_within_the_failure_threshold_and_says_its_probe_fails() {
        let up = assess(&Health::default(), &ok(), 3).health;
        assert!(up.reachable);
        let one = assess(&up, &failed(), 3);
        assert!(one.health.reachable);
        assert_eq!(one.ready_reason, "PingFailing");
        assert_eq!(one.reason, "TransportError");
        let two = assess(&one.health, &failed(), 3);
        let three = assess(&two.health, &failed(), 3);
        assert!(
            !three.health.reachable,
            "the third failure in a row reaches the threshold"
        );
        assert_eq!(three.ready_reason, "TransportError");
        let back = assess(&three.health, &ok(), 3);
        assert!(back.health.reachable);
        assert_eq!(
            (back.health.failures, back.ready_reason.as_str()),
            (0, "PingSucceeded")
        );
        assert_eq!(back.latency, Some(Duration::from_millis(7)));
    }

    #[test]
    fn a_ping_without_an_answer_keeps_the_last_one_that_said_something() {
        let said = PingResponse {
            taints: Some(vec![]),
            ..Default::default()
        };
        let h = assess(
            &Health::default(),
            &Probe::Ok {
                latency: Duration::ZERO,
                ping: Some(said.clone()),
            },
            1,
        )
        .health;
        assert_eq!(assess(&h, &ok(), 1).health.last_ping, Some(said));
    }

    #[test]
    fn missing_credentials_make_the_site_unreachable_at_once() {
        let up = assess(&Health::default(), &ok(), 5).health;
        let a = assess(
            &up,
            &Probe::Credentials(CredentialsError {
                reason: "SecretNotFound",
                message: "secret x not found".into(),
            }),
            5,
        );
        assert!(!a.health.reachable);
        assert_eq!(
            a.credentials_error,
            Some(("SecretNotFound", "secret x not found".to_string()))
        );
    }
}
