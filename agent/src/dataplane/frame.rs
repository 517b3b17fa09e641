//! Building Ethernet frames for tests, benchmarks and `BPF_PROG_TEST_RUN`.

use std::net::IpAddr;

/// The transport part of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 (by the address family). `rest` is bytes 4..8.
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
    },
    /// An ICMP error quoting the start of `quoted` (an IP packet, no
    /// Ethernet header).
    IcmpError {
        icmp_type: u8,
        code: u8,
        quoted: Box<Packet>,
    },
    /// Any other IP protocol, with `len` payload bytes.
    Other {
        protocol: u8,
        len: usize,
    },
}

/// IP fragmentation of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragmentation {
    /// Offset in 8-byte units.
    pub offset: u16,
    pub more: bool,
    pub id: u32,
}

/// An IP packet to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// Bytes after the transport header.
    pub payload: usize,
    pub ttl: u8,
    /// 802.1Q tags in front of the IP header.
    pub vlans: u8,
    /// IPv4: 4-byte words of options (NOPs + EOL), 0-10.
    pub ipv4_option_words: u8,
    /// IPv6: destination-options extension headers before the transport.
    pub ipv6_ext_headers: u8,
    pub fragment: Option<Fragmentation>,
}

/// The MAC the frames are addressed to and from.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        Packet {
            src,
            dst,
            transport,
            payload: 0,
            ttl: 64,
            vlans: 0,
            ipv4_option_words: 0,
            ipv6_ext_headers: 0,
            fragment: None,
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Packet::new(
            ip(src),
            ip(dst),
            Transport::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Packet::new(ip(src), ip(dst), Transport::Udp { sport, dport })
    }

    pub fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8) -> Self {
        Packet::new(
            ip(src),
            ip(dst),
            Transport::Icmp {
                icmp_type,
                code,
                rest: [0x12, 0x34, 0, 1],
            },
        )
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&DST_MAC);
        f.extend_from_slice(&SRC_MAC);
        for _ in 0..self.vlans {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&100u16.to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&self.ip_bytes());
        f
    }

    fn protocol(&self) -> u8 {
        match &self.transport {
            Transport::Tcp { .. } => 6,
            Transport::Udp { .. } => 17,
            Transport::Sctp { .. } => 132,
            Transport::Icmp { .. } | Transport::IcmpError { .. } => {
                if self.src.is_ipv4() {
                    1
                } else {
                    58
                }
            }
            Transport::Other { protocol, .. } => *protocol,
        }
    }

    fn transport_bytes(&self) -> Vec<u8> {
        let mut t = Vec::new();
        match &self.transport {
            Transport::Tcp {
                sport,
                dport,
                flags,
            } => {
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&1u32.to_be_bytes()); // seq
                t.extend_from_slice(&0u32.to_be_bytes()); // ack
                t.push(5 << 4);
                t.push(*flags);
                t.extend_from_slice(&29200u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            Transport::Udp { sport, dport } => {
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                t.extend_from_slice(&[0, 0]);
            }
            Transport::Sctp { sport, dport } => {
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&[0; 8]);
            }
            Transport::Icmp {
                icmp_type,
                code,
                rest,
            } => {
                t.extend_from_slice(&[*icmp_type, *code, 0, 0]);
                t.extend_from_slice(rest);
            }
            Transport::IcmpError {
                icmp_type,
                code,
                quoted,
            } => {
                t.extend_from_slice(&[*icmp_type, *code, 0, 0, 0, 0, 0, 0]);
                let inner = quoted.ip_bytes();
                t.extend_from_slice(&inner[..inner.len().min(96)]);
            }
            Transport::Other { len, .. } => t.resize(*len, 0),
        }
        t.resize(t.len() + self.payload, 0xab);
        t
    }

    /// The IP packet (no Ethernet header).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let body = self.transport_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let opts = self.ipv4_option_words.min(10) as usize * 4;
                let ihl = 20 + opts;
                let total = ihl + body.len();
                let mut h = vec![0u8; ihl];
                h[0] = 0x40 | (ihl / 4) as u8;
                h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                let (id, frag) = match self.fragment {
                    Some(fr) => (
                        fr.id as u16,
                        (fr.offset & 0x1fff) | if fr.more { 0x2000 } else { 0 },
                    ),
                    None => (0x1234, 0x4000), // DF
                };
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = self.ttl;
                h[9] = self.protocol();
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                for b in &mut h[20..ihl] {
                    *b = 1; // NOP
                }
                if opts > 0 {
                    h[ihl - 1] = 0; // EOL
                }
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(&body);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                let mut next = self.protocol();
                if let Some(fr) = self.fragment {
                    let mut e = vec![next, 0];
                    e.extend_from_slice(
                        &(((fr.offset & 0x1fff) << 3) | u16::from(fr.more)).to_be_bytes(),
                    );
                    e.extend_from_slice(&fr.id.to_be_bytes());
                    ext = e;
                    next = 44;
                }
                for _ in 0..self.ipv6_ext_headers {
                    // Destination options, 8 bytes, PadN.
                    let mut e = vec![next, 0, 1, 4, 0, 0, 0, 0];
                    e.extend_from_slice(&ext);
                    ext = e;
                    next = 60;
                }
                let payload = ext.len() + body.len();
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
                h[6] = next;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&ext);
                h.extend_from_slice(&body);
                h
            }
            _ => panic!("source and destination of one packet must share an address family"),
        }
    }
}

/// Parses an address literal; panics on a bad one (test input).
pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an IP address"))
}

/// The Internet checksum of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request frame (not IP: passes).
pub fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&[198, 18, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[198, 18, 0, 1]);
    f
}
