//! `moat trace` against a running agent: the real `moat agent` enforcing a
//! policy directory on a veth in a network namespace, and `moat trace`
//! judging packets with the agent's pinned maps, leaving them untouched.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use moat_common::{map_names, EventBucket, FlowKey, FlowState, FragKey, FragmentL4, RuleStats};
use moat_tests::{
    in_netns, lab_policy, mac_of, moat_bin, spawn_in, worker_and_client, AgentProcess, Netns,
    PinDir, TempDir,
};

const WORKER: &str = "198.18.1.1";
const CLIENT: &str = "198.18.1.2";

/// A worker (`eth1` 198.18.1.1) running the agent, a client (198.18.1.2);
/// IPv6 off so nothing but the test's packets moves the counters.
struct Lab {
    worker: Netns,
    client: Netns,
    dir: TempDir,
    pins: PinDir,
    agent: Option<AgentProcess>,
}

impl Lab {
    fn new() -> Self {
        let (worker, client) = worker_and_client("tw", "tc", false);
        // Permanent neighbours: no ARP to move the counters meanwhile.
        let (wmac, cmac) = (mac_of(&worker, "eth1"), mac_of(&client, "eth0"));
        let hex = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        for (ns, ifname, addr, mac) in [
            (&worker, "eth1", CLIENT, hex(cmac)),
            (&client, "eth0", WORKER, hex(wmac)),
        ] {
            ns.exec(
                "ip",
                &[
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    &mac,
                    "dev",
                    ifname,
                    "nud",
                    "permanent",
                ],
            );
        }
        let dir = TempDir::new("moat-trace-");
        std::fs::create_dir_all(dir.0.join("policies")).expect("policy dir");
        std::fs::write(dir.0.join("policies/policy.yaml"), lab_policy()).expect("policy");
        let mut lab = Lab {
            worker,
            client,
            dir,
            pins: PinDir::new(),
            agent: None,
        };
        lab.start_agent();
        lab
    }

    fn policies(&self) -> PathBuf {
        self.dir.0.join("policies")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.0.join("last-good.json")
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("events.sock")
    }

    fn start_agent(&mut self) {
        let mut args: Vec<std::ffi::OsString> = vec!["--policies".into(), self.policies().into()];
        args.extend(
            ["--iface", "eth1", "--node", "worker-1", "-o", "none"].map(std::ffi::OsString::from),
        );
        args.extend(["--socket".into(), self.socket().into()]);
        args.extend(self.pins.args().map(std::ffi::OsString::from));
        args.extend([
            "--detach-on-exit".into(),
            "--state-file".into(),
            self.state_file().into(),
        ]);
        args.extend(
            ["--status-file", "none", "--metrics-addr", "none"].map(std::ffi::OsString::from),
        );
        // The pins are the lab's: the trace reads them while the agent runs.
        let mut agent = AgentProcess::spawn(&self.worker, args, None);
        agent.wait_for_log("ready:");
        self.agent = Some(agent);
    }

    /// `moat trace` in the worker's namespace against the agent's pins:
    /// (JSON, exit code, stderr).
    fn trace(&self, args: &[&str]) -> (serde_json::Value, i32, String) {
        let out = self
            .worker
            .command(moat_bin().to_str().expect("utf-8 path"))
            .arg("trace")
            .args(self.pins.args())
            .arg("--state-file")
            .arg(self.state_file())
            .args(["--iface", "eth1", "--node", "worker-1", "-o", "json"])
            .args(args)
            .output()
            .expect("moat trace runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (v, out.status.code().unwrap_or(-1), stderr)
    }

    /// As `trace`, with the agent's own policy directory as reference.
    fn trace_with_policies(&self, args: &[&str]) -> (serde_json::Value, i32, String) {
        let dir = self.policies().display().to_string();
        self.trace(&[&["--policies", dir.as_str()], args].concat())
    }

    /// What the live state holds: the program's writable maps as numbers,
    /// the pin directory's files, the agent's event history.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            conntrack: conntrack(&self.pins.0).len(),
            counters: per_cpu_sums(&self.pins.0.join(map_names::COUNTERS)),
            rule_stats: rule_stats(&self.pins.0),
            buckets: entries::<[u8; 16], EventBucket>(&self.pins.0.join(map_names::EVENT_BUCKETS)),
            fragments: entries::<FragKey, FragmentL4>(&self.pins.0.join(map_names::FRAGMENTS)),
            pins: files(&self.pins.0),
            events: events(&self.socket()),
        }
    }
}

impl Drop for Lab {
    /// The agent ends before the namespaces and pins go.
    fn drop(&mut self) {
        drop(self.agent.take());
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    conntrack: usize,
    counters: Vec<u64>,
    /// (slot, packets, bytes) of every rule slot that counted a packet.
    rule_stats: Vec<(u32, u64, u64)>,
    buckets: usize,
    fragments: usize,
    pins: BTreeSet<PathBuf>,
    events: Vec<String>,
}

fn conntrack(pins: &Path) -> Vec<(FlowKey, FlowState)> {
    let data = MapData::from_pin(pins.join(map_names::CONNTRACK)).expect("conntrack pin");
    let map: HashMap<MapData, FlowKey, FlowState> =
        HashMap::try_from(Map::LruHashMap(data)).expect("conntrack map");
    map.iter().filter_map(Result::ok).collect()
}

/// Entries of the LRU hash map pinned at `path`, keys `K`, values `V`.
fn entries<K: aya::Pod, V: aya::Pod>(path: &Path) -> usize {
    let data = MapData::from_pin(path).expect("pin");
    let map: HashMap<MapData, K, V> =
        HashMap::try_from(Map::LruHashMap(data)).expect("LRU hash map");
    map.keys().count()
}

fn per_cpu_sums(path: &Path) -> Vec<u64> {
    let data = MapData::from_pin(path).expect("pin");
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("per-CPU array");
    (0..map.len())
        .map(|i| map.get(&i, 0).expect("entry").iter().sum())
        .collect()
}

fn rule_stats(pins: &Path) -> Vec<(u32, u64, u64)> {
    let path = pins.join(map_names::RULE_STATS);
    let data = MapData::from_pin(&path).expect("pin");
    let map: PerCpuArray<MapData, RuleStats> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("per-CPU array");
    (0..map.len())
        .filter_map(|i| {
            let v = map.get(&i, 0).expect("entry");
            let (p, b) = v
                .iter()
                .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes));
            (p > 0).then_some((i, p, b))
        })
        .collect()
}

fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir)
        .expect("pin dir")
        .filter_map(Result::ok)
    {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        }
        out.insert(p);
    }
    out
}

/// Every event in the agent's history (`moat tail --no-follow`).
fn events(socket: &Path) -> Vec<String> {
    let out = Command::new(moat_bin())
        .arg("tail")
        .arg("--socket")
        .arg(socket)
        .args(["-o", "json", "--no-follow"])
        .output()
        .expect("moat tail runs");
    assert!(
        out.status.success(),
        "moat tail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"type\":\"event\""))
        .map(str::to_string)
        .collect()
}

fn listen(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().expect("address");
    let (tx, rx) = mpsc::channel();
    spawn_in(&ns.name, move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tx.send(()).expect("signal bound");
        let mut held = Vec::new();
        for stream in listener.incoming() {
            // Keep each connection open: the test traces its packets.
            held.push(stream);
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("listener bound");
}

#[test]
fn live_trace_judges_with_the_node_state_and_leaves_it_untouched() {
    let lab = Lab::new();
    listen(&lab.worker, "0.0.0.0:8080");
    // Some real traffic first, so the live maps hold something to disturb:
    // a connection to 8080 (logged, allowed, tracked) and a denied SYN.
    let to: SocketAddr = format!("{WORKER}:8080").parse().expect("addr");
    let _conn = in_netns(&lab.client.name, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("8080 is allowed")
    });
    let ssh: SocketAddr = format!("{WORKER}:23").parse().expect("addr");
    in_netns(&lab.client.name, move || {
        TcpStream::connect_timeout(&ssh, Duration::from_millis(300)).expect_err("telnet is denied")
    });
    // Wait for the events to reach the agent's history, then for the
    // state to settle (the SYN retransmission of the denied connect).
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&lab.socket()).len() < 2 {
        assert!(Instant::now() < deadline, "no events from the agent");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let before = lab.snapshot();
    assert!(before.conntrack >= 2, "{before:?}");
    assert!(!before.rule_stats.is_empty(), "{before:?}");

    // An allowed packet: Log hit, then Allow, both named.
    let (v, code, stderr) =
        lab.trace_with_policies(&["--ingress", "tcp 198.18.1.2:40000 -> 198.18.1.1:8080"]);
    assert_eq!(code, 0, "{v:#}\n{stderr}");
    assert_eq!(v["mode"], "live", "{v:#}");
    assert_eq!(v["agree"], true, "{v:#}");
    assert_eq!(v["kernel"]["verdict"], "allow", "{v:#}");
    assert_eq!(v["path"], "policy_allowed", "{v:#}");
    assert_eq!(
        v["kernel"]["logged"],
        serde_json::json!([["log-then-allow-web", 0]]),
        "{v:#}"
    );
    assert_eq!(v["generation"], 1, "{v:#}");
    assert_eq!(v["program"]["same"], true, "{v:#}");
    // The program is the one attached to eth1.
    let link = lab
        .worker
        .exec("ip", &["-d", "link", "show", "dev", "eth1"]);
    let id = v["program"]["id"].as_u64().expect("program id");
    assert!(
        link.contains(&format!("prog/xdp id {id} ")),
        "program {id} is not the one on eth1: {link}"
    );

    // A denied packet: the rule and policy that deny it.
    let (v, code, stderr) =
        lab.trace_with_policies(&["--ingress", "tcp 198.18.1.2:40001 -> 198.18.1.1:23"]);
    assert_eq!(code, 0, "{v:#}\n{stderr}");
    assert_eq!(v["agree"], true, "{v:#}");
    assert_eq!(v["kernel"]["verdict"], "deny", "{v:#}");
    assert_eq!(
        v["kernel"]["policy"], "GlobalNetworkPolicy/deny-remote-shells",
        "{v:#}"
    );
    assert_eq!(v["kernel"]["rule"], 1, "{v:#}");
    assert_eq!(v["reference"]["rule"], 1, "{v:#}");
    assert_eq!(v["path"], "rule_denied", "{v:#}");
    // Default deny, and an egress packet (the TC program, on eth1).
    let (v, code, _) =
        lab.trace_with_policies(&["--ingress", "udp 198.18.1.2:5000 -> 198.18.1.1:53"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(
        (v["kernel"]["verdict"].as_str(), v["path"].as_str()),
        (Some("deny"), Some("end_of_policies_denied")),
        "{v:#}"
    );
    let (v, code, _) =
        lab.trace_with_policies(&["--egress", "tcp 198.18.1.1:40000 -> 198.18.1.2:443"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(
        (v["kernel"]["verdict"].as_str(), v["path"].as_str()),
        (Some("allow"), Some("policy_allowed")),
        "{v:#}"
    );
    // Forwarded or not is the node's call (its addresses and routes), not
    // the flag's: a packet to a pod address the node routes onward is
    // forwarded traffic, allowed with no applyOnForward policy.
    lab.worker
        .exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
    lab.worker.exec(
        "ip",
        &["route", "add", "172.30.1.0/24", "via", "198.18.1.2"],
    );
    let (v, code, _) =
        lab.trace_with_policies(&["--ingress", "tcp 198.18.1.2:40000 -> 172.30.1.5:80"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(
        (v["path"].as_str(), v["reference"]["forwarded"].as_bool()),
        (Some("forwarded_allowed"), Some(true)),
        "{v:#}"
    );
    assert_eq!(v["agree"], true, "{v:#}");
    // Without --policies: the kernel's verdict, names from the saved
    // state, no reference (and no invented agreement).
    let (v, code, _) = lab.trace(&["--ingress", "tcp 198.18.1.2:40001 -> 198.18.1.1:23"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["reference"], serde_json::Value::Null, "{v:#}");
    assert_eq!(v["agree"], serde_json::Value::Null, "{v:#}");
    assert_eq!(v["kernel"]["policy"], "deny-remote-shells", "{v:#}");
    assert_eq!(v["kernel"]["rule"], 1, "{v:#}");

    // Nothing the node holds moved: conntrack, counters, rule counters,
    // event buckets, the pin directory, the agent's events.
    std::thread::sleep(Duration::from_millis(300));
    let after = lab.snapshot();
    assert_eq!(before, after, "moat trace changed the node's state");
}

#[test]
fn an_established_flow_is_allowed_by_conntrack_as_on_the_node() {
    let lab = Lab::new();
    // The worker connects out to the client (egress allows everything):
    // the replies arriving on eth1 pass only because the flow is tracked.
    listen(&lab.client, "0.0.0.0:5555");
    let to: SocketAddr = format!("{CLIENT}:5555").parse().expect("addr");
    let conn = in_netns(&lab.worker.name, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("egress is allowed")
    });
    let port = conn.local_addr().expect("local address").port();
    let reply = format!("tcp 198.18.1.2:5555 -> 198.18.1.1:{port} flags ACK");
    let (v, code, stderr) = lab.trace_with_policies(&["--ingress", &reply]);
    assert_eq!(code, 0, "{v:#}\n{stderr}");
    assert_eq!(v["kernel"]["verdict"], "allow", "{v:#}");
    assert_eq!(v["path"], "conntrack_allowed", "{v:#}");
    assert_eq!(v["reference"]["established"], true, "{v:#}");
    assert_eq!(v["agree"], true, "{v:#}");
    // The same packet on a port no flow uses: policy decides, and denies.
    let stray = format!(
        "tcp 198.18.1.2:5555 -> 198.18.1.1:{} flags ACK",
        if port == 65535 { 1024 } else { port + 1 }
    );
    let (v, _, _) = lab.trace_with_policies(&["--ingress", &stray]);
    assert_eq!(v["kernel"]["verdict"], "deny", "{v:#}");
    assert_eq!(v["agree"], true, "{v:#}");
    drop(conn);
}

#[test]
fn a_policy_the_node_does_not_enforce_disagrees_loudly() {
    let lab = Lab::new();
    // A directory where ssh is allowed: the node still denies it (the
    // agent enforces its own directory), and trace says so, exit 5.
    let other = TempDir::new("moat-trace-");
    std::fs::write(
        other.0.join("policy.yaml"),
        lab_policy().replace("    - action: Deny\n", "    - action: Allow\n"),
    )
    .expect("policy");
    let other_dir = other.0.display().to_string();
    let (v, code, _) = lab.trace(&[
        "--policies",
        &other_dir,
        "--ingress",
        "tcp 198.18.1.2:40001 -> 198.18.1.1:23",
    ]);
    assert_eq!(code, 5, "{v:#}");
    assert_eq!(v["agree"], false, "{v:#}");
    assert_eq!(v["kernel"]["verdict"], "deny", "{v:#}");
    assert_eq!(v["reference"]["verdict"], "allow", "{v:#}");
    // In text, loudly.
    let out = lab
        .worker
        .command(moat_bin().to_str().expect("utf-8 path"))
        .arg("trace")
        .args(lab.pins.args())
        .args([
            "--state-file",
            "none",
            "--iface",
            "eth1",
            "--node",
            "worker-1",
        ])
        .args(["--policies", &other_dir])
        .args(["--ingress", "tcp 198.18.1.2:40001 -> 198.18.1.1:23"])
        .output()
        .expect("moat trace runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert!(
        text.contains("!!! THE NODE'S KERNEL AND THE REFERENCE DISAGREE"),
        "{text}"
    );
    assert!(text.contains("policy names unknown"), "{text}");
}

#[test]
fn no_live_state_is_a_clear_error() {
    let lab = Lab::new();
    // A pin directory nobody uses, and an interface the agent does not
    // enforce.
    let nowhere = format!("{}/{}", moat_tests::TEST_BPFFS, moat_tests::unique("none-"));
    for (pin_dir, iface) in [
        (nowhere.as_str(), "eth1"),
        (&*lab.pins.0.to_string_lossy(), "lo"),
    ] {
        let out = lab
            .worker
            .command(moat_bin().to_str().expect("utf-8 path"))
            .args(["trace", "--pin-dir", pin_dir, "--iface", iface])
            .arg("--policies")
            .arg(lab.policies())
            .args(["--ingress", "tcp 198.18.1.2:40001 -> 198.18.1.1:23"])
            .output()
            .expect("moat trace runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("nothing enforced on {iface}: no moat pins at"))
                && stderr.contains("--offline"),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "no verdict printed");
    }
    assert!(
        !Path::new(&nowhere).exists(),
        "trace created the pin directory it was pointed at"
    );
    // --offline still traces DIR's policy.
    let out = lab
        .worker
        .command(moat_bin().to_str().expect("utf-8 path"))
        .args([
            "trace",
            "--offline",
            "--iface",
            "eth1",
            "--node",
            "worker-1",
            "-o",
            "json",
        ])
        .arg("--policies")
        .arg(lab.policies())
        .args(["--ingress", "tcp 198.18.1.2:40001 -> 198.18.1.1:23"])
        .output()
        .expect("moat trace runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(v["mode"], "offline", "{v:#}");
    assert_eq!(v["kernel"]["rule"], 1, "{v:#}");
    assert_eq!(v["agree"], true, "{v:#}");
}

/// Puts `prog` behind the link pinned at `pin` (bpf(BPF_LINK_UPDATE)), as
/// an upgrade to another build would.
fn replace_program_behind(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let path = std::ffi::CString::new(pin.to_str().expect("utf-8")).expect("no NUL");
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let attr: [u64; 2] = [path.as_ptr() as u64, 0];
    // SAFETY: a valid attribute for BPF_OBJ_GET; `path` outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), 16) };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // link_fd, new_prog_fd, flags, old_prog_fd.
    let attr: [u32; 4] = [link.as_raw_fd() as u32, prog.as_raw_fd() as u32, 0, 0];
    // SAFETY: a valid attribute for BPF_LINK_UPDATE of the size given.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_ptr(), 16) };
    assert_eq!(
        rc,
        0,
        "BPF_LINK_UPDATE: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn another_build_on_the_node_is_said_loudly() {
    let lab = Lab::new();
    // Another program behind the node's XDP link (here: one that passes
    // everything): trace runs this binary's program on the node's maps,
    // says the node runs something else, and exits 5.
    let other = moat::dataplane::testrun::RawXdp::load(moat::dataplane::testrun::Baseline::Pass)
        .expect("baseline program");
    replace_program_behind(&lab.pins.0.join("links/eth1_xdp"), other.fd());
    let (v, code, _) =
        lab.trace_with_policies(&["--ingress", "tcp 198.18.1.2:40001 -> 198.18.1.1:23"]);
    assert_eq!(code, 5, "{v:#}");
    assert_eq!(v["program"]["same"], false, "{v:#}");
    assert_ne!(v["program"]["tag"], v["program"]["traced_tag"], "{v:#}");
    assert_eq!(v["agree"], true, "{v:#}");
    let notes = v["notes"].to_string();
    assert!(notes.contains("does not read the map pinned as"), "{v:#}");
    // The egress program is still this build's: no alarm there.
    let (v, code, _) =
        lab.trace_with_policies(&["--egress", "tcp 198.18.1.1:40000 -> 198.18.1.2:443"]);
    assert_eq!(
        (code, &v["program"]["same"]),
        (0, &serde_json::Value::Bool(true)),
        "{v:#}"
    );
}
