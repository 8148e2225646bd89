//! `/exec`, `/attach`, `/portForward` and `/run`: what kube-apiserver calls for `kubectl exec`,
//! `kubectl attach`, `kubectl port-forward` and `kubectl debug`-style runs. interLink's API has no
//! route to reach into a running container and the in-pod agent that will carry these streams is
//! not built yet, so an authorised request is answered at once with why, never left to hang; an
//! unauthorised one is refused first, as a kubelet refuses it.

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{App, admit, node_of};

/// What the caller asked for, for the message.
fn what(path: &str) -> &'static str {
    if path.starts_with("/exec/") {
        "kubectl exec"
    } else if path.starts_with("/attach/") {
        "kubectl attach"
    } else if path.starts_with("/portForward/") {
        "kubectl port-forward"
    } else {
        "running commands in containers"
    }
}

/// The answer to an interactive request for an offloaded pod (pure).
pub fn unavailable(path: &str, namespace: &str, pod: &str, node: &str) -> (StatusCode, String) {
    let site = crate::controller::node::site_of_node(node).unwrap_or(node);
    (
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} is not available for pod {namespace}/{pod}: it runs at offload site {site}, which \
             the operator reaches only through the interLink API, and interLink has no route into a \
             running container; `kubectl logs` works (docs/operations.md, \"Interactive access\")",
            what(path)
        ),
    )
}

/// `/{kind}/{namespace}/{pod}[/{uid}][/{container}]`: every form the kubelet serves.
pub(super) async fn interactive(
    State(app): State<App>,
    Path(parts): Path<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let (head, _) = req.into_parts();
    let get = |k: &str| {
        parts
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (namespace, name) = (get("namespace"), get("pod"));
    let pod = match admit(&app, &head, &namespace, &name).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let node = node_of(&pod);
    if crate::controller::node::site_of_node(&node).is_none() {
        return (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{name} is not on an offload node"),
        )
            .into_response();
    }
    tracing::info!(
        path = head.uri.path(),
        pod = %format!("{namespace}/{name}"),
        "interactive request for an offloaded pod answered as unavailable"
    );
    unavailable(head.uri.path(), &namespace, &name, &node).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_says_what_and_why() {
        let (code, text) = unavailable("/exec/ns/p/c", "ns", "p", "offload-hpc");
        assert_eq!(code, StatusCode::NOT_IMPLEMENTED);
        assert!(
            text.starts_with("kubectl exec is not available for pod ns/p"),
            "{text}"
        );
        assert!(
            text.contains("site hpc") && text.contains("kubectl logs"),
            "{text}"
        );
        assert!(
            unavailable("/portForward/ns/p", "ns", "p", "offload-x")
                .1
                .starts_with("kubectl port-forward")
        );
        assert!(
            unavailable("/attach/ns/p/c", "ns", "p", "offload-x")
                .1
                .starts_with("kubectl attach")
        );
    }
}
