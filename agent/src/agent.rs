//! `moat agent`: load the policy, attach, enforce, stream deny events, and
//! detach cleanly on SIGINT or SIGTERM.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{bail, Context as _};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{error, info, warn};

use crate::{
    compile::{compile, Compiled, CompiledIface},
    dataplane::{Dataplane, XdpAttachMode},
    event::{self, ResolvedEvent},
    policy, preflight, EventFormat,
};

/// What `moat agent` was asked to do.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub policies: PathBuf,
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
    pub observe: crate::observe::ObserveConfig,
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
        let p = crate::profiles::find(name).ok_or_else(|| {
            let known: Vec<&str> = crate::profiles::PROFILES.iter().map(|p| p.name).collect();
            anyhow::anyhow!(
                "no bundled profile {name:?} (known: {}, or none)",
                known.join(", ")
            )
        })?;
        if loaded.set.policies.is_empty() {
            info!(
                "{} holds no policy of its own: using the bundled profile {} ({})",
                dir.display(),
                p.name,
                p.applies_to
            );
            crate::profiles::add_to(&mut loaded.set, p);
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
            loaded.errors.len(),
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

/// One TCP connection of this host: local address and port, remote
/// address and port.
pub type TcpFlow = (std::net::IpAddr, u16, std::net::IpAddr, u16);

/// The host's established TCP connections (its own sockets in this network
/// namespace, from /proc/net/tcp and tcp6), loopback excepted.
pub fn established_tcp() -> anyhow::Result<Vec<TcpFlow>> {
    let mut out = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // No IPv6 in this kernel: no IPv6 sockets.
            Err(e) if v6 && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        out.extend(parse_proc_net_tcp(&text, v6).with_context(|| format!("parsing {path}"))?);
    }
    Ok(out)
}

/// The ESTABLISHED entries of a /proc/net/tcp (or tcp6) table.
pub fn parse_proc_net_tcp(text: &str, v6: bool) -> anyhow::Result<Vec<TcpFlow>> {
    // Addresses are the kernel's words printed in host byte order.
    fn addr(hex: &str, v6: bool) -> anyhow::Result<std::net::IpAddr> {
        let word = |i: usize| -> anyhow::Result<[u8; 4]> {
            let w = hex.get(i * 8..i * 8 + 8).context("short address")?;
            Ok(u32::from_str_radix(w, 16)?.to_ne_bytes())
        };
        if v6 {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let a = std::net::Ipv6Addr::from(b);
            Ok(a.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(a), std::net::IpAddr::V4))
        } else {
            Ok(std::net::IpAddr::V4(std::net::Ipv4Addr::from(word(0)?)))
        }
    }
    fn endpoint(s: &str, v6: bool) -> anyhow::Result<(std::net::IpAddr, u16)> {
        let (a, p) = s
            .split_once(':')
            .with_context(|| format!("no port in {s:?}"))?;
        Ok((addr(a, v6)?, u16::from_str_radix(p, 16)?))
    }
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, local, remote, state, ..] = fields.as_slice() else {
            continue;
        };
        if *state != "01" {
            continue; // only ESTABLISHED
        }
        let (l, lp) = endpoint(local, v6)?;
        let (r, rp) = endpoint(remote, v6)?;
        if l.is_loopback() || r.is_loopback() {
            continue;
        }
        out.push((l, lp, r, rp));
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

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    if cfg.ifaces.is_empty() {
        bail!("no --iface given: name the interfaces to enforce, e.g. --iface eth1 --iface eth0");
    }
    let support = preflight::check()?;
    info!(
        "kernel {}: ring buffer, LRU hash, XDP and TC available{}",
        support.version,
        if support.tcx { ", TCX attach" } else { "" }
    );

    let compiled = load_and_compile(
        &cfg.policies,
        cfg.profile.as_deref(),
        &cfg.node,
        &cfg.ifaces,
    )?;
    let mut names = BTreeMap::new();
    let mut by_index = BTreeMap::new();
    for iface in &cfg.ifaces {
        let index = ifindex(iface)?;
        names.insert(index, iface.clone());
        if let Some(c) = compiled.ifaces.get(iface) {
            by_index.insert(index, c.clone());
        }
    }
    for iface in &compiled.unenforced {
        warn!(
            "{iface}: no HostEndpoint of node {} names it, so it is attached but not enforced",
            cfg.node
        );
    }

    let check = crate::observe::CheckContext {
        policies: std::fs::canonicalize(&cfg.policies).unwrap_or_else(|_| cfg.policies.clone()),
        profile: cfg.profile.clone(),
        node: cfg.node.clone(),
    };
    let mut observer = crate::observe::Observer::start(&cfg.observe, check).await?;
    observer.health.beat();
    let rule_entries: u64 = by_index
        .values()
        .map(|c| {
            (0..2u8)
                .flat_map(|d| (0..moat_common::table::KINDS).map(move |k| (d, k)))
                .map(|(d, k)| c.table(d, k).rules.len() as u64)
                .sum::<u64>()
        })
        .sum();

    let _lock = match &cfg.pin_dir {
        Some(dir) => {
            check_pin_dir(dir)?;
            Some(lock_pin_dir(dir)?)
        }
        None => None,
    };
    let mut dataplane = match &cfg.pin_dir {
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
    // The node's addresses first, so the tables tell forwarded traffic
    // apart from the start; then the tables; then attach: the programs
    // enforce from their first packet.
    dataplane.set_event_rate(cfg.event_rate, cfg.event_burst)?;
    dataplane.set_audit(cfg.audit);
    dataplane.set_replace_xdp(cfg.replace_xdp);
    if cfg.audit {
        warn!("audit mode: nothing is dropped; would-be denies are reported with verdict AUDIT");
    }
    let mut audited = Vec::new();
    for name in &cfg.audit_ifaces {
        if !cfg.ifaces.contains(name) {
            bail!(
                "--audit-iface {name}: not one of the --iface given ({})",
                cfg.ifaces.join(", ")
            );
        }
        audited.push(ifindex(name)?);
        warn!("audit mode on {name}: nothing is dropped there; would-be denies are reported with verdict AUDIT");
    }
    dataplane.set_audit_ifaces(audited);
    let mut local = local_addresses()?;
    dataplane.set_local_addresses(&local)?;
    info!(
        "{} local addresses; anything else arriving is forwarded",
        local.len()
    );
    let generation = dataplane
        .adopted_generation()
        .map_or(1, |g| g.wrapping_add(1));
    let apply_started = std::time::Instant::now();
    dataplane.apply(&by_index, generation)?;
    let last_apply = apply_started.elapsed();
    // Connections open before moat attaches (ssh sessions, this agent's
    // own API watch) are adopted as established, so attaching cuts none.
    match established_tcp() {
        Ok(flows) => {
            let n = dataplane.seed_tcp_flows(&flows)?;
            info!("{n} established TCP connection(s) of this host tracked as allowed before attaching");
        }
        Err(e) => warn!("cannot read this host's TCP connections ({e:#}): connections open now are judged by policy from their next packet"),
    }
    for iface in &cfg.ifaces {
        dataplane.attach(iface, cfg.xdp_mode)?;
    }
    for iface in dataplane.prune_links(&cfg.ifaces)? {
        info!("{iface}: no longer asked for: detached");
    }
    dataplane.remove_stale_pins()?;
    for c in compiled.ifaces.values() {
        info!("enforcing {}", describe(c));
    }
    observer.health.set_ready(format!(
        "policy generation {generation} enforced on {}",
        cfg.ifaces.join(", ")
    ));
    info!(
        "ready: policy generation {generation} enforced on {}",
        cfg.ifaces.join(", ")
    );

    let ring = dataplane
        .take_events()
        .context("event ring buffer already taken")?;
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
    // for as long as it lives, which is as long as the AsyncFd.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {}", e.into_parts().1))?;
    let offset = event::monotonic_to_wall_offset();
    let iface_name = move |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));

    // Addresses move (VRRP virtual IPs, DHCP): resynchronise every second.
    let mut resync = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            Some(reply) = observer.snapshots.recv() => {
                let s = crate::metrics::Snapshot {
                    counters: dataplane.counters()?,
                    conntrack_entries: dataplane.conntrack_len() as u64,
                    local_addresses: local.len() as u64,
                    rule_entries,
                    generation,
                    last_apply_seconds: last_apply.as_secs_f64(),
                    rules: rule_counters(&dataplane, &compiled),
                };
                // The scrape may have given up waiting: nothing to do then.
                let _ = reply.send(s);
            }
            _ = resync.tick() => {
                observer.tick();
                match local_addresses() {
                    Ok(now) if now != local => {
                        let (added, removed) = dataplane.set_local_addresses(&now)?;
                        info!("local addresses changed: {added} added, {removed} removed");
                        local = now;
                    }
                    Ok(_) => {}
                    // Keep the last known set: judging by stale addresses
                    // beats judging every packet as forwarded.
                    Err(e) => warn!("{e:#}"),
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    match event::decode(&item) {
                        Some(e) => {
                            let w = observer.event(&e, &iface_name, &compiled, offset, &local);
                            match cfg.output {
                                EventFormat::Iptables => println!("calico-packet: {}", w.iptables),
                                EventFormat::None => {}
                                format => print(&event::resolve(&e, &iface_name, &compiled, offset), format),
                            }
                        }
                        None => {
                            observer.stats.events_malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            warn!("skipped a short event record ({} bytes)", item.len());
                        }
                    }
                }
                guard.clear_ready();
                observer.flush();
                observer.health.beat();
            }
        }
    }
    let counters = dataplane.counters()?;
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
    drop(dataplane);
    match &cfg.pin_dir {
        Some(dir) if !cfg.detach_on_exit => info!(
            "enforcement stays in place on {} (pinned in {}); `moat uninstall` removes it",
            cfg.ifaces.join(", "),
            dir.display()
        ),
        Some(dir) => {
            crate::dataplane::uninstall(dir)?;
            info!(
                "removed {} and detached from {}",
                dir.display(),
                cfg.ifaces.join(", ")
            );
        }
        None => info!("detached from {}", cfg.ifaces.join(", ")),
    }
    Ok(())
}

/// The kernel's per-rule counters by policy name, rule and direction
/// (summed over interfaces); failsafe rules under `failsafe`.
fn rule_counters(dataplane: &Dataplane, compiled: &Compiled) -> Vec<crate::metrics::RuleCounter> {
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
            |((policy, rule, direction), (packets, bytes))| crate::metrics::RuleCounter {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_established_entries() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 010112C6:0016 020112C6:D2F0 01 00000000:00000000 02:0008F5C4 00000000     0        0 2 4 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
        let flows = parse_proc_net_tcp(v4, false).unwrap();
        assert_eq!(
            flows,
            vec![(
                "198.18.1.1".parse().unwrap(),
                22,
                "198.18.1.2".parse().unwrap(),
                0xd2f0
            )]
        );
        let v6 =
            "  sl  local_address                         remote_address                        st
   0: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:C350 01 0
   1: 0000000000000000FFFF0000010112C6:01BB 0000000000000000FFFF0000020112C6:C351 01 0
";
        let flows = parse_proc_net_tcp(v6, true).unwrap();
        assert_eq!(
            flows,
            vec![
                (
                    "2001:db8::1".parse().unwrap(),
                    22,
                    "2001:db8::2".parse().unwrap(),
                    50000
                ),
                (
                    "198.18.1.1".parse().unwrap(),
                    443,
                    "198.18.1.2".parse().unwrap(),
                    50001
                ),
            ]
        );
        assert!(parse_proc_net_tcp("h\n 0: zz:0016 00:00 01", false).is_err());
    }
}
