//! Stacked VLAN tags: real frames from a client namespace through moat's
//! XDP program attached (native and skb mode) to the worker's veth. Linux
//! strips any number of priority tags (VID 0) and delivers what is inside,
//! so every tagged IP frame must be judged as IP, up to
//! `MAX_VLAN_TAGS` tags, and denied beyond (reason `vlan-depth`).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use moat::{
    compile::compile,
    dataplane::{frame::Packet, Dataplane, XdpAttachMode},
};
use moat_common::{counter, direction, reason, verdict, DenyEvent, MAX_VLAN_TAGS, VLAN_TPIDS};
use moat_tests::{in_netns, load_fixture, mac_of, send_frame, worker_and_client, NODE};

const SYN: u8 = 0x02;

/// `frame` with `tpids.len()` tags (VID 0, priority 5) after the MACs,
/// outermost first.
fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut tags = Vec::new();
    for tpid in tpids {
        tags.extend_from_slice(&tpid.to_be_bytes());
        tags.extend_from_slice(&(5u16 << 13).to_be_bytes());
    }
    let mut f = frame.to_vec();
    f.splice(12..12, tags);
    f
}

/// One frame sent and what moat must make of it.
struct Case {
    what: String,
    frame: Vec<u8>,
    sport: u16,
    /// The event it must cause: verdict and reason.
    want: (u8, u8),
}

fn cases(worker_mac: [u8; 6], client_mac: [u8; 6]) -> Vec<Case> {
    let mut out = Vec::new();
    let mut sport = 41000;
    let mixed = [VLAN_TPIDS[1], VLAN_TPIDS[0], VLAN_TPIDS[2]];
    for family in [
        ("198.18.1.2", "198.18.1.1"),
        ("2001:db8:1::2", "2001:db8:1::1"),
    ] {
        for n in 1..=MAX_VLAN_TAGS as usize + 2 {
            for tpid in VLAN_TPIDS.iter().map(|t| vec![*t; n]).chain([mixed
                .iter()
                .cycle()
                .take(n)
                .copied()
                .collect()])
            {
                // telnet is denied by rule (ssh would be failsafe); 8080 is logged, then allowed.
                for dport in [23u16, 8080] {
                    sport += 1;
                    let mut f = Packet::tcp(family.0, sport, family.1, dport, SYN).frame();
                    f[..6].copy_from_slice(&worker_mac);
                    f[6..12].copy_from_slice(&client_mac);
                    let within = n <= MAX_VLAN_TAGS as usize;
                    let want = match (within, dport) {
                        (false, _) => (verdict::DENY, reason::VLAN_DEPTH),
                        (true, 23) => (verdict::DENY, reason::RULE),
                        (true, _) => (verdict::LOG, reason::LOG_RULE),
                    };
                    out.push(Case {
                        what: format!("{} SYN to {dport} in {n} tags {:04x?}", family.1, tpid),
                        frame: tagged(&f, &tpid),
                        sport,
                        want,
                    });
                }
            }
        }
    }
    out
}

/// Waits (3 s at most) for the event of `case`: by its source port, or,
/// beyond the bound (where nothing past the tags is read), the next
/// `vlan-depth` event after the `depth_seen` before it.
fn event_for(
    dp: &mut Dataplane,
    seen: &mut Vec<DenyEvent>,
    case: &Case,
    depth_seen: usize,
) -> Option<DenyEvent> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        seen.extend(dp.drain_events());
        let found = if case.want.1 == reason::VLAN_DEPTH {
            seen.iter()
                .filter(|e| e.reason == reason::VLAN_DEPTH)
                .nth(depth_seen)
        } else {
            seen.iter().find(|e| e.sport == case.sport)
        };
        if let Some(e) = found {
            return Some(*e);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stacked_tags_are_judged(mode: XdpAttachMode) {
    let (worker, client) = worker_and_client("mvw", "mvc", true);
    let (worker_mac, client_mac) = (mac_of(&worker, "eth1"), mac_of(&client, "eth0"));
    let client_name = client.name.clone();
    let set = load_fixture("lab");
    in_netns(&worker.name.clone(), move || {
        let compiled = compile(&set, NODE, &["eth1".to_string()]).expect("compiles");
        let ifindex = nix::net::if_::if_nametoindex("eth1").expect("eth1");
        let mut dp = Dataplane::load().expect("loads");
        dp.attach("eth1", mode).expect("attaches");
        let by_index = BTreeMap::from([(ifindex, compiled.ifaces["eth1"].clone())]);
        dp.apply(&by_index, 1).expect("applies");
        let before = dp.counters().expect("counters")[direction::INGRESS as usize];
        let mut seen = Vec::new();
        let mut beyond = 0;
        let mut failures = Vec::new();
        for case in cases(worker_mac, client_mac) {
            send_frame(&client_name, "eth0", case.frame.clone());
            match event_for(&mut dp, &mut seen, &case, beyond as usize) {
                // The event carries the frame's Ethernet header (the outer
                // TPID as its EtherType).
                Some(e)
                    if (e.verdict, e.reason) == case.want && e.detail.mac == case.frame[..14] => {}
                Some(e) => failures.push(format!(
                    "{}: event verdict {} reason {}, want {:?}",
                    case.what, e.verdict, e.reason, case.want
                )),
                None => failures.push(format!("{}: no event (passed unjudged)", case.what)),
            }
            if case.want.1 == reason::VLAN_DEPTH {
                beyond += 1;
            }
        }
        if !failures.is_empty() {
            let all: Vec<String> = seen
                .iter()
                .map(|e| format!("{}:{} v{} r{}", e.sport, e.dport, e.verdict, e.reason))
                .collect();
            panic!("{mode:?}:\n{}\nevents seen: {all:?}", failures.join("\n"));
        }
        let after = dp.counters().expect("counters")[direction::INGRESS as usize];
        let c = counter::VLAN_DEPTH_DENIED as usize;
        assert_eq!(after[c] - before[c], beyond, "{mode:?}: vlan_depth_denied");
    });
    drop((worker, client));
}

#[test]
fn stacked_vlan_tags_are_judged_in_native_xdp() {
    stacked_tags_are_judged(XdpAttachMode::Native);
}

#[test]
fn stacked_vlan_tags_are_judged_in_skb_xdp() {
    stacked_tags_are_judged(XdpAttachMode::Skb);
}
