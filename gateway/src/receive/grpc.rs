//! OTLP/gRPC `TraceService/Export`.
//!
//! The service is written against tonic's server machinery directly rather
//! than the generated `TraceServiceServer`, because the generated codec
//! reports protobuf decode errors as INTERNAL; OTLP wants INVALID_ARGUMENT
//! for a malformed request, so the codec hands over raw bytes and decoding
//! happens in [`super::route_protobuf`], shared with the HTTP receiver.

use super::{ReceiveError, accepted_outcome, response, route_protobuf};
use crate::grpc_raw::RawCodec;
use crate::{metrics::Metrics, pipeline::Pipeline};
use bytes::Bytes;
use prost::Message;
use std::{convert::Infallible, sync::Arc, time::Duration};
use tonic::{
    Code, Status,
    codec::CompressionEncoding,
    codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http},
    server::{Grpc, NamedService, UnaryService},
};
use tonic_types::{ErrorDetails, StatusExt};

const PROTOCOL: &str = "grpc";
const SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl From<ReceiveError> for Status {
    fn from(err: ReceiveError) -> Self {
        let message = err.to_string();
        match err {
            ReceiveError::Malformed(_) | ReceiveError::UnsupportedMediaType(_) => {
                Status::invalid_argument(message)
            }
            ReceiveError::TooLarge { .. } => Status::resource_exhausted(message),
            ReceiveError::SlowBody(_) => Status::deadline_exceeded(message),
            ReceiveError::Refused(refusal) => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(refusal.retry_after())),
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TraceService {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
    body_read_timeout: Duration,
}

impl TraceService {
    pub fn new(
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        max_request_bytes: usize,
        body_read_timeout: Duration,
    ) -> Self {
        Self {
            pipeline,
            metrics,
            max_request_bytes,
            body_read_timeout,
        }
    }

    fn export(&self, body: &[u8]) -> Result<Bytes, ReceiveError> {
        let routed = route_protobuf(body)?;
        let accepted = self.pipeline.ingest(routed, PROTOCOL)?;
        self.metrics
            .receiver
            .request(PROTOCOL, accepted_outcome(&accepted));
        Ok(Bytes::from(response(&accepted).encode_to_vec()))
    }
}

impl NamedService for TraceService {
    const NAME: &'static str = SERVICE;
}

impl UnaryService<Bytes> for TraceService {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Self::Response>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let result = self.export(request.get_ref()).map_err(|err| {
            self.metrics.receiver.request(PROTOCOL, err.outcome());
            Status::from(err)
        });
        Box::pin(async move { result.map(tonic::Response::new) })
    }
}

impl<B> Service<http::Request<B>> for TraceService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT_PATH {
            return Box::pin(
                async move { Ok(Status::unimplemented("unknown method").into_http()) },
            );
        }
        let service = self.clone();
        let metrics = Arc::clone(&self.metrics);
        let limit = self.body_read_timeout;
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(service.max_request_bytes);
            // A client that sends its message slowly holds a stream and
            // memory: the whole request must be in within the deadline.
            let Ok(mut response) = tokio::time::timeout(limit, grpc.unary(service, req)).await
            else {
                metrics.receiver.request(PROTOCOL, "timeout");
                return Ok(Status::from(ReceiveError::SlowBody(limit)).into_http());
            };
            // tonic reports a message over the decoding limit as OUT_OF_RANGE
            // (its decompression limit already says RESOURCE_EXHAUSTED); the
            // export handler never returns OUT_OF_RANGE, so this is the limit.
            let status = response.headers().get("grpc-status");
            if status.is_some_and(|s| s.as_bytes() == b"11") {
                metrics.receiver.request(PROTOCOL, "too_large");
                response.headers_mut().insert(
                    "grpc-status",
                    http::HeaderValue::from(Code::ResourceExhausted as i32),
                );
            }
            Ok(response)
        })
    }
}
