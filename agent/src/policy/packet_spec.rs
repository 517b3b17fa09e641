//! The packet grammar moat takes everywhere (`check`, `trace`, filters):
//!
//! ```text
//! tcp|udp|sctp SRC:PORT -> DST:PORT [flags F,F]
//! icmp|icmpv6 SRC -> DST [type T] [code C]
//! proto N SRC -> DST
//! ```
//!
//! IPv6 addresses take brackets when a port follows (`[2001:db8::1]:443`).
//! TCP packets are SYNs unless `flags` says otherwise; ICMP defaults to an
//! echo request.

use std::net::IpAddr;

use crate::policy::reference::{Fields, Fragment};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("packet {text:?}: {message} (expected e.g. 'tcp 198.51.100.7:40000 -> 198.51.100.10:22', 'icmp 2001:db8::1 -> 2001:db8::2 type 128', 'proto 112 10.0.0.1 -> 10.0.0.2')")]
pub struct PacketSpecError {
    pub text: String,
    pub message: String,
}

fn err(text: &str, message: impl Into<String>) -> PacketSpecError {
    PacketSpecError {
        text: text.into(),
        message: message.into(),
    }
}

/// `ADDR:PORT` or `[V6]:PORT`.
fn addr_port(text: &str, s: &str) -> Result<(IpAddr, u16), PacketSpecError> {
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest
            .split_once("]:")
            .ok_or_else(|| err(text, format!("{s:?}: expected [IPV6]:PORT")))?;
        (a, p)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| err(text, format!("{s:?}: expected ADDRESS:PORT")))?
    };
    if addr.contains(':') && !s.starts_with('[') {
        return Err(err(
            text,
            format!("{s:?}: put an IPv6 address in brackets when a port follows"),
        ));
    }
    let addr = addr
        .parse()
        .map_err(|_| err(text, format!("{addr:?} is not an IP address")))?;
    let port = port
        .parse()
        .map_err(|_| err(text, format!("{port:?} is not a port (0-65535)")))?;
    Ok((addr, port))
}

fn addr(text: &str, s: &str) -> Result<IpAddr, PacketSpecError> {
    s.parse()
        .map_err(|_| err(text, format!("{s:?} is not an IP address")))
}

fn tcp_flags(text: &str, s: &str) -> Result<u8, PacketSpecError> {
    let mut flags = 0;
    for f in s.split(',') {
        flags |= match f.to_ascii_uppercase().as_str() {
            "FIN" => 0x01,
            "SYN" => 0x02,
            "RST" => 0x04,
            "PSH" => 0x08,
            "ACK" => 0x10,
            "URG" => 0x20,
            "ECE" => 0x40,
            "CWR" => 0x80,
            "NONE" => 0,
            other => return Err(err(text, format!("{other:?} is not a TCP flag"))),
        };
    }
    Ok(flags)
}

/// Parses a packet description into header fields.
pub fn parse(text: &str) -> Result<Fields, PacketSpecError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let (protocol_word, rest) = words.split_first().ok_or_else(|| err(text, "empty"))?;
    let proto = protocol_word.to_ascii_lowercase();
    let (protocol, rest) = match proto.as_str() {
        "tcp" => (6u8, rest),
        "udp" => (17, rest),
        "sctp" => (132, rest),
        "icmp" => (1, rest),
        "icmpv6" => (58, rest),
        "proto" => {
            let (n, r) = rest
                .split_first()
                .ok_or_else(|| err(text, "proto needs a number"))?;
            let n: u8 = n
                .parse()
                .map_err(|_| err(text, format!("{n:?} is not a protocol number 0-255")))?;
            (n, r)
        }
        other => {
            return Err(err(
                text,
                format!("{other:?} is not tcp, udp, sctp, icmp, icmpv6 or proto N"),
            ))
        }
    };
    let [src, arrow, dst, options @ ..] = rest else {
        return Err(err(text, "expected SRC -> DST"));
    };
    if *arrow != "->" {
        return Err(err(
            text,
            format!("expected '->' between source and destination, found {arrow:?}"),
        ));
    }
    let with_ports = matches!(protocol, 6 | 17 | 132);
    let (src, sport, dst, dport) = if with_ports {
        let (s, sp) = addr_port(text, src)?;
        let (d, dp) = addr_port(text, dst)?;
        (s, sp, d, dp)
    } else {
        (addr(text, src)?, 0, addr(text, dst)?, 0)
    };
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(err(
            text,
            "source and destination must be both IPv4 or both IPv6",
        ));
    }
    let ip_version = if src.is_ipv4() { 4 } else { 6 };
    match (protocol, ip_version) {
        (1, 6) => return Err(err(text, "icmp with IPv6 addresses: use icmpv6")),
        (58, 4) => return Err(err(text, "icmpv6 with IPv4 addresses: use icmp")),
        _ => {}
    }
    let icmp = matches!(protocol, 1 | 58);
    let mut f = Fields {
        ip_version,
        src,
        dst,
        protocol,
        sport,
        dport,
        icmp_type: if protocol == 58 {
            128
        } else if icmp {
            8
        } else {
            0
        },
        icmp_code: 0,
        tcp_flags: if protocol == 6 { 0x02 } else { 0 },
        fragment: Fragment::None,
    };
    let mut opts = options.iter();
    while let Some(key) = opts.next() {
        let value = opts
            .next()
            .ok_or_else(|| err(text, format!("{key:?} needs a value")))?;
        let num = |v: &str| {
            v.parse::<u8>()
                .map_err(|_| err(text, format!("{v:?} is not 0-255")))
        };
        match (*key, icmp, protocol) {
            ("type", true, _) => f.icmp_type = num(value)?,
            ("code", true, _) => f.icmp_code = num(value)?,
            ("flags", _, 6) => f.tcp_flags = tcp_flags(text, value)?,
            _ => {
                return Err(err(
                    text,
                    format!("unexpected {key:?} (type/code go with icmp, flags with tcp)"),
                ))
            }
        }
    }
    if icmp
        && matches!(
            crate::policy::reference::icmp_class(ip_version, f.icmp_type),
            crate::policy::reference::IcmpClass::Query | crate::policy::reference::IcmpClass::Reply
        )
    {
        // The echo identifier, which conntrack keys on; any value will do.
        f.sport = 1;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        let f = parse("tcp 203.0.113.7:40000 -> 198.51.100.10:22").expect("tcp");
        assert_eq!(
            (f.protocol, f.sport, f.dport, f.tcp_flags, f.ip_version),
            (6, 40000, 22, 0x02, 4)
        );
        let f = parse("udp [2001:db8::1]:53 -> [2001:db8::2]:5353").expect("udp6");
        assert_eq!(
            (f.protocol, f.sport, f.dport, f.ip_version),
            (17, 53, 5353, 6)
        );
        let f = parse("icmpv6 2001:db8::1 -> 2001:db8::2 type 135 code 0").expect("icmpv6");
        assert_eq!((f.protocol, f.icmp_type, f.icmp_code), (58, 135, 0));
        let f = parse("icmp 10.0.0.1 -> 10.0.0.2").expect("icmp");
        assert_eq!((f.icmp_type, f.icmp_code), (8, 0));
        let f = parse("proto 112 10.0.0.1 -> 10.0.0.2").expect("vrrp");
        assert_eq!(f.protocol, 112);
        let f = parse("tcp 10.0.0.1:1 -> 10.0.0.2:2 flags SYN,ACK").expect("flags");
        assert_eq!(f.tcp_flags, 0x12);
        for bad in [
            "",
            "tcp 10.0.0.1 -> 10.0.0.2:22",
            "tcp 10.0.0.1:1 10.0.0.2:22",
            "tcp 2001:db8::1:80 -> [2001:db8::2]:80",
            "tcp 10.0.0.1:70000 -> 10.0.0.2:22",
            "udp 10.0.0.1:1 -> [2001:db8::2]:2",
            "icmp 2001:db8::1 -> 2001:db8::2",
            "icmp 10.0.0.1 -> 10.0.0.2 type 300",
            "gre 10.0.0.1 -> 10.0.0.2",
            "tcp 10.0.0.1:1 -> 10.0.0.2:2 type 3",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
