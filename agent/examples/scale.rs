//! Scratch: cost vs rule count (not committed).
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use moat::{compile::compile, dataplane::Dataplane, frame::Packet, policy};

fn gen(n: usize, adversarial: bool) -> String {
    let mut y = String::from(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: generated\nspec:\n  selector: ibm.role == 'worker_public'\n  order: 100\n  ingress:\n",
    );
    for i in 0..n {
        let (a, b) = (i / 256, i % 256);
        if adversarial {
            let proto = if i % 2 == 0 { "TCP" } else { "UDP" };
            let sp = 1024 + (i % 60000) as u32;
            let dp = 1 + (i * 7 % 60000) as u32;
            writeln!(y, "    - action: Deny\n      protocol: {proto}\n      source:\n        nets: [10.{a}.{b}.0/24]\n        ports: ['{sp}:{}']\n      destination:\n        nets: [172.{}.{a}.{b}/32]\n        ports: ['{dp}:{}']", sp + 3, 16 + i % 16, dp + 5).unwrap();
        } else {
            writeln!(y, "    - action: Deny\n      protocol: TCP\n      source:\n        nets: [10.{a}.{b}.0/24]\n      destination:\n        ports: [22, 443, '8000:8080']").unwrap();
        }
    }
    y
}

fn main() -> anyhow::Result<()> {
    let counts: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or("1,10,100,1000,10000".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let adversarial = std::env::args().nth(2).as_deref() == Some("adv");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/public");
    let mut dp = Dataplane::load()?;
    if let Ok(r) = std::env::var("RATE") {
        dp.set_event_rate(r.parse()?, 1)?;
    }
    for n in counts {
        let mut loaded = policy::load_dir(&fixtures)?;
        let extra = policy::load_str(Path::new("gen.yaml"), &gen(n, adversarial));
        assert!(extra.errors.is_empty(), "{:?}", extra.errors);
        loaded.set.policies.extend(extra.set.policies);
        let t0 = std::time::Instant::now();
        let compiled = compile(&loaded.set, "worker-1", &["eth1".into()])?;
        let t1 = t0.elapsed();
        let table = compiled.ifaces["eth1"].clone();
        let t2 = std::time::Instant::now();
        dp.apply(&BTreeMap::from([(1, table)]), n as u32)?;
        let t3 = t2.elapsed();
        let last = n - 1;
        let (la, lb) = (last / 256, last % 256);
        let cases: Vec<(&str, Vec<u8>)> = if adversarial {
            vec![
                (
                    "first",
                    Packet::tcp("10.0.0.9", 1025, "172.16.0.0", 3, 0x02).frame(),
                ),
                (
                    "last",
                    Packet::new(
                        moat::frame::ip(&format!("10.{la}.{lb}.9")),
                        moat::frame::ip(&format!("172.{}.{la}.{lb}", 16 + last % 16)),
                        moat::frame::Transport::Udp {
                            sport: 1024 + (last % 60000) as u16 + 1,
                            dport: 1 + (last * 7 % 60000) as u16 + 1,
                        },
                    )
                    .frame(),
                ),
                (
                    "nomatch",
                    Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 22, 0x02).frame(),
                ),
            ]
        } else {
            vec![
                (
                    "first",
                    Packet::tcp("10.0.0.9", 40000, "198.18.1.1", 22, 0x02).frame(),
                ),
                (
                    "last",
                    Packet::tcp(&format!("10.{la}.{lb}.9"), 40000, "198.18.1.1", 8080, 0x02)
                        .frame(),
                ),
                (
                    "nomatch",
                    Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 22, 0x02).frame(),
                ),
            ]
        };
        let mut cases = cases;
        cases.push(("arp", moat::frame::arp_request()));
        cases.push((
            "bigfix-est",
            Packet::tcp("198.18.1.2", 40000, "198.18.1.1", 52311, 0x10).frame(),
        ));
        let mut line = format!(
            "n={n:6} compile {:7.1} ms apply {:7.1} ms",
            t1.as_secs_f64() * 1e3,
            t3.as_secs_f64() * 1e3
        );
        for (name, frame) in cases {
            let mut s = Vec::new();
            let mut act = 0;
            for _ in 0..15 {
                let (a, d) = dp.test_ingress(&frame, 5000)?;
                act = a;
                s.push(d.as_nanos());
                dp.drain_events();
            }
            s.sort();
            write!(
                line,
                " | {name} {} ns ({})",
                s[s.len() / 2],
                if act == 1 { "drop" } else { "pass" }
            )
            .unwrap();
        }
        println!("{line}");
    }
    Ok(())
}
