//! The one Event publisher and the closed set of Event reasons the operator emits.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

/// Every Event reason the operator emits (docs/operations.md lists them), each with its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // OffloadSite
    /// The site passes its health check again.
    SiteReady,
    /// The site fails its health check past the threshold.
    SiteUnreachable,
    /// A referenced Secret or ConfigMap key is missing.
    CredentialsMissing,
    /// A deleted site's pods are being deleted first.
    Draining,
    /// Accepted pods have not started within `podStartTimeoutSeconds`.
    PodsNotStarting,
    /// The site asked for taints that were not applied as asked (NoExecute applied as
    /// NoSchedule, invalid or duplicate taints left out).
    SiteTaintsChanged,
    // Pods
    /// Bound to a site's virtual Node by the offload scheduler.
    Scheduled,
    /// No site can take the pod now.
    FailedScheduling,
    /// Created at the site.
    Submitted,
    /// A delete at the site failed and is retried.
    DeleteRetrying,
    /// The pod's namespace may not use its site: nothing was sent.
    NamespaceNotAllowed,
    /// The site refused the pod.
    OffloadCreateFailed,
    /// The site no longer knows the pod.
    OffloadLost,
    /// A service-account token sent to the site expires while the pod runs.
    TokenExpiring,
    /// The pod opted in to offloading but was created while the webhook could not answer.
    NotOffloaded,
    // RemoteJob
    /// An attempt pod could not be created.
    FailedCreate,
    /// An attempt pod was created.
    AttemptCreated,
    /// An attempt succeeded.
    AttemptSucceeded,
    /// An attempt failed.
    AttemptFailed,
    /// The job was suspended.
    Suspended,
    /// The job was resumed.
    Resumed,
    /// The job waits for the RemoteJobs its `inputsFrom` names.
    WaitingForInputs,
    /// The job succeeded.
    Completed,
    /// The job ran past its deadline.
    DeadlineExceeded,
    /// The job failed.
    Failed,
}

impl Reason {
    /// Every reason (for docs and tests).
    pub const ALL: [Reason; 25] = [
        Reason::SiteReady,
        Reason::SiteUnreachable,
        Reason::CredentialsMissing,
        Reason::Draining,
        Reason::PodsNotStarting,
        Reason::SiteTaintsChanged,
        Reason::Scheduled,
        Reason::FailedScheduling,
        Reason::Submitted,
        Reason::DeleteRetrying,
        Reason::NamespaceNotAllowed,
        Reason::OffloadCreateFailed,
        Reason::OffloadLost,
        Reason::TokenExpiring,
        Reason::NotOffloaded,
        Reason::FailedCreate,
        Reason::AttemptCreated,
        Reason::AttemptSucceeded,
        Reason::AttemptFailed,
        Reason::Suspended,
        Reason::Resumed,
        Reason::WaitingForInputs,
        Reason::Completed,
        Reason::DeadlineExceeded,
        Reason::Failed,
    ];

    /// The reason as written in the Event (and, for pods that fail, in `status.reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SiteReady => "SiteReady",
            Reason::SiteUnreachable => "SiteUnreachable",
            Reason::CredentialsMissing => "CredentialsMissing",
            Reason::Draining => "Draining",
            Reason::PodsNotStarting => "PodsNotStarting",
            Reason::SiteTaintsChanged => "SiteTaintsChanged",
            Reason::Scheduled => "Scheduled",
            Reason::FailedScheduling => "FailedScheduling",
            Reason::Submitted => "Submitted",
            Reason::DeleteRetrying => "DeleteRetrying",
            Reason::NamespaceNotAllowed => "NamespaceNotAllowed",
            Reason::OffloadCreateFailed => "OffloadCreateFailed",
            Reason::OffloadLost => "OffloadLost",
            Reason::TokenExpiring => "TokenExpiring",
            Reason::NotOffloaded => "NotOffloaded",
            Reason::FailedCreate => "FailedCreate",
            Reason::AttemptCreated => "AttemptCreated",
            Reason::AttemptSucceeded => "AttemptSucceeded",
            Reason::AttemptFailed => "AttemptFailed",
            Reason::Suspended => "Suspended",
            Reason::Resumed => "Resumed",
            Reason::WaitingForInputs => "WaitingForInputs",
            Reason::Completed => "Completed",
            Reason::DeadlineExceeded => "DeadlineExceeded",
            Reason::Failed => "Failed",
        }
    }

    /// Warning for what needs someone's attention, Normal otherwise.
    pub fn is_warning(self) -> bool {
        !matches!(
            self,
            Reason::SiteReady
                | Reason::Draining
                | Reason::Scheduled
                | Reason::Submitted
                | Reason::AttemptCreated
                | Reason::AttemptSucceeded
                | Reason::Suspended
                | Reason::Resumed
                | Reason::WaitingForInputs
                | Reason::Completed
        )
    }
}

/// The operator's one Event publisher (kube's recorder deduplicates in its cache, so it is shared).
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    /// A publisher reporting as `offload-operator`.
    pub fn new(client: Client) -> Self {
        Events {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "offload-operator".into(),
                    instance: None,
                },
            ),
        }
    }

    /// Publishes an Event about `reference`; a failure is logged, never fatal (Events are best
    /// effort). The note is cut to [`NOTE_MAX_BYTES`] bytes at a character boundary (the API's
    /// limit is in bytes: 1000 characters of a multibyte script exceed it).
    pub async fn publish(&self, reference: &ObjectReference, reason: Reason, note: &str, action: &str) {
        let event = Event {
            type_: if reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(cut(note, NOTE_MAX_BYTES).into()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(error = %e, reason = reason.as_str(), "cannot publish an Event");
        }
    }
}

/// Longest Event note written, in bytes (the API refuses notes over 1 KiB).
pub const NOTE_MAX_BYTES: usize = 1000;

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::{Reason, cut};

    #[test]
    fn notes_are_cut_in_bytes_at_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("abcdef", 3), "abc");
        // Three bytes each: 400 characters are 1200 bytes.
        let long = "日".repeat(400);
        let c = cut(&long, 1000);
        assert!(c.len() <= 1000 && c.len() > 996, "{}", c.len());
        assert!(c.chars().all(|ch| ch == '日'));
    }

    #[test]
    fn every_reason_is_listed_once_and_named_as_written() {
        let names: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert_eq!(r.as_str(), format!("{r:?}"));
        }
    }
}
