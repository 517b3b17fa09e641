//! The exit codes of `moat`: one table, used by every subcommand. Scripts
//! may rely on them; `moat --help` prints the table.

use std::process::ExitCode;

/// What a `moat` command's exit status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Done, and nothing needs attention.
    Ok = 0,
    /// The command failed (an unreadable file, the kernel refused, the
    /// agent stopped on an error), or `moat check` found invalid resources.
    Error = 1,
    /// A usage error: an unknown flag, a bad value, flags that do not go
    /// together, a configuration (file or `MOAT_*` variable) that is wrong.
    Usage = 2,
    /// No agent is running (`moat status`; `moat tail --exit-on-restart`
    /// when the agent went away).
    NotRunning = 3,
    /// The agent runs but is not in sync with its policy source yet
    /// (`moat status`).
    NotReady = 4,
    /// `moat trace`: the node's kernel and the reference disagree, or the
    /// node runs another build of the program.
    Disagree = 5,
    /// `moat tail`: events were lost on the way to this client (gaps).
    EventsLost = 6,
    /// `moat status`: the agent runs and is in sync, but an interface it
    /// was asked to protect is missing, not attached, or governed by no
    /// HostEndpoint's policy (each is named).
    Unprotected = 7,
    /// `moat check`: the node or interface asked about is one no
    /// HostEndpoint of the policy describes (the ones it does are listed).
    UnknownTarget = 8,
}

/// Every exit code, in order.
pub const ALL: [Exit; 9] = [
    Exit::Ok,
    Exit::Error,
    Exit::Usage,
    Exit::NotRunning,
    Exit::NotReady,
    Exit::Disagree,
    Exit::EventsLost,
    Exit::Unprotected,
    Exit::UnknownTarget,
];

impl Exit {
    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// One line saying what the code means.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "success: done, and nothing needs attention",
            Exit::Error => {
                "error: the command failed, or `moat check` found invalid resources"
            }
            Exit::Usage => {
                "usage error: an unknown flag, a bad value, flags that conflict, a wrong config file or MOAT_* variable"
            }
            Exit::NotRunning => "no agent is running (status; tail --exit-on-restart)",
            Exit::NotReady => "the agent runs but is not in sync with its policy source (status)",
            Exit::Disagree => {
                "the node's kernel and the reference disagree, or the node runs another build (trace)"
            }
            Exit::EventsLost => "events were lost on the way to this client (tail)",
            Exit::UnknownTarget => {
                "the node or interface asked about is one no HostEndpoint describes; those that are, are listed (check)"
            }
            Exit::Unprotected => {
                "an interface the agent was asked to protect is not enforced; each is named (status)"
            }
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// The table as `moat --help` prints it.
pub fn table() -> String {
    let mut s = String::from("Exit status:\n");
    for e in ALL {
        s.push_str(&format!("  {}  {}\n", e.code(), e.meaning()));
    }
    s
}

/// An error in how `moat` was invoked: exits [`Exit::Usage`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A usage error with this message.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// Prints a failed command's error and turns the outcome into the exit
/// status: [`Exit::Usage`] for a [`UsageError`], else [`Exit::Error`].
pub fn finish(result: anyhow::Result<Exit>) -> ExitCode {
    match result {
        Ok(code) => code.into(),
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("moat: error: {e:#}\n\nFor more information, try '--help'.");
            Exit::Usage.into()
        }
        Err(e) => {
            eprintln!("moat: error: {e:#}");
            Exit::Error.into()
        }
    }
}
