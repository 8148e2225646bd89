//! Prometheus metrics (`offload_` prefix), served on `/metrics`. Labels never carry a pod or any
//! other per-object name except the site, whose number is small.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// 1 when the site answers its health check, else 0.
    pub site_up: IntGaugeVec,
    /// Ping round-trip time.
    pub probe_latency: HistogramVec,
    /// Requests to sites by site, operation and result (`ok` or an error reason).
    pub site_requests: IntCounterVec,
    /// Reconciliations by controller and result.
    pub reconciles: IntCounterVec,
    /// Failed reconciliations by controller and error category (`transient`, `site_refused`,
    /// `invalid_spec`, `internal`).
    pub reconcile_errors: IntCounterVec,
    /// Placement decisions by policy, site and outcome (`scheduled`, `unschedulable`, `refused`).
    pub placements: IntCounterVec,
    /// Time to decide one pod's placement.
    pub placement_duration: prometheus::Histogram,
    /// Pods waiting for the offload scheduler.
    pub pending_pods: prometheus::IntGauge,
    /// Duration of one site's batched status request.
    pub status_sync_duration: HistogramVec,
    /// Time from creation at the site to the first running status.
    pub bind_to_running: HistogramVec,
    /// Active offloaded pods by site and phase (`Pending`, `Running`).
    pub pods: IntGaugeVec,
    /// Unix time of each site's last successful status sync (lag = now - this).
    pub last_status_sync: IntGaugeVec,
    /// RemoteJobs by phase.
    pub remotejobs: IntGaugeVec,
    /// Finished RemoteJob attempts by site and outcome.
    pub remotejob_attempts: IntCounterVec,
    /// Time from a RemoteJob's first attempt to its end, by result.
    pub remotejob_duration: HistogramVec,
    /// 1 while this replica leads (schedules, creates, deletes, syncs); 0 on a standby.
    pub leader: prometheus::IntGauge,
    /// Times this replica became the leader.
    pub leader_transitions: prometheus::IntCounter,
    /// Admission reviews answered by the webhook, by route and result.
    pub webhook_admissions: IntCounterVec,
    /// Time to answer one admission review, by route.
    pub webhook_duration: HistogramVec,
    /// Pods that opted in but were created while the webhook could not answer (leader only).
    pub webhook_missed: prometheus::IntCounter,
    /// Decisions of the Kueue AdmissionCheck `offload.dev/site-capacity`, by state.
    pub admission_checks: IntCounterVec,
    /// Bytes RemoteJob attempts staged in and out, by site and direction (`in`, `out`).
    pub data_staged_bytes: IntCounterVec,
    /// Time the stage-in step of RemoteJob attempts took, by site.
    pub stage_in_duration: HistogramVec,
    /// Placements the data-locality score changed (the site differs from the one the other
    /// scores alone chose), by chosen site.
    pub data_placements_changed: IntCounterVec,
    /// Jobs deleted at a site because their pod no longer exists in the cluster, by site.
    pub orphans_deleted: IntCounterVec,
}

impl Metrics {
    /// Registers the metrics. Fails only on a programming error (duplicate names).
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let site_up = IntGaugeVec::new(
            Opts::new(
                "offload_site_up",
                "1 when the site answers its health check, else 0",
            ),
            &["site"],
        )?;
        let probe_latency = HistogramVec::new(
            HistogramOpts::new(
                "offload_site_probe_latency_seconds",
                "Round-trip time of the site's ping",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["site"],
        )?;
        let site_requests = IntCounterVec::new(
            Opts::new(
                "offload_site_requests_total",
                "Requests to sites, by operation and result",
            ),
            &["site", "operation", "result"],
        )?;
        let reconciles = IntCounterVec::new(
            Opts::new(
                "offload_reconciles_total",
                "Reconciliations, by controller and result",
            ),
            &["controller", "result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "offload_reconcile_errors_total",
                "Failed reconciliations, by controller and error category",
            ),
            &["controller", "category"],
        )?;
        let placements = IntCounterVec::new(
            Opts::new(
                "offload_placements_total",
                "Placement decisions, by policy, site and outcome",
            ),
            &["policy", "site", "outcome"],
        )?;
        let placement_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "offload_placement_duration_seconds",
                "Time to decide one pod's placement",
            )
            .buckets(vec![0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05]),
        )?;
        let pending_pods =
            prometheus::IntGauge::new("offload_pending_pods", "Pods waiting for the offload scheduler")?;
        let status_sync_duration = HistogramVec::new(
            HistogramOpts::new(
                "offload_status_sync_duration_seconds",
                "One site's batched status request",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["site"],
        )?;
        let bind_to_running = HistogramVec::new(
            HistogramOpts::new(
                "offload_create_to_running_seconds",
                "Time from creation at the site to running",
            )
            .buckets(vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0]),
            &["site"],
        )?;
        let pods = IntGaugeVec::new(
            Opts::new("offload_pods", "Active offloaded pods by site and phase"),
            &["site", "phase"],
        )?;
        let last_status_sync = IntGaugeVec::new(
            Opts::new(
                "offload_status_sync_last_success_timestamp_seconds",
                "Last successful status sync per site",
            ),
            &["site"],
        )?;
        let remotejobs =
            IntGaugeVec::new(Opts::new("offload_remotejobs", "RemoteJobs by phase"), &["phase"])?;
        let remotejob_attempts = IntCounterVec::new(
            Opts::new(
                "offload_remotejob_attempts_total",
                "Finished RemoteJob attempts, by site and outcome",
            ),
            &["site", "outcome"],
        )?;
        let remotejob_duration = HistogramVec::new(
            HistogramOpts::new(
                "offload_remotejob_duration_seconds",
                "Time from a RemoteJob's first attempt to its end, by result",
            )
            .buckets(vec![
                1.0,
                10.0,
                60.0,
                300.0,
                900.0,
                3600.0,
                4.0 * 3600.0,
                12.0 * 3600.0,
                86400.0,
                7.0 * 86400.0,
            ]),
            &["outcome"],
        )?;
        // Without leader election the one replica leads from the start.
        let leader = prometheus::IntGauge::new(
            "offload_leader",
            "1 while this replica is the leader (it schedules, creates, deletes and syncs); 0 on a standby",
        )?;
        leader.set(1);
        let leader_transitions = prometheus::IntCounter::new(
            "offload_leader_transitions_total",
            "Times this replica acquired the leader lease",
        )?;
        let webhook_admissions = IntCounterVec::new(
            Opts::new(
                "offload_webhook_admissions_total",
                "Pod admission reviews answered by the webhook, by route and result",
            ),
            &["route", "result"],
        )?;
        let webhook_duration = HistogramVec::new(
            HistogramOpts::new(
                "offload_webhook_admission_duration_seconds",
                "Time to answer one pod admission review",
            )
            .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
            &["route"],
        )?;
        let webhook_missed = prometheus::IntCounter::new(
            "offload_webhook_missed_pods_total",
            "Pods that opted in to offloading but were created while the webhook could not answer",
        )?;
        let admission_checks = IntCounterVec::new(
            Opts::new(
                "offload_kueue_admission_checks_total",
                "Decisions of the Kueue AdmissionCheck offload.dev/site-capacity, by state",
            ),
            &["state"],
        )?;
        registry.register(Box::new(admission_checks.clone()))?;
        let data_staged_bytes = IntCounterVec::new(
            Opts::new(
                "offload_data_staged_bytes_total",
                "Bytes RemoteJob attempts staged in and out, by site and direction",
            ),
            &["site", "direction"],
        )?;
        let stage_in_duration = HistogramVec::new(
            HistogramOpts::new(
                "offload_stage_in_duration_seconds",
                "Time the stage-in step of RemoteJob attempts took, by site",
            )
            .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0]),
            &["site"],
        )?;
        let data_placements_changed = IntCounterVec::new(
            Opts::new(
                "offload_data_locality_placements_changed_total",
                "Placements the data-locality score moved to another site, by chosen site",
            ),
            &["site"],
        )?;
        let orphans_deleted = IntCounterVec::new(
            Opts::new(
                "offload_orphans_deleted_total",
                "Jobs deleted at a site because their pod no longer exists in the cluster, by site",
            ),
            &["site"],
        )?;
        registry.register(Box::new(orphans_deleted.clone()))?;
        registry.register(Box::new(data_staged_bytes.clone()))?;
        registry.register(Box::new(stage_in_duration.clone()))?;
        registry.register(Box::new(data_placements_changed.clone()))?;
        registry.register(Box::new(webhook_admissions.clone()))?;
        registry.register(Box::new(webhook_duration.clone()))?;
        registry.register(Box::new(webhook_missed.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(leader_transitions.clone()))?;
        registry.register(Box::new(remotejobs.clone()))?;
        registry.register(Box::new(remotejob_attempts.clone()))?;
        registry.register(Box::new(remotejob_duration.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(last_status_sync.clone()))?;
        registry.register(Box::new(status_sync_duration.clone()))?;
        registry.register(Box::new(bind_to_running.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(placement_duration.clone()))?;
        registry.register(Box::new(pending_pods.clone()))?;
        registry.register(Box::new(site_up.clone()))?;
        registry.register(Box::new(probe_latency.clone()))?;
        registry.register(Box::new(site_requests.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        Ok(Metrics {
            registry,
            site_up,
            probe_latency,
            site_requests,
            reconciles,
            reconcile_errors,
            placements,
            placement_duration,
            pending_pods,
            status_sync_duration,
            bind_to_running,
            pods,
            last_status_sync,
            remotejobs,
            remotejob_attempts,
            remotejob_duration,
            leader,
            leader_transitions,
            webhook_admissions,
            webhook_duration,
            webhook_missed,
            admission_checks,
            data_staged_bytes,
            stage_in_duration,
            data_placements_changed,
            orphans_deleted,
        })
    }

    /// Clears the series only the leader keeps current (site health, pods, RemoteJobs, pending
    /// pods), when this replica stops leading: a standby exports none, so sums over replicas
    /// count each pod once.
    pub fn clear_leader_series(&self) {
        self.site_up.reset();
        self.probe_latency.reset();
        self.pods.reset();
        self.last_status_sync.reset();
        self.remotejobs.reset();
        self.pending_pods.set(0);
    }

    /// Forgets a deleted site's series.
    pub fn forget_site(&self, site: &str) {
        let _ = self.site_up.remove_label_values(&[site]);
        let _ = self.probe_latency.remove_label_values(&[site]);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
