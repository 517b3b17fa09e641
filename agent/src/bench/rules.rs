//! The benchmark's rule sets: one description, generated from a seed,
//! rendered for every engine (moat's Calico YAML, iptables-restore input in
//! Calico's layout, ipset + iptables, nft scripts: a linear chain, a
//! verdict map, and the netdev ingress hook).
//!
//! Every rule set has the same frame: `deny-nodeports` (two rules), then
//! the policy of `n` generated rules, then the IKS 2019 public defaults
//! (ICMP, BigFix 52311/tcp+udp, VRRP), then the default deny. The `n`
//! generated rules never overlap one another (each has its own source
//! block), so first-match order and set lookups give the same verdicts.

use std::{fmt::Write as _, net::Ipv4Addr};

use serde::Serialize;

/// The address of the judged interface (the host endpoint's expected IP).
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The interface the rules guard.
pub const IFACE: &str = "eth0";
/// The node the HostEndpoint belongs to.
pub const NODE: &str = "bench-node";
/// A source no generated rule names (outside 10.0.0.0/8).
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 9);
/// Node ports (Kubernetes' default range), denied by `deny-nodeports`.
pub const NODE_PORTS: (u16, u16) = (30000, 32767);

/// The shape of the `n` generated rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A host firewall's whitelist: allows from source networks to common
    /// service ports, some random ports and port ranges, mostly TCP.
    Realistic,
    /// Every rule distinct on every field: source network, protocol,
    /// source port range, destination port range, and the action.
    Adversarial,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    /// Another IP protocol number (VRRP is 112).
    Other(u8),
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Other(n) => n,
        }
    }

    fn nft(self) -> String {
        match self {
            Proto::Tcp => "tcp".into(),
            Proto::Udp => "udp".into(),
            Proto::Icmp => "icmp".into(),
            Proto::Other(n) => n.to_string(),
        }
    }
}

/// An IPv4 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An inclusive port range (`lo == hi`: one port).
pub type Ports = (u16, u16);

/// One rule of the description.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub action: Action,
    pub proto: Proto,
    pub src: Option<Net>,
    pub sport: Option<Ports>,
    pub dport: Option<Ports>,
}

impl Rule {
    /// A packet this rule matches: (source, protocol, source port,
    /// destination port).
    pub fn example(&self) -> (Ipv4Addr, Proto, u16, u16) {
        let src = self
            .src
            .map(|n| Ipv4Addr::from(u32::from(n.addr) + if n.prefix < 32 { 1 } else { 0 }))
            .unwrap_or(STRANGER);
        (
            src,
            self.proto,
            self.sport.map_or(40000, |p| p.0),
            self.dport.map_or(0, |p| p.1),
        )
    }
}

/// A policy: named rules, in order.
#[derive(Clone, Debug, Serialize)]
pub struct Policy {
    pub name: String,
    pub order: u32,
    pub rules: Vec<Rule>,
}

/// The whole description, for every engine.
#[derive(Clone, Debug, Serialize)]
pub struct RuleSet {
    pub shape: Shape,
    pub seed: u64,
    /// Number of generated rules (the policy `bench-rules`).
    pub n: usize,
    pub policies: Vec<Policy>,
}

/// splitmix64: a small, well-known deterministic generator, so the rule
/// sets are the same on every machine and every version of every crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Most generated rules: each gets its own /26 block of 10.0.0.0/8.
pub const MAX_RULES: usize = 1 << 18;

const COMMON_PORTS: [u16; 12] = [
    22, 80, 443, 2379, 3306, 5432, 6443, 8080, 8443, 9090, 9100, 10250,
];

/// Source block `i`: a /26 of 10.0.0.0/8 with a prefix of 26 to 32.
fn block(i: usize, prefix: u8) -> Net {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i as u32) * 64;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Net {
        addr: Ipv4Addr::from(base & mask),
        prefix,
    }
}

impl RuleSet {
    /// Generates `n` rules of `shape` from `seed`.
    pub fn generate(shape: Shape, n: usize, seed: u64) -> Result<Self, String> {
        if n == 0 || n > MAX_RULES {
            return Err(format!(
                "a rule set holds 1 to {MAX_RULES} generated rules, not {n}"
            ));
        }
        let mut rng = Rng(seed ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut rules = Vec::with_capacity(n);
        for i in 0..n {
            rules.push(match shape {
                Shape::Realistic => {
                    let prefix = [26, 27, 28, 29, 32][rng.below(5) as usize];
                    // The last rule is UDP (a DNS-like service), so
                    // allowed traffic can be one UDP flow at any size.
                    let proto = if i + 1 < n && rng.below(10) < 7 {
                        Proto::Tcp
                    } else {
                        Proto::Udp
                    };
                    let roll = rng.below(100);
                    let dport = if roll < 60 {
                        let p = COMMON_PORTS[rng.below(COMMON_PORTS.len() as u64) as usize];
                        (p, p)
                    } else if roll < 85 {
                        let p = 1024 + rng.below(28000) as u16;
                        (p, p)
                    } else {
                        let lo = 1024 + rng.below(20000) as u16;
                        (lo, lo + 10 + rng.below(990) as u16)
                    };
                    Rule {
                        action: Action::Allow,
                        proto,
                        src: Some(block(i, prefix)),
                        sport: None,
                        dport: Some(dport),
                    }
                }
                Shape::Adversarial => {
                    // Distinct on every field: the source block, the
                    // protocol alternating, the port ranges shifted and
                    // widened with i, the action alternating (the first
                    // and last rule deny, so hits are measured on denies).
                    let prefix = 26 + (i % 7) as u8;
                    let width = (i / 29000) as u16;
                    let dlo = 1 + (i % 29000) as u16;
                    let slo = 1024 + (i % 29000) as u16;
                    Rule {
                        action: if i % 2 == 0 || i == n - 1 {
                            Action::Deny
                        } else {
                            Action::Allow
                        },
                        proto: if i % 2 == 0 { Proto::Tcp } else { Proto::Udp },
                        src: Some(block(i, prefix)),
                        sport: Some((slo, slo + width + (rng.below(3) as u16))),
                        dport: Some((dlo, dlo + width)),
                    }
                }
            });
        }
        let any = |proto, action, ports: Ports| Rule {
            action,
            proto,
            src: None,
            sport: None,
            dport: Some(ports),
        };
        let policies = vec![
            Policy {
                name: "deny-nodeports".into(),
                order: 1100,
                rules: vec![
                    any(Proto::Tcp, Action::Deny, NODE_PORTS),
                    any(Proto::Udp, Action::Deny, NODE_PORTS),
                ],
            },
            Policy {
                name: "bench-rules".into(),
                order: 1200,
                rules,
            },
            Policy {
                name: "allow-icmp".into(),
                order: 1500,
                rules: vec![Rule {
                    action: Action::Allow,
                    proto: Proto::Icmp,
                    src: None,
                    sport: None,
                    dport: None,
                }],
            },
            Policy {
                name: "allow-bigfix-port".into(),
                order: 1510,
                rules: vec![
                    any(Proto::Tcp, Action::Allow, (52311, 52311)),
                    any(Proto::Udp, Action::Allow, (52311, 52311)),
                ],
            },
            Policy {
                name: "allow-vrrp".into(),
                order: 1520,
                rules: vec![Rule {
                    action: Action::Allow,
                    proto: Proto::Other(112),
                    src: None,
                    sport: None,
                    dport: None,
                }],
            },
        ];
        Ok(RuleSet {
            shape,
            seed,
            n,
            policies,
        })
    }

    /// The generated rules (the policy `bench-rules`).
    pub fn generated(&self) -> &[Rule] {
        &self.policies[1].rules
    }

    /// The same rule set with every generated rule's action set to
    /// `action`.
    pub fn with_action(&self, action: Action) -> Self {
        let mut out = self.clone();
        for r in &mut out.policies[1].rules {
            r.action = action;
        }
        out
    }

    /// The same rule set with one more generated rule in front (a one-rule
    /// change), from a source block no other rule uses.
    pub fn with_one_more(&self) -> (Self, Rule) {
        let rule = Rule {
            action: Action::Allow,
            proto: Proto::Tcp,
            src: Some(block(MAX_RULES - 1, 32)),
            sport: None,
            dport: Some((7777, 7777)),
        };
        let mut out = self.clone();
        out.policies[1].rules.insert(0, rule);
        (out, rule)
    }

    /// The same rule set with the destination port of one generated rule
    /// in the middle changed (a one-rule change that moves no rule).
    pub fn with_port_changed(&self) -> Self {
        let mut out = self.clone();
        let rules = &mut out.policies[1].rules;
        let mid = rules.len() / 2;
        let at = (mid..rules.len())
            .chain(0..mid)
            .find(|&i| rules[i].dport.is_some())
            .unwrap_or(mid);
        let rule = &mut rules[at];
        if !matches!(rule.proto, Proto::Tcp | Proto::Udp) {
            rule.proto = Proto::Tcp;
        }
        rule.dport = Some(match rule.dport {
            Some((7777, 7777)) => (7778, 7778),
            _ => (7777, 7777),
        });
        out
    }

    /// The same rule set with `with_one_more`'s rule appended after the
    /// generated rules instead of in front.
    pub fn with_one_appended(&self) -> Self {
        let (_, rule) = self.with_one_more();
        let mut out = self.clone();
        out.policies[1].rules.push(rule);
        out
    }

    /// Calico resources for moat: the HostEndpoint, an empty failsafe
    /// profile (Calico's failsafe ports would open :22), the policies.
    pub fn moat_yaml(&self) -> String {
        let mut s = String::with_capacity(self.n * 160 + 2048);
        let _ = write!(
            s,
            "# moat bench rule set: shape {:?}, {} generated rules, seed {}\n\
             apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: {NODE}-{IFACE}\n  labels:\n    ibm.role: worker_public\n\
             spec:\n  node: {NODE}\n  interfaceName: {IFACE}\n  expectedIPs: [{HOST_ADDR}]\n\
             ---\napiVersion: moat.dev/v1alpha1\nkind: FailsafeProfile\nmetadata:\n  name: bench-no-failsafes\n\
             spec:\n  selector: ibm.role == 'worker_public'\n  inbound: []\n  outbound: []\n",
            self.shape, self.n, self.seed
        );
        for p in &self.policies {
            let _ = write!(
                s,
                "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: {}\n\
                 spec:\n  selector: ibm.role == 'worker_public'\n  order: {}\n  types: [Ingress]\n  ingress:\n",
                p.name, p.order
            );
            for r in &p.rules {
                let action = match r.action {
                    Action::Allow => "Allow",
                    Action::Deny => "Deny",
                };
                let proto = match r.proto {
                    Proto::Tcp => "TCP".to_string(),
                    Proto::Udp => "UDP".to_string(),
                    Proto::Icmp => "ICMP".to_string(),
                    Proto::Other(n) => n.to_string(),
                };
                let _ = write!(s, "    - action: {action}\n      protocol: {proto}\n");
                let ports = |p: Ports| {
                    if p.0 == p.1 {
                        p.0.to_string()
                    } else {
                        format!("\"{}:{}\"", p.0, p.1)
                    }
                };
                if r.src.is_some() || r.sport.is_some() {
                    s.push_str("      source:\n");
                    if let Some(net) = r.src {
                        let _ = writeln!(s, "        nets: [{net}]");
                    }
                    if let Some(p) = r.sport {
                        let _ = writeln!(s, "        ports: [{}]", ports(p));
                    }
                }
                if let Some(p) = r.dport {
                    let _ = writeln!(s, "      destination:\n        ports: [{}]", ports(p));
                }
            }
        }
        s
    }

    fn iptables_match(r: &Rule) -> String {
        let mut m = format!("-p {}", r.proto.number());
        if let Some(net) = r.src {
            let _ = write!(m, " -s {net}");
        }
        if let Some(p) = r.sport {
            let _ = write!(m, " --sport {}:{}", p.0, p.1);
        }
        if let Some(p) = r.dport {
            let _ = write!(m, " --dport {}:{}", p.0, p.1);
        }
        m
    }

    /// The iptables chain of policy `name`, as Calico names them.
    pub fn iptables_chain(name: &str) -> String {
        format!("cali-pi-{name}")
    }

    /// One rule of a Calico policy chain (an allow is a mark and a return,
    /// as Calico renders it; a deny a DROP).
    pub fn iptables_rule_lines(chain: &str, r: &Rule) -> Vec<String> {
        let m = Self::iptables_match(r);
        match r.action {
            Action::Allow => vec![
                format!("-A {chain} {m} -j MARK --set-xmark 0x10000/0x10000"),
                format!("-A {chain} -m mark --mark 0x10000/0x10000 -j RETURN"),
            ],
            Action::Deny => vec![format!("-A {chain} {m} -j DROP")],
        }
    }

    /// iptables-restore input in Calico's layout: INPUT jumps to
    /// cali-INPUT, which sends the host endpoint's traffic to its
    /// `cali-fh-<iface>` chain: conntrack first, then a jump per policy
    /// (policies mark what they allow), then a DROP of the rest.
    /// `ipset`: the generated allows grouped by protocol and ports, each
    /// group's sources in an ipset (`ipset_script` makes them).
    pub fn iptables_restore(&self, ipset: bool) -> String {
        let mut s = String::with_capacity(self.n * 200 + 2048);
        s.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        let fh = format!("cali-fh-{IFACE}");
        let _ = writeln!(s, ":cali-INPUT - [0:0]\n:{fh} - [0:0]");
        for p in &self.policies {
            let _ = writeln!(s, ":{} - [0:0]", Self::iptables_chain(&p.name));
        }
        s.push_str("-A INPUT -j cali-INPUT\n");
        let _ = writeln!(s, "-A cali-INPUT -i {IFACE} -j {fh}");
        s.push_str("-A cali-INPUT -m mark --mark 0x10000/0x10000 -j ACCEPT\n");
        let _ = writeln!(
            s,
            "-A {fh} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment moatbench-est -j ACCEPT"
        );
        let _ = writeln!(s, "-A {fh} -m conntrack --ctstate INVALID -j DROP");
        let _ = writeln!(s, "-A {fh} -j MARK --set-xmark 0x0/0x10000");
        for p in &self.policies {
            let chain = Self::iptables_chain(&p.name);
            let _ = writeln!(s, "-A {fh} -j {chain}");
            let _ = writeln!(s, "-A {fh} -m mark --mark 0x10000/0x10000 -j RETURN");
            if ipset && p.name == "bench-rules" {
                for (k, (rule, _)) in self.ipset_groups().iter().enumerate() {
                    let mut r = *rule;
                    r.src = None;
                    let m = Self::iptables_match(&r);
                    let target = match r.action {
                        Action::Allow => "MARK --set-xmark 0x10000/0x10000",
                        Action::Deny => "DROP",
                    };
                    let _ = writeln!(
                        s,
                        "-A {chain} -m set --match-set mb-g{k} src {m} -j {target}"
                    );
                    if r.action == Action::Allow {
                        let _ = writeln!(s, "-A {chain} -m mark --mark 0x10000/0x10000 -j RETURN");
                    }
                }
                continue;
            }
            for r in &p.rules {
                for line in Self::iptables_rule_lines(&chain, r) {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        }
        let _ = writeln!(
            s,
            "-A {fh} -m comment --comment moatbench-drop -j DROP\nCOMMIT"
        );
        s
    }

    /// Whether the ipset rendering keeps the description's meaning: it
    /// groups rules, so it needs every generated rule to have one action.
    pub fn ipset_applies(&self) -> bool {
        let rules = self.generated();
        rules.iter().all(|r| r.action == rules[0].action)
    }

    /// The generated rules grouped by everything but the source, in first
    /// appearance order, with their sources.
    fn ipset_groups(&self) -> Vec<(Rule, Vec<Net>)> {
        let mut groups: Vec<(Rule, Vec<Net>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for r in self.generated() {
            let mut key = *r;
            key.src = None;
            let k = *index.entry(format!("{key:?}")).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            groups[k].1.extend(r.src);
        }
        groups
    }

    /// `ipset restore` input making the sets `iptables_restore(true)` uses.
    pub fn ipset_script(&self) -> String {
        let mut s = String::new();
        for (k, (_, nets)) in self.ipset_groups().iter().enumerate() {
            let _ = writeln!(
                s,
                "create mb-g{k} hash:net family inet maxelem {}",
                (nets.len() * 2).max(1024)
            );
            for n in nets {
                let _ = writeln!(s, "add mb-g{k} {n}");
            }
        }
        s
    }

    fn nft_match(r: &Rule) -> String {
        let mut m = String::new();
        if let Some(net) = r.src {
            let _ = write!(m, "ip saddr {net} ");
        }
        let range = |p: Ports| {
            if p.0 == p.1 {
                p.0.to_string()
            } else {
                format!("{}-{}", p.0, p.1)
            }
        };
        match (r.sport, r.dport) {
            (None, None) => {
                let _ = write!(m, "ip protocol {} ", r.proto.nft());
            }
            (sport, dport) => {
                let proto = r.proto.nft();
                if let Some(p) = sport {
                    let _ = write!(m, "{proto} sport {} ", range(p));
                }
                if let Some(p) = dport {
                    let _ = write!(m, "{proto} dport {} ", range(p));
                }
            }
        }
        m
    }

    fn nft_verdict(a: Action) -> &'static str {
        match a {
            Action::Allow => "accept",
            Action::Deny => "drop",
        }
    }

    /// The nft table's name (in family `ip`, or `netdev`).
    pub const NFT_TABLE: &'static str = "moatbench";

    /// nft script: a chain per policy, in order, jumped to from the host
    /// endpoint's chain; each rule a line (the linear walk).
    pub fn nft_linear(&self) -> String {
        let t = Self::NFT_TABLE;
        let mut s = String::with_capacity(self.n * 80 + 2048);
        let _ = writeln!(s, "table ip {t} {{");
        for p in &self.policies {
            let _ = writeln!(s, "  chain pol-{} {{", p.name);
            for r in &p.rules {
                let _ = writeln!(
                    s,
                    "    {}{}",
                    Self::nft_match(r),
                    Self::nft_verdict(r.action)
                );
            }
            s.push_str("  }\n");
        }
        let _ = writeln!(s, "  chain hep-{IFACE} {{");
        s.push_str("    ct state established,related counter accept comment \"moatbench-est\"\n");
        s.push_str("    ct state invalid drop\n");
        for p in &self.policies {
            let _ = writeln!(s, "    jump pol-{}", p.name);
        }
        s.push_str("    counter drop comment \"moatbench-drop\"\n  }\n");
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname \"{IFACE}\" jump hep-{IFACE}\n  }}\n}}"
        );
        s
    }

    /// The generated rules as one verdict map keyed by source, protocol,
    /// (source port,) destination port: one lookup, whatever `n`.
    fn nft_vmap(&self, s: &mut String, allow: &str) -> &'static str {
        let with_sport = self.generated().iter().any(|r| r.sport.is_some());
        let range = |p: Option<Ports>| {
            let p = p.unwrap_or((0, 65535));
            if p.0 == p.1 {
                p.0.to_string()
            } else {
                format!("{}-{}", p.0, p.1)
            }
        };
        let (ty, key) = if with_sport {
            (
                "ipv4_addr . inet_proto . inet_service . inet_service",
                "ip saddr . meta l4proto . th sport . th dport",
            )
        } else {
            (
                "ipv4_addr . inet_proto . inet_service",
                "ip saddr . meta l4proto . th dport",
            )
        };
        let _ = writeln!(
            s,
            "  map rules {{\n    type {ty} : verdict\n    flags interval\n    elements = {{"
        );
        let rules = self.generated();
        for (i, r) in rules.iter().enumerate() {
            let src = r.src.map_or("0.0.0.0/0".to_string(), |n| n.to_string());
            let _ = write!(s, "      {src} . {}", r.proto.nft());
            if with_sport {
                let _ = write!(s, " . {}", range(r.sport));
            }
            let verdict = match r.action {
                Action::Allow => allow,
                Action::Deny => "drop",
            };
            let _ = write!(s, " . {} : {verdict}", range(r.dport));
            s.push_str(if i + 1 < rules.len() { ",\n" } else { "\n" });
        }
        s.push_str("    }\n  }\n");
        key
    }

    /// The fixed policies around the generated ones, as nft lines.
    fn nft_fixed(&self, s: &mut String, indent: &str, range: std::ops::Range<usize>) {
        for p in &self.policies[range] {
            for r in &p.rules {
                let _ = writeln!(
                    s,
                    "{indent}{}{}",
                    Self::nft_match(r),
                    Self::nft_verdict(r.action)
                );
            }
        }
    }

    /// nft script at the input hook, the generated rules in a verdict map.
    pub fn nft_sets(&self) -> String {
        let t = Self::NFT_TABLE;
        let mut s = String::with_capacity(self.n * 60 + 2048);
        let _ = writeln!(s, "table ip {t} {{");
        let key = self.nft_vmap(&mut s, "accept");
        let _ = writeln!(s, "  chain hep-{IFACE} {{");
        s.push_str("    ct state established,related counter accept comment \"moatbench-est\"\n");
        s.push_str("    ct state invalid drop\n");
        self.nft_fixed(&mut s, "    ", 0..1);
        let _ = writeln!(s, "    {key} vmap @rules");
        self.nft_fixed(&mut s, "    ", 2..self.policies.len());
        s.push_str("    counter drop comment \"moatbench-drop\"\n  }\n");
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname \"{IFACE}\" jump hep-{IFACE}\n  }}\n}}"
        );
        s
    }

    /// nft script at the netdev ingress hook of the interface (before the
    /// IP stack, without conntrack), the generated rules in a verdict map.
    pub fn nft_netdev(&self) -> String {
        let t = Self::NFT_TABLE;
        let mut s = String::with_capacity(self.n * 60 + 2048);
        let _ = writeln!(s, "table netdev {t} {{");
        let key = self.nft_vmap(&mut s, "jump mb-allow");
        s.push_str("  chain mb-allow {\n    counter accept comment \"moatbench-allow\"\n  }\n");
        let _ = writeln!(
            s,
            "  chain ingress {{\n    type filter hook ingress device \"{IFACE}\" priority filter; policy accept;"
        );
        s.push_str("    meta protocol != ip counter accept comment \"moatbench-other\"\n");
        // The host endpoint guards traffic to the host's own address.
        let _ = writeln!(s, "    ip daddr != {HOST_ADDR} accept");
        self.nft_fixed(&mut s, "    ", 0..1);
        let _ = writeln!(s, "    {key} vmap @rules");
        self.nft_fixed(&mut s, "    ", 2..self.policies.len());
        s.push_str("    counter drop comment \"moatbench-drop\"\n  }\n}\n");
        s
    }

    /// Writes every rendering into `dir`; returns the files written.
    pub fn write_all(&self, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let stem = format!("{}-{}", shape_name(self.shape), self.n);
        let mut files = vec![
            (format!("{stem}.moat.yaml"), self.moat_yaml()),
            (format!("{stem}.iptables"), self.iptables_restore(false)),
            (format!("{stem}.linear.nft"), self.nft_linear()),
            (format!("{stem}.sets.nft"), self.nft_sets()),
            (format!("{stem}.netdev.nft"), self.nft_netdev()),
        ];
        if self.ipset_applies() {
            files.push((format!("{stem}.ipset"), self.ipset_script()));
            files.push((
                format!("{stem}.ipset.iptables"),
                self.iptables_restore(true),
            ));
        }
        let mut out = Vec::new();
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            out.push(path);
        }
        Ok(out)
    }
}

/// The shape's name in file names and reports.
pub fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Realistic => "realistic",
        Shape::Adversarial => "adversarial",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_rules_other_seed_other_rules() {
        for shape in [Shape::Realistic, Shape::Adversarial] {
            let a = RuleSet::generate(shape, 500, 7).unwrap();
            let b = RuleSet::generate(shape, 500, 7).unwrap();
            assert_eq!(a.moat_yaml(), b.moat_yaml());
            assert_eq!(a.nft_sets(), b.nft_sets());
            assert_eq!(a.iptables_restore(false), b.iptables_restore(false));
        }
        let a = RuleSet::generate(Shape::Realistic, 500, 7).unwrap();
        let c = RuleSet::generate(Shape::Realistic, 500, 8).unwrap();
        assert_ne!(a.moat_yaml(), c.moat_yaml());
    }

    #[test]
    fn adversarial_rules_differ_on_every_field() {
        let set = RuleSet::generate(Shape::Adversarial, 2000, 1).unwrap();
        let rules = set.generated();
        for w in rules.windows(2) {
            assert_ne!(w[0].proto, w[1].proto);
            assert_ne!(w[0].src, w[1].src);
            assert_ne!(w[0].sport, w[1].sport);
            assert_ne!(w[0].dport, w[1].dport);
        }
        let dports: std::collections::HashSet<_> = rules.iter().map(|r| r.dport).collect();
        assert_eq!(dports.len(), rules.len());
        assert_eq!(rules[0].action, Action::Deny);
        assert_eq!(rules[rules.len() - 1].action, Action::Deny);
    }

    #[test]
    fn generated_sources_never_overlap_and_stay_in_10_8() {
        let set = RuleSet::generate(Shape::Realistic, 5000, 3).unwrap();
        let mut seen = std::collections::HashSet::new();
        for r in set.generated() {
            let n = r.src.unwrap();
            assert_eq!(n.addr.octets()[0], 10);
            assert!(seen.insert(u32::from(n.addr) >> 6), "{n} overlaps");
            let (_, _, _, dport) = r.example();
            assert!(dport < NODE_PORTS.0);
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(RuleSet::generate(Shape::Realistic, 0, 1)
            .unwrap_err()
            .contains("not 0"));
        assert!(RuleSet::generate(Shape::Realistic, MAX_RULES + 1, 1).is_err());
    }

    #[test]
    fn moat_reads_and_compiles_the_yaml() {
        let set = RuleSet::generate(Shape::Adversarial, 50, 1).unwrap();
        let loaded = crate::policy::load_str(std::path::Path::new("bench.yaml"), &set.moat_yaml());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.set.policies.len(), 5);
        let compiled = crate::compile::compile(&loaded.set, NODE, &[IFACE.to_string()]).unwrap();
        assert!(compiled.ifaces.contains_key(IFACE));
    }
}
