//! The documentation, tested, so that it cannot rot:
//! - every relative link and anchor of README.md and `docs/*.md` resolves
//!   inside the repository (a clone has nothing outside it);
//! - every example marked `<!-- example -->` (a fenced block of `$ moat ...`
//!   lines, each followed by its output) is run and must print what the
//!   docs show; `MOAT_BLESS_DOCS=1` rewrites the shown outputs instead;
//! - every `$ moat check` or `$ moat trace --offline` block is marked, so
//!   none is left unrun;
//! - every repository path the docs name in code (`agent/src/...`) exists;
//! - the reference names every configuration key and metric the code has,
//!   and docs/examples/config.yaml shows every key at its default;
//! - `deploy/kustomization.yaml` lists exactly the manifests of `deploy/`.
//!
//! The example format is described in docs/testing.md ("Examples in the
//! docs").

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .canonicalize()
        .expect("workspace root")
}

/// README.md and every `docs/*.md`.
fn doc_files() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn shown(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// The anchor GitHub gives a heading: lower case, letters, digits, `-`
/// and `_` kept, spaces made `-`, everything else dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// What a Markdown file offers and points at.
struct Parsed {
    /// Every heading's anchor (a repeated heading gets `-1`, `-2`, ...).
    anchors: BTreeSet<String>,
    /// Every link and image target, with its line.
    links: Vec<(usize, String)>,
}

fn parse(text: &str) -> Parsed {
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut links = Vec::new();
    let mut heading: Option<String> = None;
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    for (event, range) in Parser::new_ext(text, options).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_insert(0);
                let anchor = if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                };
                *n += 1;
                anchors.insert(anchor);
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                links.push((line_of(text, range.start), dest_url.to_string()));
            }
            _ => {}
        }
    }
    Parsed { anchors, links }
}

/// Why `target`, linked from `file`, does not resolve, if it does not.
fn broken(
    root: &Path,
    file: &Path,
    target: &str,
    parsed: &BTreeMap<PathBuf, Parsed>,
) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
    let dest = if path.is_empty() {
        file.to_path_buf()
    } else {
        let joined = file.parent().expect("a file's folder").join(path);
        let Ok(dest) = joined.canonicalize() else {
            return Some(format!("{} does not exist", joined.display()));
        };
        if !dest.starts_with(root) {
            return Some(format!(
                "{} is outside the repository (a clone does not have it)",
                dest.display()
            ));
        }
        dest
    };
    if anchor.is_empty() {
        return None;
    }
    let Some(target_doc) = parsed.get(&dest) else {
        return Some(format!(
            "anchor #{anchor} into {}, which is not one of the docs checked",
            shown(&dest)
        ));
    };
    (!target_doc.anchors.contains(anchor)).then(|| {
        format!(
            "{} has no heading with anchor #{anchor} (it has: {})",
            shown(&dest),
            target_doc
                .anchors
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = root();
    let parsed: BTreeMap<PathBuf, Parsed> = doc_files()
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read doc");
            let p = parse(&text);
            (f, p)
        })
        .collect();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (file, doc) in &parsed {
        for (line, target) in &doc.links {
            checked += 1;
            if let Some(why) = broken(&root, file, target, &parsed) {
                problems.push(format!("{}:{line}: ({target}) {why}", shown(file)));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the parser right?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// The repository's folders a path in the docs may start with.
const TOP: [&str; 7] = [
    "agent/", "common/", "ebpf/", "tests/", "xtask/", "deploy/", "docs/",
];

#[test]
fn every_repository_path_named_in_code_exists() {
    let root = root();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        for (event, range) in Parser::new_ext(&text, Options::ENABLE_TABLES).into_offset_iter() {
            let Event::Code(code) = event else {
                continue;
            };
            let path = code.trim_end_matches('/');
            let plain = path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c));
            if !plain || !TOP.iter().any(|t| path.starts_with(t)) {
                continue;
            }
            checked += 1;
            if !root.join(path).exists() {
                problems.push(format!(
                    "{}:{}: `{code}` does not exist",
                    shown(&file),
                    line_of(&text, range.start)
                ));
            }
        }
    }
    assert!(checked > 10, "only {checked} paths found");
    assert!(
        problems.is_empty(),
        "paths named in the docs that the repository does not have (renamed? update the docs):\n{}",
        problems.join("\n")
    );
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(
        slug("`moat check` with a packet"),
        "moat-check-with-a-packet"
    );
    assert_eq!(
        slug("One policy through BPF_PROG_TEST_RUN"),
        "one-policy-through-bpf_prog_test_run"
    );
    assert_eq!(slug("Limits, in a few lines"), "limits-in-a-few-lines");
    let p = parse("# A\n## A\n[x](#a-1)\n`[y](#no)`\n```\n[z](#no)\n```\n");
    assert_eq!(p.anchors, BTreeSet::from(["a".into(), "a-1".into()]));
    assert_eq!(p.links, vec![(3, "#a-1".to_string())]);
}

/// A fenced block in a doc, with the marker line before it, if any.
struct Block {
    /// 0-based line of the opening fence.
    open: usize,
    /// 0-based line of the closing fence.
    close: usize,
    indent: usize,
    /// `Some(exit status)` when marked `<!-- example -->`.
    example: Option<i32>,
}

const MARKER: &str = "<!-- example";

fn marker_exit(line: &str) -> Result<Option<i32>, String> {
    let line = line.trim();
    let Some(rest) = line.strip_prefix(MARKER) else {
        return Ok(None);
    };
    let rest = rest
        .strip_suffix("-->")
        .ok_or_else(|| format!("marker {line:?} does not end with -->"))?
        .trim();
    if rest.is_empty() {
        return Ok(Some(0));
    }
    rest.strip_prefix("exit=")
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            format!("marker {line:?}: expected `<!-- example -->` or `<!-- example exit=N -->`")
        })
}

fn fence_indent(line: &str) -> Option<usize> {
    let trimmed = line.trim_start_matches(' ');
    trimmed
        .starts_with("```")
        .then_some(line.len() - trimmed.len())
}

fn blocks(lines: &[&str]) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(indent) = fence_indent(lines[i]) else {
            if lines[i].trim_start().starts_with(MARKER) {
                let next = lines.get(i + 1).copied().unwrap_or_default();
                if fence_indent(next).is_none() {
                    return Err(format!(
                        "line {}: an example marker must be right before a fenced block",
                        i + 1
                    ));
                }
            }
            i += 1;
            continue;
        };
        let close = (i + 1..lines.len())
            .find(|&j| fence_indent(lines[j]).is_some() && lines[j].trim() == "```")
            .ok_or_else(|| format!("line {}: fenced block never closed", i + 1))?;
        let example = match i.checked_sub(1) {
            Some(m) => marker_exit(lines[m]).map_err(|e| format!("line {}: {e}", m + 1))?,
            None => None,
        };
        out.push(Block {
            open: i,
            close,
            indent,
            example,
        });
        i = close + 1;
    }
    Ok(out)
}

/// One `$ moat ...` line of an example and the output shown after it.
struct Example {
    /// 0-based line of the `$` line.
    line: usize,
    command: String,
    args: Vec<String>,
    /// The output lines as shown (indent removed).
    expected: Vec<String>,
    /// Where the output lines are: `line + 1 .. end`.
    end: usize,
}

fn examples(lines: &[&str], block: &Block) -> Result<Vec<Example>, String> {
    let mut out: Vec<Example> = Vec::new();
    for (j, raw) in lines
        .iter()
        .enumerate()
        .take(block.close)
        .skip(block.open + 1)
    {
        let text = raw.get(block.indent..).unwrap_or(raw.trim_start());
        if let Some(command) = text.strip_prefix("$ ") {
            let args = shlex::split(command).ok_or_else(|| {
                format!("line {}: cannot split {command:?} as a shell would", j + 1)
            })?;
            if args.first().map(String::as_str) != Some("moat") {
                return Err(format!(
                    "line {}: an example runs `moat`, not {command:?}",
                    j + 1
                ));
            }
            let args = args[1..].to_vec();
            let offline = args.first().is_some_and(|a| a == "check")
                || (args.first().is_some_and(|a| a == "trace")
                    && args.iter().any(|a| a == "--offline"))
                || args.iter().any(|a| a == "--help" || a == "-h");
            if !offline {
                return Err(format!(
                    "line {}: {command:?} needs a running agent or the network; only `moat check`, \
                     `moat trace --offline` and `--help` are run (drop the marker to only show it)",
                    j + 1
                ));
            }
            out.push(Example {
                line: j,
                command: command.to_string(),
                args,
                expected: Vec::new(),
                end: j + 1,
            });
        } else if let Some(ex) = out.last_mut() {
            ex.expected.push(text.trim_end().to_string());
            ex.end = j + 1;
        } else {
            return Err(format!(
                "line {}: an example starts with a `$ moat ...` line",
                j + 1
            ));
        }
    }
    if out.is_empty() {
        return Err(format!(
            "line {}: an example with no `$ moat ...` line",
            block.open + 1
        ));
    }
    // Blank lines between one output and the next `$` line separate them.
    for ex in &mut out {
        while ex.expected.last().is_some_and(String::is_empty) {
            ex.expected.pop();
            ex.end -= 1;
        }
    }
    Ok(out)
}

fn normalise(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines
}

/// Runs an example from the repository root with a clean environment
/// (no `NODE_NAME`, no `MOAT_*`): its stdout then its stderr (log lines
/// left out), and its exit status.
fn run(args: &[String]) -> (Vec<String>, i32) {
    let out = Command::new(moat_tests::moat_bin())
        .args(args)
        .current_dir(root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run moat");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if !is_log_line(line) {
            text.push_str(line);
            text.push('\n');
        }
    }
    (normalise(&text), out.status.code().unwrap_or(-1))
}

/// A `tracing` log line (`2026-11-23T17:25:25.000000Z  INFO ...`): the
/// agent's diagnostics, with a time stamp, not the command's output.
fn is_log_line(line: &str) -> bool {
    let Some((stamp, rest)) = line.split_once(' ') else {
        return false;
    };
    let b = stamp.as_bytes();
    b.len() > 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[10] == b'T'
        && stamp.ends_with('Z')
        && ["TRACE ", "DEBUG ", "INFO ", "WARN ", "ERROR "]
            .iter()
            .any(|level| rest.trim_start().starts_with(level))
}

/// An output that differs from the one shown, and what to write instead.
struct Mismatch {
    line: usize,
    end: usize,
    indent: usize,
    actual: Vec<String>,
}

#[test]
fn every_example_prints_what_the_docs_show() {
    let bless = std::env::var_os("MOAT_BLESS_DOCS").is_some_and(|v| v != "0");
    let mut problems = Vec::new();
    let mut ran = 0;
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        let lines: Vec<&str> = text.lines().collect();
        let mut fixes: Vec<Mismatch> = Vec::new();
        let mut markers: Vec<(usize, i32)> = Vec::new();
        let found = blocks(&lines).and_then(|bs| {
            bs.into_iter()
                .map(|b| Ok((examples_or_unmarked(&lines, &b)?, b)))
                .collect::<Result<Vec<_>, String>>()
        });
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("{}: {e}", shown(&file)));
                continue;
            }
        };
        for (exs, block) in found {
            let Some(want_exit) = block.example else {
                continue;
            };
            let mut block_exit = 0;
            for ex in exs {
                ran += 1;
                let (actual, exit) = run(&ex.args);
                // The marker carries one status: the last non-zero one.
                if exit != 0 {
                    block_exit = exit;
                }
                if actual != ex.expected {
                    problems.push(format!(
                        "{}:{}: `{}` printed something else than the docs show\n--- shown\n{}\n--- printed\n{}\n",
                        shown(&file),
                        ex.line + 1,
                        ex.command,
                        ex.expected.join("\n"),
                        actual.join("\n")
                    ));
                    fixes.push(Mismatch {
                        line: ex.line,
                        end: ex.end,
                        indent: block.indent,
                        actual,
                    });
                }
            }
            if block_exit != want_exit {
                problems.push(format!(
                    "{}:{}: the example exits {block_exit}, its marker says {want_exit}",
                    shown(&file),
                    block.open
                ));
                markers.push((block.open - 1, block_exit));
            }
        }
        if bless && (!fixes.is_empty() || !markers.is_empty()) {
            bless_file(&file, &lines, &fixes, &markers);
        }
    }
    assert!(ran >= 5, "only {ran} examples ran: are the markers there?");
    if bless {
        eprintln!(
            "blessed: {} outputs rewritten; review with git diff",
            problems.len()
        );
        return;
    }
    assert!(
        problems.is_empty(),
        "{}\n(if the new outputs are right: MOAT_BLESS_DOCS=1 cargo test -p moat-tests --test docs)",
        problems.join("\n")
    );
}

/// The examples of a marked block; for an unmarked one, an error if it
/// shows a command the test could run (it would never be checked).
fn examples_or_unmarked(lines: &[&str], block: &Block) -> Result<Vec<Example>, String> {
    if block.example.is_some() {
        return examples(lines, block);
    }
    for (j, raw) in lines
        .iter()
        .enumerate()
        .take(block.close)
        .skip(block.open + 1)
    {
        let t = raw.trim_start();
        if t.starts_with("$ moat check ")
            || (t.starts_with("$ moat trace ") && t.contains("--offline"))
        {
            return Err(format!(
                "line {}: `{t}` can be run offline: put `<!-- example -->` before its block",
                j + 1
            ));
        }
    }
    Ok(Vec::new())
}

fn bless_file(file: &Path, lines: &[&str], fixes: &[Mismatch], markers: &[(usize, i32)]) {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(&(_, exit)) = markers.iter().find(|(m, _)| *m == i) {
            let indent = lines[i].len() - lines[i].trim_start().len();
            let marker = if exit == 0 {
                "<!-- example -->".to_string()
            } else {
                format!("<!-- example exit={exit} -->")
            };
            out.push(format!("{}{marker}", " ".repeat(indent)));
            i += 1;
            continue;
        }
        out.push(lines[i].to_string());
        if let Some(fix) = fixes.iter().find(|f| f.line == i) {
            let pad = " ".repeat(fix.indent);
            out.extend(fix.actual.iter().map(|l| {
                if l.is_empty() {
                    String::new()
                } else {
                    format!("{pad}{l}")
                }
            }));
            i = fix.end;
            continue;
        }
        i += 1;
    }
    std::fs::write(file, out.join("\n") + "\n").expect("write blessed doc");
}

#[test]
fn example_blocks_are_split_into_commands_and_outputs() {
    let doc = "text\n<!-- example exit=1 -->\n  ```console\n  $ moat check --policies 'a b'\n  out 1\n\n  $ moat --help\n  help\n  ```\n```\n$ moat tail\n```\n";
    let lines: Vec<&str> = doc.lines().collect();
    let bs = blocks(&lines).expect("blocks");
    assert_eq!(bs.len(), 2);
    assert_eq!(bs[0].example, Some(1));
    assert_eq!(bs[1].example, None);
    let exs = examples(&lines, &bs[0]).expect("examples");
    assert_eq!(exs[0].args, ["check", "--policies", "a b"]);
    assert_eq!(exs[0].expected, ["out 1"]);
    assert_eq!(exs[1].args, ["--help"]);
    assert_eq!(exs[1].expected, ["help"]);
    // A command that needs an agent is refused in a marked block...
    let live = "<!-- example -->\n```\n$ moat tail -n 3\n```\n";
    let lines: Vec<&str> = live.lines().collect();
    let bs = blocks(&lines).expect("blocks");
    assert!(examples(&lines, &bs[0]).is_err());
    // ...and an offline one is refused without the marker.
    let unmarked = "```\n$ moat check --policies x\n```\n";
    let lines: Vec<&str> = unmarked.lines().collect();
    let bs = blocks(&lines).expect("blocks");
    assert!(examples_or_unmarked(&lines, &bs[0]).is_err());
    assert!(marker_exit("<!-- example exit=x -->").is_err());
    assert!(is_log_line(
        "2026-12-04T18:16:45.168662Z  INFO moat::cli::agent: x"
    ));
    assert!(!is_log_line(
        "2026-11-23T13:19:37.860Z eth1   ingress DENY tcp"
    ));
    assert!(!is_log_line(
        "error: p.yaml: GlobalNetworkPolicy/p: spec.Tier"
    ));
}

#[test]
fn the_reference_names_every_config_key_and_metric() {
    let reference =
        std::fs::read_to_string(root().join("docs/reference.md")).expect("docs/reference.md");
    let table_rows: Vec<&str> = reference.lines().filter(|l| l.starts_with('|')).collect();
    let missing_keys: Vec<&str> = moat::cli::config::KEYS
        .iter()
        .copied()
        .filter(|k| !table_rows.iter().any(|r| r.contains(&format!("`{k}`"))))
        .collect();
    assert!(
        missing_keys.is_empty(),
        "configuration keys with no row in docs/reference.md's tables: {missing_keys:?}"
    );
    let metrics_rs =
        std::fs::read_to_string(root().join("agent/src/events/metrics.rs")).expect("metrics.rs");
    let metrics: BTreeSet<&str> = metrics_rs
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("moat_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(metrics.len() >= 10, "found only {metrics:?} in metrics.rs");
    let missing: Vec<&&str> = metrics
        .iter()
        .filter(|m| !table_rows.iter().any(|r| r.contains(**m)))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics registered in agent/src/events/metrics.rs but not in docs/reference.md: {missing:?}"
    );
}

/// docs/examples/config.yaml shows every key at its default: the agent's
/// own schema reads it, it resolves to what no configuration at all
/// resolves to, and every key is in it (set, or commented when it has no
/// default).
#[test]
fn the_example_config_shows_every_key_at_its_default() {
    use moat::cli::config;
    let path = root().join("docs/examples/config.yaml");
    let file = config::from_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
    let node = Some("worker-1".to_string());
    let from_file = config::resolve(file, node.clone()).unwrap_or_else(|e| panic!("{e:#}"));
    let defaults = config::resolve(config::Config::default(), node).expect("the defaults resolve");
    assert_eq!(
        format!("{from_file:?}"),
        format!("{defaults:?}"),
        "docs/examples/config.yaml does not show the defaults"
    );
    let text = std::fs::read_to_string(&path).expect("read");
    let missing: Vec<&str> = config::KEYS
        .iter()
        .copied()
        .filter(|k| {
            !text.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{k}:"))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys not in docs/examples/config.yaml: {missing:?}"
    );
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let deploy = root().join("deploy");
    let text = std::fs::read_to_string(deploy.join("kustomization.yaml"))
        .expect("deploy/kustomization.yaml");
    let k: serde_json::Value = serde_yaml_ng::from_str(&text).expect("kustomization.yaml is YAML");
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<&str> = k["resources"]
        .as_array()
        .expect("resources: a list")
        .iter()
        .map(|r| r.as_str().expect("a resource is a file name"))
        .collect();
    for r in &listed {
        assert!(
            deploy.join(r).is_file(),
            "kustomization.yaml names {r}, which is not in deploy/"
        );
    }
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "a resource is listed twice: {listed:?}"
    );
    let manifests: BTreeSet<String> = std::fs::read_dir(&deploy)
        .expect("deploy/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .collect();
    let listed: BTreeSet<String> = unique.into_iter().map(String::from).collect();
    assert_eq!(
        manifests, listed,
        "deploy/'s manifests and kustomization.yaml's resources differ"
    );
}

#[test]
fn the_readme_is_a_front_door() {
    let size = std::fs::metadata(root().join("README.md"))
        .expect("README.md")
        .len();
    assert!(
        size <= 16 * 1024,
        "README.md is {size} bytes; keep it under 16 KiB and move detail to docs/"
    );
}
