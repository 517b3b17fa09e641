//! The Kubernetes NetworkPolicy matrix suite (tests/fixtures/netpol/
//! cases.yaml, restated from upstream's e2e netpol cases): every case's
//! 9x9 reachability matrix (loopback left out, as upstream does), each cell
//! judged as `moat check --pod` judges it (the sender's egress, then the
//! receiver's ingress, with `moat::cli::check::answer_pod`, the function
//! the command runs).

use std::path::Path;

use moat::policy::{load_str, reference::Query};
use moat_common::direction;
use serde::Deserialize;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

#[derive(Deserialize)]
struct Case {
    name: String,
    #[allow(dead_code, reason = "documents where the case comes from")]
    upstream: String,
    policies: Vec<serde_yaml_ng::Value>,
    probe: Probe,
    expect: Vec<String>,
}

#[derive(Deserialize)]
struct Probe {
    port: u16,
    protocol: String,
}

fn ip(ns: usize, pod: usize) -> String {
    format!("172.30.{}.{}", ns + 1, pod + 1)
}

/// Upstream's cluster: three namespaces of three pods serving 80 and 81.
fn cluster() -> String {
    let mut s = String::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        s += &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{kubernetes.io/metadata.name: {ns}}}}}\n---\n");
        for (p, pod) in PODS.iter().enumerate() {
            s += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n    - name: c\n      ports: [{{name: serve-80-tcp, containerPort: 80}}, {{name: serve-80-udp, containerPort: 80, protocol: UDP}}, {{name: serve-81-tcp, containerPort: 81}}, {{name: serve-81-udp, containerPort: 81, protocol: UDP}}]\nstatus: {{podIP: {}}}\n---\n",
                ip(n, p)
            );
        }
    }
    s
}

fn side_matches(pattern: &str, ns: &str, pod: &str) -> bool {
    let (pn, pp) = pattern.split_once('/').expect("ns/pod pattern");
    (pn == "*" || pn == ns) && (pp == "*" || pp == pod)
}

/// The expected verdict from `from` to `to` (ns, pod).
fn expected(expect: &[String], from: (&str, &str), to: (&str, &str)) -> bool {
    let mut allowed = true;
    for e in expect {
        let (verb, pattern) = e.split_once(' ').expect("verb pattern");
        let pattern = pattern.trim_matches('"');
        let (f, t) = pattern.split_once("->").expect("FROM->TO");
        if side_matches(f, from.0, from.1) && side_matches(t, to.0, to.1) {
            allowed = match verb {
                "allow" => true,
                "deny" => false,
                other => panic!("unknown verb {other}"),
            };
        }
    }
    allowed
}

#[test]
fn kubernetes_network_policy_matrices_agree() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/netpol/cases.yaml"),
    )
    .expect("cases");
    let cases: Vec<Case> = serde_yaml_ng::from_str(&text).expect("cases parse");
    let mut cells = 0;
    let mut bad = Vec::new();
    for case in &cases {
        let mut docs = cluster();
        for p in &case.policies {
            let name = p["name"].as_str().expect("name");
            let ns = p["namespace"].as_str().expect("namespace");
            let spec = serde_yaml_ng::to_string(&p["spec"]).expect("spec");
            docs += &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{}---\n",
                spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
            );
        }
        let loaded = load_str(Path::new(&format!("{}.yaml", case.name)), &docs);
        assert!(
            loaded.errors.is_empty(),
            "{}: {:#?}",
            case.name,
            loaded.errors
        );
        let set = loaded.set;
        let judge = |ns: &str, pod: &str, dir: u8, packet: &str| {
            let a = moat::cli::check::answer_pod(&set, ns, pod, dir, packet, Query::default())
                .unwrap_or_else(|e| panic!("{}: {packet}: {e}", case.name));
            serde_json::to_value(a.verdict).expect("verdict") == "allow"
        };
        for (fn_, fns) in NAMESPACES.iter().enumerate() {
            for (fp, fpod) in PODS.iter().enumerate() {
                for (tn, tns) in NAMESPACES.iter().enumerate() {
                    for (tp, tpod) in PODS.iter().enumerate() {
                        if (fn_, fp) == (tn, tp) {
                            continue; // loopback: upstream ignores it
                        }
                        cells += 1;
                        let packet = format!(
                            "{} {}:40000 -> {}:{}",
                            case.probe.protocol,
                            ip(fn_, fp),
                            ip(tn, tp),
                            case.probe.port
                        );
                        let got = judge(fns, fpod, direction::EGRESS, &packet)
                            && judge(tns, tpod, direction::INGRESS, &packet);
                        let want = expected(&case.expect, (fns, fpod), (tns, tpod));
                        if got != want {
                            bad.push(format!(
                                "{}: {fns}/{fpod} -> {tns}/{tpod} ({packet}): upstream expects {}, moat check --pod says {}",
                                case.name,
                                if want { "allow" } else { "deny" },
                                if got { "allow" } else { "deny" }
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "netpol matrix suite: {} cases, {cells} cells, {} disagree",
        cases.len(),
        bad.len()
    );
    assert_eq!(cells, cases.len() * 72);
    assert!(
        bad.is_empty(),
        "{} of {cells} cells disagree:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
