//! Turns the YAML node tree into [`Rules`], collecting every error with
//! its position and a hint instead of stopping at the first.

use crate::{
    action::{Action, RateLimit, Sample, Throughput},
    condition::{CmpOp, Condition, Literal, Op, Test},
    decision::RuleName,
    field::{Field, FieldType, SpanField},
    journey::{Journey, MAX_CAPTURE},
    node::{Node, Pos, Value},
    redact::{Mask, Redaction, ValueRule},
    rules::{Rule, Rules},
    threshold::{Probability, Threshold},
};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use regex::Regex;
use std::{collections::HashSet, fmt, time::Duration};

/// One problem in a rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem in a rules file, each printed as `file:line:column: message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RulesError {
    pub file: String,
    pub errors: Vec<RuleError>,
}

impl RulesError {
    /// A file that could not be read, or is not UTF-8: one error, at no position.
    pub fn unreadable(file: String, cause: &dyn fmt::Display) -> Self {
        RulesError {
            file,
            errors: vec![RuleError {
                pos: Pos { line: 0, column: 0 },
                message: format!("cannot read the file: {cause}"),
                hint: None,
            }],
        }
    }
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{e}", self.file)?;
        }
        Ok(())
    }
}

const TOP_KEYS: &[&str] = &["rules", "sets", "select_set_by", "redact", "journeys"];
const JOURNEY_KEYS: &[&str] = &[
    "name",
    "key",
    "status",
    "max_time_in_status",
    "default_max_time",
    "terminal",
    "capture",
];
const RULE_KEYS: &[&str] = &["name", "description", "when", "action"];
const COMBINATORS: &str = "all, any, not, any_span, every_span";
const OPERATORS: &[&str] = &[
    "=",
    "!=",
    ">",
    "<",
    ">=",
    "<=",
    "in",
    "not-in",
    "exists",
    "not-exists",
    "starts-with",
    "contains",
    "does-not-contain",
    "matches",
];
const ACTIONS: &str = "keep, drop, {sample: {rate: N, by: field}}, {rate_limit: {traces_per_sec: X, key: [fields]}}, {throughput: {target_per_sec: X, key: [fields]}}";
/// Default cap on distinct keys of a per-key sampler.
const DEFAULT_MAX_KEYS: usize = 1000;

/// Parses a duration such as `1500ms`, `2s`, `1.5s`, `1m`, `250us`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// A secret the rules file refers to rather than holds: the redaction salt
/// named by `salt_env` (an environment variable) or `salt_file` (a file,
/// as a mounted Kubernetes Secret gives it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretRef<'a> {
    Env(&'a str),
    File(&'a str),
}

/// How a compile reads the secrets the file refers to: the value, or why
/// not, naming the variable or file and never a value.
pub type Secrets<'e> = &'e dyn Fn(SecretRef<'_>) -> Result<String, String>;

impl SecretRef<'_> {
    /// Reads it from this process's environment or file system. An empty
    /// value is no value; a file's trailing line break is not part of it.
    pub fn read(self) -> Result<String, String> {
        let value = match self {
            Self::Env(var) => std::env::var(var).unwrap_or_default(),
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {path}: {e}"))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        };
        if value.is_empty() {
            return Err(match self {
                Self::Env(var) => format!("environment variable {var} is not set"),
                Self::File(path) => format!("{path} is empty"),
            });
        }
        Ok(value)
    }
}

struct Compiler<'e> {
    errors: Vec<RuleError>,
    /// Reads the secrets the file refers to (`salt_env`, `salt_file`).
    secrets: Secrets<'e>,
}

impl Compiler<'_> {
    fn err(&mut self, pos: Pos, message: impl Into<String>, hint: impl Into<Option<String>>) {
        self.errors.push(RuleError {
            pos,
            message: message.into(),
            hint: hint.into(),
        });
    }

    fn map<'a>(&mut self, node: &'a Node, what: &str) -> Option<&'a [(Node, Node)]> {
        match &node.value {
            Value::Map(m) => Some(m),
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be a mapping, found {}", node.kind()),
                    None,
                );
                None
            }
        }
    }

    fn seq<'a>(&mut self, node: &'a Node, what: &str) -> Option<&'a [Node]> {
        match &node.value {
            Value::Seq(s) => Some(s),
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be a list, found {}", node.kind()),
                    None,
                );
                None
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) if !s.is_empty() => Some(s.clone()),
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be a non-empty string, found {}", node.kind()),
                    None,
                );
                None
            }
        }
    }

    fn positive(&mut self, node: &Node, what: &str) -> Option<f64> {
        match node.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Some(x),
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be a number greater than 0"),
                    None,
                );
                None
            }
        }
    }

    /// Reports keys not in `allowed`; returns the entries that are.
    fn known<'a>(
        &mut self,
        map: &'a [(Node, Node)],
        allowed: &[&str],
        what: &str,
    ) -> Vec<(&'a str, &'a Node, Pos)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (k, v) in map {
            let key = k.as_str().unwrap_or("");
            if !allowed.contains(&key) {
                self.err(
                    k.pos,
                    format!(
                        "unknown key `{}` in {what}",
                        k.scalar_text().unwrap_or_default()
                    ),
                    Some(format!("expected one of: {}", allowed.join(", "))),
                );
            } else if !seen.insert(key) {
                self.err(k.pos, format!("`{key}` is given twice in {what}"), None);
            } else {
                out.push((key, v, k.pos));
            }
        }
        out
    }

    fn file(&mut self, root: &Node, text: &str) -> Option<Rules> {
        let root_pos = root.pos;
        let top = match &root.value {
            Value::Map(m) => m.as_slice(),
            Value::Null => {
                self.err(
                    root_pos,
                    "the rules file is empty",
                    Some("start with `rules:`, a list of rules".into()),
                );
                return None;
            }
            _ => {
                self.err(
                    root_pos,
                    format!("the rules file must be a mapping, found {}", root.kind()),
                    Some("start with `rules:`, a list of rules".into()),
                );
                return None;
            }
        };
        let entries = self.known(top, TOP_KEYS, "the rules file");
        let get = |name: &str| {
            entries
                .iter()
                .find(|(k, _, _)| *k == name)
                .map(|(_, v, p)| (*v, *p))
        };
        let mut default = None;
        let mut sets = Vec::new();
        match (get("rules"), get("sets")) {
            (Some(_), Some((_, pos))) => self.err(
                pos,
                "`rules` and `sets` cannot both be given",
                Some("use `rules:` for one list, or `sets:` with a `default:` list and one list per environment".into()),
            ),
            (Some((list, _)), None) => default = Some(self.rule_list(list)),
            (None, Some((node, pos))) => {
                if let Some(map) = self.map(node, "`sets`") {
                    for (name, list) in map {
                        let Some(name) = self.string(name, "a rule set name") else { continue };
                        let rules = self.rule_list(list);
                        if name == "default" {
                            default = Some(rules);
                        } else {
                            sets.push((name, rules));
                        }
                    }
                }
                if default.is_none() {
                    self.err(pos, "`sets` has no `default` set", Some("add `default:` with the rules for traces no other set is chosen for".into()));
                }
            }
            (None, None) => self.err(root_pos, "no rules: the file needs `rules:` or `sets:`", None),
        }
        let select_by = match get("select_set_by") {
            Some((node, _)) => self.string(node, "`select_set_by`"),
            None => None,
        };
        if select_by.is_none()
            && !sets.is_empty()
            && let Some((_, pos)) = get("sets")
        {
            self.err(
                pos,
                "several rule sets but no `select_set_by`",
                Some("name the resource attribute that picks a set, e.g. `select_set_by: deployment.environment`".into()),
            );
        }
        let redaction = match get("redact") {
            Some((node, _)) => self.redact(node),
            None => Redaction::default(),
        };
        let journeys = match get("journeys") {
            Some((node, _)) => self.journeys(node),
            None => Vec::new(),
        };
        let default = default?;
        self.errors
            .is_empty()
            .then(|| Rules::new(select_by, sets, default, redaction, journeys, text))
    }

    fn rule_list(&mut self, node: &Node) -> Vec<Rule> {
        let Some(items) = self.seq(node, "a rule list") else {
            return Vec::new();
        };
        let mut rules: Vec<Rule> = Vec::new();
        let mut names = HashSet::new();
        let mut catch_all: Option<(String, Pos)> = None;
        for item in items {
            let Some(rule) = self.rule(item) else {
                continue;
            };
            if !names.insert(rule.name.as_str().to_owned()) {
                self.err(
                    rule.pos,
                    format!("rule name `{}` is used twice in this list", rule.name),
                    Some(
                        "names become `sampling.rule` on kept spans and must tell rules apart"
                            .into(),
                    ),
                );
            }
            if let Some((other, pos)) = &catch_all {
                self.err(
                    rule.pos,
                    format!(
                        "rule `{}` can never match: rule `{other}` at line {} matches every trace",
                        rule.name, pos.line
                    ),
                    Some(format!(
                        "move it above `{other}`, or give `{other}` a `when`"
                    )),
                );
            } else if rule.when.is_none() {
                catch_all = Some((rule.name.as_str().to_owned(), rule.pos));
            }
            rules.push(rule);
        }
        rules
    }

    fn rule(&mut self, node: &Node) -> Option<Rule> {
        let map = self.map(node, "a rule")?;
        let entries = self.known(map, RULE_KEYS, "a rule");
        let get = |name: &str| entry(&entries, name);
        let name = match get("name") {
            Some(n) => self.string(n, "`name`"),
            None => {
                self.err(
                    node.pos,
                    "a rule needs a `name`",
                    Some("it is recorded as `sampling.rule` on the spans it keeps".into()),
                );
                None
            }
        };
        let pos = get("name").map_or(node.pos, |n| n.pos);
        let when = match get("when") {
            Some(w) => match &w.value {
                // `when:` with nothing under it matches every trace.
                Value::Null => None,
                _ => Some(self.condition(w)?),
            },
            None => None,
        };
        let action = match get("action") {
            Some(a) => self.action(a),
            None => {
                self.err(
                    node.pos,
                    "a rule needs an `action`",
                    Some(format!("one of {ACTIONS}")),
                );
                None
            }
        };
        Some(Rule {
            name: RuleName::new(&name?),
            when,
            action: action?,
            pos,
        })
    }

    /// A mapping of conditions, all of which must hold.
    fn condition(&mut self, node: &Node) -> Option<Condition> {
        let map = self.map(node, "a condition")?;
        if map.is_empty() {
            self.err(
                node.pos,
                "an empty condition",
                Some("leave `when` out to match every trace".into()),
            );
            return None;
        }
        let mut all = Vec::new();
        let mut ok = true;
        for (k, v) in map {
            match self.condition_entry(k, v) {
                Some(c) => all.push(c),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        Some(if all.len() == 1 {
            all.remove(0)
        } else {
            Condition::All(all)
        })
    }

    fn condition_list(&mut self, node: &Node, what: &str) -> Option<Vec<Condition>> {
        let items = self.seq(node, what)?;
        if items.is_empty() {
            self.err(node.pos, format!("{what} is empty"), None);
            return None;
        }
        let conds: Vec<Option<Condition>> = items.iter().map(|i| self.condition(i)).collect();
        conds.into_iter().collect()
    }

    fn condition_entry(&mut self, key: &Node, value: &Node) -> Option<Condition> {
        let Some(name) = key.as_str() else {
            self.err(
                key.pos,
                format!("a condition key must be a field or one of {COMBINATORS}"),
                None,
            );
            return None;
        };
        match name {
            "all" => Some(Condition::All(self.condition_list(value, "`all`")?)),
            "any" => Some(Condition::Any(self.condition_list(value, "`any`")?)),
            "not" => Some(Condition::Not(Box::new(self.condition(value)?))),
            "any_span" | "every_span" => {
                let map = self.map(value, &format!("`{name}`"))?;
                let mut tests = Vec::new();
                for (k, v) in map {
                    let field = k.as_str().and_then(SpanField::parse);
                    match field {
                        Some(f) => {
                            let ty = f.field_type();
                            for t in self.tests(ty, v)? {
                                tests.push((f.clone(), t));
                            }
                        }
                        None => self.err(
                            k.pos,
                            format!(
                                "`{}` is not a span field",
                                k.scalar_text().unwrap_or_default()
                            ),
                            Some(format!(
                                "inside `{name}` every key is a span field: {}",
                                crate::field::SPAN_FIELDS
                            )),
                        ),
                    }
                }
                Some(if name == "any_span" {
                    Condition::AnySpan(tests)
                } else {
                    Condition::EverySpan(tests)
                })
            }
            _ => {
                let field = match Field::parse(name) {
                    Ok(f) => f,
                    Err(hint) => {
                        self.err(key.pos, format!("unknown field `{name}`"), Some(hint));
                        return None;
                    }
                };
                let tests = self.tests(field.field_type(), value)?;
                Some(match field {
                    Field::Trace(f) => {
                        let mut all: Vec<Condition> =
                            tests.into_iter().map(|t| Condition::Trace(f, t)).collect();
                        if all.len() == 1 {
                            all.remove(0)
                        } else {
                            Condition::All(all)
                        }
                    }
                    Field::Root(f) => {
                        let mut all: Vec<Condition> = tests
                            .into_iter()
                            .map(|t| Condition::Root(f.clone(), t))
                            .collect();
                        if all.len() == 1 {
                            all.remove(0)
                        } else {
                            Condition::All(all)
                        }
                    }
                    // Several operators on one span field hold for the same span.
                    Field::Span(f) => {
                        Condition::AnySpan(tests.into_iter().map(|t| (f.clone(), t)).collect())
                    }
                })
            }
        }
    }

    /// The tests written for one field: `value` (equality), `exists`,
    /// `not-exists`, or a mapping of operators to values.
    fn tests(&mut self, ty: FieldType, node: &Node) -> Option<Vec<Test>> {
        match &node.value {
            Value::Str(s) if s == "exists" => Some(vec![Test::is(Op::Exists)]),
            Value::Str(s) if s == "not-exists" => Some(vec![Test::not(Op::Exists)]),
            Value::Map(ops) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (op, v) in ops {
                    match self.test(ty, op, v) {
                        Some(t) => out.push(t),
                        None => ok = false,
                    }
                }
                if out.is_empty() && ok {
                    self.err(
                        node.pos,
                        "no operator given",
                        Some(format!("operators: {}", OPERATORS.join(", "))),
                    );
                    return None;
                }
                ok.then_some(out)
            }
            Value::Seq(_) => {
                self.err(
                    node.pos,
                    "a list is not a value to compare with",
                    Some("to match one of several values write `{in: [a, b]}`".into()),
                );
                None
            }
            _ => Some(vec![Test::is(Op::Cmp(CmpOp::Eq, self.literal(ty, node)?))]),
        }
    }

    fn test(&mut self, ty: FieldType, op: &Node, value: &Node) -> Option<Test> {
        let Some(name) = op.as_str() else {
            self.err(
                op.pos,
                "an operator must be a string",
                Some(format!("operators: {}", OPERATORS.join(", "))),
            );
            return None;
        };
        let cmp_op = match name {
            "=" | "!=" => Some(CmpOp::Eq),
            ">" => Some(CmpOp::Gt),
            "<" => Some(CmpOp::Lt),
            ">=" => Some(CmpOp::Ge),
            "<=" => Some(CmpOp::Le),
            _ => None,
        };
        if let Some(c) = cmp_op {
            if c != CmpOp::Eq && matches!(ty, FieldType::Bool | FieldType::Kind | FieldType::Status)
            {
                self.err(
                    op.pos,
                    format!("`{name}` does not apply to this field: its values have no order"),
                    Some("use `=`, `!=` or `in`".into()),
                );
                return None;
            }
            let op = Op::Cmp(c, self.literal(ty, value)?);
            return Some(if name == "!=" {
                Test::not(op)
            } else {
                Test::is(op)
            });
        }
        match name {
            "in" | "not-in" => {
                let items = self.seq(value, &format!("the value of `{name}`"))?;
                let lits: Option<Vec<Literal>> = items
                    .iter()
                    .map(|i| self.literal(ty, i))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .collect();
                let lits = lits?;
                Some(if name == "in" {
                    Test::is(Op::In(lits))
                } else {
                    Test::not(Op::In(lits))
                })
            }
            "exists" | "not-exists" => {
                if value.value != Value::Bool(true) {
                    self.err(
                        value.pos,
                        format!("write `{name}: true`, or just `field: {name}`"),
                        None,
                    );
                    return None;
                }
                Some(if name == "exists" {
                    Test::is(Op::Exists)
                } else {
                    Test::not(Op::Exists)
                })
            }
            "starts-with" | "contains" | "does-not-contain" | "matches" => {
                let Some(text) = value.scalar_text() else {
                    self.err(
                        value.pos,
                        format!("`{name}` takes a string, found {}", value.kind()),
                        None,
                    );
                    return None;
                };
                Some(match name {
                    "starts-with" => Test::is(Op::StartsWith(text)),
                    "contains" => Test::is(Op::Contains(text)),
                    "does-not-contain" => Test::not(Op::Contains(text)),
                    _ => match Regex::new(&text) {
                        Ok(re) => Test::is(Op::Matches(re)),
                        Err(e) => {
                            let last = regex_problem(&e);
                            self.err(value.pos, format!("invalid regular expression: {last}"), Some("the syntax is Rust's `regex` crate (no look-around or back-references)".into()));
                            return None;
                        }
                    },
                })
            }
            _ => {
                self.err(
                    op.pos,
                    format!("unknown operator `{name}`"),
                    Some(format!("operators: {}", OPERATORS.join(", "))),
                );
                None
            }
        }
    }

    fn literal(&mut self, ty: FieldType, node: &Node) -> Option<Literal> {
        let v = &node.value;
        let out = match ty {
            FieldType::Duration => match v {
                Value::Str(s) => parse_duration(s)
                    .map(|d| Literal::Duration(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))),
                _ => None,
            },
            FieldType::Int => match v {
                Value::Int(i) => Some(Literal::Int(*i)),
                Value::Float(f) => Some(Literal::Float(*f)),
                _ => None,
            },
            FieldType::Bool => match v {
                Value::Bool(b) => Some(Literal::Bool(*b)),
                _ => None,
            },
            FieldType::Kind => node.as_str().and_then(|s| {
                let s = s.to_ascii_uppercase();
                let s = s.strip_prefix("SPAN_KIND_").unwrap_or(&s);
                SpanKind::from_str_name(&format!("SPAN_KIND_{s}"))
                    .map(|k| Literal::Int(i64::from(k as i32)))
            }),
            FieldType::Status => node.as_str().and_then(|s| {
                let s = s.to_ascii_uppercase();
                let s = s.strip_prefix("STATUS_CODE_").unwrap_or(&s);
                StatusCode::from_str_name(&format!("STATUS_CODE_{s}"))
                    .map(|c| Literal::Int(i64::from(c as i32)))
            }),
            FieldType::Text => node.scalar_text().map(Literal::Str),
            FieldType::Dynamic => match v {
                Value::Str(s) => Some(Literal::Str(s.clone())),
                Value::Int(i) => Some(Literal::Int(*i)),
                Value::Float(f) => Some(Literal::Float(*f)),
                Value::Bool(b) => Some(Literal::Bool(*b)),
                _ => None,
            },
        };
        if out.is_none() {
            let hint = match ty {
                FieldType::Duration => "write a duration with its unit: 1500ms, 2s, 1m",
                FieldType::Int => "write a number",
                FieldType::Bool => "write true or false",
                FieldType::Kind => {
                    "one of SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL, UNSPECIFIED"
                }
                FieldType::Status => "one of OK, ERROR, UNSET",
                FieldType::Text | FieldType::Dynamic => "write a string, number or boolean",
            };
            self.err(
                node.pos,
                format!("{} is not a valid value for this field", describe(node)),
                Some(hint.into()),
            );
        }
        out
    }

    fn action(&mut self, node: &Node) -> Option<Action> {
        match &node.value {
            Value::Str(s) if s == "keep" => return Some(Action::Keep),
            Value::Str(s) if s == "drop" => return Some(Action::Drop),
            Value::Map(m) if m.len() == 1 => {
                let (k, v) = &m[0];
                return match k.as_str() {
                    Some("sample") => self.sample(v),
                    Some("rate_limit") => self
                        .per_key(v, "traces_per_sec")
                        .map(|(x, key, max)| Action::RateLimit(RateLimit::new(x, key, max))),
                    Some("throughput") => self
                        .per_key(v, "target_per_sec")
                        .map(|(x, key, max)| Action::Throughput(Throughput::new(x, key, max))),
                    _ => {
                        self.err(
                            k.pos,
                            format!("unknown action `{}`", k.scalar_text().unwrap_or_default()),
                            Some(format!("one of {ACTIONS}")),
                        );
                        None
                    }
                };
            }
            _ => {}
        }
        self.err(
            node.pos,
            format!("{} is not an action", describe(node)),
            Some(format!("one of {ACTIONS}")),
        );
        None
    }

    fn sample(&mut self, node: &Node) -> Option<Action> {
        let map = self.map(node, "`sample`")?;
        let entries = self.known(map, &["rate", "by"], "`sample`");
        let by = match entries.iter().find(|(k, _, _)| *k == "by") {
            Some((_, field, _)) => Some(self.key_field(
                field,
                "a sampling key",
                "one span field, e.g. `by: attributes.order.id`",
            )?),
            None => None,
        };
        let Some((_, rate, _)) = entries.iter().find(|(k, _, _)| *k == "rate") else {
            self.err(
                node.pos,
                "`sample` needs a `rate`",
                Some("keep 1 in N: `sample: {rate: 20}` keeps 5%".into()),
            );
            return None;
        };
        match rate.value {
            Value::Int(n) if n >= 1 => {
                #[allow(clippy::cast_precision_loss)]
                let p = Probability::new(1.0 / n as f64).ok()?;
                Some(Action::Sample(Sample {
                    threshold: Threshold::from_probability(p),
                    by,
                }))
            }
            _ => {
                self.err(
                    rate.pos,
                    "`rate` must be a whole number of at least 1",
                    Some("keep 1 in N: `rate: 20` keeps 5%".into()),
                );
                None
            }
        }
    }

    /// A sampling key's field: a span field, read from the root span first
    /// (a `root.` prefix is allowed); anything else is reported as `what`
    /// (`a key`, `a sampling key`) with `hint`.
    fn key_field(&mut self, node: &Node, what: &str, hint: &str) -> Option<SpanField> {
        let name = node.as_str().unwrap_or("");
        let field = SpanField::parse(name.strip_prefix("root.").unwrap_or(name));
        if field.is_none() {
            self.err(
                node.pos,
                format!(
                    "`{}` cannot be {what}",
                    node.scalar_text().unwrap_or_default()
                ),
                Some(format!("{hint}: {}", crate::field::SPAN_FIELDS)),
            );
        }
        field
    }

    fn per_key(
        &mut self,
        node: &Node,
        amount: &'static str,
    ) -> Option<(f64, Vec<SpanField>, usize)> {
        let map = self.map(node, "this action")?;
        let entries = self.known(map, &[amount, "key", "max_keys"], "this action");
        let get = |name: &str| entry(&entries, name);
        let x = match get(amount) {
            Some(v) => self.positive(v, &format!("`{amount}`")),
            None => {
                self.err(node.pos, format!("`{amount}` is required"), None);
                None
            }
        };
        let mut key = Vec::new();
        if let Some(k) = get("key") {
            for item in self.seq(k, "`key`").unwrap_or(&[]) {
                key.extend(self.key_field(
                    item,
                    "a key",
                    "a key is made of span fields, read from the root span",
                ));
            }
        }
        let max_keys = match get("max_keys") {
            Some(v) => match v.value {
                Value::Int(n) if n >= 1 => usize::try_from(n).ok(),
                _ => {
                    self.err(
                        v.pos,
                        "`max_keys` must be a whole number of at least 1",
                        None,
                    );
                    None
                }
            },
            None => Some(DEFAULT_MAX_KEYS),
        };
        Some((x?, key, max_keys?))
    }

    fn journeys(&mut self, node: &Node) -> Vec<Journey> {
        let mut out: Vec<Journey> = Vec::new();
        for item in self.seq(node, "`journeys`").unwrap_or(&[]) {
            let Some(journey) = self.journey(item) else {
                continue;
            };
            if let Some(other) = out.iter().find(|j| j.name == journey.name) {
                self.err(
                    journey.pos,
                    format!(
                        "journey name `{}` is used twice (first at line {})",
                        journey.name, other.pos.line
                    ),
                    Some("names label the events, the tables' rows and the alerts".into()),
                );
                continue;
            }
            out.push(journey);
        }
        out
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        match node.scalar_text().as_deref().and_then(parse_duration) {
            Some(d) if !d.is_zero() => Some(d),
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "{what} must be a duration greater than 0, found {}",
                        describe(node)
                    ),
                    Some("e.g. `90s`, `10m`, `8h`".into()),
                );
                None
            }
        }
    }

    fn status_list(&mut self, node: &Node, what: &str) -> Vec<(String, Pos)> {
        let mut out = Vec::new();
        for item in self.seq(node, what).unwrap_or(&[]) {
            match item.scalar_text().filter(|s| !s.is_empty()) {
                Some(s) => out.push((s, item.pos)),
                None => self.err(
                    item.pos,
                    format!("a status in {what} must be a non-empty value"),
                    None,
                ),
            }
        }
        out
    }

    fn journey(&mut self, node: &Node) -> Option<Journey> {
        let map = self.map(node, "a journey")?;
        let entries = self.known(map, JOURNEY_KEYS, "a journey");
        let get = |name: &str| entry(&entries, name);
        let name = match get("name") {
            Some(n) => self.string(n, "a journey's `name`").and_then(|name| {
                if name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    Some(name)
                } else {
                    self.err(
                        n.pos,
                        format!("journey name `{name}` may hold only letters, digits, `_` and `-`"),
                        Some("it becomes part of a RabbitMQ routing key and a metric label".into()),
                    );
                    None
                }
            }),
            None => {
                self.err(node.pos, "a journey needs a `name`", None);
                None
            }
        };
        let key = match get("key") {
            Some(k) => {
                let text = k.as_str().unwrap_or("");
                match SpanField::parse(text) {
                    Some(f @ (SpanField::Attribute(_) | SpanField::ResourceAttribute(_))) => {
                        Some((text.to_owned(), f))
                    }
                    _ => {
                        self.err(
                            k.pos,
                            format!("`{}` cannot be a journey key", k.scalar_text().unwrap_or_default()),
                            Some("a key is a span attribute (`attributes.order.id`) or a resource attribute (`resource.tenant`)".into()),
                        );
                        None
                    }
                }
            }
            None => {
                self.err(
                    node.pos,
                    "a journey needs a `key`",
                    Some("the attribute every span touching the entity carries, e.g. `key: attributes.order.id`".into()),
                );
                None
            }
        };
        let status = get("status").and_then(|s| {
            let text = s.as_str().unwrap_or("");
            let field = SpanField::parse(text);
            if field.is_none() {
                self.err(
                    s.pos,
                    format!(
                        "`{}` cannot be a journey status",
                        s.scalar_text().unwrap_or_default()
                    ),
                    Some(format!(
                        "a status is a span field: {}",
                        crate::field::SPAN_FIELDS
                    )),
                );
            }
            field.map(|f| (text.to_owned(), f))
        });
        let mut max_time_in_status: Vec<(String, Duration)> = Vec::new();
        let mut limit_pos: Vec<Pos> = Vec::new();
        if let Some(m) = get("max_time_in_status")
            && let Some(map) = self.map(m, "`max_time_in_status`")
        {
            for (status, limit) in map {
                let Some(s) = status.scalar_text().filter(|s| !s.is_empty()) else {
                    self.err(status.pos, "a status must be a non-empty value", None);
                    continue;
                };
                if max_time_in_status.iter().any(|(other, _)| *other == s) {
                    self.err(status.pos, format!("status `{s}` is given twice"), None);
                    continue;
                }
                if let Some(d) = self.duration(limit, &format!("the limit of `{s}`")) {
                    max_time_in_status.push((s, d));
                    limit_pos.push(status.pos);
                }
            }
        }
        let default_max_time =
            get("default_max_time").and_then(|d| self.duration(d, "`default_max_time`"));
        let terminal = match get("terminal") {
            Some(t) => self.status_list(t, "`terminal`"),
            None => Vec::new(),
        };
        for (s, pos) in &terminal {
            if let Some(i) = max_time_in_status.iter().position(|(other, _)| other == s) {
                self.err(
                    limit_pos[i],
                    format!(
                        "status `{s}` has a limit but is terminal (line {})",
                        pos.line
                    ),
                    Some("a journey in a terminal status is finished and never stuck".into()),
                );
            }
        }
        if get("status").is_none()
            && (!max_time_in_status.is_empty()
                || !terminal.is_empty()
                || default_max_time.is_some())
        {
            self.err(
                node.pos,
                "limits and terminal statuses need a `status` field",
                Some("e.g. `status: attributes.order.status`".into()),
            );
        }
        let mut capture = Vec::new();
        if let Some(c) = get("capture") {
            let items = self.seq(c, "`capture`").unwrap_or(&[]);
            if items.len() > MAX_CAPTURE {
                self.err(
                    c.pos,
                    format!(
                        "at most {MAX_CAPTURE} fields can be captured, found {}",
                        items.len()
                    ),
                    Some("an event is recorded for every span with the key: keep it small".into()),
                );
            }
            for item in items {
                let text = item.as_str().unwrap_or("");
                match SpanField::parse(text) {
                    Some(f) => capture.push((text.to_owned(), f)),
                    None => self.err(
                        item.pos,
                        format!(
                            "`{}` cannot be captured",
                            item.scalar_text().unwrap_or_default()
                        ),
                        Some(format!(
                            "capture span fields: {}",
                            crate::field::SPAN_FIELDS
                        )),
                    ),
                }
            }
        }
        let key = key?;
        let finder = match &key.1 {
            SpanField::Attribute(k) => Some(memchr::memmem::Finder::new(k.as_bytes()).into_owned()),
            _ => None,
        };
        Some(Journey {
            finder,
            name: name?,
            key,
            status,
            max_time_in_status,
            default_max_time,
            terminal: terminal.into_iter().map(|(s, _)| s).collect(),
            capture,
            pos: node.pos,
        })
    }

    fn redact(&mut self, node: &Node) -> Redaction {
        let mut r = Redaction::default();
        let Some(map) = self.map(node, "`redact`") else {
            return r;
        };
        let entries = self.known(
            map,
            &[
                "remove",
                "hash",
                "mask",
                "salt",
                "salt_env",
                "salt_file",
                "case_insensitive",
                "values",
            ],
            "`redact`",
        );
        let mut salt_pos: Option<(&str, Pos)> = None;
        for (key, value, pos) in entries {
            match key {
                "remove" | "hash" => {
                    let keys: HashSet<String> = self
                        .seq(value, &format!("`{key}`"))
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(|n| n.scalar_text())
                        .collect();
                    if key == "remove" {
                        r.remove = keys
                    } else {
                        r.hash = keys
                    }
                }
                "mask" => {
                    for item in self.seq(value, "`mask`").unwrap_or(&[]) {
                        let Some(m) = self.map(item, "a mask") else {
                            continue;
                        };
                        let e = self.known(m, &["key", "pattern", "replacement"], "a mask");
                        let get =
                            |name: &str| e.iter().find(|(k, _, _)| *k == name).map(|(_, v, _)| *v);
                        let (Some(k), Some(p)) = (get("key"), get("pattern")) else {
                            self.err(
                                item.pos,
                                "a mask needs `key` and `pattern`",
                                Some(
                                    "e.g. `{key: user.phone, pattern: '\\d', replacement: '*'}`"
                                        .into(),
                                ),
                            );
                            continue;
                        };
                        let (Some(k), Some(p)) =
                            (self.string(k, "`key`"), self.string(p, "`pattern`"))
                        else {
                            continue;
                        };
                        let replacement = get("replacement")
                            .and_then(Node::scalar_text)
                            .unwrap_or_else(|| "***".into());
                        match Regex::new(&p) {
                            Ok(pattern) => r.mask.push(Mask {
                                key: k,
                                pattern,
                                replacement,
                            }),
                            Err(e) => {
                                let last = regex_problem(&e);
                                self.err(
                                    get("pattern").map_or(item.pos, |n| n.pos),
                                    format!("invalid regular expression: {last}"),
                                    None,
                                );
                            }
                        }
                    }
                }
                "values" => {
                    for item in self.seq(value, "`values`").unwrap_or(&[]) {
                        let name = item.as_str().unwrap_or("");
                        match ValueRule::named(name) {
                            Some(rule) => r.values.push(rule),
                            None => self.err(
                                item.pos,
                                format!(
                                    "unknown value rule `{}`",
                                    item.scalar_text().unwrap_or_default()
                                ),
                                Some(format!("one of: {}", ValueRule::NAMES)),
                            ),
                        }
                    }
                }
                "case_insensitive" => match value.value {
                    Value::Bool(b) => r.case_insensitive = b,
                    _ => self.err(value.pos, "`case_insensitive` must be true or false", None),
                },
                "salt" | "salt_env" | "salt_file" => {
                    if let Some((first, _)) = salt_pos {
                        self.err(
                            pos,
                            format!("`{key}` and `{first}` both give the salt"),
                            Some("keep one".into()),
                        );
                        continue;
                    }
                    salt_pos = Some((key, pos));
                    let Some(text) = self.string(value, &format!("`{key}`")) else {
                        continue;
                    };
                    let secret = match key {
                        "salt" => Ok(text),
                        "salt_env" => (self.secrets)(SecretRef::Env(&text)),
                        _ => (self.secrets)(SecretRef::File(&text)),
                    };
                    match secret {
                        Ok(salt) => r.salt = salt.into_bytes(),
                        Err(why) => self.err(
                            value.pos,
                            why,
                            Some("it must hold the salt for hashed attributes".into()),
                        ),
                    }
                }
                // `known` kept only the keys above.
                _ => {}
            }
        }
        if r.case_insensitive {
            let lower =
                |keys: &HashSet<String>| keys.iter().map(|k| k.to_ascii_lowercase()).collect();
            r.remove = lower(&r.remove);
            r.hash = lower(&r.hash);
            for m in &mut r.mask {
                m.key = m.key.to_ascii_lowercase();
            }
        }
        if !r.hash.is_empty() && r.salt.is_empty() && salt_pos.is_none() {
            self.err(node.pos, "`hash` needs a salt", Some("add `salt_file: PATH` (a mounted Secret) or `salt_env: NAME` (an environment variable holding a secret), or `salt:`; an unsalted hash of an email can be reversed by guessing".into()));
        }
        r
    }
}

/// The value of key `name` among `entries` (what [`Compiler::known`] kept).
fn entry<'a>(entries: &[(&str, &'a Node, Pos)], name: &str) -> Option<&'a Node> {
    entries
        .iter()
        .find(|(k, _, _)| *k == name)
        .map(|(_, v, _)| *v)
}

/// The last line of a regex error says what is wrong (the lines before
/// repeat the pattern, which the position already points at).
fn regex_problem(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or("").trim();
    last.strip_prefix("error: ").unwrap_or(last).to_owned()
}

fn describe(node: &Node) -> String {
    match node.scalar_text() {
        Some(t) => format!("`{t}`"),
        None => node.kind().to_owned(),
    }
}

/// Compiles rules text; errors carry positions but no file name.
/// `secrets` reads the secrets the file refers to.
pub fn compile(text: &str, secrets: Secrets<'_>) -> Result<Rules, Vec<RuleError>> {
    let root = crate::node::parse(text).map_err(|(pos, message)| {
        vec![RuleError {
            pos,
            message,
            hint: None,
        }]
    })?;
    let mut c = Compiler {
        errors: Vec::new(),
        secrets,
    };
    match c.file(&root, text) {
        Some(rules) if c.errors.is_empty() => Ok(rules),
        _ => {
            c.errors.sort_by_key(|e| e.pos);
            Err(c.errors)
        }
    }
}
