//! Stage 1, receive: OTLP over gRPC and HTTP (protobuf and JSON).
//!
//! Both receivers decode in the same place and answer the same way: a
//! malformed request is INVALID_ARGUMENT / 400, one over the size limit is
//! RESOURCE_EXHAUSTED / 413, each with a message saying what was wrong; a
//! request the node has no room for is refused with the retryable answers
//! of the OTLP specification (UNAVAILABLE with RetryInfo, 429/503 with
//! Retry-After), so the client keeps it and tries again.

pub mod grpc;
pub mod http;

use crate::{
    pipeline::{Accepted, Refusal},
    route::{self, Routed},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Permanent: the client must not retry the same bytes.
    #[error("malformed OTLP request: {0}")]
    Malformed(String),
    /// Permanent: the request is larger than `receiver.max_request_bytes`.
    #[error("request body exceeds the limit of {limit} bytes (receiver.max_request_bytes)")]
    TooLarge { limit: usize },
    /// Retryable: the body did not arrive within `receiver.body_read_timeout_secs`.
    #[error("the request body did not arrive within {0:?} (receiver.body_read_timeout_secs)")]
    SlowBody(std::time::Duration),
    /// Permanent: neither protobuf nor JSON.
    #[error("unsupported content type {0:?}; send application/x-protobuf or application/json")]
    UnsupportedMediaType(String),
    /// Retryable: no room now.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

impl ReceiveError {
    /// The `outcome` label of `tailgate_receiver_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ReceiveError::Malformed(_) => "invalid",
            ReceiveError::TooLarge { .. } => "too_large",
            ReceiveError::UnsupportedMediaType(_) => "unsupported",
            ReceiveError::SlowBody(_) => "timeout",
            ReceiveError::Refused(_) => "pushback",
        }
    }
}

/// Checks a protobuf request and splits it by trace (stage 2), without
/// decoding its spans; a request prost would not decode is malformed.
pub fn route_protobuf(body: &[u8]) -> Result<Routed, ReceiveError> {
    route::split(body).map_err(|e| ReceiveError::Malformed(e.to_string()))
}

/// OTLP/JSON is decoded, then encoded, and takes the protobuf path from there.
pub fn route_json(body: &[u8]) -> Result<Routed, ReceiveError> {
    route_protobuf(&decode_json(body)?.encode_to_vec())
}

pub fn decode_json(body: &[u8]) -> Result<ExportTraceServiceRequest, ReceiveError> {
    serde_json::from_slice(body).map_err(|e| ReceiveError::Malformed(e.to_string()))
}

/// The OTLP response: `partial_success` only when some spans were rejected.
pub fn response(accepted: &Accepted) -> ExportTraceServiceResponse {
    ExportTraceServiceResponse {
        partial_success: (accepted.rejected_spans > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(accepted.rejected_spans).unwrap_or(i64::MAX),
            error_message: accepted.rejection.clone().unwrap_or_default(),
        }),
    }
}

/// Outcome label for an accepted request.
pub fn accepted_outcome(accepted: &Accepted) -> &'static str {
    if accepted.rejected_spans > 0 {
        "partial"
    } else {
        "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OTLP/JSON as the specification writes it (hex IDs, lowerCamelCase,
    /// 64-bit integers as strings, enums as numbers) decodes.
    #[test]
    fn spec_json_decodes() {
        let req = decode_json(include_bytes!(
            "../../../tests/fixtures/otlp-spec-example.json"
        ))
        .unwrap();
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.trace_id[0], 0x5b);
        assert_eq!(span.span_id.len(), 8);
        assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(2));
        assert_eq!(span.attributes.len(), 2);
    }

    /// Decode errors say what is wrong.
    #[test]
    fn malformed_input_is_explained() {
        let err = decode_json(br#"{"resourceSpans": 5}"#).unwrap_err();
        assert!(err.to_string().contains("malformed OTLP request"), "{err}");
        let err = route_protobuf(&[0xff, 0xff]).unwrap_err();
        assert!(matches!(err, ReceiveError::Malformed(_)));
        assert!(err.to_string().contains("malformed OTLP request"), "{err}");
    }

    proptest::proptest! {
        /// Fuzz, OTLP/JSON: any text is refused with a message or read,
        /// never a panic; a request written as JSON reads back as itself,
        /// and takes the protobuf path to the same spans.
        #[test]
        fn fuzz_json(
            text in ".{0,300}",
            request in crate::route::tests::arb_request(),
        ) {
            if let Err(err) = route_json(text.as_bytes()) {
                proptest::prop_assert!(!err.to_string().is_empty());
            }
            let json = serde_json::to_vec(&request).unwrap_or_default();
            proptest::prop_assert_eq!(decode_json(&json).ok(), Some(request.clone()));
            let via_json = route_json(&json).map(|r| r.span_count).ok();
            let via_protobuf = route_protobuf(&request.encode_to_vec()).map(|r| r.span_count).ok();
            proptest::prop_assert_eq!(via_json, via_protobuf);
        }
    }
}
