//! Deny events from the kernel, resolved to names and printed.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
};

use moat_common::{direction, reason, verdict, DenyEvent, NO_POLICY_ID};
use serde::Serialize;

use crate::compile::Compiled;

/// An address as the event carries it (IPv4 mapped into IPv6).
pub fn address(bytes: [u8; 16], ip_version: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match (ip_version, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

/// Name of IP protocol `p` as Calico spells it, or its number.
pub fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        112 => "vrrp".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => format!("proto-{n}"),
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::RULE => "rule",
        reason::END_OF_POLICIES => "end-of-policies",
        reason::NO_PROFILE => "no-profile",
        reason::UNPARSABLE => "unparsable",
        reason::CONNTRACK_INVALID => "conntrack-invalid",
        reason::FRAGMENT_UNKNOWN => "fragment-unknown",
        reason::LOG_RULE => "log-rule",
        reason::TCP_FLAGS_INVALID => "tcp-flags-invalid",
        reason::VLAN_DEPTH => "vlan-depth",
        _ => "unknown",
    }
}

/// An event with every identifier resolved; also the JSON form
/// (`moat agent -o json`): the field names are stable.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ResolvedEvent {
    /// RFC 3339, UTC.
    pub time: String,
    pub iface: String,
    pub direction: String,
    /// "deny", "log", or "audit" (would have been denied; audit mode let it
    /// pass).
    pub verdict: String,
    pub reason: String,
    /// Deciding policy, absent for default deny, parse errors, conntrack.
    pub policy: Option<String>,
    /// Index of the rule in the policy's ingress or egress list.
    pub rule: Option<u32>,
    pub generation: u32,
    pub protocol: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub tcp_flags: Option<String>,
    pub length: u32,
}

/// Resolves names: `iface_name` maps ifindex to a name, `compiled` the
/// policy ids of the generation in force. `wall_offset_ns` turns the
/// kernel's monotonic time into the wall clock.
pub fn resolve(
    e: &DenyEvent,
    iface_name: &dyn Fn(u32) -> String,
    compiled: &Compiled,
    wall_offset_ns: i128,
) -> ResolvedEvent {
    let has_ports = moat_common::has_ports(e.protocol);
    let icmp = matches!((e.ip_version, e.protocol), (4, 1) | (6, 58));
    let policy = (e.policy_id != NO_POLICY_ID).then(|| {
        compiled
            .policy_name(e.policy_id)
            .map(str::to_string)
            .unwrap_or_else(|| format!("policy#{}", e.policy_id))
    });
    let wall = e.timestamp_ns as i128 + wall_offset_ns;
    ResolvedEvent {
        time: rfc3339(wall),
        iface: iface_name(e.ifindex),
        direction: direction::name(e.direction).into(),
        verdict: match e.verdict {
            verdict::LOG => "log",
            verdict::AUDIT => "audit",
            _ => "deny",
        }
        .into(),
        reason: reason_name(e.reason).into(),
        rule: policy.as_ref().map(|_| e.rule_index),
        policy,
        generation: e.generation,
        protocol: protocol_name(e.protocol),
        src: address(e.src, e.ip_version),
        dst: address(e.dst, e.ip_version),
        sport: has_ports.then_some(e.sport),
        dport: has_ports.then_some(e.dport),
        icmp_type: icmp.then_some(e.icmp_type),
        icmp_code: icmp.then_some(e.icmp_code),
        tcp_flags: (e.protocol == 6).then(|| tcp_flags(e.tcp_flags)),
        length: e.packet_len,
    }
}

/// "SYN", "SYN,ACK", ...; "none" for no flag.
pub fn tcp_flags(f: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    let set: Vec<&str> = NAMES
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join(",")
    }
}

fn endpoint(addr: IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

impl ResolvedEvent {
    /// The packet in `moat check`'s grammar (`tcp SRC:PORT -> DST:PORT
    /// flags SYN`, `icmp SRC -> DST type 8 code 0`, `proto N SRC -> DST`).
    pub fn packet_spec(&self) -> String {
        match self.protocol.as_str() {
            "tcp" | "udp" | "sctp" => {
                let mut s = format!(
                    "{} {} -> {}",
                    self.protocol,
                    endpoint(self.src, self.sport),
                    endpoint(self.dst, self.dport)
                );
                if let Some(f) = &self.tcp_flags {
                    s.push_str(&format!(" flags {f}"));
                }
                s
            }
            "icmp" | "icmpv6" => format!(
                "{} {} -> {} type {} code {}",
                self.protocol,
                self.src,
                self.dst,
                self.icmp_type.unwrap_or(0),
                self.icmp_code.unwrap_or(0)
            ),
            _ => format!(
                "proto {} {} -> {}",
                crate::events::hub::protocol_number(&self.protocol).unwrap_or(0),
                self.src,
                self.dst
            ),
        }
    }

    /// One line: time, interface, direction, verdict, protocol, addresses
    /// and ports, then what decided.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} {:<6} {:<7} {:<4} {:<6} {} -> {}",
            self.time,
            self.iface,
            self.direction,
            self.verdict.to_uppercase(),
            self.protocol,
            endpoint(self.src, self.sport),
            endpoint(self.dst, self.dport),
        );
        if let (Some(t), Some(c)) = (self.icmp_type, self.icmp_code) {
            let _ = write!(s, " type {t} code {c}");
        }
        if let Some(f) = &self.tcp_flags {
            let _ = write!(s, " [{f}]");
        }
        match (&self.policy, self.rule) {
            (Some(p), Some(r)) => {
                let _ = write!(s, " by {p} rule {r}");
            }
            _ => {
                let _ = write!(s, " by {}", self.reason);
            }
        }
        let _ = write!(s, " (len {}, gen {})", self.length, self.generation);
        s
    }
}

/// Formats nanoseconds since the Unix epoch as RFC 3339 UTC with
/// milliseconds.
pub fn rfc3339(ns: i128) -> String {
    let secs = ns.div_euclid(1_000_000_000) as i64;
    let millis = (ns.rem_euclid(1_000_000_000) / 1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Nanoseconds to add to a `bpf_ktime_get_ns` value to get Unix time.
pub fn monotonic_to_wall_offset() -> i128 {
    let now = |clock| {
        nix::time::clock_gettime(clock)
            .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
            .unwrap_or(0)
    };
    now(nix::time::ClockId::CLOCK_REALTIME) - now(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// `e` as the kernel's LOG target prints it (`iptables -j LOG
/// --log-prefix PREFIX`, as Calico's `log-denied-packets` uses it), field
/// for field: `IN=`/`OUT=`, the MAC header on ingress, the IP header
/// fields, then the transport's. The addresses are the ones that arrived
/// (before any DNAT). An ICMP error's quoted packet, which the kernel
/// prints in brackets, is not carried by events and not printed.
pub fn iptables_line(e: &DenyEvent, iface: &str, prefix: &str) -> String {
    let d = &e.detail;
    let mut s = String::from(prefix);
    if e.direction == direction::INGRESS {
        let _ = write!(s, "IN={iface} OUT= MAC=");
        let mac: Vec<String> = d.mac.iter().map(|b| format!("{b:02x}")).collect();
        let _ = write!(s, "{} ", mac.join(":"));
    } else {
        let _ = write!(s, "IN= OUT={iface} ");
    }
    let later_fragment = if e.ip_version == 6 {
        let full = |a: [u8; 16]| {
            a.chunks(2)
                .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
                .collect::<Vec<_>>()
                .join(":")
        };
        let _ = write!(
            s,
            "SRC={} DST={} LEN={} TC={} HOPLIMIT={} FLOWLBL={} ",
            full(e.src),
            full(e.dst),
            d.ip_len,
            d.tos,
            d.ttl,
            d.ip_id
        );
        false
    } else {
        let _ = write!(
            s,
            "SRC={} DST={} LEN={} TOS=0x{:02X} PREC=0x{:02X} TTL={} ID={} ",
            address(e.src, 4),
            address(e.dst, 4),
            d.ip_len,
            d.tos & 0x1e,
            d.tos & 0xe0,
            d.ttl,
            d.ip_id
        );
        for (bit, name) in [(0x8000, "CE"), (0x4000, "DF"), (0x2000, "MF")] {
            if d.frag_off & bit != 0 {
                let _ = write!(s, "{name} ");
            }
        }
        let offset = d.frag_off & 0x1fff;
        if offset != 0 {
            let _ = write!(s, "FRAG:{offset} ");
        }
        offset != 0
    };
    match (e.protocol, e.ip_version) {
        (6, _) => {
            s.push_str("PROTO=TCP ");
            if !later_fragment {
                let _ = write!(
                    s,
                    "SPT={} DPT={} WINDOW={} RES=0x{:02x} ",
                    e.sport,
                    e.dport,
                    d.tcp_window,
                    d.tcp_reserved << 2
                );
                for (bit, name) in [
                    (0x80, "CWR"),
                    (0x40, "ECE"),
                    (0x20, "URG"),
                    (0x10, "ACK"),
                    (0x08, "PSH"),
                    (0x04, "RST"),
                    (0x02, "SYN"),
                    (0x01, "FIN"),
                ] {
                    if e.tcp_flags & bit != 0 {
                        let _ = write!(s, "{name} ");
                    }
                }
                let _ = write!(s, "URGP={} ", d.tcp_urgent);
            }
        }
        (17 | 136, _) => {
            s.push_str(if e.protocol == 17 {
                "PROTO=UDP "
            } else {
                "PROTO=UDPLITE "
            });
            if !later_fragment {
                let _ = write!(s, "SPT={} DPT={} LEN={} ", e.sport, e.dport, d.udp_len);
            }
        }
        (1, 4) => {
            s.push_str("PROTO=ICMP ");
            if !later_fragment {
                let _ = write!(s, "TYPE={} CODE={} ", e.icmp_type, e.icmp_code);
                if matches!(e.icmp_type, 0 | 8) {
                    let _ = write!(s, "ID={} SEQ={} ", d.icmp_id, d.icmp_seq);
                }
            }
        }
        (58, 6) => {
            let _ = write!(s, "PROTO=ICMPv6 TYPE={} CODE={} ", e.icmp_type, e.icmp_code);
            if matches!(e.icmp_type, 128 | 129) {
                let _ = write!(s, "ID={} SEQ={} ", d.icmp_id, d.icmp_seq);
            }
        }
        (p, _) => {
            let _ = write!(s, "PROTO={p} ");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123_000_000), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339(1_795_392_000_000_000_000),
            "2026-11-23T00:00:00.000Z"
        );
    }

    #[test]
    fn tcp_flag_names() {
        assert_eq!(tcp_flags(0x02), "SYN");
        assert_eq!(tcp_flags(0x12), "SYN,ACK");
        assert_eq!(tcp_flags(0), "none");
    }
}
