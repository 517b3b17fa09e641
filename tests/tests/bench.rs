//! `moat bench`: a smoke run on tiny rule counts (every engine's figures
//! in the JSON, every packet counted, nothing left behind), an interrupted
//! run that cleans up, and every rendering of the generated rule sets
//! accepted by the engines' own checkers.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use moat::bench::{
    engines::ALL,
    lab::NETNS_PREFIX,
    rules::{RuleSet, Shape},
    suite,
};
use moat_tests::moat_bin;

fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("{NETNS_PREFIX}{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn smoke_run_has_every_engines_figures_and_leaves_nothing_behind() {
    let out = tmpdir("moat-bench-smoke");
    let child = Command::new(moat_bin())
        .args(["bench", "--quick", "--rules", "1,3", "--duration", "0.05"])
        .args(["--repeat", "200", "--runs", "2", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting moat bench");
    let pid = child.id();
    let result = child.wait_with_output().expect("moat bench");
    assert!(
        result.status.success(),
        "moat bench failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(
        namespaces_of(pid),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    throughput_of_every_engine(&json);
    classification_cases(&json);
    update_latencies(&json);
    event_path_accounting(&json);
    memory_and_bars(&json);
    machine_and_files(&json, &out);
    let _ = std::fs::remove_dir_all(&out);
}

/// A live-frames figure for every engine, rule count and traffic kind,
/// every packet counted by the engine; the stack alone too.
fn throughput_of_every_engine(json: &serde_json::Value) {
    let throughput = json["throughput"].as_array().expect("throughput");
    for engine in ALL {
        for rules in [1, 3] {
            for traffic in ["denied", "allowed"] {
                let row = throughput
                    .iter()
                    .find(|t| {
                        t["engine"] == engine.name()
                            && t["rules"] == rules
                            && t["traffic"] == traffic
                    })
                    .unwrap_or_else(|| {
                        panic!("no {} {traffic} figure at {rules} rules", engine.name())
                    });
                assert!(
                    row["unsupported"].is_null(),
                    "{} {traffic} at {rules}: {}",
                    engine.name(),
                    row["unsupported"]
                );
                let sent = row["packets_sent"].as_u64().unwrap();
                assert!(sent >= 2_000, "{row}");
                assert_eq!(row["packets_counted"].as_u64(), Some(sent), "{row}");
                assert!(row["ns_per_packet"]["median"].as_f64().unwrap() > 0.0);
            }
        }
    }
    for traffic in ["denied", "allowed"] {
        assert!(
            throughput
                .iter()
                .any(|t| t["engine"] == "no-filter" && t["traffic"] == traffic),
            "no stack-alone {traffic} figure"
        );
    }
}

/// The baselines and every case of moat's program at 3 rules.
fn classification_cases(json: &serde_json::Value) {
    let classification = json["classification"].as_array().expect("classification");
    for program in ["xdp-pass", "xdp-parse-pass"] {
        assert!(classification
            .iter()
            .any(|c| c["program"] == program && c["ns"]["median"].as_f64().is_some()));
    }
    for case in [
        "first rule hit",
        "last rule hit",
        "no match (default deny)",
        "established flow",
    ] {
        for shape in ["realistic", "adversarial"] {
            let row = classification
                .iter()
                .find(|c| {
                    c["program"] == "moat-xdp"
                        && c["case"] == case
                        && c["shape"] == shape
                        && c["rules"] == 3
                })
                .unwrap_or_else(|| panic!("no {shape} {case}"));
            assert!(row["ns"]["median"].as_f64().is_some(), "{row}");
        }
    }
}

/// A full and a one-rule update latency for every engine.
fn update_latencies(json: &serde_json::Value) {
    let updates = json["updates"].as_array().expect("updates");
    for engine in ALL {
        assert!(
            updates.iter().any(|u| u["engine"] == engine.name()
                && u["full_ms"].as_f64().is_some()
                && u["change_ms"].as_f64().is_some()),
            "no update latency for {}",
            engine.name()
        );
    }
}

/// The flood's events: emitted + suppressed + lost = denied.
fn event_path_accounting(json: &serde_json::Value) {
    let e = &json["event_path"];
    let n = |k: &str| {
        e[k].as_u64()
            .unwrap_or_else(|| panic!("event_path.{k}: {e}"))
    };
    assert_eq!(
        n("flood_denied"),
        n("flood_packets"),
        "every flooded frame denied"
    );
    assert_eq!(
        n("flood_emitted") + n("flood_suppressed") + n("flood_lost"),
        n("flood_denied"),
        "every deny's event emitted, suppressed or lost: {e}"
    );
    assert!(
        n("flood_suppressed") > 0,
        "the default limit suppresses a flood"
    );
    assert!(e["reader_events_per_s"].as_f64().unwrap() > 0.0);
}

/// Memory figures, and the bars a quick run did not measure say "not run".
fn memory_and_bars(json: &serde_json::Value) {
    assert_eq!(json["memory"].as_array().unwrap().len(), 2);
    assert!(json["memory"][0]["map_bytes"].as_u64().unwrap() > 0);
    let bar = json["bar"].as_array().unwrap();
    assert_eq!(bar.len(), 5);
    // A quick run at 1 and 3 rules measures nothing at 10,000: those bars
    // were not run, not missed.
    for b in bar {
        if b["measured"].is_null() {
            assert_eq!(b["status"], "not run", "{b}");
        }
    }
    assert!(bar.iter().any(|b| b["status"] == "not run"), "{bar:?}");
    let floor = bar
        .iter()
        .find(|b| {
            b["claim"]
                .as_str()
                .unwrap_or("")
                .contains("only parses and passes")
        })
        .expect("the parse-and-pass bar");
    assert!(
        floor["detail"]
            .as_str()
            .unwrap_or("")
            .contains("one flow-table lookup alone"),
        "the floor beside it: {floor}"
    );
}

/// The machine described, the report and plots written.
fn machine_and_files(json: &serde_json::Value, out: &std::path::Path) {
    for key in ["cpu", "kernel", "bpf_jit_enable", "date_utc"] {
        assert!(
            !json["machine"][key].as_str().unwrap_or("").is_empty(),
            "machine.{key}"
        );
    }
    for f in ["report.md", "denied.png", "allowed.png"] {
        let bytes = std::fs::read(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(bytes.len() > 1000, "{f} is nearly empty");
        if f.ends_with(".png") {
            assert_eq!(&bytes[1..4], b"PNG", "{f} is not a PNG");
        }
    }
}

#[test]
fn interrupted_run_removes_its_namespaces() {
    let out = tmpdir("moat-bench-interrupted");
    let mut child = Command::new(moat_bin())
        .args([
            "bench",
            "--quick",
            "--rules",
            "1,2,3,4,5,6",
            "--duration",
            "0.5",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting moat bench");
    let pid = child.id();
    let started = Instant::now();
    while namespaces_of(pid).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "moat bench made no namespace in 60 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "moat bench ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = child.wait().expect("moat bench");
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    assert_eq!(
        namespaces_of(pid),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn every_rendering_parses_with_the_engines_own_checkers() {
    suite::check_renderings(&[Shape::Realistic, Shape::Adversarial], &[1, 7, 300], 42)
        .expect("renderings");
}

#[test]
fn write_rules_writes_every_rendering() {
    let dir = tmpdir("moat-bench-rules");
    let out = Command::new(moat_bin())
        .args(["bench", "--rules", "5", "--write-rules"])
        .arg(&dir)
        .output()
        .expect("moat bench --write-rules");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "realistic-5.moat.yaml",
        "realistic-5.iptables",
        "realistic-5.ipset",
        "realistic-5.ipset.iptables",
        "realistic-5.linear.nft",
        "realistic-5.sets.nft",
        "realistic-5.netdev.nft",
        "adversarial-5.moat.yaml",
        "adversarial-5.netdev.nft",
    ] {
        assert!(Path::new(&dir.join(name)).exists(), "{name} not written");
    }
    // What was written is what the generator renders for that seed.
    let set = RuleSet::generate(Shape::Realistic, 5, 1).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("realistic-5.sets.nft")).unwrap(),
        set.nft_sets()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_machine_without_the_engines_is_refused_naming_what_is_missing() {
    let empty = tmpdir("moat-bench-empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(moat_bin())
        .args(["bench", "--quick", "--rules", "1"])
        .env("PATH", &empty)
        .output()
        .expect("moat bench");
    assert!(!out.status.success(), "ran without its tools");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "nft (Debian package nftables)",
        "ipset (Debian package ipset)",
        "iptables-legacy-restore (Debian package iptables)",
        "ip (Debian package iproute2)",
    ] {
        assert!(err.contains(needle), "{needle} not named: {err}");
    }
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn bad_options_are_refused_with_the_reason() {
    for (args, needle) in [
        (&["bench", "--rules", "0"][..], "--rules 0"),
        (&["bench", "--duration=0"][..], "--duration 0"),
        (&["bench", "--engines", "pf"][..], "pf"),
    ] {
        let out = Command::new(moat_bin()).args(args).output().expect("moat");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
