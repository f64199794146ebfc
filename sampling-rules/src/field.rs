//! The fields a rule can test, and how their values are read from a trace.

use crate::trace::SpanRef;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use std::borrow::Cow;

/// A field of one span (or of its resource or scope).
#[derive(Clone, Debug, PartialEq)]
pub enum SpanField {
    ServiceName,
    SpanName,
    SpanKind,
    SpanDuration,
    StatusCode,
    StatusMessage,
    ScopeName,
    /// Names of the span's events (several values).
    EventName,
    Attribute(String),
    ResourceAttribute(String),
    /// The value of one entry of the span's W3C tracestate.
    TraceState(String),
}

/// A fact about the whole trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceField {
    Duration,
    SpanCount,
    HasError,
    HasRoot,
}

/// Any field a condition can name.
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    Trace(TraceField),
    /// A span field read from the root span only.
    Root(SpanField),
    /// A span field, matched by any span (or every span, in `every_span`).
    Span(SpanField),
}

/// What a field holds, which decides the values and operators it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    Duration,
    Int,
    Bool,
    /// `SERVER`, `CLIENT`, `PRODUCER`, `CONSUMER`, `INTERNAL`, `UNSPECIFIED`.
    Kind,
    /// `OK`, `ERROR`, `UNSET`.
    Status,
    Text,
    /// Attributes: string, integer, double or boolean, as sent.
    Dynamic,
}

/// A value read from a trace.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Nanoseconds.
    Duration(u64),
}

impl FieldValue<'_> {
    /// The value as text, for string operators applied to numbers and for rate-limit keys.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            FieldValue::Str(s) => Cow::Borrowed(s),
            FieldValue::Int(i) => Cow::Owned(i.to_string()),
            FieldValue::Float(f) => Cow::Owned(f.to_string()),
            FieldValue::Bool(b) => Cow::Owned(b.to_string()),
            FieldValue::Duration(ns) => Cow::Owned(format!("{ns}ns")),
        }
    }
}

pub const TRACE_FIELDS: &str = "trace.duration, trace.span_count, trace.has_error, trace.has_root";
pub const SPAN_FIELDS: &str = "service.name, span.name, span.kind, span.duration, status.code, status.message, scope.name, event.name, attributes.<key>, resource.<key>, trace_state.<key>";

impl SpanField {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "service.name" => SpanField::ServiceName,
            "span.name" => SpanField::SpanName,
            "span.kind" => SpanField::SpanKind,
            "span.duration" => SpanField::SpanDuration,
            "status.code" => SpanField::StatusCode,
            "status.message" => SpanField::StatusMessage,
            "scope.name" => SpanField::ScopeName,
            "event.name" => SpanField::EventName,
            _ => {
                if let Some(key) = name.strip_prefix("attributes.").filter(|k| !k.is_empty()) {
                    SpanField::Attribute(key.to_owned())
                } else if let Some(key) = name.strip_prefix("resource.").filter(|k| !k.is_empty()) {
                    SpanField::ResourceAttribute(key.to_owned())
                } else if let Some(key) =
                    name.strip_prefix("trace_state.").filter(|k| !k.is_empty())
                {
                    SpanField::TraceState(key.to_owned())
                } else {
                    return None;
                }
            }
        })
    }

    /// Whether the field is read from the span's attributes or events,
    /// which are most of a span's bytes; the other span fields are small.
    pub fn reads_attributes_or_events(&self) -> bool {
        matches!(self, SpanField::Attribute(_) | SpanField::EventName)
    }

    pub fn field_type(&self) -> FieldType {
        match self {
            SpanField::ServiceName
            | SpanField::SpanName
            | SpanField::StatusMessage
            | SpanField::ScopeName
            | SpanField::EventName
            | SpanField::TraceState(_) => FieldType::Text,
            SpanField::SpanKind => FieldType::Kind,
            SpanField::SpanDuration => FieldType::Duration,
            SpanField::StatusCode => FieldType::Status,
            SpanField::Attribute(_) | SpanField::ResourceAttribute(_) => FieldType::Dynamic,
        }
    }

    /// Calls `f` with each value of the field in `span` until it returns
    /// true; returns whether it did. Most fields have at most one value;
    /// `event.name` has one per event.
    pub fn any_value(
        &self,
        span: &SpanRef<'_>,
        mut f: impl FnMut(&FieldValue<'_>) -> bool,
    ) -> bool {
        if let SpanField::EventName = self {
            return span
                .span
                .events
                .iter()
                .any(|e| f(&FieldValue::Str(Cow::Borrowed(e.name.as_str()))));
        }
        self.value(span).is_some_and(|v| f(&v))
    }

    /// The single value of the field in `span` (the first event's name for `event.name`).
    #[inline]
    pub fn value<'a>(&self, span: &SpanRef<'a>) -> Option<FieldValue<'a>> {
        let s = span.span;
        match self {
            SpanField::ServiceName => span
                .service_name()
                .map(|n| FieldValue::Str(Cow::Borrowed(n))),
            SpanField::SpanName => Some(FieldValue::Str(Cow::Borrowed(s.name.as_str()))),
            SpanField::SpanKind => Some(FieldValue::Int(i64::from(s.kind))),
            SpanField::SpanDuration => Some(FieldValue::Duration(
                s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano),
            )),
            SpanField::StatusCode => Some(FieldValue::Int(i64::from(
                s.status.as_ref().map_or(0, |st| st.code),
            ))),
            SpanField::StatusMessage => s
                .status
                .as_ref()
                .filter(|st| !st.message.is_empty())
                .map(|st| FieldValue::Str(Cow::Borrowed(st.message.as_str()))),
            SpanField::ScopeName => span
                .scope
                .filter(|sc| !sc.name.is_empty())
                .map(|sc| FieldValue::Str(Cow::Borrowed(sc.name.as_str()))),
            SpanField::EventName => s
                .events
                .first()
                .map(|e| FieldValue::Str(Cow::Borrowed(e.name.as_str()))),
            SpanField::Attribute(key) => attribute(&s.attributes, key),
            SpanField::ResourceAttribute(key) => {
                attribute(span.resource.map_or(&[], |r| &r.attributes), key)
            }
            SpanField::TraceState(key) => s
                .trace_state
                .split(',')
                .filter_map(|member| member.trim().split_once('='))
                .find(|(k, _)| k == key)
                .map(|(_, v)| FieldValue::Str(Cow::Borrowed(v))),
        }
    }
}

#[inline]
fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<FieldValue<'a>> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    any_value(value)
}

/// Scalars only: arrays, maps and bytes are not comparable.
fn any_value(value: &AnyValue) -> Option<FieldValue<'_>> {
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => FieldValue::Str(Cow::Borrowed(s.as_str())),
        any_value::Value::IntValue(i) => FieldValue::Int(*i),
        any_value::Value::DoubleValue(d) => FieldValue::Float(*d),
        any_value::Value::BoolValue(b) => FieldValue::Bool(*b),
        _ => return None,
    })
}

impl TraceField {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "trace.duration" => TraceField::Duration,
            "trace.span_count" => TraceField::SpanCount,
            "trace.has_error" => TraceField::HasError,
            "trace.has_root" => TraceField::HasRoot,
            _ => return None,
        })
    }

    pub fn field_type(self) -> FieldType {
        match self {
            TraceField::Duration => FieldType::Duration,
            TraceField::SpanCount => FieldType::Int,
            TraceField::HasError | TraceField::HasRoot => FieldType::Bool,
        }
    }
}

impl Field {
    /// Parses a field name; the error is a hint for the SRE.
    pub fn parse(name: &str) -> Result<Self, String> {
        if let Some(f) = TraceField::parse(name) {
            return Ok(Field::Trace(f));
        }
        if let Some(rest) = name.strip_prefix("root.") {
            return SpanField::parse(rest)
                .map(Field::Root)
                .ok_or_else(|| format!("after `root.` write a span field: {SPAN_FIELDS}"));
        }
        if let Some(f) = SpanField::parse(name) {
            return Ok(Field::Span(f));
        }
        let hint = if name.starts_with("trace.") {
            format!("trace fields are {TRACE_FIELDS}")
        } else {
            format!(
                "fields are {TRACE_FIELDS}, {SPAN_FIELDS}, and root.<span field>; for a span attribute write `attributes.{name}`, for a resource attribute `resource.{name}`"
            )
        };
        Err(hint)
    }

    pub fn field_type(&self) -> FieldType {
        match self {
            Field::Trace(t) => t.field_type(),
            Field::Root(s) | Field::Span(s) => s.field_type(),
        }
    }
}
