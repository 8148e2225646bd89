//! Condition types written into the status of the operator's objects.

/// OffloadSite and OffloadPolicy: the site passes its health check / the policy has an eligible
/// site.
pub const READY: &str = "Ready";
/// OffloadSite: every referenced Secret and ConfigMap key was found.
pub const CREDENTIALS_READY: &str = "CredentialsReady";
/// OffloadSite: accepted pods start within `podStartTimeoutSeconds`.
pub const PODS_STARTING: &str = "PodsStarting";
/// OffloadSite: cpu, memory and pods are declared or reported, not assumed.
pub const CAPACITY_KNOWN: &str = "CapacityKnown";
/// OffloadSite: the taints the site's ping asks for are applied as asked (False: a `NoExecute`
/// applied as `NoSchedule`, or invalid taints left out).
pub const SITE_TAINTS_APPLIED: &str = "SiteTaintsApplied";
/// RemoteJob: the current attempt's pod is bound to a site.
pub const SCHEDULED: &str = "Scheduled";
/// RemoteJob: the current attempt runs.
pub const RUNNING: &str = "Running";
/// RemoteJob: the job succeeded.
pub const COMPLETE: &str = "Complete";
/// RemoteJob: the job failed.
pub const FAILED: &str = "Failed";
/// RemoteJob: the job is suspended.
pub const SUSPENDED: &str = "Suspended";
/// RemoteJob: waiting for the RemoteJobs its `inputsFrom` names to succeed.
pub const WAITING_FOR_INPUTS: &str = "WaitingForInputs";
