//! Connections open before moat attaches (ssh sessions, the agent's own
//! API watch, flows kube-proxy forwards) are tracked as established before
//! the programs attach, so attaching cuts none of them.
//!
//! Two sources, both of this network namespace: the host's established
//! TCP sockets (/proc/net/tcp, tcp6), always there; and Linux connection
//! tracking (/proc/net/nf_conntrack), present on a Kubernetes worker
//! (kube-proxy's rules use it) and the only one that knows UDP flows and
//! connections forwarded through the node. From conntrack moat takes TCP
//! and SCTP connections in state ESTABLISHED and UDP flows that have seen
//! a reply, each under both its original and its reply tuple (they differ
//! when the flow is NATed: a NodePort connection arrives on the original,
//! a masqueraded one returns on the reply), in both orientations. ICMP
//! and other protocols are not taken: their flows are short-lived, and a
//! new request goes through policy.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use moat_common::ip_proto;

/// A flow to track as established, in one orientation (the dataplane
/// writes both).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub protocol: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// Where Linux connection tracking lists its entries.
pub const NF_CONNTRACK: &str = "/proc/net/nf_conntrack";

/// The flows Linux connection tracking holds as established, or `None`
/// when this kernel or namespace has no /proc/net/nf_conntrack.
pub fn kernel_conntrack() -> Result<Option<Vec<Flow>>> {
    match std::fs::read_to_string(NF_CONNTRACK) {
        Ok(text) => parse_nf_conntrack(&text)
            .map(Some)
            .with_context(|| format!("parsing {NF_CONNTRACK}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {NF_CONNTRACK}")),
    }
}

/// The established entries of /proc/net/nf_conntrack, each as its
/// original tuple and, when NAT makes it differ from the original
/// reversed, its reply tuple. A line of another protocol, or not established, is skipped; a
/// line of TCP, UDP or SCTP whose tuples do not parse is an error naming
/// it.
pub fn parse_nf_conntrack(text: &str) -> Result<Vec<Flow>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // "ipv4 2 tcp 6 431999 ESTABLISHED src=.. dst=.. sport=.. dport=..
        // [UNREPLIED] src=.. dst=.. sport=.. dport=.. [ASSURED] mark=0 ..."
        let Some(protocol) = words.get(3).and_then(|p| p.parse::<u8>().ok()) else {
            continue;
        };
        let established = match protocol {
            ip_proto::TCP | ip_proto::SCTP => words.get(5) == Some(&"ESTABLISHED"),
            ip_proto::UDP => !words.contains(&"[UNREPLIED]"),
            _ => continue,
        };
        if !established {
            continue;
        }
        let tuples = tuples(&words[4..]).with_context(|| format!("line {}: {line:?}", n + 1))?;
        let original = tuples[0];
        for (i, (src, sport, dst, dport)) in tuples.into_iter().enumerate() {
            // A reply tuple that is the original reversed (no NAT) names
            // the same connection.
            if i == 1 && (dst, dport, src, sport) == original {
                continue;
            }
            if src.is_loopback() || dst.is_loopback() {
                continue;
            }
            let flow = Flow {
                protocol,
                src,
                sport,
                dst,
                dport,
            };
            if !out.contains(&flow) {
                out.push(flow);
            }
        }
    }
    Ok(out)
}

type Tuple = (IpAddr, u16, IpAddr, u16);

/// The original and reply tuples of a conntrack line (its words after the
/// protocol number).
fn tuples(words: &[&str]) -> Result<Vec<Tuple>> {
    let mut out = Vec::new();
    let (mut src, mut dst, mut sport) = (None, None, None);
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "src" => {
                src = Some(
                    value
                        .parse::<IpAddr>()
                        .with_context(|| format!("src={value}"))?,
                )
            }
            "dst" => {
                dst = Some(
                    value
                        .parse::<IpAddr>()
                        .with_context(|| format!("dst={value}"))?,
                )
            }
            "sport" => {
                sport = Some(
                    value
                        .parse::<u16>()
                        .with_context(|| format!("sport={value}"))?,
                )
            }
            "dport" => {
                let dport = value
                    .parse::<u16>()
                    .with_context(|| format!("dport={value}"))?;
                let (Some(s), Some(d), Some(sp)) = (src.take(), dst.take(), sport.take()) else {
                    anyhow::bail!("dport={value} without src, dst and sport before it");
                };
                out.push((s, sp, d, dport));
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        out.len() == 2,
        "{} tuples where an entry has 2 (original and reply)",
        out.len()
    );
    Ok(out)
}

/// The host's established TCP connections (its own sockets in this network
/// namespace, from /proc/net/tcp and tcp6), loopback excepted.
pub fn host_sockets() -> Result<Vec<Flow>> {
    let mut out = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // No IPv6 in this kernel: no IPv6 sockets.
            Err(e) if v6 && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        out.extend(parse_proc_net_tcp(&text, v6).with_context(|| format!("parsing {path}"))?);
    }
    Ok(out)
}

/// The ESTABLISHED entries of a /proc/net/tcp (or tcp6) table.
pub fn parse_proc_net_tcp(text: &str, v6: bool) -> Result<Vec<Flow>> {
    // Addresses are the kernel's words printed in host byte order.
    fn addr(hex: &str, v6: bool) -> Result<std::net::IpAddr> {
        let word = |i: usize| -> Result<[u8; 4]> {
            let w = hex.get(i * 8..i * 8 + 8).context("short address")?;
            Ok(u32::from_str_radix(w, 16)?.to_ne_bytes())
        };
        if v6 {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let a = std::net::Ipv6Addr::from(b);
            Ok(a.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(a), std::net::IpAddr::V4))
        } else {
            Ok(std::net::IpAddr::V4(std::net::Ipv4Addr::from(word(0)?)))
        }
    }
    fn endpoint(s: &str, v6: bool) -> Result<(std::net::IpAddr, u16)> {
        let (a, p) = s
            .split_once(':')
            .with_context(|| format!("no port in {s:?}"))?;
        Ok((addr(a, v6)?, u16::from_str_radix(p, 16)?))
    }
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, local, remote, state, ..] = fields.as_slice() else {
            continue;
        };
        if *state != "01" {
            continue; // only ESTABLISHED
        }
        let (l, lp) = endpoint(local, v6)?;
        let (r, rp) = endpoint(remote, v6)?;
        if l.is_loopback() || r.is_loopback() {
            continue;
        }
        out.push(Flow {
            protocol: ip_proto::TCP,
            src: r,
            sport: rp,
            dst: l,
            dport: lp,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(protocol: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        Flow {
            protocol,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        flow(ip_proto::TCP, src, sport, dst, dport)
    }

    #[test]
    fn nf_conntrack_established_entries_under_both_tuples() {
        let text = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.1.2 dst=198.18.1.1 sport=50000 dport=22 src=198.18.1.1 dst=198.18.1.2 sport=22 dport=50000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 117 SYN_SENT src=198.18.1.1 dst=198.18.1.9 sport=40000 dport=443 [UNREPLIED] src=198.18.1.9 dst=198.18.1.1 sport=443 dport=40000 mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=198.18.1.2 dst=198.18.1.1 sport=5353 dport=30053 src=10.1.0.5 dst=198.18.1.2 sport=53 dport=5353 mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=198.18.1.1 dst=198.18.1.7 sport=4000 dport=53 [UNREPLIED] src=198.18.1.7 dst=198.18.1.1 sport=53 dport=4000 mark=0 zone=0 use=2
ipv4     2 icmp     1 29 src=198.18.1.2 dst=198.18.1.1 type=8 code=0 id=7 src=198.18.1.1 dst=198.18.1.2 type=0 code=0 id=7 mark=0 zone=0 use=2
ipv4     2 tcp      6 86399 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=1 dport=2 src=127.0.0.1 dst=127.0.0.1 sport=2 dport=1 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 431999 ESTABLISHED src=2001:0db8:0000:0000:0000:0000:0000:0002 dst=2001:0db8:0000:0000:0000:0000:0000:0001 sport=50001 dport=22 src=2001:0db8:0000:0000:0000:0000:0000:0001 dst=2001:0db8:0000:0000:0000:0000:0000:0002 sport=22 dport=50001 [ASSURED] mark=0 zone=0 use=2
";
        assert_eq!(
            parse_nf_conntrack(text).unwrap(),
            vec![
                tcp("198.18.1.2", 50000, "198.18.1.1", 22),
                // DNAT (a NodePort to a pod): the reply tuple differs.
                flow(ip_proto::UDP, "198.18.1.2", 5353, "198.18.1.1", 30053),
                flow(ip_proto::UDP, "10.1.0.5", 53, "198.18.1.2", 5353),
                tcp("2001:db8::2", 50001, "2001:db8::1", 22),
            ]
        );
        let err = parse_nf_conntrack(
            "ipv4 2 udp 17 29 src=198.18.1.2 dst=nowhere sport=1 dport=2 src=198.18.1.1 dst=198.18.1.2 sport=2 dport=1\n",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("line 1") && format!("{err:#}").contains("dst=nowhere"),
            "{err:#}"
        );
        let err = parse_nf_conntrack(
            "ipv4 2 tcp 6 1 ESTABLISHED src=198.18.1.2 dst=198.18.1.1 sport=1 dport=2\n",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("1 tuples"), "{err:#}");
    }

    #[test]
    fn proc_net_tcp_established_entries() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 010112C6:0016 020112C6:D2F0 01 00000000:00000000 02:0008F5C4 00000000     0        0 2 4 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
        let flows = parse_proc_net_tcp(v4, false).unwrap();
        assert_eq!(flows, vec![tcp("198.18.1.2", 0xd2f0, "198.18.1.1", 22)]);
        let v6 =
            "  sl  local_address                         remote_address                        st
   0: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:C350 01 0
   1: 0000000000000000FFFF0000010112C6:01BB 0000000000000000FFFF0000020112C6:C351 01 0
";
        let flows = parse_proc_net_tcp(v6, true).unwrap();
        assert_eq!(
            flows,
            vec![
                tcp("2001:db8::2", 50000, "2001:db8::1", 22),
                tcp("198.18.1.2", 50001, "198.18.1.1", 443),
            ]
        );
        assert!(parse_proc_net_tcp("h\n 0: zz:0016 00:00 01", false).is_err());
    }
}
