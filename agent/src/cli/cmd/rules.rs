//! `moat rules`: what the node enforces, with counters.

use std::path::PathBuf;

use crate::{cli::exit::Exit, OutputFormat};

/// List what the node enforces right now, per interface, direction and
/// stage in evaluation order: policy, rule index, action, what the rule
/// matches, and live packet and byte counters (from the pinned maps: works
/// while the agent runs or after it stopped).
#[derive(clap::Args)]
pub struct Args {
    /// Only this interface (repeat for several).
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Only rules of this policy (name or kind/name).
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Also each rule's position in its stage and its byte count.
    #[arg(short, long)]
    pub wide: bool,
    /// The agent's bpffs pin directory.
    #[arg(long, value_name = "DIR", default_value = crate::cli::agent::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's saved state, for policy names ("none": by number).
    #[arg(long, value_name = "FILE", default_value = crate::dataplane::state::DEFAULT_PATH)]
    pub state_file: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Prints the listing.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let listing = crate::cli::rules::list(&crate::cli::rules::Query {
        pin_dir: &args.pin_dir,
        state_file: (args.state_file.as_os_str() != "none").then_some(args.state_file.as_path()),
        ifaces: &args.ifaces,
        policy: args.policy.as_deref(),
    })?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&listing)?),
        OutputFormat::Text => print!("{}", listing.text(args.wide)),
    }
    Ok(Exit::Ok)
}
