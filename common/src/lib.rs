//! Everything that crosses the kernel boundary, defined once.
//!
//! The eBPF programs (`moat-ebpf`) and the agent (`moat-agent`) both build on
//! these types; the agent converts the raw `u8`/`u32` fields into its own
//! enums with `TryFrom`, never by transmuting. Every struct is `#[repr(C)]`
//! with explicit padding and a size assertion beside it, because the kernel
//! and userspace must agree on the layout byte for byte.
#![no_std]

use core::mem::size_of;

/// Names of the maps in the eBPF object (the kernel keeps 15 characters).
///
/// A name carries a version suffix whenever the layout of its key or value
/// changes, so a newer agent never reads an older pinned map by mistake.
pub mod map_names {
    /// `HashMap<u32 ifindex, IfaceConfig>`: which interfaces are enforced and
    /// where their rule tables start. Written by the agent.
    pub const IFACES: &str = "MOAT_IFACES_V4";
    /// `Array<EventRate>` of one entry: how many events each source, and
    /// all sources together, may cause. Written by the agent. (V2: the
    /// global bound.)
    pub const EVENT_RATE: &str = "MOAT_RATE_V2";
    /// `Array<EventBucket>` of one entry: the token bucket all sources
    /// share. Written by the programs.
    pub const EVENT_GLOBAL: &str = "MOAT_GBUCKET_V1";
    /// `LruHashMap<[u8; 16] source, EventBucket>`: each source's event
    /// token bucket. Written by the programs.
    pub const EVENT_BUCKETS: &str = "MOAT_BUCKETS_V1";
    /// `HashMap<[u8; 16] address, u8>`: the node's own addresses (IPv4
    /// mapped into IPv6). Written by the agent, which keeps it in sync.
    pub const LOCAL_ADDRS: &str = "MOAT_LOCAL_V1";
    /// `Array<RuleEntry>`: the rule behind each bit of every classifier
    /// (only the fields bit vectors do not decide), two banks. Written by
    /// the agent.
    pub const RULES: &str = "MOAT_RULES_V2";
    /// `LpmTrie<AddrClassKey, u32>`: source prefix -> offset of its class
    /// vector in `CLASS_WORDS`. Written by the agent.
    pub const CLASS_SRC: &str = "MOAT_CSRC_V1";
    /// As `CLASS_SRC`, for the destination address.
    pub const CLASS_DST: &str = "MOAT_CDST_V1";
    /// `LpmTrie<PortClassKey, u32>`: source port prefix -> class vector
    /// offset. Written by the agent.
    pub const CLASS_SPORT: &str = "MOAT_CSPORT_V1";
    /// As `CLASS_SPORT`, for the destination port.
    pub const CLASS_DPORT: &str = "MOAT_CDPORT_V1";
    /// `HashMap<u32 proto_class_key(id, protocol), u32>`: protocol -> class
    /// vector offset. Written by the agent.
    pub const CLASS_PROTO: &str = "MOAT_CPROTO_V1";
    /// `Array<u64>`: every class vector, sparse (`classify`), two banks.
    /// Written by the agent.
    pub const CLASS_WORDS: &str = "MOAT_CWORDS_V1";
    /// `PerCpuArray<RuleStats>` indexed like `RULES`: packets and bytes
    /// each rule decided or logged. Written by the programs.
    pub const RULE_STATS: &str = "MOAT_RSTATS_V1";
    /// `LruHashMap<FlowKey, FlowState>`: connections confirmed by a reply
    /// (or seeded from Linux conntrack), in both orientations. Written by
    /// the programs, read by both sides.
    pub const CONNTRACK: &str = "MOAT_CT_V1";
    /// `LruHashMap<FlowKey, FlowState>`: connections allowed and not yet
    /// answered, both orientations (the reply's flagged `FLOW_REPLY`). A
    /// flood of them evicts only each other, never a confirmed connection
    /// (Linux's early drop); the first reply moves the pair to `CONNTRACK`.
    pub const CT_PENDING: &str = "MOAT_CTNEW_V1";
    /// `LruHashMap<FragKey, FragmentL4>`: L4 fields of first fragments, so
    /// that later fragments of the same datagram are judged on them.
    /// (V2: keyed by the Fragment header's next header for IPv6, the
    /// value holds the L4 protocol.)
    pub const FRAGMENTS: &str = "MOAT_FRAGS_V2";
    /// `RingBuf` of `DenyEvent`: every deny and every Log rule hit.
    pub const EVENTS: &str = "MOAT_EVENTS";
    /// `PerCpuArray<u64>` indexed by `counter::index(direction, counter)`.
    /// (V2: `counter::COUNT` grew to 22.)
    pub const COUNTERS: &str = "MOAT_COUNT_V2";

    /// Every map the agent pins in its bpffs directory (by this name), so
    /// that enforcement, connection tracking and counters outlive it.
    /// (Not the programs' per-CPU scratch space, whose layout is internal.)
    pub const PINNED: [&str; 18] = [
        IFACES,
        EVENT_RATE,
        EVENT_GLOBAL,
        EVENT_BUCKETS,
        LOCAL_ADDRS,
        RULES,
        CLASS_SRC,
        CLASS_DST,
        CLASS_SPORT,
        CLASS_DPORT,
        CLASS_PROTO,
        CLASS_WORDS,
        RULE_STATS,
        CONNTRACK,
        CT_PENDING,
        FRAGMENTS,
        EVENTS,
        COUNTERS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// XDP program judging everything that arrives on an enforced interface.
    pub const INGRESS: &str = "moat_ingress";
    /// TC (clsact egress) program judging everything that leaves it.
    pub const EGRESS: &str = "moat_egress";
}

/// Default number of `RuleEntry` slots in each of the two banks of `RULES`
/// (two classifiers at their largest; the agent may load the object with
/// another capacity and splits what it gets in two).
pub const RULE_BANK_SIZE: u32 = 2 * classify::MAX_BITS;
/// Capacity of the `RULES` array: two banks, one in force while the agent
/// writes the other, then switched by rewriting `IfaceConfig` entries.
pub const MAX_RULES: u32 = 2 * RULE_BANK_SIZE;
/// Default capacity of `CLASS_WORDS` (both banks; the agent may load the
/// object with another).
pub const MAX_CLASS_WORDS: u32 = 1 << 21;
/// Capacity of `CLASS_SRC` and `CLASS_DST` compiled into the object
/// (prefixes, both banks); the agent loads the maps with its own
/// (`--addr-prefixes`, default 4,194,304), so this only sizes a bare load.
pub const CLASS_ADDR_PREFIXES: u32 = 1 << 17;
/// Default capacity of `CLASS_SPORT` and `CLASS_DPORT` (prefixes, both banks).
pub const CLASS_PORT_PREFIXES: u32 = 1 << 18;
/// Capacity of `CLASS_PROTO`.
pub const CLASS_PROTOS: u32 = 1 << 14;
/// Capacity of `IFACES`.
pub const MAX_IFACES: u32 = 64;
/// Capacity of `EVENT_BUCKETS` (sources tracked at once; the least
/// recently seen is forgotten, and starts again with a full bucket).
pub const MAX_EVENT_SOURCES: u32 = 65536;
/// Capacity of `LOCAL_ADDRS`.
pub const MAX_LOCAL_ADDRS: u32 = 1024;
/// Capacity of `CONNTRACK` (LRU: the least recently used flow is evicted).
pub const MAX_FLOWS: u32 = 65536;
/// Default capacity of `CT_PENDING` (LRU among unanswered flows only).
pub const MAX_PENDING_FLOWS: u32 = 65536;
/// Capacity of `FRAGMENTS`.
pub const MAX_FRAGMENTS: u32 = 4096;
/// Size of the `EVENTS` ring buffer in bytes (a power of two, page multiple).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// IPv6 extension headers walked before a packet is judged unparsable.
pub const MAX_IPV6_EXT_HEADERS: u32 = 6;
/// VLAN tags (TPID 0x8100, 0x88a8 or 0x9100, stacked in any order, an
/// egress tag the skb carries outside the data included) parsed before the
/// frame: one with more is denied (`reason::VLAN_DEPTH`), since Linux strips
/// any number of priority tags and delivers what is inside.
pub const MAX_VLAN_TAGS: u32 = 4;
/// The TPIDs `MAX_VLAN_TAGS` counts: 802.1Q, 802.1ad, and the pre-standard
/// QinQ 0x9100.
pub const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// Packet direction relative to the host interface.
pub mod direction {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
    pub const COUNT: usize = 2;

    /// "ingress" or "egress".
    pub const fn name(direction: u8) -> &'static str {
        if direction == INGRESS {
            "ingress"
        } else {
            "egress"
        }
    }
}

/// What a rule does when it matches, and what the program decided.
pub mod verdict {
    /// No decision yet: go on to the next stage.
    pub const NONE: u8 = 0;
    /// Accept the packet (and, in the normal stage, track its connection).
    pub const ALLOW: u8 = 1;
    /// Drop the packet.
    pub const DENY: u8 = 2;
    /// Report the packet and go on with the next rule.
    pub const LOG: u8 = 3;
    /// Skip the remaining policies and hand the packet to the profiles.
    pub const PASS: u8 = 4;
    /// In events: the packet would have been denied, and passed because the
    /// interface is in audit mode.
    pub const AUDIT: u8 = 5;
    /// In rule entries only: the end of a tier whose default action is
    /// Deny, reached after a Pass from an earlier tier: deny, reason
    /// `END_OF_POLICIES`.
    pub const END_OF_TIER: u8 = 6;
}

/// Why a packet was denied (or, for `LOG`, why it was reported).
pub mod reason {
    /// A `Deny` rule matched; `policy_id`/`rule_index` name it.
    pub const RULE: u8 = 1;
    /// Policies applied in this direction and none of them decided.
    pub const END_OF_POLICIES: u8 = 2;
    /// No policy applied (or a rule said `Pass`) and no profile allows.
    pub const NO_PROFILE: u8 = 3;
    /// An IP packet too short or malformed to judge.
    pub const UNPARSABLE: u8 = 4;
    /// Connection tracking finds the packet invalid (an unsolicited reply).
    pub const CONNTRACK_INVALID: u8 = 5;
    /// A non-first fragment whose first fragment was not seen.
    pub const FRAGMENT_UNKNOWN: u8 = 6;
    /// A `Log` rule matched (the packet goes on to the next rule).
    pub const LOG_RULE: u8 = 7;
    /// A TCP packet with a flag combination Linux conntrack calls invalid.
    pub const TCP_FLAGS_INVALID: u8 = 8;
    /// More stacked VLAN tags than `MAX_VLAN_TAGS`: what is inside is not
    /// looked at, and the frame is denied.
    pub const VLAN_DEPTH: u8 = 9;
}

/// `policy_id` of an event decided by no rule (default deny, parse error).
pub const NO_POLICY_ID: u32 = u32::MAX;
/// `rule_index` of an event decided by no rule.
pub const NO_RULE_INDEX: u32 = u32::MAX;

/// Per-CPU counters; the `COUNTERS` index is `direction * COUNT + counter`.
pub mod counter {
    pub const NON_IP_PASSED: u32 = 0;
    pub const UNENFORCED_PASSED: u32 = 1;
    pub const FAILSAFE_ALLOWED: u32 = 2;
    pub const CONNTRACK_ALLOWED: u32 = 3;
    pub const POLICY_ALLOWED: u32 = 4;
    pub const PROFILE_ALLOWED: u32 = 5;
    pub const RULE_DENIED: u32 = 6;
    pub const END_OF_POLICIES_DENIED: u32 = 7;
    pub const NO_PROFILE_DENIED: u32 = 8;
    pub const UNPARSABLE_DENIED: u32 = 9;
    pub const CONNTRACK_INVALID_DENIED: u32 = 10;
    pub const FRAGMENT_DENIED: u32 = 11;
    pub const LOG_RULE_HITS: u32 = 12;
    pub const EVENTS_EMITTED: u32 = 13;
    pub const EVENTS_LOST: u32 = 14;
    pub const RELATED_ALLOWED: u32 = 15;
    /// Accepted by an untracked (doNotTrack) policy: no conntrack entry.
    pub const UNTRACKED_ALLOWED: u32 = 16;
    /// Accepted by a pre-DNAT policy.
    pub const PRE_DNAT_ALLOWED: u32 = 17;
    /// Forwarded, and no applyOnForward policy applies: accepted.
    pub const FORWARDED_ALLOWED: u32 = 18;
    /// Events not written because their source exceeded its rate.
    /// EVENTS_EMITTED + EVENTS_SUPPRESSED + EVENTS_LOST counts every event
    /// (one per denied packet, one per Log rule hit).
    pub const EVENTS_SUPPRESSED: u32 = 19;
    /// Would have been denied (counted under its reason too), passed
    /// because the interface is in audit mode.
    pub const AUDIT_PASSED: u32 = 20;
    /// Denied for more stacked VLAN tags than `MAX_VLAN_TAGS`.
    pub const VLAN_DEPTH_DENIED: u32 = 21;
    /// Connections allowed and put in `CT_PENDING` to wait for a reply.
    pub const CT_UNCONFIRMED: u32 = 22;
    /// Connections a reply confirmed (moved to `CONNTRACK`). Unconfirmed
    /// minus confirmed, less those still waiting, is what expired or was
    /// evicted from `CT_PENDING` under pressure, confirmed ones untouched.
    pub const CT_CONFIRMED: u32 = 23;
    /// Number of counters per direction.
    pub const COUNT: u32 = 24;
    /// Total entries of the `COUNTERS` array.
    pub const ENTRIES: u32 = COUNT * super::direction::COUNT as u32;

    /// Index into `COUNTERS` of `counter` for `direction`.
    #[inline(always)]
    pub const fn index(direction: u8, counter: u32) -> u32 {
        direction as u32 * COUNT + counter
    }

    /// Stable names of the counters, in index order (for metrics and tests).
    pub const NAMES: [&str; COUNT as usize] = [
        "non_ip_passed",
        "unenforced_passed",
        "failsafe_allowed",
        "conntrack_allowed",
        "policy_allowed",
        "profile_allowed",
        "rule_denied",
        "end_of_policies_denied",
        "no_profile_denied",
        "unparsable_denied",
        "conntrack_invalid_denied",
        "fragment_denied",
        "log_rule_hits",
        "events_emitted",
        "events_lost",
        "related_allowed",
        "untracked_allowed",
        "pre_dnat_allowed",
        "forwarded_allowed",
        "events_suppressed",
        "audit_passed",
        "vlan_depth_denied",
        "ct_unconfirmed",
        "ct_confirmed",
    ];
}

/// Bits of `RuleEntry::match_flags`: which fields a rule constrains.
pub mod rule_match {
    /// `protocol` must equal the packet's protocol.
    pub const PROTOCOL: u16 = 1 << 0;
    /// `protocol` must differ from the packet's protocol (`notProtocol`).
    pub const NOT_PROTOCOL: u16 = 1 << 1;
    /// Source address must be inside `src_net`/`src_mask`.
    pub const SRC_NET: u16 = 1 << 2;
    /// Destination address must be inside `dst_net`/`dst_mask`.
    pub const DST_NET: u16 = 1 << 3;
    /// Source port must be within `src_port_lo..=src_port_hi`.
    pub const SRC_PORTS: u16 = 1 << 4;
    /// Destination port must be within `dst_port_lo..=dst_port_hi`.
    pub const DST_PORTS: u16 = 1 << 5;
    /// ICMP type must equal `icmp_type`.
    pub const ICMP_TYPE: u16 = 1 << 6;
    /// ICMP code must equal `icmp_code` (only with `ICMP_TYPE`).
    pub const ICMP_CODE: u16 = 1 << 7;
    /// The packet must not have ICMP type `icmp_type` (and, with
    /// `NOT_ICMP_CODE`, code `icmp_code`): `notICMP`.
    pub const NOT_ICMP_TYPE: u16 = 1 << 8;
    pub const NOT_ICMP_CODE: u16 = 1 << 9;
    /// IP version must equal `ip_version`.
    pub const IP_VERSION: u16 = 1 << 10;
}

/// Position of a table in `IfaceConfig::tables`.
pub mod table {
    /// Failsafe rules: `ALLOW` only; a hit skips the untracked and pre-DNAT
    /// stages and, after connection tracking, accepts.
    pub const FAILSAFE: usize = 0;
    /// Untracked stage (`doNotTrack` policies): Allow accepts with no
    /// connection tracking, Deny drops, Pass or no decision goes on.
    pub const UNTRACKED: usize = 1;
    /// Pre-DNAT stage (ingress only, new connections): Allow skips normal
    /// policy, Deny drops, Pass or no decision goes on.
    pub const PRE_DNAT: usize = 2;
    /// Normal-stage policy rules for host traffic, in policy order then
    /// rule order.
    pub const POLICY: usize = 3;
    /// Normal stage for forwarded traffic: `applyOnForward` policies only;
    /// when none applies, forwarded traffic is allowed.
    pub const FORWARD: usize = 4;
    pub const KINDS: usize = 5;
    /// Names, in index order (for errors and metrics).
    pub const NAMES: [&str; KINDS] = ["failsafe", "untracked", "pre-dnat", "policy", "forward"];

    /// Index of the table of `kind` for `direction`.
    #[inline(always)]
    pub const fn index(direction: u8, kind: usize) -> usize {
        direction as usize * KINDS + kind
    }
}

/// Bit-vector classification: how the programs find the first rule of a
/// table that matches a packet without walking the rules.
///
/// Each direction of an interface has one classifier over the rules of all
/// its tables (bit `i` = `RULES[rule_base + i]`; a table is a run of bits).
/// Per field (source and destination address, source and destination port,
/// protocol) the agent splits the field's values into classes and stores,
/// per class, the set of rules a value of that class can match: one lookup
/// per field (LPM tries for addresses and ports, a hash for the protocol)
/// gives five vectors, whose AND holds exactly the rules that match on those
/// fields, in priority order. The lowest bit of the AND whose rule also
/// matches on the rest (`RuleEntry`: IP version, ICMP, negated protocol)
/// decides; a Log rule reports and the search goes on.
///
/// A vector is stored sparse in `CLASS_WORDS` at its class's offset:
/// `SUMMARY_WORDS` words whose bit `w` says word `w` of the vector is not
/// zero; one word packing, per summary word `k`, the count of nonzero
/// words before it (16 bits each); then the nonzero words in order. The
/// AND of the five summaries says which words to look at, so the cost
/// follows the rules that can match, not the number of rules.
pub mod classify {
    /// Summary words per vector.
    pub const SUMMARY_WORDS: u32 = 4;
    /// Words of a vector header: the summary and the packed counts.
    pub const HEADER_WORDS: u32 = SUMMARY_WORDS + 1;
    /// Most words of a vector.
    pub const MAX_WORDS: u32 = 64 * SUMMARY_WORDS;
    /// Most rules (bits) of one classifier: every table of one interface
    /// and direction together.
    pub const MAX_BITS: u32 = 64 * MAX_WORDS;
    /// Field indices of `Classifier::any` and `Classifier::lookup`.
    pub const SRC: usize = 0;
    pub const DST: usize = 1;
    pub const SPORT: usize = 2;
    pub const DPORT: usize = 3;
    pub const PROTO: usize = 4;
    pub const FIELDS: usize = 5;
    /// `prefix_len` of an address key covering every address (the
    /// classifier id alone); a full address adds 128.
    pub const ADDR_ROOT_BITS: u32 = 32;
    /// `prefix_len` of a port key covering every port; a full port adds 16.
    pub const PORT_ROOT_BITS: u32 = 32;

    /// Key of `CLASS_PROTO`.
    pub const fn proto_key(id: u32, protocol: u8) -> u32 {
        (id << 8) | protocol as u32
    }
}

/// Data of an `LpmTrie` key of `CLASS_SRC`/`CLASS_DST`: the classifier id
/// (big endian, so that it is the first 32 bits of every prefix) and the
/// address (IPv4 mapped).
pub type AddrClassKey = [u8; 20];
/// Data of an `LpmTrie` key of `CLASS_SPORT`/`CLASS_DPORT`: the classifier
/// id (big endian), the port (big endian), two zero bytes.
pub type PortClassKey = [u8; 8];

/// One direction of an interface: where its classifier lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classifier {
    /// Key prefix of its entries in the class maps.
    pub id: u32,
    /// Slot in `RULES` of bit 0.
    pub rule_base: u32,
    /// Per field: offset in `CLASS_WORDS` of the vector of rules that do not
    /// constrain it (used when the field is not looked up, and for the
    /// ports of a packet without ports).
    pub any: [u32; classify::FIELDS],
    /// Bit `f` set: look field `f` up (some rule constrains it).
    pub lookup: u32,
}
const _: () = assert!(size_of::<Classifier>() == 32);

/// Value of `RULE_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<RuleStats>() == 16);

/// A run of bits of a classifier, searched in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleTable {
    /// First bit of the table in its direction's classifier.
    pub start: u32,
    /// Number of bits (rules).
    pub len: u16,
    /// Verdict when the walk ends with no rule deciding: `ALLOW`, `DENY`, or
    /// `verdict::NONE` to go on (failsafe tables).
    pub end_verdict: u8,
    /// `reason` reported when `end_verdict` is `DENY`.
    pub end_reason: u8,
    /// Verdict after a `PASS` rule: what the endpoint's profiles decide
    /// (normal stage), or `PASS` itself: the stage ends and the packet goes
    /// on (untracked and pre-DNAT stages).
    pub pass_verdict: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<RuleTable>() == 12);

/// `IfaceConfig::flags`: the interface is a host endpoint moat enforces.
pub const IFACE_ENFORCED: u32 = 1;
/// `IfaceConfig::flags`: `LOCAL_ADDRS` holds the node's addresses, so a
/// packet to (ingress) or from (egress) another address is forwarded.
/// Without it every packet is judged as host traffic (the stricter view).
pub const IFACE_KNOWS_LOCAL: u32 = 2;
/// `IfaceConfig::flags`: audit mode: every verdict is computed, counted and
/// reported, but a packet that would be denied passes (its event says
/// `verdict::AUDIT`).
pub const IFACE_AUDIT: u32 = 4;
/// `IfaceConfig::flags` (with `IFACE_KNOWS_LOCAL`): an address missing from
/// `LOCAL_ADDRS` is forwarded only when the kernel's routing table would
/// route it onward (`bpf_fib_lookup` finds a unicast route); one the table
/// delivers to this host (local, broadcast, anycast and AnyIP routes, 127/8,
/// addresses added since the agent last looked), has no route to, or drops,
/// is host traffic.
pub const IFACE_ROUTE_LOCAL: u32 = 8;

/// Value of `IFACES`: how one interface is enforced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConfig {
    /// Indexed by `table::index(direction, kind)`.
    pub tables: [RuleTable; direction::COUNT * table::KINDS],
    /// Indexed by direction.
    pub classifiers: [Classifier; direction::COUNT],
    /// `IFACE_ENFORCED` or 0.
    pub flags: u32,
    /// Policy generation these tables were compiled from.
    pub generation: u32,
}
const _: () = assert!(size_of::<IfaceConfig>() == 192);

/// One compiled rule. Addresses are 16 bytes: IPv4 as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleEntry {
    pub src_net: [u8; 16],
    pub src_mask: [u8; 16],
    pub dst_net: [u8; 16],
    pub dst_mask: [u8; 16],
    pub src_port_lo: u16,
    pub src_port_hi: u16,
    pub dst_port_lo: u16,
    pub dst_port_hi: u16,
    /// Which policy this entry came from (an index the agent resolves).
    pub policy_id: u32,
    /// Index of the rule inside the policy's ingress or egress list.
    pub rule_index: u32,
    /// A `verdict` constant.
    pub action: u8,
    /// IP protocol number for `PROTOCOL` / `NOT_PROTOCOL`.
    pub protocol: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// `rule_match` bits.
    pub match_flags: u16,
    /// 4 or 6, with `IP_VERSION`.
    pub ip_version: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<RuleEntry>() == 88);

/// Key of `CONNTRACK`: one orientation of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// For ICMP echo both ports hold the echo identifier.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `FlowState::flags`: a FIN or RST was seen, the flow expires soon.
pub const FLOW_CLOSING: u32 = 1;
/// `FlowState::flags` in `CT_PENDING`: this orientation is the reply's; a
/// packet that finds it confirms the connection.
pub const FLOW_REPLY: u32 = 2;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, a tick's resolution) of
    /// the last packet seen (refreshed at most once a second to keep writes
    /// off the fast path).
    pub last_seen_ns: u64,
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowState>() == 16);

/// Idle timeouts of tracked flows, in nanoseconds.
pub mod flow_timeout {
    const SEC: u64 = 1_000_000_000;
    /// An established TCP connection (Linux: 5 days).
    pub const TCP_ESTABLISHED: u64 = 432_000 * SEC;
    /// A TCP connection after FIN or RST (Linux TIME_WAIT: 120 s).
    pub const TCP_CLOSING: u64 = 120 * SEC;
    /// UDP and every other protocol (Linux UDP stream: 120 s).
    pub const UDP: u64 = 120 * SEC;
    /// ICMP echo (Linux: 30 s).
    pub const ICMP: u64 = 30 * SEC;
    /// Refresh `last_seen_ns` only when it is older than this.
    pub const REFRESH: u64 = SEC;
    /// Most an unanswered connection waits for its reply (Linux: TCP
    /// SYN_SENT 120 s; UDP unreplied 30 s).
    pub const UNREPLIED: u64 = 120 * SEC;
}

/// Key of `FRAGMENTS`: one IP datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    /// IPv4: the protocol field. IPv6: the Fragment header's next header,
    /// which every fragment of a datagram repeats.
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// Value of `FRAGMENTS`: the L4 header fields the first fragment carried,
/// with which the later fragments of its datagram are judged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentL4 {
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
    /// The L4 protocol (for IPv6, after any extension headers in the
    /// fragmentable part, which later fragments do not repeat).
    pub protocol: u8,
}
const _: () = assert!(size_of::<FragmentL4>() == 8);

/// Header fields kept for SREs' tools (the kernel LOG target's line):
/// link layer, IP and L4 details beyond what policy matches on. All in host
/// byte order except `mac`, which is as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderDetail {
    /// Destination MAC, source MAC, EtherType: the Ethernet header.
    pub mac: [u8; 14],
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 TOS byte or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 identification or IPv6 flow label.
    pub ip_id: u32,
    /// IPv4 total length, or IPv6 payload length plus the 40-byte header.
    pub ip_len: u16,
    /// IPv4 flags and fragment offset (the 16-bit field).
    pub frag_off: u16,
    pub tcp_window: u16,
    pub tcp_urgent: u16,
    /// UDP / UDP-Lite length field.
    pub udp_len: u16,
    /// ICMP echo identifier and sequence.
    pub icmp_id: u16,
    pub icmp_seq: u16,
    /// The 4 reserved bits after the TCP data offset.
    pub tcp_reserved: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<HeaderDetail>() == 36);

/// Value of `EVENT_RATE`: a token bucket per source address, and one all
/// sources share (so that a flood from spoofed sources, each with a full
/// bucket of its own, still gives a bounded number of events).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    /// Events a source may cause per second, sustained; 0: no limit at
    /// all (neither this nor the global one).
    pub per_second: u32,
    /// Events a source may cause at once (the bucket's size).
    pub burst: u32,
    /// Events all sources together may cause per second; 0: no global
    /// bound.
    pub global_per_second: u32,
    /// Events all sources together may cause at once.
    pub global_burst: u32,
}
const _: () = assert!(size_of::<EventRate>() == 16);

/// Default global event bound (`EventRate::global_per_second`): events a
/// second from all sources together.
pub const DEFAULT_GLOBAL_EVENT_RATE: u32 = 1000;
/// Default `EventRate::global_burst`.
pub const DEFAULT_GLOBAL_EVENT_BURST: u32 = 2000;

/// Value of `EVENT_BUCKETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    /// Thousandths of an event.
    pub milli_tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}
const _: () = assert!(size_of::<EventBucket>() == 16);

/// One record of the `EVENTS` ring buffer: a denied packet or a Log hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the packet was judged.
    pub timestamp_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub policy_id: u32,
    pub rule_index: u32,
    pub ifindex: u32,
    pub generation: u32,
    /// Length of the packet as the program saw it, link layer included.
    pub packet_len: u32,
    pub sport: u16,
    pub dport: u16,
    pub direction: u8,
    /// `verdict::DENY`, `verdict::LOG`, or `verdict::AUDIT` (would be
    /// denied; audit mode let it pass).
    pub verdict: u8,
    /// A `reason` constant.
    pub reason: u8,
    pub protocol: u8,
    /// 4 or 6; 0 when the packet was too short to tell.
    pub ip_version: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
    pub detail: HeaderDetail,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<DenyEvent>() == 112);

/// IP protocol numbers the programs look inside.
pub mod ip_proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// Whether packets of `protocol` carry ports where TCP and UDP do.
#[inline(always)]
pub const fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP | ip_proto::UDPLITE
    )
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: each type is #[repr(C)], made of integers and integer arrays,
    // with every padding byte spelled out as a field (checked by the size
    // assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for RuleTable {}
    unsafe impl aya::Pod for IfaceConfig {}
    unsafe impl aya::Pod for RuleEntry {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragmentL4 {}
    unsafe impl aya::Pod for DenyEvent {}
    unsafe impl aya::Pod for HeaderDetail {}
    unsafe impl aya::Pod for EventRate {}
    unsafe impl aya::Pod for EventBucket {}
    unsafe impl aya::Pod for Classifier {}
    unsafe impl aya::Pod for RuleStats {}
}
