//! Placement benchmark: decisions per second over growing numbers of pods and sites. Each decision
//! reserves the pod's resources in the snapshot, as the scheduler does. Prints numbers; asserts
//! nothing. Run: `cargo bench -p offload-operator --bench placement`.

use std::{collections::BTreeMap, hint::black_box, time::Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use offload_operator::{
    crd::{Architecture, SiteKind, policy::Weights},
    placement::{GpuOffer, PodNeeds, PolicyView, Resources, SiteSnapshot, place},
};

const GI: i64 = 1 << 30;

fn sites(n: usize) -> Vec<SiteSnapshot> {
    (0..n)
        .map(|i| {
            let gpus = if i.is_multiple_of(3) { 64 } else { 0 };
            let cap = Resources {
                cpu_milli: 4_096_000,
                memory_bytes: 16_384 * GI,
                pods: 5_000,
                gpus: BTreeMap::from([("nvidia.com/gpu".to_string(), gpus)]),
            };
            SiteSnapshot {
                name: format!("site-{i:04}"),
                labels: BTreeMap::from([("region".to_string(), format!("r{}", i % 4))]),
                kind: [SiteKind::Hpc, SiteKind::Htc, SiteKind::Cloud][i % 3],
                architecture: Architecture::Amd64,
                ready: i % 17 != 5,
                cordoned: false,
                namespace_selector: LabelSelector::default(),
                relative_cost: (i as i64 * 37) % 500,
                max_concurrent_pods: Some(2_000),
                active_pods: 0,
                pods_by_policy: Default::default(),
                capacity: cap.clone(),
                free: cap,
                gpus: vec![GpuOffer {
                    resource: "nvidia.com/gpu".into(),
                    model: "A100".into(),
                    memory_bytes: Some(80 * GI),
                    free: 8,
                }],
                expected_wait_seconds: (i as i64 * 311) % 7200,
                not_starting: false,
                data: Default::default(),
            }
        })
        .collect()
}

fn pod(i: usize) -> PodNeeds {
    let gpus = if i.is_multiple_of(10) {
        BTreeMap::from([("nvidia.com/gpu".to_string(), 1)])
    } else {
        BTreeMap::new()
    };
    PodNeeds {
        namespace: "bench".into(),
        requests: Resources {
            cpu_milli: 1000 + (i as i64 % 4) * 500,
            memory_bytes: 2 * GI,
            pods: 1,
            gpus,
        },
        ..Default::default()
    }
}

fn main() {
    let policy = PolicyView {
        name: "bench".into(),
        weights: Weights {
            queue_time: 40,
            cost: 20,
            free_capacity: 30,
            gpu_fit: 10,
            data_locality: 0,
        },
        ..Default::default()
    };
    println!(
        "{:>7} {:>6} {:>12} {:>14} {:>12}",
        "pods", "sites", "total ms", "decisions/s", "µs/decision"
    );
    for (pods, n_sites) in [
        (1_000, 10),
        (1_000, 50),
        (1_000, 200),
        (10_000, 10),
        (10_000, 50),
        (10_000, 200),
    ] {
        let mut snapshot = sites(n_sites);
        let start = Instant::now();
        let mut placed = 0;
        for i in 0..pods {
            let p = pod(i);
            let d = place(black_box(&p), &policy, &snapshot, &[]);
            if let Some(chosen) = d.chosen
                && let Some(s) = snapshot.iter_mut().find(|s| s.name == chosen)
            {
                s.free.cpu_milli -= p.requests.cpu_milli;
                s.free.memory_bytes -= p.requests.memory_bytes;
                s.free.pods -= 1;
                s.active_pods += 1;
                for (g, n) in &p.requests.gpus {
                    *s.free.gpus.entry(g.clone()).or_default() -= n;
                }
                placed += 1;
            }
        }
        let elapsed = start.elapsed();
        let per = elapsed.as_secs_f64() / pods as f64;
        println!(
            "{:>7} {:>6} {:>12.1} {:>14.0} {:>12.1}   ({placed} placed)",
            pods,
            n_sites,
            elapsed.as_secs_f64() * 1e3,
            1.0 / per,
            per * 1e6
        );
    }
}
