//! Runs one pod: waits for a slot and the queue delay, runs init containers in order, then the app
//! containers together, as local processes or as timers.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, EnvVar, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use offload_operator::interlink::wire::{ContainerState, PodCreateRequests, StateRunning, StateTerminated};
use tokio::sync::watch;

use super::{
    ANNOTATION_DURATION, ANNOTATION_EXIT_CODE, ANNOTATION_SIMULATE,
    state::{State, waiting},
};

/// How the pod's containers run.
#[derive(Clone, Debug)]
pub(crate) struct RunSpec {
    pub uid: String,
    pub dir: PathBuf,
    pub queue_delay: Duration,
    pub simulate: bool,
}

pub(crate) async fn run_pod(
    state: State,
    spec: RunSpec,
    request: PodCreateRequests,
    mut cancel: watch::Receiver<bool>,
) {
    let pod = &request.pod;
    let simulate = spec.simulate || annotation(pod, ANNOTATION_SIMULATE).is_some_and(|v| v == "true");
    // Queue: a free slot, then the site's scheduling delay.
    let permit = tokio::select! {
        p = state.slots.clone().acquire_owned() => p.ok(),
        _ = cancel.changed() => None,
    };
    let Some(_permit) = permit else { return };
    set_all(
        &state,
        &spec.uid,
        waiting("ContainerCreating", "the site is starting the job"),
    );
    tokio::select! {
        _ = tokio::time::sleep(spec.queue_delay) => {}
        _ = cancel.changed() => return,
    }
    // A simulator being dropped has removed the pod folders: never recreate them.
    if *cancel.borrow() || !spec.dir.exists() {
        return;
    }
    if let Err(e) = write_volumes(&spec.dir, &request) {
        fail_all(&state, &spec.uid, "VolumeError", &e.to_string());
        return;
    }
    let pod_spec = pod.spec.clone().unwrap_or_default();
    for c in pod_spec.init_containers.iter().flatten() {
        let code = run_container(&state, &spec, &request, c, simulate, true, &mut cancel).await;
        if code != Some(0) {
            return; // app containers stay waiting, as with a kubelet
        }
    }
    let mut runs = Vec::new();
    for c in &pod_spec.containers {
        let (state, spec, request, c, mut cancel) = (
            state.clone(),
            spec.clone(),
            request.clone(),
            c.clone(),
            cancel.clone(),
        );
        runs.push(tokio::spawn(async move {
            run_container(&state, &spec, &request, &c, simulate, false, &mut cancel).await
        }));
    }
    for r in runs {
        let _ = r.await;
    }
}

/// Runs one container to its end; returns its exit code (None when cancelled before it started).
async fn run_container(
    state: &State,
    spec: &RunSpec,
    request: &PodCreateRequests,
    c: &Container,
    simulate: bool,
    init: bool,
    cancel: &mut watch::Receiver<bool>,
) -> Option<i32> {
    let log = spec.dir.join(format!("{}.log", c.name));
    let started = now();
    set(
        state,
        &spec.uid,
        &c.name,
        ContainerState {
            running: Some(StateRunning {
                started_at: Some(started.clone()),
            }),
            ..Default::default()
        },
    );
    let (code, reason, message) = if simulate {
        let pod = &request.pod;
        // Per container (env) first, then per pod (annotations).
        let env = |k: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == k)
                .and_then(|e| e.value.clone())
        };
        let secs: f64 = env("SITESIM_DURATION_SECONDS")
            .or_else(|| annotation(pod, ANNOTATION_DURATION).cloned())
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.0);
        let code: i32 = if init {
            0
        } else {
            env("SITESIM_EXIT_CODE")
                .or_else(|| annotation(pod, ANNOTATION_EXIT_CODE).cloned())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let _ = std::fs::write(
            &log,
            format!(
                "simulated container {} of pod {}\n",
                c.name,
                pod.metadata.name.as_deref().unwrap_or("")
            ),
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))) => (code, None, String::new()),
            _ = cancel.changed() => (137, Some("Killed"), "deleted at the site".to_string()),
        }
    } else {
        match spawn(spec, request, c, &log) {
            Err(e) => (127, Some("StartError"), e),
            Ok(mut child) => tokio::select! {
                status = child.wait() => match status {
                    Ok(s) => (s.code().unwrap_or(128 + 9), None, String::new()),
                    Err(e) => (128, Some("StartError"), e.to_string()),
                },
                _ = cancel.changed() => {
                    let _ = child.kill().await;
                    (137, Some("Killed"), "deleted at the site".to_string())
                }
            },
        }
    };
    let reason = reason.unwrap_or(if code == 0 { "Completed" } else { "Error" });
    set(
        state,
        &spec.uid,
        &c.name,
        ContainerState {
            terminated: Some(StateTerminated {
                exit_code: code,
                reason: reason.into(),
                message,
                started_at: Some(started),
                finished_at: Some(now()),
                signal: None,
            }),
            ..Default::default()
        },
    );
    Some(code)
}

/// The container's emptyDir mounts as (mount path, folder under the pod's `root/`): processes
/// have no mount namespace here, so paths under a mount path are rewritten to that folder.
fn empty_dirs(spec: &RunSpec, request: &PodCreateRequests, c: &Container) -> Vec<(String, PathBuf)> {
    let volumes = request
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| volumes.iter().any(|v| v.name == m.name && v.empty_dir.is_some()))
        .map(|m| {
            let path = m.mount_path.trim_end_matches('/').to_string();
            (path.clone(), spec.dir.join("root").join(relative(&path)))
        })
        .collect()
}

/// `value` with a leading emptyDir mount path replaced by its folder.
fn rewrite(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, dir) in mounts {
        if value == path {
            return dir.display().to_string();
        }
        if let Some(rest) = value.strip_prefix(&format!("{path}/")) {
            return dir.join(rest).display().to_string();
        }
    }
    value.to_string()
}

/// PATH for containers: the workspace's binaries first (the images' tools, such as the operator's
/// `offload-stage`, are the ones built beside this binary), then the simulator's own PATH.
fn container_path() -> String {
    let mut dirs: Vec<String> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/offload-sitesim, or <target>/<profile>/deps/<test binary>.
        for dir in exe.ancestors().skip(1).take(2) {
            dirs.push(dir.display().to_string());
        }
    }
    dirs.push(std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()));
    dirs.join(":")
}

/// Starts the container's command as a process: `command` + `args` (a container without a command
/// runs its `args`, as there is no image entrypoint here), env resolved, stdout and stderr to the
/// container's log file, working directory the pod's folder. emptyDir mounts are folders under the
/// pod's `root/` and paths under their mount paths in the command and env point there.
fn spawn(
    spec: &RunSpec,
    request: &PodCreateRequests,
    c: &Container,
    log: &Path,
) -> Result<tokio::process::Child, String> {
    let mounts = empty_dirs(spec, request, c);
    for (_, dir) in &mounts {
        std::fs::create_dir_all(dir).map_err(|e| format!("emptyDir {}: {e}", dir.display()))?;
    }
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let argv: Vec<String> = argv.iter().map(|a| rewrite(a, &mounts)).collect();
    let Some((program, args)) = argv.split_first() else {
        return Err("the container has no command or args (the simulator has no images)".into());
    };
    let out = std::fs::File::create(log).map_err(|e| format!("log file: {e}"))?;
    let err = out.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(&spec.dir)
        .env_clear()
        .env("PATH", container_path())
        .env("HOME", &spec.dir)
        .env("SITESIM_ROOT", spec.dir.join("root"))
        .envs(
            resolve_env(request, c.env.as_deref().unwrap_or_default())
                .into_iter()
                .map(|(k, v)| {
                    let v = rewrite(&v, &mounts);
                    (k, v)
                }),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| format!("cannot start {program:?}: {e}"))
}

/// Env values, with `configMapKeyRef`, `secretKeyRef` and pod `fieldRef`s resolved from the request.
fn resolve_env(request: &PodCreateRequests, env: &[EnvVar]) -> BTreeMap<String, String> {
    let meta = &request.pod.metadata;
    env.iter()
        .filter_map(|e| {
            if let Some(v) = &e.value {
                return Some((e.name.clone(), v.clone()));
            }
            let from = e.value_from.as_ref()?;
            let value = if let Some(r) = &from.config_map_key_ref {
                named(&request.configmaps, &r.name).and_then(|m| m.data.as_ref()?.get(&r.key).cloned())
            } else if let Some(r) = &from.secret_key_ref {
                named(&request.secrets, &r.name).and_then(|s| {
                    s.data
                        .as_ref()?
                        .get(&r.key)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                })
            } else if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "metadata.name" => meta.name.clone(),
                    "metadata.namespace" => meta.namespace.clone(),
                    "metadata.uid" => meta.uid.clone(),
                    _ => None,
                }
            } else {
                None
            };
            value.map(|v| (e.name.clone(), v))
        })
        .collect()
}

/// Writes every mounted ConfigMap, Secret and projected volume under `<pod dir>/root/<mountPath>`.
fn write_volumes(dir: &Path, request: &PodCreateRequests) -> std::io::Result<()> {
    let root = dir.join("root");
    // `create_dir`, not `create_dir_all`: fails rather than recreate a removed pod folder.
    if !root.exists() {
        std::fs::create_dir(&root)?;
    }
    let spec = request.pod.spec.clone().unwrap_or_default();
    let volumes = spec.volumes.unwrap_or_default();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for mount in all.flat_map(|c| c.volume_mounts.iter().flatten()) {
        let Some(vol) = volumes.iter().find(|v| v.name == mount.name) else {
            continue;
        };
        let target = root.join(relative(&mount.mount_path));
        std::fs::create_dir_all(&target)?;
        let files = if let Some(cm) = &vol.config_map {
            named(&request.configmaps, &cm.name).map(config_map_files)
        } else if let Some(sec) = &vol.secret {
            named(&request.secrets, sec.secret_name.as_deref().unwrap_or_default()).map(|s| {
                s.data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect()
            })
        } else if vol.projected.is_some() || vol.downward_api.is_some() {
            // interLink sends each projected/downwardAPI volume as a ConfigMap named after the volume.
            named(&request.projectedvolumesmaps, &vol.name).map(config_map_files)
        } else {
            None
        };
        for (key, content) in files.unwrap_or_default() {
            let path = target.join(relative(&key));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
    }
    Ok(())
}

/// The object of that name in a list from the create request.
fn named<'a, T: k8s_openapi::Metadata<Ty = ObjectMeta>>(items: &'a [T], name: &str) -> Option<&'a T> {
    items.iter().find(|i| i.metadata().name.as_deref() == Some(name))
}

fn config_map_files(m: &ConfigMap) -> Vec<(String, Vec<u8>)> {
    let text = m
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()));
    let binary = m
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()));
    text.chain(binary).collect()
}

/// A path made relative and stripped of `..`, so a manifest cannot write outside the pod folder.
fn relative(p: &str) -> PathBuf {
    Path::new(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a String> {
    pod.metadata.annotations.as_ref()?.get(key)
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn set(state: &State, uid: &str, container: &str, new: ContainerState) {
    if let Some(c) = state
        .lock()
        .pods
        .get_mut(uid)
        .and_then(|p| p.container_mut(container))
    {
        c.state = new;
    }
}

fn set_all(state: &State, uid: &str, new: ContainerState) {
    if let Some(p) = state.lock().pods.get_mut(uid) {
        for c in p.init.iter_mut().chain(p.containers.iter_mut()) {
            c.state = new.clone();
        }
    }
}

fn fail_all(state: &State, uid: &str, reason: &str, message: &str) {
    let t = StateTerminated {
        exit_code: 1,
        reason: reason.into(),
        message: message.into(),
        finished_at: Some(now()),
        ..Default::default()
    };
    set_all(
        state,
        uid,
        ContainerState {
            terminated: Some(t),
            ..Default::default()
        },
    );
}

#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn paths_under_an_empty_dir_mount_are_rewritten() {
        let mounts = vec![(
            "/offload".to_string(),
            std::path::PathBuf::from("/pod/root/offload"),
        )];
        assert_eq!(super::rewrite("/offload", &mounts), "/pod/root/offload");
        assert_eq!(
            super::rewrite("/offload/bin/offload-stage", &mounts),
            "/pod/root/offload/bin/offload-stage"
        );
        assert_eq!(super::rewrite("/offloads", &mounts), "/offloads");
        assert_eq!(
            super::rewrite("model=http://x/b/k", &mounts),
            "model=http://x/b/k"
        );
    }

    #[test]
    fn mount_paths_cannot_escape() {
        assert_eq!(relative("/etc/config"), std::path::PathBuf::from("etc/config"));
        assert_eq!(
            relative("../../etc/passwd"),
            std::path::PathBuf::from("etc/passwd")
        );
    }
}
