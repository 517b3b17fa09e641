//! Every policy file IBM publishes for this platform (../shared/corpus)
//! parses and validates; templates with unfilled placeholders are reported
//! as such. Each region's folder is one policy set (their names repeat
//! across regions); each Kubernetes example file is one set (two of them
//! are alternative versions of the same policy).

use std::path::{Path, PathBuf};

use moat::{compile::compile, policy};

/// The corpus: `MOAT_CORPUS`, or `shared/corpus/kube-samples` beside an
/// ancestor of this crate (`../shared` of the checkout), or where these
/// machines keep it (`/work/shared`).
fn corpus() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_CORPUS") {
        return PathBuf::from(p);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared/corpus/kube-samples"))
        .find(|p| p.is_dir());
    let found = beside.unwrap_or_else(|| PathBuf::from("/work/shared/corpus/kube-samples"));
    assert!(
        found.is_dir(),
        "the policy corpus is not at {} (set MOAT_CORPUS to the kube-samples folder)",
        found.display()
    );
    found
}

fn dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn every_corpus_policy_parses_validates_and_compiles() {
    let root = corpus();
    let mut sets: Vec<PathBuf> = Vec::new();
    for group in ["private-network-isolation", "public-network-isolation"] {
        sets.extend(dirs(&root.join("calico-policies").join(group)));
    }
    let k8s = root.join("k8s-network-policies");
    let mut k8s_files: Vec<PathBuf> = std::fs::read_dir(&k8s)
        .unwrap_or_else(|e| panic!("{}: {e}", k8s.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    k8s_files.sort();
    sets.extend(k8s_files);
    assert!(sets.len() >= 25, "corpus sets: {sets:?}");
    let (mut files, mut resources, mut templates, mut pods) = (0, 0, 0, 0);
    let mut largest = 0;
    let mut largest_bits = 0;
    for dir in &sets {
        let loaded = if dir.is_dir() {
            policy::load_dir(dir).unwrap_or_else(|e| panic!("{e}"))
        } else {
            let text =
                std::fs::read_to_string(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            policy::load_str(dir, &text)
        };
        let real: Vec<_> = loaded
            .errors
            .iter()
            .filter(|e| !loaded.placeholder_files.contains(&e.file))
            .collect();
        assert!(real.is_empty(), "{}: {real:#?}", dir.display());
        for f in &loaded.placeholder_files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(
                name.starts_with("generic-"),
                "only the generic-* templates hold placeholders: {}",
                f.display()
            );
        }
        files += loaded.files;
        templates += loaded.placeholder_files.len();
        resources += loaded.set.policies.len()
            + loaded.set.host_endpoints.len()
            + loaded.set.network_sets.len();
        // Compile for a worker's private and public interfaces, as the
        // filled-in templates would describe them.
        let mut set = loaded.set.clone();
        for (iface, role, ip) in [
            ("eth0", "worker_private", "10.0.0.10"),
            ("eth1", "worker_public", "198.51.100.10"),
        ] {
            set.host_endpoints.push(moat::policy::HostEndpoint {
                name: format!("worker-{iface}"),
                labels: [("ibm.role".to_string(), role.to_string())].into(),
                node: "worker".into(),
                interface_name: iface.into(),
                expected_ips: vec![ip.parse().expect("ip")],
                default_allow: false,
                profiles: Vec::new(),
                ports: Vec::new(),
                origin: moat::policy::Origin {
                    file: dir.clone(),
                    document: 0,
                },
            });
        }
        let compiled = compile(&set, "worker", &["eth0".into(), "eth1".into()])
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for i in compiled.ifaces.values() {
            for t in i.tables() {
                largest = largest.max(t.rules.len());
            }
            for dir in 0..2u8 {
                let image =
                    moat::compile::classify::ClassifierImage::build(std::array::from_fn(|k| {
                        i.table(dir, k)
                    }))
                    .unwrap_or_else(|e| panic!("{} {}: {e}", i.name, dir));
                largest_bits = largest_bits.max(image.bits.len());
            }
        }
        pods += compiled.pod_policies.len();
    }
    eprintln!(
        "corpus: {files} files in {} sets: {resources} resources valid, {templates} placeholder templates; \
         {pods} govern pods; \
         largest table {largest} entries; largest classifier {largest_bits} rules",
        sets.len()
    );
    assert!(
        largest_bits <= moat_common::classify::MAX_BITS as usize,
        "every corpus set fits the kernel classifiers: largest {largest_bits}"
    );
    assert_eq!(files, 214);
    assert_eq!(templates, 9);
}

/// SEMANTICS.md's private network isolation, as IBM publishes it for
/// us-south, on a worker's private interface: in the kernel and in the
/// reference, which must agree.
#[test]
fn private_network_isolation_us_south_in_the_kernel() {
    use moat::{
        dataplane::frame::Packet,
        policy::reference::{self, Verdict},
    };
    use moat_common::{direction, reason};
    use moat_tests::Kernel;

    let dir = corpus().join("calico-policies/private-network-isolation/us-south");
    let mut loaded = policy::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        loaded.placeholder_files.len(),
        1,
        "the HostEndpoint template"
    );
    for (node, ip) in [("worker-1", "10.0.0.10"), ("worker-2", "10.0.0.11")] {
        loaded.set.host_endpoints.push(moat::policy::HostEndpoint {
            name: format!("{node}-private"),
            labels: [("ibm.role".to_string(), "worker_private".to_string())].into(),
            node: node.into(),
            interface_name: "eth0".into(),
            expected_ips: vec![ip.parse().expect("ip")],
            default_allow: false,
            profiles: Vec::new(),
            ports: Vec::new(),
            origin: moat::policy::Origin {
                file: dir.clone(),
                document: 0,
            },
        });
    }
    // No failsafes, so the policies alone decide.
    loaded.set.failsafes = Some(moat::policy::Failsafes {
        inbound: vec![],
        outbound: vec![],
    });
    let set = loaded.set;
    let mut k = Kernel::new(set.clone(), "eth0");
    let hep = moat::compile::endpoint_for(&set, moat_tests::NODE, "eth0")
        .expect("ok")
        .expect("hep");
    const SYN: u8 = 0x02;
    // (what, direction, packet, passes, policy that decides or None)
    let cases: Vec<(&str, u8, Packet, bool, Option<&str>)> = vec![
        (
            "from another worker, any port",
            direction::INGRESS,
            Packet::tcp("10.0.0.11", 4000, "10.0.0.10", 8080, SYN),
            true,
            Some("allow-all-workers-private"),
        ),
        (
            "kubelet from anywhere private",
            direction::INGRESS,
            Packet::tcp("10.50.0.9", 4000, "10.0.0.10", 10250, SYN),
            true,
            Some("allow-ibm-ports-private"),
        ),
        (
            "BigFix over UDP",
            direction::INGRESS,
            Packet::udp("10.50.0.9", 4000, "10.0.0.10", 52311),
            true,
            Some("allow-ibm-ports-private"),
        ),
        (
            "ping",
            direction::INGRESS,
            Packet::icmp("10.50.0.9", "10.0.0.10", 8, 0),
            true,
            Some("allow-icmp-private"),
        ),
        (
            "ssh from an unknown private host",
            direction::INGRESS,
            Packet::tcp("10.50.0.9", 4000, "10.0.0.10", 22, SYN),
            false,
            Some("deny-all-private-default"),
        ),
        (
            "DNS out",
            direction::EGRESS,
            Packet::udp("10.0.0.10", 4000, "10.50.0.53", 53),
            true,
            Some("allow-ibm-ports-private"),
        ),
        (
            "to another worker",
            direction::EGRESS,
            Packet::tcp("10.0.0.10", 4000, "10.0.0.11", 9999, SYN),
            true,
            Some("allow-all-workers-private"),
        ),
        (
            "443 to an address not listed",
            direction::EGRESS,
            Packet::tcp("10.0.0.10", 4000, "10.50.0.80", 443, SYN),
            false,
            Some("deny-all-private-default"),
        ),
        (
            "443 to a listed service address",
            direction::EGRESS,
            Packet::tcp("10.0.0.10", 4000, "166.9.90.41", 443, SYN),
            true,
            Some("allow-private-services"),
        ),
    ];
    for (what, dir, packet, passes, by) in cases {
        k.forget_flows();
        k.dataplane.drain_events();
        let frame = packet.frame();
        let passed = if dir == direction::INGRESS {
            k.ingress(&frame)
        } else {
            k.egress(&frame)
        };
        assert_eq!(passed, passes, "{what}: kernel");
        let r = reference::judge(&set, Some(hep), dir, &frame);
        assert_eq!(
            r.verdict == Verdict::Allow,
            passes,
            "{what}: reference {r:#?}"
        );
        if let reference::DecidedBy::Rule { policy, .. } = &r.by {
            assert_eq!(Some(policy.as_str()), by, "{what}: deciding policy");
        } else {
            panic!("{what}: decided by {:?}", r.by);
        }
        if !passes {
            let events = k.dataplane.drain_events();
            assert_eq!(
                events
                    .last()
                    .map(|e| (e.reason, k.compiled.policy_name(e.policy_id))),
                Some((reason::RULE, by)),
                "{what}: event"
            );
        }
    }
}
