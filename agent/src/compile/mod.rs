//! From a validated `PolicySet` to the rule tables the programs walk.
//!
//! Per enforced interface and direction there are two tables: failsafe
//! rules (first, allow only) and the policy rules of every policy selecting
//! the interface's host endpoint, in Calico's order. A rule whose `nets` or
//! `ports` list several values becomes one entry per combination, all with
//! the same policy and rule index; entries of one rule are contiguous.

pub mod classify;
pub mod tiers;

use std::collections::BTreeMap;

use ipnet::IpNet;
use moat_common::{direction, reason, rule_match, table, verdict, RuleEntry, NO_POLICY_ID};

use crate::policy::{Action, FailsafePort, HostEndpoint, Policy, PolicySet, PortRange, Rule};

/// One table as the dataplane will hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSpec {
    pub rules: Vec<RuleEntry>,
    pub end_verdict: u8,
    pub end_reason: u8,
    pub pass_verdict: u8,
}

/// Tables of one enforced interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledIface {
    pub name: String,
    /// The HostEndpoint that makes it enforced.
    pub host_endpoint: String,
    /// Indexed by `table::index(direction, kind)`.
    pub tables: [TableSpec; direction::COUNT * table::KINDS],
}

impl CompiledIface {
    pub fn tables(&self) -> [&TableSpec; direction::COUNT * table::KINDS] {
        std::array::from_fn(|i| &self.tables[i])
    }

    pub fn table(&self, dir: u8, kind: usize) -> &TableSpec {
        &self.tables[table::index(dir, kind)]
    }
}

/// The compiled policy for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Enforced interfaces by name.
    pub ifaces: BTreeMap<String, CompiledIface>,
    /// `policy_id` -> policy name.
    pub policy_names: Vec<String>,
    /// Interfaces asked for that no HostEndpoint of this node names.
    pub unenforced: Vec<String>,
    /// Policies that govern pods, not host interfaces (namespaced ones and
    /// those with a namespaceSelector): valid, not enforced by moat.
    pub pod_policies: Vec<String>,
}

impl Compiled {
    /// Name of the policy behind `policy_id`, if any.
    pub fn policy_name(&self, policy_id: u32) -> Option<&str> {
        self.policy_names
            .get(policy_id as usize)
            .map(String::as_str)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("interface {iface} of node {node} is named by several HostEndpoints: {names}")]
    AmbiguousEndpoint {
        node: String,
        iface: String,
        names: String,
    },
    #[error("{0}")]
    Failsafe(String),
}

/// The host endpoint of `node` for `iface`, if exactly one names it.
pub fn endpoint_for<'a>(
    set: &'a PolicySet,
    node: &str,
    iface: &str,
) -> Result<Option<&'a HostEndpoint>, CompileError> {
    let found: Vec<&HostEndpoint> = set
        .host_endpoints
        .iter()
        .filter(|h| h.node == node && h.interface_name == iface)
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(CompileError::AmbiguousEndpoint {
            node: node.into(),
            iface: iface.into(),
            names: many
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Compiles `set` for the interfaces `ifaces` of `node`.
pub fn compile(set: &PolicySet, node: &str, ifaces: &[String]) -> Result<Compiled, CompileError> {
    let mut out = Compiled {
        // Policies, then profiles (`Profile/<name>`), by id.
        policy_names: set
            .policies
            .iter()
            .map(|p| p.name.clone())
            .chain(set.profiles.iter().map(|p| format!("Profile/{}", p.name)))
            .collect(),
        pod_policies: set
            .policies
            .iter()
            .filter(|p| !p.can_select_host_endpoints())
            .map(|p| p.resource())
            .collect(),
        ..Default::default()
    };
    for iface in ifaces {
        let Some(hep) = endpoint_for(set, node, iface)? else {
            out.unenforced.push(iface.clone());
            continue;
        };
        let failsafes = set.failsafes_for(hep).map_err(CompileError::Failsafe)?;
        let profile = if hep.default_allow {
            verdict::ALLOW
        } else {
            verdict::DENY
        };
        let mut tables: [TableSpec; direction::COUNT * table::KINDS] = Default::default();
        for dir in [direction::INGRESS, direction::EGRESS] {
            let ports = if dir == direction::INGRESS {
                &failsafes.inbound
            } else {
                &failsafes.outbound
            };
            tables[table::index(dir, table::FAILSAFE)] = TableSpec {
                rules: ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| failsafe_entry(p, i as u32, dir))
                    .collect(),
                end_verdict: verdict::NONE,
                end_reason: 0,
                pass_verdict: verdict::NONE,
            };
            let stage = |in_stage: &dyn Fn(&Policy) -> bool, normal: bool| {
                stage_table(set, hep, dir, in_stage, normal)
            };
            // Untracked and pre-DNAT stages have no default deny: a packet
            // no rule decided (or a Pass past the last tier) goes on to the
            // next stage: the walk reports `PASS` (or nothing), which the
            // program treats as "go on".
            let (untracked, _) = stage(&|p| p.do_not_track, false);
            tables[table::index(dir, table::UNTRACKED)] = untracked;
            // Pre-DNAT policies have ingress rules only (validation).
            let (pre_dnat, _) = stage(&|p| p.pre_dnat, false);
            tables[table::index(dir, table::PRE_DNAT)] = pre_dnat;
            // Forwarded traffic: applyOnForward policies only; none
            // applying means allowed.
            let (forward, forward_applies) = stage(
                &|p| p.apply_on_forward && !p.pre_dnat && !p.do_not_track,
                true,
            );
            tables[table::index(dir, table::FORWARD)] = if forward_applies {
                forward
            } else {
                TableSpec {
                    rules: Vec::new(),
                    end_verdict: verdict::ALLOW,
                    end_reason: 0,
                    pass_verdict: profile,
                }
            };
            let (normal, _) = stage(&|p| !p.pre_dnat && !p.do_not_track, true);
            tables[table::index(dir, table::POLICY)] = normal;
        }
        out.ifaces.insert(
            iface.clone(),
            CompiledIface {
                name: iface.clone(),
                host_endpoint: hep.name.clone(),
                tables,
            },
        );
    }
    Ok(out)
}

/// The table of one stage of `hep` in `dir`: the policies `in_stage`
/// selects, tier by tier (`tiers`), and in the normal stage the profiles
/// after them; whether any policy applied.
fn stage_table(
    set: &PolicySet,
    hep: &HostEndpoint,
    dir: u8,
    in_stage: &dyn Fn(&Policy) -> bool,
    normal: bool,
) -> (TableSpec, bool) {
    let mut runs = Vec::new();
    for tier in crate::policy::tier::ordered(&set.tiers) {
        let mut entries = Vec::new();
        let mut applies = false;
        for (id, policy) in set.policies.iter().enumerate() {
            if policy.tier != tier.name
                || !policy.can_select_host_endpoints()
                || !in_stage(policy)
                || !policy.selector.matches(&hep.labels)
            {
                continue;
            }
            let Some(list) = policy.rules(dir) else {
                continue;
            };
            applies = true;
            for (index, rule) in list.iter().enumerate() {
                expand(set, policy, rule, id as u32, index as u32, &mut entries);
            }
        }
        if applies {
            runs.push(tiers::Run {
                entries,
                end_denies: normal && tier.default_action == crate::policy::tier::TierAction::Deny,
            });
        }
    }
    let applies = !runs.is_empty();
    let profile = if hep.default_allow {
        verdict::ALLOW
    } else {
        verdict::DENY
    };
    if normal {
        // After the last tier, the profiles in order (a Pass in one goes on
        // to the next); up to projectcalico-default-allow.
        for name in &hep.profiles {
            if name == crate::policy::DEFAULT_ALLOW_PROFILE {
                break;
            }
            let Some((i, p)) = set
                .profiles
                .iter()
                .enumerate()
                .find(|(_, p)| &p.name == name)
            else {
                continue;
            };
            let scope = crate::policy::reference::profile_scope(p);
            let id = (set.policies.len() + i) as u32;
            let mut entries = Vec::new();
            for (index, rule) in p.rules(dir).iter().enumerate() {
                expand(set, &scope, rule, id, index as u32, &mut entries);
            }
            runs.push(tiers::Run {
                entries,
                end_denies: false,
            });
        }
    }
    let mut rules = tiers::flatten(&runs, &[tiers::catch_all(verdict::PASS)]);
    // The trailing catch-all is the table's end.
    let end = rules.pop().filter(tiers::is_end);
    let (end_verdict, end_reason) = match end.map(|e| e.action) {
        Some(verdict::END_OF_TIER) => (verdict::DENY, reason::END_OF_POLICIES),
        _ if !normal => (verdict::NONE, 0),
        _ => (profile, reason::NO_PROFILE),
    };
    let spec = TableSpec {
        rules,
        end_verdict,
        end_reason,
        pass_verdict: if normal { profile } else { verdict::PASS },
    };
    (spec, applies)
}

/// IPv4 nets live in `::ffff:0:0/96`.
pub fn net_bytes(net: &IpNet) -> ([u8; 16], [u8; 16]) {
    let (addr, bits) = match net {
        IpNet::V4(n) => (
            n.network().to_ipv6_mapped().octets(),
            96 + n.prefix_len() as u32,
        ),
        IpNet::V6(n) => (n.network().octets(), n.prefix_len() as u32),
    };
    let mask = if bits == 0 {
        0u128
    } else {
        u128::MAX << (128 - bits)
    };
    let mask = mask.to_be_bytes();
    let mut masked = addr;
    for (b, m) in masked.iter_mut().zip(mask) {
        *b &= m;
    }
    (masked, mask)
}

fn failsafe_entry(p: &FailsafePort, index: u32, dir: u8) -> RuleEntry {
    let mut e = RuleEntry {
        action: verdict::ALLOW,
        protocol: p.protocol,
        match_flags: rule_match::PROTOCOL | rule_match::DST_PORTS,
        dst_port_lo: p.port,
        dst_port_hi: p.port,
        policy_id: NO_POLICY_ID,
        rule_index: index,
        ..Default::default()
    };
    if let Some(net) = &p.net {
        let (n, m) = net_bytes(net);
        e.ip_version = if net.addr().is_ipv4() { 4 } else { 6 };
        e.match_flags |= rule_match::IP_VERSION;
        if dir == direction::INGRESS {
            (e.src_net, e.src_mask) = (n, m);
            e.match_flags |= rule_match::SRC_NET;
        } else {
            (e.dst_net, e.dst_mask) = (n, m);
            e.match_flags |= rule_match::DST_NET;
        }
    }
    e
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => verdict::ALLOW,
        Action::Deny => verdict::DENY,
        Action::Log => verdict::LOG,
        Action::Pass => verdict::PASS,
    }
}

fn nets_or_any(nets: &[IpNet]) -> Vec<Option<&IpNet>> {
    if nets.is_empty() {
        vec![None]
    } else {
        nets.iter().map(Some).collect()
    }
}

fn ports_or_any(ports: &[PortRange]) -> Vec<Option<PortRange>> {
    if ports.is_empty() {
        vec![None]
    } else {
        ports.iter().copied().map(Some).collect()
    }
}

fn version_of(net: Option<&IpNet>) -> Option<u8> {
    net.map(|n| if n.addr().is_ipv4() { 4 } else { 6 })
}

/// Appends the entries of `rule` to `out`.
/// The intersection of two prefixes: the longer one when one holds the
/// other, else nothing.
fn intersect(a: &IpNet, b: &IpNet) -> Option<IpNet> {
    if a.contains(b) {
        Some(*b)
    } else if b.contains(a) {
        Some(*a)
    } else {
        None
    }
}

/// `a` without `b`: the prefixes of `a` outside `b`.
fn subtract_net(a: &IpNet, b: &IpNet) -> Vec<IpNet> {
    if !a.contains(&b.network()) && !b.contains(&a.network()) {
        return vec![*a]; // disjoint
    }
    if b.contains(a) {
        return Vec::new();
    }
    // `a` holds `b`: keep the half that does not, split the one that does.
    let halves: Vec<IpNet> = a
        .subnets(a.prefix_len() + 1)
        .map(Iterator::collect)
        .unwrap_or_default();
    halves.iter().flat_map(|h| subtract_net(h, b)).collect()
}

/// The prefixes of `nets` outside every one of `minus`.
fn subtract_nets(nets: &[IpNet], minus: &[IpNet]) -> Vec<IpNet> {
    let mut out = nets.to_vec();
    for m in minus {
        out = out.iter().flat_map(|n| subtract_net(n, m)).collect();
    }
    out
}

/// The ports of `ranges` outside every one of `minus`.
fn subtract_ports(ranges: &[PortRange], minus: &[PortRange]) -> Vec<PortRange> {
    let mut out = ranges.to_vec();
    for m in minus {
        out = out
            .iter()
            .flat_map(|r| {
                let mut parts = Vec::new();
                if r.hi < m.lo || r.lo > m.hi {
                    parts.push(*r);
                } else {
                    if r.lo < m.lo {
                        parts.push(PortRange {
                            lo: r.lo,
                            hi: m.lo - 1,
                        });
                    }
                    if r.hi > m.hi {
                        parts.push(PortRange {
                            lo: m.hi + 1,
                            hi: r.hi,
                        });
                    }
                }
                parts
            })
            .collect();
    }
    out
}

/// `nets` narrowed to `within` (an empty `nets` means any address).
fn narrow(nets: &[IpNet], within: &[IpNet]) -> Vec<IpNet> {
    if nets.is_empty() {
        return within.to_vec();
    }
    let mut out: Vec<IpNet> = nets
        .iter()
        .flat_map(|n| within.iter().filter_map(move |w| intersect(n, w)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Appends the entries of `rule` (of `policy`, in `set`) to `out`. Rule
/// selectors become the nets they resolve to, Service frontends become one
/// entry per address, protocol and port; an empty resolution adds nothing
/// (it matches nothing). Each phase rewrites the rule into simpler ones
/// and expands those again, until only positive nets, ports, protocol and
/// ICMP matches are left.
pub fn expand(
    set: &PolicySet,
    policy: &Policy,
    rule: &Rule,
    policy_id: u32,
    rule_index: u32,
    out: &mut Vec<RuleEntry>,
) {
    let mut at = Expansion {
        set,
        policy,
        policy_id,
        rule_index,
        out,
    };
    at.rule(rule);
}

/// Where the entries of one rule go.
struct Expansion<'a, 'o> {
    set: &'a PolicySet,
    policy: &'a Policy,
    policy_id: u32,
    rule_index: u32,
    out: &'o mut Vec<RuleEntry>,
}

impl Expansion<'_, '_> {
    fn rule(&mut self, rule: &Rule) {
        // Felix renders a rule only for the IP versions its literal nets
        // and notNets allow (FilterRuleToIPVersion).
        let versions: Vec<u8> = [4, 6]
            .into_iter()
            .filter(|v| crate::policy::reference::rule_applies_to_version(rule, *v))
            .collect();
        match versions.as_slice() {
            [] => {}
            [v] if rule.ip_version.is_none() => {
                let mut r = rule.clone();
                r.ip_version = Some(*v);
                self.phases(&r);
            }
            _ => self.phases(rule),
        }
    }

    fn phases(&mut self, rule: &Rule) {
        if rule.destination.service_frontends {
            return self.service_frontends(rule);
        }
        for side in [Side::Source, Side::Destination] {
            if !side.of(rule).named_ports.is_empty() {
                return self.named_ports(rule, side);
            }
        }
        for side in [Side::Source, Side::Destination] {
            let e = side.of(rule);
            if e.not_selector.is_some() || !e.not_nets.is_empty() || !e.not_ports.is_empty() {
                return self.negations(rule, side);
            }
        }
        for side in [Side::Source, Side::Destination] {
            let e = side.of(rule);
            if e.selector.is_some() || e.namespace_selector.is_some() {
                return self.selector(rule, side);
            }
        }
        self.entries(rule);
    }

    /// One rule per Service frontend the rule's destination can match.
    fn service_frontends(&mut self, rule: &Rule) {
        for f in crate::policy::resolve::service_frontends(self.set) {
            let port_ok = rule.destination.ports.is_empty()
                || rule
                    .destination
                    .ports
                    .iter()
                    .any(|r| (r.lo..=r.hi).contains(&f.port));
            if rule.protocol.is_some_and(|p| p != f.protocol)
                || rule.not_protocol == Some(f.protocol)
                || !port_ok
            {
                continue;
            }
            let nets = narrow(&rule.destination.nets, &[IpNet::from(f.addr)]);
            if nets.is_empty() {
                continue;
            }
            let mut r = rule.clone();
            r.destination.service_frontends = false;
            r.protocol = Some(f.protocol);
            r.destination.ports = vec![PortRange {
                lo: f.port,
                hi: f.port,
            }];
            r.destination.nets = nets;
            self.rule(&r);
        }
    }

    /// Named ports become the numeric ports of the rule, if any, and one
    /// rule per address and port the names stand for (none: nothing).
    fn named_ports(&mut self, rule: &Rule, side: Side) {
        let e = side.of(rule);
        if !e.ports.is_empty() {
            let mut r = rule.clone();
            side.of_mut(&mut r).named_ports.clear();
            self.rule(&r);
        }
        let Some(protocol) = rule.protocol else {
            return; // a name stands for a port of one protocol
        };
        let mut targets: Vec<(std::net::IpAddr, u16)> = e
            .named_ports
            .iter()
            .flat_map(|n| crate::policy::named_ports::resolve(self.set, n, protocol))
            .collect();
        targets.sort();
        targets.dedup();
        for (addr, port) in targets {
            let nets = narrow(&e.nets, &[IpNet::from(addr)]);
            if nets.is_empty() {
                continue;
            }
            let mut r = rule.clone();
            let m = side.of_mut(&mut r);
            m.named_ports.clear();
            m.nets = nets;
            m.ports = vec![PortRange { lo: port, hi: port }];
            self.rule(&r);
        }
    }

    /// Negations become positive matches: the complement of notSelector's
    /// and notNets' prefixes within nets, of notPorts' ranges within ports.
    fn negations(&mut self, rule: &Rule, side: Side) {
        let mut r = rule.clone();
        let m = side.of_mut(&mut r);
        if let Some(sel) = m.not_selector.take() {
            m.not_nets.extend(crate::policy::resolve::selected_nets(
                self.set,
                self.policy,
                &sel,
                m.namespace_selector.as_ref(),
            ));
            // Keep namespace_selector: it scopes `selector` too (handled next).
            if m.selector.is_none() && m.namespace_selector.is_some() {
                m.selector = Some(crate::policy::selector::Selector::All);
            }
        }
        if !m.not_nets.is_empty() {
            let base: Vec<IpNet> = if m.nets.is_empty() {
                vec![
                    "0.0.0.0/0".parse().expect("v4 any"),
                    "::/0".parse().expect("v6 any"),
                ]
            } else {
                m.nets.clone()
            };
            let nets = subtract_nets(&base, &std::mem::take(&mut m.not_nets));
            if nets.is_empty() {
                return; // nothing left: the rule matches nothing
            }
            m.nets = nets;
        }
        if !m.not_ports.is_empty() {
            let base = if m.ports.is_empty() {
                vec![PortRange { lo: 0, hi: 65535 }]
            } else {
                m.ports.clone()
            };
            let ports = subtract_ports(&base, &std::mem::take(&mut m.not_ports));
            if ports.is_empty() {
                return;
            }
            m.ports = ports;
        }
        self.rule(&r);
    }

    /// A rule selector becomes the nets it resolves to.
    fn selector(&mut self, rule: &Rule, side: Side) {
        let e = side.of(rule);
        let sel = e
            .selector
            .clone()
            .unwrap_or(crate::policy::selector::Selector::All);
        let resolved = crate::policy::resolve::selected_nets(
            self.set,
            self.policy,
            &sel,
            e.namespace_selector.as_ref(),
        );
        let nets = narrow(&e.nets, &resolved);
        if nets.is_empty() {
            return; // selects nothing: the rule matches nothing
        }
        let mut r = rule.clone();
        let e = side.of_mut(&mut r);
        e.nets = nets;
        e.selector = None;
        e.namespace_selector = None;
        self.rule(&r);
    }

    /// The entries of a rule with positive matches only: one per
    /// combination of source and destination nets and ports.
    fn entries(&mut self, rule: &Rule) {
        let Some((base, version)) = self.base_entry(rule) else {
            return;
        };
        for src in nets_or_any(&rule.source.nets) {
            for dst in nets_or_any(&rule.destination.nets) {
                // Every constraint on the IP version must agree.
                let mut v = version;
                let mut possible = true;
                for implied in [version_of(src), version_of(dst)].into_iter().flatten() {
                    match v {
                        Some(have) if have != implied => possible = false,
                        _ => v = Some(implied),
                    }
                }
                if !possible {
                    continue;
                }
                for sp in ports_or_any(&rule.source.ports) {
                    for dp in ports_or_any(&rule.destination.ports) {
                        let mut e = base;
                        if let Some(v) = v {
                            e.ip_version = v;
                            e.match_flags |= rule_match::IP_VERSION;
                        }
                        if let Some(n) = src {
                            (e.src_net, e.src_mask) = net_bytes(n);
                            e.match_flags |= rule_match::SRC_NET;
                        }
                        if let Some(n) = dst {
                            (e.dst_net, e.dst_mask) = net_bytes(n);
                            e.match_flags |= rule_match::DST_NET;
                        }
                        if let Some(p) = sp {
                            (e.src_port_lo, e.src_port_hi) = (p.lo, p.hi);
                            e.match_flags |= rule_match::SRC_PORTS;
                        }
                        if let Some(p) = dp {
                            (e.dst_port_lo, e.dst_port_hi) = (p.lo, p.hi);
                            e.match_flags |= rule_match::DST_PORTS;
                        }
                        self.out.push(e);
                    }
                }
            }
        }
    }

    /// The protocol and ICMP part every entry of `rule` shares, and the IP
    /// version the rule is limited to; `None` when it can never match (or
    /// was expanded into per-code rules instead).
    fn base_entry(&mut self, rule: &Rule) -> Option<(RuleEntry, Option<u8>)> {
        let mut base = RuleEntry {
            action: action_code(rule.action),
            policy_id: self.policy_id,
            rule_index: self.rule_index,
            ..Default::default()
        };
        // The IP version a rule is limited to: explicit, or implied by ICMP /
        // ICMPv6 (Felix renders those into one address family only).
        let mut version = rule.ip_version;
        match (rule.protocol, rule.not_protocol) {
            (Some(p), Some(np)) if p == np => return None, // can never match
            (Some(p), _) => {
                base.protocol = p;
                base.match_flags |= rule_match::PROTOCOL;
                match p {
                    1 => version = version.or(Some(4)),
                    58 => version = version.or(Some(6)),
                    _ => {}
                }
            }
            (None, Some(np)) => {
                base.protocol = np;
                base.match_flags |= rule_match::NOT_PROTOCOL;
            }
            (None, None) => {}
        }
        if let Some(i) = rule.icmp {
            base.icmp_type = i.icmp_type;
            base.match_flags |= rule_match::ICMP_TYPE;
            if let Some(c) = i.code {
                base.icmp_code = c;
                base.match_flags |= rule_match::ICMP_CODE;
            }
        }
        let Some(i) = rule.not_icmp else {
            return Some((base, version));
        };
        let Some(m) = rule.icmp else {
            base.icmp_type = i.icmp_type;
            base.match_flags |= rule_match::NOT_ICMP_TYPE;
            if let Some(c) = i.code {
                base.icmp_code = c;
                base.match_flags |= rule_match::NOT_ICMP_CODE;
            }
            return Some((base, version));
        };
        // Both: a packet must have icmp's type and not notICMP's. With
        // different types notICMP is implied; with equal ones the code
        // decides.
        if m.icmp_type != i.icmp_type {
            return Some((base, version));
        }
        match (m.code, i.code) {
            (_, None) => None,                           // never matches
            (Some(c), Some(nc)) if c == nc => None,      // never matches
            (Some(_), Some(_)) => Some((base, version)), // implied
            (None, Some(nc)) => {
                // Needs "type T and code != C": one rule per code.
                for code in (0..=255u8).filter(|c| *c != nc) {
                    let mut r = rule.clone();
                    r.icmp = Some(crate::policy::IcmpMatch {
                        icmp_type: i.icmp_type,
                        code: Some(code),
                    });
                    r.not_icmp = None;
                    self.rule(&r);
                }
                None
            }
        }
    }
}

/// The source or the destination of a rule.
#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn of(self, rule: &Rule) -> &crate::policy::EntityMatch {
        match self {
            Side::Source => &rule.source,
            Side::Destination => &rule.destination,
        }
    }

    fn of_mut(self, rule: &mut Rule) -> &mut crate::policy::EntityMatch {
        match self {
            Side::Source => &mut rule.source,
            Side::Destination => &mut rule.destination,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::load_str;

    fn set(text: &str) -> PolicySet {
        let l = load_str(Path::new("t.yaml"), text);
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        l.set
    }

    const HEP: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public}}\nspec: {node: n, interfaceName: eth1}\n---\napiVersion: moat.dev/v1alpha1\nkind: FailsafeProfile\nmetadata: {name: none}\nspec: {selector: all(), inbound: [], outbound: []}\n---\n";

    #[test]
    fn lists_expand_to_one_entry_per_combination() {
        let s = set(&format!("{HEP}apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  ingress:\n    - action: Allow\n      protocol: TCP\n      source: {{nets: [198.18.0.0/24, \"2001:db8::/64\"]}}\n      destination: {{nets: [198.18.1.1/32], ports: [22, \"80:90\"]}}\n"));
        let c = compile(&s, "n", &["eth1".into()]).expect("compiles");
        let t = c.ifaces["eth1"].table(direction::INGRESS, table::POLICY);
        // The IPv6 source cannot meet the IPv4 destination: 1 x 1 x 2 entries.
        assert_eq!(t.rules.len(), 2);
        assert!(t
            .rules
            .iter()
            .all(|r| r.ip_version == 4 && r.policy_id == 0 && r.rule_index == 0));
        assert_eq!((t.rules[1].dst_port_lo, t.rules[1].dst_port_hi), (80, 90));
        assert_eq!(
            (t.end_verdict, t.end_reason),
            (verdict::DENY, reason::END_OF_POLICIES)
        );
        let e = c.ifaces["eth1"].table(direction::EGRESS, table::POLICY);
        assert_eq!(
            (e.rules.len(), e.end_verdict, e.end_reason),
            (0, verdict::DENY, reason::NO_PROFILE),
            "no egress policy: profiles decide"
        );
    }

    #[test]
    fn net_bytes_map_ipv4_into_ipv6() {
        let (n, m) = net_bytes(&"198.18.1.0/24".parse().expect("net"));
        assert_eq!(n[10..16], [0xff, 0xff, 198, 18, 1, 0]);
        assert_eq!(m[..15], [0xff; 15]);
        assert_eq!(m[15], 0);
        let (n, m) = net_bytes(&"0.0.0.0/0".parse().expect("net"));
        assert_eq!((n[10], n[11], m[11], m[12]), (0xff, 0xff, 0xff, 0));
        let (_, m) = net_bytes(&"::/0".parse().expect("net"));
        assert_eq!(m, [0; 16]);
    }

    #[test]
    fn shuffled_input_compiles_to_identical_tables() {
        use rand::{rngs::SmallRng, seq::SliceRandom, SeedableRng};
        // Equal orders, names that sort "allow-x" before "allow", no order,
        // every stage, a network set a selector resolves: split into one
        // document each and shuffled.
        let docs = [
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: a}\nspec: {order: 10, ingress: [{action: Deny, protocol: TCP, destination: {ports: [22]}}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: allow}\nspec: {order: 20, ingress: [{action: Allow, source: {selector: \"role == 'mgmt'\"}}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: allow-x}\nspec: {order: 20, ingress: [{action: Log}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: z}\nspec: {egress: [{action: Pass}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: pre}\nspec: {order: 20, preDNAT: true, applyOnForward: true, ingress: [{action: Deny, source: {notNets: [10.0.0.0/8]}}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: raw}\nspec: {order: 20, doNotTrack: true, applyOnForward: true, ingress: [{action: Allow, protocol: UDP, destination: {notPorts: [\"0:1023\"]}}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: mgmt, labels: {role: mgmt}}\nspec: {nets: [192.0.2.0/24, 198.51.100.0/24]}\n",
        ];
        let mut rng = SmallRng::seed_from_u64(7);
        let mut reference = None;
        for round in 0..50 {
            let mut order: Vec<&str> = docs.to_vec();
            order.shuffle(&mut rng);
            let c = compile(
                &set(&format!("{HEP}{}", order.join("---\n"))),
                "n",
                &["eth1".into()],
            )
            .expect("compiles");
            assert_eq!(c.policy_names, ["a", "allow-x", "allow", "pre", "raw", "z"]);
            match &reference {
                None => reference = Some(c),
                Some(r) => assert_eq!(&c, r, "shuffle {round}: {order:?}"),
            }
        }
    }

    #[test]
    fn a_rule_is_rendered_only_for_the_ip_versions_its_nets_allow() {
        // Felix's FilterRuleToIPVersion: an IPv4-only notNets drops the rule
        // for IPv6; nets of both versions with an IPv6-only notNets keep
        // IPv6 only.
        let s = set(&format!("{HEP}apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  ingress:\n    - action: Allow\n      source: {{notNets: [10.0.0.0/8]}}\n    - action: Deny\n      source: {{nets: [10.0.0.0/8, \"2001:db8::/32\"], notNets: [\"2001:db8::/64\"]}}\n"));
        let c = compile(&s, "n", &["eth1".into()]).expect("compiles");
        let t = c.ifaces["eth1"].table(direction::INGRESS, table::POLICY);
        let versions = |i: u32| {
            let mut v: Vec<u8> = t
                .rules
                .iter()
                .filter(|r| r.rule_index == i)
                .map(|r| r.ip_version)
                .collect();
            v.dedup();
            v
        };
        assert_eq!(versions(0), [4]);
        assert_eq!(versions(1), [6]);
        let v6 = crate::policy::packet_spec::parse("tcp [2001:db8:1::1]:1000 -> [2001:db8::10]:80")
            .expect("packet");
        let rule = &s.policies[0].ingress[0];
        assert!(!crate::policy::reference::rule_matches_in(
            &s,
            &s.policies[0],
            rule,
            &v6
        ));
    }

    #[test]
    fn named_ports_become_the_addresses_and_ports_they_stand_for() {
        let s = set("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public}}\nspec: {node: n, interfaceName: eth1, expectedIPs: [198.51.100.10], ports: [{name: admin, port: 8443, protocol: TCP}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {containers: [{name: c, ports: [{name: admin, containerPort: 9443}, {name: dns, containerPort: 53, protocol: UDP}]}]}\nstatus: {podIP: 172.30.1.5}\n---\napiVersion: moat.dev/v1alpha1\nkind: FailsafeProfile\nmetadata: {name: none}\nspec: {selector: all(), inbound: [], outbound: []}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress:\n    - action: Allow\n      protocol: TCP\n      destination: {ports: [admin, 22]}\n    - action: Allow\n      protocol: TCP\n      destination: {ports: [nobody]}\n    - action: Allow\n      protocol: UDP\n      destination: {ports: [admin]}\n");
        let c = compile(&s, "n", &["eth1".into()]).expect("compiles");
        let t = c.ifaces["eth1"].table(direction::INGRESS, table::POLICY);
        let of = |i: u32| -> Vec<(u16, u8, u8)> {
            t.rules
                .iter()
                .filter(|r| r.rule_index == i)
                .map(|r| (r.dst_port_lo, r.dst_mask[15], r.dst_net[15]))
                .collect()
        };
        // 22 anywhere; 8443 on the host endpoint, 9443 on the pod.
        assert_eq!(of(0), [(22, 0, 0), (9443, 0xff, 5), (8443, 0xff, 10)]);
        assert!(of(1).is_empty(), "a name nothing declares matches nothing");
        assert!(of(2).is_empty(), "admin is a TCP port");
        let f = |p: &str| crate::policy::packet_spec::parse(p).expect("packet");
        let (pol, rule) = (&s.policies[0], &s.policies[0].ingress[0]);
        let m = |p: &str| crate::policy::reference::rule_matches_in(&s, pol, rule, &f(p));
        assert!(m("tcp 203.0.113.1:4000 -> 198.51.100.10:8443"));
        assert!(m("tcp 203.0.113.1:4000 -> 172.30.1.5:9443"));
        assert!(!m("tcp 203.0.113.1:4000 -> 198.51.100.10:9443"));
        assert!(m("tcp 203.0.113.1:4000 -> 192.0.2.1:22"));
    }

    #[test]
    fn two_endpoints_for_one_interface_is_an_error() {
        let dup = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h2}\nspec: {node: n, interfaceName: eth1}\n";
        let err =
            compile(&set(&format!("{HEP}{dup}")), "n", &["eth1".into()]).expect_err("ambiguous");
        assert!(err.to_string().contains("h, h2"), "{err}");
    }
}

#[cfg(test)]
mod resolve_tests {
    use std::path::Path;

    use super::*;
    use crate::policy::load_str;

    #[test]
    fn selectors_and_service_frontends_become_nets_and_ports() {
        let l = load_str(
            Path::new("t.yaml"),
            r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: h, labels: {ibm.role: worker_private}}
spec: {node: n, interfaceName: eth0, expectedIPs: [10.0.0.10]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: h2, labels: {ibm.role: worker_private}}
spec: {node: m, interfaceName: eth0, expectedIPs: [10.0.0.11, "2001:db8::11"]}
---
apiVersion: v1
kind: Node
metadata: {name: n}
status: {addresses: [{type: InternalIP, address: 10.0.0.10}, {type: Hostname, address: n}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {type: LoadBalancer, ports: [{port: 443, nodePort: 31443, protocol: TCP}], externalIPs: [192.0.2.80]}
status: {loadBalancer: {ingress: [{ip: 192.0.2.81}]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: p}
spec:
  selector: ibm.role == 'worker_private'
  ingress:
    - {action: Allow, source: {selector: "ibm.role == 'worker_private'", nets: [10.0.0.0/8]}}
    - {action: Allow, source: {selector: "ibm.role == 'nobody'"}}
    - {action: Allow, destination: {moatServiceFrontends: true}}
"#,
        );
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let c = compile(&l.set, "n", &["eth0".into()]).expect("compiles");
        let t = c.ifaces["eth0"].table(direction::INGRESS, table::POLICY);
        let by_rule = |i: u32| t.rules.iter().filter(|r| r.rule_index == i).count();
        // 10.0.0.10 and 10.0.0.11 (the IPv6 address is outside 10.0.0.0/8).
        assert_eq!(by_rule(0), 2);
        assert_eq!(by_rule(1), 0, "a selector matching nothing matches nothing");
        // Node 10.0.0.10 x nodePort 31443, LB ingress and external IP x 443.
        assert_eq!(by_rule(2), 3);
        let frontends: Vec<(u16, u8)> = t
            .rules
            .iter()
            .filter(|r| r.rule_index == 2)
            .map(|r| (r.dst_port_lo, r.protocol))
            .collect();
        assert!(
            frontends.contains(&(31443, 6)) && frontends.contains(&(443, 6)),
            "{frontends:?}"
        );
    }
}
