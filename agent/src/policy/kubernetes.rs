//! Kubernetes objects: `networking.k8s.io/v1 NetworkPolicy`, converted to
//! a Calico policy the way Calico converts it, and the `Namespace`, `Pod`,
//! `Node` and `Service` objects selectors and services resolve against.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::policy::{
    parse_net, selector::Selector, Action, EntityMatch, Origin, Policy, PolicyKind, PortRange, Rule,
};

type FieldResult<T> = Result<T, (String, String)>;

/// Calico's order for converted Kubernetes NetworkPolicies.
pub const KUBERNETES_POLICY_ORDER: f64 = 1000.0;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<RawLabelExpression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabelExpression {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    pod_selector: RawLabelSelector,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
    ingress: Option<Vec<RawIngress>>,
    egress: Option<Vec<RawEgress>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngress {
    from: Option<Vec<RawPeer>>,
    ports: Option<Vec<RawPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    to: Option<Vec<RawPeer>>,
    ports: Option<Vec<RawPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeer {
    pod_selector: Option<RawLabelSelector>,
    namespace_selector: Option<RawLabelSelector>,
    ip_block: Option<RawIpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    protocol: Option<String>,
    port: Option<Value>,
    end_port: Option<i64>,
}

/// A Kubernetes label selector as a Calico selector (`None`: matches all).
fn label_selector(raw: &RawLabelSelector, field: &str) -> FieldResult<Option<Selector>> {
    let mut terms = Vec::new();
    for (k, v) in &raw.match_labels {
        terms.push(Selector::Eq(k.clone(), v.clone()));
    }
    for (i, e) in raw.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let term = match e.operator.as_str() {
            "In" => Selector::In(e.key.clone(), e.values.clone()),
            "NotIn" => Selector::NotIn(e.key.clone(), e.values.clone()),
            "Exists" => Selector::Has(e.key.clone()),
            "DoesNotExist" => Selector::Not(Box::new(Selector::Has(e.key.clone()))),
            other => {
                return Err((
                    format!("{f}.operator"),
                    format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                ))
            }
        };
        if matches!(e.operator.as_str(), "In" | "NotIn") && e.values.is_empty() {
            return Err((format!("{f}.values"), "In and NotIn need values".into()));
        }
        terms.push(term);
    }
    // Balanced, so thousands of expressions cost no deep recursion.
    Ok((!terms.is_empty()).then(|| Selector::all_of(terms)))
}

fn and(a: Selector, b: Option<Selector>) -> Selector {
    match b {
        Some(b) => Selector::And(Box::new(a), Box::new(b)),
        None => a,
    }
}

/// The pods of namespace `ns` that `sel` picks, as Calico writes it.
fn pods_of(ns: &str, sel: Option<Selector>) -> Selector {
    let base = Selector::And(
        Box::new(Selector::Eq(
            "projectcalico.org/orchestrator".into(),
            "k8s".into(),
        )),
        Box::new(Selector::Eq(
            "projectcalico.org/namespace".into(),
            ns.into(),
        )),
    );
    and(base, sel)
}

/// (protocol, ports) groups of a rule's `ports` list; one empty group when
/// the list is empty (all protocols and ports).
type PortGroup = (Option<u8>, Vec<PortRange>, Vec<String>);

fn port_groups(raw: &[RawPort], field: &str) -> FieldResult<Vec<PortGroup>> {
    if raw.is_empty() {
        return Ok(vec![(None, Vec::new(), Vec::new())]);
    }
    let mut groups: Vec<PortGroup> = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => 6,
            "UDP" => 17,
            "SCTP" => 132,
            other => {
                return Err((
                    format!("{f}.protocol"),
                    format!("{other:?} is not TCP, UDP or SCTP"),
                ))
            }
        };
        let mut name = None;
        let range = match &p.port {
            None => None,
            Some(Value::Number(n)) => {
                let lo = n
                    .as_i64()
                    .filter(|n| (1..=65535).contains(n))
                    .ok_or_else(|| {
                        (
                            format!("{f}.port"),
                            format!("port {n} is out of range 1-65535"),
                        )
                    })?;
                let hi = match p.end_port {
                    None => lo,
                    Some(e) if (lo..=65535).contains(&e) => e,
                    Some(e) => {
                        return Err((
                            format!("{f}.endPort"),
                            format!("endPort {e} is below port {lo} or above 65535"),
                        ))
                    }
                };
                Some(PortRange {
                    lo: lo as u16,
                    hi: hi as u16,
                })
            }
            Some(Value::String(s)) if crate::policy::named_ports::is_port_name(s) => {
                name = Some(s.clone());
                None
            }
            Some(Value::String(s)) => {
                return Err((
                    format!("{f}.port"),
                    format!("{s:?} is neither a port number nor a port name"),
                ))
            }
            Some(other) => return Err((format!("{f}.port"), format!("{other:?} is not a port"))),
        };
        if p.end_port.is_some() && !matches!(p.port, Some(Value::Number(_))) {
            return Err((
                format!("{f}.endPort"),
                "endPort needs a numeric port".into(),
            ));
        }
        match groups.iter_mut().find(|(pr, _, _)| *pr == Some(protocol)) {
            Some((_, ports, names)) => {
                ports.extend(range);
                names.extend(name);
            }
            None => groups.push((
                Some(protocol),
                range.into_iter().collect(),
                name.into_iter().collect(),
            )),
        }
    }
    // A protocol listed without a port means every port of it.
    for (i, p) in raw.iter().enumerate() {
        let _ = i;
        if p.port.is_none() {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => 17,
                "SCTP" => 132,
                _ => 6,
            };
            if let Some((_, ports, names)) =
                groups.iter_mut().find(|(pr, _, _)| *pr == Some(protocol))
            {
                ports.clear();
                names.clear();
            }
        }
    }
    Ok(groups)
}

/// The peers of a rule as entity matches; one "anywhere" when absent.
fn peers(raw: &Option<Vec<RawPeer>>, ns: &str, field: &str) -> FieldResult<Vec<EntityMatch>> {
    let Some(list) = raw else {
        return Ok(vec![EntityMatch::default()]);
    };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
            (None, None, Some(block)) => {
                let cidr = parse_net(&block.cidr).map_err(|m| (format!("{f}.ipBlock.cidr"), m))?;
                let mut not_nets = Vec::new();
                for (j, e) in block.except.iter().enumerate() {
                    let n: IpNet =
                        parse_net(e).map_err(|m| (format!("{f}.ipBlock.except[{j}]"), m))?;
                    not_nets.push(n);
                }
                out.push(EntityMatch {
                    nets: vec![cidr],
                    not_nets,
                    ..Default::default()
                });
            }
            (pods, namespaces, None) if pods.is_some() || namespaces.is_some() => {
                let pod_sel = match pods {
                    Some(s) => label_selector(s, &format!("{f}.podSelector"))?,
                    None => None,
                };
                match namespaces {
                    // Pods of the policy's own namespace.
                    None => out.push(EntityMatch {
                        selector: Some(pods_of(ns, pod_sel)),
                        ..Default::default()
                    }),
                    // Pods (all, or those picked) of the namespaces picked:
                    // both selectors must hold (AND).
                    Some(n) => {
                        let ns_sel = label_selector(n, &format!("{f}.namespaceSelector"))?
                            .unwrap_or(Selector::All);
                        let pods = and(
                            Selector::Eq("projectcalico.org/orchestrator".into(), "k8s".into()),
                            pod_sel,
                        );
                        out.push(EntityMatch {
                            selector: Some(pods),
                            namespace_selector: Some(ns_sel),
                            ..Default::default()
                        });
                    }
                }
            }
            _ => {
                return Err((
                    f,
                    "a peer needs exactly one of ipBlock, or podSelector and/or namespaceSelector"
                        .into(),
                ))
            }
        }
    }
    Ok(out)
}

/// The Allow rules of one ingress (`peer_is_source`) or egress rule: one per
/// peer and protocol, the ports on the destination.
fn allow_rules(
    peer_list: &Option<Vec<RawPeer>>,
    ports: &Option<Vec<RawPort>>,
    ns: &str,
    field: &str,
    peer_key: &str,
    peer_is_source: bool,
) -> FieldResult<Vec<Rule>> {
    let mut out = Vec::new();
    for peer in peers(peer_list, ns, &format!("{field}.{peer_key}"))? {
        for (protocol, ports, names) in port_groups(
            ports.as_deref().unwrap_or_default(),
            &format!("{field}.ports"),
        )? {
            let (source, mut destination) = if peer_is_source {
                (peer.clone(), EntityMatch::default())
            } else {
                (EntityMatch::default(), peer.clone())
            };
            destination.ports = ports;
            destination.named_ports = names;
            out.push(Rule {
                action: Action::Allow,
                protocol,
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                ip_version: None,
                source,
                destination,
            });
        }
    }
    Ok(out)
}

/// Converts a Kubernetes NetworkPolicy as Calico does: order 1000, the
/// pods of its namespace, one Allow rule per peer and protocol.
pub fn network_policy(
    name: &str,
    namespace: Option<&str>,
    spec: Value,
    origin: Origin,
) -> FieldResult<Policy> {
    let ns = namespace.unwrap_or("default");
    let raw: RawSpec = serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        (format!("spec.{path}"), e.inner().to_string())
    })?;
    let selector = pods_of(ns, label_selector(&raw.pod_selector, "spec.podSelector")?);
    let ingress_raw = raw.ingress.unwrap_or_default();
    let egress_raw = raw.egress.unwrap_or_default();
    let (ingress_applies, egress_applies) = match &raw.policy_types {
        Some(types) => {
            let mut t = (false, false);
            for (i, ty) in types.iter().enumerate() {
                match ty.as_str() {
                    "Ingress" => t.0 = true,
                    "Egress" => t.1 = true,
                    other => {
                        return Err((
                            format!("spec.policyTypes[{i}]"),
                            format!("{other:?} is not Ingress or Egress"),
                        ))
                    }
                }
            }
            t
        }
        None => (true, !egress_raw.is_empty()),
    };
    let mut ingress = Vec::new();
    for (i, r) in ingress_raw.iter().enumerate() {
        let field = format!("spec.ingress[{i}]");
        ingress.extend(allow_rules(&r.from, &r.ports, ns, &field, "from", true)?);
    }
    let mut egress = Vec::new();
    for (i, r) in egress_raw.iter().enumerate() {
        let field = format!("spec.egress[{i}]");
        egress.extend(allow_rules(&r.to, &r.ports, ns, &field, "to", false)?);
    }
    Ok(Policy {
        kind: PolicyKind::KubernetesNetworkPolicy,
        name: format!("knp.default.{name}"),
        namespace: Some(ns.to_string()),
        order: Some(KUBERNETES_POLICY_ORDER),
        selector,
        namespace_selector: None,
        pre_dnat: false,
        do_not_track: false,
        apply_on_forward: false,
        tier: crate::policy::tier::DEFAULT_TIER.into(),
        ingress_applies,
        egress_applies,
        ingress,
        egress,
        origin,
    })
}

/// A port a Service exposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub protocol: u8,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// The Kubernetes objects policy resolves against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace {
        name: String,
        labels: BTreeMap<String, String>,
    },
    Pod {
        namespace: String,
        name: String,
        labels: BTreeMap<String, String>,
        ips: Vec<IpAddr>,
        node: Option<String>,
        /// Container ports that have a name.
        ports: Vec<crate::policy::named_ports::NamedPort>,
        /// `spec.serviceAccountName` (`default` when not given).
        service_account: String,
    },
    ServiceAccount {
        namespace: String,
        name: String,
        labels: BTreeMap<String, String>,
    },
    Node {
        name: String,
        labels: BTreeMap<String, String>,
        addresses: Vec<IpAddr>,
    },
    Service {
        namespace: String,
        name: String,
        service_type: String,
        ports: Vec<ServicePort>,
        external_ips: Vec<IpAddr>,
        load_balancer_ips: Vec<IpAddr>,
    },
}

fn ips<'a>(values: impl Iterator<Item = &'a Value>, field: &str) -> FieldResult<Vec<IpAddr>> {
    values
        .filter_map(|v| v.as_str())
        .map(|s| {
            s.parse()
                .map_err(|_| (field.to_string(), format!("{s:?} is not an IP address")))
        })
        .collect()
}

fn seq<'a>(v: Option<&'a Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
}

/// Reads the fields of a `v1` object that policy needs; the rest of what
/// `kubectl get -o yaml` prints is state, not policy, and is skipped.
pub fn object(
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    labels: &BTreeMap<String, String>,
    spec: Value,
    status: Option<Value>,
) -> FieldResult<Object> {
    let ns = namespace.unwrap_or("default").to_string();
    let status = status.as_ref();
    Ok(match kind {
        "Namespace" => {
            let mut labels = labels.clone();
            labels.insert("projectcalico.org/name".into(), name.into());
            Object::Namespace {
                name: name.into(),
                labels,
            }
        }
        "Pod" => {
            let mut all = ips(
                seq(status, "podIPs").filter_map(|p| p.get("ip")),
                "status.podIPs",
            )?;
            if all.is_empty() {
                all = ips(
                    status.and_then(|s| s.get("podIP")).into_iter(),
                    "status.podIP",
                )?;
            }
            Object::Pod {
                namespace: ns,
                name: name.into(),
                labels: labels.clone(),
                ips: all,
                ports: crate::policy::named_ports::pod_ports(&spec)?,
                service_account: spec
                    .get("serviceAccountName")
                    .or_else(|| spec.get("serviceAccount"))
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .into(),
                node: spec
                    .get("nodeName")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }
        }
        "ServiceAccount" => Object::ServiceAccount {
            namespace: ns,
            name: name.into(),
            labels: labels.clone(),
        },
        "Node" => Object::Node {
            name: name.into(),
            labels: labels.clone(),
            addresses: ips(
                seq(status, "addresses")
                    .filter(|a| {
                        matches!(
                            a.get("type").and_then(Value::as_str),
                            Some("InternalIP" | "ExternalIP")
                        )
                    })
                    .filter_map(|a| a.get("address")),
                "status.addresses",
            )?,
        },
        _ => {
            let mut ports = Vec::new();
            for (i, p) in seq(Some(&spec), "ports").enumerate() {
                let f = format!("spec.ports[{i}]");
                let protocol = match p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") {
                    "TCP" => 6,
                    "UDP" => 17,
                    "SCTP" => 132,
                    other => {
                        return Err((
                            format!("{f}.protocol"),
                            format!("{other:?} is not TCP, UDP or SCTP"),
                        ))
                    }
                };
                let num = |key: &str| -> FieldResult<Option<u16>> {
                    match p.get(key).and_then(Value::as_i64) {
                        None => Ok(None),
                        Some(n) if (1..=65535).contains(&n) => Ok(Some(n as u16)),
                        Some(n) => {
                            Err((format!("{f}.{key}"), format!("{n} is out of range 1-65535")))
                        }
                    }
                };
                let port =
                    num("port")?.ok_or_else(|| (format!("{f}.port"), "missing".to_string()))?;
                ports.push(ServicePort {
                    protocol,
                    port,
                    node_port: num("nodePort")?,
                });
            }
            Object::Service {
                namespace: ns,
                name: name.into(),
                service_type: spec
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("ClusterIP")
                    .into(),
                ports,
                external_ips: ips(seq(Some(&spec), "externalIPs"), "spec.externalIPs")?,
                load_balancer_ips: ips(
                    status
                        .and_then(|s| s.get("loadBalancer"))
                        .map(|lb| seq(Some(lb), "ingress"))
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.get("ip")),
                    "status.loadBalancer.ingress",
                )?,
            }
        }
    })
}
