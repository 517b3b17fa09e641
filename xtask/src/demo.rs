//! `cargo xtask demo`: a worker with a public `eth1` and a private `eth0`,
//! a public client and a private peer, each in its own network namespace;
//! the moat agent enforces `tests/fixtures/iks-node` (the worker's host
//! endpoints, its management networks and a NodePort service, and no policy
//! of its own, so the bundled IKS profile applies) and prints every denied
//! packet as it happens.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicI32, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::run as run_command;

const WORKER: &str = "moat-demo-worker";
const PUBLIC: &str = "moat-demo-public";
const PRIVATE: &str = "moat-demo-private";
const NAMESPACES: [&str; 3] = [WORKER, PUBLIC, PRIVATE];
/// A bpffs outside /sys for the demo agent's pins (`ip netns exec` mounts
/// a fresh /sys, hiding /sys/fs/bpf; /run stays shared).
const DEMO_BPFFS: &str = "/run/moat-demo-bpffs";
const DEMO_PINS: &str = "/run/moat-demo-bpffs/moat";

/// Pids of the children to stop when the user presses Ctrl-C.
static AGENT_PID: AtomicI32 = AtomicI32::new(0);
static LISTENER_PID: AtomicI32 = AtomicI32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    run_command(Command::new("ip").args(args).stdout(Stdio::null()))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Mounts the demo's bpffs unless it is there.
fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(DEMO_BPFFS) && l.contains(" bpf "))
    {
        return Ok(());
    }
    std::fs::create_dir_all(DEMO_BPFFS).with_context(|| format!("creating {DEMO_BPFFS}"))?;
    run_command(Command::new("mount").args(["-t", "bpf", "bpf", DEMO_BPFFS]))
}

fn remove_lab() {
    // A killed agent leaves its pins (that is their point): remove them.
    let _ = Command::new(
        std::env::current_dir()
            .unwrap_or_default()
            .join("target/debug/moat"),
    )
    .args(["uninstall", "--pin-dir", DEMO_PINS])
    .stderr(Stdio::null())
    .status();
    for ns in NAMESPACES {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

fn kill(pid: &AtomicI32, signal: i32) {
    let p = pid.swap(0, Ordering::SeqCst);
    if p > 0 {
        // SAFETY: kill(2) on a child we started, by its pid.
        unsafe { libc::kill(p, signal) };
    }
}

use libc::{SIGINT, SIGKILL};

/// The namespaces, removed on drop.
struct Lab;

impl Lab {
    fn create() -> Result<Lab> {
        // A demo interrupted before it could clean up leaves these behind.
        remove_lab();
        for ns in NAMESPACES {
            ip(&["netns", "add", ns])?;
        }
        let lab = Lab;
        for ns in NAMESPACES {
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
            // The demo speaks IPv4; without this, IPv6 router solicitations
            // and MLD reports from link-local addresses (which the private
            // side, having no policy, rightly denies) crowd the output.
            in_ns(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )?;
        }
        link(
            WORKER,
            "eth1",
            "198.18.1.1/24",
            PUBLIC,
            "eth0",
            "198.18.1.2/24",
        )?;
        link(
            WORKER,
            "eth0",
            "198.18.0.1/24",
            PRIVATE,
            "eth0",
            "198.18.0.2/24",
        )?;
        // A second client address, in the management network iks-sys-mgmt
        // names, and the worker's route back to it.
        in_ns(
            PUBLIC,
            &["ip", "addr", "add", "198.19.128.7/32", "dev", "eth0"],
        )?;
        in_ns(
            WORKER,
            &["ip", "route", "add", "198.19.128.0/24", "dev", "eth1"],
        )?;
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        kill(&AGENT_PID, SIGKILL);
        kill(&LISTENER_PID, SIGKILL);
        remove_lab();
    }
}

fn link(a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) -> Result<()> {
    let (ta, tb) = (
        format!("md{}", std::process::id() % 10000),
        format!("me{}", std::process::id() % 10000),
    );
    ip(&["link", "add", &ta, "type", "veth", "peer", "name", &tb])?;
    ip(&["link", "set", &ta, "netns", a])?;
    ip(&["link", "set", &tb, "netns", b])?;
    in_ns(a, &["ip", "link", "set", &ta, "name", a_if])?;
    in_ns(b, &["ip", "link", "set", &tb, "name", b_if])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        in_ns(ns, &["ip", "addr", "add", addr, "dev", ifname])?;
        in_ns(ns, &["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// One thing the demo does, and what moat should make of it.
struct Step {
    from: &'static str,
    what: &'static str,
    why: &'static str,
    expect_pass: bool,
    action: Action,
}

enum Action {
    Ping(&'static str),
    Connect {
        to: &'static str,
        from: Option<&'static str>,
    },
}

fn attempt(xtask: &Path, ns: &str, action: &Action) -> Result<bool> {
    match action {
        Action::Ping(to) => Ok(Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running ping")?
            .success()),
        Action::Connect { to, from } => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns])
                .arg(xtask)
                .args(["probe", "connect", to]);
            if let Some(src) = from {
                cmd.args(["--from", src]);
            }
            let out = cmd.output().context("running the connect probe")?;
            let word = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match word.as_str() {
                "accepted" => Ok(true),
                "timed out" => Ok(false),
                other => bail!(
                    "connect to {to}: {other} {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
    }
}

pub fn run(root: &Path) -> Result<()> {
    let moat = root.join("target/debug/moat");
    let xtask = std::env::current_exe().context("xtask's own path")?;
    let policies = root.join("tests/fixtures/iks-node");
    ctrlc::set_handler(|| {
        eprintln!("\ndemo: interrupted, cleaning up");
        kill(&AGENT_PID, SIGKILL);
        kill(&LISTENER_PID, SIGKILL);
        remove_lab();
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    mount_bpffs()?;
    println!("demo: lab: {WORKER} (eth1 198.18.1.1 public, eth0 198.18.0.1 private), {PUBLIC} (198.18.1.2, 198.19.128.7), {PRIVATE} (198.18.0.2)");
    let _lab = Lab::create()?;
    start_listeners(&xtask)?;

    let mut agent = start_agent(&moat, &policies)?;

    let wrong = run_steps(&xtask, &steps())?;

    println!("\ndemo: stopping the agent (SIGINT)");
    kill(&AGENT_PID, SIGINT);
    let status = agent.wait().context("waiting for the agent")?;
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    if wrong > 0 {
        bail!("{wrong} step(s) did not get the verdict the policy gives");
    }
    println!("demo: every packet got the verdict the policy gives; lab removed");
    Ok(())
}

/// Listeners on the worker for every port the steps connect to.
fn start_listeners(xtask: &Path) -> Result<()> {
    let listener = Command::new("ip")
        .args(["netns", "exec", WORKER])
        .arg(xtask)
        .args([
            "probe",
            "listen",
            "0.0.0.0:22",
            "0.0.0.0:52311",
            "0.0.0.0:80",
            "0.0.0.0:30080",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting listeners on the worker")?;
    LISTENER_PID.store(listener.id() as i32, Ordering::SeqCst);
    Ok(())
}

/// Starts the agent on the worker and waits until it says it is ready.
fn start_agent(moat: &Path, policies: &Path) -> Result<Child> {
    println!(
        "demo: starting: moat agent --policies {} --iface eth1 --iface eth0 --node worker-1",
        policies.display()
    );
    println!("demo: denied packets appear below as the agent reports them\n");
    let mut agent = Command::new("ip")
        .args(["netns", "exec", WORKER])
        .arg(moat)
        .args(["agent", "--policies"])
        .arg(policies)
        .args(["--iface", "eth1", "--iface", "eth0", "--node", "worker-1"])
        .args(["--pin-dir", DEMO_PINS, "--detach-on-exit"])
        // The demo leaves no saved state behind in /var/lib/moat.
        .args(["--state-file", "none"])
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    AGENT_PID.store(agent.id() as i32, Ordering::SeqCst);
    wait_ready(&mut agent)?;
    Ok(agent)
}

/// What the demo tries, from where, and the verdict the policy gives.
fn steps() -> [Step; 8] {
    [
        Step {
            from: PUBLIC,
            what: "ping 198.18.1.1",
            why: "allow-icmp",
            expect_pass: true,
            action: Action::Ping("198.18.1.1"),
        },
        Step {
            from: PUBLIC,
            what: "ssh 198.18.1.1:22",
            why: "nothing allows ssh on the public side: default deny",
            expect_pass: false,
            action: Action::Connect {
                to: "198.18.1.1:22",
                from: None,
            },
        },
        Step {
            from: PUBLIC,
            what: "tcp 198.18.1.1:52311",
            why: "allow-bigfix-port",
            expect_pass: true,
            action: Action::Connect {
                to: "198.18.1.1:52311",
                from: None,
            },
        },
        Step {
            from: PUBLIC,
            what: "tcp 198.18.1.1:30080",
            why: "allow-node-port-dnat: NodePort of Service default/shop",
            expect_pass: true,
            action: Action::Connect {
                to: "198.18.1.1:30080",
                from: None,
            },
        },
        Step {
            from: PUBLIC,
            what: "tcp 198.18.1.1:80",
            why: "no Service frontend there: default deny",
            expect_pass: false,
            action: Action::Connect {
                to: "198.18.1.1:80",
                from: None,
            },
        },
        Step {
            from: PUBLIC,
            what: "ssh 198.18.1.1:22 from 198.19.128.7",
            why: "allow-sys-mgmt: the iks-sys-mgmt network set",
            expect_pass: true,
            action: Action::Connect {
                to: "198.18.1.1:22",
                from: Some("198.19.128.7"),
            },
        },
        Step {
            from: PRIVATE,
            what: "ssh 198.18.0.1:22",
            why: "failsafe port on the private side",
            expect_pass: true,
            action: Action::Connect {
                to: "198.18.0.1:22",
                from: None,
            },
        },
        Step {
            from: PRIVATE,
            what: "ping 198.18.0.1",
            why: "no policy selects worker_private: no profile, deny",
            expect_pass: false,
            action: Action::Ping("198.18.0.1"),
        },
    ]
}

/// Runs each step, prints its verdict beside the expected one, and counts
/// the steps whose verdict is not what the policy gives.
fn run_steps(xtask: &Path, steps: &[Step]) -> Result<usize> {
    let mut wrong = 0;
    for step in steps {
        let passed = attempt(xtask, step.from, &step.action)?;
        let ok = passed == step.expect_pass;
        wrong += usize::from(!ok);
        println!(
            "demo: {:<17} {:<40} {:<8} ({}){}",
            step.from.trim_start_matches("moat-demo-"),
            step.what,
            if passed { "passed" } else { "dropped" },
            step.why,
            if ok {
                ""
            } else {
                "  <-- NOT WHAT MOAT SHOULD DO"
            }
        );
        // Let the agent's event line land before the next step's line.
        std::thread::sleep(Duration::from_millis(200));
    }

    Ok(wrong)
}

/// Forwards the agent's log to our stderr until it says it is ready.
fn wait_ready(agent: &mut Child) -> Result<()> {
    let stderr = agent.stderr.take().context("agent stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains("ready:") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        bail!("the agent did not become ready within 60 s (its log is above)");
    }
    Ok(())
}
