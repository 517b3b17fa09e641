//! The agent end to end: a worker with a public `eth1` and a private `eth0`
//! in network namespaces, real packets from a public client and a private
//! peer, the deny events read from the agent's output.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use moat_tests::{fixtures, in_netns, spawn_in, veth, Netns};

/// Tries a TCP connection from inside `ns`: Ok(()) when it was accepted.
fn connect(ns: &Netns, to: &str) -> Result<(), std::io::ErrorKind> {
    let to: SocketAddr = to.parse().expect("address");
    in_netns(&ns.name, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1500))
            .map(drop)
            .map_err(|e| e.kind())
    })
}

/// Listens on `addr` inside `ns`, accepting (and closing) connections for
/// as long as the test runs.
fn listen(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().expect("address");
    let (tx, rx) = mpsc::channel();
    spawn_in(&ns.name, move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tx.send(()).expect("signal bound");
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("listener bound");
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
    let worker = Netns::new("mw");
    let client = Netns::new("mc");
    let peer = Netns::new("mp");
    veth(
        &worker,
        "eth1",
        "198.18.1.1/24",
        &client,
        "eth0",
        "198.18.1.2/24",
    );
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

struct Agent {
    child: Child,
    events: mpsc::Receiver<serde_json::Value>,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    fn start(worker: &Netns) -> Self {
        Self::start_with(worker, "json")
    }

    /// Starts the agent with `-o output`; JSON lines arrive as `events`,
    /// others as `lines`.
    fn start_with(worker: &Netns, output: &str) -> Self {
        let mut child = worker
            .command(moat_tests::moat_bin().to_str().expect("utf-8 path"))
            .args(["agent", "--policies"])
            .arg(fixtures().join("public"))
            .args([
                "--iface", "eth1", "--iface", "eth0", "--node", "worker-1", "-o", output,
            ])
            // Saved state and status stay out of /var/lib and /run.
            .args(["--state-file", "none", "--status-file", "none"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moat agent starts");
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if line.contains("ready:") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let (tx, events) = mpsc::channel();
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let json = output == "json";
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let sent = if json {
                    let value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("agent printed a line that is not JSON ({e}): {line}")
                    });
                    tx.send(value).is_ok()
                } else {
                    line_tx.send(line).is_ok()
                };
                if !sent {
                    break;
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("the agent did not become ready: {:?}", child.wait());
        }
        Agent {
            child,
            events,
            lines,
        }
    }

    /// The next line the agent prints (non-JSON output).
    fn expect_line(&mut self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line from the agent for {what}"))
    }

    /// Waits for an event satisfying `want`.
    fn expect_event(
        &self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(e) if want(&e) => return e,
                Ok(e) => seen.push(e),
                Err(_) => break,
            }
        }
        panic!("no event for {what}; saw {seen:#?}");
    }

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "agent exit status {status}");
                return;
            }
            assert!(Instant::now() < deadline, "agent did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    use moat::frame::Packet;
    use moat_tests::{mac_of, send_frame, KernelLog};

    let (worker, client, peer) = lab();
    worker.exec(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            "eth1",
            "nodad",
        ],
    );
    client.exec(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::2/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );
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
        let src = match moat::reference::parse(frame) {
            moat::reference::Frame::Ip(f) => match f.src {
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
