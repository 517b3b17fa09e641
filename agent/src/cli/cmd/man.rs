//! `moat man`: man pages, generated from the same definitions as `--help`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::cli::exit::Exit;

/// Print the moat(1) man page, or with --out write moat.1 and one page per
/// subcommand (moat-agent.1, moat-tail.1, ...) into DIR: `moat man --out
/// /usr/share/man/man1`.
#[derive(clap::Args)]
pub struct Args {
    /// Write every page into DIR instead of printing moat(1).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Prints or writes the pages.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let cmd = super::Cli::command();
    match args.out {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out)?;
        }
        Some(dir) => {
            let written = write_all(cmd, &dir)?;
            eprintln!(
                "moat: wrote {} man pages into {}",
                written.len(),
                dir.display()
            );
        }
    }
    Ok(Exit::Ok)
}

/// Writes `moat.1` and `moat-SUB.1` for each subcommand into `dir`;
/// returns the files written.
pub fn write_all(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let mut pages = vec![("moat".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        // One page per process run: leaking the name costs nothing.
        let name: &'static str = Box::leak(format!("moat-{}", sub.get_name()).into_boxed_str());
        pages.push((name.to_string(), sub.clone().name(name)));
    }
    let mut written = Vec::new();
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
