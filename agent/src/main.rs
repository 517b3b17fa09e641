//! The `moat` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use moat::{
    cli::agent::{self, AgentConfig},
    compile::compile,
    policy, OutputFormat,
};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "eBPF host firewall enforcing Calico host endpoint policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Enforce the policies on the given interfaces and stream deny events.
    /// Every setting also comes from the environment (MOAT_<KEY>, e.g.
    /// MOAT_EVENT_RATE) and the config file; flags win over the
    /// environment, which wins over the file.
    Agent {
        /// Config file (YAML; default /etc/moat/config.yaml when it
        /// exists; also MOAT_CONFIG).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Directory of policy files (.yaml, .yml, .json), read recursively
        /// and watched [key: policies; default /etc/moat/policies].
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// A calicoctl.cfg naming the Calico datastore to read the policies
        /// from instead of a directory [key: calicoctlConfig].
        #[arg(long, value_name = "FILE")]
        calicoctl_config: Option<PathBuf>,
        /// Read the policies from the Kubernetes API with this kubeconfig,
        /// or `auto` (KUBECONFIG, ~/.kube/config, else the in-cluster
        /// service account) [key: kubeconfig].
        #[arg(long, value_name = "FILE|auto")]
        kubeconfig: Option<PathBuf>,
        /// Interface to attach to (repeat for several) [key: interfaces].
        #[arg(long = "iface", visible_alias = "interfaces", value_name = "NAME")]
        ifaces: Vec<String>,
        /// Bundled profile to use when the source holds no policy of its
        /// own (iks-2019, iks-2017, or none) [default: iks-2019].
        #[arg(long)]
        profile: Option<String>,
        /// Calico node name the HostEndpoints name (default: NODE_NAME,
        /// else the host name).
        #[arg(long)]
        node: Option<String>,
        /// Deny events on stdout: text, json, iptables [default: text].
        #[arg(short, long)]
        output: Option<String>,
        /// auto, native or skb [default: auto].
        #[arg(long)]
        xdp_mode: Option<String>,
        /// Deny and Log events each source address may cause per second,
        /// sustained (0: no limit); the rest are counted as suppressed
        /// [default: 100].
        #[arg(long)]
        event_rate: Option<u32>,
        /// Events a source may cause at once [default: 200].
        #[arg(long)]
        event_burst: Option<u32>,
        /// Audit mode: compute, count and report every verdict, drop
        /// nothing (would-be denies are reported with verdict AUDIT), to
        /// compare with the firewall in force before enforcing.
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        audit: Option<bool>,
        /// Where the last good compiled policy is saved and, at start,
        /// enforced from before the first sync ("none": not saved)
        /// [default: /var/lib/moat/last-good.json].
        #[arg(long, value_name = "FILE")]
        state_file: Option<PathBuf>,
        /// Where the agent publishes its status for `moat status`
        /// ("none": nowhere) [default: /run/moat/status.json].
        #[arg(long, value_name = "FILE")]
        status_file: Option<PathBuf>,
        /// Create HostEndpoints for eth0 (ibm.role: worker_private) and
        /// eth1 (worker_public) when the policies name none for them, and
        /// attach to both.
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        auto_host_endpoints: Option<bool>,
        /// Audit mode on this interface only (repeat for several; one of
        /// the interfaces) [key: auditInterfaces].
        #[arg(long = "audit-iface", value_name = "NAME")]
        audit_ifaces: Vec<String>,
        /// Replace an XDP program another tool attached by netlink (Calico's,
        /// `ip link`'s) instead of refusing to start [key: replaceXdp].
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        replace_xdp: Option<bool>,
        /// bpffs directory for moat's maps and links: enforcement, tracked
        /// flows and counters outlive the agent, and a restarted agent
        /// takes them over without a gap ("none": pin nothing)
        /// [key: pinDir; default: /sys/fs/bpf/moat].
        #[arg(long, value_name = "DIR", conflicts_with = "no_pin")]
        pin_dir: Option<PathBuf>,
        /// Pin nothing: the programs detach when the agent exits (the same
        /// as --pin-dir none).
        #[arg(long)]
        no_pin: bool,
        /// On SIGINT/SIGTERM remove everything pinned (as `moat uninstall`)
        /// instead of leaving enforcement in place [key: detachOnExit].
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        detach_on_exit: Option<bool>,
        /// Connections tracked at once (two map entries each); the least
        /// recently used is forgotten beyond [key: maxConnections;
        /// default: 32768].
        #[arg(long)]
        max_connections: Option<u32>,
        /// Capacity of the class-vector map in 64-bit words, both policy
        /// generations together [key: classWords; default: 2097152].
        #[arg(long)]
        class_words: Option<u32>,
        #[command(flatten)]
        capacity: CapacityArgs,
        #[command(flatten)]
        observe: ObserveArgs,
    },
    /// Show the running agent's state (from its status file).
    Status {
        /// The agent's status file.
        #[arg(long, value_name = "FILE", default_value = moat::cli::status::DEFAULT_PATH)]
        status_file: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove every program, link and map an agent pinned (enforcement
    /// stops on every interface it attached).
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = moat::cli::agent::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Show the agent's recent and live deny events (from its socket),
    /// filtered, as text, JSON or iptables LOG lines, or summarised.
    Tail {
        /// The agent's event socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// At most N of the most recent events from the history (default:
        /// 10 when following, all the agent keeps otherwise).
        #[arg(short = 'n', long = "lines", value_name = "N")]
        lines: Option<usize>,
        /// Only history events of the last DURATION (30s, 5m, 2h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<u64>,
        /// Keep streaming live events (the default on a terminal).
        #[arg(short, long, conflicts_with = "no_follow")]
        follow: bool,
        /// Print the history and exit (the default when not on a terminal).
        #[arg(long)]
        no_follow: bool,
        /// Only events on this interface (repeat for several).
        #[arg(long = "iface", value_name = "NAME")]
        ifaces: Vec<String>,
        #[arg(long, value_parser = ["ingress", "egress"])]
        direction: Option<String>,
        /// Only events decided by this policy (name or kind/name).
        #[arg(long)]
        policy: Option<String>,
        #[arg(long, value_parser = ["deny", "log", "audit"])]
        verdict: Option<String>,
        /// Only events whose source is in CIDR (an address alone is a /32
        /// or /128).
        #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
        src: Option<ipnet::IpNet>,
        #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
        dst: Option<ipnet::IpNet>,
        /// Only events whose source or destination port is PORT.
        #[arg(long)]
        port: Option<u16>,
        /// Only events of this protocol (tcp, udp, icmp, icmpv6, sctp, or a
        /// number).
        #[arg(long)]
        proto: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: moat::cli::tail::TailFormat,
        /// Prefix of `-o iptables` lines.
        #[arg(long, default_value = "calico-packet: ")]
        log_prefix: String,
        /// Summary: the top denied sources, ports and policies over a
        /// sliding window, redrawn in place on a terminal.
        #[arg(long)]
        top: bool,
        /// The --top window.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        window: u64,
        /// How often --top redraws.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
        interval: u64,
        /// Rows per --top table.
        #[arg(long, default_value_t = 10)]
        rows: usize,
    },
    /// Benchmark moat against iptables and nftables on generated rule sets
    /// (classification cost, throughput through the stack, update latency,
    /// memory; a table, JSON, Markdown and PNG plots in --out). With
    /// --policies: ns/packet of DIR's tables through BPF_PROG_TEST_RUN only.
    Bench {
        /// Measure this policy directory's tables only (the old bench).
        #[arg(long, value_name = "DIR", requires = "iface")]
        policies: Option<PathBuf>,
        /// With --policies: the interface whose tables are measured.
        #[arg(long = "iface", value_name = "NAME")]
        iface: Option<String>,
        #[arg(long)]
        node: Option<String>,
        /// Engines to compare (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',')]
        engines: Option<Vec<moat::bench::engines::Engine>>,
        /// Generated rule counts (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(usize))]
        rules: Option<Vec<usize>>,
        /// Rule-set shapes for the classification cost (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',')]
        shapes: Option<Vec<moat::bench::rules::Shape>>,
        /// Seconds of packets per through-the-stack figure.
        #[arg(long)]
        duration: Option<f64>,
        /// A short run (under two minutes): fewer counts, shorter figures.
        #[arg(long)]
        quick: bool,
        /// Where the report goes (report.json, report.md, denied.png,
        /// allowed.png).
        #[arg(long, value_name = "DIR", default_value = "bench-out")]
        out: PathBuf,
        /// Write every rendering of the rule sets into DIR and stop.
        #[arg(long, value_name = "DIR")]
        write_rules: Option<PathBuf>,
        /// Seed of the rule-set generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Packets per BPF_PROG_TEST_RUN call (the kernel reports their
        /// mean). The default keeps every deny's events (up to two each)
        /// within the 1 MiB ring buffer, so each one is really written.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        repeat: Option<u32>,
        /// Calls per packet; the median is reported.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: Option<u32>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Run a packet through the kernel program with the policy the node
    /// enforces (the running agent's pinned maps; a trace copy of the
    /// program writes only private maps) beside the reference semantics of
    /// --policies DIR; exits 3 when they disagree or the node runs another
    /// build. --offline: DIR's policy on maps of the trace's own.
    Trace {
        /// The policy the reference judges with (the directory the agent
        /// reads, or an export of the cluster's); required with --offline.
        #[arg(long, value_name = "DIR", required_if_eq("offline", "true"))]
        policies: Option<PathBuf>,
        #[arg(long = "iface", value_name = "NAME")]
        iface: String,
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "iks-2019")]
        profile: String,
        #[arg(
            long,
            value_name = "PACKET",
            conflicts_with = "egress",
            required_unless_present = "egress"
        )]
        ingress: Option<String>,
        #[arg(long, value_name = "PACKET")]
        egress: Option<String>,
        /// The packet is forwarded, not to or from the host (--offline;
        /// live, the node's own addresses decide and a difference is
        /// noted).
        #[arg(long)]
        forwarded: bool,
        /// Trace DIR's policy compiled here, on maps of the trace's own,
        /// instead of what the node enforces.
        #[arg(long)]
        offline: bool,
        /// The running agent's bpffs pin directory.
        #[arg(long, value_name = "DIR", default_value = moat::cli::agent::DEFAULT_PIN_DIR, conflicts_with = "offline")]
        pin_dir: PathBuf,
        /// The agent's saved state, for policy names ("none": unknown).
        #[arg(long, value_name = "FILE", default_value = moat::dataplane::state::DEFAULT_PATH, conflicts_with = "offline")]
        state_file: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Validate and compile a policy directory without touching the kernel;
    /// exits non-zero when any resource is invalid.
    Check {
        #[arg(long, value_name = "DIR")]
        policies: PathBuf,
        /// Interfaces to compile for (default: every interface a HostEndpoint
        /// of the node names).
        #[arg(long = "iface", value_name = "NAME")]
        ifaces: Vec<String>,
        /// Bundled profile to use when DIR holds no policy of its own
        /// (iks-2019, iks-2017, or none).
        #[arg(long, default_value = "iks-2019")]
        profile: String,
        #[arg(long)]
        node: Option<String>,
        /// A packet arriving on the (one) --iface, e.g.
        /// 'tcp 203.0.113.7:40000 -> 198.51.100.10:22'.
        #[arg(long, value_name = "PACKET", conflicts_with = "egress")]
        ingress: Option<String>,
        /// A packet leaving through the (one) --iface.
        #[arg(long, value_name = "PACKET")]
        egress: Option<String>,
        /// Judge the packet at pod NAMESPACE/NAME (a Pod object in DIR)
        /// instead of at an interface: Calico's answer for pod policies,
        /// which moat does not enforce.
        #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "ifaces")]
        pod: Option<String>,
        /// The packet is forwarded (to or from a pod, or between
        /// interfaces), not to or from the host.
        #[arg(long)]
        forwarded: bool,
        /// The packet belongs to a connection already allowed.
        #[arg(long)]
        established: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
        /// The agent's class-vector capacity to weigh the policy against
        /// [default: 2097152].
        #[arg(long, value_name = "N")]
        class_words: Option<u32>,
        #[command(flatten)]
        capacity: CapacityArgs,
    },
}

/// Capacities of the class maps (`moat agent`; `moat check` weighs the
/// policy against them).
#[derive(clap::Args, Debug, Default)]
struct CapacityArgs {
    /// Prefixes each address class map (sources, destinations) holds, both
    /// policy generations together: a policy may use half; raise it for
    /// large GlobalNetworkSets [key: addrPrefixes; default: 4194304].
    #[arg(long, value_name = "N")]
    addr_prefixes: Option<u32>,
    /// Prefixes each port class map holds, both generations together
    /// [key: portPrefixes; default: 262144].
    #[arg(long, value_name = "N")]
    port_prefixes: Option<u32>,
    /// Rule slots (classifier bits of every interface and direction), both
    /// generations together [key: ruleSlots; default: 65536].
    #[arg(long, value_name = "N")]
    rule_slots: Option<u32>,
}

/// Where the agent serves events by default.
const DEFAULT_SOCKET: &str = moat::events::observe::DEFAULT_SOCKET;

fn parse_duration(s: &str) -> Result<u64, String> {
    moat::events::hub::parse_duration(s)
}

fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 203.0.113.0/24) or an address"))
}

/// Observability options of `moat agent` (each also a config key; the
/// defaults are the config's).
#[derive(clap::Args)]
struct ObserveArgs {
    /// Unix socket serving events to `moat tail` ("none": no socket)
    /// [key: socket; default /run/moat/events.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Mode of the socket file (octal): who may read events [key:
    /// socketMode; default 0600].
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
    /// Group of the socket file (name or gid), with --socket-mode 0660
    /// [key: socketGroup].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Events kept in memory for `moat tail -n/--since` [key: history;
    /// default 10000].
    #[arg(long, value_name = "N")]
    history: Option<usize>,
    /// Events queued per `moat tail` client; a client that falls further
    /// behind gets a gap marker with the count it missed [key:
    /// subscriberQueue; default 4096].
    #[arg(long, value_name = "N")]
    subscriber_queue: Option<u64>,
    /// Also write events as JSON lines to PATH (mode 0600; holds client
    /// addresses, which are personal data) [key: eventsFile].
    #[arg(long, value_name = "PATH")]
    events_file: Option<PathBuf>,
    /// Rotate the events file at this size [key: eventsFileMaxBytes;
    /// default 100M].
    #[arg(long, value_name = "SIZE")]
    events_file_max_bytes: Option<String>,
    /// Rotated events files kept (PATH.1 ... PATH.N) [key: eventsFileKeep;
    /// default 5].
    #[arg(long, value_name = "N")]
    events_file_keep: Option<u32>,
    /// No events file keeps events older than this [key:
    /// eventsFileMaxAge; default 7d].
    #[arg(long, value_name = "DURATION")]
    events_file_max_age: Option<String>,
    /// Also send events to syslog [key: syslog].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    syslog: Option<bool>,
    /// Syslog line format (iptables: the `calico-packet:` line SREs grep)
    /// [key: syslogFormat; default iptables].
    #[arg(long, value_name = "FORMAT")]
    syslog_format: Option<String>,
    /// The local syslog socket [key: syslogSocket; default /dev/log].
    #[arg(long, value_name = "PATH")]
    syslog_socket: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz ("none": off) [key:
    /// metricsAddr; default 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent {
            config,
            policies,
            calicoctl_config,
            kubeconfig,
            ifaces,
            profile,
            node,
            output,
            xdp_mode,
            event_rate,
            event_burst,
            audit,
            audit_ifaces,
            replace_xdp,
            pin_dir,
            no_pin,
            detach_on_exit,
            max_connections,
            class_words,
            capacity,
            observe,
            state_file,
            status_file,
            auto_host_endpoints,
        } => {
            let flags = moat::cli::config::Config {
                node,
                interfaces: (!ifaces.is_empty()).then_some(ifaces),
                auto_host_endpoints,
                policies,
                calicoctl_config,
                kubeconfig,
                profile,
                audit,
                xdp_mode,
                event_rate,
                event_burst,
                output,
                state_file,
                status_file,
                pin_dir: if no_pin { Some("none".into()) } else { pin_dir },
                detach_on_exit,
                max_connections,
                class_words,
                addr_prefixes: capacity.addr_prefixes,
                port_prefixes: capacity.port_prefixes,
                rule_slots: capacity.rule_slots,
                audit_interfaces: (!audit_ifaces.is_empty()).then_some(audit_ifaces),
                replace_xdp,
                socket: observe.socket,
                socket_mode: observe.socket_mode,
                socket_group: observe.socket_group,
                history: observe.history,
                subscriber_queue: observe.subscriber_queue,
                events_file: observe.events_file,
                events_file_max_bytes: observe.events_file_max_bytes,
                events_file_keep: observe.events_file_keep,
                events_file_max_age: observe.events_file_max_age,
                syslog: observe.syslog,
                syslog_format: observe.syslog_format,
                syslog_socket: observe.syslog_socket,
                metrics_addr: observe.metrics_addr,
            };
            agent_config(flags, config).and_then(|cfg| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(agent::run(cfg)))
                    .map(|()| ExitCode::SUCCESS)
            })
        }
        Command::Status {
            status_file,
            output,
        } => status(&status_file, output),
        Command::Uninstall { pin_dir } => agent::uninstall(&pin_dir).map(|ifaces| {
            if ifaces.is_empty() {
                eprintln!("moat: nothing pinned in {}", pin_dir.display());
            } else {
                eprintln!(
                    "moat: removed {} and detached from {}",
                    pin_dir.display(),
                    ifaces.join(", ")
                );
            }
            ExitCode::SUCCESS
        }),
        Command::Tail {
            socket,
            lines,
            since,
            follow,
            no_follow,
            ifaces,
            direction,
            policy,
            verdict,
            src,
            dst,
            port,
            proto,
            output,
            log_prefix,
            top,
            window,
            interval,
            rows,
        } => (|| {
            let terminal = moat::cli::tail::stdout_is_terminal();
            let follow = top || follow || (terminal && !no_follow);
            let filter =
                moat::cli::tail::filter(ifaces, direction, policy, verdict, src, dst, port, proto)?;
            let cfg = moat::cli::tail::TailConfig {
                socket,
                request: moat::events::hub::Request {
                    // --top counts the window's history, then follows.
                    history: lines.or((follow && !top && since.is_none()).then_some(10)),
                    since_seconds: since.or(top.then_some(window)),
                    follow,
                    filter,
                },
                format: output,
                top: top.then(|| moat::cli::tail::TopConfig {
                    window: std::time::Duration::from_secs(window.max(1)),
                    interval: std::time::Duration::from_secs(interval.max(1)),
                    rows,
                    in_place: terminal,
                }),
                prefix: log_prefix,
                colour: terminal,
            };
            let gaps = moat::cli::tail::run(cfg)?;
            Ok(if gaps {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        })(),
        Command::Check {
            policies,
            ifaces,
            profile,
            node,
            ingress,
            egress,
            pod,
            forwarded,
            established,
            output,
            class_words,
            capacity,
        } => match (ingress, egress) {
            (None, None) if pod.is_some() => {
                Err(anyhow::anyhow!("--pod needs --ingress or --egress PACKET"))
            }
            (None, None) => capacities(class_words, capacity).and_then(|caps| {
                check(
                    &policies,
                    profile_arg(&profile).as_deref(),
                    ifaces,
                    node,
                    output,
                    caps,
                )
            }),
            (ingress, egress) => check_packet(
                &policies,
                profile_arg(&profile).as_deref(),
                &ifaces,
                node,
                ingress
                    .map(|p| (moat_common::direction::INGRESS, p))
                    .or(egress.map(|p| (moat_common::direction::EGRESS, p))),
                moat::policy::reference::Query {
                    forwarded,
                    established,
                },
                output,
            ),
        },
        Command::Trace {
            policies,
            iface,
            node,
            profile,
            ingress,
            egress,
            forwarded,
            offline,
            pin_dir,
            state_file,
            output,
        } => (|| {
            moat::dataplane::preflight::check()?;
            let node = node.unwrap_or_else(agent::default_node_name);
            let loaded = match &policies {
                Some(dir) => {
                    let loaded = agent::load_policies(dir, profile_arg(&profile).as_deref())?;
                    for e in &loaded.errors {
                        eprintln!("error: {e} (left out)");
                    }
                    Some(loaded)
                }
                None => None,
            };
            let (dir, packet) = match (ingress, egress) {
                (Some(p), _) => (moat_common::direction::INGRESS, p),
                (None, Some(p)) => (moat_common::direction::EGRESS, p),
                (None, None) => anyhow::bail!("--ingress or --egress PACKET"),
            };
            let t = match (offline, &loaded) {
                (true, Some(loaded)) => {
                    let query = moat::policy::reference::Query {
                        forwarded,
                        established: false,
                    };
                    moat::cli::trace::trace(&loaded.set, &node, &iface, dir, &packet, query)?
                }
                (true, None) => anyhow::bail!("--offline needs --policies DIR"),
                (false, _) => moat::cli::trace::trace_live(&moat::cli::trace::LiveTrace {
                    pin_dir: &pin_dir,
                    state_file: (state_file.as_os_str() != "none").then_some(state_file.as_path()),
                    iface: &iface,
                    dir,
                    packet: &packet,
                    forwarded,
                    reference: loaded.as_ref().map(|l| (&l.set, node.as_str())),
                })?,
            };
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string(&t)?),
                OutputFormat::Text => print!("{}", t.text()),
            }
            Ok(if t.alarming() {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        })(),
        Command::Bench {
            policies: Some(policies),
            iface: Some(iface),
            node,
            repeat,
            runs,
            output,
            ..
        } => bench(
            &policies,
            &iface,
            node,
            repeat.unwrap_or(5_000),
            runs.unwrap_or(21),
            output,
        ),
        Command::Bench {
            engines,
            rules,
            shapes,
            duration,
            quick,
            out,
            write_rules,
            seed,
            repeat,
            runs,
            output,
            ..
        } => moat::bench::cli::run(moat::bench::cli::Args {
            engines,
            rules,
            shapes,
            duration,
            quick,
            out,
            write_rules,
            seed,
            repeat,
            runs,
            json: matches!(output, OutputFormat::Json),
        })
        .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--profile none` means no profile.
/// Flags over the environment over the config file over the defaults.
fn agent_config(
    flags: moat::cli::config::Config,
    file: Option<PathBuf>,
) -> anyhow::Result<AgentConfig> {
    use moat::cli::config;
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
        None => config::Config::default(),
    };
    config::resolve(
        flags.over(env.over(from_file)),
        std::env::var("NODE_NAME").ok(),
    )
}

/// `moat status`: exit 0 when the agent runs and is in sync, 1 when it
/// runs but is not (yet), 3 when it is not running.
fn status(path: &std::path::Path, output: OutputFormat) -> anyhow::Result<ExitCode> {
    use moat::cli::status::{read, render, Found};
    match read(path)? {
        Found::Missing => {
            if output == OutputFormat::Json {
                println!(
                    "{}",
                    serde_json::json!({"running": false, "reason": format!("no status file at {}", path.display())})
                );
            } else {
                println!(
                    "the agent is not running: no status file at {}",
                    path.display()
                );
            }
            Ok(ExitCode::from(3))
        }
        Found::Stale(s, age, why) => {
            if output == OutputFormat::Json {
                println!(
                    "{}",
                    serde_json::json!({"running": false, "reason": why, "age_seconds": age, "last": s})
                );
            } else {
                println!("the agent is not running ({why}); its last status, {age} s old:");
                print!("{}", render(&s));
            }
            Ok(ExitCode::from(3))
        }
        Found::Fresh(s, age) => {
            let in_sync = s.source.synced;
            if output == OutputFormat::Json {
                println!(
                    "{}",
                    serde_json::json!({"running": true, "age_seconds": age, "status": s})
                );
            } else {
                print!("{}", render(&s));
            }
            Ok(if in_sync {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn profile_arg(p: &str) -> Option<String> {
    (p != "none").then(|| p.to_string())
}

/// The capacities `moat check` weighs a policy against: the agent's, as
/// the same flags set them.
fn capacities(
    class_words: Option<u32>,
    c: CapacityArgs,
) -> anyhow::Result<moat::dataplane::Capacities> {
    moat::cli::config::capacities(
        &moat::cli::config::Config {
            addr_prefixes: c.addr_prefixes,
            port_prefixes: c.port_prefixes,
            rule_slots: c.rule_slots,
            ..Default::default()
        },
        moat_common::MAX_FLOWS / 2,
        class_words.unwrap_or(moat_common::MAX_CLASS_WORDS),
    )
}

fn check(
    dir: &std::path::Path,
    profile: Option<&str>,
    ifaces: Vec<String>,
    node: Option<String>,
    output: OutputFormat,
    caps: moat::dataplane::Capacities,
) -> anyhow::Result<ExitCode> {
    let node = node.unwrap_or_else(agent::default_node_name);
    let loaded = agent::load_policies(dir, profile)?;
    let ifaces = if ifaces.is_empty() {
        let mut names: Vec<String> = loaded
            .set
            .host_endpoints
            .iter()
            .filter(|h| h.node == node)
            .map(|h| h.interface_name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    } else {
        ifaces
    };
    let compiled = compile(&loaded.set, &node, &ifaces);
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let warnings: Vec<String> = policy::label_key_warnings(&loaded.set)
        .iter()
        .map(ToString::to_string)
        .collect();
    let compile_error = compiled.as_ref().err().map(ToString::to_string);
    let (needs, capacity_error) = match &compiled {
        Ok(c) => moat::cli::check::fit(c, &caps),
        Err(_) => (None, None),
    };
    match output {
        OutputFormat::Json => {
            let tables = compiled.as_ref().ok().map(|c| {
                c.ifaces
                    .values()
                    .map(|i| {
                        serde_json::json!({
                            "iface": i.name,
                            "host_endpoint": i.host_endpoint,
                            "ingress_rules": i.table(0, moat_common::table::POLICY).rules.len(),
                            "egress_rules": i.table(1, moat_common::table::POLICY).rules.len(),
                            "ingress_failsafes": i.table(0, moat_common::table::FAILSAFE).rules.len(),
                            "egress_failsafes": i.table(1, moat_common::table::FAILSAFE).rules.len(),
                        })
                    })
                    .collect::<Vec<_>>()
            });
            println!(
                "{}",
                serde_json::json!({
                    "files": loaded.files,
                    "policies": loaded.set.policies.len(),
                    "host_endpoints": loaded.set.host_endpoints.len(),
                    "errors": errors,
                    "warnings": warnings,
                    "compile_error": compile_error,
                    "capacity_error": capacity_error,
                    "needs": needs,
                    "node": node,
                    "enforced": tables,
                })
            );
        }
        OutputFormat::Text => {
            for e in &errors {
                println!("error: {e}");
            }
            for w in &warnings {
                println!("warning: {w}");
            }
            if let Some(e) = &compile_error {
                println!("error: {e}");
            }
            if let Some(e) = &capacity_error {
                println!("error: {e}");
            }
            println!(
                "{} file(s): {} GlobalNetworkPolicies, {} HostEndpoints valid; {} error(s)",
                loaded.files,
                loaded.set.policies.len(),
                loaded.set.host_endpoints.len(),
                errors.len()
                    + usize::from(compile_error.is_some())
                    + usize::from(capacity_error.is_some())
            );
            if let Some(n) = &needs {
                println!(
                    "one policy generation needs: {} source and {} destination prefixes (of {} each), {} rule slots (of {}), {} class vector words (of {})",
                    n.source_prefixes,
                    n.destination_prefixes,
                    caps.addr_prefixes / 2,
                    n.rule_slots,
                    caps.rule_slots / 2,
                    n.class_words,
                    caps.class_words / 2
                );
            }
            if let Ok(c) = &compiled {
                for i in c.ifaces.values() {
                    println!(
                        "node {node} {}: HostEndpoint {}, ingress {} entries, egress {} entries",
                        i.name,
                        i.host_endpoint,
                        i.table(0, moat_common::table::POLICY).rules.len(),
                        i.table(1, moat_common::table::POLICY).rules.len()
                    );
                }
                for i in &c.unenforced {
                    println!("node {node} {i}: no HostEndpoint, not enforced");
                }
            }
        }
    }
    Ok(
        if errors.is_empty() && compile_error.is_none() && capacity_error.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn bench(
    dir: &std::path::Path,
    iface: &str,
    node: Option<String>,
    repeat: u32,
    runs: u32,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    moat::dataplane::preflight::check()?;
    let node = node.unwrap_or_else(agent::default_node_name);
    let loaded = policy::load_dir(dir)?;
    if let Some(e) = loaded.errors.first() {
        anyhow::bail!(
            "{} invalid resource(s) in {}, first: {e}",
            loaded.errors.len(),
            dir.display()
        );
    }
    let results = moat::bench::run(&loaded.set, &node, iface, repeat, runs)?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&results)?),
        OutputFormat::Text => {
            println!("XDP program, BPF_PROG_TEST_RUN, repeat {repeat}, median of {runs} runs ({} {iface}):", dir.display());
            for r in &results {
                println!(
                    "  {:<62} {:<4} {:>7.1} ns/packet  (min {:.1}, max {:.1})",
                    r.case, r.verdict, r.median_ns, r.min_ns, r.max_ns
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_packet(
    dir_path: &std::path::Path,
    profile: Option<&str>,
    ifaces: &[String],
    node: Option<String>,
    packet: Option<(u8, String)>,
    query: moat::policy::reference::Query,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let [iface] = ifaces else {
        anyhow::bail!(
            "a packet query needs exactly one --iface (the interface it arrives on or leaves by)"
        );
    };
    let (dir, packet) = packet.ok_or_else(|| anyhow::anyhow!("--ingress or --egress PACKET"))?;
    let node = node.unwrap_or_else(agent::default_node_name);
    let loaded = agent::load_policies(dir_path, profile)?;
    for e in &loaded.errors {
        eprintln!("error: {e} (left out of the answer)");
    }
    let answer = moat::cli::check::answer(&loaded.set, &node, iface, dir, &packet, query)?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&answer)?),
        OutputFormat::Text => print!("{}", answer.text()),
    }
    Ok(if loaded.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
