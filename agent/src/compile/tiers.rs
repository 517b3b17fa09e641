//! Tiers and profiles in one first-match table.
//!
//! The kernel walks a table and takes the first entry that matches. Calico
//! walks tiers: a Pass rule skips the rest of its tier and goes on in the
//! next one; a tier that applied and did not decide ends with its default
//! action; after the last tier the endpoint's profiles decide. Both fit in
//! one table: a tier's entries are kept, its Pass entries are replaced by
//! their conjunction with every entry of what follows (the later tiers and
//! the profiles, a list that always ends in a catch-all, so a packet that
//! matches the Pass entry meets exactly the decision Calico gives it), and
//! its end is a catch-all entry: `END_OF_TIER` (default action Deny) or
//! the following tiers themselves (Pass).

use moat_common::{rule_match, verdict, RuleEntry, NO_POLICY_ID, NO_RULE_INDEX};

/// One tier (or profile) as a run of entries.
pub struct Run {
    pub entries: Vec<RuleEntry>,
    /// The end of the run when no entry decided: `true` denies
    /// (`END_OF_TIER`), `false` goes on to the next run.
    pub end_denies: bool,
}

/// A catch-all entry with `action` and no policy.
pub fn catch_all(action: u8) -> RuleEntry {
    RuleEntry {
        action,
        policy_id: NO_POLICY_ID,
        rule_index: NO_RULE_INDEX,
        ..Default::default()
    }
}

/// Whether `e` is a catch-all entry of no policy (a tier's end, or the
/// profiles' end).
pub fn is_end(e: &RuleEntry) -> bool {
    e.match_flags == 0 && e.policy_id == NO_POLICY_ID
}

/// The runs, in order, then `last` (which must end in a catch-all), as one
/// first-match list that ends in a catch-all.
pub fn flatten(runs: &[Run], last: &[RuleEntry]) -> Vec<RuleEntry> {
    let Some((run, rest)) = runs.split_first() else {
        return last.to_vec();
    };
    let next = flatten(rest, last);
    let mut out = Vec::new();
    for e in &run.entries {
        if e.action != verdict::PASS {
            out.push(*e);
            continue;
        }
        for x in &next {
            out.extend(conjoin(e, x));
        }
    }
    if run.end_denies {
        out.push(catch_all(verdict::END_OF_TIER));
    } else {
        out.extend(next);
    }
    out
}

/// Entries matching exactly the packets both `a` and `b` match, with
/// `b`'s decision (and `a`'s policy and rule when `b` is the profiles'
/// catch-all Pass: the Pass rule that sent the packet there is why).
pub fn conjoin(a: &RuleEntry, b: &RuleEntry) -> Vec<RuleEntry> {
    let mut c = *b;
    c.match_flags = 0;
    if b.action == verdict::PASS && b.policy_id == NO_POLICY_ID {
        c.policy_id = a.policy_id;
        c.rule_index = a.rule_index;
    }
    let has = |e: &RuleEntry, f: u16| e.match_flags & f != 0;
    // IP version.
    match (
        has(a, rule_match::IP_VERSION),
        has(b, rule_match::IP_VERSION),
    ) {
        (true, true) if a.ip_version != b.ip_version => return Vec::new(),
        (true, _) => set_version(&mut c, a.ip_version),
        (_, true) => set_version(&mut c, b.ip_version),
        _ => {}
    }
    // Addresses.
    for (flag, net) in [(rule_match::SRC_NET, 0), (rule_match::DST_NET, 1)] {
        let pick = |e: &RuleEntry| {
            if net == 0 {
                (e.src_net, e.src_mask)
            } else {
                (e.dst_net, e.dst_mask)
            }
        };
        let chosen = match (has(a, flag), has(b, flag)) {
            (true, true) => match intersect(pick(a), pick(b)) {
                Some(n) => Some(n),
                None => return Vec::new(),
            },
            (true, false) => Some(pick(a)),
            (false, true) => Some(pick(b)),
            (false, false) => None,
        };
        if let Some((n, m)) = chosen {
            if net == 0 {
                (c.src_net, c.src_mask) = (n, m);
            } else {
                (c.dst_net, c.dst_mask) = (n, m);
            }
            c.match_flags |= flag;
        }
    }
    // Ports.
    for (flag, src) in [
        (rule_match::SRC_PORTS, true),
        (rule_match::DST_PORTS, false),
    ] {
        let range = |e: &RuleEntry| {
            if src {
                (e.src_port_lo, e.src_port_hi)
            } else {
                (e.dst_port_lo, e.dst_port_hi)
            }
        };
        let chosen = match (has(a, flag), has(b, flag)) {
            (true, true) => {
                let (alo, ahi) = range(a);
                let (blo, bhi) = range(b);
                let (lo, hi) = (alo.max(blo), ahi.min(bhi));
                if lo > hi {
                    return Vec::new();
                }
                Some((lo, hi))
            }
            (true, false) => Some(range(a)),
            (false, true) => Some(range(b)),
            (false, false) => None,
        };
        if let Some((lo, hi)) = chosen {
            if src {
                (c.src_port_lo, c.src_port_hi) = (lo, hi);
            } else {
                (c.dst_port_lo, c.dst_port_hi) = (lo, hi);
            }
            c.match_flags |= flag;
        }
    }
    let with_protocol = conjoin_protocol(a, b, c);
    with_protocol
        .into_iter()
        .flat_map(|c| conjoin_icmp(a, b, c))
        .collect()
}

fn set_version(c: &mut RuleEntry, v: u8) {
    c.ip_version = v;
    c.match_flags |= rule_match::IP_VERSION;
}

/// The intersection of two prefixes (address, mask; masks are prefixes):
/// the longer one when the shorter holds it.
fn intersect(a: ([u8; 16], [u8; 16]), b: ([u8; 16], [u8; 16])) -> Option<([u8; 16], [u8; 16])> {
    let bits = |m: &[u8; 16]| m.iter().map(|b| b.count_ones()).sum::<u32>();
    let (short, long) = if bits(&a.1) <= bits(&b.1) {
        (a, b)
    } else {
        (b, a)
    };
    let inside = (0..16).all(|i| long.0[i] & short.1[i] == short.0[i]);
    inside.then_some(long)
}

/// Protocol and notProtocol of both; two different notProtocols become
/// one entry per other protocol.
fn conjoin_protocol(a: &RuleEntry, b: &RuleEntry, mut c: RuleEntry) -> Vec<RuleEntry> {
    use rule_match::{NOT_PROTOCOL, PROTOCOL};
    let kind = |e: &RuleEntry| {
        if e.match_flags & PROTOCOL != 0 {
            Some((true, e.protocol))
        } else if e.match_flags & NOT_PROTOCOL != 0 {
            Some((false, e.protocol))
        } else {
            None
        }
    };
    let one = |mut c: RuleEntry, positive: bool, p: u8| {
        c.protocol = p;
        c.match_flags |= if positive { PROTOCOL } else { NOT_PROTOCOL };
        vec![c]
    };
    match (kind(a), kind(b)) {
        (None, None) => vec![c],
        (Some((pos, p)), None) | (None, Some((pos, p))) => one(c, pos, p),
        (Some((true, p)), Some((true, q))) if p == q => one(c, true, p),
        (Some((true, _)), Some((true, _))) => Vec::new(),
        (Some((true, p)), Some((false, q))) | (Some((false, q)), Some((true, p))) => {
            if p == q {
                Vec::new()
            } else {
                one(c, true, p)
            }
        }
        (Some((false, p)), Some((false, q))) if p == q => one(c, false, p),
        (Some((false, p)), Some((false, q))) => (0..=255u8)
            .filter(|x| *x != p && *x != q)
            .map(|x| {
                c.protocol = x;
                let mut e = c;
                e.match_flags |= PROTOCOL;
                e
            })
            .collect(),
    }
}

/// The ICMP type and code matches of both (one entry holds one type: an
/// ICMP match and a different notICMP keep the ICMP match; an ICMP type
/// with any code and a notICMP of that type and one code become one entry
/// per other code).
fn conjoin_icmp(a: &RuleEntry, b: &RuleEntry, c: RuleEntry) -> Vec<RuleEntry> {
    use rule_match::{ICMP_CODE, ICMP_TYPE, NOT_ICMP_CODE, NOT_ICMP_TYPE};
    #[derive(Clone, Copy)]
    struct M {
        positive: bool,
        t: u8,
        code: Option<u8>,
    }
    let m = |e: &RuleEntry| {
        if e.match_flags & ICMP_TYPE != 0 {
            Some(M {
                positive: true,
                t: e.icmp_type,
                code: (e.match_flags & ICMP_CODE != 0).then_some(e.icmp_code),
            })
        } else if e.match_flags & NOT_ICMP_TYPE != 0 {
            Some(M {
                positive: false,
                t: e.icmp_type,
                code: (e.match_flags & NOT_ICMP_CODE != 0).then_some(e.icmp_code),
            })
        } else {
            None
        }
    };
    let put = |mut c: RuleEntry, x: M| {
        c.icmp_type = x.t;
        c.icmp_code = x.code.unwrap_or(0);
        c.match_flags |= if x.positive { ICMP_TYPE } else { NOT_ICMP_TYPE };
        if x.code.is_some() {
            c.match_flags |= if x.positive { ICMP_CODE } else { NOT_ICMP_CODE };
        }
        c
    };
    match (m(a), m(b)) {
        (None, None) => vec![c],
        (Some(x), None) | (None, Some(x)) => vec![put(c, x)],
        (Some(x), Some(y)) if x.positive && y.positive => {
            if x.t != y.t {
                return Vec::new();
            }
            match (x.code, y.code) {
                (Some(p), Some(q)) if p != q => Vec::new(),
                (p, q) => vec![put(
                    c,
                    M {
                        positive: true,
                        t: x.t,
                        code: p.or(q),
                    },
                )],
            }
        }
        (Some(x), Some(y)) if x.positive != y.positive => {
            let (pos, neg) = if x.positive { (x, y) } else { (y, x) };
            if pos.t != neg.t {
                return vec![put(c, pos)];
            }
            match (pos.code, neg.code) {
                (_, None) => Vec::new(),
                (Some(p), Some(q)) if p == q => Vec::new(),
                (Some(_), Some(_)) => vec![put(c, pos)],
                (None, Some(q)) => (0..=255u8)
                    .filter(|k| *k != q)
                    .map(|k| {
                        put(
                            c,
                            M {
                                positive: true,
                                t: pos.t,
                                code: Some(k),
                            },
                        )
                    })
                    .collect(),
            }
        }
        (Some(x), Some(y)) => {
            // Two notICMPs: the same one, or every other type (and code).
            if x.t == y.t && x.code == y.code {
                return vec![put(c, x)];
            }
            let mut out = Vec::new();
            for t in 0..=255u8 {
                let codes_out = |n: M| (n.t == t).then_some(n.code);
                match (codes_out(x), codes_out(y)) {
                    (None, None) => out.push(put(
                        c,
                        M {
                            positive: true,
                            t,
                            code: None,
                        },
                    )),
                    (Some(None), _) | (_, Some(None)) => {}
                    (Some(Some(p)), None) | (None, Some(Some(p))) => {
                        for k in (0..=255u8).filter(|k| *k != p) {
                            out.push(put(
                                c,
                                M {
                                    positive: true,
                                    t,
                                    code: Some(k),
                                },
                            ));
                        }
                    }
                    (Some(Some(p)), Some(Some(q))) => {
                        for k in (0..=255u8).filter(|k| *k != p && *k != q) {
                            out.push(put(
                                c,
                                M {
                                    positive: true,
                                    t,
                                    code: Some(k),
                                },
                            ));
                        }
                    }
                }
            }
            out
        }
    }
}
