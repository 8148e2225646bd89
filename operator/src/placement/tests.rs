//! Table-driven tests of every filter, score and strategy, and property tests of the engine.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use proptest::{prelude::*, strategy::Strategy as _};

use super::{engine::filter, *};
use crate::crd::{
    Architecture, SiteKind,
    policy::{Requirements, Strategy, Weights},
};

const GI: i64 = 1 << 30;

fn res(cpu: i64, mem_gi: i64, pods: i64, gpus: &[(&str, i64)]) -> Resources {
    Resources {
        cpu_milli: cpu * 1000,
        memory_bytes: mem_gi * GI,
        pods,
        gpus: gpus.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

fn site(name: &str) -> SiteSnapshot {
    SiteSnapshot {
        name: name.into(),
        labels: BTreeMap::new(),
        kind: SiteKind::Hpc,
        architecture: Architecture::Amd64,
        ready: true,
        cordoned: false,
        namespace_selector: LabelSelector::default(),
        relative_cost: 100,
        max_concurrent_pods: None,
        active_pods: 0,
        pods_by_policy: BTreeMap::new(),
        capacity: res(100, 400, 100, &[]),
        free: res(100, 400, 100, &[]),
        gpus: Vec::new(),
        expected_wait_seconds: 0,
        not_starting: false,
        data: Default::default(),
    }
}

fn gpu_site(name: &str, model: &str, count: i64, mem_gi: i64) -> SiteSnapshot {
    let mut s = site(name);
    s.capacity.gpus.insert("nvidia.com/gpu".into(), count);
    s.free.gpus.insert("nvidia.com/gpu".into(), count);
    s.gpus = vec![GpuOffer {
        resource: "nvidia.com/gpu".into(),
        model: model.into(),
        memory_bytes: Some(mem_gi * GI),
        free: count,
    }];
    s
}

fn pod(cpu: i64, mem_gi: i64, gpus: i64) -> PodNeeds {
    let g: &[(&str, i64)] = if gpus > 0 {
        &[("nvidia.com/gpu", gpus)]
    } else {
        &[]
    };
    PodNeeds {
        namespace: "team".into(),
        requests: res(cpu, mem_gi, 1, g),
        ..Default::default()
    }
}

fn policy() -> PolicyView {
    PolicyView {
        name: "p".into(),
        ..Default::default()
    }
}

/// Every filter, each in isolation: (what is changed, the rejection expected).
#[test]
fn each_filter_rejects_with_its_reason() {
    type Case = (
        &'static str,
        Box<dyn Fn(&mut PodNeeds, &mut PolicyView, &mut SiteSnapshot)>,
        Rejection,
    );
    let cases: Vec<Case> = vec![
        (
            "pinned elsewhere",
            Box::new(|p, _, _| p.pinned_site = Some("other".into())),
            Rejection::NotPinned,
        ),
        (
            "not in the policy's list",
            Box::new(|_, pol, _| pol.sites = vec!["other".into()]),
            Rejection::NotSelectedByPolicy,
        ),
        (
            "not matched by the policy's selector",
            Box::new(|_, pol, _| {
                pol.site_selector = Some(LabelSelector {
                    match_labels: Some([("region".to_string(), "eu".to_string())].into()),
                    ..Default::default()
                })
            }),
            Rejection::NotSelectedByPolicy,
        ),
        (
            "not ready",
            Box::new(|_, _, s| s.ready = false),
            Rejection::NotReady,
        ),
        (
            "cordoned",
            Box::new(|_, _, s| s.cordoned = true),
            Rejection::Cordoned,
        ),
        (
            "namespace not allowed",
            Box::new(|_, _, s| {
                s.namespace_selector = LabelSelector {
                    match_labels: Some([("hpc".to_string(), "yes".to_string())].into()),
                    ..Default::default()
                }
            }),
            Rejection::NamespaceNotAllowed,
        ),
        (
            "kind",
            Box::new(|_, pol, _| pol.requirements.site_kinds = vec![SiteKind::Cloud]),
            Rejection::KindNotAllowed,
        ),
        (
            "architecture",
            Box::new(|_, pol, _| pol.requirements.architectures = vec![Architecture::Arm64]),
            Rejection::ArchitectureNotAllowed,
        ),
        (
            "queue too long",
            Box::new(|_, pol, s| {
                s.expected_wait_seconds = 7200;
                pol.requirements.max_queue_wait_seconds = Some(3600);
            }),
            Rejection::QueueTooLong {
                expected: 7200,
                max: 3600,
            },
        ),
        (
            "concurrency limit",
            Box::new(|_, _, s| {
                s.max_concurrent_pods = Some(5);
                s.active_pods = 5;
            }),
            Rejection::ConcurrencyLimit { limit: 5 },
        ),
        (
            "no pod slot",
            Box::new(|_, _, s| s.free.pods = 0),
            Rejection::Insufficient {
                resource: "pods".into(),
                needed: 1,
                free: 0,
            },
        ),
        (
            "cpu",
            Box::new(|p, _, _| p.requests.cpu_milli = 200_000),
            Rejection::Insufficient {
                resource: "cpu".into(),
                needed: 200_000,
                free: 100_000,
            },
        ),
        (
            "memory",
            Box::new(|p, _, _| p.requests.memory_bytes = 500 * GI),
            Rejection::Insufficient {
                resource: "memory".into(),
                needed: 500 * GI,
                free: 400 * GI,
            },
        ),
        (
            "no GPUs at all",
            Box::new(|p, _, _| {
                p.requests.gpus.insert("nvidia.com/gpu".into(), 1);
            }),
            Rejection::NoAllowedGpuModel {
                resource: "nvidia.com/gpu".into(),
            },
        ),
        (
            "GPU model not allowed",
            Box::new(|p, pol, s| {
                *s = gpu_site("s", "L4", 8, 24);
                p.requests.gpus.insert("nvidia.com/gpu".into(), 1);
                pol.requirements.gpu_models = vec!["A100".into()];
            }),
            Rejection::NoAllowedGpuModel {
                resource: "nvidia.com/gpu".into(),
            },
        ),
        (
            "GPU memory too small",
            Box::new(|p, pol, s| {
                *s = gpu_site("s", "A100", 8, 40);
                p.requests.gpus.insert("nvidia.com/gpu".into(), 1);
                pol.min_gpu_memory_bytes = Some(80 * GI);
            }),
            Rejection::GpuMemoryTooSmall {
                resource: "nvidia.com/gpu".into(),
            },
        ),
        (
            "not enough GPUs",
            Box::new(|p, _, s| {
                *s = gpu_site("s", "A100", 8, 80);
                p.requests.gpus.insert("nvidia.com/gpu".into(), 16);
            }),
            Rejection::Insufficient {
                resource: "nvidia.com/gpu".into(),
                needed: 16,
                free: 8,
            },
        ),
    ];
    for (what, change, expected) in cases {
        let (mut p, mut pol, mut s) = (pod(1, 1, 0), policy(), site("s"));
        assert_eq!(filter(&p, &pol, &s, &[]), None, "{what}: the baseline fits");
        change(&mut p, &mut pol, &mut s);
        assert_eq!(filter(&p, &pol, &s, &[]), Some(expected.clone()), "{what}");
        let d = place(&p, &pol, std::slice::from_ref(&s), &[]);
        assert_eq!(d.chosen, None, "{what}");
        assert_eq!(
            d.rejected.get("s").and_then(Rejections::first),
            Some(&expected),
            "{what}"
        );
    }
    assert_eq!(
        filter(&pod(1, 1, 0), &policy(), &site("s"), &["s".into()]),
        Some(Rejection::Excluded)
    );
}

#[test]
fn a_pinned_site_bypasses_the_candidate_list_not_the_requirements() {
    let mut p = pod(1, 1, 0);
    p.pinned_site = Some("s".into());
    let mut pol = policy();
    pol.sites = vec!["other".into()];
    assert_eq!(filter(&p, &pol, &site("s"), &[]), None);
    pol.requirements.site_kinds = vec![SiteKind::Cloud];
    assert_eq!(filter(&p, &pol, &site("s"), &[]), Some(Rejection::KindNotAllowed));
}

#[test]
fn scores_are_normalised_and_weighted() {
    let mut fast = site("fast");
    fast.expected_wait_seconds = 60;
    fast.relative_cost = 300;
    let mut cheap = site("cheap");
    cheap.expected_wait_seconds = 3600;
    cheap.relative_cost = 10;
    let sites = [fast, cheap];
    let only = |q: i32, c: i32| PolicyView {
        weights: Weights {
            queue_time: q,
            cost: c,
            free_capacity: 0,
            gpu_fit: 0,
            data_locality: 0,
        },
        ..policy()
    };
    let d = place(&pod(1, 1, 0), &only(100, 0), &sites, &[]);
    assert_eq!(d.chosen.as_deref(), Some("fast"));
    assert_eq!((d.ranking[0].queue, d.ranking[1].queue), (1000, 0));
    let d = place(&pod(1, 1, 0), &only(0, 100), &sites, &[]);
    assert_eq!(d.chosen.as_deref(), Some("cheap"));
    assert_eq!(d.ranking[0].cost, 1000);
    assert_eq!(d.ranking[0].score, 100 * 1000);
}

#[test]
fn free_capacity_prefers_the_emptier_site() {
    let mut busy = site("busy");
    busy.free = res(10, 40, 10, &[]);
    let idle = site("idle");
    let pol = PolicyView {
        weights: Weights {
            queue_time: 0,
            cost: 0,
            free_capacity: 100,
            gpu_fit: 0,
            data_locality: 0,
        },
        ..policy()
    };
    let d = place(&pod(2, 4, 0), &pol, &[busy, idle], &[]);
    assert_eq!(d.chosen.as_deref(), Some("idle"));
    assert_eq!(
        d.ranking[0].free_capacity, 985,
        "(100-2)/100 cpu and (400-4)/400 memory"
    );
}

#[test]
fn gpu_fit_prefers_least_waste_and_keeps_gpu_sites_for_gpu_work() {
    let big = gpu_site("big", "A100", 64, 80);
    let small = gpu_site("small", "A100", 4, 80);
    let cpu = site("cpu");
    let pol = PolicyView {
        weights: Weights {
            queue_time: 0,
            cost: 0,
            free_capacity: 0,
            gpu_fit: 100,
            data_locality: 0,
        },
        ..policy()
    };
    let d = place(
        &pod(1, 1, 4),
        &pol,
        &[big.clone(), small.clone(), cpu.clone()],
        &[],
    );
    assert_eq!(
        d.chosen.as_deref(),
        Some("small"),
        "4 of 4 free GPUs used: no waste"
    );
    assert_eq!(
        d.rejected.get("cpu").and_then(Rejections::first),
        Some(&Rejection::NoAllowedGpuModel {
            resource: "nvidia.com/gpu".into()
        })
    );
    let d = place(&pod(1, 1, 0), &pol, &[big, small, cpu], &[]);
    assert_eq!(d.chosen.as_deref(), Some("cpu"), "CPU work avoids GPU sites");
}

#[test]
fn ties_break_by_site_name() {
    let d = place(
        &pod(1, 1, 0),
        &policy(),
        &[site("zeta"), site("alpha"), site("mid")],
        &[],
    );
    assert_eq!(d.chosen.as_deref(), Some("alpha"));
    let names: Vec<&str> = d.ranking.iter().map(|r| r.site.as_str()).collect();
    assert_eq!(names, ["alpha", "mid", "zeta"]);
}

#[test]
fn spread_prefers_the_site_with_fewest_pods_of_the_policy() {
    let pol = PolicyView {
        strategy: Strategy::Spread,
        ..policy()
    };
    let mut a = site("a");
    a.pods_by_policy.insert(pol.name.clone(), 5);
    a.relative_cost = 1;
    let b = site("b");
    assert_eq!(
        place(&pod(1, 1, 0), &pol, &[a, b], &[]).chosen.as_deref(),
        Some("b")
    );
}

#[test]
fn a_site_at_half_the_cost_is_written_directly_and_wins_on_cost() {
    assert_eq!(cost_milli(0.5), 500);
    assert_eq!(cost_milli(1.0), 1000);
    assert_eq!(cost_milli(-3.0), 0);
    assert_eq!(cost_milli(f64::NAN), 0);
    let mut half = site("half");
    half.relative_cost = cost_milli(0.5);
    let mut full = site("full");
    full.relative_cost = cost_milli(1.0);
    let only_cost = PolicyView {
        weights: crate::crd::policy::Weights {
            queue_time: 0,
            cost: 100,
            free_capacity: 0,
            gpu_fit: 0,
            data_locality: 0,
        },
        ..policy()
    };
    let d = place(&pod(1, 1, 0), &only_cost, &[full, half], &[]);
    assert_eq!(d.chosen.as_deref(), Some("half"), "{d:?}");
}

#[test]
fn a_rejected_site_lists_every_failing_filter() {
    let mut s = site("s");
    s.ready = false;
    s.free.cpu_milli = 500;
    let mut pol = policy();
    pol.requirements.max_queue_wait_seconds = Some(10);
    s.expected_wait_seconds = 600;
    let d = place(&pod(2, 1, 0), &pol, std::slice::from_ref(&s), &[]);
    let reasons = &d.rejected["s"].0;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0], Rejection::NotReady);
    assert!(
        matches!(reasons[1], Rejection::QueueTooLong { .. }),
        "{reasons:?}"
    );
    assert!(
        matches!(&reasons[2], Rejection::Insufficient { resource, .. } if resource == "cpu"),
        "{reasons:?}"
    );
    let text = d.rejection_summary();
    assert!(
        text.starts_with("s: site not ready, expected queue wait 600s exceeds 10s, insufficient cpu"),
        "{text}"
    );
    // A site the pod may not go to at all says only that.
    let d = place(&pod(2, 1, 0), &pol, std::slice::from_ref(&s), &["s".into()]);
    assert_eq!(d.rejected["s"].0, vec![Rejection::Excluded]);
}

#[test]
fn a_site_whose_accepted_pods_do_not_start_gets_no_new_pods() {
    let mut hole = site("hole");
    hole.relative_cost = 1;
    hole.not_starting = true;
    let d = place(&pod(1, 1, 0), &policy(), &[hole.clone(), site("other")], &[]);
    assert_eq!(d.chosen.as_deref(), Some("other"));
    assert_eq!(d.rejected["hole"].0, vec![Rejection::PodsNotStarting]);
    // Pods start again there: it is a candidate again, and the cheaper one.
    hole.not_starting = false;
    let d = place(&pod(1, 1, 0), &policy(), &[hole, site("other")], &[]);
    assert_eq!(d.chosen.as_deref(), Some("hole"));
}

#[test]
fn only_sites_with_an_allowed_gpu_model_suit_a_gpu_policy() {
    let mut pol = policy();
    pol.requirements.gpu_models = vec!["a100".into()];
    assert!(offers_allowed_gpu(&pol, &gpu_site("hpc", "A100", 8, 80)));
    assert!(!offers_allowed_gpu(&pol, &gpu_site("cloud", "T4", 8, 16)));
    assert!(!offers_allowed_gpu(&pol, &site("cpu")));
    pol.min_gpu_memory_bytes = Some(100 << 30);
    assert!(
        !offers_allowed_gpu(&pol, &gpu_site("hpc", "A100", 8, 80)),
        "80 GiB < 100 GiB"
    );
}

#[test]
fn spread_ignores_other_policies_pods() {
    let pol = PolicyView {
        strategy: Strategy::Spread,
        ..policy()
    };
    // Site a is full of another policy's pods and has fewer of ours: spread picks a.
    let mut a = site("a");
    a.pods_by_policy.insert("batch".into(), 50);
    a.pods_by_policy.insert(pol.name.clone(), 1);
    a.active_pods = 51;
    let mut b = site("b");
    b.pods_by_policy.insert(pol.name.clone(), 2);
    b.active_pods = 2;
    let d = place(&pod(1, 1, 0), &pol, &[a, b], &[]);
    assert_eq!(d.chosen.as_deref(), Some("a"), "{d:?}");
}

#[test]
fn ordered_fallback_takes_the_first_feasible_site_in_order() {
    let mut first = site("first");
    first.free.pods = 0;
    let mut cheapest = site("cheapest");
    cheapest.relative_cost = 1;
    let pol = PolicyView {
        strategy: Strategy::OrderedFallback,
        sites: vec!["first".into(), "second".into(), "cheapest".into()],
        ..policy()
    };
    let d = place(&pod(1, 1, 0), &pol, &[first, site("second"), cheapest], &[]);
    assert_eq!(
        d.chosen.as_deref(),
        Some("second"),
        "first is full; order beats cost"
    );
    assert!(matches!(
        d.rejected.get("first").and_then(Rejections::first),
        Some(Rejection::Insufficient { .. })
    ));
    assert_eq!(
        d.ranking.iter().map(|r| r.site.as_str()).collect::<Vec<_>>(),
        ["second", "cheapest"]
    );
}

#[test]
fn the_explanation_names_every_rejected_site() {
    let mut down = site("down");
    down.ready = false;
    let mut gpu = gpu_site("gpu", "A100", 8, 80);
    gpu.cordoned = true;
    let d = place(&pod(1, 1, 16), &policy(), &[down, gpu, site("cpu")], &[]);
    assert_eq!(d.chosen, None);
    let summary = d.rejection_summary();
    assert_eq!(
        summary,
        "cpu: no allowed GPU model for nvidia.com/gpu; \
         down: site not ready, no allowed GPU model for nvidia.com/gpu; \
         gpu: site cordoned, insufficient nvidia.com/gpu: needs 16, 8 free"
    );
}

// ---------- property tests ----------

fn arb_site(i: usize) -> impl proptest::strategy::Strategy<Value = SiteSnapshot> {
    (
        any::<bool>(),
        any::<bool>(),
        0i64..500,
        0i64..8,
        0i64..64,
        0i64..20,
        0i64..7200,
        1i64..300,
        prop::option::of(1i64..10),
    )
        .prop_map(
            move |(ready, cordoned, cost, cpu, mem, gpus, wait, pods, limit)| {
                let mut s = if gpus > 0 {
                    gpu_site(&format!("site-{i}"), "A100", gpus, 80)
                } else {
                    site(&format!("site-{i}"))
                };
                s.ready = ready || i.is_multiple_of(2);
                s.cordoned = cordoned && i.is_multiple_of(3);
                s.relative_cost = cost;
                s.capacity = res(cpu * 4, mem * 4, pods, &[("nvidia.com/gpu", gpus)]);
                s.free = res(cpu, mem, pods, &[("nvidia.com/gpu", gpus)]);
                s.expected_wait_seconds = wait;
                s.max_concurrent_pods = limit;
                s
            },
        )
}

fn arb_sites() -> impl proptest::strategy::Strategy<Value = Vec<SiteSnapshot>> {
    (1usize..8).prop_flat_map(|n| (0..n).map(arb_site).collect::<Vec<_>>())
}

fn arb_pod() -> impl proptest::strategy::Strategy<Value = PodNeeds> {
    (0i64..4, 0i64..16, 0i64..4).prop_map(|(c, m, g)| pod(c, m, g))
}

fn arb_policy() -> impl proptest::strategy::Strategy<Value = PolicyView> {
    (
        0i32..100,
        0i32..100,
        0i32..100,
        0i32..100,
        0usize..3,
        prop::option::of(0i32..7200),
    )
        .prop_map(|(q, c, f, g, s, max)| PolicyView {
            weights: Weights {
                queue_time: q,
                cost: c,
                free_capacity: f,
                gpu_fit: g,
                data_locality: 0,
            },
            strategy: [Strategy::BestScore, Strategy::Spread, Strategy::BestScore][s],
            requirements: Requirements {
                max_queue_wait_seconds: max,
                ..Default::default()
            },
            ..policy()
        })
}

proptest! {
    #[test]
    fn never_picks_a_site_that_fails_a_filter(p in arb_pod(), pol in arb_policy(), sites in arb_sites()) {
        let d = place(&p, &pol, &sites, &[]);
        if let Some(chosen) = &d.chosen {
            let s = sites.iter().find(|s| &s.name == chosen).expect("chosen site exists");
            prop_assert_eq!(filter(&p, &pol, s, &[]), None);
        }
        for s in &sites {
            let rejected = d.rejected.contains_key(&s.name);
            prop_assert_eq!(rejected, filter(&p, &pol, s, &[]).is_some());
        }
        prop_assert_eq!(d.rejected.len() + d.ranking.len(), sites.len());
    }

    #[test]
    fn is_deterministic_and_ignores_input_order(p in arb_pod(), pol in arb_policy(), sites in arb_sites()) {
        let a = place(&p, &pol, &sites, &[]);
        let mut reversed = sites.clone();
        reversed.reverse();
        let b = place(&p, &pol, &reversed, &[]);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a, place(&p, &pol, &sites, &[]));
    }

    /// The scheduler subtracts each placed pod from the snapshot (its reservation); over any
    /// sequence of decisions no site ends up with more placed than it had free.
    #[test]
    fn never_overcommits_over_a_sequence(pods in prop::collection::vec(arb_pod(), 1..60), pol in arb_policy(), sites in arb_sites()) {
        let mut snapshot = sites.clone();
        for p in &pods {
            let d = place(p, &pol, &snapshot, &[]);
            if let Some(chosen) = d.chosen {
                let s = snapshot.iter_mut().find(|s| s.name == chosen).expect("exists");
                s.free.cpu_milli -= p.requests.cpu_milli;
                s.free.memory_bytes -= p.requests.memory_bytes;
                s.free.pods -= 1;
                s.active_pods += 1;
                for (g, n) in &p.requests.gpus {
                    *s.free.gpus.entry(g.clone()).or_default() -= n;
                }
            }
        }
        for s in &snapshot {
            prop_assert!(s.free.cpu_milli >= 0 && s.free.memory_bytes >= 0 && s.free.pods >= 0, "{:?}", s.free);
            prop_assert!(s.free.gpus.values().all(|v| *v >= 0), "{:?}", s.free.gpus);
            if let Some(limit) = s.max_concurrent_pods {
                prop_assert!(s.active_pods <= limit);
            }
        }
    }
}

/// A site with 8 A100 and 8 T4 under one resource name.
fn mixed_site() -> SiteSnapshot {
    let mut s = gpu_site("mixed", "A100", 16, 80);
    s.gpus = vec![
        GpuOffer {
            resource: "nvidia.com/gpu".into(),
            model: "A100".into(),
            memory_bytes: Some(80 * GI),
            free: 8,
        },
        GpuOffer {
            resource: "nvidia.com/gpu".into(),
            model: "T4".into(),
            memory_bytes: Some(16 * GI),
            free: 8,
        },
    ];
    s
}

#[test]
fn gpus_are_counted_per_model_so_free_t4s_do_not_take_a100_pods() {
    let mut policy = policy();
    policy.requirements.gpu_models = vec!["A100".into()];
    let mut site = mixed_site();
    let d = place(&pod(1, 1, 2), &policy, std::slice::from_ref(&site), &[]);
    assert_eq!(d.chosen.as_deref(), Some("mixed"));
    assert_eq!(
        d.gpu_models.get("nvidia.com/gpu").map(String::as_str),
        Some("A100")
    );
    // Eight A100 are in use: eight T4 (and the resource's total) are still free.
    site.gpus[0].free = 0;
    site.free.gpus.insert("nvidia.com/gpu".into(), 8);
    let d = place(&pod(1, 1, 1), &policy, std::slice::from_ref(&site), &[]);
    assert_eq!(d.chosen, None, "the T4s cannot take an A100 pod");
    let why = d.rejection_summary();
    assert!(why.contains("nvidia.com/gpu (A100)"), "{why}");
    // A policy that allows either model gets a T4.
    let d = place(&pod(1, 1, 1), &self::policy(), std::slice::from_ref(&site), &[]);
    assert_eq!(d.gpu_models.get("nvidia.com/gpu").map(String::as_str), Some("T4"));
}

#[test]
fn the_gpu_model_chosen_is_the_tightest_fit() {
    let mut site = mixed_site();
    site.gpus[0].free = 3;
    site.gpus[1].free = 8;
    let d = place(&pod(1, 1, 2), &policy(), std::slice::from_ref(&site), &[]);
    assert_eq!(
        d.gpu_models["nvidia.com/gpu"], "A100",
        "3 free A100 waste less than 8 free T4"
    );
    let d = place(&pod(1, 1, 4), &policy(), std::slice::from_ref(&site), &[]);
    assert_eq!(d.gpu_models["nvidia.com/gpu"], "T4");
    let mut memory = policy();
    memory.min_gpu_memory_bytes = Some(40 * GI);
    let d = place(&pod(1, 1, 1), &memory, std::slice::from_ref(&site), &[]);
    assert_eq!(
        d.gpu_models["nvidia.com/gpu"], "A100",
        "T4s have too little memory"
    );
}

// --- data locality ---

mod data_locality {
    use super::*;
    use crate::placement::data::{
        DEFAULT_BANDWIDTH, DEFAULT_INPUT_BYTES, DataObject, LocalStore, SiteData, stage_in_seconds,
    };

    const MI: i64 = 1 << 20;

    fn input(endpoint: &str, bucket: &str, bytes: Option<i64>) -> DataObject {
        DataObject {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            bytes,
            output: false,
        }
    }

    fn local(endpoint: &str, buckets: &[&str]) -> LocalStore {
        LocalStore {
            endpoint: endpoint.into(),
            buckets: buckets.iter().map(|b| b.to_string()).collect(),
        }
    }

    fn with_data(name: &str, data: SiteData) -> SiteSnapshot {
        let mut s = site(name);
        s.data = data;
        s
    }

    fn data_pod(objects: Vec<DataObject>) -> PodNeeds {
        let mut p = pod(1, 1, 0);
        p.data = objects;
        p
    }

    /// (what the site has, the pod's objects, expected seconds).
    #[test]
    fn stage_in_estimates() {
        let s3 = "http://s3:8333";
        let remote_100 = SiteData {
            bandwidth: 100 * MI,
            ..SiteData::default()
        };
        let htc_local = SiteData {
            local: vec![local(s3, &["htc"])],
            bandwidth: 100 * MI,
            external_access: true,
        };
        let whole_store = SiteData {
            local: vec![local(s3, &[])],
            ..SiteData::default()
        };
        let defaults = SiteData::default();
        let cases: Vec<(&str, &SiteData, Vec<DataObject>, i64)> = vec![
            ("no inputs", &remote_100, vec![], 0),
            (
                "1 GiB remote at 100 MiB/s, rounded up",
                &remote_100,
                vec![input(s3, "htc", Some(1 << 30))],
                11,
            ),
            (
                "local bucket",
                &htc_local,
                vec![input(s3, "htc", Some(1 << 30))],
                0,
            ),
            (
                "other bucket of the same store",
                &htc_local,
                vec![input(s3, "cloud", Some(200 * MI))],
                2,
            ),
            (
                "every bucket of the store",
                &whole_store,
                vec![input(s3, "any", Some(1 << 40))],
                0,
            ),
            (
                "unknown size counts as the default",
                &remote_100,
                vec![input(s3, "x", None)],
                DEFAULT_INPUT_BYTES / (100 * MI) + 1,
            ),
            (
                "outputs are not staged in",
                &remote_100,
                vec![DataObject {
                    output: true,
                    ..input(s3, "x", Some(1 << 40))
                }],
                0,
            ),
            (
                "the default bandwidth",
                &defaults,
                vec![input(s3, "x", Some(DEFAULT_BANDWIDTH * 3))],
                3,
            ),
        ];
        for (what, site, objects, expected) in cases {
            assert_eq!(stage_in_seconds(site, &objects), expected, "{what}");
        }
    }

    #[test]
    fn measured_bandwidth_starts_at_the_first_stage_in_then_moves_slowly() {
        use crate::placement::data::{MIN_OBSERVED_BYTES, observe_bandwidth};
        let gib = 1i64 << 30;
        assert_eq!(observe_bandwidth(None, gib, 10.0), Some(gib / 10));
        // 30 % of a new measurement of 0.5 GiB/s on top of 70 % of 1 GiB/s.
        assert_eq!(
            observe_bandwidth(Some(gib), 5 * gib, 10.0),
            Some((0.7 * gib as f64 + 0.3 * (gib / 2) as f64).round() as i64)
        );
        // Too small, or no time: nothing learnt.
        assert_eq!(observe_bandwidth(Some(gib), MIN_OBSERVED_BYTES - 1, 1.0), None);
        assert_eq!(observe_bandwidth(None, gib, 0.0), None);
        assert_eq!(
            observe_bandwidth(None, gib, 4.0),
            None,
            "whole seconds: too coarse below 5 s"
        );
        assert_eq!(observe_bandwidth(None, gib, f64::NAN), None);
        // A nonsense previous value is replaced.
        assert_eq!(observe_bandwidth(Some(-5), 5 * gib, 5.0), Some(gib));
    }

    #[test]
    fn the_site_holding_the_input_wins_and_the_change_is_reported() {
        let s3 = "http://s3:8333";
        let cloud = with_data(
            "cloud",
            SiteData {
                local: vec![local(s3, &["cloud"])],
                ..SiteData::default()
            },
        );
        let htc = with_data(
            "htc",
            SiteData {
                local: vec![local(s3, &["htc"])],
                ..SiteData::default()
            },
        );
        let sites = [cloud, htc];
        let in_htc = data_pod(vec![input(s3, "htc", Some(50 * MI))]);
        let d = place(&in_htc, &policy(), &sites, &[]);
        assert_eq!(d.chosen.as_deref(), Some("htc"));
        assert_eq!(
            d.chosen_without_data.as_deref(),
            Some("cloud"),
            "a tie goes by name"
        );
        let htc_rank = d.ranking.iter().find(|r| r.site == "htc").unwrap();
        let cloud_rank = d.ranking.iter().find(|r| r.site == "cloud").unwrap();
        assert_eq!((htc_rank.stage_in_seconds, htc_rank.data), (0, 1000));
        assert_eq!((cloud_rank.stage_in_seconds, cloud_rank.data), (1, 0));
        let in_cloud = data_pod(vec![input(s3, "cloud", Some(50 * MI))]);
        let d = place(&in_cloud, &policy(), &sites, &[]);
        assert_eq!(d.chosen.as_deref(), Some("cloud"));
        assert_eq!(
            d.chosen_without_data, None,
            "the data agreed with the other scores"
        );
        let none = place(&pod(1, 1, 0), &policy(), &sites, &[]);
        assert!(
            none.ranking
                .iter()
                .all(|r| r.data == 1000 && r.stage_in_seconds == 0)
        );
    }

    #[test]
    fn a_site_without_external_access_takes_only_local_data() {
        let s3 = "http://s3:8333";
        let closed = with_data(
            "closed",
            SiteData {
                local: vec![local(s3, &["hpc"])],
                external_access: false,
                ..SiteData::default()
            },
        );
        let local_only = data_pod(vec![input(s3, "hpc", None)]);
        assert_eq!(filter(&local_only, &policy(), &closed, &[]), None);
        let remote_output = data_pod(vec![
            input(s3, "hpc", None),
            DataObject {
                output: true,
                ..input("http://elsewhere", "out", None)
            },
        ]);
        assert_eq!(
            filter(&remote_output, &policy(), &closed, &[]),
            Some(Rejection::DataUnreachable {
                endpoint: "http://elsewhere".into(),
                bucket: "out".into()
            })
        );
    }

    fn arb_site_data() -> impl proptest::strategy::Strategy<Value = SiteData> {
        (
            prop::collection::vec((0usize..3, prop::collection::vec(0usize..3, 0..3)), 0..3),
            1i64..(1 << 34),
            any::<bool>(),
        )
            .prop_map(|(local, bandwidth, external_access)| SiteData {
                local: local
                    .into_iter()
                    .map(|(e, bs)| LocalStore {
                        endpoint: format!("http://s3-{e}"),
                        buckets: bs.into_iter().map(|b| format!("b{b}")).collect(),
                    })
                    .collect(),
                bandwidth,
                external_access,
            })
    }

    fn arb_objects() -> impl proptest::strategy::Strategy<Value = Vec<DataObject>> {
        prop::collection::vec(
            (
                0usize..3,
                0usize..3,
                prop::option::of(0i64..(1 << 42)),
                any::<bool>(),
            ),
            0..5,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(e, b, bytes, output)| DataObject {
                    endpoint: format!("http://s3-{e}"),
                    bucket: format!("b{b}"),
                    bytes,
                    output,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn the_estimate_grows_with_the_bytes(site in arb_site_data(), objects in arb_objects(), i in 0usize..5, extra in 0i64..(1 << 40)) {
            let before = stage_in_seconds(&site, &objects);
            let mut more = objects.clone();
            if let Some(o) = more.get_mut(i % objects.len().max(1)) {
                o.bytes = Some(o.bytes.unwrap_or(DEFAULT_INPUT_BYTES) + extra);
            }
            prop_assert!(stage_in_seconds(&site, &more) >= before);
        }

        #[test]
        fn the_estimate_is_zero_when_everything_is_local(mut site in arb_site_data(), objects in arb_objects()) {
            site.local = objects
                .iter()
                .map(|o| LocalStore { endpoint: o.endpoint.clone(), buckets: vec![o.bucket.clone()] })
                .collect();
            prop_assert_eq!(stage_in_seconds(&site, &objects), 0);
        }

        #[test]
        fn an_unreachable_site_is_never_chosen(datas in prop::collection::vec(arb_site_data(), 1..6), objects in arb_objects()) {
            let sites: Vec<SiteSnapshot> = datas
                .into_iter()
                .enumerate()
                .map(|(i, d)| with_data(&format!("s{i}"), d))
                .collect();
            let d = place(&data_pod(objects.clone()), &policy(), &sites, &[]);
            if let Some(chosen) = d.chosen {
                let s = sites.iter().find(|s| s.name == chosen).unwrap();
                prop_assert!(crate::placement::data::unreachable(s, &objects).is_none());
            }
            for s in &sites {
                if crate::placement::data::unreachable(s, &objects).is_some() {
                    prop_assert!(d.rejected.contains_key(&s.name));
                }
            }
        }
    }
}
