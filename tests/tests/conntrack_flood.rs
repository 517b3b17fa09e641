//! Connection tracking cannot be flushed by strangers: a spoofed SYN flood
//! to an allowed port (connections nobody answers) fills the table of
//! unconfirmed connections only, and an established connection, confirmed
//! by its reply, keeps flowing through it.

use std::time::Instant;

use moat::dataplane::frame::Packet;
use moat_common::{counter, direction, MAX_FLOWS};
use moat_tests::{Kernel, TempDir};

const POLICY: &str = "
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: worker-1-public
  labels: {role: public}
spec:
  node: worker-1
  interfaceName: eth1
  expectedIPs: [198.18.1.1]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: web-in-all-out
spec:
  selector: role == 'public'
  ingress:
    - action: Allow
      protocol: TCP
      destination:
        ports: [8080]
  egress:
    - action: Allow
";

/// Spoofed frames in the flood (the figure, at default sizes);
/// `MOAT_TEST_CT_FLOOD` sets another.
fn flood_size() -> u32 {
    std::env::var("MOAT_TEST_CT_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000)
}

#[test]
fn an_established_connection_survives_a_spoofed_syn_flood() {
    let dir = TempDir::new("moat-ctflood-");
    std::fs::write(dir.0.join("policy.yaml"), POLICY).expect("policy file");
    let loaded = moat::policy::load_dir(&dir.0).expect("policy loads");
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut k = Kernel::new(loaded.set, "eth1");
    k.dataplane.set_event_rate(100, 200).expect("rate");

    // An egress-initiated connection whose return traffic only conntrack
    // lets in (ingress allows 8080 alone).
    let out = |flags| Packet::tcp("198.18.1.1", 50000, "198.18.5.5", 443, flags).frame();
    let back = |flags| Packet::tcp("198.18.5.5", 443, "198.18.1.1", 50000, flags).frame();
    assert!(k.egress(&out(0x02)), "SYN out");
    assert!(
        k.ingress(&back(0x12)),
        "SYN-ACK back: the reply confirms it"
    );
    assert!(k.egress(&out(0x10)), "ACK out");
    let c0 = k.dataplane.counters().expect("counters");
    assert_eq!(
        c0[direction::INGRESS as usize][counter::CT_CONFIRMED as usize],
        1
    );

    // The flood: connections to the allowed port from distinct spoofed
    // sources (2001:db8::/32), each a SYN and a blind ACK (a second packet
    // of its own flow, which a plain LRU table counts as use), none ever
    // answered: `flood` frames in all.
    let mut syn = Packet::tcp("2001:db8:ffff::1", 40000, "2001:db8:1::1", 8080, 0x02).frame();
    let mut ack = Packet::tcp("2001:db8:ffff::1", 40000, "2001:db8:1::1", 8080, 0x10).frame();
    let flood = flood_size();
    let started = Instant::now();
    for i in 0..flood / 2 {
        // Source address bytes 12..16 (frame offset 14 + 8 + 12).
        for frame in [&mut syn, &mut ack] {
            frame[34..38].copy_from_slice(&i.to_be_bytes());
            let (action, _) = k.dataplane.test_ingress(frame, 1).expect("test run");
            assert_eq!(
                action, 2,
                "spoofed connection {i} to the allowed port passes"
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let c1 = k.dataplane.counters().expect("counters");
    let ingress = |c: &[[u64; counter::COUNT as usize]; 2], i: u32| {
        c[direction::INGRESS as usize][i as usize]
    };
    let unconfirmed = ingress(&c1, counter::CT_UNCONFIRMED) - ingress(&c0, counter::CT_UNCONFIRMED);
    let pending = k.dataplane.pending_len();
    eprintln!(
        "{flood} spoofed frames ({} connections) in {secs:.1} s: {unconfirmed} unconfirmed connections, {pending} orientations still waiting, {} confirmed tracked",
        flood / 2,
        k.dataplane.fill().expect("fill").flows
    );
    assert_eq!(
        unconfirmed,
        u64::from(flood / 2),
        "every spoofed connection was tracked"
    );
    assert!(
        pending as u64 <= u64::from(2 * MAX_FLOWS),
        "the waiting table is bounded"
    );

    // The connection still flows: return traffic is ESTABLISHED.
    let before = ingress(&c1, counter::CONNTRACK_ALLOWED);
    assert!(
        k.ingress(&back(0x10)),
        "the established connection's return traffic was cut by the flood"
    );
    let c2 = k.dataplane.counters().expect("counters");
    assert_eq!(ingress(&c2, counter::CONNTRACK_ALLOWED), before + 1);
    assert_eq!(
        ingress(&c2, counter::CT_CONFIRMED),
        1,
        "no spoofed connection was confirmed"
    );
}
