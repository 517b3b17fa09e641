//! Service account matches, as Calico converts them
//! (libcalico-go updateprocessors: `serviceAccountSelector` and a rule's
//! `serviceAccounts`): a selector over the service account's labels is the
//! same selector over the workload's `pcsa.<key>` labels; names are
//! `projectcalico.org/serviceaccount in {...}`; both together are ANDed.

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::policy::{selector::Selector, FieldResult};

/// `sel` with every label key prefixed by `prefix`.
pub fn prefixed(sel: &Selector, prefix: &str) -> Selector {
    let k = |key: &str| format!("{prefix}{key}");
    let b = |s: &Selector| Box::new(prefixed(s, prefix));
    match sel {
        Selector::All => Selector::All,
        Selector::Global => Selector::Global,
        Selector::Has(key) => Selector::Has(k(key)),
        Selector::Eq(key, v) => Selector::Eq(k(key), v.clone()),
        Selector::NotEq(key, v) => Selector::NotEq(k(key), v.clone()),
        Selector::In(key, v) => Selector::In(k(key), v.clone()),
        Selector::NotIn(key, v) => Selector::NotIn(k(key), v.clone()),
        Selector::Contains(key, v) => Selector::Contains(k(key), v.clone()),
        Selector::StartsWith(key, v) => Selector::StartsWith(k(key), v.clone()),
        Selector::EndsWith(key, v) => Selector::EndsWith(k(key), v.clone()),
        Selector::Not(s) => Selector::Not(b(s)),
        Selector::And(a, c) => Selector::And(b(a), b(c)),
        Selector::Or(a, c) => Selector::Or(b(a), b(c)),
    }
}

/// `a && b`, either one alone when the other is absent.
pub fn and(a: Option<Selector>, b: Option<Selector>) -> Option<Selector> {
    match (a, b) {
        (Some(a), Some(b)) => Some(Selector::And(Box::new(a), Box::new(b))),
        (a, b) => a.or(b),
    }
}

/// A `serviceAccountSelector` text as a workload selector.
pub fn selector(text: &str, field: &str) -> FieldResult<Selector> {
    let sel = Selector::parse(text).map_err(|e| (field.to_string(), e.to_string()))?;
    if sel.uses_global() {
        return Err((
            field.into(),
            "global() is not a service account selector".into(),
        ));
    }
    Ok(prefixed(&sel, "pcsa."))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceAccounts {
    #[serde(default)]
    names: Vec<String>,
    selector: Option<String>,
}

/// A rule's `serviceAccounts` (`{names, selector}`) as a workload selector.
pub fn rule_match(raw: &Value, field: &str) -> FieldResult<Option<Selector>> {
    let sa: RawServiceAccounts = serde_yaml_ng::from_value(raw.clone()).map_err(|e| {
        (
            field.to_string(),
            format!("{e} (serviceAccounts is {{names, selector}})"),
        )
    })?;
    let by_selector = sa
        .selector
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(|s| selector(s, &format!("{field}.selector")))
        .transpose()?;
    let by_name = (!sa.names.is_empty())
        .then(|| Selector::In("projectcalico.org/serviceaccount".into(), sa.names.clone()));
    Ok(and(by_selector, by_name))
}
