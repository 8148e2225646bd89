//! A RemoteJob's data, as its attempts use it (pure): its inputs, with `inputsFrom` resolved from
//! the RemoteJobs that wrote them; the stage steps added to its attempt pods; the objects
//! placement weighs; and what the stage tool's exit codes mean.

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod, SecretKeySelector, Volume, VolumeMount,
};

use crate::{
    crd::{
        ANNOTATION_DATA, RemoteJob,
        data::{Artifact, ArtifactStatus, env_name, normalize_endpoint, split_s3_url},
        remote_job::RemoteJobPhase,
    },
    placement::data::{DataObject, SiteData, is_local},
};
use offload_stage::{self as stage, BINARY, ROOT, STAGE_IN_CONTAINER, credential_env_base, env_suffix};

/// The key of a credentials Secret that holds an STS session token (temporary credentials).
pub const SESSION_TOKEN_KEY: &str = "sessionToken";

/// The shared folder's volume in attempt pods.
pub const VOLUME: &str = "offload-data";

/// One object an attempt reads or writes, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// Input or output name.
    pub name: String,
    /// S3 endpoint.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Region.
    pub region: Option<String>,
    /// Secret with the credentials, in the job's namespace.
    pub credentials_secret: Option<String>,
    /// Size, when known.
    pub bytes: Option<i64>,
}

impl Resolved {
    /// `name` at `url` (`s3://bucket/key`) in the store at `endpoint`; `None` for another URL.
    fn new(
        name: &str,
        url: &str,
        endpoint: &str,
        region: &Option<String>,
        credentials_secret: &Option<String>,
        bytes: Option<i64>,
    ) -> Option<Resolved> {
        let (bucket, key) = split_s3_url(url)?;
        Some(Resolved {
            name: name.into(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            bucket: bucket.into(),
            key: key.into(),
            region: region.clone(),
            credentials_secret: credentials_secret.clone(),
            bytes,
        })
    }

    fn from_artifact(a: &Artifact) -> Option<Resolved> {
        let bytes = a.size.as_ref().map(|q| crate::quantity::int(&q.0));
        Resolved::new(
            &a.name,
            &a.url,
            &a.endpoint,
            &a.region,
            &a.credentials_secret,
            bytes,
        )
    }

    fn from_status(s: &ArtifactStatus) -> Option<Resolved> {
        Resolved::new(
            &s.name,
            &s.url,
            &s.endpoint,
            &s.region,
            &s.credentials_secret,
            s.size,
        )
    }

    /// `<endpoint>/<bucket>/<key>`, as the stage tool takes it.
    fn path_url(&self) -> String {
        format!(
            "{}/{}/{}",
            self.endpoint,
            self.bucket,
            stage::store::encode_path(&self.key)
        )
    }

    fn object(&self, output: bool) -> DataObject {
        DataObject {
            endpoint: normalize_endpoint(&self.endpoint),
            bucket: self.bucket.clone(),
            bytes: self.bytes,
            output,
        }
    }
}

/// What one job's attempts read and write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobData {
    /// Inputs: declared ones, then the resolved `inputsFrom`.
    pub inputs: Vec<Resolved>,
    /// Outputs.
    pub outputs: Vec<Resolved>,
}

impl JobData {
    /// The job's data, with `inputsFrom` taken from `resolved` (the status' `inputs`).
    pub fn of(job: &RemoteJob, resolved: &[ArtifactStatus]) -> JobData {
        let spec = &job.spec;
        JobData {
            inputs: spec
                .inputs
                .iter()
                .filter_map(Resolved::from_artifact)
                .chain(resolved.iter().filter_map(Resolved::from_status))
                .collect(),
            outputs: spec.outputs.iter().filter_map(Resolved::from_artifact).collect(),
        }
    }

    /// No data to stage.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }

    /// The objects placement weighs (`offload.dev/data`).
    pub fn objects(&self) -> Vec<DataObject> {
        self.inputs
            .iter()
            .map(|r| r.object(false))
            .chain(self.outputs.iter().map(|r| r.object(true)))
            .collect()
    }

    /// Whether an input is in a store local to the site (a missing one may then be the site's
    /// fault: its copy is gone, another site may still read the original).
    pub fn has_local_input(&self, site: &SiteData) -> bool {
        self.inputs.iter().any(|r| is_local(site, &r.object(false)))
    }
}

/// How the `inputsFrom` of a job stand.
#[derive(Clone, Debug, PartialEq)]
pub enum Upstream {
    /// Every one is resolved.
    Ready(Vec<ArtifactStatus>),
    /// Some RemoteJob has not succeeded yet (or does not exist): the message says which.
    Waiting(String),
    /// A RemoteJob failed, or succeeded without the named output: the job cannot run.
    Failed(String),
}

/// Resolves the job's `inputsFrom` from the RemoteJobs of its namespace (`upstream`), keeping what
/// the status resolved before (so deleting an upstream job later changes nothing).
pub fn resolve(job: &RemoteJob, known: &[ArtifactStatus], upstream: &[&RemoteJob]) -> Upstream {
    let mut out = Vec::new();
    let mut waiting = Vec::new();
    for f in &job.spec.inputs_from {
        if let Some(k) = known.iter().find(|k| k.name == f.name) {
            out.push(k.clone());
            continue;
        }
        let Some(up) = upstream
            .iter()
            .find(|j| j.metadata.name.as_deref() == Some(&f.remote_job))
        else {
            waiting.push(format!("RemoteJob {} does not exist", f.remote_job));
            continue;
        };
        let status = up.status.clone().unwrap_or_default();
        match status.phase {
            Some(RemoteJobPhase::Succeeded) => {}
            Some(RemoteJobPhase::Failed) => {
                return Upstream::Failed(format!("input {}: RemoteJob {} failed", f.name, f.remote_job));
            }
            _ => {
                waiting.push(format!("RemoteJob {} has not succeeded", f.remote_job));
                continue;
            }
        }
        let Some(o) = status.outputs.iter().find(|o| o.name == f.output) else {
            if up.spec.outputs.iter().any(|o| o.name == f.output) {
                waiting.push(format!(
                    "RemoteJob {} has not recorded output {}",
                    f.remote_job, f.output
                ));
                continue;
            }
            return Upstream::Failed(format!(
                "input {}: RemoteJob {} has no output {}",
                f.name, f.remote_job, f.output
            ));
        };
        out.push(ArtifactStatus {
            name: f.name.clone(),
            from_remote_job: Some(f.remote_job.clone()),
            attempt: None,
            site: o.site.clone(),
            message: None,
            ..o.clone()
        });
    }
    if waiting.is_empty() {
        Upstream::Ready(out)
    } else {
        waiting.sort();
        waiting.dedup();
        Upstream::Waiting(waiting.join("; "))
    }
}

fn secret_env(name: String, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(optional),
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

fn value_env(name: String, value: String) -> EnvVar {
    EnvVar {
        name,
        value: Some(value),
        value_from: None,
    }
}

/// Credentials and region of each artifact, as the stage tool reads them; the session token is
/// optional in the Secret (long-term credentials have none).
fn credential_env(items: &[Resolved], output: bool) -> Vec<EnvVar> {
    let mut env = Vec::new();
    for r in items {
        let base = credential_env_base(output, &r.name);
        if let Some(secret) = &r.credentials_secret {
            env.push(secret_env(
                format!("{base}{}", env_suffix::ACCESS_KEY_ID),
                secret,
                "accessKeyId",
                false,
            ));
            env.push(secret_env(
                format!("{base}{}", env_suffix::SECRET_ACCESS_KEY),
                secret,
                "secretAccessKey",
                false,
            ));
            env.push(secret_env(
                format!("{base}{}", env_suffix::SESSION_TOKEN),
                secret,
                SESSION_TOKEN_KEY,
                true,
            ));
        }
        if let Some(region) = &r.region {
            env.push(value_env(format!("{base}{}", env_suffix::REGION), region.clone()));
        }
    }
    env
}

fn mount() -> VolumeMount {
    VolumeMount {
        name: VOLUME.into(),
        mount_path: ROOT.into(),
        ..VolumeMount::default()
    }
}

/// How attempt pods run the stage tool (operator flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageSettings {
    /// Image of the stage-in init container (ADR 0014).
    pub image: String,
    /// A transfer that receives nothing for this long fails and is retried (`--read-timeout-seconds`).
    pub read_timeout_seconds: u64,
    /// Outputs above this size are uploaded in parts of this size (`--part-size-mib`).
    pub part_size_mib: u64,
}

impl StageSettings {
    /// The image with the tool's own defaults (tests).
    pub fn with_image(image: &str) -> Self {
        StageSettings {
            image: image.into(),
            read_timeout_seconds: 60,
            part_size_mib: 64,
        }
    }

    fn read_timeout_args(&self) -> [String; 2] {
        [
            "--read-timeout-seconds".into(),
            self.read_timeout_seconds.to_string(),
        ]
    }
}

/// Adds the stage steps to an attempt pod: the shared folder, the stage-in init container (first),
/// the paths in every container's environment, the first container run under `offload-stage run`
/// when there are outputs, and the `offload.dev/data` annotation for placement.
pub fn add_stage_steps(pod: &mut Pod, data: &JobData, stage: &StageSettings) {
    if data.is_empty() {
        return;
    }
    let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
    if let Ok(json) = serde_json::to_string(&data.objects()) {
        annotations.insert(ANNOTATION_DATA.into(), json);
    }
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    let mut args = vec!["in".to_string(), "--root".into(), ROOT.into()];
    args.extend(stage.read_timeout_args());
    for r in &data.inputs {
        args.push("--input".into());
        args.push(format!("{}={}", r.name, r.path_url()));
    }
    let stage_in = Container {
        name: STAGE_IN_CONTAINER.into(),
        image: Some(stage.image.clone()),
        command: Some(vec![BINARY.into()]),
        args: Some(args),
        env: Some(credential_env(&data.inputs, false)),
        volume_mounts: Some(vec![mount()]),
        ..Container::default()
    };
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    init.insert(0, stage_in);
    let paths: Vec<EnvVar> = [
        value_env("OFFLOAD_INPUTS_DIR".into(), format!("{ROOT}/inputs")),
        value_env("OFFLOAD_OUTPUTS_DIR".into(), format!("{ROOT}/outputs")),
    ]
    .into_iter()
    .chain(data.inputs.iter().map(|r| {
        value_env(
            env_name("OFFLOAD_INPUT", &r.name),
            format!("{ROOT}/inputs/{}", r.name),
        )
    }))
    .chain(data.outputs.iter().map(|r| {
        value_env(
            env_name("OFFLOAD_OUTPUT", &r.name),
            format!("{ROOT}/outputs/{}", r.name),
        )
    }))
    .collect();
    for (i, c) in spec.containers.iter_mut().enumerate() {
        c.volume_mounts.get_or_insert_with(Vec::new).push(mount());
        let env = c.env.get_or_insert_with(Vec::new);
        env.extend(paths.iter().cloned());
        if i == 0 && !data.outputs.is_empty() {
            env.extend(credential_env(&data.outputs, true));
            let mut argv = vec![
                format!("{ROOT}/bin/{BINARY}"),
                "run".into(),
                "--root".into(),
                ROOT.into(),
                "--part-size-mib".into(),
                stage.part_size_mib.to_string(),
            ];
            argv.extend(stage.read_timeout_args());
            for r in &data.outputs {
                argv.push("--output".into());
                argv.push(format!("{}={}", r.name, r.path_url()));
            }
            argv.push("--".into());
            argv.extend(c.command.take().unwrap_or_default());
            argv.extend(c.args.take().unwrap_or_default());
            c.command = Some(argv);
        }
    }
}

/// Attempt reason: an input does not exist (the job is not retried, ADR 0014).
pub const INPUT_MISSING: &str = "InputMissing";
/// Attempt reasons of the stage steps, which also name the job's failure (docs/data.md).
pub const STAGE_REASONS: &[&str] = &[
    INPUT_MISSING,
    "StageInFailed",
    "OutputUploadFailed",
    "OutputMissing",
];

/// The reason a finished attempt pod failed in a stage step, if it did: from the stage-in init
/// container's exit code, or the first container's when the job has outputs.
pub fn stage_failure(pod: &Pod, has_outputs: bool) -> Option<(&'static str, String)> {
    let status = pod.status.as_ref()?;
    let code = |statuses: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>, name: &str| {
        statuses
            .iter()
            .flatten()
            .find(|c| c.name == name)
            .and_then(|c| c.state.as_ref()?.terminated.as_ref())
            .map(|t| t.exit_code)
    };
    let logs = |c: &str| {
        format!(
            "kubectl logs {} -c {c}",
            pod.metadata.name.as_deref().unwrap_or_default()
        )
    };
    match code(&status.init_container_statuses, STAGE_IN_CONTAINER) {
        Some(stage::exit::INPUT_MISSING) => {
            return Some((
                INPUT_MISSING,
                format!(
                    "an input does not exist in its store ({})",
                    logs(STAGE_IN_CONTAINER)
                ),
            ));
        }
        Some(c) if c != 0 => {
            return Some((
                "StageInFailed",
                format!(
                    "the inputs could not be fetched, exit code {c} ({})",
                    logs(STAGE_IN_CONTAINER)
                ),
            ));
        }
        _ => {}
    }
    if !has_outputs {
        return None;
    }
    let first = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .unwrap_or_default();
    match code(&status.container_statuses, &first) {
        Some(stage::exit::OUTPUT_UPLOAD_FAILED) => Some((
            "OutputUploadFailed",
            format!("an output could not be uploaded after retries ({})", logs(&first)),
        )),
        Some(stage::exit::OUTPUT_MISSING) => Some((
            "OutputMissing",
            format!("the command did not write a declared output ({})", logs(&first)),
        )),
        _ => None,
    }
}
