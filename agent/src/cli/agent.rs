//! `moat agent`: load the policy, attach, enforce, stream deny events, and
//! detach cleanly on SIGINT or SIGTERM.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{bail, Context as _};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{error, info, warn};

use crate::{
    compile::{compile, Compiled, CompiledIface},
    dataplane::{preflight, Dataplane, XdpAttachMode},
    events::event::{self, ResolvedEvent},
    policy, EventFormat,
};

/// What `moat agent` was asked to do.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: PolicySource,
    /// Bundled profile used when the directory holds no policy of its own.
    pub profile: Option<String>,
    pub ifaces: Vec<String>,
    pub node: String,
    pub output: EventFormat,
    /// Events per second each source may cause (0: no limit), and at once.
    pub event_rate: u32,
    pub event_burst: u32,
    /// Audit mode: report would-be denies, drop nothing.
    pub audit: bool,
    /// Audit mode on these interfaces only.
    pub audit_ifaces: Vec<String>,
    /// Replace an XDP program attached by netlink.
    pub replace_xdp: bool,
    pub xdp_mode: XdpAttachMode,
    /// bpffs directory of the pins (`None`: pin nothing).
    pub pin_dir: Option<PathBuf>,
    /// Remove the pins (and so detach) on SIGINT/SIGTERM.
    pub detach_on_exit: bool,
    /// Map capacities.
    pub capacities: crate::dataplane::Capacities,
    /// History, socket, events file, syslog, metrics.
    pub observe: crate::events::observe::ObserveConfig,
    /// HostEndpoints for eth0 (`ibm.role: worker_private`) and eth1
    /// (`worker_public`) when the source names none for them.
    pub auto_host_endpoints: bool,
    /// Where the last good compiled policy is saved (`None`: not saved).
    pub state_file: Option<PathBuf>,
    /// Where the agent publishes its status (`None`: nowhere).
    pub status_file: Option<PathBuf>,
}

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/moat";

/// Whether `path` is on a bpffs mount.
pub fn on_bpffs(path: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Checks that `dir` can hold pins: it or its parent is on a bpffs mount.
pub fn check_pin_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    if on_bpffs(dir) || on_bpffs(parent) {
        return Ok(());
    }
    bail!(
        "{} is not on a bpffs mount, so nothing can be pinned there: mount one (`mount -t bpf bpf {}`; in a container, mount the host's /sys/fs/bpf), give --pin-dir a directory on bpffs, or run with --no-pin",
        parent.display(),
        parent.display()
    )
}

/// Removes everything pinned in `dir`; refuses while an agent holds it.
/// Returns the interfaces detached.
pub fn uninstall(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let _lock = lock_pin_dir(dir)?;
    Ok(crate::dataplane::uninstall(dir)?)
}

/// Holds the pin directory for this process: a second agent (or an
/// uninstall) on the same directory is refused while this one lives,
/// instead of both writing the same maps. The lock is an flock on a file
/// under /run/moat, released by the kernel when the process ends, even by
/// SIGKILL.
pub fn lock_pin_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read as _, Seek as _, Write as _};
    let run = std::path::Path::new("/run/moat");
    std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
    let name: String = dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = run.join(format!("pins{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            write!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another moat process (pid {}) holds {}; stop it first (or give this one another --pin-dir)",
                pid.trim(),
                dir.display()
            )
        }
    }
}

/// The node's name as Calico knows it: the host name.
pub fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Loads `dir` and, when it holds no policy of its own, the bundled
/// `profile` (`None`: no profile).
pub fn load_policies(
    dir: &std::path::Path,
    profile: Option<&str>,
) -> anyhow::Result<policy::Loaded> {
    let mut loaded = policy::load_dir(dir)?;
    if let Some(name) = profile {
        let p = crate::policy::profiles::find(name).ok_or_else(|| {
            let known: Vec<&str> = crate::policy::profiles::PROFILES
                .iter()
                .map(|p| p.name)
                .collect();
            anyhow::anyhow!(
                "no bundled profile {name:?} (known: {}, or none)",
                known.join(", ")
            )
        })?;
        if loaded.set.policies.is_empty() && !loaded.errors.is_empty() {
            error!(
                "{}: no valid policy, and {} object(s) rejected: the bundled profile {} is NOT used in their place; fix them",
                dir.display(),
                loaded.errors.len(),
                p.name
            );
        } else if loaded.set.policies.is_empty() {
            info!(
                "{} holds no policy of its own: using the bundled profile {} ({})",
                dir.display(),
                p.name,
                p.applies_to
            );
            crate::policy::profiles::add_to(&mut loaded.set, p);
        }
    }
    Ok(loaded)
}

/// Loads `dir` (and the profile), reports every invalid resource, and
/// compiles the rest.
pub fn load_and_compile(
    dir: &std::path::Path,
    profile: Option<&str>,
    node: &str,
    ifaces: &[String],
) -> anyhow::Result<Compiled> {
    let loaded = load_policies(dir, profile)?;
    for e in &loaded.errors {
        error!("rejected: {e}");
    }
    for w in policy::label_key_warnings(&loaded.set) {
        warn!("{w}");
    }
    if !loaded.errors.is_empty() {
        warn!(
            "{} resource(s) rejected; they are NOT enforced. The {} valid ones are.",
            loaded.invalid_objects(),
            loaded.set.policies.len() + loaded.set.host_endpoints.len()
        );
    }
    info!(
        "read {} file(s) from {}: {} GlobalNetworkPolicies, {} HostEndpoints",
        loaded.files,
        dir.display(),
        loaded.set.policies.len(),
        loaded.set.host_endpoints.len()
    );
    let compiled = compile(&loaded.set, node, ifaces)?;
    if !compiled.pod_policies.is_empty() {
        info!(
            "{} policies govern pods, not host interfaces; moat does not enforce them: {}",
            compiled.pod_policies.len(),
            compiled.pod_policies.join(", ")
        );
    }
    Ok(compiled)
}

/// The node's own addresses (every interface of this network namespace),
/// with subnet broadcast addresses: what packets addressed to the host
/// carry. Anything else arriving is forwarded.
pub fn local_addresses() -> anyhow::Result<std::collections::BTreeSet<std::net::IpAddr>> {
    let mut out = std::collections::BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing the node's addresses")? {
        for addr in [ifa.address, ifa.broadcast].into_iter().flatten() {
            if let Some(a) = addr.as_sockaddr_in() {
                out.insert(std::net::IpAddr::V4(a.ip()));
            } else if let Some(a) = addr.as_sockaddr_in6() {
                out.insert(std::net::IpAddr::V6(a.ip()));
            }
        }
    }
    Ok(out)
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("no interface named {name} in this network namespace"))
}

fn describe(iface: &CompiledIface) -> String {
    use moat_common::{direction, table};
    let n = |d, k| iface.table(d, k).rules.len();
    format!(
        "{} (HostEndpoint {}): ingress {} rules + {} failsafe, egress {} rules + {} failsafe",
        iface.name,
        iface.host_endpoint,
        n(direction::INGRESS, table::POLICY),
        n(direction::INGRESS, table::FAILSAFE),
        n(direction::EGRESS, table::POLICY),
        n(direction::EGRESS, table::FAILSAFE),
    )
}

/// Where the policy comes from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// A directory of policy files, watched.
    Directory(PathBuf),
    /// Calico's etcd v3 datastore, watched.
    Etcd(crate::sources::calicoctl::EtcdConfig),
    /// The Kubernetes API (Calico's CRDs and the objects selectors
    /// resolve against), watched; the kubeconfig when not inferred.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

impl PolicySource {
    fn kind(&self) -> &'static str {
        match self {
            PolicySource::Directory(_) => "directory",
            PolicySource::Etcd(_) => "etcdv3",
            PolicySource::Kubernetes { .. } => "kubernetes",
        }
    }

    fn location(&self) -> String {
        match self {
            PolicySource::Directory(d) => d.display().to_string(),
            PolicySource::Etcd(e) => e.endpoints.join(","),
            PolicySource::Kubernetes { kubeconfig } => {
                crate::sources::kube::describe(kubeconfig.as_deref())
            }
        }
    }
}

/// Starts `source`; it stops when the receiving side of `tx` is dropped.
fn start_source(
    source: &PolicySource,
    tx: tokio::sync::mpsc::Sender<crate::sources::reconcile::Snapshot>,
    kube: Option<kube::Config>,
    node: &str,
) -> anyhow::Result<()> {
    match source {
        PolicySource::Directory(dir) => crate::sources::directory::watch(dir.clone(), tx),
        PolicySource::Etcd(cfg) => {
            crate::sources::etcd::spawn(cfg.clone(), tx);
            Ok(())
        }
        PolicySource::Kubernetes { .. } => crate::sources::kube::spawn(
            kube.context("the Kubernetes client configuration was not loaded")?,
            node,
            tx,
        ),
    }
}

/// The interfaces the agent is asked to enforce, as they come and go.
struct Ifaces {
    wanted: Vec<String>,
    /// Named by `--iface`: each must be protected for the agent to be ready.
    required: Vec<String>,
    /// Added by automatic host endpoints (and not named).
    optional: Vec<String>,
    /// name -> ifindex, for those that exist now.
    present: BTreeMap<String, u32>,
    /// name -> ifindex it was attached at.
    attached: BTreeMap<String, u32>,
    reported_missing: std::collections::BTreeSet<String>,
}

impl Ifaces {
    fn new(wanted: Vec<String>, required: Vec<String>) -> Self {
        let optional = wanted
            .iter()
            .filter(|w| !required.contains(w))
            .cloned()
            .collect();
        Ifaces {
            wanted,
            required,
            optional,
            present: BTreeMap::new(),
            attached: BTreeMap::new(),
            reported_missing: Default::default(),
        }
    }

    /// Looks the interfaces up again; true when one appeared (or came
    /// back under a new index) and is not attached yet.
    fn refresh(&mut self) -> bool {
        let mut appeared = false;
        for name in &self.wanted {
            match ifindex(name) {
                Ok(index) => {
                    if self.reported_missing.remove(name) {
                        info!("{name} appeared (ifindex {index}): attaching");
                    }
                    self.present.insert(name.clone(), index);
                    if self.attached.get(name) != Some(&index) {
                        self.attached.remove(name);
                        appeared = true;
                    }
                }
                Err(_) => {
                    self.present.remove(name);
                    self.attached.remove(name);
                    if self.reported_missing.insert(name.clone()) {
                        warn!(
                            "{name}: no such interface (yet); it is attached and enforced when it appears"
                        );
                    }
                }
            }
        }
        appeared
    }
}

/// Makes `compiled` the policy in force on every present interface and
/// attaches those not attached yet (after their tables are in place, so
/// they enforce from their first packet).
fn enforce(
    dataplane: &mut Dataplane,
    ifaces: &mut Ifaces,
    compiled: &Compiled,
    generation: u32,
    mode: XdpAttachMode,
) -> anyhow::Result<()> {
    ifaces.refresh();
    let by_index: BTreeMap<u32, CompiledIface> = ifaces
        .present
        .iter()
        .filter_map(|(name, &index)| Some((index, compiled.ifaces.get(name)?.clone())))
        .collect();
    dataplane.apply(&by_index, generation)?;
    let to_attach: Vec<(String, u32)> = ifaces
        .present
        .iter()
        .filter(|(name, _)| !ifaces.attached.contains_key(*name))
        .map(|(n, i)| (n.clone(), *i))
        .collect();
    for (name, index) in to_attach {
        dataplane.attach(&name, mode)?;
        ifaces.attached.insert(name, index);
    }
    Ok(())
}

/// Once this agent's programs are attached: detaches the links pinned for
/// interfaces no longer wanted, and removes pins of another map layout.
fn settle_pins(dataplane: &Dataplane, wanted: &[String]) -> anyhow::Result<()> {
    for iface in dataplane.prune_links(wanted)? {
        info!("{iface}: no longer asked for: detached");
    }
    for name in dataplane.remove_stale_pins()? {
        info!("removed the pinned map {name} of another layout");
    }
    Ok(())
}

/// Whether the agent protects what it was asked to, judged again after
/// every apply and every second; every change is logged (WARN when not).
#[derive(Default)]
struct ReadyWatch {
    /// The source's HostEndpoints, for "did you mean".
    endpoints: Vec<crate::cli::ready::EndpointName>,
    last: Option<crate::cli::ready::Readiness>,
}

impl ReadyWatch {
    /// Judges readiness again and updates `status` and `health`; returns
    /// the line to log when it changed (logged once the status file is
    /// written, so whoever reads the log finds the file up to date).
    fn check(
        &mut self,
        dataplane: &Dataplane,
        ifaces: &Ifaces,
        node: &str,
        generation: u32,
        health: &crate::events::metrics::Health,
        status: &mut crate::cli::status::Status,
    ) -> Option<ReadyChange> {
        let r = crate::cli::ready::assess(
            dataplane,
            &crate::cli::ready::Asked {
                required: &ifaces.required,
                optional: &ifaces.optional,
                node,
                generation,
                present: &ifaces.present,
                endpoints: &self.endpoints,
            },
        );
        status.ready = r.ready();
        status.unprotected = r.problems.clone();
        if self.last.as_ref() == Some(&r) {
            return None;
        }
        let change = if r.ready() {
            let on = r.protected.join(", ");
            let detail = format!("policy generation {generation} enforced on {on}");
            health.set_ready(detail.clone());
            ReadyChange::Ready(detail)
        } else {
            let why = r.problems.join("; ");
            health.set_not_ready(why.clone());
            ReadyChange::NotReady(why)
        };
        self.last = Some(r);
        Some(change)
    }
}

/// A change of readiness, to log.
enum ReadyChange {
    Ready(String),
    NotReady(String),
}

impl ReadyChange {
    fn log(self) {
        match self {
            ReadyChange::Ready(detail) => info!("ready: {detail}"),
            ReadyChange::NotReady(why) => {
                warn!("NOT protecting every interface asked for, so not ready. {why}")
            }
        }
    }
}

/// Everything `moat status` shows, from the agent's current state.
struct Published {
    status: crate::cli::status::Status,
    labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl Published {
    fn refresh(
        &mut self,
        dataplane: &Dataplane,
        ifaces: &Ifaces,
        compiled: &Compiled,
        stats: &crate::sources::reconcile::Stats,
        mode: XdpAttachMode,
        local: usize,
    ) {
        use moat_common::{counter, direction};

        use crate::{cli::status::*, sources::reconcile::Stats as S};
        let s = &mut self.status;
        s.updated_at = crate::dataplane::state::now();
        s.source.reconciles = S::get(&stats.reconciles);
        s.source.failed_reconciles = S::get(&stats.failed);
        s.source.rejected_objects_total = S::get(&stats.rejected_objects);
        s.source.invalid_objects = S::get(&stats.invalid_now);
        s.source.kept_last_good = S::get(&stats.kept_last_good);
        s.invalid = stats
            .invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        s.interfaces = ifaces
            .wanted
            .iter()
            .map(|name| {
                let c = compiled.ifaces.get(name);
                let (policies, rules) = c
                    .map(|c| tables_of(c, &compiled.policy_names))
                    .unwrap_or_default();
                InterfaceStatus {
                    name: name.clone(),
                    ifindex: ifaces.present.get(name).copied(),
                    attached: ifaces.attached.contains_key(name),
                    enforced: c.is_some() && ifaces.attached.contains_key(name),
                    host_endpoint: c.map(|c| c.host_endpoint.clone()),
                    labels: self.labels.get(name).cloned().unwrap_or_default(),
                    xdp_mode: format!("{mode:?}").to_lowercase(),
                    tc: if tcx { "tcx egress" } else { "clsact egress" }.into(),
                    policies,
                    rules,
                }
            })
            .collect();
        let fill = dataplane.fill().unwrap_or_else(|e| {
            warn!("reading map fill levels: {e}");
            Default::default()
        });
        s.maps = vec![
            MapFill {
                name: "rules (bank)".into(),
                entries: fill.rule_slots,
                max_entries: fill.rule_slots_per_bank.into(),
                bytes: 0,
            },
            MapFill {
                name: "interfaces".into(),
                entries: ifaces
                    .present
                    .keys()
                    .filter(|n| compiled.ifaces.contains_key(*n))
                    .count() as u64,
                max_entries: moat_common::MAX_IFACES.into(),
                bytes: 0,
            },
            MapFill {
                name: "conntrack".into(),
                entries: fill.flows,
                max_entries: fill.flows_capacity.into(),
                bytes: 0,
            },
            MapFill {
                name: "local addrs".into(),
                entries: local as u64,
                max_entries: moat_common::MAX_LOCAL_ADDRS.into(),
                bytes: 0,
            },
        ];
        // Every map's kernel memory, and the class maps' fill.
        match dataplane.map_usage() {
            Ok(usage) => s.maps.extend(usage.into_iter().map(|u| MapFill {
                name: u.name,
                entries: u.entries,
                max_entries: u.max_entries.into(),
                bytes: u.bytes,
            })),
            Err(e) => warn!("reading map memory: {e}"),
        }
        match dataplane.counters() {
            Ok(rows) => {
                s.counters = rows
                    .iter()
                    .enumerate()
                    .map(|(d, row)| {
                        (
                            direction::name(d as u8).to_string(),
                            row.iter()
                                .enumerate()
                                .map(|(i, v)| (counter::NAMES[i].to_string(), *v))
                                .collect(),
                        )
                    })
                    .collect();
            }
            Err(e) => warn!("reading counters: {e}"),
        }
    }

    fn write(&self, path: Option<&std::path::Path>) {
        if let Some(path) = path {
            if let Err(e) = crate::cli::status::write(path, &self.status) {
                warn!("writing the status file: {e:#}");
            }
        }
    }
}

/// Raises the soft limit on open descriptors to the hard one, so that a
/// flood of connections (bounded anyway) or many policy files do not run
/// the agent out of descriptors at the default 1024.
fn raise_descriptor_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(
                    "open descriptors: limit raised from {before} to {}",
                    lim.rlim_max
                );
            }
        }
    }
}

/// Before Linux 5.11 BPF maps are charged to RLIMIT_MEMLOCK: aya raises
/// it when a map creation is refused, which takes CAP_SYS_RESOURCE. Says
/// so ahead, when the limit is finite there.
fn warn_memlock() {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 11, 0)) {
        return;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
    {
        warn!(
            "this kernel (before 5.11) charges BPF maps to RLIMIT_MEMLOCK ({} KiB here): the agent raises it, which needs CAP_SYS_RESOURCE (add it to the DaemonSet's capabilities on these kernels)",
            lim.rlim_cur / 1024
        );
    }
}

/// What the preflight phase settles before anything is loaded.
struct Plan {
    /// Interfaces to attach (those named and the automatic ones).
    wanted: Vec<String>,
    profile: Option<&'static crate::policy::profiles::Profile>,
    /// The Kubernetes client configuration (the Kubernetes API source).
    kube: Option<kube::Config>,
}

/// The agent as its phases share it, from load to shutdown.
struct Agent<'a> {
    cfg: &'a AgentConfig,
    wanted: Vec<String>,
    stats: std::sync::Arc<crate::sources::reconcile::Stats>,
    observer: crate::events::observe::Observer,
    dataplane: Dataplane,
    ifaces: Ifaces,
    /// The node's addresses as the dataplane has them.
    local: std::collections::BTreeSet<std::net::IpAddr>,
    published: Published,
    /// The policy in force (saved or synced).
    compiled: Compiled,
    generation: u32,
    /// Whether this agent has put a policy in force (saved or synced);
    /// until then an adopted one keeps judging, untouched.
    have_policy: bool,
    last_apply: std::time::Duration,
    pins_settled: bool,
    /// Whether the first complete sync has been applied.
    synced: bool,
    ready: ReadyWatch,
    /// Held until the agent ends (declared last: dropped last).
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// `moat agent`, phase by phase: preflight, load (or adopt the pinned
/// dataplane), attach what the saved state holds, the reconcile loop,
/// shutdown.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let plan = preflight(&cfg).await?;
    let mut agent = Agent::load_or_adopt(&cfg, plan.wanted.clone()).await?;
    let last_good_texts = agent.attach_saved_state()?;
    let outcomes = agent.start_source(plan, last_good_texts)?;
    agent.reconcile_loop(outcomes).await?;
    agent.shutdown()
}

/// Checks the configuration, the kernel and the process before anything
/// is loaded or attached (what is pinned keeps enforcing meanwhile).
async fn preflight(cfg: &AgentConfig) -> anyhow::Result<Plan> {
    raise_descriptor_limit();
    for file in [&cfg.state_file, &cfg.status_file].into_iter().flatten() {
        if let Some(dir) = file.parent().filter(|d| d.exists()) {
            crate::dataplane::state::check_private_dir(dir)
                .with_context(|| format!("keeping {} there", file.display()))?;
        }
    }
    let mut wanted = cfg.ifaces.clone();
    if cfg.auto_host_endpoints {
        for (iface, _) in crate::sources::reconcile::AUTO_HOST_ENDPOINTS {
            if !wanted.iter().any(|w| w == iface) {
                wanted.push(iface.to_string());
            }
        }
    }
    if wanted.is_empty() {
        bail!("no interface to enforce: name them (--iface eth1 --iface eth0) or ask for automatic host endpoints");
    }
    for name in &cfg.audit_ifaces {
        if !wanted.contains(name) {
            bail!(
                "--audit-iface {name}: not one of the interfaces enforced ({})",
                wanted.join(", ")
            );
        }
    }
    let profile = match cfg.profile.as_deref() {
        None => None,
        Some(name) => Some(crate::policy::profiles::find(name).ok_or_else(|| {
            let known: Vec<&str> = crate::policy::profiles::PROFILES
                .iter()
                .map(|p| p.name)
                .collect();
            anyhow::anyhow!(
                "no bundled profile {name:?} (known: {}, or none)",
                known.join(", ")
            )
        })?),
    };
    let support = preflight::check()?;
    warn_memlock();
    info!(
        "kernel {}: ring buffer, LRU hash, XDP and TC available{}",
        support.version,
        if support.tcx { ", TCX attach" } else { "" }
    );
    // A bad client configuration is refused before anything is loaded or
    // attached.
    let kube = match &cfg.source {
        PolicySource::Kubernetes { kubeconfig } => Some(
            crate::sources::kube::load_config(kubeconfig.as_deref())
                .await
                .context("the Kubernetes API source")?,
        ),
        _ => None,
    };
    Ok(Plan {
        wanted,
        profile,
        kube,
    })
}

/// Loads the programs with maps pinned in `cfg.pin_dir` (adopting those
/// an earlier agent left) or of their own.
fn load_dataplane(cfg: &AgentConfig) -> anyhow::Result<Dataplane> {
    let dataplane = match &cfg.pin_dir {
        Some(dir) => Dataplane::load_with(Some(dir), cfg.capacities).with_context(|| {
            format!(
                "loading the eBPF programs with maps pinned in {}",
                dir.display()
            )
        })?,
        None => Dataplane::load_with(None, cfg.capacities).context("loading the eBPF programs")?,
    };
    if let (Some(dir), Some(g)) = (&cfg.pin_dir, dataplane.adopted_generation()) {
        info!(
            "adopted the dataplane pinned in {}: generation {g} stays in force (and tracked flows) until this agent's policy replaces it",
            dir.display()
        );
    }
    for name in dataplane.stale_pins() {
        warn!("pinned map {name} is from a moat version with another map layout: not read; removed once this version is attached");
    }
    Ok(dataplane)
}

/// Connections open before moat attaches (ssh sessions, this agent's own
/// API watch, flows kube-proxy forwards) are adopted as established, so
/// attaching cuts none.
fn seed_connections(dataplane: &mut Dataplane) -> anyhow::Result<()> {
    let mut seeds = Vec::new();
    let sockets = match crate::dataplane::seed::host_sockets() {
        Ok(flows) => {
            let n = flows.len();
            seeds.extend(flows);
            format!("{n} from this host's TCP sockets")
        }
        Err(e) => {
            warn!("cannot read this host's TCP connections ({e:#}): those open now are judged by policy from their next packet unless Linux conntrack knows them");
            "none from this host's TCP sockets (unreadable)".to_string()
        }
    };
    let conntrack = match crate::dataplane::seed::kernel_conntrack() {
        Ok(Some(flows)) => {
            let n = flows.len();
            seeds.extend(flows);
            format!("{n} from Linux connection tracking")
        }
        Ok(None) => format!(
            "none from Linux connection tracking ({} absent)",
            crate::dataplane::seed::NF_CONNTRACK
        ),
        Err(e) => {
            warn!("cannot read Linux connection tracking ({e:#}): UDP flows and forwarded connections open now are judged by policy from their next packet");
            "none from Linux connection tracking (unreadable)".to_string()
        }
    };
    let n = dataplane.seed_flows(&seeds)?;
    info!(
        "{n} established connection(s) tracked as allowed before attaching: {sockets}, {conntrack}"
    );
    Ok(())
}

/// Where the policy comes from, for `moat check` commands in events.
fn check_context(cfg: &AgentConfig) -> crate::events::observe::CheckContext {
    crate::events::observe::CheckContext {
        policies: match &cfg.source {
            PolicySource::Directory(dir) => {
                Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
            }
            PolicySource::Etcd(_) | PolicySource::Kubernetes { .. } => None,
        },
        profile: cfg.profile.clone(),
        node: cfg.node.clone(),
    }
}

/// The control plane's addresses now (exempted as outbound failsafes),
/// and how to resolve them again as names move.
fn control_plane(
    cfg: &AgentConfig,
    kube: Option<&kube::Config>,
) -> (
    Vec<std::net::SocketAddr>,
    Option<crate::sources::reconcile::ControlPlaneResolver>,
) {
    use crate::sources::reconcile::{resolve_endpoints, ControlPlaneResolver, RERESOLVE};
    match (&cfg.source, kube) {
        (PolicySource::Etcd(etcd), _) => {
            let endpoints = etcd.endpoints.clone();
            let now = resolve_endpoints(&endpoints);
            let resolve = Box::new(move || resolve_endpoints(&endpoints));
            (
                now,
                Some(ControlPlaneResolver {
                    resolve,
                    every: RERESOLVE,
                }),
            )
        }
        (_, Some(k)) => {
            let now = crate::sources::kube::control_plane(k);
            let k = k.clone();
            let resolve = Box::new(move || crate::sources::kube::control_plane(&k));
            (
                now,
                Some(ControlPlaneResolver {
                    resolve,
                    every: RERESOLVE,
                }),
            )
        }
        _ => (Vec::new(), None),
    }
}

impl<'a> Agent<'a> {
    /// Starts the observability side, takes the pin directory, loads the
    /// programs (or adopts the pinned ones) and fills what they read
    /// before any policy: settings, the node's addresses, open
    /// connections. Attaches nothing.
    async fn load_or_adopt(cfg: &'a AgentConfig, wanted: Vec<String>) -> anyhow::Result<Self> {
        let stats = std::sync::Arc::new(crate::sources::reconcile::Stats::default());
        let observer =
            crate::events::observe::Observer::start(&cfg.observe, check_context(cfg)).await?;
        observer.health.beat();
        let lock = match &cfg.pin_dir {
            Some(dir) => {
                check_pin_dir(dir)?;
                Some(lock_pin_dir(dir)?)
            }
            None => None,
        };
        let mut dataplane = load_dataplane(cfg)?;
        // The node's addresses first, so the tables tell forwarded traffic
        // apart from the start; then the tables; then attach: the programs
        // enforce from their first packet.
        dataplane.set_event_rate(cfg.event_rate, cfg.event_burst)?;
        dataplane.set_audit(cfg.audit);
        dataplane.set_replace_xdp(cfg.replace_xdp);
        if cfg.audit {
            warn!(
                "audit mode: nothing is dropped; would-be denies are reported with verdict AUDIT"
            );
        }
        let mut audited = Vec::new();
        for name in &cfg.audit_ifaces {
            audited.push(ifindex(name)?);
            warn!("audit mode on {name}: nothing is dropped there; would-be denies are reported with verdict AUDIT");
        }
        dataplane.set_audit_ifaces(audited);
        let local = local_addresses()?;
        dataplane.set_local_addresses(&local)?;
        info!(
            "{} local addresses; anything else arriving is forwarded",
            local.len()
        );
        seed_connections(&mut dataplane)?;
        let mut ifaces = Ifaces::new(wanted.clone(), cfg.ifaces.clone());
        ifaces.refresh();
        let now = crate::dataplane::state::now();
        let published = Published {
            status: crate::cli::status::Status {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
                node: cfg.node.clone(),
                state: "starting".into(),
                audit: cfg.audit,
                started_at: now,
                updated_at: now,
                source: crate::cli::status::SourceStatus {
                    kind: cfg.source.kind().into(),
                    location: cfg.source.location(),
                    ..Default::default()
                },
                ..Default::default()
            },
            labels: BTreeMap::new(),
        };
        // After pins were adopted, the next generation follows the one in force.
        let generation = dataplane.adopted_generation().unwrap_or(0);
        Ok(Agent {
            cfg,
            wanted,
            stats,
            observer,
            dataplane,
            ifaces,
            local,
            published,
            compiled: Compiled::default(),
            generation,
            have_policy: false,
            last_apply: std::time::Duration::ZERO,
            pins_settled: false,
            synced: false,
            ready: ReadyWatch::default(),
            _lock: lock,
        })
    }

    /// Rewrites the status file from the agent's current state.
    fn publish(&mut self) {
        self.published.refresh(
            &self.dataplane,
            &self.ifaces,
            &self.compiled,
            &self.stats,
            self.cfg.xdp_mode,
            self.local.len(),
        );
        self.published.write(self.cfg.status_file.as_deref());
    }

    /// Enforces the saved state (if there is a usable one) and attaches,
    /// before the source has answered. Returns the last good texts it
    /// holds for the reconciler.
    fn attach_saved_state(&mut self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut last_good_texts = BTreeMap::new();
        if let Some(path) = &self.cfg.state_file {
            match crate::dataplane::state::load(path, &self.cfg.node) {
                Ok(saved) => {
                    last_good_texts = saved.last_good_texts.clone();
                    self.enforce_saved(path, saved)?;
                }
                Err(crate::dataplane::state::Unusable::Missing) => info!(
                    "no saved state at {}: enforcing from the first complete sync",
                    path.display()
                ),
                Err(crate::dataplane::state::Unusable::Invalid(why)) => warn!(
                    "saved state {} not used: {why}; enforcing from the first complete sync",
                    path.display()
                ),
            }
        }
        self.publish();
        Ok(last_good_texts)
    }

    fn enforce_saved(
        &mut self,
        path: &std::path::Path,
        saved: crate::dataplane::state::SavedState,
    ) -> anyhow::Result<()> {
        self.compiled = saved
            .compiled()
            .map_err(|e| anyhow::anyhow!("saved state {}: {e}", path.display()))?;
        self.generation = saved.generation.max(self.generation.wrapping_add(1));
        let started = std::time::Instant::now();
        enforce(
            &mut self.dataplane,
            &mut self.ifaces,
            &self.compiled,
            self.generation,
            self.cfg.xdp_mode,
        )?;
        self.last_apply = started.elapsed();
        self.observer.stats.apply_seconds.observe(self.last_apply);
        self.have_policy = true;
        settle_pins(&self.dataplane, &self.wanted)?;
        self.pins_settled = true;
        self.published.labels = saved.labels.clone();
        let s = &mut self.published.status;
        s.state = "enforcing saved state".into();
        s.generation = self.generation;
        s.applied_at = Some(crate::dataplane::state::now());
        s.applied_from = format!("saved state ({})", saved.origin);
        s.saved_state = Some(format!(
            "{}: generation {}, saved {}",
            path.display(),
            saved.generation,
            crate::events::event::rfc3339(i128::from(saved.saved_at) * 1_000_000_000)
        ));
        info!(
            "enforcing the saved state {} (generation {}, {} interfaces) until the first complete sync",
            path.display(),
            self.generation,
            self.compiled.ifaces.len()
        );
        Ok(())
    }

    /// Starts the reconcile pipeline and the policy source feeding it.
    fn start_source(
        &mut self,
        plan: Plan,
        last_good_texts: BTreeMap<String, String>,
    ) -> anyhow::Result<
        tokio::sync::mpsc::Receiver<Result<crate::sources::reconcile::Outcome, String>>,
    > {
        let cfg = self.cfg;
        let (snapshots_tx, snapshots_rx) = tokio::sync::mpsc::channel(4);
        let mut reconciler = crate::sources::reconcile::Reconciler::new(
            cfg.node.clone(),
            cfg.ifaces.clone(),
            plan.profile,
            cfg.auto_host_endpoints,
            self.stats.clone(),
        );
        reconciler.seed(last_good_texts);
        // Names move (an etcd member replaced, the API server's address
        // changed): resolved again every 30 s and exempted where they are.
        let (now, resolver) = control_plane(cfg, plan.kube.as_ref());
        reconciler.control_plane = now;
        if !reconciler.control_plane.is_empty() {
            info!(
                "the control plane stays reachable whatever the policy says: outbound TCP to {} is failsafe",
                reconciler
                    .control_plane
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let outcomes = crate::sources::reconcile::spawn(reconciler, snapshots_rx, resolver);
        start_source(&cfg.source, snapshots_tx, plan.kube, &cfg.node)?;
        Ok(outcomes)
    }

    /// Until SIGINT or SIGTERM: applies what the source sends, answers
    /// scrapes, follows addresses and interfaces, streams events.
    async fn reconcile_loop(
        &mut self,
        mut outcomes: tokio::sync::mpsc::Receiver<
            Result<crate::sources::reconcile::Outcome, String>,
        >,
    ) -> anyhow::Result<()> {
        let ring = self
            .dataplane
            .take_events()
            .context("event ring buffer already taken")?;
        // SAFETY: the ring buffer owns its map fd and keeps it open,
        // unchanged, for as long as it lives, which is as long as the
        // AsyncFd.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {}", e.into_parts().1))?;
        let offset = event::monotonic_to_wall_offset();
        // Addresses move (VRRP virtual IPs, DHCP) and interfaces come and
        // go: resynchronise every second.
        let mut resync = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut publish = tokio::time::interval(std::time::Duration::from_secs(
            crate::cli::status::INTERVAL_SECS,
        ));
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = sigint.recv() => { info!("SIGINT: detaching"); return Ok(()); }
                _ = sigterm.recv() => { info!("SIGTERM: detaching"); return Ok(()); }
                Some(reply) = self.observer.snapshots.recv() => self.answer_scrape(reply)?,
                outcome = outcomes.recv() => self.apply(outcome)?,
                _ = publish.tick() => self.publish(),
                _ = resync.tick() => self.resync()?,
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for events")?;
                    self.read_events(guard.get_inner_mut(), offset);
                    guard.clear_ready();
                }
            }
        }
    }

    fn answer_scrape(&self, reply: crate::events::metrics::SnapshotRequest) -> anyhow::Result<()> {
        use crate::sources::reconcile::Stats as S;
        let stats = &self.stats;
        let s = crate::events::metrics::Snapshot {
            policy: crate::events::metrics::PolicyHealth {
                objects_invalid: S::get(&stats.invalid_now),
                objects_kept_last_good: S::get(&stats.kept_last_good),
                reconciles: S::get(&stats.reconciles),
                reconcile_errors: S::get(&stats.failed),
            },
            counters: self.dataplane.counters()?,
            fill: self.dataplane.fill()?,
            local_addresses: self.local.len() as u64,
            generation: self.generation,
            last_apply_seconds: self.last_apply.as_secs_f64(),
            rules: rule_counters(&self.dataplane, &self.compiled),
            maps: self.dataplane.map_usage().unwrap_or_default(),
        };
        // The scrape may have given up waiting: nothing to do then.
        let _ = reply.send(s);
        Ok(())
    }

    /// Applies what the reconcile pipeline sent. A failure keeps the
    /// policy in force, except before anything is: then the agent stops.
    fn apply(
        &mut self,
        outcome: Option<Result<crate::sources::reconcile::Outcome, String>>,
    ) -> anyhow::Result<()> {
        let first = !self.synced && self.generation == 0;
        let outcome = match outcome {
            Some(Ok(o)) => o,
            Some(Err(e)) => {
                if first {
                    bail!("the first sync does not compile: {e}");
                }
                self.published.status.source.last_error = Some(e);
                return Ok(());
            }
            None => bail!("the policy source stopped"),
        };
        let next = self.generation.wrapping_add(1).max(1);
        // The generation in force's per-rule counts, read just before the
        // switch, so its rules' totals go on after it.
        let counts = rule_counters(&self.dataplane, &self.compiled);
        if let Ok(mut totals) = self.observer.stats.rule_totals.lock() {
            totals.observe(self.generation, &counts);
        }
        let started = std::time::Instant::now();
        if let Err(e) = enforce(
            &mut self.dataplane,
            &mut self.ifaces,
            &outcome.compiled,
            next,
            self.cfg.xdp_mode,
        ) {
            self.observer
                .stats
                .apply_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // An interface the programs cannot be attached to (another
            // program holds it) stops an agent that enforces nothing yet,
            // as at start; a policy that does not fit never does.
            let attach_failed = e
                .downcast_ref::<crate::dataplane::DataplaneError>()
                .is_some_and(|d| {
                    matches!(
                        d,
                        crate::dataplane::DataplaneError::XdpBusy { .. }
                            | crate::dataplane::DataplaneError::XdpLinkHeld { .. }
                            | crate::dataplane::DataplaneError::AttachXdp { .. }
                            | crate::dataplane::DataplaneError::AttachTc { .. }
                    )
                });
            if first && attach_failed {
                error!("applying {}: {e:#}", outcome.origin);
                return Err(e);
            }
            if self.have_policy || self.dataplane.adopted_generation().is_some() {
                error!(
                    "applying {}: {e:#}; the policy in force stays",
                    outcome.origin
                );
            } else {
                // Exiting would enforce nothing either; staying applies the
                // source's next policy that fits.
                error!(
                    "applying {}: {e:#}; nothing is enforced until the source holds a policy that can be applied",
                    outcome.origin
                );
                self.published.status.state = "refused the first policy".into();
            }
            self.published.status.source.last_error = Some(format!("{e:#}"));
            self.published.write(self.cfg.status_file.as_deref());
            return Ok(());
        }
        self.last_apply = started.elapsed();
        self.observer.stats.apply_seconds.observe(self.last_apply);
        self.have_policy = true;
        if !self.pins_settled {
            settle_pins(&self.dataplane, &self.wanted)?;
            self.pins_settled = true;
        }
        self.generation = next;
        self.applied(outcome);
        Ok(())
    }

    /// Once `outcome` is in force: reports, saves and publishes it.
    fn applied(&mut self, outcome: crate::sources::reconcile::Outcome) {
        let cfg = self.cfg;
        let generation = self.generation;
        self.compiled = outcome.compiled;
        for iface in &self.compiled.unenforced {
            warn!(
                "{iface}: no HostEndpoint of node {} names it, so nothing is enforced there",
                cfg.node
            );
        }
        if !self.compiled.pod_policies.is_empty() {
            info!(
                "{} policies govern pods, not host interfaces; moat does not enforce them",
                self.compiled.pod_policies.len()
            );
        }
        let now = crate::dataplane::state::now();
        self.published.labels = outcome.labels.clone();
        let s = &mut self.published.status;
        s.generation = generation;
        s.applied_at = Some(now);
        s.applied_from = outcome.origin.clone();
        s.state = "in sync".into();
        s.source.synced = true;
        s.source.last_sync_at = Some(now);
        s.source.last_error = None;
        if let Some(path) = &cfg.state_file {
            let mut saved = crate::dataplane::state::SavedState::new(
                &self.compiled,
                outcome.labels,
                &cfg.node,
                generation,
                &outcome.origin,
            );
            saved.last_good_texts = outcome.last_good_texts;
            match crate::dataplane::state::save(path, &saved) {
                Ok(()) => {
                    s.saved_state = Some(format!(
                        "{}: generation {generation}, saved {}",
                        path.display(),
                        crate::events::event::rfc3339(i128::from(now) * 1_000_000_000)
                    ))
                }
                Err(e) => warn!("saving the policy in force to {}: {e:#}", path.display()),
            }
        }
        if self.synced {
            info!(
                "applied: policy generation {generation} from {}",
                outcome.origin
            );
        } else {
            self.synced = true;
            for c in self.compiled.ifaces.values() {
                info!("enforcing {}", describe(c));
            }
        }
        self.ready.endpoints = outcome.endpoints;
        let change = self.check_ready();
        self.publish();
        if let Some(c) = change {
            c.log();
        }
    }

    fn check_ready(&mut self) -> Option<ReadyChange> {
        self.ready.check(
            &self.dataplane,
            &self.ifaces,
            &self.cfg.node,
            self.generation,
            &self.observer.health,
            &mut self.published.status,
        )
    }

    /// Once a second: the node's addresses, interfaces that appeared,
    /// readiness against the kernel.
    fn resync(&mut self) -> anyhow::Result<()> {
        self.observer.tick();
        match local_addresses() {
            Ok(now) if now != self.local => {
                let (added, removed) = self.dataplane.set_local_addresses(&now)?;
                info!("local addresses changed: {added} added, {removed} removed");
                self.local = now;
            }
            Ok(_) => {}
            // Keep the last known set: judging by stale addresses beats
            // judging every packet as forwarded.
            Err(e) => warn!("{e:#}"),
        }
        // An interface that appeared is enforced once there is a policy to
        // enforce (saved or synced).
        if self.ifaces.refresh() && self.have_policy {
            enforce(
                &mut self.dataplane,
                &mut self.ifaces,
                &self.compiled,
                self.generation,
                self.cfg.xdp_mode,
            )?;
            self.publish();
        }
        if self.synced {
            if let Some(change) = self.check_ready() {
                self.publish();
                change.log();
            }
        }
        Ok(())
    }

    /// Everything in the ring buffer, to the outputs.
    fn read_events(&mut self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>, offset: i128) {
        let names = &self.ifaces.present;
        let iface_name = |i: u32| {
            names
                .iter()
                .find(|(_, idx)| **idx == i)
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| format!("if{i}"))
        };
        while let Some(item) = ring.next() {
            match crate::dataplane::decode_event(&item) {
                Some(e) => {
                    let w =
                        self.observer
                            .event(&e, &iface_name, &self.compiled, offset, &self.local);
                    match self.cfg.output {
                        EventFormat::Iptables => println!("calico-packet: {}", w.iptables),
                        EventFormat::None => {}
                        format => print(
                            &event::resolve(&e, &iface_name, &self.compiled, offset),
                            format,
                        ),
                    }
                }
                None => {
                    self.observer
                        .stats
                        .events_malformed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!("skipped a short event record ({} bytes)", item.len());
                }
            }
        }
        self.observer.flush();
        self.observer.health.beat();
    }

    /// Logs the counters, marks the status stopped, and detaches (or
    /// leaves the pinned enforcement in place).
    fn shutdown(mut self) -> anyhow::Result<()> {
        let counters = self.dataplane.counters()?;
        for (d, row) in counters.iter().enumerate() {
            let dir = moat_common::direction::name(d as u8);
            let nonzero: Vec<String> = row
                .iter()
                .enumerate()
                .filter(|(_, v)| **v > 0)
                .map(|(i, v)| format!("{}={v}", moat_common::counter::NAMES[i]))
                .collect();
            info!(
                "{dir} counters: {}",
                if nonzero.is_empty() {
                    "none".into()
                } else {
                    nonzero.join(" ")
                }
            );
        }
        self.published.refresh(
            &self.dataplane,
            &self.ifaces,
            &self.compiled,
            &self.stats,
            self.cfg.xdp_mode,
            self.local.len(),
        );
        self.published.status.state = "stopped".into();
        self.published.write(self.cfg.status_file.as_deref());
        let Agent {
            cfg,
            dataplane,
            ifaces,
            observer,
            _lock,
            ..
        } = self;
        drop(dataplane);
        let attached = ifaces
            .attached
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        match &cfg.pin_dir {
            Some(dir) if !cfg.detach_on_exit => info!(
                "enforcement stays in place on {} (pinned in {}); `moat uninstall` removes it",
                attached,
                dir.display()
            ),
            Some(dir) => {
                crate::dataplane::uninstall(dir)?;
                info!("removed {} and detached from {}", dir.display(), attached);
            }
            None => info!("detached from {}", attached),
        }
        drop(observer);
        drop(_lock);
        Ok(())
    }
}

/// The kernel's per-rule counters by policy name, rule and direction
/// (summed over interfaces); failsafe rules under `failsafe`.
fn rule_counters(
    dataplane: &Dataplane,
    compiled: &Compiled,
) -> Vec<crate::events::metrics::RuleCounter> {
    let counters = match dataplane.rule_counters() {
        Ok(c) => c,
        Err(e) => {
            warn!("reading per-rule counters: {e}");
            return Vec::new();
        }
    };
    let mut sums: BTreeMap<(String, u32, &'static str), (u64, u64)> = BTreeMap::new();
    for c in counters {
        let policy = compiled
            .policy_name(c.policy_id)
            .map_or_else(|| "failsafe".to_string(), str::to_string);
        let e = sums
            .entry((
                policy,
                c.rule_index,
                moat_common::direction::name(c.direction),
            ))
            .or_default();
        e.0 += c.packets;
        e.1 += c.bytes;
    }
    sums.into_iter()
        .map(
            |((policy, rule, direction), (packets, bytes))| crate::events::metrics::RuleCounter {
                policy,
                rule,
                direction,
                packets,
                bytes,
            },
        )
        .collect()
}

fn print(e: &ResolvedEvent, output: EventFormat) {
    match output {
        EventFormat::Text | EventFormat::Iptables | EventFormat::None => println!("{}", e.line()),
        EventFormat::Json => match serde_json::to_string(e) {
            Ok(line) => println!("{line}"),
            Err(err) => error!("cannot encode event as JSON: {err}"),
        },
    }
}
