//! `moat bench`: moat against iptables and nftables, or one policy
//! directory's tables alone.

use std::path::PathBuf;

use crate::{
    cli::{agent, exit::Exit},
    policy, OutputFormat,
};

/// Benchmark moat against iptables and nftables on generated rule sets
/// (classification cost, throughput through the stack, update latency,
/// memory; a table, JSON, Markdown and PNG plots in --out). With
/// --policies: ns/packet of DIR's tables through BPF_PROG_TEST_RUN only.
/// Ctrl-C stops it with exit status 130, its namespaces removed.
#[derive(clap::Args)]
pub struct Args {
    /// Measure this policy directory's tables only (the old bench).
    #[arg(long, value_name = "DIR", requires = "iface")]
    pub policies: Option<PathBuf>,
    /// With --policies: the interface whose tables are measured.
    #[arg(long = "iface", value_name = "NAME")]
    pub iface: Option<String>,
    /// With --policies: the Calico node name whose HostEndpoints apply
    /// [default: NODE_NAME, else the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Engines to compare (comma-separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub engines: Option<Vec<crate::bench::engines::Engine>>,
    /// Generated rule counts (comma-separated) [default: 1,10,100,1000,10000,16000;
    /// with --quick 1,100,1000].
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = clap::value_parser!(usize))]
    pub rules: Option<Vec<usize>>,
    /// Rule-set shapes for the classification cost (comma-separated)
    /// [default: realistic,adversarial].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub shapes: Option<Vec<crate::bench::rules::Shape>>,
    /// Seconds of packets per through-the-stack figure [default: 2; with
    /// --quick 0.25].
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// A short run (under two minutes): fewer counts, shorter figures.
    #[arg(long)]
    pub quick: bool,
    /// Where the report goes (report.json, report.md, denied.png,
    /// allowed.png).
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// Write every rendering of the rule sets into DIR and stop.
    #[arg(long, value_name = "DIR")]
    pub write_rules: Option<PathBuf>,
    /// Seed of the rule-set generator.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Packets per BPF_PROG_TEST_RUN call (the kernel reports their mean).
    /// The default keeps every deny's events (up to two each) within the
    /// 1 MiB ring buffer, so each one is really written [default: 20000;
    /// with --quick 2000; with --policies 5000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub repeat: Option<u32>,
    /// Calls per packet; the median is reported [default: 11; with --quick
    /// 5; with --policies 21].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: Option<u32>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Runs the bench the flags ask for.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    if let (Some(policies), Some(iface)) = (&args.policies, &args.iface) {
        return tables(
            policies,
            iface,
            args.node,
            args.repeat.unwrap_or(5_000),
            args.runs.unwrap_or(21),
            args.output,
        );
    }
    crate::bench::cli::run(crate::bench::cli::Args {
        engines: args.engines,
        rules: args.rules,
        shapes: args.shapes,
        duration: args.duration,
        quick: args.quick,
        out: args.out,
        write_rules: args.write_rules,
        seed: args.seed,
        repeat: args.repeat,
        runs: args.runs,
        json: matches!(args.output, OutputFormat::Json),
    })?;
    Ok(Exit::Ok)
}

/// `--policies DIR --iface NAME`: ns/packet of DIR's tables.
fn tables(
    dir: &std::path::Path,
    iface: &str,
    node: Option<String>,
    repeat: u32,
    runs: u32,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    crate::dataplane::preflight::check()?;
    let node = node.unwrap_or_else(agent::default_node_name);
    let loaded = policy::load_dir(dir)?;
    if let Some(e) = loaded.errors.first() {
        anyhow::bail!(
            "{} invalid resource(s) in {}, first: {e}",
            loaded.errors.len(),
            dir.display()
        );
    }
    let results = crate::bench::run(&loaded.set, &node, iface, repeat, runs)?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&results)?),
        OutputFormat::Text => {
            println!(
                "XDP program, BPF_PROG_TEST_RUN, repeat {repeat}, median of {runs} runs ({} {iface}):",
                dir.display()
            );
            for r in &results {
                println!(
                    "  {:<62} {:<4} {:>7.1} ns/packet  (min {:.1}, max {:.1})",
                    r.case, r.verdict, r.median_ns, r.min_ns, r.max_ns
                );
            }
        }
    }
    Ok(Exit::Ok)
}
