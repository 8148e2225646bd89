//! A client for one site's interLink API server: wire types, transport, errors, retries. It knows
//! nothing of Kubernetes controllers; controllers hand it pods and get answers or typed errors.

mod client;
mod error;
pub mod wire;

pub use client::{Ping, RetryPolicy, SiteClient, SiteConfig, Timeouts};
pub use error::{Error, Op};

#[cfg(test)]
mod wire_tests;
