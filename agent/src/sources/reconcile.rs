//! The one reconcile pipeline behind every policy source: a source sends
//! snapshots of what it holds; each is merged with the last good version
//! of every object whose new version is invalid, compiled off the async
//! runtime (a blocking thread), and handed to the agent's loop, which
//! applies it atomically. Snapshots that arrive while one is compiling are
//! coalesced: only the newest is compiled next.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    compile::{compile, Compiled},
    policy::{self, Loaded, PolicySet},
};

/// Everything a source holds at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub loaded: Loaded,
    /// What it was read from, for logs and `moat status`.
    pub origin: String,
    /// The text of each file (or datastore key) `loaded` was parsed from,
    /// by the name its errors and origins carry: the last good version of
    /// an object that turns invalid is kept from these, across restarts.
    pub texts: Arc<BTreeMap<String, String>>,
}

/// Counters of the pipeline, shared with the agent's status.
#[derive(Debug, Default)]
pub struct Stats {
    /// Snapshots compiled (successfully or not).
    pub reconciles: AtomicU64,
    /// Snapshots whose compilation failed (the policy in force stayed).
    pub failed: AtomicU64,
    /// Invalid objects seen, summed over every snapshot.
    pub rejected_objects: AtomicU64,
    /// Objects whose new version is invalid and whose last good version
    /// is in force, in the latest snapshot (a gauge).
    pub kept_last_good: AtomicU64,
    /// Invalid objects in the latest snapshot (a gauge).
    pub invalid_now: AtomicU64,
    /// Each invalid object of the latest snapshot with its error, and
    /// whether its last good version is in force.
    pub invalid: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A HostEndpoint the source holds (any node's), for "did you mean" when
/// an interface asked for is not governed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointName {
    pub name: String,
    pub node: String,
    pub interface: String,
}

/// What a snapshot compiled to.
#[derive(Debug)]
pub struct Outcome {
    pub compiled: Compiled,
    pub origin: String,
    /// Counts of what is in force.
    pub policies: usize,
    pub host_endpoints: usize,
    pub network_sets: usize,
    /// Every HostEndpoint of the source.
    pub endpoints: Vec<EndpointName>,
    /// The last good text of every file (or key) that is invalid now: what
    /// a restarted agent needs to keep their last good versions in force.
    pub last_good_texts: BTreeMap<String, String>,
    /// Labels of each enforced interface's HostEndpoint.
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// Turns snapshots into compiled policy for one node.
pub struct Reconciler {
    pub node: String,
    pub ifaces: Vec<String>,
    /// Bundled profile used when the source holds no policy of its own.
    pub profile: Option<&'static crate::policy::profiles::Profile>,
    /// HostEndpoints for eth0 (private) and eth1 (public) of this node,
    /// added when the source has none for them.
    pub auto_host_endpoints: bool,
    pub stats: Arc<Stats>,
    /// The agent's own control plane (its datastore's endpoints): always
    /// reachable, as outbound failsafes, whatever the policy says.
    pub control_plane: Vec<std::net::SocketAddr>,
    /// The last snapshot as merged (before the profile and automatic
    /// host endpoints are added).
    last_good: Option<PolicySet>,
    /// The last text of each file (or key) that parsed without error.
    good_texts: BTreeMap<String, String>,
}

impl Reconciler {
    pub fn new(
        node: String,
        ifaces: Vec<String>,
        profile: Option<&'static crate::policy::profiles::Profile>,
        auto_host_endpoints: bool,
        stats: Arc<Stats>,
    ) -> Self {
        Reconciler {
            node,
            ifaces,
            profile,
            auto_host_endpoints,
            stats,
            control_plane: Vec::new(),
            last_good: None,
            good_texts: BTreeMap::new(),
        }
    }

    /// Starts from the last good texts a previous agent saved (those of
    /// the objects invalid when it stopped), so that an object still
    /// invalid at the first sync keeps its last good version in force, as
    /// it did before the restart.
    pub fn seed(&mut self, texts: BTreeMap<String, String>) {
        if texts.is_empty() {
            return;
        }
        let loaded = policy::load_texts(
            texts
                .iter()
                .map(|(k, v)| (Path::new(k.as_str()), v.as_str())),
        );
        for e in &loaded.errors {
            warn!("saved last good version: {e}");
        }
        info!(
            "{} object(s) of {} file(s) saved at their last good version: kept in force while their new versions are invalid",
            loaded.set.policies.len() + loaded.set.host_endpoints.len() + loaded.set.network_sets.len(),
            texts.len()
        );
        self.last_good = Some(loaded.set);
        self.good_texts = texts;
    }

    /// Remembers the texts of `snapshot` that parsed without error; returns
    /// the last good texts of those that did not.
    fn remember_texts(
        &mut self,
        texts: &BTreeMap<String, String>,
        errors: &[policy::PolicyError],
    ) -> BTreeMap<String, String> {
        let bad: std::collections::BTreeSet<String> = errors
            .iter()
            .map(|e| e.file.to_string_lossy().into_owned())
            .collect();
        self.good_texts.retain(|k, _| texts.contains_key(k));
        for (k, v) in texts {
            if !bad.contains(k) {
                self.good_texts.insert(k.clone(), v.clone());
            }
        }
        self.good_texts
            .iter()
            .filter(|(k, _)| bad.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Merges `snapshot` with the last good versions, compiles it, and on
    /// success makes it the new last good set. On failure nothing changes.
    pub fn reconcile(&mut self, snapshot: Snapshot) -> anyhow::Result<Outcome> {
        let Snapshot {
            mut loaded,
            origin,
            texts,
        } = snapshot;
        self.stats.reconciles.fetch_add(1, Ordering::Relaxed);
        let kept = match &self.last_good {
            Some(previous) => policy::keep_last_good(previous, &mut loaded),
            None => Vec::new(),
        };
        for e in &loaded.errors {
            error!("rejected: {e}");
        }
        for k in &kept {
            warn!("{k}");
        }
        for w in policy::label_key_warnings(&loaded.set) {
            warn!("{w}");
        }
        let invalid = loaded.invalid_objects() as u64;
        self.stats
            .rejected_objects
            .fetch_add(invalid, Ordering::Relaxed);
        self.stats.invalid_now.store(invalid, Ordering::Relaxed);
        self.stats
            .kept_last_good
            .store(kept.len() as u64, Ordering::Relaxed);
        let listed: Vec<String> = loaded
            .errors
            .iter()
            .map(|e| {
                let held = !e.resource.is_empty()
                    && kept
                        .iter()
                        .any(|k| k.starts_with(&format!("{}:", e.resource)));
                if held {
                    format!("{e} (its last good version stays in force)")
                } else {
                    e.to_string()
                }
            })
            .collect();
        *self.stats.invalid.lock().unwrap_or_else(|p| p.into_inner()) = listed;
        let mut set = loaded.set.clone();
        if let Some(p) = self.profile {
            if set.policies.is_empty() && invalid == 0 {
                info!(
                    "{origin} holds no policy of its own: using the bundled profile {} ({})",
                    p.name, p.applies_to
                );
                crate::policy::profiles::add_to(&mut set, p);
            } else if set.policies.is_empty() {
                error!(
                    "{origin}: no valid policy, and {invalid} object(s) rejected: the bundled profile {} is NOT used in their place; fix them",
                    p.name
                );
            }
        }
        if self.auto_host_endpoints {
            add_auto_host_endpoints(&mut set, &self.node);
        }
        exempt_control_plane(&mut set, &self.control_plane);
        let mut ifaces = self.ifaces.clone();
        if self.auto_host_endpoints {
            for (iface, _) in AUTO_HOST_ENDPOINTS {
                if !ifaces.iter().any(|i| i == iface) {
                    ifaces.push(iface.to_string());
                }
            }
        }
        let compiled = match compile(&set, &self.node, &ifaces) {
            Ok(c) => c,
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                error!("{origin}: cannot compile ({e}); the policy in force stays");
                return Err(e.into());
            }
        };
        info!(
            "{origin}: {} GlobalNetworkPolicies, {} HostEndpoints, {} network sets valid{}",
            set.policies.len(),
            set.host_endpoints.len(),
            set.network_sets.len(),
            if invalid > 0 {
                format!(
                    "; {invalid} invalid resource(s) NOT applied ({} kept at their last good version)",
                    kept.len()
                )
            } else {
                String::new()
            }
        );
        let labels = compiled
            .ifaces
            .values()
            .filter_map(|i| {
                let hep = set
                    .host_endpoints
                    .iter()
                    .find(|h| h.name == i.host_endpoint)?;
                Some((i.name.clone(), hep.labels.clone()))
            })
            .collect();
        let endpoints = set
            .host_endpoints
            .iter()
            .map(|h| EndpointName {
                name: h.name.clone(),
                node: h.node.clone(),
                interface: h.interface_name.clone(),
            })
            .collect();
        let last_good_texts = self.remember_texts(&texts, &loaded.errors);
        let outcome = Outcome {
            last_good_texts,
            endpoints,
            labels,
            compiled,
            origin,
            policies: set.policies.len(),
            host_endpoints: set.host_endpoints.len(),
            network_sets: set.network_sets.len(),
        };
        self.last_good = Some(loaded.set);
        Ok(outcome)
    }
}

/// Adds TCP to each of `endpoints` to the outbound failsafes (the global
/// ones, Calico's defaults when none are configured, and every
/// FailsafeProfile's), so no policy can cut the agent off from the updates
/// that would fix it. Replies pass as the tracked flow's.
pub fn exempt_control_plane(set: &mut PolicySet, endpoints: &[std::net::SocketAddr]) {
    if endpoints.is_empty() {
        return;
    }
    let ports: Vec<policy::FailsafePort> = endpoints
        .iter()
        .map(|a| policy::FailsafePort {
            protocol: 6,
            port: a.port(),
            net: Some(ipnet::IpNet::from(a.ip())),
        })
        .collect();
    let mut global = set
        .failsafes
        .clone()
        .unwrap_or_else(policy::Failsafes::calico_defaults);
    global.outbound.extend(ports.iter().cloned());
    set.failsafes = Some(global);
    for p in &mut set.failsafe_profiles {
        p.failsafes.outbound.extend(ports.iter().cloned());
    }
}

/// The addresses of `urls` (`http(s)://host[:port]`, port 2379 when
/// absent), resolved now.
pub fn resolve_endpoints(urls: &[String]) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let mut out = Vec::new();
    for url in urls {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let hostport = rest.split('/').next().unwrap_or_default();
        let with_port = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !hostport.ends_with(']')
        {
            hostport.to_string()
        } else {
            format!("{hostport}:2379")
        };
        match with_port.to_socket_addrs() {
            Ok(addrs) => out.extend(addrs),
            Err(e) => warn!("cannot resolve {url} ({e}): it is not exempted from policy"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Interfaces and the `ibm.role` label of the HostEndpoints created for
/// them when asked (as IKS creates them).
pub const AUTO_HOST_ENDPOINTS: [(&str, &str); 2] =
    [("eth0", "worker_private"), ("eth1", "worker_public")];

/// Adds a HostEndpoint for each of `AUTO_HOST_ENDPOINTS` that no
/// HostEndpoint of `node` names yet.
pub fn add_auto_host_endpoints(set: &mut PolicySet, node: &str) {
    for (iface, role) in AUTO_HOST_ENDPOINTS {
        if set
            .host_endpoints
            .iter()
            .any(|h| h.node == node && h.interface_name == iface)
        {
            continue;
        }
        let yaml = format!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: {node}-{iface}-auto\n  labels: {{ibm.role: {role}}}\nspec:\n  node: {node}\n  interfaceName: {iface}\n"
        );
        let loaded = policy::load_str(Path::new("<automatic host endpoints>"), &yaml);
        if let Some(e) = loaded.errors.first() {
            warn!("cannot create the automatic HostEndpoint for {iface}: {e}");
            continue;
        }
        set.host_endpoints.extend(loaded.set.host_endpoints);
    }
    set.sort();
}

/// Runs `reconciler` on every snapshot from `snapshots` (coalescing those
/// that queue up) on a blocking thread; results come out of the returned
/// channel (a snapshot that does not compile as an error, the policy in
/// force staying). Ends when the sender side is dropped.
/// Resolves the control plane's addresses again (etcd endpoints, the API
/// server), for `spawn` to follow names that move.
pub struct ControlPlaneResolver {
    pub resolve: Box<dyn Fn() -> Vec<std::net::SocketAddr> + Send + Sync>,
    /// How often (the first time one period after the start).
    pub every: std::time::Duration,
}

/// How often the control plane's names are resolved again.
pub const RERESOLVE: std::time::Duration = std::time::Duration::from_secs(30);

pub fn spawn(
    mut reconciler: Reconciler,
    mut snapshots: mpsc::Receiver<Snapshot>,
    resolver: Option<ControlPlaneResolver>,
) -> mpsc::Receiver<Result<Outcome, String>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let resolver = resolver.map(Arc::new);
        let period = resolver
            .as_ref()
            .map_or(std::time::Duration::from_secs(3600), |r| r.every);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // The last snapshot, compiled again when the control plane moves.
        let mut last: Option<Snapshot> = None;
        loop {
            let snapshot = tokio::select! {
                s = snapshots.recv() => {
                    let Some(mut snapshot) = s else { return };
                    while let Ok(newer) = snapshots.try_recv() {
                        snapshot = newer;
                    }
                    last = Some(snapshot.clone());
                    snapshot
                }
                _ = tick.tick(), if resolver.is_some() => {
                    let Some(r) = resolver.clone() else { continue };
                    let Ok(now) = tokio::task::spawn_blocking(move || (r.resolve)()).await else {
                        continue;
                    };
                    // A failed resolution keeps the addresses exempted now.
                    if now.is_empty() || now == reconciler.control_plane {
                        continue;
                    }
                    let show = |v: &[std::net::SocketAddr]| {
                        v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
                    };
                    info!(
                        "the control plane moved: outbound TCP to {} is failsafe now (was {})",
                        show(&now),
                        show(&reconciler.control_plane)
                    );
                    reconciler.control_plane = now;
                    match &last {
                        Some(s) => s.clone(),
                        None => continue,
                    }
                }
            };
            let done = tokio::task::spawn_blocking(move || {
                let result = reconciler.reconcile(snapshot);
                (reconciler, result)
            })
            .await;
            let (back, result) = match done {
                Ok(r) => r,
                Err(e) => {
                    error!("the reconcile thread failed: {e}");
                    return;
                }
            };
            reconciler = back;
            if tx.send(result.map_err(|e| format!("{e:#}"))).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_plane_is_an_outbound_failsafe() {
        let urls = [
            "https://127.0.0.1:2381".to_string(),
            "http://[::1]".to_string(),
        ];
        let endpoints = resolve_endpoints(&urls);
        assert_eq!(
            endpoints,
            [
                "127.0.0.1:2381".parse().unwrap(),
                "[::1]:2379".parse().unwrap()
            ]
        );
        let mut set = PolicySet::default();
        exempt_control_plane(&mut set, &endpoints);
        let outbound = &set.failsafes.as_ref().expect("set").outbound;
        // Calico's defaults kept, the endpoints added with their address.
        assert!(outbound.iter().any(|p| p.port == 53));
        let added: Vec<String> = outbound
            .iter()
            .filter_map(|p| Some(format!("{}:{}", p.net?, p.port)))
            .collect();
        assert_eq!(added, ["127.0.0.1/32:2381", "::1/128:2379"]);
    }

    /// Whether the eth1 egress failsafe table exempts TCP to `addr`.
    fn exempts(outcome: &Outcome, addr: std::net::SocketAddr) -> bool {
        let std::net::IpAddr::V4(v4) = addr.ip() else {
            panic!("IPv4 only here");
        };
        let net = v4.to_ipv6_mapped().octets();
        outcome.compiled.ifaces["eth1"]
            .table(moat_common::direction::EGRESS, moat_common::table::FAILSAFE)
            .rules
            .iter()
            .any(|r| {
                r.dst_net == net && r.dst_port_lo == addr.port() && r.dst_port_hi == addr.port()
            })
    }

    fn texts_snapshot(texts: &[(&str, &str)]) -> Snapshot {
        let texts: BTreeMap<String, String> = texts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Snapshot {
            loaded: policy::load_texts(
                texts
                    .iter()
                    .map(|(k, v)| (Path::new(k.as_str()), v.as_str())),
            ),
            origin: "test".into(),
            texts: Arc::new(texts),
        }
    }

    const HEP: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w1-eth1, labels: {ibm.role: worker_public}}\nspec: {node: worker-1, interfaceName: eth1}\n";
    const GOOD: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: web}\nspec:\n  selector: ibm.role == 'worker_public'\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [8080]}}]\n";

    #[test]
    fn rejected_objects_are_not_replaced_by_the_bundled_profile() {
        let profile = crate::policy::profiles::find("iks-2019").expect("profile");
        let mut r = Reconciler::new(
            "worker-1".into(),
            vec!["eth1".into()],
            Some(profile),
            false,
            Arc::new(Stats::default()),
        );
        // No policy at all: the profile.
        let o = r
            .reconcile(texts_snapshot(&[("hep.yaml", HEP)]))
            .expect("compiles");
        assert!(!o.compiled.policy_names.is_empty(), "the profile is used");
        // Only a rejected one: not the profile in its place.
        let mut r = Reconciler::new(
            "worker-1".into(),
            vec!["eth1".into()],
            Some(profile),
            false,
            Arc::new(Stats::default()),
        );
        let bad = GOOD.replace("[8080]", "[70000]");
        let o = r
            .reconcile(texts_snapshot(&[("hep.yaml", HEP), ("web.yaml", &bad)]))
            .expect("compiles");
        assert!(
            o.compiled.policy_names.is_empty(),
            "{:?}",
            o.compiled.policy_names
        );
    }

    #[test]
    fn last_good_texts_seed_a_restarted_reconciler() {
        let stats = Arc::new(Stats::default());
        let mut r = Reconciler::new(
            "worker-1".into(),
            vec!["eth1".into()],
            None,
            false,
            stats.clone(),
        );
        r.reconcile(texts_snapshot(&[("hep.yaml", HEP), ("web.yaml", GOOD)]))
            .expect("compiles");
        let bad = GOOD.replace("[8080]", "[70000]");
        let o = r
            .reconcile(texts_snapshot(&[("hep.yaml", HEP), ("web.yaml", &bad)]))
            .expect("compiles");
        assert_eq!(o.last_good_texts.len(), 1);
        assert_eq!(o.last_good_texts["web.yaml"], GOOD);
        let before = o.compiled;
        // A new reconciler, seeded: the same invalid edit keeps web.
        let mut again = Reconciler::new(
            "worker-1".into(),
            vec!["eth1".into()],
            None,
            false,
            stats.clone(),
        );
        again.seed(o.last_good_texts);
        let o = again
            .reconcile(texts_snapshot(&[("hep.yaml", HEP), ("web.yaml", &bad)]))
            .expect("compiles");
        assert_eq!(o.compiled.ifaces, before.ifaces);
        assert_eq!(o.compiled.policy_names, before.policy_names);
        assert_eq!(Stats::get(&stats.kept_last_good), 1);
        let listed = stats.invalid.lock().expect("lock").clone();
        assert!(
            listed[0].contains("web") && listed[0].contains("last good version"),
            "{listed:?}"
        );
        // Unseeded, it would not.
        let mut fresh = Reconciler::new(
            "worker-1".into(),
            vec!["eth1".into()],
            None,
            false,
            Arc::new(Stats::default()),
        );
        let o = fresh
            .reconcile(texts_snapshot(&[("hep.yaml", HEP), ("web.yaml", &bad)]))
            .expect("compiles");
        assert!(o.compiled.policy_names.is_empty());
    }

    #[tokio::test]
    async fn a_control_plane_that_moves_is_exempted_where_it_is() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/public");
        let snapshot = crate::sources::directory::snapshot(&dir).expect("the public fixture");
        let mut reconciler = Reconciler::new(
            "worker-1".into(),
            vec!["eth1".into()],
            None,
            false,
            Arc::new(Stats::default()),
        );
        let (old, new): (std::net::SocketAddr, std::net::SocketAddr) = (
            "198.51.100.7:2379".parse().unwrap(),
            "198.51.100.9:2379".parse().unwrap(),
        );
        reconciler.control_plane = vec![old];
        // The name resolves to `old` twice (no change, no recompile), then
        // fails once (kept), then moves to `new`.
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let resolver = ControlPlaneResolver {
            resolve: Box::new(move || match counted.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => vec![old],
                2 => Vec::new(),
                _ => vec![new],
            }),
            every: std::time::Duration::from_millis(30),
        };
        let (tx, rx) = mpsc::channel(4);
        let mut outcomes = spawn(reconciler, rx, Some(resolver));
        tx.send(snapshot).await.expect("send");
        let first = outcomes.recv().await.expect("outcome").expect("compiled");
        assert!(exempts(&first, old) && !exempts(&first, new));
        let moved = tokio::time::timeout(std::time::Duration::from_secs(5), outcomes.recv())
            .await
            .expect("a recompile once the name moves")
            .expect("outcome")
            .expect("compiled");
        assert!(
            calls.load(Ordering::SeqCst) >= 4,
            "recompiled only after the move"
        );
        assert!(exempts(&moved, new) && !exempts(&moved, old));
        assert_eq!(
            moved.origin, first.origin,
            "the same snapshot, compiled again"
        );
    }
}
