//! The one error type of the interLink client.

use std::{fmt, time::Duration};

/// The operation that failed (also the prefix of the `InterLink-Http-Session` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `/create`.
    Create,
    /// `/delete`.
    Delete,
    /// `/status`.
    Status,
    /// `/getLogs`.
    Logs,
    /// `/pinglink`.
    Ping,
}

impl Op {
    /// interLink's name for the operation, as in the session header (`CreatePod#123`).
    pub fn session_name(self) -> &'static str {
        match self {
            Op::Create => "CreatePod",
            Op::Delete => "DeletePod",
            Op::Status => "GetStatus",
            Op::Logs => "GetLogs",
            Op::Ping => "PingInterLink",
        }
    }

    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Delete => "delete",
            Op::Status => "status",
            Op::Logs => "getLogs",
            Op::Ping => "pinglink",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// How a transport failure happened, for messages a person can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// The name did not resolve.
    Dns,
    /// Nothing accepted the connection (refused, unreachable, reset).
    Connect,
    /// The TLS handshake failed (unknown CA, bad certificate, wrong name).
    Tls,
    /// Anything else while sending or receiving.
    Other,
}

/// Why a call to a site failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request did not reach the site, or the connection broke.
    #[error("{op}: cannot reach the site ({kind:?}): {message}")]
    Transport {
        /// Operation.
        op: Op,
        /// What kind of failure.
        kind: TransportKind,
        /// The underlying error, with its causes.
        message: String,
    },
    /// No answer in time.
    #[error("{op}: no answer within {after:?}")]
    Timeout {
        /// Operation.
        op: Op,
        /// The limit that passed.
        after: Duration,
    },
    /// The site answered with a non-2xx status; `body` is its text (interLink sends no JSON errors).
    #[error("{op}: the site answered HTTP {code}: {body}")]
    Status {
        /// Operation.
        op: Op,
        /// HTTP status code.
        code: u16,
        /// The site's text, as sent.
        body: String,
    },
    /// The site answered 2xx with a body that is not what the operation returns.
    #[error("{op}: the site's answer cannot be decoded ({reason}); body: {body:?}")]
    Decode {
        /// Operation.
        op: Op,
        /// What did not decode.
        reason: String,
        /// The body, as sent.
        body: String,
    },
    /// The request itself is wrong (never sent).
    #[error("{op}: invalid request: {message}")]
    InvalidRequest {
        /// Operation.
        op: Op,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// Whether sending the same request again later can succeed: connection and timeout failures,
    /// and the statuses proxies and overloaded servers use for "try again" (408, 429, 502, 503, and
    /// a 500/504 without a body). A 5xx with a text body is interLink's way of relaying a plugin's
    /// refusal (the SLURM plugin answers 504 when `sbatch` fails), so it is final, as are 4xx,
    /// undecodable answers, TLS failures and invalid requests.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { kind, .. } => *kind != TransportKind::Tls,
            Error::Timeout { .. } => true,
            Error::Status { code, body, .. } => {
                matches!(code, 408 | 429 | 502 | 503) || (matches!(code, 500 | 504) && body.trim().is_empty())
            }
            Error::Decode { .. } | Error::InvalidRequest { .. } => false,
        }
    }

    /// Whether the site refused the operator rather than the request: its credentials (401, 403)
    /// or its TLS (a certificate the site does not accept, or one we do not). Such a failure is the
    /// site's configuration, not the pod's: it is retried, never charged to the pod, and clears
    /// once the credentials are fixed (a rotation in progress, say).
    pub fn is_credentials(&self) -> bool {
        match self {
            Error::Status { code, .. } => matches!(code, 401 | 403),
            Error::Transport { kind, .. } => *kind == TransportKind::Tls,
            _ => false,
        }
    }

    /// Whether the request may have reached the site and taken effect although no answer said
    /// so (a timeout, a connection lost mid-way, a bare 5xx from a proxy or the API server).
    /// Errors raised before anything was sent (DNS, connect, TLS) cannot have.
    pub fn may_have_happened(&self) -> bool {
        match self {
            Error::Transport { kind, .. } => *kind == TransportKind::Other,
            Error::Timeout { .. } => true,
            Error::Status { code, .. } => *code >= 500,
            // Only a 2xx answer is decoded: the site accepted the request, whatever it said.
            Error::Decode { .. } => true,
            Error::InvalidRequest { .. } => false,
        }
    }

    /// A CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Transport {
                kind: TransportKind::Dns,
                ..
            } => "DNSFailure",
            Error::Transport {
                kind: TransportKind::Connect,
                ..
            } => "ConnectionFailed",
            Error::Transport {
                kind: TransportKind::Tls,
                ..
            } => "TLSFailure",
            Error::Transport {
                kind: TransportKind::Other,
                ..
            } => "TransportError",
            Error::Timeout { .. } => "Timeout",
            Error::Status { code: 401 | 403, .. } => "Unauthorized",
            Error::Status { code, .. } if *code >= 500 => "SiteError",
            Error::Status { .. } => "Refused",
            Error::Decode { .. } => "InvalidResponse",
            Error::InvalidRequest { .. } => "InvalidRequest",
        }
    }

    /// The operation that failed.
    pub fn op(&self) -> Op {
        match self {
            Error::Transport { op, .. }
            | Error::Timeout { op, .. }
            | Error::Status { op, .. }
            | Error::Decode { op, .. }
            | Error::InvalidRequest { op, .. } => *op,
        }
    }

    pub(crate) fn from_reqwest(op: Op, after: Duration, err: &reqwest::Error) -> Error {
        if err.is_timeout() {
            return Error::Timeout { op, after };
        }
        let message = chain(err);
        let lower = message.to_ascii_lowercase();
        let kind = if lower.contains("dns error") || lower.contains("failed to lookup address") {
            TransportKind::Dns
        } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            TransportKind::Tls
        } else if err.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Other
        };
        Error::Transport { op, kind, message }
    }
}

/// The error and its sources, joined: reqwest's top-level text alone hides the useful part.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, body: &str) -> Error {
        Error::Status {
            op: Op::Create,
            code,
            body: body.into(),
        }
    }

    #[test]
    fn only_answers_lost_after_sending_may_have_happened() {
        assert!(status(503, "").may_have_happened());
        let garbled = Error::Decode {
            op: Op::Create,
            reason: "expected value".into(),
            body: "}{".into(),
        };
        assert!(garbled.may_have_happened(), "a 2xx with an undecodable body");
        assert!(!status(404, "no").may_have_happened());
        let refused = Error::Transport {
            op: Op::Create,
            kind: TransportKind::Connect,
            message: "refused".into(),
        };
        assert!(!refused.may_have_happened());
    }

    #[test]
    fn retry_verdicts() {
        assert!(status(503, "overloaded").is_retryable());
        assert!(status(502, "").is_retryable());
        assert!(status(429, "").is_retryable());
        assert!(status(504, "").is_retryable(), "a bare gateway timeout");
        assert!(
            !status(
                504,
                "HTTP InterLink session CreatePod#1: call exit status: 504. Body: sbatch failed"
            )
            .is_retryable()
        );
        assert!(!status(500, "Body: unmarshal error").is_retryable());
        assert!(!status(400, "bad").is_retryable());
        assert!(!status(401, "").is_retryable());
        assert!(
            Error::Timeout {
                op: Op::Status,
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        let refused = Error::Transport {
            op: Op::Ping,
            kind: TransportKind::Connect,
            message: "refused".into(),
        };
        assert!(refused.is_retryable());
        let tls = Error::Transport {
            op: Op::Ping,
            kind: TransportKind::Tls,
            message: "unknown ca".into(),
        };
        assert!(!tls.is_retryable());
        assert!(
            !Error::Decode {
                op: Op::Create,
                reason: "x".into(),
                body: "garbage".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn reasons_and_messages_keep_the_site_text() {
        assert_eq!(status(401, "").reason(), "Unauthorized");
        assert!(status(401, "").is_credentials() && status(403, "no").is_credentials());
        assert!(!status(404, "").is_credentials() && !status(503, "").is_credentials());
        assert_eq!(status(504, "sbatch: error").reason(), "SiteError");
        assert_eq!(status(404, "").reason(), "Refused");
        let e = status(504, "sbatch: error: invalid partition");
        assert!(e.to_string().contains("sbatch: error: invalid partition"), "{e}");
        assert!(e.to_string().starts_with("create:"), "{e}");
    }
}
