//! `moat trace`: a packet run through the kernel program itself
//! (`BPF_PROG_TEST_RUN` on the eBPF object loaded with the policy compiled
//! from the directory), beside the reference semantics' answer; loud when
//! they differ.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use moat_common::{direction, verdict};
use serde::Serialize;

use crate::{
    check::{self, Answer},
    compile::compile,
    dataplane::Dataplane,
    event,
    frame::{Packet, Transport},
    packet_spec,
    policy::PolicySet,
    reference::{Fields, Query, Verdict},
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
}

/// Both answers, and whether they agree (the JSON form, `-o json`).
#[derive(Debug, Serialize)]
pub struct Trace {
    pub kernel: KernelAnswer,
    pub reference: Answer,
    pub agree: bool,
}

fn frame(f: &Fields) -> Vec<u8> {
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
            rest: [0, 1, 0, 1],
        },
        p => Transport::Other {
            protocol: p,
            len: 8,
        },
    };
    Packet::new(f.src, f.dst, transport).frame()
}

/// Runs `packet` through the kernel program and the reference.
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
    let name = |id: u32| {
        compiled
            .policy_name(id)
            .and_then(|n| set.policies.iter().find(|p| p.name == n))
            .map(|p| p.resource())
    };
    let deny = events.iter().find(|e| e.verdict == verdict::DENY);
    let kernel = KernelAnswer {
        verdict: if passed {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        policy: deny.and_then(|e| name(e.policy_id)),
        rule: deny
            .filter(|e| name(e.policy_id).is_some())
            .map(|e| e.rule_index),
        reason: deny.map(|e| event::reason_name(e.reason)),
        logged: events
            .iter()
            .filter(|e| e.verdict == verdict::LOG)
            .map(|e| {
                (
                    compiled.policy_name(e.policy_id).unwrap_or("?").to_string(),
                    e.rule_index,
                )
            })
            .collect(),
    };
    let logged_ref: Vec<(String, u32)> = reference
        .logged
        .iter()
        .map(|l| (l.policy.clone(), l.rule as u32))
        .collect();
    let agree = kernel.verdict == reference.verdict
        && kernel.logged == logged_ref
        && (passed
            || (kernel.policy == reference.policy
                && kernel.rule == reference.rule.map(|r| r as u32)));
    Ok(Trace {
        kernel,
        reference,
        agree,
    })
}

impl Trace {
    pub fn text(&self) -> String {
        let k = &self.kernel;
        let mut s = format!(
            "kernel:    {}{}{}\n",
            match k.verdict {
                Verdict::Allow => "ALLOW",
                Verdict::Deny => "DENY",
            },
            k.reason.map(|r| format!(" ({r})")).unwrap_or_default(),
            match (&k.policy, k.rule) {
                (Some(p), Some(r)) => format!(" by rule {r} of {p}"),
                _ => String::new(),
            }
        );
        for (p, r) in &k.logged {
            s.push_str(&format!("           logged by {p} rule {r}\n"));
        }
        s.push_str("reference:\n");
        for line in self.reference.text().lines() {
            s.push_str(&format!("  {line}\n"));
        }
        if self.agree {
            s.push_str("the kernel and the reference agree\n");
        } else {
            s.push_str("!!! THE KERNEL AND THE REFERENCE DISAGREE: please report this with the policy directory and the packet\n");
        }
        s
    }
}
