//! Filters, scores and strategies.

use std::{cmp::Reverse, collections::BTreeMap};

use super::{
    Decision, GpuOffer, PodNeeds, PolicyView, Ranked, Rejection, Rejections, SiteSnapshot, data, selector,
};
use crate::crd::policy::Strategy;

/// Chooses a site for the pod. `exclude` lists sites that failed this workload before (failover).
pub fn place(pod: &PodNeeds, policy: &PolicyView, sites: &[SiteSnapshot], exclude: &[String]) -> Decision {
    let mut decision = Decision {
        policy: policy.name.clone(),
        ..Decision::default()
    };
    let mut feasible: Vec<&SiteSnapshot> = Vec::new();
    for site in sites {
        let reasons = filters(pod, policy, site, exclude);
        if reasons.is_empty() {
            feasible.push(site);
        } else {
            decision.rejected.insert(site.name.clone(), Rejections(reasons));
        }
    }
    let mut ranking = score(pod, policy, &feasible);
    sort(&mut ranking, policy);
    decision.chosen = ranking.first().map(|(r, _)| r.site.clone());
    if !pod.data.is_empty() && policy.weights.data_locality > 0 {
        // The same ranking with the data term taken out: did the data decide?
        let mut without: Vec<(Ranked, &SiteSnapshot)> = ranking
            .iter()
            .map(|(r, s)| {
                let mut r = r.clone();
                r.score -= i64::from(policy.weights.data_locality) * r.data;
                (r, *s)
            })
            .collect();
        sort(&mut without, policy);
        let other = without.first().map(|(r, _)| r.site.clone());
        if other != decision.chosen {
            decision.chosen_without_data = other;
        }
    }
    if let Some((_, site)) = ranking.first() {
        decision.gpu_models = gpu_models(pod, policy, site);
    }
    decision.ranking = ranking.into_iter().map(|(r, _)| r).collect();
    decision
}

/// Orders scored sites by the policy's strategy, best first.
fn sort(ranking: &mut [(Ranked, &SiteSnapshot)], policy: &PolicyView) {
    match policy.strategy {
        Strategy::BestScore => {
            ranking.sort_by(|a, b| (Reverse(a.0.score), &a.0.site).cmp(&(Reverse(b.0.score), &b.0.site)))
        }
        Strategy::Spread => ranking.sort_by(|a, b| {
            (a.1.policy_pods(&policy.name), Reverse(a.0.score), &a.0.site).cmp(&(
                b.1.policy_pods(&policy.name),
                Reverse(b.0.score),
                &b.0.site,
            ))
        }),
        Strategy::OrderedFallback => {
            let position = |s: &str| policy.sites.iter().position(|n| n == s).unwrap_or(usize::MAX);
            ranking.sort_by(|a, b| (position(&a.0.site), &a.0.site).cmp(&(position(&b.0.site), &b.0.site)));
        }
    }
}

/// The first filter the site fails, or `None` when it can take the pod.
#[cfg(test)]
pub(crate) fn filter(
    pod: &PodNeeds,
    policy: &PolicyView,
    site: &SiteSnapshot,
    exclude: &[String],
) -> Option<Rejection> {
    filters(pod, policy, site, exclude).into_iter().next()
}

/// Every filter the site fails (empty when it can take the pod), so a user fixing one reason sees
/// the others at once. A site the pod may not be sent to at all (pinned elsewhere, excluded, not a
/// candidate of the policy) gets that one reason alone: the rest would be noise.
pub(crate) fn filters(
    pod: &PodNeeds,
    policy: &PolicyView,
    site: &SiteSnapshot,
    exclude: &[String],
) -> Vec<Rejection> {
    let req = &policy.requirements;
    if pod.pinned_site.as_ref().is_some_and(|p| p != &site.name) {
        return vec![Rejection::NotPinned];
    }
    if exclude.contains(&site.name) {
        return vec![Rejection::Excluded];
    }
    // A pinned site skips the policy's candidate list, never its requirements.
    if pod.pinned_site.is_none() {
        let listed = policy.sites.is_empty() || policy.sites.contains(&site.name);
        let selected = policy
            .site_selector
            .as_ref()
            .is_none_or(|s| selector::matches(s, &site.labels));
        if !listed || !selected {
            return vec![Rejection::NotSelectedByPolicy];
        }
    }
    let mut out = Vec::new();
    if !site.ready {
        out.push(Rejection::NotReady);
    }
    if site.cordoned {
        out.push(Rejection::Cordoned);
    }
    if site.not_starting {
        out.push(Rejection::PodsNotStarting);
    }
    if !selector::matches(&site.namespace_selector, &pod.namespace_labels) {
        out.push(Rejection::NamespaceNotAllowed);
    }
    if !req.site_kinds.is_empty() && !req.site_kinds.contains(&site.kind) {
        out.push(Rejection::KindNotAllowed);
    }
    if !req.architectures.is_empty() && !req.architectures.contains(&site.architecture) {
        out.push(Rejection::ArchitectureNotAllowed);
    }
    if let Some(max) = req.max_queue_wait_seconds
        && site.expected_wait_seconds > i64::from(max)
    {
        out.push(Rejection::QueueTooLong {
            expected: site.expected_wait_seconds,
            max: i64::from(max),
        });
    }
    if let Some(o) = data::unreachable(site, &pod.data) {
        out.push(Rejection::DataUnreachable {
            endpoint: o.endpoint.clone(),
            bucket: o.bucket.clone(),
        });
    }
    if let Some(limit) = site.max_concurrent_pods
        && site.active_pods >= limit
    {
        out.push(Rejection::ConcurrencyLimit { limit });
    }
    let need = &pod.requests;
    let short = |resource: &str, needed: i64, free: i64| {
        (needed > free).then(|| Rejection::Insufficient {
            resource: resource.into(),
            needed,
            free,
        })
    };
    out.extend(short("pods", need.pods.max(1), site.free.pods));
    out.extend(short("cpu", need.cpu_milli, site.free.cpu_milli));
    out.extend(short("memory", need.memory_bytes, site.free.memory_bytes));
    for (resource, &count) in need.gpus.iter().filter(|(_, c)| **c > 0) {
        let offers: Vec<_> = site.gpus.iter().filter(|g| &g.resource == resource).collect();
        let allowed: Vec<_> = offers
            .iter()
            .filter(|g| {
                req.gpu_models.is_empty() || req.gpu_models.iter().any(|m| m.eq_ignore_ascii_case(&g.model))
            })
            .collect();
        if allowed.is_empty() {
            out.push(Rejection::NoAllowedGpuModel {
                resource: resource.clone(),
            });
            continue;
        }
        if let Some(min) = policy.min_gpu_memory_bytes
            && !allowed.iter().any(|g| g.memory_bytes.is_some_and(|m| m >= min))
        {
            out.push(Rejection::GpuMemoryTooSmall {
                resource: resource.clone(),
            });
        }
        out.extend(short(
            resource,
            count,
            site.free.gpus.get(resource).copied().unwrap_or(0),
        ));
        // Counted per model too: free GPUs of a model the policy does not allow do not help.
        let usable = usable(policy, &allowed.iter().map(|g| **g).collect::<Vec<_>>());
        let best = usable.iter().map(|g| g.free).max().unwrap_or(0);
        if best < count && site.free.gpus.get(resource).copied().unwrap_or(0) >= count {
            let models: Vec<&str> = usable.iter().map(|g| g.model.as_str()).collect();
            out.push(Rejection::Insufficient {
                resource: format!("{resource} ({})", models.join(", ")),
                needed: count,
                free: best,
            });
        }
    }
    out
}

/// The offers of one resource a policy may use: an allowed model with enough memory per GPU.
fn usable<'a>(policy: &PolicyView, allowed: &[&'a GpuOffer]) -> Vec<&'a GpuOffer> {
    allowed
        .iter()
        .filter(|g| {
            policy
                .min_gpu_memory_bytes
                .is_none_or(|min| g.memory_bytes.is_some_and(|m| m >= min))
        })
        .copied()
        .collect()
}

/// For each GPU resource the pod requests, the model it uses at `site`: the usable model with the
/// fewest free GPUs that still fit it (least waste), ties by name.
pub fn gpu_models(pod: &PodNeeds, policy: &PolicyView, site: &SiteSnapshot) -> BTreeMap<String, String> {
    let req = &policy.requirements;
    let mut out = BTreeMap::new();
    for (resource, &count) in pod.requests.gpus.iter().filter(|(_, c)| **c > 0) {
        let allowed: Vec<&GpuOffer> = site
            .gpus
            .iter()
            .filter(|g| &g.resource == resource)
            .filter(|g| {
                req.gpu_models.is_empty() || req.gpu_models.iter().any(|m| m.eq_ignore_ascii_case(&g.model))
            })
            .collect();
        let best = usable(policy, &allowed)
            .into_iter()
            .filter(|g| g.free >= count)
            .min_by(|a, b| (a.free, &a.model).cmp(&(b.free, &b.model)));
        if let Some(g) = best {
            out.insert(resource.clone(), g.model.clone());
        }
    }
    out
}

/// Scores of the feasible sites, in input order.
fn score<'a>(
    pod: &PodNeeds,
    policy: &PolicyView,
    sites: &[&'a SiteSnapshot],
) -> Vec<(Ranked, &'a SiteSnapshot)> {
    let lower_is_better = |value: i64, min: i64, max: i64| {
        if max == min {
            1000
        } else {
            (max - value) * 1000 / (max - min)
        }
    };
    let waits: Vec<i64> = sites.iter().map(|s| s.expected_wait_seconds).collect();
    let costs: Vec<i64> = sites.iter().map(|s| s.relative_cost).collect();
    let (wmin, wmax) = (
        waits.iter().copied().min().unwrap_or(0),
        waits.iter().copied().max().unwrap_or(0),
    );
    let (cmin, cmax) = (
        costs.iter().copied().min().unwrap_or(0),
        costs.iter().copied().max().unwrap_or(0),
    );
    let stage: Vec<i64> = sites
        .iter()
        .map(|s| data::stage_in_seconds(&s.data, &pod.data))
        .collect();
    let (smin, smax) = (
        stage.iter().copied().min().unwrap_or(0),
        stage.iter().copied().max().unwrap_or(0),
    );
    let w = &policy.weights;
    sites
        .iter()
        .zip(stage)
        .map(|(s, stage_in_seconds)| {
            let queue = lower_is_better(s.expected_wait_seconds, wmin, wmax);
            let data = lower_is_better(stage_in_seconds, smin, smax);
            let cost = lower_is_better(s.relative_cost, cmin, cmax);
            let free_capacity = free_after(pod, s);
            let gpu_fit = gpu_fit(pod, s);
            let score = i64::from(w.queue_time) * queue
                + i64::from(w.cost) * cost
                + i64::from(w.free_capacity) * free_capacity
                + i64::from(w.gpu_fit) * gpu_fit
                + i64::from(w.data_locality) * data;
            (
                Ranked {
                    site: s.name.clone(),
                    score,
                    queue,
                    cost,
                    free_capacity,
                    gpu_fit,
                    expected_wait_seconds: s.expected_wait_seconds,
                    data,
                    stage_in_seconds,
                },
                *s,
            )
        })
        .collect()
}

/// Share of the site's CPU and memory still free after placing the pod, 0..=1000.
fn free_after(pod: &PodNeeds, s: &SiteSnapshot) -> i64 {
    let share =
        |free: i64, need: i64, cap: i64| (cap > 0).then(|| ((free - need).max(0) * 1000 / cap).min(1000));
    let parts: Vec<i64> = [
        share(s.free.cpu_milli, pod.requests.cpu_milli, s.capacity.cpu_milli),
        share(
            s.free.memory_bytes,
            pod.requests.memory_bytes,
            s.capacity.memory_bytes,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        0
    } else {
        parts.iter().sum::<i64>() / parts.len() as i64
    }
}

/// GPU pods: 1000 when they take all free GPUs of their kinds (least waste), less the more is
/// left idle. Pods without GPUs: 1000 on sites without GPUs, 0 elsewhere (keep GPU sites for GPU work).
fn gpu_fit(pod: &PodNeeds, s: &SiteSnapshot) -> i64 {
    let wanted: Vec<(&String, i64)> = pod
        .requests
        .gpus
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(r, c)| (r, *c))
        .collect();
    if wanted.is_empty() {
        let has_gpus = s.capacity.gpus.values().any(|c| *c > 0);
        return if has_gpus { 0 } else { 1000 };
    }
    let need: i64 = wanted.iter().map(|(_, c)| c).sum();
    let free: i64 = wanted
        .iter()
        .map(|(r, _)| s.free.gpus.get(*r).copied().unwrap_or(0))
        .sum();
    if free <= 0 {
        0
    } else {
        (need * 1000 / free).min(1000)
    }
}
