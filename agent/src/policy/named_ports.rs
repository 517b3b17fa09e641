//! Named ports: a rule port given by name (`http`, Kubernetes
//! `serve-80-tcp`) stands for the (address, protocol, port) of every
//! endpoint that declares a port of that name: pod container ports
//! (`spec.containers[].ports[]`) and HostEndpoint `spec.ports`. A rule
//! matches such a port when the packet's address on that side belongs to
//! an endpoint with the name and the packet's protocol and port are that
//! port's; a name no endpoint declares matches nothing.

use std::net::IpAddr;

use serde::Deserialize;

use crate::policy::{kubernetes::Object, PolicySet};

/// A port an endpoint declares by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: u8,
    pub port: u16,
}

/// Whether `s` is a port name (an IANA service name, as Kubernetes and
/// Calico take it): 1-15 lower-case letters, digits and '-', with a
/// letter, no leading, trailing or double '-'.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn protocol_number(p: Option<&str>, field: &str) -> Result<u8, (String, String)> {
    match p.unwrap_or("TCP") {
        "TCP" | "tcp" => Ok(6),
        "UDP" | "udp" => Ok(17),
        "SCTP" | "sctp" => Ok(132),
        other => Err((
            format!("{field}.protocol"),
            format!("{other:?} is not TCP, UDP or SCTP"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointPort {
    name: String,
    port: i64,
    protocol: Option<String>,
}

/// HostEndpoint `spec.ports`.
pub(crate) fn host_endpoint_ports(
    raw: &[serde_yaml_ng::Value],
) -> Result<Vec<NamedPort>, (String, String)> {
    let mut out = Vec::new();
    for (i, v) in raw.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        let p: RawEndpointPort = serde_yaml_ng::from_value(v.clone()).map_err(|e| {
            (
                f.clone(),
                format!("{e} (a port is {{name, port, protocol}})"),
            )
        })?;
        if !is_port_name(&p.name) {
            return Err((
                format!("{f}.name"),
                format!("{:?} is not a port name", p.name),
            ));
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                (
                    format!("{f}.port"),
                    format!("port {} is out of range 1-65535", p.port),
                )
            })?;
        out.push(NamedPort {
            name: p.name,
            protocol: protocol_number(p.protocol.as_deref(), &f)?,
            port,
        });
    }
    Ok(out)
}

/// A Pod's container ports that have a name.
pub(crate) fn pod_ports(spec: &serde_yaml_ng::Value) -> Result<Vec<NamedPort>, (String, String)> {
    let mut out = Vec::new();
    let containers = spec.get("containers").and_then(|c| c.as_sequence());
    for (ci, c) in containers.into_iter().flatten().enumerate() {
        let ports = c.get("ports").and_then(|p| p.as_sequence());
        for (pi, p) in ports.into_iter().flatten().enumerate() {
            let f = format!("spec.containers[{ci}].ports[{pi}]");
            let Some(name) = p.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let port = p
                .get("containerPort")
                .and_then(|n| n.as_i64())
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    (
                        format!("{f}.containerPort"),
                        "missing or out of range 1-65535".to_string(),
                    )
                })?;
            out.push(NamedPort {
                name: name.into(),
                protocol: protocol_number(p.get("protocol").and_then(|p| p.as_str()), &f)?,
                port,
            });
        }
    }
    Ok(out)
}

/// Every (address, port) that the name `name` stands for with `protocol`.
pub fn resolve(set: &PolicySet, name: &str, protocol: u8) -> Vec<(IpAddr, u16)> {
    let mut out = Vec::new();
    let mut add = |ips: &[IpAddr], ports: &[NamedPort]| {
        for p in ports
            .iter()
            .filter(|p| p.name == name && p.protocol == protocol)
        {
            out.extend(ips.iter().map(|ip| (*ip, p.port)));
        }
    };
    for o in &set.objects {
        if let Object::Pod { ips, ports, .. } = o {
            add(ips, ports);
        }
    }
    for h in &set.host_endpoints {
        add(&h.expected_ips, &h.ports);
    }
    out.sort();
    out.dedup();
    out
}

/// Whether `addr`:`port` over `protocol` is one of the ports `names` stand
/// for.
pub fn matches(set: &PolicySet, names: &[String], addr: IpAddr, port: u16, protocol: u8) -> bool {
    names
        .iter()
        .any(|n| resolve(set, n, protocol).contains(&(addr, port)))
}
