//! The connections of a listening port, held to limits that no client can
//! stretch, on every port of every process (OTLP/gRPC, OTLP/HTTP, cluster,
//! admin):
//!
//! - at most `max_connections` at once; more wait in the kernel's accept
//!   queue until one closes;
//! - a new connection must send its first 24 bytes (an HTTP/2 client
//!   preface is exactly that long; an HTTP/1 request line is longer) within
//!   `header_read_timeout`; hyper then holds HTTP/1 request headers, and an
//!   idle keep-alive connection, to the same limit;
//! - HTTP/2 keep-alive pings close a connection whose peer stopped answering.
//!
//! A request body's own deadline is the handler's (`body_read_timeout`),
//! since only it knows when the body is complete.

use futures_util::{Stream, StreamExt};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tracing::error;

/// The length of the HTTP/2 client connection preface.
const PREFACE_BYTES: usize = 24;
/// The wait after an accept error that is the listener's, not one client's.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// An error of one connection (reset before it was accepted): the next
/// accept may go through at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// What one port allows each connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Accepted connections, each once a slot is free (for a tonic server,
/// which skips accept errors, and for [`serve`]).
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = std::io::Result<Slotted>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| async move {
        let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
        let accepted = listener.accept().await;
        if let Err(e) = &accepted
            && !is_connection_error(e)
        {
            // Out of file descriptors, say: accepting again at once would
            // only spin. Wait for connections to close, as hyper and axum do.
            error!(error = %e, "cannot accept connections; retrying in 1 s");
            tokio::time::sleep(ACCEPT_RETRY).await;
        }
        let accepted = accepted.map(|(stream, _)| Slotted {
            stream,
            _slot: slot,
            first_bytes: Some((
                PREFACE_BYTES,
                Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            )),
        });
        Some((accepted, (listener, slots)))
    })
}

/// Serves `router` (OTLP/HTTP, HTTP/1 or HTTP/2) on `listener` until
/// `stopped` resolves; then stops accepting, closes idle connections, and
/// returns once the connections still serving a request have finished (the
/// caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    stopped: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let graceful = GracefulShutdown::new();
    let connections = incoming(listener, limits);
    tokio::pin!(connections, stopped);
    loop {
        let connection = tokio::select! {
            next = connections.next() => match next {
                Some(Ok(connection)) => connection,
                // Already logged and waited for by `incoming`, where it mattered.
                Some(Err(_)) => continue,
                None => break,
            },
            () = &mut stopped => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(connection), service)
            .into_owned();
        let served = graceful.watch(served);
        // Errors here are one client's (a reset, a timeout): already answered or closed.
        tokio::spawn(async move { drop(served.await) });
    }
    graceful.shutdown().await;
    Ok(())
}

/// A connection that holds one of its port's slots until it closes, and is
/// closed if its first bytes do not come in time.
#[derive(Debug)]
pub struct Slotted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until this many bytes have arrived: the deadline for them.
    first_bytes: Option<(usize, Pin<Box<Sleep>>)>,
}

// For a tonic server's `serve_with_incoming` (the gateway's gRPC ports).
#[cfg(feature = "grpc")]
impl tonic::transport::server::Connected for Slotted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Slotted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some((left, deadline)) = &mut this.first_bytes {
            match &read {
                Poll::Ready(Ok(())) => {
                    *left = left.saturating_sub(buf.filled().len() - before);
                    if *left == 0 {
                        this.first_bytes = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing, or too little to start a request, in time",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
