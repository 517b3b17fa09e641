//! Property-based fuzzing (proptest) of everything that reads user input:
//! the selector parser, the policy loader and the packet grammar. Each
//! property says what must hold for any input: no panic, no stack
//! overflow, errors that say something, and a parsed selector that prints
//! back to itself.
//!
//! `cargo xtask test` runs a bounded number of cases (seconds). A longer
//! run: `MOAT_FUZZ_CASES=200000 cargo test --release -p moat-agent --test
//! fuzz` (each property runs that many inputs).

use std::{collections::BTreeMap, path::Path};

use moat::policy::{self, packet_spec, selector::Selector};
use proptest::{prelude::*, test_runner::Config};

/// Cases per property: `MOAT_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> Config {
    let n = std::env::var("MOAT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Fragments selectors are made of, valid and not.
const SELECTOR_TOKENS: &[&str] = &[
    "a",
    "b",
    "ibm.role",
    "x/y",
    "k-8",
    "_",
    "==",
    "!=",
    "!",
    "&&",
    "||",
    "(",
    ")",
    "{",
    "}",
    ",",
    "'v'",
    "\"w\"",
    "'",
    "\"",
    "in",
    "not",
    "notin",
    "not in",
    "contains",
    "starts with",
    "startswith",
    "ends with",
    "endswith",
    "has(",
    "has(a)",
    "all()",
    "global()",
    "all(",
    " ",
    "\t",
    "\n",
    "'it\"s'",
    "\u{e9}",
    "=",
    "&",
    "|",
    "{'a', 'b',}",
];

fn selector_text() -> impl Strategy<Value = String> {
    prop_oneof![
        // Sequences of grammar fragments: mostly near-valid selectors.
        prop::collection::vec(prop::sample::select(SELECTOR_TOKENS), 0..40)
            .prop_map(|t| t.join(" ")),
        prop::collection::vec(prop::sample::select(SELECTOR_TOKENS), 0..40)
            .prop_map(|t| t.concat()),
        // Arbitrary text.
        any::<String>(),
        // Deep nesting of parentheses or negations around a term.
        (0usize..200, 0usize..200, prop::bool::ANY).prop_map(|(open, close, bang)| {
            let prefix = if bang { "!" } else { "(" };
            format!("{}has(a){}", prefix.repeat(open), ")".repeat(close))
        }),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["a", "b", "ibm.role", "x/y"]).prop_map(str::to_string),
        prop::sample::select(vec!["", "v", "w", "it\"s", "worker_public"]).prop_map(str::to_string),
        0..4,
    )
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn selector_parser_never_panics_and_round_trips(text in selector_text(), l in labels()) {
        match Selector::parse(&text) {
            Ok(sel) => {
                let printed = sel.to_string();
                let again = Selector::parse(&printed)
                    .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?} does not parse: {e}"));
                prop_assert_eq!(&again, &sel, "{:?} -> {:?}", text, printed);
                prop_assert_eq!(again.matches(&l), sel.matches(&l));
            }
            Err(e) => {
                prop_assert!(!e.message.is_empty());
                prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1, "{}", e);
            }
        }
    }
}

/// A valid policy file to mutate.
const BASE: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: worker-1-public, labels: {ibm.role: worker_public}}
spec: {node: worker-1, interfaceName: eth1, expectedIPs: [198.18.1.1]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: allow-web
spec:
  order: 10
  selector: ibm.role == 'worker_public'
  types: [Ingress, Egress]
  ingress:
    - action: Allow
      protocol: TCP
      source: {nets: [198.18.0.0/15], notPorts: ['1:1023']}
      destination: {ports: [80, 443, '8000:8080'], selector: has(x)}
    - action: Deny
      protocol: ICMP
      icmp: {type: 8, code: 0}
  egress: [{action: Log}, {action: Allow, notProtocol: UDP}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: nets, labels: {x: y}}
spec: {nets: [10.0.0.0/8, '2001:db8::/32']}
---
{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [{\"apiVersion\": \"projectcalico.org/v3\", \"kind\": \"FelixConfiguration\", \"metadata\": {\"name\": \"default\"}, \"spec\": {\"failsafeInboundHostPorts\": [{\"protocol\": \"tcp\", \"port\": 22}]}}]}
";

/// Bytes YAML cares about, for insertions.
const YAML_BITS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "'",
    "\"",
    "#",
    "---\n",
    "&a ",
    "*a",
    "!!",
    "|",
    ">",
    ",",
    "? ",
    "%",
    "@",
    "\t",
    "0x",
    "-1",
    "1e9",
    "99999999999999999999",
    "~",
    "null",
    "<<: *a",
    "\u{0}",
    "\u{feff}",
];

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, &'static str),
    Delete(usize, usize),
    Replace(usize, char),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            (any::<usize>(), prop::sample::select(YAML_BITS)).prop_map(|(p, s)| Edit::Insert(p, s)),
            (any::<usize>(), 1usize..20).prop_map(|(p, n)| Edit::Delete(p, n)),
            (any::<usize>(), any::<char>()).prop_map(|(p, c)| Edit::Replace(p, c)),
        ],
        1..8,
    )
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for e in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match e {
            Edit::Insert(p, bit) => {
                let i = at(*p, s.len());
                s.splice(i..i, bit.chars());
            }
            Edit::Delete(p, n) => {
                let i = at(*p, s.len());
                let j = (i + n).min(s.len());
                s.drain(i..j);
            }
            Edit::Replace(p, c) => {
                if !s.is_empty() {
                    let i = p % s.len();
                    s[i] = *c;
                }
            }
        }
    }
    s.into_iter().collect()
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn policy_loader_never_panics(edits in edits()) {
        let text = apply(BASE, &edits);
        let loaded = policy::load_str(Path::new("fuzz.yaml"), &text);
        for e in &loaded.errors {
            prop_assert!(!e.message.is_empty(), "{:?}", e);
        }
        // What loaded compiles or is refused with an error, never a panic.
        let _ = moat::compile::compile(&loaded.set, "worker-1", &["eth1".to_string()]);
        let _ = policy::label_key_warnings(&loaded.set);
    }

    #[test]
    fn policy_loader_survives_arbitrary_text(text in any::<String>()) {
        let loaded = policy::load_str(Path::new("fuzz.yaml"), &text);
        for e in &loaded.errors {
            prop_assert!(!e.message.is_empty(), "{:?}", e);
        }
    }
}

const PACKET_TOKENS: &[&str] = &[
    "tcp",
    "udp",
    "sctp",
    "icmp",
    "icmpv6",
    "proto",
    "TCP",
    "112",
    "300",
    "->",
    "-",
    ">",
    "10.0.0.1",
    "10.0.0.2:22",
    "10.0.0.1:70000",
    "[2001:db8::1]:443",
    "2001:db8::2",
    "[::1]",
    "[",
    "]:",
    ":",
    "type",
    "code",
    "flags",
    "SYN,ACK",
    "NONE",
    ",",
    "8",
    "255",
    "",
    " ",
    "\u{e9}",
];

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn packet_grammar_never_panics(
        words in prop::collection::vec(prop::sample::select(PACKET_TOKENS), 0..10),
        glue in prop::bool::ANY,
        text in any::<String>(),
    ) {
        let joined = words.join(if glue { " " } else { "" });
        for t in [joined.as_str(), text.as_str()] {
            match packet_spec::parse(t) {
                Ok(f) => {
                    prop_assert!(f.ip_version == 4 || f.ip_version == 6);
                    prop_assert_eq!(f.src.is_ipv4(), f.dst.is_ipv4());
                }
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
        }
    }
}
