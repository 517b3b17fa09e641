//! `moat completions SHELL`: a completion script for bash, zsh or fish.

use clap::CommandFactory as _;

use crate::cli::exit::Exit;

/// Print a shell completion script: `moat completions bash >
/// /etc/bash_completion.d/moat`, `moat completions zsh >
/// "${fpath[1]}/_moat"`, `moat completions fish >
/// ~/.config/fish/completions/moat.fish`.
#[derive(clap::Args)]
pub struct Args {
    /// The shell the script is for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The shells a script is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the script to stdout.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut cmd = super::Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "moat", &mut out);
    Ok(Exit::Ok)
}
