//! The benchmark's host: a network namespace with a veth pair, removed on
//! drop and on Ctrl-C, and the tools each engine needs.
//!
//! Every iptables rule, nft table and ipset the benchmark makes lives in
//! such a namespace, so removing the namespace removes them all.

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::rules::{HOST_ADDR, IFACE};

/// Prefix of every namespace the benchmark makes (the smoke test looks
/// for leftovers by it).
pub const NETNS_PREFIX: &str = "moatbench-";
/// The veth peer of `IFACE`, in the same namespace.
const PEER: &str = "peer0";

/// Namespaces alive now, for the Ctrl-C handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static NEXT: AtomicU32 = AtomicU32::new(0);
/// Set when Ctrl-C (or SIGTERM) arrived: the handler is removing the
/// namespaces and will exit 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the run was interrupted. A failure of the run's own while the
/// handler removes its namespaces from under it is then no failure to
/// report: the caller waits for the handler's exit instead.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs (once) a Ctrl-C / SIGTERM handler that removes every live
/// namespace, then exits 130. BPF programs and maps are file descriptors
/// of this process: they go with it.
pub fn install_interrupt_cleanup() -> anyhow::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = ctrlc::set_handler(|| {
            INTERRUPTED.store(true, Ordering::SeqCst);
            let names = LIVE.lock().map(|v| v.clone()).unwrap_or_default();
            for name in names {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
            eprintln!("moat bench: interrupted; removed the benchmark's namespaces");
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler");
    });
    result
}

/// Runs `cmd`, failing with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace with `IFACE` (HOST_ADDR/24, a default route through it)
/// and its veth peer.
pub struct Lab {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl Lab {
    pub fn new() -> anyhow::Result<Self> {
        let name = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Listed before it exists: a Ctrl-C between its creation and the
        // listing would otherwise leave it behind.
        LIVE.lock()
            .map_err(|_| anyhow::anyhow!("namespace list poisoned"))?
            .push(name.clone());
        if let Err(e) = run(Command::new("ip").args(["netns", "add", &name])) {
            if let Ok(mut live) = LIVE.lock() {
                live.retain(|n| n != &name);
            }
            return Err(e);
        }
        let mut lab = Lab {
            name,
            ifindex: 0,
            mac: [0; 6],
        };
        let host = format!("{HOST_ADDR}/24");
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", IFACE, "type", "veth", "peer", "name", PEER],
            vec!["addr", "add", &host, "dev", IFACE],
            vec!["link", "set", IFACE, "up"],
            vec!["link", "set", PEER, "up"],
            vec!["route", "add", "default", "dev", IFACE],
        ] {
            lab.ip(&args)?;
        }
        let json = lab.ip(&["-j", "link", "show", IFACE])?;
        let v: serde_json::Value = serde_json::from_str(&json).context("ip -j link show")?;
        lab.ifindex = v[0]["ifindex"]
            .as_u64()
            .context("ip -j link show: no ifindex")? as u32;
        let mac = v[0]["address"].as_str().context("no MAC address")?;
        for (i, byte) in mac.split(':').enumerate().take(6) {
            lab.mac[i] = u8::from_str_radix(byte, 16).context("MAC address")?;
        }
        Ok(lab)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command in the namespace, `input` on its stdin; returns its
    /// stdout and the time it took.
    pub fn exec(
        &self,
        cmd: &str,
        args: &[&str],
        input: &str,
    ) -> anyhow::Result<(String, Duration)> {
        use std::io::Write as _;
        let shown = format!("{cmd} {}", args.join(" "));
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let input = input.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {shown}"))?;
        let took = started.elapsed();
        let _ = writer.join();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err: String = err.lines().take(5).collect::<Vec<_>>().join(" / ");
            bail!(
                "{shown} failed in namespace {} ({}): {err}",
                self.name,
                out.status
            );
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
    }

    /// `frame` addressed to `IFACE`'s MAC, so the stack takes it as its own.
    pub fn addressed(&self, frame: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[..6].copy_from_slice(&self.mac);
        f
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("moat bench: removing namespace {}: {e}", self.name);
        }
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|n| n != &self.name);
        }
    }
}

/// Namespaces of the benchmark's that exist now (any process's).
pub fn leftover_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(NETNS_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `bin` is on PATH (or an absolute path that exists).
pub fn have(bin: &str) -> bool {
    if bin.contains('/') {
        return std::path::Path::new(bin).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}
