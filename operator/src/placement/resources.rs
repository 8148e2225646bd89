//! The one resource algebra: amounts from quantities, sums, differences, and back to the API's
//! form. The scheduler, the site controller and the load accounting all count with it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::Resources;
use crate::{crd::site::ResourceAmounts, quantity};

/// Whether a resource name is an extended resource counted as GPUs (`vendor/name`).
pub fn is_extended(name: &str) -> bool {
    name.contains('/')
}

impl Resources {
    /// Amounts from a Node-style quantity map (`cpu`, `memory`, `pods`, `vendor/name`); missing
    /// keys count 0, other keys are ignored.
    pub fn from_quantities(q: &BTreeMap<String, Quantity>) -> Resources {
        let int = |k: &str| q.get(k).map(|v| quantity::int(&v.0)).unwrap_or(0);
        Resources {
            cpu_milli: q.get("cpu").map(|v| quantity::milli(&v.0)).unwrap_or(0),
            memory_bytes: int("memory"),
            pods: int("pods"),
            gpus: q
                .iter()
                .filter(|(k, _)| is_extended(k))
                .map(|(k, v)| (k.clone(), quantity::int(&v.0)))
                .collect(),
        }
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &Resources) {
        self.cpu_milli += other.cpu_milli;
        self.memory_bytes += other.memory_bytes;
        self.pods += other.pods;
        for (g, n) in &other.gpus {
            *self.gpus.entry(g.clone()).or_default() += n;
        }
    }

    /// Takes `other` away (amounts may go negative: an over-committed site).
    pub fn subtract(&mut self, other: &Resources) {
        self.cpu_milli -= other.cpu_milli;
        self.memory_bytes -= other.memory_bytes;
        self.pods -= other.pods;
        for (g, n) in &other.gpus {
            *self.gpus.entry(g.clone()).or_default() -= n;
        }
    }

    /// The sum of `items`.
    pub fn sum<'a>(items: impl IntoIterator<Item = &'a Resources>) -> Resources {
        let mut total = Resources::default();
        for r in items {
            total.add(r);
        }
        total
    }

    /// What is left of `self` (a capacity) after `used`, never below 0; extended resources only
    /// for those the capacity names.
    pub fn remaining(&self, used: &Resources) -> Resources {
        Resources {
            cpu_milli: (self.cpu_milli - used.cpu_milli).max(0),
            memory_bytes: (self.memory_bytes - used.memory_bytes).max(0),
            pods: (self.pods - used.pods).max(0),
            gpus: self
                .gpus
                .iter()
                .map(|(g, n)| (g.clone(), (n - used.gpus.get(g).copied().unwrap_or(0)).max(0)))
                .collect(),
        }
    }

    /// The amounts in the API's form (`OffloadSite.status.allocated` / `free`).
    pub fn to_amounts(&self) -> ResourceAmounts {
        ResourceAmounts {
            cpu: Some(Quantity(format!("{}m", self.cpu_milli))),
            memory: Some(Quantity(self.memory_bytes.to_string())),
            pods: Some(i32::try_from(self.pods).unwrap_or(i32::MAX)),
            gpus: self
                .gpus
                .iter()
                .map(|(g, n)| (g.clone(), i32::try_from(*n).unwrap_or(i32::MAX)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    }

    #[test]
    fn amounts_come_from_quantities_in_every_form() {
        let r = Resources::from_quantities(&q(&[
            ("cpu", "1500m"),
            ("memory", "2Gi"),
            ("pods", "1k"),
            ("nvidia.com/gpu", "8"),
            ("ephemeral-storage", "1Ti"),
        ]));
        assert_eq!((r.cpu_milli, r.memory_bytes, r.pods), (1500, 2 << 30, 1000));
        assert_eq!(r.gpus.len(), 1, "only extended resources count as GPUs");
        assert_eq!(r.gpus["nvidia.com/gpu"], 8);
    }

    #[test]
    fn remaining_never_goes_below_zero_and_keeps_only_the_capacity_s_gpus() {
        let cap = Resources::from_quantities(&q(&[("cpu", "4"), ("pods", "10"), ("nvidia.com/gpu", "2")]));
        let mut used = Resources {
            cpu_milli: 6000,
            pods: 3,
            ..Default::default()
        };
        used.gpus.insert("nvidia.com/gpu".into(), 1);
        used.gpus.insert("amd.com/gpu".into(), 1);
        let left = cap.remaining(&used);
        assert_eq!((left.cpu_milli, left.pods), (0, 7));
        assert_eq!(left.gpus, BTreeMap::from([("nvidia.com/gpu".to_string(), 1)]));
        let mut free = cap.clone();
        free.subtract(&used);
        assert_eq!(free.cpu_milli, -2000, "subtract shows over-commitment");
        free.add(&used);
        assert_eq!(free.cpu_milli, cap.cpu_milli);
        assert_eq!(Resources::sum([&used, &used]).pods, 6);
        assert_eq!(left.to_amounts().cpu, Some(Quantity("0m".into())));
    }
}
