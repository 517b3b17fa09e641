//! moat: a node-level eBPF packet filter enforcing Calico host endpoint
//! policy. This library holds everything the `moat` binary does, so tests
//! and tools can drive it directly.

pub mod agent;
pub mod bank;
pub mod bench;
mod bpf_sys;
pub mod calicoctl;
pub mod check;
pub mod classify;
pub mod compile;
pub mod config;
pub mod dataplane;
pub mod dirsource;
pub mod etcdsource;
pub mod event;
pub mod event_outputs;
pub mod events_hub;
pub mod frame;
pub mod k8ssource;
pub mod kubernetes;
pub mod metrics;
pub mod observe;
pub mod packet_spec;
pub mod policy;
pub mod preflight;
pub mod profiles;
pub mod reconcile;
pub mod reference;
pub mod resolve;
pub mod seed;
pub mod selector;
pub mod state;
pub mod status;
pub mod tail;
pub mod trace;
pub mod trace_live;
pub mod watched;

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
