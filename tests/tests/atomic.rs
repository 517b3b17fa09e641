//! Policy updates are atomic: live frames flood the XDP program while the
//! policy flips between two sets, and every verdict belongs to one of them.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moat::{
    compile::compile,
    dataplane::{frame::Packet, Dataplane},
    policy,
};
use moat_common::{counter, direction, reason};
use moat_tests::{fixtures, PinDir, NODE, TEST_RUN_IFINDEX};

/// Set A denies the flood with its own rule; set B has no such rule, so the
/// flood ends at the default deny. Anything else would be a mix.
fn set(deny_port: u16, name: &str) -> policy::PolicySet {
    let mut loaded = policy::load_dir(&fixtures().join("public")).expect("fixture");
    let extra = policy::load_str(
        Path::new("flip.yaml"),
        &format!(
            "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: {name}
spec:
  selector: ibm.role == 'worker_public'
  order: 10
  ingress:
    - action: Deny
      protocol: TCP
      source:
        nets: [10.0.0.0/8]
      destination:
        ports: [{deny_port}]
"
        ),
    );
    assert!(extra.errors.is_empty(), "{:?}", extra.errors);
    loaded.set.policies.extend(extra.set.policies);
    loaded.set
}

#[test]
fn every_verdict_under_flipping_policies_belongs_to_one_generation() {
    let pins = PinDir::new();
    let a = compile(&set(80, "flip-a"), NODE, &["eth1".into()]).expect("compiles");
    let b = compile(&set(81, "flip-b"), NODE, &["eth1".into()]).expect("compiles");
    let table = |c: &moat::compile::Compiled| {
        BTreeMap::from([(TEST_RUN_IFINDEX, c.ifaces["eth1"].clone())])
    };
    let (ta, tb) = (table(&a), table(&b));

    let mut writer = Dataplane::load_pinned(&pins.0).expect("load");
    writer.set_event_rate(0, 1).expect("no event limit");
    writer.apply(&ta, 1).expect("apply A");
    // A second copy of the programs on the same pinned maps floods while
    // the first writes.
    let mut flooder = Dataplane::load_pinned(&pins.0).expect("load the flooding copy");

    let frame = Packet::tcp("10.1.2.3", 40000, "198.18.1.1", 80, 0x02).frame();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                flooder
                    .test_ingress_live(&frame, TEST_RUN_IFINDEX, 20_000)
                    .expect("live frames");
                sent.fetch_add(20_000, Ordering::SeqCst);
            }
        })
    };

    let mut generation = 1u32;
    let (mut by_a, mut by_b, mut flips) = (0u64, 0u64, 0u32);
    let mut check = |writer: &mut Dataplane| {
        for e in writer.drain_events() {
            assert_eq!(e.direction, direction::INGRESS);
            if e.generation % 2 == 1 {
                assert_eq!(
                    (e.reason, a.policy_name(e.policy_id), e.rule_index),
                    (reason::RULE, Some("flip-a"), 0),
                    "generation {} (set A) judged like this: {e:?}",
                    e.generation
                );
                by_a += 1;
            } else {
                assert_eq!(
                    e.reason,
                    reason::END_OF_POLICIES,
                    "generation {} (set B) judged like this: {e:?}",
                    e.generation
                );
                by_b += 1;
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        generation += 1;
        let next = if generation % 2 == 1 { &ta } else { &tb };
        writer.apply(next, generation).expect("flip");
        flips += 1;
        check(&mut writer);
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    flood.join().expect("flood thread");
    check(&mut writer);

    let counters = writer.counters().expect("counters")[direction::INGRESS as usize];
    let denied = counters[counter::RULE_DENIED as usize]
        + counters[counter::END_OF_POLICIES_DENIED as usize];
    let sent = sent.load(Ordering::SeqCst);
    let events = counters[counter::EVENTS_EMITTED as usize];
    let lost = counters[counter::EVENTS_LOST as usize];
    eprintln!(
        "{sent} live frames across {flips} policy flips: {denied} denied ({} by set A's rule, {} by set B's default deny); {events} events emitted, {lost} lost (ring full); {by_a} + {by_b} events read, every one consistent with its generation",
        counters[counter::RULE_DENIED as usize],
        counters[counter::END_OF_POLICIES_DENIED as usize],
    );
    assert_eq!(denied, sent, "every frame denied, by one set or the other");
    assert_eq!(events + lost, sent, "every deny emitted or counted lost");
    assert!(flips >= 100, "the policy flipped often: {flips}");
    assert!(
        by_a > 0 && by_b > 0,
        "both sets judged frames: {by_a} / {by_b}"
    );
}
