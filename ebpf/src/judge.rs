//! The verdict pipeline shared by the XDP ingress and TC egress programs.
//!
//! Order (SEMANTICS.md, "How a packet is judged"): non-IP passes; unparsable
//! IP is denied; unenforced interfaces pass; later fragments take the L4
//! fields of their first fragment; conntrack: ESTABLISHED and RELATED pass,
//! INVALID is denied; failsafe rules; then the policy table, whose end and
//! `Pass` verdicts were compiled in by the agent. Every path returns `ALLOW`
//! or `DENY`; there is no error path that lets a packet through by accident.
//!
//! Everything about the packet in judgement lives in one per-CPU `Walk`
//! (map `SCRATCH`), not on the stack: the program and the global function
//! the global functions it calls must fit the verifier's 512-byte combined
//! stack.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use moat_common::{
    classify::{self, FIELDS, HEADER_WORDS, MAX_WORDS, SUMMARY_WORDS},
    counter, reason, rule_match, table, verdict, Classifier, DenyEvent, EventBucket, FragKey,
    FragmentL4, IfaceConfig, RuleEntry, RuleTable, NO_POLICY_ID, NO_RULE_INDEX,
};

use crate::{
    conntrack::{self, IcmpClass},
    maps::{
        count, CLASS_DPORT, CLASS_DST, CLASS_PROTO, CLASS_SPORT, CLASS_SRC, CLASS_WORDS, EVENTS,
        EVENT_BUCKETS, EVENT_GLOBAL, EVENT_RATE, FRAGMENTS, IFACES, LOCAL_ADDRS, RULES, RULE_STATS,
        SCRATCH,
    },
    packet::{parse, read_l4_detail, Packet, Parsed, FRAG_FIRST, FRAG_LATER},
};

/// The packet in judgement, where it was seen, its classification, and
/// (after `moat_table`) the decision of one table.
#[repr(C)]
pub struct Walk {
    pub pkt: Packet,
    /// The classifier of the interface and direction.
    classifier: Classifier,
    /// Per field, the offset of the packet's class vector (once classified).
    class_off: [u32; FIELDS],
    /// AND of the five vectors' summaries: the words that can hold a match.
    cand: [u64; SUMMARY_WORDS as usize],
    /// 0: not classified yet; 1: classified; 2: a lookup failed (judged
    /// closed).
    classified: u32,
    /// The table being searched: bits `lo..hi`; next word to look at.
    lo: u32,
    hi: u32,
    cursor: u32,
    /// Verdict of a `PASS` rule in this table.
    pass_verdict: u32,
    ifindex: u32,
    generation: u32,
    packet_len: u32,
    direction: u8,
    verdict: u8,
    reason: u8,
    _pad: u8,
    policy_id: u32,
    rule_index: u32,
    /// The Log rule last reported during this walk, so a rule expanded into
    /// several entries is reported once. Kept in map memory, not a
    /// register: the verifier then sees the same state after a Log hit as
    /// after a miss and prunes, instead of exploring both for every entry.
    logged_policy: u32,
    logged_rule: u32,
    /// Nonzero when the interface is in audit mode.
    audit: u32,
}

/// Where a verdict came from, for counters and events.
struct Decision {
    verdict: u8,
    reason: u8,
    policy_id: u32,
    rule_index: u32,
}

impl Decision {
    #[inline(always)]
    const fn by_rule(verdict: u8, reason: u8, rule: &RuleEntry) -> Self {
        Decision {
            verdict,
            reason,
            policy_id: rule.policy_id,
            rule_index: rule.rule_index,
        }
    }

    #[inline(always)]
    const fn without_rule(verdict: u8, reason: u8) -> Self {
        Decision {
            verdict,
            reason,
            policy_id: NO_POLICY_ID,
            rule_index: NO_RULE_INDEX,
        }
    }
}

/// Judges the frame `[data, data_end)` seen on `ifindex` in `direction`.
/// Returns `verdict::ALLOW` or `verdict::DENY`.
#[inline(always)]
pub fn judge(
    ctx: *mut core::ffi::c_void,
    data: usize,
    data_end: usize,
    ifindex: u32,
    direction: u8,
    packet_len: u32,
    outer_tags: u32,
) -> u8 {
    let Some(w) = SCRATCH.get_ptr_mut(0) else {
        // A one-entry per-CPU array always has entry 0; judged closed.
        return verdict::DENY;
    };
    // SAFETY: entry 0 of a per-CPU array, used by this CPU only, and only
    // for the duration of this program run (programs do not nest here).
    let w = unsafe { &mut *w };
    w.ifindex = ifindex;
    w.direction = direction;
    w.packet_len = packet_len;
    w.generation = 0;
    w.classified = 0;
    let parsed = parse(data, data_end, outer_tags, &mut w.pkt);
    if parsed == Parsed::NotIp {
        count(direction, counter::NON_IP_PASSED);
        return verdict::ALLOW;
    }
    // SAFETY: the value is only read, and the agent replaces whole entries.
    w.audit = 0;
    let Some(iface) = (unsafe { IFACES.get(ifindex) }) else {
        count(direction, counter::UNENFORCED_PASSED);
        return verdict::ALLOW;
    };
    if iface.flags & moat_common::IFACE_ENFORCED == 0 {
        count(direction, counter::UNENFORCED_PASSED);
        return verdict::ALLOW;
    }
    w.generation = iface.generation;
    w.audit = iface.flags & moat_common::IFACE_AUDIT;
    if parsed == Parsed::Unparsable {
        return deny(
            w,
            &Decision::without_rule(verdict::DENY, reason::UNPARSABLE),
        );
    }
    if parsed == Parsed::TooManyTags {
        return deny(
            w,
            &Decision::without_rule(verdict::DENY, reason::VLAN_DEPTH),
        );
    }
    if w.pkt.fragment != FRAG_LATER {
        read_l4_detail(data, data_end, &mut w.pkt);
    }
    let fragment_known = fragment_l4(&mut w.pkt);
    if !moat_common::has_ports(w.pkt.protocol) {
        w.pkt.no_ports = u32::MAX;
    }
    let decision = if fragment_known {
        decide(ctx, data, data_end, iface, w, direction)
    } else {
        Decision::without_rule(verdict::DENY, reason::FRAGMENT_UNKNOWN)
    };
    if decision.verdict == verdict::ALLOW {
        verdict::ALLOW
    } else {
        deny(w, &decision)
    }
}

/// Gives a later fragment the L4 fields of its first fragment (Linux
/// judges the reassembled datagram, which has them) and remembers those of
/// a first fragment. Returns false for a later fragment whose first
/// fragment was not seen.
#[inline(always)]
fn fragment_l4(pkt: &mut Packet) -> bool {
    if pkt.fragment == FRAG_LATER {
        // SAFETY: read-only copy of a map value.
        match unsafe { FRAGMENTS.get(frag_key(pkt)) } {
            Some(l4) => {
                pkt.sport = l4.sport;
                pkt.dport = l4.dport;
                pkt.icmp_type = l4.icmp_type;
                pkt.icmp_code = l4.icmp_code;
                pkt.tcp_flags = l4.tcp_flags;
                pkt.protocol = l4.protocol;
            }
            None => return false,
        }
    } else if pkt.fragment == FRAG_FIRST {
        let l4 = FragmentL4 {
            sport: pkt.sport,
            dport: pkt.dport,
            icmp_type: pkt.icmp_type,
            icmp_code: pkt.icmp_code,
            tcp_flags: pkt.tcp_flags,
            protocol: pkt.protocol,
        };
        // If the map cannot take it, later fragments are denied: closed.
        let _ = FRAGMENTS.insert(frag_key(pkt), l4, 0);
    }
    true
}

/// Everything after parsing; allowed packets are counted here, denied ones
/// by `deny`.
#[inline(always)]
fn decide(
    ctx: *mut core::ffi::c_void,
    data: usize,
    data_end: usize,
    iface: &IfaceConfig,
    w: &mut Walk,
    direction: u8,
) -> Decision {
    // `get`, not indexing: a failed bounds check would be a panic, which the
    // verifier refuses as code that does not end in exit.
    let (Some(failsafe_table), Some(untracked_table), Some(pre_dnat_table), Some(classifier)) = (
        iface.tables.get(table::index(direction, table::FAILSAFE)),
        iface.tables.get(table::index(direction, table::UNTRACKED)),
        iface.tables.get(table::index(direction, table::PRE_DNAT)),
        iface.classifiers.get(direction as usize),
    ) else {
        return Decision::without_rule(verdict::DENY, reason::END_OF_POLICIES);
    };
    w.classifier = *classifier;
    // Failsafe traffic (never forwarded) skips the untracked and pre-DNAT
    // stages; it is still subject to connection tracking's INVALID, then
    // accepted.
    //
    // Whether a packet is forwarded or failsafe only matters before
    // connection tracking when there are untracked rules. Without them
    // (the common case) both are worked out after it, so a packet of an
    // established flow costs neither the node-address lookup nor any
    // classification: same verdicts, a shorter established path.
    let untracked_empty = untracked_table.len == 0
        && untracked_table.end_verdict != verdict::ALLOW
        && untracked_table.end_verdict != verdict::DENY;
    let mut forwarded = false;
    let mut failsafe = Decision::without_rule(verdict::NONE, 0);
    if !untracked_empty {
        forwarded = is_forwarded(ctx, iface, w, direction);
        if !forwarded {
            failsafe = walk_table(failsafe_table, w);
        }
    }
    let mut is_failsafe = failsafe.verdict == verdict::ALLOW;

    // 1. Untracked: before connection tracking; an Allow creates no entry.
    // Forwarded traffic meets only the untracked ingress rules.
    let skip_untracked = untracked_empty
        || is_failsafe
        || (forwarded && direction == moat_common::direction::EGRESS);
    if !skip_untracked {
        let untracked = walk_table(untracked_table, w);
        if untracked.verdict == verdict::ALLOW {
            count(direction, counter::UNTRACKED_ALLOWED);
            return untracked;
        }
        if untracked.verdict == verdict::DENY {
            return untracked;
        }
    }

    // 2. Connection tracking: INVALID is dropped, ESTABLISHED accepted.
    let pkt = &w.pkt;
    if pkt.protocol == moat_common::ip_proto::TCP && !conntrack::tcp_flags_valid(pkt.tcp_flags) {
        return Decision::without_rule(verdict::DENY, reason::TCP_FLAGS_INVALID);
    }
    if conntrack::established(pkt, direction) {
        count(direction, counter::CONNTRACK_ALLOWED);
        return Decision::without_rule(verdict::ALLOW, 0);
    }
    let is_icmp = (pkt.protocol == moat_common::ip_proto::ICMP && pkt.ip_version == 4)
        || (pkt.protocol == moat_common::ip_proto::ICMPV6 && pkt.ip_version == 6);
    // A later fragment is judged like its first, but an ICMP error quotes
    // its packet in the first fragment only: a later one relates to nothing.
    if is_icmp {
        match conntrack::icmp_class(pkt.ip_version, pkt.icmp_type) {
            IcmpClass::Query | IcmpClass::Untracked => {}
            IcmpClass::Error => {
                if pkt.fragment != FRAG_LATER && conntrack::related(data, data_end, pkt) {
                    count(direction, counter::RELATED_ALLOWED);
                    return Decision::without_rule(verdict::ALLOW, 0);
                }
                return Decision::without_rule(verdict::DENY, reason::CONNTRACK_INVALID);
            }
            IcmpClass::Reply | IcmpClass::Invalid => {
                return Decision::without_rule(verdict::DENY, reason::CONNTRACK_INVALID);
            }
        }
    }

    if untracked_empty {
        forwarded = is_forwarded(ctx, iface, w, direction);
        if !forwarded {
            failsafe = walk_table(failsafe_table, w);
            is_failsafe = failsafe.verdict == verdict::ALLOW;
        }
    }

    // 3. Pre-DNAT (ingress only; the egress table is empty): new
    // connections, on the destination as it arrived.
    if !is_failsafe {
        let pre_dnat = walk_table(pre_dnat_table, w);
        if pre_dnat.verdict == verdict::ALLOW {
            count(direction, counter::PRE_DNAT_ALLOWED);
            conntrack::track(&w.pkt, direction);
            return pre_dnat;
        }
        if pre_dnat.verdict == verdict::DENY {
            return pre_dnat;
        }
    }

    // 4. Failsafe.
    if is_failsafe {
        count(direction, counter::FAILSAFE_ALLOWED);
        conntrack::track(&w.pkt, direction);
        return failsafe;
    }

    // 5. Normal policy (applyOnForward policies for forwarded traffic).
    let normal_kind = if forwarded {
        table::FORWARD
    } else {
        table::POLICY
    };
    let Some(policy_table) = iface.tables.get(table::index(direction, normal_kind)) else {
        return Decision::without_rule(verdict::DENY, reason::END_OF_POLICIES);
    };
    let policy = walk_table(policy_table, w);
    if policy.verdict == verdict::ALLOW {
        if policy.policy_id == NO_POLICY_ID {
            count(
                direction,
                if forwarded {
                    counter::FORWARDED_ALLOWED
                } else {
                    counter::PROFILE_ALLOWED
                },
            );
        } else {
            count(direction, counter::POLICY_ALLOWED);
        }
        conntrack::track(&w.pkt, direction);
    }
    policy
}

/// Forwarded: to (ingress) or from (egress) an address that is not the
/// node's. Only when the agent keeps LOCAL_ADDRS in sync; otherwise every
/// packet is host traffic, the stricter view. With `IFACE_ROUTE_LOCAL`, an
/// address not listed is forwarded only if the kernel would route it on.
#[inline(always)]
fn is_forwarded(ctx: *mut core::ffi::c_void, iface: &IfaceConfig, w: &Walk, direction: u8) -> bool {
    if iface.flags & moat_common::IFACE_KNOWS_LOCAL == 0 {
        return false;
    }
    let addr = if direction == moat_common::direction::INGRESS {
        &w.pkt.dst
    } else {
        &w.pkt.src
    };
    if is_local(addr, w.pkt.ip_version) {
        return false;
    }
    iface.flags & moat_common::IFACE_ROUTE_LOCAL == 0 || routed_onward(ctx, w, direction)
}

/// Whether the kernel's routing table (policy rules, every table) has a
/// unicast route onward for the packet's destination (ingress) or source
/// (egress), seen as arriving on its interface: `bpf_fib_lookup`, with
/// neighbours and MTU left out. Local, broadcast, anycast, multicast and
/// AnyIP routes (NOT_FWDED), no route, forwarding disabled, blackhole,
/// unreachable and prohibit routes: not forwarded, so the packet is judged
/// as host traffic. A helper error: forwarded (the listed addresses
/// decide, as without `IFACE_ROUTE_LOCAL`).
///
/// Verifier note: out of line (a static subprogram), so its 64-byte
/// parameter block is on the stack only while it runs.
#[inline(never)]
fn routed_onward(ctx: *mut core::ffi::c_void, w: &Walk, direction: u8) -> bool {
    use aya_ebpf::bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNSUPP_LWT, BPF_FIB_LOOKUP_SKIP_NEIGH,
    };
    let p = &w.pkt;
    // SAFETY: a plain C struct of integers and unions of integers.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = p.protocol;
    params.ifindex = w.ifindex;
    // Egress asks whether the source is the host's: the route to it.
    let (src, dst) = if direction == moat_common::direction::INGRESS {
        (p.src, p.dst)
    } else {
        ([0; 4], p.src)
    };
    if direction == moat_common::direction::INGRESS {
        params.sport = p.sport.to_be();
        params.dport = p.dport.to_be();
    }
    if p.ip_version == 4 {
        params.family = 2; // AF_INET
        params.__bindgen_anon_2.tos = p.detail.tos;
        params.__bindgen_anon_3.ipv4_src = src[3];
        params.__bindgen_anon_4.ipv4_dst = dst[3];
    } else {
        params.family = 10; // AF_INET6
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    }
    // SAFETY: `ctx` is the program's context; `params` is valid for its
    // size for the duration of the call.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    // A kernel that cannot answer (before 6.3 it refuses SKIP_NEIGH with
    // -EINVAL) leaves the listed addresses alone to decide, as they did
    // before the routing table was asked.
    ret < 0
        || ret == BPF_FIB_LKUP_RET_SUCCESS as i64
        || ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64
        || ret == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64
        || ret == BPF_FIB_LKUP_RET_UNSUPP_LWT as i64
}

/// Whether `addr` (of an IPv4 packet when `ip_version` is 4) is one of the
/// node's addresses, or broadcast/multicast (delivered to the host itself).
#[inline(always)]
fn is_local(addr: &[u32; 4], ip_version: u8) -> bool {
    // SAFETY: same size, every bit pattern valid.
    let bytes = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*addr) };
    let mapped = bytes[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if ip_version == 4 {
        if bytes[12] & 0xf0 == 0xe0 || bytes[12..16] == [0xff; 4] {
            return true;
        }
    } else if bytes[0] == 0xff {
        return true;
    } else if mapped {
        // An IPv6 packet to a v4-mapped address is not to an IPv4 address
        // of the node (whose keys look the same).
        return false;
    }
    // SAFETY: read-only lookup.
    unsafe { LOCAL_ADDRS.get(bytes) }.is_some()
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        // SAFETY: same size, every bit pattern valid.
        src: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(pkt.src) },
        dst: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(pkt.dst) },
        id: pkt.frag_id,
        protocol: pkt.frag_proto,
        _pad: [0; 3],
    }
}

/// The first decision of table `t` for the packet in `w`, or the table's
/// end verdict.
#[inline(always)]
fn walk_table(t: &RuleTable, w: &mut Walk) -> Decision {
    if t.len == 0 {
        return Decision::without_rule(t.end_verdict, t.end_reason);
    }
    w.logged_policy = NO_POLICY_ID;
    w.logged_rule = NO_RULE_INDEX;
    w.lo = t.start;
    w.hi = t.start + t.len as u32;
    w.cursor = t.start / 64;
    w.pass_verdict = t.pass_verdict as u32;
    w.verdict = verdict::NONE;
    moat_table(w);
    if w.verdict != verdict::NONE {
        return Decision {
            verdict: w.verdict,
            reason: w.reason,
            policy_id: w.policy_id,
            rule_index: w.rule_index,
        };
    }
    Decision::without_rule(t.end_verdict, t.end_reason)
}

/// `moat_word`: go on with the next candidate word.
const CONTINUE: u32 = 0;
/// `moat_word`: a rule decided (or a fault did: closed).
const DECIDED: u32 = 1;
/// `moat_word`: no candidate word left in the table.
const END: u32 = 2;

/// Searches the table `w.lo..w.hi` for the packet in `w` (classifying it
/// first if no table did yet) and writes the first decision into `w`
/// (`verdict::NONE`: none).
///
/// Verifier note: this and `moat_word`, `moat_rule` are global functions
/// (exported, BTF linkage global), each checked once on its own with
/// every input unknown, instead of once per path that reaches them.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_table(w: *mut Walk) -> u32 {
    if w.is_null() {
        return 0;
    }
    // SAFETY: non-null, and callers pass the live per-CPU `Walk`.
    let w = unsafe { &mut *w };
    if w.classified == 0 {
        classify(w);
    }
    if w.classified != 1 {
        fault(w);
        return 0;
    }
    for _ in 0..=MAX_WORDS {
        if moat_word(w) != CONTINUE {
            break;
        }
    }
    0
}

/// A lookup that cannot fail did: the packet is denied, never judged on a
/// partial classifier.
#[inline(always)]
fn fault(w: &mut Walk) {
    w.verdict = verdict::DENY;
    w.reason = reason::END_OF_POLICIES;
    w.policy_id = NO_POLICY_ID;
    w.rule_index = NO_RULE_INDEX;
}

/// One lookup per field, then the AND of the five vectors' summaries.
#[inline(always)]
fn classify(w: &mut Walk) {
    w.classified = 2;
    let c = w.classifier;
    let id = c.id.to_be_bytes();
    let mut off = c.any;
    let p = &w.pkt;
    if c.lookup & (1 << classify::SRC) != 0 {
        match CLASS_SRC.get(addr_key(id, &p.src)) {
            Some(v) => off[classify::SRC] = *v,
            None => return,
        }
    }
    if c.lookup & (1 << classify::DST) != 0 {
        match CLASS_DST.get(addr_key(id, &p.dst)) {
            Some(v) => off[classify::DST] = *v,
            None => return,
        }
    }
    if p.no_ports == 0 {
        if c.lookup & (1 << classify::SPORT) != 0 {
            match CLASS_SPORT.get(port_key(id, p.sport)) {
                Some(v) => off[classify::SPORT] = *v,
                None => return,
            }
        }
        if c.lookup & (1 << classify::DPORT) != 0 {
            match CLASS_DPORT.get(port_key(id, p.dport)) {
                Some(v) => off[classify::DPORT] = *v,
                None => return,
            }
        }
    }
    if c.lookup & (1 << classify::PROTO) != 0 {
        // SAFETY: read-only lookup.
        if let Some(v) = unsafe { CLASS_PROTO.get(classify::proto_key(c.id, p.protocol)) } {
            off[classify::PROTO] = *v;
        }
    }
    for k in 0..SUMMARY_WORDS {
        let mut s = u64::MAX;
        for o in off {
            match CLASS_WORDS.get(o.wrapping_add(k)) {
                Some(v) => s &= *v,
                None => return,
            }
        }
        w.cand[k as usize] = s;
    }
    w.class_off = off;
    w.classified = 1;
}

#[inline(always)]
fn addr_key(id: [u8; 4], addr: &[u32; 4]) -> Key<moat_common::AddrClassKey> {
    // SAFETY: same size, every bit pattern valid.
    let a = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*addr) };
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&id);
    data[4..].copy_from_slice(&a);
    Key::new(classify::ADDR_ROOT_BITS + 128, data)
}

#[inline(always)]
fn port_key(id: [u8; 4], port: u16) -> Key<moat_common::PortClassKey> {
    let p = port.to_be_bytes();
    Key::new(
        classify::PORT_ROOT_BITS + 16,
        [id[0], id[1], id[2], id[3], p[0], p[1], 0, 0],
    )
}

/// Number of set bits (BPF has no such instruction).
#[inline(always)]
fn popcount(x: u64) -> u32 {
    let x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    let x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    let x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// Index of the lowest set bit of a nonzero `x`.
#[inline(always)]
fn lowest_bit(x: u64) -> u32 {
    popcount((x & x.wrapping_neg()).wrapping_sub(1))
}

/// Word `wi` of the sparse vector at `off`; `None` if the vector runs
/// past the map (closed).
#[inline(always)]
fn vector_word(off: u32, wi: u32) -> Option<u64> {
    let k = wi >> 6;
    let bit = wi & 63;
    let s = *CLASS_WORDS.get(off.wrapping_add(k))?;
    if (s >> bit) & 1 == 0 {
        return Some(0);
    }
    let counts = *CLASS_WORDS.get(off.wrapping_add(SUMMARY_WORDS))?;
    let before = ((counts >> (16 * k)) & 0xffff) as u32;
    let below = popcount(s & ((1u64 << bit) - 1));
    CLASS_WORDS
        .get(off.wrapping_add(HEADER_WORDS + before + below))
        .copied()
}

/// Looks at the next candidate word of the table from `w.cursor`: the AND
/// of the five vectors' words, limited to the table's bits, lowest bit
/// first. Returns `CONTINUE`, `DECIDED` or `END`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_word(w: *mut Walk) -> u32 {
    if w.is_null() {
        return END;
    }
    // SAFETY: non-null, and callers pass the live per-CPU `Walk`.
    let w = unsafe { &mut *w };
    let mut wi = u32::MAX;
    for k in 0..SUMMARY_WORDS {
        let base = k * 64;
        if w.cursor >= base + 64 {
            continue;
        }
        let mut m = w.cand[k as usize];
        if w.cursor > base {
            m &= u64::MAX << ((w.cursor - base) & 63);
        }
        if m != 0 {
            wi = base + lowest_bit(m);
            break;
        }
    }
    if wi == u32::MAX || wi.wrapping_mul(64) >= w.hi {
        return END;
    }
    w.cursor = wi + 1;
    let mut word = u64::MAX;
    for f in 0..FIELDS {
        match vector_word(w.class_off[f], wi) {
            Some(x) => word &= x,
            None => {
                fault(w);
                return DECIDED;
            }
        }
    }
    let first = wi * 64;
    if w.lo > first {
        let skip = w.lo - first;
        word &= if skip >= 64 { 0 } else { u64::MAX << skip };
    }
    if w.hi < first + 64 {
        word &= (1u64 << ((w.hi - first) & 63)) - 1;
    }
    for _ in 0..64 {
        if word == 0 {
            return CONTINUE;
        }
        let b = lowest_bit(word);
        word &= word - 1;
        if moat_rule(w, first + b) != 0 {
            return DECIDED;
        }
    }
    CONTINUE
}

/// Judges the packet in `w` by the rule behind `bit` (which matches on the
/// fields vectors decide): returns 1 and writes the decision into `w` when
/// the rule decides, 0 when it does not match or only logs.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_rule(w: *mut Walk, bit: u32) -> u32 {
    if w.is_null() {
        return 0;
    }
    // SAFETY: non-null, and callers pass the live per-CPU `Walk`.
    let w = unsafe { &mut *w };
    let slot = w.classifier.rule_base.wrapping_add(bit);
    let Some(rule) = RULES.get(slot) else {
        fault(w);
        return 1;
    };
    if !matches(rule, &w.pkt) {
        return 0;
    }
    if let Some(stats) = RULE_STATS.get_ptr_mut(slot) {
        // SAFETY: a valid pointer into this CPU's value.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += w.packet_len as u64;
        }
    }
    let d = match rule.action {
        verdict::ALLOW => Decision::by_rule(verdict::ALLOW, 0, rule),
        verdict::DENY => Decision::by_rule(verdict::DENY, reason::RULE, rule),
        verdict::PASS => Decision::by_rule(w.pass_verdict as u8, reason::NO_PROFILE, rule),
        verdict::END_OF_TIER => Decision::by_rule(verdict::DENY, reason::END_OF_POLICIES, rule),
        _ => {
            // LOG. One rule may be several bits; report it once.
            if (w.logged_policy, w.logged_rule) != (rule.policy_id, rule.rule_index) {
                w.logged_policy = rule.policy_id;
                w.logged_rule = rule.rule_index;
                count(w.direction, counter::LOG_RULE_HITS);
                emit(w, &Decision::by_rule(verdict::LOG, reason::LOG_RULE, rule));
            }
            return 0;
        }
    };
    w.verdict = d.verdict;
    w.reason = d.reason;
    w.policy_id = d.policy_id;
    w.rule_index = d.rule_index;
    1
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*a) }
}

/// All ones when `bit` of `flags` is set, else zero; arithmetic, so the
/// verifier sees no branch.
#[inline(always)]
fn mask_if(flags: u16, bit: u16) -> u32 {
    0u32.wrapping_sub((u32::from(flags) >> bit.trailing_zeros()) & 1)
}

/// Nonzero when `port` lies outside `lo..=hi`: the sign bit of either
/// difference, computed without a branch.
#[inline(always)]
fn outside(port: u16, lo: u16, hi: u16) -> u32 {
    let (p, lo, hi) = (i32::from(port), i32::from(lo), i32::from(hi));
    ((p - lo) | (hi - p)) as u32 & 0x8000_0000
}

/// Whether rule `r` matches `p`.
///
/// Verifier note: the walk loop is unrolled by the verifier and every
/// feasible branch in it is a pending state ("The sequence of 8193 jumps is
/// too complex"). So the common fields are compared branch-free: each
/// difference is OR-ed into `diff`, masked to zero when the rule does not
/// constrain that field (an unconstrained net has a zero mask), and a single
/// test decides. Only the rare negated fields branch.
#[inline(always)]
fn matches(r: &RuleEntry, p: &Packet) -> bool {
    let f = r.match_flags;
    let (sn, sm, dn, dm) = (
        words(&r.src_net),
        words(&r.src_mask),
        words(&r.dst_net),
        words(&r.dst_mask),
    );
    let mut diff = 0u32;
    for w in 0..4 {
        diff |= (p.src[w] & sm[w]) ^ sn[w];
        diff |= (p.dst[w] & dm[w]) ^ dn[w];
    }
    diff |= mask_if(f, rule_match::IP_VERSION) & u32::from(r.ip_version ^ p.ip_version);
    diff |= mask_if(f, rule_match::PROTOCOL) & u32::from(r.protocol ^ p.protocol);
    // Ports exist only on TCP, UDP, UDP-Lite and SCTP: `p.no_ports` is all
    // ones otherwise, so a rule with ports never matches such a packet.
    diff |= mask_if(f, rule_match::SRC_PORTS)
        & (p.no_ports | outside(p.sport, r.src_port_lo, r.src_port_hi));
    diff |= mask_if(f, rule_match::DST_PORTS)
        & (p.no_ports | outside(p.dport, r.dst_port_lo, r.dst_port_hi));
    diff |= mask_if(f, rule_match::ICMP_TYPE) & u32::from(r.icmp_type ^ p.icmp_type);
    diff |= mask_if(f, rule_match::ICMP_CODE) & u32::from(r.icmp_code ^ p.icmp_code);
    if diff != 0 {
        return false;
    }
    if f & rule_match::NOT_PROTOCOL != 0 && r.protocol == p.protocol {
        return false;
    }
    if f & rule_match::NOT_ICMP_TYPE != 0
        && p.icmp_type == r.icmp_type
        && (f & rule_match::NOT_ICMP_CODE == 0 || p.icmp_code == r.icmp_code)
    {
        return false;
    }
    true
}

/// Counts and reports a denied packet; returns `DENY`, or `ALLOW` in
/// audit mode (reported as `verdict::AUDIT`).
#[inline(always)]
fn deny(w: &mut Walk, d: &Decision) -> u8 {
    w.verdict = d.verdict;
    w.reason = d.reason;
    w.policy_id = d.policy_id;
    w.rule_index = d.rule_index;
    moat_report(w) as u8
}

/// The denial of the packet in `w` (its decision fields): counted under
/// its reason, reported, and in audit mode let through.
///
/// Verifier note: a global function, checked once on its own. Inlined, the
/// event path (rate limit, ring buffer) was verified again on every path
/// to a deny, and the program passed the 1M-instruction budget.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_report(w: *mut Walk) -> u32 {
    if w.is_null() {
        return verdict::DENY as u32;
    }
    // SAFETY: non-null, and callers pass the live per-CPU `Walk`.
    let w = unsafe { &mut *w };
    let c = match w.reason {
        reason::RULE => counter::RULE_DENIED,
        reason::END_OF_POLICIES => counter::END_OF_POLICIES_DENIED,
        reason::NO_PROFILE => counter::NO_PROFILE_DENIED,
        reason::UNPARSABLE => counter::UNPARSABLE_DENIED,
        reason::FRAGMENT_UNKNOWN => counter::FRAGMENT_DENIED,
        reason::VLAN_DEPTH => counter::VLAN_DEPTH_DENIED,
        _ => counter::CONNTRACK_INVALID_DENIED,
    };
    count(w.direction, c);
    let audit = w.audit != 0;
    let reported = Decision {
        verdict: if audit { verdict::AUDIT } else { verdict::DENY },
        reason: w.reason,
        policy_id: w.policy_id,
        rule_index: w.rule_index,
    };
    emit(w, &reported);
    if audit {
        count(w.direction, counter::AUDIT_PASSED);
        verdict::ALLOW as u32
    } else {
        verdict::DENY as u32
    }
}

/// Refills `bucket` (`per_second` events a second, at most `burst`) for
/// the time since its last packet and takes one event's token if it has
/// one.
#[inline(always)]
fn take_token(bucket: &mut EventBucket, per_second: u32, burst: u32, now: u64) -> bool {
    let full = burst as u64 * 1000;
    let elapsed = now.saturating_sub(bucket.last_ns);
    // Refill: `per_second` events per 1e6 us, in thousandths. Capping the
    // elapsed time at 2^32 us (71 minutes, past any bucket's refill) keeps
    // the product within 64 bits (BPF has no 128-bit multiply).
    let micros = core::cmp::min(elapsed / 1000, u32::MAX as u64);
    let refill = micros * per_second as u64 / 1000;
    let tokens = core::cmp::min(full, bucket.milli_tokens.saturating_add(refill));
    bucket.last_ns = now;
    if tokens < 1000 {
        bucket.milli_tokens = tokens;
        return false;
    }
    bucket.milli_tokens = tokens - 1000;
    true
}

/// Whether the packet's source may cause another event now (its token
/// bucket has one, and so has the bucket all sources share); takes them.
/// Counts a suppression when not.
#[inline(always)]
fn may_emit(w: &Walk) -> bool {
    let Some(rate) = EVENT_RATE.get(0) else {
        return true;
    };
    if rate.per_second == 0 {
        return true;
    }
    // Coarse time (a tick's resolution): the refill counts whole
    // microseconds since the bucket's last packet, so with a fine clock a
    // flood (a packet every few hundred ns) would never refill it.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !source_token(w, rate.per_second, rate.burst, now) {
        count(w.direction, counter::EVENTS_SUPPRESSED);
        return false;
    }
    if rate.global_per_second == 0 {
        return true;
    }
    let Some(global) = EVENT_GLOBAL.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a valid pointer into the map value. CPUs race on it: the
    // bound may be passed by a token per CPU at a refill, but every event
    // is still counted once, as emitted, suppressed or lost.
    if !take_token(
        unsafe { &mut *global },
        rate.global_per_second,
        rate.global_burst,
        now,
    ) {
        count(w.direction, counter::EVENTS_SUPPRESSED);
        return false;
    }
    true
}

/// Takes a token from the packet's source's bucket (a new source starts
/// with a full one).
#[inline(always)]
fn source_token(w: &Walk, per_second: u32, burst: u32, now: u64) -> bool {
    // SAFETY: same size, every bit pattern valid.
    let src = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w.pkt.src) };
    let full = burst as u64 * 1000;
    let Some(bucket) = EVENT_BUCKETS.get_ptr_mut(src) else {
        if full < 1000 {
            return false;
        }
        // A new source starts with a full bucket, less this event.
        let fresh = EventBucket {
            milli_tokens: full - 1000,
            last_ns: now,
        };
        // If the insert fails the event still goes out: the limit is for
        // floods, and counting stays exact either way.
        let _ = EVENT_BUCKETS.insert(src, fresh, 0);
        return true;
    };
    // SAFETY: a valid pointer into the map value; races with other CPUs
    // only blur the count of tokens, never the accounting of events.
    take_token(unsafe { &mut *bucket }, per_second, burst, now)
}

/// Writes an event into the ring buffer, field by field (building it on
/// the stack first would cost its size of the 512 bytes the verifier
/// allows).
#[inline(always)]
fn emit(w: &Walk, d: &Decision) {
    if !may_emit(w) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) else {
        count(w.direction, counter::EVENTS_LOST);
        return;
    };
    let p = &w.pkt;
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved record of size_of::<DenyEvent>()
    // bytes; every field is written before submit. Addresses: same size,
    // any bit pattern valid.
    unsafe {
        (*e).timestamp_ns = bpf_ktime_get_ns();
        (*e).src = core::mem::transmute::<[u32; 4], [u8; 16]>(p.src);
        (*e).dst = core::mem::transmute::<[u32; 4], [u8; 16]>(p.dst);
        (*e).policy_id = d.policy_id;
        (*e).rule_index = d.rule_index;
        (*e).ifindex = w.ifindex;
        (*e).generation = w.generation;
        (*e).packet_len = w.packet_len;
        (*e).sport = p.sport;
        (*e).dport = p.dport;
        (*e).direction = w.direction;
        (*e).verdict = d.verdict;
        (*e).reason = d.reason;
        (*e).protocol = p.protocol;
        (*e).ip_version = p.ip_version;
        (*e).icmp_type = p.icmp_type;
        (*e).icmp_code = p.icmp_code;
        (*e).tcp_flags = p.tcp_flags;
        (*e).detail = p.detail;
        (*e)._pad = [0; 4];
    }
    entry.submit(0);
    count(w.direction, counter::EVENTS_EMITTED);
}
