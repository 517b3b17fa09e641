//! The agent's layers, as `lib.rs`'s doc states them, checked against the
//! source: every `crate::<layer>` a file of one layer names must be a layer
//! it may use. A forbidden edge (policy -> dataplane, sources -> dataplane,
//! ...) fails here with the file and line.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// Each layer and the layers it may use (itself always allowed).
const ALLOWED: &[(&str, &[&str])] = &[
    ("policy", &[]),
    ("compile", &["policy"]),
    ("dataplane", &["policy", "compile"]),
    ("events", &["policy", "compile", "dataplane"]),
    ("sources", &["policy", "compile"]),
    ("bench", &["policy", "compile", "dataplane", "events"]),
    (
        "cli",
        &[
            "policy",
            "compile",
            "dataplane",
            "events",
            "sources",
            "bench",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first path segment after every `crate::` in `text`, including each
/// top-level item of a `crate::{...}` group, with its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(at) = rest.find("crate::") {
        let start = offset + at;
        let preceded = text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        let after = &text[start + "crate::".len()..];
        let line = text[..start].matches('\n').count() + 1;
        if !preceded {
            if let Some(group) = after.strip_prefix('{') {
                let mut depth = 1;
                let mut item = String::new();
                let mut items = Vec::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        items.push(std::mem::take(&mut item));
                        break;
                    }
                    if c == ',' && depth == 1 {
                        items.push(std::mem::take(&mut item));
                    } else {
                        item.push(c);
                    }
                }
                for item in items {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((line, name));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push((line, name));
            }
        }
        offset = start + "crate::".len();
        rest = &text[offset..];
    }
    found
}

#[test]
fn every_layer_uses_only_the_layers_it_may() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeSet<&str> = ALLOWED.iter().map(|(l, _)| *l).collect();
    let mut violations = Vec::new();
    let mut checked = 0;
    for (layer, may) in ALLOWED {
        let mut files = Vec::new();
        let dir = src.join(layer);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        let root_file = src.join(format!("{layer}.rs"));
        if root_file.is_file() {
            files.push(root_file);
        }
        assert!(
            !files.is_empty(),
            "layer {layer} has no source under {}",
            src.display()
        );
        for file in files {
            let text = fs::read_to_string(&file).expect("read source");
            for (line, name) in crate_paths(&text) {
                checked += 1;
                if layers.contains(name.as_str()) && name != *layer && !may.contains(&name.as_str())
                {
                    violations.push(format!(
                        "{}:{line}: layer `{layer}` uses `crate::{name}`, but may use only {may:?}",
                        file.strip_prefix(&src).unwrap_or(&file).display()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate paths found: the scan is broken"
    );
    assert!(
        violations.is_empty(),
        "forbidden edges between layers:\n{}",
        violations.join("\n")
    );
}

#[test]
fn every_source_file_belongs_to_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeSet<String> = ALLOWED.iter().map(|(l, _)| l.to_string()).collect();
    for entry in fs::read_dir(&src).expect("read src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        assert!(
            layers.contains(&name) || name == "lib" || name == "main",
            "{} sits at the top of agent/src outside every layer: move it into one (see lib.rs)",
            path.display()
        );
    }
}

#[test]
fn the_common_crate_depends_on_nothing_of_moat() {
    let common = Path::new(env!("CARGO_MANIFEST_DIR")).join("../common");
    let manifest = fs::read_to_string(common.join("Cargo.toml")).expect("common manifest");
    assert!(
        !manifest.contains("path ="),
        "moat-common must not depend on another crate of the workspace:\n{manifest}"
    );
    let mut files = Vec::new();
    rust_files(&common.join("src"), &mut files);
    for file in files {
        let text = fs::read_to_string(&file).expect("read");
        assert!(
            !text.contains("moat::"),
            "{} names the agent crate",
            file.display()
        );
    }
}

#[test]
fn the_scan_sees_groups_and_paths() {
    let found = crate_paths("use crate::{policy::X, dataplane::{a, b}};\nfn f() { crate::events::x(); }\n// not moat_crate::cli\n");
    let names: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["policy", "dataplane", "events"]);
}

/// The longest a function of the programs (agent, eBPF, common, xtask) may
/// be: one that grows past it is split into named phases.
const MAX_FUNCTION_LINES: usize = 150;

/// `text` with string and character literals emptied and `//` comments cut,
/// so that braces inside them are not counted.
fn code_only(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                out.push_str("\"\"");
            }
            '\'' => {
                // A character literal ('{', '\n'), not a lifetime ('a).
                let rest: String = chars.clone().take(3).collect();
                let closes = rest.starts_with('\\') || rest.chars().nth(1) == Some('\'');
                if closes {
                    while let Some(d) = chars.next() {
                        if d == '\\' {
                            chars.next();
                        } else if d == '\'' {
                            break;
                        }
                    }
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// Each function of `text` over `limit` lines: (first line, name, lines).
fn long_functions(text: &str, limit: usize) -> Vec<(usize, String, usize)> {
    let lines: Vec<String> = text.lines().map(code_only).collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let before = &trimmed[..at];
        let is_item = before
            .split_whitespace()
            .all(|w| w.starts_with("pub") || matches!(w, "async" | "unsafe" | "const" | "extern"));
        if !is_item {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut started) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !started && l.contains(';') && !l.contains('{') {
                break;
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if started && depth == 0 {
                if j - i + 1 > limit {
                    found.push((i + 1, name.clone(), j - i + 1));
                }
                break;
            }
        }
    }
    found
}

#[test]
fn no_function_of_the_programs_is_over_the_limit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["agent/src", "ebpf/src", "common/src", "xtask/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "only {} files found", files.len());
    let mut over = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).expect("read source");
        for (line, name, n) in long_functions(&text, MAX_FUNCTION_LINES) {
            over.push(format!("{}:{line}: fn {name} is {n} lines", file.display()));
        }
    }
    assert!(
        over.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (split them into named phases):\n{}",
        over.join("\n")
    );
}

#[test]
fn the_length_scan_counts_bodies_not_literals() {
    let body: String = (0..200)
        .map(|i| format!("    let s{i} = \"{{\"; let c = '}}';\n"))
        .collect();
    let text = format!("fn long<'a>(x: &'a str) {{\n{body}}}\nfn short() {{ let _ = '{{'; }}\n");
    let found = long_functions(&text, 150);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].1.as_str(), found[0].2), ("long", 202));
    assert!(long_functions("fn decl();\nfn f() {}\n", 0).len() == 1);
}
