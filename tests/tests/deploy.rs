//! The deployment manifests, checked statically (no cluster runs here):
//! every document parses into its Kubernetes type (k8s-openapi) with no
//! field left over, the RBAC rules grant read access to exactly what the
//! Kubernetes source watches (`moat::sources::watched`) and nothing more, and the
//! DaemonSet runs with the privileges, volumes and probes the agent needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, PodSpec, Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Manifests {
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    namespaces: Vec<Namespace>,
}

/// Parses `value` as `T`, and checks that serialising it back gives the
/// same document: a misspelt or misplaced field would be dropped by the
/// parse and show up as a difference.
fn typed<T: DeserializeOwned + serde::Serialize>(value: &serde_json::Value, what: &str) -> T {
    let t: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&t).expect("serialises");
    assert_eq!(
        &back, value,
        "{what}: fields were dropped or changed by the typed parse (a typo?)"
    );
    t
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // kustomize's list of these files, not a Kubernetes object (docs.rs checks it).
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value: serde_json::Value =
                serde::Deserialize::deserialize(doc).expect("YAML document");
            if value.is_null() {
                continue;
            }
            let what = format!("{} document {}", file.display(), i + 1);
            match value["kind"].as_str().unwrap_or_default() {
                "DaemonSet" => m.daemonsets.push(typed(&value, &what)),
                "ServiceAccount" => m.service_accounts.push(typed(&value, &what)),
                "ClusterRole" => m.cluster_roles.push(typed(&value, &what)),
                "ClusterRoleBinding" => m.bindings.push(typed(&value, &what)),
                "ConfigMap" => m.config_maps.push(typed(&value, &what)),
                "Secret" => m.secrets.push(typed(&value, &what)),
                "Namespace" => m.namespaces.push(typed(&value, &what)),
                other => panic!("{what}: unexpected kind {other:?}"),
            }
        }
    }
    m
}

#[test]
fn rbac_grants_exactly_what_the_kubernetes_source_watches() {
    let m = load();
    assert_eq!(m.cluster_roles.len(), 1);
    let role = &m.cluster_roles[0];
    // (group, resource) -> verbs, over every rule.
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for g in rule.api_groups.as_deref().unwrap_or_default() {
            for r in rule.resources.as_deref().unwrap_or_default() {
                assert!(
                    g != "*" && r != "*" && !r.contains('/'),
                    "no wildcards or subresources: {rule:?}"
                );
                for v in &rule.verbs {
                    assert_ne!(v, "*", "{rule:?}");
                    granted
                        .entry((g.clone(), r.clone()))
                        .or_default()
                        .insert(v.clone());
                }
            }
        }
    }
    let mut wanted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for w in moat::sources::watched::WATCHED {
        wanted
            .entry((w.group.into(), w.resource.into()))
            .or_default()
            .extend(moat::sources::watched::READ_VERBS.map(String::from));
    }
    for (g, r) in moat::sources::watched::EVENTS {
        wanted
            .entry((g.into(), r.into()))
            .or_default()
            .extend(moat::sources::watched::EVENT_VERBS.map(String::from));
    }
    assert_eq!(
        granted, wanted,
        "the ClusterRole must grant exactly what is watched"
    );

    // Bound to the agent's service account, which the DaemonSet runs as.
    let sa = &m.service_accounts[0];
    let binding = &m.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let pod = m.daemonsets[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod spec");
    assert_eq!(pod.service_account_name, sa.metadata.name);
}

#[test]
fn the_daemonset_has_what_the_agent_needs_and_no_more() {
    let m = load();
    assert_eq!(m.daemonsets.len(), 1);
    let ds = &m.daemonsets[0];
    let ns = m.namespaces[0].metadata.name.clone();
    for namespaced in [
        &ds.metadata.namespace,
        &m.service_accounts[0].metadata.namespace,
        &m.config_maps[0].metadata.namespace,
        &m.secrets[0].metadata.namespace,
    ] {
        assert_eq!(namespaced, &ns);
    }
    let spec = &ds.spec;
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    // Every worker: a toleration of every taint.
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "{tolerations:?}"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    least_privilege(c);
    probes_and_resources(c);
    let (paths, mounts) = host_paths_mounted(pod, c);
    node_name_from_the_downward_api(c);
    config_on_the_volumes(&m, pod, c, &paths, &mounts);
}

/// No privilege beyond the three capabilities the agent needs.
fn least_privilege(c: &Container) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    // No SYS_RESOURCE: BPF memory is charged to the memory cgroup since
    // Linux 5.11, not to RLIMIT_MEMLOCK.
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
}

/// Probes on the agent's HTTP endpoint; requests and a memory limit.
fn probes_and_resources(c: &Container) {
    // Default 127.0.0.1:9464.
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9464)
        );
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    }
    let res = c.resources.as_ref().expect("resources");
    assert!(res
        .requests
        .as_ref()
        .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));
    assert!(res
        .limits
        .as_ref()
        .is_some_and(|l| l.contains_key("memory")));
}

/// hostPath volumes (bpffs, the saved state, the status/events dir), each
/// mounted where it is on the host: the host paths and every mount.
fn host_paths_mounted<'a>(
    pod: &'a PodSpec,
    c: &'a Container,
) -> (BTreeSet<&'a str>, BTreeMap<&'a str, &'a str>) {
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let host_paths: BTreeMap<&str, &str> = volumes
        .iter()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let paths: BTreeSet<&str> = host_paths.values().copied().collect();
    assert_eq!(
        paths,
        BTreeSet::from(["/sys/fs/bpf", "/var/lib/moat", "/run/moat"])
    );
    let mounts: BTreeMap<&str, &str> = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    for (name, host) in &host_paths {
        assert_eq!(
            mounts.get(name),
            Some(host),
            "{name} mounted where it is on the host"
        );
    }
    (paths, mounts)
}

/// The node's name from the downward API.
fn node_name_from_the_downward_api(c: &Container) {
    let env = c.env.as_deref().unwrap_or_default();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
}

/// The config the agent reads: valid for the agent's own schema, in audit
/// mode for the first rollout, its paths on the mounted volumes; the
/// calicoctl.cfg it names parses and its certificates are in the Secret's
/// mount.
fn config_on_the_volumes(
    m: &Manifests,
    pod: &PodSpec,
    c: &Container,
    paths: &BTreeSet<&str>,
    mounts: &BTreeMap<&str, &str>,
) {
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let args = c.args.as_deref().unwrap_or_default();
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .expect("--config");
    let cm = &m.config_maps[0];
    let data = cm.data.as_ref().expect("data");
    let dir_of = |p: &str| {
        Path::new(p)
            .parent()
            .expect("dir")
            .to_str()
            .expect("utf-8")
            .to_string()
    };
    let conf_mount = volumes
        .iter()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| Some(&c.name) == cm.metadata.name.as_ref())
        })
        .map(|v| mounts[v.name.as_str()])
        .expect("the ConfigMap is mounted");
    assert_eq!(dir_of(&config_path), conf_mount);
    let file_name = Path::new(&config_path)
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf-8");
    let config: moat::cli::config::Config =
        serde_yaml_ng::from_str(&data[file_name]).expect("the agent accepts its ConfigMap");
    assert_eq!(config.audit, Some(true), "the rollout starts in audit mode");
    for path in [&config.state_file, &config.status_file] {
        let dir = dir_of(path.as_ref().expect("set").to_str().expect("utf-8"));
        assert!(paths.contains(dir.as_str()), "{dir} is a hostPath volume");
    }
    // The calicoctl.cfg it names parses, and its certificates are in the
    // Secret's mount.
    let calicoctl = config.calicoctl_config.expect("calicoctlConfig");
    assert_eq!(dir_of(calicoctl.to_str().expect("utf-8")), conf_mount);
    let name = calicoctl
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf-8");
    let parsed = moat::sources::calicoctl::parse(&data[name]).expect("calicoctl.cfg");
    let moat::sources::calicoctl::Datastore::Etcd(etcd) = parsed.datastore else {
        panic!("etcdv3 datastore expected")
    };
    // etcd mode: no Kubernetes API token in the pod.
    assert_eq!(pod.automount_service_account_token, Some(false));
    let secret = &m.secrets[0];
    let certs_mount = volumes
        .iter()
        .find(|v| {
            v.secret
                .as_ref()
                .is_some_and(|s| s.secret_name == secret.metadata.name)
        })
        .map(|v| mounts[v.name.as_str()])
        .expect("the Secret is mounted");
    for f in [&etcd.ca_cert_file, &etcd.cert_file, &etcd.key_file] {
        let f = f.as_ref().expect("certificate file");
        assert_eq!(dir_of(f.to_str().expect("utf-8")), certs_mount);
    }
}

#[test]
fn the_dockerfile_ships_the_binary_the_daemonset_runs() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("Dockerfile");
    let copy = text
        .lines()
        .find(|l| l.starts_with("COPY "))
        .expect("COPY of the binary");
    let parts: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(parts[1], "target/release/moat");
    let entry = text
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    assert!(
        entry.contains(parts[2]),
        "{entry} runs what {copy} installs"
    );
    let m = load();
    let c = &m.daemonsets[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers[0];
    assert_eq!(c.args.as_ref().expect("args")[0], "agent");
    assert!(c.command.is_none(), "the image's ENTRYPOINT runs");
}
