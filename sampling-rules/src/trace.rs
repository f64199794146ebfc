//! The read-only view of a buffered trace that policies evaluate.

use opentelemetry_proto::tonic::{
    common::v1::InstrumentationScope, resource::v1::Resource, trace::v1::Span,
};
use std::fmt;

/// A 16-byte W3C trace ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

impl TraceId {
    /// Parses the raw bytes of an OTLP `trace_id`; `None` unless it is 16
    /// bytes and not all zero (the W3C invalid value).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let id: [u8; 16] = bytes.try_into().ok()?;
        (id != [0; 16]).then_some(Self(id))
    }

    /// Lower-case hex, as trace IDs are written in OTLP/JSON and in logs.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        for b in self.0 {
            out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        out
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({})", self.to_hex())
    }
}

/// One span together with the resource and scope it was reported under.
#[derive(Clone, Copy)]
pub struct SpanRef<'a> {
    pub resource: Option<&'a Resource>,
    pub scope: Option<&'a InstrumentationScope>,
    pub span: &'a Span,
}

impl<'a> SpanRef<'a> {
    /// `service.name` of the span's resource, if set as a string.
    pub fn service_name(&self) -> Option<&'a str> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        self.resource?
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            })
    }

    /// A root span has no parent span ID.
    pub fn is_root(&self) -> bool {
        self.span.parent_span_id.is_empty()
    }
}

/// What a policy can see of a trace: its ID and all of its spans, in any order.
pub trait TraceView {
    fn trace_id(&self) -> TraceId;
    fn spans(&self) -> impl Iterator<Item = SpanRef<'_>>;
}
