//! Table tests of the loaded programs through `BPF_PROG_TEST_RUN`: every
//! case states the verdict and the reason it expects, and the reference
//! semantics must agree with the kernel on each.

use moat::{
    dataplane::frame::{arp_request, ip, Fragmentation, Packet, Transport},
    events::event,
    policy::reference::{self, DecidedBy, Verdict},
};
use moat_common::{direction, reason, verdict, DenyEvent, NO_POLICY_ID};
use moat_tests::{load_fixture, Kernel, TEST_RUN_IFINDEX};

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;

const WORKER: &str = "198.18.1.1";
const CLIENT: &str = "198.18.1.2";
const WORKER6: &str = "2001:db8:1::1";

/// What a case expects: passed or not, and for a deny its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass,
    Deny(u8),
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, packet: Packet, expect: Expect) -> Case {
    Case {
        name,
        frame: packet.frame(),
        expect,
    }
}

fn with<F: FnOnce(&mut Packet)>(mut p: Packet, f: F) -> Packet {
    f(&mut p);
    p
}

fn public() -> Kernel {
    Kernel::new(load_fixture("public"), "eth1")
}

/// Runs `cases` on ingress, each as the first packet of its flow; checks
/// the kernel, the reference and the deny event.
fn run_ingress(k: &mut Kernel, cases: &[Case]) {
    for c in cases {
        k.forget_flows();
        k.dataplane.drain_events();
        let passed = k.ingress(&c.frame);
        let events: Vec<DenyEvent> = k
            .dataplane
            .drain_events()
            .into_iter()
            .filter(|e| e.verdict == verdict::DENY)
            .collect();
        let got = if passed {
            Expect::Pass
        } else {
            Expect::Deny(events.first().map_or(0, |e| e.reason))
        };
        assert_eq!(got, c.expect, "{}: kernel (events {events:?})", c.name);
        assert_eq!(
            events.len(),
            usize::from(!passed),
            "{}: one deny event per denied packet",
            c.name
        );
        let r = reference::judge(&k.set, k.host_endpoint(), direction::INGRESS, &c.frame);
        let want = match c.expect {
            Expect::Pass => (Verdict::Allow, 0),
            Expect::Deny(why) => (Verdict::Deny, why),
        };
        assert_eq!(
            (r.verdict, r.reason()),
            want,
            "{}: reference says {r:?}",
            c.name
        );
    }
}

#[test]
fn public_interface_ingress() {
    let mut k = public();
    let bigfix = Packet::tcp(CLIENT, 40000, WORKER, 52311, SYN);
    let cases = vec![
        case("ping", Packet::icmp(CLIENT, WORKER, 8, 0), Expect::Pass),
        case(
            "ssh is blocked on the public side",
            Packet::tcp(CLIENT, 40000, WORKER, 22, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case("bigfix tcp", bigfix.clone(), Expect::Pass),
        case(
            "bigfix udp",
            Packet::udp(CLIENT, 40000, WORKER, 52311),
            Expect::Pass,
        ),
        case(
            "bigfix port is tcp/udp only",
            Packet::new(
                ip(CLIENT),
                ip(WORKER),
                Transport::Sctp {
                    sport: 1,
                    dport: 52311,
                },
            ),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "vrrp",
            Packet::new(
                ip(CLIENT),
                ip(WORKER),
                Transport::Other {
                    protocol: 112,
                    len: 20,
                },
            ),
            Expect::Pass,
        ),
        case(
            "unknown protocol",
            Packet::new(
                ip(CLIENT),
                ip(WORKER),
                Transport::Other {
                    protocol: 47,
                    len: 20,
                },
            ),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "management network, any port",
            Packet::tcp("198.19.128.77", 40000, WORKER, 22, SYN),
            Expect::Pass,
        ),
        case(
            "next to the management network",
            Packet::tcp("198.19.129.1", 40000, WORKER, 22, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "watched network denied before bigfix",
            Packet::tcp("198.18.66.7", 40000, WORKER, 52311, SYN),
            Expect::Deny(reason::RULE),
        ),
        case(
            "web client, port 80",
            Packet::tcp("198.18.2.9", 40000, WORKER, 80, SYN),
            Expect::Pass,
        ),
        case(
            "web client, range start",
            Packet::tcp("198.18.2.9", 40000, WORKER, 8000, SYN),
            Expect::Pass,
        ),
        case(
            "web client, range end",
            Packet::tcp("198.18.2.9", 40000, WORKER, 8080, SYN),
            Expect::Pass,
        ),
        case(
            "web client, past the range",
            Packet::tcp("198.18.2.9", 40000, WORKER, 8081, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "web port from elsewhere",
            Packet::tcp(CLIENT, 40000, WORKER, 443, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "web client over udp",
            Packet::udp("198.18.2.9", 40000, WORKER, 443),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "ipv6 web client",
            Packet::tcp("2001:db8:2::5", 40000, WORKER6, 443, SYN),
            Expect::Pass,
        ),
        case(
            "ipv6 other client",
            Packet::tcp("2001:db8:3::5", 40000, WORKER6, 443, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "ipv6 management network",
            Packet::tcp("2001:db8:99:1::5", 40000, WORKER6, 22, SYN),
            Expect::Pass,
        ),
        case(
            "ipv4-mapped source is not the ipv4 management net",
            Packet::tcp("::ffff:198.19.128.77", 40000, WORKER6, 22, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "icmpv6 echo",
            Packet::icmp("2001:db8:5::5", WORKER6, 128, 0),
            Expect::Pass,
        ),
        case(
            "neighbour solicitation (untracked, allowed by allow-icmp)",
            Packet::icmp("2001:db8:5::5", WORKER6, 135, 0),
            Expect::Pass,
        ),
        case(
            "unsolicited echo reply",
            Packet::icmp(CLIENT, WORKER, 0, 0),
            Expect::Deny(reason::CONNTRACK_INVALID),
        ),
        case(
            "unsolicited icmpv6 echo reply",
            Packet::icmp("2001:db8:5::5", WORKER6, 129, 0),
            Expect::Deny(reason::CONNTRACK_INVALID),
        ),
        case(
            "router advertisement v4 (conntrack refuses the type)",
            Packet::icmp(CLIENT, WORKER, 9, 0),
            Expect::Deny(reason::CONNTRACK_INVALID),
        ),
        case(
            "syn+fin",
            Packet::tcp(CLIENT, 40000, WORKER, 52311, SYN | 0x01),
            Expect::Deny(reason::TCP_FLAGS_INVALID),
        ),
        case(
            "no tcp flags",
            Packet::tcp(CLIENT, 40000, WORKER, 52311, 0),
            Expect::Deny(reason::TCP_FLAGS_INVALID),
        ),
        case(
            "mid-flow ack to bigfix (loose pickup)",
            Packet::tcp(CLIENT, 40000, WORKER, 52311, ACK),
            Expect::Pass,
        ),
        case(
            "vlan tagged ssh",
            with(Packet::tcp(CLIENT, 40000, WORKER, 22, SYN), |p| p.vlans = 1),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        case(
            "double tagged bigfix",
            with(bigfix.clone(), |p| p.vlans = 2),
            Expect::Pass,
        ),
        case(
            "ipv4 options",
            with(bigfix.clone(), |p| p.ipv4_option_words = 10),
            Expect::Pass,
        ),
        case(
            "ipv6 extension headers",
            with(Packet::tcp("2001:db8:2::5", 1, WORKER6, 443, SYN), |p| {
                p.ipv6_ext_headers = 6
            }),
            Expect::Pass,
        ),
        case(
            "too many ipv6 extension headers",
            with(Packet::tcp("2001:db8:2::5", 1, WORKER6, 443, SYN), |p| {
                p.ipv6_ext_headers = 7
            }),
            Expect::Deny(reason::UNPARSABLE),
        ),
        case(
            "later fragment, first unseen",
            with(bigfix.clone(), |p| {
                p.fragment = Some(Fragmentation {
                    offset: 3,
                    more: false,
                    id: 7,
                })
            }),
            Expect::Deny(reason::FRAGMENT_UNKNOWN),
        ),
        case(
            "icmp error about nothing",
            Packet::new(
                ip(CLIENT),
                ip(WORKER),
                Transport::IcmpError {
                    icmp_type: 3,
                    code: 3,
                    quoted: Box::new(Packet::udp(WORKER, 5353, CLIENT, 53)),
                },
            ),
            Expect::Deny(reason::CONNTRACK_INVALID),
        ),
    ];
    run_ingress(&mut k, &cases);
}

#[test]
fn non_ip_passes_and_truncated_ip_is_denied_at_every_length() {
    let mut k = public();
    assert!(k.ingress(&arp_request()), "ARP passes");
    assert!(k.egress(&arp_request()), "ARP passes egress");
    let mut lldp = arp_request();
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    assert!(k.ingress(&lldp), "LLDP passes");

    let whole = [
        Packet::tcp(CLIENT, 40000, WORKER, 52311, SYN),
        Packet::udp(CLIENT, 40000, WORKER, 52311),
        Packet::icmp(CLIENT, WORKER, 8, 0),
        with(Packet::tcp(CLIENT, 40000, WORKER, 52311, SYN), |p| {
            p.vlans = 1
        }),
        with(Packet::tcp(CLIENT, 40000, WORKER, 52311, SYN), |p| {
            p.ipv4_option_words = 3
        }),
        Packet::tcp("2001:db8:2::5", 40000, WORKER6, 443, SYN),
        with(
            Packet::tcp("2001:db8:2::5", 40000, WORKER6, 443, SYN),
            |p| p.ipv6_ext_headers = 2,
        ),
        Packet::icmp("2001:db8:5::5", WORKER6, 128, 0),
    ];
    for p in whole {
        let frame = p.frame();
        k.forget_flows();
        assert!(k.ingress(&frame), "{p:?} whole passes");
        let l3 = 14 + 4 * p.vlans as usize;
        // Every cut that leaves the Ethernet header (and VLAN tags) whole
        // but not the IP packet: unparsable, denied, counted, reported.
        for len in l3..frame.len() {
            k.forget_flows();
            k.dataplane.drain_events();
            let cut = &frame[..len];
            assert!(!k.ingress(cut), "{p:?} cut to {len} bytes must be denied");
            let events = k.dataplane.drain_events();
            assert_eq!(events.len(), 1, "{p:?} cut to {len}: one event");
            assert_eq!(events[0].reason, reason::UNPARSABLE, "{p:?} cut to {len}");
            let r = reference::judge(&k.set, k.host_endpoint(), direction::INGRESS, cut);
            assert_eq!(r.by, DecidedBy::Unparsable, "{p:?} cut to {len}: reference");
        }
        // A cut inside the VLAN tags leaves no IP packet to judge.
        for len in 14..l3 {
            assert!(
                k.ingress(&frame[..len]),
                "{p:?} cut to {len} inside the VLAN tags"
            );
        }
    }
    let counters = k.dataplane.counters().expect("counters");
    assert!(counters[0][moat_common::counter::UNPARSABLE_DENIED as usize] > 100);
}

#[test]
fn malformed_headers_are_denied() {
    let mut k = public();
    let good = Packet::tcp(CLIENT, 40000, WORKER, 52311, SYN).frame();
    let mut cases = Vec::new();
    let mut bad = |name: &'static str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = good.clone();
        edit(&mut f);
        cases.push(Case {
            name,
            frame: f,
            expect: Expect::Deny(reason::UNPARSABLE),
        });
    };
    bad("ihl below 5", &|f| f[14] = 0x44);
    bad("ihl past the packet", &|f| f[14] = 0x4f);
    bad("ip version 5 in an ipv4 frame", &|f| f[14] = 0x55);
    bad("total length below the header", &|f| {
        f[16..18].copy_from_slice(&19u16.to_be_bytes())
    });
    bad("total length past the frame", &|f| {
        f[16..18].copy_from_slice(&200u16.to_be_bytes())
    });
    bad("total length cuts the tcp header", &|f| {
        f[16..18].copy_from_slice(&30u16.to_be_bytes())
    });
    bad("tcp data offset below 5", &|f| f[14 + 20 + 12] = 0x40);
    run_ingress(&mut k, &cases);
    // Ethernet padding after the datagram is fine.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 6]);
    k.forget_flows();
    assert!(k.ingress(&padded), "padding after the IP datagram");
}

#[test]
fn deny_and_log_events_name_what_decided() {
    let mut k = public();
    k.dataplane.drain_events();
    assert!(!k.ingress(&Packet::tcp(CLIENT, 40001, WORKER, 22, SYN).frame()));
    assert!(!k.ingress(&Packet::tcp("198.18.66.7", 40002, WORKER, 52311, SYN).frame()));
    let events = k.dataplane.drain_events();
    assert_eq!(events.len(), 3, "{events:?}");

    let ssh = &events[0];
    assert_eq!(
        (ssh.verdict, ssh.reason, ssh.policy_id),
        (verdict::DENY, reason::END_OF_POLICIES, NO_POLICY_ID)
    );
    assert_eq!(
        (ssh.ifindex, ssh.direction, ssh.generation),
        (TEST_RUN_IFINDEX, direction::INGRESS, 1)
    );
    assert_eq!(
        (
            ssh.protocol,
            ssh.sport,
            ssh.dport,
            ssh.tcp_flags,
            ssh.ip_version
        ),
        (6, 40001, 22, SYN, 4)
    );
    assert_eq!(event::address(ssh.src, 4), ip(CLIENT));
    assert_eq!(event::address(ssh.dst, 4), ip(WORKER));
    assert_eq!(ssh.packet_len, 54);

    let (log, deny) = (&events[1], &events[2]);
    assert_eq!((log.verdict, log.reason), (verdict::LOG, reason::LOG_RULE));
    assert_eq!((deny.verdict, deny.reason), (verdict::DENY, reason::RULE));
    assert_eq!(k.compiled.policy_name(log.policy_id), Some("deny-watched"));
    assert_eq!(k.compiled.policy_name(deny.policy_id), Some("deny-watched"));
    assert_eq!((log.rule_index, deny.rule_index), (0, 1));

    let resolved = event::resolve(deny, &|_| "eth1".into(), &k.compiled, 0);
    assert_eq!(resolved.policy.as_deref(), Some("deny-watched"));
    let line = resolved.line();
    assert!(
        line.contains("eth1") && line.contains("ingress") && line.contains("DENY"),
        "{line}"
    );
    assert!(
        line.contains("198.18.66.7:40002 -> 198.18.1.1:52311")
            && line.contains("by deny-watched rule 1"),
        "{line}"
    );
}

#[test]
fn return_traffic_of_allowed_connections_passes() {
    let mut k = public();
    k.forget_flows();
    // Outbound connection (allow-all-outbound), then its SYN-ACK comes in.
    let syn_ack = Packet::tcp("198.18.5.5", 443, WORKER, 50000, SYN_ACK).frame();
    assert!(
        !k.ingress(&syn_ack),
        "an unsolicited SYN-ACK to a closed port is denied"
    );
    assert!(k.egress(&Packet::tcp(WORKER, 50000, "198.18.5.5", 443, SYN).frame()));
    assert!(
        k.ingress(&syn_ack),
        "the reply of an allowed connection passes"
    );
    // Echo: request out, reply in; another identifier is still invalid.
    assert!(k.egress(&Packet::icmp(WORKER, "198.18.5.5", 8, 0).frame()));
    assert!(
        k.ingress(&Packet::icmp("198.18.5.5", WORKER, 0, 0).frame()),
        "echo reply"
    );
    let mut other_id = Packet::icmp("198.18.5.5", WORKER, 0, 0);
    other_id.transport = Transport::Icmp {
        icmp_type: 0,
        code: 0,
        rest: [0x99, 0x99, 0, 1],
    };
    assert!(
        !k.ingress(&other_id.frame()),
        "echo reply with another identifier"
    );
    // A UDP query out; the port-unreachable error quoting it is RELATED.
    let query = Packet::udp(WORKER, 5353, "198.18.5.5", 53);
    assert!(k.egress(&query.frame()));
    let error = Packet::new(
        ip("198.18.5.5"),
        ip(WORKER),
        Transport::IcmpError {
            icmp_type: 3,
            code: 3,
            quoted: Box::new(query),
        },
    );
    assert!(
        k.ingress(&error.frame()),
        "ICMP error related to a tracked flow"
    );
    let counters = k.dataplane.counters().expect("counters");
    assert_eq!(
        counters[0][moat_common::counter::CONNTRACK_ALLOWED as usize],
        2
    );
    assert_eq!(
        counters[0][moat_common::counter::RELATED_ALLOWED as usize],
        1
    );
    // Ingress-allowed flows are tracked too: the worker's reply goes out
    // even where egress policy would deny it (private side, no policy).
}

#[test]
fn later_fragments_are_judged_like_their_first() {
    let mut k = public();
    k.forget_flows();
    let frag = |dport, offset, more| {
        with(Packet::udp(CLIENT, 40000, WORKER, dport), |p| {
            p.fragment = Some(Fragmentation {
                offset,
                more,
                id: 4242,
            });
            p.payload = 16;
        })
        .frame()
    };
    assert!(k.ingress(&frag(52311, 0, true)), "first fragment to bigfix");
    assert!(k.ingress(&frag(52311, 3, false)), "its later fragment");
    k.forget_flows();
    assert!(
        !k.ingress(&frag(22, 0, true)),
        "first fragment to a closed port"
    );
    let before = k.dataplane.drain_events().len();
    assert!(
        !k.ingress(&frag(22, 3, false)),
        "its later fragment is denied too"
    );
    let events = k.dataplane.drain_events();
    assert_eq!(before, 1);
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].reason,
        reason::END_OF_POLICIES,
        "judged by policy, with the first fragment's ports"
    );
    assert_eq!(events[0].dport, 22);
}

#[test]
fn private_interface_failsafes_and_default_deny() {
    let mut k = Kernel::new(load_fixture("public"), "eth0");
    let cases = vec![
        case(
            "ssh failsafe",
            Packet::tcp("198.18.0.9", 40000, "198.18.0.1", 22, SYN),
            Expect::Pass,
        ),
        case(
            "bgp failsafe",
            Packet::tcp("198.18.0.9", 40000, "198.18.0.1", 179, SYN),
            Expect::Pass,
        ),
        case(
            "dhcp failsafe",
            Packet::udp("198.18.0.9", 67, "198.18.0.1", 68),
            Expect::Pass,
        ),
        case(
            "no policy, no profile: deny",
            Packet::tcp("198.18.0.9", 40000, "198.18.0.1", 80, SYN),
            Expect::Deny(reason::NO_PROFILE),
        ),
        case(
            "ping denied too",
            Packet::icmp("198.18.0.9", "198.18.0.1", 8, 0),
            Expect::Deny(reason::NO_PROFILE),
        ),
    ];
    run_ingress(&mut k, &cases);
    k.forget_flows();
    assert!(
        k.egress(&Packet::udp("198.18.0.1", 40000, "198.18.0.53", 53).frame()),
        "dns failsafe out"
    );
    assert!(
        !k.egress(&Packet::tcp("198.18.0.1", 40000, "198.18.0.9", 80, SYN).frame()),
        "other egress denied"
    );
    let events = k.dataplane.drain_events();
    assert_eq!(
        events.last().map(|e| (e.direction, e.reason)),
        Some((direction::EGRESS, reason::NO_PROFILE))
    );
    // The reply of a failsafe-allowed ssh connection leaves.
    k.forget_flows();
    assert!(k.ingress(&Packet::tcp("198.18.0.9", 40000, "198.18.0.1", 22, SYN).frame()));
    assert!(
        k.egress(&Packet::tcp("198.18.0.1", 22, "198.18.0.9", 40000, SYN_ACK).frame()),
        "ssh reply"
    );
}

#[test]
fn unenforced_interface_passes_everything() {
    let mut k = Kernel::new(load_fixture("public"), "eth7");
    assert!(k.compiled.ifaces.is_empty());
    assert!(k.ingress(&Packet::tcp(CLIENT, 1, WORKER, 22, SYN).frame()));
    assert!(k.egress(&Packet::tcp(WORKER, 1, CLIENT, 22, SYN).frame()));
    let counters = k.dataplane.counters().expect("counters");
    assert_eq!(
        counters[0][moat_common::counter::UNENFORCED_PASSED as usize],
        1
    );
    assert_eq!(
        counters[1][moat_common::counter::UNENFORCED_PASSED as usize],
        1
    );
}

#[test]
fn untracked_and_pre_dnat_stages_in_the_kernel() {
    let mut set = load_fixture("public");
    let extra = moat::policy::load_str(
        std::path::Path::new("stages.yaml"),
        r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-nodeports}
spec:
  selector: ibm.role=='worker_public'
  order: 1100
  preDNAT: true
  applyOnForward: true
  ingress:
    - {action: Deny, protocol: TCP, destination: {ports: ["30000:32767"]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: lb-whitelist}
spec:
  selector: ibm.role=='worker_public'
  order: 500
  doNotTrack: true
  applyOnForward: true
  ingress:
    - {action: Allow, protocol: TCP, source: {nets: [198.18.9.9/32]}, destination: {ports: [30080]}}
    - {action: Pass, protocol: TCP, destination: {ports: [30081]}}
"#,
    );
    assert!(extra.errors.is_empty(), "{:#?}", extra.errors);
    set.policies.extend(extra.set.policies);
    set.sort();
    let mut k = Kernel::new(set, "eth1");
    let cases = vec![
        case(
            "node port: pre-DNAT deny",
            Packet::tcp(CLIENT, 40000, WORKER, 30080, SYN),
            Expect::Deny(reason::RULE),
        ),
        case(
            "whitelisted client: untracked allow",
            Packet::tcp("198.18.9.9", 40000, WORKER, 30080, SYN),
            Expect::Pass,
        ),
        case(
            "untracked Pass ends that stage only",
            Packet::tcp("198.18.9.9", 40000, WORKER, 30081, SYN),
            Expect::Deny(reason::RULE),
        ),
        case(
            "below the node port range",
            Packet::tcp(CLIENT, 40000, WORKER, 29999, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
    ];
    run_ingress(&mut k, &cases);
    // The untracked allow created no conntrack entry.
    k.forget_flows();
    assert!(k.ingress(&Packet::tcp("198.18.9.9", 40000, WORKER, 30080, SYN).frame()));
    assert_eq!(
        k.dataplane.conntrack_len(),
        0,
        "untracked traffic is not tracked"
    );
    let counters = k.dataplane.counters().expect("counters");
    assert!(counters[0][moat_common::counter::UNTRACKED_ALLOWED as usize] >= 2);
}

#[test]
fn forwarded_traffic_meets_apply_on_forward_policies_only() {
    let mut k = Kernel::with_local(load_fixture("public"), "eth1", &[WORKER, WORKER6]);
    let cases = vec![
        // No applyOnForward policy on the public side: forwarded is allowed.
        case(
            "to a pod",
            Packet::tcp(CLIENT, 40000, "172.30.1.5", 8080, SYN),
            Expect::Pass,
        ),
        case(
            "to a pod over ipv6",
            Packet::udp("2001:db8:2::5", 40000, "2001:db8:30::5", 53),
            Expect::Pass,
        ),
        // Host traffic still meets the host policies.
        case(
            "ssh to the host",
            Packet::tcp(CLIENT, 40000, WORKER, 22, SYN),
            Expect::Deny(reason::END_OF_POLICIES),
        ),
        // Conntrack's INVALID applies to forwarded traffic too.
        case(
            "unsolicited echo reply to a pod",
            Packet::icmp(CLIENT, "172.30.1.5", 0, 0),
            Expect::Deny(reason::CONNTRACK_INVALID),
        ),
    ];
    for c in &cases {
        k.forget_flows();
        let passed = k.ingress(&c.frame);
        let events = k.dataplane.drain_events();
        let got = if passed {
            Expect::Pass
        } else {
            Expect::Deny(events.last().map_or(0, |e| e.reason))
        };
        assert_eq!(got, c.expect, "{}", c.name);
    }
    let counters = k.dataplane.counters().expect("counters");
    assert_eq!(
        counters[0][moat_common::counter::FORWARDED_ALLOWED as usize],
        2
    );
}

#[test]
fn a_flood_is_rate_limited_per_source_and_every_event_is_accounted_for() {
    use moat_common::counter;
    let mut k = public();
    k.dataplane.set_event_rate(10, 5).expect("rate");
    let denied_total = |k: &Kernel| {
        let c = k.dataplane.counters().expect("counters");
        let d = &c[0];
        let denied: u64 = [
            counter::RULE_DENIED,
            counter::END_OF_POLICIES_DENIED,
            counter::NO_PROFILE_DENIED,
            counter::UNPARSABLE_DENIED,
            counter::CONNTRACK_INVALID_DENIED,
            counter::FRAGMENT_DENIED,
        ]
        .iter()
        .map(|i| d[*i as usize])
        .sum();
        (
            denied,
            d[counter::EVENTS_EMITTED as usize],
            d[counter::EVENTS_SUPPRESSED as usize],
            d[counter::EVENTS_LOST as usize],
        )
    };
    let flood = |k: &mut Kernel, src: &str, n: u32| {
        let frame = Packet::tcp(src, 40000, WORKER, 22, SYN).frame();
        let (action, _) = k.dataplane.test_ingress(&frame, n).expect("test run");
        assert_eq!(action, 1, "dropped");
    };
    flood(&mut k, CLIENT, 100_000);
    let (denied, emitted, suppressed, lost) = denied_total(&k);
    assert_eq!(denied, 100_000);
    assert_eq!(
        emitted + suppressed + lost,
        denied,
        "every denied packet's event is emitted, suppressed or lost"
    );
    // The bucket: 5 at once, then 10 a second for however long the run took.
    assert!((5..=20).contains(&emitted), "emitted {emitted}");
    assert_eq!(lost, 0);
    assert_eq!(
        k.dataplane.drain_events().len() as u64,
        emitted,
        "what was emitted is in the ring"
    );
    // Another source has a bucket of its own.
    flood(&mut k, "198.18.1.3", 1000);
    let (denied2, emitted2, suppressed2, lost2) = denied_total(&k);
    assert_eq!(denied2, 101_000);
    assert!(emitted2 - emitted >= 5, "a new source gets its burst");
    assert_eq!(emitted2 + suppressed2 + lost2, denied2);
    // No limit: every event is written until the ring is full, then lost.
    k.dataplane.set_event_rate(0, 1).expect("rate");
    k.dataplane.drain_events();
    flood(&mut k, CLIENT, 20_000);
    let (denied3, emitted3, suppressed3, lost3) = denied_total(&k);
    assert_eq!(emitted3 + suppressed3 + lost3, denied3);
    assert!(
        lost3 > 0,
        "20,000 events of 112 bytes overflow a 1 MiB ring"
    );
    assert_eq!(
        suppressed3, suppressed2,
        "nothing suppressed without a limit"
    );
}

#[test]
fn a_fin_closes_both_orientations_of_a_flow() {
    let mut k = public();
    k.forget_flows();
    assert!(k.egress(&Packet::tcp(WORKER, 50000, "198.18.5.5", 443, SYN).frame()));
    let entries = k.dataplane.conntrack_entries();
    assert_eq!(entries.len(), 2, "both orientations tracked: {entries:?}");
    assert!(entries
        .iter()
        .all(|(_, s)| s.flags & moat_common::FLOW_CLOSING == 0));
    // The peer closes.
    assert!(
        k.ingress(&Packet::tcp("198.18.5.5", 443, WORKER, 50000, 0x11).frame()),
        "FIN,ACK of a tracked flow"
    );
    let entries = k.dataplane.conntrack_entries();
    assert_eq!(entries.len(), 2);
    assert!(
        entries
            .iter()
            .all(|(_, s)| s.flags & moat_common::FLOW_CLOSING != 0),
        "both orientations expire on the closing timeout: {entries:?}"
    );
}

#[test]
fn audit_mode_reports_would_be_denies_and_drops_nothing() {
    let set = load_fixture("public");
    let compiled =
        moat::compile::compile(&set, moat_tests::NODE, &["eth1".into()]).expect("compiles");
    let mut dataplane = moat::dataplane::Dataplane::load().expect("loads");
    dataplane.set_audit(true);
    dataplane
        .apply(
            &std::collections::BTreeMap::from([(
                TEST_RUN_IFINDEX,
                compiled.ifaces["eth1"].clone(),
            )]),
            1,
        )
        .expect("applies");
    let ssh = Packet::tcp(CLIENT, 40000, WORKER, 22, SYN).frame();
    let (action, _) = dataplane.test_ingress(&ssh, 1).expect("runs");
    assert_eq!(action, 2, "XDP_PASS: audit drops nothing");
    let events = dataplane.drain_events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].verdict, events[0].reason),
        (verdict::AUDIT, reason::END_OF_POLICIES)
    );
    let watched = Packet::tcp("198.18.66.7", 40000, WORKER, 52311, SYN).frame();
    assert_eq!(dataplane.test_ingress(&watched, 1).expect("runs").0, 2);
    let events = dataplane.drain_events();
    let verdicts: Vec<u8> = events.iter().map(|e| e.verdict).collect();
    assert_eq!(
        verdicts,
        [verdict::LOG, verdict::AUDIT],
        "the Log rule still logs; the deny is reported"
    );
    assert_eq!(
        compiled.policy_name(events[1].policy_id),
        Some("deny-watched")
    );
    let counters = dataplane.counters().expect("counters");
    let c = &counters[0];
    assert_eq!(c[moat_common::counter::AUDIT_PASSED as usize], 2);
    assert_eq!(
        c[moat_common::counter::END_OF_POLICIES_DENIED as usize],
        1,
        "would-be denies are counted by reason"
    );
    assert_eq!(c[moat_common::counter::RULE_DENIED as usize], 1);
}

/// The largest policy one interface direction holds (`classify::MAX_BITS`
/// rules, every stage together): the first rule, the last and no rule are
/// judged right, per-rule counters count them, and one rule more is
/// refused by name with the policy in force kept.
#[test]
fn the_largest_supported_policy_is_enforced_exactly() {
    use std::fmt::Write as _;
    let max = moat_common::classify::MAX_BITS as usize;
    let base = load_fixture("public");
    let fixture_bits = {
        let c = moat::compile::compile(&base, moat_tests::NODE, &["eth1".into()]).unwrap();
        moat::compile::classify::ClassifierImage::build(std::array::from_fn(|k| {
            c.ifaces["eth1"].table(direction::INGRESS, k)
        }))
        .unwrap()
        .bits
        .len()
    };
    let with_rules = |n: usize| {
        let mut yaml = String::from(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: big\nspec:\n  selector: ibm.role == 'worker_public'\n  order: 10\n  types: [Ingress]\n  ingress:\n",
        );
        for i in 0..n {
            writeln!(
                yaml,
                "    - action: Deny\n      protocol: TCP\n      source:\n        nets: [10.{}.{}.{}/32]\n      destination:\n        ports: [80]",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            )
            .unwrap();
        }
        let extra = moat::policy::load_str(std::path::Path::new("big.yaml"), &yaml);
        assert!(extra.errors.is_empty(), "{:?}", extra.errors);
        let mut set = base.clone();
        set.policies.extend(extra.set.policies);
        set
    };
    let n = max - fixture_bits;
    let mut k = Kernel::new(with_rules(n), "eth1");
    let last = n - 1;
    let from = |i: usize| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
    let big = k
        .compiled
        .policy_names
        .iter()
        .position(|p| p == "big")
        .unwrap() as u32;
    for (src, want) in [
        (from(0), Some(0)),
        (from(last), Some(last as u32)),
        (from(last), Some(last as u32)),
        ("10.200.0.1".to_string(), None),
    ] {
        k.dataplane.drain_events();
        let frame = Packet::tcp(&src, 40000, "198.18.1.1", 80, 0x02).frame();
        assert!(!k.ingress(&frame), "{src} is denied");
        let events = k.dataplane.drain_events();
        let e = events.last().expect("a deny event");
        match want {
            Some(rule) => assert_eq!(
                (e.reason, e.policy_id, e.rule_index),
                (reason::RULE, big, rule),
                "{src}"
            ),
            None => assert_eq!(e.reason, reason::END_OF_POLICIES, "{src}"),
        }
    }
    let counters = k.dataplane.rule_counters().unwrap();
    let count = |rule: u32| {
        counters
            .iter()
            .find(|c| c.policy_id == big && c.rule_index == rule)
            .map(|c| c.packets)
    };
    assert_eq!(count(0), Some(1));
    assert_eq!(count(last as u32), Some(2));
    assert_eq!(counters.iter().map(|c| c.packets).sum::<u64>(), 3);

    // One more rule: refused, naming the limit; the policy in force stays.
    let c = moat::compile::compile(&with_rules(n + 1), moat_tests::NODE, &["eth1".into()]).unwrap();
    let err = k
        .dataplane
        .apply(
            &std::collections::BTreeMap::from([(TEST_RUN_IFINDEX, c.ifaces["eth1"].clone())]),
            2,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("a classifier holds at most {max}")),
        "{err}"
    );
    let frame = Packet::tcp(&from(last), 40000, "198.18.1.1", 80, 0x02).frame();
    k.dataplane.drain_events();
    assert!(!k.ingress(&frame));
    let e = k.dataplane.drain_events().pop().expect("event");
    assert_eq!(
        (e.generation, e.rule_index),
        (1, last as u32),
        "generation 1 still in force"
    );
}

/// Audit mode per interface: only the named interface lets would-be
/// denies through.
#[test]
fn audit_mode_per_interface() {
    let set = load_fixture("public");
    let compiled =
        moat::compile::compile(&set, moat_tests::NODE, &["eth1".into()]).expect("compiles");
    let table =
        std::collections::BTreeMap::from([(TEST_RUN_IFINDEX, compiled.ifaces["eth1"].clone())]);
    let mut dataplane = moat::dataplane::Dataplane::load().expect("loads");
    let ssh = Packet::tcp(CLIENT, 40000, WORKER, 22, SYN).frame();
    // Another interface in audit: this one still enforces.
    dataplane.set_audit_ifaces([TEST_RUN_IFINDEX + 1]);
    dataplane.apply(&table, 1).expect("applies");
    assert_eq!(
        dataplane.test_ingress(&ssh, 1).expect("runs").0,
        1,
        "XDP_DROP"
    );
    assert_eq!(dataplane.drain_events()[0].verdict, verdict::DENY);
    // This one in audit.
    dataplane.set_audit_ifaces([TEST_RUN_IFINDEX]);
    dataplane.apply(&table, 2).expect("applies");
    assert_eq!(
        dataplane.test_ingress(&ssh, 1).expect("runs").0,
        2,
        "XDP_PASS"
    );
    let e = dataplane.drain_events();
    assert_eq!(
        (e[0].verdict, e[0].reason, e[0].generation),
        (verdict::AUDIT, reason::END_OF_POLICIES, 2)
    );
}
