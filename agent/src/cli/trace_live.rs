//! `moat trace` against what the node enforces right now.
//!
//! Running the node's program itself would write production state: a
//! conntrack entry that lets the replies through, a deny event SREs would
//! see in `moat tail`, counters, metrics, event token buckets. So the trace
//! loads a copy of the same eBPF object whose maps the programs only read
//! (the interface table, the rules, the class maps, the node's addresses)
//! are the running agent's pinned maps, and whose maps the programs write
//! (connection tracking, fragments, events, counters, rule counters, event
//! buckets and rate) are private and fresh. The tracked flow the packet
//! belongs to, if any, is copied (read only) from the node's conntrack
//! map, so an established connection is judged as the node judges it.
//! Nothing is ever created in, written to or removed from the pin
//! directory.

use std::{net::IpAddr, path::Path};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs, ProgramInfo, SchedClassifier, TestRun, TestRunOptions, Xdp,
    },
    Ebpf, EbpfLoader,
};
use moat_common::{
    counter, direction, ip_proto, map_names, program_names, EventRate, FlowKey, FlowState,
    IfaceConfig, IFACE_KNOWS_LOCAL,
};
use serde::Serialize;

use crate::{
    cli::{
        check,
        trace::{agrees, decision_path, frame, kernel_answer, resource, Trace, ICMP_REST},
    },
    dataplane::{self, EBPF_OBJECT},
    policy::{
        packet_spec,
        reference::{Fields, Query},
        PolicySet,
    },
};

/// The maps the programs only read: the trace copy uses the node's own.
pub const READ_ONLY: [&str; 9] = [
    map_names::IFACES,
    map_names::RULES,
    map_names::CLASS_SRC,
    map_names::CLASS_DST,
    map_names::CLASS_SPORT,
    map_names::CLASS_DPORT,
    map_names::CLASS_PROTO,
    map_names::CLASS_WORDS,
    map_names::LOCAL_ADDRS,
];

/// Capacities of the trace copy's private maps (one packet is judged).
const TRACE_FLOWS: u32 = 64;
const TRACE_FRAGMENTS: u32 = 16;
const TRACE_EVENT_SOURCES: u32 = 16;

/// The program attached on the node, and whether it is the one traced.
#[derive(Debug, Serialize)]
pub struct Program {
    /// Kernel id of the program behind the node's pinned link.
    pub id: u32,
    /// Its tag (hash of its instructions, map references left out).
    pub tag: String,
    /// Tag of this binary's program, the one traced.
    pub traced_tag: String,
    pub same: bool,
}

/// What to trace, and where the node's state is.
pub struct LiveTrace<'a> {
    /// The running agent's bpffs pin directory.
    pub pin_dir: &'a Path,
    /// The agent's saved state (policy names), if any.
    pub state_file: Option<&'a Path>,
    pub iface: &'a str,
    /// `direction::INGRESS` or `EGRESS`.
    pub dir: u8,
    /// The packet grammar (`packet_spec`).
    pub packet: &'a str,
    /// `--forwarded` as given (the node's addresses decide; a mismatch is
    /// noted).
    pub forwarded: bool,
    /// The policy set and node name to judge with the reference, if given.
    pub reference: Option<(&'a PolicySet, &'a str)>,
}

fn tag(t: u64) -> String {
    format!("{t:016x}")
}

fn v6_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The conntrack keys of both orientations of the flow the traced packet
/// belongs to, as the kernel program computes them (`ebpf/src/conntrack.rs`
/// `flow_key` and `reverse`).
pub fn flow_keys(f: &Fields) -> [FlowKey; 2] {
    let icmp = matches!(
        (f.protocol, f.src),
        (ip_proto::ICMP, IpAddr::V4(_)) | (ip_proto::ICMPV6, IpAddr::V6(_))
    );
    let (sport, dport) = if icmp {
        let v4 = f.src.is_ipv4();
        // Replies share their request's key; only queries and replies
        // carry an identifier (the traced frame's is `ICMP_REST`).
        let (query, request) = match (v4, f.icmp_type) {
            (true, 8 | 13 | 15 | 17) | (false, 128 | 139) => (true, f.icmp_type),
            (true, 0) => (true, 8),
            (true, 14) => (true, 13),
            (true, 16) => (true, 15),
            (true, 18) => (true, 17),
            (false, 129) => (true, 128),
            (false, 140) => (true, 139),
            (_, t) => (false, t),
        };
        let id = if query {
            u16::from_be_bytes([ICMP_REST[0], ICMP_REST[1]])
        } else {
            0
        };
        (id, u16::from(request))
    } else if moat_common::has_ports(f.protocol) {
        (f.sport, f.dport)
    } else {
        (0, 0)
    };
    let key = FlowKey {
        src: v6_bytes(f.src),
        dst: v6_bytes(f.dst),
        sport,
        dport,
        protocol: f.protocol,
        _pad: [0; 3],
    };
    let (rs, rd) = if icmp { (sport, dport) } else { (dport, sport) };
    let reverse = FlowKey {
        src: key.dst,
        dst: key.src,
        sport: rs,
        dport: rd,
        ..key
    };
    [key, reverse]
}

/// The program behind the link pinned at `link`.
fn live_program(link: &Path) -> anyhow::Result<ProgramInfo> {
    let pinned = PinnedLink::from_pin(link)
        .with_context(|| format!("opening the pinned link {}", link.display()))?;
    let id = FdLink::from(pinned)
        .info()
        .with_context(|| format!("reading the link {}", link.display()))?
        .program_id();
    loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .with_context(|| format!("the program (id {id}) behind {} is gone", link.display()))
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// `struct __sk_buff` for `BPF_PROG_TEST_RUN` of the TC program: all zero
/// but `ifindex` (the kernel then runs the program as if the packet left
/// that device of the caller's namespace).
fn sk_buff(ifindex: u32) -> Vec<u8> {
    // Fields before `ifindex`: len, pkt_type, mark, queue_mapping, protocol,
    // vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex.
    let mut words = [0u32; 11];
    words[10] = ifindex;
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Live: judges `t.packet` with the policy the node enforces on `t.iface`,
/// on a copy of the node's program reading the node's pinned maps.
pub fn trace_live(t: &LiveTrace) -> anyhow::Result<Trace> {
    let fields = packet_spec::parse(t.packet)?;
    let (link, ifindex) = check_pins(t)?;
    let (mut ebpf, name, live, traced) = load_copy(t, &link)?;
    let mut notes = Vec::new();
    let program = compare_programs(t, &live, &traced, &mut notes)?;
    let (config, forwarded) = node_view(&mut ebpf, t, &fields, ifindex, &mut notes)?;
    copy_flow_state(&mut ebpf, t, &fields, &mut notes)?;
    let passed = run_copy(&ebpf, name, t.dir, &frame(&fields), ifindex)?;
    let (path, moved_names, events) = read_results(&mut ebpf, t.dir)?;
    let generation = config.map(|c| c.generation);
    let names = policy_names(t.state_file, generation, &mut notes);
    let set = t.reference.map(|(s, _)| s);
    let name = |id: u32| names.as_ref()?.get(id as usize).cloned();
    let kernel = kernel_answer(passed, &events, name, |n| match set {
        Some(set) => resource(set, n),
        None => n.to_string(),
    });

    let (reference, agree) = match t.reference {
        None => (None, None),
        Some((set, node)) => {
            let established = path == counter::NAMES[counter::CONNTRACK_ALLOWED as usize];
            let query = Query {
                forwarded,
                established,
            };
            let answer = check::answer(set, node, t.iface, t.dir, t.packet, query)?;
            let agree = agrees(&kernel, &answer, names.is_some());
            if names.is_none() {
                notes.push("the deciding policy's name is not compared (names unknown); its rule index and the verdict are".into());
            }
            (Some(answer), Some(agree))
        }
    };
    Ok(Trace {
        mode: "live",
        kernel,
        path,
        counters: moved_names,
        reference,
        agree,
        program: Some(program),
        generation,
        notes,
    })
}

/// The node's pins `t` needs, checked before anything is loaded (aya
/// would create a map that is not pinned yet), and the interface's index.
fn check_pins(t: &LiveTrace) -> anyhow::Result<(std::path::PathBuf, u32)> {
    let pins = t.pin_dir;
    let link = dataplane::link_pin(pins, t.iface, t.dir);
    if !link.exists() {
        bail!(
            "nothing enforced on {}: no moat pins at {} ({} has no {} link: is the agent running with --pin-dir {} and --iface {}?); use --offline --policies DIR to trace DIR's policy instead",
            t.iface,
            link.display(),
            pins.display(),
            if t.dir == direction::INGRESS { "XDP" } else { "TC egress" },
            pins.display(),
            t.iface
        );
    }
    // aya creates and pins a map that is not pinned yet: never in the
    // node's pin directory.
    for name in READ_ONLY {
        let path = pins.join(name);
        if !path.exists() {
            bail!(
                "{} has no map {name}: the agent there is of another version (its map layout differs) or is not set up; nothing traced",
                pins.display()
            );
        }
    }
    let ifindex = nix::net::if_::if_nametoindex(t.iface).with_context(|| {
        format!(
            "interface {} is not in this network namespace (run moat trace where the agent runs)",
            t.iface
        )
    })?;
    Ok((link, ifindex))
}

/// Loads the trace copy of the object: the node's read-only maps from its
/// pins, private writable ones; returns it with the program's name, the
/// node's attached program and the copy's.
fn load_copy(
    t: &LiveTrace,
    link: &Path,
) -> anyhow::Result<(aya::Ebpf, &'static str, ProgramInfo, ProgramInfo)> {
    let pins = t.pin_dir;
    let live = live_program(link)?;
    let rules_cap = MapInfo::from_pin(pins.join(map_names::RULES))
        .context("reading the node's rule map")?
        .max_entries();

    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::CONNTRACK, TRACE_FLOWS)
        .map_max_entries(map_names::CT_PENDING, TRACE_FLOWS)
        .map_max_entries(map_names::FRAGMENTS, TRACE_FRAGMENTS)
        .map_max_entries(map_names::EVENT_BUCKETS, TRACE_EVENT_SOURCES)
        .map_max_entries(map_names::RULE_STATS, rules_cap);
    for name in READ_ONLY {
        loader.map_pin_path(name, pins.join(name));
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the trace copy of the eBPF object")?;
    let name = if t.dir == direction::INGRESS {
        program_names::INGRESS
    } else {
        program_names::EGRESS
    };
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?;
    let traced = match program {
        aya::programs::Program::Xdp(p) => {
            p.load().with_context(|| format!("loading {name}"))?;
            p.info()
        }
        aya::programs::Program::SchedClassifier(p) => {
            p.load().with_context(|| format!("loading {name}"))?;
            p.info()
        }
        _ => bail!("{name} is neither XDP nor TC"),
    }
    .with_context(|| format!("reading {name}'s info"))?;

    Ok((ebpf, name, live, traced))
}

/// The trace copy must read exactly the maps the node's program reads;
/// the two programs' identities (tags) for the answer.
fn compare_programs(
    t: &LiveTrace,
    live: &ProgramInfo,
    traced: &ProgramInfo,
    notes: &mut Vec<String>,
) -> anyhow::Result<Program> {
    let pins = t.pin_dir;
    // The trace copy must read exactly the maps the node's program reads.
    let live_maps = live.map_ids().ok().flatten().unwrap_or_default();
    let traced_maps = traced.map_ids().ok().flatten().unwrap_or_default();
    for m in READ_ONLY {
        let id = MapInfo::from_pin(pins.join(m))
            .with_context(|| format!("reading {}", pins.join(m).display()))?
            .id();
        anyhow::ensure!(
            traced_maps.contains(&id),
            "the trace copy does not use the pinned map {m} (id {id}): not tracing on a copy of the node's state"
        );
        if !live_maps.contains(&id) {
            notes.push(format!(
                "the program attached on {} (id {}) does not read the map pinned as {m} (id {id}): the pins are not what it enforces",
                t.iface,
                live.id()
            ));
        }
    }
    Ok(Program {
        id: live.id(),
        tag: tag(live.tag()),
        traced_tag: tag(traced.tag()),
        same: live.tag() == traced.tag(),
    })
}

/// The node's view of the interface and of the packet's own address:
/// its interface entry, and whether the packet is forwarded traffic.
fn node_view(
    ebpf: &mut aya::Ebpf,
    t: &LiveTrace,
    fields: &Fields,
    ifindex: u32,
    notes: &mut Vec<String>,
) -> anyhow::Result<(Option<IfaceConfig>, bool)> {
    let ifaces: HashMap<MapData, u32, IfaceConfig> = take(ebpf, map_names::IFACES)?;
    let config = ifaces.get(&ifindex, 0).ok();
    let local: HashMap<MapData, [u8; 16], u8> = take(ebpf, map_names::LOCAL_ADDRS)?;
    let own_end = if t.dir == direction::INGRESS {
        fields.dst
    } else {
        fields.src
    };
    let knows_local = config.is_some_and(|c| c.flags & IFACE_KNOWS_LOCAL != 0);
    let forwarded = knows_local && local.get(&v6_bytes(own_end), 0).is_err();
    if forwarded != t.forwarded {
        notes.push(format!(
            "judged as {}: {own_end} is {}one of the node's addresses{}",
            if forwarded {
                "forwarded traffic"
            } else {
                "traffic to or from the host"
            },
            if forwarded { "not " } else { "" },
            if knows_local {
                ""
            } else {
                " (the agent does not tell the node's addresses to the program: every packet is host traffic)"
            }
        ));
    }
    if config.is_none() {
        notes.push(format!(
            "{} (ifindex {ifindex}) has no entry in the node's interface table: not enforced",
            t.iface
        ));
    }

    Ok((config, forwarded))
}

/// The copy's private writable state: every event written, and the
/// packet's flow as the node tracks it (confirmed or waiting for a reply).
fn copy_flow_state(
    ebpf: &mut aya::Ebpf,
    t: &LiveTrace,
    fields: &Fields,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let pins = t.pin_dir;
    // the node tracks it.
    let mut rate: Array<MapData, EventRate> = take(ebpf, map_names::EVENT_RATE)?;
    rate.set(
        0,
        EventRate {
            per_second: 0,
            burst: 1,
            ..EventRate::default()
        },
        0,
    )
    .context("setting the trace copy's event rate")?;
    let mut copied = 0;
    // Confirmed flows and those waiting for their reply, each into the
    // copy's own table of the same name.
    for name in [map_names::CONNTRACK, map_names::CT_PENDING] {
        let mut conntrack: HashMap<MapData, FlowKey, FlowState> = take(ebpf, name)?;
        let node_ct_path = pins.join(name);
        if !node_ct_path.exists() {
            continue;
        }
        let node_ct = MapData::from_pin(&node_ct_path)
            .with_context(|| format!("opening {}", node_ct_path.display()))?;
        let node_ct: HashMap<MapData, FlowKey, FlowState> =
            HashMap::try_from(Map::LruHashMap(node_ct))
                .with_context(|| format!("{} as a conntrack map", node_ct_path.display()))?;
        for key in flow_keys(fields) {
            // A userspace lookup leaves the LRU order alone.
            if let Ok(state) = node_ct.get(&key, 0) {
                conntrack
                    .insert(key, state, 0)
                    .context("copying the packet's tracked flow")?;
                copied += 1;
            }
        }
    }
    if copied > 0 {
        notes.push(format!(
            "the node tracks this packet's flow ({copied} orientation{} copied from its conntrack map)",
            if copied == 1 { "" } else { "s" }
        ));
    }

    Ok(())
}

/// Runs the copy once on `data` arriving on (or leaving by) `ifindex`:
/// whether it passed.
fn run_copy(
    ebpf: &aya::Ebpf,
    name: &str,
    dir: u8,
    data: &[u8],
    ifindex: u32,
) -> anyhow::Result<bool> {
    Ok(if dir == direction::INGRESS {
        let prog: &Xdp = ebpf
            .program(name)
            .context("the ingress program")?
            .try_into()
            .context("the ingress program is not XDP")?;
        let ctx = crate::dataplane::testrun::xdp_md(data.len(), ifindex);
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of the ingress program")?;
        result.return_value == 2 // XDP_PASS
    } else {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .context("the egress program")?
            .try_into()
            .context("the egress program is not TC")?;
        let ctx = sk_buff(ifindex);
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of the egress program")?;
        result.return_value as i32 == -1 // TC_ACT_UNSPEC: on
    })
}

/// What the run moved: the decision path, the counters that moved, and
/// the events it wrote.
fn read_results(
    ebpf: &mut aya::Ebpf,
    dir: u8,
) -> anyhow::Result<(String, Vec<&'static str>, Vec<moat_common::DenyEvent>)> {
    let counters: PerCpuArray<MapData, u64> = take(ebpf, map_names::COUNTERS)?;
    let moved: Vec<u64> = (0..counter::COUNT)
        .map(|c| {
            counters
                .get(&counter::index(dir, c), 0)
                .map(|v| v.iter().sum())
        })
        .collect::<Result<_, _>>()
        .context("reading the trace copy's counters")?;
    let (path, moved_names) = decision_path(&moved);
    let mut ring: RingBuf<MapData> = take(ebpf, map_names::EVENTS)?;
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(e) = crate::dataplane::decode_event(&item) {
            events.push(e);
        }
    }

    Ok((path, moved_names, events))
}

/// Policy ids to names, from the agent's saved state (noting when it is
/// missing or of another generation).
fn policy_names(
    state_file: Option<&Path>,
    generation: Option<u32>,
    notes: &mut Vec<String>,
) -> Option<Vec<String>> {
    match state_file {
        None => {
            notes.push("no --state-file: policy names unknown".into());
            None
        }
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<crate::dataplane::state::SavedState>(&b)
                    .map_err(|e| e.to_string())
            }) {
            Err(e) => {
                notes.push(format!(
                    "policy names unknown: no usable saved state at {} ({e})",
                    path.display()
                ));
                None
            }
            Ok(s) => {
                if Some(s.generation) != generation {
                    notes.push(format!(
                        "the saved state at {} is of generation {}, the node enforces {}: policy names may be stale",
                        path.display(),
                        s.generation,
                        generation.map_or("none".into(), |g| g.to_string())
                    ));
                }
                Some(s.policy_names)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_keys_follow_the_kernel() {
        let f = packet_spec::parse("tcp 198.18.1.2:40000 -> 198.18.1.1:22").unwrap();
        let [k, r] = flow_keys(&f);
        assert_eq!((k.sport, k.dport, k.protocol), (40000, 22, 6));
        assert_eq!((r.sport, r.dport), (22, 40000));
        assert_eq!((r.src, r.dst), (k.dst, k.src));
        assert_eq!(&k.src[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        // An echo reply shares its request's key: identifier, request type;
        // the reverse keeps the ports.
        let f = packet_spec::parse("icmp 198.18.1.2 -> 198.18.1.1 type 0").unwrap();
        let [k, r] = flow_keys(&f);
        assert_eq!((k.sport, k.dport), (1, 8));
        assert_eq!((r.sport, r.dport), (1, 8));
        let f = packet_spec::parse("icmpv6 2001:db8::1 -> 2001:db8::2 type 129").unwrap();
        assert_eq!(flow_keys(&f)[0].dport, 128);
        let f = packet_spec::parse("proto 112 198.18.1.2 -> 198.18.1.1").unwrap();
        assert_eq!((flow_keys(&f)[0].sport, flow_keys(&f)[0].dport), (0, 0));
    }
}
