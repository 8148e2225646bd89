//! Who may use the kubelet endpoint, decided as a kubelet decides it (`--authentication-token-webhook`,
//! `--authorization-mode=Webhook`): the caller is authenticated by a client certificate from the
//! configured CA (user = CN, groups = O) or by a bearer token (TokenReview), then authorised by a
//! SubjectAccessReview for the node subresource the path maps to (`nodes/proxy` for logs, exec,
//! attach and port-forward). Answers are cached like a kubelet's: authentications 2 min,
//! allowed 5 min, denied 30 s.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, api::PostParams};
use tokio::time::Instant;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    /// User name.
    pub name: String,
    /// UID, when the authenticator gives one (tokens).
    pub uid: Option<String>,
    /// Groups, `system:authenticated` among them.
    pub groups: Vec<String>,
    /// Extra attributes (tokens: the pod a service-account token is bound to, ...).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a request asks for, in authorisation terms (pure).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// `get`, `create`, ...
    pub verb: &'static str,
    /// The `nodes` subresource.
    pub subresource: &'static str,
    /// The Node; empty for "every node" (the pod's node is unknown).
    pub node: String,
}

/// The verb of an HTTP method, as the kubelet maps it (others authorise nothing).
pub fn verb(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "",
    }
}

/// The `nodes` subresource a kubelet path is authorised as: the kubelet's own table (`/stats` →
/// `stats`, `/metrics` → `metrics`, `/logs` → `log`, `/spec` → `spec`, `/checkpoint` →
/// `checkpoint`), `proxy` for everything else, container logs, exec, attach and port-forward
/// among them.
pub fn subresource(path: &str) -> &'static str {
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    if under("/stats") {
        "stats"
    } else if under("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else if under("/spec") {
        "spec"
    } else if under("/checkpoint") {
        "checkpoint"
    } else {
        "proxy"
    }
}

/// The caller a verified client certificate names: CN the user, each O a group.
pub fn caller_of_certificate(der: &[u8]) -> Option<Caller> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    // The last CN, as Go's crypto/x509 (and so the API server and kubelets) reads it.
    let name = subject.iter_common_name().last()?.as_str().ok()?.to_string();
    if name.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    groups.push("system:authenticated".into());
    Some(Caller {
        name,
        uid: None,
        groups,
        extra: BTreeMap::new(),
    })
}

/// Why a request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// No valid credentials (401).
    #[error("Unauthorized")]
    Unauthenticated,
    /// Authenticated, not authorised (403); the text names what was asked, as a kubelet's does.
    #[error("Forbidden (user={user}, verb={verb}, resource=nodes, subresource(s)=[{subresource}])")]
    Forbidden {
        /// The user.
        user: String,
        /// The verb.
        verb: &'static str,
        /// The subresource.
        subresource: &'static str,
    },
    /// The API server could not be asked (503).
    #[error("cannot check the request with the API server: {0}")]
    Unavailable(String),
}

const AUTHN_TTL: Duration = Duration::from_secs(120);
const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);
/// Entries per cache; a full cache starts over (entries are cheap to get again).
const CACHE_MAX: usize = 10_000;

struct Cache<K, V> {
    entries: HashMap<K, (V, Instant)>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache {
            entries: HashMap::new(),
        }
    }

    fn get(&self, k: &K, now: Instant) -> Option<V> {
        self.entries
            .get(k)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v.clone())
    }

    fn put(&mut self, k: K, v: V, until: Instant) {
        if self.entries.len() >= CACHE_MAX {
            self.entries.clear();
        }
        self.entries.insert(k, (v, until));
    }
}

/// How the endpoint authorises (the kubelet's `--authorization-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// SubjectAccessReview for every request (cached), as a kubelet with `Webhook`.
    Webhook,
    /// Every authenticated caller may do everything (a kubelet's `AlwaysAllow`).
    AlwaysAllow,
}

/// Authenticates and authorises kubelet requests.
#[derive(Clone)]
pub struct Gate {
    client: kube::Client,
    mode: Mode,
    tokens: Arc<Mutex<Cache<[u8; 32], Option<Caller>>>>,
    decisions: Arc<Mutex<Cache<(Caller, Attributes), bool>>>,
}

impl Gate {
    /// A gate asking the API server behind `client`.
    pub fn new(client: kube::Client, mode: Mode) -> Self {
        Gate {
            client,
            mode,
            tokens: Arc::new(Mutex::new(Cache::new())),
            decisions: Arc::new(Mutex::new(Cache::new())),
        }
    }

    /// The caller of a request: its verified client certificate, else its bearer token.
    pub async fn authenticate(
        &self,
        certificate: Option<&[u8]>,
        authorization: Option<&str>,
    ) -> Result<Caller, Refused> {
        if let Some(caller) = certificate.and_then(caller_of_certificate) {
            return Ok(caller);
        }
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
            .ok_or(Refused::Unauthenticated)?;
        // Cached by digest: the tokens themselves are not kept in memory.
        let key = digest(token);
        let now = Instant::now();
        if let Some(known) = lock(&self.tokens).get(&key, now) {
            return known.ok_or(Refused::Unauthenticated);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| {
            // The caller is not authenticated yet: the details go to the log only.
            tracing::warn!(error = %e, "kubelet endpoint: TokenReview failed");
            Refused::Unavailable("TokenReview failed".into())
        })?;
        let caller = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .and_then(|u| {
                Some(Caller {
                    name: u.username.filter(|n| !n.is_empty())?,
                    uid: u.uid,
                    groups: u.groups.unwrap_or_default(),
                    extra: u.extra.unwrap_or_default(),
                })
            });
        lock(&self.tokens).put(key, caller.clone(), now + AUTHN_TTL);
        caller.ok_or(Refused::Unauthenticated)
    }

    /// Whether `caller` may do what `attrs` says.
    pub async fn authorize(&self, caller: &Caller, attrs: &Attributes) -> Result<(), Refused> {
        if self.mode == Mode::AlwaysAllow {
            return Ok(());
        }
        let forbidden = || Refused::Forbidden {
            user: caller.name.clone(),
            verb: attrs.verb,
            subresource: attrs.subresource,
        };
        if attrs.verb.is_empty() {
            return Err(forbidden());
        }
        let key = (caller.clone(), attrs.clone());
        let now = Instant::now();
        if let Some(allowed) = lock(&self.decisions).get(&key, now) {
            return if allowed { Ok(()) } else { Err(forbidden()) };
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.name.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attrs.verb.into()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attrs.subresource.into()),
                    name: (!attrs.node.is_empty()).then(|| attrs.node.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| {
            tracing::warn!(error = %e, "kubelet endpoint: SubjectAccessReview failed");
            Refused::Unavailable("SubjectAccessReview failed".into())
        })?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let ttl = if allowed { ALLOWED_TTL } else { DENIED_TTL };
        lock(&self.decisions).put(key, allowed, now + ttl);
        if allowed { Ok(()) } else { Err(forbidden()) }
    }
}

/// Longer bearer tokens are refused unread (service-account JWTs are 1-2 KiB).
const MAX_TOKEN_BYTES: usize = 16 << 10;

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The cache behind a mutex; a poisoned one is still usable (it holds only cached answers).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_kubelet_s_subresources() {
        assert_eq!(subresource("/containerLogs/ns/pod/c"), "proxy");
        assert_eq!(subresource("/exec/ns/pod/c"), "proxy");
        assert_eq!(subresource("/portForward/ns/pod"), "proxy");
        assert_eq!(subresource("/stats/summary"), "stats");
        assert_eq!(subresource("/statsz"), "proxy");
        assert_eq!(subresource("/metrics"), "metrics");
        assert_eq!(subresource("/metrics/cadvisor"), "metrics");
        assert_eq!(subresource("/logs/syslog"), "log");
        assert_eq!(subresource("/spec/"), "spec");
        assert_eq!(subresource("/checkpoint/ns/pod/c"), "checkpoint");
    }

    #[test]
    fn methods_map_to_verbs() {
        assert_eq!(verb(&http::Method::GET), "get");
        assert_eq!(verb(&http::Method::POST), "create");
        assert_eq!(verb(&http::Method::DELETE), "delete");
        assert_eq!(verb(&http::Method::OPTIONS), "");
    }

    #[test]
    fn certificates_name_user_and_groups() {
        // openssl req -x509 -subj "/O=team-a/O=team-b/CN=alice" (public part only).
        let alice = caller_of_certificate(include_bytes!("testdata/alice.der")).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["team-a", "team-b", "system:authenticated"]);
        assert_eq!(caller_of_certificate(b"not a certificate"), None);
    }

    #[test]
    fn cached_answers_expire() {
        let mut c: Cache<&str, bool> = Cache::new();
        let now = Instant::now();
        c.put("a", true, now + Duration::from_secs(1));
        assert_eq!(c.get(&"a", now), Some(true));
        assert_eq!(c.get(&"a", now + Duration::from_secs(2)), None);
    }
}
