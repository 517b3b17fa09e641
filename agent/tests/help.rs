//! The command line as users meet it: help text for every option, defaults
//! shown one way, `moat agent --help` grouped, errors naming the flag
//! typed, and the exit-code table kept.

use std::process::{Command, Output};

fn moat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .output()
        .expect("moat runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The subcommands `moat --help` lists.
fn subcommands() -> Vec<String> {
    let help = text(&moat(&["--help"]));
    let commands = help
        .split("Commands:")
        .nth(1)
        .expect("moat --help lists its commands")
        .split("\n\n")
        .next()
        .expect("a block of commands");
    commands
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// `(option line, its help)` for every option of `moat <sub> --help`.
fn options(sub: &str) -> Vec<(String, String)> {
    let out = moat(&[sub, "--help"]);
    assert!(out.status.success(), "moat {sub} --help: {}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = help.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if (2..=6).contains(&indent) && (t.starts_with("--") || t.starts_with('-')) {
            // Short help puts the text on the option's line.
            if let Some((flag, doc)) = t.split_once("  ") {
                found.push((flag.to_string(), doc.trim().to_string()));
                continue;
            }
            let mut doc = String::new();
            for next in &lines[i + 1..] {
                if next.trim().is_empty() {
                    break;
                }
                doc.push_str(next.trim());
                doc.push(' ');
            }
            found.push((t.to_string(), doc));
        }
    }
    assert!(!found.is_empty(), "no option found in moat {sub} --help");
    found
}

#[test]
fn every_option_has_help_and_defaults_are_shown_one_way() {
    let subs = subcommands();
    for sub in ["agent", "check", "trace", "tail", "status", "bench"] {
        assert!(subs.iter().any(|s| s == sub), "{sub} missing from {subs:?}");
    }
    for sub in &subs {
        for (option, doc) in options(sub) {
            assert!(
                !doc.trim().is_empty(),
                "moat {sub}: {option} has no help text"
            );
            let lower = doc.to_lowercase();
            for other in ["(default", "; default", "default:"] {
                let stray = lower.replace("[default: ", "");
                assert!(
                    !stray.contains(other),
                    "moat {sub} {option}: a default not shown as [default: X]: {doc}"
                );
            }
        }
    }
}

#[test]
fn agent_help_is_grouped_by_heading() {
    let help = text(&moat(&["agent", "--help"]));
    let headings = [
        "Policy source:",
        "Interfaces:",
        "Dataplane:",
        "Events:",
        "Outputs:",
        "State:",
    ];
    let mut at = 0;
    for h in headings {
        let pos = help[at..]
            .find(&format!("\n{h}\n"))
            .unwrap_or_else(|| panic!("no heading {h} (in order) in moat agent --help:\n{help}"));
        at += pos + 1;
    }
    // Each flag sits under its heading.
    for (flag, heading) in [
        ("--kubeconfig", "Policy source:"),
        ("--audit-iface", "Interfaces:"),
        ("--xdp-mode", "Dataplane:"),
        ("--event-rate", "Events:"),
        ("--metrics-addr", "Outputs:"),
        ("--pin-dir", "State:"),
    ] {
        let flag_at = help.find(&format!("  {flag} ")).expect(flag);
        let before = &help[..flag_at];
        let last = headings
            .iter()
            .filter_map(|h| before.rfind(&format!("\n{h}\n")).map(|p| (p, *h)))
            .max()
            .map(|(_, h)| h);
        assert_eq!(last, Some(heading), "{flag}");
    }
}

#[test]
fn a_bad_value_names_the_flag_typed_and_exits_2() {
    for (args, flag) in [
        (&["agent", "--xdp-mode", "turbo"][..], "--xdp-mode"),
        (&["agent", "--output", "yaml"][..], "--output"),
        (&["agent", "--socket-mode", "999"][..], "--socket-mode"),
        (
            &["agent", "--max-connections", "3"][..],
            "--max-connections",
        ),
        (
            &["agent", "--events-file-max-bytes", "3X"][..],
            "--events-file-max-bytes",
        ),
        (
            &["agent", "--metrics-addr", "nowhere"][..],
            "--metrics-addr",
        ),
        (&["agent", "--profile", "iks-1999"][..], "--profile"),
        (&["tail", "--direction", "sideways"][..], "--direction"),
    ] {
        let out = moat(args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {t}");
        assert!(t.contains(flag), "{args:?} does not name {flag}: {t}");
        for key in ["xdpMode", "maxConnections", "socketMode", "metricsAddr"] {
            assert!(!t.contains(key), "{args:?} names the config key {key}: {t}");
        }
    }
}

#[test]
fn usage_errors_exit_2_everywhere() {
    for args in [
        &["check", "--policies", ".", "--pod", "a/b"][..],
        &[
            "check",
            "--policies",
            ".",
            "--ingress",
            "tcp 1.2.3.4:1 -> 5.6.7.8:2",
        ][..],
        &["trace", "--iface", "lo"][..],
        &["tail", "--verdict", "maybe"][..],
        &["no-such-command"][..],
    ] {
        let out = moat(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
}

#[test]
fn verdicts_are_case_insensitive() {
    // As the text output prints it. No agent listens here: the request is
    // parsed, then the socket is missing.
    let sock = std::env::temp_dir().join(format!("moat-no-agent-{}.sock", std::process::id()));
    let out = moat(&[
        "tail",
        "--verdict",
        "DENY",
        "--direction",
        "Ingress",
        "--no-follow",
        "--socket",
        sock.to_str().expect("utf-8"),
    ]);
    let t = text(&out);
    assert!(!t.contains("invalid value"), "{t}");
    assert!(t.contains("no event socket"), "{t}");
}

#[test]
fn the_exit_codes_are_one_table() {
    let help = text(&moat(&["--help"]));
    let table = help
        .split("Exit status:")
        .nth(1)
        .unwrap_or_else(|| panic!("no exit-code table in moat --help:\n{help}"));
    for code in 0..=8 {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "exit {code} not in the table:\n{table}"
        );
    }
}

/// Every subcommand's name, `help` left out.
fn every_subcommand() -> Vec<String> {
    let subs = subcommands();
    for sub in [
        "agent",
        "check",
        "trace",
        "tail",
        "status",
        "bench",
        "uninstall",
        "completions",
        "man",
    ] {
        assert!(subs.iter().any(|s| s == sub), "{sub} missing from {subs:?}");
    }
    subs
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_subcommand() {
    let subs = every_subcommand();
    for shell in ["bash", "zsh", "fish"] {
        let out = moat(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in &subs {
            assert!(script.contains(sub.as_str()), "{shell} script lacks {sub}");
        }
        // Flags of a subcommand complete too.
        assert!(
            script.contains("xdp-mode"),
            "{shell} script lacks --xdp-mode"
        );
    }
    // The scripts are valid for their shell where the shell is here.
    let out = moat(&["completions", "bash"]);
    if let Ok(check) = Command::new("bash")
        .args(["-n", "-c", &String::from_utf8_lossy(&out.stdout)])
        .output()
    {
        assert!(check.status.success(), "bash -n: {}", text(&check));
    }
    assert_eq!(
        moat(&["completions", "powershell-7"]).status.code(),
        Some(2)
    );
}

#[test]
fn man_pages_are_generated_for_every_subcommand() {
    let subs = every_subcommand();
    let out = moat(&["man"]);
    assert!(out.status.success(), "{}", text(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH moat 1"), "{page}");
    for sub in &subs {
        assert!(page.contains(sub.as_str()), "moat(1) lacks {sub}");
    }
    let dir = std::env::temp_dir().join(format!("moat-man-{}", std::process::id()));
    let out = moat(&["man", "--out", dir.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    for sub in &subs {
        let path = dir.join(format!("moat-{sub}.1"));
        let page =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(page.contains(&format!(".TH moat-{sub} 1")), "{page}");
        // Each page documents its subcommand's options.
        for (option, _) in options(sub) {
            let long = option
                .split([',', ' ', '='])
                .find(|w| w.starts_with("--"))
                .expect("a long option");
            let roff = long.replace('-', "\\-");
            assert!(
                page.contains(&roff) || page.contains(long),
                "moat-{sub}.1 lacks {long}"
            );
        }
    }
    assert!(dir.join("moat.1").exists());
    std::fs::remove_dir_all(&dir).expect("remove the pages");
}
