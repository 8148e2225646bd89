//! Support for offload-operator's end-to-end tests: a real Kubernetes control plane on loopback
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; see `e2e/bin/cluster-up`), one
//! namespace per test, and the component logs when a test fails.
//!
//! The control plane is started once per test binary and stopped when the binary exits (a reaper
//! started by `cluster-up` watches the binary's PID), or reused when `OFFLOAD_E2E_CLUSTER` names the
//! state folder of a running one (`make e2e` does this, so all test binaries share one).

// Test support reports failures by panicking, as the test harness expects.
#![allow(clippy::panic)]

pub mod bench;
pub mod burst;
pub mod cluster;
pub mod fixtures;
pub mod helm;
pub mod kueue;
pub mod namespace;
pub mod nodes;
pub mod operator;
pub mod pki;
pub mod prometheus;
pub mod real_node;
pub mod s3;
pub mod scenario;
pub mod wait;

pub use cluster::Cluster;
pub use namespace::TestNamespace;
pub mod sitesim;
