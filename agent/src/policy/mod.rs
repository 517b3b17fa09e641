//! The policy layer: the resources moat reads and how they are validated,
//! with no kernel, no datastore and no printing (see the crate's layer
//! table). `resources` holds the model (policies, rules, host endpoints,
//! network sets, failsafes, the set they form); `load` reads files,
//! directories (`tree`), standard input and datastore texts within the
//! `limits`; `validate` checks each resource as Calico does, reporting every
//! problem of an object at once. Beside them: `selector` (Calico's selector
//! language), `kubernetes` (NetworkPolicy and the objects selectors read),
//! `tier` (Tiers and Profiles), `named_ports`, `service_accounts`,
//! `profiles` (the bundled host profiles), `resolve` and `reference` (the
//! semantics every kernel verdict is checked against), `packet_spec` (the
//! packet grammar of `moat check` and `moat trace`).
//!
//! Everything it reads it enforces exactly; every field or kind it does not
//! enforce yet is rejected with an error that says so, never skipped.
//! Errors name the file, the resource and the field.

pub mod kubernetes;
pub mod limits;
mod load;
pub mod named_ports;
pub mod packet_spec;
pub mod profiles;
pub mod reference;
pub mod resolve;
mod resources;
pub mod selector;
pub mod service_accounts;
pub mod tier;
pub mod tree;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
pub use load::*;
pub use resources::*;
use serde::Deserialize;
use serde_yaml_ng::Value;
pub(crate) use validate::*;

use crate::policy::selector::Selector;

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Loaded {
        load_str(Path::new("test.yaml"), text)
    }

    fn only_error(text: &str) -> PolicyError {
        let l = load(text);
        assert_eq!(l.errors.len(), 1, "{:#?}", l.errors);
        l.errors[0].clone()
    }

    const GNP: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p\nspec:\n";

    fn gnp(spec: &str) -> String {
        format!("{GNP}{spec}")
    }

    #[test]
    fn multi_document_json_and_list() {
        let text = format!(
            "{}\n---\n# only a comment\n---\n{}\n---\n{}",
            gnp("  selector: all()\n  ingress:\n    - action: Allow\n"),
            r#"{"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "q", "uid": "x", "resourceVersion": "7"}, "spec": {"order": 10, "egress": [{"action": "Deny"}]}}"#,
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: projectcalico.org/v3\n    kind: HostEndpoint\n    metadata: {name: h, labels: {ibm.role: worker_public}}\n    spec: {node: n1, interfaceName: eth1}\n"
        );
        let l = load(&text);
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let names: Vec<&str> = l.set.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["q", "p"], "order 10 first, no order last");
        assert_eq!(l.set.host_endpoints[0].labels["ibm.role"], "worker_public");
        let q = &l.set.policies[0];
        assert!(
            !q.ingress_applies && q.egress_applies,
            "egress rules only: types [Egress]"
        );
        let p = &l.set.policies[1];
        assert!(p.ingress_applies && !p.egress_applies);
    }

    #[test]
    fn types_default_as_calico_does() {
        let cases = [
            ("  ingress: [{action: Allow}]\n", true, false),
            ("  egress: [{action: Allow}]\n", false, true),
            (
                "  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n",
                true,
                true,
            ),
            ("  selector: all()\n", true, false),
            ("  types: [Egress]\n", false, true),
            (
                "  types: [Ingress, Egress]\n  ingress: [{action: Allow}]\n",
                true,
                true,
            ),
        ];
        for (spec, ingress, egress) in cases {
            let l = load(&gnp(spec));
            assert!(l.errors.is_empty(), "{spec}: {:#?}", l.errors);
            let p = &l.set.policies[0];
            assert_eq!(
                (p.ingress_applies, p.egress_applies),
                (ingress, egress),
                "{spec}"
            );
        }
    }

    #[test]
    fn equal_orders_break_ties_by_name_as_calico_does() {
        let text = ["allow", "allow-x", "b", "a"]
            .iter()
            .map(|n| format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {n}}}\nspec: {{order: 5}}\n"))
            .collect::<Vec<_>>()
            .join("---\n");
        let l = load(&text);
        let names: Vec<&str> = l.set.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "allow-x", "allow", "b"]);
    }

    #[test]
    fn rule_fields_parse() {
        let l = load(&gnp(
            "  ingress:\n    - action: Log\n      protocol: tcp\n      notProtocol: 17\n      ipVersion: 4\n      source:\n        nets: [198.18.0.0/15, 198.18.1.1]\n        ports: [22, \"8000:8080\", \"53\"]\n    - action: Pass\n      protocol: ICMPv6\n      icmp: {type: 128, code: 0}\n      notICMP: {type: 1}\n",
        ));
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let r = &l.set.policies[0].ingress;
        assert_eq!(
            (
                r[0].action,
                r[0].protocol,
                r[0].not_protocol,
                r[0].ip_version
            ),
            (Action::Log, Some(6), Some(17), Some(4))
        );
        assert_eq!(r[0].source.nets.len(), 2);
        assert_eq!(
            r[0].source.ports,
            [
                PortRange { lo: 22, hi: 22 },
                PortRange { lo: 8000, hi: 8080 },
                PortRange { lo: 53, hi: 53 }
            ]
        );
        assert_eq!(
            r[1].icmp,
            Some(IcmpMatch {
                icmp_type: 128,
                code: Some(0)
            })
        );
        assert_eq!(
            r[1].not_icmp,
            Some(IcmpMatch {
                icmp_type: 1,
                code: None
            })
        );
    }

    #[test]
    fn invalid_input_names_file_resource_and_field() {
        // (spec, field, words the message must contain)
        let cases: &[(&str, &str, &str)] = &[
            ("  Tier: default\n", "spec.Tier", "did you mean `tier`"),
            ("  NamespaceSelector: all()\n", "spec.NamespaceSelector", "did you mean `namespaceSelector`"),
            ("  ingress: [{action: allow}]\n", "spec.ingress[0].action", "did you mean Allow"),
            ("  ingress: [{action: Reject}]\n", "spec.ingress[0].action", "unknown action"),
            ("  ingress: [{action: Allow, protocol: TCP, destination: {ports: [70000]}}]\n", "spec.ingress[0].destination.ports[0]", "out of range"),
            ("  ingress: [{action: Allow, protocol: TCP, destination: {ports: [\"90:80\"]}}]\n", "spec.ingress[0].destination.ports[0]", "backwards"),
            ("  ingress: [{action: Allow, destination: {ports: [80]}}]\n", "spec.ingress[0].destination.ports", "need protocol"),
            ("  ingress: [{action: Allow, protocol: ICMP, destination: {ports: [80]}}]\n", "spec.ingress[0].destination.ports", "need protocol"),
            ("  ingress: [{action: Allow, icmp: {type: 8}}]\n", "spec.ingress[0].icmp", "need protocol ICMP"),
            ("  ingress: [{action: Allow, protocol: ICMP, icmp: {type: 255}}]\n", "spec.ingress[0].icmp.type", "out of range"),
            ("  ingress: [{action: Allow, protocol: ICMP, icmp: {code: 1}}]\n", "spec.ingress[0].icmp.code", "needs an ICMP type"),
            ("  ingress: [{action: Allow, protocol: TPC}]\n", "spec.ingress[0].protocol", "did you mean TCP"),
            ("  ingress: [{action: Allow, protocol: 256}]\n", "spec.ingress[0].protocol", "out of range"),
            ("  ingress: [{action: Allow, source: {nets: [10.0.0.0/33]}}]\n", "spec.ingress[0].source.nets[0]", "not a CIDR"),
            ("  ingress: [{action: Allow, ipVersion: 4, source: {nets: [\"2001:db8::/32\"]}}]\n", "spec.ingress[0].source.nets[0]", "ipVersion 4"),
            ("  ingress: [{action: Allow, ipVersion: 5}]\n", "spec.ingress[0].ipVersion", "neither 4 nor 6"),
            ("  ingress: [{action: Allow, source: {selector: \"a ==\"}}]\n", "spec.ingress[0].source.selector", "column"),
            ("  selector: \"ibm.role = 'x'\"\n", "spec.selector", "column 10"),
            ("  selector: global()\n", "spec.selector", "global()"),
            ("  preDNAT: true\n  doNotTrack: true\n  applyOnForward: true\n", "spec.preDNAT", "cannot both"),
            ("  preDNAT: true\n", "spec.preDNAT", "applyOnForward"),
            ("  preDNAT: true\n  applyOnForward: true\n  egress: [{action: Allow}]\n", "spec.egress", "egress rules"),
            ("  preDNAT: true\n  applyOnForward: true\n  types: [Egress]\n", "spec.types", "Egress type"),
            ("  types: [ingress]\n", "spec.types[0]", "did you mean Ingress"),
            ("  order: .nan\n", "spec.order", "finite"),
            ("  ingress: [{action: Allow, source: {namespaceSelector: \"global() && a == 'b'\"}}]\n", "spec.ingress[0].source.namespaceSelector", "global()"),
        ];
        for (spec, field, words) in cases {
            let e = only_error(&gnp(spec));
            assert_eq!(e.file, Path::new("test.yaml"), "{spec}");
            assert_eq!(e.resource, "GlobalNetworkPolicy/p", "{spec}");
            assert_eq!(e.field, *field, "{spec}: {e}");
            assert!(e.message.contains(words), "{spec}: {e}");
        }
    }

    #[test]
    fn stages_and_negations_load_into_the_model() {
        let l = load(&gnp("  preDNAT: true\n  applyOnForward: true\n  ingress: [{action: Deny, source: {notNets: [10.0.0.0/8]}}]\n"));
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let p = &l.set.policies[0];
        assert!(p.pre_dnat && p.apply_on_forward && !p.do_not_track);
        assert_eq!(p.ingress[0].source.not_nets.len(), 1);
        // Named ports are read; what is neither a number nor a name is not.
        let l = load(&gnp(
            "  ingress: [{action: Deny, protocol: TCP, destination: {ports: [http, 22]}}]\n",
        ));
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        assert_eq!(
            l.set.policies[0].ingress[0].destination.named_ports,
            ["http"]
        );
        let e = only_error(&gnp(
            "  ingress: [{action: Deny, protocol: TCP, destination: {ports: [Not_A_Name]}}]\n",
        ));
        assert_eq!(e.field, "spec.ingress[0].destination.ports[0]");
    }

    #[test]
    fn namespaced_and_kubernetes_policies_and_sets() {
        let l = load(concat!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\n",
            "spec: {selector: \"app == 'db'\", ingress: [{action: Allow, source: {selector: \"app == 'api'\"}}]}\n---\n",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: finance, namespace: prod}\n",
            "spec:\n  podSelector: {matchLabels: {tier: backend}}\n  ingress:\n    - from: [{namespaceSelector: {matchLabels: {usage: finance}}, podSelector: {}}]\n      ports: [{port: 3111}, {protocol: UDP, port: 53, endPort: 54}]\n    - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]\n---\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: mgmt, labels: {role: mgmt}}\nspec: {nets: [198.19.128.0/24]}\n---\n",
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: prod}\nspec: {preDNAT: true}\n",
        ));
        assert_eq!(l.errors.len(), 1, "{:#?}", l.errors);
        assert_eq!(l.errors[0].field, "spec.preDNAT");
        assert!(l.errors[0].message.contains("GlobalNetworkPolicy only"));
        let knp = l
            .set
            .policies
            .iter()
            .find(|p| p.kind == PolicyKind::KubernetesNetworkPolicy)
            .expect("knp");
        assert_eq!(
            (knp.name.as_str(), knp.namespace.as_deref(), knp.order),
            ("knp.default.finance", Some("prod"), Some(1000.0))
        );
        assert_eq!(
            knp.ingress.len(),
            3,
            "one rule per peer and protocol: {:#?}",
            knp.ingress
        );
        assert_eq!(
            knp.ingress[0].destination.ports,
            [PortRange { lo: 3111, hi: 3111 }]
        );
        assert_eq!(
            knp.ingress[1].destination.ports,
            [PortRange { lo: 53, hi: 54 }]
        );
        assert!(
            knp.ingress[0].source.namespace_selector.is_some()
                && knp.ingress[0].source.selector.is_some(),
            "both selectors: AND"
        );
        assert_eq!(
            knp.ingress[2].source.not_nets,
            ["10.1.0.0/16".parse::<IpNet>().expect("net")]
        );
        let pod = BTreeMap::from([
            ("tier".to_string(), "backend".to_string()),
            (
                "projectcalico.org/orchestrator".to_string(),
                "k8s".to_string(),
            ),
            (
                "projectcalico.org/namespace".to_string(),
                "prod".to_string(),
            ),
        ]);
        assert!(knp.selector.matches(&pod));
        assert!(
            l.set
                .policies
                .iter()
                .all(|p| !p.can_select_host_endpoints()),
            "pod policies"
        );
        assert_eq!(l.set.network_sets[0].nets.len(), 1);
    }

    #[test]
    fn bad_documents_and_names() {
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: <policy-name>}\nspec: {}\n# <not-this-one>\n");
        assert_eq!(e.field, "");
        assert!(
            e.message
                .starts_with("placeholder file: fill in <policy-name> before"),
            "{e}"
        );
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: Policy_1}\nspec: {}\n");
        assert_eq!(e.field, "metadata.name");
        assert!(e.message.contains("not a valid name"), "{e}");
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nSpec: {}\n");
        assert!(e.message.contains("did you mean `spec`"), "{e}");
        let e = only_error(
            "apiVersion: projectcalico.org/v2\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\n",
        );
        assert_eq!(e.field, "apiVersion");
        let e = only_error("- a\n- b\n");
        assert!(e.message.contains("not a resource"), "{e}");
        let e = only_error("key: [unclosed\n");
        assert!(e.message.contains("not valid YAML"), "{e}");
        // A HostEndpoint placeholder from the corpus (interface left blank).
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\nspec: {node: n, interfaceName: eth1, expectedIPs: [\"300.1.1.1\"]}\n");
        assert_eq!(e.field, "spec.expectedIPs[0]");
    }

    #[test]
    fn an_invalid_object_leaves_the_rest_in_force() {
        let text = format!(
            "{}---\n{}",
            gnp("  ingress: [{action: Allow}]\n"),
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: broken}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [99999]}}]}\n"
        );
        let l = load(&text);
        assert_eq!(l.errors.len(), 1);
        assert_eq!(l.errors[0].resource, "GlobalNetworkPolicy/broken");
        assert_eq!(l.set.policies.len(), 1);
        assert_eq!(l.set.policies[0].name, "p");
    }

    #[test]
    fn an_invalid_new_version_keeps_the_last_good_one() {
        let good = load(&format!(
            "{}---\n{}",
            gnp("  ingress: [{action: Deny, protocol: TCP, destination: {ports: [22]}}]\n"),
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: q}\nspec: {ingress: [{action: Allow}]}\n"
        ));
        assert!(good.errors.is_empty());
        // p breaks, q is edited validly, r is new and invalid.
        let mut next = load(&format!(
            "{}---\n{}---\n{}",
            gnp("  ingress: [{action: Deny, protocol: TCP, destination: {ports: [99999]}}]\n"),
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: q}\nspec: {order: 5, ingress: [{action: Allow}]}\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: r}\nspec: {ingress: [{action: Nope}]}\n"
        ));
        let kept = keep_last_good(&good.set, &mut next);
        assert_eq!(kept.len(), 1, "{kept:?}");
        let names: Vec<(&str, Option<f64>)> = next
            .set
            .policies
            .iter()
            .map(|p| (p.name.as_str(), p.order))
            .collect();
        assert_eq!(
            names,
            [("q", Some(5.0)), ("p", None)],
            "p kept as it was, q updated, r not applied"
        );
        assert_eq!(next.set.policies[1].ingress[0].destination.ports[0].lo, 22);
        assert_eq!(next.errors.len(), 2, "both errors still reported");
        // A file that no longer parses keeps everything it held.
        let mut broken = load("key: [unclosed\n");
        let kept = keep_last_good(&good.set, &mut broken);
        assert_eq!((kept.len(), broken.set.policies.len()), (2, 2));
        // An object removed from a valid file is removed.
        let mut removed = load(&gnp("  ingress: [{action: Deny}]\n"));
        assert!(keep_last_good(&good.set, &mut removed).is_empty());
        assert_eq!(removed.set.policies.len(), 1);
    }

    #[test]
    fn near_miss_label_keys_are_flagged() {
        let l = load(concat!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public}}\nspec: {node: n, interfaceName: eth1}\n---\n",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\n",
            "spec: {selector: \"ibm.rol == 'worker_public'\", ingress: [{action: Allow, source: {selector: \"has(app)\"}}]}\n",
        ));
        let w = label_key_warnings(&l.set);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert_eq!(w[0].field, "spec.selector");
        assert!(w[0].message.contains("did you mean `ibm.role`"), "{}", w[0]);
    }

    #[test]
    fn duplicate_names_reject_both() {
        let text = format!("{}---\n{}", gnp("  order: 1\n"), gnp("  order: 2\n"));
        let l = load(&text);
        assert_eq!(l.errors.len(), 2, "{:#?}", l.errors);
        assert!(l.set.policies.is_empty());
        assert!(l.errors[0].message.contains("more than once"));
    }

    #[test]
    fn failsafes_from_felix_configuration_and_profiles() {
        let l = load(
            "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec:\n  failsafeInboundHostPorts: [{protocol: tcp, port: 22, net: 10.0.0.0/8}]\n---\napiVersion: moat.dev/v1alpha1\nkind: FailsafeProfile\nmetadata: {name: pub}\nspec: {selector: \"ibm.role == 'worker_public'\", inbound: [], outbound: []}\n---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: pub, labels: {ibm.role: worker_public}}\nspec: {node: n, interfaceName: eth1}\n---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: priv, labels: {ibm.role: worker_private}}\nspec: {node: n, interfaceName: eth0}\n",
        );
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let by_name = |n: &str| {
            l.set
                .host_endpoints
                .iter()
                .find(|h| h.name == n)
                .expect("hep")
        };
        let public = l.set.failsafes_for(by_name("pub")).expect("failsafes");
        assert!(public.inbound.is_empty() && public.outbound.is_empty());
        let private = l.set.failsafes_for(by_name("priv")).expect("failsafes");
        assert_eq!(private.inbound.len(), 1);
        assert_eq!(
            private.inbound[0].net,
            Some("10.0.0.0/8".parse().expect("net"))
        );
        assert_eq!(
            private.outbound,
            Failsafes::calico_defaults().outbound,
            "unset list keeps Calico's default"
        );
        let e = only_error("apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec: {logSeverityScreen: Info}\n");
        assert!(e.message.contains("only the failsafe port fields"), "{e}");
    }

    #[test]
    fn calico_validator_cases() {
        // notNets of everything can never match: refused, as Calico does.
        for net in ["0.0.0.0/0", "::/0"] {
            let e = only_error(&gnp(&format!(
                "  ingress:\n    - action: Allow\n      source: {{notNets: ['{net}']}}\n"
            )));
            assert_eq!(e.field, "spec.ingress[0].source.notNets[0]", "{e}");
            assert!(e.message.contains("excludes every address"), "{e}");
        }
        // notICMP needs no protocol (only icmp does).
        let l = load(&gnp(
            "  ingress:\n    - action: Allow\n      notICMP: {type: 8}\n",
        ));
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.set.policies[0].ingress[0].not_icmp.unwrap().icmp_type, 8);
        let e = only_error(&gnp(
            "  ingress:\n    - action: Allow\n      icmp: {type: 8}\n",
        ));
        assert_eq!(e.field, "spec.ingress[0].icmp");
        // IPv4 octets with leading zeros: refused everywhere a net is read.
        for net in ["198.010.1.1", "010.0.0.0/8", "::ffff:1.02.3.4"] {
            let e = only_error(&gnp(&format!(
                "  ingress:\n    - action: Allow\n      source: {{nets: ['{net}']}}\n"
            )));
            assert!(e.message.contains("leading zero"), "{net}: {e}");
        }
        assert!(parse_net("10.0.0.0/8").is_ok() && parse_net("0.0.0.0/0").is_ok());
        // Label keys and values as Calico's validator has them.
        for (labels, field) in [
            ("{a: '\"'}", "metadata.labels.a"),
            ("{a: \"'\"}", "metadata.labels.a"),
            ("{a: -x}", "metadata.labels.a"),
            ("{'Bad_/x': y}", "metadata.labels.Bad_/x"),
            ("{'a b': y}", "metadata.labels.a b"),
        ] {
            let e = only_error(&format!("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: h, labels: {labels}}}\nspec: {{node: n, interfaceName: eth1}}\n"));
            assert_eq!(e.field, field, "{labels}: {e}");
        }
        let l = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, labels: {ibm.role: worker_public, 'projectcalico.org/name': x.y-z_1, empty: ''}}\nspec: {node: n, interfaceName: eth1}\n");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    }

    #[test]
    fn every_problem_of_an_object_in_one_run() {
        let l = load(&gnp(
            "  selector: all()\n  ingress:\n    - action: allow\n      protocl: TCP\n      source: {nets: [10.0.0.0/33], nots: x}\n    - action: Allow\n      protocol: TCP\n      destination: {ports: [70000, \"9:1\"]}\n  Types: [Ingress]\n",
        ));
        let fields: Vec<&str> = l.errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.Types",
            "spec.ingress[0].protocl",
            "spec.ingress[0].source.nots",
            "spec.ingress[0].action",
            "spec.ingress[0].source.nets[0]",
            "spec.ingress[1].destination.ports[0]",
            "spec.ingress[1].destination.ports[1]",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(l
            .errors
            .iter()
            .all(|e| e.resource == "GlobalNetworkPolicy/p"));
        assert!(
            l.set.policies.is_empty(),
            "an object with problems is left out"
        );
        // Metadata typos and every unknown field of a HostEndpoint.
        let l = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h, lables: {a: b}, Namespace: x}\nspec: {node: n, interfacename: eth1, expectedIps: []}\n");
        let fields: Vec<&str> = l.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["metadata.lables", "metadata.Namespace"],
            "{:?}",
            l.errors
        );
        assert!(l.errors[0].message.contains("did you mean `labels`"));
        assert!(l.errors[1].message.contains("did you mean `namespace`"));
        let l = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\nspec: {node: n, interfacename: eth1, expectedIps: []}\n");
        let msgs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].contains("spec.interfacename")
                && msgs[0].contains("did you mean `interfaceName`"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("spec.expectedIps") && msgs[1].contains("did you mean `expectedIPs`"),
            "{msgs:?}"
        );
        // kubectl's metadata is all accepted.
        let l = load("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p, uid: x, resourceVersion: '1', generation: 2, creationTimestamp: '2024-01-01T00:00:00Z', annotations: {a: b}, managedFields: [{manager: kubectl}], finalizers: [], ownerReferences: []}\nspec: {selector: all()}\n");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    }
}
