//! The engines compared: how each installs a rule set in a lab namespace,
//! makes a one-rule change, and counts what it decided.

use std::{path::Path, time::Duration};

use serde::Serialize;

use super::{
    lab::Lab,
    rules::{Action, RuleSet, IFACE},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// moat's XDP program (the packets' generator is the program itself).
    MoatXdp,
    /// iptables (legacy back end), filter INPUT, Calico's layout.
    IptablesLegacy,
    /// iptables (nf_tables back end), the same rules.
    IptablesNft,
    /// iptables-legacy with the generated sources in ipsets.
    Ipset,
    /// nftables, a chain per policy, a rule per rule.
    NftLinear,
    /// nftables, the generated rules in one interval verdict map.
    NftSets,
    /// nftables at the netdev ingress hook, the same verdict map.
    NftNetdev,
}

pub const ALL: [Engine; 7] = [
    Engine::MoatXdp,
    Engine::IptablesLegacy,
    Engine::IptablesNft,
    Engine::Ipset,
    Engine::NftLinear,
    Engine::NftSets,
    Engine::NftNetdev,
];

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::MoatXdp => "moat-xdp",
            Engine::IptablesLegacy => "iptables-legacy",
            Engine::IptablesNft => "iptables-nft",
            Engine::Ipset => "ipset",
            Engine::NftLinear => "nft-linear",
            Engine::NftSets => "nft-sets",
            Engine::NftNetdev => "nft-netdev",
        }
    }

    /// The binaries the engine needs (Debian package in parentheses).
    pub fn needs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Engine::MoatXdp => &[("ip", "iproute2")],
            Engine::IptablesLegacy => &[
                ("iptables-legacy-restore", "iptables"),
                ("iptables-legacy-save", "iptables"),
            ],
            Engine::IptablesNft => &[
                ("iptables-nft-restore", "iptables"),
                ("iptables-nft-save", "iptables"),
            ],
            Engine::Ipset => &[
                ("ipset", "ipset"),
                ("iptables-legacy-restore", "iptables"),
                ("iptables-legacy-save", "iptables"),
            ],
            Engine::NftLinear | Engine::NftSets | Engine::NftNetdev => &[("nft", "nftables")],
        }
    }

    /// Whether the engine can express `set` faithfully.
    pub fn applies(self, set: &RuleSet) -> Result<(), String> {
        if self == Engine::Ipset && !set.ipset_applies() {
            return Err(
                "the generated rules mix actions; grouping their sources in sets would reorder them"
                    .into(),
            );
        }
        Ok(())
    }

    /// Installs `set` in `lab`; returns the time the tool took (process
    /// start included, as an operator sees it). Not for moat-xdp.
    pub fn install(self, lab: &Lab, set: &RuleSet) -> anyhow::Result<Duration> {
        Ok(match self {
            Engine::MoatXdp => anyhow::bail!("moat is installed through its Dataplane"),
            Engine::IptablesLegacy => {
                lab.exec("iptables-legacy-restore", &[], &set.iptables_restore(false))?
                    .1
            }
            Engine::IptablesNft => {
                lab.exec("iptables-nft-restore", &[], &set.iptables_restore(false))?
                    .1
            }
            Engine::Ipset => {
                let (_, a) = lab.exec("ipset", &["restore"], &set.ipset_script())?;
                let (_, b) =
                    lab.exec("iptables-legacy-restore", &[], &set.iptables_restore(true))?;
                a + b
            }
            Engine::NftLinear => lab.exec("nft", &["-f", "-"], &set.nft_linear())?.1,
            Engine::NftSets => lab.exec("nft", &["-f", "-"], &set.nft_sets())?.1,
            Engine::NftNetdev => lab.exec("nft", &["-f", "-"], &set.nft_netdev())?.1,
        })
    }

    /// Adds one generated rule in front of the others, as the engine's own
    /// incremental tool would (`iptables-restore --noflush`, `nft insert
    /// rule`, `nft add element`, `ipset add`). Returns the time it took.
    pub fn change_one(self, lab: &Lab, set: &RuleSet) -> anyhow::Result<Duration> {
        let (_, rule) = set.with_one_more();
        let chain = RuleSet::iptables_chain("bench-rules");
        let iptables = |tool: &str| -> anyhow::Result<Duration> {
            let mut lines = RuleSet::iptables_rule_lines(&chain, &rule);
            lines.reverse();
            let mut input = String::from("*filter\n");
            for l in lines {
                input.push_str(&l.replacen("-A ", "-I ", 1).replacen(
                    &chain,
                    &format!("{chain} 1"),
                    1,
                ));
                input.push('\n');
            }
            input.push_str("COMMIT\n");
            Ok(lab.exec(tool, &["--noflush"], &input)?.1)
        };
        let src = rule.src.map(|n| n.to_string()).unwrap_or_default();
        let (lo, hi) = rule.dport.unwrap_or((0, 65535));
        let t = RuleSet::NFT_TABLE;
        Ok(match self {
            Engine::MoatXdp => anyhow::bail!("moat is changed through its Dataplane"),
            Engine::IptablesLegacy => iptables("iptables-legacy-restore")?,
            Engine::IptablesNft => iptables("iptables-nft-restore")?,
            Engine::Ipset => {
                // A new source for an existing group is one `ipset add`.
                let (_, took) = lab.exec("ipset", &["add", "mb-g0", &src], "")?;
                took
            }
            Engine::NftLinear => {
                let r = format!("ip saddr {src} tcp dport {lo}-{hi} accept");
                let mut args = vec!["insert", "rule", "ip", t, "pol-bench-rules"];
                args.extend(r.split(' '));
                lab.exec("nft", &args, "")?.1
            }
            Engine::NftSets | Engine::NftNetdev => {
                let family = if self == Engine::NftSets {
                    "ip"
                } else {
                    "netdev"
                };
                let with_sport = set.generated().iter().any(|r| r.sport.is_some());
                let elem = if with_sport {
                    format!("{{ {src} . tcp . 0-65535 . {lo}-{hi} : accept }}")
                } else {
                    format!("{{ {src} . tcp . {lo}-{hi} : accept }}")
                };
                lab.exec("nft", &["add", "element", family, t, "rules", &elem], "")?
                    .1
            }
        })
    }

    /// (packets the engine's final drop counted, packets it accepted as
    /// established (or, at netdev ingress, by the verdict map)).
    pub fn counters(self, lab: &Lab) -> anyhow::Result<(u64, u64)> {
        let t = RuleSet::NFT_TABLE;
        let text = match self {
            Engine::MoatXdp => anyhow::bail!("moat's counters are read from its Dataplane"),
            Engine::IptablesLegacy | Engine::Ipset => {
                lab.exec("iptables-legacy-save", &["-c", "-t", "filter"], "")?
                    .0
            }
            Engine::IptablesNft => {
                lab.exec("iptables-nft-save", &["-c", "-t", "filter"], "")?
                    .0
            }
            Engine::NftLinear | Engine::NftSets => {
                lab.exec(
                    "nft",
                    &["list", "chain", "ip", t, &format!("hep-{IFACE}")],
                    "",
                )?
                .0
            }
            Engine::NftNetdev => {
                let mut s = lab
                    .exec("nft", &["list", "chain", "netdev", t, "ingress"], "")?
                    .0;
                s += &lab
                    .exec("nft", &["list", "chain", "netdev", t, "mb-allow"], "")?
                    .0;
                s
            }
        };
        let count = |tag: &str| -> anyhow::Result<u64> {
            let line = text.lines().find(|l| l.contains(tag)).ok_or_else(|| {
                anyhow::anyhow!("{}: no rule tagged {tag} in:\n{text}", self.name())
            })?;
            parse_packets(line)
                .ok_or_else(|| anyhow::anyhow!("{}: no packet count in {line:?}", self.name()))
        };
        let accepted = if self == Engine::NftNetdev {
            count("moatbench-allow")?
        } else {
            count("moatbench-est")?
        };
        Ok((count("moatbench-drop")?, accepted))
    }
}

/// The packet count of an `iptables-save -c` line (`[pkts:bytes] -A ...`)
/// or an nft rule (`counter packets N bytes M`).
fn parse_packets(line: &str) -> Option<u64> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix('[') {
        return rest.split(':').next()?.parse().ok();
    }
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Checks that every rendering of `set` parses, with the engines' own
/// checkers: `iptables-restore --test`, `nft -c -f`, in `lab` (the
/// ipsets must exist for the ipset rendering, so it is really loaded).
pub fn check_renderings(lab: &Lab, set: &RuleSet) -> anyhow::Result<()> {
    for tool in ["iptables-legacy-restore", "iptables-nft-restore"] {
        lab.exec(tool, &["--test"], &set.iptables_restore(false))?;
    }
    for script in [set.nft_linear(), set.nft_sets(), set.nft_netdev()] {
        lab.exec("nft", &["-c", "-f", "-"], &script)?;
    }
    if set.ipset_applies() {
        lab.exec("ipset", &["restore"], &set.ipset_script())?;
        lab.exec(
            "iptables-legacy-restore",
            &["--test"],
            &set.iptables_restore(true),
        )?;
    }
    Ok(())
}

/// Writes every rendering of every set.
pub fn write_rules(dir: &Path, sets: &[RuleSet]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for set in sets {
        out.extend(set.write_all(dir)?);
    }
    Ok(out)
}

/// The action a rule set's generated rules take, if all take one.
pub fn uniform_action(set: &RuleSet) -> Option<Action> {
    let rules = set.generated();
    rules
        .iter()
        .all(|r| r.action == rules[0].action)
        .then(|| rules[0].action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_counts_parse() {
        assert_eq!(
            parse_packets(
                "[1234:5678] -A cali-fh-eth0 -m comment --comment moatbench-drop -j DROP"
            ),
            Some(1234)
        );
        assert_eq!(
            parse_packets("\t\tcounter packets 99 bytes 6000 comment \"moatbench-drop\" drop"),
            Some(99)
        );
        assert_eq!(parse_packets("drop"), None);
    }
}
