//! The Kubernetes API source (`datastoreType: kubernetes`): one kube-rs
//! watcher per resource in `WATCHED` (list, then watch from the listed
//! resourceVersion; bookmarks, a 410 Gone re-list and reconnects are the
//! watcher's), a store per resource, and after every change (debounced)
//! one snapshot of everything held, read by `policy::load_texts` as the
//! other sources' objects are. The first snapshot waits for every
//! resource's first complete list. A re-list or reconnect that brings
//! nothing new sends nothing, so it applies nothing. An object that
//! fails validation gets a Kubernetes Event (events.k8s.io/v1, type
//! Warning, reason `InvalidPolicy`) once per version found invalid.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use futures_util::{stream::SelectAll, StreamExt as _};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        utils::Backoff,
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Client, Resource as _, ResourceExt as _,
};
use serde_json::{json, Value};
use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use crate::{
    policy,
    sources::{
        reconcile::Snapshot,
        watched::{Watched, WATCHED},
    },
};

/// Quiet time after a change before a snapshot is sent.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a stream of changes may delay a snapshot.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// The client configuration: from `kubeconfig` when given, else inferred
/// (`KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
pub async fn load_config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes client configuration: give spec.kubeconfig in the calicoctl.cfg, set KUBECONFIG, or run in the cluster (service account)",
        ),
    }
}

/// The API server's addresses (`cluster_url`, port 443 for https and 80
/// for http when absent), resolved now: the agent's control plane.
pub fn control_plane(cfg: &kube::Config) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let url = &cfg.cluster_url;
    let Some(host) = url.host() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    match (host, port).to_socket_addrs() {
        Ok(addrs) => {
            let mut v: Vec<SocketAddr> = addrs.collect();
            v.sort();
            v.dedup();
            v
        }
        Err(e) => {
            warn!("cannot resolve {url} ({e}): it is not exempted from policy");
            Vec::new()
        }
    }
}

/// How `w` is addressed through the dynamic API.
pub fn api_resource(w: &Watched) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(w.group, w.version, w.kind),
        w.resource,
    )
}

/// The store key of `obj`: `<group>/<resource>/<namespace>/<name>`.
pub fn key(w: &Watched, obj: &DynamicObject) -> String {
    let group = if w.group.is_empty() { "core" } else { w.group };
    match obj.namespace() {
        Some(ns) => format!("{group}/{}/{ns}/{}", w.resource, obj.name_any()),
        None => format!("{group}/{}/{}", w.resource, obj.name_any()),
    }
}

/// `obj` as the JSON text policy.rs reads: apiVersion and kind (list
/// items may lack them), the metadata policy reads (name, namespace,
/// labels), the spec and every other top-level field as the API server
/// has them, and of the status only what policy reads for Pods (their
/// addresses) and Nodes (theirs). Leaving out resourceVersion, managed
/// fields and the rest of the status keeps an update that changes no
/// policy input (a Node heartbeat, a Pod's conditions) from making a
/// snapshot that differs.
pub fn text(w: &Watched, obj: &DynamicObject) -> String {
    let api_version = if w.group.is_empty() {
        w.version.to_string()
    } else {
        format!("{}/{}", w.group, w.version)
    };
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), json!(obj.name_any()));
    if let Some(ns) = obj.namespace() {
        metadata.insert("namespace".into(), json!(ns));
    }
    if !obj.labels().is_empty() {
        metadata.insert("labels".into(), json!(obj.labels()));
    }
    let mut out = serde_json::Map::new();
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!(w.kind));
    out.insert("metadata".into(), Value::Object(metadata));
    if let Value::Object(data) = &obj.data {
        for (k, v) in data {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if k == "status" {
                let keep: &[&str] = match (w.group, w.kind) {
                    ("", "Pod") => &["podIP", "podIPs"],
                    ("", "Node") => &["addresses"],
                    ("", "Service") => &["loadBalancer"],
                    _ => &[],
                };
                let status: serde_json::Map<String, Value> = keep
                    .iter()
                    .filter_map(|f| Some((f.to_string(), v.get(*f)?.clone())))
                    .collect();
                if !status.is_empty() {
                    out.insert("status".into(), Value::Object(status));
                }
                continue;
            }
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out).to_string()
}

/// A snapshot of `objects` (store key -> JSON text).
pub fn snapshot(objects: &BTreeMap<String, String>, server: &str) -> Snapshot {
    let loaded = policy::load_texts(
        objects
            .iter()
            .map(|(k, v)| (Path::new(k.as_str()), v.as_str())),
    );
    Snapshot {
        texts: std::sync::Arc::new(objects.clone()),
        loaded,
        origin: format!("Kubernetes API {server} ({} objects)", objects.len()),
    }
}

/// What one resource's watcher holds.
#[derive(Default)]
struct Store {
    objects: BTreeMap<String, String>,
    /// Filled during a (re-)list; replaces `objects` when it completes.
    listing: Option<BTreeMap<String, String>>,
    /// Whether a list has completed once.
    synced: bool,
}

/// Retry delays after a watch error: 250 ms doubling to 5 s, back to
/// 250 ms after a success.
struct Retry(Duration);

impl Retry {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        Some(now)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// Starts the source on the runtime; it runs until `out` is closed.
/// `node` names the reporting instance of the Events it records.
pub fn spawn(cfg: kube::Config, node: &str, out: mpsc::Sender<Snapshot>) -> anyhow::Result<()> {
    let server = cfg.cluster_url.to_string();
    let client = Client::try_from(cfg).context("building the Kubernetes client")?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.into(),
            instance: Some(format!("{REPORTER}-{node}")),
        },
    );
    tokio::spawn(run(client, recorder, server, out));
    Ok(())
}

/// The reporting controller of the Events the agent records.
pub const REPORTER: &str = "moat-agent";

/// Records a Warning Event on each object of `snapshot` that is invalid
/// and was not reported in this form before (`reported` holds what the
/// previous snapshot found invalid: an object fixed and broken again is
/// reported again). Publishing runs in the background: an API server
/// that refuses (RBAC) is logged, and the source goes on.
fn report_invalid(
    recorder: &Recorder,
    snapshot: &Snapshot,
    refs: &BTreeMap<String, ObjectReference>,
    reported: &mut BTreeSet<(String, String)>,
) {
    let mut now = BTreeSet::new();
    for e in &snapshot.loaded.errors {
        let key = e.file.display().to_string();
        let note = if e.field.is_empty() {
            e.message.clone()
        } else {
            format!("{}: {}", e.field, e.message)
        };
        let entry = (key.clone(), note.clone());
        now.insert(entry.clone());
        if reported.contains(&entry) {
            continue;
        }
        let Some(reference) = refs.get(&key).cloned() else {
            continue;
        };
        let recorder = recorder.clone();
        // Notes are at most 1 kB.
        let mut note = format!("{note}; the last good version, if any, stays in force");
        if note.len() > 1024 {
            let mut cut = 1021;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        tokio::spawn(async move {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "InvalidPolicy".into(),
                note: Some(note),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!("recording a Kubernetes Event on {key}: {e}");
            }
        });
    }
    *reported = now;
}

type Watch =
    futures_util::stream::BoxStream<'static, (usize, Result<Event<DynamicObject>, watcher::Error>)>;

async fn run(client: Client, recorder: Recorder, server: String, out: mpsc::Sender<Snapshot>) {
    let mut streams: SelectAll<Watch> = SelectAll::new();
    for (i, w) in WATCHED.iter().enumerate() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(w));
        streams.push(
            watcher::watcher(api, watcher::Config::default())
                .backoff(Retry(Retry::FIRST))
                .map(move |e| (i, e))
                .boxed(),
        );
    }
    let mut stores: Vec<Store> = WATCHED.iter().map(|_| Store::default()).collect();
    // Store key -> the object, for Events about it.
    let mut refs: BTreeMap<String, ObjectReference> = BTreeMap::new();
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    let mut sent: Option<BTreeMap<String, String>> = None;
    // (first change, last change) since the last snapshot.
    let mut pending: Option<(Instant, Instant)> = None;
    let mut all_synced = false;
    info!(
        "Kubernetes API {server}: listing and watching {} resource types",
        WATCHED.len()
    );
    loop {
        let due = pending.map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DELAY));
        let next = tokio::select! {
            next = streams.next() => next,
            () = async {
                match due {
                    Some(d) if all_synced => tokio::time::sleep_until(d).await,
                    _ => std::future::pending().await,
                }
            } => {
                pending = None;
                let objects: BTreeMap<String, String> = stores
                    .iter()
                    .flat_map(|s| s.objects.iter().map(|(k, v)| (k.clone(), v.clone())))
                    .collect();
                if sent.as_ref() != Some(&objects) {
                    let s = snapshot(&objects, &server);
                    report_invalid(&recorder, &s, &refs, &mut reported);
                    if out.send(s).await.is_err() {
                        return;
                    }
                    sent = Some(objects);
                }
                continue;
            }
            () = out.closed() => return,
        };
        let Some((i, event)) = next else {
            warn!("Kubernetes API {server}: every watch ended; the policy in force stays");
            return;
        };
        let w = &WATCHED[i];
        let store = &mut stores[i];
        let changed = match event {
            Ok(Event::Init) => {
                store.listing = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(obj)) => {
                refs.insert(key(w, &obj), obj.object_ref(&api_resource(w)));
                store
                    .listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(w, &obj), text(w, &obj));
                false
            }
            Ok(Event::InitDone) => {
                let listed = store.listing.take().unwrap_or_default();
                info!(
                    "Kubernetes API {server}: listed {} {}.{}",
                    listed.len(),
                    w.resource,
                    if w.group.is_empty() { "core" } else { w.group }
                );
                store.objects = listed;
                store.synced = true;
                true
            }
            Ok(Event::Apply(obj)) => {
                let (k, t) = (key(w, &obj), text(w, &obj));
                refs.insert(k.clone(), obj.object_ref(&api_resource(w)));
                store.objects.insert(k, t.clone()) != Some(t)
            }
            Ok(Event::Delete(obj)) => {
                refs.remove(&key(w, &obj));
                store.objects.remove(&key(w, &obj)).is_some()
            }
            Err(e) => {
                warn!(
                    "Kubernetes API {server}: {}.{}: {e}; the policy in force stays; the watch resumes (a 410 Gone re-lists)",
                    w.resource,
                    if w.group.is_empty() { "core" } else { w.group }
                );
                false
            }
        };
        if !all_synced && stores.iter().all(|s| s.synced) {
            all_synced = true;
            let n: usize = stores.iter().map(|s| s.objects.len()).sum();
            info!("Kubernetes API {server}: first complete sync ({n} objects); watching");
        }
        if changed {
            let now = Instant::now();
            pending = Some(pending.map_or((now, now), |(first, _)| (first, now)));
        }
    }
}

/// The kubeconfig named in a calicoctl.cfg, for status.
pub fn describe(kubeconfig: Option<&Path>) -> String {
    match kubeconfig {
        Some(p) => format!("kubeconfig {}", p.display()),
        None => "inferred (KUBECONFIG, ~/.kube/config or in-cluster)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("object")
    }

    #[test]
    fn objects_become_the_text_policy_reads() {
        let gnp = WATCHED
            .iter()
            .find(|w| w.kind == "GlobalNetworkPolicy")
            .expect("watched");
        // A list item: no apiVersion or kind, server-side metadata.
        let o = obj(json!({
            "metadata": {"name": "allow-web", "resourceVersion": "17", "uid": "u",
                          "managedFields": [{"manager": "kubectl"}]},
            "spec": {"selector": "ibm.role == 'worker_public'", "ingress": [{"action": "Allow"}]}
        }));
        assert_eq!(
            key(gnp, &o),
            "crd.projectcalico.org/globalnetworkpolicies/allow-web"
        );
        let t = text(gnp, &o);
        let v: Value = serde_json::from_str(&t).expect("JSON");
        assert_eq!(v["apiVersion"], "crd.projectcalico.org/v1");
        assert_eq!(v["kind"], "GlobalNetworkPolicy");
        assert_eq!(v["metadata"], json!({"name": "allow-web"}));
        let mut objects = BTreeMap::new();
        objects.insert(key(gnp, &o), t);
        let s = snapshot(&objects, "https://k");
        assert!(s.loaded.errors.is_empty(), "{:?}", s.loaded.errors);
        assert_eq!(s.loaded.set.policies.len(), 1);

        // A Node: a heartbeat (conditions, resourceVersion) changes
        // nothing policy reads, so the text stays the same.
        let node = WATCHED.iter().find(|w| w.kind == "Node").expect("watched");
        let n = |rv: &str, beat: &str| {
            obj(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "worker-1", "resourceVersion": rv, "labels": {"a": "b"}},
                "spec": {"podCIDR": "10.0.0.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.1.1.1"}],
                           "conditions": [{"type": "Ready", "lastHeartbeatTime": beat}]}
            }))
        };
        assert_eq!(text(node, &n("1", "t1")), text(node, &n("2", "t2")));
        let mut objects = BTreeMap::new();
        objects.insert(key(node, &n("1", "t1")), text(node, &n("1", "t1")));
        let s = snapshot(&objects, "https://k");
        assert!(s.loaded.errors.is_empty(), "{:?}", s.loaded.errors);
        assert_eq!(s.loaded.set.objects.len(), 1);
    }

    #[test]
    fn watched_resources_map_to_api_resources() {
        let r = api_resource(&WATCHED[0]);
        assert_eq!(r.api_version, "crd.projectcalico.org/v1");
        assert_eq!(r.plural, "globalnetworkpolicies");
    }

    #[test]
    fn the_api_server_is_the_control_plane() {
        let mut cfg = kube::Config::new("https://127.0.0.1:6443".parse().expect("uri"));
        assert_eq!(control_plane(&cfg), ["127.0.0.1:6443".parse().unwrap()]);
        cfg.cluster_url = "https://[::1]".parse().expect("uri");
        assert_eq!(control_plane(&cfg), ["[::1]:443".parse().unwrap()]);
    }
}
