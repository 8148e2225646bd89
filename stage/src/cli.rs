//! The tool's two steps, `in` and `run`, and its command line.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};

use crate::{
    BINARY, CREDENTIAL_ENV_PREFIX, ROOT, credential_env_base, env_suffix, exit,
    store::{self, Credentials, Object, StoreError, Transfer},
};

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
    /// `OFFLOAD_S3_IN_<NAME>_{ACCESS_KEY_ID,SECRET_ACCESS_KEY,SESSION_TOKEN,REGION}`.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Tries per object for transient failures (each request is also retried on its own, three
    /// times).
    #[arg(long, default_value_t = 2)]
    tries: u32,
    #[command(flatten)]
    transfer: TransferArgs,
}

#[derive(Args, Debug)]
struct TransferArgs {
    /// A transfer that receives nothing for this long fails (and is retried).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    read_timeout_seconds: u64,
    /// Files up to this size are uploaded in one PUT, larger ones in parts of this size (S3 takes
    /// parts of 5 MiB to 5 GiB; memory: about three parts).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(5..=5120))]
    part_size_mib: u64,
    /// An upload request (a PUT, a part) averaging fewer KiB per second than this counts as
    /// stalled: it gets the read timeout plus its bytes at this rate.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    min_upload_rate_kib: u64,
}

impl TransferArgs {
    fn transfer(&self) -> Transfer {
        Transfer {
            read_timeout: Duration::from_secs(self.read_timeout_seconds),
            // Both bounded by clap, so neither overflows.
            part_size: self.part_size_mib << 20,
            min_upload_rate: self.min_upload_rate_kib.saturating_mul(1024),
            ..Transfer::default()
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The shared folder.
    #[arg(long, default_value = ROOT)]
    root: PathBuf,
    /// `name=<endpoint>/<bucket>/<key>`; credentials and region from
    /// `OFFLOAD_S3_OUT_<NAME>_{ACCESS_KEY_ID,SECRET_ACCESS_KEY,SESSION_TOKEN,REGION}`, which the
    /// command does not see.
    #[arg(long = "output")]
    outputs: Vec<String>,
    /// Tries per upload (every failure is retried, with a doubling pause from one second; each
    /// request, a part for instance, is also retried on its own, three times).
    #[arg(long, default_value_t = 2)]
    tries: u32,
    #[command(flatten)]
    transfer: TransferArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Entry point of the `offload-stage` binary; returns the process exit code.
pub async fn main() -> i32 {
    let cli = Cli::parse();
    let transfer = match &cli.command {
        Command::In(a) => a.transfer.transfer(),
        Command::Run(a) => a.transfer.transfer(),
    };
    let http = match store::http_client(&transfer) {
        Ok((c, store::Trust::System)) => c,
        Ok((c, store::Trust::BuiltIn)) => {
            eprintln!(
                "offload-stage: this image has no CA certificates; trusting the Mozilla roots built into offload-stage"
            );
            c
        }
        Err(e) => {
            eprintln!("offload-stage: {e}");
            return exit::USAGE;
        }
    };
    let io = Io { http, transfer };
    match cli.command {
        Command::In(args) => stage_in(&io, &args).await,
        Command::Run(args) => run(&io, &args).await,
    }
}

/// The HTTP client and how transfers behave.
struct Io {
    http: reqwest::Client,
    transfer: Transfer,
}

impl Io {
    async fn get(&self, obj: &Object, dest: &Path) -> Result<(u64, String), StoreError> {
        obj.store(&self.http, &self.transfer)?.get_to_file(dest).await
    }

    async fn put(&self, obj: &Object, src: &Path) -> Result<store::Uploaded, StoreError> {
        let size = tokio::fs::metadata(src).await?.len();
        let (http, _) = store::upload_client(&self.transfer, size)?;
        obj.store(&http, &self.transfer)?.put_file(src).await
    }
}

/// `name=<endpoint>/<bucket>/<key>` with credentials from the environment (an output's or an
/// input's variables).
fn parse_artifact(spec: &str, output: bool) -> Result<(String, Object), String> {
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
    // The path as written: a URL parser would resolve `.` and `..` segments into another key.
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, path)| path)
        .unwrap_or_default();
    let (bucket, key) = path
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| format!("{name}: {url:?} has no /<bucket>/<key>"))?;
    let key = percent_decode(key);
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || key.chars().any(char::is_control)
    {
        return Err(format!(
            "{name}: key {key:?} has an empty, '.' or '..' segment or a control character"
        ));
    }
    let base = credential_env_base(output, name);
    // Values as a Secret made from files holds them, newline and all: trimmed, and refused when
    // they still hold a control character (they go into HTTP headers).
    let mut bad = None;
    let mut env = |suffix: &str| {
        let var = format!("{base}{suffix}");
        let value = std::env::var(&var).ok()?;
        let value = value.trim();
        if value.chars().any(char::is_control) {
            bad = Some(var);
            return None;
        }
        (!value.is_empty()).then(|| value.to_string())
    };
    let (access_key_id, secret_access_key, session_token, region) = (
        env(env_suffix::ACCESS_KEY_ID),
        env(env_suffix::SECRET_ACCESS_KEY),
        env(env_suffix::SESSION_TOKEN),
        env(env_suffix::REGION),
    );
    if let Some(var) = bad {
        return Err(format!("{name}: {var} holds a control character"));
    }
    let credentials = match (access_key_id, secret_access_key) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
            session_token,
        }),
        _ => None,
    };
    Ok((
        name.to_string(),
        Object {
            endpoint,
            bucket: bucket.to_string(),
            key,
            region: region.unwrap_or_else(|| "us-east-1".into()),
            credentials,
        },
    ))
}

/// Every artifact of a command's arguments, or `None` after saying which one is wrong.
fn parse_all(specs: &[String], output: bool, command: &str) -> Option<Vec<(String, Object)>> {
    match specs
        .iter()
        .map(|s| parse_artifact(s, output))
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

/// This binary's path: `/proc/self/exe`, else (no `/proc`, as in some site runtimes) `argv[0]`
/// when it names a path, else the first `offload-stage` on `PATH`.
fn own_path() -> std::io::Result<PathBuf> {
    let proc_error = match std::env::current_exe() {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    if let Some(p) = argv0.filter(|p| p.components().count() > 1 && p.is_file()) {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(BINARY))
        .find(|p| p.is_file())
        .ok_or(proc_error)
}

async fn stage_in(io: &Io, args: &InArgs) -> i32 {
    let Some(inputs) = parse_all(&args.inputs, false, "in") else {
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
    let me = own_path().and_then(|exe| {
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
            match io.get(obj, &dest).await {
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
            Err(StoreError::NotFound) => {
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

async fn run(io: &Io, args: &RunArgs) -> i32 {
    let Some(outputs) = parse_all(&args.outputs, true, "run") else {
        return exit::USAGE;
    };
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("offload-stage run: no command");
        return exit::USAGE;
    };
    // The upload credentials stay with this process: not in the command's environment, and this
    // process non-dumpable, so a command running as the same user cannot read them from
    // /proc/1/environ or /proc/1/mem either.
    if let Err(e) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        eprintln!("offload-stage run: cannot make itself non-dumpable: {e}");
    }
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
            match io.put(obj, &src).await {
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
            Ok(up) => eprintln!(
                "offload-stage run: {name}: {} to {} ({} bytes in {} part(s), sha256 {}, {:.2}s, {})",
                obj.s3_url(),
                obj.endpoint,
                up.size,
                up.parts,
                up.sha256,
                t.elapsed().as_secs_f64(),
                rate(up.size, t.elapsed())
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
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with(CREDENTIAL_ENV_PREFIX) {
            command.env_remove(name);
        }
    }
    let mut child = match command.spawn() {
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
        let (name, o) = parse_artifact("model=http://127.0.0.1:8333/gpu/run%201/model.bin", false).unwrap();
        assert_eq!(name, "model");
        assert_eq!(o.endpoint, "http://127.0.0.1:8333");
        assert_eq!(o.bucket, "gpu");
        assert_eq!(o.key, "run 1/model.bin");
        assert_eq!(o.region, "us-east-1");
        assert!(parse_artifact("model=http://127.0.0.1:8333/gpu", false).is_err());
        assert!(parse_artifact("no-equals", false).is_err());
        // Dot segments stay as written, and are refused rather than resolved into another key.
        let e = parse_artifact("m=http://127.0.0.1:8333/gpu/run/../other", false).unwrap_err();
        assert!(e.contains("'..' segment"), "{e}");
        assert!(parse_artifact("m=http://127.0.0.1:8333/gpu/a//b", false).is_err());
    }
}
