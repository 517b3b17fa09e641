//! The Calico etcd v3 datastore source: lists the policy resources under
//! `/calico/resources/v3/projectcalico.org/` (Calico's key layout:
//! `<plural>/<name>` for cluster-wide kinds, `<plural>/<namespace>/<name>`
//! for namespaced ones; the value is the resource as JSON), then watches
//! the prefix from the listed revision. Every change (debounced) makes a
//! snapshot of everything held. A lost connection (etcd restarted,
//! network) is retried with backoff; the re-list after it is sent only if
//! it differs from what was sent last, so a reconnect applies nothing new.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    policy,
    sources::{calicoctl::EtcdConfig, reconcile::Snapshot},
};

/// Calico's v3 resources.
pub const PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
/// The kinds (as key plurals) that make up host endpoint policy.
/// FelixConfiguration is read for `default` only (its failsafe ports).
pub const PLURALS: [&str; 8] = [
    "tiers",
    "profiles",
    "globalnetworkpolicies",
    "networkpolicies",
    "hostendpoints",
    "globalnetworksets",
    "networksets",
    "felixconfigurations",
];
/// Quiet time after a change before a snapshot is sent.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Whether the value under `key` is one the policy is made of.
pub fn wanted(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(PREFIX) else {
        return false;
    };
    let Some((plural, name)) = rest.split_once('/') else {
        return false;
    };
    match plural {
        "felixconfigurations" => name == "default",
        p => PLURALS.contains(&p),
    }
}

/// A snapshot of `objects` (key -> JSON).
pub fn snapshot(objects: &BTreeMap<String, String>, endpoints: &str, revision: i64) -> Snapshot {
    let loaded = policy::load_texts(
        objects
            .iter()
            .map(|(k, v)| (Path::new(k.as_str()), v.as_str())),
    );
    Snapshot {
        texts: std::sync::Arc::new(objects.clone()),
        loaded,
        origin: format!(
            "etcd {endpoints} (revision {revision}, {} objects)",
            objects.len()
        ),
    }
}

async fn connect(cfg: &EtcdConfig) -> anyhow::Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        opts = opts.with_user(u.clone(), p.clone());
    }
    if cfg.ca_cert_file.is_some() || cfg.cert_file.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca_cert_file {
            let pem =
                std::fs::read(ca).with_context(|| format!("etcdCACertFile {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
            let c =
                std::fs::read(cert).with_context(|| format!("etcdCertFile {}", cert.display()))?;
            let k = std::fs::read(key).with_context(|| format!("etcdKeyFile {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(c, k));
        }
        opts = opts.with_tls(tls);
    }
    Client::connect(&cfg.endpoints, Some(opts))
        .await
        .context("connecting")
}

/// Starts the source on the runtime; it runs until `out` is closed.
pub fn spawn(cfg: EtcdConfig, out: mpsc::Sender<Snapshot>) {
    tokio::spawn(async move {
        let endpoints = cfg.endpoints.join(",");
        let mut objects: BTreeMap<String, String> = BTreeMap::new();
        let mut sent: Option<BTreeMap<String, String>> = None;
        let mut backoff = Duration::from_millis(250);
        loop {
            match session(&cfg, &endpoints, &mut objects, &mut sent, &out).await {
                Ok(()) => return,
                Err(e) => {
                    if out.is_closed() {
                        return;
                    }
                    warn!(
                        "etcd {endpoints}: {e:#}; the policy in force stays; retrying in {} ms",
                        backoff.as_millis()
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
}

/// One connection: list, send, watch until it fails. Ok when `out` is
/// closed (the agent is stopping).
async fn session(
    cfg: &EtcdConfig,
    endpoints: &str,
    objects: &mut BTreeMap<String, String>,
    sent: &mut Option<BTreeMap<String, String>>,
    out: &mpsc::Sender<Snapshot>,
) -> anyhow::Result<()> {
    let mut client = connect(cfg).await?;
    let listed = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .context("listing")?;
    let revision = listed.header().map(|h| h.revision()).unwrap_or(0);
    objects.clear();
    for kv in listed.kvs() {
        let key = kv.key_str().context("a key that is not UTF-8")?;
        if wanted(key) {
            objects.insert(key.to_string(), kv.value_str().unwrap_or("").to_string());
        }
    }
    info!(
        "etcd {endpoints}: listed {} policy objects at revision {revision}; watching from there",
        objects.len()
    );
    if sent.as_ref() != Some(objects) {
        if out
            .send(snapshot(objects, endpoints, revision))
            .await
            .is_err()
        {
            return Ok(());
        }
        *sent = Some(objects.clone());
    }
    let mut stream = client
        .watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .context("watching")?;
    let mut last = revision;
    loop {
        let first = stream.message().await.context("watch")?;
        let mut pending = vec![first];
        // Debounce: gather what follows closely.
        while let Ok(next) = tokio::time::timeout(DEBOUNCE, stream.message()).await {
            pending.push(next.context("watch")?);
        }
        for resp in pending {
            let Some(resp) = resp else {
                anyhow::bail!("the watch ended");
            };
            if resp.canceled() {
                anyhow::bail!(
                    "the watch was cancelled ({}, compacted at {})",
                    resp.cancel_reason(),
                    resp.compact_revision()
                );
            }
            if let Some(h) = resp.header() {
                last = last.max(h.revision());
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Ok(key) = kv.key_str() else { continue };
                if !wanted(key) {
                    continue;
                }
                match ev.event_type() {
                    EventType::Put => {
                        objects.insert(key.to_string(), kv.value_str().unwrap_or("").to_string());
                    }
                    EventType::Delete => {
                        objects.remove(key);
                    }
                }
            }
        }
        if sent.as_ref() != Some(objects) {
            if out.send(snapshot(objects, endpoints, last)).await.is_err() {
                return Ok(());
            }
            *sent = Some(objects.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_calico_stores_policy_under() {
        assert!(wanted(
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/allow-ssh"
        ));
        assert!(wanted(
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/np"
        ));
        assert!(wanted(
            "/calico/resources/v3/projectcalico.org/hostendpoints/worker-1-eth1"
        ));
        assert!(wanted(
            "/calico/resources/v3/projectcalico.org/felixconfigurations/default"
        ));
        assert!(!wanted(
            "/calico/resources/v3/projectcalico.org/felixconfigurations/node.worker-1"
        ));
        assert!(!wanted(
            "/calico/resources/v3/projectcalico.org/workloadendpoints/ns/w"
        ));
        assert!(!wanted("/calico/ipam/v2/host/w/ipv4/block/10.0.0.0-26"));
        assert!(!wanted(
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies"
        ));
    }
}
