//! Parsing of Ethernet / VLAN / IPv4 / IPv6 / TCP / UDP / SCTP / ICMP.
//!
//! Every read goes through `load`, whose bounds check sits right before the
//! access it guards. Offsets are kept below `MAX_L4_OFFSET` so the verifier
//! can bound `data + offset`.

use core::mem::size_of;

use moat_common::{
    has_ports, ip_proto, HeaderDetail, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, VLAN_TPIDS,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// No header we read starts beyond this offset; a packet whose headers go
/// further is judged unparsable. Keeps offsets bounded for the verifier.
const MAX_L4_OFFSET: usize = 512;

/// IPv6 extension headers we walk.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Where a packet stands in IP fragmentation.
pub const FRAG_NONE: u8 = 0;
/// First fragment: carries the L4 header, more fragments follow.
pub const FRAG_FIRST: u8 = 1;
/// Any later fragment: no L4 header.
pub const FRAG_LATER: u8 = 2;

/// What the parser learned; addresses are IPv4-mapped IPv6 for IPv4.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Packet {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub frag_id: u32,
    /// Host byte order. For ICMP echo-like types: the identifier (sport).
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// 4 or 6 (0 until known).
    pub ip_version: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
    /// `FRAG_*`.
    pub fragment: u8,
    /// What names the datagram's fragments beside the addresses and id:
    /// IPv4's protocol, or the IPv6 Fragment header's next header.
    pub frag_proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_offset: u16,
    /// All ones when the protocol has no ports, else zero (for branch-free
    /// rule matching).
    pub no_ports: u32,
    /// What events report beyond the matched fields.
    pub detail: HeaderDetail,
}

impl Packet {
    pub const fn empty() -> Self {
        Packet {
            src: [0; 4],
            dst: [0; 4],
            frag_id: 0,
            sport: 0,
            dport: 0,
            protocol: 0,
            ip_version: 0,
            icmp_type: 0,
            icmp_code: 0,
            tcp_flags: 0,
            fragment: FRAG_NONE,
            frag_proto: 0,
            l4_offset: 0,
            no_ports: 0,
            detail: HeaderDetail {
                mac: [0; 14],
                ttl: 0,
                tos: 0,
                ip_id: 0,
                ip_len: 0,
                frag_off: 0,
                tcp_window: 0,
                tcp_urgent: 0,
                udp_len: 0,
                icmp_id: 0,
                icmp_seq: 0,
                tcp_reserved: 0,
                _pad: 0,
            },
        }
    }
}

/// Outcome of parsing a frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP (ARP, LLDP, ...): passes.
    NotIp,
    /// An IP packet fully understood.
    Ip,
    /// An IP packet too short or malformed to judge: denied.
    Unparsable,
    /// More VLAN tags than `MAX_VLAN_TAGS`: denied unseen.
    TooManyTags,
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == VLAN_TPIDS[0] || ethertype == VLAN_TPIDS[1] || ethertype == VLAN_TPIDS[2]
}

/// Reads a `T` at `offset`, or `None` when it would pass `data_end`.
#[inline(always)]
pub fn load<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    let start = data + offset;
    if start + size_of::<T>() > data_end {
        return None;
    }
    // SAFETY: [start, start + size_of::<T>()) lies inside the packet, as
    // just checked; the read is unaligned because headers need not be.
    Some(unsafe { core::ptr::read_unaligned(start as *const T) })
}

#[inline(always)]
fn be16(data: usize, data_end: usize, offset: usize) -> Option<u16> {
    load::<[u8; 2]>(data, data_end, offset).map(u16::from_be_bytes)
}

/// IPv4-mapped IPv6 prefix `::ffff:0:0/96`, word 2 in memory order.
#[inline(always)]
pub fn v4_mapped(addr: [u8; 4]) -> [u32; 4] {
    [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(addr),
    ]
}

/// Parses the frame at `[data, data_end)` into `pkt` (left as it was for a
/// frame that is not IP). `outer_tags` VLAN tags were already taken off the
/// data (the skb carries them aside) and count towards `MAX_VLAN_TAGS`.
///
/// Verifier note: kept out of line so the parsed fields reach the caller
/// through memory. Inlined, LLVM carried the IPv4 and IPv6 addresses in
/// registers merged across both branches, spilled them into slots it
/// reused for pointers, and the verifier, following an impossible mix of
/// branches, refused the program ("invalid size of register spill").
#[inline(never)]
pub fn parse(data: usize, data_end: usize, outer_tags: u32, pkt: &mut Packet) -> Parsed {
    let Some(mac) = load::<[u8; 14]>(data, data_end, 0) else {
        // Shorter than an Ethernet header: there is no IP packet to judge.
        return Parsed::NotIp;
    };
    let mut ethertype = u16::from_be_bytes([mac[12], mac[13]]);
    let mut l3 = ETH_HLEN;
    // Stacked tags, any TPID in any order, up to the bound (Linux strips
    // every priority tag and delivers what is inside, so a tag is no
    // reason to stop looking).
    for tag in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) || tag + outer_tags >= MAX_VLAN_TAGS {
            break;
        }
        let Some(inner) = be16(data, data_end, l3 + 2) else {
            // Cut inside a tag: nothing Linux could deliver as IP.
            return Parsed::NotIp;
        };
        ethertype = inner;
        l3 += 4;
    }
    if is_vlan(ethertype) {
        *pkt = Packet::empty();
        pkt.detail.mac = mac;
        return Parsed::TooManyTags;
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Parsed::NotIp;
    }
    // Only IP packets pay for clearing the record.
    *pkt = Packet::empty();
    pkt.detail.mac = mac;
    if ethertype == ETH_P_IP {
        parse_ipv4(data, data_end, l3, pkt)
    } else {
        parse_ipv6(data, data_end, l3, pkt)
    }
}

#[inline(always)]
fn parse_ipv4(data: usize, data_end: usize, l3: usize, pkt: &mut Packet) -> Parsed {
    pkt.ip_version = 4;
    let Some(hdr) = load::<[u8; 20]>(data, data_end, l3) else {
        return Parsed::Unparsable;
    };
    pkt.src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    pkt.dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    pkt.protocol = hdr[9];
    pkt.detail.tos = hdr[1];
    pkt.detail.ip_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    pkt.detail.ip_id = u16::from_be_bytes([hdr[4], hdr[5]]) as u32;
    pkt.detail.frag_off = u16::from_be_bytes([hdr[6], hdr[7]]);
    pkt.detail.ttl = hdr[8];
    if hdr[0] >> 4 != 4 {
        return Parsed::Unparsable;
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Parsed::Unparsable;
    }
    let total_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    // The datagram must hold its own header and fit in the frame (Ethernet
    // padding may follow it).
    if total_len < ihl || data + l3 + total_len > data_end {
        return Parsed::Unparsable;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    pkt.frag_id = u16::from_be_bytes([hdr[4], hdr[5]]) as u32;
    pkt.frag_proto = hdr[9];
    if frag_offset != 0 {
        pkt.fragment = FRAG_LATER;
        return Parsed::Ip;
    }
    if more_fragments {
        pkt.fragment = FRAG_FIRST;
    }
    parse_l4(data, data_end, l3 + ihl, data + l3 + total_len, pkt)
}

#[inline(always)]
fn parse_ipv6(data: usize, data_end: usize, l3: usize, pkt: &mut Packet) -> Parsed {
    pkt.ip_version = 6;
    let Some(hdr) = load::<[u8; 8]>(data, data_end, l3) else {
        return Parsed::Unparsable;
    };
    let (Some(src), Some(dst)) = (
        load::<[u32; 4]>(data, data_end, l3 + 8),
        load::<[u32; 4]>(data, data_end, l3 + 24),
    ) else {
        return Parsed::Unparsable;
    };
    pkt.src = src;
    pkt.dst = dst;
    pkt.protocol = hdr[6];
    pkt.detail.tos = (hdr[0] << 4) | (hdr[1] >> 4);
    pkt.detail.ip_id = u32::from_be_bytes([0, hdr[1] & 0x0f, hdr[2], hdr[3]]);
    pkt.detail.ip_len = u16::from_be_bytes([hdr[4], hdr[5]]).wrapping_add(40);
    pkt.detail.ttl = hdr[7];
    if hdr[0] >> 4 != 6 {
        return Parsed::Unparsable;
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    // A zero payload length announces a jumbogram, which no link here carries.
    if payload_len == 0 && pkt.protocol != 59 {
        return Parsed::Unparsable;
    }
    let end = data + l3 + 40 + payload_len;
    if end > data_end {
        return Parsed::Unparsable;
    }
    let mut next = pkt.protocol;
    let mut off = l3 + 40;
    // Up to MAX_IPV6_EXT_HEADERS extension headers, then the L4 header.
    for walked in 0..=MAX_IPV6_EXT_HEADERS {
        let is_ext = matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        );
        if !is_ext {
            pkt.protocol = next;
            return parse_l4(data, data_end, off, end, pkt);
        }
        if walked == MAX_IPV6_EXT_HEADERS {
            break;
        }
        if next == NEXTHDR_FRAGMENT {
            let Some(ext) = load::<[u8; 8]>(data, data_end, off) else {
                return Parsed::Unparsable;
            };
            next = ext[0];
            off += 8;
            let frag = u16::from_be_bytes([ext[2], ext[3]]);
            pkt.frag_id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
            // Later fragments may start with extension headers of the
            // fragmentable part (Destination Options): the datagram is
            // named by what follows the Fragment header, the L4 protocol
            // comes from the first fragment.
            pkt.frag_proto = next;
            if frag & 0xfff8 != 0 {
                pkt.protocol = next;
                pkt.fragment = FRAG_LATER;
                return Parsed::Ip;
            }
            if frag & 1 != 0 {
                pkt.fragment = FRAG_FIRST;
            }
        } else {
            let Some(ext) = load::<[u8; 2]>(data, data_end, off) else {
                return Parsed::Unparsable;
            };
            let len = if next == NEXTHDR_AUTH {
                (ext[1] as usize + 2) * 4
            } else {
                (ext[1] as usize + 1) * 8
            };
            next = ext[0];
            off += len;
        }
        // Checked here so the verifier sees a bounded offset next time round.
        if off > MAX_L4_OFFSET {
            return Parsed::Unparsable;
        }
    }
    // More extension headers than we walk: judged unparsable, not guessed.
    Parsed::Unparsable
}

/// Reads the L4 header at `off`; `l3_end` is where the IP datagram ends.
#[inline(always)]
fn parse_l4(data: usize, data_end: usize, off: usize, l3_end: usize, pkt: &mut Packet) -> Parsed {
    if off > MAX_L4_OFFSET {
        return Parsed::Unparsable;
    }
    pkt.l4_offset = off as u16;
    let proto = pkt.protocol;
    if proto == ip_proto::TCP {
        let Some(tcp) = load::<[u8; 20]>(data, data_end, off) else {
            return Parsed::Unparsable;
        };
        if data + off + 20 > l3_end || (tcp[12] >> 4) < 5 {
            return Parsed::Unparsable;
        }
        pkt.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        pkt.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        pkt.tcp_flags = tcp[13];
    } else if has_ports(proto) {
        // UDP, UDP-Lite (8-byte headers) and SCTP (12-byte common header).
        let need = if proto == ip_proto::SCTP { 12 } else { 8 };
        let Some(ports) = load::<[u8; 8]>(data, data_end, off) else {
            return Parsed::Unparsable;
        };
        if data + off + need > l3_end || data + off + need > data_end {
            return Parsed::Unparsable;
        }
        pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
        pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
    } else if (proto == ip_proto::ICMP && pkt.ip_version == 4)
        || (proto == ip_proto::ICMPV6 && pkt.ip_version == 6)
    {
        let Some(icmp) = load::<[u8; 8]>(data, data_end, off) else {
            return Parsed::Unparsable;
        };
        if data + off + 8 > l3_end {
            return Parsed::Unparsable;
        }
        pkt.icmp_type = icmp[0];
        pkt.icmp_code = icmp[1];
        if crate::conntrack::icmp_is_query(pkt.ip_version, icmp[0]) {
            pkt.sport = u16::from_be_bytes([icmp[4], icmp[5]]);
        }
    }
    Parsed::Ip
}

/// Reads the L4 fields events report but policy does not match on (TCP
/// window, urgent pointer and reserved bits, UDP length, ICMP identifier and
/// sequence) into `pkt.detail`, for a packet `parse` found whole.
///
/// Verifier note: kept out of line and away from `parse`. There, LLVM knew
/// the L4 header lay within the IP datagram, which lies within the frame,
/// dropped the check against `data_end` as redundant, and the verifier
/// (which trusts only that check) refused the access.
#[inline(never)]
pub fn read_l4_detail(data: usize, data_end: usize, pkt: &mut Packet) {
    // The parser keeps l4_offset <= 512; the mask lets the verifier see it.
    let off = pkt.l4_offset as usize & 0x3ff;
    let proto = pkt.protocol;
    if proto == ip_proto::TCP {
        if let Some(tcp) = load::<[u8; 20]>(data, data_end, off) {
            pkt.detail.tcp_reserved = tcp[12] & 0x0f;
            pkt.detail.tcp_window = u16::from_be_bytes([tcp[14], tcp[15]]);
            pkt.detail.tcp_urgent = u16::from_be_bytes([tcp[18], tcp[19]]);
        }
    } else if let Some(h) = load::<[u8; 8]>(data, data_end, off) {
        if proto == ip_proto::UDP || proto == ip_proto::UDPLITE {
            pkt.detail.udp_len = u16::from_be_bytes([h[4], h[5]]);
        } else if proto == ip_proto::ICMP || proto == ip_proto::ICMPV6 {
            pkt.detail.icmp_id = u16::from_be_bytes([h[4], h[5]]);
            pkt.detail.icmp_seq = u16::from_be_bytes([h[6], h[7]]);
        }
    }
}
