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
