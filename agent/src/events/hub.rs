//! The agent's event history and its subscribers: a bounded in-memory
//! history of resolved events, and a local Unix socket (`moat tail`) that
//! serves it with filters, then follows the live stream.
//!
//! The protocol is line-delimited JSON. A client sends one request line:
//!
//! ```text
//! {"history": 100, "since_seconds": 300, "follow": true,
//!  "filter": {"iface": ["eth1"], "direction": "ingress", "policy": "deny-ssh",
//!             "verdict": "deny", "src": "198.51.100.0/24", "dst": null,
//!             "port": 22, "proto": "tcp"}}
//! ```
//!
//! (every field optional) and reads lines, each an object with a `type`:
//! `event` (the fields of [`WireEvent`]), `gap` (`missed`: events this
//! subscriber did not get because it read too slowly), `end_of_history`
//! (`count`: history events sent; live events follow when `follow`), or
//! `error` (`message`; the agent closes the connection).
//!
//! The reader never waits for a subscriber: each has a bounded queue, and
//! what does not fit is counted and reported as a gap.

use std::{
    collections::VecDeque,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, BufWriter},
    net::{UnixListener, UnixStream},
    sync::{mpsc, Notify},
};
use tracing::{debug, info, warn};

use crate::events::event::ResolvedEvent;

/// One event as subscribers, the events file and `moat tail -o json` see
/// it. The field names are stable (README, "Event fields").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireEvent {
    /// Sequence number the agent gave the event (from 1, per agent run).
    pub seq: u64,
    /// Unix time in nanoseconds (`time` in RFC 3339).
    pub time_ns: i64,
    /// What `moat agent -o json` prints of it, the same fields at the same
    /// level.
    #[serde(flatten)]
    pub event: ResolvedEvent,
    pub ttl: u8,
    /// The kernel LOG target's line for the packet, without a prefix.
    pub iptables: String,
    /// The `moat check` command that explains the verdict.
    pub check: String,
    /// The Calico node name of the agent that saw the event.
    #[serde(default)]
    pub node: String,
}

impl WireEvent {
    pub fn new(seq: u64, time_ns: i64, event: ResolvedEvent, ttl: u8, iptables: String) -> Self {
        WireEvent {
            seq,
            time_ns,
            event,
            ttl,
            iptables,
            check: String::new(),
            node: String::new(),
        }
    }
}

/// IP protocol number of a name as events spell it (`tcp`, `proto-47`)
/// or a number.
pub fn protocol_number(name: &str) -> Option<u8> {
    let n = name.to_ascii_lowercase();
    match n.as_str() {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmpv6" => Some(58),
        "vrrp" => Some(112),
        "sctp" => Some(132),
        "udplite" => Some(136),
        other => other.strip_prefix("proto-").unwrap_or(other).parse().ok(),
    }
}

/// Which events a subscriber wants; every field given must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Any of these interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iface: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// The deciding policy, by name (`deny-ssh`) or kind/name
    /// (`GlobalNetworkPolicy/deny-ssh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpNet>,
    /// Source or destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Protocol name or number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// The node of the agent that saw the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Events matching any of these are left out (`moat tail --not`: each
    /// holds the one filter that followed a `--not`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<Filter>,
}

impl Filter {
    /// Checks the values a client may have spelled wrong.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = &self.direction {
            if d != "ingress" && d != "egress" {
                return Err(format!("direction {d:?}: expected ingress or egress"));
            }
        }
        if let Some(v) = &self.verdict {
            if !["deny", "log", "audit"].contains(&v.as_str()) {
                return Err(format!("verdict {v:?}: expected deny, log or audit"));
            }
        }
        if let Some(p) = &self.proto {
            if protocol_number(p).is_none() {
                return Err(format!(
                    "proto {p:?}: expected tcp, udp, icmp, icmpv6, sctp, udplite, vrrp or 0-255"
                ));
            }
        }
        for x in &self.exclude {
            if !x.exclude.is_empty() {
                return Err("exclude: an excluded filter excludes nothing itself".into());
            }
            x.validate()?;
        }
        Ok(())
    }

    pub fn matches(&self, e: &WireEvent) -> bool {
        let net = |n: &Option<IpNet>, a: IpAddr| n.is_none_or(|n| n.contains(&a));
        (self.iface.is_empty() || self.iface.contains(&e.event.iface))
            && self
                .direction
                .as_ref()
                .is_none_or(|d| *d == e.event.direction)
            && self.verdict.as_ref().is_none_or(|v| *v == e.event.verdict)
            && self.policy.as_ref().is_none_or(|want| {
                e.event.policy.as_ref().is_some_and(|p| {
                    p == want || p.rsplit_once('/').is_some_and(|(_, name)| name == want)
                })
            })
            && net(&self.src, e.event.src)
            && net(&self.dst, e.event.dst)
            && self
                .port
                .is_none_or(|p| e.event.sport == Some(p) || e.event.dport == Some(p))
            && self
                .proto
                .as_ref()
                .is_none_or(|p| protocol_number(p) == protocol_number(&e.event.protocol))
            && self.node.as_ref().is_none_or(|n| *n == e.node)
            && !self.exclude.iter().any(|x| x.matches(e))
    }
}

/// What a subscriber asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// At most this many of the most recent matching events from the
    /// history (absent: all the history holds).
    #[serde(default)]
    pub history: Option<usize>,
    /// Only history events of the last this many seconds.
    #[serde(default)]
    pub since_seconds: Option<u64>,
    /// Only history events at least this many seconds old (no following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_seconds: Option<u64>,
    /// Keep the connection open and stream live events.
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub filter: Filter,
}

/// One line of the agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Event(Box<WireEvent>),
    Gap { missed: u64 },
    EndOfHistory { count: usize },
    Error { message: String },
}

struct Subscriber {
    filter: Filter,
    queue: mpsc::Sender<Arc<WireEvent>>,
    state: Arc<SubscriberState>,
}

#[derive(Default)]
struct SubscriberState {
    missed: AtomicU64,
    wake: Notify,
}

struct Inner {
    history: VecDeque<Arc<WireEvent>>,
    subscribers: Vec<Subscriber>,
    next_seq: u64,
}

/// The history and the live subscribers.
pub struct Hub {
    inner: Mutex<Inner>,
    capacity: usize,
    queue: usize,
    /// Events published since the start.
    pub published: AtomicU64,
    /// Events subscribers missed (reported to them as gaps).
    pub missed: AtomicU64,
}

impl Hub {
    /// `capacity` events of history; `queue` events per subscriber.
    pub fn new(capacity: usize, queue: usize) -> Arc<Self> {
        Arc::new(Hub {
            inner: Mutex::new(Inner {
                history: VecDeque::with_capacity(capacity.min(1 << 16)),
                subscribers: Vec::new(),
                next_seq: 1,
            }),
            capacity,
            queue: queue.max(1),
            published: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number the next event gets (`publish` assigns it).
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Adds `e` to the history and offers it to every subscriber; never
    /// waits. Returns the event as stored.
    pub fn publish(&self, mut e: WireEvent) -> Arc<WireEvent> {
        let mut inner = self.lock();
        e.seq = inner.next_seq;
        inner.next_seq += 1;
        let e = Arc::new(e);
        if self.capacity > 0 {
            if inner.history.len() == self.capacity {
                inner.history.pop_front();
            }
            inner.history.push_back(e.clone());
        }
        inner.subscribers.retain(|s| {
            if !s.filter.matches(&e) {
                return !s.queue.is_closed();
            }
            match s.queue.try_send(e.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.state.missed.fetch_add(1, Ordering::Relaxed);
                    self.missed.fetch_add(1, Ordering::Relaxed);
                    s.state.wake.notify_one();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.published.fetch_add(1, Ordering::Relaxed);
        e
    }

    /// Clients following now (those gone are pruned at the next event).
    pub fn subscribers(&self) -> usize {
        self.lock()
            .subscribers
            .iter()
            .filter(|s| !s.queue.is_closed())
            .count()
    }

    /// The matching history (as asked) and, when following, a live queue
    /// registered in the same critical section, so nothing falls between.
    fn subscribe(&self, req: &Request) -> (Vec<Arc<WireEvent>>, Option<LiveQueue>) {
        let now = now_ns();
        let mut inner = self.lock();
        let ago = |s: u64| now - (s as i64).saturating_mul(1_000_000_000);
        let cutoff = req.since_seconds.map(ago);
        let until = req.until_seconds.map(ago);
        let mut picked: Vec<Arc<WireEvent>> = inner
            .history
            .iter()
            .rev()
            .filter(|e| {
                cutoff.is_none_or(|c| e.time_ns >= c)
                    && until.is_none_or(|u| e.time_ns <= u)
                    && req.filter.matches(e)
            })
            .take(req.history.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        picked.reverse();
        let live = req.follow.then(|| {
            let (tx, rx) = mpsc::channel(self.queue);
            let state = Arc::new(SubscriberState::default());
            inner.subscribers.push(Subscriber {
                filter: req.filter.clone(),
                queue: tx,
                state: state.clone(),
            });
            LiveQueue { rx, state }
        });
        (picked, live)
    }
}

struct LiveQueue {
    rx: mpsc::Receiver<Arc<WireEvent>>,
    state: Arc<SubscriberState>,
}

/// Unix time now, in nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Parses `90`, `30s`, `5m`, `2h`, `7d` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 30s, 5m, 2h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use s, m, h or d)")),
    };
    Ok(n * mult)
}

/// Who may connect: the socket file's mode and group.
#[derive(Clone, Debug)]
pub struct SocketConfig {
    pub path: PathBuf,
    pub mode: u32,
    pub group: Option<String>,
}

/// Binds the socket (replacing a stale one, refusing to replace one an
/// agent still answers on) with its mode and group.
pub fn bind(cfg: &SocketConfig) -> anyhow::Result<UnixListener> {
    let path = &cfg.path;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {} for the event socket", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("setting the mode of {}", dir.display()))?;
        }
    }
    take_over(path)?;
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the event socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.mode))
        .with_context(|| format!("chmod {:o} {}", cfg.mode, path.display()))?;
    if let Some(g) = &cfg.group {
        let group = match g.parse::<u32>() {
            Ok(gid) => nix::unistd::Gid::from_raw(gid),
            Err(_) => {
                nix::unistd::Group::from_name(g)
                    .with_context(|| format!("looking up group {g:?}"))?
                    .with_context(|| format!("--socket-group {g:?}: no such group"))?
                    .gid
            }
        };
        nix::unistd::chown(path, None, Some(group))
            .with_context(|| format!("chgrp {g} {}", path.display()))?;
    }
    Ok(listener)
}

/// Makes way for the socket at `path`: nothing there is fine; a socket
/// of this user that nobody answers on (a dead agent's) or a symlink of
/// this user (dangling or not: the socket is never bound through one) is
/// removed; anything else (a live agent's socket, another user's socket
/// or symlink, a file) is refused, naming what is there.
fn take_over(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    let me = nix::unistd::geteuid().as_raw();
    let what = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        format!("a symbolic link to {target}")
    } else if meta.file_type().is_socket() {
        "a socket".to_string()
    } else {
        anyhow::bail!(
            "{} is not a socket: moat does not replace it; remove it or pass --socket PATH",
            path.display()
        );
    };
    if meta.uid() != me {
        anyhow::bail!(
            "{} is {what} of another user (uid {}): moat takes over only its own user's dead sockets; remove it or pass --socket PATH",
            path.display(),
            meta.uid()
        );
    }
    if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another agent already serves events on {}: stop it or pass --socket PATH",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("removing {what} at {}", path.display()))?;
    tracing::info!("removed {what} left at {}", path.display());
    Ok(())
}

/// Accepts subscribers until the listener fails; removes the socket file
/// when dropped.
pub async fn serve(listener: UnixListener, path: PathBuf, hub: Arc<Hub>) {
    let _cleanup = RemoveOnDrop(path);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let hub = hub.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, hub).await {
                        debug!("subscriber: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("event socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn send(
    w: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    m: &Message,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn session(stream: UnixStream, hub: Arc<Hub>) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let mut write = BufWriter::new(write);
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    // A request is a short line: a client cannot make the agent buffer
    // more than this.
    const MAX_REQUEST: u64 = 64 * 1024;
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::take(&mut reader, MAX_REQUEST).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::other("no request within 10 s"))??;
    if n == 0 {
        return Ok(());
    }
    if !line.ends_with('\n') {
        let message = format!("bad request: no newline within {MAX_REQUEST} bytes");
        send(&mut write, &Message::Error { message }).await?;
        return write.flush().await;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let message = format!("bad request: {e}");
            send(&mut write, &Message::Error { message }).await?;
            return write.flush().await;
        }
    };
    let checked = req.filter.validate().and_then(|()| {
        if req.follow && req.until_seconds.is_some() {
            Err("until_seconds: a request that follows has no end".to_string())
        } else {
            Ok(())
        }
    });
    if let Err(message) = checked {
        send(&mut write, &Message::Error { message }).await?;
        return write.flush().await;
    }
    let (history, live) = hub.subscribe(&req);
    let count = history.len();
    for e in history {
        send(&mut write, &Message::Event(Box::new((*e).clone()))).await?;
    }
    send(&mut write, &Message::EndOfHistory { count }).await?;
    write.flush().await?;
    let Some(LiveQueue { mut rx, state }) = live else {
        return Ok(());
    };
    info!("subscriber following ({:?})", req.filter);
    // The client closing its end ends the session even when no event comes.
    let mut closed = Box::pin(async move {
        let mut buf = String::new();
        while reader.read_line(&mut buf).await.unwrap_or(0) > 0 {
            buf.clear();
        }
    });
    loop {
        tokio::select! {
            e = rx.recv() => {
                let Some(e) = e else { return Ok(()) };
                send(&mut write, &Message::Event(Box::new((*e).clone()))).await?;
                // Everything queued now, then the gap that followed it.
                while let Ok(e) = rx.try_recv() {
                    send(&mut write, &Message::Event(Box::new((*e).clone()))).await?;
                }
            }
            _ = state.wake.notified() => {}
            _ = &mut closed => return Ok(()),
        }
        let missed = state.missed.swap(0, Ordering::Relaxed);
        if missed > 0 {
            send(&mut write, &Message::Gap { missed }).await?;
        }
        write.flush().await?;
    }
}

/// Whether `path` is a socket file.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(src: &str, dport: u16, policy: Option<&str>) -> WireEvent {
        WireEvent::new(
            0,
            now_ns(),
            ResolvedEvent {
                time: String::new(),
                iface: "eth1".into(),
                direction: "ingress".into(),
                verdict: "deny".into(),
                reason: "rule".into(),
                policy: policy.map(Into::into),
                rule: policy.map(|_| 1),
                generation: 1,
                protocol: "tcp".into(),
                src: src.parse().expect("addr"),
                dst: "198.51.100.10".parse().expect("addr"),
                sport: Some(40000),
                dport: Some(dport),
                icmp_type: None,
                icmp_code: None,
                tcp_flags: Some("SYN".into()),
                length: 60,
            },
            64,
            String::new(),
        )
    }

    #[test]
    fn filters() {
        let e = ev("203.0.113.7", 22, Some("GlobalNetworkPolicy/deny-ssh"));
        let f = |j: &str| -> Filter { serde_json::from_str(j).expect(j) };
        assert!(f("{}").matches(&e));
        assert!(f(r#"{"policy":"deny-ssh"}"#).matches(&e));
        assert!(f(r#"{"policy":"GlobalNetworkPolicy/deny-ssh"}"#).matches(&e));
        assert!(!f(r#"{"policy":"ssh"}"#).matches(&e));
        assert!(f(r#"{"src":"203.0.113.0/24","port":22,"proto":"6"}"#).matches(&e));
        assert!(f(r#"{"port":40000}"#).matches(&e));
        assert!(!f(r#"{"dst":"203.0.113.0/24"}"#).matches(&e));
        assert!(!f(r#"{"iface":["eth0"]}"#).matches(&e));
        assert!(!f(r#"{"verdict":"log"}"#).matches(&e));
        assert!(f(r#"{"verdict":"bogus"}"#).validate().is_err());
        assert!(f(r#"{"proto":"gre"}"#).validate().is_err());
        assert!(serde_json::from_str::<Filter>(r#"{"prot":"tcp"}"#).is_err());
        // Negation: each excluded filter leaves out what it matches.
        assert!(!f(r#"{"exclude":[{"src":"203.0.113.7/32"}]}"#).matches(&e));
        assert!(f(r#"{"exclude":[{"src":"203.0.113.8/32"}]}"#).matches(&e));
        assert!(!f(r#"{"exclude":[{"port":9},{"policy":"deny-ssh"}]}"#).matches(&e));
        assert!(f(r#"{"port":22,"exclude":[{"verdict":"log"}]}"#).matches(&e));
        assert!(f(r#"{"exclude":[{"verdict":"bogus"}]}"#)
            .validate()
            .is_err());
        // The node the event was seen on.
        let mut on = e.clone();
        on.node = "worker-1".into();
        assert!(f(r#"{"node":"worker-1"}"#).matches(&on));
        assert!(!f(r#"{"node":"worker-2"}"#).matches(&on));
        assert!(!f(r#"{"exclude":[{"node":"worker-1"}]}"#).matches(&on));
    }

    #[test]
    fn packet_specs_parse_back() {
        let mut e = ev("2001:db8::7", 22, None);
        e.event.dst = "2001:db8::1".parse().expect("addr");
        for spec in [
            e.event.packet_spec(),
            ev("203.0.113.7", 22, None).event.packet_spec(),
        ] {
            crate::policy::packet_spec::parse(&spec).unwrap_or_else(|err| panic!("{spec}: {err}"));
        }
        let mut icmp = ev("203.0.113.7", 0, None);
        icmp.event.protocol = "icmp".into();
        (
            icmp.event.sport,
            icmp.event.dport,
            icmp.event.icmp_type,
            icmp.event.icmp_code,
        ) = (None, None, Some(3), Some(1));
        assert_eq!(
            icmp.event.packet_spec(),
            "icmp 203.0.113.7 -> 198.51.100.10 type 3 code 1"
        );
        crate::policy::packet_spec::parse(&icmp.event.packet_spec()).expect("icmp");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[tokio::test]
    async fn the_socket_has_the_mode_and_group_asked_for_and_answers_requests() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::env::temp_dir().join(format!("moat-hub-{}", std::process::id()));
        let path = dir.join("sub/events.sock");
        let cfg = SocketConfig {
            path: path.clone(),
            mode: 0o660,
            group: Some("65534".into()),
        };
        let listener = bind(&cfg).expect("bind");
        let meta = std::fs::metadata(&path).expect("socket");
        assert!(is_socket(&path));
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 65534);
        let err = bind(&cfg).expect_err("a live socket is not taken over");
        assert!(err.to_string().contains("another agent"), "{err}");
        let hub = Hub::new(10, 10);
        hub.publish(ev("203.0.113.7", 22, Some("GlobalNetworkPolicy/deny-ssh")));
        hub.publish(ev("203.0.113.8", 80, None));
        let server = tokio::spawn(serve(listener, path.clone(), hub.clone()));
        let ask = |req: &'static str| {
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(&path).await.expect("connect");
                s.write_all(req.as_bytes()).await.expect("request");
                let mut out = String::new();
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out)
                    .await
                    .expect("answer");
                out.lines()
                    .map(|l| serde_json::from_str::<Message>(l).expect("message"))
                    .collect::<Vec<_>>()
            }
        };
        let got = ask("{\"filter\":{\"policy\":\"deny-ssh\"}}\n").await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(&got[0], Message::Event(e) if e.event.src.to_string() == "203.0.113.7"));
        assert_eq!(got[1], Message::EndOfHistory { count: 1 });
        let got = ask("{\"filter\":{\"verdict\":\"dropped\"}}\n").await;
        assert!(matches!(&got[..], [Message::Error { message }] if message.contains("verdict")));
        let got = ask("{\"histroy\":1}\n").await;
        assert!(matches!(&got[..], [Message::Error { message }] if message.contains("histroy")));
        server.abort();
        let _ = server.await;
        assert!(!path.exists(), "the socket file goes with the server");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_full_queue_counts_a_gap_and_never_blocks() {
        let hub = Hub::new(3, 2);
        let (_, live) = hub.subscribe(&Request {
            follow: true,
            ..Request::default()
        });
        let mut live = live.expect("following");
        for i in 0..5 {
            hub.publish(ev("203.0.113.7", 22 + i, None));
        }
        assert_eq!(live.state.missed.load(Ordering::Relaxed), 3);
        assert_eq!(live.rx.recv().await.expect("first").seq, 1);
        assert_eq!(live.rx.recv().await.expect("second").seq, 2);
        let (history, _) = hub.subscribe(&Request {
            history: Some(2),
            ..Request::default()
        });
        let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4, 5], "the newest of a bounded history");
    }
}
