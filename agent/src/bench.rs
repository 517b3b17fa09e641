//! `moat bench`: the cost of judging one packet, measured with
//! `BPF_PROG_TEST_RUN` on the loaded XDP program (the kernel's own mean
//! over `repeat` runs), reported as the median of several such runs.
//!
//! The comparison with iptables and nftables (`moat bench` without
//! `--policies`) lives in the submodules: `rules` (the generator and its
//! renderings), `lab` (namespaces), `engines`,
//! `suite` (the measurements) and `report`.

pub mod cli;
pub mod engines;
pub mod lab;
pub mod report;
pub mod rules;
pub mod suite;

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    compile::compile,
    dataplane::{
        frame::{arp_request, Packet},
        Dataplane,
    },
    policy::PolicySet,
};

/// One measured packet.
#[derive(Debug, Serialize)]
pub struct Measurement {
    pub case: &'static str,
    /// "pass" or "drop".
    pub verdict: &'static str,
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    pub runs: u32,
    pub repeat: u32,
}

/// The packets measured: a non-IP frame, two denies (first policy, and a
/// walk through every rule to the default deny), an allow by policy that
/// creates no conntrack entry, and an established flow.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("non-IP (ARP): pass", arp_request()),
        (
            "deny by the first policy's rule (tcp from a watched net)",
            Packet::tcp("198.18.66.7", 40000, "198.18.1.1", 52311, 0x02).frame(),
        ),
        (
            "deny after every rule: default deny (tcp :22)",
            Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 22, 0x02).frame(),
        ),
        (
            "allow by policy, untracked (ICMPv6 neighbour solicitation)",
            Packet::icmp("2001:db8:1::2", "2001:db8:1::1", 135, 0).frame(),
        ),
        (
            "allow, established flow (tcp :52311, conntrack hit)",
            Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 52311, 0x10).frame(),
        ),
    ]
}

/// Measures every case against `set` compiled for `iface` of `node`.
pub fn run(
    set: &PolicySet,
    node: &str,
    iface: &str,
    repeat: u32,
    runs: u32,
) -> anyhow::Result<Vec<Measurement>> {
    let compiled = compile(set, node, &[iface.to_string()])?;
    let table = compiled.ifaces.get(iface).with_context(|| {
        format!("no HostEndpoint of node {node} names {iface}: nothing to measure")
    })?;
    let mut dataplane = Dataplane::load()?;
    // BPF_PROG_TEST_RUN runs as if on the loopback device, ifindex 1.
    dataplane.apply(&BTreeMap::from([(1, table.clone())]), 1)?;
    let mut out = Vec::new();
    for (case, frame) in cases() {
        let mut samples = Vec::new();
        let mut action = 0;
        for _ in 0..runs.max(1) {
            let (a, mean) = dataplane.test_ingress(&frame, repeat)?;
            action = a;
            samples.push(mean.as_nanos() as f64);
            // Deny events fill the ring buffer; empty it between runs.
            dataplane.drain_events();
        }
        samples.sort_by(f64::total_cmp);
        out.push(Measurement {
            case,
            verdict: if action == 2 { "pass" } else { "drop" },
            median_ns: samples[samples.len() / 2],
            min_ns: samples[0],
            max_ns: samples[samples.len() - 1],
            runs: runs.max(1),
            repeat,
        });
    }
    Ok(out)
}
