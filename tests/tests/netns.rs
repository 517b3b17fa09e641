//! The agent end to end: a worker with a public `eth1` and a private `eth0`
//! in network namespaces, real packets from a public client and a private
//! peer, the deny events read from the agent's output.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use moat_tests::{
    add_ipv6_pair, fixtures, in_netns, listen, spawn_in, veth, worker_and_client, AgentProcess,
    Netns, PinDir,
};

/// Tries a TCP connection from inside `ns`: Ok(()) when it was accepted.
fn connect(ns: &Netns, to: &str) -> Result<(), std::io::ErrorKind> {
    let to: SocketAddr = to.parse().expect("address");
    in_netns(&ns.name, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1500))
            .map(drop)
            .map_err(|e| e.kind())
    })
}

fn ping(ns: &Netns, to: &str) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "1", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ping runs")
        .success()
}

/// The test worker (public `eth1` 198.18.1.1, private `eth0` 198.18.0.1),
/// a public client (198.18.1.2) and a private peer (198.18.0.2).
fn lab() -> (Netns, Netns, Netns) {
    let (worker, client) = worker_and_client("mw", "mc", true);
    let peer = Netns::new("mp");
    veth(
        &worker,
        "eth0",
        "198.18.0.1/24",
        &peer,
        "eth0",
        "198.18.0.2/24",
    );
    (worker, client, peer)
}

/// The agent on the worker, enforcing the `public` fixture on `eth1` and
/// `eth0`.
struct Agent {
    process: AgentProcess,
    /// The agent's event socket (`moat tail --socket`).
    socket: std::path::PathBuf,
}

impl Agent {
    fn start(worker: &Netns) -> Self {
        Self::start_with(worker, "json")
    }

    /// Starts the agent with `-o output`, its pins in a directory of its
    /// own.
    fn start_with(worker: &Netns, output: &str) -> Self {
        Self::launch(worker, output, &[], Some(PinDir::new()))
    }

    /// Starts the agent with `extra` arguments, which say where it pins.
    fn start_args(worker: &Netns, output: &str, extra: &[String]) -> Self {
        Self::launch(worker, output, extra, None)
    }

    fn launch(worker: &Netns, output: &str, extra: &[String], pins: Option<PinDir>) -> Self {
        let socket = std::env::temp_dir().join(format!("{}.sock", moat_tests::unique("moat-ev")));
        let mut args: Vec<OsString> = vec!["--policies".into(), fixtures().join("public").into()];
        args.extend(
            [
                "--iface", "eth1", "--iface", "eth0", "--node", "worker-1", "-o", output,
            ]
            .map(OsString::from),
        );
        args.extend(extra.iter().map(OsString::from));
        args.extend(["--socket".into(), socket.clone().into()]);
        // Saved state and status stay out of /var/lib and /run.
        args.extend(["--state-file", "none", "--status-file", "none"].map(OsString::from));
        let mut process = AgentProcess::spawn(worker, args, pins);
        process.wait_for_log("ready:");
        Agent { process, socket }
    }

    /// Every line the agent has logged so far.
    fn logged(&mut self) -> Vec<String> {
        self.process.logged()
    }

    fn kill(self) {
        self.process.kill();
    }

    fn stop(self) {
        self.process.stop();
    }

    /// The next line the agent prints (non-JSON output).
    fn expect_line(&mut self, what: &str) -> String {
        self.process
            .next_stdout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no line from the agent for {what}"))
    }

    /// Waits for an event (`-o json`) satisfying `want`.
    fn expect_event(
        &self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(line) = self.process.next_stdout(left) else {
                break;
            };
            let e: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("agent printed a line that is not JSON ({e}): {line}"));
            if want(&e) {
                return e;
            }
            seen.push(e);
        }
        panic!("no event for {what}; saw {seen:#?}");
    }
}

#[test]
fn public_client_and_private_peer_through_the_agent() {
    let (worker, client, peer) = lab();
    listen(&worker, "0.0.0.0:22");
    listen(&worker, "0.0.0.0:52311");

    // Before moat: everything gets through.
    assert!(ping(&client, "198.18.1.1"));
    assert_eq!(connect(&client, "198.18.1.1:22"), Ok(()));

    let agent = Agent::start(&worker);
    let xdp = worker.exec("ip", &["-d", "link", "show", "eth1"]);
    assert!(xdp.contains("prog/xdp"), "XDP attached to eth1: {xdp}");

    // Public side: ICMP passes, ssh is dropped, BigFix passes.
    assert!(ping(&client, "198.18.1.1"), "allow-icmp");
    let ssh = connect(&client, "198.18.1.1:22");
    assert_eq!(
        ssh,
        Err(std::io::ErrorKind::TimedOut),
        "ssh on the public side must be dropped, not refused"
    );
    let e = agent.expect_event("the dropped ssh SYN", |e| {
        e["dport"] == 22 && e["iface"] == "eth1"
    });
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["direction"], "ingress");
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["src"], "198.18.1.2");
    assert_eq!(e["dst"], "198.18.1.1");
    assert_eq!(e["reason"], "end-of-policies");
    assert_eq!(e["tcp_flags"], "SYN");
    assert_eq!(
        connect(&client, "198.18.1.1:52311"),
        Ok(()),
        "allow-bigfix-port, reply through conntrack"
    );

    // Private side: no policy selects it, so only failsafes (ssh) pass.
    assert_eq!(
        connect(&peer, "198.18.0.1:22"),
        Ok(()),
        "ssh failsafe on the private side"
    );
    assert!(
        !ping(&peer, "198.18.0.1"),
        "ping on the private side is denied"
    );
    agent.expect_event("the private ping", |e| {
        e["iface"] == "eth0" && e["protocol"] == "icmp" && e["reason"] == "no-profile"
    });

    agent.stop();
    let after = worker.exec("ip", &["-d", "link", "show", "eth1"]);
    assert!(!after.contains("prog/xdp"), "XDP detached on exit: {after}");
    assert_eq!(
        connect(&client, "198.18.1.1:22"),
        Ok(()),
        "nothing enforced after exit"
    );
}

/// Restores a sysctl when dropped.
struct Sysctl {
    path: &'static str,
    before: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Self {
        let before = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
        Sysctl { path, before }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.before.trim());
    }
}

#[test]
fn iptables_lines_match_the_kernel_log_target_field_for_field() {
    use moat::dataplane::frame::Packet;
    use moat_tests::{mac_of, send_frame, KernelLog};

    let (worker, client, peer) = lab();
    add_ipv6_pair(&worker, &client);
    // The kernel's LOG target prints from a namespace only with this.
    let _log_all = Sysctl::set("/proc/sys/net/netfilter/nf_log_all_netns", "1");
    for tool in ["iptables", "ip6tables"] {
        worker.exec(
            tool,
            &[
                "-I",
                "INPUT",
                "-j",
                "LOG",
                "--log-prefix",
                "calico-packet: ",
            ],
        );
    }

    // The same bytes go in twice: once to the kernel's LOG target, once
    // to moat, which drops them.
    let frames: Vec<(&str, &Netns, &str, Vec<u8>)> = {
        let with_macs = |p: Packet, to: [u8; 6], from: [u8; 6]| {
            let mut f = p.frame();
            f[..6].copy_from_slice(&to);
            f[6..12].copy_from_slice(&from);
            f
        };
        let (w1, w0, c, p) = (
            mac_of(&worker, "eth1"),
            mac_of(&worker, "eth0"),
            mac_of(&client, "eth0"),
            mac_of(&peer, "eth0"),
        );
        let mut udp = Packet::udp("198.18.1.2", 5353, "198.18.1.1", 53);
        udp.payload = 12;
        vec![
            (
                "tcp syn to ssh",
                &client,
                "eth0",
                with_macs(
                    Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 22, 0x02),
                    w1,
                    c,
                ),
            ),
            ("udp to dns", &client, "eth0", with_macs(udp, w1, c)),
            (
                "ping on the private side",
                &peer,
                "eth0",
                with_macs(Packet::icmp("198.18.0.2", "198.18.0.1", 8, 0), w0, p),
            ),
            (
                "ipv6 tcp to ssh",
                &client,
                "eth0",
                with_macs(
                    Packet::tcp("2001:db8:1::2", 40000, "2001:db8:1::1", 22, 0x02),
                    w1,
                    c,
                ),
            ),
        ]
    };
    let log = KernelLog::open();
    let mut kernel_lines = Vec::new();
    for (what, from, ifname, frame) in &frames {
        send_frame(&from.name, ifname, frame.clone());
        // This packet's line, not one about the namespaces' own background
        // traffic: the kernel prints the source address as moat parses it.
        let src = match moat::policy::reference::parse(frame) {
            moat::policy::reference::Frame::Ip(f) => match f.src {
                std::net::IpAddr::V4(a) => format!("SRC={a} "),
                std::net::IpAddr::V6(a) => format!(
                    "SRC={} ",
                    a.segments()
                        .iter()
                        .map(|s| format!("{s:04x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            },
            other => panic!("{what}: {other:?}"),
        };
        let line = log
            .find(&["calico-packet:", &src])
            .unwrap_or_else(|| panic!("{what}: no kernel LOG line"));
        kernel_lines.push(line);
    }

    let mut agent = Agent::start_with(&worker, "iptables");
    for ((what, from, ifname, frame), kernel) in frames.iter().zip(&kernel_lines) {
        send_frame(&from.name, ifname, frame.clone());
        // The node's own background traffic (IPv6 router solicitations, MLD
        // reports) is denied and printed too: take the line about this
        // packet, by its addresses.
        let addresses: Vec<&str> = kernel
            .split_whitespace()
            .filter(|w| w.starts_with("SRC=") || w.starts_with("DST="))
            .collect();
        let ours = loop {
            let line = agent.expect_line(what);
            if addresses
                .iter()
                .all(|a| line.split_whitespace().any(|w| w == *a))
            {
                break line;
            }
        };
        let (k, o): (Vec<&str>, Vec<&str>) = (
            kernel[kernel.find("calico-packet:").expect("prefix")..]
                .split_whitespace()
                .collect(),
            ours.split_whitespace().collect(),
        );
        assert_eq!(o, k, "{what}:\n kernel: {kernel}\n moat:   {ours}");
        eprintln!("{what}: kernel and moat both print: {ours}");
    }
    // `moat tail -o iptables` prints the same lines from the agent's
    // history.
    let tail = std::process::Command::new(moat_tests::moat_bin())
        .args(["tail", "-o", "iptables", "--no-follow", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("moat tail runs");
    assert!(
        tail.status.success(),
        "{}",
        String::from_utf8_lossy(&tail.stderr)
    );
    let tailed = String::from_utf8_lossy(&tail.stdout).into_owned();
    for ((what, ..), kernel) in frames.iter().zip(&kernel_lines) {
        let k: Vec<&str> = kernel[kernel.find("calico-packet:").expect("prefix")..]
            .split_whitespace()
            .collect();
        assert!(
            tailed
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == k),
            "{what}: no moat tail line prints, field for field,\n {kernel}\nin:\n{tailed}"
        );
    }
    agent.stop();
}

#[test]
fn a_second_agent_does_not_take_over_an_attached_interface() {
    let (worker, client, _peer) = lab();
    let first = Agent::start(&worker);
    let second = worker
        .command(moat_tests::moat_bin().to_str().expect("utf-8 path"))
        .args(["agent", "--policies"])
        .arg(fixtures().join("public"))
        .args(["--iface", "eth1", "--node", "worker-1"])
        .args(PinDir::new().args())
        .arg("--socket")
        .arg(std::env::temp_dir().join(format!("{}.sock", moat_tests::unique("moat-ev"))))
        // The first agent serves metrics on this namespace's loopback.
        .args(["--metrics-addr", "none"])
        .args(["--state-file", "none", "--status-file", "none"])
        .output()
        .expect("second agent runs");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second agent must refuse: {stderr}"
    );
    assert!(
        stderr.contains("another XDP program is already attached to eth1"),
        "{stderr}"
    );
    // The first one still enforces.
    assert_eq!(
        connect(&client, "198.18.1.1:22"),
        Err(std::io::ErrorKind::TimedOut)
    );
    first.stop();
}

/// Listens on `addr` inside `ns` and echoes every line back on each
/// connection; returns how many connections it accepted so far.
fn echo_server(ns: &Netns, addr: &str) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::Write as _;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let addr: SocketAddr = addr.parse().expect("address");
    let (tx, rx) = mpsc::channel();
    spawn_in(&ns.name, move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tx.send(()).expect("signal bound");
        for stream in listener.incoming().map_while(Result::ok) {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut out = stream.try_clone().expect("clone");
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if writeln!(out, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("listener bound");
    accepted
}

/// Sends a line on `stream` and reads it back.
fn round_trip(stream: &mut BufReader<TcpStream>, what: &str) -> Result<(), String> {
    use std::io::Write as _;
    let line = format!("moat {what}");
    writeln!(stream.get_mut(), "{line}").map_err(|e| format!("{what}: write: {e}"))?;
    let mut back = String::new();
    stream
        .read_line(&mut back)
        .map_err(|e| format!("{what}: read: {e}"))?;
    if back.trim_end() == line {
        Ok(())
    } else {
        Err(format!("{what}: echoed {back:?}"))
    }
}

/// The restart test: SIGKILL the agent under traffic, restart it;
/// no denied connection is ever accepted, the established one never stops.
#[test]
fn enforcement_outlives_a_killed_agent_and_a_restart_takes_over_without_a_gap() {
    let (worker, client, _peer) = lab();
    let ssh_accepted = echo_server(&worker, "0.0.0.0:22");
    echo_server(&worker, "0.0.0.0:52311");
    let pins = PinDir::new();
    let first = Agent::start_args(&worker, "json", &pins.args());

    // An established flow through moat (allow-bigfix-port).
    let stream = in_netns(&client.name, || {
        TcpStream::connect_timeout(&"198.18.1.1:52311".parse().unwrap(), Duration::from_secs(2))
    })
    .expect("bigfix connection");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut stream = BufReader::new(stream);
    round_trip(&mut stream, "before the kill").unwrap();

    // Denied connection attempts for the whole test, from another thread.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flag = stop.clone();
    let attempts = spawn_in(&client.name, move || {
        let to: SocketAddr = "198.18.1.1:22".parse().unwrap();
        let mut n = 0u32;
        let mut through = 0u32;
        while !stop_flag.load(std::sync::atomic::Ordering::SeqCst) {
            n += 1;
            if TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok() {
                through += 1;
            }
        }
        (n, through)
    });
    std::thread::sleep(Duration::from_millis(500));

    first.kill();
    let links = worker.exec("ip", &["-d", "link", "show", "eth1"]);
    assert!(
        links.contains("prog/xdp"),
        "XDP stays attached after SIGKILL: {links}"
    );
    round_trip(&mut stream, "with the agent dead").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut second = Agent::start_args(&worker, "json", &pins.args());
    let log = second.logged().join("\n");
    assert!(
        log.contains("adopted the dataplane pinned in"),
        "the restarted agent adopts the pins: {log}"
    );
    round_trip(&mut stream, "after the restart").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (tried, through) = attempts.join().expect("attempts");
    eprintln!("restart: {tried} denied connection attempts across SIGKILL and restart, {through} through; the established flow echoed 3 of 3");
    assert!(
        tried >= 5,
        "denied connections were attempted throughout: {tried}"
    );
    assert_eq!(
        through, 0,
        "{through} of {tried} denied connections got through"
    );
    assert_eq!(ssh_accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    second.kill();

    // `moat uninstall` removes everything; then nothing is enforced.
    let out = std::process::Command::new(moat_tests::moat_bin())
        .args(["uninstall"])
        .args(pins.args())
        .output()
        .expect("moat uninstall runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.0.exists(), "pin directory removed");
    let after = worker.exec("ip", &["-d", "link", "show", "eth1"]);
    assert!(
        !after.contains("prog/xdp"),
        "XDP detached by uninstall: {after}"
    );
    assert_eq!(
        connect(&client, "198.18.1.1:22"),
        Ok(()),
        "nothing enforced after uninstall"
    );
}

/// Attaching to a live node cuts none of its connections: one opened
/// before the agent started, to a port policy denies (public ssh), keeps
/// flowing; a new one to the same port is dropped.
#[test]
fn a_connection_open_before_attach_survives_it() {
    let (worker, client, _peer) = lab();
    let accepted = echo_server(&worker, "0.0.0.0:22");
    let stream = in_netns(&client.name, || {
        TcpStream::connect_timeout(&"198.18.1.1:22".parse().unwrap(), Duration::from_secs(2))
    })
    .expect("ssh before moat");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut stream = BufReader::new(stream);
    round_trip(&mut stream, "before attach").unwrap();

    let mut agent = Agent::start(&worker);
    round_trip(&mut stream, "after attach").unwrap();
    round_trip(&mut stream, "and again").unwrap();
    let log = agent.logged().join("\n");
    assert!(
        log.contains("1 established connection(s) tracked as allowed before attaching: 1 from this host's TCP sockets"),
        "the agent seeds the open connection: {log}"
    );
    assert_eq!(
        connect(&client, "198.18.1.1:22"),
        Err(std::io::ErrorKind::TimedOut),
        "a new ssh connection on the public side is still dropped"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    agent.stop();
}

/// An upgrade whose conntrack layout changed: the old table (pinned under
/// another name) is reported, never read, and removed once the new
/// programs are attached; the new table starts from the kernel's own view,
/// so a connection open across the upgrade keeps flowing.
#[test]
fn a_conntrack_table_of_another_layout_is_not_read_and_connections_survive() {
    let (worker, client, _peer) = lab();
    let accepted = echo_server(&worker, "0.0.0.0:22");
    let stream = in_netns(&client.name, || {
        TcpStream::connect_timeout(&"198.18.1.1:22".parse().unwrap(), Duration::from_secs(2))
    })
    .expect("ssh before the upgrade");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut stream = BufReader::new(stream);
    round_trip(&mut stream, "before the upgrade").unwrap();

    // What an older moat left: its conntrack pinned under another layout's
    // name (made here from this version's, renamed).
    let pins = PinDir::new();
    drop(moat::dataplane::Dataplane::load_pinned(&pins.0).expect("pinned maps"));
    let ct = moat_common::map_names::CONNTRACK;
    let old = "MOAT_CT_V0";
    std::fs::rename(pins.0.join(ct), pins.0.join(old)).expect("rename the pin (bpffs)");
    let pin_dir = pins.0.clone();

    let mut agent = Agent::launch(&worker, "json", &[], Some(pins));
    round_trip(&mut stream, "after the upgrade").unwrap();
    let log = agent.logged().join("\n");
    assert!(
        log.contains(&format!(
            "pinned map {old} is from a moat version with another map layout: not read"
        )),
        "the old table is reported: {log}"
    );
    assert!(
        log.contains(&format!("removed the pinned map {old} of another layout")),
        "and removed after attach: {log}"
    );
    assert!(!pin_dir.join(old).exists(), "the old pin is gone");
    assert!(pin_dir.join(ct).exists(), "this layout's table is pinned");
    assert_eq!(
        connect(&client, "198.18.1.1:22"),
        Err(std::io::ErrorKind::TimedOut),
        "a new ssh connection on the public side is dropped"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    agent.stop();
}

/// Sends one datagram from `from` (inside `ns`) to `to` and waits for
/// its echo: Ok(()) when it came back.
fn udp_round_trip(ns: &Netns, from: &str, to: &str) -> Result<(), std::io::ErrorKind> {
    let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
    in_netns(&ns.name, move || {
        let socket = std::net::UdpSocket::bind(from).map_err(|e| e.kind())?;
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .map_err(|e| e.kind())?;
        socket.send_to(b"moat", to).map_err(|e| e.kind())?;
        let mut buf = [0u8; 16];
        let (n, peer) = socket.recv_from(&mut buf).map_err(|e| e.kind())?;
        assert_eq!((&buf[..n], peer), (&b"moat"[..], to), "the echo");
        Ok(())
    })
}

/// Linux connection tracking's flows are adopted at attach too: a UDP
/// flow it saw both ways before the agent started, to a port policy
/// denies, keeps flowing; a new flow to the same port is dropped.
#[test]
fn a_udp_flow_linux_conntrack_knows_survives_attach() {
    let (worker, client, _peer) = lab();
    // Connection tracking runs in a namespace once a rule needs it.
    worker.exec("nft", &["add", "table", "inet", "moat_test_ct"]);
    worker.exec(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "moat_test_ct",
            "input",
            "{ type filter hook input priority 0 ; policy accept ; }",
        ],
    );
    worker.exec(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "moat_test_ct",
            "input",
            "ct",
            "state",
            "established",
            "counter",
        ],
    );
    let (tx, rx) = mpsc::channel();
    spawn_in(&worker.name, move || {
        let socket = std::net::UdpSocket::bind("198.18.1.1:5000").expect("bind udp 5000");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        tx.send(()).expect("signal bound");
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("udp echo bound");
    let (flow, server) = ("198.18.1.2:40000", "198.18.1.1:5000");
    assert_eq!(udp_round_trip(&client, flow, server), Ok(()), "before moat");
    let table = worker.exec("cat", &["/proc/net/nf_conntrack"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("sport=40000 dport=5000") && !l.contains("UNREPLIED")),
        "Linux conntrack saw the flow both ways: {table}"
    );

    let mut agent = Agent::start(&worker);
    assert_eq!(
        udp_round_trip(&client, flow, server),
        Ok(()),
        "the flow open before attach still flows"
    );
    let log = agent.logged().join("\n");
    assert!(
        log.contains("1 from Linux connection tracking"),
        "the agent seeds the flow conntrack knows: {log}"
    );
    assert_eq!(
        udp_round_trip(&client, "198.18.1.2:40001", server),
        Err(std::io::ErrorKind::WouldBlock),
        "a new flow to the same port is dropped"
    );
    agent.stop();
}

/// Another tool's XDP program (attached by netlink, as Calico's is) is
/// reported and left alone; `--replace-xdp` replaces it.
#[test]
fn a_foreign_xdp_program_is_reported_and_replaced_only_when_asked() {
    let (worker, client, _peer) = lab();
    listen(&worker, "0.0.0.0:22");
    // An XDP program that passes everything, assembled here and attached
    // by `ip link` (netlink, generic mode).
    let dir = std::env::temp_dir().join(moat_tests::unique("moat-foreign-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("pass.s");
    std::fs::write(
        &src,
        "\t.section xdp,\"ax\",@progbits\n\t.globl xdp_pass\n\t.p2align 3\n\t.type xdp_pass,@function\nxdp_pass:\n\tr0 = 2\n\texit\n.Lend:\n\t.size xdp_pass, .Lend-xdp_pass\n\t.section license,\"aw\",@progbits\n\t.globl _license\n_license:\n\t.asciz \"GPL\"\n\t.size _license, 4\n",
    )
    .expect("write");
    let obj = dir.join("pass.o");
    moat_tests::run(
        "/usr/lib/llvm-22/bin/llvm-mc",
        &[
            "-triple",
            "bpfel",
            "-filetype=obj",
            "-o",
            obj.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    );
    worker.exec(
        "ip",
        &[
            "link",
            "set",
            "dev",
            "eth1",
            "xdpgeneric",
            "obj",
            obj.to_str().unwrap(),
            "sec",
            "xdp",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);

    let pins = PinDir::new();
    let refused = worker
        .command(moat_tests::moat_bin().to_str().expect("utf-8 path"))
        .args(["agent", "--policies"])
        .arg(fixtures().join("public"))
        .args([
            "--iface",
            "eth1",
            "--node",
            "worker-1",
            "--metrics-addr",
            "none",
            "--socket",
            "none",
        ])
        .args(pins.args())
        .output()
        .expect("agent runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("another XDP program is already attached to eth1 (prog/xdp id")
            && stderr.contains("name xdp_pass"),
        "names the program: {stderr}"
    );
    let still = worker.exec("ip", &["-d", "link", "show", "eth1"]);
    assert!(still.contains("name xdp_pass"), "left alone: {still}");

    let mut extra = pins.args().to_vec();
    extra.extend(["--replace-xdp".into(), "--detach-on-exit".into()]);
    let mut agent = Agent::start_args(&worker, "json", &extra);
    let log = agent.logged().join("\n");
    assert!(
        log.contains("replaced the XDP program that held it"),
        "{log}"
    );
    let now = worker.exec("ip", &["-d", "link", "show", "eth1"]);
    assert!(!now.contains("xdp_pass"), "replaced: {now}");
    assert_eq!(
        connect(&client, "198.18.1.1:22"),
        Err(std::io::ErrorKind::TimedOut),
        "moat enforces"
    );
    agent.stop();
}
