//! Deny events, from the kernel's ring to the people reading them: each
//! record resolved to the policy and rule that denied it (`event`), the hub
//! that keeps recent history and serves subscribers over the Unix socket
//! (`hub`, `observe`), the file and syslog outputs (`outputs`), and the
//! Prometheus metrics (`metrics`). Uses `policy`, `compile` and `dataplane`
//! (to read the maps it reports on); knows no policy source.

pub mod event;
pub mod hub;
pub mod metrics;
pub mod observe;
pub mod outputs;
