//! Bit-vector classifiers (`moat_common::classify`): from the tables of one
//! interface and direction to the bits, classes and vectors the programs
//! look up, plus a reference lookup that does in Rust what the programs do.
//!
//! A rule of the policy becomes one bit when its compiled entries are the
//! full cross product of their source nets, destination nets, source ports
//! and destination ports (what `compile::expand` produces for a rule with
//! lists); the vectors then match those fields exactly, and the bit's
//! `RuleEntry` keeps only the fields vectors do not decide (IP version,
//! protocol, ICMP). Entries that do not form a product keep one bit each.

use std::collections::{BTreeSet, HashMap};

use moat_common::{
    classify::{DPORT, DST, FIELDS, HEADER_WORDS, MAX_BITS, PROTO, SPORT, SRC, SUMMARY_WORDS},
    rule_match, table, RuleEntry, RuleTable,
};

use crate::compile::TableSpec;

/// A set of bits (rules), one `u64` per 64 bits.
pub type BitVec = Vec<u64>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClassifyError {
    #[error(
        "{bits} rules in one direction of one interface (all stages together); a classifier holds at most {max}"
    )]
    TooManyRules { bits: usize, max: u32 },
    #[error("compiled entry of policy {policy_id} rule {rule_index} has an address mask that is not a prefix")]
    NotAPrefix { policy_id: u32, rule_index: u32 },
}

/// Address prefixes: `(address, length)`, IPv4 mapped.
type Prefixes = Option<Vec<(u128, u8)>>;
/// Port ranges, inclusive.
type Ranges = Option<Vec<(u16, u16)>>;

/// One bit before it is split into fields: `None` = unconstrained.
#[derive(Clone, Debug)]
struct Bit {
    residual: RuleEntry,
    src: Prefixes,
    dst: Prefixes,
    sport: Ranges,
    dport: Ranges,
}

/// Everything one classifier holds.
#[derive(Clone, Debug, Default)]
pub struct ClassifierImage {
    /// The rule behind each bit, fields decided by vectors cleared.
    pub bits: Vec<RuleEntry>,
    /// Per table kind: its run of bits and what ends it.
    pub tables: [RuleTable; table::KINDS],
    /// Words of every vector.
    pub words: usize,
    /// Distinct vectors; classes index into it.
    pub classes: Vec<BitVec>,
    /// `(prefix, length, class)` of the source and destination addresses;
    /// the root (`0, 0`) is always present.
    pub src: Vec<(u128, u8, u32)>,
    pub dst: Vec<(u128, u8, u32)>,
    /// `(port prefix, length in bits of 16, class)`; ports without an
    /// entry are in class `any[field]`.
    pub sport: Vec<(u16, u8, u32)>,
    pub dport: Vec<(u16, u8, u32)>,
    /// Protocols with a class of their own; others are in `any[PROTO]`.
    pub proto: Vec<(u8, u32)>,
    /// Per field, the class of values no rule names (and of the ports of a
    /// packet without ports).
    pub any: [u32; FIELDS],
    /// Bit `f`: some rule constrains field `f`.
    pub lookup: u32,
}

/// The fields a classifier decides, of one packet (addresses IPv4 mapped;
/// ports `None` when its protocol has none).
#[derive(Clone, Copy, Debug)]
pub struct Fields {
    pub src: u128,
    pub dst: u128,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub protocol: u8,
}

const FIELD_FLAGS: u16 =
    rule_match::SRC_NET | rule_match::DST_NET | rule_match::SRC_PORTS | rule_match::DST_PORTS;

fn prefix_of(net: [u8; 16], mask: [u8; 16], e: &RuleEntry) -> Result<(u128, u8), ClassifyError> {
    let m = u128::from_be_bytes(mask);
    let len = m.leading_ones();
    let prefix_mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    let n = u128::from_be_bytes(net);
    if m != prefix_mask || n & !m != 0 {
        return Err(ClassifyError::NotAPrefix {
            policy_id: e.policy_id,
            rule_index: e.rule_index,
        });
    }
    Ok((n, len as u8))
}

/// The fields of `e` the vectors decide.
type Tuple = (
    Option<(u128, u8)>,
    Option<(u128, u8)>,
    Option<(u16, u16)>,
    Option<(u16, u16)>,
);

fn tuple(e: &RuleEntry) -> Result<Tuple, ClassifyError> {
    let f = e.match_flags;
    Ok((
        if f & rule_match::SRC_NET != 0 {
            Some(prefix_of(e.src_net, e.src_mask, e)?)
        } else {
            None
        },
        if f & rule_match::DST_NET != 0 {
            Some(prefix_of(e.dst_net, e.dst_mask, e)?)
        } else {
            None
        },
        (f & rule_match::SRC_PORTS != 0).then_some((e.src_port_lo, e.src_port_hi)),
        (f & rule_match::DST_PORTS != 0).then_some((e.dst_port_lo, e.dst_port_hi)),
    ))
}

/// `e` without the fields vectors decide.
fn residual(e: &RuleEntry) -> RuleEntry {
    RuleEntry {
        src_net: [0; 16],
        src_mask: [0; 16],
        dst_net: [0; 16],
        dst_mask: [0; 16],
        src_port_lo: 0,
        src_port_hi: 0,
        dst_port_lo: 0,
        dst_port_hi: 0,
        match_flags: e.match_flags & !FIELD_FLAGS,
        ..*e
    }
}

fn distinct<T: Ord + Copy>(items: impl Iterator<Item = Option<T>>) -> Option<Vec<T>> {
    let set: BTreeSet<Option<T>> = items.collect();
    if set.contains(&None) {
        return None;
    }
    Some(set.into_iter().flatten().collect())
}

/// Appends the bits of one table's entries to `out`.
fn bits_of(entries: &[RuleEntry], out: &mut Vec<Bit>) -> Result<(), ClassifyError> {
    let mut i = 0;
    while i < entries.len() {
        let head = &entries[i];
        let same = |e: &RuleEntry| {
            (e.policy_id, e.rule_index, e.action) == (head.policy_id, head.rule_index, head.action)
        };
        let end = i + entries[i..].iter().take_while(|e| same(e)).count();
        // One rule's entries, split by everything but the vector fields.
        let mut parts: Vec<(RuleEntry, u16, BTreeSet<Tuple>)> = Vec::new();
        for e in &entries[i..end] {
            let key = (residual(e), e.match_flags & FIELD_FLAGS);
            let t = tuple(e)?;
            match parts.iter_mut().find(|p| (p.0, p.1) == key) {
                Some(p) => {
                    p.2.insert(t);
                }
                None => parts.push((key.0, key.1, BTreeSet::from([t]))),
            }
        }
        for (residual, _, tuples) in parts {
            let src = distinct(tuples.iter().map(|t| t.0));
            let dst = distinct(tuples.iter().map(|t| t.1));
            let sport = distinct(tuples.iter().map(|t| t.2));
            let dport = distinct(tuples.iter().map(|t| t.3));
            fn size<T>(v: &Option<Vec<T>>) -> usize {
                v.as_ref().map_or(1, Vec::len)
            }
            if size(&src) * size(&dst) * size(&sport) * size(&dport) == tuples.len() {
                out.push(Bit {
                    residual,
                    src,
                    dst,
                    sport,
                    dport,
                });
            } else {
                for t in tuples {
                    out.push(Bit {
                        residual,
                        src: t.0.map(|p| vec![p]),
                        dst: t.1.map(|p| vec![p]),
                        sport: t.2.map(|r| vec![r]),
                        dport: t.3.map(|r| vec![r]),
                    });
                }
            }
        }
        i = end;
    }
    Ok(())
}

fn set(v: &mut BitVec, bit: usize) {
    v[bit / 64] |= 1 << (bit % 64);
}

fn or(a: &mut BitVec, b: &BitVec) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= y;
    }
}

/// Interns vectors so equal ones share a class.
struct Classes {
    words: usize,
    all: Vec<BitVec>,
    /// Vectors are hashed whole (a word per 64 rules) for every prefix and
    /// port interval: foldhash's fast hasher, not SipHash (the keys are the
    /// agent's own vectors; no flooding concern).
    index: HashMap<BitVec, u32, foldhash::fast::RandomState>,
}

impl Classes {
    fn intern(&mut self, v: BitVec) -> u32 {
        debug_assert_eq!(v.len(), self.words);
        if let Some(&c) = self.index.get(&v) {
            return c;
        }
        let c = self.all.len() as u32;
        self.index.insert(v.clone(), c);
        self.all.push(v);
        c
    }

    fn empty(&self) -> BitVec {
        vec![0; self.words]
    }
}

fn truncate(net: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        net & (u128::MAX << (128 - u32::from(len)))
    }
}

/// Address field: every prefix a rule names (and the root) with the rules
/// whose prefixes contain it. Longest-prefix match then gives, for any
/// address, exactly the rules with a prefix containing it.
fn addr_field(
    bits: &[Bit],
    get: impl Fn(&Bit) -> &Prefixes,
    classes: &mut Classes,
) -> (Vec<(u128, u8, u32)>, u32, bool) {
    let mut any = classes.empty();
    let mut exact: HashMap<(u128, u8), BitVec, foldhash::fast::RandomState> = HashMap::default();
    for (i, b) in bits.iter().enumerate() {
        match get(b) {
            None => set(&mut any, i),
            Some(prefixes) => {
                for &p in prefixes {
                    set(exact.entry(p).or_insert_with(|| classes.empty()), i);
                }
            }
        }
    }
    let constrained = !exact.is_empty();
    let mut prefixes: Vec<(u128, u8)> = exact.keys().copied().collect();
    prefixes.push((0, 0));
    prefixes.sort();
    prefixes.dedup();
    // Only the lengths some rule names can hold a containing prefix.
    let lengths: BTreeSet<u8> = exact.keys().map(|&(_, l)| l).collect();
    let mut out = Vec::with_capacity(prefixes.len());
    for (net, len) in prefixes {
        let mut v = any.clone();
        for &l in lengths.range(..=len) {
            if let Some(e) = exact.get(&(truncate(net, l), l)) {
                or(&mut v, e);
            }
        }
        out.push((net, len, classes.intern(v)));
    }
    let any_class = classes.intern(any);
    (out, any_class, constrained)
}

/// The prefixes covering `lo..=hi` exactly: `(prefix, bits of 16)`.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

/// Port field: the ports split into intervals with the same rules, each
/// interval whose rules differ from the unconstrained ones as prefixes.
fn port_field(
    bits: &[Bit],
    get: impl Fn(&Bit) -> &Ranges,
    classes: &mut Classes,
) -> (Vec<(u16, u8, u32)>, u32, bool) {
    let mut any = classes.empty();
    // Boundary -> (bits starting there, bits ending just before it).
    let mut events: std::collections::BTreeMap<u32, (Vec<usize>, Vec<usize>)> =
        std::collections::BTreeMap::new();
    for (i, b) in bits.iter().enumerate() {
        match get(b) {
            None => set(&mut any, i),
            Some(ranges) => {
                for &(lo, hi) in ranges {
                    events.entry(u32::from(lo)).or_default().0.push(i);
                    events.entry(u32::from(hi) + 1).or_default().1.push(i);
                }
            }
        }
    }
    let constrained = !events.is_empty();
    let any_class = classes.intern(any.clone());
    let mut count = vec![0u32; bits.len()];
    let mut active = classes.empty();
    // Intervals [from, to) with their class, adjacent equal ones merged.
    let mut intervals: Vec<(u32, u32, u32)> = Vec::new();
    let bounds: Vec<u32> = events.keys().copied().collect();
    for (k, &at) in bounds.iter().enumerate() {
        let (starts, ends) = &events[&at];
        for &i in ends {
            count[i] -= 1;
            if count[i] == 0 {
                active[i / 64] &= !(1 << (i % 64));
            }
        }
        for &i in starts {
            count[i] += 1;
            set(&mut active, i);
        }
        let to = bounds.get(k + 1).copied().unwrap_or(1 << 16);
        if at >= 1 << 16 || to <= at {
            continue;
        }
        let mut v = any.clone();
        or(&mut v, &active);
        let class = classes.intern(v);
        match intervals.last_mut() {
            Some(last) if last.1 == at && last.2 == class => last.1 = to,
            _ => intervals.push((at, to, class)),
        }
    }
    let mut out = Vec::new();
    for (from, to, class) in intervals {
        if class == any_class {
            continue;
        }
        for (p, len) in port_prefixes(from as u16, (to - 1) as u16) {
            out.push((p, len, class));
        }
    }
    (out, any_class, constrained)
}

fn proto_ok(e: &RuleEntry, p: u8) -> bool {
    if e.match_flags & rule_match::PROTOCOL != 0 {
        e.protocol == p
    } else if e.match_flags & rule_match::NOT_PROTOCOL != 0 {
        e.protocol != p
    } else {
        true
    }
}

impl ClassifierImage {
    /// The classifier of one direction of an interface, from its tables
    /// indexed by kind.
    pub fn build(tables: [&TableSpec; table::KINDS]) -> Result<Self, ClassifyError> {
        let mut bits = Vec::new();
        let mut runs = [RuleTable::default(); table::KINDS];
        for (kind, spec) in tables.iter().enumerate() {
            let start = bits.len();
            bits_of(&spec.rules, &mut bits)?;
            runs[kind] = RuleTable {
                start: start as u32,
                len: 0,
                end_verdict: spec.end_verdict,
                end_reason: spec.end_reason,
                pass_verdict: spec.pass_verdict,
                _pad: [0; 3],
            };
            let len = bits.len() - start;
            if bits.len() > MAX_BITS as usize {
                return Err(ClassifyError::TooManyRules {
                    bits: bits.len(),
                    max: MAX_BITS,
                });
            }
            runs[kind].len = len as u16;
        }
        let words = bits.len().div_ceil(64).max(1);
        let mut classes = Classes {
            words,
            all: Vec::new(),
            index: HashMap::default(),
        };
        let (src, any_src, l_src) = addr_field(&bits, |b| &b.src, &mut classes);
        let (dst, any_dst, l_dst) = addr_field(&bits, |b| &b.dst, &mut classes);
        let (sport, any_sport, l_sport) = port_field(&bits, |b| &b.sport, &mut classes);
        let (dport, any_dport, l_dport) = port_field(&bits, |b| &b.dport, &mut classes);
        let named: BTreeSet<u8> = bits
            .iter()
            .filter(|b| {
                b.residual.match_flags & (rule_match::PROTOCOL | rule_match::NOT_PROTOCOL) != 0
            })
            .map(|b| b.residual.protocol)
            .collect();
        let proto_vec = |p: Option<u8>, classes: &mut Classes| {
            let mut v = classes.empty();
            for (i, b) in bits.iter().enumerate() {
                let ok = match p {
                    Some(p) => proto_ok(&b.residual, p),
                    // A protocol no rule names: only rules that name none,
                    // or exclude another, match it.
                    None => b.residual.match_flags & rule_match::PROTOCOL == 0,
                };
                if ok {
                    set(&mut v, i);
                }
            }
            classes.intern(v)
        };
        let proto: Vec<(u8, u32)> = named
            .iter()
            .map(|&p| (p, proto_vec(Some(p), &mut classes)))
            .collect();
        let any_proto = proto_vec(None, &mut classes);
        let mut any = [0; FIELDS];
        any[SRC] = any_src;
        any[DST] = any_dst;
        any[SPORT] = any_sport;
        any[DPORT] = any_dport;
        any[PROTO] = any_proto;
        let lookup = [l_src, l_dst, l_sport, l_dport, !named.is_empty()]
            .iter()
            .enumerate()
            .fold(0, |acc, (f, &on)| acc | (u32::from(on) << f));
        Ok(ClassifierImage {
            bits: bits.into_iter().map(|b| b.residual).collect(),
            tables: runs,
            words,
            classes: classes.all,
            src,
            dst,
            sport,
            dport,
            proto,
            any,
            lookup,
        })
    }

    /// The class of each field for `f`, as the programs look them up.
    pub fn classes_of(&self, f: &Fields) -> [u32; FIELDS] {
        let addr = |entries: &[(u128, u8, u32)], a: u128, field: usize| {
            if self.lookup & (1 << field) == 0 {
                return self.any[field];
            }
            entries
                .iter()
                .filter(|(net, len, _)| truncate(a, *len) == *net)
                .max_by_key(|(_, len, _)| *len)
                .map_or(self.any[field], |e| e.2)
        };
        let port = |entries: &[(u16, u8, u32)], p: Option<u16>, field: usize| {
            let Some(p) = p else {
                return self.any[field];
            };
            if self.lookup & (1 << field) == 0 {
                return self.any[field];
            }
            entries
                .iter()
                .find(|(net, len, _)| {
                    let mask = if *len == 0 { 0 } else { u16::MAX << (16 - len) };
                    p & mask == *net
                })
                .map_or(self.any[field], |e| e.2)
        };
        let mut out = [0; FIELDS];
        out[SRC] = addr(&self.src, f.src, SRC);
        out[DST] = addr(&self.dst, f.dst, DST);
        out[SPORT] = port(&self.sport, f.sport, SPORT);
        out[DPORT] = port(&self.dport, f.dport, DPORT);
        out[PROTO] = self
            .proto
            .iter()
            .find(|(p, _)| *p == f.protocol)
            .map_or(self.any[PROTO], |e| e.1);
        out
    }

    /// The bits whose rules match `f` on every field vectors decide.
    pub fn candidates(&self, f: &Fields) -> BitVec {
        let cls = self.classes_of(f);
        let mut v = self.classes[cls[0] as usize].clone();
        for c in &cls[1..] {
            for (x, y) in v.iter_mut().zip(&self.classes[*c as usize]) {
                *x &= y;
            }
        }
        v
    }
}

/// `v` as the programs read it: summary, packed counts, nonzero words.
pub fn encode(v: &BitVec) -> Vec<u64> {
    let mut summary = [0u64; SUMMARY_WORDS as usize];
    let mut nonzero = Vec::new();
    for (w, &word) in v.iter().enumerate() {
        if word != 0 {
            summary[w / 64] |= 1 << (w % 64);
            nonzero.push(word);
        }
    }
    let mut counts = 0u64;
    let mut before = 0u64;
    for (k, s) in summary.iter().enumerate() {
        counts |= before << (16 * k);
        before += u64::from(s.count_ones());
    }
    let mut out = Vec::with_capacity(HEADER_WORDS as usize + nonzero.len());
    out.extend_from_slice(&summary);
    out.push(counts);
    out.extend(nonzero);
    out
}

/// Word `w` of an encoded vector, as the programs compute it.
pub fn decode_word(encoded: &[u64], w: usize) -> u64 {
    let s = encoded[w / 64];
    let bit = w % 64;
    if (s >> bit) & 1 == 0 {
        return 0;
    }
    let before = (encoded[SUMMARY_WORDS as usize] >> (16 * (w / 64))) & 0xffff;
    let below = (s & ((1u64 << bit) - 1)).count_ones() as u64;
    encoded[HEADER_WORDS as usize + (before + below) as usize]
}

#[cfg(test)]
mod tests {
    use moat_common::verdict;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    #[test]
    fn port_prefixes_cover_exactly() {
        for (lo, hi) in [
            (0, 65535),
            (22, 22),
            (1, 65534),
            (30000, 32767),
            (0, 0),
            (65535, 65535),
        ] {
            let ps = port_prefixes(lo, hi);
            let mut covered = BTreeSet::new();
            for (p, len) in &ps {
                let size = 1u32 << (16 - u32::from(*len));
                for port in u32::from(*p)..u32::from(*p) + size {
                    assert!(covered.insert(port), "{lo}-{hi}: {port} twice");
                }
            }
            let want: BTreeSet<u32> = (u32::from(lo)..=u32::from(hi)).collect();
            assert_eq!(covered, want, "{lo}-{hi}");
        }
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
    }

    #[test]
    fn encoding_round_trips() {
        let mut rng = StdRng::seed_from_u64(7);
        for words in [1usize, 3, 64, 65, 200, 256] {
            let v: BitVec = (0..words)
                .map(|_| if rng.gen_bool(0.3) { rng.gen() } else { 0 })
                .collect();
            let e = encode(&v);
            for (w, &word) in v.iter().enumerate() {
                assert_eq!(decode_word(&e, w), word, "words {words} w {w}");
            }
        }
    }

    fn matches(e: &RuleEntry, f: &Fields, version: u8) -> bool {
        let (sn, sm) = (
            u128::from_be_bytes(e.src_net),
            u128::from_be_bytes(e.src_mask),
        );
        let (dn, dm) = (
            u128::from_be_bytes(e.dst_net),
            u128::from_be_bytes(e.dst_mask),
        );
        let m = e.match_flags;
        let in_range = |p: Option<u16>, lo, hi| p.is_some_and(|p| (lo..=hi).contains(&p));
        f.src & sm == sn
            && f.dst & dm == dn
            && (m & rule_match::IP_VERSION == 0 || e.ip_version == version)
            && proto_ok(e, f.protocol)
            && (m & rule_match::SRC_PORTS == 0 || in_range(f.sport, e.src_port_lo, e.src_port_hi))
            && (m & rule_match::DST_PORTS == 0 || in_range(f.dport, e.dst_port_lo, e.dst_port_hi))
    }

    fn random_entry(rng: &mut StdRng, nets: &[(u128, u8)]) -> RuleEntry {
        let mut e = RuleEntry {
            action: [verdict::ALLOW, verdict::DENY, verdict::LOG][rng.gen_range(0..3)],
            policy_id: rng.gen_range(0..4),
            rule_index: rng.gen_range(0..4),
            ..Default::default()
        };
        let net = |rng: &mut StdRng| {
            let (n, l) = nets[rng.gen_range(0..nets.len())];
            let mask = if l == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(l))
            };
            ((n & mask).to_be_bytes(), mask.to_be_bytes())
        };
        if rng.gen_bool(0.5) {
            (e.src_net, e.src_mask) = net(rng);
            e.match_flags |= rule_match::SRC_NET;
        }
        if rng.gen_bool(0.3) {
            (e.dst_net, e.dst_mask) = net(rng);
            e.match_flags |= rule_match::DST_NET;
        }
        let range = |rng: &mut StdRng| {
            let lo = [0u16, 22, 80, 443, 1000, 30000, 65535][rng.gen_range(0..7)];
            (lo, lo.saturating_add(rng.gen_range(0..3000)))
        };
        if rng.gen_bool(0.2) {
            (e.src_port_lo, e.src_port_hi) = range(rng);
            e.match_flags |= rule_match::SRC_PORTS;
        }
        if rng.gen_bool(0.5) {
            (e.dst_port_lo, e.dst_port_hi) = range(rng);
            e.match_flags |= rule_match::DST_PORTS;
        }
        match rng.gen_range(0..4) {
            0 => {
                e.protocol = [6, 17][rng.gen_range(0..2)];
                e.match_flags |= rule_match::PROTOCOL;
            }
            1 => {
                e.protocol = 6;
                e.match_flags |= rule_match::NOT_PROTOCOL;
            }
            _ => {}
        }
        if rng.gen_bool(0.2) {
            e.ip_version = 4;
            e.match_flags |= rule_match::IP_VERSION;
        }
        e
    }

    /// The first entry matching `f` in a linear walk, against the first
    /// bit the classifier finds whose residual matches: same decision.
    #[test]
    fn classifier_agrees_with_linear_walk() {
        let mut rng = StdRng::seed_from_u64(42);
        let v4 = |a: u32| (0xffffu128 << 32) | u128::from(a);
        let nets: Vec<(u128, u8)> = vec![
            (0, 0),
            (v4(0), 96),
            (v4(0x0a00_0000), 104),
            (v4(0x0a01_0000), 112),
            (v4(0x0a01_0200), 120),
            (v4(0x0a01_0203), 128),
            (v4(0xc0a8_0000), 112),
            (0x2001_0db8 << 96, 32),
        ];
        let addrs = [
            v4(0x0a01_0203),
            v4(0x0a01_0204),
            v4(0x0a02_0000),
            v4(0xc0a8_0101),
            v4(0x0808_0808),
            (0x2001_0db8 << 96) | 5,
            7,
        ];
        for round in 0..300 {
            let tables: Vec<TableSpec> = (0..table::KINDS)
                .map(|_| TableSpec {
                    rules: (0..rng.gen_range(0..40))
                        .map(|_| random_entry(&mut rng, &nets))
                        .collect(),
                    ..Default::default()
                })
                .collect();
            let image = ClassifierImage::build(std::array::from_fn(|k| &tables[k])).unwrap();
            for _ in 0..50 {
                let protocol = [6u8, 17, 1, 132][rng.gen_range(0..4)];
                let ports = moat_common::has_ports(protocol);
                let f = Fields {
                    src: addrs[rng.gen_range(0..addrs.len())],
                    dst: addrs[rng.gen_range(0..addrs.len())],
                    sport: ports.then(|| [22u16, 80, 443, 1500, 31000, 65535][rng.gen_range(0..6)]),
                    dport: ports.then(|| [0u16, 22, 80, 2000, 30000, 65535][rng.gen_range(0..6)]),
                    protocol,
                };
                let version = if f.src >> 32 == 0xffff { 4 } else { 6 };
                let cand = image.candidates(&f);
                for (kind, spec) in tables.iter().enumerate() {
                    let linear: Vec<(u32, u32, u8)> = spec
                        .rules
                        .iter()
                        .filter(|e| matches(e, &f, version))
                        .map(|e| (e.policy_id, e.rule_index, e.action))
                        .collect();
                    let run = image.tables[kind];
                    let classified: Vec<(u32, u32, u8)> = (run.start
                        ..run.start + u32::from(run.len))
                        .map(|b| b as usize)
                        .filter(|&b| cand[b / 64] >> (b % 64) & 1 == 1)
                        .map(|b| &image.bits[b])
                        .filter(|e| matches(e, &f, version))
                        .map(|e| (e.policy_id, e.rule_index, e.action))
                        .collect();
                    // Same rules in the same order (a rule's entries may
                    // collapse into fewer bits).
                    let mut l = linear.clone();
                    l.dedup();
                    let mut c = classified.clone();
                    c.dedup();
                    assert_eq!(l, c, "round {round} kind {kind} packet {f:?}");
                }
            }
        }
    }

    #[test]
    fn a_whitelist_rule_is_one_bit_and_its_class_vectors_are_sparse() {
        let mut rules = Vec::new();
        for n in 0..1000u32 {
            for port in [22u16, 443] {
                let net = ((0xffffu128 << 32) | u128::from(0x0a00_0000 + (n << 8))).to_be_bytes();
                let mask = (u128::MAX << 8).to_be_bytes();
                rules.push(RuleEntry {
                    src_net: net,
                    src_mask: mask,
                    dst_port_lo: port,
                    dst_port_hi: port,
                    protocol: 6,
                    match_flags: rule_match::SRC_NET | rule_match::DST_PORTS | rule_match::PROTOCOL,
                    action: verdict::ALLOW,
                    ..Default::default()
                });
            }
        }
        let spec = TableSpec {
            rules,
            ..Default::default()
        };
        let empty = TableSpec::default();
        let image = ClassifierImage::build([&empty, &empty, &empty, &spec, &empty]).unwrap();
        assert_eq!(image.bits.len(), 1);
        assert_eq!(image.tables[table::POLICY].len, 1);
        assert_eq!(image.src.len(), 1001);
    }

    #[test]
    fn too_many_rules_is_refused_by_name() {
        let rules = (0..=MAX_BITS)
            .map(|i| RuleEntry {
                policy_id: i,
                action: verdict::ALLOW,
                ..Default::default()
            })
            .collect();
        let spec = TableSpec {
            rules,
            ..Default::default()
        };
        let empty = TableSpec::default();
        let e = ClassifierImage::build([&empty, &empty, &empty, &spec, &empty]).unwrap_err();
        assert_eq!(
            e,
            ClassifyError::TooManyRules {
                bits: MAX_BITS as usize + 1,
                max: MAX_BITS
            }
        );
    }
}
