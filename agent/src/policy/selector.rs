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
        let mut p = Parser { text, pos: 0 };
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

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

impl Parser<'_> {
    fn error(&self, message: &str) -> SelectorError {
        SelectorError {
            source_text: self.text.to_string(),
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

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
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

    /// Consumes the keyword `word` when it is next and not the start of a
    /// longer identifier.
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(word) && !rest[word.len()..].starts_with(is_key_char) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Selector::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Selector::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        // `!=` never starts a term, so a leading `!` is always negation.
        if self.eat("!") {
            return Ok(Selector::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            if !self.eat(")") {
                return Err(self.error("expected ')'"));
            }
            return Ok(inner);
        }
        self.term()
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

    fn string_set(&mut self) -> Result<Vec<String>, SelectorError> {
        if !self.eat("{") {
            return Err(self.error("expected '{'"));
        }
        let mut values = Vec::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
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
        for (word, sel) in [("all", Selector::All), ("global", Selector::Global)] {
            let save = self.pos;
            if self.eat_word(word) {
                if self.eat("(") && self.eat(")") {
                    return Ok(sel);
                }
                self.pos = save;
            }
        }
        let save = self.pos;
        if self.eat_word("has") && self.eat("(") {
            let key = self.key()?;
            if !self.eat(")") {
                return Err(self.error("expected ')' after the label key"));
            }
            return Ok(Selector::Has(key));
        }
        self.pos = save;
        let key = self.key()?;
        if self.eat("==") {
            return Ok(Selector::Eq(key, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::NotEq(key, self.string()?));
        }
        if self.eat_word("in") {
            return Ok(Selector::In(key, self.string_set()?));
        }
        let save = self.pos;
        if self.eat_word("not") {
            if self.eat_word("in") {
                return Ok(Selector::NotIn(key, self.string_set()?));
            }
            self.pos = save;
        }
        if self.eat_word("contains") {
            return Ok(Selector::Contains(key, self.string()?));
        }
        if self.eat_word("startswith") {
            return Ok(Selector::StartsWith(key, self.string()?));
        }
        if self.eat_word("endswith") {
            return Ok(Selector::EndsWith(key, self.string()?));
        }
        let save = self.pos;
        if self.eat_word("starts") {
            if self.eat_word("with") {
                return Ok(Selector::StartsWith(key, self.string()?));
            }
            self.pos = save;
        }
        if self.eat_word("ends") {
            if self.eat_word("with") {
                return Ok(Selector::EndsWith(key, self.string()?));
            }
            self.pos = save;
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
}
