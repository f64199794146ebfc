//! Conditions: tests of one field, combined with `all`, `any`, `not`,
//! `any_span` and `every_span`, evaluated against a whole trace.

use crate::{
    field::{FieldValue, SpanField, TraceField},
    trace::{SpanRef, TraceView},
};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use regex::Regex;
use std::cmp::Ordering;

/// A typed value written in the rules file.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Nanoseconds, written `1500ms`, `2s`.
    Duration(u64),
}

/// A comparison; `!=` is a negated `=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Gt,
    Lt,
    Ge,
    Le,
}

/// One operator applied to a field.
#[derive(Clone, Debug)]
pub enum Op {
    Exists,
    Cmp(CmpOp, Literal),
    In(Vec<Literal>),
    StartsWith(String),
    Contains(String),
    Matches(Regex),
}

/// An operator, possibly negated. The negative operators (`!=`, `not-in`,
/// `does-not-contain`, `not-exists`) are the exact opposite of their
/// positive twin: they also hold where the field is missing.
#[derive(Clone, Debug)]
pub struct Test {
    pub negate: bool,
    pub op: Op,
}

impl Test {
    pub fn is(op: Op) -> Self {
        Self { negate: false, op }
    }

    pub fn not(op: Op) -> Self {
        Self { negate: true, op }
    }
}

impl Op {
    /// Whether one value passes the (positive) operator.
    #[inline]
    fn holds(&self, value: &FieldValue<'_>) -> bool {
        // Strings are the common case: test them without building a `Cow`.
        let text = |f: &dyn Fn(&str) -> bool| match value {
            FieldValue::Str(s) => f(s),
            other => f(&other.text()),
        };
        match self {
            Op::Exists => true,
            Op::Cmp(CmpOp::Eq, lit) => equals(value, lit),
            Op::Cmp(op, lit) => compare(value, lit).is_some_and(|ord| match op {
                CmpOp::Eq => ord == Ordering::Equal,
                CmpOp::Gt => ord == Ordering::Greater,
                CmpOp::Lt => ord == Ordering::Less,
                CmpOp::Ge => ord != Ordering::Less,
                CmpOp::Le => ord != Ordering::Greater,
            }),
            Op::In(list) => list.iter().any(|lit| equals(value, lit)),
            Op::StartsWith(p) => text(&|s| s.starts_with(p.as_str())),
            Op::Contains(p) => text(&|s| s.contains(p.as_str())),
            Op::Matches(re) => text(&|s| re.is_match(s)),
        }
    }
}

/// Equality, cheaper than a full ordering for strings (lengths first).
fn equals(value: &FieldValue<'_>, lit: &Literal) -> bool {
    match (value, lit) {
        (FieldValue::Str(a), Literal::Str(b)) => a.as_ref() == b.as_str(),
        (FieldValue::Int(a), Literal::Int(b)) => a == b,
        (FieldValue::Bool(a), Literal::Bool(b)) => a == b,
        (FieldValue::Duration(a), Literal::Duration(b)) => a == b,
        _ => compare(value, lit) == Some(Ordering::Equal),
    }
}

/// Orders a trace value against a literal of a comparable type.
fn compare(value: &FieldValue<'_>, lit: &Literal) -> Option<Ordering> {
    #[allow(clippy::cast_precision_loss)]
    match (value, lit) {
        (FieldValue::Str(a), Literal::Str(b)) => Some(a.as_ref().cmp(b.as_str())),
        (FieldValue::Int(a), Literal::Int(b)) => Some(a.cmp(b)),
        (FieldValue::Int(a), Literal::Float(b)) => (*a as f64).partial_cmp(b),
        (FieldValue::Float(a), Literal::Int(b)) => a.partial_cmp(&(*b as f64)),
        (FieldValue::Float(a), Literal::Float(b)) => a.partial_cmp(b),
        (FieldValue::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        (FieldValue::Duration(a), Literal::Duration(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// Whether a span field passes a test in one span.
#[inline]
fn span_test(field: &SpanField, test: &Test, span: &SpanRef<'_>) -> bool {
    field.any_value(span, |v| test.op.holds(v)) != test.negate
}

fn value_test(value: Option<FieldValue<'_>>, test: &Test) -> bool {
    value.is_some_and(|v| test.op.holds(&v)) != test.negate
}

#[derive(Clone, Debug)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Trace(TraceField, Test),
    /// A span field of the root span; false when the root has not arrived.
    Root(SpanField, Test),
    /// One span passes every test.
    AnySpan(Vec<(SpanField, Test)>),
    /// Every span passes every test.
    EverySpan(Vec<(SpanField, Test)>),
}

/// What is computed once per trace before rules are evaluated.
pub struct Facts<'a> {
    pub spans: Vec<SpanRef<'a>>,
    pub root: Option<usize>,
    pub duration_ns: u64,
    pub has_error: bool,
}

impl<'a> Facts<'a> {
    pub fn new<T: TraceView>(trace: &'a T) -> Self {
        // Most traces are small; one allocation instead of repeated growth.
        let mut spans: Vec<SpanRef<'a>> = Vec::with_capacity(32);
        spans.extend(trace.spans());
        let mut start = u64::MAX;
        let mut end = 0;
        let mut has_error = false;
        let mut root = None;
        for (i, s) in spans.iter().enumerate() {
            start = start.min(s.span.start_time_unix_nano);
            end = end.max(s.span.end_time_unix_nano);
            has_error |= s
                .span
                .status
                .as_ref()
                .is_some_and(|st| st.code == StatusCode::Error as i32);
            if root.is_none() && s.is_root() {
                root = Some(i);
            }
        }
        Self {
            root,
            duration_ns: end.saturating_sub(start),
            has_error,
            spans,
        }
    }

    pub fn root_span(&self) -> Option<&SpanRef<'a>> {
        self.root.and_then(|i| self.spans.get(i))
    }

    /// The value of a span field for the trace as a whole: the root span's,
    /// else the first span that has one. Used for rule-set selection and keys.
    pub fn trace_value(&self, field: &SpanField) -> Option<FieldValue<'a>> {
        self.root_span()
            .and_then(|r| field.value(r))
            .or_else(|| self.spans.iter().find_map(|s| field.value(s)))
    }

    fn trace_field(&self, field: TraceField) -> FieldValue<'static> {
        match field {
            TraceField::Duration => FieldValue::Duration(self.duration_ns),
            TraceField::SpanCount => {
                FieldValue::Int(i64::try_from(self.spans.len()).unwrap_or(i64::MAX))
            }
            TraceField::HasError => FieldValue::Bool(self.has_error),
            TraceField::HasRoot => FieldValue::Bool(self.root.is_some()),
        }
    }
}

impl Condition {
    /// Calls `f` with every span field the condition tests.
    pub fn span_fields<'a>(&'a self, f: &mut impl FnMut(&'a SpanField)) {
        match self {
            Condition::All(cs) | Condition::Any(cs) => cs.iter().for_each(|c| c.span_fields(f)),
            Condition::Not(c) => c.span_fields(f),
            Condition::Trace(..) => {}
            Condition::Root(field, _) => f(field),
            Condition::AnySpan(tests) | Condition::EverySpan(tests) => {
                tests.iter().for_each(|(field, _)| f(field));
            }
        }
    }

    pub fn eval(&self, facts: &Facts<'_>) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.eval(facts)),
            Condition::Any(cs) => cs.iter().any(|c| c.eval(facts)),
            Condition::Not(c) => !c.eval(facts),
            Condition::Trace(field, test) => value_test(Some(facts.trace_field(*field)), test),
            Condition::Root(field, test) => facts
                .root_span()
                .is_some_and(|root| span_test(field, test, root)),
            Condition::AnySpan(tests) => facts
                .spans
                .iter()
                .any(|s| tests.iter().all(|(f, t)| span_test(f, t, s))),
            Condition::EverySpan(tests) => facts
                .spans
                .iter()
                .all(|s| tests.iter().all(|(f, t)| span_test(f, t, s))),
        }
    }
}
