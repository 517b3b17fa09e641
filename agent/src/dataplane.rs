//! The loaded eBPF object: programs, maps, attachments, and the atomic
//! switch between rule banks.

use std::{collections::BTreeMap, time::Duration};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        tc::{self, TcAttachType},
        SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use moat_common::{
    counter, direction, map_names, program_names, DenyEvent, FlowKey, FlowState, FragKey,
    FragmentL4, IfaceConfig, RuleEntry, RuleTable, IFACE_AUDIT, IFACE_ENFORCED, IFACE_KNOWS_LOCAL,
    MAX_TABLE_RULES, RULE_BANK_SIZE,
};

use crate::compile::{CompiledIface, TableSpec};

/// The eBPF object built by `build.rs` from the `ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object into the kernel failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "another XDP program is already attached to {iface} (Calico's, another moat agent's, ...); moat does not replace it: detach it first (`ip link set dev {iface} xdp off` for one attached by netlink)"
    )]
    XdpBusy { iface: String },
    #[error(
        "attaching XDP to {iface} failed: {source} (try --xdp-mode skb if the driver lacks native XDP)"
    )]
    AttachXdp {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching TC egress to {iface} failed: {source}")]
    AttachTc {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("adding the clsact qdisc to {iface} failed: {source}")]
    Clsact {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    #[error(
        "{iface} {direction} {table} table has {len} rules; this version enforces at most {max} per table"
    )]
    TableTooLong {
        iface: String,
        direction: &'static str,
        table: &'static str,
        len: usize,
        max: u32,
    },
    #[error(
        "the compiled policy needs {needed} rule slots; this version holds at most {max} per generation"
    )]
    BankFull { needed: usize, max: u32 },
}

/// How to attach XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native (driver) mode when the driver has it, else generic.
    #[default]
    Auto,
    /// Driver mode only.
    Native,
    /// Generic (skb) mode: works on every device, slower.
    Skb,
}

impl XdpAttachMode {
    fn mode(self) -> XdpMode {
        match self {
            XdpAttachMode::Auto => XdpMode::default(),
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Skb => XdpMode::Skb,
        }
    }
}

/// The loaded object and the maps the agent writes.
pub struct Dataplane {
    ebpf: Ebpf,
    ifaces: HashMap<MapData, u32, IfaceConfig>,
    rules: Array<MapData, RuleEntry>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    fragments: HashMap<MapData, FragKey, FragmentL4>,
    local_addrs: HashMap<MapData, [u8; 16], u8>,
    event_rate: Array<MapData, moat_common::EventRate>,
    /// The node's addresses in `local_addrs`, once the agent keeps them in
    /// sync (`None` before: every packet is judged as host traffic).
    local: Option<std::collections::BTreeSet<std::net::IpAddr>>,
    /// Audit mode for the interfaces applied from now on.
    audit: bool,
    events: Option<RingBuf<MapData>>,
    /// Bank the tables in force live in (0 or 1); `None` before the first apply.
    active_bank: Option<u32>,
    /// ifindexes with an `IFACES` entry.
    configured: Vec<u32>,
    attached: Vec<String>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DataplaneError::Map { name, source })
}

impl Dataplane {
    /// Loads and verifies both programs; attaches nothing.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(DataplaneError::Load)?;
        for name in [program_names::INGRESS, program_names::EGRESS] {
            let program = ebpf.program_mut(name).ok_or(DataplaneError::Missing {
                kind: "program",
                name,
            })?;
            let result = match program {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => {
                    return Err(DataplaneError::Missing {
                        kind: "XDP or TC program",
                        name,
                    })
                }
            };
            result.map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Dataplane {
            ifaces: take(&mut ebpf, map_names::IFACES)?,
            rules: take(&mut ebpf, map_names::RULES)?,
            counters: take(&mut ebpf, map_names::COUNTERS)?,
            conntrack: take(&mut ebpf, map_names::CONNTRACK)?,
            fragments: take(&mut ebpf, map_names::FRAGMENTS)?,
            local_addrs: take(&mut ebpf, map_names::LOCAL_ADDRS)?,
            event_rate: take(&mut ebpf, map_names::EVENT_RATE)?,
            local: None,
            audit: false,
            events: Some(take(&mut ebpf, map_names::EVENTS)?),
            ebpf,
            active_bank: None,
            configured: Vec::new(),
            attached: Vec::new(),
        })
    }

    fn xdp(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let name = program_names::INGRESS;
        let program = self.ebpf.program_mut(name).ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn tc(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        let name = program_names::EGRESS;
        let program = self.ebpf.program_mut(name).ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Attaches XDP (ingress) and TC egress to `iface`. Both detach when the
    /// `Dataplane` is dropped.
    pub fn attach(&mut self, iface: &str, mode: XdpAttachMode) -> Result<(), DataplaneError> {
        self.xdp()?.attach(iface, mode.mode()).map_err(|source| {
            // The kernel refuses a link while another program holds the
            // hook (EBUSY); aya only falls back to netlink (which would
            // replace it) on EINVAL, so nothing is replaced silently.
            let busy = matches!(&source, aya::programs::ProgramError::SyscallError(e)
                    if e.io_error.raw_os_error() == Some(libc::EBUSY));
            if busy {
                DataplaneError::XdpBusy {
                    iface: iface.to_string(),
                }
            } else {
                DataplaneError::AttachXdp {
                    iface: iface.to_string(),
                    source,
                }
            }
        })?;
        // TCX (kernel >= 6.6) needs no qdisc; older kernels need clsact.
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            if let Err(source) = tc::qdisc_add_clsact(iface) {
                let exists = matches!(&source, tc::TcError::NetlinkError(e)
                    if e.raw_os_error() == Some(libc::EEXIST));
                if !exists {
                    return Err(DataplaneError::Clsact {
                        iface: iface.to_string(),
                        source,
                    });
                }
            }
        }
        self.tc()?
            .attach(iface, TcAttachType::Egress)
            .map_err(|source| DataplaneError::AttachTc {
                iface: iface.to_string(),
                source,
            })?;
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Interfaces attached so far.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Makes `compiled` the policy in force, atomically per interface: the
    /// rules go to the bank not in force, then each interface's `IFACES`
    /// entry (a hash map value, replaced whole) is switched to them.
    /// Interfaces absent from `compiled` stop being enforced.
    pub fn apply(
        &mut self,
        compiled: &BTreeMap<u32, CompiledIface>,
        generation: u32,
    ) -> Result<(), DataplaneError> {
        let bank = match self.active_bank {
            Some(0) => 1,
            _ => 0,
        };
        let base = bank * RULE_BANK_SIZE;
        let mut next = 0usize;
        let mut configs = Vec::new();
        for (&ifindex, iface) in compiled {
            let mut config = IfaceConfig {
                flags: IFACE_ENFORCED
                    | if self.local.is_some() {
                        IFACE_KNOWS_LOCAL
                    } else {
                        0
                    }
                    | if self.audit { IFACE_AUDIT } else { 0 },
                generation,
                ..Default::default()
            };
            for (slot, spec) in iface.tables().into_iter().enumerate() {
                if spec.rules.len() > MAX_TABLE_RULES as usize {
                    return Err(DataplaneError::TableTooLong {
                        iface: iface.name.clone(),
                        direction: direction::name((slot / moat_common::table::KINDS) as u8),
                        table: if slot % moat_common::table::KINDS == moat_common::table::FAILSAFE {
                            "failsafe"
                        } else {
                            "policy"
                        },
                        len: spec.rules.len(),
                        max: MAX_TABLE_RULES,
                    });
                }
                if next + spec.rules.len() > RULE_BANK_SIZE as usize {
                    return Err(DataplaneError::BankFull {
                        needed: next + spec.rules.len(),
                        max: RULE_BANK_SIZE,
                    });
                }
                config.tables[slot] = table_for(spec, base + next as u32);
                for (i, rule) in spec.rules.iter().enumerate() {
                    self.rules
                        .set(base + (next + i) as u32, rule, 0)
                        .map_err(|source| DataplaneError::Map {
                            name: map_names::RULES,
                            source,
                        })?;
                }
                next += spec.rules.len();
            }
            configs.push((ifindex, config));
        }
        for (ifindex, config) in &configs {
            self.ifaces
                .insert(ifindex, config, 0)
                .map_err(|source| DataplaneError::Map {
                    name: map_names::IFACES,
                    source,
                })?;
        }
        for stale in self.configured.iter().filter(|i| !compiled.contains_key(i)) {
            self.ifaces
                .remove(stale)
                .map_err(|source| DataplaneError::Map {
                    name: map_names::IFACES,
                    source,
                })?;
        }
        self.configured = compiled.keys().copied().collect();
        self.active_bank = Some(bank);
        Ok(())
    }

    /// Sum over CPUs of every counter, `[direction][counter]`.
    pub fn counters(&self) -> Result<[[u64; counter::COUNT as usize]; 2], DataplaneError> {
        let mut out = [[0u64; counter::COUNT as usize]; 2];
        for (d, row) in out.iter_mut().enumerate() {
            for (c, value) in row.iter_mut().enumerate() {
                let per_cpu = self
                    .counters
                    .get(&counter::index(d as u8, c as u32), 0)
                    .map_err(|source| DataplaneError::Map {
                        name: map_names::COUNTERS,
                        source,
                    })?;
                *value = per_cpu.iter().sum();
            }
        }
        Ok(out)
    }

    /// Forgets every tracked flow (tests judge each packet afresh).
    pub fn clear_conntrack(&mut self) -> Result<(), DataplaneError> {
        let keys: Vec<FlowKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for key in keys {
            // A flow the LRU evicted meanwhile is already gone.
            let _ = self.conntrack.remove(&key);
        }
        Ok(())
    }

    /// Makes `addrs` the node's own addresses (the kernel then tells
    /// forwarded traffic from host traffic on interfaces applied after
    /// this). Writes only the difference from the last call. Returns how
    /// many addresses were added and removed.
    pub fn set_local_addresses(
        &mut self,
        addrs: &std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<(usize, usize), DataplaneError> {
        let key = |a: &std::net::IpAddr| match a {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let map_err = |source| DataplaneError::Map {
            name: map_names::LOCAL_ADDRS,
            source,
        };
        let before = self.local.take().unwrap_or_default();
        let (mut added, mut removed) = (0, 0);
        for a in addrs.difference(&before) {
            self.local_addrs.insert(key(a), 1, 0).map_err(map_err)?;
            added += 1;
        }
        for a in before.difference(addrs) {
            // Already gone is fine: the goal is its absence.
            let _ = self.local_addrs.remove(&key(a));
            removed += 1;
        }
        self.local = Some(addrs.clone());
        Ok((added, removed))
    }

    /// Audit mode: every verdict is computed, counted and reported, but
    /// nothing is dropped (events say `verdict::AUDIT` where a packet would
    /// have been denied). Takes effect at the next `apply`.
    pub fn set_audit(&mut self, audit: bool) {
        self.audit = audit;
    }

    /// Limits each source address to `per_second` events (sustained) and
    /// `burst` at once; `per_second` 0 lifts the limit. Suppressed events
    /// are counted (`events_suppressed`), never silently lost.
    pub fn set_event_rate(&mut self, per_second: u32, burst: u32) -> Result<(), DataplaneError> {
        let rate = moat_common::EventRate { per_second, burst };
        self.event_rate
            .set(0, rate, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::EVENT_RATE,
                source,
            })
    }

    /// Forgets every first fragment seen.
    pub fn clear_fragments(&mut self) -> Result<(), DataplaneError> {
        let keys: Vec<FragKey> = self.fragments.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.fragments.remove(&key);
        }
        Ok(())
    }

    /// Every tracked flow orientation and its state.
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, FlowState)> {
        self.conntrack.iter().filter_map(Result::ok).collect()
    }

    /// Number of tracked flow orientations.
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().count()
    }

    /// Takes the event ring buffer (once) for a reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Reads every event waiting in the ring buffer (tests, one-shot tools).
    pub fn drain_events(&mut self) -> Vec<DenyEvent> {
        let mut out = Vec::new();
        if let Some(ring) = self.events.as_mut() {
            while let Some(item) = ring.next() {
                if let Some(event) = crate::event::decode(&item) {
                    out.push(event);
                }
            }
        }
        out
    }

    /// Runs the XDP program on `frame` through `BPF_PROG_TEST_RUN`, as if it
    /// arrived on the current network namespace's loopback (ifindex 1).
    /// Returns the XDP action and the mean time per run.
    pub fn test_ingress(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        test_run(self.xdp()?, program_names::INGRESS, frame, repeat)
    }

    /// Runs the TC egress program on `frame` through `BPF_PROG_TEST_RUN`
    /// (skb on loopback, ifindex 1). Returns the TC action as `i32`.
    pub fn test_egress(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, Duration), DataplaneError> {
        let (action, mean) = test_run(self.tc()?, program_names::EGRESS, frame, repeat)?;
        Ok((action as i32, mean))
    }

    /// Runs the XDP program on `repeat` copies of `frame` in live-frames
    /// mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): what it passes enters the stack
    /// of `ifindex` in the calling thread's network namespace, as if
    /// received there. Returns the time the call took, wall and thread CPU
    /// (moat bench's packet generator).
    pub fn test_ingress_live(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<crate::bench::sys::Took, DataplaneError> {
        crate::bench::sys::live_run(self.xdp()?, program_names::INGRESS, frame, ifindex, repeat)
    }
}

/// One `BPF_PROG_TEST_RUN` of `program` on `frame`: action, mean time.
fn test_run<P>(
    program: &P,
    name: &'static str,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, Duration), DataplaneError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    };
    let result = program
        .test_run(opts)
        .map_err(|source| DataplaneError::Program { name, source })?;
    Ok((result.return_value, result.duration))
}

fn table_for(spec: &TableSpec, start: u32) -> RuleTable {
    RuleTable {
        start,
        len: spec.rules.len() as u16,
        end_verdict: spec.end_verdict,
        end_reason: spec.end_reason,
        pass_verdict: spec.pass_verdict,
        _pad: [0; 3],
    }
}
