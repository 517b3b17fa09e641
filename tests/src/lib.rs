//! Helpers for moat's in-kernel tests: the loaded object with a compiled
//! policy, and network namespaces that clean up after themselves.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use moat::{
    compile::{compile, Compiled},
    dataplane::Dataplane,
    policy::{self, HostEndpoint, PolicySet},
};

/// The node the fixtures' HostEndpoints belong to.
pub const NODE: &str = "worker-1";

/// `BPF_PROG_TEST_RUN` judges packets as arriving on (or leaving) the
/// loopback device of the caller's network namespace, ifindex 1.
pub const TEST_RUN_IFINDEX: u32 = 1;

pub mod agent;
pub mod fakekube;

pub use agent::AgentProcess;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Loads a fixture directory; panics on any invalid resource.
pub fn load_fixture(name: &str) -> PolicySet {
    let loaded =
        policy::load_dir(&fixtures().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    assert!(
        loaded.errors.is_empty(),
        "fixture {name}: {:?}",
        loaded.errors
    );
    loaded.set
}

/// The loaded programs with `set` compiled for `iface` of `NODE` and
/// applied as if `iface` were the test-run device.
pub struct Kernel {
    pub dataplane: Dataplane,
    pub compiled: Compiled,
    pub set: PolicySet,
    pub iface: String,
}

impl Kernel {
    pub fn new(set: PolicySet, iface: &str) -> Self {
        Self::with_local(set, iface, &[])
    }

    /// Like `new`, and the node's addresses are `local` (none: the kernel
    /// judges every packet as host traffic).
    pub fn with_local(set: PolicySet, iface: &str, local: &[&str]) -> Self {
        let compiled = compile(&set, NODE, &[iface.to_string()])
            .unwrap_or_else(|e| panic!("compiling for {iface}: {e}"));
        let mut dataplane =
            Dataplane::load().unwrap_or_else(|e| panic!("loading the eBPF object: {e:?}"));
        if !local.is_empty() {
            // The test-run device is the test process's loopback, whose
            // routes belong to the machine, not the test: the listed
            // addresses alone say what is local.
            dataplane.set_route_lookup(false);
            let addrs = local
                .iter()
                .map(|a| {
                    a.parse()
                        .unwrap_or_else(|_| panic!("{a} is not an address"))
                })
                .collect();
            dataplane
                .set_local_addresses(&addrs)
                .expect("local addresses");
        }
        let mut by_index = BTreeMap::new();
        if let Some(c) = compiled.ifaces.get(iface) {
            by_index.insert(TEST_RUN_IFINDEX, c.clone());
        }
        dataplane
            .apply(&by_index, 1)
            .unwrap_or_else(|e| panic!("applying the policy: {e}"));
        Kernel {
            dataplane,
            compiled,
            set,
            iface: iface.to_string(),
        }
    }

    pub fn host_endpoint(&self) -> Option<&HostEndpoint> {
        moat::compile::endpoint_for(&self.set, NODE, &self.iface).expect("endpoint lookup")
    }

    /// XDP verdict for `frame` (true: passed).
    pub fn ingress(&mut self, frame: &[u8]) -> bool {
        let (action, _) = self
            .dataplane
            .test_ingress(frame, 1)
            .unwrap_or_else(|e| panic!("test run of {} bytes {frame:02x?}: {e:?}", frame.len()));
        match action {
            2 => true,  // XDP_PASS
            1 => false, // XDP_DROP
            other => panic!("unexpected XDP action {other}"),
        }
    }

    /// TC egress verdict for `frame` (true: passed).
    pub fn egress(&mut self, frame: &[u8]) -> bool {
        let (action, _) = self
            .dataplane
            .test_egress(frame, 1)
            .unwrap_or_else(|e| panic!("test run of {} bytes {frame:02x?}: {e:?}", frame.len()));
        match action {
            -1 => true, // TC_ACT_UNSPEC: on to the next program
            2 => false, // TC_ACT_SHOT
            other => panic!("unexpected TC action {other}"),
        }
    }

    /// Forgets tracked flows and fragments, so the next packet is judged
    /// as the first of its connection.
    pub fn forget_flows(&mut self) {
        self.dataplane
            .clear_conntrack()
            .expect("clearing conntrack");
        self.dataplane
            .clear_fragments()
            .expect("clearing fragments");
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, for namespaces and links.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bpffs pin directory of a test's own agent, uninstalled when dropped
/// (even after the agent was killed), so nothing stays attached.
pub struct PinDir(pub PathBuf);

/// A bpffs outside /sys: `ip netns exec` mounts a fresh /sys for the
/// commands it runs, which hides /sys/fs/bpf, while /run stays shared.
pub const TEST_BPFFS: &str = "/run/moat-test-bpffs";

impl PinDir {
    pub fn new() -> Self {
        static MOUNT: std::sync::Once = std::sync::Once::new();
        MOUNT.call_once(|| {
            if !moat::cli::agent::on_bpffs(Path::new(TEST_BPFFS)) {
                std::fs::create_dir_all(TEST_BPFFS).expect("creating the test bpffs mount point");
                run("mount", &["-t", "bpf", "bpf", TEST_BPFFS]);
            }
        });
        PinDir(PathBuf::from(TEST_BPFFS).join(unique("moat-test-")))
    }

    /// `--pin-dir DIR` for `moat agent`.
    pub fn args(&self) -> [String; 2] {
        ["--pin-dir".into(), self.0.display().to_string()]
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = moat::dataplane::uninstall(&self.0) {
            eprintln!("cleaning up {}: {e}", self.0.display());
        }
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (with everything inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics when it fails.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A `Command` that runs `cmd` inside the namespace.
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name.as_str(), cmd]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects `a` (named `a_if` inside `a`) and `b` (named `b_if`) with a
/// veth pair and gives each side an address (CIDR notation).
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    let (ta, tb) = (unique("mv"), unique("mv"));
    run(
        "ip",
        &["link", "add", &ta, "type", "veth", "peer", "name", &tb],
    );
    run("ip", &["link", "set", &ta, "netns", &a.name]);
    run("ip", &["link", "set", &tb, "netns", &b.name]);
    a.exec("ip", &["link", "set", &ta, "name", a_if]);
    b.exec("ip", &["link", "set", &tb, "name", b_if]);
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if addr.contains(':') {
            ns.exec("ip", &["-6", "addr", "add", addr, "dev", ifname, "nodad"]);
        } else {
            ns.exec("ip", &["-4", "addr", "add", addr, "dev", ifname]);
        }
        ns.exec("ip", &["link", "set", ifname, "up"]);
    }
}

/// The `moat` binary: `MOAT_BIN`, or next to the test executable's
/// directory (`target/<profile>/moat`), where `cargo xtask test` builds it.
pub fn moat_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("moat");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p moat-agent; `cargo xtask test` does this)",
        bin.display()
    );
    bin
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("entering {path}: {e}"));
        f()
    })
}

/// Runs `f` inside network namespace `ns` and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in(ns, f)
        .join()
        .expect("thread inside the namespace panicked")
}

/// Sends `frame` as is out of `ifname` in namespace `ns` (AF_PACKET), so
/// the peer receives exactly these bytes.
pub fn send_frame(ns: &str, ifname: &str, frame: Vec<u8>) {
    let ifname = ifname.to_string();
    in_netns(ns, move || {
        let index = nix::net::if_::if_nametoindex(ifname.as_str())
            .unwrap_or_else(|e| panic!("{ifname}: {e}"));
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: sockaddr_ll is plain data; every field the kernel reads is set.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid descriptor, buffer and address of the sizes given.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        assert_eq!(sent, frame.len() as isize, "send on {ifname}: {err}");
    });
}

/// The MAC address of `ifname` in namespace `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let text = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")]);
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|b| panic!("MAC of 6 bytes, got {b:?}"))
}

/// Reads the kernel log from now on (`/dev/kmsg`).
pub struct KernelLog {
    fd: std::os::fd::OwnedFd,
}

impl KernelLog {
    pub fn open() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: open(2) of a path; the descriptor is owned right away.
        let fd = unsafe { libc::open(c"/dev/kmsg".as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
        assert!(fd >= 0, "/dev/kmsg: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: lseek on the descriptor just opened: skip what was logged.
        unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&fd), 0, libc::SEEK_END) };
        KernelLog { fd }
    }

    /// The next message containing every one of `needles`, waiting up to
    /// 5 s.
    pub fn find(&self, needles: &[&str]) -> Option<String> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = vec![0u8; 8192];
        while std::time::Instant::now() < deadline {
            // SAFETY: reading into a buffer of the size given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            let record = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
            // "priority,sequence,timestamp,flags;message\n"
            let message = record
                .split_once(';')
                .map(|(_, m)| m.trim_end().to_string())
                .unwrap_or_default();
            if needles.iter().all(|n| message.contains(n)) {
                return Some(message);
            }
        }
        None
    }
}

/// Listens on `addr` inside `ns`, accepting (and closing) connections for
/// as long as the test runs.
pub fn listen(ns: &Netns, addr: &str) {
    let addr: std::net::SocketAddr = addr.parse().expect("address");
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(&ns.name, move || {
        let listener =
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tx.send(()).expect("signal bound");
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("listener bound");
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory under the system's temporary directory, named
    /// `prefix` and a unique suffix.
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The end-to-end labs' policy (`fixtures/lab/policy.yaml`).
pub fn lab_policy() -> String {
    let path = fixtures().join("lab/policy.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A worker (`eth1` 198.18.1.1/24) and a public client (`eth0`
/// 198.18.1.2/24) on a veth pair, in namespaces named from the prefixes.
/// Without `ipv6`, IPv6 is off in both, so the namespaces' own router
/// solicitations move no counter a test reads.
pub fn worker_and_client(worker: &str, client: &str, ipv6: bool) -> (Netns, Netns) {
    let worker = Netns::new(worker);
    let client = Netns::new(client);
    if !ipv6 {
        for ns in [&worker, &client] {
            for key in ["all", "default"] {
                ns.exec(
                    "sysctl",
                    &["-q", "-w", &format!("net.ipv6.conf.{key}.disable_ipv6=1")],
                );
            }
        }
    }
    veth(
        &worker,
        "eth1",
        "198.18.1.1/24",
        &client,
        "eth0",
        "198.18.1.2/24",
    );
    (worker, client)
}

/// The IPv6 pair of `worker_and_client` (made with `ipv6`): `eth1`
/// 2001:db8:1::1/64 on the worker, `eth0` 2001:db8:1::2/64 on the client,
/// without duplicate address detection so both are usable at once.
pub fn add_ipv6_pair(worker: &Netns, client: &Netns) {
    for (ns, addr, dev) in [
        (worker, "2001:db8:1::1/64", "eth1"),
        (client, "2001:db8:1::2/64", "eth0"),
    ] {
        ns.exec("ip", &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
}
