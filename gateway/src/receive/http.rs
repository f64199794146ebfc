//! OTLP/HTTP `POST /v1/traces`, protobuf or JSON, optionally gzip-compressed.
//!
//! The body limit is applied after decompression, so a small compressed
//! body cannot expand past `receiver.max_request_bytes`. Answers are in the
//! request's encoding: an `ExportTraceServiceResponse`, or a `google.rpc.Status`
//! with a message for errors, as the OTLP specification asks.

use super::{ReceiveError, accepted_outcome, response, route_json, route_protobuf};
use crate::{
    metrics::Metrics,
    pipeline::{Pipeline, Refusal},
};
use axum::{
    Router,
    body::Body,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prost::Message;
use std::{sync::Arc, time::Duration};
use tower_http::decompression::RequestDecompressionLayer;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn protocol(self) -> &'static str {
        match self {
            Encoding::Protobuf => "http_protobuf",
            Encoding::Json => "http_json",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => PROTOBUF,
            Encoding::Json => JSON,
        }
    }

    fn of(headers: &HeaderMap) -> Result<Self, ReceiveError> {
        let value = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            PROTOBUF | "application/protobuf" => Ok(Encoding::Protobuf),
            JSON => Ok(Encoding::Json),
            _ => Err(ReceiveError::UnsupportedMediaType(value.to_owned())),
        }
    }
}

/// `google.rpc.Status`, the body of an OTLP/HTTP error answer.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, Debug)]
struct Receiver {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
    body_read_timeout: Duration,
}

pub fn router(
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
    body_read_timeout: Duration,
) -> Router {
    Router::new()
        .route("/v1/traces", post(export))
        .with_state(Receiver {
            pipeline,
            metrics,
            max_request_bytes,
            body_read_timeout,
        })
        // The limit is enforced in `export`, after decompression, with an OTLP answer.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestDecompressionLayer::new())
}

async fn export(State(r): State<Receiver>, headers: HeaderMap, body: Body) -> Response {
    let encoding = match Encoding::of(&headers) {
        Ok(encoding) => encoding,
        Err(err) => return r.fail("http", Encoding::Json, err),
    };
    let protocol = encoding.protocol();
    // A client that sends its body slowly holds a connection and memory:
    // the whole body must be in within the deadline.
    let read = Limited::new(body, r.max_request_bytes).collect();
    let Ok(read) = tokio::time::timeout(r.body_read_timeout, read).await else {
        let err = ReceiveError::SlowBody(r.body_read_timeout);
        return r.fail(protocol, encoding, err);
    };
    let bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return r.fail(
                protocol,
                encoding,
                ReceiveError::TooLarge {
                    limit: r.max_request_bytes,
                },
            );
        }
        Err(e) => {
            let err = ReceiveError::Malformed(format!("cannot read the request body: {e}"));
            return r.fail(protocol, encoding, err);
        }
    };
    let routed = match encoding {
        Encoding::Protobuf => route_protobuf(&bytes),
        Encoding::Json => route_json(&bytes),
    };
    let accepted = match routed.and_then(|routed| Ok(r.pipeline.ingest(routed, protocol)?)) {
        Ok(accepted) => accepted,
        Err(err) => return r.fail(protocol, encoding, err),
    };
    r.metrics
        .receiver
        .request(protocol, accepted_outcome(&accepted));
    let answer = response(&accepted);
    let body = match encoding {
        Encoding::Protobuf => answer.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&answer).unwrap_or_default(),
    };
    ([(header::CONTENT_TYPE, encoding.content_type())], body).into_response()
}

impl Receiver {
    fn fail(&self, protocol: &'static str, encoding: Encoding, err: ReceiveError) -> Response {
        self.metrics.receiver.request(protocol, err.outcome());
        let (status, grpc_code) = match &err {
            ReceiveError::Malformed(_) => (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument),
            ReceiveError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                tonic::Code::ResourceExhausted,
            ),
            ReceiveError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                tonic::Code::InvalidArgument,
            ),
            ReceiveError::Refused(Refusal::BufferFull { .. }) => (
                StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::ResourceExhausted,
            ),
            ReceiveError::Refused(_) => (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable),
            ReceiveError::SlowBody(_) => {
                (StatusCode::REQUEST_TIMEOUT, tonic::Code::DeadlineExceeded)
            }
        };
        let rpc = RpcStatus {
            code: grpc_code as i32,
            message: err.to_string(),
        };
        let body = match encoding {
            Encoding::Protobuf => rpc.encode_to_vec(),
            Encoding::Json => serde_json::to_vec(&serde_json::json!({
                "code": rpc.code,
                "message": rpc.message,
            }))
            .unwrap_or_default(),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, encoding.content_type())],
            body,
        )
            .into_response();
        if let ReceiveError::Refused(refusal) = &err {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(refusal.retry_after().as_secs().max(1)),
            );
        }
        response
    }
}
