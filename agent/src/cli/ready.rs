//! Whether the agent protects what it was asked to: "ready" means every
//! requested interface exists, this agent's programs are attached to it
//! (a BPF link the kernel lists), and its configuration in the `IFACES`
//! map is the policy in force, governed by a HostEndpoint of this node.
//! Judged from the kernel's state, not from what the agent believes.

use std::collections::BTreeMap;

pub use crate::sources::reconcile::EndpointName;
use crate::{dataplane::Dataplane, policy::did_you_mean};

/// What `assess` is judged against.
pub struct Asked<'a> {
    /// Interfaces named (`--iface`): each must be protected.
    pub required: &'a [String],
    /// Interfaces added by automatic host endpoints: those present count,
    /// and at least one of them must be protected when none is required.
    pub optional: &'a [String],
    pub node: &'a str,
    /// The generation the agent put in force.
    pub generation: u32,
    /// name -> ifindex of the interfaces present.
    pub present: &'a BTreeMap<String, u32>,
    /// The HostEndpoints of the source (every node's).
    pub endpoints: &'a [EndpointName],
}

/// The verdict: protected interfaces and, for every one that is not, why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub protected: Vec<String>,
    pub problems: Vec<String>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.problems.is_empty() && !self.protected.is_empty()
    }
}

/// The interfaces of this network namespace.
fn interface_names() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .filter_map(|i| i.name().to_str().ok().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn absent(name: &str) -> String {
    let names = interface_names();
    let known: Vec<&str> = names.iter().map(String::as_str).collect();
    let hint = match did_you_mean(name, &known) {
        Some(m) => format!(" (did you mean {m}?)"),
        None if known.is_empty() => String::new(),
        None => format!(" (there are: {})", known.join(", ")),
    };
    format!("{name}: no such interface in this network namespace{hint}")
}

fn ungoverned(name: &str, asked: &Asked) -> String {
    let for_iface: Vec<&EndpointName> = asked
        .endpoints
        .iter()
        .filter(|e| e.interface == name)
        .collect();
    let mut nodes: Vec<&str> = for_iface.iter().map(|e| e.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    let hint = if let Some(m) = did_you_mean(asked.node, &nodes) {
        format!(" (did you mean node {m}? HostEndpoints name {name} there; give --node {m})")
    } else if !nodes.is_empty() {
        format!(
            " (HostEndpoints name {name} on node(s) {})",
            nodes.join(", ")
        )
    } else {
        let mine: Vec<&str> = asked
            .endpoints
            .iter()
            .filter(|e| e.node == asked.node)
            .map(|e| e.interface.as_str())
            .collect();
        match did_you_mean(name, &mine) {
            Some(m) => format!(" (did you mean {m}? a HostEndpoint of this node names it)"),
            None => String::new(),
        }
    };
    format!(
        "{name}: no HostEndpoint of node {} names it, so nothing is enforced there{hint}",
        asked.node
    )
}

/// Judges each interface asked for against the kernel's state.
pub fn assess(dataplane: &Dataplane, asked: &Asked) -> Readiness {
    let mut out = Readiness::default();
    let names: Vec<(&String, bool)> = asked
        .required
        .iter()
        .map(|n| (n, true))
        .chain(
            asked
                .optional
                .iter()
                .filter(|n| !asked.required.contains(n))
                .map(|n| (n, false)),
        )
        .collect();
    let indexes: Vec<u32> = names
        .iter()
        .filter_map(|(n, _)| asked.present.get(*n).copied())
        .collect();
    let views = match dataplane.kernel_view(&indexes) {
        Ok(v) => v,
        Err(e) => {
            out.problems
                .push(format!("cannot read the kernel's state: {e}"));
            return out;
        }
    };
    let mut views = views.into_iter();
    let mut optional_problems = Vec::new();
    for (name, required) in names {
        let problem = match asked.present.get(name) {
            None => Some(absent(name)),
            Some(&index) => {
                let view = views.next().unwrap_or_default();
                if !view.xdp_attached {
                    Some(format!(
                        "{name}: not attached (the kernel lists no XDP link of moat's program on ifindex {index})"
                    ))
                } else if view.tc_attached == Some(false) {
                    Some(format!(
                        "{name}: egress not attached (the kernel lists no TCX link of moat's program on ifindex {index})"
                    ))
                } else {
                    match view.config {
                        Some((_, false)) | None => Some(ungoverned(name, asked)),
                        Some((g, true)) if g != asked.generation => Some(format!(
                            "{name}: the kernel holds policy generation {g}, not {} (the one in force)",
                            asked.generation
                        )),
                        Some(_) => None,
                    }
                }
            }
        };
        match problem {
            None => out.protected.push(name.clone()),
            Some(p) if required => out.problems.push(p),
            // An absent automatic interface (a worker without a public
            // one) is no problem; one present but unprotected is.
            Some(_) if !asked.present.contains_key(name) => optional_problems.push(None),
            Some(p) => optional_problems.push(Some(p)),
        }
    }
    out.problems
        .extend(optional_problems.iter().flatten().cloned());
    if out.protected.is_empty() && out.problems.is_empty() {
        out.problems.push(format!(
            "none of the interfaces asked for ({}) exists",
            asked.optional.join(", ")
        ));
    }
    out
}
