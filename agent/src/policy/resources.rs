//! The policy model: the resources moat reads, validated (policies and
//! their rules, host endpoints, network sets, failsafes), the set they form,
//! and the errors that name what was wrong.

use super::*;

/// API groups under which Calico resources are accepted.
pub(super) const CALICO_API_VERSIONS: [&str; 2] =
    ["projectcalico.org/v3", "crd.projectcalico.org/v1"];
/// API group of moat's own resources.
pub const MOAT_API_VERSION: &str = "moat.dev/v1alpha1";
/// Calico's profile that allows everything.
pub const DEFAULT_ALLOW_PROFILE: &str = "projectcalico-default-allow";

/// One problem with one resource (or one file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// `Kind/name` or `Kind/namespace/name`; empty when the file itself is bad.
    pub resource: String,
    /// Field path such as `spec.ingress[0].destination.ports[1]`; may be empty.
    pub field: String,
    pub message: String,
    /// 0-based index of the document (or `List` item) in the file, when
    /// the problem is in one.
    pub document: Option<usize>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if !self.resource.is_empty() {
            write!(f, ": {}", self.resource)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Where a resource came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 0-based index of the YAML document (or `List` item) in the file.
    pub document: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
    Log,
    Pass,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpMatch {
    pub icmp_type: u8,
    pub code: Option<u8>,
}

/// `source` or `destination` of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntityMatch {
    /// Empty: any address.
    pub nets: Vec<IpNet>,
    /// The address must be in none of these.
    pub not_nets: Vec<IpNet>,
    /// Empty: any port.
    pub ports: Vec<PortRange>,
    /// The port must be in none of these.
    pub not_ports: Vec<PortRange>,
    /// Ports by name (`named_ports`): with `ports`, the port must be in
    /// one of the ranges or be one of these.
    pub named_ports: Vec<String>,
    /// Addresses of the endpoints and network sets it selects.
    pub selector: Option<Selector>,
    /// The address must not belong to what this selects.
    pub not_selector: Option<Selector>,
    /// Namespaces whose endpoints `selector` picks from (`global()`: the
    /// non-namespaced ones).
    pub namespace_selector: Option<Selector>,
    /// moat's `moatServiceFrontends: true` (destination only): the address
    /// and port must be a frontend a Service exposes on the node, resolved
    /// from the Services (what `allow-node-port-dnat` allows before DNAT).
    pub service_frontends: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub protocol: Option<u8>,
    pub not_protocol: Option<u8>,
    pub icmp: Option<IcmpMatch>,
    pub not_icmp: Option<IcmpMatch>,
    pub ip_version: Option<u8>,
    pub source: EntityMatch,
    pub destination: EntityMatch,
}

/// Which resource a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PolicyKind {
    GlobalNetworkPolicy,
    /// Calico `NetworkPolicy`: applies to workload endpoints (pods) of its
    /// namespace only.
    NetworkPolicy,
    /// Kubernetes `networking.k8s.io/v1 NetworkPolicy`, converted as Calico
    /// does (order 1000, selecting the pods of its namespace).
    KubernetesNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: String,
    /// For namespaced policies.
    pub namespace: Option<String>,
    pub order: Option<f64>,
    pub selector: Selector,
    /// GlobalNetworkPolicy `namespaceSelector`: the policy applies to the
    /// workload endpoints of matching namespaces (never to host endpoints).
    pub namespace_selector: Option<Selector>,
    pub pre_dnat: bool,
    pub do_not_track: bool,
    pub apply_on_forward: bool,
    pub ingress_applies: bool,
    pub egress_applies: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// `spec.tier` (`default` when not given).
    pub tier: String,
    pub origin: Origin,
}

impl Policy {
    /// The rules for direction `dir` (`moat_common::direction`), or `None`
    /// when the policy does not apply in that direction (its `types`).
    pub fn rules(&self, dir: u8) -> Option<&[Rule]> {
        if dir == moat_common::direction::INGRESS {
            self.ingress_applies.then_some(self.ingress.as_slice())
        } else {
            self.egress_applies.then_some(self.egress.as_slice())
        }
    }

    /// Calico's tie-break key for equal orders: "name/namespace/kind".
    fn sort_key(&self) -> String {
        let kind = match self.kind {
            PolicyKind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            _ => "NetworkPolicy",
        };
        format!(
            "{}/{}/{kind}",
            self.name,
            self.namespace.as_deref().unwrap_or("")
        )
    }

    /// `Kind/name` or `Kind/namespace/name`.
    pub fn resource(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.kind.as_str(), self.name),
            None => format!("{}/{}", self.kind.as_str(), self.name),
        }
    }

    /// Whether the policy can select host endpoints at all: namespaced
    /// policies and those with a `namespaceSelector` govern pods only.
    pub fn can_select_host_endpoints(&self) -> bool {
        self.kind == PolicyKind::GlobalNetworkPolicy && self.namespace_selector.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEndpoint {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub interface_name: String,
    pub expected_ips: Vec<std::net::IpAddr>,
    /// Whether `projectcalico-default-allow` is among its profiles.
    pub default_allow: bool,
    /// `spec.profiles`, in order (`projectcalico-default-allow` included).
    pub profiles: Vec<String>,
    /// `spec.ports`: ports by name, for rules' named ports.
    pub ports: Vec<named_ports::NamedPort>,
    pub origin: Origin,
}

/// A failsafe port: always allowed, before any policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailsafePort {
    pub protocol: u8,
    pub port: u16,
    /// For inbound: the source must be inside; for outbound: the destination.
    pub net: Option<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failsafes {
    pub inbound: Vec<FailsafePort>,
    pub outbound: Vec<FailsafePort>,
}

impl Failsafes {
    /// Calico's defaults (FelixConfiguration `failsafeInboundHostPorts` and
    /// `failsafeOutboundHostPorts` when unset).
    pub fn calico_defaults() -> Self {
        let tcp = |port| FailsafePort {
            protocol: 6,
            port,
            net: None,
        };
        let udp = |port| FailsafePort {
            protocol: 17,
            port,
            net: None,
        };
        let common = [179, 2379, 2380, 5473, 6443, 6666, 6667].map(tcp);
        let mut inbound = vec![tcp(22), udp(68)];
        inbound.extend(common.clone());
        let mut outbound = vec![udp(53), udp(67)];
        outbound.extend(common);
        Failsafes { inbound, outbound }
    }
}

/// moat's extension: failsafes for the host endpoints a selector picks,
/// replacing the global ones for them.
#[derive(Clone, Debug, PartialEq)]
pub struct FailsafeProfile {
    pub name: String,
    pub selector: Selector,
    pub failsafes: Failsafes,
    pub origin: Origin,
}

/// Everything read from a policy source, validated.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// In Calico's evaluation order.
    pub policies: Vec<Policy>,
    pub host_endpoints: Vec<HostEndpoint>,
    /// From FelixConfiguration `default`; `None` means Calico's defaults.
    pub failsafes: Option<Failsafes>,
    pub failsafe_profiles: Vec<FailsafeProfile>,
    pub network_sets: Vec<NetworkSet>,
    /// Namespaces, pods, nodes and services that selectors and
    /// `allow-node-port-dnat` resolve against.
    pub objects: Vec<crate::policy::kubernetes::Object>,
    /// `Tier` resources (the built-in ones are added by `tier::ordered`).
    pub tiers: Vec<tier::Tier>,
    /// `Profile` resources.
    pub profiles: Vec<tier::CalicoProfile>,
}

/// A GlobalNetworkSet (no namespace) or NetworkSet: labelled nets that rule
/// selectors can pick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSet {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub nets: Vec<IpNet>,
    pub origin: Origin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawNetworkSetSpec {
    #[serde(default)]
    nets: Vec<String>,
    allowed_egress_domains: Option<Vec<String>>,
}

impl NetworkSet {
    pub fn resource(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("NetworkSet/{ns}/{}", self.name),
            None => format!("GlobalNetworkSet/{}", self.name),
        }
    }
}

pub(super) fn network_set(
    meta: &Metadata,
    spec: Value,
    origin: Origin,
    namespaced: bool,
) -> FieldResult<NetworkSet> {
    let raw: RawNetworkSetSpec = if spec.is_null() {
        RawNetworkSetSpec {
            nets: Vec::new(),
            allowed_egress_domains: None,
        }
    } else {
        serde_path_to_error::deserialize(spec).map_err(spec_error)?
    };
    if raw.allowed_egress_domains.is_some_and(|d| !d.is_empty()) {
        return not_yet("spec.allowedEgressDomains", "DNS-based network sets");
    }
    let nets = raw
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| parse_net(n).map_err(|m| (format!("spec.nets[{i}]"), m)))
        .collect::<FieldResult<Vec<_>>>()?;
    Ok(NetworkSet {
        name: meta.name.clone(),
        namespace: namespaced.then(|| meta.namespace.clone().unwrap_or_else(|| "default".into())),
        labels: meta.labels.clone(),
        nets,
        origin,
    })
}

impl PolicySet {
    /// Failsafes that apply to `hep`.
    pub fn failsafes_for(&self, hep: &HostEndpoint) -> Result<Failsafes, String> {
        let picked: Vec<&FailsafeProfile> = self
            .failsafe_profiles
            .iter()
            .filter(|p| p.selector.matches(&hep.labels))
            .collect();
        match picked.as_slice() {
            [] => Ok(self
                .failsafes
                .clone()
                .unwrap_or_else(Failsafes::calico_defaults)),
            [one] => Ok(one.failsafes.clone()),
            many => Err(format!(
                "HostEndpoint/{} is selected by several FailsafeProfiles ({}); make their selectors disjoint",
                hep.name,
                many.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// Policies that select `hep`, in evaluation order.
    pub fn policies_for<'a>(&'a self, hep: &'a HostEndpoint) -> impl Iterator<Item = &'a Policy> {
        self.policies
            .iter()
            .filter(move |p| p.can_select_host_endpoints() && p.selector.matches(&hep.labels))
    }

    /// Puts policies in Calico's evaluation order (and the rest by name).
    pub fn sort(&mut self) {
        self.policies.sort_by(|a, b| {
            // Missing order sorts after every number.
            let oa = a.order.unwrap_or(f64::INFINITY);
            let ob = b.order.unwrap_or(f64::INFINITY);
            oa.total_cmp(&ob)
                .then_with(|| a.order.is_none().cmp(&b.order.is_none()))
                .then_with(|| a.sort_key().cmp(&b.sort_key()))
        });
        self.host_endpoints.sort_by(|a, b| a.name.cmp(&b.name));
        self.failsafe_profiles.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

/// Result of loading: what is valid, and every error about what is not.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub set: PolicySet,
    pub errors: Vec<PolicyError>,
    /// Files read.
    pub files: usize,
    /// Files skipped as unfilled templates (also reported in `errors`).
    pub placeholder_files: Vec<PathBuf>,
    /// Paths of the directory not read, each with why (symlink loops,
    /// second paths to a directory, depth): `tree::walk`.
    pub skipped: Vec<String>,
}

impl Loaded {
    /// Objects (or files, for a file-level error) that are invalid: an
    /// object with several problems counts once.
    pub fn invalid_objects(&self) -> usize {
        let mut seen: Vec<(&Path, Option<usize>, &str)> = self
            .errors
            .iter()
            .map(|e| (e.file.as_path(), e.document, e.resource.as_str()))
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    }
}
