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
    metrics::{counter::Counter, family::Family, gauge::Gauge},
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

/// What the dataplane says at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
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

const DENY_REASONS: [(u32, &str); 6] = [
    (counter::RULE_DENIED, "rule"),
    (counter::END_OF_POLICIES_DENIED, "end_of_policies"),
    (counter::NO_PROFILE_DENIED, "no_profile"),
    (counter::UNPARSABLE_DENIED, "unparsable"),
    (counter::CONNTRACK_INVALID_DENIED, "conntrack_invalid"),
    (counter::FRAGMENT_DENIED, "fragment"),
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
    for (d, row) in s.counters.iter().enumerate() {
        let dir = direction::name(d as u8);
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
    if !s.rules.is_empty() {
        let packets = counter_family(&mut reg, "moat_rule_packets", "Packets a rule matched");
        let bytes = counter_family(&mut reg, "moat_rule_bytes", "Bytes a rule matched");
        for r in &s.rules {
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
        "Policy generation in force",
        s.generation as i64,
    );
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
        "1 once the policy is enforced on every interface",
        i64::from(health.ready.load(Ordering::Acquire)),
    );
    gauge(
        &mut reg,
        "moat_event_subscribers",
        "Clients following the event stream",
        hub.subscribers() as i64,
    );
    let agent_counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    agent_counter(
        &mut reg,
        "moat_agent_events_read",
        "Events the agent read from the ring buffer",
        r(&stats.events_read),
    );
    agent_counter(
        &mut reg,
        "moat_agent_events_malformed",
        "Ring buffer records too short to be an event",
        r(&stats.events_malformed),
    );
    agent_counter(
        &mut reg,
        "moat_subscriber_events_missed",
        "Events subscribers missed because they read too slowly (each got a gap marker)",
        r(&hub.missed),
    );
    agent_counter(
        &mut reg,
        "moat_events_file_written",
        "Events written to the events file",
        r(&stats.file_written),
    );
    agent_counter(
        &mut reg,
        "moat_syslog_sent",
        "Events sent to syslog",
        r(&stats.syslog_sent),
    );
    agent_counter(
        &mut reg,
        "moat_output_errors",
        "Failed writes to the events file or syslog",
        r(&stats.output_errors),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
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
            if state.health.ready.load(Ordering::Acquire) {
                let detail = state
                    .health
                    .ready_detail
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                reply(StatusCode::OK, TEXT, format!("ready: {detail}\n"))
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not ready: the policy is not enforced on every interface yet\n".into(),
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

/// Serves HTTP/1 on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let path = req.uri().path().to_string();
                    Ok::<_, Infallible>(handle(&state, &path).await)
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!("metrics connection: {e}");
            }
        });
    }
}
