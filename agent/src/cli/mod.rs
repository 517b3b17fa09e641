//! The subcommands of the `moat` binary: their command line in `cmd` (one
//! module per subcommand: its clap definition and its `run`), the exit
//! codes in `exit`, the work of each in the modules beside them (`agent`,
//! `check`, `trace`, `tail`, `status`), and the agent's configuration
//! schema (`config`: file, `MOAT_*` variables and flags). This is the top
//! layer: it may use every other one.

pub mod agent;
pub mod check;
pub mod cmd;
pub mod config;
pub mod exit;
pub mod ready;
pub mod rules;
pub mod status;
pub mod tail;
pub mod trace;
pub mod trace_live;
