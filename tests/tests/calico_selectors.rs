//! Calico's own selector tests, as data (`../shared/conformance/`, read as
//! they are): every row of `calico-selectors.tsv` (a GlobalNetworkPolicy
//! with the selector applies, or not, to a HostEndpoint with the labels,
//! or is refused) and of `calico-selectors-valid.tsv` (the selector is
//! accepted) must agree with moat.
//!
//! Where moat and a row could disagree, Calico's source decides
//! (libcalico-go/lib/selector/tokenizer/tokenizer.go and parser.go at the
//! rows' commit): label keys of at most 512 characters (`MaxLabelLength`),
//! `notin` as `not in`, only spaces and tabs skipped (so `has(a)\n` is an
//! error), and label values refused by Calico's validator
//! (`validateObjectMetaLabels`: `"` and `'`) refuse the HostEndpoint; the
//! rows marked FLAGGED-LABELS accept that answer as well as the row's.

use std::path::{Path, PathBuf};

use moat::policy;
use serde_json::json;

/// `shared/conformance` beside an ancestor of this crate, or where these
/// machines keep it (`/work/shared`), or `MOAT_CONFORMANCE`.
fn conformance() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_CONFORMANCE") {
        return PathBuf::from(p);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared/conformance"))
        .find(|p| p.join("calico-selectors.tsv").is_file());
    let found = beside.unwrap_or_else(|| PathBuf::from("/work/shared/conformance"));
    assert!(
        found.join("calico-selectors.tsv").is_file(),
        "the conformance data is not at {} (set MOAT_CONFORMANCE)",
        found.display()
    );
    found
}

struct Row {
    line: usize,
    selector: String,
    labels: Vec<(String, String)>,
    expect: String,
    /// The comment lines above the row.
    notes: Vec<String>,
}

fn rows(file: &str) -> Vec<Row> {
    let path = conformance().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(c) = line.strip_prefix('#') {
            notes.push(c.trim().to_string());
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{file}:{}: {line:?}", i + 1);
        let labels = if cols[1] == "-" {
            Vec::new()
        } else {
            cols[1]
                .split(';')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_string(), v.to_string())
                })
                .collect()
        };
        out.push(Row {
            line: i + 1,
            selector: cols[0].to_string(),
            labels,
            expect: cols[2].to_string(),
            notes: std::mem::take(&mut notes),
        });
    }
    out
}

/// What moat says: `match`, `nomatch`, `error` (the policy is refused) or
/// `hep-refused` (the HostEndpoint's labels are).
fn judge(row: &Row) -> (String, String) {
    let labels: serde_json::Map<String, serde_json::Value> = row
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let hep = json!({"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
        "metadata": {"name": "hep", "labels": labels},
        "spec": {"node": "worker1", "interfaceName": "eth1"}});
    let gnp = json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "p"},
        "spec": {"selector": row.selector, "ingress": [{"action": "Allow"}]}});
    let text = format!("{hep}\n---\n{gnp}\n");
    let loaded = policy::load_str(Path::new("row.yaml"), &text);
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let detail = errors.join("; ");
    let Some(hep) = loaded.set.host_endpoints.first() else {
        return ("hep-refused".into(), detail);
    };
    if loaded.set.policies.is_empty() {
        return ("error".into(), detail);
    }
    assert!(errors.is_empty(), "line {}: {errors:?}", row.line);
    let applies = loaded.set.policies_for(hep).next().is_some();
    (if applies { "match" } else { "nomatch" }.into(), detail)
}

#[test]
fn calico_selector_tests_agree() {
    let rows = rows("calico-selectors.tsv");
    assert!(rows.len() >= 100, "{} rows", rows.len());
    let mut disagree = Vec::new();
    let mut flagged = 0;
    for row in &rows {
        let (got, detail) = judge(row);
        let is_flagged = row.notes.iter().any(|n| n.starts_with("FLAGGED-LABELS"));
        let ok = got == row.expect || (is_flagged && got == "hep-refused");
        if is_flagged && got == "hep-refused" {
            flagged += 1;
        }
        if !ok {
            disagree.push(format!(
                "line {}: {:?} on {:?}: Calico {}, moat {got} {detail}",
                row.line, row.selector, row.labels, row.expect
            ));
        }
    }
    assert!(
        disagree.is_empty(),
        "{} of {} rows disagree:\n{}",
        disagree.len(),
        rows.len(),
        disagree.join("\n")
    );
    assert!(flagged > 0, "the FLAGGED-LABELS HostEndpoints are refused");
    eprintln!(
        "{} rows agree ({flagged} by refusing the HostEndpoint's labels, as Calico's validator does)",
        rows.len()
    );
}

#[test]
fn calico_valid_selectors_are_accepted() {
    let rows = rows("calico-selectors-valid.tsv");
    assert!(rows.len() >= 100, "{} rows", rows.len());
    let mut refused = Vec::new();
    for row in &rows {
        assert_eq!(row.expect, "valid", "line {}", row.line);
        let (got, detail) = judge(row);
        if got == "error" || got == "hep-refused" {
            refused.push(format!("line {}: {:?}: {detail}", row.line, row.selector));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {} valid selectors refused:\n{}",
        refused.len(),
        rows.len(),
        refused.join("\n")
    );
}

/// The cases found beside Calico's tests (issue 14), each decided from
/// Calico's tokenizer and validator.
#[test]
fn cases_beside_the_tests() {
    let row = |selector: &str, labels: &[(&str, &str)]| Row {
        line: 0,
        selector: selector.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        expect: String::new(),
        notes: Vec::new(),
    };
    let key513 = "k".repeat(513);
    let key512 = "k".repeat(512);
    for (selector, labels, want) in [
        (format!("has({key513})"), vec![], "error"),
        (format!("has({key512})"), vec![], "nomatch"),
        ("a notin {\"x\"}".to_string(), vec![("a", "y")], "match"),
        ("a notin {\"x\"}".to_string(), vec![("a", "x")], "nomatch"),
        ("has(a)\n".to_string(), vec![("a", "x")], "error"),
        ("has(a)\t".to_string(), vec![("a", "x")], "match"),
        ("a == '\"'".to_string(), vec![("a", "\"")], "hep-refused"),
        ("a == \"'\"".to_string(), vec![("a", "'")], "hep-refused"),
    ] {
        let (got, detail) = judge(&row(&selector, &labels));
        assert_eq!(got, want, "{selector:?} on {labels:?}: {detail}");
    }
}
