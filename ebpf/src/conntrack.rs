//! Connection tracking of our own, modelled on Linux nf_conntrack.
//!
//! An allowed packet of a new flow inserts both orientations of its 5-tuple
//! into `CT_PENDING`; a later packet that finds its orientation there or in
//! `CONNTRACK` is ESTABLISHED and skips policy. The first packet of the
//! reply orientation confirms the connection: both orientations move to
//! `CONNTRACK`. So a flood of connections nobody answers (spoofed SYNs to
//! an allowed port) churns `CT_PENDING` only and never evicts a confirmed
//! connection (Linux's early drop of unassured entries, by construction).
//! ICMP errors are RELATED when the packet they quote is tracked. What Linux
//! calls INVALID (an unsolicited reply, an ICMP error about nothing, a TCP
//! flag combination no stack sends) is reported to the caller.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use moat_common::{counter, flow_timeout, ip_proto, FlowKey, FlowState, FLOW_CLOSING, FLOW_REPLY};

use crate::{
    maps::{count, CONNTRACK, CT_PENDING},
    packet::{load, v4_mapped, Packet},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

/// How connection tracking sees an ICMP message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IcmpClass {
    /// A request that may open a flow (echo, timestamp, info, mask).
    Query,
    /// A reply: valid only for a tracked request.
    Reply,
    /// An error quoting another packet: RELATED to it, or INVALID.
    Error,
    /// Neighbour discovery and MLD: Linux leaves them untracked.
    Untracked,
    /// Anything else: Linux refuses to track it, so it is INVALID.
    Invalid,
}

/// Class of ICMP (v4) or ICMPv6 (v6) message `icmp_type`.
#[inline(always)]
pub fn icmp_class(ip_version: u8, icmp_type: u8) -> IcmpClass {
    if ip_version == 4 {
        match icmp_type {
            8 | 13 | 15 | 17 => IcmpClass::Query,
            0 | 14 | 16 | 18 => IcmpClass::Reply,
            3 | 4 | 5 | 11 | 12 => IcmpClass::Error,
            _ => IcmpClass::Invalid,
        }
    } else {
        match icmp_type {
            128 | 139 => IcmpClass::Query,
            129 | 140 => IcmpClass::Reply,
            1..=4 => IcmpClass::Error,
            130..=137 | 143 => IcmpClass::Untracked,
            _ => IcmpClass::Invalid,
        }
    }
}

/// Whether `icmp_type` carries an identifier that names its flow.
#[inline(always)]
pub fn icmp_is_query(ip_version: u8, icmp_type: u8) -> bool {
    matches!(
        icmp_class(ip_version, icmp_type),
        IcmpClass::Query | IcmpClass::Reply
    )
}

/// The request type a query or reply belongs to, so both share a flow key.
#[inline(always)]
fn icmp_query_kind(ip_version: u8, icmp_type: u8) -> u16 {
    let request = match (ip_version, icmp_type) {
        (4, 0) => 8,
        (4, 14) => 13,
        (4, 16) => 15,
        (4, 18) => 17,
        (6, 129) => 128,
        (6, 140) => 139,
        _ => icmp_type,
    };
    request as u16
}

/// Whether Linux conntrack accepts this TCP flag combination (tcp_valid_flags,
/// with PSH, ECE and CWR ignored as it does).
#[inline(always)]
pub fn tcp_flags_valid(flags: u8) -> bool {
    let f = flags & !(TCP_PSH | 0xc0);
    f == TCP_SYN
        || f == TCP_SYN | TCP_URG
        || f == TCP_SYN | TCP_ACK
        || f == TCP_RST
        || f == TCP_RST | TCP_ACK
        || f == TCP_FIN | TCP_ACK
        || f == TCP_FIN | TCP_ACK | TCP_URG
        || f == TCP_ACK
        || f == TCP_ACK | TCP_URG
}

#[inline(always)]
fn is_icmp(pkt: &Packet) -> bool {
    (pkt.protocol == ip_proto::ICMP && pkt.ip_version == 4)
        || (pkt.protocol == ip_proto::ICMPV6 && pkt.ip_version == 6)
}

/// The key under which `pkt`'s own orientation is tracked.
#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    let (sport, dport) = if is_icmp(pkt) {
        (pkt.sport, icmp_query_kind(pkt.ip_version, pkt.icmp_type))
    } else {
        (pkt.sport, pkt.dport)
    };
    FlowKey {
        // SAFETY: [u32; 4] and [u8; 16] have the same size and any bit
        // pattern is valid for both.
        src: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(pkt.src) },
        dst: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(pkt.dst) },
        sport,
        dport,
        protocol: pkt.protocol,
        _pad: [0; 3],
    }
}

/// The key of the opposite orientation of the flow `key` names.
#[inline(always)]
fn reverse(key: &FlowKey, icmp: bool) -> FlowKey {
    let (sport, dport) = if icmp {
        (key.sport, key.dport)
    } else {
        (key.dport, key.sport)
    };
    FlowKey {
        src: key.dst,
        dst: key.src,
        sport,
        dport,
        protocol: key.protocol,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn timeout(protocol: u8, flags: u32) -> u64 {
    if protocol == ip_proto::TCP {
        if flags & FLOW_CLOSING != 0 {
            flow_timeout::TCP_CLOSING
        } else {
            flow_timeout::TCP_ESTABLISHED
        }
    } else if protocol == ip_proto::ICMP || protocol == ip_proto::ICMPV6 {
        flow_timeout::ICMP
    } else {
        flow_timeout::UDP
    }
}

/// Whether `key` names a live tracked flow, confirmed or waiting for its
/// reply; refreshes it when found. With `direction` (not `NO_DIRECTION`), a
/// packet of the reply orientation of a waiting flow confirms it.
///
/// Times are `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE: no clock
/// source read, a tick's resolution, plenty for timeouts of seconds); the
/// agent's seeded entries use CLOCK_MONOTONIC, the same clock.
#[inline(always)]
fn lookup(key: &FlowKey, tcp_flags: u8, direction: u8) -> bool {
    let Some(state) = CONNTRACK.get_ptr_mut(key) else {
        return pending(key, tcp_flags, direction);
    };
    // SAFETY: `get_ptr_mut` returned a valid pointer to the map value; a
    // racing writer can at worst make the timestamp slightly stale.
    let state = unsafe { &mut *state };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let age = now.saturating_sub(state.last_seen_ns);
    if age > timeout(key.protocol, state.flags) {
        let _ = CONNTRACK.remove(key);
        return false;
    }
    if key.protocol == ip_proto::TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        state.flags |= FLOW_CLOSING;
        state.last_seen_ns = now;
        close_other_orientation(key, now);
    } else if age > flow_timeout::REFRESH {
        state.last_seen_ns = now;
    }
    true
}

/// `lookup` without a direction: nothing is confirmed (ICMP errors).
const NO_DIRECTION: u8 = u8::MAX;

/// `lookup` in `CT_PENDING`: an unanswered flow's orientation, confirmed
/// (moved to `CONNTRACK` with its pair) when it is the reply's.
///
/// Verifier note: out of line, checked once instead of on every path
/// through both callers of `lookup`.
#[inline(never)]
fn pending(key: &FlowKey, tcp_flags: u8, direction: u8) -> bool {
    let Some(state) = CT_PENDING.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid pointer to the map value (see `lookup`).
    let state = unsafe { &mut *state };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let limit = core::cmp::min(timeout(key.protocol, state.flags), flow_timeout::UNREPLIED);
    if now.saturating_sub(state.last_seen_ns) > limit {
        let _ = CT_PENDING.remove(key);
        return false;
    }
    let mut flags = state.flags & FLOW_CLOSING;
    if key.protocol == ip_proto::TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= FLOW_CLOSING;
    }
    if state.flags & FLOW_REPLY == 0 || direction == NO_DIRECTION {
        state.flags |= flags;
        state.last_seen_ns = now;
        return true;
    }
    // The reply: the connection is confirmed.
    let icmp = key.protocol == ip_proto::ICMP || key.protocol == ip_proto::ICMPV6;
    let confirmed = FlowState {
        last_seen_ns: now,
        flags,
        _pad: 0,
    };
    let other = reverse(key, icmp);
    // An insert that fails leaves the pair waiting: still judged
    // ESTABLISHED while it waits, and confirmed by the next reply.
    if CONNTRACK.insert(key, confirmed, 0).is_ok() && CONNTRACK.insert(other, confirmed, 0).is_ok()
    {
        let _ = CT_PENDING.remove(key);
        let _ = CT_PENDING.remove(other);
        count(direction, counter::CT_CONFIRMED);
    }
    true
}

/// Marks the opposite orientation of TCP flow `key` closing too, or it
/// would linger for the established timeout.
///
/// Verifier note: out of line. Inlined into `lookup`, this second map
/// lookup doubled the paths through it and the program passed the
/// verifier's 1M-instruction budget.
#[inline(never)]
fn close_other_orientation(key: &FlowKey, now: u64) {
    if let Some(other) = CONNTRACK.get_ptr_mut(reverse(key, false)) {
        // SAFETY: a valid pointer into the map value.
        let other = unsafe { &mut *other };
        other.flags |= FLOW_CLOSING;
        other.last_seen_ns = now;
    }
}

/// Whether `pkt`, seen in `direction`, belongs to a tracked flow
/// (ESTABLISHED); a reply confirms its connection.
#[inline(always)]
pub fn established(pkt: &Packet, direction: u8) -> bool {
    lookup(&flow_key(pkt), pkt.tcp_flags, direction)
}

/// Starts tracking the flow `pkt` (seen in `direction`) opens, in both
/// orientations, as waiting for its reply.
#[inline(always)]
pub fn track(pkt: &Packet, direction: u8) {
    if is_icmp(pkt) && icmp_class(pkt.ip_version, pkt.icmp_type) != IcmpClass::Query {
        return;
    }
    let key = flow_key(pkt);
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let state = FlowState {
        last_seen_ns: now,
        flags: 0,
        _pad: 0,
    };
    let reply = FlowState {
        last_seen_ns: now,
        flags: FLOW_REPLY,
        _pad: 0,
    };
    // A full LRU map evicts the least recently used waiting flow, never a
    // confirmed one, and never fails open; an insert error leaves the flow
    // untracked and its next packet judged.
    let _ = CT_PENDING.insert(key, state, 0);
    let _ = CT_PENDING.insert(reverse(&key, is_icmp(pkt)), reply, 0);
    count(direction, counter::CT_UNCONFIRMED);
}

/// Whether the ICMP error `pkt` quotes a packet of a tracked flow (RELATED).
///
/// Verifier note: kept out of line. Inlined, LLVM shared stack slots
/// between its IPv4 and IPv6 branches and the caller's spilled map pointer,
/// and the verifier, following a path LLVM knows to be impossible, refused
/// the program ("invalid size of register spill").
#[inline(never)]
pub fn related(data: usize, data_end: usize, pkt: &Packet) -> bool {
    // The parser keeps l4_offset <= 512, so the mask changes nothing; it
    // lets the verifier bound the packet pointer (it refuses variable
    // offsets that may pass 0xffff, and LLVM drops a plain comparison).
    let inner_off = (pkt.l4_offset as usize & 0x3ff) + 8;
    let mut inner = Packet::empty();
    inner.ip_version = pkt.ip_version;
    let inner_l4;
    if pkt.ip_version == 4 {
        let Some(hdr) = load::<[u8; 20]>(data, data_end, inner_off) else {
            return false;
        };
        if hdr[0] >> 4 != 4 || hdr[0] & 0x0f < 5 {
            return false;
        }
        inner.src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
        inner.dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
        inner.protocol = hdr[9];
        inner_l4 = inner_off + ((hdr[0] & 0x0f) as usize) * 4;
    } else {
        let Some(hdr) = load::<[u8; 8]>(data, data_end, inner_off) else {
            return false;
        };
        let (Some(src), Some(dst)) = (
            load::<[u32; 4]>(data, data_end, inner_off + 8),
            load::<[u32; 4]>(data, data_end, inner_off + 24),
        ) else {
            return false;
        };
        if hdr[0] >> 4 != 6 {
            return false;
        }
        inner.src = src;
        inner.dst = dst;
        inner.protocol = hdr[6];
        inner_l4 = inner_off + 40;
    }
    // An error quoting a packet whose L4 header it cut off relates to nothing.
    if inner_l4 > 512 {
        return false;
    }
    let Some(l4) = load::<[u8; 8]>(data, data_end, inner_l4) else {
        return false;
    };
    if is_icmp(&inner) {
        inner.icmp_type = l4[0];
        if !icmp_is_query(inner.ip_version, l4[0]) {
            return false;
        }
        inner.sport = u16::from_be_bytes([l4[4], l4[5]]);
    } else if moat_common::has_ports(inner.protocol) {
        inner.sport = u16::from_be_bytes([l4[0], l4[1]]);
        inner.dport = u16::from_be_bytes([l4[2], l4[3]]);
    }
    lookup(&flow_key(&inner), 0, NO_DIRECTION)
}
