//! Reading and validating policy resources.
//!
//! This version understands Calico `GlobalNetworkPolicy`, `HostEndpoint`
//! and `FelixConfiguration` (failsafe ports), plus moat's own
//! `FailsafeProfile`. Everything it reads it enforces exactly; every field
//! or kind it does not enforce yet is rejected with an error that says so,
//! never skipped. Errors name the file, the resource and the field.

pub mod kubernetes;
pub mod limits;
pub mod named_ports;
pub mod packet_spec;
pub mod profiles;
pub mod reference;
pub mod resolve;
pub mod selector;
pub mod service_accounts;
pub mod tier;
pub mod tree;

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
                        document: Some(p.origin.document),
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
/// in name order, each real file once, a ConfigMap volume through its
/// `..data`: `tree::walk`); `dir` may also be one file, or `-` for
/// standard input. Invalid resources are reported in `errors` and left
/// out; the valid rest is returned.
pub fn load_dir(dir: &Path) -> Result<Loaded, PolicyError> {
    if dir == Path::new("-") {
        return load_stdin();
    }
    if dir.is_file() {
        let text = read_bounded(dir).map_err(|message| PolicyError {
            file: dir.to_path_buf(),
            resource: String::new(),
            field: String::new(),
            message,
            document: None,
        })?;
        return Ok(load_str(dir, &text));
    }
    let tree = tree::walk(dir).map_err(|e| PolicyError {
        file: dir.to_path_buf(),
        resource: String::new(),
        field: String::new(),
        message: format!("cannot read the policy directory: {e}"),
        document: None,
    })?;
    let mut loaded = Loaded {
        skipped: tree.skipped,
        ..Default::default()
    };
    for (file, open) in &tree.files {
        match read_bounded(open) {
            Ok(text) => load_text(file, &text, &mut loaded),
            Err(e) => loaded.errors.push(PolicyError {
                file: file.clone(),
                resource: String::new(),
                field: String::new(),
                message: format!("cannot read: {e}"),
                document: None,
            }),
        }
    }
    loaded.files = tree.files.len();
    check_duplicates(&mut loaded);
    loaded.set.sort();
    Ok(loaded)
}

/// Reads the resources on standard input (`--policies -`), as one file
/// named `<stdin>`, within the file size limit.
pub fn load_stdin() -> Result<Loaded, PolicyError> {
    use std::io::Read;
    let name = Path::new("<stdin>");
    let limit = limits::MAX_FILE_BYTES;
    let mut bytes = Vec::new();
    let fail = |message: String| PolicyError {
        file: name.to_path_buf(),
        resource: String::new(),
        field: String::new(),
        message,
        document: None,
    };
    std::io::stdin()
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read standard input: {e}")))?;
    if bytes.len() > limit {
        return Err(fail(too_big_file(&format!("more than {limit}"))));
    }
    let text = String::from_utf8(bytes).map_err(|e| fail(format!("not UTF-8 text: {e}")))?;
    Ok(load_str(name, &text))
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

/// Reads `file` whole unless it is over `limits::MAX_FILE_BYTES` (checked
/// while reading, so a growing file or a pipe cannot exceed it either).
pub fn read_bounded(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let limit = limits::MAX_FILE_BYTES;
    let f = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > limit {
        return Err(too_big_file(&format!("more than {limit}")));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// The error for a file of `size` (in words) over the file limit.
fn too_big_file(size: &str) -> String {
    format!(
        "{size} bytes, over the limit of {} bytes for one policy file; split it into several files (each document at most {} bytes)",
        limits::MAX_FILE_BYTES,
        limits::MAX_DOCUMENT_BYTES
    )
}

/// Refuses a text over the size and nesting limits before it is parsed.
fn check_limits(text: &str) -> Result<(), String> {
    if text.len() > limits::MAX_FILE_BYTES {
        return Err(too_big_file(&text.len().to_string()));
    }
    for (n, (start, end)) in limits::documents(text).into_iter().enumerate() {
        if end - start > limits::MAX_DOCUMENT_BYTES {
            return Err(format!(
                "document {} is {} bytes, over the limit of {} bytes for one resource; nothing in the file is applied",
                n + 1,
                end - start,
                limits::MAX_DOCUMENT_BYTES
            ));
        }
    }
    if let Some(line) = limits::flow_depth_exceeded(text, limits::MAX_FLOW_DEPTH) {
        return Err(format!(
            "line {line}: flow collections ([...] or {{...}}) nested deeper than {} levels; nothing in the file is applied",
            limits::MAX_FLOW_DEPTH
        ));
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
                document: Some(origin.document),
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
            document: None,
        });
        return;
    }
    if let Err(message) = check_limits(text) {
        loaded.errors.push(PolicyError {
            file: file.to_path_buf(),
            resource: String::new(),
            field: String::new(),
            message,
            document: None,
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
                    document: None,
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
    let document = origin.document;
    let err = |resource: &str, field: &str, message: String| PolicyError {
        file: file.to_path_buf(),
        resource: resource.to_string(),
        field: field.to_string(),
        message,
        document: Some(document),
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
    // `kind: List` (kubectl) and `kind: GlobalNetworkPolicyList` and the
    // like (calicoctl get -o yaml|json, the API's list responses): each
    // item is a resource; items without apiVersion or kind take the
    // list's.
    if let Some(item_kind) = kind.strip_suffix("List") {
        match get("items") {
            Some(Value::Sequence(items)) => {
                *index -= 1;
                for mut item in items.clone() {
                    if let Value::Mapping(m) = &mut item {
                        if !item_kind.is_empty() && !m.contains_key("kind") {
                            m.insert("kind".into(), item_kind.into());
                        }
                        if !api.is_empty() && !m.contains_key("apiVersion") {
                            m.insert("apiVersion".into(), api.as_str().into());
                        }
                    }
                    load_value(file, index, item, loaded);
                }
            }
            Some(Value::Null) => *index -= 1,
            _ => loaded.errors.push(err(
                &kind,
                "items",
                format!("a {kind} needs a sequence of items"),
            )),
        }
        return;
    }
    let metadata = get("metadata").cloned().unwrap_or(Value::Null);
    let mut meta_problems = Problems::default();
    let meta: Metadata =
        deserialize_all(metadata, "metadata", &mut meta_problems).unwrap_or_default();
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
            meta_problems.add(
                key,
                unknown_field(key, &["apiVersion", "kind", "metadata", "spec"]),
            );
        }
    }
    if !meta_problems.0.is_empty() {
        for (field, message) in meta_problems.0 {
            loaded.errors.push(err(&resource, &field, message));
        }
        return;
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
    if let Err((field, message)) = check_labels(&meta.labels) {
        loaded.errors.push(err(&resource, &field, message));
        return;
    }
    let spec = get("spec").cloned().unwrap_or(Value::Null);
    // Problems after the first, from validators that report them all.
    let mut more = Vec::new();
    let status = value.get("status").cloned();
    let result = read_resource(
        (&kind, &api),
        &meta,
        spec,
        status,
        origin,
        loaded,
        &mut more,
    );
    if let Err((field, message)) = result {
        loaded.errors.push(err(&resource, &field, message));
    }
    let left = more.len().saturating_sub(MAX_ERRORS_PER_OBJECT);
    for (field, message) in more.into_iter().take(MAX_ERRORS_PER_OBJECT) {
        loaded.errors.push(err(&resource, &field, message));
    }
    if left > 0 {
        loaded.errors.push(err(
            &resource,
            "",
            format!(
                "{left} more problem(s) not shown (at most {MAX_ERRORS_PER_OBJECT} per object)"
            ),
        ));
    }
}

/// Every unknown field and badly typed field of `spec` read as `T` (one
/// run shows them all), before the kind's own validation.
fn strict_spec<T: serde::de::DeserializeOwned>(spec: &Value) -> ObjectResult<()> {
    if spec.is_null() {
        return Ok(());
    }
    let mut p = Problems::default();
    deserialize_all::<T>(spec.clone(), "spec", &mut p);
    if p.0.is_empty() {
        Ok(())
    } else {
        Err(p.0)
    }
}

/// The first problem as the result, the rest into `more`.
fn first_and_rest<T>(r: ObjectResult<T>, more: &mut Vec<(String, String)>) -> FieldResult<T> {
    r.map_err(|problems| {
        let mut it = problems.into_iter();
        let first = it.next().unwrap_or_default();
        more.extend(it);
        first
    })
}

/// Reads one resource of `kind` and `api` into `loaded`.
fn read_resource(
    (kind, api): (&str, &str),
    meta: &Metadata,
    spec: Value,
    status: Option<Value>,
    origin: Origin,
    loaded: &mut Loaded,
    more: &mut Vec<(String, String)>,
) -> FieldResult<()> {
    match (kind, api) {
    ("GlobalNetworkPolicy", a) if CALICO_API_VERSIONS.contains(&a) => {
        first_and_rest(policy(meta, spec, origin, PolicyKind::GlobalNetworkPolicy), more)
            .map(|p| loaded.set.policies.push(p))
    }
    ("NetworkPolicy", a) if CALICO_API_VERSIONS.contains(&a) => {
        first_and_rest(policy(meta, spec, origin, PolicyKind::NetworkPolicy), more)
            .map(|p| loaded.set.policies.push(p))
    }
    ("NetworkPolicy", "networking.k8s.io/v1") => {
        crate::policy::kubernetes::network_policy(&meta.name, meta.namespace.as_deref(), spec, origin)
            .map(|p| loaded.set.policies.push(p))
    }
    ("GlobalNetworkSet" | "NetworkSet", a) if CALICO_API_VERSIONS.contains(&a) => {
        first_and_rest(strict_spec::<RawNetworkSetSpec>(&spec), more)
            .and_then(|()| network_set(meta, spec, origin, kind == "NetworkSet"))
            .map(|n| loaded.set.network_sets.push(n))
    }
    ("Namespace" | "Pod" | "Node" | "Service" | "ServiceAccount", "v1") => {
        crate::policy::kubernetes::object(kind, &meta.name, meta.namespace.as_deref(), &meta.labels, spec, status)
            .map(|o| loaded.set.objects.push(o))
    }
    ("HostEndpoint", a) if CALICO_API_VERSIONS.contains(&a) => {
        first_and_rest(strict_spec::<RawHostEndpointSpec>(&spec), more)
            .and_then(|()| host_endpoint(meta, spec, origin))
            .map(|h| loaded.set.host_endpoints.push(h))
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
        first_and_rest(strict_spec::<RawFailsafeProfileSpec>(&spec), more)
            .and_then(|()| failsafe_profile(meta, spec, origin))
            .map(|f| loaded.set.failsafe_profiles.push(f))
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

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters: a
/// label value, or the name part of a label key (Kubernetes'
/// `IsValidLabelValue` and `IsQualifiedName`).
fn is_label_name(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Label keys and values as Calico's validator (and the Kubernetes API
/// server) accept them: keys `[prefix/]name` with a DNS subdomain prefix,
/// values empty or a label name.
fn check_labels(labels: &BTreeMap<String, String>) -> FieldResult<()> {
    for (k, v) in labels {
        let field = format!("metadata.labels.{k}");
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.split('.').all(|part| {
                    !part.is_empty()
                        && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                        && part.ends_with(|c: char| c.is_ascii_alphanumeric())
                        && part
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
        });
        if !prefix_ok || !is_label_name(name) {
            return field_err(
                field,
                format!("{k:?} is not a valid label key ([DNS-subdomain/]name, the name at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"),
            );
        }
        if !v.is_empty() && !is_label_name(v) {
            return field_err(
                field,
                format!("{v:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, or empty)"),
            );
        }
    }
    Ok(())
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

/// Kubernetes' ObjectMeta: every field it has is accepted (those after
/// `labels` describe the object, not its policy, and are not read); any
/// other is an error, so a typo (`lables`, `Namespace`) is never dropped.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Metadata {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "annotations")]
    _annotations: Option<BTreeMap<String, String>>,
    #[serde(rename = "uid")]
    _uid: Option<Value>,
    #[serde(rename = "resourceVersion")]
    _resource_version: Option<Value>,
    #[serde(rename = "generation")]
    _generation: Option<Value>,
    #[serde(rename = "creationTimestamp")]
    _creation_timestamp: Option<Value>,
    #[serde(rename = "deletionTimestamp")]
    _deletion_timestamp: Option<Value>,
    #[serde(rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: Option<Value>,
    #[serde(rename = "generateName")]
    _generate_name: Option<Value>,
    #[serde(rename = "selfLink")]
    _self_link: Option<Value>,
    #[serde(rename = "ownerReferences")]
    _owner_references: Option<Value>,
    #[serde(rename = "finalizers")]
    _finalizers: Option<Value>,
    #[serde(rename = "managedFields")]
    _managed_fields: Option<Value>,
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
    ingress: Option<Vec<Value>>,
    egress: Option<Vec<Value>>,
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

/// Most problems reported for one object (the rest are summarised).
pub const MAX_ERRORS_PER_OBJECT: usize = 100;

/// Every problem found in one object, as (field, message), in order.
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
    }

    /// The value of `r`, or `None` with its error recorded.
    fn ok<T>(&mut self, r: FieldResult<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err((f, m)) => {
                self.0.push((f, m));
                None
            }
        }
    }

    /// `value` when nothing was found, else every problem.
    fn finish<T>(self, value: Option<T>) -> ObjectResult<T> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ if self.0.is_empty() => Err(vec![(String::new(), "invalid".into())]),
            _ => Err(self.0),
        }
    }
}

/// An object, or every problem found in it.
type ObjectResult<T> = Result<T, Vec<(String, String)>>;

/// `prefix.path` for a serde path (`.` is the value itself).
fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path) {
        (_, ".") => prefix.to_string(),
        (true, p) => p.to_string(),
        (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
        (false, p) => format!("{prefix}.{p}"),
    }
}

/// Deserializes `value` as `T`, reporting every unknown field and every
/// badly typed optional field to `problems` (each is removed and the rest
/// read again, so its other fields are still checked); `None` when what is
/// left cannot be read.
fn deserialize_all<T: serde::de::DeserializeOwned>(
    mut value: Value,
    prefix: &str,
    problems: &mut Problems,
) -> Option<T> {
    for _ in 0..MAX_ERRORS_PER_OBJECT {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) => return Some(t),
            Err(e) => e,
        };
        let (path, message) = serde_problem(&e);
        problems.add(join_path(prefix, &path), message);
        if e.inner().to_string().starts_with("missing field") || !remove_at(&mut value, e.path()) {
            return None;
        }
    }
    None
}

/// (path, message) of a serde error, with "did you mean" for a field.
fn serde_problem(e: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> (String, String) {
    let inner = e.inner().to_string();
    let message = match parse_unknown_field(&inner) {
        Some((field, expected)) => {
            let known: Vec<&str> = expected.iter().map(String::as_str).collect();
            unknown_field(&field, &known)
        }
        None => inner,
    };
    (e.path().to_string(), message)
}

/// Removes the map entry the last map key of `path` names (so the rest
/// can be read); false when there is none.
fn remove_at(value: &mut Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some(last_key) = segments
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    else {
        return false;
    };
    let mut here = value;
    for s in &segments[..last_key] {
        here = match (s, here) {
            (Segment::Seq { index }, Value::Sequence(items)) => match items.get_mut(*index) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Map { key }, Value::Mapping(m)) => match m.get_mut(key.as_str()) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (segments[last_key], here) {
        (Segment::Map { key }, Value::Mapping(m)) => m.remove(key.as_str()).is_some(),
        _ => false,
    }
}

fn policy(meta: &Metadata, spec: Value, origin: Origin, kind: PolicyKind) -> ObjectResult<Policy> {
    let mut p = Problems::default();
    let namespaced = kind == PolicyKind::NetworkPolicy;
    let mut spec = spec;
    if namespaced {
        // Fields of GlobalNetworkPolicy only: a NetworkPolicy naming them is
        // invalid, as in Calico.
        if let Value::Mapping(m) = &mut spec {
            for f in [
                "preDNAT",
                "doNotTrack",
                "applyOnForward",
                "namespaceSelector",
            ] {
                if m.remove(f).is_some() {
                    p.add(
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
        deserialize_all(spec, "spec", &mut p).unwrap_or_default()
    };
    let pre_dnat = raw.pre_dnat.unwrap_or(false);
    let do_not_track = raw.do_not_track.unwrap_or(false);
    let apply_on_forward = raw.apply_on_forward.unwrap_or(false);
    // Calico's own validation first, so the message is the real one.
    if pre_dnat && do_not_track {
        p.add("spec.preDNAT", "preDNAT and doNotTrack cannot both be true");
    } else if (pre_dnat || do_not_track) && !apply_on_forward {
        let f = if pre_dnat {
            "spec.preDNAT"
        } else {
            "spec.doNotTrack"
        };
        p.add(
            f,
            "preDNAT and doNotTrack policies need applyOnForward: true",
        );
    }
    let egress_rules = raw.egress.as_ref().is_some_and(|e| !e.is_empty());
    if pre_dnat && egress_rules {
        p.add("spec.egress", "a preDNAT policy cannot have egress rules");
    }
    let (ingress_applies, egress_applies) = policy_types(&raw, &mut p);
    if pre_dnat && egress_applies && !egress_rules {
        p.add("spec.types", "a preDNAT policy cannot have the Egress type");
    }
    if raw.order.is_some_and(|o| !o.is_finite()) {
        p.add("spec.order", "order must be a finite number");
    }
    let selector = p.ok(parse_selector(
        raw.selector.as_deref().unwrap_or_default(),
        "spec.selector",
    ));
    let ingress = rules(raw.ingress.unwrap_or_default(), "spec.ingress", &mut p);
    let egress = rules(raw.egress.unwrap_or_default(), "spec.egress", &mut p);
    let namespace_selector = raw
        .namespace_selector
        .as_deref()
        .and_then(|t| p.ok(parse_selector(t, "spec.namespaceSelector")));
    let tier = raw
        .tier
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| tier::DEFAULT_TIER.into());
    let selector = match raw.service_account_selector.as_deref() {
        Some(t) if !t.trim().is_empty() => {
            let accounts = p.ok(service_accounts::selector(t, "spec.serviceAccountSelector"));
            selector
                .zip(accounts)
                .map(|(s, a)| Selector::And(Box::new(s), Box::new(a)))
        }
        _ => selector,
    };
    for (i, h) in raw.performance_hints.iter().flatten().enumerate() {
        if h != "AssumeNeededOnEveryNode" {
            p.add(
                format!("spec.performanceHints[{i}]"),
                format!("unknown hint {h:?}"),
            );
        }
    }
    let policy = selector.map(|selector| Policy {
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
    });
    p.finish(policy)
}

/// (ingress applies, egress applies) from `types`, or Calico's defaulting.
fn policy_types(raw: &RawPolicySpec, p: &mut Problems) -> (bool, bool) {
    let Some(types) = &raw.types else {
        // Calico's defaulting: Egress only when there are egress rules,
        // Ingress when there are ingress rules or no egress rules.
        let has_in = raw.ingress.as_ref().is_some_and(|r| !r.is_empty());
        let has_out = raw.egress.as_ref().is_some_and(|r| !r.is_empty());
        return (has_in || !has_out, has_out);
    };
    let (mut ingress, mut egress) = (false, false);
    for (i, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => ingress = true,
            "Egress" => egress = true,
            other => {
                let hint = did_you_mean(other, &["Ingress", "Egress"])
                    .map(|s| format!(", did you mean {s}?"))
                    .unwrap_or_default();
                p.add(
                    format!("spec.types[{i}]"),
                    format!("{other:?} is not a policy type (Ingress or Egress){hint}"),
                );
            }
        }
    }
    (ingress, egress)
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

/// The rules of a list, or its first problem (for resources that report
/// one error: a Profile's rules).
pub(crate) fn rules_or_first(raw: Vec<Value>, field: &str) -> FieldResult<Vec<Rule>> {
    let mut p = Problems::default();
    let out = rules(raw, field, &mut p);
    match p.0.into_iter().next() {
        Some(first) => Err(first),
        None => Ok(out),
    }
}

/// Every rule of a list that is valid; the problems of the others go to
/// `p`.
fn rules(raw: Vec<Value>, field: &str, p: &mut Problems) -> Vec<Rule> {
    let mut out = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let f = format!("{field}[{i}]");
        if let Some(raw) = deserialize_all::<RawRule>(r, &f, p) {
            if let Some(rule) = rule(raw, &f, p) {
                out.push(rule);
            }
        }
    }
    out
}

/// A protocol field (`protocol`, `notProtocol`) of a rule.
fn rule_protocol(raw: Option<&NumOrString>, field: String, p: &mut Problems) -> Option<u8> {
    raw.and_then(|v| p.ok(parse_protocol(v, &field)))
}

/// The rule, or `None` with every problem it has added to `p`.
fn rule(raw: RawRule, field: &str, p: &mut Problems) -> Option<Rule> {
    let before = p.0.len();
    let action = match raw.action.as_str() {
        "Allow" => Some(Action::Allow),
        "Deny" => Some(Action::Deny),
        "Log" => Some(Action::Log),
        "Pass" => Some(Action::Pass),
        other => {
            let hint = did_you_mean(other, &["Allow", "Deny", "Log", "Pass"])
                .map(|s| format!(", did you mean {s}?"))
                .unwrap_or_default();
            p.add(
                format!("{field}.action"),
                format!("unknown action {other:?} (Allow, Deny, Log or Pass){hint}"),
            );
            None
        }
    };
    let protocol = rule_protocol(raw.protocol.as_ref(), format!("{field}.protocol"), p);
    let not_protocol = rule_protocol(raw.not_protocol.as_ref(), format!("{field}.notProtocol"), p);
    let ip_version = match raw.ip_version {
        None => None,
        Some(v @ (4 | 6)) => Some(v as u8),
        Some(v) => {
            p.add(
                format!("{field}.ipVersion"),
                format!("ipVersion {v} is neither 4 nor 6"),
            );
            None
        }
    };
    let icmp_m = raw
        .icmp
        .as_ref()
        .and_then(|i| p.ok(icmp(i, &format!("{field}.icmp"))));
    let not_icmp = raw
        .not_icmp
        .as_ref()
        .and_then(|i| p.ok(icmp(i, &format!("{field}.notICMP"))));
    // Calico's CRD rule: `icmp` needs protocol ICMP or ICMPv6; `notICMP`
    // needs no protocol.
    if raw.icmp.is_some() && !matches!(protocol, Some(1 | 58)) {
        p.add(
            format!("{field}.icmp"),
            "ICMP fields need protocol ICMP or ICMPv6",
        );
    }
    match (protocol, ip_version) {
        (Some(1), Some(6)) => p.add(
            format!("{field}.protocol"),
            "protocol ICMP with ipVersion 6 (use ICMPv6)",
        ),
        (Some(58), Some(4)) => p.add(
            format!("{field}.protocol"),
            "protocol ICMPv6 with ipVersion 4 (use ICMP)",
        ),
        _ => {}
    }
    let ports_allowed = matches!(protocol, Some(6 | 17 | 132));
    let source = entity(
        raw.source,
        &format!("{field}.source"),
        ports_allowed,
        ip_version,
        p,
    );
    let destination = entity(
        raw.destination,
        &format!("{field}.destination"),
        ports_allowed,
        ip_version,
        p,
    );
    if raw.http.is_some() {
        p.ok(not_yet::<()>(
            &format!("{field}.http"),
            "an HTTP match (it needs an application layer proxy)",
        ));
    }
    if p.0.len() > before {
        return None;
    }
    Some(Rule {
        action: action?,
        protocol,
        not_protocol,
        icmp: icmp_m,
        not_icmp,
        ip_version,
        source,
        destination,
    })
}

/// Port ranges of `ports` or `notPorts`, and (where `names_allowed`) the
/// port names among them, each problem added to `p`.
fn entity_ports(
    raw: Option<Vec<NumOrString>>,
    field: String,
    ports_allowed: bool,
    names_allowed: bool,
    p: &mut Problems,
) -> (Vec<PortRange>, Vec<String>) {
    let raw = raw.unwrap_or_default();
    if !raw.is_empty() && !ports_allowed {
        let name = field.rsplit('.').next().unwrap_or_default().to_string();
        p.add(field, format!("{name} need protocol TCP, UDP or SCTP"));
        return (Vec::new(), Vec::new());
    }
    let (mut ranges, mut names) = (Vec::new(), Vec::new());
    for (i, r) in raw.iter().enumerate() {
        match r {
            NumOrString::Str(s) if names_allowed && named_ports::is_port_name(s) => {
                names.push(s.clone())
            }
            _ => ranges.extend(p.ok(port_range(r, &format!("{field}[{i}]")))),
        }
    }
    (ranges, names)
}

fn entity(
    raw: Option<RawEntity>,
    field: &str,
    ports_allowed: bool,
    ip_version: Option<u8>,
    p: &mut Problems,
) -> EntityMatch {
    let raw = raw.unwrap_or_default();
    let mut nets = Vec::new();
    for (i, n) in raw.nets.unwrap_or_default().iter().enumerate() {
        let f = format!("{field}.nets[{i}]");
        let Some(net) = p.ok(parse_net(n).map_err(|m| (f.clone(), m))) else {
            continue;
        };
        let v = if net.addr().is_ipv4() { 4 } else { 6 };
        if let Some(want) = ip_version.filter(|want| *want != v) {
            p.add(f, format!("IPv{v} net {n} in a rule with ipVersion {want}"));
            continue;
        }
        nets.push(net);
    }
    let (ports, named_ports) =
        entity_ports(raw.ports, format!("{field}.ports"), ports_allowed, true, p);
    let (not_ports, _) = entity_ports(
        raw.not_ports,
        format!("{field}.notPorts"),
        ports_allowed,
        false,
        p,
    );
    let mut not_nets = Vec::new();
    for (i, n) in raw.not_nets.iter().flatten().enumerate() {
        let f = format!("{field}.notNets[{i}]");
        let Some(net) = p.ok(parse_net(n).map_err(|m| (f.clone(), m))) else {
            continue;
        };
        if net.prefix_len() == 0 {
            // Calico's validator: "catch-all CIDR in negation creates
            // logical contradiction (matches no traffic)".
            p.add(
                f,
                format!("{n} in notNets excludes every address, so the rule could never match; remove the rule or the net"),
            );
            continue;
        }
        not_nets.push(net);
    }
    let mut selectors = [None, None, None];
    for (slot, (name, value)) in selectors.iter_mut().zip([
        ("selector", &raw.selector),
        ("notSelector", &raw.not_selector),
        ("namespaceSelector", &raw.namespace_selector),
    ]) {
        let Some(text) = value else { continue };
        let f = format!("{field}.{name}");
        let Some(sel) = p.ok(Selector::parse(text).map_err(|e| (f.clone(), e.to_string()))) else {
            continue;
        };
        if sel.uses_global() && (name != "namespaceSelector" || sel != Selector::Global) {
            p.add(
                f,
                "global() is only valid alone in a rule's namespaceSelector",
            );
            continue;
        }
        *slot = Some(sel);
    }
    if raw.services.is_some() {
        p.ok(not_yet::<()>(
            &format!("{field}.services"),
            "a rule services",
        ));
    }
    let [selector, not_selector, namespace_selector] = selectors;
    let by_account = raw
        .service_accounts
        .as_ref()
        .and_then(|v| {
            p.ok(service_accounts::rule_match(
                v,
                &format!("{field}.serviceAccounts"),
            ))
        })
        .flatten();
    let selector = service_accounts::and(by_account, selector);
    let service_frontends = raw.moat_service_frontends.unwrap_or(false);
    if service_frontends && !field.ends_with("destination") {
        p.add(
            format!("{field}.moatServiceFrontends"),
            "valid in a rule's destination only",
        );
    }
    EntityMatch {
        service_frontends,
        nets,
        not_nets,
        ports,
        not_ports,
        named_ports,
        selector,
        not_selector,
        namespace_selector,
    }
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

/// A CIDR, or a bare address meaning a single host.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    // Calico (Go's parser) refuses IPv4 octets with leading zeros, which
    // some parsers read as decimal and others as octal: `198.010.1.1`.
    let addr = text.split('/').next().unwrap_or_default();
    if addr.contains('.')
        && addr
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .split('.')
            .any(|o| o.len() > 1 && o.starts_with('0'))
    {
        return Err(format!(
            "{text:?} has an IPv4 octet with a leading zero (ambiguous: decimal or octal); write it without"
        ));
    }
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = text.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!("{text:?} is not a CIDR"))
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

    #[test]
    fn calico_validator_cases() {
        // notNets of everything can never match: refused, as Calico does.
        for net in ["0.0.0.0/0", "::/0"] {
            let e = only_error(&gnp(&format!(
                "  ingress:\n    - action: Allow\n      source: {{notNets: ['{net}']}}\n"
            )));
            assert_eq!(e.field, "spec.ingress[0].source.notNets[0]", "{e}");
            assert!(e.message.contains("excludes every address"), "{e}");
        }
        // notICMP needs no protocol (only icmp does).
        let l = load(&gnp(
            "  ingress:\n    - action: Allow\n      notICMP: {type: 8}\n",
        ));
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.set.policies[0].ingress[0].not_icmp.unwrap().icmp_type, 8);
        let e = only_error(&gnp(
            "  ingress:\n    - action: Allow\n      icmp: {type: 8}\n",
        ));
        assert_eq!(e.field, "spec.ingress[0].icmp");
        // IPv4 octets with leading zeros: refused everywhere a net is read.
        for net in ["198.010.1.1", "010.0.0.0/8", "::ffff:1.02.3.4"] {
            let e = only_error(&gnp(&format!(
                "  ingress:\n    - action: Allow\n      source: {{nets: ['{net}']}}\n"
            )));
            assert!(e.message.contains("leading zero"), "{net}: {e}");
        }
        assert!(parse_net("10.0.0.0/8").is_ok() && parse_net("0.0.0.0/0").is_ok());
        // Label keys and values as Calico's validator has them.
        for (labels, field) in [
            ("{a: '\"'}", "metadata.labels.a"),
            ("{a: \"'\"}", "metadata.labels.a"),
            ("{a: -x}", "metadata.labels.a"),
            ("{'Bad_/x': y}", "metadata.labels.Bad_/x"),
            ("{'a b': y}", "metadata.labels.a b"),
        ] {
            let e = only_error(&format!("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: h, labels: {labels}}}\nspec: {{node: n, interfaceName: eth1}}\n"));
            assert_eq!(e.field, field, "{labels}: {e}");
        }
        let l = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public, 'projectcalico.org/name': x.y-z_1, empty: ''}}\nspec: {node: n, interfaceName: eth1}\n");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    }

    #[test]
    fn every_problem_of_an_object_in_one_run() {
        let l = load(&gnp(
            "  selector: all()\n  ingress:\n    - action: allow\n      protocl: TCP\n      source: {nets: [10.0.0.0/33], nots: x}\n    - action: Allow\n      protocol: TCP\n      destination: {ports: [70000, \"9:1\"]}\n  Types: [Ingress]\n",
        ));
        let fields: Vec<&str> = l.errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.Types",
            "spec.ingress[0].protocl",
            "spec.ingress[0].source.nots",
            "spec.ingress[0].action",
            "spec.ingress[0].source.nets[0]",
            "spec.ingress[1].destination.ports[0]",
            "spec.ingress[1].destination.ports[1]",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(l
            .errors
            .iter()
            .all(|e| e.resource == "GlobalNetworkPolicy/p"));
        assert!(
            l.set.policies.is_empty(),
            "an object with problems is left out"
        );
        // Metadata typos and every unknown field of a HostEndpoint.
        let l = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, lables: {a: b}, Namespace: x}\nspec: {node: n, interfacename: eth1, expectedIps: []}\n");
        let fields: Vec<&str> = l.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["metadata.lables", "metadata.Namespace"],
            "{:?}",
            l.errors
        );
        assert!(l.errors[0].message.contains("did you mean `labels`"));
        assert!(l.errors[1].message.contains("did you mean `namespace`"));
        let l = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\nspec: {node: n, interfacename: eth1, expectedIps: []}\n");
        let msgs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].contains("spec.interfacename")
                && msgs[0].contains("did you mean `interfaceName`"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("spec.expectedIps") && msgs[1].contains("did you mean `expectedIPs`"),
            "{msgs:?}"
        );
        // kubectl's metadata is all accepted.
        let l = load("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p, uid: x, resourceVersion: '1', generation: 2, creationTimestamp: '2024-01-01T00:00:00Z', annotations: {a: b}, managedFields: [{manager: kubectl}], finalizers: [], ownerReferences: []}\nspec: {selector: all()}\n");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    }
}
