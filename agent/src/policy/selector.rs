//! Calico selector expressions: parser and evaluator.
//!
//! Grammar (Calico's, <https://docs.tigera.io/calico/latest/reference/resources/networkpolicy#selectors>):
//! `||` binds loosest, then `&&`, then prefix `!`; `!a == 'x'` is `!(a == 'x')`.
//! Terms: `k == 'v'`, `k != 'v'`, `has(k)`, `k in {'a','b'}`, `k not in {...}`,
//! `k contains 'v'`, `k starts with 'v'` (`startswith`), `k ends with 'v'`
//! (`endswith`), `all()`, `global()`, parentheses. String literals are
//! single- or double-quoted with no escapes. An empty selector is `all()`.
//! `k != 'v'` and `k not in {...}` match a set of labels without `k`.

use std::{collections::BTreeMap, fmt};

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    All,
    Global,
    Has(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// A syntax error, with the 1-based column where it was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("selector {source_text:?}: {message} at column {column}")]
pub struct SelectorError {
    pub source_text: String,
    pub column: usize,
    pub message: String,
}

impl Selector {
    /// Parses `text`; an empty or all-blank selector is `all()`.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_SELECTOR_BYTES {
            return Err(SelectorError {
                source_text: shortened(text),
                column: 1,
                message: format!(
                    "{} bytes, over the limit of {MAX_SELECTOR_BYTES}",
                    text.len()
                ),
            });
        }
        let mut p = Parser {
            text,
            pos: 0,
            depth: 0,
        };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected text after the expression"));
        }
        Ok(sel)
    }

    /// `terms` joined by `&&` as a balanced tree (`all()` when empty):
    /// evaluation depth stays logarithmic in the number of terms.
    pub fn all_of(terms: Vec<Selector>) -> Selector {
        balanced(terms, Selector::And)
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All | Selector::Global => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::NotEq(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::Contains(k, v) => labels.get(k).is_some_and(|l| l.contains(v.as_str())),
            Selector::StartsWith(k, v) => labels.get(k).is_some_and(|l| l.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => labels.get(k).is_some_and(|l| l.ends_with(v.as_str())),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }

    /// Whether `global()` appears anywhere in the expression.
    pub fn uses_global(&self) -> bool {
        match self {
            Selector::Global => true,
            Selector::Not(s) => s.uses_global(),
            Selector::And(a, b) | Selector::Or(a, b) => a.uses_global() || b.uses_global(),
            _ => false,
        }
    }

    /// Every label key the expression reads.
    pub fn label_keys(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_keys(&mut out);
        out
    }

    fn collect_keys<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Selector::All | Selector::Global => {}
            Selector::Has(k)
            | Selector::Eq(k, _)
            | Selector::NotEq(k, _)
            | Selector::In(k, _)
            | Selector::NotIn(k, _)
            | Selector::Contains(k, _)
            | Selector::StartsWith(k, _)
            | Selector::EndsWith(k, _) => out.push(k),
            Selector::Not(s) => s.collect_keys(out),
            Selector::And(a, b) | Selector::Or(a, b) => {
                a.collect_keys(out);
                b.collect_keys(out);
            }
        }
    }
}

fn quote(v: &str) -> String {
    // No escapes exist: pick the quote the value does not contain.
    if v.contains('\'') {
        format!("\"{v}\"")
    } else {
        format!("'{v}'")
    }
}

fn set(vs: &[String]) -> String {
    let items: Vec<String> = vs.iter().map(|v| quote(v)).collect();
    format!("{{{}}}", items.join(", "))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Global => write!(f, "global()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Selector::NotEq(k, v) => write!(f, "{k} != {}", quote(v)),
            Selector::In(k, vs) => write!(f, "{k} in {}", set(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {}", set(vs)),
            Selector::Contains(k, v) => write!(f, "{k} contains {}", quote(v)),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with {}", quote(v)),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with {}", quote(v)),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

/// Longest selector accepted, in bytes: far beyond any written by hand,
/// small enough that parsing and matching stay cheap.
pub const MAX_SELECTOR_BYTES: usize = 64 * 1024;
/// Deepest nesting of parentheses accepted (Calico has no limit; 64 levels
/// is more than any real selector and keeps the parser's stack bounded).
pub const MAX_SELECTOR_DEPTH: usize = 64;
/// Longest label key (Calico's tokenizer limit, `MaxLabelLength`).
pub const MAX_LABEL_KEY_LEN: usize = 512;

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
}

/// The selector as quoted in an error: the first 120 bytes of a long one.
fn shortened(text: &str) -> String {
    if text.len() <= 160 {
        text.to_string()
    } else {
        format!("{}...", &text[..text.floor_char_boundary(120)])
    }
}

/// Calico's identifier characters (`identifierChar` in its tokenizer).
fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

/// Joins `terms` with `join` as a balanced tree: `&&` and `||` are
/// associative, and a balanced tree keeps evaluation depth logarithmic in
/// the number of terms (a left-deep chain of thousands of terms would not).
fn balanced(
    mut terms: Vec<Selector>,
    join: fn(Box<Selector>, Box<Selector>) -> Selector,
) -> Selector {
    while terms.len() > 1 {
        let mut next = Vec::with_capacity(terms.len().div_ceil(2));
        let mut it = terms.into_iter();
        while let Some(a) = it.next() {
            match it.next() {
                Some(b) => next.push(join(Box::new(a), Box::new(b))),
                None => next.push(a),
            }
        }
        terms = next;
    }
    terms.pop().unwrap_or(Selector::All)
}

impl Parser<'_> {
    fn error(&self, message: &str) -> SelectorError {
        SelectorError {
            source_text: shortened(self.text),
            column: self.text[..self.pos].chars().count() + 1,
            message: message.to_string(),
        }
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    /// Calico skips spaces and tabs only: a newline is an error there.
    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start_matches([' ', '\t']);
        self.pos = self.text.len() - trimmed.len();
    }

    /// Consumes `tok` (after blanks) when it is next.
    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    /// Consumes `tok` when it is next, without skipping blanks first.
    fn eat_here(&mut self, tok: &str) -> bool {
        if self.rest().starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    /// Consumes the words `words` (blanks allowed between them, none
    /// needed: Calico reads `notin` as `not in`) when they are next and the
    /// last is not the start of a longer identifier.
    fn eat_words(&mut self, words: &[&str]) -> bool {
        let save = self.pos;
        self.skip_ws();
        for w in words {
            self.skip_ws();
            if !self.eat_here(w) {
                self.pos = save;
                return false;
            }
        }
        if self.rest().starts_with(is_key_char) {
            self.pos = save;
            return false;
        }
        true
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.and()?];
        while self.eat("||") {
            terms.push(self.and()?);
        }
        Ok(balanced(terms, Selector::Or))
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.unary()?];
        while self.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(balanced(terms, Selector::And))
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        // Leading `!`s collapse to one negation or none, as in Calico
        // (read in a loop: 100,000 of them cost no stack).
        let mut negated = false;
        loop {
            self.skip_ws();
            if self.rest().starts_with("!=") || !self.eat_here("!") {
                break;
            }
            negated = !negated;
        }
        let inner = if self.eat("(") {
            if self.depth >= MAX_SELECTOR_DEPTH {
                return Err(self.error(&format!(
                    "parentheses nested deeper than {MAX_SELECTOR_DEPTH} levels"
                )));
            }
            self.depth += 1;
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err(self.error("expected ')'"));
            }
            inner
        } else {
            self.term()?
        };
        Ok(if negated {
            Selector::Not(Box::new(inner))
        } else {
            inner
        })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let len = self
            .rest()
            .find(|c: char| !is_key_char(c))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.error("expected a label key, has(), all() or '('"));
        }
        if len > MAX_LABEL_KEY_LEN {
            return Err(self.error(&format!(
                "label key of {len} characters, over the limit of {MAX_LABEL_KEY_LEN}"
            )));
        }
        let key = self.rest()[..len].to_string();
        self.pos += len;
        Ok(key)
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let Some(q) = self
            .rest()
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
        else {
            return Err(self.error("expected a quoted string"));
        };
        let start = self.pos;
        let body = &self.rest()[1..];
        let Some(end) = body.find(q) else {
            return Err(self.error("unterminated string"));
        };
        let value = body[..end].to_string();
        self.pos = start + 1 + end + 1;
        Ok(value)
    }

    /// `{'a', 'b'}`; a trailing comma is allowed, as in Calico.
    fn string_set(&mut self) -> Result<Vec<String>, SelectorError> {
        if !self.eat("{") {
            return Err(self.error("expected '{'"));
        }
        let mut values = Vec::new();
        loop {
            if self.eat("}") {
                return Ok(values);
            }
            values.push(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            if !self.eat(",") {
                return Err(self.error("expected ',' or '}'"));
            }
        }
    }

    fn term(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        // `all(`, `global(` and `has(` are single tokens in Calico: no
        // blank between the word and the parenthesis.
        for (word, sel) in [("all(", Selector::All), ("global(", Selector::Global)] {
            if self.eat_here(word) {
                if !self.eat(")") {
                    return Err(self.error(&format!("expected ')' after {word}")));
                }
                return Ok(sel);
            }
        }
        if self.eat_here("has(") {
            let key = self.key()?;
            if !self.eat(")") {
                return Err(self.error("expected ')' after the label key"));
            }
            return Ok(Selector::Has(key));
        }
        let key = self.key()?;
        if self.eat("==") {
            return Ok(Selector::Eq(key, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::NotEq(key, self.string()?));
        }
        if self.eat_words(&["contains"]) {
            return Ok(Selector::Contains(key, self.string()?));
        }
        if self.eat_words(&["starts", "with"]) {
            return Ok(Selector::StartsWith(key, self.string()?));
        }
        if self.eat_words(&["ends", "with"]) {
            return Ok(Selector::EndsWith(key, self.string()?));
        }
        if self.eat_words(&["not", "in"]) {
            return Ok(Selector::NotIn(key, self.string_set()?));
        }
        if self.eat_words(&["in"]) {
            return Ok(Selector::In(key, self.string_set()?));
        }
        self.skip_ws();
        Err(self
            .error("expected an operator (==, !=, in, not in, contains, starts with, ends with)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_table() {
        let public = labels(&[("ibm.role", "worker_public"), ("zone", "dal10")]);
        let bare = labels(&[]);
        // (selector, matches `public`, matches `bare`)
        let cases: &[(&str, bool, bool)] = &[
            ("", true, true),
            ("   ", true, true),
            ("all()", true, true),
            ("ibm.role == 'worker_public'", true, false),
            ("ibm.role=='worker_public'", true, false),
            ("ibm.role == \"worker_public\"", true, false),
            ("ibm.role == 'worker_private'", false, false),
            ("ibm.role != 'worker_private'", true, true),
            ("ibm.role != 'worker_public'", false, true),
            ("has(ibm.role)", true, false),
            ("!has(ibm.role)", false, true),
            ("! has( ibm.role )", false, true),
            ("zone in {'dal10', 'dal12'}", true, false),
            ("zone in {}", false, false),
            ("zone not in {'dal12'}", true, true),
            ("zone not in {'dal10'}", false, true),
            ("zone contains 'al1'", true, false),
            ("zone starts with 'dal'", true, false),
            ("zone startswith 'dal'", true, false),
            ("zone ends with '10'", true, false),
            ("zone endswith '12'", false, false),
            ("!zone == 'dal10'", false, true),
            ("!(zone == 'dal10')", false, true),
            ("has(zone) && zone == 'dal10'", true, false),
            ("has(x) || zone == 'dal10'", true, false),
            ("has(x) || has(y) && has(zone)", false, false),
            (
                "(has(x) || has(zone)) && ibm.role == 'worker_public'",
                true,
                false,
            ),
            ("zone == \"it's\"", false, false),
            ("global()", true, true),
        ];
        for (text, on_public, on_bare) in cases {
            let sel =
                Selector::parse(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"));
            assert_eq!(sel.matches(&public), *on_public, "{text:?} on public");
            assert_eq!(sel.matches(&bare), *on_bare, "{text:?} on no labels");
            // Printing and re-parsing gives the same expression.
            let again = Selector::parse(&sel.to_string())
                .unwrap_or_else(|e| panic!("{sel} (from {text:?}) should re-parse: {e}"));
            assert_eq!(again, sel, "{text:?} round trip");
        }
    }

    #[test]
    fn operators_as_key_prefixes_are_keys() {
        let sel = Selector::parse("index == 'a' && notes in {'b'} && hasher == 'c'").unwrap();
        assert_eq!(sel.label_keys(), vec!["index", "notes", "hasher"]);
    }

    #[test]
    fn parse_errors_name_the_column() {
        let cases: &[(&str, usize)] = &[
            ("ibm.role ==", 12),
            ("ibm.role == worker", 13),
            ("ibm.role = 'x'", 10),
            ("== 'x'", 1),
            ("a == 'x' &&", 12),
            ("(a == 'x'", 10),
            ("a == 'x')", 9),
            ("a in {'x'", 10),
            ("a in 'x'", 6),
            ("has(a", 6),
            ("a == 'x", 6),
            ("a == 'x' b == 'y'", 10),
            ("a starts 'x'", 3),
        ];
        for (text, column) in cases {
            let err = Selector::parse(text).expect_err(text);
            assert_eq!(err.column, *column, "{text:?}: {err}");
        }
    }

    #[test]
    fn hostile_selectors_are_refused_without_exhausting_the_stack() {
        // 10,000 nested parentheses: refused at the depth limit.
        let deep = format!("{}has(a){}", "(".repeat(10_000), ")".repeat(10_000));
        let err = Selector::parse(&deep).expect_err("too deep");
        assert!(err.message.contains("nested deeper than 64"), "{err}");
        assert!(
            err.to_string().len() < 400,
            "the error quotes a prefix: {err}"
        );
        // Exactly at the limit is fine.
        let ok = format!("{}has(a){}", "(".repeat(64), ")".repeat(64));
        assert_eq!(Selector::parse(&ok).unwrap(), Selector::Has("a".into()));
        // 100,000 `!`: over the size limit; 60,000 collapse, as in Calico.
        let nots = format!("{}has(a)", "!".repeat(100_000));
        assert!(Selector::parse(&nots).is_err());
        let nots = format!("{}has(a)", "!".repeat(60_000));
        assert_eq!(Selector::parse(&nots).unwrap(), Selector::Has("a".into()));
        let odd = format!("{}has(a)", "! ".repeat(10_001));
        assert_eq!(
            Selector::parse(&odd).unwrap(),
            Selector::Not(Box::new(Selector::Has("a".into())))
        );
        // Thousands of terms: a balanced tree, matched and dropped cheaply.
        let wide = vec!["has(a)"; 4000].join(" && ");
        let sel = Selector::parse(&wide).unwrap();
        assert!(sel.matches(&labels(&[("a", "1")])));
        assert!(!sel.matches(&labels(&[("b", "1")])));
        assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        // Over the size limit.
        let huge = vec!["has(a)"; 10_000].join(" || ");
        let err = Selector::parse(&huge).expect_err("too long");
        assert!(err.message.contains("over the limit of 65536"), "{err}");
    }

    #[test]
    fn calico_tokenizer_rules() {
        // Label keys: at most 512 characters (Calico's MaxLabelLength).
        let key = "k".repeat(512);
        assert!(Selector::parse(&format!("has({key})")).is_ok());
        let err = Selector::parse(&format!("has({key}k)")).expect_err("513");
        assert!(err.message.contains("513 characters"), "{err}");
        assert!(Selector::parse(&format!("{key}k == 'x'")).is_err());
        // `notin` is `not in`; `startswith` is `starts with`.
        let l = labels(&[("a", "y")]);
        for text in ["a notin {\"x\"}", "a not  in {'x'}", "a not\tin {'x'}"] {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(sel.matches(&l), "{text:?}");
        }
        // Only spaces and tabs are blanks.
        for text in [
            "has(a)\n",
            "\nhas(a)",
            "has(a)\r",
            "a ==\n'x'",
            "has(a)\u{a0}",
        ] {
            assert!(Selector::parse(text).is_err(), "{text:?} must be refused");
        }
        assert!(Selector::parse("\thas(a)\t&&\thas(b)\t").is_ok());
        // `has(`, `all(` and `global(` are single tokens.
        assert!(Selector::parse("has (a)").is_err());
        assert!(Selector::parse("all ()").is_err());
        assert!(Selector::parse("all( )").is_ok());
        // A trailing comma in a set is allowed.
        let sel = Selector::parse("a in {'x', 'y',}").unwrap();
        assert_eq!(sel, Selector::In("a".into(), vec!["x".into(), "y".into()]));
        assert!(Selector::parse("a in {,}").is_err());
    }
}
