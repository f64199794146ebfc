//! One published message (a kept trace, as OTLP protobuf) into span rows.
//! Values are written the way the Collector's ClickHouse exporter writes
//! them: hex IDs, `Server`/`Client`/... kinds, `Ok`/`Error`/`Unset`
//! statuses, attribute values as strings.

use crate::config::Retention;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{span::SpanKind, status::StatusCode},
};
use prost::Message as _;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
#[serde(rename_all = "PascalCase")]
pub struct SpanRow {
    /// Start of the span, nanoseconds since the epoch.
    pub timestamp: i64,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub trace_state: String,
    pub span_name: String,
    pub span_kind: String,
    pub service_name: String,
    pub resource_attributes: Vec<(String, String)>,
    pub scope_name: String,
    pub scope_version: String,
    pub span_attributes: Vec<(String, String)>,
    /// Nanoseconds.
    pub duration: u64,
    pub status_code: String,
    pub status_message: String,
    #[serde(rename = "Events.Timestamp")]
    pub events_timestamp: Vec<i64>,
    #[serde(rename = "Events.Name")]
    pub events_name: Vec<String>,
    #[serde(rename = "Events.Attributes")]
    pub events_attributes: Vec<Vec<(String, String)>>,
    #[serde(rename = "Links.TraceId")]
    pub links_trace_id: Vec<String>,
    #[serde(rename = "Links.SpanId")]
    pub links_span_id: Vec<String>,
    #[serde(rename = "Links.TraceState")]
    pub links_trace_state: Vec<String>,
    #[serde(rename = "Links.Attributes")]
    pub links_attributes: Vec<Vec<(String, String)>>,
    pub sampling_rule: String,
    pub adjusted_count: f64,
    pub retention_class: String,
    pub message_id: String,
}

pub use tailgate_contract::message::Sampling;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not an OTLP ExportTraceServiceRequest: {0}")]
pub struct Undecodable(pub String);

// A `format!` per byte was a seventh of the ingester's CPU.
fn hex(bytes: &[u8]) -> String {
    const_hex::encode(bytes)
}

fn nanos(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Attribute values as the exporter writes them: scalars as text, the rest
/// as JSON-like text. Takes the value, so strings move instead of being copied.
fn text(value: Option<AnyValue>) -> String {
    match value.and_then(|v| v.value) {
        None => String::new(),
        Some(Value::StringValue(s)) => s,
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(&b),
        // A string-table index belongs to the profiles signal; traces do not use it.
        Some(Value::StringValueStrindex(i)) => i.to_string(),
        Some(Value::ArrayValue(a)) => format!(
            "[{}]",
            a.values
                .into_iter()
                .map(|v| format!("{:?}", text(Some(v))))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(Value::KvlistValue(kv)) => format!(
            "{{{}}}",
            kv.values
                .into_iter()
                .map(|kv| format!("{:?}:{:?}", kv.key, text(kv.value)))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

fn attributes(kvs: Vec<KeyValue>) -> Vec<(String, String)> {
    kvs.into_iter().map(|kv| (kv.key, text(kv.value))).collect()
}

fn kind(k: i32) -> &'static str {
    match SpanKind::try_from(k).unwrap_or(SpanKind::Unspecified) {
        SpanKind::Unspecified => "Unspecified",
        SpanKind::Internal => "Internal",
        SpanKind::Server => "Server",
        SpanKind::Client => "Client",
        SpanKind::Producer => "Producer",
        SpanKind::Consumer => "Consumer",
    }
}

fn status(code: i32) -> &'static str {
    match StatusCode::try_from(code).unwrap_or(StatusCode::Unset) {
        StatusCode::Unset => "Unset",
        StatusCode::Ok => "Ok",
        StatusCode::Error => "Error",
    }
}

/// `long` for traces kept whole on purpose (adjusted count 1: errors, slow
/// traces, `keep` rules), `short` for sampled shares; rule names in the
/// configuration override.
pub fn retention_class(r: &Retention, sampling: &Sampling) -> &'static str {
    if r.long_rules.contains(&sampling.rule) {
        "long"
    } else if r.short_rules.contains(&sampling.rule) || sampling.adjusted_count > 1.0 {
        "short"
    } else {
        "long"
    }
}

/// Decodes one message body into rows.
pub fn rows(
    body: &[u8],
    message_id: &str,
    sampling: &Sampling,
    retention: &Retention,
) -> Result<Vec<SpanRow>, Undecodable> {
    let request =
        ExportTraceServiceRequest::decode(body).map_err(|e| Undecodable(e.to_string()))?;
    let class = retention_class(retention, sampling);
    let mut out = Vec::new();
    // The decoded request is consumed: a span's own strings move into its row.
    for rs in request.resource_spans {
        let resource_attributes = rs
            .resource
            .map(|r| attributes(r.attributes))
            .unwrap_or_default();
        let service_name = resource_attributes
            .iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            let (scope_name, scope_version) =
                ss.scope.map(|s| (s.name, s.version)).unwrap_or_default();
            for span in ss.spans {
                let (status_code, status_message) = span
                    .status
                    .map_or((0, String::new()), |s| (s.code, s.message));
                let (mut events_timestamp, mut events_name, mut events_attributes) =
                    (Vec::new(), Vec::new(), Vec::new());
                for e in span.events {
                    events_timestamp.push(nanos(e.time_unix_nano));
                    events_name.push(e.name);
                    events_attributes.push(attributes(e.attributes));
                }
                let (mut links_trace_id, mut links_span_id) = (Vec::new(), Vec::new());
                let (mut links_trace_state, mut links_attributes) = (Vec::new(), Vec::new());
                for l in span.links {
                    links_trace_id.push(hex(&l.trace_id));
                    links_span_id.push(hex(&l.span_id));
                    links_trace_state.push(l.trace_state);
                    links_attributes.push(attributes(l.attributes));
                }
                out.push(SpanRow {
                    timestamp: nanos(span.start_time_unix_nano),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    trace_state: span.trace_state,
                    span_name: span.name,
                    span_kind: kind(span.kind).into(),
                    service_name: service_name.clone(),
                    resource_attributes: resource_attributes.clone(),
                    scope_name: scope_name.clone(),
                    scope_version: scope_version.clone(),
                    span_attributes: attributes(span.attributes),
                    duration: span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano),
                    status_code: status(status_code).into(),
                    status_message,
                    events_timestamp,
                    events_name,
                    events_attributes,
                    links_trace_id,
                    links_span_id,
                    links_trace_state,
                    links_attributes,
                    sampling_rule: sampling.rule.clone(),
                    adjusted_count: sampling.adjusted_count,
                    retention_class: class.into(),
                    message_id: message_id.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawIngesterConfig;
    use opentelemetry_proto::tonic::{
        resource::v1::Resource,
        trace::v1::{
            ResourceSpans, ScopeSpans, Span, Status,
            span::{Event, Link},
        },
    };
    use tailgate_contract::config::Validate;

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    /// Every field of a span lands in its column.
    #[test]
    fn flattens_every_field() {
        let span = Span {
            trace_id: vec![0xab; 16],
            span_id: vec![1; 8],
            parent_span_id: vec![2; 8],
            trace_state: "ot=th:0".into(),
            name: "mes.price".into(),
            kind: SpanKind::Consumer as i32,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 3_500,
            attributes: vec![
                kv("order.id", Value::StringValue("o1".into())),
                kv("retries", Value::IntValue(2)),
            ],
            events: vec![Event {
                time_unix_nano: 2_000,
                name: "exception".into(),
                attributes: vec![kv("exception.type", Value::StringValue("IOError".into()))],
                ..Default::default()
            }],
            links: vec![Link {
                trace_id: vec![0xcd; 16],
                span_id: vec![3; 8],
                trace_state: "a=b".into(),
                attributes: vec![kv("link.kind", Value::StringValue("follows".into()))],
                ..Default::default()
            }],
            status: Some(Status {
                code: StatusCode::Error as i32,
                message: "MES down".into(),
            }),
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue("mes-api".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(
                        opentelemetry_proto::tonic::common::v1::InstrumentationScope {
                            name: "mes".into(),
                            version: "2.1".into(),
                            ..Default::default()
                        },
                    ),
                    spans: vec![span],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let retention = RawIngesterConfig::default().validate().unwrap().retention;
        let sampling = Sampling {
            rule: "error".into(),
            adjusted_count: 1.0,
        };
        let rows = rows(&req.encode_to_vec(), "m-1", &sampling, &retention).unwrap();
        let r = &rows[0];
        assert_eq!(r.trace_id, "ab".repeat(16));
        assert_eq!(r.span_id, "01".repeat(8));
        assert_eq!(r.parent_span_id, "02".repeat(8));
        assert_eq!((r.timestamp, r.duration), (1_000, 2_500));
        assert_eq!(
            (r.span_kind.as_str(), r.status_code.as_str()),
            ("Consumer", "Error")
        );
        assert_eq!(r.status_message, "MES down");
        assert_eq!(r.service_name, "mes-api");
        assert_eq!(
            (r.scope_name.as_str(), r.scope_version.as_str()),
            ("mes", "2.1")
        );
        assert_eq!(r.span_attributes[1], ("retries".into(), "2".into()));
        assert_eq!(r.events_name, ["exception"]);
        assert_eq!(r.events_timestamp, [2_000]);
        assert_eq!(r.links_trace_id, ["cd".repeat(16)]);
        assert_eq!(r.links_attributes[0][0].1, "follows");
        assert_eq!(
            (
                r.sampling_rule.as_str(),
                r.retention_class.as_str(),
                r.message_id.as_str()
            ),
            ("error", "long", "m-1")
        );
    }

    /// Sampled shares are short-lived, whole keeps long-lived, and rule names override.
    #[test]
    fn retention_classes() {
        let mut raw = RawIngesterConfig::default();
        raw.retention.short_rules = vec!["health".into()];
        raw.retention.long_rules = vec!["audit".into()];
        let r = raw.validate().unwrap().retention;
        let s = |rule: &str, a: f64| Sampling {
            rule: rule.into(),
            adjusted_count: a,
        };
        assert_eq!(retention_class(&r, &s("random", 20.0)), "short");
        assert_eq!(retention_class(&r, &s("slow", 1.0)), "long");
        assert_eq!(retention_class(&r, &s("health", 1.0)), "short");
        assert_eq!(retention_class(&r, &s("audit", 50.0)), "long");
    }

    #[test]
    fn garbage_is_undecodable() {
        let r = RawIngesterConfig::default().validate().unwrap().retention;
        assert!(rows(&[0xff, 0xff], "x", &Sampling::default(), &r).is_err());
    }

    proptest::proptest! {
        /// Fuzz, a message off the queue: any body, under any
        /// `content_encoding`, is read into rows or refused with the reason
        /// it is dead-lettered for, never a panic; a real kept trace, however
        /// compressed, gives one row per span.
        #[test]
        fn fuzz_message_decoding(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            encoding in proptest::option::of("lz4|zstd|identity|gzip|.{0,6}"),
            spans in 0usize..20,
        ) {
            use lapin::{BasicProperties, types::ShortString};
            use tailgate_contract::compression::{Compression, message_body};
            let retention = RawIngesterConfig::default().validate().unwrap().retention;
            let props = match &encoding {
                Some(e) => BasicProperties::default().with_content_encoding(ShortString::from(e.as_str())),
                None => BasicProperties::default(),
            };
            if let Ok(otlp) = message_body(&props, &body) {
                let _ = rows(&otlp, "m", &Sampling::default(), &retention);
            }
            let request = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: (0..spans)
                            .map(|i| Span {
                                trace_id: vec![1; 16],
                                span_id: vec![u8::try_from(i).unwrap_or(0) + 1; 8],
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
                let (c, packed) = c.compress(request.encode_to_vec());
                let props = match c.content_encoding() {
                    Some(e) => BasicProperties::default().with_content_encoding(ShortString::from(e)),
                    None => BasicProperties::default(),
                };
                let otlp = message_body(&props, &packed);
                proptest::prop_assert!(otlp.is_ok());
                let got = rows(&otlp.unwrap_or_default(), "m", &Sampling::default(), &retention);
                proptest::prop_assert_eq!(got.map(|r| r.len()).ok(), Some(spans));
            }
        }
    }
}

/// One journey event, as the events table holds it. `Ingested` is not
/// written: ClickHouse sets it at insert (`DEFAULT now64(3)`), so that the
/// stuck-journey finder can read what arrived since its last look, even
/// from rows that waited in a retried batch.
#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
#[serde(rename_all = "PascalCase")]
pub struct EventRow {
    pub journey: String,
    pub key: String,
    pub status: String,
    /// The span's start, nanoseconds since the epoch.
    pub time: i64,
    pub service: String,
    pub span_name: String,
    pub trace_id: String,
    pub span_id: String,
    pub error: u8,
    pub kept: u8,
    pub rule: String,
    pub captured: Vec<(String, String)>,
    pub message_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not a JourneyEvents batch: {0}")]
pub struct UndecodableEvents(pub String);

/// The rows of one journey events message.
pub fn event_rows(body: &[u8], message_id: &str) -> Result<Vec<EventRow>, UndecodableEvents> {
    let events = tailgate_contract::journey::JourneyEvents::decode(body)
        .map_err(|e| UndecodableEvents(e.to_string()))?
        .resolve()
        .map_err(UndecodableEvents)?;
    Ok(events
        .into_iter()
        .map(|e| EventRow {
            journey: e.journey,
            key: e.key,
            status: e.status,
            time: nanos(e.time_unix_nano),
            service: e.service,
            span_name: e.span_name,
            trace_id: hex(&e.trace_id),
            span_id: hex(&e.span_id),
            error: u8::from(e.error),
            kept: u8::from(e.kept),
            rule: e.rule,
            captured: e.captured.into_iter().map(|c| (c.field, c.value)).collect(),
            message_id: message_id.to_owned(),
        })
        .collect())
}
