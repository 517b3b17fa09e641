//! `moat rules`: what the node enforces right now, read from the pinned
//! maps (the interface table, the rules and their counters), like
//! `iptables -L -v`. Works while the agent runs and after it stopped
//! (its pins keep enforcing); nothing is written.

use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use moat_common::{
    direction, map_names, rule_match, table, verdict, IfaceConfig, RuleEntry, RuleStats,
    NO_POLICY_ID,
};
use serde::Serialize;

use crate::{dataplane::state::SavedState, events::event::protocol_name};

/// One rule as the kernel holds it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Row {
    pub iface: String,
    pub direction: &'static str,
    pub stage: &'static str,
    /// Position in the stage's evaluation order, from 0.
    pub position: u32,
    /// The policy (as the agent names it), `failsafe` for failsafe rules,
    /// `policy#N` when the saved state does not name it.
    pub policy: String,
    /// Index of the rule in the policy's ingress or egress list.
    pub rule: Option<u32>,
    pub action: &'static str,
    /// What the rule matches, compactly (`tcp from 10.0.0.0/8 to port 22`).
    pub matches: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What a stage does when no rule decides.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StageEnd {
    pub iface: String,
    pub direction: &'static str,
    pub stage: &'static str,
    pub rules: u32,
    /// `deny`, `allow`, or `next stage`.
    pub otherwise: String,
}

/// Everything `moat rules` shows.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Listing {
    pub rules: Vec<Row>,
    pub stages: Vec<StageEnd>,
    /// Generation in force per interface.
    pub generations: std::collections::BTreeMap<String, u32>,
    pub notes: Vec<String>,
}

/// What to list.
pub struct Query<'a> {
    pub pin_dir: &'a Path,
    pub state_file: Option<&'a Path>,
    /// Only these interfaces (all when empty).
    pub ifaces: &'a [String],
    /// Only rules of this policy (name or kind/name).
    pub policy: Option<&'a str>,
}

fn open(pins: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pins.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "nothing enforced here: no map {} (is the agent running with --pin-dir {}, or was it uninstalled?)",
            path.display(),
            pins.display()
        )
    })
}

fn action_name(a: u8) -> &'static str {
    match a {
        verdict::ALLOW => "allow",
        verdict::DENY => "deny",
        verdict::LOG => "log",
        verdict::PASS => "pass",
        _ => "none",
    }
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn net(bytes: [u8; 16], mask: [u8; 16], v: u8) -> String {
    let bits: u32 = mask.iter().map(|b| b.count_ones()).sum();
    let v6 = std::net::Ipv6Addr::from(bytes);
    match (v, v6.to_ipv4_mapped()) {
        (4, Some(a)) | (0, Some(a)) if bits >= 96 => {
            format!("{}/{}", IpAddr::V4(a), bits - 96)
        }
        _ => format!("{v6}/{bits}"),
    }
}

fn ports(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// `tcp from 10.0.0.0/8 port 1024-65535 to 198.51.100.0/24 port 22`.
pub fn summary(r: &RuleEntry) -> String {
    let f = r.match_flags;
    let mut parts = Vec::new();
    if f & rule_match::IP_VERSION != 0 {
        parts.push(format!("ipv{}", r.ip_version));
    }
    if f & rule_match::PROTOCOL != 0 {
        parts.push(protocol_name(r.protocol));
    }
    if f & rule_match::NOT_PROTOCOL != 0 {
        parts.push(format!("not {}", protocol_name(r.protocol)));
    }
    if f & rule_match::ICMP_TYPE != 0 {
        let code = if f & rule_match::ICMP_CODE != 0 {
            format!("/{}", r.icmp_code)
        } else {
            String::new()
        };
        parts.push(format!("type {}{code}", r.icmp_type));
    }
    if f & rule_match::NOT_ICMP_TYPE != 0 {
        let code = if f & rule_match::NOT_ICMP_CODE != 0 {
            format!("/{}", r.icmp_code)
        } else {
            String::new()
        };
        parts.push(format!("not type {}{code}", r.icmp_type));
    }
    let side = |net_flag: u16, port_flag: u16, n: String, p: String| {
        let mut s = Vec::new();
        if f & net_flag != 0 {
            s.push(n);
        }
        if f & port_flag != 0 {
            s.push(format!("port {p}"));
        }
        s.join(" ")
    };
    let from = side(
        rule_match::SRC_NET,
        rule_match::SRC_PORTS,
        net(r.src_net, r.src_mask, r.ip_version),
        ports(r.src_port_lo, r.src_port_hi),
    );
    let to = side(
        rule_match::DST_NET,
        rule_match::DST_PORTS,
        net(r.dst_net, r.dst_mask, r.ip_version),
        ports(r.dst_port_lo, r.dst_port_hi),
    );
    if !from.is_empty() {
        parts.push(format!("from {from}"));
    }
    if !to.is_empty() {
        parts.push(format!("to {to}"));
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(" ")
    }
}

/// What rule `r` (a kernel entry) matches, from the compiled entries of
/// the same rule: one summary per entry, joined by ` | `.
fn full_summary(entries: &[RuleEntry], r: &RuleEntry) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in entries
        .iter()
        .filter(|e| (e.policy_id, e.rule_index, e.action) == (r.policy_id, r.rule_index, r.action))
    {
        let s = summary(e);
        if !parts.contains(&s) {
            parts.push(s);
        }
    }
    if parts.is_empty() {
        summary(r)
    } else {
        parts.join(" | ")
    }
}

fn policy_matches(name: &str, want: &str) -> bool {
    name == want || name.rsplit_once('/').is_some_and(|(_, n)| n == want)
}

/// Reads what the node enforces.
pub fn list(q: &Query) -> anyhow::Result<Listing> {
    let ifaces: HashMap<MapData, u32, IfaceConfig> =
        HashMap::try_from(Map::HashMap(open(q.pin_dir, map_names::IFACES)?))?;
    let rules: Array<MapData, RuleEntry> =
        Array::try_from(Map::Array(open(q.pin_dir, map_names::RULES)?))?;
    let stats: PerCpuArray<MapData, RuleStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(q.pin_dir, map_names::RULE_STATS)?))?;
    let mut out = Listing::default();
    let saved: Option<SavedState> = match q.state_file {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(text) => serde_json::from_slice(&text).ok(),
            Err(_) => None,
        },
    };
    let mut configs: Vec<(String, IfaceConfig)> = ifaces
        .iter()
        .filter_map(Result::ok)
        .map(|(i, c)| (ifname(i), c))
        .filter(|(n, _)| q.ifaces.is_empty() || q.ifaces.contains(n))
        .collect();
    configs.sort_by(|a, b| a.0.cmp(&b.0));
    for want in q.ifaces {
        if !configs.iter().any(|(n, _)| n == want) {
            out.notes.push(format!(
                "{want}: not enforced (no entry in the node's interface table)"
            ));
        }
    }
    for (name, config) in &configs {
        out.generations.insert(name.clone(), config.generation);
        let names = saved.as_ref().filter(|s| s.generation == config.generation);
        // The rules as compiled: the kernel's entries keep only what the
        // classifier's vectors do not decide (addresses and ports live
        // there).
        let compiled = names.and_then(|s| s.compiled().ok());
        let full = compiled.as_ref().and_then(|c| c.ifaces.get(name));
        if names.is_none() {
            out.notes.push(format!(
                "{name}: the saved state does not describe generation {} in force: policies shown by number",
                config.generation
            ));
        }
        for dir in [direction::INGRESS, direction::EGRESS] {
            let c = config.classifiers[dir as usize];
            for kind in 0..table::KINDS {
                let t = config.tables[table::index(dir, kind)];
                let stage = table::NAMES[kind];
                for i in 0..u32::from(t.len) {
                    let slot = c.rule_base + t.start + i;
                    let r = rules
                        .get(&slot, 0)
                        .with_context(|| format!("rule slot {slot}"))?;
                    let (packets, bytes) = stats
                        .get(&slot, 0)
                        .map(|per_cpu| {
                            per_cpu
                                .iter()
                                .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes))
                        })
                        .unwrap_or_default();
                    let policy = if r.policy_id == NO_POLICY_ID || kind == table::FAILSAFE {
                        "failsafe".to_string()
                    } else {
                        names
                            .and_then(|s| s.policy_names.get(r.policy_id as usize).cloned())
                            .unwrap_or_else(|| format!("policy#{}", r.policy_id))
                    };
                    if q.policy.is_some_and(|p| !policy_matches(&policy, p)) {
                        continue;
                    }
                    out.rules.push(Row {
                        iface: name.clone(),
                        direction: direction::name(dir),
                        stage,
                        position: i,
                        rule: (policy != "failsafe").then_some(r.rule_index),
                        policy,
                        action: action_name(r.action),
                        matches: match full {
                            Some(f) => full_summary(&f.table(dir, kind).rules, &r),
                            None => format!("{} (and the classifier's fields)", summary(&r)),
                        },
                        packets,
                        bytes,
                    });
                }
                if t.len > 0 || kind == table::POLICY {
                    out.stages.push(StageEnd {
                        iface: name.clone(),
                        direction: direction::name(dir),
                        stage,
                        rules: u32::from(t.len),
                        otherwise: match t.end_verdict {
                            verdict::NONE => "next stage".into(),
                            v => action_name(v).into(),
                        },
                    });
                }
            }
        }
    }
    Ok(out)
}

impl Listing {
    /// The text view: per interface, direction and stage, the rules in
    /// evaluation order with their counters; `wide` adds bytes and the
    /// rule's position.
    pub fn text(&self, wide: bool) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mut last = None;
        for end in &self.stages {
            let key = (&end.iface, end.direction, end.stage);
            if last == Some(key) {
                continue;
            }
            last = Some(key);
            let gen = self
                .generations
                .get(&end.iface)
                .copied()
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "{} {} {} (generation {gen}; otherwise {}):",
                end.iface, end.direction, end.stage, end.otherwise
            );
            let rows: Vec<&Row> = self
                .rules
                .iter()
                .filter(|r| (&r.iface, r.direction, r.stage) == key)
                .collect();
            if rows.is_empty() {
                let _ = writeln!(s, "  (no rule)");
            }
            let pw = rows.iter().map(|r| r.policy.len()).max().unwrap_or(0);
            for r in rows {
                let rule = r.rule.map_or("-".into(), |i| i.to_string());
                if wide {
                    let _ = writeln!(
                        s,
                        "  {:>3} {:>10} {:>12}  {:<6} {:<pw$} rule {rule:<3} {}",
                        r.position, r.packets, r.bytes, r.action, r.policy, r.matches
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "  {:>10}  {:<6} {:<pw$} rule {rule:<3} {}",
                        r.packets, r.action, r.policy, r.matches
                    );
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
