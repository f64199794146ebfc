//! Traces of the order pipeline (shop-api → crm-api → RabbitMQ → mes-api →
//! MES database), pre-encoded as the OTLP requests each service's exporter
//! would send: one request per service per batch of traces, so a trace's
//! spans arrive in several requests, as they do in production.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prost::Message;

/// The services of the order pipeline, in call order; span `s` of a trace
/// belongs to service `s % 5`, so span 0 (the root) is shop-api's.
pub const SERVICES: [&str; 5] = ["shop-api", "crm-api", "rabbitmq", "mes-api", "mes-db"];

const STEPS: [(&str, SpanKind); 5] = [
    ("POST /api/v1/orders/{id}/status", SpanKind::Server),
    ("PUT /crm/orders/{id}", SpanKind::Server),
    ("orders.status publish", SpanKind::Producer),
    ("orders.status process", SpanKind::Consumer),
    ("UPDATE orders SET status", SpanKind::Client),
];

const STATUSES: [&str; 4] = [
    "PRICE_CALCULATED",
    "MANUFACTURING_APPROVED",
    "MANUFACTURING_STARTED",
    "SHIPPED",
];

/// Knobs of the generated load.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub spans_per_trace: u32,
    pub attributes_per_span: u32,
    /// Length of each attribute value.
    pub attribute_bytes: usize,
    /// Share of traces with an error span.
    pub error_share: f64,
    /// Share of traces whose root lasts 2 s (slow for the default policy).
    pub slow_share: f64,
    /// Share of traces that get one more span after their decision.
    pub late_share: f64,
    /// Share of traces with `long_spans` spans instead of `spans_per_trace`.
    pub long_share: f64,
    pub long_spans: u32,
    /// Share of traces with `giant_spans` spans (beyond the gateway's per-trace limit by default).
    pub giant_share: f64,
    pub giant_spans: u32,
    /// Traces per batch; each batch becomes one request per service.
    pub traces_per_batch: u32,
    /// Start time of trace 0; traces start 1 ms apart. Recent by default, so
    /// that ClickHouse's retention does not delete the rows at once.
    pub epoch_unix_nano: u64,
}

impl Default for Workload {
    /// Ten-span traces of about 300 encoded bytes per span, 2% errors, 1%
    /// slow, 1% with a late span.
    fn default() -> Self {
        Self {
            spans_per_trace: 10,
            attributes_per_span: 5,
            attribute_bytes: 22,
            error_share: 0.02,
            slow_share: 0.01,
            late_share: 0.01,
            long_share: 0.0,
            long_spans: 200,
            giant_share: 0.0,
            giant_spans: 20_000,
            traces_per_batch: 100,
            epoch_unix_nano: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0))
                .saturating_sub(3_600_000_000_000),
        }
    }
}

/// A well-spread trace ID for trace number `n`.
pub fn trace_id(n: u64) -> [u8; 16] {
    let a = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD6E8_FEB8_6659_FD93;
    let b = a.rotate_left(29).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes());
    id
}

/// A uniform number in [0, 1) derived from trace `n` and a purpose, so the
/// corpus is the same on every run.
fn unit(n: u64, purpose: u64) -> f64 {
    let mut z = n ^ purpose.wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

pub fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

fn span_id(trace: u64, s: u32) -> Vec<u8> {
    ((trace.wrapping_mul(1_000_003) ^ ((u64::from(s) + 1) << 40)) | 1)
        .to_be_bytes()
        .to_vec()
}

/// What the workload makes of trace `n`.
#[derive(Debug, Clone, Copy)]
pub struct TraceShape {
    pub spans: u32,
    pub error: bool,
    pub slow: bool,
    pub late: bool,
}

impl Workload {
    pub fn shape(&self, n: u64) -> TraceShape {
        let size = unit(n, 4);
        let spans = if size < self.giant_share {
            self.giant_spans
        } else if size < self.giant_share + self.long_share {
            self.long_spans
        } else {
            self.spans_per_trace
        };
        TraceShape {
            spans: spans.max(1),
            error: unit(n, 1) < self.error_share,
            slow: unit(n, 2) < self.slow_share,
            late: unit(n, 3) < self.late_share,
        }
    }

    /// Span `s` of trace `n`; `s == spans` is the late span.
    pub fn span(&self, n: u64, shape: TraceShape, s: u32) -> Span {
        let start = self.epoch_unix_nano + (n % 3_600_000) * 1_000_000 + u64::from(s) * 1_000;
        let root_ns: u64 = if shape.slow {
            2_000_000_000
        } else {
            50_000_000
        };
        let (name, kind) = STEPS[s as usize % STEPS.len()];
        let error = shape.error && s + 1 == shape.spans;
        let pad = |prefix: &str| {
            let mut v = format!("{prefix}-{n:08}");
            v.truncate(self.attribute_bytes);
            while v.len() < self.attribute_bytes {
                v.push('x');
            }
            v
        };
        let attributes = (0..self.attributes_per_span)
            .map(|a| match a {
                0 => kv("order.id", pad("ord")),
                1 => kv("order.status", STATUSES[(n % 4) as usize].to_owned()),
                2 => kv("user.id", pad("user")),
                3 => kv("messaging.rabbitmq.routing_key", pad("orders.status")),
                a => kv(&format!("app.attr.{a}"), pad("value")),
            })
            .collect();
        Span {
            trace_id: trace_id(n).to_vec(),
            span_id: span_id(n, s),
            parent_span_id: if s == 0 { Vec::new() } else { span_id(n, 0) },
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + if s == 0 { root_ns } else { 10_000_000 },
            attributes,
            status: Some(Status {
                code: if error {
                    StatusCode::Error
                } else {
                    StatusCode::Ok
                } as i32,
                message: if error {
                    "order stuck: MES rejected".into()
                } else {
                    String::new()
                },
            }),
            ..Default::default()
        }
    }
}

/// One request per service that has spans, in service order.
pub fn by_service(spans: Vec<(usize, Span)>) -> Vec<(usize, ExportTraceServiceRequest)> {
    let mut groups: Vec<Vec<Span>> = vec![Vec::new(); SERVICES.len()];
    for (service, span) in spans {
        groups[service].push(span);
    }
    groups
        .into_iter()
        .enumerate()
        .filter(|(_, spans)| !spans.is_empty())
        .map(|(service, spans)| (service, service_request(service, spans)))
        .collect()
}

pub fn service_request(service: usize, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", SERVICES[service].to_owned()),
                    kv("deployment.environment", "prod".to_owned()),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "order-pipeline".into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// An encoded export request and where its trace IDs sit, so the same bytes
/// can be sent again as new traces.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub body: Vec<u8>,
    pub spans: u64,
    /// Byte offsets of every span's 16-byte trace ID in `body`.
    pub trace_id_offsets: Vec<usize>,
    /// Whether this request holds root spans.
    pub has_roots: bool,
}

impl Encoded {
    pub fn new(request: &ExportTraceServiceRequest) -> Self {
        let body = request.encode_to_vec();
        let mut offsets = Vec::new();
        let mut has_roots = false;
        let mut from = 0;
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            has_roots |= span.parent_span_id.is_empty();
            // Spans are encoded in order, so each ID is found after the last.
            let at = body[from..]
                .windows(16)
                .position(|w| w == span.trace_id.as_slice())
                .map(|p| p + from);
            if let Some(at) = at {
                offsets.push(at);
                from = at + 16;
            }
        }
        Self {
            spans: offsets.len() as u64,
            body,
            trace_id_offsets: offsets,
            has_roots,
        }
    }

    /// The body with every trace ID changed for pass `pass` of the corpus:
    /// pass 0 is the body as generated; each later pass holds new traces.
    pub fn body_for_pass(&self, pass: u64) -> Vec<u8> {
        let mut body = self.body.clone();
        if pass > 0 {
            let salt = trace_id(pass ^ (0x5A17_u64 << 48));
            for &at in &self.trace_id_offsets {
                for (b, s) in body[at..at + 16].iter_mut().zip(salt) {
                    *b ^= s;
                }
            }
        }
        body
    }
}

/// One batch of traces: its requests per service, and the late spans to
/// send after the batch's decision.
#[derive(Debug, Clone)]
pub struct Batch {
    pub requests: Vec<Encoded>,
    pub late: Option<Encoded>,
}

/// The pre-encoded corpus: `batches` batches of `traces_per_batch` traces.
pub fn corpus(workload: &Workload, batches: u32) -> Vec<Batch> {
    let per = u64::from(workload.traces_per_batch.max(1));
    (0..u64::from(batches))
        .map(|b| {
            let mut spans = Vec::new();
            let mut late = Vec::new();
            for n in b * per..(b + 1) * per {
                let shape = workload.shape(n);
                for s in 0..shape.spans {
                    spans.push((s as usize % SERVICES.len(), workload.span(n, shape, s)));
                }
                if shape.late {
                    late.push(workload.span(n, shape, shape.spans));
                }
            }
            Batch {
                requests: by_service(spans)
                    .iter()
                    .map(|(_, r)| Encoded::new(r))
                    .collect(),
                late: (!late.is_empty()).then(|| Encoded::new(&service_request(3, late))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use std::collections::HashSet;

    fn ids(body: &[u8]) -> Vec<Vec<u8>> {
        ExportTraceServiceRequest::decode(body)
            .unwrap()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.trace_id.clone())
            .collect()
    }

    /// Every span's trace ID is found, spans are about 300 bytes, and a
    /// later pass renames every trace consistently across the batch's requests.
    #[test]
    fn passes_rename_traces_consistently() {
        let batch = &corpus(&Workload::default(), 1)[0];
        let spans: u64 = batch.requests.iter().map(|r| r.spans).sum();
        assert_eq!(spans, 1000);
        let bytes: usize = batch.requests.iter().map(|r| r.body.len()).sum();
        let per_span = bytes as u64 / spans;
        assert!((250..=330).contains(&per_span), "{per_span} bytes per span");
        let pass0: HashSet<_> = batch.requests.iter().flat_map(|r| ids(&r.body)).collect();
        let pass1: HashSet<_> = batch
            .requests
            .iter()
            .flat_map(|r| ids(&r.body_for_pass(1)))
            .collect();
        assert_eq!(pass0.len(), 100);
        assert_eq!(pass1.len(), 100);
        assert!(pass0.is_disjoint(&pass1));
        assert!(batch.requests[0].has_roots && !batch.requests[1].has_roots);
    }

    /// Shares of the knobs come out as asked, and the late spans belong to traces of the batch.
    #[test]
    fn shares_follow_the_knobs() {
        let w = Workload {
            error_share: 0.1,
            slow_share: 0.2,
            late_share: 0.3,
            long_share: 0.05,
            long_spans: 20,
            ..Workload::default()
        };
        let shapes: Vec<_> = (0..10_000).map(|n| w.shape(n)).collect();
        let share = |f: &dyn Fn(&TraceShape) -> bool| {
            shapes.iter().filter(|s| f(s)).count() as f64 / shapes.len() as f64
        };
        assert!((share(&|s| s.error) - 0.1).abs() < 0.02);
        assert!((share(&|s| s.slow) - 0.2).abs() < 0.02);
        assert!((share(&|s| s.late) - 0.3).abs() < 0.02);
        assert!((share(&|s| s.spans == 20) - 0.05).abs() < 0.01);
        let batch = &corpus(&w, 1)[0];
        let traces: HashSet<_> = batch.requests.iter().flat_map(|r| ids(&r.body)).collect();
        let late = batch.late.as_ref().unwrap();
        assert!(ids(&late.body).iter().all(|id| traces.contains(id)));
    }
}
