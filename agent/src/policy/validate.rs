//! Validating each resource as Calico does: unknown fields with "did you
//! mean", every problem of an object in one run, rules, entities, ports,
//! protocols, ICMP, nets, selectors, host endpoints, FelixConfiguration and
//! failsafe profiles.

use super::*;

/// Every unknown field and badly typed field of `spec` read as `T` (one
/// run shows them all), before the kind's own validation.
pub(super) fn strict_spec<T: serde::de::DeserializeOwned>(spec: &Value) -> ObjectResult<()> {
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
pub(super) fn first_and_rest<T>(
    r: ObjectResult<T>,
    more: &mut Vec<(String, String)>,
) -> FieldResult<T> {
    r.map_err(|problems| {
        let mut it = problems.into_iter();
        let first = it.next().unwrap_or_default();
        more.extend(it);
        first
    })
}

/// Reads one resource of `kind` and `api` into `loaded`.
pub(super) fn read_resource(
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
pub(super) fn check_name(name: &str) -> Result<(), String> {
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
pub(super) fn is_label_name(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Label keys and values as Calico's validator (and the Kubernetes API
/// server) accept them: keys `[prefix/]name` with a DNS subdomain prefix,
/// values empty or a label name.
pub(super) fn check_labels(labels: &BTreeMap<String, String>) -> FieldResult<()> {
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
pub(super) fn unknown_field(field: &str, known: &[&str]) -> String {
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
pub(super) fn parse_unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
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
    pub(crate) name: String,
    pub(crate) namespace: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
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
pub(super) enum NumOrString {
    Num(i64),
    Str(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPolicySpec {
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
pub(super) struct RawIcmp {
    #[serde(rename = "type")]
    icmp_type: Option<i64>,
    code: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawEntity {
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

pub(super) fn field_err<T>(field: impl Into<String>, message: impl Into<String>) -> FieldResult<T> {
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
pub(super) struct Problems(pub(super) Vec<(String, String)>);

impl Problems {
    pub(super) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
    }

    /// The value of `r`, or `None` with its error recorded.
    pub(super) fn ok<T>(&mut self, r: FieldResult<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err((f, m)) => {
                self.0.push((f, m));
                None
            }
        }
    }

    /// `value` when nothing was found, else every problem.
    pub(super) fn finish<T>(self, value: Option<T>) -> ObjectResult<T> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ if self.0.is_empty() => Err(vec![(String::new(), "invalid".into())]),
            _ => Err(self.0),
        }
    }
}

/// An object, or every problem found in it.
pub(super) type ObjectResult<T> = Result<T, Vec<(String, String)>>;

/// `prefix.path` for a serde path (`.` is the value itself).
pub(super) fn join_path(prefix: &str, path: &str) -> String {
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
pub(super) fn deserialize_all<T: serde::de::DeserializeOwned>(
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
pub(super) fn serde_problem(
    e: &serde_path_to_error::Error<serde_yaml_ng::Error>,
) -> (String, String) {
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
pub(super) fn remove_at(value: &mut Value, path: &serde_path_to_error::Path) -> bool {
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

pub(super) fn policy(
    meta: &Metadata,
    spec: Value,
    origin: Origin,
    kind: PolicyKind,
) -> ObjectResult<Policy> {
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
pub(super) fn policy_types(raw: &RawPolicySpec, p: &mut Problems) -> (bool, bool) {
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

pub(super) fn parse_selector(text: &str, field: &str) -> FieldResult<Selector> {
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
pub(super) fn rules(raw: Vec<Value>, field: &str, p: &mut Problems) -> Vec<Rule> {
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
pub(super) fn rule_protocol(
    raw: Option<&NumOrString>,
    field: String,
    p: &mut Problems,
) -> Option<u8> {
    raw.and_then(|v| p.ok(parse_protocol(v, &field)))
}

/// The rule, or `None` with every problem it has added to `p`.
pub(super) fn rule(raw: RawRule, field: &str, p: &mut Problems) -> Option<Rule> {
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
pub(super) fn entity_ports(
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

pub(super) fn entity(
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
pub(super) const PROTOCOL_NAMES: [(&str, u8); 6] = [
    ("TCP", 6),
    ("UDP", 17),
    ("ICMP", 1),
    ("ICMPv6", 58),
    ("SCTP", 132),
    ("UDPLite", 136),
];

pub(super) fn parse_protocol(raw: &NumOrString, field: &str) -> FieldResult<u8> {
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

pub(super) fn icmp(raw: &RawIcmp, field: &str) -> FieldResult<IcmpMatch> {
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

pub(super) fn port_range(raw: &NumOrString, field: &str) -> FieldResult<PortRange> {
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
pub(super) struct RawHostEndpointSpec {
    node: Option<String>,
    interface_name: Option<String>,
    #[serde(rename = "expectedIPs")]
    expected_ips: Option<Vec<String>>,
    profiles: Option<Vec<String>>,
    ports: Option<Vec<Value>>,
}

pub(super) fn host_endpoint(
    meta: &Metadata,
    spec: Value,
    origin: Origin,
) -> FieldResult<HostEndpoint> {
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
pub(super) struct RawFailsafePort {
    protocol: Option<String>,
    port: i64,
    net: Option<String>,
}

pub(super) fn failsafe_ports(
    raw: &[RawFailsafePort],
    field: &str,
) -> FieldResult<Vec<FailsafePort>> {
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
pub(super) struct RawFelixSpec {
    failsafe_inbound_host_ports: Option<Vec<RawFailsafePort>>,
    failsafe_outbound_host_ports: Option<Vec<RawFailsafePort>>,
}

pub(super) fn felix_configuration(meta: &Metadata, spec: Value) -> FieldResult<Option<Failsafes>> {
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
pub(super) struct RawFailsafeProfileSpec {
    selector: String,
    inbound: Vec<RawFailsafePort>,
    outbound: Vec<RawFailsafePort>,
}

pub(super) fn failsafe_profile(
    meta: &Metadata,
    spec: Value,
    origin: Origin,
) -> FieldResult<FailsafeProfile> {
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
