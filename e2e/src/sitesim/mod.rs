//! `offload-sitesim`: an interLink-compatible API server with a batch system behind it, for tests,
//! the demo and benchmarks. See `docs/sitesim.md`.
//!
//! It serves interLink's paths with interLink's bodies and error conventions. Each container runs
//! as a local process (or, simulated, as a timer); pods beyond the slot count wait in a queue and
//! are reported as waiting. Faults can be injected per operation, and every request is counted
//! (`/debug/stats`) so tests can assert exactly-once creation and batching.

pub mod faults;
mod runner;
mod server;
mod state;

pub use faults::{Fault, FaultKind};
pub use server::{SLURM_STATUS_LAG, SimConfig, SimHandle, Tls};
pub use state::{GpuSpec, Stats, exactly_once};

/// Pod annotation: run this pod as timers instead of processes (`"true"`).
pub const ANNOTATION_SIMULATE: &str = "sitesim.offload.dev/simulate";
/// Pod annotation: simulated run time of each container, in seconds (decimals allowed).
pub const ANNOTATION_DURATION: &str = "sitesim.offload.dev/duration-seconds";
/// Pod annotation: simulated exit code of each app container.
pub const ANNOTATION_EXIT_CODE: &str = "sitesim.offload.dev/exit-code";
