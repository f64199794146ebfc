//! Traces of the order pipeline (shop → CRM → RabbitMQ → MES), and the three
//! ways a client sends them.

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_client::TraceServiceClient,
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prost::Message;
use std::time::{SystemTime, UNIX_EPOCH};

/// A deterministic, well-spread 16-byte trace ID for (seed, n).
pub fn trace_id(seed: u64, n: u64) -> [u8; 16] {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let a = splitmix(seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407));
    let b = splitmix(a);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes());
    id
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// One span of an order trace; `span` 1 is the root.
#[derive(Clone, Debug)]
pub struct OrderSpan {
    pub service: &'static str,
    pub span: Span,
}

/// An order trace: shop-api (root) → crm-api → mes-api, with `order.id`
/// on every span. `duration_ms` is the root's length; `failing_status`
/// marks the MES span as an error with that message.
pub fn order_trace(id: [u8; 16], duration_ms: u64, failing_status: Option<&str>) -> Vec<OrderSpan> {
    let start = now_ns();
    let end = start + duration_ms * 1_000_000;
    let order = format!("ord-{}", hex(&id[..4]));
    let make =
        |n: u8, parent: Option<u8>, service, name: &str, kind: SpanKind, error: Option<&str>| {
            OrderSpan {
                service,
                span: Span {
                    trace_id: id.to_vec(),
                    span_id: vec![n; 8],
                    parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
                    name: name.into(),
                    kind: kind as i32,
                    start_time_unix_nano: start + u64::from(n - 1) * 1_000,
                    end_time_unix_nano: end - u64::from(n - 1) * 1_000,
                    attributes: vec![kv("order.id", &order)],
                    status: Some(Status {
                        code: if error.is_some() {
                            StatusCode::Error
                        } else {
                            StatusCode::Ok
                        } as i32,
                        message: error.unwrap_or_default().into(),
                    }),
                    ..Default::default()
                },
            }
        };
    vec![
        make(1, None, "shop-api", "POST /orders", SpanKind::Server, None),
        make(
            2,
            Some(1),
            "crm-api",
            "crm.create_order",
            SpanKind::Internal,
            None,
        ),
        make(
            3,
            Some(2),
            "mes-api",
            "mes.calculate_price",
            SpanKind::Consumer,
            failing_status,
        ),
    ]
}

/// One export request holding the given spans, grouped by service.
pub fn request(spans: &[OrderSpan]) -> ExportTraceServiceRequest {
    let mut resource_spans: Vec<ResourceSpans> = Vec::new();
    for s in spans {
        let resource = Resource {
            attributes: vec![
                kv("service.name", s.service),
                kv("deployment.environment", "test"),
            ],
            ..Default::default()
        };
        match resource_spans
            .iter_mut()
            .find(|r| r.resource.as_ref() == Some(&resource))
        {
            Some(r) => r.scope_spans[0].spans.push(s.span.clone()),
            None => resource_spans.push(ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "order-pipeline".into(),
                        version: "1.0".into(),
                        ..Default::default()
                    }),
                    spans: vec![s.span.clone()],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }),
        }
    }
    ExportTraceServiceRequest { resource_spans }
}

pub async fn send_http_protobuf(url: &str, req: &ExportTraceServiceRequest) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(req.encode_to_vec())
        .send()
        .await
        .expect("http send")
}

pub async fn send_http_json(url: &str, req: &ExportTraceServiceRequest) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(req).expect("json"))
        .send()
        .await
        .expect("http send")
}

pub async fn send_grpc(
    url: &str,
    req: ExportTraceServiceRequest,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    let mut client = TraceServiceClient::connect(url.to_owned())
        .await
        .expect("grpc connect")
        .max_encoding_message_size(usize::MAX);
    client.export(req).await.map(tonic::Response::into_inner)
}

/// Sends arbitrary bytes as the gRPC Export request, to test malformed input.
pub async fn send_grpc_raw(url: &str, body: bytes::Bytes) -> Result<(), tonic::Status> {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    struct Raw;
    struct Enc;
    struct Dec;
    impl Encoder for Enc {
        type Item = bytes::Bytes;
        type Error = tonic::Status;
        fn encode(
            &mut self,
            item: bytes::Bytes,
            dst: &mut EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            bytes::BufMut::put(dst, item);
            Ok(())
        }
    }
    impl Decoder for Dec {
        type Item = ();
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
            bytes::Buf::advance(src, bytes::Buf::remaining(src));
            Ok(Some(()))
        }
    }
    impl Codec for Raw {
        type Encode = bytes::Bytes;
        type Decode = ();
        type Encoder = Enc;
        type Decoder = Dec;
        fn encoder(&mut self) -> Enc {
            Enc
        }
        fn decoder(&mut self) -> Dec {
            Dec
        }
    }

    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(|_| ())
}
