//! The `offload-operator` binary: parses the command line and runs it (see `cli`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    offload_operator::install_crypto_provider();
    offload_operator::cli::main(offload_operator::cli::Cli::parse()).await
}
