//! The Kubernetes resources a Kubernetes API source watches: the one list
//! the source's watchers and the deployment's RBAC rules (checked by a
//! test against `deploy/`) are both derived from.

/// One watched resource type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    /// API group (`""` for the core group).
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as RBAC rules and URLs spell it.
    pub resource: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

const fn w(
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Watched {
    Watched {
        group,
        version,
        resource,
        kind,
        namespaced,
    }
}

/// Everything the Kubernetes source lists and watches (read-only: get,
/// list, watch): Calico's CRDs, Kubernetes NetworkPolicies, and the
/// objects selectors and `allow-node-port-dnat` resolve against.
pub const WATCHED: [Watched; 10] = [
    w(
        "crd.projectcalico.org",
        "v1",
        "globalnetworkpolicies",
        "GlobalNetworkPolicy",
        false,
    ),
    w(
        "crd.projectcalico.org",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
    w(
        "crd.projectcalico.org",
        "v1",
        "hostendpoints",
        "HostEndpoint",
        false,
    ),
    w(
        "crd.projectcalico.org",
        "v1",
        "globalnetworksets",
        "GlobalNetworkSet",
        false,
    ),
    w(
        "crd.projectcalico.org",
        "v1",
        "networksets",
        "NetworkSet",
        true,
    ),
    w(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
    w("", "v1", "services", "Service", true),
    w("", "v1", "nodes", "Node", false),
    w("", "v1", "namespaces", "Namespace", false),
    w("", "v1", "pods", "Pod", true),
];

/// The verbs the agent needs on what it watches.
pub const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

/// Events the agent records about invalid objects: (group, resource).
pub const EVENTS: [(&str, &str); 2] = [("", "events"), ("events.k8s.io", "events")];
/// The verbs recording an event needs.
pub const EVENT_VERBS: [&str; 2] = ["create", "patch"];
