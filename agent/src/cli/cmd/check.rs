//! `moat check`: validate and compile a policy directory offline, or judge
//! one packet against it.

use std::path::PathBuf;

use crate::{
    cli::{agent, exit::Exit},
    compile::compile,
    policy, OutputFormat,
};

/// Validate and compile a policy directory without touching the kernel;
/// exits 1 when any resource is invalid, 8 when --node or --iface names
/// what no HostEndpoint describes. With --ingress/--egress: what would
/// happen to that packet, and why.
#[derive(clap::Args)]
pub struct Args {
    /// Policy directory (.yaml, .yml, .json files, read recursively), one
    /// file, or `-` for standard input (e.g. `calicoctl get gnp -o yaml |
    /// moat check --policies -`).
    #[arg(long, value_name = "DIR|FILE|-")]
    pub policies: PathBuf,
    /// Interfaces to compile for [default: every interface a HostEndpoint
    /// of the node names].
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Bundled profile used when DIR holds no policy of its own.
    #[arg(long, value_name = "NAME", default_value = "iks-2019", value_parser = super::profile_parser())]
    pub profile: String,
    /// Calico node name whose HostEndpoints apply [default: NODE_NAME,
    /// else the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// A packet arriving on the (one) --iface, e.g.
    /// 'tcp 203.0.113.7:40000 -> 198.51.100.10:22'.
    #[arg(long, value_name = "PACKET", conflicts_with = "egress")]
    pub ingress: Option<String>,
    /// A packet leaving through the (one) --iface.
    #[arg(long, value_name = "PACKET")]
    pub egress: Option<String>,
    /// Judge the packet at pod NAMESPACE/NAME (a Pod object in DIR)
    /// instead of at an interface: Calico's answer for pod policies, which
    /// moat does not enforce.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "ifaces")]
    pub pod: Option<String>,
    /// The packet is forwarded (to or from a pod, or between interfaces),
    /// not to or from the host.
    #[arg(long)]
    pub forwarded: bool,
    /// The packet belongs to a connection already allowed.
    #[arg(long)]
    pub established: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// The agent's class-vector capacity to weigh the policy against
    /// [default: 2097152].
    #[arg(long, value_name = "N")]
    pub class_words: Option<u32>,
    #[command(flatten)]
    pub capacity: super::agent::CapacityArgs,
}

/// The capacities `moat check` weighs a policy against: the agent's, as
/// the same flags set them.
fn capacities(
    class_words: Option<u32>,
    c: &super::agent::CapacityArgs,
) -> anyhow::Result<crate::dataplane::Capacities> {
    crate::cli::config::capacities(
        &crate::cli::config::Config {
            addr_prefixes: c.addr_prefixes,
            port_prefixes: c.port_prefixes,
            rule_slots: c.rule_slots,
            ..Default::default()
        },
        moat_common::MAX_FLOWS / 2,
        class_words.unwrap_or(moat_common::MAX_CLASS_WORDS),
    )
}

/// Checks the directory, or answers the packet query.
pub fn run(args: Args) -> anyhow::Result<Exit> {
    let profile = super::profile_arg(&args.profile);
    match (args.ingress, args.egress) {
        (None, None) if args.pod.is_some() => Err(crate::cli::exit::usage(
            "--pod needs --ingress or --egress PACKET",
        )),
        (ingress, egress) if args.pod.is_some() => check_pod(
            &args.policies,
            args.pod.as_deref().unwrap_or_default(),
            ingress
                .map(|p| (moat_common::direction::INGRESS, p))
                .or(egress.map(|p| (moat_common::direction::EGRESS, p))),
            policy::reference::Query {
                forwarded: args.forwarded,
                established: args.established,
            },
            args.output,
        ),
        (None, None) => check(
            &args.policies,
            profile.as_deref(),
            args.ifaces,
            args.node,
            args.output,
            capacities(args.class_words, &args.capacity)?,
        ),
        (ingress, egress) => check_packet(
            &args.policies,
            profile.as_deref(),
            &args.ifaces,
            args.node,
            ingress
                .map(|p| (moat_common::direction::INGRESS, p))
                .or(egress.map(|p| (moat_common::direction::EGRESS, p))),
            policy::reference::Query {
                forwarded: args.forwarded,
                established: args.established,
            },
            args.output,
        ),
    }
}

fn check(
    dir: &std::path::Path,
    profile: Option<&str>,
    ifaces: Vec<String>,
    node: Option<String>,
    output: OutputFormat,
    caps: crate::dataplane::Capacities,
) -> anyhow::Result<Exit> {
    let explicit = node.is_some() || !ifaces.is_empty();
    let node = node.unwrap_or_else(agent::default_node_name);
    let loaded = agent::load_policies(dir, profile)?;
    let unknown: Vec<String> = if ifaces.is_empty() {
        vec![None]
    } else {
        ifaces.iter().map(|i| Some(i.as_str())).collect()
    }
    .into_iter()
    .filter_map(|i| crate::cli::check::unknown_target(&loaded.set, &node, i))
    .collect();
    let ifaces = if ifaces.is_empty() {
        let mut names: Vec<String> = loaded
            .set
            .host_endpoints
            .iter()
            .filter(|h| h.node == node)
            .map(|h| h.interface_name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    } else {
        ifaces
    };
    let compiled = compile(&loaded.set, &node, &ifaces);
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let warnings: Vec<String> = policy::label_key_warnings(&loaded.set)
        .iter()
        .map(ToString::to_string)
        .collect();
    let compile_error = compiled.as_ref().err().map(ToString::to_string);
    let summary = crate::cli::check::summary(&loaded);
    let (needs, capacity_error) = match &compiled {
        Ok(c) => crate::cli::check::fit(c, &caps),
        Err(_) => (None, None),
    };
    match output {
        OutputFormat::Json => {
            let tables = compiled.as_ref().ok().map(|c| {
                c.ifaces
                    .values()
                    .map(|i| {
                        serde_json::json!({
                            "iface": i.name,
                            "host_endpoint": i.host_endpoint,
                            "ingress_rules": i.table(0, moat_common::table::POLICY).rules.len(),
                            "egress_rules": i.table(1, moat_common::table::POLICY).rules.len(),
                            "ingress_failsafes": i.table(0, moat_common::table::FAILSAFE).rules.len(),
                            "egress_failsafes": i.table(1, moat_common::table::FAILSAFE).rules.len(),
                        })
                    })
                    .collect::<Vec<_>>()
            });
            println!(
                "{}",
                serde_json::json!({
                    "files": loaded.files,
                    "policies": loaded.set.policies.len(),
                    "host_endpoints": loaded.set.host_endpoints.len(),
                    "summary": summary,
                    "errors": loaded.errors.iter().map(crate::cli::check::error_report).collect::<Vec<_>>(),
                    "unknown_target": unknown,
                    "warnings": warnings,
                    "compile_error": compile_error,
                    "capacity_error": capacity_error,
                    "needs": needs,
                    "node": node,
                    "enforced": tables,
                })
            );
        }
        OutputFormat::Text => {
            for e in &errors {
                println!("error: {e}");
            }
            for w in &warnings {
                println!("warning: {w}");
            }
            if let Some(e) = &compile_error {
                println!("error: {e}");
            }
            for u in &unknown {
                println!("{}: {u}", if explicit { "error" } else { "note" });
            }
            if let Some(e) = &capacity_error {
                println!("error: {e}");
            }
            println!(
                "{}",
                summary.text(
                    usize::from(compile_error.is_some()) + usize::from(capacity_error.is_some())
                )
            );
            if let Some(n) = &needs {
                println!(
                    "one policy generation needs: {} source and {} destination prefixes (of {} each), {} rule slots (of {}), {} class vector words (of {})",
                    n.source_prefixes,
                    n.destination_prefixes,
                    caps.addr_prefixes / 2,
                    n.rule_slots,
                    caps.rule_slots / 2,
                    n.class_words,
                    caps.class_words / 2
                );
            }
            if let Ok(c) = &compiled {
                for i in c.ifaces.values() {
                    println!(
                        "node {node} {}: HostEndpoint {}, ingress {} entries, egress {} entries",
                        i.name,
                        i.host_endpoint,
                        i.table(0, moat_common::table::POLICY).rules.len(),
                        i.table(1, moat_common::table::POLICY).rules.len()
                    );
                }
                for i in &c.unenforced {
                    println!("node {node} {i}: no HostEndpoint, not enforced");
                }
            }
        }
    }
    Ok(
        if !errors.is_empty() || compile_error.is_some() || capacity_error.is_some() {
            Exit::Error
        } else if explicit && !unknown.is_empty() {
            Exit::UnknownTarget
        } else {
            Exit::Ok
        },
    )
}

/// `moat check --pod NAMESPACE/NAME --ingress|--egress PACKET`: Calico's
/// verdict at the pod (the bundled host profiles play no part).
fn check_pod(
    dir_path: &std::path::Path,
    pod: &str,
    packet: Option<(u8, String)>,
    query: policy::reference::Query,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    let Some((namespace, name)) = pod
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        return Err(crate::cli::exit::usage(format!(
            "--pod {pod:?}: expected NAMESPACE/NAME, e.g. --pod default/web-0"
        )));
    };
    let (dir, packet) = packet
        .ok_or_else(|| crate::cli::exit::usage("--pod needs --ingress or --egress PACKET"))?;
    let loaded = agent::load_policies(dir_path, None)?;
    for e in &loaded.errors {
        eprintln!("error: {e} (left out of the answer)");
    }
    let answer = crate::cli::check::answer_pod(&loaded.set, namespace, name, dir, &packet, query)?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&answer)?),
        OutputFormat::Text => print!("{}", answer.text()),
    }
    Ok(if loaded.errors.is_empty() {
        Exit::Ok
    } else {
        Exit::Error
    })
}

fn check_packet(
    dir_path: &std::path::Path,
    profile: Option<&str>,
    ifaces: &[String],
    node: Option<String>,
    packet: Option<(u8, String)>,
    query: crate::policy::reference::Query,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    let [iface] = ifaces else {
        return Err(crate::cli::exit::usage(
            "a packet query needs exactly one --iface (the interface it arrives on or leaves by)",
        ));
    };
    let (dir, packet) = packet.ok_or_else(|| anyhow::anyhow!("--ingress or --egress PACKET"))?;
    let node = node.unwrap_or_else(agent::default_node_name);
    let loaded = agent::load_policies(dir_path, profile)?;
    for e in &loaded.errors {
        eprintln!("error: {e} (left out of the answer)");
    }
    if let Some(why) = crate::cli::check::unknown_target(&loaded.set, &node, Some(iface)) {
        eprintln!("error: {why}");
        return Ok(Exit::UnknownTarget);
    }
    let answer = crate::cli::check::answer(&loaded.set, &node, iface, dir, &packet, query)?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&answer)?),
        OutputFormat::Text => print!("{}", answer.text()),
    }
    Ok(if loaded.errors.is_empty() {
        Exit::Ok
    } else {
        Exit::Error
    })
}
