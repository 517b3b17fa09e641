//! `moat agent`: its flags, grouped as `--help` shows them, and how they
//! join the environment and the config file.

use std::path::PathBuf;

use crate::cli::{
    config::{self, Config},
    exit::{usage, Exit},
};

/// Enforce the policies on the given interfaces and stream deny events.
///
/// Every flag is also a config file key and an environment variable:
/// `--event-rate` is `eventRate` in the file and `MOAT_EVENT_RATE` in the
/// environment (`--iface` is `interfaces`, `--audit-iface`
/// `auditInterfaces`, as lists). Flags win over the environment, which
/// wins over the file, which wins over the defaults shown.
#[derive(clap::Args)]
pub struct Args {
    /// Config file (YAML; also MOAT_CONFIG) [default: /etc/moat/config.yaml
    /// when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Policy source")]
    pub source: SourceArgs,
    #[command(flatten, next_help_heading = "Interfaces")]
    pub interfaces: InterfaceArgs,
    #[command(flatten, next_help_heading = "Dataplane")]
    pub dataplane: DataplaneArgs,
    #[command(flatten, next_help_heading = "Events")]
    pub events: EventArgs,
    #[command(flatten, next_help_heading = "Outputs")]
    pub outputs: OutputArgs,
    #[command(flatten, next_help_heading = "State")]
    pub state: StateArgs,
}

/// Where the policies come from (one of --policies, --calicoctl-config,
/// --kubeconfig).
#[derive(clap::Args)]
pub struct SourceArgs {
    /// Directory of policy files (.yaml, .yml, .json), read recursively
    /// and watched [default: /etc/moat/policies].
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// A calicoctl.cfg naming the Calico datastore (etcd or Kubernetes) to
    /// read the policies from.
    #[arg(long, value_name = "FILE")]
    pub calicoctl_config: Option<PathBuf>,
    /// Read the policies from the Kubernetes API with this kubeconfig, or
    /// `auto` (KUBECONFIG, ~/.kube/config, else the in-cluster service
    /// account).
    #[arg(long, value_name = "FILE|auto")]
    pub kubeconfig: Option<PathBuf>,
    /// Bundled profile used when the source holds no policy of its own
    /// [default: iks-2019].
    #[arg(long, value_name = "NAME", value_parser = super::profile_parser())]
    pub profile: Option<String>,
    /// Calico node name the HostEndpoints name [default: NODE_NAME, else
    /// the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

/// Which interfaces are enforced.
#[derive(clap::Args)]
pub struct InterfaceArgs {
    /// Interface to attach to (repeat for several) [key: interfaces].
    #[arg(long = "iface", visible_alias = "interfaces", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Create HostEndpoints for eth0 (ibm.role: worker_private) and eth1
    /// (worker_public) when the policies name none for them, and attach
    /// to both [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub auto_host_endpoints: Option<bool>,
    /// Audit mode on this interface only (repeat for several; one of the
    /// interfaces) [key: auditInterfaces].
    #[arg(long = "audit-iface", value_name = "NAME")]
    pub audit_ifaces: Vec<String>,
}

/// How the programs attach and what their maps hold.
#[derive(clap::Args)]
pub struct DataplaneArgs {
    /// XDP attach mode [default: auto].
    #[arg(long, value_name = "MODE", ignore_case = true, value_parser = enum_names::<crate::dataplane::XdpAttachMode>())]
    pub xdp_mode: Option<String>,
    /// Replace an XDP program another tool attached by netlink (Calico's,
    /// `ip link`'s) instead of refusing to start [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub replace_xdp: Option<bool>,
    /// Audit mode: compute, count and report every verdict, drop nothing
    /// (would-be denies are reported with verdict AUDIT), to compare with
    /// the firewall in force before enforcing [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub audit: Option<bool>,
    /// Connections tracked at once (two map entries each); the least
    /// recently used is forgotten beyond [default: 32768].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(config::MAX_CONNECTIONS_RANGE))]
    pub max_connections: Option<u32>,
    /// Capacity of the class-vector map in 64-bit words, both policy
    /// generations together [default: 2097152].
    #[arg(long, value_name = "WORDS", value_parser = clap::value_parser!(u32).range(config::CLASS_WORDS_RANGE))]
    pub class_words: Option<u32>,
    #[command(flatten)]
    pub capacity: CapacityArgs,
}

/// Capacities of the class maps (`moat agent`; `moat check` weighs the
/// policy against them).
#[derive(clap::Args, Debug, Default)]
pub struct CapacityArgs {
    /// Prefixes each address class map (sources, destinations) holds, both
    /// policy generations together: a policy may use half; raise it for
    /// large GlobalNetworkSets [default: 4194304].
    #[arg(long, value_name = "N")]
    pub addr_prefixes: Option<u32>,
    /// Prefixes each port class map holds, both generations together
    /// [default: 262144].
    #[arg(long, value_name = "N")]
    pub port_prefixes: Option<u32>,
    /// Rule slots (classifier bits of every interface and direction), both
    /// generations together [default: 65536].
    #[arg(long, value_name = "N")]
    pub rule_slots: Option<u32>,
}

/// Which events are reported and who may read them.
#[derive(clap::Args)]
pub struct EventArgs {
    /// Deny and Log events each source address may cause per second,
    /// sustained (0: no limit); the rest are counted as suppressed
    /// [default: 100].
    #[arg(long, value_name = "N")]
    pub event_rate: Option<u32>,
    /// Events a source may cause at once [default: 200].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(config::EVENT_BURST_RANGE))]
    pub event_burst: Option<u32>,
    /// Unix socket serving events to `moat tail` ("none": no socket)
    /// [default: /run/moat/events.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Mode of the socket file (octal): who may read events
    /// [default: 0600].
    #[arg(long, value_name = "MODE", value_parser = checked(config::parse_mode))]
    pub socket_mode: Option<String>,
    /// Group of the socket file (name or gid), with --socket-mode 0660.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Events kept in memory for `moat tail -n/--since` [default: 10000].
    #[arg(long, value_name = "N")]
    pub history: Option<usize>,
    /// Events queued per `moat tail` client; a client that falls further
    /// behind gets a gap marker with the count it missed [default: 4096].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(config::SUBSCRIBER_QUEUE_RANGE))]
    pub subscriber_queue: Option<u64>,
}

/// Where events and metrics go.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// Deny events on stdout [default: text].
    #[arg(short, long, value_name = "FORMAT", ignore_case = true, value_parser = enum_names::<crate::EventFormat>())]
    pub output: Option<String>,
    /// Also write events as JSON lines to PATH (mode 0600; holds client
    /// addresses, which are personal data).
    #[arg(long, value_name = "PATH")]
    pub events_file: Option<PathBuf>,
    /// Rotate the events file at this size [default: 100M].
    #[arg(long, value_name = "SIZE", value_parser = checked(config::parse_size))]
    pub events_file_max_bytes: Option<String>,
    /// Rotated events files kept (PATH.1 ... PATH.N) [default: 5].
    #[arg(long, value_name = "N")]
    pub events_file_keep: Option<u32>,
    /// No events file keeps events older than this [default: 7d].
    #[arg(long, value_name = "DURATION", value_parser = checked(super::parse_duration))]
    pub events_file_max_age: Option<String>,
    /// Also send events to syslog [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub syslog: Option<bool>,
    /// Syslog line format (iptables: the `calico-packet:` line SREs grep)
    /// [default: iptables].
    #[arg(long, value_name = "FORMAT", ignore_case = true, value_parser = enum_names::<crate::EventFormat>())]
    pub syslog_format: Option<String>,
    /// The local syslog socket [default: /dev/log].
    #[arg(long, value_name = "PATH")]
    pub syslog_socket: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz ("none": off)
    /// [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR", value_parser = checked(parse_metrics_addr))]
    pub metrics_addr: Option<String>,
}

/// What outlives the agent.
#[derive(clap::Args)]
pub struct StateArgs {
    /// Where the last good compiled policy is saved and, at start,
    /// enforced from before the first sync ("none": not saved)
    /// [default: /var/lib/moat/last-good.json].
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    /// Where the agent publishes its status for `moat status` ("none":
    /// nowhere) [default: /run/moat/status.json].
    #[arg(long, value_name = "FILE")]
    pub status_file: Option<PathBuf>,
    /// bpffs directory for moat's maps and links: enforcement, tracked
    /// flows and counters outlive the agent, and a restarted agent takes
    /// them over without a gap ("none": pin nothing)
    /// [default: /sys/fs/bpf/moat].
    #[arg(long, value_name = "DIR", conflicts_with = "no_pin")]
    pub pin_dir: Option<PathBuf>,
    /// Pin nothing: the programs detach when the agent exits (the same as
    /// --pin-dir none).
    #[arg(long)]
    pub no_pin: bool,
    /// On SIGINT/SIGTERM remove everything pinned (as `moat uninstall`)
    /// instead of leaving enforcement in place [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub detach_on_exit: Option<bool>,
}

/// A `--flag` parser accepting the names of `T`'s values.
fn enum_names<T: clap::ValueEnum>() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        T::value_variants()
            .iter()
            .filter_map(clap::ValueEnum::to_possible_value),
    )
}

/// A parser that checks the text with `check` and keeps it as text (the
/// config layers parse it again, from whichever layer it comes).
fn checked<T: 'static>(
    check: fn(&str) -> Result<T, String>,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s| check(s).map(|_| s.to_string())
}

fn parse_metrics_addr(s: &str) -> Result<(), String> {
    if s == "none" {
        return Ok(());
    }
    s.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| format!("{s:?}: expected ADDRESS:PORT such as 127.0.0.1:9464, or none"))
}

impl Args {
    /// The flags as the top configuration layer.
    fn layer(self) -> Config {
        let Args {
            config: _,
            source: s,
            interfaces: i,
            dataplane: d,
            events: e,
            outputs: o,
            state: st,
        } = self;
        Config {
            node: s.node,
            interfaces: (!i.ifaces.is_empty()).then_some(i.ifaces),
            auto_host_endpoints: i.auto_host_endpoints,
            policies: s.policies,
            calicoctl_config: s.calicoctl_config,
            kubeconfig: s.kubeconfig,
            profile: s.profile,
            audit: d.audit,
            xdp_mode: d.xdp_mode,
            event_rate: e.event_rate,
            event_burst: e.event_burst,
            output: o.output,
            state_file: st.state_file,
            status_file: st.status_file,
            pin_dir: if st.no_pin {
                Some("none".into())
            } else {
                st.pin_dir
            },
            detach_on_exit: st.detach_on_exit,
            max_connections: d.max_connections,
            class_words: d.class_words,
            addr_prefixes: d.capacity.addr_prefixes,
            port_prefixes: d.capacity.port_prefixes,
            rule_slots: d.capacity.rule_slots,
            audit_interfaces: (!i.audit_ifaces.is_empty()).then_some(i.audit_ifaces),
            replace_xdp: d.replace_xdp,
            socket: e.socket,
            socket_mode: e.socket_mode,
            socket_group: e.socket_group,
            history: e.history,
            subscriber_queue: e.subscriber_queue,
            events_file: o.events_file,
            events_file_max_bytes: o.events_file_max_bytes,
            events_file_keep: o.events_file_keep,
            events_file_max_age: o.events_file_max_age,
            syslog: o.syslog,
            syslog_format: o.syslog_format,
            syslog_socket: o.syslog_socket,
            metrics_addr: o.metrics_addr,
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let file = args.config.clone();
    // A wrong file or variable is a usage error, like a wrong flag.
    let cfg = layers(args.layer(), file).map_err(|e| usage(format!("{e:#}")))?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(crate::cli::agent::run(cfg))?;
    Ok(Exit::Ok)
}

/// Flags over the environment over the config file over the defaults.
fn layers(flags: Config, file: Option<PathBuf>) -> anyhow::Result<crate::cli::agent::AgentConfig> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    for unknown in config::unknown_env(vars.clone()) {
        tracing::warn!(
            "{unknown} is not a moat setting (known: {}); ignored",
            config::KEYS.map(config::env_name).join(", ")
        );
    }
    let env = config::from_env(vars)?;
    let file = file.or_else(|| std::env::var_os("MOAT_CONFIG").map(PathBuf::from));
    let from_file = match file {
        Some(path) => config::from_file(&path)?,
        None if std::path::Path::new(config::DEFAULT_FILE).exists() => {
            config::from_file(std::path::Path::new(config::DEFAULT_FILE))?
        }
        None => Config::default(),
    };
    config::resolve(
        flags.over(env.over(from_file)),
        std::env::var("NODE_NAME").ok(),
    )
}
