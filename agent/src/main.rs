//! The `moat` command: parses the command line and hands each subcommand
//! to its module in `moat::cli::cmd`.

use std::process::ExitCode;

use moat::cli::{
    cmd::{self, Command},
    exit,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let (cli, matches) = cmd::parse();
    exit::finish(match cli.command {
        Command::Agent(args) => cmd::agent::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Tail(args) => cmd::tail::run(args, cmd::sub(&matches, "tail")),
        Command::Check(args) => cmd::check::run(args),
        Command::Trace(args) => cmd::trace::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Rules(args) => cmd::rules::run(args),
        Command::Uninstall(args) => cmd::uninstall::run(args),
        Command::Completions(args) => cmd::completions::run(args),
        Command::Man(args) => cmd::man::run(args),
    })
}
