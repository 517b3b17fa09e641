//! Bounds on policy input, checked before anything is parsed, so that no
//! file, however hostile, can exhaust the agent's stack, memory or time.
//!
//! Each limit is far above what a hand-written policy needs (Kubernetes and
//! etcd refuse objects over about 1.5 MiB); the file and document limits
//! are sized for blocklists: a GlobalNetworkSet of 1,000,000 prefixes is
//! about 22 MB. Each refusal names the file, the document and the limit.

/// Largest policy file read, in bytes (a file over it is refused without
/// being read whole; the agent's peak memory stays about 12 times the
/// size of what it reads).
pub const MAX_FILE_BYTES: usize = 32 * 1024 * 1024;
/// Largest YAML or JSON document (one resource, or one `List`) in a file:
/// as large as a file, so one network set may fill it.
pub const MAX_DOCUMENT_BYTES: usize = MAX_FILE_BYTES;
/// Deepest nesting of flow collections (`[...]`, `{...}`, JSON) accepted.
/// The YAML scanner's cost grows with the product of tokens and this
/// depth, so it is checked before parsing.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Byte ranges of the YAML documents in `text`: split at `---` and `...`
/// marker lines (YAML forbids them inside any scalar, so this agrees with
/// the parser).
pub fn documents(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let marker = ["---", "..."].iter().any(|m| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
        });
        if marker {
            if pos > start {
                out.push((start, pos));
            }
            start = pos;
        }
        pos += line.len();
    }
    if pos > start {
        out.push((start, pos));
    }
    out
}

/// The first line (1-based) where flow collections nest deeper than
/// `limit`, if any. A conservative scan: it skips comments, quoted
/// scalars and block scalars as YAML does, and may count a bracket inside
/// an unusual plain scalar as nesting (over-counting, never under).
pub fn flow_depth_exceeded(text: &str, limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut line_no = 1;
    let mut quote: Option<(u8, usize)> = None; // (quote char, indent of its line)
    let mut block_scalar: Option<usize> = None; // indent of the indicator's line
    for line in text.split_inclusive('\n') {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let blank = line.trim().is_empty();
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                line_no += 1;
                continue;
            }
            block_scalar = None;
        }
        // A quoted scalar in block context ends where the indentation does.
        if let Some((_, qi)) = quote {
            if depth == 0 && !blank && indent <= qi && line_no > 1 {
                quote = None;
            }
        }
        let mut prev: u8 = b'\n';
        let mut prev_nonblank: u8 = b'\n';
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if let Some((q, _)) = quote {
                if q == b'"' && c == b'\\' {
                    i += 2;
                    continue;
                }
                if c == q {
                    if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    quote = None;
                }
                prev = c;
                prev_nonblank = c;
                i += 1;
                continue;
            }
            let at_token_start = matches!(prev, b'\n' | b' ' | b'\t' | b'[' | b'{' | b',')
                || (depth > 0 && prev == b':');
            let after_indicator = matches!(prev_nonblank, b'[' | b'{' | b',' | b':' | b'?')
                || (depth == 0 && matches!(prev_nonblank, b'\n' | b'-'));
            match c {
                b'#' if matches!(prev, b'\n' | b' ' | b'\t') => break,
                b'"' | b'\'' if at_token_start && after_indicator => {
                    quote = Some((c, indent));
                }
                b'|' | b'>'
                    if depth == 0
                        && matches!(prev, b' ' | b'\t' | b'\n')
                        && matches!(prev_nonblank, b':' | b'-' | b'\n' | b'?') =>
                {
                    block_scalar = Some(indent);
                }
                b'[' | b'{' if depth > 0 || at_token_start => {
                    depth += 1;
                    if depth > limit {
                        return Some(line_no);
                    }
                }
                b']' | b'}' if depth > 0 => depth -= 1,
                _ => {}
            }
            if !matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
                prev_nonblank = c;
            }
            prev = c;
            i += 1;
        }
        line_no += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_depth_is_measured_as_yaml_nests() {
        let cases: &[(&str, usize)] = &[
            ("a: [1, [2, [3]]]\n", 3),
            ("{\"a\": {\"b\": [{\"c\": 1}]}}", 4),
            ("a: \"[[[[\"\nb: '{{{{'\n", 0),
            ("a: x # [[[[\n", 0),
            ("a: |\n  [[[[\n  '\nb: [1]\n", 1),
            ("a: [\"]]]\", [\"}\", [x]]]\n", 3),
            ("a: it's [1]\n", 1),
            ("a: 'it''s [not'\nb: [[1]]\n", 2),
        ];
        for (text, depth) in cases {
            let measured = (0..=8)
                .find(|d| flow_depth_exceeded(text, *d).is_none())
                .unwrap();
            assert_eq!(measured, *depth, "{text:?}");
        }
    }

    #[test]
    fn quotes_cannot_hide_nesting() {
        // A quote inside a plain scalar is not a quoted scalar.
        let deep = "[".repeat(100);
        for text in [
            format!("a: x 'y\nb: {deep}\nc: z'\n"),
            format!("a: x\n  'y\nb: {deep}\n"),
            format!("a: [x\n'y, {deep}]\n"),
            format!("a: |\n  'y\nb: {deep}\n"),
        ] {
            assert!(flow_depth_exceeded(&text, 64).is_some(), "{text:?}");
        }
    }

    #[test]
    fn documents_split_at_markers() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n...\n";
        let docs: Vec<&str> = documents(text).iter().map(|(s, e)| &text[*s..*e]).collect();
        assert_eq!(docs, ["a: 1\n", "---\nb: 2\n", "--- # c\nc: 3\n", "...\n"]);
        assert_eq!(documents("a: '---'\n---x: 1\n").len(), 1);
    }
}
