//! `moat bench`: every measurement of the comparison, in one run.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use moat_common::{counter, direction};
use serde::Serialize;

use super::{
    engines::{self, Engine},
    lab::{self, Lab},
    rules::{Action, Proto, Rule, RuleSet, Shape, HOST_ADDR, IFACE, NODE, STRANGER},
};
use crate::{
    compile::compile,
    dataplane::{
        frame::Packet,
        testrun::{Baseline, InNetns, RawXdp, Took, XDP_PASS},
        Dataplane,
    },
    policy,
};

const XDP_DROP: u32 = 1;

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub engines: Vec<Engine>,
    pub rules: Vec<usize>,
    pub shapes: Vec<Shape>,
    /// Packets sent per throughput figure, about this long in all.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// BPF_PROG_TEST_RUN: runs per call, calls per figure.
    pub repeat: u32,
    pub runs: u32,
    /// Live-frame calls per throughput figure.
    pub live_runs: u32,
    pub seed: u64,
    pub out: PathBuf,
    pub quick: bool,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A median with its spread, in ns.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Spread {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// One classification figure (BPF_PROG_TEST_RUN).
#[derive(Clone, Debug, Serialize)]
pub struct Classification {
    /// "moat-xdp", "xdp-pass" or "xdp-parse-pass".
    pub program: String,
    pub shape: Shape,
    pub rules: usize,
    pub case: &'static str,
    pub verdict: Option<&'static str>,
    pub ns: Option<Spread>,
    pub unsupported: Option<String>,
}

/// One through-the-stack figure (live frames).
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// An engine's name, or "no-filter" (the stack alone).
    pub engine: String,
    pub rules: usize,
    /// "denied" or "allowed".
    pub traffic: &'static str,
    pub packets_sent: u64,
    /// Packets the engine's own counter attributes to the expected
    /// decision (final drop; established/allowed), over the measured calls.
    pub packets_counted: Option<u64>,
    /// CPU time of the injecting thread per packet (the frames are
    /// processed in its context): leaves out other processes' time.
    pub ns_per_packet: Option<Spread>,
    /// Wall-clock time per packet (includes other processes' time).
    pub wall_ns_per_packet: Option<Spread>,
    pub mpps: Option<f64>,
    pub unsupported: Option<String>,
}

/// Time to install a rule set, and a one-rule change.
#[derive(Clone, Debug, Serialize)]
pub struct Update {
    pub engine: String,
    pub rules: usize,
    pub full_ms: Option<f64>,
    pub change_ms: Option<f64>,
    /// moat only: compile (YAML to tables) and apply (tables to the
    /// kernel, atomic switch) parts of `full_ms`.
    pub compile_ms: Option<f64>,
    pub apply_ms: Option<f64>,
    /// moat only: compile and apply of one-rule changes from the set in
    /// force, both banks holding it: the rule in front (`change_ms`), one
    /// rule's port changed in the middle, one rule appended at the end.
    pub change: Option<Split>,
    pub port_change: Option<Split>,
    pub append: Option<Split>,
    pub unsupported: Option<String>,
}

/// Compile and apply parts of one update, ms.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Split {
    pub compile_ms: f64,
    pub apply_ms: f64,
}

impl Split {
    pub fn total(&self) -> f64 {
        self.compile_ms + self.apply_ms
    }
}

/// moat's memory at a rule count.
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub rules: usize,
    /// Kernel memory of the BPF maps this process holds (fdinfo memlock).
    pub map_bytes: u64,
    /// Resident set of the process after compiling and applying.
    pub rss_bytes: u64,
    pub unsupported: Option<String>,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub bpf_jit_enable: String,
    pub bpf_jit_harden: String,
    pub date_utc: String,
    pub load_avg_before: String,
}

/// A line of the bar.
#[derive(Clone, Debug, Serialize)]
pub struct Bar {
    pub claim: String,
    pub wanted: f64,
    pub measured: Option<f64>,
    pub pass: bool,
    /// `pass`, `miss`, or `not run` (this run measured no figure for it,
    /// e.g. `--quick`, which stops below 10,000 rules).
    pub status: &'static str,
    pub detail: String,
}

/// The deny event path: what an event costs, how many a reader drains,
/// and the accounting under a flood.
#[derive(Clone, Debug, Serialize)]
pub struct EventPath {
    /// Rules of the set measured on.
    pub rules: usize,
    /// A denied packet (no match), its event written (a token bucket that
    /// never runs out; BPF_PROG_TEST_RUN, repeats small enough for the ring
    /// buffer).
    pub deny_event_written_ns: Spread,
    /// The same packet, its event suppressed by the rate limit.
    pub deny_event_suppressed_ns: Spread,
    /// Events read per second by a reader draining the ring buffer between
    /// bursts of live frames, no rate limit (kernel to agent process).
    pub reader_events_per_s: f64,
    /// Flood of live frames with the agent's default limit (100/s, burst
    /// 200): packets, denied, events emitted, suppressed, lost.
    pub flood_packets: u64,
    pub flood_denied: u64,
    pub flood_emitted: u64,
    pub flood_suppressed: u64,
    pub flood_lost: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub options: Options,
    pub event_path: Option<EventPath>,
    pub classification: Vec<Classification>,
    pub throughput: Vec<Throughput>,
    pub updates: Vec<Update>,
    pub memory: Vec<Memory>,
    pub bar: Vec<Bar>,
    pub limits: Vec<String>,
}

/// What the benchmark needs and lacks; empty when it can run.
pub fn missing(engines: &[Engine]) -> Vec<String> {
    let mut out = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        out.push("root (BPF programs, network namespaces)".to_string());
    }
    let mut needs = vec![("ip", "iproute2")];
    for e in engines {
        needs.extend_from_slice(e.needs());
    }
    needs.sort();
    needs.dedup();
    for (bin, package) in needs {
        if !lab::have(bin) {
            out.push(format!("{bin} (Debian package {package})"));
        }
    }
    out
}

/// `p` as a 64-byte frame (Ethernet padding), with its TCP or UDP
/// checksum filled in: Linux conntrack takes a packet with a bad one as
/// INVALID.
fn frame64(p: &Packet) -> Vec<u8> {
    let mut f = p.frame();
    if f.len() >= 34 && f[12..14] == [0x08, 0x00] {
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let l4 = 14 + ihl;
        let at = match f[23] {
            6 => Some(l4 + 16),
            17 => Some(l4 + 6),
            _ => None,
        };
        if let Some(at) = at.filter(|&at| at + 2 <= 14 + total) {
            f[at..at + 2].copy_from_slice(&[0, 0]);
            let len = (14 + total - l4) as u16;
            let mut pseudo = Vec::with_capacity(12 + usize::from(len));
            pseudo.extend_from_slice(&f[26..34]);
            pseudo.extend_from_slice(&[0, f[23]]);
            pseudo.extend_from_slice(&len.to_be_bytes());
            pseudo.extend_from_slice(&f[l4..14 + total]);
            let sum = crate::dataplane::frame::checksum(&pseudo);
            let sum = if sum == 0 && f[23] == 17 { 0xffff } else { sum };
            f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
    }
    if f.len() < 64 {
        f.resize(64, 0);
    }
    f
}

fn packet_for(src: Ipv4Addr, proto: Proto, sport: u16, dport: u16, tcp_flags: u8) -> Packet {
    let (s, d) = (src.to_string(), HOST_ADDR.to_string());
    match proto {
        Proto::Udp => Packet::udp(&s, sport, &d, dport),
        _ => Packet::tcp(&s, sport, &d, dport, tcp_flags),
    }
}

/// The packet every engine must deny by default: from a source no rule
/// names, to :22 (no rule opens it), after walking every rule.
fn no_match_frame() -> Vec<u8> {
    frame64(&Packet::tcp(
        &STRANGER.to_string(),
        40000,
        &HOST_ADDR.to_string(),
        22,
        0x02,
    ))
}

/// The last generated UDP allow rule of `set` (allowed traffic).
fn last_udp_allow(set: &RuleSet) -> Option<Rule> {
    set.generated()
        .iter()
        .rev()
        .find(|r| r.action == Action::Allow && r.proto == Proto::Udp)
        .copied()
}

fn compile_set(set: &RuleSet) -> anyhow::Result<crate::compile::CompiledIface> {
    let loaded = policy::load_str(std::path::Path::new("bench.yaml"), &set.moat_yaml());
    if let Some(e) = loaded.errors.first() {
        anyhow::bail!("the generated rule set does not load: {e}");
    }
    let compiled = compile(&loaded.set, NODE, &[IFACE.to_string()])?;
    compiled
        .ifaces
        .get(IFACE)
        .cloned()
        .context("the generated HostEndpoint compiled to nothing")
}

fn ingress(dp: &Dataplane, which: u32) -> anyhow::Result<u64> {
    Ok(dp.counters()?[direction::INGRESS as usize][which as usize])
}

fn test_spread(
    mut run: impl FnMut() -> anyhow::Result<(u32, Duration)>,
    runs: u32,
) -> anyhow::Result<(u32, Spread)> {
    let mut samples = Vec::new();
    let mut action = 0;
    for _ in 0..runs {
        let (a, mean) = run()?;
        action = a;
        samples.push(mean.as_nanos() as f64);
    }
    Ok((action, Spread::of(samples)))
}

fn verdict_name(action: u32) -> &'static str {
    match action {
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        _ => "other",
    }
}

/// The device the classification figures are applied on (and live
/// frames of the event path arrive on): this namespace's loopback.
const LOOPBACK: u32 = 1;

/// The deny event path on the realistic set of the smallest rule count.
fn event_path(dp: &mut Dataplane, opts: &Options) -> anyhow::Result<EventPath> {
    use moat_common::{counter, direction};
    let n = opts.rules.iter().copied().min().unwrap_or(1);
    let set = RuleSet::generate(Shape::Realistic, n, opts.seed).map_err(anyhow::Error::msg)?;
    dp.apply(&BTreeMap::from([(LOOPBACK, compile_set(&set)?)]), 1)?;
    let frame = no_match_frame();
    // 8,000 events of 120 bytes (header included) fit the 1 MiB ring: each
    // is really written, none lost.
    let repeat = 8_000;
    // Both figures pay the per-source token bucket; a bucket this large
    // never runs out, so they differ by writing the event alone.
    dp.set_event_rate(10_000_000, 1_000_000)?;
    let (_, written) = test_spread(
        || {
            dp.drain_events();
            let r = dp.test_ingress(&frame, repeat)?;
            dp.drain_events();
            Ok(r)
        },
        opts.runs,
    )?;
    // One event per source per second: every repeat after the first is
    // suppressed.
    dp.set_event_rate(1, 1)?;
    let (_, suppressed) = test_spread(
        || {
            let r = dp.test_ingress(&frame, repeat)?;
            dp.drain_events();
            Ok(r)
        },
        opts.runs,
    )?;
    // A reader draining between bursts, no limit.
    dp.set_event_rate(0, 1)?;
    dp.drain_events();
    let started = std::time::Instant::now();
    let mut read = 0u64;
    while started.elapsed() < opts.duration.max(Duration::from_millis(200)) {
        dp.test_ingress_live(&frame, LOOPBACK, 4_000)?;
        read += dp.drain_events().len() as u64;
    }
    let reader_events_per_s = read as f64 / started.elapsed().as_secs_f64();
    // A flood with the agent's default limit.
    dp.set_event_rate(100, 200)?;
    dp.drain_events();
    let before = dp.counters()?[direction::INGRESS as usize];
    let flood_packets: u64 = if opts.duration < Duration::from_secs(1) {
        100_000
    } else {
        1_000_000
    };
    let mut left = flood_packets;
    while left > 0 {
        let chunk = left.min(100_000);
        dp.test_ingress_live(&frame, LOOPBACK, chunk as u32)?;
        dp.drain_events();
        left -= chunk;
    }
    let after = dp.counters()?[direction::INGRESS as usize];
    let delta = |c: u32| after[c as usize] - before[c as usize];
    let denied = delta(counter::END_OF_POLICIES_DENIED)
        + delta(counter::RULE_DENIED)
        + delta(counter::NO_PROFILE_DENIED);
    Ok(EventPath {
        rules: n,
        deny_event_written_ns: written,
        deny_event_suppressed_ns: suppressed,
        reader_events_per_s,
        flood_packets,
        flood_denied: denied,
        flood_emitted: delta(counter::EVENTS_EMITTED),
        flood_suppressed: delta(counter::EVENTS_SUPPRESSED),
        flood_lost: delta(counter::EVENTS_LOST),
    })
}

/// Classification cost of moat's XDP program through BPF_PROG_TEST_RUN.
fn classify(
    dp: &mut Dataplane,
    opts: &Options,
    shape: Shape,
    n: usize,
    out: &mut Vec<Classification>,
) -> anyhow::Result<()> {
    let set = RuleSet::generate(shape, n, opts.seed).map_err(anyhow::Error::msg)?;
    // Hits are measured on the rules turned into denies: an allowed packet
    // is tracked, and BPF_PROG_TEST_RUN's repeats would then measure the
    // established path instead of the rule.
    let denies = set.with_action(Action::Deny);
    let row = |case, verdict, ns, unsupported| Classification {
        program: "moat-xdp".into(),
        shape,
        rules: n,
        case,
        verdict,
        ns,
        unsupported,
    };
    let cases = [
        "first rule hit",
        "last rule hit",
        "no match (default deny)",
        "established flow",
    ];
    let applied =
        compile_set(&denies).and_then(|t| Ok(dp.apply(&BTreeMap::from([(LOOPBACK, t)]), 1)?));
    if let Err(e) = applied {
        for case in cases {
            out.push(row(case, None, None, Some(format!("{e:#}"))));
        }
        return Ok(());
    }
    let rules = denies.generated();
    let hit = |r: &Rule| {
        let (src, proto, sport, dport) = r.example();
        frame64(&packet_for(src, proto, sport, dport, 0x02))
    };
    for (case, frame) in [
        (cases[0], hit(&rules[0])),
        (cases[1], hit(&rules[n - 1])),
        (cases[2], no_match_frame()),
    ] {
        let (action, spread) = test_spread(
            || {
                let r = dp.test_ingress(&frame, opts.repeat)?;
                dp.drain_events();
                Ok(r)
            },
            opts.runs,
        )?;
        anyhow::ensure!(
            action == XDP_DROP,
            "moat passed the {case} packet it must deny ({shape:?}, {n} rules)"
        );
        out.push(row(case, Some(verdict_name(action)), Some(spread), None));
    }
    // Established: a flow an allow rule opened.
    let allow = set
        .generated()
        .iter()
        .rev()
        .find(|r| r.action == Action::Allow)
        .copied();
    let applied =
        compile_set(&set).and_then(|t| Ok(dp.apply(&BTreeMap::from([(LOOPBACK, t)]), 2)?));
    match (allow, applied) {
        (Some(r), Ok(())) => {
            dp.clear_conntrack()?;
            let (src, proto, sport, dport) = r.example();
            let open = frame64(&packet_for(src, proto, sport, dport, 0x02));
            let (a, _) = dp.test_ingress(&open, 1)?;
            anyhow::ensure!(a == XDP_PASS, "moat denied the packet its rule allows");
            let established = frame64(&packet_for(src, proto, sport, dport, 0x10));
            let (action, spread) = test_spread(
                || Ok(dp.test_ingress(&established, opts.repeat)?),
                opts.runs,
            )?;
            anyhow::ensure!(action == XDP_PASS, "moat denied an established flow");
            out.push(row(cases[3], Some("pass"), Some(spread), None));
        }
        (None, _) => out.push(row(
            cases[3],
            None,
            None,
            Some("no allow rule in the set".into()),
        )),
        (_, Err(e)) => out.push(row(cases[3], None, None, Some(format!("{e:#}")))),
    }
    Ok(())
}

fn baselines(opts: &Options, out: &mut Vec<Classification>) -> anyhow::Result<()> {
    let frame = no_match_frame();
    for (which, name) in [
        (Baseline::Pass, "xdp-pass"),
        (Baseline::ParsePass, "xdp-parse-pass"),
        (Baseline::ParseFlowLookup, "xdp-parse-flow-lookup"),
    ] {
        let prog = RawXdp::load(which)?;
        let (action, spread) = test_spread(|| prog.test_run(&frame, opts.repeat), opts.runs)?;
        out.push(Classification {
            program: name.into(),
            shape: Shape::Realistic,
            rules: 0,
            case: "any packet",
            verdict: Some(verdict_name(action)),
            ns: Some(spread),
            unsupported: None,
        });
    }
    Ok(())
}

/// Sends `opts.live_runs` calls of live frames; returns (packets sent,
/// CPU ns/packet, wall ns/packet).
fn live(
    opts: &Options,
    lab: &Lab,
    mut send: impl FnMut(u32) -> anyhow::Result<Took>,
) -> anyhow::Result<(u64, Spread, Spread)> {
    let _inside = InNetns::enter(&lab.name)?;
    // Calibrate: how many packets fill the duration.
    let probe = 2_000;
    let took = send(probe)?;
    let per_packet = took.wall.as_secs_f64() / f64::from(probe);
    let per_call = opts.duration.as_secs_f64() / f64::from(opts.live_runs.max(1));
    let packets = ((per_call / per_packet) as u32).clamp(2_000, 20_000_000);
    let (mut cpu, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..opts.live_runs.max(1) {
        let took = send(packets)?;
        cpu.push(took.cpu.as_nanos() as f64 / f64::from(packets));
        wall.push(took.wall.as_nanos() as f64 / f64::from(packets));
    }
    Ok((
        u64::from(probe) + u64::from(packets) * u64::from(opts.live_runs.max(1)),
        Spread::of(cpu),
        Spread::of(wall),
    ))
}

/// Makes Linux conntrack see `rule`'s example flow as established: the
/// host sends to the source first, so the packets measured are replies.
fn prime_linux_conntrack(lab: &Lab, rule: &Rule) -> anyhow::Result<()> {
    let (src, _, sport, dport) = rule.example();
    lab.ip(&[
        "neigh",
        "replace",
        &src.to_string(),
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        IFACE,
        "nud",
        "permanent",
    ])?;
    let _inside = InNetns::enter(&lab.name)?;
    let socket = UdpSocket::bind(SocketAddr::from((HOST_ADDR, dport)))
        .with_context(|| format!("binding {HOST_ADDR}:{dport} in the lab"))?;
    socket
        .send_to(b"moat bench", SocketAddr::from((src, sport)))
        .context("sending the flow's first packet")?;
    Ok(())
}

fn throughput_row(
    engine: &str,
    n: usize,
    traffic: &'static str,
    result: anyhow::Result<(u64, Spread, Spread, u64)>,
) -> Throughput {
    match result {
        Ok((sent, spread, wall, counted)) => Throughput {
            engine: engine.into(),
            rules: n,
            traffic,
            packets_sent: sent,
            packets_counted: Some(counted),
            mpps: Some(1e3 / spread.median),
            ns_per_packet: Some(spread),
            wall_ns_per_packet: Some(wall),
            unsupported: None,
        },
        Err(e) => Throughput {
            engine: engine.into(),
            rules: n,
            traffic,
            packets_sent: 0,
            packets_counted: None,
            ns_per_packet: None,
            wall_ns_per_packet: None,
            mpps: None,
            unsupported: Some(format!("{e:#}")),
        },
    }
}

fn accounted(engine: &str, what: &str, sent: u64, counted: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        counted == sent,
        "{engine}: {sent} {what} packets sent, its counter says {counted}: packets unaccounted for"
    );
    Ok(())
}

fn map_memory() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| t.contains("map_type:"))
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// moat at XDP through the stack, its update latency and memory.
fn moat_stack(
    dp: &mut Dataplane,
    opts: &Options,
    set: &RuleSet,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = set.n;
    let name = Engine::MoatXdp.name();
    let lab = Lab::new()?;
    // A full write: whatever the banks hold from the rule count before is
    // written again, as into fresh maps.
    dp.forget_written();
    let started = Instant::now();
    let compiled = compile_set(set);
    let compile_took = started.elapsed();
    let applied = compiled.and_then(|t| {
        let started = Instant::now();
        dp.apply(&BTreeMap::from([(lab.ifindex, t)]), 1)?;
        Ok(started.elapsed())
    });
    let apply_took = match applied {
        Ok(t) => t,
        Err(e) => {
            let why = format!("{e:#}");
            unsupported_engine(report, name, n, &why);
            report.memory.push(Memory {
                rules: n,
                map_bytes: map_memory(),
                rss_bytes: rss(),
                unsupported: Some(why),
            });
            return Ok(());
        }
    };
    report.memory.push(Memory {
        rules: n,
        map_bytes: map_memory(),
        rss_bytes: rss(),
        unsupported: None,
    });
    // One-rule changes in the steady state: both banks hold the set, the
    // change goes in, the set comes back (twice, so both banks hold it
    // again).
    let mut generation = 1;
    let mut update = |dp: &mut Dataplane, set: &RuleSet| -> anyhow::Result<Split> {
        generation += 1;
        let started = Instant::now();
        let table = compile_set(set)?;
        let compiled = started.elapsed();
        dp.apply(&BTreeMap::from([(lab.ifindex, table)]), generation)?;
        Ok(Split {
            compile_ms: ms(compiled),
            apply_ms: ms(started.elapsed() - compiled),
        })
    };
    let (front, _) = set.with_one_more();
    let changes = (|| {
        update(dp, set)?;
        let mut out = Vec::new();
        for changed in [front, set.with_port_changed(), set.with_one_appended()] {
            out.push(update(dp, &changed)?);
            update(dp, set)?;
            update(dp, set)?;
        }
        Ok::<_, anyhow::Error>(out)
    })();
    let split = |i: usize| changes.as_ref().ok().map(|c| c[i]);
    report.updates.push(Update {
        engine: name.into(),
        rules: n,
        full_ms: Some(ms(compile_took + apply_took)),
        change_ms: split(0).map(|s| s.total()),
        compile_ms: Some(ms(compile_took)),
        apply_ms: Some(ms(apply_took)),
        change: split(0),
        port_change: split(1),
        append: split(2),
        unsupported: changes
            .as_ref()
            .err()
            .map(|e| format!("one-rule change: {e:#}")),
    });
    dp.clear_conntrack()?;
    let ifindex = lab.ifindex;
    // Denied: the default deny after every rule.
    let deny = lab.addressed(&no_match_frame());
    let result = (|| {
        let before = ingress(dp, counter::END_OF_POLICIES_DENIED)?;
        let (sent, spread, wall) =
            live(opts, &lab, |k| Ok(dp.test_ingress_live(&deny, ifindex, k)?))?;
        dp.drain_events();
        let counted = ingress(dp, counter::END_OF_POLICIES_DENIED)? - before;
        accounted(name, "denied", sent, counted)?;
        Ok((sent, spread, wall, counted))
    })();
    report
        .throughput
        .push(throughput_row(name, n, "denied", result));
    let result = (|| {
        let rule = last_udp_allow(set).context("no UDP allow rule to send allowed traffic to")?;
        let (src, proto, sport, dport) = rule.example();
        let frame = lab.addressed(&frame64(&packet_for(src, proto, sport, dport, 0)));
        {
            let _inside = InNetns::enter(&lab.name)?;
            dp.test_ingress_live(&frame, ifindex, 1)?;
        }
        let before = ingress(dp, counter::CONNTRACK_ALLOWED)?;
        let (sent, spread, wall) =
            live(
                opts,
                &lab,
                |k| Ok(dp.test_ingress_live(&frame, ifindex, k)?),
            )?;
        let counted = ingress(dp, counter::CONNTRACK_ALLOWED)? - before;
        accounted(name, "allowed", sent, counted)?;
        Ok((sent, spread, wall, counted))
    })();
    report
        .throughput
        .push(throughput_row(name, n, "allowed", result));
    Ok(())
}

/// An engine that could not run at `n` rules: its throughput and update
/// rows say why.
fn unsupported_engine(report: &mut Report, name: &str, n: usize, why: &str) {
    for traffic in ["denied", "allowed"] {
        report.throughput.push(throughput_row(
            name,
            n,
            traffic,
            Err(anyhow::anyhow!("{why}")),
        ));
    }
    report.updates.push(Update {
        engine: name.into(),
        rules: n,
        full_ms: None,
        change_ms: None,
        compile_ms: None,
        apply_ms: None,
        change: None,
        port_change: None,
        append: None,
        unsupported: Some(why.to_string()),
    });
}

/// A Linux engine through the stack, and its update latency.
fn linux_stack(
    engine: Engine,
    opts: &Options,
    set: &RuleSet,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = set.n;
    let name = engine.name();
    let fail = |report: &mut Report, why: String| unsupported_engine(report, name, n, &why);
    if let Err(why) = engine.applies(set) {
        fail(report, why);
        return Ok(());
    }
    let lab = Lab::new()?;
    let full = match engine.install(&lab, set) {
        Ok(t) => t,
        Err(e) => {
            fail(report, format!("{e:#}"));
            return Ok(());
        }
    };
    let change = engine.change_one(&lab, set);
    report.updates.push(Update {
        engine: name.into(),
        rules: n,
        full_ms: Some(ms(full)),
        change_ms: change.as_ref().ok().map(|d| ms(*d)),
        compile_ms: None,
        apply_ms: None,
        change: None,
        port_change: None,
        append: None,
        unsupported: change.err().map(|e| format!("one-rule change: {e:#}")),
    });
    let generator = RawXdp::load(Baseline::Pass)?;
    let ifindex = lab.ifindex;
    let deny = lab.addressed(&no_match_frame());
    let result = (|| {
        let (before, _) = engine.counters(&lab)?;
        let (sent, spread, wall) = live(opts, &lab, |k| generator.live_run(&deny, ifindex, k))?;
        let counted = engine.counters(&lab)?.0 - before;
        accounted(name, "denied", sent, counted)?;
        Ok((sent, spread, wall, counted))
    })();
    report
        .throughput
        .push(throughput_row(name, n, "denied", result));
    let result = (|| {
        let rule = last_udp_allow(set).context("no UDP allow rule to send allowed traffic to")?;
        prime_linux_conntrack(&lab, &rule)?;
        let (src, proto, sport, dport) = rule.example();
        let frame = lab.addressed(&frame64(&packet_for(src, proto, sport, dport, 0)));
        let (_, before) = engine.counters(&lab)?;
        let (sent, spread, wall) = live(opts, &lab, |k| generator.live_run(&frame, ifindex, k))?;
        let counted = engine.counters(&lab)?.1 - before;
        accounted(name, "allowed", sent, counted)?;
        Ok((sent, spread, wall, counted))
    })();
    report
        .throughput
        .push(throughput_row(name, n, "allowed", result));
    Ok(())
}

/// The stack alone (no filter), measured beside the engines at each rule
/// count (the machine's noise drifts): what allowed traffic costs without
/// any engine, and what the stack does with the denied traffic's packet
/// when nothing drops it (answers the SYN with a RST).
fn no_filter(opts: &Options, set: &RuleSet, report: &mut Report) -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let generator = RawXdp::load(Baseline::Pass)?;
    let ifindex = lab.ifindex;
    let mut frames = vec![("denied", lab.addressed(&no_match_frame()))];
    if let Some(rule) = last_udp_allow(set) {
        let (src, proto, sport, dport) = rule.example();
        frames.push((
            "allowed",
            lab.addressed(&frame64(&packet_for(src, proto, sport, dport, 0))),
        ));
    }
    for (traffic, frame) in frames {
        let (sent, spread, wall) = live(opts, &lab, |k| generator.live_run(&frame, ifindex, k))?;
        report.throughput.push(Throughput {
            engine: "no-filter".into(),
            rules: set.n,
            traffic,
            packets_sent: sent,
            packets_counted: None,
            mpps: Some(1e3 / spread.median),
            ns_per_packet: Some(spread),
            wall_ns_per_packet: Some(wall),
            unsupported: None,
        });
    }
    Ok(())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let date_utc = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel,
        bpf_jit_enable: read("/proc/sys/net/core/bpf_jit_enable"),
        bpf_jit_harden: read("/proc/sys/net/core/bpf_jit_harden"),
        date_utc,
        load_avg_before: read("/proc/loadavg"),
    }
}

/// Runs everything `opts` asks for. Refuses, naming what is missing,
/// when the machine lacks something.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let result = run_all(opts);
    if result.is_err() && lab::interrupted() {
        // Ctrl-C: the handler is removing the namespaces this run was
        // using (which is likely why it failed) and exits 130.
        loop {
            std::thread::park();
        }
    }
    result
}

fn run_all(opts: &Options) -> anyhow::Result<Report> {
    let lacking = missing(&opts.engines);
    if !lacking.is_empty() {
        anyhow::bail!(
            "moat bench needs what this machine lacks: {} (cargo xtask setup installs the packages)",
            lacking.join(", ")
        );
    }
    anyhow::ensure!(!opts.rules.is_empty(), "--rules names no rule count");
    lab::install_interrupt_cleanup()?;
    crate::dataplane::preflight::check()?;
    let mut report = Report {
        machine: machine(),
        options: opts.clone(),
        event_path: None,
        classification: Vec::new(),
        throughput: Vec::new(),
        updates: Vec::new(),
        memory: Vec::new(),
        bar: Vec::new(),
        limits: super::report::limits(),
    };
    let progress = |what: &str| eprintln!("moat bench: {what}");
    let mut dp = Dataplane::load()?;
    // The agent's defaults: denies are reported, 100 events/s per source.
    dp.set_event_rate(100, 200)?;
    progress("classification cost (BPF_PROG_TEST_RUN)");
    baselines(opts, &mut report.classification)?;
    for &shape in &opts.shapes {
        for &n in &opts.rules {
            classify(&mut dp, opts, shape, n, &mut report.classification)?;
        }
    }
    progress("the deny event path");
    report.event_path = Some(event_path(&mut dp, opts)?);
    dp.set_event_rate(100, 200)?;
    // Through the stack, on the realistic shape.
    for &n in &opts.rules {
        let set = RuleSet::generate(Shape::Realistic, n, opts.seed).map_err(anyhow::Error::msg)?;
        progress(&format!("through the stack: no filter, beside {n} rules"));
        no_filter(opts, &set, &mut report)?;
        for &engine in &opts.engines {
            progress(&format!(
                "through the stack: {} at {n} rules",
                engine.name()
            ));
            if engine == Engine::MoatXdp {
                moat_stack(&mut dp, opts, &set, &mut report)?;
            } else {
                linux_stack(engine, opts, &set, &mut report)?;
            }
        }
    }
    report.bar = super::report::bar(&report);
    Ok(report)
}

/// Every rendering of every requested set parses with the engines' own
/// checkers (run in a lab namespace).
pub fn check_renderings(shapes: &[Shape], rules: &[usize], seed: u64) -> anyhow::Result<()> {
    for &shape in shapes {
        for &n in rules {
            let set = RuleSet::generate(shape, n, seed).map_err(anyhow::Error::msg)?;
            let lab = Lab::new()?;
            engines::check_renderings(&lab, &set)
                .with_context(|| format!("{shape:?} rule set of {n} rules"))?;
        }
    }
    Ok(())
}
