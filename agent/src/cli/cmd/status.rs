//! `moat status`: the running agent's state, from its status file.

use std::path::{Path, PathBuf};

use crate::{
    cli::{
        exit::Exit,
        status::{read, render, Found, DEFAULT_PATH},
    },
    OutputFormat,
};

/// Show the running agent's state (from its status file); exits 0 when it
/// runs, is in sync and enforces every interface asked for, 4 when it runs
/// but is not in sync (yet), 7 when an interface is not enforced (each
/// named), 3 when it is not running.
#[derive(clap::Args)]
pub struct Args {
    /// The agent's status file.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_PATH)]
    pub status_file: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Prints the status.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let Args {
        status_file: path,
        output,
    } = args;
    let json = output == OutputFormat::Json;
    Ok(match read(&path)? {
        Found::Missing => {
            not_running(&path, json);
            Exit::NotRunning
        }
        Found::Stale(s, age, why) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"running": false, "reason": why, "age_seconds": age, "last": s})
                );
            } else {
                println!("the agent is not running ({why}); its last status, {age} s old:");
                print!("{}", render(&s));
            }
            Exit::NotRunning
        }
        Found::Fresh(s, age) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"running": true, "age_seconds": age, "status": s})
                );
            } else {
                print!("{}", render(&s));
            }
            crate::cli::status::exit_code(&s)
        }
    })
}

fn not_running(path: &Path, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"running": false, "reason": format!("no status file at {}", path.display())})
        );
    } else {
        println!(
            "the agent is not running: no status file at {}",
            path.display()
        );
    }
}
