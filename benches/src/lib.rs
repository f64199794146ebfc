//! Shared load corpus for Tailgate's benchmarks: traces of the order
//! pipeline with spans of about 300 encoded bytes, like the targets assume.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, status::StatusCode},
};

const SERVICES: [&str; 5] = ["shop-api", "crm-api", "rabbitmq", "mes-api", "mes-db"];

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
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

/// One request holding `traces` whole traces of `spans_per_trace` spans,
/// starting at trace number `first`; every 50th trace has an error.
pub fn request(first: u64, traces: u64, spans_per_trace: u8) -> ExportTraceServiceRequest {
    let mut by_service: Vec<Vec<Span>> = vec![Vec::new(); SERVICES.len()];
    for t in first..first + traces {
        let id = trace_id(t);
        for s in 0..spans_per_trace {
            let error = t % 50 == 0 && s == spans_per_trace - 1;
            let start = 1_700_000_000_000_000_000 + t * 1_000_000;
            by_service[usize::from(s) % SERVICES.len()].push(Span {
                trace_id: id.to_vec(),
                span_id: (t * 100 + u64::from(s) + 1).to_be_bytes().to_vec(),
                parent_span_id: if s == 0 {
                    Vec::new()
                } else {
                    (t * 100 + 1).to_be_bytes().to_vec()
                },
                name: format!("order.step.{s}"),
                kind: 2,
                start_time_unix_nano: start + u64::from(s) * 1000,
                end_time_unix_nano: start + 50_000_000 - u64::from(s) * 1000,
                attributes: vec![
                    kv("order.id", &format!("ord-{t:08}")),
                    kv("order.status", "MANUFACTURING_APPROVED"),
                    kv("http.route", "/api/v1/orders/{id}/status"),
                    kv("messaging.rabbitmq.routing_key", "orders.status.changed"),
                    kv("user.id", &format!("user-{:06}", t % 100_000)),
                ],
                status: Some(Status {
                    code: if error {
                        StatusCode::Error
                    } else {
                        StatusCode::Ok
                    } as i32,
                    message: String::new(),
                }),
                ..Default::default()
            });
        }
    }
    ExportTraceServiceRequest {
        resource_spans: SERVICES
            .iter()
            .zip(by_service)
            .map(|(service, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", service),
                        kv("deployment.environment", "prod"),
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
            })
            .collect(),
    }
}
