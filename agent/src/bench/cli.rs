//! `moat bench` without `--policies`: options, defaults, output.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;

use super::{
    engines::{self, Engine},
    report,
    rules::{RuleSet, Shape},
    suite::{self, Options},
};

/// The command line, as parsed.
pub struct Args {
    pub engines: Option<Vec<Engine>>,
    pub rules: Option<Vec<usize>>,
    pub shapes: Option<Vec<Shape>>,
    pub duration: Option<f64>,
    pub quick: bool,
    pub out: PathBuf,
    pub write_rules: Option<PathBuf>,
    pub seed: u64,
    pub repeat: Option<u32>,
    pub runs: Option<u32>,
    /// Print the JSON report instead of the table.
    pub json: bool,
}

/// Rule counts of a full run and of `--quick`.
/// 16,000: near the most one interface direction holds (16,384 rules,
/// every stage together, the fixed policies around the generated rules
/// included).
pub const FULL_RULES: &[usize] = &[1, 10, 100, 1_000, 10_000, 16_000];
pub const QUICK_RULES: &[usize] = &[1, 100, 1_000];

/// The options `args` ask for, with the defaults filled in.
pub fn options(args: &Args) -> anyhow::Result<Options> {
    let mut engines = args
        .engines
        .clone()
        .unwrap_or_else(|| engines::ALL.to_vec());
    engines.sort();
    engines.dedup();
    let rules = args.rules.clone().unwrap_or_else(|| {
        if args.quick {
            QUICK_RULES.to_vec()
        } else {
            FULL_RULES.to_vec()
        }
    });
    for &n in &rules {
        anyhow::ensure!(
            (1..=super::rules::MAX_RULES).contains(&n),
            "--rules {n}: a rule count is 1 to {}",
            super::rules::MAX_RULES
        );
    }
    let duration = args.duration.unwrap_or(if args.quick { 0.25 } else { 2.0 });
    anyhow::ensure!(
        duration.is_finite() && (0.01..=600.0).contains(&duration),
        "--duration {duration}: give 0.01 to 600 seconds"
    );
    Ok(Options {
        engines,
        rules,
        shapes: args
            .shapes
            .clone()
            .unwrap_or_else(|| vec![Shape::Realistic, Shape::Adversarial]),
        duration: Duration::from_secs_f64(duration),
        repeat: args
            .repeat
            .unwrap_or(if args.quick { 2_000 } else { 20_000 }),
        runs: args.runs.unwrap_or(if args.quick { 5 } else { 11 }),
        live_runs: if args.quick { 3 } else { 5 },
        seed: args.seed,
        out: args.out.clone(),
        quick: args.quick,
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = options(&args)?;
    if let Some(dir) = &args.write_rules {
        let mut sets = Vec::new();
        for &shape in &opts.shapes {
            for &n in &opts.rules {
                sets.push(RuleSet::generate(shape, n, opts.seed).map_err(anyhow::Error::msg)?);
            }
        }
        let files = engines::write_rules(dir, &sets)
            .with_context(|| format!("writing the rule sets into {}", dir.display()))?;
        println!("wrote {} files into {}", files.len(), dir.display());
        return Ok(());
    }
    let report = suite::run(&opts)?;
    let files = report::write(&report, &opts.out)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report::markdown(&report));
        println!();
        for f in files {
            println!("wrote {}", f.display());
        }
    }
    Ok(())
}
