//! `moat tail`: its flags and how they become the request to the agent.

use std::{path::PathBuf, time::Duration};

use crate::{
    cli::{
        exit::Exit,
        tail::{self as logic, TailFormat},
    },
    events::{hub::Request, observe::DEFAULT_SOCKET},
};

/// Show the agent's recent and live deny events (from its socket),
/// filtered, as text, JSON or iptables LOG lines, or summarised; exits 6
/// when events were lost on the way.
#[derive(clap::Args)]
pub struct Args {
    /// The agent's event socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// At most N of the most recent events from the history [default: 10
    /// when following, all the agent keeps otherwise].
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<usize>,
    /// Only history events of the last DURATION (30s, 5m, 2h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration)]
    pub since: Option<u64>,
    /// Keep streaming live events [default: on a terminal].
    #[arg(short, long, conflicts_with = "no_follow")]
    pub follow: bool,
    /// Print the history and exit [default: when not on a terminal].
    #[arg(long)]
    pub no_follow: bool,
    #[command(flatten, next_help_heading = "Filters")]
    pub filters: FilterArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: TailFormat,
    /// Prefix of `-o iptables` lines.
    #[arg(long, value_name = "TEXT", default_value = "calico-packet: ")]
    pub log_prefix: String,
    #[command(flatten, next_help_heading = "Summary (--top)")]
    pub top: TopArgs,
}

/// Which events are shown.
#[derive(clap::Args)]
pub struct FilterArgs {
    /// Only events on this interface (repeat for several).
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Only events in this direction.
    #[arg(long, value_name = "DIRECTION", ignore_case = true, value_parser = ["ingress", "egress"])]
    pub direction: Option<String>,
    /// Only events decided by this policy (name or kind/name).
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Only events with this verdict (any case: DENY as the output prints
    /// it).
    #[arg(long, value_name = "VERDICT", ignore_case = true, value_parser = ["deny", "log", "audit"])]
    pub verdict: Option<String>,
    /// Only events whose source is in CIDR (an address alone is a /32 or
    /// /128).
    #[arg(long, value_name = "CIDR", value_parser = super::parse_cidr)]
    pub src: Option<ipnet::IpNet>,
    /// Only events whose destination is in CIDR (an address alone is a /32
    /// or /128).
    #[arg(long, value_name = "CIDR", value_parser = super::parse_cidr)]
    pub dst: Option<ipnet::IpNet>,
    /// Only events whose source or destination port is PORT.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only events of this protocol (tcp, udp, icmp, icmpv6, sctp, or a
    /// number).
    #[arg(long, value_name = "PROTO")]
    pub proto: Option<String>,
}

/// `--top` and its settings.
#[derive(clap::Args)]
pub struct TopArgs {
    /// Summary: the top denied sources, ports and policies over a sliding
    /// window, redrawn in place on a terminal (with --no-follow: one frame
    /// of the window's history, then exit).
    #[arg(long)]
    pub top: bool,
    /// The --top window.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = super::parse_duration)]
    pub window: u64,
    /// How often --top redraws.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = super::parse_duration)]
    pub interval: u64,
    /// Rows per --top table.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub rows: usize,
}

/// Streams the events.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let terminal = logic::stdout_is_terminal();
    let top = args.top.top;
    let follow = args.follow || (!args.no_follow && (top || terminal));
    let f = args.filters;
    let filter = logic::filter(
        f.ifaces,
        f.direction.map(|d| d.to_ascii_lowercase()),
        f.policy,
        f.verdict.map(|v| v.to_ascii_lowercase()),
        f.src,
        f.dst,
        f.port,
        f.proto,
    )
    .map_err(|e| crate::cli::exit::usage(format!("{e:#}")))?;
    let cfg = logic::TailConfig {
        socket: args.socket,
        request: Request {
            // --top counts the window's history, then follows.
            history: args
                .lines
                .or((follow && !top && args.since.is_none()).then_some(10)),
            since_seconds: args.since.or(top.then_some(args.top.window)),
            follow,
            filter,
        },
        format: args.output,
        top: top.then(|| logic::TopConfig {
            window: Duration::from_secs(args.top.window.max(1)),
            interval: Duration::from_secs(args.top.interval.max(1)),
            rows: args.top.rows,
            in_place: terminal,
        }),
        prefix: args.log_prefix,
        colour: terminal,
    };
    Ok(if logic::run(cfg)? {
        Exit::EventsLost
    } else {
        Exit::Ok
    })
}
