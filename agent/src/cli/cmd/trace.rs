//! `moat trace`: run a packet through the kernel program.

use std::path::PathBuf;

use crate::{
    cli::{
        agent,
        exit::{usage, Exit},
    },
    policy::reference::Query,
    OutputFormat,
};

/// Run a packet through the kernel program with the policy the node
/// enforces (the running agent's pinned maps; a trace copy of the program
/// writes only private maps) beside the reference semantics of --policies
/// DIR; exits 5 when they disagree or the node runs another build.
/// --offline: DIR's policy on maps of the trace's own.
#[derive(clap::Args)]
pub struct Args {
    /// The policy the reference judges with (the directory the agent
    /// reads, or an export of the cluster's); required with --offline.
    #[arg(long, value_name = "DIR", required_if_eq("offline", "true"))]
    pub policies: Option<PathBuf>,
    /// The interface the packet arrives on (--ingress) or leaves by
    /// (--egress).
    #[arg(long = "iface", value_name = "NAME")]
    pub iface: String,
    /// Calico node name whose HostEndpoints the reference uses [default:
    /// NODE_NAME, else the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Bundled profile the reference uses when DIR holds no policy of its
    /// own.
    #[arg(long, value_name = "NAME", default_value = "iks-2019", value_parser = super::profile_parser())]
    pub profile: String,
    /// A packet arriving on --iface, e.g. 'tcp 203.0.113.7:40000 ->
    /// 198.51.100.10:22'.
    #[arg(
        long,
        value_name = "PACKET",
        conflicts_with = "egress",
        required_unless_present = "egress"
    )]
    pub ingress: Option<String>,
    /// A packet leaving through --iface.
    #[arg(long, value_name = "PACKET")]
    pub egress: Option<String>,
    /// The packet is forwarded, not to or from the host (--offline; live,
    /// the node's own addresses decide and a difference is noted).
    #[arg(long)]
    pub forwarded: bool,
    /// Trace DIR's policy compiled here, on maps of the trace's own,
    /// instead of what the node enforces.
    #[arg(long)]
    pub offline: bool,
    /// The running agent's bpffs pin directory.
    #[arg(long, value_name = "DIR", default_value = agent::DEFAULT_PIN_DIR, conflicts_with = "offline")]
    pub pin_dir: PathBuf,
    /// The agent's saved state, for policy names ("none": unknown).
    #[arg(long, value_name = "FILE", default_value = crate::dataplane::state::DEFAULT_PATH, conflicts_with = "offline")]
    pub state_file: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Traces the packet and prints both answers.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    crate::dataplane::preflight::check()?;
    let node = args.node.unwrap_or_else(agent::default_node_name);
    let loaded = match &args.policies {
        Some(dir) => {
            let loaded = agent::load_policies(dir, super::profile_arg(&args.profile).as_deref())?;
            for e in &loaded.errors {
                eprintln!("error: {e} (left out)");
            }
            Some(loaded)
        }
        None => None,
    };
    let (dir, packet) = match (args.ingress, args.egress) {
        (Some(p), _) => (moat_common::direction::INGRESS, p),
        (None, Some(p)) => (moat_common::direction::EGRESS, p),
        (None, None) => return Err(usage("--ingress or --egress PACKET")),
    };
    let t = match (args.offline, &loaded) {
        (true, Some(loaded)) => {
            let query = Query {
                forwarded: args.forwarded,
                established: false,
            };
            crate::cli::trace::trace(&loaded.set, &node, &args.iface, dir, &packet, query)?
        }
        (true, None) => return Err(usage("--offline needs --policies DIR")),
        (false, _) => crate::cli::trace::trace_live(&crate::cli::trace::LiveTrace {
            pin_dir: &args.pin_dir,
            state_file: (args.state_file.as_os_str() != "none")
                .then_some(args.state_file.as_path()),
            iface: &args.iface,
            dir,
            packet: &packet,
            forwarded: args.forwarded,
            reference: loaded.as_ref().map(|l| (&l.set, node.as_str())),
        })?,
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&t)?),
        OutputFormat::Text => print!("{}", t.text()),
    }
    Ok(if t.alarming() {
        Exit::Disagree
    } else {
        Exit::Ok
    })
}
