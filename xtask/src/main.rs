//! `cargo xtask`: set the machine up, build, test, benchmark and demo moat.
//!
//! Everything a fresh Debian machine of this project's kind lacks is
//! installed here, idempotently: a second run checks each step and says in
//! one line that it is already done.

mod demo;
mod probe;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, bpf-linker, the linked
    /// Debian toolchain, bpffs.
    Setup,
    /// Set up, then build the agent (and, through it, the eBPF programs).
    Build,
    /// Set up, build, check formatting, lints and doc comments, run every
    /// test.
    Test,
    /// Set up, build, and show moat dropping packets in a lab of network
    /// namespaces; ends by itself and cleans up.
    Demo,
    /// Set up, build (release), and run `moat bench` (moat against
    /// iptables and nftables; report in bench-out/). Arguments after `--`
    /// go to `moat bench` (e.g. `cargo xtask bench -- --quick`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Helpers the demo runs inside its namespaces.
    #[command(hide = true)]
    Probe {
        #[command(subcommand)]
        probe: probe::Probe,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => setup().and_then(|()| build()),
        Cmd::Test => setup().and_then(|()| test()),
        Cmd::Demo => setup()
            .and_then(|()| build())
            .and_then(|()| demo::run(&root())),
        Cmd::Bench { args } => setup().and_then(|()| bench(&args)),
        Cmd::Probe { probe } => probe::run(probe),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cmd`, failing with its name when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` with its output captured, showing it only if it fails.
fn quiet(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bail!("{shown} failed ({})", out.status);
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Debian packages the build, the tests and the demo need.
const PACKAGES: &[&str] = &[
    "rustc-web",               // rustc 1.96 with a precompiled core for BPF
    "libstd-rust-web-dev-bpf", // that core
    "rust-web-clippy",         // clippy for the eBPF crate's target
    "llvm-22-dev",             // what bpf-linker links against
    "lld-22",
    "iproute2",          // ip netns, veth, XDP/TC inspection
    "iputils-ping",      // the demo's and tests' ICMP
    "iptables",          // the kernel LOG target moat's iptables lines are compared with
    "nftables",          // moat bench: nft, the engines compared
    "ipset",             // moat bench: iptables with ipsets
    "fonts-dejavu-core", // moat bench: the plots' text
    "protobuf-compiler", // protoc, for etcd-client's build
    "libprotobuf-dev",   // the google/protobuf/*.proto it imports
    "etcd-server",       // the etcd the etcd source's tests start on loopback
    "openssl",           // the certificates of the etcd TLS test
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TOOLCHAIN: &str = "debian-bpf";

/// What a setup step found.
enum Step {
    /// Already there: the short name of what was checked.
    Present(String),
    /// Installed just now.
    Done,
}

fn setup() -> Result<()> {
    let started = Instant::now();
    let steps = [
        step_packages()?,
        step_bpf_linker()?,
        step_toolchain()?,
        step_bpffs()?,
        step_nightly_rustfmt()?,
    ];
    let present: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Present(what) => Some(what.clone()),
            Step::Done => None,
        })
        .collect();
    if present.len() == steps.len() {
        println!(
            "setup: everything present ({}), nothing to do",
            present.join(", ")
        );
    } else {
        println!("setup: done in {:.0}s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn step_packages() -> Result<Step> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(Step::Present(format!("{} Debian packages", PACKAGES.len())));
    }
    println!("setup: Debian packages: installing {}", missing.join(" "));
    quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(Step::Done)
}

fn step_bpf_linker() -> Result<Step> {
    let have = output(Command::new("bpf-linker").arg("--version"));
    if have
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(Step::Present(format!("bpf-linker {BPF_LINKER_VERSION}")));
    }
    println!("setup: bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (a minute or two)");
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    Ok(Step::Done)
}

fn step_toolchain() -> Result<Step> {
    let list = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if list.lines().any(|l| l.starts_with(BPF_TOOLCHAIN)) {
        return Ok(Step::Present(format!("toolchain {BPF_TOOLCHAIN}")));
    }
    println!("setup: rustup toolchain {BPF_TOOLCHAIN}: linking Debian's rustc (/usr)");
    run(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))?;
    Ok(Step::Done)
}

fn step_bpffs() -> Result<Step> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(Step::Present("bpffs".into()));
    }
    println!("setup: bpffs: mounting at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(Step::Done)
}

fn step_nightly_rustfmt() -> Result<Step> {
    // rustfmt.toml uses group_imports/imports_granularity, nightly options.
    if output(Command::new("rustfmt").args(["+nightly", "--version"])).is_some() {
        Ok(Step::Present("nightly rustfmt".into()))
    } else {
        bail!("the nightly toolchain's rustfmt is missing (rustup toolchain list should show nightly); this machine kind ships it")
    }
}

fn build() -> Result<()> {
    println!("build: cargo build (the agent's build.rs builds the eBPF crate)");
    run(cargo().args(["build", "--package", "moat-agent", "--bins"]))
}

fn test() -> Result<()> {
    let started = Instant::now();
    println!("test: rustfmt");
    // Through the rustup proxy: `+nightly` picks the toolchain.
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--all", "--check"])
        .current_dir(root()))?;
    println!("test: clippy (host crates)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "moat-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("test: clippy (eBPF crate, BPF target)");
    run(Command::new("rustup")
        .args([
            "run",
            BPF_TOOLCHAIN,
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(root().join("ebpf")))?;
    println!("test: rustdoc (every doc comment's links and HTML, -D warnings)");
    run(cargo()
        .args(["doc", "--no-deps", "--workspace", "--exclude", "moat-ebpf"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    build()?;
    println!("test: cargo test");
    run(cargo().args(["test", "--workspace", "--exclude", "moat-ebpf"]))?;
    println!(
        "test: all passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    // Release: moat's compile time is part of the update latency measured.
    run(cargo().args(["build", "--release", "-p", "moat-agent"]))?;
    let moat = root().join("target/release/moat");
    run(Command::new(moat)
        .current_dir(root())
        .arg("bench")
        .args(args))
}
