//! `moat uninstall`: remove what an agent pinned.

use std::path::PathBuf;

use crate::cli::{agent::DEFAULT_PIN_DIR, exit::Exit};

/// Remove every program, link and map an agent pinned (enforcement stops
/// on every interface it attached).
#[derive(clap::Args)]
pub struct Args {
    /// The agent's bpffs pin directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Removes the pins and says what was detached.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let ifaces = crate::cli::agent::uninstall(&args.pin_dir)?;
    if ifaces.is_empty() {
        eprintln!("moat: nothing pinned in {}", args.pin_dir.display());
    } else {
        eprintln!(
            "moat: removed {} and detached from {}",
            args.pin_dir.display(),
            ifaces.join(", ")
        );
    }
    Ok(Exit::Ok)
}
