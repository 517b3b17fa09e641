//! The `moat check` command as users run it.

use std::{path::Path, process::Command};

fn moat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moat"))
}

fn fixtures() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/public")
        .display()
        .to_string()
}

fn json(args: &[&str]) -> (serde_json::Value, bool) {
    let out = moat().args(args).output().expect("moat runs");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

#[test]
fn check_answers_what_would_happen_and_why() {
    let dir = fixtures();
    let base = [
        "check",
        "--policies",
        &dir,
        "--node",
        "worker-1",
        "--iface",
        "eth1",
        "-o",
        "json",
    ];
    let (v, ok) = json(
        &[
            &base[..],
            &["--ingress", "tcp 198.18.66.7:40000 -> 198.18.1.1:52311"],
        ]
        .concat(),
    );
    assert!(ok);
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["stage"], "normal");
    assert_eq!(v["policy"], "GlobalNetworkPolicy/deny-watched");
    assert_eq!(v["rule"], 1);
    assert_eq!(v["logged"][0]["policy"], "deny-watched");
    assert_eq!(v["logged"][0]["rule"], 0);

    let (v, _) = json(&[&base[..], &["--ingress", "icmp 198.18.1.2 -> 198.18.1.1"]].concat());
    assert_eq!(
        (
            v["verdict"].as_str(),
            v["policy"].as_str(),
            v["rule"].as_u64()
        ),
        (
            Some("allow"),
            Some("GlobalNetworkPolicy/allow-icmp"),
            Some(0)
        )
    );

    let (v, _) = json(
        &[
            &base[..],
            &[
                "--ingress",
                "tcp 198.18.1.2:40000 -> 198.18.1.1:22",
                "--established",
            ],
        ]
        .concat(),
    );
    assert_eq!(
        (v["verdict"].as_str(), v["stage"].as_str()),
        (Some("allow"), Some("conntrack"))
    );

    let (v, _) = json(
        &[
            &base[..],
            &["--egress", "udp [2001:db8:1::1]:5353 -> [2001:db8::53]:53"],
        ]
        .concat(),
    );
    assert_eq!(v["policy"], "GlobalNetworkPolicy/allow-all-outbound");

    // A bad packet is an error that says what is wrong.
    let out = moat()
        .args([&base[..], &["--ingress", "tcp 198.18.1.2 -> 198.18.1.1:22"]].concat())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected ADDRESS:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_validates_and_exits_non_zero_on_errors() {
    let dir = std::env::temp_dir().join(format!("moat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec: {Tier: default}\n",
    )
    .expect("write");
    let out = moat()
        .args(["check", "--policies"])
        .arg(&dir)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("bad.yaml: GlobalNetworkPolicy/p: spec.Tier: unknown field `Tier`, did you mean `tier`?"), "{text}");
    let ok = moat()
        .args(["check", "--policies", &fixtures(), "--node", "worker-1"])
        .output()
        .expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn bundled_profiles_apply_when_the_directory_has_no_policy() {
    let dir = std::env::temp_dir().join(format!("moat-cli-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::copy(
        Path::new(&fixtures()).join("hostendpoint.yaml"),
        dir.join("hostendpoint.yaml"),
    )
    .expect("copy");
    std::fs::write(
        dir.join("cluster.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: worker-1}\nstatus: {addresses: [{type: InternalIP, address: 198.18.1.1}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n",
    )
    .expect("write");
    let d = dir.display().to_string();
    let ask = |profile: &str, packet: &str| {
        let (v, _) = json(&[
            "check",
            "--policies",
            &d,
            "--node",
            "worker-1",
            "--iface",
            "eth1",
            "--profile",
            profile,
            "--ingress",
            packet,
            "-o",
            "json",
        ]);
        (
            v["verdict"].as_str().unwrap_or_default().to_string(),
            v["policy"].as_str().unwrap_or_default().to_string(),
        )
    };
    assert_eq!(
        ask("iks-2019", "tcp 203.0.113.7:4000 -> 198.18.1.1:52311"),
        (
            "allow".into(),
            "GlobalNetworkPolicy/allow-bigfix-port".into()
        )
    );
    assert_eq!(
        ask("iks-2019", "tcp 203.0.113.7:4000 -> 198.18.1.1:10250").0,
        "deny"
    );
    assert_eq!(
        ask("iks-2017", "tcp 203.0.113.7:4000 -> 198.18.1.1:10250"),
        (
            "allow".into(),
            "GlobalNetworkPolicy/allow-kubelet-port".into()
        )
    );
    assert_eq!(
        ask("iks-2019", "tcp 203.0.113.7:4000 -> 198.18.1.1:30080"),
        (
            "allow".into(),
            "GlobalNetworkPolicy/allow-node-port-dnat".into()
        )
    );
    assert_eq!(
        ask("iks-2019", "tcp 203.0.113.7:4000 -> 198.18.1.1:30081").0,
        "deny"
    );
    assert_eq!(
        ask("iks-2019", "tcp 203.0.113.7:4000 -> 198.18.1.1:22").0,
        "deny",
        "no ssh on the public side"
    );
    assert_eq!(
        ask("none", "tcp 203.0.113.7:4000 -> 198.18.1.1:52311"),
        ("deny".into(), String::new())
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn trace_runs_the_kernel_program_beside_the_reference() {
    let dir = fixtures();
    for (args, verdict) in [
        (
            vec!["--ingress", "tcp 198.18.66.7:40000 -> 198.18.1.1:52311"],
            "deny",
        ),
        (
            vec!["--ingress", "tcp 198.18.1.2:40000 -> 198.18.1.1:22"],
            "deny",
        ),
        (vec!["--ingress", "icmp 198.18.1.2 -> 198.18.1.1"], "allow"),
        (
            vec![
                "--ingress",
                "udp [2001:db8:2::5]:53 -> [2001:db8:1::1]:5353",
            ],
            "deny",
        ),
        (
            vec!["--egress", "tcp 198.18.1.1:40000 -> 203.0.113.9:443"],
            "allow",
        ),
        (
            vec![
                "--ingress",
                "tcp 203.0.113.9:40000 -> 172.30.1.5:80",
                "--forwarded",
            ],
            "allow",
        ),
    ] {
        let out = moat()
            .args([
                "trace",
                "--offline",
                "--policies",
                &dir,
                "--node",
                "worker-1",
                "--iface",
                "eth1",
                "-o",
                "json",
            ])
            .args(&args)
            .output()
            .expect("moat runs");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert!(out.status.success(), "{args:?}: {v}");
        assert_eq!(v["agree"], true, "{args:?}: {v}");
        assert_eq!(v["kernel"]["verdict"], verdict, "{args:?}: {v}");
        assert_eq!(v["reference"]["verdict"], verdict, "{args:?}: {v}");
    }
}

#[test]
fn check_pod_answers_for_ingress_and_egress() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pods")
        .display()
        .to_string();
    let ask = |pod: &str, dir_flag: &str, packet: &str| {
        let (v, ok) = json(&[
            "check",
            "--policies",
            &dir,
            "--pod",
            pod,
            dir_flag,
            packet,
            "-o",
            "json",
        ]);
        assert!(ok, "{v}");
        (
            v["verdict"].as_str().unwrap_or_default().to_string(),
            v["policy"].as_str().unwrap_or_default().to_string(),
        )
    };
    let allow = |p: &str| ("allow".to_string(), p.to_string());
    let deny = |p: &str| ("deny".to_string(), p.to_string());
    // Kubernetes policy, ingress.
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.1.11:4000 -> 172.30.1.10:8080"
        ),
        allow("KubernetesNetworkPolicy/prod/knp.default.backend-from-frontend")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.1.11:4000 -> 172.30.1.10:8081"
        ),
        deny("")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:8080"
        ),
        deny("")
    );
    // Not isolated for egress: allowed.
    assert_eq!(
        ask(
            "prod/backend",
            "--egress",
            "tcp 172.30.1.10:4000 -> 172.30.2.10:443"
        ),
        allow("")
    );
    // Calico namespaced policy, egress.
    assert_eq!(
        ask(
            "finance/ledger",
            "--egress",
            "udp 172.30.2.10:4000 -> 172.21.0.10:53"
        ),
        allow("NetworkPolicy/finance/ledger-egress")
    );
    assert_eq!(
        ask(
            "finance/ledger",
            "--egress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:8080"
        ),
        deny("")
    );
    // The isolated pod's traffic to its own address is not policed.
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.1.10:4000 -> 172.30.1.10:9999"
        ),
        allow("")
    );
    assert_eq!(
        ask(
            "finance/ledger",
            "--egress",
            "tcp 172.30.2.10:4000 -> 172.30.2.10:9999"
        ),
        allow("")
    );
    // Named ports: resolved on the receiving pod (ingress: the backend's
    // own serve-81-tcp; egress: the peer's).
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:81"
        ),
        allow("KubernetesNetworkPolicy/prod/knp.default.backend-from-frontend")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:8181"
        ),
        deny("")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "udp 172.30.2.10:4000 -> 172.30.1.10:81"
        ),
        deny("")
    );
    assert_eq!(
        ask(
            "finance/ledger",
            "--egress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:81"
        ),
        allow("NetworkPolicy/finance/ledger-egress")
    );
    assert_eq!(
        ask(
            "finance/ledger",
            "--egress",
            "tcp 172.30.2.10:4000 -> 172.30.1.11:81"
        ),
        deny("")
    );
    // pcns.* (namespace labels) select the pod; pcsa.* and
    // projectcalico.org/serviceaccount select the peer.
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.1.11:4000 -> 172.30.1.10:9090"
        ),
        allow("GlobalNetworkPolicy/metrics-from-scanners")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:9090"
        ),
        deny("GlobalNetworkPolicy/metrics-from-scanners")
    );
    // serviceAccountSelector and a rule's serviceAccounts.
    assert_eq!(
        ask(
            "prod/frontend",
            "--egress",
            "tcp 172.30.1.11:4000 -> 172.30.2.10:6000"
        ),
        deny("NetworkPolicy/prod/scanners-egress")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--egress",
            "tcp 172.30.1.10:4000 -> 172.30.2.10:6000"
        ),
        allow("")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.1.11:4000 -> 172.30.1.10:7070"
        ),
        allow("GlobalNetworkPolicy/admin-from-scanner-account")
    );
    assert_eq!(
        ask(
            "prod/backend",
            "--ingress",
            "tcp 172.30.2.10:4000 -> 172.30.1.10:7070"
        ),
        deny("GlobalNetworkPolicy/admin-from-scanner-account")
    );
    // Bad --pod values say what is wrong.
    for (pod, says) in [
        ("backend", "expected NAMESPACE/NAME"),
        ("prod/nope", "no Pod prod/nope"),
    ] {
        let out = moat()
            .args([
                "check",
                "--policies",
                &dir,
                "--pod",
                pod,
                "--ingress",
                "tcp 1.2.3.4:1 -> 5.6.7.8:2",
            ])
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
    }
}
