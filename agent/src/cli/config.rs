//! `moat agent`'s configuration: one schema (`Config`) read from a file
//! (`--config`, default `/etc/moat/config.yaml` when present), from the
//! environment (`MOAT_<KEY>`, e.g. `MOAT_EVENT_RATE`) and from flags
//! (`--<key>`, e.g. `--event-rate`). Flags win over the environment, the
//! environment over the file, the file over the defaults. Every error
//! names the key (and where it came from).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use crate::{cli::agent::PolicySource, dataplane::XdpAttachMode, EventFormat};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "/etc/moat/config.yaml";
/// The policy directory when none is configured.
pub const DEFAULT_POLICIES: &str = "/etc/moat/policies";
/// What `maxConnections` may be.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<i64> = 512..=8_388_608;
/// What `classWords` may be.
pub const CLASS_WORDS_RANGE: std::ops::RangeInclusive<i64> = 4096..=67_108_864;
/// What `eventBurst` may be.
pub const EVENT_BURST_RANGE: std::ops::RangeInclusive<i64> = 1..=1_000_000;
/// What `subscriberQueue` may be.
pub const SUBSCRIBER_QUEUE_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;

fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> anyhow::Result<()> {
    if !range.contains(&value) {
        anyhow::bail!(
            "{key}: {value} is not in {}..={}",
            range.start(),
            range.end()
        );
    }
    Ok(())
}

/// Every setting, all optional: what one layer (file, environment or
/// flags) says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Calico node name whose HostEndpoints apply (default: `NODE_NAME`,
    /// else the host name).
    pub node: Option<String>,
    /// Interfaces to attach to.
    pub interfaces: Option<Vec<String>>,
    /// HostEndpoints for eth0 (`ibm.role: worker_private`) and eth1
    /// (`worker_public`) when the source names none for them; both
    /// interfaces are attached (when present).
    pub auto_host_endpoints: Option<bool>,
    /// Policy directory (the directory source; default `/etc/moat/policies`).
    pub policies: Option<PathBuf>,
    /// A calicoctl.cfg: the policies come from the Calico datastore it
    /// names instead of a directory.
    pub calicoctl_config: Option<PathBuf>,
    /// The Kubernetes API (Calico's CRDs, NetworkPolicies, ...) is the
    /// source: a kubeconfig file, or `auto` (`KUBECONFIG`,
    /// `~/.kube/config`, else the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// Bundled profile used when the source holds no policy (`iks-2019`,
    /// `iks-2017`, `none`).
    pub profile: Option<String>,
    /// Report would-be denies, drop nothing.
    pub audit: Option<bool>,
    /// `auto`, `native` or `skb`.
    pub xdp_mode: Option<String>,
    /// Deny events per second per source address (0: no limit).
    pub event_rate: Option<u32>,
    pub event_burst: Option<u32>,
    /// Deny events on stdout: `text`, `json` or `iptables`.
    pub output: Option<String>,
    /// The saved last good policy (`none`: not saved).
    pub state_file: Option<PathBuf>,
    /// The status file `moat status` reads (`none`: not written).
    pub status_file: Option<PathBuf>,
    /// bpffs directory of the pinned maps and links (`none`: pin nothing;
    /// default `/sys/fs/bpf/moat`).
    pub pin_dir: Option<PathBuf>,
    /// Remove the pins (and so detach) when the agent exits.
    pub detach_on_exit: Option<bool>,
    /// Connections tracked at once (default 32768).
    pub max_connections: Option<u32>,
    /// Capacity of the class-vector map in 64-bit words (default 2097152).
    pub class_words: Option<u32>,
    /// Capacity of each address class map (source, destination) in
    /// prefixes, both policy generations together (default 4194304).
    pub addr_prefixes: Option<u32>,
    /// Capacity of each port class map in prefixes, both generations
    /// together (default 262144).
    pub port_prefixes: Option<u32>,
    /// Rule slots (classifier bits of every interface and direction), both
    /// generations together (default 65536).
    pub rule_slots: Option<u32>,
    /// Interfaces in audit mode (beside `audit`, which covers all).
    pub audit_interfaces: Option<Vec<String>>,
    /// Replace an XDP program another tool attached by netlink.
    pub replace_xdp: Option<bool>,
    /// Unix socket serving events to `moat tail` (`none`: no socket).
    pub socket: Option<PathBuf>,
    /// Mode of the socket file, octal (`"0600"`; quoted in YAML).
    pub socket_mode: Option<String>,
    /// Group of the socket file (name or gid).
    pub socket_group: Option<String>,
    /// Events kept in memory for `moat tail -n/--since`.
    pub history: Option<usize>,
    /// Events queued per `moat tail` client.
    pub subscriber_queue: Option<u64>,
    /// Also write events as JSON lines to this file.
    pub events_file: Option<PathBuf>,
    /// Rotate the events file at this size (`100M`).
    pub events_file_max_bytes: Option<String>,
    /// Rotated events files kept.
    pub events_file_keep: Option<u32>,
    /// No events file keeps events older than this (`7d`).
    pub events_file_max_age: Option<String>,
    /// Also send events to syslog.
    pub syslog: Option<bool>,
    /// Syslog line format (`iptables`, `json`, `text`).
    pub syslog_format: Option<String>,
    /// The local syslog socket.
    pub syslog_socket: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz (`ADDRESS:PORT`, `none`).
    pub metrics_addr: Option<String>,
}

/// The keys of `Config`, as the file spells them.
pub const KEYS: [&str; 36] = [
    "node",
    "interfaces",
    "autoHostEndpoints",
    "policies",
    "calicoctlConfig",
    "kubeconfig",
    "profile",
    "audit",
    "xdpMode",
    "eventRate",
    "eventBurst",
    "output",
    "stateFile",
    "statusFile",
    "pinDir",
    "detachOnExit",
    "maxConnections",
    "classWords",
    "addrPrefixes",
    "portPrefixes",
    "ruleSlots",
    "auditInterfaces",
    "replaceXdp",
    "socket",
    "socketMode",
    "socketGroup",
    "history",
    "subscriberQueue",
    "eventsFile",
    "eventsFileMaxBytes",
    "eventsFileKeep",
    "eventsFileMaxAge",
    "syslog",
    "syslogFormat",
    "syslogSocket",
    "metricsAddr",
];

/// `eventRate` -> `MOAT_EVENT_RATE`.
pub fn env_name(key: &str) -> String {
    let mut out = String::from("MOAT_");
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// `eventRate` -> `event-rate`.
pub fn flag_name(key: &str) -> String {
    let mut out = String::new();
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn from_value(value: Value, source: &str) -> anyhow::Result<Config> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // serde_yaml_ng puts the position into the message; keep it short.
        anyhow::anyhow!(
            "{source}: {}{inner}",
            if path == "." {
                String::new()
            } else {
                format!("{path}: ")
            }
        )
    })
}

/// Reads a config file.
pub fn from_file(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
    let value: Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config file {}: not YAML: {e}", path.display()))?;
    let value = if value.is_null() {
        Value::Mapping(Default::default())
    } else {
        value
    };
    from_value(value, &format!("config file {}", path.display()))
}

/// Reads `MOAT_<KEY>` variables from `vars`. Values are YAML scalars
/// (`true`, `100`); `MOAT_INTERFACES` is a comma-separated list.
pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Config> {
    let mut map = serde_yaml_ng::Mapping::new();
    for (name, text) in vars {
        let Some(key) = KEYS.iter().find(|k| env_name(k) == name) else {
            continue;
        };
        let value = if matches!(*key, "interfaces" | "auditInterfaces") {
            Value::Sequence(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.into()))
                    .collect(),
            )
        } else if matches!(
            *key,
            "audit"
                | "autoHostEndpoints"
                | "eventRate"
                | "eventBurst"
                | "detachOnExit"
                | "maxConnections"
                | "classWords"
                | "addrPrefixes"
                | "portPrefixes"
                | "ruleSlots"
                | "replaceXdp"
        ) {
            // A scalar as YAML reads it (true, 100); anything else is
            // reported against the variable.
            serde_yaml_ng::from_str::<Value>(&text).unwrap_or(Value::String(text.clone()))
        } else {
            // Names and paths stay strings, even `123`.
            Value::String(text.clone())
        };
        map.insert(Value::String(key.to_string()), value);
    }
    from_value(Value::Mapping(map), "environment").map_err(|e| {
        // Name the variable, not the key.
        let mut msg = e.to_string();
        for key in KEYS {
            msg = msg.replace(
                &format!("environment: {key}"),
                &format!("environment: {}", env_name(key)),
            );
        }
        anyhow::anyhow!(msg)
    })
}

/// MOAT_ variables that are no setting: likely typos.
pub fn unknown_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    vars.into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("MOAT_"))
        .filter(|n| !matches!(n.as_str(), "MOAT_LOG" | "MOAT_CONFIG" | "MOAT_BIN"))
        .filter(|n| !KEYS.iter().any(|k| env_name(k) == *n))
        .collect()
}

impl Config {
    /// `self` where set, else `lower`.
    pub fn over(self, lower: Config) -> Config {
        Config {
            node: self.node.or(lower.node),
            interfaces: self.interfaces.or(lower.interfaces),
            auto_host_endpoints: self.auto_host_endpoints.or(lower.auto_host_endpoints),
            policies: self.policies.or(lower.policies),
            calicoctl_config: self.calicoctl_config.or(lower.calicoctl_config),
            kubeconfig: self.kubeconfig.or(lower.kubeconfig),
            profile: self.profile.or(lower.profile),
            audit: self.audit.or(lower.audit),
            xdp_mode: self.xdp_mode.or(lower.xdp_mode),
            event_rate: self.event_rate.or(lower.event_rate),
            event_burst: self.event_burst.or(lower.event_burst),
            output: self.output.or(lower.output),
            state_file: self.state_file.or(lower.state_file),
            status_file: self.status_file.or(lower.status_file),
            pin_dir: self.pin_dir.or(lower.pin_dir),
            detach_on_exit: self.detach_on_exit.or(lower.detach_on_exit),
            max_connections: self.max_connections.or(lower.max_connections),
            class_words: self.class_words.or(lower.class_words),
            addr_prefixes: self.addr_prefixes.or(lower.addr_prefixes),
            port_prefixes: self.port_prefixes.or(lower.port_prefixes),
            rule_slots: self.rule_slots.or(lower.rule_slots),
            audit_interfaces: self.audit_interfaces.or(lower.audit_interfaces),
            replace_xdp: self.replace_xdp.or(lower.replace_xdp),
            socket: self.socket.or(lower.socket),
            socket_mode: self.socket_mode.or(lower.socket_mode),
            socket_group: self.socket_group.or(lower.socket_group),
            history: self.history.or(lower.history),
            subscriber_queue: self.subscriber_queue.or(lower.subscriber_queue),
            events_file: self.events_file.or(lower.events_file),
            events_file_max_bytes: self.events_file_max_bytes.or(lower.events_file_max_bytes),
            events_file_keep: self.events_file_keep.or(lower.events_file_keep),
            events_file_max_age: self.events_file_max_age.or(lower.events_file_max_age),
            syslog: self.syslog.or(lower.syslog),
            syslog_format: self.syslog_format.or(lower.syslog_format),
            syslog_socket: self.syslog_socket.or(lower.syslog_socket),
            metrics_addr: self.metrics_addr.or(lower.metrics_addr),
        }
    }
}

fn enum_value<T: clap::ValueEnum>(key: &str, text: Option<&str>) -> anyhow::Result<T> {
    match text {
        None => Ok(T::value_variants()[0].clone()),
        Some(t) => T::from_str(t, true).map_err(|_| {
            let known: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            anyhow::anyhow!("{key}: {t:?} is not one of {}", known.join(", "))
        }),
    }
}

fn optional_path(p: PathBuf) -> Option<PathBuf> {
    (p.as_os_str() != "none").then_some(p)
}

/// Resolves the layers into what the agent runs with. `node_env` is
/// `NODE_NAME` (the Kubernetes downward API's usual name), used when no
/// layer names the node.
pub fn resolve(
    merged: Config,
    node_env: Option<String>,
) -> anyhow::Result<crate::cli::agent::AgentConfig> {
    let observe = observe_config(&merged)?;
    let given: Vec<&str> = [
        ("policies", merged.policies.is_some()),
        ("calicoctlConfig", merged.calicoctl_config.is_some()),
        ("kubeconfig", merged.kubeconfig.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(key, _)| *key)
    .collect();
    if given.len() > 1 {
        anyhow::bail!(
            "{} given: the policies come from one source (a directory, a Calico datastore, or the Kubernetes API)",
            given.join(" and ")
        );
    }
    let source = match (merged.calicoctl_config, merged.policies, merged.kubeconfig) {
        (_, _, Some(kubeconfig)) => PolicySource::Kubernetes {
            kubeconfig: (kubeconfig.as_os_str() != "auto").then_some(kubeconfig),
        },
        (Some(cfg), _, None) => {
            let parsed = crate::sources::calicoctl::from_file(&cfg)?;
            match parsed.datastore {
                crate::sources::calicoctl::Datastore::Etcd(etcd) => PolicySource::Etcd(etcd),
                crate::sources::calicoctl::Datastore::Kubernetes { kubeconfig } => {
                    PolicySource::Kubernetes { kubeconfig }
                }
            }
        }
        (None, dir, None) => {
            PolicySource::Directory(dir.unwrap_or_else(|| DEFAULT_POLICIES.into()))
        }
    };
    let profile = merged.profile.unwrap_or_else(|| "iks-2019".into());
    if profile != "none" && crate::policy::profiles::find(&profile).is_none() {
        let known: Vec<&str> = crate::policy::profiles::PROFILES
            .iter()
            .map(|p| p.name)
            .collect();
        anyhow::bail!(
            "profile: no bundled profile {profile:?} (known: {}, or none)",
            known.join(", ")
        );
    }
    let max_connections = merged.max_connections.unwrap_or(moat_common::MAX_FLOWS / 2);
    in_range(
        "maxConnections",
        i64::from(max_connections),
        MAX_CONNECTIONS_RANGE,
    )?;
    let class_words = merged.class_words.unwrap_or(moat_common::MAX_CLASS_WORDS);
    in_range("classWords", i64::from(class_words), CLASS_WORDS_RANGE)?;
    let asked = Config {
        addr_prefixes: merged.addr_prefixes,
        port_prefixes: merged.port_prefixes,
        rule_slots: merged.rule_slots,
        ..Default::default()
    };
    let capacities = capacities(&asked, max_connections, class_words)?;
    let event_burst = merged.event_burst.unwrap_or(200);
    in_range("eventBurst", i64::from(event_burst), EVENT_BURST_RANGE)?;
    let node = merged
        .node
        .or(node_env.filter(|n| !n.is_empty()))
        .unwrap_or_else(crate::cli::agent::default_node_name);
    Ok(crate::cli::agent::AgentConfig {
        source,
        profile: (profile != "none").then_some(profile),
        ifaces: merged.interfaces.unwrap_or_default(),
        node,
        output: enum_value::<EventFormat>("output", merged.output.as_deref())?,
        event_rate: merged.event_rate.unwrap_or(100),
        event_burst,
        audit: merged.audit.unwrap_or(false),
        xdp_mode: enum_value::<XdpAttachMode>("xdpMode", merged.xdp_mode.as_deref())?,
        auto_host_endpoints: merged.auto_host_endpoints.unwrap_or(false),
        state_file: optional_path(
            merged
                .state_file
                .unwrap_or_else(|| crate::dataplane::state::DEFAULT_PATH.into()),
        ),
        status_file: optional_path(
            merged
                .status_file
                .unwrap_or_else(|| crate::cli::status::DEFAULT_PATH.into()),
        ),
        audit_ifaces: merged.audit_interfaces.unwrap_or_default(),
        replace_xdp: merged.replace_xdp.unwrap_or(false),
        pin_dir: optional_path(
            merged
                .pin_dir
                .unwrap_or_else(|| crate::cli::agent::DEFAULT_PIN_DIR.into()),
        ),
        detach_on_exit: merged.detach_on_exit.unwrap_or(false),
        capacities,
        observe,
    })
}

/// The map capacities the layers ask for, each checked against its range.
pub fn capacities(
    merged: &Config,
    max_connections: u32,
    class_words: u32,
) -> anyhow::Result<crate::dataplane::Capacities> {
    let defaults = crate::dataplane::Capacities::default();
    let ranged =
        |key: &str, value: Option<u32>, default: u32, range: std::ops::RangeInclusive<u32>| {
            let v = value.unwrap_or(default);
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(anyhow::anyhow!(
                    "{key}: {v} is not in {}..={}",
                    range.start(),
                    range.end()
                ))
            }
        };
    Ok(crate::dataplane::Capacities {
        flows: max_connections * 2,
        class_words,
        addr_prefixes: ranged(
            "addrPrefixes",
            merged.addr_prefixes,
            defaults.addr_prefixes,
            1024..=crate::dataplane::MAX_PREFIXES,
        )?,
        port_prefixes: ranged(
            "portPrefixes",
            merged.port_prefixes,
            defaults.port_prefixes,
            1024..=crate::dataplane::MAX_PREFIXES,
        )?,
        rule_slots: ranged(
            "ruleSlots",
            merged.rule_slots,
            defaults.rule_slots,
            1024..=4 * 1024 * 1024,
        )?,
        ..defaults
    })
}

/// The socket, event outputs and metrics endpoint the layers ask for.
fn observe_config(merged: &Config) -> anyhow::Result<crate::events::observe::ObserveConfig> {
    use anyhow::Context as _;
    let key = |k: &'static str| move |e: String| anyhow::anyhow!("{k}: {e}");
    let socket = merged
        .socket
        .clone()
        .unwrap_or_else(|| crate::events::observe::DEFAULT_SOCKET.into());
    let mode =
        parse_mode(merged.socket_mode.as_deref().unwrap_or("0600")).map_err(key("socketMode"))?;
    let subscriber_queue = merged.subscriber_queue.unwrap_or(4096);
    in_range("subscriberQueue", subscriber_queue, SUBSCRIBER_QUEUE_RANGE)?;
    let events_file = match &merged.events_file {
        None => None,
        Some(path) => Some(crate::events::outputs::FileConfig {
            path: path.clone(),
            max_bytes: parse_size(merged.events_file_max_bytes.as_deref().unwrap_or("100M"))
                .map_err(key("eventsFileMaxBytes"))?,
            keep: merged.events_file_keep.unwrap_or(5),
            max_age: std::time::Duration::from_secs(
                crate::events::hub::parse_duration(
                    merged.events_file_max_age.as_deref().unwrap_or("7d"),
                )
                .map_err(key("eventsFileMaxAge"))?,
            ),
        }),
    };
    let syslog_format = match merged.syslog_format.as_deref() {
        None => EventFormat::Iptables,
        Some(f) => enum_value::<EventFormat>("syslogFormat", Some(f))?,
    };
    let metrics_addr = match merged.metrics_addr.as_deref().unwrap_or("127.0.0.1:9464") {
        "none" => None,
        a => Some(a.parse().with_context(|| {
            format!("metricsAddr: {a:?}: expected ADDRESS:PORT such as 127.0.0.1:9464, or none")
        })?),
    };
    Ok(crate::events::observe::ObserveConfig {
        socket: optional_path(socket).map(|path| crate::events::hub::SocketConfig {
            path,
            mode,
            group: merged.socket_group.clone(),
        }),
        history: merged.history.unwrap_or(10_000),
        subscriber_queue: subscriber_queue as usize,
        events_file,
        syslog: merged.syslog.unwrap_or(false).then(|| {
            (
                merged
                    .syslog_socket
                    .clone()
                    .unwrap_or_else(|| "/dev/log".into()),
                syslog_format,
            )
        }),
        metrics_addr,
    })
}

/// An octal file mode such as `0600`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0600 or 0660"))?;
    if m > 0o777 {
        return Err(format!("{s:?}: a mode is at most 0777"));
    }
    Ok(m)
}

/// A size such as `500K`, `10M` or `1G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1),
        Some((i, _)) => (
            &t[..i],
            match t[i..].to_ascii_lowercase().as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                other => return Err(format!("{s:?}: unknown unit {other:?} (use K, M or G)")),
            },
        ),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size like 500K, 10M or 1G"))?;
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> anyhow::Result<Config> {
        let path = std::env::temp_dir().join(format!(
            "moat-config-{}-{}.yaml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).expect("write");
        let c = from_file(&path);
        std::fs::remove_file(&path).expect("remove");
        c
    }

    fn env(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        from_env(vars.iter().map(|(a, b)| (a.to_string(), b.to_string())))
    }

    #[test]
    fn keys_match_the_schema() {
        // Every key is a field (an unknown one would be rejected), and
        // every field is a key (serialising names them all).
        let all = serde_json::to_value(Config::default()).expect("serialises");
        let fields: Vec<&String> = all.as_object().expect("object").keys().collect();
        let mut keys: Vec<&str> = KEYS.to_vec();
        keys.sort();
        let mut fields: Vec<&str> = fields.iter().map(|s| s.as_str()).collect();
        fields.sort();
        assert_eq!(keys, fields);
        assert_eq!(env_name("autoHostEndpoints"), "MOAT_AUTO_HOST_ENDPOINTS");
        assert_eq!(flag_name("autoHostEndpoints"), "auto-host-endpoints");
    }

    #[test]
    fn file_errors_name_the_key() {
        let e = file("node: w1\ninterface: [eth0]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `interface`"), "{e}");
        let e = file("eventRate: fast\n").unwrap_err().to_string();
        assert!(e.contains("eventRate"), "{e}");
        let e = file("interfaces: eth0\n").unwrap_err().to_string();
        assert!(e.contains("interfaces"), "{e}");
        let c = file("node: w1\ninterfaces: [eth0, eth1]\naudit: true\n").expect("valid");
        assert_eq!(c.interfaces, Some(vec!["eth0".into(), "eth1".into()]));
        assert_eq!(file("").expect("empty is fine"), Config::default());
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = env(&[("MOAT_EVENT_RATE", "fast")]).unwrap_err().to_string();
        assert!(e.contains("MOAT_EVENT_RATE"), "{e}");
        let e = env(&[("MOAT_AUDIT", "maybe")]).unwrap_err().to_string();
        assert!(e.contains("MOAT_AUDIT"), "{e}");
        let c = env(&[
            ("MOAT_INTERFACES", "eth0, eth1"),
            ("MOAT_AUDIT", "true"),
            ("MOAT_NODE", "123"),
            ("PATH", "/bin"),
        ])
        .expect("valid");
        assert_eq!(c.interfaces, Some(vec!["eth0".into(), "eth1".into()]));
        assert_eq!(c.audit, Some(true));
        assert_eq!(
            c.node.as_deref(),
            Some("123"),
            "a numeric name stays a name"
        );
        assert_eq!(
            unknown_env([
                ("MOAT_AUDITT".to_string(), "1".to_string()),
                ("MOAT_LOG".into(), "debug".into())
            ]),
            ["MOAT_AUDITT"]
        );
    }

    #[test]
    fn flags_over_env_over_file_over_defaults() {
        let from_file = Config {
            node: Some("file".into()),
            event_rate: Some(1),
            event_burst: Some(5),
            xdp_mode: Some("skb".into()),
            ..Default::default()
        };
        let from_env = Config {
            node: Some("env".into()),
            event_rate: Some(2),
            ..Default::default()
        };
        let flags = Config {
            node: Some("flag".into()),
            ..Default::default()
        };
        let cfg =
            resolve(flags.over(from_env.clone().over(from_file.clone())), None).expect("valid");
        assert_eq!(
            (cfg.node.as_str(), cfg.event_rate, cfg.event_burst),
            ("flag", 2, 5)
        );
        assert_eq!(cfg.xdp_mode, XdpAttachMode::Skb);
        assert_eq!(
            cfg.state_file.as_deref(),
            Some(Path::new(crate::dataplane::state::DEFAULT_PATH))
        );
        let cfg = resolve(from_env.over(from_file.clone()), None).expect("valid");
        assert_eq!(cfg.node, "env");
        // NODE_NAME comes after every layer's node, before the host name.
        let cfg = resolve(Config::default(), Some("k8s-node".into())).expect("valid");
        assert_eq!(cfg.node, "k8s-node");
        let cfg = resolve(from_file, Some("k8s-node".into())).expect("valid");
        assert_eq!(cfg.node, "file");
    }

    /// A bad value names its key; two sources at once name both.
    #[test]
    fn bad_values_and_exclusive_sources_name_their_keys() {
        let e = resolve(
            Config {
                xdp_mode: Some("fast".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("xdpMode") && e.contains("auto, native, skb"),
            "{e}"
        );
        let e = resolve(
            Config {
                policies: Some("/p".into()),
                calicoctl_config: Some("/c".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("policies and calicoctlConfig"), "{e}");
        let e = resolve(
            Config {
                calicoctl_config: Some("/c".into()),
                kubeconfig: Some("auto".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("calicoctlConfig and kubeconfig"), "{e}");
    }

    #[test]
    fn observability_keys_have_defaults_and_refuse_bad_values() {
        let cfg = resolve(Config::default(), None).expect("valid").observe;
        let socket = cfg.socket.expect("a socket by default");
        assert_eq!(
            (
                socket.path.to_str(),
                socket.mode,
                cfg.history,
                cfg.subscriber_queue
            ),
            (
                Some(crate::events::observe::DEFAULT_SOCKET),
                0o600,
                10_000,
                4096
            )
        );
        assert_eq!(cfg.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(cfg.events_file.is_none() && cfg.syslog.is_none());
        let cfg = resolve(
            Config {
                socket_mode: Some("0660".into()),
                socket_group: Some("sre".into()),
                events_file: Some("/var/log/moat.json".into()),
                events_file_max_bytes: Some("1M".into()),
                events_file_max_age: Some("2h".into()),
                syslog: Some(true),
                syslog_format: Some("json".into()),
                metrics_addr: Some("none".into()),
                ..Default::default()
            },
            None,
        )
        .expect("valid")
        .observe;
        let socket = cfg.socket.expect("socket");
        assert_eq!((socket.mode, socket.group.as_deref()), (0o660, Some("sre")));
        let file = cfg.events_file.expect("events file");
        assert_eq!(
            (file.max_bytes, file.keep, file.max_age.as_secs()),
            (1 << 20, 5, 7200)
        );
        assert_eq!(cfg.syslog, Some(("/dev/log".into(), EventFormat::Json)));
        assert_eq!(cfg.metrics_addr, None);
        for (bad, key) in [
            (
                Config {
                    socket_mode: Some("999".into()),
                    ..Default::default()
                },
                "socketMode",
            ),
            (
                Config {
                    events_file: Some("/f".into()),
                    events_file_max_bytes: Some("10Q".into()),
                    ..Default::default()
                },
                "eventsFileMaxBytes",
            ),
            (
                Config {
                    metrics_addr: Some("nope".into()),
                    ..Default::default()
                },
                "metricsAddr",
            ),
            (
                Config {
                    subscriber_queue: Some(0),
                    ..Default::default()
                },
                "subscriberQueue",
            ),
            (
                Config {
                    syslog_format: Some("xml".into()),
                    ..Default::default()
                },
                "syslogFormat",
            ),
        ] {
            let e = format!("{:#}", resolve(bad, None).unwrap_err());
            assert!(e.starts_with(key), "{key}: {e}");
        }
    }

    /// `kubeconfig` picks the Kubernetes source; `stateFile: none` turns saved state off.
    #[test]
    fn kubeconfig_and_state_file_keys() {
        for (given, want) in [("auto", None), ("/k/config", Some(Path::new("/k/config")))] {
            let cfg = resolve(
                Config {
                    kubeconfig: Some(given.into()),
                    ..Default::default()
                },
                None,
            )
            .expect("valid");
            match &cfg.source {
                crate::cli::agent::PolicySource::Kubernetes { kubeconfig } => {
                    assert_eq!(kubeconfig.as_deref(), want, "{given}")
                }
                other => panic!("kubeconfig {given}: source {other:?}"),
            }
        }
        let cfg = resolve(
            Config {
                state_file: Some("none".into()),
                ..Default::default()
            },
            None,
        )
        .expect("valid");
        assert_eq!(cfg.state_file, None);
    }
}

#[cfg(test)]
mod dataplane_keys {
    use super::*;

    #[test]
    fn pinning_capacities_and_audit_interfaces_from_every_layer() {
        let vars = [
            ("MOAT_PIN_DIR".to_string(), "none".to_string()),
            (
                "MOAT_AUDIT_INTERFACES".to_string(),
                "eth1, eth0".to_string(),
            ),
            ("MOAT_MAX_CONNECTIONS".to_string(), "1000".to_string()),
            ("MOAT_REPLACE_XDP".to_string(), "true".to_string()),
        ];
        let env = from_env(vars).expect("valid");
        assert_eq!(
            env.audit_interfaces,
            Some(vec!["eth1".into(), "eth0".into()])
        );
        let cfg = resolve(
            Config {
                node: Some("w1".into()),
                ..Default::default()
            }
            .over(env),
            None,
        )
        .expect("resolves");
        assert_eq!(cfg.pin_dir, None, "pinDir none pins nothing");
        assert_eq!(cfg.capacities.flows, 2000);
        assert!(cfg.replace_xdp);
        assert_eq!(cfg.audit_ifaces, ["eth1", "eth0"]);
        let defaults = resolve(Config::default(), Some("w1".into())).expect("resolves");
        assert_eq!(
            defaults.pin_dir.as_deref(),
            Some(std::path::Path::new(crate::cli::agent::DEFAULT_PIN_DIR))
        );
        let e = resolve(
            Config {
                max_connections: Some(10),
                ..Default::default()
            },
            Some("w1".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("maxConnections"), "{e}");
        let e = from_env([("MOAT_CLASS_WORDS".to_string(), "many".to_string())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MOAT_CLASS_WORDS"), "{e}");
    }
}
