//! `moat tail` as an on-call SRE uses it: the real agent on a veth in a
//! network namespace, real denied frames, and the tail's filters
//! (`--not`, `--node`, `--until`, verdicts in any case), dates in its text,
//! `--top --no-follow` printing one frame, and `-f` across agent restarts.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use moat::dataplane::frame::Packet;
use moat_tests::{
    lab_policy, mac_of, moat_bin, send_frame, worker_and_client, AgentProcess, Netns, TempDir,
};

const WORKER: &str = "198.18.1.1";
const CLIENT: &str = "198.18.1.2";

struct Lab {
    worker: Netns,
    client: Netns,
    dir: TempDir,
    macs: ([u8; 6], [u8; 6]),
}

impl Lab {
    fn new(w: &str, c: &str) -> Self {
        let (worker, client) = worker_and_client(w, c, false);
        let dir = TempDir::new("moat-tail-");
        std::fs::create_dir_all(dir.0.join("policies")).expect("policy dir");
        std::fs::write(dir.0.join("policies/policy.yaml"), lab_policy()).expect("policy");
        let macs = (mac_of(&worker, "eth1"), mac_of(&client, "eth0"));
        Lab {
            worker,
            client,
            dir,
            macs,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("events.sock")
    }

    fn agent(&self) -> AgentProcess {
        let mut args: Vec<OsString> = vec!["--policies".into(), self.dir.0.join("policies").into()];
        args.extend(["--iface", "eth1", "--node", "worker-1", "-o", "none"].map(OsString::from));
        args.extend(["--socket".into(), self.socket().into()]);
        args.extend(
            [
                "--state-file",
                "none",
                "--status-file",
                "none",
                "--metrics-addr",
                "none",
            ]
            .map(OsString::from),
        );
        AgentProcess::start(&self.worker, args)
    }

    /// A TCP SYN from the client to the worker's `port`, sent on the wire
    /// (the agent's XDP program judges it on eth1).
    fn syn(&self, sport: u16, port: u16) {
        let mut f = Packet::tcp(CLIENT, sport, WORKER, port, 0x02).frame();
        f[..6].copy_from_slice(&self.macs.0);
        f[6..12].copy_from_slice(&self.macs.1);
        send_frame(&self.client.name, "eth0", f);
    }

    fn tail(&self, args: &[&str]) -> (Vec<String>, String, Option<i32>) {
        let out = Command::new(moat_bin())
            .arg("tail")
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("moat tail runs");
        (
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.code(),
        )
    }

    /// The events of `moat tail -o json --no-follow ARGS`.
    fn events(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let (lines, stderr, code) = self.tail(&[&["-o", "json", "--no-follow"], args].concat());
        assert_eq!(code, Some(0), "moat tail {args:?}: {stderr}");
        lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect(l))
            .filter(|v| v["type"] == "event")
            .collect()
    }

    /// `moat tail -f ARGS` running, its stdout lines on a channel.
    fn follow(&self, args: &[&str]) -> Follower {
        let mut child = Command::new(moat_bin())
            .arg("tail")
            .arg("--socket")
            .arg(self.socket())
            .args(["-f", "-o", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("moat tail -f");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }
}

struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    /// The next JSON line whose `type` is `kind` (20 s at most).
    fn next(&self, kind: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(l) = self.lines.recv_timeout(left) else {
                break;
            };
            let v: serde_json::Value = serde_json::from_str(&l).expect(&l);
            if v["type"] == kind {
                return v;
            }
        }
        panic!("moat tail -f printed no {kind:?} line");
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn filters_negation_node_until_dates_and_one_top_frame() {
    let lab = Lab::new("tw", "tc");
    let _agent = lab.agent();
    for i in 0..3 {
        lab.syn(41000 + i, 23);
    }
    for i in 0..2 {
        lab.syn(42000 + i, 3306);
    }
    wait_until("five events", || lab.events(&[]).len() == 5);

    // Verdicts as the text output prints them.
    assert_eq!(lab.events(&["--verdict", "DENY"]).len(), 5);
    assert_eq!(lab.events(&["--verdict", "Log"]).len(), 0);
    // --not turns the next filter around, one --not per filter.
    assert_eq!(lab.events(&["--not", "--port", "23"]).len(), 2);
    assert_eq!(
        lab.events(&["--not", "--port", "23", "--not", "--port", "3306"])
            .len(),
        0
    );
    assert_eq!(
        lab.events(&["--port", "23", "--not", "--src", CLIENT])
            .len(),
        0
    );
    assert_eq!(
        lab.events(&["--port", "23", "--not", "--src", WORKER])
            .len(),
        3
    );
    let (_, stderr, code) = lab.tail(&["--no-follow", "--port", "23", "--not"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--not must come before a filter"),
        "{stderr}"
    );
    // The node is in every event, and a filter.
    let all = lab.events(&["--node", "worker-1"]);
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|e| e["node"] == "worker-1"), "{all:#?}");
    assert_eq!(lab.events(&["--node", "worker-2"]).len(), 0);
    // --until: only events at least that old.
    assert_eq!(lab.events(&["--until", "1h"]).len(), 0);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(lab.events(&["--until", "1s"]).len(), 5);
    assert_eq!(lab.events(&["--since", "1h", "--until", "30m"]).len(), 0);

    // Text lines carry the date.
    let (lines, _, code) = lab.tail(&["--no-follow"]);
    assert_eq!(code, Some(0));
    assert_eq!(lines.len(), 5, "{lines:#?}");
    for l in &lines {
        let date = l.split_whitespace().next().expect("a time");
        let b = date.as_bytes();
        assert!(
            date.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T',
            "no date in {l:?}"
        );
    }

    // --top --no-follow: one frame of the window's history, then exit.
    let started = Instant::now();
    let (lines, stderr, code) = lab.tail(&["--top", "--no-follow"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "it exited");
    let frames = lines
        .iter()
        .filter(|l| l.starts_with("moat tail --top"))
        .count();
    assert_eq!(frames, 1, "{lines:#?}");
    assert!(lines[0].contains(": 5 denied event(s)"), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["3", "tcp/23"]),
        "{lines:#?}"
    );
}

#[test]
fn follow_reconnects_across_an_agent_restart_or_exits_when_asked() {
    let lab = Lab::new("rw", "rc");
    let agent = lab.agent();
    let tail = lab.follow(&[]);
    let quitter = lab.follow(&["--exit-on-restart"]);
    tail.next("end_of_history");
    quitter.next("end_of_history");
    lab.syn(41000, 23);
    assert_eq!(tail.next("event")["dport"], 23);
    assert_eq!(quitter.next("event")["dport"], 23);

    agent.stop();
    // Both mark the break where the stream broke.
    tail.next("disconnected");
    quitter.next("disconnected");
    let mut quitter = quitter;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = quitter.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "--exit-on-restart did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3), "exit 3: no agent running");

    // The follower waits and goes on with the new agent's events.
    let _agent = lab.agent();
    let back = tail.next("reconnected");
    assert!(
        back["after_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{back}"
    );
    lab.syn(41001, 3306);
    let e = tail.next("event");
    assert_eq!(e["dport"], 3306, "{e}");
}
