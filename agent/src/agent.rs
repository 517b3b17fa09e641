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
    pub xdp_mode: XdpAttachMode,
    /// History, socket, events file, syslog, metrics.
    pub observe: crate::observe::ObserveConfig,
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

    let mut dataplane = Dataplane::load().context("loading the eBPF programs")?;
    // The node's addresses first, so the tables tell forwarded traffic
    // apart from the start; then the tables; then attach: the programs
    // enforce from their first packet.
    dataplane.set_event_rate(cfg.event_rate, cfg.event_burst)?;
    dataplane.set_audit(cfg.audit);
    if cfg.audit {
        warn!("audit mode: nothing is dropped; would-be denies are reported with verdict AUDIT");
    }
    let mut local = local_addresses()?;
    dataplane.set_local_addresses(&local)?;
    info!(
        "{} local addresses; anything else arriving is forwarded",
        local.len()
    );
    let generation = 1;
    let apply_started = std::time::Instant::now();
    dataplane.apply(&by_index, generation)?;
    let last_apply = apply_started.elapsed();
    for iface in &cfg.ifaces {
        dataplane.attach(iface, cfg.xdp_mode)?;
    }
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
                let mut s = crate::metrics::Snapshot {
                    counters: dataplane.counters()?,
                    conntrack_entries: dataplane.conntrack_len() as u64,
                    local_addresses: local.len() as u64,
                    rule_entries,
                    generation,
                    last_apply_seconds: last_apply.as_secs_f64(),
                    rules: Vec::new(),
                };
                observer.add_rule_counters(&mut s);
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
    info!("detached from {}", cfg.ifaces.join(", "));
    Ok(())
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
