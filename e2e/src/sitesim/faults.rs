//! Injected failures, consumed in order per operation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What an injected failure does to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum FaultKind {
    /// Answer with this status code and text body (interLink relays plugin errors this way).
    Status {
        /// HTTP status.
        code: u16,
        /// Text body.
        #[serde(default)]
        body: String,
    },
    /// Hold the request this long before answering normally (a client with a shorter timeout
    /// sees a timeout; the operation still happens).
    Delay {
        /// Milliseconds.
        millis: u64,
    },
    /// Do the operation, then hold the answer this long (a client that gives up meanwhile never
    /// learns the operation happened).
    SlowAnswer {
        /// Milliseconds.
        millis: u64,
    },
    /// Do the operation, then answer 200 with a body that is not JSON.
    Garbage,
    /// Do the operation, then answer 503 (the answer is lost, the work is not).
    LoseAnswer,
}

/// One injected failure for the next `count` requests to `op` (`create`, `status`, `delete`,
/// `getLogs`, `pinglink`, or `*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// Path without the slash, or `*`.
    pub op: String,
    /// What happens.
    #[serde(flatten)]
    pub kind: FaultKind,
    /// How many requests it applies to.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Pending faults.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pending: Vec<Fault>,
    /// Fail one request in every `n` with 500 (0: never), for load tests.
    pub every_nth_error: u64,
    seen: u64,
}

impl Faults {
    pub(crate) fn push(&mut self, fault: Fault) {
        self.pending.push(fault);
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
    }

    /// The fault for this request, if any, consuming one use.
    pub(crate) fn take(&mut self, op: &str) -> Option<FaultKind> {
        self.seen += 1;
        if let Some(i) = self.pending.iter().position(|f| f.op == op || f.op == "*") {
            let fault = &mut self.pending[i];
            let kind = fault.kind.clone();
            fault.count = fault.count.saturating_sub(1);
            if fault.count == 0 {
                self.pending.remove(i);
            }
            return Some(kind);
        }
        if self.every_nth_error > 0 && self.seen.is_multiple_of(self.every_nth_error) {
            return Some(FaultKind::Status {
                code: 500,
                body: "injected failure".into(),
            });
        }
        None
    }
}

/// Convenience for tests: a status fault.
pub fn status(op: &str, code: u16, body: &str) -> Fault {
    Fault {
        op: op.into(),
        kind: FaultKind::Status {
            code,
            body: body.into(),
        },
        count: 1,
    }
}

impl Fault {
    /// The same fault for the next `n` requests.
    pub fn times(mut self, n: u32) -> Fault {
        self.count = n;
        self
    }
}

/// Convenience for tests: a delay fault.
pub fn delay(op: &str, d: Duration) -> Fault {
    Fault {
        op: op.into(),
        kind: FaultKind::Delay {
            millis: d.as_millis() as u64,
        },
        count: 1,
    }
}

/// Convenience for tests: a slow-answer fault.
pub fn slow_answer(op: &str, d: Duration) -> Fault {
    Fault {
        op: op.into(),
        kind: FaultKind::SlowAnswer {
            millis: d.as_millis() as u64,
        },
        count: 1,
    }
}
