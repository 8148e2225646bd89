//! The pure half of reporting a site: its status from what was observed, whether that needs a
//! write, and the Events its transitions call for (no I/O, no clock: `now` comes in).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time},
};

use super::assess::Assessment;
use crate::{
    controller::{events::Reason, load, node::SiteTaints},
    crd::{
        common::{is_true, set_condition},
        conditions,
        site::OffloadSiteStatus,
    },
    placement::Resources,
};

/// Probe time and latency alone are written at most this often (other changes at once).
const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// What one probe round observed about a site.
pub struct Observed<'a> {
    /// The health check's verdict.
    pub assessment: &'a Assessment,
    /// The Node's capacity (declared, or reported by the ping).
    pub capacity: &'a BTreeMap<String, Quantity>,
    /// Capacity keys neither declared nor reported (assumed defaults).
    pub assumed: &'a [&'static str],
    /// Pods bound to the site's Node that have not finished.
    pub active: &'a [Arc<Pod>],
    /// The observed create-to-running average (the registry's, else the persisted one).
    pub observed_wait: Option<i64>,
    /// The site's Node.
    pub node_name: &'a str,
    /// `spec.podStartTimeoutSeconds`.
    pub pod_start_timeout_seconds: i32,
    /// The taints the site's ping asked for, as applied (`None`: it asked for none).
    pub site_taints: Option<&'a SiteTaints>,
}

/// The site's new status.
pub fn build(
    old: &OffloadSiteStatus,
    generation: Option<i64>,
    o: &Observed,
    now: &Time,
) -> OffloadSiteStatus {
    let a = o.assessment;
    let reachable = a.health.reachable;
    let mut new = old.clone();
    let c = &mut new.conditions;
    set_condition(
        c,
        conditions::READY,
        reachable,
        &a.ready_reason,
        &a.ready_message,
        generation,
        now,
    );
    let (cr, cm) = match &a.credentials_error {
        Some((reason, message)) => (*reason, message.clone()),
        None => (
            "CredentialsResolved",
            "every referenced Secret and ConfigMap key was found".to_string(),
        ),
    };
    set_condition(
        c,
        conditions::CREDENTIALS_READY,
        a.credentials_error.is_none(),
        cr,
        &cm,
        generation,
        now,
    );
    let (starting, sr, sm) = pods_starting(
        load::longest_unstarted(o.active, now.0),
        o.pod_start_timeout_seconds,
    );
    set_condition(c, conditions::PODS_STARTING, starting, sr, &sm, generation, now);
    let (known, kr, km) = capacity_known(o.assumed);
    set_condition(c, conditions::CAPACITY_KNOWN, known, kr, &km, generation, now);
    let (tok, tr, tm) = o.site_taints.cloned().unwrap_or_default().condition();
    set_condition(c, conditions::SITE_TAINTS_APPLIED, tok, tr, &tm, generation, now);
    let capacity = Resources::from_quantities(o.capacity);
    let allocated = load::total(o.active);
    new.observed_generation = generation;
    new.observed_queue_wait_seconds = o.observed_wait;
    new.active_pods = Some(o.active.len() as i32);
    new.free = Some(capacity.remaining(&allocated).to_amounts());
    new.allocated = Some(allocated.to_amounts());
    new.node_name = Some(o.node_name.to_string());
    new.message = Some(if reachable {
        format!("{} ({} active pods)", a.ready_message, o.active.len())
    } else {
        a.message.clone()
    });
    if let Some(latency) = a.latency {
        new.probe_latency_milliseconds = Some(latency.as_millis() as i64);
    }
    new.last_probe_time = Some(now.clone());
    new
}

/// The `PodsStarting` condition (status, reason, message) from the longest wait of an accepted pod
/// that has not started and the site's `podStartTimeoutSeconds`. The message stays the same while
/// the state does, so the status is not rewritten every probe.
pub fn pods_starting(longest_unstarted: i64, timeout_seconds: i32) -> (bool, &'static str, String) {
    if longest_unstarted < i64::from(timeout_seconds) {
        (
            true,
            "PodsStart",
            format!("no accepted pod has waited more than {timeout_seconds}s to start"),
        )
    } else {
        (
            false,
            "PodsNotStarting",
            format!(
                "a pod the site accepted more than {timeout_seconds}s ago (podStartTimeoutSeconds) has not started; \
                 no new pods are placed here until its pods start or are deleted"
            ),
        )
    }
}

/// The `CapacityKnown` condition: False when a capacity is neither declared nor reported, so the
/// Node advertises an assumed default that nobody has checked.
fn capacity_known(assumed: &[&str]) -> (bool, &'static str, String) {
    if assumed.is_empty() {
        (
            true,
            "CapacityDeclared",
            "cpu, memory and pods are declared in spec.capacity or reported by the site".into(),
        )
    } else {
        (
            false,
            "CapacityAssumed",
            format!(
                "{} neither declared in spec.capacity nor reported by the site's ping: the Node advertises \
                 an assumed default ({}); declare the site's real capacity",
                assumed.join(", "),
                crate::controller::node::ASSUMED_CAPACITY
            ),
        )
    }
}

/// Whether the status differs in anything but probe time, latency and message, or those are
/// stale.
pub fn changed(old: &OffloadSiteStatus, new: &OffloadSiteStatus) -> bool {
    let strip = |s: &OffloadSiteStatus| {
        let mut s = s.clone();
        s.last_probe_time = None;
        s.probe_latency_milliseconds = None;
        s.message = None;
        s
    };
    if strip(old) != strip(new) {
        return true;
    }
    match (&old.last_probe_time, &new.last_probe_time) {
        (Some(o), Some(n)) => n.0.duration_since(o.0).as_secs_f64() >= STATUS_REFRESH.as_secs_f64(),
        _ => true,
    }
}

/// The Events the change from `old` to `new` calls for, in order.
pub fn transitions(
    old: &OffloadSiteStatus,
    new: &OffloadSiteStatus,
    a: &Assessment,
) -> Vec<(Reason, String)> {
    let first = old.conditions.is_empty();
    let was = |type_: &str| {
        old.conditions
            .iter()
            .all(|c| c.type_ != type_ || c.status == "True")
    };
    // The message of a condition that just turned False, for its Event.
    let turned_false = |type_: &str| {
        (!is_true(&new.conditions, type_) && was(type_)).then(|| {
            new.conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| c.message.clone())
                .unwrap_or_default()
        })
    };
    let mut out = vec![];
    if let Some(message) = turned_false(conditions::PODS_STARTING) {
        out.push((Reason::PodsNotStarting, message));
    }
    let was_ready = is_true(&old.conditions, conditions::READY);
    if a.health.reachable && !was_ready {
        out.push((Reason::SiteReady, a.ready_message.clone()));
    } else if !a.health.reachable && (was_ready || first) {
        out.push((Reason::SiteUnreachable, format!("{}: {}", a.reason, a.message)));
    }
    if let Some(message) = turned_false(conditions::SITE_TAINTS_APPLIED) {
        out.push((Reason::SiteTaintsChanged, message));
    }
    if let Some((_, message)) = &a.credentials_error
        && (was(conditions::CREDENTIALS_READY) || first)
    {
        out.push((Reason::CredentialsMissing, message.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::site::assess::{Health, Probe, assess};

    fn t(s: &str) -> Time {
        Time(s.parse().expect("time"))
    }

    fn up() -> Assessment {
        assess(
            &Health::default(),
            &Probe::Ok {
                latency: Duration::from_millis(3),
                ping: None,
            },
            1,
        )
    }

    fn down() -> Assessment {
        assess(
            &Health::default(),
            &Probe::Failed {
                reason: "TransportError".into(),
                message: "refused".into(),
            },
            1,
        )
    }

    fn observed<'a>(
        a: &'a Assessment,
        cap: &'a BTreeMap<String, Quantity>,
        assumed: &'a [&'static str],
    ) -> Observed<'a> {
        Observed {
            assessment: a,
            capacity: cap,
            assumed,
            active: &[],
            observed_wait: Some(42),
            node_name: "offload-a",
            pod_start_timeout_seconds: 600,
            site_taints: None,
        }
    }

    #[test]
    fn pods_starting_turns_false_past_the_timeout_and_back() {
        assert!(pods_starting(0, 600).0);
        assert!(pods_starting(599, 600).0);
        let (ok, reason, message) = pods_starting(600, 600);
        assert!(!ok);
        assert_eq!(reason, "PodsNotStarting");
        assert_eq!(
            message,
            pods_starting(9000, 600).2,
            "a stable message: no rewrite every probe"
        );
    }

    #[test]
    fn status_is_rewritten_only_on_change_or_when_stale() {
        let old = OffloadSiteStatus {
            last_probe_time: Some(t("2026-01-01T00:00:00Z")),
            active_pods: Some(1),
            ..Default::default()
        };
        let mut new = old.clone();
        new.last_probe_time = Some(t("2026-01-01T00:00:10Z"));
        new.probe_latency_milliseconds = Some(3);
        assert!(!changed(&old, &new), "a probe alone does not write");
        new.last_probe_time = Some(t("2026-01-01T00:01:10Z"));
        assert!(
            changed(&old, &new),
            "but the probe time is refreshed every minute"
        );
        new.last_probe_time = Some(t("2026-01-01T00:00:10Z"));
        new.active_pods = Some(2);
        assert!(changed(&old, &new));
    }

    #[test]
    fn the_status_says_what_was_observed_and_when_capacity_is_only_assumed() {
        let cap: BTreeMap<String, Quantity> = [("cpu", "4"), ("memory", "8Gi"), ("pods", "10")]
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect();
        let a = up();
        let s = build(
            &OffloadSiteStatus::default(),
            Some(3),
            &observed(&a, &cap, &[]),
            &t("2026-01-01T00:00:00Z"),
        );
        assert!(is_true(&s.conditions, conditions::READY));
        assert!(is_true(&s.conditions, conditions::CAPACITY_KNOWN));
        assert_eq!(s.observed_queue_wait_seconds, Some(42));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.free.as_ref().and_then(|f| f.pods), Some(10));
        assert_eq!(s.probe_latency_milliseconds, Some(3));
        let assumed = build(
            &s,
            Some(3),
            &observed(&a, &cap, &["cpu", "memory"]),
            &t("2026-01-01T00:00:05Z"),
        );
        let c = assumed
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::CAPACITY_KNOWN)
            .expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "CapacityAssumed")
        );
        assert!(
            c.message.starts_with("cpu, memory neither declared"),
            "{}",
            c.message
        );
    }

    #[test]
    fn events_follow_transitions_only() {
        let cap = BTreeMap::new();
        let (a_up, a_down) = (up(), down());
        let now = t("2026-01-01T00:00:00Z");
        let first_down = build(
            &OffloadSiteStatus::default(),
            None,
            &observed(&a_down, &cap, &[]),
            &now,
        );
        let reasons = |v: Vec<(Reason, String)>| v.into_iter().map(|(r, _)| r).collect::<Vec<_>>();
        assert_eq!(
            reasons(transitions(&OffloadSiteStatus::default(), &first_down, &a_down)),
            [Reason::SiteUnreachable],
            "a new site that is down says so once"
        );
        assert!(
            transitions(&first_down, &first_down, &a_down).is_empty(),
            "still down: nothing new"
        );
        let back = build(&first_down, None, &observed(&a_up, &cap, &[]), &now);
        assert_eq!(
            reasons(transitions(&first_down, &back, &a_up)),
            [Reason::SiteReady]
        );
        assert!(transitions(&back, &back, &a_up).is_empty());
    }
}
