//! `offload-stage`: the tool the operator runs inside a RemoteJob's pod, at the site, to move its
//! data (ADR 0014). `in` fetches the inputs into the shared folder before the containers start
//! (as the pod's first init container) and leaves a copy of itself there; `run` runs the first
//! container's command and uploads its outputs when it ends, whether it succeeded or not.
//!
//! Exit codes the operator reads back from the container statuses: see [`exit`].

pub mod s3;
pub mod sigv4;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};

use self::{s3::Object, sigv4::Credentials};

/// Exit codes with a meaning for the operator.
pub mod exit {
    /// `in`: an input does not exist (reason `InputMissing`).
    pub const INPUT_MISSING: i32 = 10;
    /// `in`: an input could not be fetched (refused, unreachable) after retries (`StageInFailed`).
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

#[derive(Parser, Debug)]
#[command(
    name = "offload-stage",
    version,
    about = "Moves a RemoteJob's data at the site: fetches its inputs, runs its command, uploads its outputs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch inputs to <root>/inputs/<name> and copy this tool to <root>/bin.
    In(InArgs),
    /// Run a command, then upload <root>/outputs/<name> for each output, whatever its exit code.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct InArgs {
    /// The shared folder.
    #[arg(long, default_value = ROOT)]
    root: PathBuf,
    /// `name=<endpoint>/<bucket>/<key>` (path-style URL); credentials and region come from
    /// `OFFLOAD_S3_IN_<NAME>_{ACCESS_KEY_ID,SECRET_ACCESS_KEY,REGION}`.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Tries per object for transient failures.
    #[arg(long, default_value_t = 3)]
    tries: u32,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The shared folder.
    #[arg(long, default_value = ROOT)]
    root: PathBuf,
    /// `name=<endpoint>/<bucket>/<key>`; credentials and region from
    /// `OFFLOAD_S3_OUT_<NAME>_{ACCESS_KEY_ID,SECRET_ACCESS_KEY,REGION}`.
    #[arg(long = "output")]
    outputs: Vec<String>,
    /// Tries per upload (every failure is retried, with a doubling pause from one second).
    #[arg(long, default_value_t = 3)]
    tries: u32,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Entry point of the `offload-stage` binary; returns the process exit code.
pub async fn main() -> i32 {
    let cli = Cli::parse();
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("offload-stage: cannot build an HTTP client: {e}");
            return exit::USAGE;
        }
    };
    match cli.command {
        Command::In(args) => stage_in(&client, &args).await,
        Command::Run(args) => run(&client, &args).await,
    }
}

/// `name=<endpoint>/<bucket>/<key>` with credentials from the environment under `prefix`.
fn parse_artifact(spec: &str, prefix: &str) -> Result<(String, Object), String> {
    let (name, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?}: expected name=<endpoint>/<bucket>/<key>"))?;
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{name}: {url:?}: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{name}: {url:?} has no host"))?;
    let endpoint = match parsed.port() {
        Some(p) => format!("{}://{host}:{p}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    };
    let path = parsed.path().trim_start_matches('/');
    let (bucket, key) = path
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| format!("{name}: {url:?} has no /<bucket>/<key>"))?;
    let key = percent_decode(key);
    let env = |what: &str| {
        std::env::var(crate::crd::data::env_name(&format!("OFFLOAD_S3_{prefix}"), name) + "_" + what).ok()
    };
    let credentials = match (env("ACCESS_KEY_ID"), env("SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
        }),
        _ => None,
    };
    Ok((
        name.to_string(),
        Object {
            endpoint,
            bucket: bucket.to_string(),
            key,
            region: env("REGION").unwrap_or_else(|| "us-east-1".into()),
            credentials,
        },
    ))
}

/// Every artifact of a command's arguments, or `None` after saying which one is wrong.
fn parse_all(specs: &[String], prefix: &str, command: &str) -> Option<Vec<(String, Object)>> {
    match specs
        .iter()
        .map(|s| parse_artifact(s, prefix))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("offload-stage {command}: {e}");
            None
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a folder every container user may write (pods may run as any uid).
fn shared_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
}

fn rate(bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64().max(1e-6);
    format!("{:.1} MB/s", bytes as f64 / secs / 1e6)
}

async fn stage_in(client: &reqwest::Client, args: &InArgs) -> i32 {
    let Some(inputs) = parse_all(&args.inputs, "IN", "in") else {
        return exit::USAGE;
    };
    let dirs = [
        args.root.join("inputs"),
        args.root.join("outputs"),
        args.root.join("bin"),
    ];
    for d in &dirs {
        if let Err(e) = shared_dir(d) {
            eprintln!("offload-stage in: cannot create {}: {e}", d.display());
            return exit::STAGE_IN_FAILED;
        }
    }
    // The tool for the `run` step, in a folder every container mounts.
    let me = std::env::current_exe().and_then(|exe| {
        let to = args.root.join("bin").join(BINARY);
        std::fs::copy(exe, &to).map(|_| to)
    });
    if let Err(e) = me {
        eprintln!(
            "offload-stage in: cannot copy itself to {}: {e}",
            args.root.join("bin").display()
        );
        return exit::STAGE_IN_FAILED;
    }
    let mut total = 0u64;
    let started = Instant::now();
    for (name, obj) in &inputs {
        let dest = args.root.join("inputs").join(name);
        let t = Instant::now();
        let mut tries = 0;
        let result = loop {
            tries += 1;
            match s3::get_to_file(client, obj, &dest).await {
                Err(e) if e.is_transient() && tries < args.tries.max(1) => {
                    eprintln!("offload-stage in: {name}: {e}; trying again");
                    tokio::time::sleep(Duration::from_secs(1 << (tries - 1).min(5))).await;
                }
                other => break other,
            }
        };
        match result {
            Ok((size, sha)) => {
                total += size;
                eprintln!(
                    "offload-stage in: {name}: {} from {} ({size} bytes, sha256 {sha}, {:.2}s, {})",
                    obj.s3_url(),
                    obj.endpoint,
                    t.elapsed().as_secs_f64(),
                    rate(size, t.elapsed())
                );
            }
            Err(s3::S3Error::NotFound) => {
                eprintln!(
                    "offload-stage in: InputMissing: input {name}: {} does not exist at {}",
                    obj.s3_url(),
                    obj.endpoint
                );
                return exit::INPUT_MISSING;
            }
            Err(e) => {
                eprintln!(
                    "offload-stage in: StageInFailed: input {name}: {} at {}: {e}",
                    obj.s3_url(),
                    obj.endpoint
                );
                return exit::STAGE_IN_FAILED;
            }
        }
    }
    eprintln!(
        "offload-stage in: {} input(s), {total} bytes in {:.2}s",
        inputs.len(),
        started.elapsed().as_secs_f64()
    );
    0
}

async fn run(client: &reqwest::Client, args: &RunArgs) -> i32 {
    let Some(outputs) = parse_all(&args.outputs, "OUT", "run") else {
        return exit::USAGE;
    };
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("offload-stage run: no command");
        return exit::USAGE;
    };
    // The command's own stdout and stderr are the container's.
    let code = supervise(program, rest).await;
    let mut upload_failed = false;
    let mut missing = false;
    for (name, obj) in &outputs {
        let src = args.root.join("outputs").join(name);
        if src.is_dir() {
            eprintln!(
                "offload-stage run: OutputMissing: output {name} ({}) is a folder; only files are uploaded",
                src.display()
            );
            missing = true;
            continue;
        }
        if !src.is_file() {
            if code == 0 {
                eprintln!(
                    "offload-stage run: OutputMissing: the command did not write output {name} ({})",
                    src.display()
                );
                missing = true;
            } else {
                eprintln!("offload-stage run: output {name} was not written (the command failed)");
            }
            continue;
        }
        let t = Instant::now();
        let mut tries = 0;
        let result = loop {
            tries += 1;
            match s3::put_file(client, obj, &src).await {
                Err(e) if tries < args.tries.max(1) => {
                    eprintln!(
                        "offload-stage run: output {name}: {e}; trying again ({tries}/{})",
                        args.tries
                    );
                    tokio::time::sleep(Duration::from_secs(1 << (tries - 1).min(5))).await;
                }
                other => break other,
            }
        };
        match result {
            Ok((size, sha)) => eprintln!(
                "offload-stage run: {name}: {} to {} ({size} bytes, sha256 {sha}, {:.2}s, {})",
                obj.s3_url(),
                obj.endpoint,
                t.elapsed().as_secs_f64(),
                rate(size, t.elapsed())
            ),
            Err(e) => {
                eprintln!(
                    "offload-stage run: OutputUploadFailed: output {name} to {} at {} after {tries} tries: {e}",
                    obj.s3_url(),
                    obj.endpoint
                );
                upload_failed = true;
            }
        }
    }
    if code != 0 {
        code
    } else if upload_failed {
        exit::OUTPUT_UPLOAD_FAILED
    } else if missing {
        exit::OUTPUT_MISSING
    } else {
        0
    }
}

/// Waits for the command, passing on SIGTERM and SIGINT (the container runtime stops the pod by
/// signalling this process, its PID 1): the command ends as it would alone, then its outputs are
/// still uploaded within the pod's grace period.
async fn supervise(program: &str, args: &[String]) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    // Caught before the command starts, so a stop signal arriving at once is passed on too.
    let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    let mut child = match tokio::process::Command::new(program).args(args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("offload-stage run: cannot start {program:?}: {e}");
            return 127;
        }
    };
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let (Ok(mut term), Ok(mut int)) = (term, int) else {
        return match child.wait().await {
            Ok(status) => exit_code(status),
            Err(_) => 1,
        };
    };
    loop {
        let forward = tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => exit_code(status),
                    Err(e) => {
                        eprintln!("offload-stage run: lost the command: {e}");
                        1
                    }
                };
            }
            _ = term.recv() => rustix::process::Signal::TERM,
            _ = int.recv() => rustix::process::Signal::INT,
        };
        if let Some(pid) = pid {
            eprintln!("offload-stage run: passing {forward:?} on to the command");
            let _ = rustix::process::kill_process(pid, forward);
        }
    }
}

/// A child's exit code, `128 + signal` when a signal ended it (as shells report it).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_parse_from_path_style_urls() {
        let (name, o) = parse_artifact("model=http://127.0.0.1:8333/gpu/run%201/model.bin", "IN").unwrap();
        assert_eq!(name, "model");
        assert_eq!(o.endpoint, "http://127.0.0.1:8333");
        assert_eq!(o.bucket, "gpu");
        assert_eq!(o.key, "run 1/model.bin");
        assert_eq!(o.region, "us-east-1");
        assert!(parse_artifact("model=http://127.0.0.1:8333/gpu", "IN").is_err());
        assert!(parse_artifact("no-equals", "IN").is_err());
    }
}
