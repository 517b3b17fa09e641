//! Calico `Tier` and `Profile` resources: the order policies are walked in
//! (tiers, each ending in its `defaultAction`) and what decides after the
//! last tier (the endpoint's profiles).
//!
//! As Calico does (api/pkg/apis/projectcalico/v3/tier.go, libcalico-go
//! lib/names/policy.go): tiers sort by `order` (lower first, none last,
//! ties by name); the built-in `default` tier has order 1,000,000 and
//! holds every policy without `spec.tier` (Kubernetes NetworkPolicies
//! too); `kube-admin` (1,000) and `kube-baseline` (10,000,000) always
//! exist. A policy's `Pass` goes on to the next tier that has a policy for
//! the endpoint; a tier that had one and did not decide ends with its
//! `defaultAction` (Deny, or Pass: on to the next tier); after the last
//! tier the endpoint's profiles decide.

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::policy::{
    spec_error, FieldResult, Loaded, Metadata, Origin, PolicyError, Rule, DEFAULT_ALLOW_PROFILE,
};

/// Name of the tier of policies without `spec.tier`.
pub const DEFAULT_TIER: &str = "default";
/// Built-in tiers, their orders and default actions, as Calico creates
/// them (libcalico-go clientv3 `EnsureInitialized`).
pub const BUILT_IN: [(&str, f64, TierAction); 3] = [
    ("kube-admin", 1_000.0, TierAction::Pass),
    (DEFAULT_TIER, 1_000_000.0, TierAction::Deny),
    ("kube-baseline", 10_000_000.0, TierAction::Pass),
];

/// What ends a tier that applied and did not decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TierAction {
    Deny,
    Pass,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    pub name: String,
    pub order: Option<f64>,
    pub default_action: TierAction,
    pub origin: Option<Origin>,
}

/// A Calico `Profile`: rules an endpoint naming it in `spec.profiles` is
/// judged by after the last tier.
#[derive(Clone, Debug, PartialEq)]
pub struct CalicoProfile {
    pub name: String,
    /// `spec.labelsToApply`: labels every endpoint naming the profile
    /// inherits (its own labels win).
    pub labels_to_apply: std::collections::BTreeMap<String, String>,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    pub origin: Origin,
}

impl CalicoProfile {
    pub fn rules(&self, dir: u8) -> &[Rule] {
        if dir == moat_common::direction::INGRESS {
            &self.ingress
        } else {
            &self.egress
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTierSpec {
    order: Option<f64>,
    default_action: Option<String>,
}

/// Reads a `Tier`.
pub(crate) fn tier(meta: &Metadata, spec: Value, origin: Origin) -> FieldResult<Tier> {
    let raw: RawTierSpec = if spec.is_null() {
        RawTierSpec::default()
    } else {
        serde_path_to_error::deserialize(spec).map_err(spec_error)?
    };
    // Tier names appear inside policy names: one DNS label, no dots.
    let n = &meta.name;
    let label_ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-');
    if !label_ok {
        return Err((
            "metadata.name".into(),
            format!("{n:?} is not a tier name (lower-case letters, digits and '-', at most 63, no dots)"),
        ));
    }
    if raw.order.is_some_and(|o| !o.is_finite()) {
        return Err(("spec.order".into(), "order must be a finite number".into()));
    }
    // Calico's CEL rules pin the built-in tiers' orders.
    if let Some((_, fixed, _)) = BUILT_IN.iter().find(|(b, _, _)| b == n) {
        if raw.order.is_some_and(|o| o != *fixed) {
            return Err((
                "spec.order".into(),
                format!("the built-in tier {n:?} has order {fixed}; it cannot be changed"),
            ));
        }
    }
    let default_action = match raw.default_action.as_deref() {
        None | Some("Deny") => TierAction::Deny,
        Some("Pass") => TierAction::Pass,
        Some(other) => {
            return Err((
                "spec.defaultAction".into(),
                format!("{other:?} is not a tier default action (Deny or Pass)"),
            ))
        }
    };
    Ok(Tier {
        name: n.clone(),
        order: raw
            .order
            .or_else(|| BUILT_IN.iter().find(|(b, _, _)| b == n).map(|(_, o, _)| *o)),
        default_action,
        origin: Some(origin),
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProfileSpec {
    ingress: Option<Vec<Value>>,
    egress: Option<Vec<Value>>,
    labels_to_apply: Option<std::collections::BTreeMap<String, String>>,
}

/// Reads a `Profile`.
pub(crate) fn profile(meta: &Metadata, spec: Value, origin: Origin) -> FieldResult<CalicoProfile> {
    let raw: RawProfileSpec = if spec.is_null() {
        RawProfileSpec::default()
    } else {
        serde_path_to_error::deserialize(spec).map_err(spec_error)?
    };
    if meta.name == DEFAULT_ALLOW_PROFILE {
        return Err((
            "metadata.name".into(),
            format!("{DEFAULT_ALLOW_PROFILE} is Calico's built-in profile; it cannot be redefined"),
        ));
    }
    Ok(CalicoProfile {
        name: meta.name.clone(),
        labels_to_apply: raw.labels_to_apply.unwrap_or_default(),
        ingress: crate::policy::rules_or_first(raw.ingress.unwrap_or_default(), "spec.ingress")?,
        egress: crate::policy::rules_or_first(raw.egress.unwrap_or_default(), "spec.egress")?,
        origin,
    })
}

/// Every tier in force, in Calico's order: the built-in ones unless the
/// set defines them, and the set's own.
pub fn ordered(tiers: &[Tier]) -> Vec<Tier> {
    let mut all: Vec<Tier> = tiers.to_vec();
    for (name, order, default_action) in BUILT_IN {
        if !all.iter().any(|t| t.name == name) {
            all.push(Tier {
                name: name.into(),
                order: Some(order),
                default_action,
                origin: None,
            });
        }
    }
    all.sort_by(|a, b| {
        let oa = a.order.unwrap_or(f64::INFINITY);
        let ob = b.order.unwrap_or(f64::INFINITY);
        oa.total_cmp(&ob).then_with(|| a.name.cmp(&b.name))
    });
    all
}

/// Policies naming a tier that does not exist, and host endpoints naming a
/// profile that does not exist, are refused (Calico refuses to create
/// them); the rest stays.
pub(crate) fn check_references(loaded: &mut Loaded) {
    let tiers = ordered(&loaded.set.tiers);
    let mut errors = Vec::new();
    loaded.set.policies.retain(|p| {
        let known = tiers.iter().any(|t| t.name == p.tier);
        if !known {
            errors.push(PolicyError {
                file: p.origin.file.clone(),
                resource: p.resource(),
                field: "spec.tier".into(),
                message: format!(
                    "tier {:?} does not exist (add its Tier resource; known: {})",
                    p.tier,
                    tiers
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                document: None,
            });
        }
        known
    });
    let profiles: Vec<String> = loaded.set.profiles.iter().map(|p| p.name.clone()).collect();
    loaded.set.host_endpoints.retain(|h| {
        let missing: Vec<&String> = h
            .profiles
            .iter()
            .filter(|p| *p != DEFAULT_ALLOW_PROFILE && !profiles.contains(p))
            .collect();
        if !missing.is_empty() {
            errors.push(PolicyError {
                file: h.origin.file.clone(),
                resource: format!("HostEndpoint/{}", h.name),
                field: "spec.profiles".into(),
                message: format!(
                    "profile {:?} does not exist (add its Profile resource, or use {DEFAULT_ALLOW_PROFILE})",
                    missing[0]
                ),
                document: None,
            });
        }
        missing.is_empty()
    });
    // Endpoints inherit their profiles' labelsToApply (their own win).
    let profiles = &loaded.set.profiles;
    for h in &mut loaded.set.host_endpoints {
        for name in &h.profiles {
            if let Some(p) = profiles.iter().find(|p| &p.name == name) {
                for (k, v) in &p.labels_to_apply {
                    h.labels.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
    loaded.errors.extend(errors);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::load_str;

    const HEP: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\nspec: {node: n, interfaceName: eth1, profiles: [web]}\n---\n";

    #[test]
    fn tiers_sort_by_order_with_the_built_in_ones() {
        let l = load_str(
            Path::new("t.yaml"),
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100, defaultAction: Pass}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: late}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: security.p}\nspec: {tier: security}\n",
        );
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        let names: Vec<String> = ordered(&l.set.tiers).into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            ["security", "kube-admin", "default", "kube-baseline", "late"]
        );
        assert_eq!(l.set.policies[0].tier, "security");
        assert_eq!(l.set.tiers[0].default_action, TierAction::Pass);
        // Calico creates kube-admin and kube-baseline passing, default denying.
        let actions: Vec<(String, TierAction)> = ordered(&[])
            .into_iter()
            .map(|t| (t.name, t.default_action))
            .collect();
        assert_eq!(
            actions,
            [
                ("kube-admin".into(), TierAction::Pass),
                ("default".into(), TierAction::Deny),
                ("kube-baseline".into(), TierAction::Pass)
            ]
        );
    }

    #[test]
    fn admin_network_policies_are_refused_by_name() {
        for kind in ["AdminNetworkPolicy", "BaselineAdminNetworkPolicy"] {
            let l = load_str(
                Path::new("t.yaml"),
                &format!("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: {kind}\nmetadata: {{name: default}}\nspec: {{priority: 10, subject: {{namespaces: {{}}}}}}\n"),
            );
            assert_eq!(l.errors.len(), 1, "{:#?}", l.errors);
            let e = l.errors[0].to_string();
            assert!(
                e.contains(&format!(
                    "{kind} (policy.networking.k8s.io/v1alpha1) is not enforced"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn missing_tiers_and_profiles_and_bad_tiers_are_refused_by_name() {
        let l = load_str(
            Path::new("t.yaml"),
            &format!("{HEP}apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\nspec: {{tier: nope}}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: default}}\nspec: {{order: 5}}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: a.b}}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: x}}\nspec: {{defaultAction: Allow}}\n"),
        );
        let text: Vec<String> = l.errors.iter().map(|e| e.to_string()).collect();
        let has = |s: &str| text.iter().any(|t| t.contains(s));
        assert!(
            has("GlobalNetworkPolicy/p: spec.tier: tier \"nope\" does not exist"),
            "{text:#?}"
        );
        assert!(
            has("HostEndpoint/h: spec.profiles: profile \"web\" does not exist"),
            "{text:#?}"
        );
        assert!(
            has("the built-in tier \"default\" has order 1000000"),
            "{text:#?}"
        );
        assert!(has("\"a.b\" is not a tier name"), "{text:#?}");
        assert!(has("\"Allow\" is not a tier default action"), "{text:#?}");
        assert!(l.set.policies.is_empty() && l.set.host_endpoints.is_empty());
        // With the Profile, the endpoint stands.
        let l = load_str(
            Path::new("t.yaml"),
            &format!("{HEP}apiVersion: projectcalico.org/v3\nkind: Profile\nmetadata: {{name: web}}\nspec: {{labelsToApply: {{tier: web}}, ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [443]}}}}]}}\n"),
        );
        assert!(l.errors.is_empty(), "{:#?}", l.errors);
        assert_eq!(l.set.host_endpoints[0].labels["tier"], "web");
        assert_eq!(l.set.host_endpoints[0].profiles, ["web"]);
        assert_eq!(l.set.profiles[0].ingress.len(), 1);
    }
}
