//! Hostile policy input is refused with an error naming the file and the
//! limit, and never takes the agent (or `moat check`) down: deep
//! selectors, floods of `!`, deeply nested YAML flow collections, files
//! over the size limit, IPv4 addresses with leading zeros. The valid
//! policies beside them keep being enforced (checked with packets).

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use moat_tests::{in_netns, listen, moat_bin, worker_and_client, AgentProcess, TempDir};

const GOOD: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: worker-1-public, labels: {ibm.role: worker_public}}
spec: {node: worker-1, interfaceName: eth1}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-web}
spec:
  selector: ibm.role == 'worker_public'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [8080]}}]
";

fn gnp(name: &str, selector: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  selector: \"{selector}\"\n  ingress: [{{action: Allow}}]\n"
    )
}

/// Writes the hostile files and the good policy into `dir`; returns the
/// hostile files' names with a phrase each one's error must contain.
fn write_hostile(dir: &Path) -> Vec<(&'static str, &'static str)> {
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
    write("good.yaml", GOOD);
    let deep = format!("{}has(a){}", "(".repeat(10_000), ")".repeat(10_000));
    write("deep.yaml", &gnp("deep", &deep));
    write(
        "nots.yaml",
        &gnp("nots", &format!("{}has(a)", "!".repeat(100_000))),
    );
    // 600 KB of nested flow sequences: the YAML scanner is quadratic in
    // this depth.
    write(
        "flow.yaml",
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: flow}}\nspec: {{nets: {}{}}}\n",
            "[".repeat(300_000),
            "]".repeat(300_000)
        ),
    );
    // A network set of 9 MiB: over the file limit.
    let mut big = String::from(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: big}\nspec:\n  nets:\n",
    );
    let mut i = 0u32;
    while big.len() < 33 * 1024 * 1024 {
        big.push_str(&format!(
            "    - 10.{}.{}.{}/32\n",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        ));
        i += 1;
    }
    write("big.yaml", &big);
    write(
        "zeros.yaml",
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: zeros}\nspec: {nets: [198.010.1.0/24]}\n",
    );
    // Valid, and wide: a Kubernetes selector of 60,000 expressions (the
    // old conversion nested them 60,000 deep).
    let exprs: String = (0..60_000)
        .map(|i| format!("      - {{key: k{i}, operator: Exists}}\n"))
        .collect();
    write(
        "wide.yaml",
        &format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: wide, namespace: prod}}\nspec:\n  podSelector:\n    matchExpressions:\n{exprs}  policyTypes: [Ingress]\n"),
    );
    vec![
        ("deep.yaml", "nested deeper than 64 levels"),
        ("nots.yaml", "over the limit of 65536"),
        ("flow.yaml", "nested deeper than 64 levels"),
        ("big.yaml", "over the limit of 33554432 bytes"),
        ("zeros.yaml", "leading zero"),
    ]
}

#[test]
fn check_refuses_hostile_input_by_name_and_keeps_the_rest() {
    let dir = TempDir::new("moat-bounds-");
    let expected = write_hostile(&dir.0);
    let out = Command::new(moat_bin())
        .args([
            "check",
            "--profile",
            "none",
            "--node",
            "worker-1",
            "--policies",
        ])
        .arg(&dir.0)
        .output()
        .expect("moat check runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "moat check must exit 1 (errors), not die: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for (file, phrase) in expected {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("error: ") && l.contains(file))
            .unwrap_or_else(|| panic!("no error for {file}:\n{stdout}"));
        assert!(line.contains(phrase), "{file}: {line}");
        assert!(
            line.len() < 600,
            "the error quotes a bounded prefix: {line}"
        );
    }
    assert!(
        stdout.contains("eth1: HostEndpoint worker-1-public"),
        "the valid policy is still compiled:\n{stdout}"
    );
    assert!(
        stdout.contains("KubernetesNetworkPolicy 1"),
        "the wide Kubernetes selector is read:\n{stdout}"
    );
}

fn connects(ns: &str, to: &str) -> bool {
    let to: SocketAddr = to.parse().expect("address");
    in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok()
    })
}

#[test]
fn a_watching_agent_survives_hostile_input_and_enforces_the_rest() {
    let (worker, client) = worker_and_client("mbw", "mbc", false);
    for port in [8080, 9090] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = TempDir::new("moat-bounds-agent-");
    let policies = dir.0.join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    write_hostile(&policies);
    let mut args: Vec<std::ffi::OsString> = vec!["--policies".into(), policies.clone().into()];
    args.extend(
        ["--iface", "eth1", "--node", "worker-1", "--profile", "none"]
            .map(std::ffi::OsString::from),
    );
    for (flag, file) in [
        ("--state-file", "last-good.json"),
        ("--status-file", "status.json"),
        ("--socket", "events.sock"),
    ] {
        args.push(flag.into());
        args.push(dir.0.join(file).into());
    }
    let mut agent = AgentProcess::spawn(&worker, args, Some(moat_tests::PinDir::new()));
    agent.wait_for_log("ready:");
    assert!(connects(&client.name, "198.18.1.1:8080"), "8080 allowed");
    assert!(!connects(&client.name, "198.18.1.1:9090"), "9090 denied");
    // Another hostile edit while it runs: rejected, the agent stays.
    std::fs::write(
        policies.join("deep2.yaml"),
        gnp(
            "deep2",
            &format!("{}has(b){}", "(".repeat(5_000), ")".repeat(5_000)),
        ),
    )
    .expect("write");
    agent.wait_for_log("deep2");
    assert!(
        connects(&client.name, "198.18.1.1:8080"),
        "8080 still allowed"
    );
    assert!(
        !connects(&client.name, "198.18.1.1:9090"),
        "9090 still denied"
    );
    agent.stop();
}
