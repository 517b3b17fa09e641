//! The subcommands of the `moat` binary, one module each (`agent`, `check`,
//! `trace`, `tail`, `status`), and the agent's configuration schema
//! (`config`: file, `MOAT_*` variables and flags). This is the top layer:
//! it may use every other one.

pub mod agent;
pub mod check;
pub mod config;
pub mod ready;
pub mod status;
pub mod tail;
pub mod trace;
pub mod trace_live;
