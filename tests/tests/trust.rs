//! Agent-side trust (issue 12), with the real `moat agent` in network
//! namespaces the tests create: "ready" only when every interface asked
//! for is protected (checked against the kernel), the directory source
//! reading a kubelet-mounted ConfigMap, the last good version of invalid
//! objects surviving a restart, and a bounded HTTP endpoint.

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use moat_tests::{
    in_netns, lab_policy, listen, moat_bin, worker_and_client, AgentProcess, Netns, PinDir, TempDir,
};

/// A worker (`eth1` 198.18.1.1) and a client, a directory for the
/// agent's files, the lab policy in `policies/`.
struct Lab {
    worker: Netns,
    client: Netns,
    dir: TempDir,
}

impl Lab {
    fn new() -> Self {
        let (worker, client) = worker_and_client("tw", "tc", false);
        let dir = TempDir::new("moat-trust-");
        std::fs::create_dir_all(dir.0.join("policies")).expect("policy dir");
        std::fs::write(dir.0.join("policies/policy.yaml"), lab_policy()).expect("policy");
        Lab {
            worker,
            client,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// `moat agent` arguments: the files in the lab's directory, the
    /// metrics endpoint on the worker's loopback, then `extra`.
    fn args(&self, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--state-file".into(),
            self.path("state.json").into(),
            "--status-file".into(),
            self.path("status.json").into(),
            "--socket".into(),
            self.path("events.sock").into(),
        ];
        args.extend(["-o", "none", "--profile", "none"].map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        args
    }

    fn spawn(&self, extra: &[&str], pins: &PinDir) -> AgentProcess {
        let mut args = self.args(extra);
        args.extend(pins.args().map(OsString::from));
        AgentProcess::spawn(&self.worker, args, None)
    }

    /// A GET on the agent's metrics endpoint: status code and body.
    fn get(&self, path: &str) -> (u16, String) {
        let path = path.to_string();
        in_netns(&self.worker.name, move || http_get("127.0.0.1:9464", &path))
    }

    /// `moat status` on the lab's status file: exit code and output.
    fn status(&self) -> (Option<i32>, String) {
        let out = Command::new(moat_bin())
            .arg("status")
            .arg("--status-file")
            .arg(self.path("status.json"))
            .output()
            .expect("moat status runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn status_json(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path("status.json")).expect("status file");
        serde_json::from_str(&text).expect("status JSON")
    }

    /// Whether a TCP connection from the client to the worker's `port` is
    /// accepted within `timeout`.
    fn connects(&self, port: u16, timeout: Duration) -> bool {
        let to: SocketAddr = format!("198.18.1.1:{port}").parse().expect("address");
        in_netns(&self.client.name, move || {
            TcpStream::connect_timeout(&to, timeout).is_ok()
        })
    }
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
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
}

/// The value of the sample `name` (no labels) in an OpenMetrics text.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in {body}"))
}

/// Polls `cond` for up to 10 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent is up (its event reader and metrics endpoint answer) and
/// has applied its first sync.
fn wait_synced(lab: &Lab) {
    eventually("the status file shows the first sync", || {
        std::fs::read_to_string(lab.path("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|s| s["source"]["synced"] == true)
    });
}

/// Asserts the agent is not ready, everywhere it says so, for `why`.
fn assert_not_ready(lab: &Lab, agent: &mut AgentProcess, why: &[&str], never_ready: bool) {
    let line = agent.wait_for_log("NOT protecting every interface");
    for w in why {
        assert!(line.contains(w), "{w:?} not in the log line {line}");
    }
    assert!(line.contains("WARN"), "logged at WARN: {line}");
    let (code, body) = lab.get("/readyz");
    assert_eq!(code, 503, "{body}");
    for w in why {
        assert!(body.contains(w), "{w:?} not in /readyz: {body}");
    }
    let (code, body) = lab.get("/metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(sample(&body, "moat_ready"), 0.0);
    eventually(
        "moat status exits 7 (unprotected) naming the interface",
        || {
            let (code, text) = lab.status();
            code == Some(7) && why.iter().all(|w| text.contains(w))
        },
    );
    assert!(
        !never_ready || !agent.logged().iter().any(|l| l.contains(" ready:")),
        "never logged ready: {:#?}",
        agent.logged()
    );
}

#[test]
fn a_mistyped_interface_or_node_is_not_ready() {
    let lab = Lab::new();
    let policies = lab.path("policies");
    let policies = policies.to_str().expect("utf-8");
    // eth7 does not exist: eth1 does.
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            policies,
            "--iface",
            "eth7",
            "--node",
            "worker-1",
        ],
        &pins,
    );
    wait_synced(&lab);
    assert_not_ready(
        &lab,
        &mut agent,
        &["eth7: no such interface", "did you mean eth1?"],
        true,
    );
    let v = lab.status_json();
    assert_eq!(v["ready"], false, "{v:#}");
    agent.stop();

    // worker-l is not worker-1: eth1 is attached but nothing governs it.
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            policies,
            "--iface",
            "eth1",
            "--node",
            "worker-l",
        ],
        &pins,
    );
    wait_synced(&lab);
    assert_not_ready(
        &lab,
        &mut agent,
        &[
            "eth1: no HostEndpoint of node worker-l names it",
            "did you mean node worker-1?",
        ],
        true,
    );
    agent.stop();
}

#[test]
fn ready_is_checked_against_the_kernel() {
    let lab = Lab::new();
    listen(&lab.worker, "0.0.0.0:8080");
    let policies = lab.path("policies");
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            policies.to_str().expect("utf-8"),
            "--iface",
            "eth1",
            "--node",
            "worker-1",
        ],
        &pins,
    );
    let line = agent.wait_for_log(" ready:");
    assert!(line.contains("enforced on eth1"), "{line}");
    let (code, body) = lab.get("/readyz");
    assert_eq!(code, 200, "{body}");
    let (_, body) = lab.get("/metrics");
    assert_eq!(sample(&body, "moat_ready"), 1.0);
    eventually("moat status exits 0", || lab.status().0 == Some(0));
    assert!(lab.connects(8080, Duration::from_secs(2)), "8080 allowed");

    // Someone removes the XDP link behind the agent's back (its pin was
    // the last reference): the kernel no longer runs moat on eth1, and
    // the agent says so.
    let xdp = moat::dataplane::link_pin(&pins.0, "eth1", moat_common::direction::INGRESS);
    std::fs::remove_file(&xdp).expect("removing the XDP link pin");
    assert_not_ready(&lab, &mut agent, &["eth1: not attached"], false);
    agent.stop();
}

/// Writes `files` (name, text) into `dir` as kubelet's atomic writer lays
/// out a ConfigMap volume: the data in a timestamped directory, `..data`
/// a symlink to it, and each file a symlink through `..data`.
fn configmap(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
    let data = dir.join(format!("..{stamp}"));
    std::fs::create_dir_all(&data).expect("data dir");
    for (name, text) in files {
        std::fs::write(data.join(name), text).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename ..data");
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("symlink");
        }
    }
}

#[test]
fn a_configmap_volume_is_read_once_and_enforced() {
    let lab = Lab::new();
    for port in [8080, 9090] {
        listen(&lab.worker, &format!("0.0.0.0:{port}"));
    }
    // The policy directory holds the ConfigMap volume, and two symlink
    // loops: reported, never followed forever.
    let vol = lab.path("vol");
    let cm = vol.join("cm");
    std::fs::create_dir_all(&cm).expect("cm dir");
    let policy = lab_policy();
    configmap(
        &cm,
        "2026_12_04_18_00_00.000000001",
        &[("policy.yaml", &policy)],
    );
    std::os::unix::fs::symlink(".", vol.join("a")).expect("loop a");
    std::os::unix::fs::symlink(".", vol.join("b")).expect("loop b");
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            vol.to_str().expect("utf-8"),
            "--iface",
            "eth1",
            "--node",
            "worker-1",
        ],
        &pins,
    );
    let line = agent.wait_for_log(" ready:");
    assert!(line.contains("enforced on eth1"), "{line}");
    let logged = agent.logged();
    assert!(
        !logged.iter().any(|l| l.contains("more than once")),
        "{logged:#?}"
    );
    assert!(
        logged.iter().any(|l| l.contains("symlink loop")),
        "the loops are reported: {logged:#?}"
    );
    assert!(lab.connects(8080, Duration::from_secs(2)), "8080 allowed");
    assert!(
        !lab.connects(9090, Duration::from_millis(300)),
        "9090 denied"
    );
    let v = lab.status_json();
    assert_eq!(v["source"]["invalid_objects"], 0, "{v:#}");

    // The ConfigMap is updated (a new timestamped directory, ..data
    // swapped): the new policy is enforced.
    let updated = format!(
        "{policy}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: allow-9090}}\nspec:\n  selector: ibm.role == 'worker_public'\n  order: 5\n  ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [9090]}}}}]\n"
    );
    configmap(
        &cm,
        "2026_12_04_18_05_00.000000002",
        &[("policy.yaml", &updated)],
    );
    eventually("9090 allowed after the ConfigMap update", || {
        lab.connects(9090, Duration::from_millis(200))
    });
    assert!(
        !agent.logged().iter().any(|l| l.contains("more than once")),
        "{:#?}",
        agent.logged()
    );
    agent.stop();
}

const HEP: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: worker-1-public, labels: {ibm.role: worker_public}}
spec: {node: worker-1, interfaceName: eth1}
";

/// A policy allowing TCP `port` in on the public interface.
fn allow(name: &str, port: u16) -> String {
    format!(
        "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: {name}}}
spec:
  selector: ibm.role == 'worker_public'
  order: 100
  ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [{port}]}}}}]
"
    )
}

/// Writes `text` to `dir/name` beside and renamed in, as tools do.
fn put(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

#[test]
fn the_last_good_version_survives_a_restart() {
    let lab = Lab::new();
    for port in [8080, 9090, 7070] {
        listen(&lab.worker, &format!("0.0.0.0:{port}"));
    }
    let dir = lab.path("p");
    std::fs::create_dir_all(&dir).expect("dir");
    put(&dir, "hep.yaml", HEP);
    put(&dir, "web.yaml", &allow("allow-web", 8080));
    put(&dir, "m.yaml", &allow("allow-metrics", 9090));
    let args = [
        "--policies",
        dir.to_str().expect("utf-8"),
        "--iface",
        "eth1",
        "--node",
        "worker-1",
    ];
    let pins = PinDir::new();
    let mut agent = lab.spawn(&args, &pins);
    agent.wait_for_log(" ready:");
    assert!(lab.connects(9090, Duration::from_secs(2)), "9090 allowed");
    // An invalid edit: the last good version stays in force.
    put(
        &dir,
        "m.yaml",
        &allow("allow-metrics", 9090).replace("ports: [9090]", "ports: [70000]"),
    );
    agent.wait_for_log("the last good one stays in force");
    // Saved once applied: wait for the state file to hold it.
    eventually("the saved state holds the last good text", || {
        std::fs::read_to_string(lab.path("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["last_good_texts"].as_object().map(|o| o.len()))
            == Some(1)
    });
    assert!(
        lab.connects(9090, Duration::from_secs(2)),
        "9090 still allowed"
    );
    agent.stop();
    drop(pins);

    // Restarted on fresh maps (as after a reboot): the first sync sees
    // the same invalid edit, and enforces exactly what ran before.
    let pins = PinDir::new();
    let mut agent = lab.spawn(&args, &pins);
    agent.wait_for_log("the last good one stays in force");
    agent.wait_for_log(" ready:");
    let v = lab.status_json();
    assert_eq!(v["state"], "in sync", "{v:#}");
    assert_eq!(v["source"]["kept_last_good"], 1, "{v:#}");
    assert!(
        lab.connects(9090, Duration::from_secs(2)),
        "9090 still allowed after the restart"
    );
    assert!(lab.connects(8080, Duration::from_secs(2)), "8080 allowed");
    assert!(
        !lab.connects(7070, Duration::from_millis(300)),
        "7070 denied"
    );
    // moat status names the invalid object, its error and what stays.
    let (code, text) = lab.status();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("GlobalNetworkPolicy/allow-metrics")
            && text.contains("70000")
            && text.contains("last good version stays in force"),
        "{text}"
    );
    agent.stop();
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// Opens `n` connections to the metrics endpoint inside `ns`, every other
/// one with a half-sent request, and holds them until the returned sender
/// is dropped. Returns once they are open, with how many opened.
fn hold_connections(ns: &Netns, n: usize) -> (std::sync::mpsc::Sender<()>, usize) {
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
    moat_tests::spawn_in(&ns.name, move || {
        // This process needs the descriptors too.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        let mut held = Vec::new();
        for i in 0..n {
            let Ok(mut s) = TcpStream::connect("127.0.0.1:9464") else {
                continue;
            };
            if i % 2 == 1 {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            }
            held.push(s);
        }
        opened_tx.send(held.len()).expect("report");
        let _ = close_rx.recv();
    });
    let opened = opened_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("connections opened");
    (close_tx, opened)
}

#[test]
fn the_http_endpoint_is_bounded() {
    let lab = Lab::new();
    for port in [8080, 9090] {
        listen(&lab.worker, &format!("0.0.0.0:{port}"));
    }
    let dir = lab.path("p");
    std::fs::create_dir_all(&dir).expect("dir");
    put(&dir, "hep.yaml", HEP);
    put(&dir, "web.yaml", &allow("allow-web", 8080));
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            dir.to_str().expect("utf-8"),
            "--iface",
            "eth1",
            "--node",
            "worker-1",
        ],
        &pins,
    );
    agent.wait_for_log(" ready:");
    let pid = agent.pid();
    // Few descriptors, so the flood below would exhaust them.
    moat_tests::run("prlimit", &["--pid", &pid.to_string(), "--nofile=512:512"]);
    let (code, _) = lab.get("/metrics");
    assert_eq!(code, 200);
    let before = rss_kib(pid);
    let (close, opened) = hold_connections(&lab.worker, 3_000);
    assert!(opened >= 2_500, "only {opened} connections opened");
    // Held open: the agent serves probes, bounds its descriptors and
    // memory, and applies a policy change.
    let start = Instant::now();
    let (code, body) = lab.get("/healthz");
    assert_eq!(code, 200, "{body}");
    eprintln!(
        "/healthz answered in {:?} with {opened} connections held",
        start.elapsed()
    );
    // Connections closed as the oldest are let go as soon as the runtime
    // next turns: the count settles under the cap.
    let mut fds = 0;
    eventually("the agent's descriptors settle under the cap", || {
        fds = descriptors(pid);
        fds < moat::events::metrics::MAX_CONNECTIONS + 100
    });
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!("{opened} connections held: agent RSS grew {grown} KiB, {fds} descriptors open");
    assert!(grown < 20 * 1024, "RSS grew {grown} KiB");
    put(&dir, "m.yaml", &allow("allow-metrics", 9090));
    eventually("9090 allowed while the connections are held", || {
        lab.connects(9090, Duration::from_millis(200))
    });
    drop(close);
    let (code, _) = lab.get("/readyz");
    assert_eq!(code, 200);
    agent.stop();
}

#[test]
fn a_file_rewritten_in_place_is_read_once_complete() {
    let lab = Lab::new();
    for port in [8080, 9090] {
        listen(&lab.worker, &format!("0.0.0.0:{port}"));
    }
    let dir = lab.path("p");
    std::fs::create_dir_all(&dir).expect("dir");
    let head = format!("{HEP}---\n{}", allow("allow-web", 8080));
    let tail = format!("---\n{}", allow("allow-metrics", 9090));
    put(&dir, "all.yaml", &format!("{head}{tail}"));
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            dir.to_str().expect("utf-8"),
            "--iface",
            "eth1",
            "--node",
            "worker-1",
        ],
        &pins,
    );
    agent.wait_for_log(" ready:");
    assert!(lab.connects(9090, Duration::from_secs(2)), "9090 allowed");
    // Rewritten in place, pausing after the first part for longer than
    // the watcher's debounce and longest delay: the policies not written
    // yet stay in force meanwhile.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join("all.yaml"))
        .expect("open");
    f.write_all(head.as_bytes()).expect("write");
    f.sync_all().expect("sync");
    let paused = Instant::now();
    while paused.elapsed() < Duration::from_millis(2_500) {
        assert!(
            lab.connects(9090, Duration::from_millis(500)),
            "9090 denied {:?} into the paused rewrite",
            paused.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The rest, then closed: read complete, nothing changed.
    f.write_all(tail.as_bytes()).expect("write");
    drop(f);
    std::thread::sleep(Duration::from_millis(800));
    assert!(lab.connects(9090, Duration::from_secs(1)), "9090 allowed");
    assert!(lab.connects(8080, Duration::from_secs(1)), "8080 allowed");
    let v = lab.status_json();
    assert!(v["source"]["reconciles"].as_u64() >= Some(2), "{v:#}");
    assert_eq!(v["source"]["invalid_objects"], 0, "{v:#}");
    agent.stop();
}

#[test]
fn state_and_status_files_are_private_and_written_without_following_links() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("moat-files-");
    // A link planted where a temporary file might be made: never followed.
    let victim = dir.0.join("victim");
    std::fs::write(&victim, "untouched").expect("victim");
    let status = dir.0.join("status.json");
    let planted = dir
        .0
        .join(format!("status.json.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).expect("planted link");
    moat::dataplane::state::write_atomically_mode(&status, b"{}", 0o640).expect("written");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched"
    );
    assert_eq!(std::fs::read_to_string(&status).expect("status"), "{}");
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&status), 0o640);
    let state = dir.0.join("state.json");
    moat::dataplane::state::write_atomically(&state, b"{}").expect("written");
    assert_eq!(mode(&state), 0o600);
    // A directory every user may write to is refused.
    let open = dir.0.join("open");
    std::fs::create_dir(&open).expect("dir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let e = moat::dataplane::state::write_atomically(&open.join("state.json"), b"{}")
        .expect_err("refused");
    assert!(format!("{e:#}").contains("writable by every user"), "{e:#}");

    // And the agent refuses it at start, before attaching anything (an
    // agent that does not is stopped after 20 s).
    let lab = Lab::new();
    let out = lab
        .worker
        .command("timeout")
        .arg("20")
        .arg(moat_bin())
        .args(["agent", "--policies"])
        .arg(lab.path("policies"))
        .args(["--iface", "eth1", "--node", "worker-1", "--no-pin"])
        .arg("--status-file")
        .arg(open.join("status.json"))
        .args([
            "--state-file",
            "none",
            "--socket",
            "none",
            "--metrics-addr",
            "none",
        ])
        .output()
        .expect("moat agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("writable by every user"), "{stderr}");
}

#[test]
fn the_socket_path_is_taken_over_only_from_this_user() {
    use std::os::unix::fs::PermissionsExt as _;
    let lab = Lab::new();
    let sock = lab.path("events.sock");
    // A dangling symlink of this user: removed, the agent starts.
    std::os::unix::fs::symlink(lab.path("nowhere"), &sock).expect("link");
    let pins = PinDir::new();
    let mut agent = lab.spawn(
        &[
            "--policies",
            lab.path("policies").to_str().expect("utf-8"),
            "--iface",
            "eth1",
            "--node",
            "worker-1",
        ],
        &pins,
    );
    agent.wait_for_log("removed a symbolic link");
    agent.wait_for_log(" ready:");
    agent.stop();

    // Another user's socket at the path: refused, saying whose it is.
    let open = lab.path("shared");
    std::fs::create_dir(&open).expect("dir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let theirs = open.join("events.sock");
    let server = serve_as_nobody(&theirs);
    let out = lab
        .worker
        .command("timeout")
        .arg("20")
        .arg(moat_bin())
        .args(["agent", "--policies"])
        .arg(lab.path("policies"))
        .args(["--iface", "eth1", "--node", "worker-1", "--no-pin"])
        .args([
            "--state-file",
            "none",
            "--status-file",
            "none",
            "--metrics-addr",
            "none",
        ])
        .arg("--socket")
        .arg(&theirs)
        .output()
        .expect("moat agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("of another user (uid 65534)"), "{stderr}");
    // Root's moat tail does not read events from it.
    let out = Command::new(moat_bin())
        .args(["tail", "--no-follow", "--socket"])
        .arg(&theirs)
        .output()
        .expect("moat tail runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not by root nor by you"), "{stderr}");
    drop(server);
}

/// A process of uid 65534 listening on a Unix socket at `path`; killed
/// on drop.
struct Nobody(libc::pid_t);

impl Drop for Nobody {
    fn drop(&mut self) {
        // SAFETY: signalling and reaping the child this test forked.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

fn serve_as_nobody(path: &Path) -> Nobody {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child only makes raw system calls, then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    match pid {
        0 => unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(1);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as u32;
            if fd < 0
                || libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0
                || libc::listen(fd, 8) != 0
            {
                libc::_exit(2);
            }
            loop {
                let c = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
                if c >= 0 {
                    libc::close(c);
                }
            }
        },
        child => {
            let nobody = Nobody(child);
            eventually("the other user's socket is there", || path.exists());
            nobody
        }
    }
}
