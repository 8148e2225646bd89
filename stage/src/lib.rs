//! `offload-stage`: the tool the operator runs inside a RemoteJob's pod, at the site, to move its
//! data (ADR 0014, ADR 0016). `in` fetches the inputs into the shared folder before the containers
//! start (as the pod's first init container) and leaves a copy of itself there; `run` runs the
//! first container's command and uploads its outputs when it ends, whether it succeeded or not.
//!
//! The operator uses this crate too: the names and exit codes below are the contract between the
//! pod it builds and the tool, and [`store`] reads outputs back for `status.outputs`.

pub mod cli;
pub mod store;

pub use cli::main;

/// Exit codes with a meaning for the operator.
pub mod exit {
    /// `in`: an input does not exist (reason `InputMissing`).
    pub const INPUT_MISSING: i32 = 10;
    /// `in`: an input could not be fetched (refused, unreachable, stalled) after retries
    /// (`StageInFailed`).
    pub const STAGE_IN_FAILED: i32 = 11;
    /// `run`: the command succeeded but an output could not be uploaded after retries
    /// (`OutputUploadFailed`).
    pub const OUTPUT_UPLOAD_FAILED: i32 = 221;
    /// `run`: the command succeeded but did not write a declared output (`OutputMissing`).
    pub const OUTPUT_MISSING: i32 = 222;
    /// Wrong arguments or environment.
    pub const USAGE: i32 = 2;
}

/// The name of the first init container of a RemoteJob pod with data.
pub const STAGE_IN_CONTAINER: &str = "offload-stage-in";
/// Where the shared folder is mounted in every container of the pod.
pub const ROOT: &str = "/var/run/offload";
/// The tool's file name (in the image's `PATH`, and under `<root>/bin/` once `in` copied it).
pub const BINARY: &str = "offload-stage";
/// Prefix of the environment variables that carry an artifact's credentials and region to the
/// tool (`OFFLOAD_S3_IN_<NAME>_...`, `OFFLOAD_S3_OUT_<NAME>_...`); `run` removes every variable
/// with it from the command's environment.
pub const CREDENTIAL_ENV_PREFIX: &str = "OFFLOAD_S3_";
/// Suffixes of those variables, after `<PREFIX><IN|OUT>_<NAME>`.
pub mod env_suffix {
    /// Access key id.
    pub const ACCESS_KEY_ID: &str = "_ACCESS_KEY_ID";
    /// Secret access key.
    pub const SECRET_ACCESS_KEY: &str = "_SECRET_ACCESS_KEY";
    /// STS session token of temporary credentials (optional).
    pub const SESSION_TOKEN: &str = "_SESSION_TOKEN";
    /// Region used to sign.
    pub const REGION: &str = "_REGION";
}

/// `<prefix>_<NAME>`: an artifact name as an environment variable name (upper case, `-` as `_`).
pub fn env_name(prefix: &str, name: &str) -> String {
    format!("{prefix}_{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// The base name of an artifact's credential variables: `OFFLOAD_S3_IN_<NAME>` or
/// `OFFLOAD_S3_OUT_<NAME>`.
pub fn credential_env_base(output: bool, name: &str) -> String {
    let dir = if output { "OUT" } else { "IN" };
    env_name(&format!("{CREDENTIAL_ENV_PREFIX}{dir}"), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_upper_case_with_underscores() {
        assert_eq!(env_name("OFFLOAD_INPUT", "my-model"), "OFFLOAD_INPUT_MY_MODEL");
        assert_eq!(credential_env_base(true, "log-file"), "OFFLOAD_S3_OUT_LOG_FILE");
        assert_eq!(credential_env_base(false, "m"), "OFFLOAD_S3_IN_M");
    }
}
