//! `moat rules`: what the node enforces, read from the pinned maps, with
//! the kernel's own counters; while the agent runs and after it stopped.

use std::{ffi::OsString, time::Duration};

use moat::dataplane::frame::Packet;
use moat_tests::{
    lab_policy, mac_of, moat_bin, send_frame, worker_and_client, AgentProcess, Netns, PinDir,
    TempDir,
};

fn rules(ns: &Netns, pins: &PinDir, state: &std::path::Path, args: &[&str]) -> (String, i32) {
    let out = ns
        .command(moat_bin().to_str().expect("utf-8"))
        .arg("rules")
        .args(pins.args())
        .arg("--state-file")
        .arg(state)
        .args(args)
        .output()
        .expect("moat rules runs");
    assert!(
        out.stderr.is_empty() || out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn json(ns: &Netns, pins: &PinDir, state: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let (out, code) = rules(ns, pins, state, &[&["-o", "json"], args].concat());
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The row of `policy` rule `rule` on eth1 ingress.
fn row<'a>(v: &'a serde_json::Value, policy: &str, rule: u64) -> &'a serde_json::Value {
    v["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["policy"] == policy && r["rule"] == rule && r["iface"] == "eth1")
        .unwrap_or_else(|| panic!("no {policy} rule {rule} in {v:#}"))
}

#[test]
fn rules_lists_what_the_node_enforces_with_live_counters() {
    let (worker, client) = worker_and_client("lw", "lc", false);
    let dir = TempDir::new("moat-rules-");
    std::fs::create_dir_all(dir.0.join("policies")).expect("policy dir");
    std::fs::write(dir.0.join("policies/policy.yaml"), lab_policy()).expect("policy");
    let state = dir.0.join("state.json");
    let pins = PinDir::new();
    let mut args: Vec<OsString> = vec!["--policies".into(), dir.0.join("policies").into()];
    args.extend(["--iface", "eth1", "--node", "worker-1", "-o", "none"].map(OsString::from));
    args.extend(
        [
            "--socket",
            "none",
            "--status-file",
            "none",
            "--metrics-addr",
            "none",
        ]
        .map(OsString::from),
    );
    args.extend(["--state-file".into(), state.clone().into()]);
    args.extend(pins.args().map(OsString::from));
    // Its own pins, without --detach-on-exit: enforcement outlives it.
    let mut agent = AgentProcess::spawn(&worker, args, None);
    agent.wait_for_log("ready:");

    let v = json(&worker, &pins, &state, &[]);
    let telnet = row(&v, "deny-remote-shells", 1);
    assert_eq!(telnet["action"], "deny", "{telnet}");
    assert_eq!(telnet["stage"], "policy");
    assert_eq!(telnet["direction"], "ingress");
    // The whole rule, from the compiled entries (ssh and telnet).
    assert_eq!(telnet["matches"], "tcp to port 22-23", "{telnet}");
    assert_eq!(telnet["packets"], 0);
    // Evaluation order: failsafe rules first, then the policy stage.
    let stages: Vec<&str> = v["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["direction"] == "ingress")
        .map(|r| r["stage"].as_str().expect("stage"))
        .collect();
    let first_policy = stages
        .iter()
        .position(|s| *s == "policy")
        .expect("policy rules");
    assert!(
        stages[..first_policy].iter().all(|s| *s == "failsafe"),
        "{stages:?}"
    );
    assert!(
        stages[first_policy..].iter().all(|s| *s != "failsafe"),
        "{stages:?}"
    );

    // Three SYNs to telnet: the rule's counters move.
    let mac = (mac_of(&worker, "eth1"), mac_of(&client, "eth0"));
    for i in 0..3 {
        let mut f = Packet::tcp("198.18.1.2", 41000 + i, "198.18.1.1", 23, 0x02).frame();
        f[..6].copy_from_slice(&mac.0);
        f[6..12].copy_from_slice(&mac.1);
        send_frame(&client.name, "eth0", f);
    }
    std::thread::sleep(Duration::from_millis(200));
    let v = json(&worker, &pins, &state, &["--policy", "deny-remote-shells"]);
    assert_eq!(row(&v, "deny-remote-shells", 1)["packets"], 3, "{v:#}");
    assert!(row(&v, "deny-remote-shells", 1)["bytes"]
        .as_u64()
        .is_some_and(|b| b >= 3 * 54));
    assert!(
        v["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .all(|r| r["policy"] == "deny-remote-shells"),
        "--policy filters: {v:#}"
    );
    // An interface filter; an interface nothing enforces is said so.
    let v = json(&worker, &pins, &state, &["--iface", "lo"]);
    assert!(v["rules"].as_array().expect("rules").is_empty());
    assert!(v["notes"].to_string().contains("lo: not enforced"), "{v:#}");

    // The text view, wide.
    let (text, code) = rules(&worker, &pins, &state, &["--wide"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("eth1 ingress policy (generation 1; otherwise deny):"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("deny-remote-shells rule 1")
                && l.split_whitespace().nth(1) == Some("3")),
        "{text}"
    );

    // The agent stops; its pins keep enforcing, and moat rules still reads them.
    agent.stop();
    let v = json(&worker, &pins, &state, &[]);
    assert_eq!(row(&v, "deny-remote-shells", 1)["packets"], 3, "{v:#}");
    drop(pins);
}
