//! The reference semantics in plain Rust: how moat judges a frame, written
//! from SEMANTICS.md directly against the policy model (not the compiled
//! tables), kept simple rather than fast. The kernel programs are tested
//! against it; `moat check` answers with it.
//!
//! This version models a node whose connection tracking holds no flow yet
//! (every packet is the first of its connection), host traffic only (the
//! normal stage), and leaves out the policies the dataplane does not
//! enforce yet (pre-DNAT, untracked, applyOnForward, negated or
//! selector-based rule matches), exactly as the agent does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_common::{direction, has_ports, reason};
use serde::Serialize;

use crate::policy::{
    resolve, selector::Selector, Action, EntityMatch, FailsafePort, HostEndpoint, Policy,
    PolicySet, Rule,
};

/// What the parser makes of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not IP: passes.
    NotIp,
    /// IP but too short or malformed: denied. Holds what was read.
    Unparsable(Fields),
    /// More stacked VLAN tags than `moat_common::MAX_VLAN_TAGS`: denied
    /// without looking inside.
    TooManyVlanTags,
    Ip(Fields),
}

/// Where a packet stands in IP fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Fragment {
    None,
    First,
    Later,
}

/// Header fields of an IP packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fields {
    pub ip_version: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
    pub fragment: Fragment,
}

impl Fields {
    fn new(ip_version: u8) -> Self {
        let zero = if ip_version == 6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        Fields {
            ip_version,
            src: zero,
            dst: zero,
            protocol: 0,
            sport: 0,
            dport: 0,
            icmp_type: 0,
            icmp_code: 0,
            tcp_flags: 0,
            fragment: Fragment::None,
        }
    }

    fn is_icmp(&self) -> bool {
        (self.protocol == 1 && self.ip_version == 4)
            || (self.protocol == 58 && self.ip_version == 6)
    }
}

/// Headers beyond this offset are not read (the kernel's bound too).
const MAX_L4_OFFSET: usize = 512;
const MAX_EXT_HEADERS: usize = moat_common::MAX_IPV6_EXT_HEADERS as usize;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses an Ethernet frame.
pub fn parse(frame: &[u8]) -> Frame {
    let Some(mut ethertype) = be16(frame, 12) else {
        return Frame::NotIp;
    };
    let mut l3 = 14;
    let vlan = |t: u16| moat_common::VLAN_TPIDS.contains(&t);
    for _ in 0..moat_common::MAX_VLAN_TAGS {
        if !vlan(ethertype) {
            break;
        }
        let Some(inner) = be16(frame, l3 + 2) else {
            return Frame::NotIp;
        };
        ethertype = inner;
        l3 += 4;
    }
    if vlan(ethertype) {
        return Frame::TooManyVlanTags;
    }
    match ethertype {
        0x0800 => ipv4(frame, l3),
        0x86dd => ipv6(frame, l3),
        _ => Frame::NotIp,
    }
}

fn ipv4(frame: &[u8], l3: usize) -> Frame {
    let mut f = Fields::new(4);
    let Some(h) = frame.get(l3..l3 + 20) else {
        return Frame::Unparsable(f);
    };
    f.src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
    f.dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
    f.protocol = h[9];
    let ihl = (h[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl || l3 + total > frame.len() {
        return Frame::Unparsable(f);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    if frag & 0x1fff != 0 {
        f.fragment = Fragment::Later;
        return Frame::Ip(f);
    }
    if frag & 0x2000 != 0 {
        f.fragment = Fragment::First;
    }
    l4(frame, l3 + ihl, l3 + total, f)
}

fn ipv6(frame: &[u8], l3: usize) -> Frame {
    let mut f = Fields::new(6);
    let Some(h) = frame.get(l3..l3 + 40) else {
        return Frame::Unparsable(f);
    };
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&h[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    f.src = addr(8);
    f.dst = addr(24);
    f.protocol = h[6];
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    if h[0] >> 4 != 6 || (payload == 0 && f.protocol != 59) {
        return Frame::Unparsable(f);
    }
    let end = l3 + 40 + payload;
    if end > frame.len() {
        return Frame::Unparsable(f);
    }
    let mut next = f.protocol;
    let mut off = l3 + 40;
    // Up to MAX_EXT_HEADERS extension headers, then the L4 header.
    for walked in 0..=MAX_EXT_HEADERS {
        if !matches!(next, 0 | 43 | 44 | 51 | 60) {
            f.protocol = next;
            return l4(frame, off, end, f);
        }
        if walked == MAX_EXT_HEADERS {
            break;
        }
        if next == 44 {
            let Some(ext) = frame.get(off..off + 8) else {
                return Frame::Unparsable(f);
            };
            next = ext[0];
            off += 8;
            let frag = u16::from_be_bytes([ext[2], ext[3]]);
            if frag & 0xfff8 != 0 {
                f.protocol = next;
                f.fragment = Fragment::Later;
                return Frame::Ip(f);
            }
            if frag & 1 != 0 {
                f.fragment = Fragment::First;
            }
        } else {
            let (Some(&nh), Some(&len)) = (frame.get(off), frame.get(off + 1)) else {
                return Frame::Unparsable(f);
            };
            off += if next == 51 {
                (len as usize + 2) * 4
            } else {
                (len as usize + 1) * 8
            };
            next = nh;
        }
        if off > MAX_L4_OFFSET {
            return Frame::Unparsable(f);
        }
    }
    Frame::Unparsable(f)
}

fn l4(frame: &[u8], off: usize, l3_end: usize, mut f: Fields) -> Frame {
    if off > MAX_L4_OFFSET {
        return Frame::Unparsable(f);
    }
    // A header must lie inside both the frame and the IP datagram.
    let end = l3_end.min(frame.len());
    let header = |len: usize| frame.get(off..off + len).filter(|_| off + len <= end);
    if f.protocol == 6 {
        let Some(t) = header(20) else {
            return Frame::Unparsable(f);
        };
        if t[12] >> 4 < 5 {
            return Frame::Unparsable(f);
        }
        f.sport = u16::from_be_bytes([t[0], t[1]]);
        f.dport = u16::from_be_bytes([t[2], t[3]]);
        f.tcp_flags = t[13];
    } else if has_ports(f.protocol) {
        let Some(u) = header(if f.protocol == 132 { 12 } else { 8 }) else {
            return Frame::Unparsable(f);
        };
        f.sport = u16::from_be_bytes([u[0], u[1]]);
        f.dport = u16::from_be_bytes([u[2], u[3]]);
    } else if f.is_icmp() {
        let Some(i) = header(8) else {
            return Frame::Unparsable(f);
        };
        f.icmp_type = i[0];
        f.icmp_code = i[1];
        if matches!(
            icmp_class(f.ip_version, i[0]),
            IcmpClass::Query | IcmpClass::Reply
        ) {
            f.sport = u16::from_be_bytes([i[4], i[5]]);
        }
    }
    Frame::Ip(f)
}

/// How Linux connection tracking sees an ICMP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpClass {
    Query,
    Reply,
    Error,
    Untracked,
    Invalid,
}

/// Linux nf_conntrack's view of ICMP type `t` (ICMPv6 when `ip_version` is 6).
pub fn icmp_class(ip_version: u8, t: u8) -> IcmpClass {
    match (ip_version, t) {
        (4, 8 | 13 | 15 | 17) | (6, 128 | 139) => IcmpClass::Query,
        (4, 0 | 14 | 16 | 18) | (6, 129 | 140) => IcmpClass::Reply,
        (4, 3 | 4 | 5 | 11 | 12) | (6, 1..=4) => IcmpClass::Error,
        (6, 130..=137 | 143) => IcmpClass::Untracked,
        _ => IcmpClass::Invalid,
    }
}

/// TCP flag combinations Linux conntrack accepts (PSH, ECE, CWR ignored).
pub fn tcp_flags_valid(flags: u8) -> bool {
    const FIN: u8 = 1;
    const SYN: u8 = 2;
    const RST: u8 = 4;
    const ACK: u8 = 16;
    const URG: u8 = 32;
    let f = flags & !(8 | 0xc0);
    [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ]
    .contains(&f)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// What decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum DecidedBy {
    NonIp,
    Unenforced,
    Unparsable,
    /// More stacked VLAN tags than the parser looks through.
    VlanDepth,
    UnknownFragment,
    ConntrackInvalid {
        why: &'static str,
    },
    Failsafe {
        index: usize,
    },
    Rule {
        policy: String,
        rule: usize,
        action: Action,
    },
    /// Policies applied in this direction and none decided.
    EndOfPolicies,
    /// No policy applied (or one said Pass) and the profiles decided.
    Profile {
        allowed: bool,
    },
    /// Part of a connection already allowed (ESTABLISHED).
    Conntrack,
    /// The configuration cannot be enforced as written (the agent refuses
    /// to compile it); judged closed.
    Misconfigured {
        why: String,
    },
    /// Forwarded traffic with no applyOnForward policy for this endpoint
    /// and direction: allowed.
    ForwardedWithoutPolicy,
    /// A pod's packet to (or from) its own address: it never leaves the
    /// pod, so no policy sees it.
    OwnAddress,
    /// A rule of one of the endpoint's `Profile`s, after the last tier.
    ProfileRule {
        profile: String,
        rule: usize,
        action: Action,
    },
}

/// A verdict and how it came about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub by: DecidedBy,
    /// The stage that decided.
    pub stage: Stage,
    /// Log rules hit on the way, as (policy, rule index).
    pub logged: Vec<(String, usize)>,
    /// Every policy walked, in order.
    pub trace: Vec<Step>,
}

impl Judgement {
    fn new(verdict: Verdict, by: DecidedBy) -> Self {
        Judgement {
            verdict,
            by,
            stage: Stage::Parse,
            logged: Vec::new(),
            trace: Vec::new(),
        }
    }

    /// A judgement decided in `stage`, after walking `trace`.
    fn at(
        verdict: Verdict,
        by: DecidedBy,
        stage: Stage,
        trace: Vec<Step>,
        logged: Vec<(String, usize)>,
    ) -> Self {
        Judgement {
            verdict,
            by,
            stage,
            logged,
            trace,
        }
    }

    /// The kernel's `reason` code for a deny, 0 for an allow.
    pub fn reason(&self) -> u8 {
        match (&self.verdict, &self.by) {
            (Verdict::Allow, _) => 0,
            (_, DecidedBy::Unparsable) => reason::UNPARSABLE,
            (_, DecidedBy::VlanDepth) => reason::VLAN_DEPTH,
            (_, DecidedBy::UnknownFragment) => reason::FRAGMENT_UNKNOWN,
            (_, DecidedBy::ConntrackInvalid { why }) if *why == TCP_FLAGS => {
                reason::TCP_FLAGS_INVALID
            }
            (_, DecidedBy::ConntrackInvalid { .. }) => reason::CONNTRACK_INVALID,
            (
                _,
                DecidedBy::Rule {
                    action: Action::Pass,
                    ..
                },
            ) => reason::NO_PROFILE,
            (
                _,
                DecidedBy::ProfileRule {
                    action: Action::Pass,
                    ..
                },
            ) => reason::NO_PROFILE,
            (_, DecidedBy::Rule { .. } | DecidedBy::ProfileRule { .. }) => reason::RULE,
            (_, DecidedBy::EndOfPolicies) => reason::END_OF_POLICIES,
            _ => reason::NO_PROFILE,
        }
    }
}

const TCP_FLAGS: &str = "TCP flag combination no stack sends";

/// Judges `frame` seen on host endpoint `hep` (None: not enforced) in
/// direction `dir`, with empty connection tracking, as host traffic.
pub fn judge(set: &PolicySet, hep: Option<&HostEndpoint>, dir: u8, frame: &[u8]) -> Judgement {
    judge_with(set, hep, dir, frame, Query::default())
}

/// `judge`, with what is known besides the frame.
pub fn judge_with(
    set: &PolicySet,
    hep: Option<&HostEndpoint>,
    dir: u8,
    frame: &[u8],
    q: Query,
) -> Judgement {
    match parse(frame) {
        Frame::NotIp => Judgement::new(Verdict::Allow, DecidedBy::NonIp),
        _ if hep.is_none() => Judgement::new(Verdict::Allow, DecidedBy::Unenforced),
        Frame::Unparsable(_) => Judgement::new(Verdict::Deny, DecidedBy::Unparsable),
        Frame::TooManyVlanTags => Judgement::new(Verdict::Deny, DecidedBy::VlanDepth),
        Frame::Ip(f) => evaluate(set, hep.expect("checked above"), dir, &f, q),
    }
}

/// Judges parsed header fields on `hep`, with empty connection tracking.
pub fn judge_fields(set: &PolicySet, hep: &HostEndpoint, dir: u8, f: &Fields) -> Judgement {
    evaluate(set, hep, dir, f, Query::default())
}

/// What is known about a packet besides its headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// Forwarded through the node (to or from a pod, or between
    /// interfaces) rather than to or from the host itself.
    pub forwarded: bool,
    /// Part of a connection connection tracking already allowed.
    pub established: bool,
}

/// The stage that decided (SEMANTICS.md, "How a packet is judged").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Parse,
    Untracked,
    Conntrack,
    PreDnat,
    Failsafe,
    Normal,
}

/// One policy walked, in a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub stage: Stage,
    pub policy: String,
    /// What came of it: "allow by rule 2", "no rule matched", ...
    pub outcome: String,
}

/// The end of one stage's walk.
enum StageEnd {
    Decided(Verdict, DecidedBy),
    /// A Pass rule (the last one, when several tiers passed) and no later
    /// tier decided: the stage ends (normal stage: the profiles decide).
    Passed(DecidedBy),
    /// Policies applied, none decided, and no tier passed: the end of a
    /// tier whose default action is Deny (the end-of-tier drop).
    Undecided {
        applied: bool,
    },
    /// Tiers applied and every one ended with default action Pass, no
    /// Pass rule: the profiles decide.
    TierPassed,
}

/// Walks the stage's `policies` (in order) tier by tier, in tier order:
/// a tier with no policy for `dir` is skipped; Pass (a rule, or the end of
/// a tier whose default action is Pass) goes on to the next tier; the end
/// of a tier with default action Deny denies when `end_denies` (the normal
/// stage), and goes on otherwise (untracked and pre-DNAT stages).
#[expect(clippy::too_many_arguments, reason = "the walk's state, passed down")]
fn walk_tiers<'a>(
    set: &PolicySet,
    policies: impl Iterator<Item = &'a Policy>,
    dir: u8,
    f: &Fields,
    stage: Stage,
    end_denies: bool,
    trace: &mut Vec<Step>,
    logged: &mut Vec<(String, usize)>,
) -> StageEnd {
    let policies: Vec<&Policy> = policies.filter(|p| p.rules(dir).is_some()).collect();
    let mut last_pass = None;
    let mut tier_passed = false;
    let mut applied = false;
    for tier in crate::policy::tier::ordered(&set.tiers) {
        let in_tier = policies.iter().copied().filter(|p| p.tier == tier.name);
        match walk_stage(set, in_tier, dir, f, stage, trace, logged) {
            StageEnd::Decided(v, by) => return StageEnd::Decided(v, by),
            StageEnd::Passed(by) => last_pass = Some(by),
            StageEnd::Undecided { applied: false } => continue,
            _ if tier.default_action == crate::policy::tier::TierAction::Pass => tier_passed = true,
            _ if end_denies => return StageEnd::Undecided { applied: true },
            _ => applied = true,
        }
    }
    match last_pass {
        Some(by) => StageEnd::Passed(by),
        None if tier_passed => StageEnd::TierPassed,
        None => StageEnd::Undecided { applied },
    }
}

/// After the last tier: the endpoint's profiles in order. A rule of a
/// `Profile` decides (Log logs, Pass goes on to the next profile);
/// `projectcalico-default-allow` allows; with no decision, deny. The
/// decider is `None` unless a profile rule decided or passed.
fn walk_profiles(
    set: &PolicySet,
    hep: &HostEndpoint,
    dir: u8,
    f: &Fields,
    trace: &mut Vec<Step>,
    logged: &mut Vec<(String, usize)>,
) -> (Verdict, Option<DecidedBy>) {
    let mut passed = None;
    for name in &hep.profiles {
        if name == crate::policy::DEFAULT_ALLOW_PROFILE {
            return (Verdict::Allow, passed);
        }
        let Some(profile) = set.profiles.iter().find(|p| &p.name == name) else {
            continue; // refused at load: not in the set
        };
        let scope = profile_scope(profile);
        let mut outcome = "no rule decided".to_string();
        let mut decided = None;
        for (index, rule) in profile.rules(dir).iter().enumerate() {
            if !rule_matches_in(set, &scope, rule, f) {
                continue;
            }
            let key = format!("Profile/{}", profile.name);
            let verdict = match rule.action {
                Action::Log => {
                    logged.push((key, index));
                    continue;
                }
                Action::Pass => {
                    outcome = format!("pass by rule {index}");
                    passed = Some(DecidedBy::ProfileRule {
                        profile: profile.name.clone(),
                        rule: index,
                        action: Action::Pass,
                    });
                    break;
                }
                Action::Allow => Verdict::Allow,
                Action::Deny => Verdict::Deny,
            };
            outcome = format!(
                "{} by rule {index}",
                if verdict == Verdict::Allow {
                    "allow"
                } else {
                    "deny"
                }
            );
            decided = Some((
                verdict,
                DecidedBy::ProfileRule {
                    profile: profile.name.clone(),
                    rule: index,
                    action: rule.action,
                },
            ));
            break;
        }
        trace.push(Step {
            stage: Stage::Normal,
            policy: format!("Profile/{}", profile.name),
            outcome,
        });
        if let Some((v, by)) = decided {
            return (v, Some(by));
        }
    }
    if hep.default_allow {
        return (Verdict::Allow, passed);
    }
    (Verdict::Deny, passed)
}

/// The policy a profile's rule selectors resolve in: global, like a
/// GlobalNetworkPolicy.
pub fn profile_scope(profile: &crate::policy::tier::CalicoProfile) -> Policy {
    Policy {
        kind: crate::policy::PolicyKind::GlobalNetworkPolicy,
        name: format!("Profile/{}", profile.name),
        namespace: None,
        order: None,
        selector: Selector::All,
        namespace_selector: None,
        pre_dnat: false,
        do_not_track: false,
        apply_on_forward: false,
        ingress_applies: true,
        egress_applies: true,
        ingress: Vec::new(),
        egress: Vec::new(),
        tier: String::new(),
        origin: profile.origin.clone(),
    }
}

/// Walks `policies` (already in order) for `dir`, recording the trace and
/// the Log rules hit.
fn walk_stage<'a>(
    set: &PolicySet,
    policies: impl Iterator<Item = &'a Policy>,
    dir: u8,
    f: &Fields,
    stage: Stage,
    trace: &mut Vec<Step>,
    logged: &mut Vec<(String, usize)>,
) -> StageEnd {
    let mut applied = false;
    for policy in policies {
        let Some(rules) = policy.rules(dir) else {
            continue;
        };
        applied = true;
        let mut outcome = "no rule decided".to_string();
        let mut end = None;
        for (index, rule) in rules.iter().enumerate() {
            if !rule_matches_in(set, policy, rule, f) {
                continue;
            }
            let by = DecidedBy::Rule {
                policy: policy.name.clone(),
                rule: index,
                action: rule.action,
            };
            match rule.action {
                Action::Log => {
                    logged.push((policy.name.clone(), index));
                    continue;
                }
                Action::Allow => {
                    outcome = format!("allow by rule {index}");
                    end = Some(StageEnd::Decided(Verdict::Allow, by));
                }
                Action::Deny => {
                    outcome = format!("deny by rule {index}");
                    end = Some(StageEnd::Decided(Verdict::Deny, by));
                }
                Action::Pass => {
                    outcome = format!("pass by rule {index}");
                    end = Some(StageEnd::Passed(by));
                }
            }
            break;
        }
        trace.push(Step {
            stage,
            policy: policy.resource(),
            outcome,
        });
        if let Some(end) = end {
            return end;
        }
    }
    StageEnd::Undecided { applied }
}

/// What connection tracking decides on its own, for a packet that is the
/// first of its connection unless `q.established`: INVALID is dropped
/// (TCP flag combinations no stack sends, ICMP replies and errors with no
/// flow, ICMP types it refuses), ESTABLISHED accepted; `None`: go on.
fn conntrack_stage(f: &Fields, q: Query) -> Option<(Verdict, DecidedBy)> {
    if f.protocol == 6 && !tcp_flags_valid(f.tcp_flags) {
        return Some((
            Verdict::Deny,
            DecidedBy::ConntrackInvalid { why: TCP_FLAGS },
        ));
    }
    if q.established {
        return Some((Verdict::Allow, DecidedBy::Conntrack));
    }
    if !f.is_icmp() {
        return None;
    }
    let why = match icmp_class(f.ip_version, f.icmp_type) {
        IcmpClass::Query | IcmpClass::Untracked => return None,
        IcmpClass::Error => "ICMP error about no tracked flow",
        IcmpClass::Reply => "ICMP reply to no tracked request",
        IcmpClass::Invalid => "ICMP type connection tracking refuses",
    };
    Some((Verdict::Deny, DecidedBy::ConntrackInvalid { why }))
}

/// Judges parsed header fields on `hep`: untracked, conntrack, pre-DNAT,
/// failsafe and normal stages, as Calico does.
pub fn evaluate(set: &PolicySet, hep: &HostEndpoint, dir: u8, f: &Fields, q: Query) -> Judgement {
    let mut trace = Vec::new();
    let mut logged = Vec::new();
    let done = Judgement::at;
    if f.fragment == Fragment::Later && !q.established {
        // With no first fragment seen, a later one cannot be judged.
        return done(
            Verdict::Deny,
            DecidedBy::UnknownFragment,
            Stage::Parse,
            trace,
            logged,
        );
    }
    let failsafes = match set.failsafes_for(hep) {
        Ok(f) => f,
        // An ambiguous failsafe setup compiles to an error; judge closed.
        Err(why) => {
            return done(
                Verdict::Deny,
                DecidedBy::Misconfigured { why },
                Stage::Failsafe,
                trace,
                logged,
            )
        }
    };
    let ports = if dir == direction::INGRESS {
        &failsafes.inbound
    } else {
        &failsafes.outbound
    };
    let failsafe = if q.forwarded {
        None
    } else {
        ports.iter().position(|p| failsafe_matches(p, dir, f))
    };
    let host_policies = || set.policies_for(hep);

    // 1. Untracked (raw table): failsafe traffic skips it; for forwarded
    // traffic only ingress rules count.
    if failsafe.is_none() && !(q.forwarded && dir == direction::EGRESS) {
        let untracked = host_policies().filter(|p| p.do_not_track);
        let end = walk_tiers(
            set,
            untracked,
            dir,
            f,
            Stage::Untracked,
            false,
            &mut trace,
            &mut logged,
        );
        if let StageEnd::Decided(v, by) = end {
            return done(v, by, Stage::Untracked, trace, logged);
        }
    }

    // 2. Connection tracking: INVALID is dropped, ESTABLISHED accepted.
    if let Some((verdict, by)) = conntrack_stage(f, q) {
        return done(verdict, by, Stage::Conntrack, trace, logged);
    }

    // 3. Pre-DNAT (ingress only, new connections, host and forwarded).
    if failsafe.is_none() && dir == direction::INGRESS {
        let pre_dnat = host_policies().filter(|p| p.pre_dnat);
        let end = walk_tiers(
            set,
            pre_dnat,
            dir,
            f,
            Stage::PreDnat,
            false,
            &mut trace,
            &mut logged,
        );
        // Deny drops; Allow skips normal policy.
        if let StageEnd::Decided(v, by) = end {
            return done(v, by, Stage::PreDnat, trace, logged);
        }
    }

    // 4. Failsafe (filter table).
    if let Some(index) = failsafe {
        return done(
            Verdict::Allow,
            DecidedBy::Failsafe { index },
            Stage::Failsafe,
            trace,
            logged,
        );
    }

    // 5. Normal: host traffic, or forwarded traffic with applyOnForward.
    let normal = host_policies()
        .filter(|p| !p.pre_dnat && !p.do_not_track && (!q.forwarded || p.apply_on_forward));
    let end = walk_tiers(
        set,
        normal,
        dir,
        f,
        Stage::Normal,
        true,
        &mut trace,
        &mut logged,
    );
    let to_profiles = match end {
        StageEnd::Decided(v, by) => return done(v, by, Stage::Normal, trace, logged),
        StageEnd::Undecided { applied: true } => {
            return done(
                Verdict::Deny,
                DecidedBy::EndOfPolicies,
                Stage::Normal,
                trace,
                logged,
            )
        }
        StageEnd::Undecided { applied: false } if q.forwarded => {
            return done(
                Verdict::Allow,
                DecidedBy::ForwardedWithoutPolicy,
                Stage::Normal,
                trace,
                logged,
            )
        }
        StageEnd::Passed(by) => Some(by),
        StageEnd::TierPassed | StageEnd::Undecided { applied: false } => None,
    };
    // The profiles decide; a profile rule, else the Pass rule, is why.
    let (profile, by) = walk_profiles(set, hep, dir, f, &mut trace, &mut logged);
    let by = by.or(to_profiles).unwrap_or(DecidedBy::Profile {
        allowed: profile == Verdict::Allow,
    });
    done(profile, by, Stage::Normal, trace, logged)
}

fn failsafe_matches(p: &FailsafePort, dir: u8, f: &Fields) -> bool {
    let peer = if dir == direction::INGRESS {
        f.src
    } else {
        f.dst
    };
    f.protocol == p.protocol
        && has_ports(f.protocol)
        && f.dport == p.port
        && p.net.is_none_or(|n| n.contains(&peer))
}

fn contains(nets: &[ipnet::IpNet], addr: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&addr))
}

fn entity_matches(
    set: &PolicySet,
    policy: &Policy,
    e: &EntityMatch,
    addr: IpAddr,
    port: u16,
    protocol: u8,
) -> bool {
    let in_ranges = |ranges: &[crate::policy::PortRange]| {
        has_ports(protocol) && ranges.iter().any(|r| (r.lo..=r.hi).contains(&port))
    };
    let selected = |sel: &Selector| {
        contains(
            &resolve::selected_nets(set, policy, sel, e.namespace_selector.as_ref()),
            addr,
        )
    };
    (e.nets.is_empty() || contains(&e.nets, addr))
        && !contains(&e.not_nets, addr)
        && ((e.ports.is_empty() && e.named_ports.is_empty())
            || in_ranges(&e.ports)
            || (has_ports(protocol)
                && crate::policy::named_ports::matches(set, &e.named_ports, addr, port, protocol)))
        && !in_ranges(&e.not_ports)
        && (e.selector.is_none() && e.namespace_selector.is_none()
            || selected(e.selector.as_ref().unwrap_or(&Selector::All)))
        && !e.not_selector.as_ref().is_some_and(selected)
        && (!e.service_frontends
            || resolve::service_frontends(set)
                .iter()
                .any(|f| f.protocol == protocol && f.port == port && f.addr == addr))
}

/// Whether `rule` of `policy` matches the packet `f` (Calico's rule
/// semantics; selectors resolve against `set`).
pub fn rule_matches_in(set: &PolicySet, policy: &Policy, rule: &Rule, f: &Fields) -> bool {
    if !rule_applies_to_version(rule, f.ip_version) {
        return false;
    }
    if let Some(p) = rule.protocol {
        // ICMP rules exist in the IPv4 rule set only, ICMPv6 in the IPv6 one.
        if p != f.protocol || (p == 1 && f.ip_version != 4) || (p == 58 && f.ip_version != 6) {
            return false;
        }
    }
    if rule.not_protocol == Some(f.protocol) {
        return false;
    }
    if let Some(i) = rule.icmp {
        if f.icmp_type != i.icmp_type || i.code.is_some_and(|c| c != f.icmp_code) {
            return false;
        }
    }
    if let Some(i) = rule.not_icmp {
        if f.icmp_type == i.icmp_type && i.code.is_none_or(|c| c == f.icmp_code) {
            return false;
        }
    }
    entity_matches(set, policy, &rule.source, f.src, f.sport, f.protocol)
        && entity_matches(set, policy, &rule.destination, f.dst, f.dport, f.protocol)
}

/// Whether Calico renders `rule` for IP version `v` at all (Felix's
/// `FilterRuleToIPVersion`): not when `ipVersion` says another version,
/// nor when one of its `nets` / `notNets` lists (source or destination)
/// holds addresses of the other version only. So a rule whose only
/// address match is an IPv4 `notNets` does not apply to IPv6 packets.
pub fn rule_applies_to_version(rule: &Rule, v: u8) -> bool {
    let has_version = |nets: &[ipnet::IpNet]| {
        nets.is_empty() || nets.iter().any(|n| (n.addr().is_ipv4()) == (v == 4))
    };
    rule.ip_version.is_none_or(|rv| rv == v)
        && [&rule.source, &rule.destination]
            .iter()
            .all(|e| has_version(&e.nets) && has_version(&e.not_nets))
}

/// A pod as policy sees it (a workload endpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// Its labels plus the ones Calico gives a workload endpoint
    /// (`resolve::workload_labels`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its addresses (`status.podIPs`).
    pub ips: Vec<IpAddr>,
}

impl Workload {
    /// The pod `namespace/name` among the set's objects.
    pub fn find(set: &PolicySet, namespace: &str, name: &str) -> Option<Workload> {
        set.objects.iter().find_map(|o| match o {
            crate::policy::kubernetes::Object::Pod {
                namespace: ns,
                name: n,
                labels,
                ips,
                service_account,
                ..
            } if ns == namespace && n == name => {
                let labels = resolve::workload_labels(set, ns, labels, service_account);
                Some(Workload {
                    namespace: ns.clone(),
                    name: n.clone(),
                    labels,
                    ips: ips.clone(),
                })
            }
            _ => None,
        })
    }
}

/// Judges a packet to (`dir` ingress) or from (egress) a pod, as Calico
/// does on the pod's interface: connection tracking, then the policies
/// selecting it (global ones, and namespaced ones of its namespace) in
/// order; if any applies and none decides, deny; if none applies, the
/// namespace's profile allows (Kubernetes' default). moat does not enforce
/// this: it is the answer `moat check` gives about pod policies.
pub fn evaluate_workload(
    set: &PolicySet,
    pod: &Workload,
    dir: u8,
    f: &Fields,
    q: Query,
) -> Judgement {
    let mut trace = Vec::new();
    let mut logged = Vec::new();
    let done = Judgement::at;
    // A pod's traffic to its own address never leaves it: no policy sees it.
    let peer = if dir == direction::INGRESS {
        f.src
    } else {
        f.dst
    };
    if pod.ips.contains(&peer) {
        return done(
            Verdict::Allow,
            DecidedBy::OwnAddress,
            Stage::Normal,
            trace,
            logged,
        );
    }
    if let Some((verdict, by)) = conntrack_stage(f, q) {
        return done(verdict, by, Stage::Conntrack, trace, logged);
    }
    let policies = set.policies.iter().filter(|p| {
        let in_scope = match (&p.namespace, &p.namespace_selector) {
            (Some(ns), _) => ns == &pod.namespace,
            (None, Some(sel)) => sel.matches(&resolve::namespace_labels(set, &pod.namespace)),
            (None, None) => true,
        };
        in_scope && !p.pre_dnat && !p.do_not_track && p.selector.matches(&pod.labels)
    });
    match walk_tiers(
        set,
        policies,
        dir,
        f,
        Stage::Normal,
        true,
        &mut trace,
        &mut logged,
    ) {
        StageEnd::Decided(v, by) => done(v, by, Stage::Normal, trace, logged),
        // Past the last tier: on to the namespace profile, which allows.
        StageEnd::Passed(by) => done(Verdict::Allow, by, Stage::Normal, trace, logged),
        StageEnd::TierPassed => done(
            Verdict::Allow,
            DecidedBy::Profile { allowed: true },
            Stage::Normal,
            trace,
            logged,
        ),
        StageEnd::Undecided { applied: true } => done(
            Verdict::Deny,
            DecidedBy::EndOfPolicies,
            Stage::Normal,
            trace,
            logged,
        ),
        StageEnd::Undecided { applied: false } => done(
            Verdict::Allow,
            DecidedBy::Profile { allowed: true },
            Stage::Normal,
            trace,
            logged,
        ),
    }
}
