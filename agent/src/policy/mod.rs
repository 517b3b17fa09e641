//! Reading and validating policy resources.
//!
//! This version understands Calico `GlobalNetworkPolicy`, `HostEndpoint`
//! and `FelixConfiguration` (failsafe ports), plus moat's own
//! `FailsafeProfile`. Everything it reads it enforces exactly; every field
//! or kind it does not enforce yet is rejected with an error that says so,
//! never skipped. Errors name the file, the resource and the field.

pub mod kubernetes;
pub mod named_ports;
pub mod packet_spec;
pub mod profiles;
pub mod reference;
pub mod resolve;
pub mod selector;
pub mod service_accounts;
pub mod tier;

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::policy::selector::Selector;

/// API groups under which Calico resources are accepted.
const CALICO_API_VERSIONS: [&str; 2] = ["projectcalico.org/v3", "crd.projectcalico.org/v1"];
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
struct RawNetworkSetSpec {
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

fn network_set(
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
}

/// Selector label keys that no known object carries but that are close to
/// one that some object does (`ibm.rol` for `ibm.role`): likely typos. A
/// key far from every known one is not reported (its objects may simply
/// not be in the set).
pub fn label_key_warnings(set: &PolicySet) -> Vec<PolicyError> {
    use crate::policy::kubernetes::Object;
    let mut known: Vec<String> = [
        "projectcalico.org/namespace",
        "projectcalico.org/orchestrator",
        "projectcalico.org/name",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    let mut add = |labels: &BTreeMap<String, String>| known.extend(labels.keys().cloned());
    set.host_endpoints.iter().for_each(|h| add(&h.labels));
    set.network_sets.iter().for_each(|n| add(&n.labels));
    for o in &set.objects {
        match o {
            Object::Namespace { labels, .. }
            | Object::Pod { labels, .. }
            | Object::Node { labels, .. }
            | Object::ServiceAccount { labels, .. } => add(labels),
            Object::Service { .. } => {}
        }
    }
    known.sort();
    known.dedup();
    let known_refs: Vec<&str> = known.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for p in &set.policies {
        let mut selectors: Vec<(String, &Selector)> = vec![("spec.selector".into(), &p.selector)];
        if let Some(ns) = &p.namespace_selector {
            selectors.push(("spec.namespaceSelector".into(), ns));
        }
        for (list, name) in [(&p.ingress, "ingress"), (&p.egress, "egress")] {
            for (i, r) in list.iter().enumerate() {
                for (e, side) in [(&r.source, "source"), (&r.destination, "destination")] {
                    for (sel, f) in [
                        (&e.selector, "selector"),
                        (&e.not_selector, "notSelector"),
                        (&e.namespace_selector, "namespaceSelector"),
                    ] {
                        if let Some(sel) = sel {
                            selectors.push((format!("spec.{name}[{i}].{side}.{f}"), sel));
                        }
                    }
                }
            }
        }
        for (field, sel) in selectors {
            for key in sel.label_keys() {
                if known.iter().any(|k| k == key) {
                    continue;
                }
                if let Some(near) = did_you_mean(key, &known_refs) {
                    out.push(PolicyError {
                        file: p.origin.file.clone(),
                        resource: p.resource(),
                        field: field.clone(),
                        message: format!(
                            "label key `{key}` is on no known object, did you mean `{near}`?"
                        ),
                    });
                }
            }
        }
    }
    out
}

/// Keeps the policy in force safe through a bad edit: every object of
/// `previous` (the last good set) whose new version is invalid, or whose
/// file no longer parses, stays in `loaded.set` in its last good version;
/// a new invalid object is not applied (it has no previous version). The
/// errors stay reported. Returns one line per object kept.
pub fn keep_last_good(previous: &PolicySet, loaded: &mut Loaded) -> Vec<String> {
    let mut kept = Vec::new();
    let failed = |resource: &str, file: &Path| {
        loaded
            .errors
            .iter()
            .any(|e| e.resource == resource || (e.resource.is_empty() && e.file == file))
    };
    let mut policies = Vec::new();
    for p in &previous.policies {
        let r = p.resource();
        if failed(&r, &p.origin.file) && !loaded.set.policies.iter().any(|n| n.resource() == r) {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            policies.push(p.clone());
        }
    }
    let mut heps = Vec::new();
    for h in &previous.host_endpoints {
        let r = format!("HostEndpoint/{}", h.name);
        if failed(&r, &h.origin.file) && !loaded.set.host_endpoints.iter().any(|n| n.name == h.name)
        {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            heps.push(h.clone());
        }
    }
    let mut sets = Vec::new();
    for n in &previous.network_sets {
        let r = n.resource();
        if failed(&r, &n.origin.file) && !loaded.set.network_sets.iter().any(|m| m.resource() == r)
        {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            sets.push(n.clone());
        }
    }
    let mut failsafes = Vec::new();
    for f in &previous.failsafe_profiles {
        let r = format!("FailsafeProfile/{}", f.name);
        if failed(&r, &f.origin.file)
            && !loaded
                .set
                .failsafe_profiles
                .iter()
                .any(|g| g.name == f.name)
        {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            failsafes.push(f.clone());
        }
    }
    loaded.set.policies.extend(policies);
    loaded.set.host_endpoints.extend(heps);
    loaded.set.network_sets.extend(sets);
    loaded.set.failsafe_profiles.extend(failsafes);
    loaded.set.sort();
    kept
}

/// Reads every `.yaml`, `.yml` and `.json` file under `dir` (recursively,
/// in name order). Invalid resources are reported in `errors` and left out;
/// the valid rest is returned.
pub fn load_dir(dir: &Path) -> Result<Loaded, PolicyError> {
    let mut files = Vec::new();
    collect_files(dir, &mut files).map_err(|e| PolicyError {
        file: dir.to_path_buf(),
        resource: String::new(),
        field: String::new(),
        message: format!("cannot read the policy directory: {e}"),
    })?;
    files.sort();
    let mut loaded = Loaded::default();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => load_text(file, &text, &mut loaded),
            Err(e) => loaded.errors.push(PolicyError {
                file: file.clone(),
                resource: String::new(),
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    loaded.files = files.len();
    check_duplicates(&mut loaded);
    loaded.set.sort();
    Ok(loaded)
}

/// Parses the resources in `text` (as if read from `file`) into a set.
pub fn load_str(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    load_text(file, text, &mut loaded);
    loaded.files = 1;
    check_duplicates(&mut loaded);
    loaded.set.sort();
    loaded
}

/// Parses several named texts (etcd keys, API objects) into one set, as
/// `load_dir` does files.
pub fn load_texts<'a>(texts: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Loaded {
    let mut loaded = Loaded::default();
    for (file, text) in texts {
        load_text(file, text, &mut loaded);
        loaded.files += 1;
    }
    check_duplicates(&mut loaded);
    loaded.set.sort();
    loaded
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Two resources of the same kind, namespace and name: both are rejected,
/// since which one the user meant cannot be known.
fn check_duplicates(loaded: &mut Loaded) {
    let mut seen: BTreeMap<String, Vec<Origin>> = BTreeMap::new();
    let set = &loaded.set;
    let resources = set
        .policies
        .iter()
        .map(|p| (p.resource(), &p.origin))
        .chain(
            set.host_endpoints
                .iter()
                .map(|h| (format!("HostEndpoint/{}", h.name), &h.origin)),
        )
        .chain(
            set.failsafe_profiles
                .iter()
                .map(|f| (format!("FailsafeProfile/{}", f.name), &f.origin)),
        )
        .chain(set.network_sets.iter().map(|n| (n.resource(), &n.origin)));
    for (resource, origin) in resources {
        seen.entry(resource).or_default().push(origin.clone());
    }
    let duplicated: Vec<(String, Vec<Origin>)> =
        seen.into_iter().filter(|(_, o)| o.len() > 1).collect();
    for (resource, origins) in &duplicated {
        let places: Vec<String> = origins
            .iter()
            .map(|o| format!("{} document {}", o.file.display(), o.document + 1))
            .collect();
        for origin in origins {
            loaded.errors.push(PolicyError {
                file: origin.file.clone(),
                resource: resource.clone(),
                field: "metadata.name".into(),
                message: format!("defined more than once ({})", places.join(", ")),
            });
        }
    }
    let dup = |r: &str| duplicated.iter().any(|(d, _)| d == r);
    loaded.set.policies.retain(|p| !dup(&p.resource()));
    loaded
        .set
        .host_endpoints
        .retain(|h| !dup(&format!("HostEndpoint/{}", h.name)));
    loaded
        .set
        .failsafe_profiles
        .retain(|f| !dup(&format!("FailsafeProfile/{}", f.name)));
    loaded.set.network_sets.retain(|n| !dup(&n.resource()));
    tier::check_references(loaded);
}

/// Placeholders such as `<worker-node-name>` outside comments: a template
/// the user has not filled in yet.
pub fn placeholders(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or_default();
        let mut rest = code;
        while let Some(start) = rest.find('<') {
            let after = &rest[start + 1..];
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .unwrap_or(after.len());
            if len > 0 && after[len..].starts_with('>') {
                let p = format!("<{}>", &after[..len]);
                if !found.contains(&p) {
                    found.push(p);
                }
            }
            rest = after;
        }
    }
    found
}

fn load_text(file: &Path, text: &str, loaded: &mut Loaded) {
    let holes = placeholders(text);
    if !holes.is_empty() {
        loaded.placeholder_files.push(file.to_path_buf());
        loaded.errors.push(PolicyError {
            file: file.to_path_buf(),
            resource: String::new(),
            field: String::new(),
            message: format!(
                "placeholder file: fill in {} before applying it; nothing in it is applied",
                holes.join(", ")
            ),
        });
        return;
    }
    let mut index = 0;
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = match Value::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                loaded.errors.push(PolicyError {
                    file: file.to_path_buf(),
                    resource: String::new(),
                    field: String::new(),
                    message: format!("not valid YAML or JSON: {e}"),
                });
                return;
            }
        };
        load_value(file, &mut index, value, loaded);
    }
}

fn load_value(file: &Path, index: &mut usize, value: Value, loaded: &mut Loaded) {
    if value.is_null() {
        // An empty document (only comments, or `---` at the end).
        return;
    }
    let origin = Origin {
        file: file.to_path_buf(),
        document: *index,
    };
    *index += 1;
    let err = |resource: &str, field: &str, message: String| PolicyError {
        file: file.to_path_buf(),
        resource: resource.to_string(),
        field: field.to_string(),
        message,
    };
    let Value::Mapping(map) = &value else {
        loaded.errors.push(err(
            "",
            "",
            format!(
                "document {} is not a resource (a mapping with apiVersion and kind)",
                origin.document + 1
            ),
        ));
        return;
    };
    let get = |k: &str| map.get(Value::String(k.into()));
    let kind = get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api = get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" {
        match get("items") {
            Some(Value::Sequence(items)) => {
                *index -= 1;
                for item in items.clone() {
                    load_value(file, index, item, loaded);
                }
            }
            _ => loaded.errors.push(err(
                "List",
                "items",
                "a List needs a sequence of items".into(),
            )),
        }
        return;
    }
    let metadata = get("metadata").cloned().unwrap_or(Value::Null);
    let meta: Metadata = match serde_path_to_error::deserialize(metadata) {
        Ok(m) => m,
        Err(e) => {
            loaded.errors.push(err(
                &kind,
                &format!("metadata.{}", e.path()),
                e.inner().to_string(),
            ));
            return;
        }
    };
    // Named as the model names it (`Policy::resource` and friends), so an
    // error can be matched to the last good version of the same object.
    let resource = match (&meta.namespace, kind.as_str(), api.as_str()) {
        (ns, "NetworkPolicy", "networking.k8s.io/v1") => format!(
            "KubernetesNetworkPolicy/{}/knp.default.{}",
            ns.as_deref().unwrap_or("default"),
            meta.name
        ),
        (Some(ns), _, _) => format!("{kind}/{ns}/{}", meta.name),
        (None, "NetworkPolicy" | "NetworkSet", _) => format!("{kind}/default/{}", meta.name),
        (None, _, _) => format!("{kind}/{}", meta.name),
    };
    if kind.is_empty() || api.is_empty() {
        loaded.errors.push(err(
            &resource,
            if kind.is_empty() {
                "kind"
            } else {
                "apiVersion"
            },
            "missing".into(),
        ));
        return;
    }
    for key in map.keys() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(key, "apiVersion" | "kind" | "metadata" | "spec" | "status") {
            loaded.errors.push(err(
                &resource,
                key,
                unknown_field(key, &["apiVersion", "kind", "metadata", "spec"]),
            ));
            return;
        }
    }
    if meta.name.is_empty() {
        loaded
            .errors
            .push(err(&resource, "metadata.name", "missing".into()));
        return;
    }
    if let Err(message) = check_name(&meta.name) {
        loaded.errors.push(err(&resource, "metadata.name", message));
        return;
    }
    let spec = get("spec").cloned().unwrap_or(Value::Null);
    let status = value.get("status").cloned();
    let result = read_resource(&kind, &api, &meta, spec, status, origin, loaded);
    if let Err((field, message)) = result {
        loaded.errors.push(err(&resource, &field, message));
    }
}

/// Reads one resource of `kind` and `api` into `loaded`.
fn read_resource(
    kind: &str,
    api: &str,
    meta: &Metadata,
    spec: Value,
    status: Option<Value>,
    origin: Origin,
    loaded: &mut Loaded,
) -> FieldResult<()> {
    match (kind, api) {
    ("GlobalNetworkPolicy", a) if CALICO_API_VERSIONS.contains(&a) => {
        policy(meta, spec, origin, PolicyKind::GlobalNetworkPolicy)
            .map(|p| loaded.set.policies.push(p))
    }
    ("NetworkPolicy", a) if CALICO_API_VERSIONS.contains(&a) => {
        policy(meta, spec, origin, PolicyKind::NetworkPolicy)
            .map(|p| loaded.set.policies.push(p))
    }
    ("NetworkPolicy", "networking.k8s.io/v1") => {
        crate::policy::kubernetes::network_policy(&meta.name, meta.namespace.as_deref(), spec, origin)
            .map(|p| loaded.set.policies.push(p))
    }
    ("GlobalNetworkSet" | "NetworkSet", a) if CALICO_API_VERSIONS.contains(&a) => {
        network_set(meta, spec, origin, kind == "NetworkSet")
            .map(|n| loaded.set.network_sets.push(n))
    }
    ("Namespace" | "Pod" | "Node" | "Service" | "ServiceAccount", "v1") => {
        crate::policy::kubernetes::object(kind, &meta.name, meta.namespace.as_deref(), &meta.labels, spec, status)
            .map(|o| loaded.set.objects.push(o))
    }
    ("HostEndpoint", a) if CALICO_API_VERSIONS.contains(&a) => {
        host_endpoint(meta, spec, origin).map(|h| loaded.set.host_endpoints.push(h))
    }
    ("FelixConfiguration", a) if CALICO_API_VERSIONS.contains(&a) => {
        felix_configuration(meta, spec).map(|f| {
            if let Some(f) = f {
                loaded.set.failsafes = Some(f);
            }
        })
    }
    ("Tier", a) if CALICO_API_VERSIONS.contains(&a) => {
        tier::tier(meta, spec, origin).map(|t| loaded.set.tiers.push(t))
    }
    ("Profile", a) if CALICO_API_VERSIONS.contains(&a) => {
        tier::profile(meta, spec, origin).map(|p| loaded.set.profiles.push(p))
    }
    ("FailsafeProfile", MOAT_API_VERSION) => {
        failsafe_profile(meta, spec, origin).map(|f| loaded.set.failsafe_profiles.push(f))
    }
    ("AdminNetworkPolicy" | "BaselineAdminNetworkPolicy", "policy.networking.k8s.io/v1alpha1") => Err((
        String::new(),
        format!(
            "{kind} ({api}) is not enforced by this version of moat yet (Calico puts it in the {} tier); it is rejected rather than silently ignored",
            if kind == "AdminNetworkPolicy" { "kube-admin" } else { "kube-baseline" }
        ),
    )),
    (
        "StagedNetworkPolicy" | "StagedGlobalNetworkPolicy"
        | "StagedKubernetesNetworkPolicy",
        a,
    ) if CALICO_API_VERSIONS.contains(&a) => Err((
        String::new(),
        format!(
            "{kind} ({api}) is not enforced by this version of moat yet; it is rejected rather than silently ignored"
        ),
    )),
    (k, a) => Err((
        if CALICO_API_VERSIONS.contains(&a) || a == MOAT_API_VERSION { "kind" } else { "apiVersion" }.into(),
        format!("unknown resource {a} {k} (moat reads projectcalico.org/v3 or crd.projectcalico.org/v1 GlobalNetworkPolicy, NetworkPolicy, HostEndpoint, GlobalNetworkSet, NetworkSet, FelixConfiguration; Tier, Profile; networking.k8s.io/v1 NetworkPolicy; v1 Namespace, Pod, Node, Service, ServiceAccount; {MOAT_API_VERSION} FailsafeProfile)"),
    )),
}
}

/// Kubernetes object names: DNS subdomain (RFC 1123), at most 253 chars.
fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit); a placeholder left unfilled?"
        ))
    }
}

/// "unknown field `x`", with a suggestion when a known field is close.
fn unknown_field(field: &str, known: &[&str]) -> String {
    let mut msg = format!("unknown field `{field}`");
    if let Some(best) = did_you_mean(field, known) {
        msg.push_str(&format!(", did you mean `{best}`?"));
    } else {
        msg.push_str(&format!(" (expected one of {})", known.join(", ")));
    }
    msg
}

/// The known word closest to `word`, if it is close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    if let Some(same) = known.iter().find(|k| k.to_ascii_lowercase() == lower) {
        return Some(same);
    }
    known
        .iter()
        .map(|k| (strsim::levenshtein(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// Turns a serde error into (field path, message), with "did you mean".
pub(crate) fn spec_error(e: serde_path_to_error::Error<serde_yaml_ng::Error>) -> (String, String) {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    let message = match parse_unknown_field(&inner) {
        Some((field, expected)) => {
            let known: Vec<&str> = expected.iter().map(String::as_str).collect();
            unknown_field(&field, &known)
        }
        None => inner,
    };
    let field = if path == "." {
        "spec".into()
    } else {
        format!("spec.{path}")
    };
    (field, message)
}

/// Picks apart serde's "unknown field `x`, expected one of `a`, `b`".
fn parse_unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((field.to_string(), expected))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Metadata {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    // Everything else kubectl prints (uid, resourceVersion, annotations,
    // managedFields, ...) describes the object, not its policy.
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(i64),
    Str(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicySpec {
    order: Option<f64>,
    selector: Option<String>,
    types: Option<Vec<String>>,
    ingress: Option<Vec<RawRule>>,
    egress: Option<Vec<RawRule>>,
    #[serde(rename = "preDNAT")]
    pre_dnat: Option<bool>,
    do_not_track: Option<bool>,
    apply_on_forward: Option<bool>,
    tier: Option<String>,
    namespace_selector: Option<String>,
    service_account_selector: Option<String>,
    performance_hints: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRule {
    action: String,
    protocol: Option<NumOrString>,
    not_protocol: Option<NumOrString>,
    icmp: Option<RawIcmp>,
    #[serde(rename = "notICMP")]
    not_icmp: Option<RawIcmp>,
    ip_version: Option<i64>,
    source: Option<RawEntity>,
    destination: Option<RawEntity>,
    http: Option<Value>,
    // Rule annotations: accepted, they carry no policy.
    #[serde(rename = "metadata")]
    _metadata: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIcmp {
    #[serde(rename = "type")]
    icmp_type: Option<i64>,
    code: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawEntity {
    nets: Option<Vec<String>>,
    not_nets: Option<Vec<String>>,
    ports: Option<Vec<NumOrString>>,
    not_ports: Option<Vec<NumOrString>>,
    selector: Option<String>,
    not_selector: Option<String>,
    namespace_selector: Option<String>,
    service_accounts: Option<Value>,
    services: Option<Value>,
    /// moat's extension: the destination is a Service frontend.
    moat_service_frontends: Option<bool>,
}

pub(crate) type FieldResult<T> = Result<T, (String, String)>;

fn field_err<T>(field: impl Into<String>, message: impl Into<String>) -> FieldResult<T> {
    Err((field.into(), message.into()))
}

pub(crate) fn not_yet<T>(field: &str, what: &str) -> FieldResult<T> {
    field_err(
        field,
        format!("{what} is not enforced by this version of moat yet; the policy is rejected rather than enforced without it"),
    )
}

fn policy(meta: &Metadata, spec: Value, origin: Origin, kind: PolicyKind) -> FieldResult<Policy> {
    let namespaced = kind == PolicyKind::NetworkPolicy;
    if namespaced {
        // Fields of GlobalNetworkPolicy only: a NetworkPolicy naming them is
        // invalid, as in Calico.
        if let Value::Mapping(m) = &spec {
            for f in [
                "preDNAT",
                "doNotTrack",
                "applyOnForward",
                "namespaceSelector",
            ] {
                if m.contains_key(Value::String(f.into())) {
                    return field_err(
                        format!("spec.{f}"),
                        "valid in a GlobalNetworkPolicy only, not in a NetworkPolicy",
                    );
                }
            }
        }
    }
    let raw: RawPolicySpec = if spec.is_null() {
        RawPolicySpec::default()
    } else {
        serde_path_to_error::deserialize(spec).map_err(spec_error)?
    };
    let pre_dnat = raw.pre_dnat.unwrap_or(false);
    let do_not_track = raw.do_not_track.unwrap_or(false);
    let apply_on_forward = raw.apply_on_forward.unwrap_or(false);
    // Calico's own validation first, so the message is the real one.
    if pre_dnat && do_not_track {
        return field_err("spec.preDNAT", "preDNAT and doNotTrack cannot both be true");
    }
    if (pre_dnat || do_not_track) && !apply_on_forward {
        let f = if pre_dnat {
            "spec.preDNAT"
        } else {
            "spec.doNotTrack"
        };
        return field_err(
            f,
            "preDNAT and doNotTrack policies need applyOnForward: true",
        );
    }
    if pre_dnat && raw.egress.as_ref().is_some_and(|e| !e.is_empty()) {
        return field_err("spec.egress", "a preDNAT policy cannot have egress rules");
    }
    let mut ingress_applies = false;
    let mut egress_applies = false;
    match &raw.types {
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_applies = true,
                    "Egress" => egress_applies = true,
                    other => {
                        let hint = did_you_mean(other, &["Ingress", "Egress"])
                            .map(|s| format!(", did you mean {s}?"))
                            .unwrap_or_default();
                        return field_err(
                            format!("spec.types[{i}]"),
                            format!("{other:?} is not a policy type (Ingress or Egress){hint}"),
                        );
                    }
                }
            }
        }
        None => {
            // Calico's defaulting: Egress only when there are egress rules,
            // Ingress when there are ingress rules or no egress rules.
            let has_in = raw.ingress.as_ref().is_some_and(|r| !r.is_empty());
            let has_out = raw.egress.as_ref().is_some_and(|r| !r.is_empty());
            ingress_applies = has_in || !has_out;
            egress_applies = has_out;
        }
    }
    if pre_dnat && egress_applies {
        return field_err("spec.types", "a preDNAT policy cannot have the Egress type");
    }
    if let Some(order) = raw.order {
        if !order.is_finite() {
            return field_err("spec.order", "order must be a finite number");
        }
    }
    let selector_text = raw.selector.unwrap_or_default();
    let selector = Selector::parse(&selector_text)
        .map_err(|e| ("spec.selector".to_string(), e.to_string()))?;
    if selector.uses_global() {
        return field_err(
            "spec.selector",
            "global() is only valid alone in a rule's namespaceSelector",
        );
    }
    let ingress = rules(raw.ingress.unwrap_or_default(), "spec.ingress")?;
    let egress = rules(raw.egress.unwrap_or_default(), "spec.egress")?;
    let namespace_selector = raw
        .namespace_selector
        .as_deref()
        .map(|t| parse_selector(t, "spec.namespaceSelector"))
        .transpose()?;
    let tier = raw
        .tier
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| tier::DEFAULT_TIER.into());
    let selector = match raw.service_account_selector.as_deref() {
        Some(t) if !t.trim().is_empty() => Selector::And(
            Box::new(selector),
            Box::new(service_accounts::selector(
                t,
                "spec.serviceAccountSelector",
            )?),
        ),
        _ => selector,
    };
    if let Some(hints) = raw.performance_hints {
        for (i, h) in hints.iter().enumerate() {
            if h != "AssumeNeededOnEveryNode" {
                return field_err(
                    format!("spec.performanceHints[{i}]"),
                    format!("unknown hint {h:?}"),
                );
            }
        }
    }
    Ok(Policy {
        kind,
        name: meta.name.clone(),
        namespace: namespaced.then(|| meta.namespace.clone().unwrap_or_else(|| "default".into())),
        order: raw.order,
        selector,
        namespace_selector,
        pre_dnat,
        do_not_track,
        apply_on_forward,
        ingress_applies,
        egress_applies,
        ingress,
        egress,
        tier,
        origin,
    })
}

fn parse_selector(text: &str, field: &str) -> FieldResult<Selector> {
    let sel = Selector::parse(text).map_err(|e| (field.to_string(), e.to_string()))?;
    if sel.uses_global() {
        return field_err(
            field,
            "global() is only valid alone in a rule's namespaceSelector",
        );
    }
    Ok(sel)
}

pub(crate) fn rules(raw: Vec<RawRule>, field: &str) -> FieldResult<Vec<Rule>> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| rule(r, &format!("{field}[{i}]")))
        .collect()
}

/// Protocol names Calico accepts, and their numbers.
const PROTOCOL_NAMES: [(&str, u8); 6] = [
    ("TCP", 6),
    ("UDP", 17),
    ("ICMP", 1),
    ("ICMPv6", 58),
    ("SCTP", 132),
    ("UDPLite", 136),
];

fn parse_protocol(raw: &NumOrString, field: &str) -> FieldResult<u8> {
    match raw {
        NumOrString::Num(n) if (1..=255).contains(n) => Ok(*n as u8),
        NumOrString::Num(n) => field_err(field, format!("protocol {n} is out of range 1-255")),
        NumOrString::Str(s) => {
            if let Ok(n) = s.parse::<i64>() {
                return parse_protocol(&NumOrString::Num(n), field);
            }
            if let Some((_, n)) = PROTOCOL_NAMES
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(s))
            {
                return Ok(*n);
            }
            let names: Vec<&str> = PROTOCOL_NAMES.iter().map(|(n, _)| *n).collect();
            let hint = did_you_mean(s, &names)
                .map(|n| format!(", did you mean {n}?"))
                .unwrap_or_default();
            field_err(
                field,
                format!(
                    "unknown protocol {s:?} (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255){hint}"
                ),
            )
        }
    }
}

fn icmp(raw: &RawIcmp, field: &str) -> FieldResult<IcmpMatch> {
    let Some(t) = raw.icmp_type else {
        if raw.code.is_some() {
            return field_err(format!("{field}.code"), "an ICMP code needs an ICMP type");
        }
        return field_err(format!("{field}.type"), "missing");
    };
    if !(0..=254).contains(&t) {
        return field_err(
            format!("{field}.type"),
            format!("ICMP type {t} is out of range 0-254"),
        );
    }
    let code = match raw.code {
        Some(c) if (0..=255).contains(&c) => Some(c as u8),
        Some(c) => {
            return field_err(
                format!("{field}.code"),
                format!("ICMP code {c} is out of range 0-255"),
            )
        }
        None => None,
    };
    Ok(IcmpMatch {
        icmp_type: t as u8,
        code,
    })
}

fn port_range(raw: &NumOrString, field: &str) -> FieldResult<PortRange> {
    let num = |s: &str| -> FieldResult<u16> {
        match s.trim().parse::<i64>() {
            Ok(n) if (0..=65535).contains(&n) => Ok(n as u16),
            Ok(n) => field_err(field, format!("port {n} is out of range 0-65535")),
            Err(_) => field_err(field, format!("{s:?} is not a port number")),
        }
    };
    match raw {
        NumOrString::Num(n) => num(&n.to_string()).map(|p| PortRange { lo: p, hi: p }),
        NumOrString::Str(s) => match s.split_once(':') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return field_err(field, format!("port range {s:?} runs backwards"));
                }
                Ok(PortRange { lo, hi })
            }
            None if s.trim().parse::<i64>().is_ok() => num(s).map(|p| PortRange { lo: p, hi: p }),
            None => not_yet(field, &format!("named port {s:?}")),
        },
    }
}

fn entity(
    raw: Option<RawEntity>,
    field: &str,
    ports_allowed: bool,
    ip_version: Option<u8>,
) -> FieldResult<EntityMatch> {
    let raw = raw.unwrap_or_default();
    let mut nets = Vec::new();
    for (i, n) in raw.nets.unwrap_or_default().iter().enumerate() {
        let f = format!("{field}.nets[{i}]");
        let net = parse_net(n).map_err(|m| (f.clone(), m))?;
        let v = if net.addr().is_ipv4() { 4 } else { 6 };
        if ip_version.is_some_and(|want| want != v) {
            return field_err(
                f,
                format!(
                    "IPv{v} net {n} in a rule with ipVersion {}",
                    ip_version.unwrap_or(0)
                ),
            );
        }
        nets.push(net);
    }
    let mut ports = Vec::new();
    let raw_ports = raw.ports.unwrap_or_default();
    if !raw_ports.is_empty() && !ports_allowed {
        return field_err(
            format!("{field}.ports"),
            "ports need protocol TCP, UDP or SCTP",
        );
    }
    let mut named_ports = Vec::new();
    for (i, p) in raw_ports.iter().enumerate() {
        match p {
            NumOrString::Str(s) if named_ports::is_port_name(s) => named_ports.push(s.clone()),
            _ => ports.push(port_range(p, &format!("{field}.ports[{i}]"))?),
        }
    }
    let raw_not_ports = raw.not_ports.unwrap_or_default();
    if !raw_not_ports.is_empty() && !ports_allowed {
        return field_err(
            format!("{field}.notPorts"),
            "notPorts need protocol TCP, UDP or SCTP",
        );
    }
    let mut not_ports = Vec::new();
    for (i, p) in raw_not_ports.iter().enumerate() {
        not_ports.push(port_range(p, &format!("{field}.notPorts[{i}]"))?);
    }
    let mut not_nets = Vec::new();
    for (i, n) in raw.not_nets.iter().flatten().enumerate() {
        not_nets.push(parse_net(n).map_err(|m| (format!("{field}.notNets[{i}]"), m))?);
    }
    let mut selectors = [None, None, None];
    for (slot, (name, value)) in selectors.iter_mut().zip([
        ("selector", &raw.selector),
        ("notSelector", &raw.not_selector),
        ("namespaceSelector", &raw.namespace_selector),
    ]) {
        if let Some(text) = value {
            let sel =
                Selector::parse(text).map_err(|e| (format!("{field}.{name}"), e.to_string()))?;
            if sel.uses_global() && (name != "namespaceSelector" || sel != Selector::Global) {
                return field_err(
                    format!("{field}.{name}"),
                    "global() is only valid alone in a rule's namespaceSelector",
                );
            }
            *slot = Some(sel);
        }
    }
    if raw.services.is_some() {
        return not_yet(&format!("{field}.services"), "a rule services");
    }
    let [selector, not_selector, namespace_selector] = selectors;
    let by_account = raw
        .service_accounts
        .as_ref()
        .map(|v| service_accounts::rule_match(v, &format!("{field}.serviceAccounts")))
        .transpose()?
        .flatten();
    let selector = service_accounts::and(by_account, selector);
    let service_frontends = raw.moat_service_frontends.unwrap_or(false);
    if service_frontends && !field.ends_with("destination") {
        return field_err(
            format!("{field}.moatServiceFrontends"),
            "valid in a rule's destination only",
        );
    }
    Ok(EntityMatch {
        service_frontends,
        nets,
        not_nets,
        ports,
        not_ports,
        named_ports,
        selector,
        not_selector,
        namespace_selector,
    })
}

/// A CIDR, or a bare address meaning a single host.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = text.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!("{text:?} is not a CIDR"))
}

fn rule(raw: RawRule, field: &str) -> FieldResult<Rule> {
    let action = match raw.action.as_str() {
        "Allow" => Action::Allow,
        "Deny" => Action::Deny,
        "Log" => Action::Log,
        "Pass" => Action::Pass,
        other => {
            let hint = did_you_mean(other, &["Allow", "Deny", "Log", "Pass"])
                .map(|s| format!(", did you mean {s}?"))
                .unwrap_or_default();
            return field_err(
                format!("{field}.action"),
                format!("unknown action {other:?} (Allow, Deny, Log or Pass){hint}"),
            );
        }
    };
    let protocol = raw
        .protocol
        .as_ref()
        .map(|p| parse_protocol(p, &format!("{field}.protocol")))
        .transpose()?;
    let not_protocol = raw
        .not_protocol
        .as_ref()
        .map(|p| parse_protocol(p, &format!("{field}.notProtocol")))
        .transpose()?;
    let ip_version = match raw.ip_version {
        None => None,
        Some(v @ (4 | 6)) => Some(v as u8),
        Some(v) => {
            return field_err(
                format!("{field}.ipVersion"),
                format!("ipVersion {v} is neither 4 nor 6"),
            )
        }
    };
    let icmp_proto = matches!(protocol, Some(1 | 58));
    let icmp_m = raw
        .icmp
        .as_ref()
        .map(|i| icmp(i, &format!("{field}.icmp")))
        .transpose()?;
    let not_icmp = raw
        .not_icmp
        .as_ref()
        .map(|i| icmp(i, &format!("{field}.notICMP")))
        .transpose()?;
    if (icmp_m.is_some() || not_icmp.is_some()) && !icmp_proto {
        let f = if icmp_m.is_some() { "icmp" } else { "notICMP" };
        return field_err(
            format!("{field}.{f}"),
            "ICMP fields need protocol ICMP or ICMPv6",
        );
    }
    match (protocol, ip_version) {
        (Some(1), Some(6)) => {
            return field_err(
                format!("{field}.protocol"),
                "protocol ICMP with ipVersion 6 (use ICMPv6)",
            )
        }
        (Some(58), Some(4)) => {
            return field_err(
                format!("{field}.protocol"),
                "protocol ICMPv6 with ipVersion 4 (use ICMP)",
            )
        }
        _ => {}
    }
    let ports_allowed = matches!(protocol, Some(6 | 17 | 132));
    let source = entity(
        raw.source,
        &format!("{field}.source"),
        ports_allowed,
        ip_version,
    )?;
    let destination = entity(
        raw.destination,
        &format!("{field}.destination"),
        ports_allowed,
        ip_version,
    )?;
    if raw.http.is_some() {
        return not_yet(
            &format!("{field}.http"),
            "an HTTP match (it needs an application layer proxy)",
        );
    }
    Ok(Rule {
        action,
        protocol,
        not_protocol,
        icmp: icmp_m,
        not_icmp,
        ip_version,
        source,
        destination,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHostEndpointSpec {
    node: Option<String>,
    interface_name: Option<String>,
    #[serde(rename = "expectedIPs")]
    expected_ips: Option<Vec<String>>,
    profiles: Option<Vec<String>>,
    ports: Option<Vec<Value>>,
}

fn host_endpoint(meta: &Metadata, spec: Value, origin: Origin) -> FieldResult<HostEndpoint> {
    let raw: RawHostEndpointSpec = serde_path_to_error::deserialize(spec).map_err(spec_error)?;
    let Some(node) = raw.node.filter(|n| !n.is_empty()) else {
        return field_err("spec.node", "missing: the node this interface belongs to");
    };
    let mut expected_ips = Vec::new();
    for (i, ip) in raw.expected_ips.iter().flatten().enumerate() {
        expected_ips.push(ip.parse().map_err(|_| {
            (
                format!("spec.expectedIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )
        })?);
    }
    let Some(interface_name) = raw.interface_name.filter(|n| !n.is_empty()) else {
        return not_yet(
            "spec.interfaceName",
            "a HostEndpoint without interfaceName (matched by expectedIPs)",
        );
    };
    if interface_name == "*" {
        return not_yet("spec.interfaceName", "interfaceName \"*\" (all interfaces)");
    }
    let profiles = raw.profiles.unwrap_or_default();
    let default_allow = profiles.iter().any(|p| p == DEFAULT_ALLOW_PROFILE);
    let ports = named_ports::host_endpoint_ports(raw.ports.as_deref().unwrap_or_default())?;
    Ok(HostEndpoint {
        name: meta.name.clone(),
        labels: meta.labels.clone(),
        node,
        interface_name,
        expected_ips,
        default_allow,
        profiles,
        ports,
        origin,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailsafePort {
    protocol: Option<String>,
    port: i64,
    net: Option<String>,
}

fn failsafe_ports(raw: &[RawFailsafePort], field: &str) -> FieldResult<Vec<FailsafePort>> {
    raw.iter()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{field}[{i}]");
            let protocol = match p
                .protocol
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                None | Some("tcp") => 6,
                Some("udp") => 17,
                Some("sctp") => 132,
                Some(other) => {
                    return field_err(
                        format!("{f}.protocol"),
                        format!("{other:?} is not tcp, udp or sctp"),
                    )
                }
            };
            if !(0..=65535).contains(&p.port) {
                return field_err(
                    format!("{f}.port"),
                    format!("port {} is out of range 0-65535", p.port),
                );
            }
            let net = p
                .net
                .as_deref()
                .map(parse_net)
                .transpose()
                .map_err(|m| (format!("{f}.net"), m))?;
            Ok(FailsafePort {
                protocol,
                port: p.port as u16,
                net,
            })
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFelixSpec {
    failsafe_inbound_host_ports: Option<Vec<RawFailsafePort>>,
    failsafe_outbound_host_ports: Option<Vec<RawFailsafePort>>,
}

fn felix_configuration(meta: &Metadata, spec: Value) -> FieldResult<Option<Failsafes>> {
    let raw: RawFelixSpec = serde_path_to_error::deserialize(spec).map_err(|e| {
        let (field, message) = spec_error(e);
        (
            field,
            format!("{message} (moat reads only the failsafe port fields of FelixConfiguration)"),
        )
    })?;
    if meta.name != "default" {
        return not_yet(
            "metadata.name",
            "a per-node FelixConfiguration (only `default` is read)",
        );
    }
    let defaults = Failsafes::calico_defaults();
    Ok(Some(Failsafes {
        inbound: match &raw.failsafe_inbound_host_ports {
            Some(p) => failsafe_ports(p, "spec.failsafeInboundHostPorts")?,
            None => defaults.inbound,
        },
        outbound: match &raw.failsafe_outbound_host_ports {
            Some(p) => failsafe_ports(p, "spec.failsafeOutboundHostPorts")?,
            None => defaults.outbound,
        },
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailsafeProfileSpec {
    selector: String,
    inbound: Vec<RawFailsafePort>,
    outbound: Vec<RawFailsafePort>,
}

fn failsafe_profile(meta: &Metadata, spec: Value, origin: Origin) -> FieldResult<FailsafeProfile> {
    let raw: RawFailsafeProfileSpec = serde_path_to_error::deserialize(spec).map_err(spec_error)?;
    let selector =
        Selector::parse(&raw.selector).map_err(|e| ("spec.selector".to_string(), e.to_string()))?;
    Ok(FailsafeProfile {
        name: meta.name.clone(),
        selector,
        failsafes: Failsafes {
            inbound: failsafe_ports(&raw.inbound, "spec.inbound")?,
            outbound: failsafe_ports(&raw.outbound, "spec.outbound")?,
        },
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Loaded {
        load_str(Path::new("test.yaml"), text)
    }

    fn only_error(text: &str) -> PolicyError {
        let l = load(text);
        assert_eq!(l.errors.len(), 1, "{:#?}", l.errors);
        l.errors[0].clone()
    }

    const GNP: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p\nspec:\n";

    fn gnp(spec: &str) -> String {
        format!("{GNP}{spec}")
    }

    #[test]
    fn multi_document_json_and_list() {
        let text = format!(
            "{}\n---\n# only a comment\n---\n{}\n---\n{}",
            gnp("  selector: all()\n  ingress:\n    - action: Allow\n"),
            r#"{"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "q", "uid": "x", "resourceVersion": "7"}, "spec": {"order": 10, "egress": [{"action": "Deny"}]}}"#,
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: projectcalico.org/v3\n    kind: HostEndpoint\n    metadata: {name: h, labels: {ibm.role: worker_public}}\n    spec: {node: n1, interfaceName: eth1}\n"
        );
        let l = load(&text);
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let names: Vec<&str> = l.set.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["q", "p"], "order 10 first, no order last");
        assert_eq!(l.set.host_endpoints[0].labels["ibm.role"], "worker_public");
        let q = &l.set.policies[0];
        assert!(
            !q.ingress_applies && q.egress_applies,
            "egress rules only: types [Egress]"
        );
        let p = &l.set.policies[1];
        assert!(p.ingress_applies && !p.egress_applies);
    }

    #[test]
    fn types_default_as_calico_does() {
        let cases = [
            ("  ingress: [{action: Allow}]\n", true, false),
            ("  egress: [{action: Allow}]\n", false, true),
            (
                "  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n",
                true,
                true,
            ),
            ("  selector: all()\n", true, false),
            ("  types: [Egress]\n", false, true),
            (
                "  types: [Ingress, Egress]\n  ingress: [{action: Allow}]\n",
                true,
                true,
            ),
        ];
        for (spec, ingress, egress) in cases {
            let l = load(&gnp(spec));
            assert!(l.errors.is_empty(), "{spec}: {:#?}", l.errors);
            let p = &l.set.policies[0];
            assert_eq!(
                (p.ingress_applies, p.egress_applies),
                (ingress, egress),
                "{spec}"
            );
        }
    }

    #[test]
    fn equal_orders_break_ties_by_name_as_calico_does() {
        let text = ["allow", "allow-x", "b", "a"]
            .iter()
            .map(|n| format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {n}}}\nspec: {{order: 5}}\n"))
            .collect::<Vec<_>>()
            .join("---\n");
        let l = load(&text);
        let names: Vec<&str> = l.set.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "allow-x", "allow", "b"]);
    }

    #[test]
    fn rule_fields_parse() {
        let l = load(&gnp(
            "  ingress:\n    - action: Log\n      protocol: tcp\n      notProtocol: 17\n      ipVersion: 4\n      source:\n        nets: [198.18.0.0/15, 198.18.1.1]\n        ports: [22, \"8000:8080\", \"53\"]\n    - action: Pass\n      protocol: ICMPv6\n      icmp: {type: 128, code: 0}\n      notICMP: {type: 1}\n",
        ));
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let r = &l.set.policies[0].ingress;
        assert_eq!(
            (
                r[0].action,
                r[0].protocol,
                r[0].not_protocol,
                r[0].ip_version
            ),
            (Action::Log, Some(6), Some(17), Some(4))
        );
        assert_eq!(r[0].source.nets.len(), 2);
        assert_eq!(
            r[0].source.ports,
            [
                PortRange { lo: 22, hi: 22 },
                PortRange { lo: 8000, hi: 8080 },
                PortRange { lo: 53, hi: 53 }
            ]
        );
        assert_eq!(
            r[1].icmp,
            Some(IcmpMatch {
                icmp_type: 128,
                code: Some(0)
            })
        );
        assert_eq!(
            r[1].not_icmp,
            Some(IcmpMatch {
                icmp_type: 1,
                code: None
            })
        );
    }

    #[test]
    fn invalid_input_names_file_resource_and_field() {
        // (spec, field, words the message must contain)
        let cases: &[(&str, &str, &str)] = &[
            ("  Tier: default\n", "spec.Tier", "did you mean `tier`"),
            ("  NamespaceSelector: all()\n", "spec.NamespaceSelector", "did you mean `namespaceSelector`"),
            ("  ingress: [{action: allow}]\n", "spec.ingress[0].action", "did you mean Allow"),
            ("  ingress: [{action: Reject}]\n", "spec.ingress[0].action", "unknown action"),
            ("  ingress: [{action: Allow, protocol: TCP, destination: {ports: [70000]}}]\n", "spec.ingress[0].destination.ports[0]", "out of range"),
            ("  ingress: [{action: Allow, protocol: TCP, destination: {ports: [\"90:80\"]}}]\n", "spec.ingress[0].destination.ports[0]", "backwards"),
            ("  ingress: [{action: Allow, destination: {ports: [80]}}]\n", "spec.ingress[0].destination.ports", "need protocol"),
            ("  ingress: [{action: Allow, protocol: ICMP, destination: {ports: [80]}}]\n", "spec.ingress[0].destination.ports", "need protocol"),
            ("  ingress: [{action: Allow, icmp: {type: 8}}]\n", "spec.ingress[0].icmp", "need protocol ICMP"),
            ("  ingress: [{action: Allow, protocol: ICMP, icmp: {type: 255}}]\n", "spec.ingress[0].icmp.type", "out of range"),
            ("  ingress: [{action: Allow, protocol: ICMP, icmp: {code: 1}}]\n", "spec.ingress[0].icmp.code", "needs an ICMP type"),
            ("  ingress: [{action: Allow, protocol: TPC}]\n", "spec.ingress[0].protocol", "did you mean TCP"),
            ("  ingress: [{action: Allow, protocol: 256}]\n", "spec.ingress[0].protocol", "out of range"),
            ("  ingress: [{action: Allow, source: {nets: [10.0.0.0/33]}}]\n", "spec.ingress[0].source.nets[0]", "not a CIDR"),
            ("  ingress: [{action: Allow, ipVersion: 4, source: {nets: [\"2001:db8::/32\"]}}]\n", "spec.ingress[0].source.nets[0]", "ipVersion 4"),
            ("  ingress: [{action: Allow, ipVersion: 5}]\n", "spec.ingress[0].ipVersion", "neither 4 nor 6"),
            ("  ingress: [{action: Allow, source: {selector: \"a ==\"}}]\n", "spec.ingress[0].source.selector", "column"),
            ("  selector: \"ibm.role = 'x'\"\n", "spec.selector", "column 10"),
            ("  selector: global()\n", "spec.selector", "global()"),
            ("  preDNAT: true\n  doNotTrack: true\n  applyOnForward: true\n", "spec.preDNAT", "cannot both"),
            ("  preDNAT: true\n", "spec.preDNAT", "applyOnForward"),
            ("  preDNAT: true\n  applyOnForward: true\n  egress: [{action: Allow}]\n", "spec.egress", "egress rules"),
            ("  preDNAT: true\n  applyOnForward: true\n  types: [Egress]\n", "spec.types", "Egress type"),
            ("  types: [ingress]\n", "spec.types[0]", "did you mean Ingress"),
            ("  order: .nan\n", "spec.order", "finite"),
            ("  ingress: [{action: Allow, source: {namespaceSelector: \"global() && a == 'b'\"}}]\n", "spec.ingress[0].source.namespaceSelector", "global()"),
        ];
        for (spec, field, words) in cases {
            let e = only_error(&gnp(spec));
            assert_eq!(e.file, Path::new("test.yaml"), "{spec}");
            assert_eq!(e.resource, "GlobalNetworkPolicy/p", "{spec}");
            assert_eq!(e.field, *field, "{spec}: {e}");
            assert!(e.message.contains(words), "{spec}: {e}");
        }
    }

    #[test]
    fn stages_and_negations_load_into_the_model() {
        let l = load(&gnp("  preDNAT: true\n  applyOnForward: true\n  ingress: [{action: Deny, source: {notNets: [10.0.0.0/8]}}]\n"));
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let p = &l.set.policies[0];
        assert!(p.pre_dnat && p.apply_on_forward && !p.do_not_track);
        assert_eq!(p.ingress[0].source.not_nets.len(), 1);
        // Named ports are read; what is neither a number nor a name is not.
        let l = load(&gnp(
            "  ingress: [{action: Deny, protocol: TCP, destination: {ports: [http, 22]}}]\n",
        ));
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        assert_eq!(
            l.set.policies[0].ingress[0].destination.named_ports,
            ["http"]
        );
        let e = only_error(&gnp(
            "  ingress: [{action: Deny, protocol: TCP, destination: {ports: [Not_A_Name]}}]\n",
        ));
        assert_eq!(e.field, "spec.ingress[0].destination.ports[0]");
    }

    #[test]
    fn namespaced_and_kubernetes_policies_and_sets() {
        let l = load(concat!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\n",
            "spec: {selector: \"app == 'db'\", ingress: [{action: Allow, source: {selector: \"app == 'api'\"}}]}\n---\n",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: finance, namespace: prod}\n",
            "spec:\n  podSelector: {matchLabels: {tier: backend}}\n  ingress:\n    - from: [{namespaceSelector: {matchLabels: {usage: finance}}, podSelector: {}}]\n      ports: [{port: 3111}, {protocol: UDP, port: 53, endPort: 54}]\n    - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]\n---\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: mgmt, labels: {role: mgmt}}\nspec: {nets: [198.19.128.0/24]}\n---\n",
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: prod}\nspec: {preDNAT: true}\n",
        ));
        assert_eq!(l.errors.len(), 1, "{:#?}", l.errors);
        assert_eq!(l.errors[0].field, "spec.preDNAT");
        assert!(l.errors[0].message.contains("GlobalNetworkPolicy only"));
        let knp = l
            .set
            .policies
            .iter()
            .find(|p| p.kind == PolicyKind::KubernetesNetworkPolicy)
            .expect("knp");
        assert_eq!(
            (knp.name.as_str(), knp.namespace.as_deref(), knp.order),
            ("knp.default.finance", Some("prod"), Some(1000.0))
        );
        assert_eq!(
            knp.ingress.len(),
            3,
            "one rule per peer and protocol: {:#?}",
            knp.ingress
        );
        assert_eq!(
            knp.ingress[0].destination.ports,
            [PortRange { lo: 3111, hi: 3111 }]
        );
        assert_eq!(
            knp.ingress[1].destination.ports,
            [PortRange { lo: 53, hi: 54 }]
        );
        assert!(
            knp.ingress[0].source.namespace_selector.is_some()
                && knp.ingress[0].source.selector.is_some(),
            "both selectors: AND"
        );
        assert_eq!(
            knp.ingress[2].source.not_nets,
            ["10.1.0.0/16".parse::<IpNet>().expect("net")]
        );
        let pod = BTreeMap::from([
            ("tier".to_string(), "backend".to_string()),
            (
                "projectcalico.org/orchestrator".to_string(),
                "k8s".to_string(),
            ),
            (
                "projectcalico.org/namespace".to_string(),
                "prod".to_string(),
            ),
        ]);
        assert!(knp.selector.matches(&pod));
        assert!(
            l.set
                .policies
                .iter()
                .all(|p| !p.can_select_host_endpoints()),
            "pod policies"
        );
        assert_eq!(l.set.network_sets[0].nets.len(), 1);
    }

    #[test]
    fn bad_documents_and_names() {
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: <policy-name>}\nspec: {}\n# <not-this-one>\n");
        assert_eq!(e.field, "");
        assert!(
            e.message
                .starts_with("placeholder file: fill in <policy-name> before"),
            "{e}"
        );
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: Policy_1}\nspec: {}\n");
        assert_eq!(e.field, "metadata.name");
        assert!(e.message.contains("not a valid name"), "{e}");
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nSpec: {}\n");
        assert!(e.message.contains("did you mean `spec`"), "{e}");
        let e = only_error(
            "apiVersion: projectcalico.org/v2\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\n",
        );
        assert_eq!(e.field, "apiVersion");
        let e = only_error("- a\n- b\n");
        assert!(e.message.contains("not a resource"), "{e}");
        let e = only_error("key: [unclosed\n");
        assert!(e.message.contains("not valid YAML"), "{e}");
        // A HostEndpoint placeholder from the corpus (interface left blank).
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\nspec: {node: n, interfaceName: eth1, expectedIPs: [\"300.1.1.1\"]}\n");
        assert_eq!(e.field, "spec.expectedIPs[0]");
    }

    #[test]
    fn an_invalid_object_leaves_the_rest_in_force() {
        let text = format!(
            "{}---\n{}",
            gnp("  ingress: [{action: Allow}]\n"),
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: broken}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [99999]}}]}\n"
        );
        let l = load(&text);
        assert_eq!(l.errors.len(), 1);
        assert_eq!(l.errors[0].resource, "GlobalNetworkPolicy/broken");
        assert_eq!(l.set.policies.len(), 1);
        assert_eq!(l.set.policies[0].name, "p");
    }

    #[test]
    fn an_invalid_new_version_keeps_the_last_good_one() {
        let good = load(&format!(
            "{}---\n{}",
            gnp("  ingress: [{action: Deny, protocol: TCP, destination: {ports: [22]}}]\n"),
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: q}\nspec: {ingress: [{action: Allow}]}\n"
        ));
        assert!(good.errors.is_empty());
        // p breaks, q is edited validly, r is new and invalid.
        let mut next = load(&format!(
            "{}---\n{}---\n{}",
            gnp("  ingress: [{action: Deny, protocol: TCP, destination: {ports: [99999]}}]\n"),
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: q}\nspec: {order: 5, ingress: [{action: Allow}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: r}\nspec: {ingress: [{action: Nope}]}\n"
        ));
        let kept = keep_last_good(&good.set, &mut next);
        assert_eq!(kept.len(), 1, "{kept:?}");
        let names: Vec<(&str, Option<f64>)> = next
            .set
            .policies
            .iter()
            .map(|p| (p.name.as_str(), p.order))
            .collect();
        assert_eq!(
            names,
            [("q", Some(5.0)), ("p", None)],
            "p kept as it was, q updated, r not applied"
        );
        assert_eq!(next.set.policies[1].ingress[0].destination.ports[0].lo, 22);
        assert_eq!(next.errors.len(), 2, "both errors still reported");
        // A file that no longer parses keeps everything it held.
        let mut broken = load("key: [unclosed\n");
        let kept = keep_last_good(&good.set, &mut broken);
        assert_eq!((kept.len(), broken.set.policies.len()), (2, 2));
        // An object removed from a valid file is removed.
        let mut removed = load(&gnp("  ingress: [{action: Deny}]\n"));
        assert!(keep_last_good(&good.set, &mut removed).is_empty());
        assert_eq!(removed.set.policies.len(), 1);
    }

    #[test]
    fn near_miss_label_keys_are_flagged() {
        let l = load(concat!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public}}\nspec: {node: n, interfaceName: eth1}\n---\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\n",
            "spec: {selector: \"ibm.rol == 'worker_public'\", ingress: [{action: Allow, source: {selector: \"has(app)\"}}]}\n",
        ));
        let w = label_key_warnings(&l.set);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert_eq!(w[0].field, "spec.selector");
        assert!(w[0].message.contains("did you mean `ibm.role`"), "{}", w[0]);
    }

    #[test]
    fn duplicate_names_reject_both() {
        let text = format!("{}---\n{}", gnp("  order: 1\n"), gnp("  order: 2\n"));
        let l = load(&text);
        assert_eq!(l.errors.len(), 2, "{:#?}", l.errors);
        assert!(l.set.policies.is_empty());
        assert!(l.errors[0].message.contains("more than once"));
    }

    #[test]
    fn failsafes_from_felix_configuration_and_profiles() {
        let l = load(
            "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec:\n  failsafeInboundHostPorts: [{protocol: tcp, port: 22, net: 10.0.0.0/8}]\n---\napiVersion: moat.dev/v1alpha1\nkind: FailsafeProfile\nmetadata: {name: pub}\nspec: {selector: \"ibm.role == 'worker_public'\", inbound: [], outbound: []}\n---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: pub, labels: {ibm.role: worker_public}}\nspec: {node: n, interfaceName: eth1}\n---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: priv, labels: {ibm.role: worker_private}}\nspec: {node: n, interfaceName: eth0}\n",
        );
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let by_name = |n: &str| {
            l.set
                .host_endpoints
                .iter()
                .find(|h| h.name == n)
                .expect("hep")
        };
        let public = l.set.failsafes_for(by_name("pub")).expect("failsafes");
        assert!(public.inbound.is_empty() && public.outbound.is_empty());
        let private = l.set.failsafes_for(by_name("priv")).expect("failsafes");
        assert_eq!(private.inbound.len(), 1);
        assert_eq!(
            private.inbound[0].net,
            Some("10.0.0.0/8".parse().expect("net"))
        );
        assert_eq!(
            private.outbound,
            Failsafes::calico_defaults().outbound,
            "unset list keeps Calico's default"
        );
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec: {logSeverityScreen: Info}\n");
        assert!(e.message.contains("only the failsafe port fields"), "{e}");
    }
}
