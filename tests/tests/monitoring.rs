//! deploy/monitoring: the PrometheusRule's alerts and the Grafana
//! dashboard name only metrics a real agent exports. The agent runs on a
//! veth in a network namespace, judges real frames (so per-rule series
//! exist), and its /metrics is scraped.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use moat::dataplane::frame::Packet;
use moat_tests::{
    in_netns, lab_policy, mac_of, send_frame, worker_and_client, AgentProcess, TempDir,
};

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// Every `moat_...` name in `expr`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("moat_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The alerts' (name, expr).
fn alerts() -> Vec<(String, String)> {
    let path = monitoring().join("prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).expect("prometheusrule.yaml");
    let v: serde_json::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(v["kind"], "PrometheusRule");
    let mut out = Vec::new();
    for group in v["spec"]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr").to_string();
            assert!(
                ["critical", "warning", "info"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            out.push((name, expr));
        }
    }
    out
}

/// The dashboard's (panel title, expr).
fn panels() -> Vec<(String, String)> {
    let path = monitoring().join("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("grafana-dashboard.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert!(v["uid"].as_str().is_some() && v["title"].as_str().is_some());
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    for p in v["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "panel ids unique"
        );
        let title = p["title"].as_str().expect("title").to_string();
        for t in p["targets"].as_array().expect("targets") {
            out.push((title.clone(), t["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

#[test]
fn the_alerts_cover_what_an_sre_pages_on() {
    let names: Vec<String> = alerts().into_iter().map(|(n, _)| n).collect();
    for want in [
        "MoatNotReady",
        "MoatInvalidPolicyObjects",
        "MoatMapNearlyFull",
        "MoatEventsLost",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
}

/// The sample names in an OpenMetrics text.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn scrape(ns: &str) -> String {
    in_netns(ns, || {
        let mut s = TcpStream::connect("127.0.0.1:9464").expect("metrics endpoint");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    })
}

#[test]
fn every_metric_the_alerts_and_dashboard_name_is_exported() {
    let (worker, client) = worker_and_client("mw", "mc", false);
    let dir = TempDir::new("moat-mon-");
    std::fs::create_dir_all(dir.0.join("policies")).expect("policy dir");
    std::fs::write(dir.0.join("policies/policy.yaml"), lab_policy()).expect("policy");
    let mut args: Vec<OsString> = vec!["--policies".into(), dir.0.join("policies").into()];
    args.extend(["--iface", "eth1", "--node", "worker-1", "-o", "none"].map(OsString::from));
    args.extend(["--socket".into(), dir.0.join("events.sock").into()]);
    args.extend(["--state-file", "none", "--status-file", "none"].map(OsString::from));
    let _agent = AgentProcess::start(&worker, args);
    // A SYN to telnet, denied by a rule: per-rule series appear.
    let mut f = Packet::tcp("198.18.1.2", 41000, "198.18.1.1", 23, 0x02).frame();
    f[..6].copy_from_slice(&mac_of(&worker, "eth1"));
    f[6..12].copy_from_slice(&mac_of(&client, "eth0"));
    send_frame(&client.name, "eth0", f);
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&worker.name);
        if text.contains("moat_rule_packets_total{") {
            break text;
        }
        assert!(Instant::now() < deadline, "no per-rule series:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let have = exported(&text);
    let mut named = alerts();
    named.extend(panels());
    assert!(named.len() > 10, "{named:?}");
    for (what, expr) in &named {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: {expr} names no moat metric");
        for n in names {
            assert!(
                have.contains(&n),
                "{what}: {n} (in {expr}) is not exported; the agent has {have:?}"
            );
        }
    }
    // The series the alerts select on exist with those labels.
    assert!(text.contains("moat_events_total{direction=\"ingress\",outcome=\"lost\"}"));
    assert!(text.contains("moat_map_entries{map=\"conntrack\"}"));
    assert!(text.contains("moat_map_capacity{map=\"conntrack\"}"));
}
