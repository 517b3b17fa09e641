//! What the agent publishes about itself (a JSON file, replaced atomically
//! on every apply and every few seconds) and `moat status`, which reads
//! and renders it.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

/// Where the agent writes its status by default.
pub const DEFAULT_PATH: &str = "/run/moat/status.json";
/// How often the agent rewrites the status file, in seconds.
pub const INTERVAL_SECS: u64 = 2;
/// A status file older than this is stale: the agent is not running (or
/// is stuck).
pub const STALE_SECS: u64 = 10;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub node: String,
    /// `starting`, `enforcing saved state`, `in sync`, or `stopped`.
    pub state: String,
    pub audit: bool,
    /// Seconds since the Unix epoch.
    pub updated_at: u64,
    pub started_at: u64,
    pub source: SourceStatus,
    pub generation: u32,
    pub applied_at: Option<u64>,
    /// The snapshot the policy in force was compiled from.
    pub applied_from: String,
    pub saved_state: Option<String>,
    /// Every interface asked for is protected (exists, attached, governed
    /// by a HostEndpoint, with the policy in force in the kernel).
    #[serde(default)]
    pub ready: bool,
    /// Why not: one line per interface that is not protected.
    #[serde(default)]
    pub unprotected: Vec<String>,
    /// Objects of the source that are invalid now, each with its error
    /// (those kept at their last good version say so).
    #[serde(default)]
    pub invalid: Vec<String>,
    pub interfaces: Vec<InterfaceStatus>,
    pub maps: Vec<MapFill>,
    /// `counters[direction][name]`.
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// `directory` or `etcdv3`.
    pub kind: String,
    pub location: String,
    /// Whether the first complete sync has been applied.
    pub synced: bool,
    pub last_sync_at: Option<u64>,
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub failed_reconciles: u64,
    /// Invalid objects seen over the agent's life.
    pub rejected_objects_total: u64,
    /// Invalid objects in the latest snapshot.
    pub invalid_objects: u64,
    /// Of those, objects whose last good version stays in force.
    pub kept_last_good: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: Option<u32>,
    /// Attached (XDP ingress and TC egress).
    pub attached: bool,
    /// A HostEndpoint of this node names it.
    pub enforced: bool,
    pub host_endpoint: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// XDP attach mode asked for (`auto`, `native`, `skb`) and the TC hook.
    pub xdp_mode: String,
    pub tc: String,
    /// `policies[direction][stage]`: the policies with rules there, in
    /// evaluation order.
    pub policies: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// `rules[direction][stage]`: rule entries.
    pub rules: BTreeMap<String, BTreeMap<String, usize>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
    /// Kernel memory the map holds, in bytes (0: not read).
    #[serde(default)]
    pub bytes: u64,
}

/// `[direction][stage]` of something.
pub type ByStage<T> = BTreeMap<String, BTreeMap<String, T>>;

/// Policies and rule counts per direction and stage of `iface`.
pub fn tables_of(
    iface: &crate::compile::CompiledIface,
    names: &[String],
) -> (ByStage<Vec<String>>, ByStage<usize>) {
    use moat_common::{direction, table};
    let mut policies = BTreeMap::new();
    let mut rules = BTreeMap::new();
    for d in [direction::INGRESS, direction::EGRESS] {
        let dir = direction::name(d).to_string();
        for (kind, stage) in table::NAMES.iter().enumerate() {
            let t = iface.table(d, kind);
            let mut list: Vec<String> = Vec::new();
            for r in &t.rules {
                if let Some(n) = names.get(r.policy_id as usize) {
                    if list.last() != Some(n) && !list.contains(n) {
                        list.push(n.clone());
                    }
                }
            }
            if !t.rules.is_empty() {
                rules
                    .entry(dir.clone())
                    .or_insert_with(BTreeMap::new)
                    .insert(stage.to_string(), t.rules.len());
            }
            if !list.is_empty() {
                policies
                    .entry(dir.clone())
                    .or_insert_with(BTreeMap::new)
                    .insert(stage.to_string(), list);
            }
        }
    }
    (policies, rules)
}

pub fn write(path: &Path, status: &Status) -> anyhow::Result<()> {
    // Readable by the group (monitoring agents), by nobody else.
    crate::dataplane::state::write_atomically_mode(path, &serde_json::to_vec_pretty(status)?, 0o640)
}

/// `moat status`'s exit code for a fresh status: `Ok` in sync and ready,
/// `NotReady` not in sync yet, `Unprotected` in sync but an interface
/// asked for is not protected.
pub fn exit_code(s: &Status) -> crate::cli::exit::Exit {
    use crate::cli::exit::Exit;
    if !s.source.synced {
        Exit::NotReady
    } else if !s.unprotected.is_empty() || !s.ready {
        Exit::Unprotected
    } else {
        Exit::Ok
    }
}

/// What `moat status` found.
#[derive(Debug)]
pub enum Found {
    /// The status, and its age in seconds.
    Fresh(Box<Status>, u64),
    /// Older than `STALE_SECS`, or its agent is gone.
    Stale(Box<Status>, u64, String),
    Missing,
}

pub fn read(path: &Path) -> anyhow::Result<Found> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let status: Status = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a moat status file: {e}", path.display()))?;
    // Judged by the file alone: `moat status` may run in another PID
    // namespace than the agent (on the node, the agent in its pod), where
    // the recorded pid means nothing. A killed agent stops rewriting it.
    let age = crate::dataplane::state::now().saturating_sub(status.updated_at);
    if status.state == "stopped" {
        return Ok(Found::Stale(
            Box::new(status),
            age,
            "the agent stopped".into(),
        ));
    }
    if age > STALE_SECS {
        let why =
            format!("not updated for {age} s (the agent rewrites it every {INTERVAL_SECS} s)");
        return Ok(Found::Stale(Box::new(status), age, why));
    }
    Ok(Found::Fresh(Box::new(status), age))
}

fn ago(t: Option<u64>) -> String {
    match t {
        Some(t) => format!(
            "{} ({} s ago)",
            crate::events::event::rfc3339(i128::from(t) * 1_000_000_000),
            crate::dataplane::state::now().saturating_sub(t)
        ),
        None => "never".into(),
    }
}

/// The status for people.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "agent:       {} (pid {}, moat {}, node {}){}",
        s.state,
        s.pid,
        s.version,
        s.node,
        if s.audit {
            ", AUDIT mode: nothing is dropped"
        } else {
            ""
        }
    );
    let src = &s.source;
    let _ = writeln!(
        o,
        "source:      {} {}: {}, last sync {}",
        src.kind,
        src.location,
        if src.synced {
            "synced"
        } else {
            "not synced yet"
        },
        ago(src.last_sync_at)
    );
    let _ = writeln!(
        o,
        "             {} reconciles ({} failed), {} invalid objects now ({} kept at their last good version), {} rejected in all",
        src.reconciles, src.failed_reconciles, src.invalid_objects, src.kept_last_good, src.rejected_objects_total
    );
    if let Some(e) = &src.last_error {
        let _ = writeln!(o, "             last error: {e}");
    }
    let _ = writeln!(
        o,
        "policy:      generation {} applied {} from {}",
        s.generation,
        ago(s.applied_at),
        if s.applied_from.is_empty() {
            "-"
        } else {
            &s.applied_from
        }
    );
    if let Some(saved) = &s.saved_state {
        let _ = writeln!(o, "saved state: {saved}");
    }
    if !s.invalid.is_empty() {
        let _ = writeln!(o, "invalid:     {} object(s):", s.invalid.len());
        for i in &s.invalid {
            let _ = writeln!(o, "    {i}");
        }
    }
    if !s.unprotected.is_empty() {
        let _ = writeln!(
            o,
            "NOT READY:   not every interface asked for is protected:"
        );
        for u in &s.unprotected {
            let _ = writeln!(o, "    {u}");
        }
    }
    for i in &s.interfaces {
        let _ = writeln!(
            o,
            "interface {}: {}{}",
            i.name,
            match (i.ifindex, i.attached) {
                (None, _) => "absent (attached when it appears)".to_string(),
                (Some(ix), true) =>
                    format!("ifindex {ix}, attached (XDP {}, TC {})", i.xdp_mode, i.tc),
                (Some(ix), false) => format!("ifindex {ix}, not attached"),
            },
            match &i.host_endpoint {
                Some(h) if i.enforced => format!(", enforced by HostEndpoint {h}"),
                Some(h) => format!(", HostEndpoint {h} (enforced once attached)"),
                None => ", not enforced (no HostEndpoint of this node names it)".into(),
            }
        );
        if !i.labels.is_empty() {
            let labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(o, "    labels: {}", labels.join(", "));
        }
        for (dir, stages) in &i.rules {
            for (stage, n) in stages {
                let names = i
                    .policies
                    .get(dir)
                    .and_then(|p| p.get(stage))
                    .map(|l| l.join(", "))
                    .unwrap_or_else(|| {
                        if stage == "failsafe" {
                            "(failsafe ports)".into()
                        } else {
                            "-".into()
                        }
                    });
                let _ = writeln!(o, "    {dir:<7} {stage:<9} {n:>4} rules: {names}");
            }
        }
    }
    let _ = writeln!(o, "maps:");
    for m in &s.maps {
        let pct = if m.max_entries > 0 {
            100.0 * m.entries as f64 / m.max_entries as f64
        } else {
            0.0
        };
        let memory = if m.bytes > 0 {
            format!("  {:.1} MiB", m.bytes as f64 / f64::from(1 << 20))
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "    {:<14} {:>7} / {:<7} ({pct:.1}%){memory}",
            m.name, m.entries, m.max_entries
        );
    }
    for (dir, counters) in &s.counters {
        let nonzero: Vec<String> = counters
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            o,
            "counters {dir}: {}",
            if nonzero.is_empty() {
                "none".into()
            } else {
                nonzero.join(" ")
            }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_stale_stopped_and_missing() {
        let dir = std::env::temp_dir().join(format!("moat-status-{}", std::process::id()));
        let path = dir.join("status.json");
        assert!(matches!(read(&path), Ok(Found::Missing)));
        let mut s = Status {
            state: "in sync".into(),
            updated_at: crate::dataplane::state::now(),
            ..Default::default()
        };
        write(&path, &s).expect("writes");
        assert!(matches!(read(&path), Ok(Found::Fresh(..))));
        s.updated_at -= STALE_SECS + 5;
        write(&path, &s).expect("writes");
        assert!(matches!(read(&path), Ok(Found::Stale(_, _, why)) if why.contains("not updated")));
        s.updated_at = crate::dataplane::state::now();
        s.state = "stopped".into();
        write(&path, &s).expect("writes");
        assert!(matches!(read(&path), Ok(Found::Stale(_, _, why)) if why.contains("stopped")));
        std::fs::write(&path, "{}x").expect("writes");
        assert!(read(&path).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
