//! `moat check` with a packet: what would happen to it, and why, answered
//! offline from the policy files by the reference semantics.

use serde::Serialize;

use crate::{
    compile::endpoint_for,
    policy::{
        packet_spec,
        reference::{evaluate, DecidedBy, Query, Stage, Step, Verdict},
        Loaded, PolicyError, PolicySet,
    },
};

/// The answer, also the JSON form (`-o json`); field names are stable.
#[derive(Debug, Serialize)]
pub struct Answer {
    pub packet: String,
    pub iface: String,
    pub direction: &'static str,
    pub forwarded: bool,
    pub established: bool,
    /// `allow` or `deny`.
    pub verdict: Verdict,
    /// `parse`, `untracked`, `conntrack`, `pre-dnat`, `failsafe`, `normal`,
    /// or `none` for an interface no HostEndpoint names.
    pub stage: String,
    /// The deciding policy (`Kind/name`), if a rule decided.
    pub policy: Option<String>,
    /// Index of the deciding rule in that policy's list.
    pub rule: Option<usize>,
    /// What decided, in words.
    pub decided_by: String,
    /// Log rules hit, in order.
    pub logged: Vec<Logged>,
    /// Every policy walked, in order.
    pub trace: Vec<Step>,
    /// What the answer does not say by itself (policies moat's dataplane
    /// does not enforce yet, pod policies).
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Logged {
    pub policy: String,
    pub rule: usize,
}

/// Judges `packet` (the packet grammar) on `iface` of `node`.
pub fn answer(
    set: &PolicySet,
    node: &str,
    iface: &str,
    dir: u8,
    packet: &str,
    query: Query,
) -> anyhow::Result<Answer> {
    let fields = packet_spec::parse(packet)?;
    let direction = moat_common::direction::name(dir);
    let mut notes = Vec::new();
    let pods: Vec<String> = set
        .policies
        .iter()
        .filter(|p| !p.can_select_host_endpoints())
        .map(|p| p.resource())
        .collect();
    if !pods.is_empty() {
        notes.push(format!(
            "{} policies govern pods, not host interfaces, and are not enforced by moat: {}",
            pods.len(),
            pods.join(", ")
        ));
    }
    let Some(hep) = endpoint_for(set, node, iface)? else {
        return Ok(Answer {
            packet: packet.into(),
            iface: iface.into(),
            direction,
            forwarded: query.forwarded,
            established: query.established,
            verdict: Verdict::Allow,
            stage: "none".into(),
            policy: None,
            rule: None,
            decided_by: format!(
                "no HostEndpoint of node {node} names {iface}: the interface is not enforced"
            ),
            logged: Vec::new(),
            trace: Vec::new(),
            notes,
        });
    };
    let j = evaluate(set, hep, dir, &fields, query);
    let (policy, rule) = match &j.by {
        DecidedBy::Rule { policy, rule, .. } => {
            let resource = set
                .policies
                .iter()
                .find(|p| &p.name == policy)
                .map(|p| p.resource())
                .unwrap_or_else(|| policy.clone());
            (Some(resource), Some(*rule))
        }
        DecidedBy::ProfileRule { profile, rule, .. } => {
            (Some(format!("Profile/{profile}")), Some(*rule))
        }
        _ => (None, None),
    };
    let decided_by = match &j.by {
        DecidedBy::Rule { rule, action, .. } | DecidedBy::ProfileRule { rule, action, .. } => {
            format!(
                "rule {rule} ({action:?}) of {}",
                policy.as_deref().unwrap_or("?")
            )
        }
        DecidedBy::Failsafe { index } => format!("failsafe port #{index} of {}", hep.name),
        DecidedBy::EndOfPolicies => format!(
            "default deny: policies apply to {direction} on {iface} and none allowed the packet"
        ),
        DecidedBy::Profile { allowed } => format!(
            "no policy applies to {direction} on {iface}; the profiles {}",
            if *allowed {
                "allow (projectcalico-default-allow)"
            } else {
                "deny (none allows)"
            }
        ),
        DecidedBy::Conntrack => "part of a connection already allowed (ESTABLISHED)".into(),
        DecidedBy::ForwardedWithoutPolicy => format!(
            "forwarded traffic and no applyOnForward policy applies to {direction} on {iface}"
        ),
        DecidedBy::ConntrackInvalid { why } => format!("connection tracking: INVALID ({why})"),
        DecidedBy::UnknownFragment => "a later fragment whose first was not seen".into(),
        DecidedBy::VlanDepth => format!(
            "more than {} stacked VLAN tags: denied without looking inside",
            moat_common::MAX_VLAN_TAGS
        ),
        DecidedBy::Misconfigured { why } => {
            format!("denied: the configuration cannot be enforced as written: {why}")
        }
        other => format!("{other:?}"),
    };
    Ok(Answer::new(
        packet,
        iface.into(),
        direction,
        query,
        j,
        policy,
        rule,
        decided_by,
        notes,
    ))
}

/// Judges `packet` to or from the pod `namespace/name` (found among the
/// set's Pod objects): Calico's answer on the pod's interface, which moat
/// does not enforce.
pub fn answer_pod(
    set: &PolicySet,
    namespace: &str,
    name: &str,
    dir: u8,
    packet: &str,
    query: Query,
) -> anyhow::Result<Answer> {
    let fields = packet_spec::parse(packet)?;
    let pod = crate::policy::reference::Workload::find(set, namespace, name).ok_or_else(|| {
        anyhow::anyhow!("no Pod {namespace}/{name} among the objects read (add its `kubectl get pod -o yaml` to the directory)")
    })?;
    let direction = moat_common::direction::name(dir);
    let j = crate::policy::reference::evaluate_workload(set, &pod, dir, &fields, query);
    let (policy, rule) = match &j.by {
        DecidedBy::Rule { policy, rule, .. } => (
            set.policies
                .iter()
                .find(|p| &p.name == policy)
                .map(|p| p.resource()),
            Some(*rule),
        ),
        _ => (None, None),
    };
    let decided_by = match &j.by {
        DecidedBy::Rule { rule, action, .. } => format!("rule {rule} ({action:?}) of {}", policy.as_deref().unwrap_or("?")),
        DecidedBy::EndOfPolicies => format!("default deny: policies select pod {namespace}/{name} for {direction} and none allowed the packet"),
        DecidedBy::Profile { .. } => format!("no policy selects pod {namespace}/{name} for {direction}: allowed (Kubernetes' default)"),
        DecidedBy::Conntrack => "part of a connection already allowed (ESTABLISHED)".into(),
        DecidedBy::ConntrackInvalid { why } => format!("connection tracking: INVALID ({why})"),
        DecidedBy::OwnAddress => format!("traffic between pod {namespace}/{name} and its own address never leaves the pod: no policy applies"),
        other => format!("{other:?}"),
    };
    let notes = vec![
        "this is Calico's verdict on the pod's interface; moat enforces host interfaces only and does not enforce pod policies".into(),
    ];
    Ok(Answer::new(
        packet,
        format!("pod {namespace}/{name}"),
        direction,
        query,
        j,
        policy,
        rule,
        decided_by,
        notes,
    ))
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Parse => "parse",
        Stage::Untracked => "untracked",
        Stage::Conntrack => "conntrack",
        Stage::PreDnat => "pre-dnat",
        Stage::Failsafe => "failsafe",
        Stage::Normal => "normal",
    }
}

impl Answer {
    #[expect(clippy::too_many_arguments, reason = "each is one field of the answer")]
    fn new(
        packet: &str,
        iface: String,
        direction: &'static str,
        query: Query,
        j: crate::policy::reference::Judgement,
        policy: Option<String>,
        rule: Option<usize>,
        decided_by: String,
        notes: Vec<String>,
    ) -> Self {
        Answer {
            packet: packet.into(),
            iface,
            direction,
            forwarded: query.forwarded,
            established: query.established,
            verdict: j.verdict,
            stage: stage_name(j.stage).into(),
            policy,
            rule,
            decided_by,
            logged: j
                .logged
                .into_iter()
                .map(|(policy, rule)| Logged { policy, rule })
                .collect(),
            trace: j.trace,
            notes,
        }
    }

    /// The text form: verdict first, then the path.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{} {} {}{}{}\nverdict: {}\nstage:   {}\nreason:  {}\n",
            self.iface,
            self.direction,
            self.packet,
            if self.forwarded { " (forwarded)" } else { "" },
            if self.established {
                " (established)"
            } else {
                ""
            },
            match self.verdict {
                Verdict::Allow => "ALLOW",
                Verdict::Deny => "DENY",
            },
            self.stage,
            self.decided_by
        );
        if !self.trace.is_empty() {
            s.push_str("path:\n");
            for t in &self.trace {
                let stage = serde_json::to_value(t.stage)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                s.push_str(&format!("  {stage:<10} {:<50} {}\n", t.policy, t.outcome));
            }
        }
        for l in &self.logged {
            s.push_str(&format!("logged:  {} rule {}\n", l.policy, l.rule));
        }
        for n in &self.notes {
            s.push_str(&format!("note:    {n}\n"));
        }
        s
    }
}

/// One validation error as `moat check -o json` prints it; the field
/// names are stable.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ErrorReport {
    pub file: String,
    /// 1-based document (or `List` item) in the file, as the text says.
    pub document: Option<usize>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Field path such as `spec.ingress[0].protocol`.
    pub field: Option<String>,
    pub message: String,
    /// What the user probably meant, when the error has a guess.
    pub suggestion: Option<String>,
}

/// The guess in a message ("did you mean `labels`?", "did you mean Allow?").
fn suggestion(message: &str) -> Option<String> {
    let (_, rest) = message.rsplit_once("did you mean ")?;
    let guess = rest.trim_end_matches('?');
    let guess = guess
        .strip_prefix('`')
        .and_then(|g| g.split_once('`'))
        .map(|(g, _)| g)
        .unwrap_or(guess);
    (!guess.is_empty()).then(|| guess.to_string())
}

/// `error` split into its parts.
pub fn error_report(error: &PolicyError) -> ErrorReport {
    let mut parts = error.resource.splitn(3, '/');
    let (kind, second, third) = (parts.next(), parts.next(), parts.next());
    let (namespace, name) = match (second, third) {
        (Some(ns), Some(name)) => (Some(ns.to_string()), Some(name.to_string())),
        (Some(name), None) => (None, Some(name.to_string())),
        _ => (None, None),
    };
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    ErrorReport {
        file: error.file.display().to_string(),
        document: error.document.map(|d| d + 1),
        kind: kind.and_then(some),
        namespace,
        name: name.filter(|n| !n.is_empty()),
        field: some(&error.field),
        message: error.message.clone(),
        suggestion: suggestion(&error.message),
    }
}

/// What was read, by kind, for `moat check`'s summary.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub files: usize,
    /// Valid objects of each kind read from the policy source (bundled
    /// profile policies not included).
    pub valid: std::collections::BTreeMap<String, usize>,
    /// The bundled profile in use (the source holds no policy of its
    /// own), and how many policies it adds.
    pub bundled_profile: Option<BundledProfile>,
    pub errors: usize,
    /// Objects (or files) with at least one error.
    pub invalid_objects: usize,
}

#[derive(Debug, Serialize)]
pub struct BundledProfile {
    pub name: String,
    /// Its policies.
    pub policies: usize,
    /// All its objects (policies, network sets, failsafe profiles).
    pub objects: usize,
}

/// The bundled profile an object comes from, if it does.
fn bundled(origin: &crate::policy::Origin) -> Option<String> {
    let file = origin.file.to_str()?;
    file.strip_prefix("<bundled profile ")?
        .strip_suffix('>')
        .map(str::to_string)
}

/// The summary of `loaded`: objects of the bundled profile are counted
/// as the profile's, never as the source's.
pub fn summary(loaded: &Loaded) -> Summary {
    use crate::policy::kubernetes::Object;
    let mut valid = std::collections::BTreeMap::new();
    let mut profile: Option<BundledProfile> = None;
    let mut count =
        |kind: &str, origin: Option<&crate::policy::Origin>| match origin.and_then(bundled) {
            Some(name) => {
                let p = profile.get_or_insert(BundledProfile {
                    name,
                    policies: 0,
                    objects: 0,
                });
                p.objects += 1;
                if kind.ends_with("Policy") {
                    p.policies += 1;
                }
            }
            None => *valid.entry(kind.to_string()).or_insert(0) += 1,
        };
    let set = &loaded.set;
    for p in &set.policies {
        count(p.kind.as_str(), Some(&p.origin));
    }
    for h in &set.host_endpoints {
        count("HostEndpoint", Some(&h.origin));
    }
    for n in &set.network_sets {
        let kind = if n.namespace.is_some() {
            "NetworkSet"
        } else {
            "GlobalNetworkSet"
        };
        count(kind, Some(&n.origin));
    }
    for f in &set.failsafe_profiles {
        count("FailsafeProfile", Some(&f.origin));
    }
    if set.failsafes.is_some() {
        count("FelixConfiguration", None);
    }
    for t in &set.tiers {
        count("Tier", t.origin.as_ref());
    }
    for p in &set.profiles {
        count("Profile", Some(&p.origin));
    }
    for o in &set.objects {
        let kind = match o {
            Object::Namespace { .. } => "Namespace",
            Object::Pod { .. } => "Pod",
            Object::Node { .. } => "Node",
            Object::Service { .. } => "Service",
            Object::ServiceAccount { .. } => "ServiceAccount",
        };
        count(kind, None);
    }
    Summary {
        files: loaded.files,
        valid,
        bundled_profile: profile,
        errors: loaded.errors.len(),
        invalid_objects: loaded.invalid_objects(),
    }
}

impl Summary {
    /// One line: `3 file(s): valid GlobalNetworkPolicy 2, HostEndpoint 1;
    /// bundled profile iks-2019 in use (12 policies); 0 error(s)`.
    pub fn text(&self, extra_errors: usize) -> String {
        let valid: Vec<String> = self.valid.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let mut s = format!(
            "{} file(s): valid {}",
            self.files,
            if valid.is_empty() {
                "nothing".to_string()
            } else {
                valid.join(", ")
            }
        );
        if let Some(p) = &self.bundled_profile {
            s.push_str(&format!(
                "; the source holds no policy of its own: bundled profile {} in use ({} policies, {} objects in all)",
                p.name, p.policies, p.objects
            ));
        }
        s.push_str(&format!("; {} error(s)", self.errors + extra_errors));
        if self.invalid_objects > 0 {
            s.push_str(&format!(" in {} invalid object(s)", self.invalid_objects));
        }
        s
    }
}

/// Why `moat check` cannot answer for `node` (and `iface`): no HostEndpoint
/// names them. The message lists the nodes and interfaces the policy
/// describes, with "did you mean" for a near name.
pub fn unknown_target(set: &PolicySet, node: &str, iface: Option<&str>) -> Option<String> {
    let mut described: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for h in &set.host_endpoints {
        described
            .entry(h.node.as_str())
            .or_default()
            .push(&h.interface_name);
    }
    let listing = || {
        if described.is_empty() {
            "the policy describes no HostEndpoint at all".to_string()
        } else {
            let nodes: Vec<String> = described
                .iter()
                .map(|(n, i)| format!("{n} ({})", i.join(", ")))
                .collect();
            format!(
                "the policy describes these nodes (interfaces): {}",
                nodes.join("; ")
            )
        }
    };
    let guess = |word: &str, known: &[&str]| {
        crate::policy::did_you_mean(word, known)
            .map(|g| format!(", did you mean {g}?"))
            .unwrap_or_default()
    };
    let Some(ifaces) = described.get(node) else {
        let nodes: Vec<&str> = described.keys().copied().collect();
        return Some(format!(
            "no HostEndpoint names node {node}{}; {}",
            guess(node, &nodes),
            listing()
        ));
    };
    let iface = iface?;
    if ifaces.contains(&iface) {
        return None;
    }
    Some(format!(
        "no HostEndpoint of node {node} names interface {iface}{}; {}",
        guess(iface, ifaces),
        listing()
    ))
}

/// What one policy generation needs of each map whose capacity is a
/// deployment choice (`moat check`, `-o json` field `needs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Needs {
    pub source_prefixes: usize,
    pub destination_prefixes: usize,
    pub source_port_prefixes: usize,
    pub destination_port_prefixes: usize,
    pub protocol_entries: usize,
    pub rule_slots: usize,
    pub class_words: usize,
}

/// What `compiled` needs of the maps, and the error the agent would
/// refuse it with in maps of capacities `caps` (`None`: it fits).
pub fn fit(
    compiled: &crate::compile::Compiled,
    caps: &crate::dataplane::Capacities,
) -> (Option<Needs>, Option<String>) {
    let by_index = compiled
        .ifaces
        .values()
        .enumerate()
        .map(|(i, c)| (i as u32 + 1, c.clone()))
        .collect();
    match crate::dataplane::plan_offline(&by_index) {
        Ok(content) => {
            let needs = Needs {
                source_prefixes: content.src.len(),
                destination_prefixes: content.dst.len(),
                source_port_prefixes: content.sport.len(),
                destination_port_prefixes: content.dport.len(),
                protocol_entries: content.proto.len(),
                rule_slots: content.rules.len(),
                class_words: content.words.len(),
            };
            let error = caps.check(&content, None).err().map(|e| e.to_string());
            (Some(needs), error)
        }
        Err(e) => (None, Some(e.to_string())),
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn errors_split_into_their_parts() {
        let e = PolicyError {
            file: "p.yaml".into(),
            resource: "NetworkPolicy/prod/web".into(),
            field: "metadata.lables".into(),
            message: "unknown field `lables`, did you mean `labels`?".into(),
            document: Some(1),
        };
        let r = error_report(&e);
        assert_eq!(
            r,
            ErrorReport {
                file: "p.yaml".into(),
                document: Some(2),
                kind: Some("NetworkPolicy".into()),
                namespace: Some("prod".into()),
                name: Some("web".into()),
                field: Some("metadata.lables".into()),
                message: e.message.clone(),
                suggestion: Some("labels".into()),
            }
        );
        assert_eq!(
            suggestion("unknown action \"allow\" (Allow, Deny, Log or Pass), did you mean Allow?"),
            Some("Allow".into())
        );
        let file_level = PolicyError {
            file: "p.yaml".into(),
            resource: String::new(),
            field: String::new(),
            message: "not valid YAML".into(),
            document: None,
        };
        let r = error_report(&file_level);
        assert_eq!(
            (r.kind, r.name, r.field, r.suggestion),
            (None, None, None, None)
        );
    }
}
