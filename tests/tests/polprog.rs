//! Calico's eBPF policy-program unit tests (felix/bpf/ut/pol_prog_test.go),
//! as translated under `../shared/conformance/calico-polprog/` (read as
//! they are): every packet row must get Calico's verdict from the
//! reference semantics (`moat check`) and from the kernel program the
//! agent loads (the policy compiled and applied, the packet run with
//! BPF_PROG_TEST_RUN); every `check` row must be refused by validation.
//!
//! Rows the translation itself left out are listed in INDEX.tsv with the
//! reason; a case whose policy moat cannot read fails here naming the
//! resource it needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use moat::{
    cli::trace::frame,
    compile::compile,
    dataplane::Dataplane,
    policy::{
        self, packet_spec,
        reference::{Fields, Query},
    },
};
use moat_common::direction;

const NODE: &str = "worker1";

fn suite() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/calico-polprog")
}

/// One row of a `cases.tsv`.
struct Row {
    iface: String,
    dir: String,
    packet: String,
    expect: String,
    note: String,
}

fn rows(dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(dir.join("cases.tsv"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 5, "{}: malformed row {l:?}", dir.display());
            Row {
                iface: f[0].into(),
                dir: f[1].into(),
                packet: f[2].into(),
                expect: f[3].into(),
                note: f.get(5).copied().unwrap_or_default().into(),
            }
        })
        .collect()
}

/// The kernel's verdict ("allow" / "deny") for one packet on `iface`.
fn kernel_verdict(
    dp: &mut Dataplane,
    f: &Fields,
    dir: u8,
    forwarded: bool,
) -> Result<&'static str, String> {
    // Host traffic: the packet's own end is the node's address.
    let mut local = BTreeSet::new();
    if !forwarded {
        local.insert(if dir == direction::INGRESS {
            f.dst
        } else {
            f.src
        });
    }
    dp.set_local_addresses(&local).map_err(|e| e.to_string())?;
    dp.clear_conntrack().map_err(|e| e.to_string())?;
    let bytes = frame(f);
    let passed = if dir == direction::INGRESS {
        dp.test_ingress(&bytes, 1).map_err(|e| format!("{e:?}"))?.0 == 2
    } else {
        dp.test_egress(&bytes, 1).map_err(|e| format!("{e:?}"))?.0 == -1
    };
    Ok(if passed { "allow" } else { "deny" })
}

/// Judges every row of one case directory; returns (rows, disagreements).
fn run_case(name: &str, dp: &mut Dataplane) -> (usize, Vec<String>) {
    let dir = suite().join(name);
    let rows = rows(&dir);
    let loaded = policy::load_dir(&dir.join("policies"))
        .unwrap_or_else(|e| panic!("{name}: reading the policies: {e}"));
    let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
    let mut bad = Vec::new();
    let checks = rows.iter().filter(|r| r.dir == "check").count();
    if checks > 0 {
        if errors.is_empty() {
            bad.push(format!(
                "{name}: Calico refuses this policy ({}); moat accepted it",
                rows[0].note
            ));
        }
        return (rows.len(), bad);
    }
    if !errors.is_empty() {
        for r in &rows {
            bad.push(format!(
                "{name}: {} {}: the case needs what moat cannot read: {}",
                r.dir,
                r.packet,
                errors.join("; ")
            ));
        }
        return (rows.len(), bad);
    }
    let set = loaded.set;
    let compiled = compile(&set, NODE, &["eth1".to_string()]);
    let kernel_ready = match &compiled {
        Ok(c) => {
            let mut tables = BTreeMap::new();
            if let Some(i) = c.ifaces.get("eth1") {
                tables.insert(1, i.clone());
            }
            dp.apply(&tables, 1).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    for r in &rows {
        let (d, forwarded) = match r.dir.as_str() {
            "ingress" => (direction::INGRESS, false),
            "egress" => (direction::EGRESS, false),
            "ingress+forwarded" => (direction::INGRESS, true),
            other => panic!("{name}: unknown dir {other:?}"),
        };
        let query = Query {
            forwarded,
            established: false,
        };
        let answer = moat::cli::check::answer(&set, NODE, &r.iface, d, &r.packet, query)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", r.packet));
        let got = serde_json::to_value(answer.verdict).expect("verdict");
        let got = got.as_str().unwrap_or_default();
        // The program test has no conntrack: an ICMP reply with no request
        // it allows is INVALID to connection tracking first (README).
        let conntrack_first = r.expect == "allow" && answer.stage == "conntrack";
        if got != r.expect && !conntrack_first {
            bad.push(format!(
                "{name}: {} {}: Calico says {}, moat check says {got} ({}) [{}]",
                r.dir, r.packet, r.expect, answer.decided_by, r.note
            ));
        }
        let fields = packet_spec::parse(&r.packet).expect("packet");
        match &kernel_ready {
            Err(e) => bad.push(format!("{name}: the kernel cannot enforce the case: {e}")),
            Ok(()) => match kernel_verdict(dp, &fields, d, forwarded) {
                Ok(k) if k != r.expect && !(conntrack_first && k == "deny") => bad.push(format!(
                    "{name}: {} {}: Calico says {}, the kernel program says {k} [{}]",
                    r.dir, r.packet, r.expect, r.note
                )),
                Ok(_) => {}
                Err(e) => bad.push(format!("{name}: {}: test run failed: {e}", r.packet)),
            },
        }
    }
    (rows.len(), bad)
}

#[test]
fn calico_policy_program_cases_agree() {
    let index = std::fs::read_to_string(suite().join("INDEX.tsv")).expect(
        "../shared/conformance/calico-polprog/INDEX.tsv (the conformance data beside the repository)",
    );
    let cases: Vec<&str> = index
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('\t').next())
        .filter(|d| *d != "-" && !d.is_empty())
        .collect();
    assert_eq!(cases.len(), 92, "the suite has 92 case directories");
    let mut dp = Dataplane::load().expect("loading the eBPF object");
    // The suite says which packets are forwarded; this machine's routing
    // table (which has no route to its Service addresses) must not decide
    // it, as `Kernel::with_local` does for the other kernel tests.
    dp.set_route_lookup(false);
    let mut total = 0;
    let mut bad = Vec::new();
    for name in &cases {
        let (n, b) = run_case(name, &mut dp);
        total += n;
        bad.extend(b);
    }
    eprintln!(
        "calico-polprog: {} cases, {total} rows, {} disagreements",
        cases.len(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {total} rows disagree:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
