//! `moat check` as a validator: strict (typos anywhere, `metadata`
//! included, are errors with a suggestion), complete (every problem of
//! every object in one run), machine-readable (`-o json` errors as
//! objects), honest summaries (each kind counted as what it is, the
//! bundled profile named), calicoctl exports and stdin read, and questions
//! about nodes or interfaces the policy does not describe refused.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

fn moat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moat"))
}

/// A directory of its own under the target directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("check-reports-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        Dir(d)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = moat()
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("moat ends")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const TYPOS: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: worker-1-public
  lables: {ibm.role: worker_public}
spec: {node: worker-1, interfaceName: eth1}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web, Namespace: finance}
spec: {selector: all()}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: four}
spec:
  selector: all()
  ingress:
    - action: allow
      protocl: TCP
      source: {nets: [10.0.0.0/33]}
    - action: Allow
      protocol: TCP
      destination: {ports: [70000, 22]}
";

#[test]
fn every_error_of_every_object_in_one_run_as_objects() {
    let dir = Dir::new("typos");
    let file = dir.write("p.yaml", TYPOS);
    let path = file.to_str().expect("utf-8");
    let out = run(
        &[
            "check",
            "--profile",
            "none",
            "--policies",
            path,
            "-o",
            "json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "invalid resources: exit 1");
    let v = json(&out);
    let errors = v["errors"].as_array().expect("errors");
    let find = |field: &str| {
        errors
            .iter()
            .find(|e| e["field"] == field)
            .unwrap_or_else(|| panic!("no error for {field}: {v:#}"))
    };
    let lables = find("metadata.lables");
    assert_eq!(lables["kind"], "HostEndpoint");
    assert_eq!(lables["name"], "worker-1-public");
    assert_eq!(lables["suggestion"], "labels");
    assert_eq!(lables["document"], 1);
    assert_eq!(lables["file"], path);
    let ns = find("metadata.Namespace");
    assert_eq!(ns["suggestion"], "namespace");
    assert_eq!(
        (&ns["kind"], &ns["name"]),
        (&"NetworkPolicy".into(), &"web".into())
    );
    // The four problems of GlobalNetworkPolicy/four, all in this run.
    assert_eq!(find("spec.ingress[0].protocl")["suggestion"], "protocol");
    assert_eq!(find("spec.ingress[0].action")["suggestion"], "Allow");
    assert!(find("spec.ingress[0].source.nets[0]")["message"]
        .as_str()
        .is_some_and(|m| m.contains("not a CIDR")));
    let port = find("spec.ingress[1].destination.ports[0]");
    assert!(port["message"]
        .as_str()
        .is_some_and(|m| m.contains("70000")));
    assert_eq!(port["document"], 3);
    assert!(errors
        .iter()
        .all(|e| e["message"].is_string() && e.get("namespace").is_some()));
    assert_eq!(v["summary"]["errors"], errors.len());
    assert_eq!(
        v["summary"]["invalid_objects"], 3,
        "three objects, each counted once"
    );
    assert!(v["summary"]["valid"]
        .as_object()
        .is_some_and(|m| m.is_empty()));
}

const MIXED: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: worker-1-public, labels: {ibm.role: worker_public}}
spec: {node: worker-1, interfaceName: eth1}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-web}
spec:
  selector: ibm.role == 'worker_public'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

#[test]
fn the_summary_counts_each_kind_and_names_the_bundled_profile() {
    let dir = Dir::new("mixed");
    dir.write("p.yaml", MIXED);
    let d = dir.0.to_str().expect("utf-8");
    let out = run(
        &[
            "check",
            "--profile",
            "none",
            "--node",
            "worker-1",
            "--policies",
            d,
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "1 file(s): valid GlobalNetworkPolicy 1, HostEndpoint 1, KubernetesNetworkPolicy 1; 0 error(s)"
        ),
        "{text}"
    );
    let v = json(&run(
        &[
            "check",
            "--profile",
            "none",
            "--node",
            "worker-1",
            "--policies",
            d,
            "-o",
            "json",
        ],
        None,
    ));
    assert_eq!(v["summary"]["valid"]["KubernetesNetworkPolicy"], 1, "{v:#}");
    assert_eq!(v["summary"]["valid"]["GlobalNetworkPolicy"], 1, "{v:#}");
    assert!(v["summary"]["bundled_profile"].is_null());

    // A source with no policy of its own: the bundled profile is named,
    // and its policies are not counted as the source's.
    let empty = Dir::new("empty");
    empty.write(
        "hep.yaml",
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public}}\nspec: {node: worker-1, interfaceName: eth1}\n",
    );
    let out = run(
        &[
            "check",
            "--node",
            "worker-1",
            "--policies",
            empty.0.to_str().expect("utf-8"),
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("valid HostEndpoint 1; the source holds no policy of its own: bundled profile iks-2019 in use ("),
        "{text}"
    );
    assert!(!text.contains("valid GlobalNetworkPolicy"), "{text}");
}

#[test]
fn calicoctl_exports_are_read_from_stdin() {
    let yaml = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicyList
metadata: {resourceVersion: '1234'}
items:
- apiVersion: projectcalico.org/v3
  kind: GlobalNetworkPolicy
  metadata:
    name: allow-web
    uid: 6c2b3a5e-0000-4000-8000-000000000001
    resourceVersion: '1233'
    creationTimestamp: '2024-05-01T10:00:00Z'
  spec:
    selector: ibm.role == 'worker_public'
    ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]
- apiVersion: projectcalico.org/v3
  kind: GlobalNetworkPolicy
  metadata: {name: deny-ssh}
  spec:
    selector: ibm.role == 'worker_public'
    ingress: [{action: Deny, protocol: TCP, destination: {ports: [22]}}]
";
    let out = run(
        &["check", "--profile", "none", "--policies", "-"],
        Some(yaml),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("valid GlobalNetworkPolicy 2;"), "{text}");
    // The JSON export (calicoctl get -o json) of HostEndpoints, whose
    // items omit kind and apiVersion as the API's list responses do.
    let json_export = r#"{"kind": "HostEndpointList", "apiVersion": "projectcalico.org/v3",
        "items": [{"metadata": {"name": "worker-1-public", "labels": {"ibm.role": "worker_public"}},
                   "spec": {"node": "worker-1", "interfaceName": "eth1"}}]}"#;
    let out = run(
        &[
            "check",
            "--profile",
            "none",
            "--node",
            "worker-1",
            "--policies",
            "-",
        ],
        Some(json_export),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("valid HostEndpoint 1;"), "{text}");
    assert!(
        text.contains("eth1: HostEndpoint worker-1-public"),
        "{text}"
    );
}

#[test]
fn unknown_nodes_and_interfaces_are_refused_with_what_exists() {
    let dir = Dir::new("unknown");
    dir.write("p.yaml", MIXED);
    let d = dir.0.to_str().expect("utf-8");
    // An unknown node: exit 3, naming the nodes and interfaces described.
    let out = run(
        &[
            "check",
            "--profile",
            "none",
            "--node",
            "worker-7",
            "--policies",
            d,
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(8), "{text}");
    assert!(
        text.contains("error: no HostEndpoint names node worker-7, did you mean worker-1?; the policy describes these nodes (interfaces): worker-1 (eth1)"),
        "{text}"
    );
    // An unknown interface on a packet question: refused, not ALLOW.
    let out = run(
        &[
            "check",
            "--profile",
            "none",
            "--node",
            "worker-1",
            "--iface",
            "eth7",
            "--policies",
            d,
            "--ingress",
            "tcp 198.18.0.7:4000 -> 198.18.1.1:22",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(
        err.contains("no HostEndpoint of node worker-1 names interface eth7, did you mean eth1?"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no verdict is printed");
    // A known one still answers.
    let out = run(
        &[
            "check",
            "--profile",
            "none",
            "--node",
            "worker-1",
            "--iface",
            "eth1",
            "--policies",
            d,
            "--ingress",
            "tcp 198.18.0.7:4000 -> 198.18.1.1:80",
        ],
        None,
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("verdict: ALLOW"));
}
