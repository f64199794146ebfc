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

use crate::pipeline::{Accepted, Refusal};
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
            ReceiveError::Refused(_) => "pushback",
        }
    }
}

pub fn decode_protobuf(body: &[u8]) -> Result<ExportTraceServiceRequest, ReceiveError> {
    ExportTraceServiceRequest::decode(body).map_err(|e| ReceiveError::Malformed(e.to_string()))
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
