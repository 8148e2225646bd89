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
    pub const ALL: [Reason; 24] = [
        Reason::SiteReady,
        Reason::SiteUnreachable,
        Reason::CredentialsMissing,
        Reason::Draining,
        Reason::PodsNotStarting,
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
    /// effort). The note is cut to 1000 characters, well within the API's limit.
    pub async fn publish(&self, reference: &ObjectReference, reason: Reason, note: &str, action: &str) {
        let event = Event {
            type_: if reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(error = %e, reason = reason.as_str(), "cannot publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn every_reason_is_listed_once_and_named_as_written() {
        let names: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert_eq!(r.as_str(), format!("{r:?}"));
        }
    }
}
