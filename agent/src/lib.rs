//! moat: a node-level eBPF packet filter enforcing Calico host endpoint
//! policy. This library holds everything the `moat` binary does, so tests
//! and tools can drive it directly.
//!
//! It is built in layers, each a folder; a layer uses only the layers
//! listed beside it (checked by the `layers` test in `tests/layers.rs`):
//!
//! | layer | owns | may use |
//! |---|---|---|
//! | `policy` | resources, validation, selectors, profiles, the reference semantics | nothing |
//! | `compile` | from a validated policy set to tables and classifiers | `policy` |
//! | `dataplane` | the loaded object, attach, banks, raw bpf(2), seeding, preflight, saved state, test runs | `policy`, `compile` |
//! | `events` | event resolution, the hub, outputs, metrics | `policy`, `compile`, `dataplane` |
//! | `sources` | directory, etcd and Kubernetes sources, reconcile (validate and compile each snapshot) | `policy`, `compile` |
//! | `bench` | `moat bench` against iptables and nftables | `policy`, `compile`, `dataplane`, `events` |
//! | `cli` | one module per subcommand, the configuration schema | every layer |
//!
//! Only `moat_common` crosses the kernel boundary; it depends on nothing.

pub mod bench;
pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod events;
pub mod policy;
pub mod sources;

/// `-o/--output` of `moat agent`: how each deny event is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EventFormat {
    /// One aligned line per event, for people.
    #[default]
    Text,
    /// One JSON object per line, with stable field names.
    Json,
    /// The kernel LOG target's line, as `log-denied-packets` users grep it
    /// (`calico-packet: IN=eth1 OUT= MAC=... SRC=... DST=... LEN=60 ...`).
    Iptables,
    /// Nothing on stdout (events still go to the socket, file, syslog).
    None,
}

/// `-o/--output` of every other subcommand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One aligned line per item, for people.
    #[default]
    Text,
    /// One JSON object per line, with stable field names.
    Json,
}
