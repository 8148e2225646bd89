//! offload-operator: offloads Kubernetes pods to remote HPC, HTC and cloud sites through the
//! interLink REST API.
//!
//! The crate is split by job (see `docs/architecture.md`): the binary in `main.rs` only parses the
//! command line and wires modules together.

pub mod cache;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod health;
pub mod interlink;
pub mod jitter;
pub mod kubeclient;
pub mod kubelet;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod quantity;
pub mod server;

pub mod telemetry;
pub mod webhook;

/// Installs the one rustls crypto provider of the process (aws-lc-rs).
///
/// kube and any HTTPS client share rustls; with a single provider feature in the graph rustls would
/// pick it on its own, but installing it explicitly keeps that true if a dependency ever enables a
/// second one. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Largest `offload.dev/placement` annotation written; longer explanations keep the top ten sites.
pub const ANNOTATION_PLACEMENT_MAX: usize = 16 * 1024;
