//! Every map of the object. Names and capacities come from `moat_common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use moat_common::{
    AddrClassKey, FlowKey, FlowState, FragKey, FragmentL4, IfaceConfig, PortClassKey, RuleEntry,
    RuleStats, CLASS_ADDR_PREFIXES, CLASS_PORT_PREFIXES, CLASS_PROTOS, EVENTS_BYTES,
    MAX_CLASS_WORDS, MAX_FLOWS, MAX_FRAGMENTS, MAX_IFACES, MAX_LOCAL_ADDRS, MAX_PENDING_FLOWS,
    MAX_RULES,
};

/// ifindex -> how the interface is enforced. Written by the agent.
#[map(name = "MOAT_IFACES_V4")]
pub static IFACES: HashMap<u32, IfaceConfig> = HashMap::with_max_entries(MAX_IFACES, 0);

/// The event rate limit (entry 0). Written by the agent.
#[map(name = "MOAT_RATE_V2")]
pub static EVENT_RATE: Array<moat_common::EventRate> = Array::with_max_entries(1, 0);

/// The token bucket all sources share (entry 0). Written here.
#[map(name = "MOAT_GBUCKET_V1")]
pub static EVENT_GLOBAL: Array<moat_common::EventBucket> = Array::with_max_entries(1, 0);

/// Source address -> its event token bucket. Written here.
#[map(name = "MOAT_BUCKETS_V1")]
pub static EVENT_BUCKETS: LruHashMap<[u8; 16], moat_common::EventBucket> =
    LruHashMap::with_max_entries(moat_common::MAX_EVENT_SOURCES, 0);

/// Node address (IPv4 mapped) -> 1. Written by the agent, kept in sync.
#[map(name = "MOAT_LOCAL_V1")]
pub static LOCAL_ADDRS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Slot -> the rule behind a classifier bit, two banks. Written by the agent.
#[map(name = "MOAT_RULES_V2")]
pub static RULES: Array<RuleEntry> = Array::with_max_entries(MAX_RULES, 0);

/// Slot (as `RULES`) -> packets and bytes the rule decided or logged.
#[map(name = "MOAT_RSTATS_V1")]
pub static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// (classifier, source prefix) -> class vector offset. Written by the agent.
#[map(name = "MOAT_CSRC_V1")]
pub static CLASS_SRC: LpmTrie<AddrClassKey, u32> =
    LpmTrie::with_max_entries(CLASS_ADDR_PREFIXES, 0);

/// (classifier, destination prefix) -> class vector offset.
#[map(name = "MOAT_CDST_V1")]
pub static CLASS_DST: LpmTrie<AddrClassKey, u32> =
    LpmTrie::with_max_entries(CLASS_ADDR_PREFIXES, 0);

/// (classifier, source port prefix) -> class vector offset.
#[map(name = "MOAT_CSPORT_V1")]
pub static CLASS_SPORT: LpmTrie<PortClassKey, u32> =
    LpmTrie::with_max_entries(CLASS_PORT_PREFIXES, 0);

/// (classifier, destination port prefix) -> class vector offset.
#[map(name = "MOAT_CDPORT_V1")]
pub static CLASS_DPORT: LpmTrie<PortClassKey, u32> =
    LpmTrie::with_max_entries(CLASS_PORT_PREFIXES, 0);

/// `classify::proto_key(classifier, protocol)` -> class vector offset.
#[map(name = "MOAT_CPROTO_V1")]
pub static CLASS_PROTO: HashMap<u32, u32> = HashMap::with_max_entries(CLASS_PROTOS, 0);

/// Every class vector (sparse, `moat_common::classify`), two banks.
#[map(name = "MOAT_CWORDS_V1")]
pub static CLASS_WORDS: Array<u64> = Array::with_max_entries(MAX_CLASS_WORDS, 0);

/// Flow orientation -> last activity. Written here on allow, read on every packet.
#[map(name = "MOAT_CT_V1")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Flow orientation of an unanswered connection -> last activity. Written
/// here; a reply moves both orientations to `CONNTRACK`.
#[map(name = "MOAT_CTNEW_V1")]
pub static CT_PENDING: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(MAX_PENDING_FLOWS, 0);

/// Datagram -> L4 fields of its first fragment. Written here.
#[map(name = "MOAT_FRAGS_V2")]
pub static FRAGMENTS: LruHashMap<FragKey, FragmentL4> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// Deny and Log events for the agent. Written here, read by the agent.
#[map(name = "MOAT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU packet counters, `counter::index(direction, counter)`. Written here.
#[map(name = "MOAT_COUNT_V2")]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(moat_common::counter::ENTRIES, 0);

/// The packet in judgement (one per CPU). Kernel-internal: the agent never
/// reads it.
#[map(name = "MOAT_SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::judge::Walk> = PerCpuArray::with_max_entries(1, 0);

/// Adds one to `counter` for `direction`.
#[inline(always)]
pub fn count(direction: u8, counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(moat_common::counter::index(direction, counter)) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU
        // array, so it is valid and only this CPU writes it.
        unsafe { *slot += 1 };
    }
}
