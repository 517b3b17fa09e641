//! Live reconcile end to end: the agent watches a policy directory; files
//! are added, changed, broken and deleted while a client in another
//! network namespace tries connections, and the verdicts follow. Also the
//! saved state: a restarted agent enforces the last good policy before
//! its source has answered.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use moat_tests::{in_netns, listen, unique, veth, worker_and_client, AgentProcess, Netns};

const HEP: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: worker-1-public, labels: {ibm.role: worker_public}}
spec: {node: worker-1, interfaceName: eth1}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-all-outbound}
spec:
  selector: ibm.role == 'worker_public'
  types: [Egress]
  egress: [{action: Allow}]
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

/// Whether a TCP connection from `ns` to `to` is accepted within
/// `timeout` (a denied SYN is dropped: the attempt times out).
fn connects(ns: &str, to: &str, timeout: Duration) -> bool {
    let to: SocketAddr = to.parse().expect("address");
    in_netns(ns, move || TcpStream::connect_timeout(&to, timeout).is_ok())
}

/// Polls until connections to `port` are accepted (`want`) or not; the
/// time it took, or None after 10 s.
fn wait_for(client: &Netns, port: u16, want: bool) -> Option<Duration> {
    let start = Instant::now();
    let to = format!("198.18.1.1:{port}");
    while start.elapsed() < Duration::from_secs(10) {
        if connects(&client.name, &to, Duration::from_millis(60)) == want {
            return Some(start.elapsed());
        }
        if !want {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    None
}

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(unique("moat-reconcile-"));
        std::fs::create_dir_all(d.join("policies")).expect("temp dir");
        Dir(d)
    }
    fn policies(&self) -> PathBuf {
        self.0.join("policies")
    }
    fn write(&self, name: &str, text: &str) {
        // Written beside and renamed in, as tools do: no half-written file
        // is ever read.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.policies().join(name)).expect("rename");
    }
    fn remove(&self, name: &str) {
        std::fs::remove_file(self.policies().join(name)).expect("remove");
    }
    fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.0.join("status.json")).expect("status file");
        serde_json::from_str(&text).expect("status JSON")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the agent on `dir` with the policy directory `policies` and
/// waits for a log line containing `until`.
fn start_agent(worker: &Netns, dir: &Dir, policies: &Path, until: &str) -> AgentProcess {
    start_agent_with(
        worker,
        dir,
        &["--policies".as_ref(), policies.as_os_str()],
        until,
    )
}

/// Starts the agent with `source` arguments, its state and status files
/// and event socket in `dir`, and waits for a log line containing `until`.
fn start_agent_with(
    worker: &Netns,
    dir: &Dir,
    source: &[&std::ffi::OsStr],
    until: &str,
) -> AgentProcess {
    let mut args: Vec<std::ffi::OsString> = source.iter().map(|s| s.to_os_string()).collect();
    args.extend(
        ["--iface", "eth1", "--node", "worker-1", "--profile", "none"]
            .map(std::ffi::OsString::from),
    );
    args.extend([
        "--state-file".into(),
        dir.0.join("state/last-good.json").into(),
        "--status-file".into(),
        dir.0.join("status.json").into(),
        "--socket".into(),
        dir.0.join("events.sock").into(),
    ]);
    let mut agent = AgentProcess::spawn(worker, args, Some(moat_tests::PinDir::new()));
    agent.wait_for_log(until);
    agent
}

fn lab() -> (Netns, Netns) {
    worker_and_client("mrw", "mrc", true)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn directory_changes_reach_the_kernel_and_invalid_edits_do_not() {
    let (worker, client) = lab();
    for port in [8080, 8081, 9090] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    dir.write("hep.yaml", HEP);
    dir.write("web.yaml", &allow("allow-web", 8080));
    let mut agent = start_agent(&worker, &dir, &dir.policies(), "ready:");
    assert!(wait_for(&client, 8080, true).is_some(), "8080 allowed");
    assert!(!connects(
        &client.name,
        "198.18.1.1:9090",
        Duration::from_millis(300)
    ));

    // Add a file: its port opens.
    dir.write("metrics.yaml", &allow("allow-metrics", 9090));
    let t = wait_for(&client, 9090, true).expect("9090 allowed after the file is added");
    eprintln!("added: verdict changed after {t:?}");
    // Change a file: the old port closes, the new one opens.
    dir.write("web.yaml", &allow("allow-web", 8081));
    wait_for(&client, 8080, false).expect("8080 denied after the change");
    wait_for(&client, 8081, true).expect("8081 allowed after the change");

    // An invalid edit: reported, counted, and the last good version of
    // allow-metrics stays in force.
    let before = dir.status()["source"]["reconciles"]
        .as_u64()
        .expect("reconciles");
    dir.write(
        "metrics.yaml",
        &allow("allow-metrics", 9090).replace("ports: [9090]", "ports: [70000]"),
    );
    agent.wait_for_log("the last good one stays in force");
    // The status file is rewritten every second: wait for the reconcile
    // of the invalid edit to show (an earlier write may still show the
    // change before it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = dir.status();
        if s["source"]["reconciles"].as_u64() > Some(before)
            && s["source"]["invalid_objects"].as_u64() > Some(0)
        {
            break s;
        }
        assert!(Instant::now() < deadline, "status not updated: {s:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["source"]["invalid_objects"], 1, "{status:#}");
    assert_eq!(status["source"]["kept_last_good"], 1, "{status:#}");
    assert!(status["source"]["rejected_objects_total"].as_u64() >= Some(1));
    assert!(
        connects(&client.name, "198.18.1.1:9090", Duration::from_secs(1)),
        "9090 still allowed"
    );
    assert!(connects(
        &client.name,
        "198.18.1.1:8081",
        Duration::from_secs(1)
    ));
    // A file that does not even parse keeps everything it held.
    dir.write("metrics.yaml", "apiVersion: [unclosed\n");
    agent.wait_for_log("the last good one stays in force");
    assert!(
        connects(&client.name, "198.18.1.1:9090", Duration::from_secs(1)),
        "9090 still allowed"
    );

    // Delete the file: its port closes.
    dir.remove("metrics.yaml");
    wait_for(&client, 9090, false).expect("9090 denied after the file is deleted");
    assert!(connects(
        &client.name,
        "198.18.1.1:8081",
        Duration::from_secs(1)
    ));

    // The directory replaced by a new one (a volume re-mounted, a
    // deployment tool swapping directories): the new one is watched.
    let old = dir.0.join("policies.old");
    std::fs::rename(dir.policies(), &old).expect("move the directory away");
    std::fs::create_dir(dir.policies()).expect("a new directory");
    dir.write("hep.yaml", HEP);
    dir.write("web.yaml", &allow("allow-web", 8081));
    dir.write("other.yaml", &allow("allow-other", 8080));
    wait_for(&client, 8080, true).expect("8080 allowed by the new directory");
    agent.wait_for_log("was removed or replaced");
    dir.remove("other.yaml");
    wait_for(&client, 8080, false).expect("changes in the new directory are seen");

    // Reconcile latency: from the write (rename) of a file opening a new
    // port to the first accepted connection on it.
    let mut times = Vec::new();
    for (i, port) in (20_000..20_007).enumerate() {
        listen(&worker, &format!("0.0.0.0:{port}"));
        let start = Instant::now();
        dir.write(&format!("t{i}.yaml"), &allow(&format!("t{i}"), port));
        wait_for(&client, port, true).expect("the new port opens");
        times.push(start.elapsed());
    }
    let m = median(times.clone());
    eprintln!("reconcile latency, file write to verdict: median {m:?} of {times:?}");
    assert!(
        m < Duration::from_secs(1),
        "median {m:?} over the 1 s target"
    );
    agent.stop();
}

#[test]
fn the_saved_state_is_enforced_before_the_first_sync() {
    let (worker, client) = lab();
    for port in [8080, 9090] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    dir.write("hep.yaml", HEP);
    dir.write("web.yaml", &allow("allow-web", 8080));
    let agent = start_agent(&worker, &dir, &dir.policies(), "ready:");
    agent.stop();
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("state/last-good.json")).expect("saved state"),
    )
    .expect("saved state JSON");
    assert_eq!(saved["node"], "worker-1");
    let generation = saved["generation"].as_u64().expect("generation");
    // Restart on a source that cannot answer yet (its directory is not
    // there): the saved state is enforced meanwhile.
    let other = dir.0.join("other");
    let mut agent = start_agent(&worker, &dir, &other, "enforcing the saved state");
    agent.wait_for_log("does not exist (yet)");
    assert!(
        wait_for(&client, 8080, true).is_some(),
        "saved: 8080 allowed"
    );
    assert!(
        !connects(&client.name, "198.18.1.1:9090", Duration::from_millis(300)),
        "saved: 9090 denied"
    );
    let status = dir.status();
    assert_eq!(status["state"], "enforcing saved state", "{status:#}");
    assert_eq!(
        status["generation"].as_u64(),
        Some(generation),
        "{status:#}"
    );
    // The source answers: its policy replaces the saved one.
    let tmp = dir.0.join("other.tmp");
    std::fs::create_dir_all(&tmp).expect("dir");
    std::fs::write(tmp.join("hep.yaml"), HEP).expect("write");
    std::fs::write(tmp.join("m.yaml"), allow("allow-metrics", 9090)).expect("write");
    std::fs::rename(&tmp, &other).expect("rename");
    agent.wait_for_log("ready:");
    let status = dir.status();
    assert_eq!(status["state"], "in sync", "{status:#}");
    assert_eq!(
        status["generation"].as_u64(),
        Some(generation + 1),
        "{status:#}"
    );
    assert!(wait_for(&client, 9090, true).is_some());
    assert!(wait_for(&client, 8080, false).is_some());
    agent.stop();
}

/// An etcd server on the loopback of network namespace `ns`, with its
/// data in `dir`; killed on drop.
struct Etcd {
    child: Child,
    ns: String,
    /// The address clients connect to.
    host: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<Pki>,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate,
/// made with openssl.
#[derive(Clone)]
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("pki dir");
        let sh = |script: &str| {
            let out = std::process::Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(&dir)
                .output()
                .expect("sh runs");
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
            openssl req -new -x509 -key ca.key -subj /CN=moat-test-ca -days 1 -out ca.pem \
              -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
            for who in server client; do
              openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $who.key
              openssl req -new -key $who.key -subj /CN=moat-test-$who -out $who.csr
              printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > $who.ext
              openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile $who.ext -out $who.pem
            done");
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Etcd {
    fn start(ns: &Netns, dir: PathBuf, client_port: u16, peer_port: u16) -> Self {
        Self::start_tls(ns, dir, client_port, peer_port, None)
    }

    /// Serving clients on `host` (an address of `ns`).
    fn start_on(ns: &Netns, host: &str, dir: PathBuf, client_port: u16, peer_port: u16) -> Self {
        Self::start_full(ns, host, dir, client_port, peer_port, None)
    }

    /// With `tls`, clients must present a certificate of its CA.
    fn start_tls(
        ns: &Netns,
        dir: PathBuf,
        client_port: u16,
        peer_port: u16,
        tls: Option<Pki>,
    ) -> Self {
        Self::start_full(ns, "127.0.0.1", dir, client_port, peer_port, tls)
    }

    fn start_full(
        ns: &Netns,
        host: &str,
        dir: PathBuf,
        client_port: u16,
        peer_port: u16,
        tls: Option<Pki>,
    ) -> Self {
        let peer = format!("http://127.0.0.1:{peer_port}");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{host}:{client_port}");
        let mut cmd = ns.command("etcd");
        if let Some(pki) = &tls {
            cmd.arg("--cert-file")
                .arg(pki.path("server.pem"))
                .arg("--key-file")
                .arg(pki.path("server.key"))
                .arg("--trusted-ca-file")
                .arg(pki.path("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "moat-test", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("moat-test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts (Debian package etcd-server; cargo xtask setup installs it)");
        let etcd = Etcd {
            child,
            ns: ns.name.clone(),
            host: host.to_string(),
            dir,
            client_port,
            peer_port,
            tls,
        };
        // Ready when it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while etcd
            .try_op(|mut c| async move { c.get("/", None).await.map(drop) })
            .is_err()
        {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// Runs `op` with a client inside the namespace.
    fn try_op<F, Fut>(&self, op: F) -> Result<(), String>
    where
        F: FnOnce(etcd_client::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), etcd_client::Error>>,
    {
        let endpoint = self.endpoint();
        let tls = self.tls.clone().map(|pki| {
            let read = |n: &str| std::fs::read(pki.path(n)).expect("pki file");
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
                .identity(etcd_client::Identity::from_pem(
                    read("client.pem"),
                    read("client.key"),
                ))
        });
        in_netns(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500))
                    .with_timeout(Duration::from_secs(2));
                if let Some(tls) = tls {
                    opts = opts.with_tls(tls);
                }
                let client = etcd_client::Client::connect([endpoint], Some(opts))
                    .await
                    .map_err(|e| e.to_string())?;
                op(client).await.map_err(|e| e.to_string())
            })
        })
    }

    /// Stores `yaml` (one resource) as Calico does: JSON under its key.
    fn put(&self, plural: &str, name: &str, yaml: &str) {
        let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("YAML");
        self.put_raw(plural, name, value.to_string());
    }

    fn put_raw(&self, plural: &str, name: &str, text: String) {
        let key = format!("{}{plural}/{name}", moat::sources::etcd::PREFIX);
        self.try_op(move |mut c| async move { c.put(key, text, None).await.map(drop) })
            .expect("etcd put");
    }

    fn delete(&self, plural: &str, name: &str) {
        let key = format!("{}{plural}/{name}", moat::sources::etcd::PREFIX);
        self.try_op(move |mut c| async move { c.delete(key, None).await.map(drop) })
            .expect("etcd delete");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    // Inside a fresh namespace every port is free; any in the ephemeral
    // range's complement will do, distinct per call.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(23790);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn etcd_changes_reach_the_kernel_across_an_etcd_restart() {
    let (worker, client) = lab();
    for port in [8080, 9090, 9091] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    let mut etcd = Etcd::start(&worker, dir.0.join("etcd"), free_port(), free_port());
    let docs: Vec<&str> = HEP.split("---\n").collect();
    etcd.put("hostendpoints", "worker-1-public", docs[0]);
    etcd.put("globalnetworkpolicies", "allow-all-outbound", docs[1]);
    etcd.put(
        "globalnetworkpolicies",
        "allow-web",
        &allow("allow-web", 8080),
    );
    // Not policy: ignored.
    etcd.put_raw("workloadendpoints", "ns/w", "{}".into());
    let cfg = dir.0.join("calicoctl.cfg");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata:\nspec:\n  datastoreType: etcdv3\n  etcdEndpoints: {}\n",
            etcd.endpoint()
        ),
    )
    .expect("calicoctl.cfg");
    let mut agent = start_agent_with(
        &worker,
        &dir,
        &["--calicoctl-config".as_ref(), cfg.as_os_str()],
        "ready:",
    );
    assert!(wait_for(&client, 8080, true).is_some(), "8080 allowed");
    assert!(!connects(
        &client.name,
        "198.18.1.1:9090",
        Duration::from_millis(300)
    ));
    assert_eq!(dir.status()["source"]["kind"], "etcdv3");

    // Add, change (measured), break, delete.
    let start = Instant::now();
    etcd.put(
        "globalnetworkpolicies",
        "allow-metrics",
        &allow("allow-metrics", 9090),
    );
    wait_for(&client, 9090, true).expect("9090 allowed after the put");
    eprintln!("etcd put to verdict: {:?}", start.elapsed());
    etcd.put(
        "globalnetworkpolicies",
        "allow-metrics",
        &allow("allow-metrics", 9090).replace("ports: [9090]", "ports: [70000]"),
    );
    agent.wait_for_log("the last good one stays in force");
    assert!(
        connects(&client.name, "198.18.1.1:9090", Duration::from_secs(1)),
        "9090 still allowed"
    );
    etcd.delete("globalnetworkpolicies", "allow-metrics");
    wait_for(&client, 9090, false).expect("9090 denied after the delete");

    // etcd goes away: the policy in force stays; it comes back: the agent
    // resumes and follows changes again.
    etcd.stop();
    agent.wait_for_log("retrying in");
    assert!(
        connects(&client.name, "198.18.1.1:8080", Duration::from_secs(1)),
        "8080 still allowed"
    );
    let mut etcd = Etcd::start(&worker, etcd.dir.clone(), etcd.client_port, etcd.peer_port);
    agent.wait_for_log("listed");
    let start = Instant::now();
    etcd.put(
        "globalnetworkpolicies",
        "allow-9091",
        &allow("allow-9091", 9091),
    );
    wait_for(&client, 9091, true).expect("9091 allowed after the restart");
    eprintln!(
        "etcd put to verdict after the restart: {:?}",
        start.elapsed()
    );

    // Latency: put to first accepted connection.
    let mut times = Vec::new();
    for (i, port) in (21_000..21_007).enumerate() {
        listen(&worker, &format!("0.0.0.0:{port}"));
        let start = Instant::now();
        etcd.put(
            "globalnetworkpolicies",
            &format!("e{i}"),
            &allow(&format!("e{i}"), port),
        );
        wait_for(&client, port, true).expect("the new port opens");
        times.push(start.elapsed());
    }
    let m = median(times.clone());
    eprintln!("reconcile latency, etcd put to verdict: median {m:?} of {times:?}");
    assert!(
        m < Duration::from_secs(1),
        "median {m:?} over the 1 s target"
    );
    agent.stop();
    etcd.stop();
}

fn moat_status(dir: &Dir, json: bool) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(moat_tests::moat_bin());
    cmd.arg("status")
        .arg("--status-file")
        .arg(dir.0.join("status.json"));
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().expect("moat status runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn automatic_host_endpoints_an_interface_that_appears_later_and_status() {
    let (worker, client) = lab();
    for port in [22, 8080] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    // No HostEndpoint: the automatic ones (eth0 private, eth1 public).
    dir.write("web.yaml", &allow("allow-web", 8080));
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "policies: {}\nautoHostEndpoints: true\nprofile: none\n",
            dir.policies().display()
        ),
    )
    .expect("config");
    let mut agent = start_agent_with(
        &worker,
        &dir,
        &["--config".as_ref(), config.as_os_str()],
        "eth0: no such interface (yet)",
    );
    agent.wait_for_log("ready:");
    assert!(
        wait_for(&client, 8080, true).is_some(),
        "public 8080 allowed"
    );
    let iface = |status: &serde_json::Value, name: &str| {
        status["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no {name} in {status:#}"))
    };
    let status = dir.status();
    assert_eq!(iface(&status, "eth0")["attached"], false, "{status:#}");
    assert_eq!(iface(&status, "eth0")["ifindex"], serde_json::Value::Null);

    // The private interface appears: attached and enforced (only the
    // failsafe ports: no policy selects worker_private).
    let peer = Netns::new("mrp");
    veth(
        &worker,
        "eth0",
        "198.18.0.1/24",
        &peer,
        "eth0",
        "198.18.0.2/24",
    );
    agent.wait_for_log("eth0 appeared");
    let deadline = Instant::now() + Duration::from_secs(10);
    while iface(&dir.status(), "eth0")["attached"] != true {
        assert!(Instant::now() < deadline, "eth0 never attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        connects(&peer.name, "198.18.0.1:22", Duration::from_secs(1)),
        "failsafe 22 allowed on eth0"
    );
    assert!(
        !connects(&peer.name, "198.18.0.1:8080", Duration::from_millis(500)),
        "8080 denied on eth0"
    );

    // moat status, for people and for scripts.
    let (code, text) = moat_status(&dir, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("in sync") && text.contains("interface eth0"),
        "{text}"
    );
    assert!(text.contains("ibm.role=worker_private"), "{text}");
    let (code, json) = moat_status(&dir, true);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["running"], true);
    let ifaces = v["status"]["interfaces"].as_array().expect("interfaces");
    let eth1 = ifaces.iter().find(|i| i["name"] == "eth1").expect("eth1");
    assert_eq!(eth1["labels"]["ibm.role"], "worker_public");
    assert_eq!(eth1["enforced"], true);
    assert_eq!(
        eth1["policies"]["ingress"]["policy"][0], "allow-web",
        "{eth1:#}"
    );
    assert!(v["status"]["counters"]["ingress"]["policy_allowed"].as_u64() >= Some(1));
    agent.stop();
    let (code, text) = moat_status(&dir, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("the agent is not running"), "{text}");
}

#[test]
fn configuration_errors_name_the_key() {
    let dir = Dir::new();
    let config = dir.0.join("config.yaml");
    std::fs::write(&config, "interface: [eth1]\n").expect("config");
    let out = std::process::Command::new(moat_tests::moat_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unknown field `interface`") && stderr.contains("config.yaml"),
        "{stderr}"
    );
    let out = std::process::Command::new(moat_tests::moat_bin())
        .args(["agent", "--iface", "eth1"])
        .env("MOAT_EVENT_RATE", "lots")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("MOAT_EVENT_RATE"), "{stderr}");
    std::fs::write(&config, "calicoctlConfig: /nonexistent/calicoctl.cfg\n").expect("config");
    let cfg = dir.0.join("calicoctl.cfg");
    std::fs::write(
        &cfg,
        "apiVersion: v1\nkind: calicoApiConfig\nspec: {datastoreType: etcdv2}\n",
    )
    .expect("cfg");
    let out = std::process::Command::new(moat_tests::moat_bin())
        .args(["agent", "--calicoctl-config"])
        .arg(&cfg)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("apiVersion: projectcalico.org/v3"),
        "{stderr}"
    );
    // A kubeconfig that cannot be read is refused before any program is
    // loaded (nothing is attached, nothing pinned is touched).
    let (worker, _client) = lab();
    let pins = moat_tests::PinDir::new();
    let missing = dir.0.join("missing/kubeconfig");
    let out = worker
        .command(moat_tests::moat_bin().to_str().expect("utf-8 path"))
        .args(["agent", "--iface", "eth1", "--kubeconfig"])
        .arg(&missing)
        .args(pins.args())
        .args(["--state-file", "none", "--status-file", "none"])
        .arg("--socket")
        .arg(dir.0.join("events.sock"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("kubeconfig {}", missing.display())),
        "names the file: {stderr}"
    );
    assert!(
        !stderr.contains("local addresses")
            && !pins.0.join(moat_common::map_names::IFACES).exists(),
        "refused before loading: {stderr}"
    );
    assert!(!worker
        .exec("ip", &["-d", "link", "show", "eth1"])
        .contains("prog/xdp"));
}

#[test]
fn etcd_over_tls_with_a_client_certificate() {
    let (worker, client) = lab();
    for port in [8080, 9090] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    let pki = Pki::new(dir.0.join("pki"));
    let etcd = Etcd::start_tls(
        &worker,
        dir.0.join("etcd"),
        free_port(),
        free_port(),
        Some(pki.clone()),
    );
    let docs: Vec<&str> = HEP.split("---\n").collect();
    etcd.put("hostendpoints", "worker-1-public", docs[0]);
    etcd.put(
        "globalnetworkpolicies",
        "allow-web",
        &allow("allow-web", 8080),
    );
    let calicoctl = |with_cert: bool| {
        let mut text = format!(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec:\n  datastoreType: etcdv3\n  etcdEndpoints: {}\n  etcdCACertFile: {}\n",
            etcd.endpoint(),
            pki.path("ca.pem").display()
        );
        if with_cert {
            text += &format!(
                "  etcdCertFile: {}\n  etcdKeyFile: {}\n",
                pki.path("client.pem").display(),
                pki.path("client.key").display()
            );
        }
        let path = dir.0.join(format!("calicoctl-{with_cert}.cfg"));
        std::fs::write(&path, text).expect("calicoctl.cfg");
        path
    };
    // Without a client certificate etcd refuses the agent, which says so
    // and keeps trying.
    let no_cert = calicoctl(false);
    let agent = start_agent_with(
        &worker,
        &dir,
        &["--calicoctl-config".as_ref(), no_cert.as_os_str()],
        "retrying in",
    );
    agent.stop();
    let with_cert = calicoctl(true);
    let mut agent = start_agent_with(
        &worker,
        &dir,
        &["--calicoctl-config".as_ref(), with_cert.as_os_str()],
        "listed 2 policy objects",
    );
    agent.wait_for_log("ready:");
    assert!(wait_for(&client, 8080, true).is_some(), "8080 allowed");
    etcd.put(
        "globalnetworkpolicies",
        "allow-metrics",
        &allow("allow-metrics", 9090),
    );
    wait_for(&client, 9090, true).expect("9090 allowed after the put over TLS");
    agent.stop();
}

#[test]
fn no_policy_cuts_the_agent_off_from_etcd() {
    let (worker, client) = lab();
    for port in [8080, 9090] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    // etcd across the public interface, on a port no default failsafe
    // covers; the worker's egress has no policy (denied) and no failsafe.
    let etcd = Etcd::start_on(
        &client,
        "198.18.1.2",
        dir.0.join("etcd"),
        free_port(),
        free_port(),
    );
    let docs: Vec<&str> = HEP.split("---\n").collect();
    etcd.put("hostendpoints", "worker-1-public", docs[0]);
    etcd.put(
        "felixconfigurations",
        "default",
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec: {failsafeInboundHostPorts: [], failsafeOutboundHostPorts: []}\n",
    );
    etcd.put(
        "globalnetworkpolicies",
        "allow-web",
        &allow("allow-web", 8080),
    );
    let cfg = dir.0.join("calicoctl.cfg");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec: {{datastoreType: etcdv3, etcdEndpoints: '{}'}}\n",
            etcd.endpoint()
        ),
    )
    .expect("calicoctl.cfg");
    let mut agent = start_agent_with(
        &worker,
        &dir,
        &["--calicoctl-config".as_ref(), cfg.as_os_str()],
        "the control plane stays reachable",
    );
    agent.wait_for_log("ready:");
    assert!(wait_for(&client, 8080, true).is_some(), "8080 allowed");
    assert!(!connects(
        &client.name,
        "198.18.1.1:9090",
        Duration::from_millis(300)
    ));
    // The update still arrives.
    etcd.put(
        "globalnetworkpolicies",
        "allow-metrics",
        &allow("allow-metrics", 9090),
    );
    wait_for(&client, 9090, true).expect("9090 allowed: the agent still hears etcd");
    agent.stop();
}

/// `yaml` (a projectcalico.org/v3 resource) as the Calico CRD object the
/// Kubernetes API holds.
fn crd(yaml: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("YAML");
    v["apiVersion"] = "crd.projectcalico.org/v1".into();
    v
}

const CALICO: &str = "crd.projectcalico.org";

/// Waits until `cond` holds (10 s at most).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The status file's reconcile count once it stops changing (the file is
/// written just after the apply whose verdict a test may already see).
fn settled_reconciles(dir: &Dir) -> u64 {
    let read = || {
        dir.status()["source"]["reconciles"]
            .as_u64()
            .expect("reconciles")
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(400));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn kubernetes_api_changes_reach_the_kernel_across_dropped_and_expired_watches() {
    let (worker, client) = lab();
    for port in [8080, 9090, 9091, 9092] {
        listen(&worker, &format!("0.0.0.0:{port}"));
    }
    let dir = Dir::new();
    // The fake API server listens on the worker's loopback.
    let port = free_port();
    let listener = in_netns(&worker.name, move || {
        TcpListener::bind(("127.0.0.1", port)).expect("bind the fake API server")
    });
    let kube = moat_tests::fakekube::FakeKube::start(listener, Some("moat-token"));
    let docs: Vec<&str> = HEP.split("---\n").collect();
    kube.put(CALICO, "hostendpoints", crd(docs[0]));
    kube.put(CALICO, "globalnetworkpolicies", crd(docs[1]));
    kube.put(
        CALICO,
        "globalnetworkpolicies",
        crd(&allow("allow-web", 8080)),
    );
    // Objects selectors resolve against, as the cluster has them.
    kube.put(
        "",
        "namespaces",
        serde_json::json!({"metadata": {"name": "prod", "labels": {"env": "prod"}},
                           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
    );
    kube.put(
        "",
        "nodes",
        serde_json::json!({"metadata": {"name": "worker-1", "labels": {"kubernetes.io/hostname": "worker-1"}},
                           "spec": {"podCIDR": "172.30.0.0/24"},
                           "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.1"}],
                                      "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]\nusers: [{{name: moat, user: {{token: moat-token}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: moat}}}}]\ncurrent-context: fake\n",
            kube.addr
        ),
    )
    .expect("kubeconfig");
    let cfg = dir.0.join("calicoctl.cfg");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec:\n  datastoreType: kubernetes\n  kubeconfig: {}\n",
            kubeconfig.display()
        ),
    )
    .expect("calicoctl.cfg");
    let mut agent = start_agent_with(
        &worker,
        &dir,
        &["--calicoctl-config".as_ref(), cfg.as_os_str()],
        "first complete sync",
    );
    agent.wait_for_log("ready:");
    assert!(wait_for(&client, 8080, true).is_some(), "8080 allowed");
    assert!(!connects(
        &client.name,
        "198.18.1.1:9090",
        Duration::from_millis(300)
    ));
    let status = dir.status();
    assert_eq!(status["source"]["kind"], "kubernetes", "{status:#}");
    assert_eq!(kube.unauthorized(), 0, "the token is sent");
    // Every watched resource was listed once and is being watched.
    for w in moat::sources::watched::WATCHED {
        assert_eq!(kube.lists(w.group, w.resource), 1, "{}", w.resource);
    }

    // Add, change, break, delete.
    let start = Instant::now();
    kube.put(
        CALICO,
        "globalnetworkpolicies",
        crd(&allow("allow-metrics", 9090)),
    );
    wait_for(&client, 9090, true).expect("9090 allowed after the create");
    eprintln!("Kubernetes create to verdict: {:?}", start.elapsed());
    kube.put(
        CALICO,
        "globalnetworkpolicies",
        crd(&allow("allow-metrics", 9091)),
    );
    wait_for(&client, 9090, false).expect("9090 denied after the change");
    wait_for(&client, 9091, true).expect("9091 allowed after the change");
    kube.put(
        CALICO,
        "globalnetworkpolicies",
        crd(&allow("allow-metrics", 9091).replace("ports: [9091]", "ports: [70000]")),
    );
    agent.wait_for_log("the last good one stays in force");
    assert!(
        connects(&client.name, "198.18.1.1:9091", Duration::from_secs(1)),
        "9091 still allowed"
    );
    // A Kubernetes Event on the invalid object says why.
    eventually("a Kubernetes Event on allow-metrics", || {
        !kube.events().is_empty()
    });
    let events = kube.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["type"], "Warning", "{e:#}");
    assert_eq!(e["reason"], "InvalidPolicy", "{e:#}");
    assert_eq!(e["reportingController"], "moat-agent", "{e:#}");
    assert_eq!(e["regarding"]["kind"], "GlobalNetworkPolicy", "{e:#}");
    assert_eq!(e["regarding"]["name"], "allow-metrics", "{e:#}");
    assert_eq!(
        e["regarding"]["apiVersion"], "crd.projectcalico.org/v1",
        "{e:#}"
    );
    assert!(
        e["note"].as_str().is_some_and(|n| n.contains("70000")),
        "{e:#}"
    );
    kube.delete(CALICO, "globalnetworkpolicies", None, "allow-metrics");
    wait_for(&client, 9091, false).expect("9091 denied after the delete");

    // Every watch connection drops: the watches resume from the
    // resourceVersion they had (no re-list), and changes flow again.
    // Idle watches get BOOKMARKs meanwhile (nothing ever changes among
    // the Services): they resume from the bookmarked resourceVersion, not
    // the listed one.
    std::thread::sleep(moat_tests::fakekube::BOOKMARK_EVERY + Duration::from_millis(300));
    let resumed = kube.watches(CALICO, "globalnetworkpolicies").len();
    assert_eq!(kube.watches("", "services").len(), 1);
    kube.drop_watches();
    eventually("the policy watch resumes", || {
        kube.watches(CALICO, "globalnetworkpolicies").len() > resumed
    });
    let from = kube.watches(CALICO, "globalnetworkpolicies")[resumed].clone();
    assert!(
        from.parse::<u64>().is_ok_and(|rv| rv > 100),
        "resumed from resourceVersion {from:?}"
    );
    eventually("the services watch resumes", || {
        kube.watches("", "services").len() == 2
    });
    let services = kube.watches("", "services");
    let rv = |i: usize| services[i].parse::<u64>().expect("a resourceVersion");
    assert!(rv(1) > rv(0), "resumed from a bookmark: {services:?}");
    assert!(
        connects(&client.name, "198.18.1.1:8080", Duration::from_secs(1)),
        "8080 still allowed"
    );
    kube.put(
        CALICO,
        "globalnetworkpolicies",
        crd(&allow("allow-metrics", 9090)),
    );
    wait_for(&client, 9090, true).expect("9090 allowed after the reconnect");
    for w in moat::sources::watched::WATCHED {
        assert_eq!(
            kube.lists(w.group, w.resource),
            1,
            "{} re-listed after a dropped connection",
            w.resource
        );
    }

    // History compacted (410 Gone) with a change no watch heard of: the
    // agent lists again, finds it, and nothing in force is lost meanwhile.
    let reconciles = settled_reconciles(&dir);
    kube.put_unannounced(
        CALICO,
        "globalnetworkpolicies",
        crd(&allow("allow-late", 9092)),
    );
    kube.expire();
    agent.wait_for_log("listed 4 globalnetworkpolicies");
    assert!(
        connects(&client.name, "198.18.1.1:8080", Duration::from_secs(1)),
        "8080 still allowed during the re-list"
    );
    wait_for(&client, 9092, true).expect("9092 allowed after the re-list");
    assert!(connects(
        &client.name,
        "198.18.1.1:9090",
        Duration::from_secs(1)
    ));
    eventually("every resource re-listed", || {
        moat::sources::watched::WATCHED
            .iter()
            .all(|w| kube.lists(w.group, w.resource) == 2)
    });
    // The re-lists of everything else brought nothing new: one reconcile
    // (the late policy), not one per resource.
    assert_eq!(
        settled_reconciles(&dir),
        reconciles + 1,
        "re-list reconciles"
    );

    // Latency: create to first accepted connection.
    let mut times = Vec::new();
    for (i, port) in (22_000..22_007).enumerate() {
        listen(&worker, &format!("0.0.0.0:{port}"));
        let start = Instant::now();
        kube.put(
            CALICO,
            "globalnetworkpolicies",
            crd(&allow(&format!("k{i}"), port)),
        );
        wait_for(&client, port, true).expect("the new port opens");
        times.push(start.elapsed());
    }
    let m = median(times.clone());
    eprintln!("reconcile latency, Kubernetes API create to verdict: median {m:?} of {times:?}");
    assert!(
        m < Duration::from_secs(1),
        "median {m:?} over the 1 s target"
    );
    agent.stop();
}
