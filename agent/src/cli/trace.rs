//! `moat trace`: a packet run through the kernel program itself
//! (`BPF_PROG_TEST_RUN`) beside the reference semantics' answer; loud when
//! they differ.
//!
//! Two modes. Live (`trace_live`, the default of the command): the node's
//! own policy, read from the running agent's pinned maps, judged by a trace
//! copy of the program that writes only private maps. Offline (`trace`,
//! `--offline`): the eBPF object loaded with its own maps and the policy
//! compiled from a directory.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use moat_common::{counter, direction, verdict, DenyEvent};
use serde::Serialize;

pub use crate::cli::trace_live::{trace_live, LiveTrace, Program};
use crate::{
    cli::check::{self, Answer},
    compile::compile,
    dataplane::{
        frame::{Packet, Transport},
        Dataplane,
    },
    events::event,
    policy::{
        packet_spec,
        reference::{Fields, Query, Verdict},
        PolicySet,
    },
};

/// What the kernel decided.
#[derive(Debug, Serialize)]
pub struct KernelAnswer {
    pub verdict: Verdict,
    /// `Kind/name` of the deciding policy, if a rule decided.
    pub policy: Option<String>,
    pub rule: Option<u32>,
    /// The deny reason (as in events), if denied.
    pub reason: Option<&'static str>,
    /// Log rules hit, as (policy, rule).
    pub logged: Vec<(String, u32)>,
    /// The interface is in audit mode: a denied packet passes (and is
    /// reported); `verdict` is the verdict computed.
    pub audit: bool,
}

/// Both answers, and whether they agree (the JSON form, `-o json`).
#[derive(Debug, Serialize)]
pub struct Trace {
    /// `live`: the node's policy, from the running agent's pinned maps;
    /// `offline`: the policy compiled from `--policies DIR`.
    pub mode: &'static str,
    pub kernel: KernelAnswer,
    /// The decision path: the name of the program's counter that counted
    /// the packet's verdict (`conntrack_allowed`, `policy_allowed`,
    /// `rule_denied`, ...).
    pub path: String,
    /// Every counter the packet moved.
    pub counters: Vec<&'static str>,
    /// `None`: no reference (live mode without `--policies`).
    pub reference: Option<Answer>,
    /// `None` without a reference.
    pub agree: Option<bool>,
    /// Live mode: the program attached on the node and the one traced.
    pub program: Option<Program>,
    /// Live mode: the policy generation in force on the interface.
    pub generation: Option<u32>,
    /// What the answer does not say by itself.
    pub notes: Vec<String>,
}

impl Trace {
    /// Whether the command should exit 3: the kernel and the reference
    /// disagree, or the node runs another build of the program.
    pub fn alarming(&self) -> bool {
        self.agree == Some(false) || self.program.as_ref().is_some_and(|p| !p.same)
    }
}

/// The frame of a packet spec, as `moat trace` runs it (ICMP queries get
/// identifier and sequence 1).
pub fn frame(f: &Fields) -> Vec<u8> {
    let transport = match f.protocol {
        6 => Transport::Tcp {
            sport: f.sport,
            dport: f.dport,
            flags: f.tcp_flags,
        },
        17 => Transport::Udp {
            sport: f.sport,
            dport: f.dport,
        },
        132 => Transport::Sctp {
            sport: f.sport,
            dport: f.dport,
        },
        1 | 58 => Transport::Icmp {
            icmp_type: f.icmp_type,
            code: f.icmp_code,
            rest: ICMP_REST,
        },
        p => Transport::Other {
            protocol: p,
            len: 8,
        },
    };
    Packet::new(f.src, f.dst, transport).frame()
}

/// Bytes 4..8 of a traced ICMP message: identifier 1, sequence 1.
pub(crate) const ICMP_REST: [u8; 4] = [0, 1, 0, 1];

/// Counters that say how a packet was decided, most specific first (the
/// others count events and Log hits beside a decision).
const DECISIONS: [u32; 17] = [
    counter::AUDIT_PASSED,
    counter::NON_IP_PASSED,
    counter::UNENFORCED_PASSED,
    counter::FAILSAFE_ALLOWED,
    counter::CONNTRACK_ALLOWED,
    counter::RELATED_ALLOWED,
    counter::UNTRACKED_ALLOWED,
    counter::PRE_DNAT_ALLOWED,
    counter::FORWARDED_ALLOWED,
    counter::POLICY_ALLOWED,
    counter::PROFILE_ALLOWED,
    counter::RULE_DENIED,
    counter::END_OF_POLICIES_DENIED,
    counter::NO_PROFILE_DENIED,
    counter::UNPARSABLE_DENIED,
    counter::CONNTRACK_INVALID_DENIED,
    counter::FRAGMENT_DENIED,
];

/// `(path, every counter moved)` from the counters of one direction after
/// one packet, starting from zero. In audit mode the path is the deny
/// counter (`audit_passed` moves beside it).
pub(crate) fn decision_path(moved: &[u64]) -> (String, Vec<&'static str>) {
    let names: Vec<&'static str> = (0..moved.len())
        .filter(|&c| moved[c] != 0)
        .map(|c| counter::NAMES[c])
        .collect();
    let path = DECISIONS
        .iter()
        .filter(|&&c| c != counter::AUDIT_PASSED)
        .find(|&&c| moved.get(c as usize).is_some_and(|&v| v != 0))
        .map(|&c| counter::NAMES[c as usize].to_string())
        .unwrap_or_else(|| "none (no decision counter moved)".into());
    (path, names)
}

/// The kernel's answer from whether the packet passed and the events it
/// caused; `name` turns a policy id into the policy's name when it can,
/// `resource` a name into `Kind/name`.
pub(crate) fn kernel_answer(
    passed: bool,
    events: &[DenyEvent],
    name: impl Fn(u32) -> Option<String>,
    resource: impl Fn(&str) -> String,
) -> KernelAnswer {
    let deny = events
        .iter()
        .find(|e| e.verdict == verdict::DENY || e.verdict == verdict::AUDIT);
    // Audit mode: the packet passed, its event says it would be denied.
    let denied = !passed || deny.is_some_and(|e| e.verdict == verdict::AUDIT);
    let deciding = deny.and_then(|e| Some((name(e.policy_id)?, e.rule_index)));
    KernelAnswer {
        verdict: if denied {
            Verdict::Deny
        } else {
            Verdict::Allow
        },
        policy: deciding.as_ref().map(|(n, _)| resource(n)),
        rule: deciding.map(|(_, r)| r),
        reason: deny.map(|e| event::reason_name(e.reason)),
        // Named as the reference names them: bare policy names.
        logged: events
            .iter()
            .filter(|e| e.verdict == verdict::LOG)
            .map(|e| {
                (
                    name(e.policy_id).unwrap_or_else(|| "?".into()),
                    e.rule_index,
                )
            })
            .collect(),
        audit: denied && passed,
    }
}

/// Whether `kernel` and `reference` say the same (verdict, deciding rule
/// of a deny, Log hits); `compare_policy` false leaves the policy names
/// out (they are unknown).
pub(crate) fn agrees(kernel: &KernelAnswer, reference: &Answer, compare_policy: bool) -> bool {
    let logged_ref: Vec<(String, u32)> = reference
        .logged
        .iter()
        .map(|l| (l.policy.clone(), l.rule as u32))
        .collect();
    let same_logs = if compare_policy {
        kernel.logged == logged_ref
    } else {
        kernel
            .logged
            .iter()
            .map(|l| l.1)
            .eq(logged_ref.iter().map(|l| l.1))
    };
    kernel.verdict == reference.verdict
        && same_logs
        && (kernel.verdict == Verdict::Allow
            || ((!compare_policy || kernel.policy == reference.policy)
                && kernel.rule == reference.rule.map(|r| r as u32)))
}

/// `Kind/name` of the policy named `name` in `set`, or `name` itself.
pub(crate) fn resource(set: &PolicySet, name: &str) -> String {
    set.policies
        .iter()
        .find(|p| p.name == name)
        .map_or_else(|| name.to_string(), |p| p.resource())
}

/// Offline: runs `packet` through the kernel program loaded with its own
/// maps and the policy compiled from `set`, and through the reference.
pub fn trace(
    set: &PolicySet,
    node: &str,
    iface: &str,
    dir: u8,
    packet: &str,
    query: Query,
) -> anyhow::Result<Trace> {
    anyhow::ensure!(
        !query.established,
        "trace judges the first packet of a connection; --established is for `moat check`"
    );
    let reference = check::answer(set, node, iface, dir, packet, query)?;
    let fields = packet_spec::parse(packet)?;
    let compiled = compile(set, node, &[iface.to_string()])?;
    let mut dataplane = Dataplane::load().context("loading the eBPF programs")?;
    // Host traffic: the packet's own end is the node's address; forwarded:
    // no address is.
    let mut local = BTreeSet::new();
    if !query.forwarded {
        local.insert(if dir == direction::INGRESS {
            fields.dst
        } else {
            fields.src
        });
    }
    // The query says what is local, not this machine's routing table.
    dataplane.set_route_lookup(false);
    dataplane.set_local_addresses(&local)?;
    dataplane.set_event_rate(0, 1)?;
    let mut tables = BTreeMap::new();
    if let Some(c) = compiled.ifaces.get(iface) {
        // BPF_PROG_TEST_RUN runs as if on the loopback device, ifindex 1.
        tables.insert(1, c.clone());
    }
    dataplane.apply(&tables, 1)?;
    let frame = frame(&fields);
    let passed = if dir == direction::INGRESS {
        dataplane.test_ingress(&frame, 1)?.0 == 2 // XDP_PASS
    } else {
        dataplane.test_egress(&frame, 1)?.0 == -1 // TC_ACT_UNSPEC: on
    };
    let events = dataplane.drain_events();
    let (path, counters) = decision_path(&dataplane.counters()?[dir as usize]);
    let name = |id: u32| compiled.policy_name(id).map(str::to_string);
    let kernel = kernel_answer(passed, &events, name, |n| resource(set, n));
    let agree = agrees(&kernel, &reference, true);
    Ok(Trace {
        mode: "offline",
        kernel,
        path,
        counters,
        reference: Some(reference),
        agree: Some(agree),
        program: None,
        generation: None,
        notes: vec!["offline: the policy compiled from --policies DIR, on maps of this trace's own, not what the node enforces".into()],
    })
}

impl Trace {
    pub fn text(&self) -> String {
        let k = &self.kernel;
        let mut s = String::new();
        if let Some(p) = &self.program {
            if p.same {
                s.push_str(&format!(
                    "program:   the node's program (id {}, tag {}) = the program traced\n",
                    p.id, p.tag
                ));
            } else {
                s.push_str(&format!(
                    "!!! THE NODE RUNS ANOTHER BUILD: program id {} has tag {}, this binary's is {}; the verdict below is this binary's program on the node's maps\n",
                    p.id, p.tag, p.traced_tag
                ));
            }
        }
        s.push_str(&format!(
            "mode:      {}{}\n",
            self.mode,
            self.generation
                .map(|g| format!(" (policy generation {g} in force)"))
                .unwrap_or_default()
        ));
        s.push_str(&format!(
            "kernel:    {}{}{}{}\n",
            match k.verdict {
                Verdict::Allow => "ALLOW",
                Verdict::Deny => "DENY",
            },
            k.reason.map(|r| format!(" ({r})")).unwrap_or_default(),
            match (&k.policy, k.rule) {
                (Some(p), Some(r)) => format!(" by rule {r} of {p}"),
                _ => String::new(),
            },
            if k.audit {
                " [audit mode: the packet passes, reported]"
            } else {
                ""
            }
        ));
        for (p, r) in &k.logged {
            s.push_str(&format!("           logged by {p} rule {r}\n"));
        }
        s.push_str(&format!(
            "path:      {} (counters moved: {})\n",
            self.path,
            self.counters.join(", ")
        ));
        for n in &self.notes {
            s.push_str(&format!("note:      {n}\n"));
        }
        match &self.reference {
            Some(r) => {
                s.push_str("reference:\n");
                for line in r.text().lines() {
                    s.push_str(&format!("  {line}\n"));
                }
            }
            None => s.push_str(
                "reference: none (no --policies DIR given): the kernel's verdict is not checked\n",
            ),
        }
        match self.agree {
            Some(true) => s.push_str("the kernel and the reference agree\n"),
            Some(false) if self.mode == "live" => s.push_str("!!! THE NODE'S KERNEL AND THE REFERENCE DISAGREE: the node enforces another policy than --policies DIR (a change not applied yet, another source?), or this is a bug: if DIR is what the node enforces, please report it with DIR and the packet\n"),
            Some(false) => s.push_str("!!! THE KERNEL AND THE REFERENCE DISAGREE: please report this with the policy directory and the packet\n"),
            None => {}
        }
        s
    }
}
