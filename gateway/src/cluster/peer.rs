//! The internal protocol between gateway nodes (default port 4319), gRPC:
//!
//! - `Hello`: liveness and membership. A node says hello to every peer it
//!   knows each `refresh_secs`; being greeted tells a node the sender is
//!   alive and a member, so a new node joins by greeting its seeds. A hello
//!   with `leaving` set removes the sender at once (graceful shutdown).
//! - `Deliver`: spans and decisions for their owner. Spans delivered this way
//!   are always buffered where they arrive, never forwarded again, so two
//!   nodes that briefly disagree about membership cannot bounce spans
//!   between them.

use crate::grpc_raw::RawCodec;
use bytes::Bytes;
use prost::Message;
use std::{convert::Infallible, sync::Arc, time::Duration};
use tonic::{
    Status,
    codec::CompressionEncoding,
    codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http},
    server::{Grpc, NamedService, UnaryService},
    transport::{Channel, Endpoint},
};

const SERVICE: &str = "tailgate.cluster.v1.Peer";
const HELLO: &str = "/tailgate.cluster.v1.Peer/Hello";
const DELIVER: &str = "/tailgate.cluster.v1.Peer/Deliver";

#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    /// The sender's advertised address (its identity).
    #[prost(string, tag = "1")]
    pub from: String,
    #[prost(bool, tag = "2")]
    pub leaving: bool,
}

/// A decision handed to a trace's new owner, so late spans follow it.
#[derive(Clone, PartialEq, Message)]
pub struct HandedDecision {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub keep: bool,
    #[prost(string, tag = "3")]
    pub rule: String,
    /// OTEP 235 `th` value, for consistent keeps.
    #[prost(string, optional, tag = "4")]
    pub th: Option<String>,
    #[prost(double, tag = "5")]
    pub adjusted_count: f64,
    #[prost(string, tag = "6")]
    pub root_service: String,
    /// OTEP 235 `rv` value, for keeps by a key's randomness (`sample: {by}`).
    #[prost(string, optional, tag = "7")]
    pub rv: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Delivery {
    #[prost(string, tag = "1")]
    pub from: String,
    /// An encoded `ExportTraceServiceRequest` (wire-compatible with
    /// declaring it as that message), so spans travel without being decoded.
    #[prost(bytes = "bytes", tag = "2")]
    pub spans: Bytes,
    #[prost(message, repeated, tag = "3")]
    pub decisions: Vec<HandedDecision>,
}

/// What a node does with the peer protocol's calls.
pub trait PeerHandler: Send + Sync + 'static {
    fn hello(&self, hello: Hello) -> Hello;
    /// Refusing (no room) makes the sender keep the delivery and retry.
    fn deliver(&self, delivery: Delivery) -> Result<(), Status>;
}

/// The server side, served on the internal port.
pub struct PeerService<H> {
    handler: Arc<H>,
    max_message_bytes: usize,
}

impl<H> Clone for PeerService<H> {
    fn clone(&self) -> Self {
        Self {
            handler: Arc::clone(&self.handler),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

impl<H: PeerHandler> PeerService<H> {
    pub fn new(handler: Arc<H>, max_message_bytes: usize) -> Self {
        Self {
            handler,
            max_message_bytes,
        }
    }
}

impl<H> NamedService for PeerService<H> {
    const NAME: &'static str = SERVICE;
}

struct Call<H> {
    handler: Arc<H>,
    deliver: bool,
}

impl<H: PeerHandler> UnaryService<Bytes> for Call<H> {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let body = request.into_inner();
        let result = if self.deliver {
            Delivery::decode(body)
                .map_err(|e| Status::invalid_argument(format!("bad delivery: {e}")))
                .and_then(|d| self.handler.deliver(d))
                .map(|()| Bytes::new())
        } else {
            Hello::decode(body)
                .map_err(|e| Status::invalid_argument(format!("bad hello: {e}")))
                .map(|h| Bytes::from(self.handler.hello(h).encode_to_vec()))
        };
        Box::pin(async move { result.map(tonic::Response::new) })
    }
}

impl<H, B> Service<http::Request<B>> for PeerService<H>
where
    H: PeerHandler,
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
        let deliver = match req.uri().path() {
            DELIVER => true,
            HELLO => false,
            _ => {
                return Box::pin(
                    async move { Ok(Status::unimplemented("unknown method").into_http()) },
                );
            }
        };
        let call = Call {
            handler: Arc::clone(&self.handler),
            deliver,
        };
        let limit = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec)
                .accept_compressed(CompressionEncoding::Zstd)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(limit);
            Ok(grpc.unary(call, req).await)
        })
    }
}

/// A connection to one peer (connected lazily, reconnected by tonic).
#[derive(Clone, Debug)]
pub struct PeerClient {
    channel: Channel,
}

/// How long a call to a peer may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl PeerClient {
    pub fn new(addr: &str) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        Ok(Self { channel })
    }

    async fn call(&self, path: &'static str, body: Bytes, compress: bool) -> Result<Bytes, Status> {
        let mut grpc =
            tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(1 << 20);
        if compress {
            grpc = grpc.send_compressed(CompressionEncoding::Zstd);
        }
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("peer not reachable: {e}")))?;
        let path = http::uri::PathAndQuery::from_static(path);
        grpc.unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn hello(&self, hello: &Hello) -> Result<Hello, Status> {
        let reply = self
            .call(HELLO, Bytes::from(hello.encode_to_vec()), false)
            .await?;
        Hello::decode(reply).map_err(|e| Status::internal(format!("bad hello reply: {e}")))
    }

    pub async fn deliver(&self, delivery: &Delivery) -> Result<(), Status> {
        self.call(DELIVER, Bytes::from(delivery.encode_to_vec()), true)
            .await
            .map(|_| ())
    }
}
