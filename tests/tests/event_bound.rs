//! The event limiter's global bound: a flood of denied SYNs from spoofed
//! sources, each with a full bucket of its own, still gives a bounded
//! number of events, and every denied packet's event is emitted,
//! suppressed or lost, exactly.

use std::time::Instant;

use moat::dataplane::frame::Packet;
use moat_common::{counter, DEFAULT_GLOBAL_EVENT_BURST, DEFAULT_GLOBAL_EVENT_RATE};
use moat_tests::{load_fixture, Kernel};

const WORKER: &str = "198.18.1.1";
const SYN: u8 = 0x02;

#[test]
fn spoofed_sources_meet_the_global_event_bound() {
    let mut k = Kernel::new(load_fixture("public"), "eth1");
    // The agent's defaults: 100 a second and 200 at once per source.
    k.dataplane.set_event_rate(100, 200).expect("rate");
    let before = k.dataplane.counters().expect("counters")[0];
    let started = Instant::now();
    let mut drained = 0u64;
    let n: u32 = 80_000;
    for i in 0..n {
        // 80,000 distinct sources in 198.18.0.0/15 (never the worker).
        let a = 2 + i;
        let src = format!("198.{}.{}.{}", 18 + (a >> 16), (a >> 8) & 0xff, a & 0xff);
        let frame = Packet::tcp(&src, 40000, WORKER, 22, SYN).frame();
        let (action, _) = k.dataplane.test_ingress(&frame, 1).expect("test run");
        assert_eq!(action, 1, "{src}: dropped");
        if i % 1000 == 999 {
            // Read as the agent does, so that the ring never fills.
            drained += k.dataplane.drain_events().len() as u64;
        }
    }
    drained += k.dataplane.drain_events().len() as u64;
    let secs = started.elapsed().as_secs_f64();
    let after = k.dataplane.counters().expect("counters")[0];
    let d = |c: u32| after[c as usize] - before[c as usize];
    let denied = d(counter::RULE_DENIED)
        + d(counter::END_OF_POLICIES_DENIED)
        + d(counter::NO_PROFILE_DENIED)
        + d(counter::UNPARSABLE_DENIED)
        + d(counter::CONNTRACK_INVALID_DENIED)
        + d(counter::FRAGMENT_DENIED)
        + d(counter::VLAN_DEPTH_DENIED);
    // Sources inside the fixture's logged network also hit a Log rule:
    // one event each for that too.
    let logged = d(counter::LOG_RULE_HITS);
    let (emitted, suppressed, lost) = (
        d(counter::EVENTS_EMITTED),
        d(counter::EVENTS_SUPPRESSED),
        d(counter::EVENTS_LOST),
    );
    eprintln!(
        "{n} denied SYNs from {n} sources in {secs:.2} s: {emitted} emitted, {suppressed} suppressed, {lost} lost"
    );
    assert_eq!(denied, u64::from(n));
    assert_eq!(
        emitted + suppressed + lost,
        denied + logged,
        "every event accounted for"
    );
    assert_eq!(lost, 0, "the ring was read as it filled");
    assert_eq!(drained, emitted, "what was emitted is in the ring");
    // The global bucket: its burst at once, then its rate for however
    // long the run took (one CPU ran it: no race to pass it), give or take
    // the coarse clock's tick (at most 10 ms).
    let bound = u64::from(DEFAULT_GLOBAL_EVENT_BURST)
        + (f64::from(DEFAULT_GLOBAL_EVENT_RATE) * (secs + 0.01)).ceil() as u64;
    assert!(
        emitted <= bound,
        "{emitted} events from a spoofed flood, above the global bound {bound}"
    );
    assert!(
        emitted >= u64::from(DEFAULT_GLOBAL_EVENT_BURST),
        "{emitted} events: the global burst is let through first"
    );
}
