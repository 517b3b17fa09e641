//! Local versus forwarded is the kernel's answer: real frames from a
//! client namespace to addresses the worker's routing table delivers to the
//! host although no interface carries them (127.0.0.2 with route_localnet,
//! an AnyIP route, the IPv6 subnet-router anycast, a subnet broadcast, an
//! address added after the agent last listed them) are judged as host
//! traffic, so the host policy's Deny of telnet applies. A destination the
//! worker routes onward stays forwarded (allowed: no applyOnForward policy).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use moat::{
    compile::compile,
    dataplane::{frame::Packet, Dataplane, XdpAttachMode},
};
use moat_common::{counter, direction, reason, verdict, DenyEvent};
use moat_tests::{
    add_ipv6_pair, in_netns, load_fixture, mac_of, run, send_frame, worker_and_client, NODE,
};

const SYN: u8 = 0x02;

/// Waits (3 s at most) for the event of the packet from `sport`.
fn event_for(dp: &mut Dataplane, seen: &mut Vec<DenyEvent>, sport: u16) -> Option<DenyEvent> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        seen.extend(dp.drain_events());
        if let Some(e) = seen.iter().find(|e| e.sport == sport) {
            return Some(*e);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[test]
fn addresses_the_routing_table_delivers_locally_are_host_traffic() {
    let (worker, client) = worker_and_client("mlw", "mlc", true);
    let w = |args: &[&str]| worker.exec(args[0], &args[1..]);
    // A node that forwards (pods, kube-proxy), as Kubernetes workers do.
    for key in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv4.conf.eth1.route_localnet=1",
    ] {
        w(&["sysctl", "-q", "-w", key]);
    }
    add_ipv6_pair(&worker, &client);
    // AnyIP: a whole prefix delivered locally by a route, no address.
    w(&[
        "ip",
        "route",
        "add",
        "local",
        "198.51.100.0/24",
        "dev",
        "lo",
    ]);
    // Somewhere the worker routes onward: forwarded.
    w(&["ip", "route", "add", "198.18.9.0/24", "via", "198.18.1.2"]);
    let table = w(&["ip", "-6", "route", "show", "table", "local"]);
    assert!(
        table.contains("anycast 2001:db8:1::"),
        "the kernel made no subnet-router anycast route:\n{table}"
    );
    let (worker_mac, client_mac) = (mac_of(&worker, "eth1"), mac_of(&client, "eth0"));
    let (worker_name, client_name) = (worker.name.clone(), client.name.clone());
    let set = load_fixture("lab");
    in_netns(&worker.name.clone(), move || {
        let compiled = compile(&set, NODE, &["eth1".to_string()]).expect("compiles");
        let ifindex = nix::net::if_::if_nametoindex("eth1").expect("eth1");
        let mut dp = Dataplane::load().expect("loads");
        // What the agent writes: every address of every interface.
        let listed = moat::cli::agent::local_addresses().expect("addresses");
        dp.set_local_addresses(&listed).expect("local addresses");
        dp.attach("eth1", XdpAttachMode::Skb).expect("attaches");
        let by_index = BTreeMap::from([(ifindex, compiled.ifaces["eth1"].clone())]);
        dp.apply(&by_index, 1).expect("applies");
        // Added after the agent listed the addresses (it syncs once a
        // second; the kernel's answer has no such gap).
        run(
            "ip",
            &[
                "netns",
                "exec",
                &worker_name,
                "ip",
                "addr",
                "add",
                "198.18.7.1/32",
                "dev",
                "eth1",
            ],
        );

        let frame = |src: &str, dst: &str, sport: u16| {
            let mut f = Packet::tcp(src, sport, dst, 23, SYN).frame();
            f[..6].copy_from_slice(&worker_mac);
            f[6..12].copy_from_slice(&client_mac);
            f
        };
        let before = dp.counters().expect("counters")[direction::INGRESS as usize];
        let mut seen = Vec::new();

        // Forwarded (the control): allowed, counted as forwarded, no event.
        send_frame(
            &client_name,
            "eth0",
            frame("198.18.1.2", "198.18.9.9", 42000),
        );

        let mut failures = Vec::new();
        let cases = [
            ("127.0.0.2 with route_localnet", "198.18.1.2", "127.0.0.2"),
            ("an AnyIP route", "198.18.1.2", "198.51.100.7"),
            (
                "the IPv6 subnet-router anycast",
                "2001:db8:1::2",
                "2001:db8:1::",
            ),
            (
                "the subnet broadcast (no brd given)",
                "198.18.1.2",
                "198.18.1.255",
            ),
            ("an address added since", "198.18.1.2", "198.18.7.1"),
        ];
        for (i, (what, src, dst)) in cases.iter().enumerate() {
            let sport = 42001 + i as u16;
            send_frame(&client_name, "eth0", frame(src, dst, sport));
            match event_for(&mut dp, &mut seen, sport) {
                Some(e) if e.verdict == verdict::DENY && e.reason == reason::RULE => {}
                Some(e) => failures.push(format!(
                    "{what} ({dst}): verdict {} reason {}, want the host policy's deny",
                    e.verdict, e.reason
                )),
                None => failures.push(format!(
                    "{what} ({dst}): no event: judged as forwarded and allowed"
                )),
            }
            let dst_key = bytes(dst.parse().expect("address"));
            if dp.conntrack_entries().iter().any(|(k, _)| k.dst == dst_key) {
                failures.push(format!("{what} ({dst}): a conntrack entry was created"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(
            !seen.iter().any(|e| e.sport == 42000),
            "the forwarded control packet was denied: {seen:?}"
        );
        let after = dp.counters().expect("counters")[direction::INGRESS as usize];
        let c = counter::FORWARDED_ALLOWED as usize;
        assert_eq!(
            after[c] - before[c],
            1,
            "forwarded_allowed: the control only"
        );
    });
    drop((worker, client));
}

/// The price of asking the routing table, by `BPF_PROG_TEST_RUN`: the same
/// denied SYN, once to a listed node address (no route lookup) and once to
/// an AnyIP address only the routing table knows (one `bpf_fib_lookup`),
/// interleaved; prints medians and spread. A measurement, not a check:
/// `cargo test -p moat-tests --test local -- --ignored --nocapture`.
#[test]
#[ignore]
fn route_lookup_cost() {
    let ns = moat_tests::Netns::new("mlb");
    ns.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
    ns.exec(
        "ip",
        &["route", "add", "local", "198.51.100.0/24", "dev", "lo"],
    );
    let set = load_fixture("lab");
    in_netns(&ns.name.clone(), move || {
        let compiled = compile(&set, NODE, &["eth1".to_string()]).expect("compiles");
        let mut dp = Dataplane::load().expect("loads");
        dp.set_local_addresses(&["198.18.1.1".parse().expect("address")].into())
            .expect("local addresses");
        dp.set_event_rate(1, 1).expect("event rate");
        let by_index = BTreeMap::from([(
            moat_tests::TEST_RUN_IFINDEX,
            compiled.ifaces["eth1"].clone(),
        )]);
        dp.apply(&by_index, 1).expect("applies");
        let listed = Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 23, SYN).frame();
        let routed = Packet::tcp("198.18.1.2", 40000, "198.51.100.7", 23, SYN).frame();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            for (frame, out) in [(&listed, &mut a), (&routed, &mut b)] {
                let (action, mean) = dp.test_ingress(frame, 200_000).expect("test run");
                assert_eq!(action, 1, "both are denied (XDP_DROP)");
                out.push(mean.as_nanos() as u64);
            }
        }
        let stats = |v: &mut Vec<u64>| {
            v.sort_unstable();
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (ma, la, ha) = stats(&mut a);
        let (mb, lb, hb) = stats(&mut b);
        println!("listed address (no route lookup): median {ma} ns, range {la}-{ha} ns");
        println!("AnyIP address (bpf_fib_lookup):   median {mb} ns, range {lb}-{hb} ns");
        println!("difference of medians: {} ns", mb as i64 - ma as i64);
    });
}
