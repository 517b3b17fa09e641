//! Blocklists: a GlobalNetworkSet of many source prefixes denied on the
//! public interface, weighed against the map capacities by `moat check`
//! and by the dataplane, enforced in the kernel when it fits, refused with
//! the policy in force kept when it does not.

use std::{collections::BTreeSet, path::Path, process::Command};

use moat::{
    dataplane::{frame::Packet, Capacities, Dataplane, DataplaneError},
    policy::{self, PolicySet},
};
use moat_tests::{moat_bin, TempDir, NODE, TEST_RUN_IFINDEX};

/// `n` distinct source prefixes (70% /32, 25% /24, 5% /16../23) drawn
/// from 1.0.0.0-126.255.255.255 (data only: no packet goes there), then
/// `extra`, as the text of a policy file: the public HostEndpoint, the
/// set, and a policy denying it on ingress and allowing everything else.
fn blocklist_yaml(n: usize, extra: &[&str]) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut seen = BTreeSet::new();
    let mut nets = Vec::with_capacity(n + extra.len());
    for i in 0..n {
        let len = match i * 100 / n.max(1) {
            0..=69 => 32,
            70..=94 => 24,
            _ => 16 + (next() % 8) as u32,
        };
        loop {
            let addr = 0x0100_0000 + (next() % 0x7e00_0000) as u32;
            let net = addr & (u32::MAX << (32 - len));
            if seen.insert((net, len)) {
                nets.push(format!("{}/{len}", std::net::Ipv4Addr::from(net)));
                break;
            }
        }
    }
    nets.extend(extra.iter().map(|s| s.to_string()));
    let mut out = String::from(
        "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: worker-1-public, labels: {ibm.role: worker_public}}
spec: {node: worker-1, interfaceName: eth1, expectedIPs: [198.18.1.1]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-blocklist}
spec:
  selector: ibm.role == 'worker_public'
  order: 1
  ingress:
    - action: Deny
      source: {selector: \"blocklist == 'true'\"}
    - action: Allow
  egress:
    - action: Allow
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: blocklist, labels: {blocklist: 'true'}}
spec:
  nets:
",
    );
    for net in nets {
        out.push_str("    - ");
        out.push_str(&net);
        out.push('\n');
    }
    out
}

fn policy_set(text: &str) -> PolicySet {
    let loaded = policy::load_str(Path::new("blocklist.yaml"), text);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.set
}

/// Applies `set` (eth1's tables as the test-run device's).
fn apply(dp: &mut Dataplane, set: &PolicySet, generation: u32) -> Result<(), DataplaneError> {
    let compiled = moat::compile::compile(set, NODE, &["eth1".into()]).expect("compiles");
    let mut by_index = std::collections::BTreeMap::new();
    by_index.insert(TEST_RUN_IFINDEX, compiled.ifaces["eth1"].clone());
    dp.apply(&by_index, generation)
}

/// Whether XDP passes a TCP SYN from `src` to the worker's port 80.
fn passes(dp: &mut Dataplane, src: &str) -> bool {
    let frame = Packet::tcp(src, 40000, "198.18.1.1", 80, 0x02).frame();
    let (action, _) = dp.test_ingress(&frame, 1).expect("test run");
    dp.clear_conntrack().expect("clear conntrack");
    match action {
        2 => true,
        1 => false,
        other => panic!("unexpected XDP action {other}"),
    }
}

/// `moat check` weighs the set against the capacities it is given: over
/// them it fails naming the map, the count, the capacity and the option;
/// with the capacity raised it passes.
#[test]
fn check_refuses_a_set_over_the_capacity_with_the_numbers() {
    let dir = TempDir::new("moat-blocklist-check");
    std::fs::write(dir.0.join("policy.yaml"), blocklist_yaml(3000, &[])).expect("write");
    let check = |caps: &[&str]| {
        let out = Command::new(moat_bin())
            .args(["check", "--profile", "none", "--node", NODE, "--policies"])
            .arg(&dir.0)
            .args(caps)
            .output()
            .expect("moat check runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = check(&["--addr-prefixes", "4096"]);
    assert!(!ok, "a set over the capacity passed: {text}");
    for needle in [
        "needs 3001 source prefixes in map MOAT_CSRC_V1",
        "holds 4096 (2048 per policy generation",
        "raise it to at least 6002 with --addr-prefixes (config key addrPrefixes)",
    ] {
        assert!(text.contains(needle), "no {needle:?} in: {text}");
    }
    // The 3000 prefixes and the trie's root (any other source).
    let (ok, text) = check(&["--addr-prefixes", "6002"]);
    assert!(ok, "the set fits 6002 and was refused: {text}");
    assert!(
        text.contains("3001 source and 0 destination prefixes (of 3001 each)"),
        "{text}"
    );
}

/// A set that does not fit one generation is refused before anything is
/// written: the policy in force keeps judging (its denied source dropped,
/// the source only the refused set lists still allowed), and applying the
/// small policy again still works.
#[test]
fn dataplane_refuses_a_set_over_the_capacity_and_keeps_the_policy_in_force() {
    let caps = Capacities {
        addr_prefixes: 4096,
        ..Capacities::default()
    };
    let mut dp = Dataplane::load_with(None, caps).expect("load");
    let small = policy_set(&blocklist_yaml(10, &["198.18.7.7/32"]));
    apply(&mut dp, &small, 1).expect("the small set fits");
    assert!(!passes(&mut dp, "198.18.7.7"), "listed source passed");
    assert!(passes(&mut dp, "198.18.8.8"), "unlisted source dropped");

    // 3000 prefixes fit the trie once, not twice (the next generation
    // needs as much room again): refused now, not half written later.
    let big = policy_set(&blocklist_yaml(3000, &["198.18.8.8/32"]));
    // 3001 prefixes and the root.
    let err = apply(&mut dp, &big, 2).expect_err("3002 entries in a 4096-entry trie");
    let text = err.to_string();
    assert!(
        matches!(&err, DataplaneError::Full(f) if f.map == "MOAT_CSRC_V1" && f.needed == 3002 && f.capacity == 4096),
        "{text}"
    );
    assert!(text.contains("--addr-prefixes"), "{text}");
    assert!(
        !passes(&mut dp, "198.18.7.7"),
        "the policy in force stopped denying"
    );
    assert!(passes(&mut dp, "198.18.8.8"), "the refused set took effect");
    apply(&mut dp, &small, 3).expect("the small set still applies");
    assert!(!passes(&mut dp, "198.18.7.7"));
}

/// 200,000 prefixes with the capacity raised to hold two generations of
/// them: a listed /32, an address inside a listed /24 are dropped, an
/// unlisted source passes; a one-prefix change is enforced, twice (both
/// banks hold a full generation).
#[test]
fn a_200000_prefix_set_is_enforced_with_a_raised_capacity() {
    let caps = Capacities {
        addr_prefixes: 400_100,
        ..Capacities::default()
    };
    let mut dp = Dataplane::load_with(None, caps).expect("load");
    let listed = ["198.18.7.7/32", "198.18.9.0/24"];
    let set = policy_set(&blocklist_yaml(200_000 - listed.len(), &listed));
    apply(&mut dp, &set, 1).expect("200000 prefixes fit 400100");
    assert!(!passes(&mut dp, "198.18.7.7"), "listed /32 passed");
    assert!(
        !passes(&mut dp, "198.18.9.200"),
        "address in a listed /24 passed"
    );
    assert!(passes(&mut dp, "198.18.8.8"), "unlisted source dropped");

    let changed = policy_set(&blocklist_yaml(
        200_000 - listed.len(),
        &["198.18.7.7/32", "198.18.9.0/24", "198.18.8.8/32"],
    ));
    apply(&mut dp, &changed, 2).expect("one prefix more");
    assert!(!passes(&mut dp, "198.18.8.8"), "the added prefix passed");
    apply(&mut dp, &set, 3).expect("one prefix less");
    assert!(
        passes(&mut dp, "198.18.8.8"),
        "the removed prefix still dropped"
    );
    assert!(!passes(&mut dp, "198.18.7.7"));
    let usage = dp.map_usage().expect("map usage");
    let src = usage
        .iter()
        .find(|u| u.name == "MOAT_CSRC_V1")
        .expect("source trie reported");
    assert!(src.entries >= 400_000, "both generations: {src:?}");
    assert!(src.bytes > 0, "no kernel memory read: {src:?}");
}

/// Whether a TCP connection from the client to the worker's port 8080 is
/// accepted (a denied SYN is dropped: the attempt times out).
fn client_connects(client: &moat_tests::Netns) -> bool {
    let to: std::net::SocketAddr = "198.18.1.1:8080".parse().expect("address");
    moat_tests::in_netns(&client.name, move || {
        std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(300)).is_ok()
    })
}

/// The agent never exits on a set that does not fit: refused as its first
/// policy, it stays up and applies the next one that fits; refused later,
/// the policy in force keeps judging (the client it denies stays denied).
#[test]
fn the_agent_refuses_a_set_over_the_capacity_and_stays_up() {
    let (worker, client) = moat_tests::worker_and_client("mbw", "mbc", false);
    moat_tests::listen(&worker, "0.0.0.0:8080");
    let dir = TempDir::new("moat-blocklist-agent");
    let policies = dir.0.join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    let write = |text: String| {
        let tmp = dir.0.join("policy.yaml.tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, policies.join("policy.yaml")).expect("rename");
    };
    write(blocklist_yaml(3000, &[]));
    let mut args: Vec<std::ffi::OsString> = [
        "--iface",
        "eth1",
        "--node",
        NODE,
        "--profile",
        "none",
        "--addr-prefixes",
        "4096",
        "--state-file",
        "none",
        "--metrics-addr",
        "none",
    ]
    .map(std::ffi::OsString::from)
    .to_vec();
    args.extend([
        "--policies".into(),
        policies.clone().into_os_string(),
        "--status-file".into(),
        dir.0.join("status.json").into_os_string(),
        "--socket".into(),
        dir.0.join("events.sock").into_os_string(),
    ]);
    let mut agent = moat_tests::AgentProcess::spawn(&worker, args, Some(moat_tests::PinDir::new()));
    let line = agent.wait_for_log("nothing is enforced until");
    assert!(
        line.contains("MOAT_CSRC_V1") && line.contains("--addr-prefixes"),
        "{line}"
    );

    write(blocklist_yaml(10, &["198.18.1.2/32"]));
    agent.wait_for_log("ready:");
    assert!(!client_connects(&client), "the listed client connected");

    // Over the capacity, and it would allow the client: refused, the
    // policy in force stays.
    write(blocklist_yaml(3000, &[]));
    let line = agent.wait_for_log("the policy in force stays");
    assert!(line.contains("needs 3001 source prefixes"), "{line}");
    assert!(!client_connects(&client), "the refused set took effect");
    write(blocklist_yaml(10, &[]));
    agent.wait_for_log("applied: policy generation");
    assert!(client_connects(&client), "the unlisted client was denied");
    agent.stop();
}
