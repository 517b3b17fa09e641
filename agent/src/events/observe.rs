//! What the agent does with each deny event besides printing it: the
//! history and the subscribers' socket (`events_hub`), the events file
//! and syslog (`event_outputs`), and the metrics endpoint (`metrics`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use moat_common::{direction, DenyEvent};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    compile::Compiled,
    events::{
        event::{self, ResolvedEvent},
        hub::{self, Hub, SocketConfig, WireEvent},
        metrics::{self, AgentStats, Health, SnapshotRequest},
        outputs::{EventsFile, FileConfig, Syslog},
    },
    EventFormat,
};

/// Where the event socket is by default.
pub const DEFAULT_SOCKET: &str = "/run/moat/events.sock";

/// The observability options of `moat agent`.
#[derive(Clone, Debug)]
pub struct ObserveConfig {
    /// The subscribers' socket; `None`: no socket.
    pub socket: Option<SocketConfig>,
    /// Events kept in memory for `moat tail -n/--since`.
    pub history: usize,
    /// Events queued per subscriber before it gets a gap.
    pub subscriber_queue: usize,
    pub events_file: Option<FileConfig>,
    /// Syslog socket and line format.
    pub syslog: Option<(PathBuf, EventFormat)>,
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for ObserveConfig {
    /// History and queues at their flag defaults; no socket, no outputs,
    /// no metrics endpoint (the flags turn those on).
    fn default() -> Self {
        ObserveConfig {
            socket: None,
            history: 10_000,
            subscriber_queue: 4_096,
            events_file: None,
            syslog: None,
            metrics_addr: None,
        }
    }
}

/// How `moat check` is to be run to explain an event.
#[derive(Clone, Debug)]
pub struct CheckContext {
    /// The policy directory; `None` when the policies come from a
    /// datastore (the command then exports them with calicoctl first).
    pub policies: Option<PathBuf>,
    pub profile: Option<String>,
    pub node: String,
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl CheckContext {
    /// The `moat check` command that judges `e` against the policy
    /// directory; `local` tells forwarded packets from host traffic.
    pub fn command(&self, e: &ResolvedEvent, local: &BTreeSet<IpAddr>) -> String {
        let ingress = e.direction == direction::name(direction::INGRESS);
        let host_side = if ingress { e.dst } else { e.src };
        let to_host = local.is_empty()
            || local.contains(&host_side)
            || host_side.is_multicast()
            || matches!(host_side, IpAddr::V4(a) if a.is_broadcast());
        let (export, dir) = match &self.policies {
            Some(dir) => (String::new(), dir.display().to_string()),
            None => (
                "mkdir -p moat-policies && calicoctl get globalnetworkpolicies,networkpolicies,hostendpoints,globalnetworksets,networksets -o yaml > moat-policies/all.yaml && ".to_string(),
                "moat-policies".to_string(),
            ),
        };
        let mut cmd = format!(
            "{export}moat check --policies {} --node {} --profile {} --iface {} --{} {}",
            shell_quote(&dir),
            shell_quote(&self.node),
            shell_quote(self.profile.as_deref().unwrap_or("none")),
            shell_quote(&e.iface),
            if ingress { "ingress" } else { "egress" },
            shell_quote(&e.packet_spec()),
        );
        if !to_host {
            cmd.push_str(" --forwarded");
        }
        cmd
    }
}

/// The running observability side of the agent.
pub struct Observer {
    pub hub: Arc<Hub>,
    pub stats: Arc<AgentStats>,
    pub health: Arc<Health>,
    /// Scrapes waiting for a snapshot (the agent's loop answers them).
    pub snapshots: mpsc::Receiver<SnapshotRequest>,
    file: Option<EventsFile>,
    syslog: Option<(Syslog, EventFormat)>,
    check: CheckContext,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    last_retention: std::time::Instant,
}

impl Observer {
    /// Opens the outputs and binds the socket and the metrics endpoint
    /// (so a taken path or port fails before anything is attached).
    pub async fn start(cfg: &ObserveConfig, check: CheckContext) -> anyhow::Result<Self> {
        let hub = Hub::new(cfg.history, cfg.subscriber_queue);
        let stats = Arc::new(AgentStats::default());
        let health = Arc::new(Health::default());
        let (snap_tx, snap_rx) = mpsc::channel(8);
        let mut tasks = Vec::new();
        if let Some(sock) = &cfg.socket {
            let listener = hub::bind(sock)?;
            info!(
                "serving events on {} (mode {:o}{}; moat tail --socket {})",
                sock.path.display(),
                sock.mode,
                sock.group
                    .as_ref()
                    .map(|g| format!(", group {g}"))
                    .unwrap_or_default(),
                sock.path.display()
            );
            tasks.push(tokio::spawn(hub::serve(
                listener,
                sock.path.clone(),
                hub.clone(),
            )));
        }
        if let Some(addr) = cfg.metrics_addr {
            let listener = metrics::bind(addr).await?;
            info!(
                "metrics on http://{}/metrics (and /healthz, /readyz)",
                listener.local_addr().unwrap_or(addr)
            );
            let state = Arc::new(metrics::State {
                health: health.clone(),
                stats: stats.clone(),
                hub: hub.clone(),
                snapshots: snap_tx,
            });
            tasks.push(tokio::spawn(metrics::serve(listener, state)));
        }
        let file = cfg.events_file.clone().map(EventsFile::open).transpose()?;
        let syslog = cfg
            .syslog
            .as_ref()
            .map(|(path, format)| Syslog::connect(path).map(|s| (s, *format)))
            .transpose()?;
        Ok(Observer {
            hub,
            stats,
            health,
            snapshots: snap_rx,
            file,
            syslog,
            check,
            tasks,
            last_retention: std::time::Instant::now(),
        })
    }

    /// Handles one event from the ring buffer.
    pub fn event(
        &mut self,
        e: &DenyEvent,
        iface_name: &dyn Fn(u32) -> String,
        compiled: &Compiled,
        wall_offset_ns: i128,
        local: &BTreeSet<IpAddr>,
    ) -> Arc<WireEvent> {
        self.stats.events_read.fetch_add(1, Ordering::Relaxed);
        let iface = iface_name(e.ifindex);
        let resolved = event::resolve(e, iface_name, compiled, wall_offset_ns);
        let iptables = event::iptables_line(e, &iface, "");
        let time_ns = (e.timestamp_ns as i128 + wall_offset_ns) as i64;
        let mut w = WireEvent::new(0, time_ns, resolved, e.detail.ttl, iptables);
        w.check = self.check.command(&w.event, local);
        w.node.clone_from(&self.check.node);
        let w = self.hub.publish(w);
        if let Some(f) = self.file.as_mut() {
            let written = serde_json::to_string(&*w)
                .map_err(anyhow::Error::from)
                .and_then(|line| f.write(&line));
            match written {
                Ok(()) => {
                    self.stats.file_written.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    if self.stats.output_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!("events file: {err:#} (counted in moat_output_errors)");
                    }
                }
            }
        }
        if let Some((s, format)) = &self.syslog {
            let line = match format {
                EventFormat::Iptables | EventFormat::None => {
                    format!("calico-packet: {}", w.iptables)
                }
                EventFormat::Json => serde_json::to_string(&*w).unwrap_or_default(),
                EventFormat::Text => format!("{} check: {}", w.iptables, w.check),
            };
            match s.send(&line) {
                Ok(()) => {
                    self.stats.syslog_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    if self.stats.output_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!("syslog: {err} (counted in moat_output_errors)");
                    }
                }
            }
        }
        w
    }

    /// After a batch of events: flush the file.
    pub fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            if let Err(err) = f.flush() {
                self.stats.output_errors.fetch_add(1, Ordering::Relaxed);
                warn!("events file: {err:#}");
            }
        }
    }

    /// Once a second: the reader is alive; expired files go.
    pub fn tick(&mut self) {
        self.health.beat();
        if self.last_retention.elapsed() >= Duration::from_secs(10) {
            self.last_retention = std::time::Instant::now();
            if let Some(f) = self.file.as_mut() {
                if let Err(err) = f.flush().and_then(|()| f.enforce_retention()) {
                    self.stats.output_errors.fetch_add(1, Ordering::Relaxed);
                    warn!("events file retention: {err:#}");
                }
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.flush();
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("eth1"), "eth1");
        assert_eq!(shell_quote("/etc/moat policies"), "'/etc/moat policies'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
