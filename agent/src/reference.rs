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

use crate::policy::{Action, EntityMatch, FailsafePort, HostEndpoint, PolicySet, Rule};

/// What the parser makes of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not IP: passes.
    NotIp,
    /// IP but too short or malformed: denied. Holds what was read.
    Unparsable(Fields),
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
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        let Some(inner) = be16(frame, l3 + 2) else {
            return Frame::NotIp;
        };
        ethertype = inner;
        l3 += 4;
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
}

/// A verdict and how it came about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub by: DecidedBy,
    /// Log rules hit on the way, as (policy, rule index).
    pub logged: Vec<(String, usize)>,
}

impl Judgement {
    fn new(verdict: Verdict, by: DecidedBy) -> Self {
        Judgement {
            verdict,
            by,
            logged: Vec::new(),
        }
    }

    /// The kernel's `reason` code for a deny, 0 for an allow.
    pub fn reason(&self) -> u8 {
        match (&self.verdict, &self.by) {
            (Verdict::Allow, _) => 0,
            (_, DecidedBy::Unparsable) => reason::UNPARSABLE,
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
            (_, DecidedBy::Rule { .. }) => reason::RULE,
            (_, DecidedBy::EndOfPolicies) => reason::END_OF_POLICIES,
            _ => reason::NO_PROFILE,
        }
    }
}

const TCP_FLAGS: &str = "TCP flag combination no stack sends";

/// Judges `frame` seen on host endpoint `hep` (None: not enforced) in
/// direction `dir`, with empty connection tracking.
pub fn judge(set: &PolicySet, hep: Option<&HostEndpoint>, dir: u8, frame: &[u8]) -> Judgement {
    match parse(frame) {
        Frame::NotIp => Judgement::new(Verdict::Allow, DecidedBy::NonIp),
        _ if hep.is_none() => Judgement::new(Verdict::Allow, DecidedBy::Unenforced),
        Frame::Unparsable(_) => Judgement::new(Verdict::Deny, DecidedBy::Unparsable),
        Frame::Ip(f) => judge_fields(set, hep.expect("checked above"), dir, &f),
    }
}

/// Judges parsed header fields on `hep`, with empty connection tracking.
pub fn judge_fields(set: &PolicySet, hep: &HostEndpoint, dir: u8, f: &Fields) -> Judgement {
    if f.fragment == Fragment::Later {
        // With no first fragment seen, a later one cannot be judged.
        return Judgement::new(Verdict::Deny, DecidedBy::UnknownFragment);
    }
    if f.protocol == 6 && !tcp_flags_valid(f.tcp_flags) {
        return Judgement::new(
            Verdict::Deny,
            DecidedBy::ConntrackInvalid { why: TCP_FLAGS },
        );
    }
    if f.is_icmp() {
        let why = match icmp_class(f.ip_version, f.icmp_type) {
            IcmpClass::Query | IcmpClass::Untracked => None,
            IcmpClass::Error => Some("ICMP error about no tracked flow"),
            IcmpClass::Reply => Some("ICMP reply to no tracked request"),
            IcmpClass::Invalid => Some("ICMP type connection tracking refuses"),
        };
        if let Some(why) = why {
            return Judgement::new(Verdict::Deny, DecidedBy::ConntrackInvalid { why });
        }
    }
    let failsafes = match set.failsafes_for(hep) {
        Ok(f) => f,
        // An ambiguous failsafe setup compiles to an error; judge closed.
        Err(_) => return Judgement::new(Verdict::Deny, DecidedBy::EndOfPolicies),
    };
    let ports = if dir == direction::INGRESS {
        &failsafes.inbound
    } else {
        &failsafes.outbound
    };
    if let Some(index) = ports.iter().position(|p| failsafe_matches(p, dir, f)) {
        return Judgement::new(Verdict::Allow, DecidedBy::Failsafe { index });
    }
    let profile = Judgement::new(
        if hep.default_allow {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        DecidedBy::Profile {
            allowed: hep.default_allow,
        },
    );
    let mut logged = Vec::new();
    let mut applies = false;
    // Policies the dataplane does not enforce yet are left out, as the
    // agent leaves them out (and reports them).
    for policy in set
        .policies_for(hep)
        .filter(|p| p.unenforceable().is_none())
    {
        let Some(rules) = policy.rules(dir) else {
            continue;
        };
        applies = true;
        for (index, rule) in rules.iter().enumerate() {
            if !rule_matches(rule, f) {
                continue;
            }
            let by = DecidedBy::Rule {
                policy: policy.name.clone(),
                rule: index,
                action: rule.action,
            };
            match rule.action {
                Action::Allow => {
                    return Judgement {
                        verdict: Verdict::Allow,
                        by,
                        logged,
                    }
                }
                Action::Deny => {
                    return Judgement {
                        verdict: Verdict::Deny,
                        by,
                        logged,
                    }
                }
                Action::Log => logged.push((policy.name.clone(), index)),
                // Pass: the profiles decide, and the Pass rule is why.
                Action::Pass => {
                    return Judgement {
                        verdict: profile.verdict,
                        by,
                        logged,
                    }
                }
            }
        }
    }
    if applies {
        Judgement {
            verdict: Verdict::Deny,
            by: DecidedBy::EndOfPolicies,
            logged,
        }
    } else {
        Judgement { logged, ..profile }
    }
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

fn entity_matches(e: &EntityMatch, addr: IpAddr, port: u16, protocol: u8) -> bool {
    (e.nets.is_empty() || e.nets.iter().any(|n| n.contains(&addr)))
        && (e.ports.is_empty()
            || (has_ports(protocol) && e.ports.iter().any(|r| (r.lo..=r.hi).contains(&port))))
}

/// Whether `rule` matches the packet `f` (Calico's rule semantics).
pub fn rule_matches(rule: &Rule, f: &Fields) -> bool {
    if rule.ip_version.is_some_and(|v| v != f.ip_version) {
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
    entity_matches(&rule.source, f.src, f.sport, f.protocol)
        && entity_matches(&rule.destination, f.dst, f.dport, f.protocol)
}
