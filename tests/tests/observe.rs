//! Observability end to end: the real `moat agent` on a veth in a network
//! namespace, real denied traffic, read back through `moat tail`, the
//! event socket and the metrics endpoint.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use moat::dataplane::{frame::Packet, testrun::RawXdp};
use moat_tests::{
    in_netns, lab_policy, listen, mac_of, moat_bin, worker_and_client, AgentProcess, Netns, TempDir,
};

const WORKER: &str = "198.18.1.1";
const CLIENT: &str = "198.18.1.2";

/// A worker (`eth1` 198.18.1.1) and a client (198.18.1.2), IPv6 off so
/// the namespaces' own router solicitations do not add to the counts.
struct Lab {
    worker: Netns,
    client: Netns,
    dir: TempDir,
    /// MACs of the worker's eth1 and the client's eth0.
    macs: ([u8; 6], [u8; 6]),
}

impl Lab {
    fn new() -> Self {
        let (worker, client) = worker_and_client("ow", "oc", false);
        let dir = TempDir::new("moat-obs-");
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

    /// A TCP SYN from the client to `port`, as it arrives on `eth1`.
    fn syn(&self, sport: u16, port: u16) -> Vec<u8> {
        let mut f = Packet::tcp(CLIENT, sport, WORKER, port, 0x02).frame();
        f[..6].copy_from_slice(&self.macs.0);
        f[6..12].copy_from_slice(&self.macs.1);
        f
    }
}

/// The agent on the lab's worker, enforcing its policy on `eth1`; it ends
/// when dropped.
fn start_agent(lab: &Lab, extra: &[&str]) -> AgentProcess {
    let mut args: Vec<OsString> = vec!["--policies".into(), lab.dir.0.join("policies").into()];
    args.extend(["--iface", "eth1", "--node", "worker-1", "-o", "none"].map(OsString::from));
    args.extend(["--socket".into(), lab.socket().into()]);
    args.extend(["--state-file", "none", "--status-file", "none"].map(OsString::from));
    args.extend(extra.iter().map(OsString::from));
    AgentProcess::start(&lab.worker, args)
}

/// Runs `moat tail ARGS --socket S`; returns stdout lines and stderr.
fn tail(lab: &Lab, args: &[&str]) -> (Vec<String>, String, std::process::ExitStatus) {
    let out = Command::new(moat_bin())
        .arg("tail")
        .arg("--socket")
        .arg(lab.socket())
        .args(args)
        .output()
        .expect("moat tail runs");
    (
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status,
    )
}

/// The events of `moat tail -o json --no-follow ARGS`.
fn events(lab: &Lab, args: &[&str]) -> Vec<serde_json::Value> {
    let (lines, stderr, status) = tail(lab, &[&["-o", "json", "--no-follow"], args].concat());
    assert!(status.success(), "moat tail failed: {stderr}");
    let mut out = Vec::new();
    let mut ended = false;
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        match v["type"].as_str() {
            Some("event") => out.push(v),
            Some("end_of_history") => ended = true,
            other => panic!("unexpected {other:?}: {l}"),
        }
    }
    assert!(
        ended,
        "moat tail -o json ends with the end-of-history marker"
    );
    out
}

/// Scrapes the agent's metrics (it listens on the worker namespace's
/// loopback): `name{labels}` -> value.
fn scrape(lab: &Lab, path: &str) -> (u16, String) {
    let path = path.to_string();
    in_netns(&lab.worker.name, move || {
        let mut s = TcpStream::connect("127.0.0.1:9464").expect("metrics endpoint");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {text}"));
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_string())
    })
}

fn metrics(lab: &Lab) -> BTreeMap<String, f64> {
    let (status, body) = scrape(lab, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text: {body}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample: {l}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("value: {l}")),
            )
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> u64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {:#?}", m.keys().collect::<Vec<_>>()))
        as u64
}

fn denied_ingress(m: &BTreeMap<String, f64>) -> u64 {
    m.iter()
        .filter(|(k, _)| {
            k.starts_with("moat_packets_denied_total{") && k.contains("direction=\"ingress\"")
        })
        .map(|(_, v)| *v as u64)
        .sum()
}

fn events_accounted(m: &BTreeMap<String, f64>) -> (u64, u64, u64) {
    let e = |o: &str| {
        get(
            m,
            &format!("moat_events_total{{direction=\"ingress\",outcome=\"{o}\"}}"),
        )
    };
    (e("emitted"), e("suppressed"), e("lost"))
}

/// Sends `frames` out of the client's `eth0` through one AF_PACKET
/// socket.
fn send_frames(lab: &Lab, frames: Vec<Vec<u8>>) {
    in_netns(&lab.client.name, move || {
        let index = nix::net::if_::if_nametoindex("eth0").expect("eth0");
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; every field read is set.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        for f in &frames {
            addr.sll_addr[..6].copy_from_slice(&f[..6]);
            loop {
                // SAFETY: valid descriptor, buffer and address sizes.
                let sent = unsafe {
                    libc::sendto(
                        fd,
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if sent == f.len() as isize {
                    break;
                }
                let err = std::io::Error::last_os_error();
                // A full device queue: wait for it to drain.
                assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS), "send: {err}");
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
    });
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn denies_are_attributed_log_before_allow_logs_and_allows_and_metrics_match() {
    let lab = Lab::new();
    listen(&lab.worker, "0.0.0.0:8080");
    let agent = start_agent(&lab, &[]);

    let (status, body) = scrape(&lab, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("generation 1 enforced on eth1"), "{body}");
    let (status, body) = scrape(&lab, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok: event reader running"));
    let (status, _) = scrape(&lab, "/nothing");
    assert_eq!(status, 404);

    let before = metrics(&lab);
    // Five SYNs to telnet (denied by rule 1 of deny-remote-shells), three
    // to a port nothing names (default deny).
    let mut frames: Vec<Vec<u8>> = (0..5).map(|i| lab.syn(41000 + i, 23)).collect();
    frames.extend((0..3).map(|i| lab.syn(42000 + i, 3306)));
    send_frames(&lab, frames);
    // A real connection to 8080: logged, then allowed.
    let to: SocketAddr = format!("{WORKER}:8080").parse().expect("addr");
    in_netns(&lab.client.name, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("8080 is allowed")
    });

    wait_until("the events", || {
        events(&lab, &["--port", "3306"]).len() == 3
    });
    let telnet = events(&lab, &["--port", "23"]);
    assert_eq!(telnet.len(), 5, "{telnet:#?}");
    for e in &telnet {
        assert_eq!(e["verdict"], "deny");
        assert_eq!(e["reason"], "rule");
        assert_eq!(e["policy"], "deny-remote-shells");
        assert_eq!(e["rule"], 1);
        assert_eq!(e["iface"], "eth1");
        assert_eq!(e["direction"], "ingress");
        assert_eq!(e["src"], CLIENT);
        assert_eq!(e["generation"], 1);
        assert!(e["seq"].as_u64().is_some_and(|s| s > 0));
    }
    let default_deny = events(&lab, &["--port", "3306"]);
    assert!(default_deny
        .iter()
        .all(|e| e["reason"] == "end-of-policies" && e["policy"].is_null()));

    // The event's check command gives the same answer.
    let check = telnet[0]["check"].as_str().expect("check command");
    assert!(check.starts_with("moat check "), "{check}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} -o json",
            check.replacen("moat", moat_bin().to_str().expect("utf-8"), 1)
        ))
        .output()
        .expect("check runs");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(answer["verdict"], "deny", "{answer}");
    assert_eq!(answer["policy"], "GlobalNetworkPolicy/deny-remote-shells");
    assert_eq!(answer["rule"], 1);

    // A Log rule before an Allow: logged (rule 0), and the connection
    // went through (above).
    let logged = events(&lab, &["--verdict", "log"]);
    assert!(!logged.is_empty(), "the 8080 SYN is logged");
    for e in &logged {
        assert_eq!(e["policy"], "log-then-allow-web");
        assert_eq!(e["rule"], 0);
        assert_eq!(e["dport"], 8080);
        assert_eq!(e["reason"], "log-rule");
    }

    // Filters.
    assert_eq!(
        events(&lab, &["--policy", "deny-remote-shells"]).len(),
        5,
        "by policy name"
    );
    assert_eq!(events(&lab, &["--verdict", "deny"]).len(), 8);
    assert_eq!(
        events(&lab, &["--src", "198.18.1.0/24", "--proto", "tcp"]).len(),
        8 + logged.len()
    );
    assert!(events(&lab, &["--src", "10.0.0.0/8"]).is_empty());
    assert!(events(&lab, &["--direction", "egress"]).is_empty());
    assert!(events(&lab, &["--iface", "eth0"]).is_empty());
    assert_eq!(events(&lab, &["-n", "2"]).len(), 2);
    assert_eq!(events(&lab, &["--since", "5m"]).len(), 8 + logged.len());

    // The readable form: one aligned line per event, no colour off a
    // terminal.
    let (lines, _, status) = tail(&lab, &["--no-follow", "--port", "23"]);
    assert!(status.success());
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(lines.iter().all(|l| !l.contains('\x1b')
        && l.contains("DENY")
        && l.ends_with("deny-remote-shells rule 1")));
    let arrow = lines[0].find("->");
    assert!(
        lines.iter().all(|l| l.find("->") == arrow),
        "aligned: {lines:#?}"
    );

    // --top off a terminal: periodic blocks with the window's top
    // sources, ports and policies.
    let mut top = Command::new(moat_bin())
        .args(["tail", "--top", "--interval", "1s", "--socket"])
        .arg(lab.socket())
        .stdout(Stdio::piped())
        .spawn()
        .expect("moat tail --top");
    let block: Vec<String> = BufReader::new(top.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.is_empty())
        .collect();
    let _ = top.kill();
    let _ = top.wait();
    let text = block.join("\n");
    assert!(block[0].starts_with("moat tail --top"), "{text}");
    let row = |n: u64, what: &str| {
        block
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [n.to_string().as_str(), what])
    };
    assert!(row(8, CLIENT), "top source: {text}");
    assert!(row(5, "tcp/23") && row(3, "tcp/3306"), "top ports: {text}");
    assert!(
        block
            .iter()
            .any(|l| l.contains("5  deny-remote-shells rule 1")),
        "top policies: {text}"
    );

    // The counters match the traffic exactly.
    wait_until("the counters", || {
        get(
            &metrics(&lab),
            "moat_packets_denied_total{direction=\"ingress\",reason=\"rule\"}",
        ) >= 5
    });
    let after = metrics(&lab);
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        delta("moat_packets_denied_total{direction=\"ingress\",reason=\"rule\"}"),
        5
    );
    assert_eq!(
        delta("moat_packets_denied_total{direction=\"ingress\",reason=\"end_of_policies\"}"),
        3
    );
    let rule =
        "moat_rule_packets_total{policy=\"deny-remote-shells\",rule=\"1\",direction=\"ingress\"}";
    assert_eq!(
        get(&after, rule) - before.get(rule).map_or(0, |v| *v as u64),
        5,
        "the kernel's per-rule counter of the denying rule"
    );
    assert_eq!(
        delta("moat_log_rule_hits_total{direction=\"ingress\"}"),
        logged.len() as u64
    );
    let (emitted, suppressed, lost) = events_accounted(&after);
    assert_eq!((suppressed, lost), (0, 0), "well within the rate limit");
    assert_eq!(emitted, 8 + logged.len() as u64);
    assert_eq!(get(&after, "moat_agent_events_read_total"), emitted);
    assert!(
        get(
            &after,
            "moat_packets_allowed_total{direction=\"ingress\",stage=\"policy\"}"
        ) >= 1
    );
    assert_eq!(get(&after, "moat_policy_generation"), 1);
    assert_eq!(get(&after, "moat_ready"), 1);
    assert!(
        get(&after, "moat_map_entries{map=\"conntrack\"}") >= 1,
        "the 8080 flow"
    );
    drop(agent);
}

#[test]
fn tail_explains_a_missing_agent_and_a_root_only_socket() {
    let lab = Lab::new();
    let (_, stderr, status) = tail(&lab, &["--no-follow"]);
    assert!(!status.success());
    assert!(stderr.contains("is `moat agent` running?"), "{stderr}");
    let agent = start_agent(&lab, &["--metrics-addr", "none"]);
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(lab.socket()).expect("socket");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "root-only by default"
    );
    assert_eq!(meta.uid(), 0);
    // As nobody: permission denied, with what to do about it.
    let out = Command::new(moat_bin())
        .args(["tail", "--no-follow", "--socket"])
        .arg(lab.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("moat tail as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("permission denied") && stderr.contains("--socket-group"),
        "{stderr}"
    );
    drop(agent);
    // Once the agent is gone, its socket is too.
    assert!(!lab.socket().exists());
}

/// Reads protocol messages from a raw subscriber connection.
fn read_messages(
    r: &mut BufReader<UnixStream>,
    until: impl Fn(&serde_json::Value) -> bool,
) -> (u64, u64) {
    let (mut events, mut missed) = (0, 0);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).expect("read");
        assert!(n > 0, "the agent closed the stream");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        match v["type"].as_str() {
            Some("event") => events += 1,
            Some("gap") => missed += v["missed"].as_u64().expect("missed count"),
            _ => {}
        }
        if until(&v) {
            return (events, missed);
        }
    }
}

/// Reads one message cheaply (the throughput measurement must not be
/// limited by the test's own JSON parsing): (events, missed); `None` at
/// the end of the stream.
fn count_messages(r: &mut BufReader<UnixStream>) -> Option<(u64, u64)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    if line.starts_with("{\"type\":\"event\"") {
        Some((1, 0))
    } else if let Some(rest) = line.strip_prefix("{\"type\":\"gap\",\"missed\":") {
        Some((
            0,
            rest.trim_end()
                .trim_end_matches('}')
                .parse()
                .expect("gap count"),
        ))
    } else {
        Some((0, 0))
    }
}

fn subscribe(path: &Path) -> BufReader<UnixStream> {
    let mut s = UnixStream::connect(path).expect("connect");
    s.write_all(b"{\"history\":0,\"follow\":true}\n")
        .expect("request");
    let mut r = BufReader::new(s);
    read_messages(&mut r, |v| v["type"] == "end_of_history");
    r
}

#[test]
fn a_subscriber_that_stops_reading_does_not_stall_the_agent() {
    let lab = Lab::new();
    let agent = start_agent(&lab, &["--event-rate", "0", "--subscriber-queue", "1024"]);
    // One subscriber that never reads, one that does.
    let mut stalled = subscribe(&lab.socket());
    let mut reader = subscribe(&lab.socket());
    // Packets with distinct source ports, so no flow is tracked as one.
    const N: u16 = 20_000;
    let frames: Vec<Vec<u8>> = (0..N).map(|i| lab.syn(10_000 + i, 23)).collect();
    let seen = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let counts = seen.clone();
    std::thread::spawn(move || {
        // Until the agent closes the stream at the end of the test.
        while let Some((e, m)) = count_messages(&mut reader) {
            counts[0].fetch_add(e, Ordering::Relaxed);
            counts[1].fetch_add(m, Ordering::Relaxed);
        }
    });
    // 20,000 packets a second: the agent keeps up, and so does a client
    // that reads.
    for chunk in frames.chunks(200) {
        send_frames(&lab, chunk.to_vec());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut read = 0;
    wait_until("the agent to read every event", || {
        let m = metrics(&lab);
        read = get(&m, "moat_agent_events_read_total");
        denied_ingress(&m) == u64::from(N) && read == events_accounted(&m).0
    });
    let m = metrics(&lab);
    let (emitted, suppressed, lost) = events_accounted(&m);
    assert_eq!(emitted + suppressed + lost, u64::from(N));
    assert_eq!(suppressed, 0, "no rate limit");
    eprintln!("{N} denied: {emitted} emitted, {lost} lost (ring full), {read} read by the agent");
    // The reading subscriber got every event or a gap for it, and far
    // more than the stalled one's queue and socket buffer hold: the
    // agent did not wait for the stalled one.
    wait_until("the reader to account for every event", || {
        seen[0].load(Ordering::Relaxed) + seen[1].load(Ordering::Relaxed) == read
    });
    let events = seen[0].load(Ordering::Relaxed);
    eprintln!(
        "reading subscriber: {events} delivered, {} in gaps",
        seen[1].load(Ordering::Relaxed)
    );
    assert!(
        events > 5_000,
        "the reader kept receiving ({events} events)"
    );

    // The stalled subscriber, read at last: what fit, then a gap marker
    // with the count it missed.
    let (mut events, mut missed) = (0, 0);
    while events + missed < read {
        let (e, m) = read_messages(&mut stalled, |_| true);
        events += e;
        missed += m;
    }
    assert_eq!(events + missed, read, "stalled: delivered + gaps");
    assert!(
        missed > 0,
        "the stalled subscriber was told it missed events"
    );
    eprintln!("stalled subscriber: {events} delivered, gap of {missed}");
    drop(agent);
}

/// Runs the XDP program attached to `ifname` in `ns` (the agent's) on
/// `frame` `repeat` times in live-frames mode, as if each arrived on
/// `ifname`.
fn live_frames(ns: &Netns, ifname: &str, frame: Vec<u8>, repeat: u32) -> Duration {
    test_run(ns, ifname, frame, repeat, true).0
}

/// BPF_PROG_TEST_RUN of the XDP program attached to `ifname` in `ns`, as
/// if `frame` arrived on `ifname`, `repeat` times; live frames or not.
/// Returns the wall time of the call and the kernel's mean ns per run.
fn test_run(ns: &Netns, ifname: &str, frame: Vec<u8>, repeat: u32, live: bool) -> (Duration, u32) {
    let link = ns.exec("ip", &["-j", "-d", "link", "show", ifname]);
    let v: serde_json::Value = serde_json::from_str(&link).expect("ip -j");
    let prog_id = v[0]["xdp"]["prog"]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no XDP program on {ifname}: {link}")) as u32;
    let ifname = ifname.to_string();
    in_netns(&ns.name, move || {
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).expect("ifindex");
        let program = RawXdp::by_id(prog_id).expect("the agent's XDP program");
        if live {
            let took = program
                .live_run(&frame, ifindex, repeat)
                .expect("live frames");
            (took.wall, 0)
        } else {
            let start = Instant::now();
            let (_, mean) = program
                .test_run_on(&frame, ifindex, repeat)
                .expect("test run");
            (start.elapsed(), mean.as_nanos() as u32)
        }
    })
}

/// Packets in the flood: 1,000,000 (the count), or
/// `MOAT_FLOOD_PACKETS`.
fn flood_packets() -> u32 {
    std::env::var("MOAT_FLOOD_PACKETS")
        .ok()
        .map(|v| v.parse().expect("MOAT_FLOOD_PACKETS: a number"))
        .unwrap_or(1_000_000)
}

#[test]
fn a_flood_of_live_frames_is_accounted_for_exactly() {
    let lab = Lab::new();
    // Once with the default rate limit (most events suppressed), once
    // without one (the ring buffer overflows, events lost).
    for (rate, what) in [(None, "default rate limit"), (Some("0"), "no rate limit")] {
        let mut extra = vec![];
        if let Some(r) = rate {
            extra.extend(["--event-rate", r]);
        }
        let agent = start_agent(&lab, &extra);
        let before = metrics(&lab);
        let n = flood_packets();
        let started = Instant::now();
        let took = live_frames(&lab.worker, "eth1", lab.syn(40000, 23), n);
        let mut caught_up = Duration::ZERO;
        wait_until("the agent to read every emitted event", || {
            let m = metrics(&lab);
            caught_up = started.elapsed();
            get(&m, "moat_agent_events_read_total") == events_accounted(&m).0
        });
        let after = metrics(&lab);
        let denied = denied_ingress(&after) - denied_ingress(&before);
        let (e0, s0, l0) = events_accounted(&before);
        let (e1, s1, l1) = events_accounted(&after);
        let (emitted, suppressed, lost) = (e1 - e0, s1 - s0, l1 - l0);
        assert_eq!(denied, u64::from(n), "{what}: every frame denied");
        assert_eq!(
            emitted + suppressed + lost,
            denied,
            "{what}: emitted + suppressed + lost == denied"
        );
        let read = get(&after, "moat_agent_events_read_total");
        assert_eq!(read, e1, "{what}: the agent read every emitted event");
        match rate {
            None => assert!(suppressed > 0 && emitted <= 200 + 100 * (caught_up.as_secs() + 2)),
            Some(_) => assert_eq!(suppressed, 0),
        }
        eprintln!(
            "flood ({what}): {n} live frames in {:.3} s ({:.0} ns/frame): {emitted} emitted, {suppressed} suppressed, {lost} lost; the agent read all {read} within {:.3} s ({:.0} events/s)",
            took.as_secs_f64(),
            took.as_nanos() as f64 / f64::from(n),
            caught_up.as_secs_f64(),
            read as f64 / caught_up.as_secs_f64(),
        );
        drop(agent);
    }
}

/// Events per second from the kernel to a subscriber, and the kernel
/// cost of a denied packet with and without its event.
#[test]
fn event_path_throughput_and_cost_per_denied_packet() {
    let lab = Lab::new();
    let frame = lab.syn(40000, 23);
    // Bursts that fit the ring buffer (1 MiB, 112-byte events), each
    // started once the subscriber has the previous one: nothing is lost,
    // and the time is that of the whole path.
    const BURST: u32 = 8_000;
    let bursts: u32 = std::env::var("MOAT_THROUGHPUT_BURSTS")
        .ok()
        .map(|v| v.parse().expect("MOAT_THROUGHPUT_BURSTS: a number"))
        .unwrap_or(10);
    let agent = start_agent(&lab, &["--event-rate", "0", "--subscriber-queue", "16384"]);
    let mut sub = subscribe(&lab.socket());
    let started = Instant::now();
    let mut with_event_ns = Vec::new();
    for _ in 0..bursts {
        let (_, mean) = test_run(&lab.worker, "eth1", frame.clone(), BURST, false);
        with_event_ns.push(mean);
        let (mut got, mut missed) = (0, 0);
        while got + missed < u64::from(BURST) {
            let (e, m) = count_messages(&mut sub).expect("the agent keeps the stream open");
            got += e;
            missed += m;
        }
        assert_eq!(missed, 0, "the subscriber keeps up");
    }
    let took = started.elapsed();
    let total = u64::from(BURST * bursts);
    let m = metrics(&lab);
    let (emitted, suppressed, lost) = events_accounted(&m);
    assert_eq!((emitted, suppressed, lost), (total, 0, 0));
    assert_eq!(get(&m, "moat_agent_events_read_total"), total);
    drop(agent);

    // The default rate limit: past the first 200, every event is
    // suppressed.
    let agent = start_agent(&lab, &[]);
    let mut suppressed_ns = Vec::new();
    for _ in 0..bursts {
        let (_, mean) = test_run(&lab.worker, "eth1", frame.clone(), BURST, false);
        suppressed_ns.push(mean);
    }
    let m = metrics(&lab);
    let (emitted, suppressed, lost) = events_accounted(&m);
    assert_eq!(emitted + suppressed + lost, total);
    assert!(
        suppressed >= total - 200 - 100 * 60,
        "rate limited: {suppressed}"
    );
    drop(agent);
    let median = |v: &mut Vec<u32>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    eprintln!(
        "event path: {total} events kernel -> agent -> subscriber in {:.3} s: {:.0} events/s; \
         cost per denied packet (BPF_PROG_TEST_RUN, median of {bursts} x {BURST}): \
         {} ns with its event written, {} ns with the event suppressed",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        median(&mut with_event_ns),
        median(&mut suppressed_ns),
    );
}

#[test]
fn events_go_to_the_events_file_and_syslog() {
    use std::os::unix::{fs::PermissionsExt as _, net::UnixDatagram};
    let lab = Lab::new();
    let syslog_path = lab.dir.0.join("log.sock");
    let syslog = UnixDatagram::bind(&syslog_path).expect("syslog socket");
    syslog
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let file = lab.dir.0.join("events.jsonl");
    let agent = start_agent(
        &lab,
        &[
            "--metrics-addr",
            "none",
            "--events-file",
            file.to_str().expect("utf-8"),
            "--syslog",
            "--syslog-socket",
            syslog_path.to_str().expect("utf-8"),
        ],
    );
    send_frames(&lab, (0..3).map(|i| lab.syn(43000 + i, 23)).collect());
    let mut buf = [0u8; 4096];
    for i in 0..3 {
        let n = syslog.recv(&mut buf).expect("a syslog datagram");
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.starts_with("<28>moat["), "{msg}");
        assert!(
            msg.contains("]: calico-packet: IN=eth1 OUT= MAC=")
                && msg.contains(&format!("SPT={} DPT=23 ", 43000 + i)),
            "{msg}"
        );
    }
    drop(agent);
    let text = std::fs::read_to_string(&file).expect("events file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (i, e) in lines.iter().enumerate() {
        assert_eq!(e["sport"], 43000 + i as u64);
        assert_eq!(e["policy"], "deny-remote-shells");
        assert_eq!(e["rule"], 1);
    }
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "personal data: owner only");
}
