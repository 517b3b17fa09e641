//! `moat check` with a packet: what would happen to it, and why, answered
//! offline from the policy files by the reference semantics.

use serde::Serialize;

use crate::{
    compile::endpoint_for,
    policy::{
        packet_spec,
        reference::{evaluate, DecidedBy, Query, Stage, Step, Verdict},
        PolicySet,
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
        _ => (None, None),
    };
    let decided_by = match &j.by {
        DecidedBy::Rule { rule, action, .. } => format!(
            "rule {rule} ({action:?}) of {}",
            policy.as_deref().unwrap_or("?")
        ),
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
