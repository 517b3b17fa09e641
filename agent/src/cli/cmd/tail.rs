//! `moat tail`: its flags and how they become the request to the agent.

use std::{path::PathBuf, time::Duration};

use clap::{ArgAction, ArgMatches};

use crate::{
    cli::{
        exit::Exit,
        tail::{self as logic, TailFormat},
    },
    events::{
        hub::{Filter, Request},
        observe::DEFAULT_SOCKET,
    },
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
    /// Only history events at least DURATION old (with --since: a window
    /// in the past); implies --no-follow.
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration, conflicts_with = "follow")]
    pub until: Option<u64>,
    /// Keep streaming live events, across agent restarts (a marker line
    /// shows each break) [default: on a terminal].
    #[arg(short, long, conflicts_with = "no_follow")]
    pub follow: bool,
    /// When following and the agent stops or restarts, exit (status 3)
    /// instead of waiting for it.
    #[arg(long)]
    pub exit_on_restart: bool,
    /// Print the history and exit [default: when not on a terminal].
    #[arg(long)]
    pub no_follow: bool,
    #[command(flatten, next_help_heading = "Filters")]
    pub filters: FilterArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t, help_heading = "Output")]
    pub output: TailFormat,
    /// Prefix of `-o iptables` lines.
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "calico-packet: ",
        help_heading = "Output"
    )]
    pub log_prefix: String,
    #[command(flatten, next_help_heading = "Summary (--top)")]
    pub top: TopArgs,
}

/// Which events are shown. Every filter given must match; `--not`
/// before a filter turns it around (`--not --src 10.0.0.0/8`: events
/// from elsewhere), and may be repeated for several.
#[derive(clap::Args)]
pub struct FilterArgs {
    /// Only events on this interface (repeat for several).
    #[arg(long = "iface", value_name = "NAME", action = ArgAction::Append)]
    pub ifaces: Vec<String>,
    /// Only events in this direction.
    #[arg(long, value_name = "DIRECTION", ignore_case = true, value_parser = ["ingress", "egress"], action = ArgAction::Append)]
    pub direction: Vec<String>,
    /// Only events decided by this policy (name or kind/name).
    #[arg(long, value_name = "NAME", action = ArgAction::Append)]
    pub policy: Vec<String>,
    /// Only events with this verdict (any case: DENY as the output prints
    /// it).
    #[arg(long, value_name = "VERDICT", ignore_case = true, value_parser = ["deny", "log", "audit"], action = ArgAction::Append)]
    pub verdict: Vec<String>,
    /// Only events whose source is in CIDR (an address alone is a /32 or
    /// /128).
    #[arg(long, value_name = "CIDR", value_parser = super::parse_cidr, action = ArgAction::Append)]
    pub src: Vec<ipnet::IpNet>,
    /// Only events whose destination is in CIDR (an address alone is a /32
    /// or /128).
    #[arg(long, value_name = "CIDR", value_parser = super::parse_cidr, action = ArgAction::Append)]
    pub dst: Vec<ipnet::IpNet>,
    /// Only events whose source or destination port is PORT.
    #[arg(long, value_name = "PORT", action = ArgAction::Append)]
    pub port: Vec<u16>,
    /// Only events of this protocol (tcp, udp, icmp, icmpv6, sctp, or a
    /// number).
    #[arg(long, value_name = "PROTO", action = ArgAction::Append)]
    pub proto: Vec<String>,
    /// Only events seen by the agent of this Calico node.
    #[arg(long, value_name = "NAME", action = ArgAction::Append)]
    pub node: Vec<String>,
    /// Negate the filter that follows (hubble's --not): leave out the
    /// events it matches.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true", value_parser = clap::value_parser!(bool))]
    pub not: Vec<bool>,
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

/// Streams the events. `matches` are the subcommand's own, for the order
/// of `--not` and the filters.
pub fn run(args: Args, matches: &ArgMatches) -> anyhow::Result<Exit> {
    let terminal = logic::stdout_is_terminal();
    let top = args.top.top;
    let follow = args.until.is_none() && (args.follow || (!args.no_follow && (top || terminal)));
    let filter = filter(matches).map_err(crate::cli::exit::usage)?;
    let cfg = logic::TailConfig {
        socket: args.socket,
        request: Request {
            // --top counts the window's history, then follows.
            history: args
                .lines
                .or((follow && !top && args.since.is_none()).then_some(10)),
            since_seconds: args.since.or(top.then_some(args.top.window)),
            until_seconds: args.until,
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
        reconnect: !args.exit_on_restart,
    };
    match logic::run(cfg) {
        Err(e) if e.downcast_ref::<logic::NotRunning>().is_some() => {
            eprintln!("moat: error: {e:#}");
            Ok(Exit::NotRunning)
        }
        Err(e) => Err(e),
        Ok(o) if o.agent_gone => Ok(Exit::NotRunning),
        Ok(o) if o.missed > 0 => Ok(Exit::EventsLost),
        Ok(_) => Ok(Exit::Ok),
    }
}

/// One filter flag as typed.
enum One {
    Iface(String),
    Direction(String),
    Policy(String),
    Verdict(String),
    Src(ipnet::IpNet),
    Dst(ipnet::IpNet),
    Port(u16),
    Proto(String),
    Node(String),
}

/// The filter flags in the order typed, with their positions.
fn occurrences(m: &ArgMatches) -> Vec<(usize, One)> {
    fn each<T: Clone + Send + Sync + 'static>(
        m: &ArgMatches,
        id: &str,
        make: fn(T) -> One,
        into: &mut Vec<(usize, One)>,
    ) {
        if let (Some(at), Some(values)) = (m.indices_of(id), m.get_many::<T>(id)) {
            into.extend(at.zip(values.cloned().map(make)));
        }
    }
    let mut v = Vec::new();
    each(m, "ifaces", One::Iface, &mut v);
    each::<String>(
        m,
        "direction",
        |d| One::Direction(d.to_ascii_lowercase()),
        &mut v,
    );
    each(m, "policy", One::Policy, &mut v);
    each::<String>(
        m,
        "verdict",
        |d| One::Verdict(d.to_ascii_lowercase()),
        &mut v,
    );
    each(m, "src", One::Src, &mut v);
    each(m, "dst", One::Dst, &mut v);
    each(m, "port", One::Port, &mut v);
    each(m, "proto", One::Proto, &mut v);
    each(m, "node", One::Node, &mut v);
    v.sort_by_key(|(at, _)| *at);
    v
}

/// Sets `one` in `f`; each filter but --iface is given once.
fn set(f: &mut Filter, one: One) -> Result<(), String> {
    fn once<T>(slot: &mut Option<T>, flag: &str, v: T) -> Result<(), String> {
        if slot.is_some() {
            return Err(format!(
                "{flag} given twice: an event has one (repeat --not {flag} to leave several out)"
            ));
        }
        *slot = Some(v);
        Ok(())
    }
    match one {
        One::Iface(i) => {
            f.iface.push(i);
            Ok(())
        }
        One::Direction(d) => once(&mut f.direction, "--direction", d),
        One::Policy(p) => once(&mut f.policy, "--policy", p),
        One::Verdict(v) => once(&mut f.verdict, "--verdict", v),
        One::Src(n) => once(&mut f.src, "--src", n),
        One::Dst(n) => once(&mut f.dst, "--dst", n),
        One::Port(p) => once(&mut f.port, "--port", p),
        One::Proto(p) => once(&mut f.proto, "--proto", p),
        One::Node(n) => once(&mut f.node, "--node", n),
    }
}

/// The request's filter: the flags as typed, each `--not` turning the
/// next one into an exclusion.
fn filter(m: &ArgMatches) -> Result<Filter, String> {
    let mut nots: Vec<usize> = m
        .indices_of("not")
        .map(Iterator::collect)
        .unwrap_or_default();
    nots.sort_unstable();
    let mut nots = nots.into_iter().peekable();
    let mut f = Filter::default();
    for (at, one) in occurrences(m) {
        let mut negated = 0;
        while nots.next_if(|n| *n < at).is_some() {
            negated += 1;
        }
        match negated {
            0 => set(&mut f, one)?,
            1 => {
                let mut x = Filter::default();
                set(&mut x, one)?;
                f.exclude.push(x);
            }
            _ => return Err("--not --not: one --not negates the one filter after it".into()),
        }
    }
    if nots.next().is_some() {
        return Err(
            "--not must come before a filter (--iface, --direction, --policy, --verdict, --src, --dst, --port, --proto, --node)"
                .into(),
        );
    }
    f.validate().map_err(|e| format!("--{e}"))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parsed(args: &[&str]) -> Result<Filter, String> {
        let m = crate::cli::cmd::Cli::command()
            .try_get_matches_from([&["moat", "tail"], args].concat())
            .map_err(|e| e.to_string())?;
        filter(m.subcommand_matches("tail").expect("tail"))
    }

    #[test]
    fn not_negates_the_next_filter() {
        assert_eq!(parsed(&[]), Ok(Filter::default()));
        let f = parsed(&["--port", "23", "--verdict", "DENY"]).expect("valid");
        assert_eq!((f.port, f.verdict.as_deref()), (Some(23), Some("deny")));
        assert!(f.exclude.is_empty());
        let f = parsed(&[
            "--not", "--port", "23", "--src", "10.0.0.1", "--not", "--node", "w",
        ])
        .expect("valid");
        assert_eq!(f.port, None);
        assert_eq!(f.src, Some("10.0.0.1/32".parse().expect("net")));
        assert_eq!(f.exclude.len(), 2);
        assert_eq!(f.exclude[0].port, Some(23));
        assert_eq!(f.exclude[1].node.as_deref(), Some("w"));
        assert!(parsed(&["--port", "23", "--not"]).is_err());
        assert!(parsed(&["--not", "--not", "--port", "23"]).is_err());
        assert!(parsed(&["--src", "10.0.0.1", "--src", "10.0.0.2"]).is_err());
        let f = parsed(&["--not", "--src", "10.0.0.1", "--not", "--src", "10.0.0.2"]).expect("ok");
        assert_eq!(f.exclude.len(), 2);
    }
}
