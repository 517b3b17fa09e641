//! What rule selectors and service frontends stand for: addresses,
//! resolved from the endpoints, network sets and Kubernetes objects of a
//! policy set. Shared by the reference semantics and the compiler, so both
//! resolve the same way.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use crate::policy::{kubernetes::Object, selector::Selector, Policy, PolicySet};

/// An endpoint or network set a rule selector can pick: its labels, its
/// namespace (none for host endpoints and global sets) and its addresses.
struct Selectable {
    labels: BTreeMap<String, String>,
    namespace: Option<String>,
    nets: Vec<IpNet>,
}

fn selectables(set: &PolicySet) -> Vec<Selectable> {
    let mut out = Vec::new();
    for h in &set.host_endpoints {
        out.push(Selectable {
            labels: h.labels.clone(),
            namespace: None,
            nets: h.expected_ips.iter().map(|ip| IpNet::from(*ip)).collect(),
        });
    }
    for n in &set.network_sets {
        let mut labels = n.labels.clone();
        if let Some(ns) = &n.namespace {
            labels.insert("projectcalico.org/namespace".into(), ns.clone());
        }
        out.push(Selectable {
            labels,
            namespace: n.namespace.clone(),
            nets: n.nets.clone(),
        });
    }
    for o in &set.objects {
        if let Object::Pod {
            namespace,
            labels,
            ips,
            service_account,
            ..
        } = o
        {
            out.push(Selectable {
                labels: workload_labels(set, namespace, labels, service_account),
                namespace: Some(namespace.clone()),
                nets: ips.iter().map(|ip| IpNet::from(*ip)).collect(),
            });
        }
    }
    out
}

/// A pod's labels as Calico gives its workload endpoint: its own, plus
/// `projectcalico.org/namespace`, `projectcalico.org/orchestrator: k8s`,
/// `projectcalico.org/serviceaccount`, its namespace's labels as
/// `pcns.<key>` (from the `kns.<namespace>` profile) and its service
/// account's as `pcsa.<key>` (from `ksa.<namespace>.<name>`, with
/// `pcsa.projectcalico.org/name`).
pub fn workload_labels(
    set: &PolicySet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    service_account: &str,
) -> BTreeMap<String, String> {
    let mut out = labels.clone();
    for (k, v) in namespace_labels(set, namespace) {
        out.insert(format!("pcns.{k}"), v);
    }
    let sa_labels = set.objects.iter().find_map(|o| match o {
        Object::ServiceAccount {
            namespace: ns,
            name,
            labels,
        } if ns == namespace && name == service_account => Some(labels.clone()),
        _ => None,
    });
    for (k, v) in sa_labels.unwrap_or_default() {
        out.insert(format!("pcsa.{k}"), v);
    }
    out.insert(
        "pcsa.projectcalico.org/name".into(),
        service_account.to_string(),
    );
    out.insert("projectcalico.org/namespace".into(), namespace.to_string());
    out.insert("projectcalico.org/orchestrator".into(), "k8s".into());
    out.insert(
        "projectcalico.org/serviceaccount".into(),
        service_account.to_string(),
    );
    out
}

/// Labels of namespace `ns` (its Namespace object's, or just its name).
pub fn namespace_labels(set: &PolicySet, ns: &str) -> BTreeMap<String, String> {
    set.objects
        .iter()
        .find_map(|o| match o {
            Object::Namespace { name, labels } if name == ns => Some(labels.clone()),
            _ => None,
        })
        .unwrap_or_else(|| BTreeMap::from([("projectcalico.org/name".to_string(), ns.to_string())]))
}

/// The addresses `selector` stands for in a rule of `policy`, within the
/// namespaces `namespace_selector` picks (SEMANTICS.md: endpoints and
/// network sets it selects, never Node objects; in a namespaced policy
/// only within its namespace unless namespaceSelector says otherwise;
/// `global()` picks the non-namespaced ones). Empty: matches nothing.
pub fn selected_nets(
    set: &PolicySet,
    policy: &Policy,
    selector: &Selector,
    namespace_selector: Option<&Selector>,
) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = selectables(set)
        .into_iter()
        .filter(|s| {
            let in_scope = match namespace_selector {
                Some(Selector::Global) => s.namespace.is_none(),
                Some(ns_sel) => s
                    .namespace
                    .as_deref()
                    .is_some_and(|ns| ns_sel.matches(&namespace_labels(set, ns))),
                None => match &policy.namespace {
                    Some(own) => s.namespace.as_deref() == Some(own.as_str()),
                    None => true,
                },
            };
            in_scope && selector.matches(&s.labels)
        })
        .flat_map(|s| s.nets)
        .collect();
    nets.sort();
    nets.dedup();
    nets
}

/// An address and port a Service exposes on the node's interfaces.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub protocol: u8,
    pub port: u16,
}

/// What `allow-node-port-dnat` allows, resolved from the Services (the
/// destination before kube-proxy's DNAT): every node address with each
/// nodePort (NodePort and LoadBalancer services), each LoadBalancer
/// ingress IP and each externalIP with each service port.
pub fn service_frontends(set: &PolicySet) -> Vec<Frontend> {
    let nodes: Vec<IpAddr> = set
        .objects
        .iter()
        .flat_map(|o| match o {
            Object::Node { addresses, .. } => addresses.clone(),
            _ => Vec::new(),
        })
        .collect();
    let mut out = Vec::new();
    for o in &set.objects {
        let Object::Service {
            service_type,
            ports,
            external_ips,
            load_balancer_ips,
            ..
        } = o
        else {
            continue;
        };
        for p in ports {
            if matches!(service_type.as_str(), "NodePort" | "LoadBalancer") {
                if let Some(np) = p.node_port {
                    out.extend(nodes.iter().map(|a| Frontend {
                        addr: *a,
                        protocol: p.protocol,
                        port: np,
                    }));
                }
            }
            for a in external_ips
                .iter()
                .chain(if service_type == "LoadBalancer" {
                    load_balancer_ips.as_slice()
                } else {
                    &[]
                })
            {
                out.push(Frontend {
                    addr: *a,
                    protocol: p.protocol,
                    port: p.port,
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
