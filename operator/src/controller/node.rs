//! The virtual Node of a site, computed from the site and what its ping reported (pure).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
        NodeSystemInfo, Taint, Toleration,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    },
};
use kube::Resource;

use crate::{
    crd::{Architecture, OffloadSite, SiteKind},
    interlink::wire::{PingResponse, PingTaint},
};

/// Label every site's Node carries (`offload.dev/site=<site>`); also the key of its taint.
pub const SITE_LABEL: &str = "offload.dev/site";
/// interLink's taint, kept so manifests written for interLink keep working.
pub const INTERLINK_TAINT: &str = "virtual-node.interlink/no-schedule";
/// Taint of a site that fails its health check: no new pods; running pods are never evicted.
pub const UNREACHABLE_TAINT: &str = "offload.dev/unreachable";
/// Node condition that mirrors the site's health (the Node's `Ready` stays true: the operator, as
/// its kubelet, is alive, so kube-controller-manager never evicts pods that still run remotely).
pub const REACHABLE_CONDITION: &str = "OffloadSiteReachable";

const NODE_PREFIX: &str = "offload-";

/// The taints kube-controller-manager puts on a Node whose kubelet (here: the operator) stopped
/// renewing its Lease (ADR 0009).
pub const OUTAGE_TAINTS: [&str; 2] = ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"];

/// Tolerations, without a time limit, of [`OUTAGE_TAINTS`] (NoExecute): a pod carrying them from
/// its creation is not evicted while the operator is down, since its work runs at the site, not on
/// the Node. Added where `existing` has no NoExecute toleration of the key (the pod's own choice,
/// and kube-apiserver's default of 300 s, set at admission, win: the shortest matching toleration
/// decides, so these must be there before admission).
pub fn outage_tolerations(existing: &[Toleration]) -> Vec<Toleration> {
    OUTAGE_TAINTS
        .iter()
        .filter(|key| {
            !existing.iter().any(|t| {
                let key_matches = t.key.as_deref().is_none_or(|k| k.is_empty() || k == **key);
                let effect_matches = t
                    .effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "NoExecute");
                key_matches && effect_matches
            })
        })
        .map(|key| Toleration {
            key: Some((*key).into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        })
        .collect()
}

/// Node name of a site.
pub fn node_name(site: &str) -> String {
    format!("{NODE_PREFIX}{site}")
}

/// The site a node name belongs to, if it is a site's virtual Node name.
pub fn site_of_node(node: &str) -> Option<&str> {
    node.strip_prefix(NODE_PREFIX)
}

/// Where the operator's kubelet endpoint (logs) is reached.
#[derive(Clone, Debug)]
pub struct KubeletEndpoint {
    /// Address written into the Node.
    pub address: String,
    /// Port of the kubelet API.
    pub port: i32,
}

/// The Node's metadata and spec (applied with server-side apply).
pub fn desired_node(site: &OffloadSite, ping: Option<&PingResponse>, reachable: bool) -> Node {
    let name = site.metadata.name.clone().unwrap_or_default();
    let node = node_name(&name);
    let spec = &site.spec;
    let mut labels: BTreeMap<String, String> = spec.node.iter().flat_map(|n| n.labels.clone()).collect();
    let arch = match spec.architecture {
        Architecture::Amd64 => "amd64",
        Architecture::Arm64 => "arm64",
        Architecture::Ppc64le => "ppc64le",
        Architecture::S390x => "s390x",
    };
    let kind = match spec.kind {
        SiteKind::Hpc => "HPC",
        SiteKind::Htc => "HTC",
        SiteKind::Cloud => "Cloud",
        SiteKind::Kubernetes => "Kubernetes",
    };
    for (k, v) in [
        (SITE_LABEL, name.as_str()),
        ("offload.dev/site-kind", kind),
        ("kubernetes.io/hostname", node.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch),
        ("type", "virtual-kubelet"),
        ("virtual-node.interlink/type", "virtual-kubelet"),
        ("node.kubernetes.io/exclude-from-external-load-balancers", "true"),
    ] {
        labels.insert(k.into(), v.into());
    }
    for gpu in &spec.capacity.gpus {
        // interLink labels NVIDIA models as `nvidia-gpu-type`; keep that, plus one per resource.
        if gpu.resource_name == "nvidia.com/gpu" {
            labels.insert("nvidia-gpu-type".into(), gpu.model.clone());
        }
        labels.insert(
            format!("offload.dev/gpu-model.{}", gpu.resource_name.replace('/', "_")),
            gpu.model.clone(),
        );
    }
    let taint = |key: &str, value: &str| Taint {
        key: key.into(),
        value: Some(value.into()),
        effect: "NoSchedule".into(),
        time_added: None,
    };
    let mut taints = vec![taint(SITE_LABEL, &name), taint(INTERLINK_TAINT, "true")];
    if !reachable {
        taints.push(taint(UNREACHABLE_TAINT, "true"));
    }
    // A ping answer with `taints` replaces the configured extra taints, as interLink does, but
    // never evicts unless the site is allowed to ([`site_taints`]).
    match ping.and_then(|p| p.taints.as_ref()) {
        Some(_) => taints.extend(applied_site_taints(site, ping).unwrap_or_default().taints),
        None => taints.extend(spec.node.iter().flat_map(|n| n.taints.clone())),
    }
    Node {
        metadata: ObjectMeta {
            name: Some(node),
            labels: Some(labels),
            owner_references: Some(vec![owner(site)]),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("offload://{name}")),
            taints: Some(taints),
            // `cordoned` is a cordon: kube-scheduler (interLink-style pods) and the offload
            // scheduler place nothing new here; pods already here are left alone.
            unschedulable: Some(spec.cordoned),
            ..Default::default()
        }),
        status: None,
    }
}

fn owner(site: &OffloadSite) -> OwnerReference {
    OwnerReference {
        api_version: OffloadSite::api_version(&()).into(),
        kind: OffloadSite::kind(&()).into(),
        name: site.metadata.name.clone().unwrap_or_default(),
        uid: site.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The taints a site's ping asked for, as applied to its Node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteTaints {
    /// What goes on the Node.
    pub taints: Vec<Taint>,
    /// Keys the site asked to be `NoExecute`, applied as `NoSchedule`.
    pub downgraded: Vec<String>,
    /// Taints left out, each with why (an invalid key or value, a duplicate, one of the
    /// operator's own keys).
    pub ignored: Vec<String>,
}

impl SiteTaints {
    /// The `SiteTaintsApplied` condition: (status, reason, message).
    pub fn condition(&self) -> (bool, &'static str, String) {
        let ignored = if self.ignored.is_empty() {
            String::new()
        } else {
            format!("; left out: {}", self.ignored.join(", "))
        };
        if !self.downgraded.is_empty() {
            let message = format!(
                "site asked for NoExecute, applied as NoSchedule ({}): no new pods go there, running pods \
                 are not evicted; spec.node.allowSiteEviction lets the site evict{ignored}",
                self.downgraded.join(", ")
            );
            return (false, "NoExecuteAppliedAsNoSchedule", message);
        }
        if !self.ignored.is_empty() {
            let message = format!("taints the site asked for were not applied{ignored}");
            return (false, "InvalidTaintsIgnored", message);
        }
        (
            true,
            "AsAsked",
            "the site's taints, if any, are applied as it asked".into(),
        )
    }
}

/// The taints of a ping answer as they go on the Node: `NoExecute` becomes `NoSchedule` unless
/// `allow_eviction`, unknown effects become `NoSchedule`, and taints the API server would refuse
/// (invalid keys or values, a key and effect twice) or that would shadow the operator's own are
/// left out, so one bad taint never stops the Node from being written.
pub fn site_taints(from_site: &[PingTaint], allow_eviction: bool) -> SiteTaints {
    let mut out = SiteTaints::default();
    let mut seen = std::collections::HashSet::new();
    for t in from_site {
        if [SITE_LABEL, INTERLINK_TAINT, UNREACHABLE_TAINT].contains(&t.key.as_str()) {
            out.ignored.push(format!("{} (the operator's own key)", t.key));
            continue;
        }
        if !is_qualified_name(&t.key) {
            out.ignored.push(format!("{:?} (not a valid key)", t.key));
            continue;
        }
        if let Some(v) = &t.value
            && !is_label_value(v)
        {
            out.ignored.push(format!("{} (value {v:?} is not valid)", t.key));
            continue;
        }
        let effect = match t.effect.as_str() {
            "PreferNoSchedule" => "PreferNoSchedule",
            "NoExecute" if allow_eviction => "NoExecute",
            "NoExecute" => "NoSchedule",
            _ => "NoSchedule",
        };
        if !seen.insert((t.key.clone(), effect)) {
            out.ignored.push(format!("{} (a duplicate)", t.key));
            continue;
        }
        if t.effect == "NoExecute" && !allow_eviction {
            out.downgraded.push(t.key.clone());
        }
        out.taints.push(Taint {
            key: t.key.clone(),
            value: t.value.clone(),
            effect: effect.into(),
            time_added: None,
        });
    }
    out
}

/// The site's taints as applied, when its last ping said which (`None`: the ping carries no
/// `taints`, the declared ones apply).
pub fn applied_site_taints(site: &OffloadSite, ping: Option<&PingResponse>) -> Option<SiteTaints> {
    let from_site = ping?.taints.as_ref()?;
    let allow = site.spec.node.as_ref().is_some_and(|n| n.allow_site_eviction);
    Some(site_taints(from_site, allow))
}

/// A Kubernetes qualified name (`[prefix/]name`), as taint keys and label keys must be.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_` and `.`, starting and ending
/// alphanumeric.
fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

/// Whether the site reports that its Node's name belongs to a Node the operator does not own
/// (its `Ready` condition's reason `NodeNameTaken`, written by the site controller).
pub fn is_node_taken(site: &OffloadSite) -> bool {
    site.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == crate::crd::conditions::READY && c.reason == NODE_TAKEN_REASON)
    })
}

/// The `Ready` reason of a site whose Node name is taken by a Node the operator does not own.
pub const NODE_TAKEN_REASON: &str = "NodeNameTaken";

/// Why `node` is not site `site`'s virtual Node, if it is not: the operator writes only Nodes
/// that carry the site's label or an OffloadSite owner of that name, never a real node that
/// happens to be named `offload-<site>` (its force-apply would take the Node over, and garbage
/// collection would delete it with the site).
pub fn not_owned(node: &Node, site: &str) -> Option<String> {
    let labelled = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SITE_LABEL))
        .map(String::as_str)
        == Some(site);
    let owned = node
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "OffloadSite" && o.name == site);
    if labelled || owned {
        return None;
    }
    Some(format!(
        "a Node named {} exists and is not this site's virtual Node (no {SITE_LABEL}={site} label, no OffloadSite \
         owner): the operator does not take it over; rename the site or remove that Node",
        node.metadata.name.as_deref().unwrap_or_default()
    ))
}

/// Capacity: declared, overridden by what the ping reports. Zero or unparsable CPU or memory from
/// a site is ignored (interLink issue #558: a 0 from a plugin would empty the node).
pub fn capacity(site: &OffloadSite, ping: Option<&PingResponse>) -> BTreeMap<String, Quantity> {
    let c = &site.spec.capacity;
    let mut out = BTreeMap::new();
    out.insert(
        "cpu".into(),
        c.cpu.clone().unwrap_or_else(|| Quantity(ASSUMED_CPU.into())),
    );
    out.insert(
        "memory".into(),
        c.memory
            .clone()
            .unwrap_or_else(|| Quantity(ASSUMED_MEMORY.into())),
    );
    out.insert(
        "pods".into(),
        Quantity(c.pods.unwrap_or(ASSUMED_PODS).to_string()),
    );
    for gpu in &c.gpus {
        let entry = out
            .entry(gpu.resource_name.clone())
            .or_insert_with(|| Quantity("0".into()));
        let sum = crate::quantity::int(&entry.0) + i64::from(gpu.count);
        *entry = Quantity(sum.to_string());
    }
    if let Some(r) = ping.and_then(|p| p.resources.as_ref()) {
        for (key, q) in [("cpu", &r.cpu), ("memory", &r.memory), ("pods", &r.pods)] {
            if let Some(q) = q
                && positive(&q.0)
            {
                out.insert(key.into(), q.clone());
            }
        }
        for a in &r.accelerators {
            if let Some(q) = &a.available
                && crate::quantity::parse(&q.0).is_some_and(|n| n >= 0.0)
                && !a.resource_type.is_empty()
            {
                out.insert(a.resource_type.clone(), q.clone());
            }
        }
    }
    out
}

/// What a Node advertises for a capacity that is neither declared nor reported: enough that
/// kube-scheduler lets pinned pods through, and said in the site's `CapacityKnown` condition.
const ASSUMED_CPU: &str = "100";
const ASSUMED_MEMORY: &str = "3000Gi";
const ASSUMED_PODS: i32 = 10_000;
/// The assumed defaults, as the condition names them.
pub const ASSUMED_CAPACITY: &str = "cpu 100, memory 3000Gi, pods 10000";

/// The capacity keys (`cpu`, `memory`, `pods`) that [`capacity`] had to assume: neither declared
/// in `spec.capacity` nor reported (non-zero) by the last ping.
pub fn assumed_capacity(site: &OffloadSite, ping: Option<&PingResponse>) -> Vec<&'static str> {
    let c = &site.spec.capacity;
    let r = ping.and_then(|p| p.resources.as_ref());
    let reported = |q: Option<&Option<Quantity>>| q.and_then(|q| q.as_ref()).is_some_and(|q| positive(&q.0));
    let mut out = vec![];
    if c.cpu.is_none() && !reported(r.map(|r| &r.cpu)) {
        out.push("cpu");
    }
    if c.memory.is_none() && !reported(r.map(|r| &r.memory)) {
        out.push("memory");
    }
    if c.pods.is_none() && !reported(r.map(|r| &r.pods)) {
        out.push("pods");
    }
    out
}

/// A quantity string that starts with a non-zero digit sequence (no sign, not `0`, `0m`, ...).
fn positive(q: &str) -> bool {
    let digits: String = q
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    !q.starts_with('-') && digits.parse::<f64>().is_ok_and(|v| v > 0.0)
}

/// The Node's status (applied to the status subresource).
pub fn desired_status(
    site: &OffloadSite,
    ping: Option<&PingResponse>,
    reachable: (bool, &str, &str),
    endpoint: &KubeletEndpoint,
    now: &Time,
) -> NodeStatus {
    let capacity = capacity(site, ping);
    let (ok, reason, message) = reachable;
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: None,
    };
    NodeStatus {
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        conditions: Some(vec![
            // Ready stays True while the operator serves the node (its lease renews): a Ready
            // False would make kube-controller-manager taint the node NoExecute and evict every
            // running pod after 300 s (ADR 0004). Site health shows in the reason and message,
            // in the condition below, and in the NoSchedule taint that keeps new pods off.
            if ok {
                condition(
                    "Ready",
                    "True",
                    "OffloadOperatorReady",
                    "offload-operator serves this site's virtual node; the site passes its health check",
                )
            } else {
                condition(
                    "Ready",
                    "True",
                    "SiteUnreachable",
                    &format!(
                        "offload-operator serves this node but the site fails its health check ({reason}): \
                         new pods are kept off by the {UNREACHABLE_TAINT} taint; running pods are not evicted"
                    ),
                )
            },
            condition(
                REACHABLE_CONDITION,
                if ok { "True" } else { "False" },
                reason,
                message,
            ),
            condition("MemoryPressure", "False", "OffloadOperatorReady", "remote site"),
            condition("DiskPressure", "False", "OffloadOperatorReady", "remote site"),
            condition("PIDPressure", "False", "OffloadOperatorReady", "remote site"),
            condition(
                "NetworkUnavailable",
                "False",
                "OffloadOperatorReady",
                "remote site",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: endpoint.address.clone(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: node_name(site.metadata.name.as_deref().unwrap_or_default()),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: endpoint.port }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: serde_json::to_value(site.spec.architecture)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            operating_system: "linux".into(),
            kubelet_version: concat!("offload-operator/v", env!("CARGO_PKG_VERSION")).into(),
            kube_proxy_version: String::new(),
            container_runtime_version: "interlink://".into(),
            os_image: format!("{:?} site via interLink", site.spec.kind),
            kernel_version: String::new(),
            machine_id: site.metadata.uid.clone().unwrap_or_default(),
            system_uuid: site.metadata.uid.clone().unwrap_or_default(),
            boot_id: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interlink::wire::{PingAccelerator, PingResources, PingTaint};

    #[test]
    fn outage_tolerations_are_added_only_where_the_pod_has_none() {
        let t = |key: Option<&str>, effect: Option<&str>, seconds: Option<i64>| Toleration {
            key: key.map(Into::into),
            effect: effect.map(Into::into),
            toleration_seconds: seconds,
            operator: Some("Exists".into()),
            ..Default::default()
        };
        let added = outage_tolerations(&[]);
        assert_eq!(added.len(), 2);
        assert!(
            added
                .iter()
                .all(|t| t.toleration_seconds.is_none() && t.effect.as_deref() == Some("NoExecute"))
        );
        // The pod's own choice for one key (evict after a minute) is kept.
        let own = outage_tolerations(&[t(
            Some("node.kubernetes.io/unreachable"),
            Some("NoExecute"),
            Some(60),
        )]);
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].key.as_deref(), Some("node.kubernetes.io/not-ready"));
        // A NoSchedule toleration of the key does not count; an everything-toleration does.
        assert_eq!(
            outage_tolerations(&[t(
                Some("node.kubernetes.io/unreachable"),
                Some("NoSchedule"),
                None
            )])
            .len(),
            2
        );
        assert!(outage_tolerations(&[t(None, None, None)]).is_empty());
    }

    fn site() -> OffloadSite {
        let mut s: OffloadSite = serde_json::from_value(serde_json::json!({
            "apiVersion": "offload.dev/v1alpha1", "kind": "OffloadSite",
            "metadata": {"name": "hpc", "uid": "u-1"},
            "spec": {"endpoint": "https://x", "namespaceSelector": {},
                     "capacity": {"cpu": "32", "memory": "128Gi", "pods": 100,
                                  "gpus": [{"model": "A100", "count": 4}, {"model": "H100", "count": 2}]},
                     "node": {"labels": {"offload.dev/site": "spoofed", "team": "ml"},
                              "taints": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]}}
        }))
        .expect("site");
        s.metadata.name = Some("hpc".into());
        s
    }

    #[test]
    fn capacity_that_is_neither_declared_nor_reported_is_named_as_assumed() {
        let mut bare = site();
        bare.spec.capacity = Default::default();
        assert_eq!(assumed_capacity(&bare, None), ["cpu", "memory", "pods"]);
        let ping = PingResponse {
            resources: Some(PingResources {
                cpu: Some(Quantity("64".into())),
                memory: Some(Quantity("0".into())),
                pods: None,
                accelerators: vec![],
            }),
            ..Default::default()
        };
        assert_eq!(
            assumed_capacity(&bare, Some(&ping)),
            ["memory", "pods"],
            "a reported 0 is no report"
        );
        assert!(assumed_capacity(&site(), None).is_empty());
    }

    #[test]
    fn labels_taints_and_owner() {
        let node = desired_node(&site(), None, true);
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(labels["offload.dev/site"], "hpc", "the operator's label wins");
        assert_eq!(labels["team"], "ml");
        assert_eq!(labels["nvidia-gpu-type"], "H100");
        let taints = node.spec.and_then(|s| s.taints).expect("taints");
        let keys: Vec<&str> = taints.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["offload.dev/site", INTERLINK_TAINT, "dedicated"]);
        assert_eq!(node.metadata.owner_references.expect("owner")[0].uid, "u-1");
    }

    #[test]
    fn a_cordoned_site_is_a_cordoned_node() {
        assert_eq!(
            desired_node(&site(), None, true)
                .spec
                .and_then(|s| s.unschedulable),
            Some(false)
        );
        let mut s = site();
        s.spec.cordoned = true;
        assert_eq!(
            desired_node(&s, None, true).spec.and_then(|s| s.unschedulable),
            Some(true)
        );
    }

    #[test]
    fn unreachable_sites_get_a_noschedule_taint_only() {
        let node = desired_node(&site(), None, false);
        let taints = node.spec.and_then(|s| s.taints).expect("taints");
        let t = taints
            .iter()
            .find(|t| t.key == UNREACHABLE_TAINT)
            .expect("unreachable taint");
        assert_eq!(t.effect, "NoSchedule", "never NoExecute: running pods stay");
    }

    #[test]
    fn ping_taints_replace_configured_ones() {
        let ping = PingResponse {
            taints: Some(vec![PingTaint {
                key: "maintenance".into(),
                value: None,
                effect: "Bogus".into(),
            }]),
            ..Default::default()
        };
        let taints = desired_node(&site(), Some(&ping), true)
            .spec
            .and_then(|s| s.taints)
            .expect("taints");
        let keys: Vec<&str> = taints.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["offload.dev/site", INTERLINK_TAINT, "maintenance"]);
        assert_eq!(
            taints[2].effect, "NoSchedule",
            "unknown effects default to NoSchedule"
        );
    }

    fn pt(key: &str, value: Option<&str>, effect: &str) -> PingTaint {
        PingTaint {
            key: key.into(),
            value: value.map(Into::into),
            effect: effect.into(),
        }
    }

    #[test]
    fn a_site_cannot_evict_unless_allowed_and_says_so() {
        let asked = [
            pt("maintenance", Some("true"), "NoExecute"),
            pt("slow", None, "PreferNoSchedule"),
        ];
        let applied = site_taints(&asked, false);
        let effects: Vec<&str> = applied.taints.iter().map(|t| t.effect.as_str()).collect();
        assert_eq!(effects, ["NoSchedule", "PreferNoSchedule"]);
        assert_eq!(applied.downgraded, ["maintenance"]);
        let (ok, reason, message) = applied.condition();
        assert!(!ok);
        assert_eq!(reason, "NoExecuteAppliedAsNoSchedule");
        assert!(
            message.contains("site asked for NoExecute, applied as NoSchedule (maintenance)"),
            "{message}"
        );
        let allowed = site_taints(&asked, true);
        assert_eq!(allowed.taints[0].effect, "NoExecute");
        assert!(allowed.downgraded.is_empty());
        assert_eq!(allowed.condition().1, "AsAsked");
    }

    #[test]
    fn invalid_and_duplicate_ping_taints_are_left_out_not_applied() {
        let asked = [
            pt("maintenance", None, "NoSchedule"),
            pt("maintenance", Some("again"), "NoSchedule"),
            // NoExecute applied as NoSchedule collides with the one above too.
            pt("maintenance", None, "NoExecute"),
            pt("bad key!", None, "NoSchedule"),
            pt("", None, "NoSchedule"),
            pt("example.com/ok", Some("not valid!"), "NoSchedule"),
            pt(SITE_LABEL, Some("other"), "NoExecute"),
            pt("example.com/fine", Some("v1.2_x"), "NoSchedule"),
        ];
        let applied = site_taints(&asked, false);
        let keys: Vec<&str> = applied.taints.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["maintenance", "example.com/fine"]);
        assert_eq!(applied.ignored.len(), 6, "{:?}", applied.ignored);
        assert_eq!(applied.condition().1, "InvalidTaintsIgnored");
        // The whole Node stays writable: no key and effect twice.
        let node = desired_node(
            &site(),
            Some(&PingResponse {
                taints: Some(asked.to_vec()),
                ..Default::default()
            }),
            true,
        );
        let taints = node.spec.and_then(|s| s.taints).expect("taints");
        let pairs: std::collections::HashSet<_> = taints.iter().map(|t| (&t.key, &t.effect)).collect();
        assert_eq!(pairs.len(), taints.len());
        assert!(taints.iter().all(|t| t.effect != "NoExecute"));
    }

    #[test]
    fn a_node_the_operator_does_not_own_is_never_taken_over() {
        let ours = desired_node(&site(), None, true);
        assert_eq!(not_owned(&ours, "hpc"), None);
        let real: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "offload-hpc", "labels": {"kubernetes.io/hostname": "offload-hpc"}}}))
        .expect("node");
        let why = not_owned(&real, "hpc").expect("not ours");
        assert!(why.contains("does not take it over"), "{why}");
        assert!(
            not_owned(&ours, "other").is_some(),
            "another site's Node is not this one's"
        );
    }

    #[test]
    fn capacity_is_declared_then_pinged_and_zero_is_ignored() {
        let c = capacity(&site(), None);
        assert_eq!(c["cpu"].0, "32");
        assert_eq!(c["nvidia.com/gpu"].0, "6", "GPUs summed by resource name");
        let ping = PingResponse {
            resources: Some(PingResources {
                cpu: Some(Quantity("64".into())),
                memory: Some(Quantity("0".into())),
                pods: None,
                accelerators: vec![PingAccelerator {
                    resource_type: "nvidia.com/gpu".into(),
                    available: Some(Quantity("8".into())),
                    model: None,
                }],
            }),
            ..Default::default()
        };
        let c = capacity(&site(), Some(&ping));
        assert_eq!(assumed_capacity(&site(), Some(&ping)), Vec::<&str>::new());
        assert_eq!(c["cpu"].0, "64");
        assert_eq!(c["memory"].0, "128Gi", "a 0 from the site is ignored");
        assert_eq!(c["nvidia.com/gpu"].0, "8");
        assert_eq!(c["pods"].0, "100");
    }
}
