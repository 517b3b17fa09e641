//! The loaded eBPF object: programs, maps, attachments, and the atomic
//! switch between rule banks.

pub mod bank;
pub mod bpf_sys;
pub mod frame;
pub mod links;
pub mod preflight;
pub mod seed;
pub mod state;
pub mod testrun;

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, IterableMap as _, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use moat_common::{
    classify, counter, direction, map_names, program_names, table, AddrClassKey, Classifier,
    DenyEvent, FlowKey, FlowState, FragKey, FragmentL4, IfaceConfig, PortClassKey, RuleEntry,
    RuleStats, IFACE_AUDIT, IFACE_ENFORCED, IFACE_KNOWS_LOCAL, IFACE_ROUTE_LOCAL, MAX_IFACES,
};

use crate::{
    compile::{
        classify::{encode, ClassifierImage, ClassifyError},
        CompiledIface,
    },
    dataplane::bank::{
        lpm_key, lpm_key_id, AddrKey, BankContent, BankMaps, BankRecord, PortKey, Writer, Written,
    },
};

/// Reads a `DenyEvent` out of a ring buffer record.
pub fn decode_event(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < std::mem::size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: the record holds at least size_of::<DenyEvent>() bytes, the
    // type is plain old data (any bit pattern valid) and read_unaligned
    // does not need the ring buffer's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyEvent>()) })
}

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
        "another XDP program is already attached to {iface}{} (Calico's, another moat agent's, ...); moat does not replace it unless told to (--replace-xdp), or detach it first (`ip link set dev {iface} xdp off` for one attached by netlink)",
        holder.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    XdpBusy {
        iface: String,
        holder: Option<String>,
    },
    #[error(
        "the XDP program on {iface}{} is held by a BPF link (another moat agent's?): --replace-xdp only replaces programs attached by netlink; stop its owner",
        holder.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    XdpLinkHeld {
        iface: String,
        holder: Option<String>,
    },
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
    #[error("{iface} {direction}: {source}")]
    Classify {
        iface: String,
        direction: &'static str,
        #[source]
        source: ClassifyError,
    },
    #[error(
        "the compiled policy needs {needed} words of class vectors; this load holds at most {max} per generation (raise it with --class-words)"
    )]
    WordsFull { needed: usize, max: u32 },
    #[error("map {name}: {op} failed: {source}")]
    Write {
        name: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("more than {max} enforced interfaces")]
    TooManyIfaces { max: u32 },
    #[error("bpffs pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the number of CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error(
        "the compiled policy needs {needed} rule slots; this load holds at most {max} per generation (raise it with --rule-slots)"
    )]
    BankFull { needed: usize, max: u32 },
    /// A policy whose entries in one class map exceed what one generation
    /// may hold there.
    #[error(transparent)]
    Full(#[from] Full),
}

/// What one map cannot hold: the policy needs `needed` entries in `map`,
/// whose capacity `capacity` two generations share.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the policy needs {needed} {what} in map {map}, which holds {capacity} ({} per policy generation: the one in force and the next share it){}; {}",
    capacity / 2,
    pinned.map(|p| format!(", as pinned (this agent asked for {p})")).unwrap_or_default(),
    option.map(|(flag, key)| format!(
        "raise it to at least {} with --{flag} (config key {key}){}",
        needed.saturating_mul(2),
        if pinned.is_some() { " and `moat uninstall` first: pinned maps keep the capacity they were created with" } else { "" }
    )).unwrap_or_else(|| "this capacity is fixed: split the policy".to_string())
)]
pub struct Full {
    pub map: &'static str,
    pub what: &'static str,
    pub needed: usize,
    pub capacity: u32,
    /// The capacity asked for, when the map in use (pinned) has another.
    pub pinned: Option<u32>,
    /// The flag and config key that set the capacity (`None`: fixed).
    pub option: Option<(&'static str, &'static str)>,
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

/// Default capacity of each address class map (both generations): the
/// tries hold no memory for entries not in use, so the default leaves room
/// for blocklists of two million prefixes per generation.
pub const DEFAULT_ADDR_PREFIXES: u32 = 1 << 22;
/// Largest capacity `--addr-prefixes` / `--port-prefixes` may ask for.
pub const MAX_PREFIXES: u32 = 1 << 26;

/// Capacities of the maps whose size is a deployment choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Tracked flow orientations (two per connection); LRU beyond.
    pub flows: u32,
    /// Words of class vectors, both banks together.
    pub class_words: u32,
    /// Rules (classifier bits) of every interface and direction, both banks
    /// together.
    pub rule_slots: u32,
    /// Address prefixes per address field, both banks together.
    pub addr_prefixes: u32,
    /// Port prefixes per port field, both banks together.
    pub port_prefixes: u32,
    /// Sources with an event token bucket at once; LRU beyond.
    pub event_sources: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            flows: moat_common::MAX_FLOWS,
            class_words: moat_common::MAX_CLASS_WORDS,
            rule_slots: moat_common::MAX_RULES,
            addr_prefixes: DEFAULT_ADDR_PREFIXES,
            port_prefixes: moat_common::CLASS_PORT_PREFIXES,
            event_sources: moat_common::MAX_EVENT_SOURCES,
        }
    }
}

impl Capacities {
    /// Whether one generation of `content` fits beside another in maps of
    /// these capacities (each generation may use half of every map);
    /// `asked`: the capacities the agent asked for, where the maps in use
    /// were created with others (adopted pins).
    pub fn check(&self, content: &BankContent, asked: Option<&Capacities>) -> Result<(), Full> {
        let pinned =
            |have: u32, want: fn(&Capacities) -> u32| asked.map(want).filter(|&w| w != have);
        let addr = Some(("addr-prefixes", "addrPrefixes"));
        let port = Some(("port-prefixes", "portPrefixes"));
        let rules = Some(("rule-slots", "ruleSlots"));
        let words = Some(("class-words", "classWords"));
        let checks = [
            (
                map_names::CLASS_SRC,
                "source prefixes",
                content.src.len(),
                self.addr_prefixes,
                pinned(self.addr_prefixes, |c| c.addr_prefixes),
                addr,
            ),
            (
                map_names::CLASS_DST,
                "destination prefixes",
                content.dst.len(),
                self.addr_prefixes,
                pinned(self.addr_prefixes, |c| c.addr_prefixes),
                addr,
            ),
            (
                map_names::CLASS_SPORT,
                "source port prefixes",
                content.sport.len(),
                self.port_prefixes,
                pinned(self.port_prefixes, |c| c.port_prefixes),
                port,
            ),
            (
                map_names::CLASS_DPORT,
                "destination port prefixes",
                content.dport.len(),
                self.port_prefixes,
                pinned(self.port_prefixes, |c| c.port_prefixes),
                port,
            ),
            (
                map_names::CLASS_PROTO,
                "protocol entries",
                content.proto.len(),
                moat_common::CLASS_PROTOS,
                None,
                None,
            ),
            (
                map_names::RULES,
                "rule slots",
                content.rules.len(),
                self.rule_slots,
                pinned(self.rule_slots, |c| c.rule_slots),
                rules,
            ),
            (
                map_names::CLASS_WORDS,
                "class vector words",
                content.words.len(),
                self.class_words,
                pinned(self.class_words, |c| c.class_words),
                words,
            ),
        ];
        for (map, what, needed, capacity, pinned, option) in checks {
            if needed > (capacity / 2) as usize {
                return Err(Full {
                    map,
                    what,
                    needed,
                    capacity,
                    pinned,
                    option,
                });
            }
        }
        Ok(())
    }
}

/// Kernel memory and fill of one map (`Dataplane::map_usage`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapUsage {
    pub name: String,
    /// Entries in use (both generations).
    pub entries: u64,
    pub max_entries: u32,
    /// Kernel memory the map holds now, in bytes (`memlock` of its fdinfo:
    /// preallocated maps count every slot, the tries what they hold).
    pub bytes: u64,
}

/// What `compiled` needs of the class maps in one generation, from the
/// bank content it compiles to: what `moat check` weighs against the
/// capacities, without a kernel.
pub fn plan_offline(
    compiled: &BTreeMap<u32, CompiledIface>,
) -> Result<BankContent, DataplaneError> {
    let ctx = PlanContext {
        words_per_bank: u32::MAX,
        rules_per_bank: u32::MAX,
        local_known: false,
        route_lookup: false,
        audit: false,
        audit_ifaces: &Default::default(),
    };
    plan_bank(compiled, 1, 0, &ctx).map(|(content, _)| content)
}

/// Fill levels of the maps whose capacity is a deployment choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    /// Rule slots (classifier bits) of the generation in force, every
    /// interface and direction.
    pub rule_slots: u64,
    /// Rule slots one generation may use.
    pub rule_slots_per_bank: u32,
    /// Tracked flow orientations (two per connection).
    pub flows: u64,
    pub flows_capacity: u32,
    /// Flow orientations waiting for a reply, and the table's capacity:
    /// full means unanswered connections are evicting each other.
    pub pending: u64,
    pub pending_capacity: u32,
}

/// What one `apply` cost: planning (classifier images, encoding, the
/// bank's layout) and writing (the bank's differences, the switch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub plan: Duration,
    pub write: Duration,
    pub written: Written,
}

/// Packets and bytes one rule decided or logged, on one interface and
/// direction, since the generation in force was applied.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RuleCounter {
    pub ifindex: u32,
    pub direction: u8,
    pub policy_id: u32,
    pub rule_index: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// What one plan depends on besides the policy.
struct PlanContext<'a> {
    words_per_bank: u32,
    rules_per_bank: u32,
    local_known: bool,
    /// Ask the kernel's routing table about addresses the list lacks
    /// (`IFACE_ROUTE_LOCAL`).
    route_lookup: bool,
    audit: bool,
    audit_ifaces: &'a std::collections::BTreeSet<u32>,
}

/// `Dataplane::plan` without the capacity check of the class maps.
fn plan_bank(
    compiled: &BTreeMap<u32, CompiledIface>,
    generation: u32,
    bank: u32,
    ctx: &PlanContext<'_>,
) -> Result<(BankContent, Vec<(u32, IfaceConfig)>), DataplaneError> {
    let mut images = Vec::new();
    for (slot, (&ifindex, iface)) in compiled.iter().enumerate() {
        if slot >= MAX_IFACES as usize {
            return Err(DataplaneError::TooManyIfaces { max: MAX_IFACES });
        }
        let mut per_dir = Vec::new();
        for dir in 0..direction::COUNT as u8 {
            let tables = std::array::from_fn(|kind| iface.table(dir, kind));
            let image =
                ClassifierImage::build(tables).map_err(|source| DataplaneError::Classify {
                    iface: iface.name.clone(),
                    direction: direction::name(dir),
                    source,
                })?;
            per_dir.push(image);
        }
        images.push((ifindex, slot as u32, per_dir));
    }
    let words_per_bank = ctx.words_per_bank;
    // Each classifier's vectors as the programs read them, once.
    let encoded: Vec<Vec<Vec<Vec<u64>>>> = images
        .iter()
        .map(|(_, _, d)| {
            d.iter()
                .map(|i| i.classes.iter().map(encode).collect())
                .collect()
        })
        .collect();
    let needed_words: usize = encoded.iter().flatten().flatten().map(Vec::len).sum();
    if needed_words > words_per_bank as usize {
        return Err(DataplaneError::WordsFull {
            needed: needed_words,
            max: words_per_bank,
        });
    }
    let needed_rules: usize = images
        .iter()
        .flat_map(|(_, _, d)| d.iter())
        .map(|i| i.bits.len())
        .sum();
    let rules_per_bank = ctx.rules_per_bank;
    if needed_rules > rules_per_bank as usize {
        return Err(DataplaneError::BankFull {
            needed: needed_rules,
            max: rules_per_bank,
        });
    }
    let rule_base0 = bank * rules_per_bank;
    let word_base0 = bank * words_per_bank;
    let mut content = BankContent {
        rules: Vec::with_capacity(needed_rules),
        words: Vec::with_capacity(needed_words),
        ..Default::default()
    };
    let mut configs = Vec::new();
    for ((ifindex, slot, per_dir), encoded) in images.iter().zip(&encoded) {
        let mut config = IfaceConfig {
            flags: IFACE_ENFORCED
                | match (ctx.local_known, ctx.route_lookup) {
                    (false, _) => 0,
                    (true, false) => IFACE_KNOWS_LOCAL,
                    (true, true) => IFACE_KNOWS_LOCAL | IFACE_ROUTE_LOCAL,
                }
                | if ctx.audit || ctx.audit_ifaces.contains(ifindex) {
                    IFACE_AUDIT
                } else {
                    0
                },
            generation,
            ..Default::default()
        };
        for (dir, (image, vectors)) in per_dir.iter().zip(encoded).enumerate() {
            let id = classifier_id(bank, *slot, dir as u32);
            let rule_base = rule_base0 + content.rules.len() as u32;
            content.rules.extend_from_slice(&image.bits);
            let mut offsets = Vec::with_capacity(vectors.len());
            for vector in vectors {
                offsets.push(word_base0 + content.words.len() as u32);
                content.words.extend_from_slice(vector);
            }
            content.add_class_entries(id, image, &offsets);
            let mut any = [0u32; classify::FIELDS];
            for (f, a) in any.iter_mut().enumerate() {
                *a = offsets[image.any[f] as usize];
            }
            config.classifiers[dir] = Classifier {
                id,
                rule_base,
                any,
                lookup: image.lookup,
            };
            for kind in 0..table::KINDS {
                config.tables[table::index(dir as u8, kind)] = image.tables[kind];
            }
        }
        configs.push((*ifindex, config));
    }
    Ok((content, configs))
}

/// The kernel memory a map holds (`memlock:` in its fdinfo), if readable.
fn memlock(map: &MapData) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let fd = map.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The loaded object and the maps the agent writes.
pub struct Dataplane {
    ebpf: Ebpf,
    ifaces: HashMap<MapData, u32, IfaceConfig>,
    rules: Array<MapData, RuleEntry>,
    rule_stats: PerCpuArray<MapData, RuleStats>,
    class_src: LpmTrie<MapData, AddrClassKey, u32>,
    class_dst: LpmTrie<MapData, AddrClassKey, u32>,
    class_sport: LpmTrie<MapData, PortClassKey, u32>,
    class_dport: LpmTrie<MapData, PortClassKey, u32>,
    class_proto: HashMap<MapData, u32, u32>,
    class_words: Array<MapData, u64>,
    /// Capacities of the maps in use (pinned maps keep theirs).
    capacities: Capacities,
    /// Capacities asked for at load.
    asked: Capacities,
    /// What this agent wrote into each bank.
    banks: [BankRecord; 2],
    writer: Writer,
    last_apply: ApplyStats,
    /// Banks written by an earlier agent (adopted pins): entries unknown.
    unknown_bank: [bool; 2],
    /// bpffs directory of the pins, if pinned.
    pin_dir: Option<PathBuf>,
    adopted_generation: Option<u32>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    /// Connections allowed and not answered yet (`CT_PENDING`).
    ct_pending: HashMap<MapData, FlowKey, FlowState>,
    fragments: HashMap<MapData, FragKey, FragmentL4>,
    local_addrs: HashMap<MapData, [u8; 16], u8>,
    event_rate: Array<MapData, moat_common::EventRate>,
    /// Per source and global (per second, burst), as `event_rate` holds.
    source_rate: (u32, u32),
    global_rate: (u32, u32),
    /// The node's addresses in `local_addrs`, once the agent keeps them in
    /// sync (`None` before: every packet is judged as host traffic).
    local: Option<std::collections::BTreeSet<std::net::IpAddr>>,
    /// Whether an address missing from `local` is asked of the kernel's
    /// routing table (`IFACE_ROUTE_LOCAL`); on unless a test turns it off.
    route_lookup: bool,
    /// Audit mode for the interfaces applied from now on.
    audit: bool,
    /// ifindexes in audit mode whatever `audit` says.
    audit_ifaces: std::collections::BTreeSet<u32>,
    /// Replace an XDP program attached by netlink (`attach`).
    replace_xdp: bool,
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
    /// Loads and verifies both programs with maps of their own; attaches
    /// nothing. Everything goes when the `Dataplane` is dropped.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(None, Capacities::default())
    }

    /// Loads and verifies both programs with their maps pinned in `dir`
    /// (bpffs): maps already pinned there by an earlier agent are adopted,
    /// with the policy in force, tracked flows and counters in them, and
    /// `attach` takes over links pinned there without detaching. Enforcement
    /// outlives this `Dataplane` until `uninstall`.
    pub fn load_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Self::load_with(Some(dir), Capacities::default())
    }

    /// `load` or (with `pin_dir`) `load_pinned`, with map capacities of
    /// one's choosing. Maps already pinned keep the capacity they were
    /// created with.
    pub fn load_with(pin_dir: Option<&Path>, caps: Capacities) -> Result<Self, DataplaneError> {
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir.join(LINKS_DIR)).map_err(|source| DataplaneError::Pin {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::CONNTRACK, caps.flows)
            .map_max_entries(map_names::CT_PENDING, caps.flows)
            .map_max_entries(map_names::RULES, caps.rule_slots)
            .map_max_entries(map_names::RULE_STATS, caps.rule_slots)
            .map_max_entries(map_names::CLASS_WORDS, caps.class_words)
            .map_max_entries(map_names::CLASS_SRC, caps.addr_prefixes)
            .map_max_entries(map_names::CLASS_DST, caps.addr_prefixes)
            .map_max_entries(map_names::CLASS_SPORT, caps.port_prefixes)
            .map_max_entries(map_names::CLASS_DPORT, caps.port_prefixes)
            .map_max_entries(map_names::EVENT_BUCKETS, caps.event_sources);
        if let Some(dir) = pin_dir {
            for name in map_names::PINNED {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DataplaneError::Load)?;
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
        let mut dataplane = Dataplane {
            pin_dir: pin_dir.map(Path::to_path_buf),
            unknown_bank: [pin_dir.is_some(); 2],
            adopted_generation: None,
            ifaces: take(&mut ebpf, map_names::IFACES)?,
            rules: take(&mut ebpf, map_names::RULES)?,
            rule_stats: take(&mut ebpf, map_names::RULE_STATS)?,
            class_src: take(&mut ebpf, map_names::CLASS_SRC)?,
            class_dst: take(&mut ebpf, map_names::CLASS_DST)?,
            class_sport: take(&mut ebpf, map_names::CLASS_SPORT)?,
            class_dport: take(&mut ebpf, map_names::CLASS_DPORT)?,
            class_proto: take(&mut ebpf, map_names::CLASS_PROTO)?,
            class_words: take(&mut ebpf, map_names::CLASS_WORDS)?,
            capacities: caps,
            asked: caps,
            banks: Default::default(),
            writer: Writer::default(),
            last_apply: ApplyStats::default(),
            counters: take(&mut ebpf, map_names::COUNTERS)?,
            conntrack: take(&mut ebpf, map_names::CONNTRACK)?,
            ct_pending: take(&mut ebpf, map_names::CT_PENDING)?,
            fragments: take(&mut ebpf, map_names::FRAGMENTS)?,
            local_addrs: take(&mut ebpf, map_names::LOCAL_ADDRS)?,
            event_rate: take(&mut ebpf, map_names::EVENT_RATE)?,
            source_rate: (0, 1),
            global_rate: (
                moat_common::DEFAULT_GLOBAL_EVENT_RATE,
                moat_common::DEFAULT_GLOBAL_EVENT_BURST,
            ),
            local: None,
            route_lookup: true,
            audit: false,
            audit_ifaces: Default::default(),
            replace_xdp: false,
            events: Some(take(&mut ebpf, map_names::EVENTS)?),
            ebpf,
            active_bank: None,
            configured: Vec::new(),
            attached: Vec::new(),
        };
        dataplane.capacities = dataplane.capacities_in_use()?;
        if pin_dir.is_some() {
            dataplane.adopt()?;
        }
        Ok(dataplane)
    }

    /// The capacities of the maps loaded (what was asked, or what pinned
    /// maps were created with).
    fn capacities_in_use(&self) -> Result<Capacities, DataplaneError> {
        let max = |map: &MapData, name| -> Result<u32, DataplaneError> {
            Ok(map.info().map_err(map_err(name))?.max_entries())
        };
        Ok(Capacities {
            flows: max(self.conntrack.map(), map_names::CONNTRACK)?,
            class_words: self.class_words.len(),
            rule_slots: self.rules.len(),
            addr_prefixes: max(self.class_src.map(), map_names::CLASS_SRC)?
                .min(max(self.class_dst.map(), map_names::CLASS_DST)?),
            port_prefixes: max(self.class_sport.map(), map_names::CLASS_SPORT)?
                .min(max(self.class_dport.map(), map_names::CLASS_DPORT)?),
            event_sources: self.asked.event_sources,
        })
    }

    /// Capacities of the maps in use.
    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    /// Entries, capacity and kernel memory of every map the agent writes
    /// or the programs fill (`memlock` of each map's fdinfo).
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, DataplaneError> {
        let count_lpm_a = |m: &LpmTrie<MapData, AddrClassKey, u32>| m.keys().count() as u64;
        let count_lpm_p = |m: &LpmTrie<MapData, PortClassKey, u32>| m.keys().count() as u64;
        let fill = self.fill()?;
        let rows: [(&'static str, &MapData, u64); 10] = [
            (
                map_names::CLASS_SRC,
                self.class_src.map(),
                count_lpm_a(&self.class_src),
            ),
            (
                map_names::CLASS_DST,
                self.class_dst.map(),
                count_lpm_a(&self.class_dst),
            ),
            (
                map_names::CLASS_SPORT,
                self.class_sport.map(),
                count_lpm_p(&self.class_sport),
            ),
            (
                map_names::CLASS_DPORT,
                self.class_dport.map(),
                count_lpm_p(&self.class_dport),
            ),
            (
                map_names::CLASS_PROTO,
                self.class_proto.map(),
                self.class_proto.keys().count() as u64,
            ),
            (
                map_names::CLASS_WORDS,
                self.class_words.map(),
                self.banks.iter().map(BankRecord::words).sum::<usize>() as u64,
            ),
            (map_names::RULES, self.rules.map(), fill.rule_slots),
            (
                map_names::RULE_STATS,
                self.rule_stats.map(),
                fill.rule_slots,
            ),
            (map_names::CONNTRACK, self.conntrack.map(), fill.flows),
            (
                map_names::FRAGMENTS,
                self.fragments.map(),
                self.fragments.keys().count() as u64,
            ),
        ];
        rows.into_iter()
            .map(|(name, map, entries)| {
                let info = map.info().map_err(map_err(name))?;
                Ok(MapUsage {
                    name: name.to_string(),
                    entries,
                    max_entries: info.max_entries(),
                    bytes: memlock(map).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Takes over the state pinned maps hold: which bank is in force, the
    /// interfaces configured, the node addresses written.
    fn adopt(&mut self) -> Result<(), DataplaneError> {
        let entries: Vec<(u32, IfaceConfig)> = self.ifaces.iter().filter_map(Result::ok).collect();
        if let Some((_, config)) = entries.first() {
            let id = config.classifiers[0].id;
            self.active_bank = Some(bank_of(id));
            self.adopted_generation = entries.iter().map(|(_, c)| c.generation).max();
        }
        self.configured = entries.iter().map(|(i, _)| *i).collect();
        let local: std::collections::BTreeSet<std::net::IpAddr> = self
            .local_addrs
            .keys()
            .filter_map(Result::ok)
            .map(|k| {
                let v6 = std::net::Ipv6Addr::from(k);
                v6.to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
            })
            .collect();
        if !local.is_empty() {
            self.local = Some(local);
        }
        Ok(())
    }

    /// The generation in force in the pinned maps this `Dataplane` adopted
    /// (`None`: nothing was in force).
    pub fn adopted_generation(&self) -> Option<u32> {
        self.adopted_generation
    }

    /// Entries in the pin directory that are not maps of this version (an
    /// older or newer layout): they are never read; `remove_stale_pins`
    /// deletes them once this version's programs are attached.
    pub fn stale_pins(&self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else {
            return Vec::new();
        };
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = read
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LINKS_DIR && !map_names::PINNED.contains(&n.as_str()))
            .collect();
        out.sort();
        out
    }

    /// Deletes the pins `stale_pins` names.
    pub fn remove_stale_pins(&self) -> Result<Vec<String>, DataplaneError> {
        let stale = self.stale_pins();
        if let Some(dir) = &self.pin_dir {
            for name in &stale {
                let path = dir.join(name);
                std::fs::remove_file(&path)
                    .map_err(|source| DataplaneError::Pin { path, source })?;
            }
        }
        Ok(stale)
    }

    /// Detaches links pinned for interfaces other than `keep` (an agent
    /// restarted with fewer interfaces). Returns the interfaces detached.
    pub fn prune_links(&self, keep: &[String]) -> Result<Vec<String>, DataplaneError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (iface, path) in pinned_links(dir) {
            if !keep.contains(&iface) {
                std::fs::remove_file(&path)
                    .map_err(|source| DataplaneError::Pin { path, source })?;
                out.push(iface);
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
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

    /// Attaches XDP (ingress) and TC egress to `iface`. Unpinned, both
    /// detach when the `Dataplane` is dropped; pinned, they stay until
    /// `uninstall`.
    pub fn attach(&mut self, iface: &str, mode: XdpAttachMode) -> Result<(), DataplaneError> {
        match self.pin_dir.clone() {
            Some(dir) => self.attach_pinned(&dir, iface, mode)?,
            None => {
                self.attach_xdp(iface, mode)?;
                self.attach_tc(iface)?;
            }
        }
        self.attached.push(iface.to_string());
        Ok(())
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpAttachMode,
    ) -> Result<aya::programs::xdp::XdpLinkId, DataplaneError> {
        match self.try_attach_xdp(iface, mode) {
            Err(DataplaneError::XdpBusy { iface, holder }) if self.replace_xdp => {
                // Attached by netlink (ip link, Calico, libbpf): detach it in
                // every mode, then attach ours. One held by a BPF link (an
                // agent's) cannot be detached this way and stays.
                for mode in ["xdpgeneric", "xdpdrv", "xdpoffload"] {
                    let _ = std::process::Command::new("ip")
                        .args(["link", "set", "dev", &iface, mode, "off"])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
                match self.try_attach_xdp(&iface, mode) {
                    Ok(id) => {
                        tracing::warn!(
                            "{iface}: replaced the XDP program that held it ({}), as --replace-xdp asked",
                            holder.as_deref().unwrap_or("unknown program")
                        );
                        Ok(id)
                    }
                    Err(DataplaneError::XdpBusy { iface, holder }) => {
                        Err(DataplaneError::XdpLinkHeld { iface, holder })
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    fn try_attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpAttachMode,
    ) -> Result<aya::programs::xdp::XdpLinkId, DataplaneError> {
        self.xdp()?.attach(iface, mode.mode()).map_err(|source| {
            // The kernel refuses a link while another program holds the
            // hook (EBUSY; EEXIST when it holds it in the other mode); aya
            // only falls back to netlink (which would replace it) on EINVAL,
            // so nothing is replaced silently.
            let busy = matches!(&source, aya::programs::ProgramError::SyscallError(e)
                    if matches!(e.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)));
            if busy {
                DataplaneError::XdpBusy {
                    iface: iface.to_string(),
                    holder: netlink_xdp_program(iface),
                }
            } else {
                DataplaneError::AttachXdp {
                    iface: iface.to_string(),
                    source,
                }
            }
        })
    }

    fn attach_tc(
        &mut self,
        iface: &str,
    ) -> Result<aya::programs::tc::SchedClassifierLinkId, DataplaneError> {
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
            })
    }

    /// Attaches both programs to `iface` by taking over the links an earlier
    /// agent pinned (one atomic program replacement each: no packet goes
    /// unjudged), or attaching and pinning new ones.
    fn attach_pinned(
        &mut self,
        dir: &Path,
        iface: &str,
        mode: XdpAttachMode,
    ) -> Result<(), DataplaneError> {
        let links = dir.join(LINKS_DIR);
        let xdp_pin = links.join(format!("{iface}{XDP_SUFFIX}"));
        let tc_pin = links.join(format!("{iface}{TC_SUFFIX}"));
        let pin_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: aya::pin::PinError| DataplaneError::Pin {
                path: path.clone(),
                source: match e {
                    aya::pin::PinError::SyscallError(s) => s.io_error,
                    other => std::io::Error::other(other.to_string()),
                },
            }
        };
        let link_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: aya::programs::links::LinkError| DataplaneError::Pin {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        };
        if xdp_pin.exists() {
            let pinned = PinnedLink::from_pin(&xdp_pin).map_err(link_err(&xdp_pin))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err(&xdp_pin))?;
            self.xdp()?
                .attach_to_link(link)
                .map_err(|source| DataplaneError::AttachXdp {
                    iface: iface.to_string(),
                    source,
                })?;
        } else {
            let id = self.attach_xdp(iface, mode)?;
            let link = self
                .xdp()?
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    name: program_names::INGRESS,
                    source,
                })?;
            FdLink::try_from(link)
                .map_err(link_err(&xdp_pin))?
                .pin(&xdp_pin)
                .map_err(pin_err(&xdp_pin))?;
        }
        if tc_pin.exists() {
            let pinned = PinnedLink::from_pin(&tc_pin).map_err(link_err(&tc_pin))?;
            let link =
                SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err(&tc_pin))?;
            self.tc()?
                .attach_to_link(link)
                .map_err(|source| DataplaneError::AttachTc {
                    iface: iface.to_string(),
                    source,
                })?;
        } else {
            let id = self.attach_tc(iface)?;
            let link = self
                .tc()?
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    name: program_names::EGRESS,
                    source,
                })?;
            FdLink::try_from(link)
                .map_err(link_err(&tc_pin))?
                .pin(&tc_pin)
                .map_err(pin_err(&tc_pin))?;
        }
        Ok(())
    }

    /// Interfaces attached so far.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Makes `compiled` the policy in force, atomically per interface: the
    /// classifiers go to the bank not in force (rules, class vectors, and
    /// class map entries under ids of that bank), then each interface's
    /// `IFACES` entry (a hash map value, replaced whole) is switched to
    /// them. Interfaces absent from `compiled` stop being enforced. On an
    /// error nothing in force has changed.
    ///
    /// Only what differs from what the bank held (the policy before the
    /// one in force) is written, in batches (`bank::Writer`).
    pub fn apply(
        &mut self,
        compiled: &BTreeMap<u32, CompiledIface>,
        generation: u32,
    ) -> Result<(), DataplaneError> {
        let started = std::time::Instant::now();
        let bank = match self.active_bank {
            Some(0) => 1,
            _ => 0,
        };
        // Planned in full first: a policy too large is refused before
        // anything is written.
        let (content, configs) = self.plan(compiled, generation, bank)?;
        let planned = started.elapsed();
        if std::mem::take(&mut self.unknown_bank[bank as usize]) {
            self.banks[bank as usize] = self.walk_bank(bank);
        }
        let cpus = nr_cpus()?;
        let maps = BankMaps {
            rules: self.rules.map().fd().as_fd(),
            rule_stats: self.rule_stats.map().fd().as_fd(),
            words: self.class_words.map().fd().as_fd(),
            src: self.class_src.map().fd().as_fd(),
            dst: self.class_dst.map().fd().as_fd(),
            sport: self.class_sport.map().fd().as_fd(),
            dport: self.class_dport.map().fd().as_fd(),
            proto: self.class_proto.map().fd().as_fd(),
        };
        let written = self.writer.write_bank(
            &maps,
            bank * (self.rules.len() / 2),
            bank * (self.class_words.len() / 2),
            cpus,
            &mut self.banks[bank as usize],
            content,
        )?;
        for (ifindex, config) in &configs {
            self.ifaces
                .insert(ifindex, config, 0)
                .map_err(map_err(map_names::IFACES))?;
        }
        for stale in self.configured.iter().filter(|i| !compiled.contains_key(i)) {
            self.ifaces
                .remove(stale)
                .map_err(map_err(map_names::IFACES))?;
        }
        self.configured = compiled.keys().copied().collect();
        self.active_bank = Some(bank);
        self.last_apply = ApplyStats {
            plan: planned,
            write: started.elapsed() - planned,
            written,
        };
        tracing::debug!(
            "applied generation {generation} to bank {bank}: planned in {planned:?}, written in {:?} ({written:?})",
            self.last_apply.write
        );
        Ok(())
    }

    /// Forgets what this agent wrote into both banks (the class map keys
    /// are found again in the maps), so the next applies write their bank
    /// in full, as into fresh maps (the benchmark's full-write figure).
    pub fn forget_written(&mut self) {
        self.banks = [self.walk_bank(0), self.walk_bank(1)];
    }

    /// From now on `apply` writes one element per syscall, as on a kernel
    /// that refuses batch operations (tests of that path).
    pub fn refuse_batches(&mut self) {
        self.writer.refuse_batches();
    }

    /// What the last successful `apply` cost.
    pub fn last_apply(&self) -> ApplyStats {
        self.last_apply
    }

    /// The bank the policy in force lives in (`None` before the first
    /// apply).
    pub fn active_bank(&self) -> Option<u32> {
        self.active_bank
    }

    /// What `apply` would write into `bank` for `compiled`, and the
    /// `IFACES` entries that would switch to it. Fails as `apply` does on a
    /// policy the banks cannot hold.
    pub fn plan(
        &self,
        compiled: &BTreeMap<u32, CompiledIface>,
        generation: u32,
        bank: u32,
    ) -> Result<(BankContent, Vec<(u32, IfaceConfig)>), DataplaneError> {
        let ctx = PlanContext {
            words_per_bank: self.class_words.len() / 2,
            rules_per_bank: self.rules.len() / 2,
            local_known: self.local.is_some(),
            route_lookup: self.route_lookup,
            audit: self.audit,
            audit_ifaces: &self.audit_ifaces,
        };
        let planned = plan_bank(compiled, generation, bank, &ctx)?;
        self.capacities.check(&planned.0, Some(&self.asked))?;
        Ok(planned)
    }

    /// Reads what `bank` holds from the maps: `rules` and `words` slots
    /// from its first, and every class map entry under its ids (tests
    /// compare it with `plan`).
    pub fn read_bank(
        &self,
        bank: u32,
        rules: usize,
        words: usize,
    ) -> Result<BankContent, DataplaneError> {
        let rule_base = bank * (self.rules.len() / 2);
        let word_base = bank * (self.class_words.len() / 2);
        let mut out = BankContent::default();
        for i in 0..rules as u32 {
            out.rules.push(
                self.rules
                    .get(&(rule_base + i), 0)
                    .map_err(map_err(map_names::RULES))?,
            );
        }
        for i in 0..words as u32 {
            out.words.push(
                self.class_words
                    .get(&(word_base + i), 0)
                    .map_err(map_err(map_names::CLASS_WORDS))?,
            );
        }
        let addr = |map: &LpmTrie<MapData, AddrClassKey, u32>, name| {
            let mut m = BTreeMap::new();
            for k in map.keys() {
                let k = k.map_err(map_err(name))?;
                let key: AddrKey = lpm_key(k.prefix_len(), &k.data());
                if bank_of(lpm_key_id(&key)) == bank {
                    m.insert(key, map.get(&k, 0).map_err(map_err(name))?);
                }
            }
            Ok::<_, DataplaneError>(m)
        };
        let port = |map: &LpmTrie<MapData, PortClassKey, u32>, name| {
            let mut m = BTreeMap::new();
            for k in map.keys() {
                let k = k.map_err(map_err(name))?;
                let key: PortKey = lpm_key(k.prefix_len(), &k.data());
                if bank_of(lpm_key_id(&key)) == bank {
                    m.insert(key, map.get(&k, 0).map_err(map_err(name))?);
                }
            }
            Ok::<_, DataplaneError>(m)
        };
        out.src = addr(&self.class_src, map_names::CLASS_SRC)?;
        out.dst = addr(&self.class_dst, map_names::CLASS_DST)?;
        out.sport = port(&self.class_sport, map_names::CLASS_SPORT)?;
        out.dport = port(&self.class_dport, map_names::CLASS_DPORT)?;
        for k in self.class_proto.keys() {
            let k = k.map_err(map_err(map_names::CLASS_PROTO))?;
            if bank_of(k >> 8) == bank {
                out.proto.insert(
                    k,
                    self.class_proto
                        .get(&k, 0)
                        .map_err(map_err(map_names::CLASS_PROTO))?,
                );
            }
        }
        Ok(out)
    }

    /// What a bank written by an earlier agent (adopted pins) holds, as far
    /// as it matters: every class map key with an id of the bank (found by
    /// walking the maps), values and arrays unknown (written in full).
    fn walk_bank(&self, bank: u32) -> BankRecord {
        let addr = |map: &LpmTrie<MapData, AddrClassKey, u32>| -> Vec<AddrKey> {
            map.keys()
                .filter_map(Result::ok)
                .map(|k| lpm_key(k.prefix_len(), &k.data()))
                .filter(|k: &AddrKey| bank_of(lpm_key_id(k)) == bank)
                .collect()
        };
        let port = |map: &LpmTrie<MapData, PortClassKey, u32>| -> Vec<PortKey> {
            map.keys()
                .filter_map(Result::ok)
                .map(|k| lpm_key(k.prefix_len(), &k.data()))
                .filter(|k: &PortKey| bank_of(lpm_key_id(k)) == bank)
                .collect()
        };
        BankRecord::unknown(
            addr(&self.class_src),
            addr(&self.class_dst),
            port(&self.class_sport),
            port(&self.class_dport),
            self.class_proto
                .keys()
                .filter_map(Result::ok)
                .filter(|k| bank_of(k >> 8) == bank),
        )
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

    /// Per-rule packet and byte counters of the generation in force (summed
    /// over CPUs and over the bits of one rule), rules with no packet left
    /// out. Read from the maps, so it works on adopted pins too.
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>, DataplaneError> {
        let mut sums: BTreeMap<(u32, u8, u32, u32), (u64, u64)> = BTreeMap::new();
        for (ifindex, config) in self.ifaces.iter().filter_map(Result::ok) {
            for dir in 0..direction::COUNT as u8 {
                let c = config.classifiers[dir as usize];
                let bits: u32 = (0..table::KINDS)
                    .map(|k| u32::from(config.tables[table::index(dir, k)].len))
                    .sum();
                for bit in 0..bits {
                    let slot = c.rule_base + bit;
                    let per_cpu = self
                        .rule_stats
                        .get(&slot, 0)
                        .map_err(map_err(map_names::RULE_STATS))?;
                    let (packets, bytes) = per_cpu
                        .iter()
                        .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes));
                    if packets == 0 {
                        continue;
                    }
                    let rule = self
                        .rules
                        .get(&slot, 0)
                        .map_err(map_err(map_names::RULES))?;
                    let e = sums
                        .entry((ifindex, dir, rule.policy_id, rule.rule_index))
                        .or_default();
                    e.0 += packets;
                    e.1 += bytes;
                }
            }
        }
        Ok(sums
            .into_iter()
            .map(
                |((ifindex, direction, policy_id, rule_index), (packets, bytes))| RuleCounter {
                    ifindex,
                    direction,
                    policy_id,
                    rule_index,
                    packets,
                    bytes,
                },
            )
            .collect())
    }

    /// Forgets every tracked flow (tests judge each packet afresh).
    pub fn clear_conntrack(&mut self) -> Result<(), DataplaneError> {
        for map in [&mut self.conntrack, &mut self.ct_pending] {
            let keys: Vec<FlowKey> = map.keys().filter_map(Result::ok).collect();
            for key in keys {
                // A flow the LRU evicted meanwhile is already gone.
                let _ = map.remove(&key);
            }
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

    /// Whether the kernel asks its routing table (`bpf_fib_lookup`) about
    /// an address `set_local_addresses` did not list: one it delivers to
    /// this host, has no route for, or drops is host traffic; only one it
    /// routes onward is forwarded. On by default; tests that judge with
    /// `BPF_PROG_TEST_RUN` in a namespace whose routes are not the test's
    /// turn it off so that the listed addresses alone decide. Takes effect
    /// at the next `apply`.
    pub fn set_route_lookup(&mut self, on: bool) {
        self.route_lookup = on;
    }

    /// Audit mode: every verdict is computed, counted and reported, but
    /// nothing is dropped (events say `verdict::AUDIT` where a packet would
    /// have been denied). Takes effect at the next `apply`.
    pub fn set_audit(&mut self, audit: bool) {
        self.audit = audit;
    }

    /// Audit mode for these interfaces only (beside `set_audit`, which
    /// covers all). Takes effect at the next `apply`.
    pub fn set_audit_ifaces(&mut self, ifindexes: impl IntoIterator<Item = u32>) {
        self.audit_ifaces = ifindexes.into_iter().collect();
    }

    /// Whether `attach` may replace an XDP program another tool attached by
    /// netlink (Calico's, say). Without it, `attach` refuses (`XdpBusy`).
    pub fn set_replace_xdp(&mut self, replace: bool) {
        self.replace_xdp = replace;
    }

    /// Limits each source address to `per_second` events (sustained) and
    /// `burst` at once, and all sources together to the global bound
    /// (`set_global_event_rate`); `per_second` 0 lifts every limit.
    /// Suppressed events are counted (`events_suppressed`), never silently
    /// lost.
    pub fn set_event_rate(&mut self, per_second: u32, burst: u32) -> Result<(), DataplaneError> {
        self.source_rate = (per_second, burst);
        self.write_event_rate()
    }

    /// Limits all sources together to `per_second` events (sustained) and
    /// `burst` at once, beside the per-source limit (default
    /// `DEFAULT_GLOBAL_EVENT_RATE` / `DEFAULT_GLOBAL_EVENT_BURST`);
    /// `per_second` 0: no global bound.
    pub fn set_global_event_rate(
        &mut self,
        per_second: u32,
        burst: u32,
    ) -> Result<(), DataplaneError> {
        self.global_rate = (per_second, burst);
        self.write_event_rate()
    }

    fn write_event_rate(&mut self) -> Result<(), DataplaneError> {
        let rate = moat_common::EventRate {
            per_second: self.source_rate.0,
            burst: self.source_rate.1,
            global_per_second: self.global_rate.0,
            global_burst: self.global_rate.1,
        };
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

    /// Every tracked flow orientation and its state: confirmed ones, then
    /// those waiting for a reply (`FLOW_REPLY` marks a reply orientation).
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, FlowState)> {
        let confirmed = self.conntrack.iter().filter_map(Result::ok);
        confirmed
            .chain(self.ct_pending.iter().filter_map(Result::ok))
            .collect()
    }

    /// Flow orientations waiting for a reply (`CT_PENDING`).
    pub fn pending_len(&self) -> usize {
        self.ct_pending.keys().count()
    }

    /// Tracks `flows` as established, in both orientations, as if moat had
    /// allowed them: connections open before moat attached keep flowing.
    /// Returns how many distinct connections (orientation pairs) were
    /// written.
    pub fn seed_flows(
        &mut self,
        flows: &[crate::dataplane::seed::Flow],
    ) -> Result<usize, DataplaneError> {
        let bytes = |a: &std::net::IpAddr| match a {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map_err(|e| DataplaneError::Cpus(std::io::Error::from(e)))?;
        let state = FlowState {
            last_seen_ns: now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64,
            flags: 0,
            _pad: 0,
        };
        let mut written = std::collections::HashSet::new();
        for flow in flows {
            let key = |src, sport, dst, dport| FlowKey {
                src: bytes(src),
                dst: bytes(dst),
                sport,
                dport,
                protocol: flow.protocol,
                _pad: [0; 3],
            };
            let forward = key(&flow.src, flow.sport, &flow.dst, flow.dport);
            let backward = key(&flow.dst, flow.dport, &flow.src, flow.sport);
            if written.contains(&forward) {
                continue;
            }
            for k in [forward, backward] {
                self.conntrack
                    .insert(k, state, 0)
                    .map_err(map_err(map_names::CONNTRACK))?;
                written.insert(k);
            }
        }
        Ok(written.len() / 2)
    }

    /// How full the maps whose capacity is a deployment choice are, read
    /// from the maps themselves (so adopted pins and --max-connections are
    /// reported as they are).
    pub fn fill(&self) -> Result<Fill, DataplaneError> {
        let mut rule_slots = 0u64;
        for (_, config) in self.ifaces.iter().filter_map(Result::ok) {
            rule_slots += config.tables.iter().map(|t| u64::from(t.len)).sum::<u64>();
        }
        Ok(Fill {
            rule_slots,
            rule_slots_per_bank: self.rules.len() / 2,
            flows: self.conntrack_len() as u64,
            flows_capacity: self
                .conntrack
                .map()
                .info()
                .map_err(map_err(map_names::CONNTRACK))?
                .max_entries(),
            pending: self.pending_len() as u64,
            pending_capacity: self
                .ct_pending
                .map()
                .info()
                .map_err(map_err(map_names::CT_PENDING))?
                .max_entries(),
        })
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
                if let Some(event) = decode_event(&item) {
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
    /// (moat bench's packet generator, the atomicity test's flood).
    pub fn test_ingress_live(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<crate::dataplane::testrun::Took, DataplaneError> {
        crate::dataplane::testrun::live_run(
            self.xdp()?,
            program_names::INGRESS,
            frame,
            ifindex,
            repeat,
        )
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

/// The XDP program on `iface`, as `ip` describes it ("prog/xdp id 42 name
/// xdp_pass"), if it can tell.
fn netlink_xdp_program(iface: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", iface])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let detail: Vec<&str> = text
        .split_whitespace()
        .skip_while(|w| !w.starts_with("prog/xdp"))
        .take(5)
        .collect();
    (!detail.is_empty()).then(|| detail.join(" "))
}

/// Id of the classifier of interface `slot`, direction `dir`, in `bank`:
/// distinct for every classifier of both banks, below 2^24 (`proto_key`).
fn classifier_id(bank: u32, slot: u32, dir: u32) -> u32 {
    1 + ((bank * MAX_IFACES + slot) * direction::COUNT as u32 + dir)
}

/// The bank of classifier `id` (`classifier_id`).
fn bank_of(id: u32) -> u32 {
    (id.saturating_sub(1) / direction::COUNT as u32) / MAX_IFACES
}

/// Subdirectory of the pin directory holding the links.
const LINKS_DIR: &str = "links";
const XDP_SUFFIX: &str = "_xdp";
const TC_SUFFIX: &str = "_tc_egress";

/// Where the agent pins the link of `iface`'s program for `dir`
/// (`direction::INGRESS`: XDP, else TC egress) under pin directory `pins`.
pub fn link_pin(pins: &Path, iface: &str, dir: u8) -> PathBuf {
    let suffix = if dir == direction::INGRESS {
        XDP_SUFFIX
    } else {
        TC_SUFFIX
    };
    pins.join(LINKS_DIR).join(format!("{iface}{suffix}"))
}

/// `(interface, path)` of every link pinned under `dir`.
fn pinned_links(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(read) = std::fs::read_dir(dir.join(LINKS_DIR)) else {
        return Vec::new();
    };
    read.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let iface = name
                .strip_suffix(XDP_SUFFIX)
                .or_else(|| name.strip_suffix(TC_SUFFIX))?;
            Some((iface.to_string(), e.path()))
        })
        .collect()
}

/// Removes everything an agent pinned in `dir`: each link (which detaches
/// its program once no process holds it), each map, the directory.
/// Returns the interfaces detached. Absent `dir` is not an error.
pub fn uninstall(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    let pin = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataplaneError::Pin { path, source }
    };
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut ifaces = Vec::new();
    for (iface, path) in pinned_links(dir) {
        std::fs::remove_file(&path).map_err(pin(&path))?;
        ifaces.push(iface);
    }
    let links = dir.join(LINKS_DIR);
    if links.exists() {
        std::fs::remove_dir(&links).map_err(pin(&links))?;
    }
    for entry in std::fs::read_dir(dir)
        .map_err(pin(dir))?
        .filter_map(Result::ok)
    {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(pin(&path))?;
    }
    std::fs::remove_dir(dir).map_err(pin(dir))?;
    ifaces.sort();
    ifaces.dedup();
    Ok(ifaces)
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn nr_cpus() -> Result<usize, DataplaneError> {
    aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))
}
