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

struct Agent {
    child: Child,
    events: mpsc::Receiver<serde_json::Value>,
}

impl Agent {
    fn start(worker: &Netns) -> Self {
        let mut child = worker
            .command(moat_tests::moat_bin().to_str().expect("utf-8 path"))
            .args(["agent", "--policies"])
            .arg(fixtures().join("public"))
            .args([
                "--iface", "eth1", "--iface", "eth0", "--node", "worker-1", "-o", "json",
            ])
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
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("agent printed a line that is not JSON ({e}): {line}")
                });
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("the agent did not become ready: {:?}", child.wait());
        }
        Agent { child, events }
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
