//! Prometheus metrics, `/healthz` and `/readyz` over HTTP
//! (`moat agent --metrics-addr`).
//!
//! Every scrape asks the agent's loop for a fresh [`Snapshot`] of the
//! dataplane (the loop owns it), then encodes it in the OpenMetrics text
//! format with `prometheus-client`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use moat_common::{counter, direction};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::events::hub::Hub;

/// Packets and bytes one rule decided or logged (per direction, all
/// interfaces), since the generation in force was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    pub policy: String,
    pub rule: u32,
    pub direction: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The policy source's health, from the reconciler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyHealth {
    /// Invalid objects in the latest snapshot (left out, or their last
    /// good version kept).
    pub objects_invalid: u64,
    /// Of those, objects whose last good version stays in force.
    pub objects_kept_last_good: u64,
    /// Snapshots reconciled since the agent started.
    pub reconciles: u64,
    /// Snapshots that did not compile (the policy in force stayed).
    pub reconcile_errors: u64,
}

/// What the dataplane says at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The policy source's health.
    pub policy: PolicyHealth,
    /// `[direction][counter]`, summed over CPUs.
    pub counters: [[u64; counter::COUNT as usize]; direction::COUNT],
    /// Rule slots and tracked flows, with their capacities.
    pub fill: crate::dataplane::Fill,
    pub local_addresses: u64,
    pub generation: u32,
    pub last_apply_seconds: f64,
    /// Rules that decided or logged at least one packet.
    pub rules: Vec<RuleCounter>,
    /// Every map's entries, capacity and kernel memory.
    pub maps: Vec<crate::dataplane::MapUsage>,
}

/// Counters of the agent's own work.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Events read from the ring buffer.
    pub events_read: AtomicU64,
    /// Ring buffer records too short to be an event.
    pub events_malformed: AtomicU64,
    /// Events written to the events file / sent to syslog.
    pub file_written: AtomicU64,
    pub syslog_sent: AtomicU64,
    /// Writes to the events file or syslog that failed.
    pub output_errors: AtomicU64,
    /// How long each policy apply took.
    pub apply_seconds: ApplySeconds,
    /// Per-rule counters carried across generations.
    pub rule_totals: Mutex<RuleTotals>,
    /// Generations that failed to apply (the policy in force stayed).
    pub apply_errors: AtomicU64,
}

/// The `moat_apply_seconds` histogram: every policy apply's duration.
#[derive(Clone, Debug)]
pub struct ApplySeconds(Histogram);

impl Default for ApplySeconds {
    fn default() -> Self {
        // 1 ms to about 16 s.
        ApplySeconds(Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        ))
    }
}

impl ApplySeconds {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// Per-rule packet and byte totals that survive generations: the kernel
/// counts per bank slot, from zero at each generation; this adds up what
/// each rule (by policy and rule index) matched in every generation, so a
/// series never vanishes or goes backwards while the agent runs.
#[derive(Debug, Default)]
pub struct RuleTotals {
    generation: u32,
    /// Totals of the generations before `generation`.
    before: std::collections::BTreeMap<(String, u32, &'static str), (u64, u64)>,
    /// The latest counts of `generation`.
    current: std::collections::BTreeMap<(String, u32, &'static str), (u64, u64)>,
}

impl RuleTotals {
    /// Takes the kernel's counts of `generation` (read now); returns every
    /// rule's total.
    pub fn observe(&mut self, generation: u32, rules: &[RuleCounter]) -> Vec<RuleCounter> {
        if generation != self.generation {
            for (k, (p, b)) in std::mem::take(&mut self.current) {
                let e = self.before.entry(k).or_default();
                e.0 += p;
                e.1 += b;
            }
            self.generation = generation;
        }
        for r in rules {
            let e = self
                .current
                .entry((r.policy.clone(), r.rule, r.direction))
                .or_default();
            // Within a generation the kernel's counts only grow.
            *e = ((e.0).max(r.packets), (e.1).max(r.bytes));
        }
        let mut all = self.before.clone();
        for (k, (p, b)) in &self.current {
            let e = all.entry(k.clone()).or_default();
            e.0 += p;
            e.1 += b;
        }
        all.into_iter()
            .map(
                |((policy, rule, direction), (packets, bytes))| RuleCounter {
                    policy,
                    rule,
                    direction,
                    packets,
                    bytes,
                },
            )
            .collect()
    }
}

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the policy is enforced on every interface.
    pub ready: AtomicBool,
    pub ready_detail: Mutex<String>,
    /// Unix ns of the event reader's last turn.
    pub reader_beat_ns: AtomicI64,
}

impl Health {
    pub fn beat(&self) {
        self.reader_beat_ns
            .store(crate::events::hub::now_ns(), Ordering::Relaxed);
    }

    pub fn set_ready(&self, detail: String) {
        *self.ready_detail.lock().unwrap_or_else(|p| p.into_inner()) = detail;
        self.ready.store(true, Ordering::Release);
    }

    /// Not ready (any more), and why: what `/readyz` answers.
    pub fn set_not_ready(&self, why: String) {
        self.ready.store(false, Ordering::Release);
        *self.ready_detail.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
}

/// A request for a snapshot, answered by the agent's loop.
pub type SnapshotRequest = oneshot::Sender<Snapshot>;

/// Everything the HTTP server reads.
pub struct State {
    pub health: Arc<Health>,
    pub stats: Arc<AgentStats>,
    pub hub: Arc<Hub>,
    pub snapshots: mpsc::Sender<SnapshotRequest>,
}

const STAGE_ALLOWED: [(u32, &str); 10] = [
    (counter::FAILSAFE_ALLOWED, "failsafe"),
    (counter::CONNTRACK_ALLOWED, "conntrack"),
    (counter::RELATED_ALLOWED, "related"),
    (counter::UNTRACKED_ALLOWED, "untracked"),
    (counter::PRE_DNAT_ALLOWED, "pre_dnat"),
    (counter::POLICY_ALLOWED, "policy"),
    (counter::PROFILE_ALLOWED, "profile"),
    (counter::FORWARDED_ALLOWED, "forwarded"),
    (counter::NON_IP_PASSED, "non_ip"),
    (counter::UNENFORCED_PASSED, "unenforced"),
];

const DENY_REASONS: [(u32, &str); 7] = [
    (counter::RULE_DENIED, "rule"),
    (counter::END_OF_POLICIES_DENIED, "end_of_policies"),
    (counter::NO_PROFILE_DENIED, "no_profile"),
    (counter::UNPARSABLE_DENIED, "unparsable"),
    (counter::CONNTRACK_INVALID_DENIED, "conntrack_invalid"),
    (counter::FRAGMENT_DENIED, "fragment"),
    (counter::VLAN_DEPTH_DENIED, "vlan_depth"),
];

const EVENT_OUTCOMES: [(u32, &str); 3] = [
    (counter::EVENTS_EMITTED, "emitted"),
    (counter::EVENTS_SUPPRESSED, "suppressed"),
    (counter::EVENTS_LOST, "lost"),
];

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The OpenMetrics text of `s` and the agent's own counters.
pub fn render(s: &Snapshot, stats: &AgentStats, hub: &Hub, health: &Health) -> String {
    let mut reg = Registry::default();
    let counter_family = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let allowed = counter_family(
        &mut reg,
        "moat_packets_allowed",
        "Packets passed, by direction and the stage that let them through",
    );
    let denied = counter_family(
        &mut reg,
        "moat_packets_denied",
        "Packets denied (in audit mode: would have been), by direction and drop reason",
    );
    let log_hits = counter_family(&mut reg, "moat_log_rule_hits", "Log rule matches");
    let audit = counter_family(
        &mut reg,
        "moat_audit_passed",
        "Would-be denies passed because the interface is in audit mode",
    );
    let events = counter_family(
        &mut reg,
        "moat_events",
        "Kernel deny/log events by outcome: emitted + suppressed (rate limit) + lost (ring full) counts every event",
    );
    let conntrack = counter_family(
        &mut reg,
        "moat_conntrack_connections",
        "Connections by conntrack outcome: unconfirmed (allowed, waiting for a reply), confirmed (a reply came); unconfirmed ones beyond those waiting expired or were evicted under pressure, never a confirmed one",
    );
    for (d, row) in s.counters.iter().enumerate() {
        let dir = direction::name(d as u8);
        for (c, outcome) in [
            (counter::CT_UNCONFIRMED, "unconfirmed"),
            (counter::CT_CONFIRMED, "confirmed"),
        ] {
            conntrack
                .get_or_create(&labels(&[("direction", dir), ("outcome", outcome)]))
                .inc_by(row[c as usize]);
        }
        for (c, stage) in STAGE_ALLOWED {
            allowed
                .get_or_create(&labels(&[("direction", dir), ("stage", stage)]))
                .inc_by(row[c as usize]);
        }
        for (c, reason) in DENY_REASONS {
            denied
                .get_or_create(&labels(&[("direction", dir), ("reason", reason)]))
                .inc_by(row[c as usize]);
        }
        for (c, outcome) in EVENT_OUTCOMES {
            events
                .get_or_create(&labels(&[("direction", dir), ("outcome", outcome)]))
                .inc_by(row[c as usize]);
        }
        log_hits
            .get_or_create(&labels(&[("direction", dir)]))
            .inc_by(row[counter::LOG_RULE_HITS as usize]);
        audit
            .get_or_create(&labels(&[("direction", dir)]))
            .inc_by(row[counter::AUDIT_PASSED as usize]);
    }
    rule_series(&mut reg, s, stats);
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        reg.register(name, help, g);
    };
    let fill = Family::<Labels, Gauge>::default();
    reg.register(
        "moat_map_entries",
        "Entries in the kernel maps (see moat_map_capacity)",
        fill.clone(),
    );
    let capacity = Family::<Labels, Gauge>::default();
    reg.register(
        "moat_map_capacity",
        "Capacity of the kernel maps",
        capacity.clone(),
    );
    for (map, n, cap) in [
        ("conntrack", s.fill.flows, s.fill.flows_capacity),
        ("conntrack_pending", s.fill.pending, s.fill.pending_capacity),
        (
            "local_addresses",
            s.local_addresses,
            moat_common::MAX_LOCAL_ADDRS,
        ),
        ("rules", s.fill.rule_slots, s.fill.rule_slots_per_bank),
    ] {
        fill.get_or_create(&labels(&[("map", map)])).set(n as i64);
        capacity
            .get_or_create(&labels(&[("map", map)]))
            .set(cap as i64);
    }
    let bytes = Family::<Labels, Gauge>::default();
    reg.register(
        "moat_map_bytes",
        "Kernel memory each map holds (fdinfo memlock)",
        bytes.clone(),
    );
    for m in &s.maps {
        let l = labels(&[("map", &m.name)]);
        bytes.get_or_create(&l).set(m.bytes as i64);
        fill.get_or_create(&l).set(m.entries as i64);
        capacity.get_or_create(&l).set(i64::from(m.max_entries));
    }
    gauge(
        &mut reg,
        "moat_policy_generation",
        "Policy generation in force (the same as moat_generation)",
        s.generation as i64,
    );
    policy_health(&mut reg, s, stats);
    let apply = Gauge::<f64, AtomicU64>::default();
    apply.set(s.last_apply_seconds);
    reg.register(
        "moat_policy_last_apply_seconds",
        "How long the last policy apply took",
        apply,
    );
    gauge(
        &mut reg,
        "moat_ready",
        "1 while the policy is enforced on every interface asked for (0: see /readyz or moat status for why not)",
        i64::from(health.ready.load(Ordering::Acquire)),
    );
    gauge(
        &mut reg,
        "moat_event_subscribers",
        "Clients following the event stream",
        hub.subscribers() as i64,
    );
    agent_counters(&mut reg, stats, hub);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// `moat_rule_packets` and `moat_rule_bytes`, carried across generations.
fn rule_series(reg: &mut Registry, s: &Snapshot, stats: &AgentStats) {
    let counter_family = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let rules = stats
        .rule_totals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe(s.generation, &s.rules);
    if !rules.is_empty() {
        let packets = counter_family(
            reg,
            "moat_rule_packets",
            "Packets a rule matched, by policy, rule index and direction, over every generation",
        );
        let bytes = counter_family(
            reg,
            "moat_rule_bytes",
            "Bytes a rule matched, by policy, rule index and direction, over every generation",
        );
        for r in &rules {
            let rule = r.rule.to_string();
            let l = labels(&[
                ("policy", &r.policy),
                ("rule", &rule),
                ("direction", r.direction),
            ]);
            packets.get_or_create(&l).inc_by(r.packets);
            bytes.get_or_create(&l).inc_by(r.bytes);
        }
    }
}

/// The agent's own counters: events read, outputs, subscribers.
fn agent_counters(reg: &mut Registry, stats: &AgentStats, hub: &Hub) {
    let agent_counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    agent_counter(
        reg,
        "moat_agent_events_read",
        "Events the agent read from the ring buffer",
        r(&stats.events_read),
    );
    agent_counter(
        reg,
        "moat_agent_events_malformed",
        "Ring buffer records too short to be an event",
        r(&stats.events_malformed),
    );
    agent_counter(
        reg,
        "moat_subscriber_events_missed",
        "Events subscribers missed because they read too slowly (each got a gap marker)",
        r(&hub.missed),
    );
    agent_counter(
        reg,
        "moat_events_file_written",
        "Events written to the events file",
        r(&stats.file_written),
    );
    agent_counter(
        reg,
        "moat_syslog_sent",
        "Events sent to syslog",
        r(&stats.syslog_sent),
    );
    agent_counter(
        reg,
        "moat_output_errors",
        "Failed writes to the events file or syslog",
        r(&stats.output_errors),
    );
}

/// The policy's health: invalid objects, reconcile and apply errors, apply
/// times, the generation, and what this build is.
fn policy_health(reg: &mut Registry, s: &Snapshot, stats: &AgentStats) {
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let g = Gauge::<i64>::default();
        g.set(v as i64);
        reg.register(name, help, g);
    };
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    gauge(
        reg,
        "moat_generation",
        "Policy generation in force",
        u64::from(s.generation),
    );
    gauge(
        reg,
        "moat_objects_invalid",
        "Invalid objects in the policy source's latest snapshot (left out, or their last good version kept)",
        s.policy.objects_invalid,
    );
    gauge(
        reg,
        "moat_objects_kept_last_good",
        "Invalid objects whose last good version stays in force",
        s.policy.objects_kept_last_good,
    );
    counter(
        reg,
        "moat_reconciles",
        "Policy source snapshots reconciled",
        s.policy.reconciles,
    );
    counter(
        reg,
        "moat_reconcile_errors",
        "Snapshots that did not compile or could not be applied (the policy in force stayed)",
        s.policy
            .reconcile_errors
            .saturating_add(stats.apply_errors.load(Ordering::Relaxed)),
    );
    reg.register(
        "moat_apply_seconds",
        "How long each policy apply took (planning and writing the maps, the switch)",
        stats.apply_seconds.0.clone(),
    );
    let info = Info::new(vec![
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        (
            "kernel".to_string(),
            nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    ]);
    reg.register(
        "moat_build",
        "The agent's version and the kernel it runs on",
        info,
    );
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// How long the event reader may stay silent before `/healthz` fails (it
/// turns at least once a second).
const READER_STALL: Duration = Duration::from_secs(5);

async fn handle(state: &State, path: &str) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            let snapshot = match state.snapshots.try_send(tx) {
                Ok(()) => tokio::time::timeout(Duration::from_secs(3), rx).await,
                Err(_) => {
                    return reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        "the agent is busy: too many scrapes at once\n".into(),
                    )
                }
            };
            match snapshot {
                Ok(Ok(s)) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(&s, &state.stats, &state.hub, &state.health),
                ),
                _ => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "the agent did not answer within 3 s\n".into(),
                ),
            }
        }
        "/healthz" => {
            let beat = state.health.reader_beat_ns.load(Ordering::Relaxed);
            let silent = crate::events::hub::now_ns() - beat;
            if beat > 0 && silent < READER_STALL.as_nanos() as i64 {
                reply(StatusCode::OK, TEXT, "ok: event reader running\n".into())
            } else if beat == 0 {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "event reader not started\n".into(),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("event reader stalled for {:.1} s\n", silent as f64 / 1e9),
                )
            }
        }
        "/readyz" => {
            let detail = state
                .health
                .ready_detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if state.health.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, TEXT, format!("ready: {detail}\n"))
            } else if detail.is_empty() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not ready: the policy is not enforced on every interface yet\n".into(),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {detail}\n"),
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Binds `addr` (before the agent attaches, so a taken port fails early).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr} (--metrics-addr)"))
}

/// Connections served at once; a new one beyond this closes the oldest,
/// so idle or half-sent connections never lock probes and scrapes out.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client may take to send a request's headers (from the
/// moment it connects, or after the previous response).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives, requests or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Bytes buffered per connection (hyper's minimum): bounds the memory an
/// unread or oversized request can take.
const MAX_BUF: usize = 8192;

/// The connections being served, oldest first.
#[derive(Default)]
struct Live {
    next: u64,
    tasks: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Serves one connection within the bounds above.
async fn connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    // Nothing sent at all within the header timeout: closed.
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let state = state.clone();
        async move {
            let path = req.uri().path().to_string();
            Ok::<_, Infallible>(handle(&state, &path).await)
        }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Err(e)) => debug!("metrics connection: {e}"),
        Ok(Ok(())) => {}
        Err(_) => debug!("metrics connection: closed after {CONNECTION_LIFETIME:?}"),
    }
}

/// Serves HTTP/1 on `listener` until the task is dropped: at most
/// `MAX_CONNECTIONS` at once (a new one closes the oldest), each bounded
/// in time (`HEADER_TIMEOUT`, `CONNECTION_LIFETIME`) and memory
/// (`MAX_BUF`). When descriptors run out, accepting pauses briefly.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    let live = Arc::new(Mutex::new(Live::default()));
    let mut last_eviction_warning: Option<std::time::Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
        if l.tasks.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = l.tasks.pop_first() {
                oldest.abort();
            }
            if last_eviction_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                last_eviction_warning = Some(std::time::Instant::now());
                warn!(
                    "metrics endpoint: more than {MAX_CONNECTIONS} connections at once: closing the oldest ones"
                );
            }
        }
        let id = l.next;
        l.next += 1;
        let (state, done) = (state.clone(), live.clone());
        let task = tokio::spawn(async move {
            connection(stream, state).await;
            done.lock()
                .unwrap_or_else(|p| p.into_inner())
                .tasks
                .remove(&id);
        });
        // The task removes itself when done, after this (the lock is held).
        l.tasks.insert(id, task.abort_handle());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(policy: &str, rule: u32, packets: u64) -> RuleCounter {
        RuleCounter {
            policy: policy.into(),
            rule,
            direction: "ingress",
            packets,
            bytes: packets * 60,
        }
    }

    #[test]
    fn rule_totals_survive_generations() {
        let mut t = RuleTotals::default();
        assert_eq!(t.observe(1, &[rule("p", 0, 5)]), vec![rule("p", 0, 5)]);
        assert_eq!(t.observe(1, &[rule("p", 0, 7)]), vec![rule("p", 0, 7)]);
        // A new generation: the kernel counts from zero, and a rule that
        // matched nothing yet is left out by the kernel side; its series
        // stays, at its total.
        assert_eq!(
            t.observe(2, &[rule("q", 1, 1)]),
            vec![rule("p", 0, 7), rule("q", 1, 1)]
        );
        assert_eq!(
            t.observe(3, &[rule("p", 0, 2)]),
            vec![rule("p", 0, 9), rule("q", 1, 1)]
        );
    }

    #[test]
    fn health_build_info_and_apply_times_are_exported() {
        let stats = AgentStats::default();
        stats.apply_seconds.observe(Duration::from_millis(3));
        stats.apply_errors.fetch_add(1, Ordering::Relaxed);
        let s = Snapshot {
            generation: 4,
            policy: PolicyHealth {
                objects_invalid: 2,
                objects_kept_last_good: 1,
                reconciles: 9,
                reconcile_errors: 3,
            },
            ..Snapshot::default()
        };
        let text = render(&s, &stats, &Hub::new(1, 1), &Health::default());
        for line in [
            "moat_generation 4",
            "moat_objects_invalid 2",
            "moat_objects_kept_last_good 1",
            "moat_reconciles_total 9",
            "moat_reconcile_errors_total 4",
            "moat_apply_seconds_count 1",
            "moat_apply_seconds_bucket{le=\"0.004\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("moat_build_info{version=\"") && l.ends_with(" 1")),
            "{text}"
        );
    }
}
