//! The command line: one module per subcommand, each with its clap
//! definition (`Args`) and its `run`. `main.rs` only parses and
//! dispatches; the work itself lives in the modules of `cli` beside this
//! one and in the layers below.
//!
//! Conventions every subcommand keeps: every option has help text; a
//! default is shown as `[default: X]` at the end of it (by clap where the
//! flag has a fixed default, in the text where a lower layer, such as the
//! agent's config file, may set it); values are checked while parsing, so
//! a bad one is reported against the flag typed, with exit status 2.

use clap::{Parser, Subcommand};

pub mod agent;
pub mod bench;
pub mod check;
pub mod completions;
pub mod man;
pub mod rules;
pub mod status;
pub mod tail;
pub mod trace;
pub mod uninstall;

/// `moat`: the whole command line.
#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "eBPF host firewall enforcing Calico host endpoint policy",
    after_long_help = super::exit::table()
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once per process: the size of the largest variant costs nothing.
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
#[derive(Subcommand)]
pub enum Command {
    Agent(agent::Args),
    Status(status::Args),
    Tail(tail::Args),
    Check(check::Args),
    Trace(trace::Args),
    Bench(bench::Args),
    Rules(rules::Args),
    Uninstall(uninstall::Args),
    Completions(completions::Args),
    Man(man::Args),
}

/// Parses the process's arguments (exits on a usage error, as clap does),
/// keeping the matches: `moat tail` reads the order of its flags there.
pub fn parse() -> (Cli, clap::ArgMatches) {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Cli::command().get_matches();
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => (cli, matches),
        Err(e) => e.format(&mut Cli::command()).exit(),
    }
}

/// The matches of subcommand `name`.
pub fn sub<'a>(matches: &'a clap::ArgMatches, name: &str) -> &'a clap::ArgMatches {
    matches.subcommand_matches(name).unwrap_or(matches)
}

/// `--profile none` means no profile.
pub fn profile_arg(p: &str) -> Option<String> {
    (p != "none").then(|| p.to_string())
}

/// The bundled profiles' names and `none`, for `--profile`.
pub fn profile_parser() -> clap::builder::PossibleValuesParser {
    let mut names: Vec<&'static str> = crate::policy::profiles::PROFILES
        .iter()
        .map(|p| p.name)
        .collect();
    names.push("none");
    clap::builder::PossibleValuesParser::new(names)
}

/// A CIDR or a single address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 203.0.113.0/24) or an address"))
}

/// A duration such as `30s`, `5m`, `2h` or `1d`, in seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    crate::events::hub::parse_duration(s)
}
