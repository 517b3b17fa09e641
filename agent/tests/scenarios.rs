//! SEMANTICS.md's examples as scenarios for the reference semantics: each
//! a policy set, packets, and the verdict and deciding stage/rule Calico
//! gives them.

use std::path::Path;

use moat::{
    compile::endpoint_for,
    policy::{
        load_str, packet_spec,
        reference::{evaluate, DecidedBy, Query, Stage, Verdict},
        PolicySet,
    },
};
use moat_common::direction::{EGRESS, INGRESS};

const HEPS: &str = r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: w1-public, labels: {ibm.role: worker_public}}
spec: {node: w1, interfaceName: eth1, expectedIPs: [198.51.100.10]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: w1-private, labels: {ibm.role: worker_private}}
spec: {node: w1, interfaceName: eth0, expectedIPs: [10.0.0.10]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: w2-private, labels: {ibm.role: worker_private}}
spec: {node: w2, interfaceName: eth0, expectedIPs: [10.0.0.11]}
---
apiVersion: moat.dev/v1alpha1
kind: FailsafeProfile
metadata: {name: public-none}
spec: {selector: "ibm.role == 'worker_public'", inbound: [], outbound: []}
"#;

fn set(policies: &str) -> PolicySet {
    let l = load_str(
        Path::new("scenario.yaml"),
        &format!("{HEPS}---\n{policies}"),
    );
    assert!(l.errors.is_empty(), "{:#?}", l.errors);
    l.set
}

/// One packet and what must come of it: verdict, stage, and the deciding
/// policy/rule (`"name#index"`) or another `DecidedBy` spelled out.
struct Expect<'a> {
    iface: &'a str,
    dir: u8,
    packet: &'a str,
    query: Query,
    verdict: Verdict,
    stage: Stage,
    by: &'a str,
}

fn by_name(by: &DecidedBy) -> String {
    match by {
        DecidedBy::Rule { policy, rule, .. } => format!("{policy}#{rule}"),
        DecidedBy::Failsafe { index } => format!("failsafe#{index}"),
        DecidedBy::EndOfPolicies => "end-of-policies".into(),
        DecidedBy::Profile { .. } => "profile".into(),
        DecidedBy::Conntrack => "conntrack".into(),
        DecidedBy::ForwardedWithoutPolicy => "forwarded-without-policy".into(),
        DecidedBy::OwnAddress => "own-address".into(),
        DecidedBy::ProfileRule { profile, rule, .. } => format!("Profile/{profile}#{rule}"),
        DecidedBy::ConntrackInvalid { .. } => "conntrack-invalid".into(),
        other => format!("{other:?}"),
    }
}

fn check(set: &PolicySet, cases: &[Expect]) {
    for c in cases {
        let hep = endpoint_for(set, "w1", c.iface)
            .expect("endpoint")
            .expect("an endpoint for the iface");
        let f = packet_spec::parse(c.packet).unwrap_or_else(|e| panic!("{e}"));
        let j = evaluate(set, hep, c.dir, &f, c.query);
        assert_eq!(
            (j.verdict, j.stage, by_name(&j.by).as_str()),
            (c.verdict, c.stage, c.by),
            "{} {} {:?}: trace {:#?}",
            c.iface,
            c.packet,
            c.query,
            j.trace
        );
    }
}

const NEW: Query = Query {
    forwarded: false,
    established: false,
};
const FORWARDED: Query = Query {
    forwarded: true,
    established: false,
};
const ESTABLISHED: Query = Query {
    forwarded: false,
    established: true,
};

fn x<'a>(
    iface: &'a str,
    dir: u8,
    packet: &'a str,
    query: Query,
    verdict: Verdict,
    stage: Stage,
    by: &'a str,
) -> Expect<'a> {
    Expect {
        iface,
        dir,
        packet,
        query,
        verdict,
        stage,
        by,
    }
}

use Stage::*;
use Verdict::{Allow, Deny};

#[test]
fn deny_nodeports_is_pre_dnat_for_host_and_forwarded_new_connections() {
    let s = set(r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-nodeports}
spec:
  selector: ibm.role=='worker_public'
  order: 1100
  preDNAT: true
  applyOnForward: true
  types: [Ingress]
  ingress:
    - {action: Deny, protocol: TCP, destination: {ports: ["30000:32767"]}}
    - {action: Deny, protocol: UDP, destination: {ports: ["30000:32767"]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-web}
spec:
  selector: ibm.role=='worker_public'
  order: 1500
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80, 30080]}}]
"#);
    check(
        &s,
        &[
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:30080",
                NEW,
                Deny,
                PreDnat,
                "deny-nodeports#0",
            ),
            x(
                "eth1",
                INGRESS,
                "udp 203.0.113.7:4000 -> 198.51.100.10:31000",
                NEW,
                Deny,
                PreDnat,
                "deny-nodeports#1",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:30080",
                FORWARDED,
                Deny,
                PreDnat,
                "deny-nodeports#0",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:80",
                NEW,
                Allow,
                Normal,
                "allow-web#0",
            ),
            // Forwarded, and no applyOnForward normal policy: allowed.
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 172.30.1.5:8080",
                FORWARDED,
                Allow,
                Normal,
                "forwarded-without-policy",
            ),
            // Pre-DNAT policy polices new connections only.
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:30080 flags ACK",
                ESTABLISHED,
                Allow,
                Conntrack,
                "conntrack",
            ),
            // Host traffic with no policy allowing it: end of policies.
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:22",
                NEW,
                Deny,
                Normal,
                "end-of-policies",
            ),
            // No egress policy: host egress denied (no profile), forwarded allowed.
            x(
                "eth1",
                EGRESS,
                "tcp 198.51.100.10:4000 -> 203.0.113.7:443",
                NEW,
                Deny,
                Normal,
                "profile",
            ),
            x(
                "eth1",
                EGRESS,
                "tcp 172.30.1.5:4000 -> 203.0.113.7:443",
                FORWARDED,
                Allow,
                Normal,
                "forwarded-without-policy",
            ),
        ],
    );
}

#[test]
fn load_balancer_whitelist_untracked_and_pre_dnat() {
    let s = set(r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: whitelist}
spec:
  selector: ibm.role=='worker_public'
  order: 500
  doNotTrack: true
  applyOnForward: true
  ingress:
    - {action: Allow, protocol: TCP, source: {nets: [203.0.113.7/32]}, destination: {nets: [198.51.100.99/32], ports: [80]}}
    - {action: Deny, protocol: TCP, destination: {nets: [198.51.100.99/32], ports: [80]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: blacklist}
spec:
  selector: ibm.role=='worker_public'
  order: 500
  preDNAT: true
  applyOnForward: true
  ingress:
    - {action: Deny, source: {nets: [192.0.2.0/24]}}
"#);
    check(
        &s,
        &[
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.99:80",
                NEW,
                Allow,
                Untracked,
                "whitelist#0",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.8:4000 -> 198.51.100.99:80",
                NEW,
                Deny,
                Untracked,
                "whitelist#1",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.8:4000 -> 198.51.100.99:80",
                FORWARDED,
                Deny,
                Untracked,
                "whitelist#1",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 192.0.2.9:4000 -> 198.51.100.10:22",
                NEW,
                Deny,
                PreDnat,
                "blacklist#0",
            ),
            // Untracked policy applies before conntrack: even established.
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.8:4000 -> 198.51.100.99:80 flags ACK",
                ESTABLISHED,
                Deny,
                Untracked,
                "whitelist#1",
            ),
        ],
    );
}

#[test]
fn log_pass_order_and_profiles() {
    let s = set(r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow}
spec:
  selector: ibm.role=='worker_public'
  order: 10
  ingress: [{action: Log, protocol: TCP}, {action: Pass, protocol: TCP, destination: {ports: [80]}}, {action: Allow, protocol: TCP, destination: {ports: [81]}}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-x}
spec:
  selector: ibm.role=='worker_public'
  order: 10
  ingress: [{action: Deny, protocol: TCP, destination: {ports: [81]}}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: later}
spec:
  selector: ibm.role=='worker_public'
  order: 20
  ingress: [{action: Allow}]
"#);
    // allow-x sorts before allow ("allow-x/" < "allow/"), so it denies 81.
    check(
        &s,
        &[
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:81",
                NEW,
                Deny,
                Normal,
                "allow-x#0",
            ),
            // Pass skips `later` and hands to the profiles: none, so deny.
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:80",
                NEW,
                Deny,
                Normal,
                "allow#1",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:82",
                NEW,
                Allow,
                Normal,
                "later#0",
            ),
            x(
                "eth1",
                INGRESS,
                "udp 203.0.113.7:4000 -> 198.51.100.10:80",
                NEW,
                Allow,
                Normal,
                "later#0",
            ),
        ],
    );
    let hep = endpoint_for(&s, "w1", "eth1").expect("ok").expect("hep");
    let j = evaluate(
        &s,
        hep,
        INGRESS,
        &packet_spec::parse("tcp 203.0.113.7:4000 -> 198.51.100.10:82").expect("p"),
        NEW,
    );
    assert_eq!(
        j.logged,
        [("allow".to_string(), 0)],
        "Log records and goes on"
    );
    let walked: Vec<&str> = j.trace.iter().map(|t| t.policy.as_str()).collect();
    assert_eq!(
        walked,
        [
            "GlobalNetworkPolicy/allow-x",
            "GlobalNetworkPolicy/allow",
            "GlobalNetworkPolicy/later"
        ]
    );
}

#[test]
fn failsafes_come_first_in_every_stage_but_not_for_forwarded_traffic() {
    let s = set(r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-all-untracked}
spec:
  selector: ibm.role=='worker_private'
  doNotTrack: true
  applyOnForward: true
  ingress: [{action: Deny}]
"#);
    check(
        &s,
        &[
            x(
                "eth0",
                INGRESS,
                "tcp 10.0.0.50:4000 -> 10.0.0.10:22",
                NEW,
                Allow,
                Failsafe,
                "failsafe#0",
            ),
            x(
                "eth0",
                INGRESS,
                "tcp 10.0.0.50:4000 -> 10.0.0.10:23",
                NEW,
                Deny,
                Untracked,
                "deny-all-untracked#0",
            ),
            x(
                "eth0",
                INGRESS,
                "tcp 10.0.0.50:4000 -> 172.30.1.5:22",
                FORWARDED,
                Deny,
                Untracked,
                "deny-all-untracked#0",
            ),
            x(
                "eth0",
                EGRESS,
                "udp 10.0.0.10:4000 -> 10.0.0.2:53",
                NEW,
                Allow,
                Failsafe,
                "failsafe#0",
            ),
        ],
    );
}

#[test]
fn rule_selectors_network_sets_and_negations() {
    let s = set(r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: mgmt, labels: {role: mgmt}}
spec: {nets: [192.0.2.0/26]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: private}
spec:
  selector: ibm.role=='worker_private'
  order: 100
  ingress:
    - {action: Allow, source: {selector: "ibm.role == 'worker_private'"}}
    - {action: Allow, source: {selector: "role == 'mgmt'", notNets: [192.0.2.32/27]}}
    - {action: Allow, protocol: TCP, source: {selector: "role == 'nobody'"}}
    - {action: Allow, protocol: UDP, source: {selector: all(), namespaceSelector: global()}, destination: {notPorts: ["0:1023"]}}
"#);
    check(
        &s,
        &[
            x(
                "eth0",
                INGRESS,
                "tcp 10.0.0.11:4000 -> 10.0.0.10:80",
                NEW,
                Allow,
                Normal,
                "private#0",
            ),
            x(
                "eth0",
                INGRESS,
                "tcp 10.0.0.12:4000 -> 10.0.0.10:80",
                NEW,
                Deny,
                Normal,
                "end-of-policies",
            ),
            x(
                "eth0",
                INGRESS,
                "tcp 192.0.2.5:4000 -> 10.0.0.10:80",
                NEW,
                Allow,
                Normal,
                "private#1",
            ),
            x(
                "eth0",
                INGRESS,
                "tcp 192.0.2.40:4000 -> 10.0.0.10:80",
                NEW,
                Deny,
                Normal,
                "end-of-policies",
            ),
            // all() in global scope: known endpoints and sets only.
            x(
                "eth0",
                INGRESS,
                "udp 198.51.100.10:4000 -> 10.0.0.10:5000",
                NEW,
                Allow,
                Normal,
                "private#3",
            ),
            x(
                "eth0",
                INGRESS,
                "udp 198.51.100.10:4000 -> 10.0.0.10:53",
                NEW,
                Deny,
                Normal,
                "end-of-policies",
            ),
            x(
                "eth0",
                INGRESS,
                "udp 203.0.113.1:4000 -> 10.0.0.10:5000",
                NEW,
                Deny,
                Normal,
                "end-of-policies",
            ),
        ],
    );
}

#[test]
fn apply_on_forward_policies_govern_forwarded_traffic() {
    let s = set(r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: forward-web-only}
spec:
  selector: ibm.role=='worker_public'
  applyOnForward: true
  types: [Ingress, Egress]
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [443]}}]
"#);
    check(
        &s,
        &[
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 172.30.1.5:443",
                FORWARDED,
                Allow,
                Normal,
                "forward-web-only#0",
            ),
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 172.30.1.5:80",
                FORWARDED,
                Deny,
                Normal,
                "end-of-policies",
            ),
            // Egress applies (types) with no rules: forwarded egress denied too.
            x(
                "eth1",
                EGRESS,
                "tcp 172.30.1.5:4000 -> 203.0.113.7:80",
                FORWARDED,
                Deny,
                Normal,
                "end-of-policies",
            ),
            // The same policy governs host traffic as well.
            x(
                "eth1",
                INGRESS,
                "tcp 203.0.113.7:4000 -> 198.51.100.10:443",
                NEW,
                Allow,
                Normal,
                "forward-web-only#0",
            ),
        ],
    );
}

#[test]
fn kubernetes_network_policies_on_pods() {
    use moat::policy::reference::{evaluate_workload, Workload};
    let l = load_str(
        Path::new("k8s.yaml"),
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Namespace
metadata: {name: finance, labels: {usage: finance}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {kubernetes-dashboard-policy: allow}}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: prod, labels: {tier: backend}}
status: {podIP: 172.30.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: prod, labels: {tier: frontend}}
status: {podIP: 172.30.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: prod, labels: {tier: other}}
status: {podIP: 172.30.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger, namespace: finance, labels: {app: ledger}}
status: {podIP: 172.30.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: dashboard, namespace: kube-system, labels: {k8s-app: kubernetes-dashboard}}
status: {podIP: 172.30.3.10}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: ops}
status: {podIP: 172.30.4.10}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-from-frontend, namespace: prod}
spec:
  podSelector: {matchLabels: {tier: backend}}
  ingress:
    - from: [{podSelector: {matchLabels: {tier: frontend}}}]
    - from: [{namespaceSelector: {matchLabels: {usage: finance}}}]
      ports: [{port: 3111}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: dashboard}
spec:
  selector: k8s-app == 'kubernetes-dashboard'
  order: 100
  ingress:
    - action: Allow
      source: {namespaceSelector: "kubernetes-dashboard-policy == 'allow'"}
    - action: Deny
"#,
    );
    assert!(l.errors.is_empty(), "{:#?}", l.errors);
    let s = l.set;
    let pod = |ns: &str, name: &str| Workload::find(&s, ns, name).expect("pod");
    let judge = |p: &Workload, packet: &str| {
        let j = evaluate_workload(
            &s,
            p,
            INGRESS,
            &packet_spec::parse(packet).expect("packet"),
            NEW,
        );
        (j.verdict, by_name(&j.by))
    };
    let backend = pod("prod", "backend");
    assert_eq!(
        judge(&backend, "tcp 172.30.1.11:4000 -> 172.30.1.10:80"),
        (Allow, "knp.default.backend-from-frontend#0".into())
    );
    assert_eq!(
        judge(&backend, "tcp 172.30.1.12:4000 -> 172.30.1.10:80"),
        (Deny, "end-of-policies".into())
    );
    assert_eq!(
        judge(&backend, "tcp 172.30.2.10:4000 -> 172.30.1.10:3111"),
        (Allow, "knp.default.backend-from-frontend#1".into())
    );
    assert_eq!(
        judge(&backend, "tcp 172.30.2.10:4000 -> 172.30.1.10:3112"),
        (Deny, "end-of-policies".into())
    );
    // No policy selects `other`: Kubernetes' default allows.
    assert_eq!(
        judge(
            &pod("prod", "other"),
            "tcp 172.30.1.11:4000 -> 172.30.1.12:80"
        ),
        (Allow, "profile".into())
    );
    let dashboard = pod("kube-system", "dashboard");
    assert_eq!(
        judge(&dashboard, "tcp 172.30.4.10:4000 -> 172.30.3.10:8443"),
        (Allow, "dashboard#0".into())
    );
    assert_eq!(
        judge(&dashboard, "tcp 172.30.1.11:4000 -> 172.30.3.10:8443"),
        (Deny, "dashboard#1".into())
    );
}
