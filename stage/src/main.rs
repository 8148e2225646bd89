//! `offload-stage`: fetches a RemoteJob's inputs and uploads its outputs at the site (see the
//! `offload_stage` crate). Shipped in the operator image beside `offload-operator`.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // One TLS provider for every HTTPS store (the workspace builds rustls with aws-lc-rs only).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    std::process::exit(offload_stage::main().await);
}
