//! The load generator: sends a pre-encoded corpus to gateway nodes over OTLP
//! gRPC or HTTP through K connections, at a target rate or unthrottled, and
//! counts what was accepted and what was pushed back.
//!
//! Connection `k` talks to node `k % nodes` and the requests of a batch are
//! taken by different connections, so a trace's spans reach several nodes,
//! as they do when each service's exporter has its own gateway connection.
//! A pushed-back request is retried, as an OTLP exporter would, until the
//! run's end; what is still refused then is reported as abandoned.

use crate::corpus::{Batch, Encoded};
use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::time::{Instant, sleep, sleep_until};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub protocol: Protocol,
    /// One address per gateway node: its gRPC or its HTTP listener.
    pub targets: Vec<SocketAddr>,
    pub connections: usize,
    /// Spans per second over all connections; `None` sends as fast as accepted.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Pass number of the corpus's first pass: runs against the same gateways
    /// need different ones, or their traces would be late spans of the last run's.
    pub first_pass: u64,
    /// Stop after offering this many spans (late spans aside), even before `duration`.
    pub max_spans: Option<u64>,
    /// How long after its batch's root spans a late span is sent.
    pub late_delay: Duration,
    /// Wait before retrying a pushed-back request, unless the server asks for less.
    pub retry_wait: Duration,
}

/// What a run sent and what came of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub requests: u64,
    /// Distinct spans offered (retries not counted again).
    pub spans_sent: u64,
    pub spans_accepted: u64,
    /// Refused by the server in `partial_success`.
    pub spans_rejected: u64,
    /// Spans whose request was still pushed back or failing when the run ended.
    pub spans_abandoned: u64,
    pub late_spans_sent: u64,
    /// HTTP 429 / 503, gRPC RESOURCE_EXHAUSTED / UNAVAILABLE responses.
    pub pushback_429: u64,
    pub pushback_503: u64,
    pub pushback_resource_exhausted: u64,
    pub pushback_unavailable: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub elapsed: Duration,
}

impl Stats {
    pub fn pushback(&self) -> u64 {
        self.pushback_429
            + self.pushback_503
            + self.pushback_resource_exhausted
            + self.pushback_unavailable
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    spans_sent: AtomicU64,
    spans_accepted: AtomicU64,
    spans_rejected: AtomicU64,
    spans_abandoned: AtomicU64,
    late_spans_sent: AtomicU64,
    pushback: [AtomicU64; 4],
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The kinds of pushback, as indexes of `Counters::pushback`.
#[derive(Clone, Copy)]
enum Pushback {
    Http429,
    Http503,
    ResourceExhausted,
    Unavailable,
}

enum Outcome {
    Accepted {
        rejected: u64,
    },
    Pushback {
        kind: Pushback,
        retry_after: Option<Duration>,
    },
    Failed(String),
}

/// Sends raw request bytes; decodes the export response.
#[derive(Debug, Clone, Copy, Default)]
struct PreEncoded;

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;
    fn encoder(&mut self) -> Self::Encoder {
        PreEncoded
    }
    fn decoder(&mut self) -> Self::Decoder {
        PreEncoded
    }
}

impl Encoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for PreEncoded {
    type Item = ExportTraceServiceResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        ExportTraceServiceResponse::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

enum Client {
    Grpc(tonic::client::Grpc<Channel>),
    Http(reqwest::Client, String),
}

impl Client {
    async fn connect(protocol: Protocol, target: SocketAddr) -> Result<Self, String> {
        match protocol {
            Protocol::Grpc => {
                let channel = Endpoint::from_shared(format!("http://{target}"))
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| format!("connect {target}: {e}"))?;
                Ok(Client::Grpc(tonic::client::Grpc::new(channel)))
            }
            Protocol::Http => {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(Client::Http(client, format!("http://{target}/v1/traces")))
            }
        }
    }

    async fn export(&mut self, body: Vec<u8>) -> Outcome {
        match self {
            Client::Grpc(grpc) => {
                if let Err(e) = grpc.ready().await {
                    return Outcome::Failed(e.to_string());
                }
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                match grpc
                    .unary(tonic::Request::new(Bytes::from(body)), path, PreEncoded)
                    .await
                {
                    Ok(resp) => Outcome::Accepted {
                        rejected: rejected(resp.get_ref()),
                    },
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => Outcome::Pushback {
                        kind: Pushback::ResourceExhausted,
                        retry_after: None,
                    },
                    Err(s) if s.code() == tonic::Code::Unavailable => Outcome::Pushback {
                        kind: Pushback::Unavailable,
                        retry_after: None,
                    },
                    Err(s) => Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            Client::Http(client, url) => {
                let resp = client
                    .post(url.as_str())
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await;
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => return Outcome::Failed(e.to_string()),
                };
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_secs);
                let body = resp.bytes().await.unwrap_or_default();
                match status {
                    200 => Outcome::Accepted {
                        rejected: ExportTraceServiceResponse::decode(body)
                            .map(|r| rejected(&r))
                            .unwrap_or(0),
                    },
                    429 => Outcome::Pushback {
                        kind: Pushback::Http429,
                        retry_after,
                    },
                    503 => Outcome::Pushback {
                        kind: Pushback::Http503,
                        retry_after,
                    },
                    other => {
                        Outcome::Failed(format!("HTTP {other}: {}", String::from_utf8_lossy(&body)))
                    }
                }
            }
        }
    }
}

fn rejected(resp: &ExportTraceServiceResponse) -> u64 {
    resp.partial_success
        .as_ref()
        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
}

/// The corpus flattened into a sequence of requests, repeated pass after pass.
struct Plan {
    batches: Vec<Batch>,
    /// (batch, request) in send order.
    order: Vec<(usize, usize)>,
    /// Spans before each entry of `order`, and in one whole pass.
    spans_before: Vec<u64>,
    spans_per_pass: u64,
    first_pass: u64,
}

impl Plan {
    fn new(batches: Vec<Batch>, first_pass: u64) -> Self {
        let order: Vec<(usize, usize)> = batches
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| (0..batch.requests.len()).map(move |r| (b, r)))
            .collect();
        let mut spans_before = Vec::with_capacity(order.len());
        let mut total = 0;
        for &(b, r) in &order {
            spans_before.push(total);
            total += batches[b].requests[r].spans;
        }
        Self {
            batches,
            order,
            spans_before,
            spans_per_pass: total,
            first_pass,
        }
    }

    /// The `i`th request of the run: (pass, batch, request, spans before it).
    fn item(&self, i: u64) -> (u64, usize, &Encoded, u64) {
        let len = self.order.len() as u64;
        let (pass, at) = (i / len, (i % len) as usize);
        let pass = pass + self.first_pass;
        let (b, r) = self.order[at];
        (
            pass,
            b,
            &self.batches[b].requests[r],
            (pass - self.first_pass) * self.spans_per_pass + self.spans_before[at],
        )
    }
}

struct Shared {
    plan: Plan,
    options: Options,
    next: AtomicU64,
    /// Late requests in due order (their delay is constant): (due, pass, batch).
    late: Mutex<VecDeque<(Instant, u64, usize)>>,
    counters: Counters,
    start: Instant,
}

impl Shared {
    fn next_late(&self, now: Instant, wait: bool) -> Option<(Instant, u64, usize)> {
        let mut late = self.late.lock().unwrap_or_else(|e| e.into_inner());
        match late.front() {
            Some(&(due, _, _)) if wait || due <= now => late.pop_front(),
            _ => None,
        }
    }

    fn fail(&self, error: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .counters
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// Sends one request until it is accepted or `give_up` passes.
async fn send(shared: &Shared, client: &mut Client, body: &Encoded, pass: u64, give_up: Instant) {
    let c = &shared.counters;
    c.spans_sent.fetch_add(body.spans, Ordering::Relaxed);
    loop {
        c.requests.fetch_add(1, Ordering::Relaxed);
        match client.export(body.body_for_pass(pass)).await {
            Outcome::Accepted { rejected } => {
                c.spans_accepted
                    .fetch_add(body.spans - rejected.min(body.spans), Ordering::Relaxed);
                c.spans_rejected.fetch_add(rejected, Ordering::Relaxed);
                return;
            }
            Outcome::Pushback { kind, retry_after } => {
                c.pushback[kind as usize].fetch_add(1, Ordering::Relaxed);
                let wait = retry_after.map_or(shared.options.retry_wait, |r| {
                    r.min(shared.options.retry_wait)
                });
                if Instant::now() + wait > give_up {
                    c.spans_abandoned.fetch_add(body.spans, Ordering::Relaxed);
                    return;
                }
                sleep(wait).await;
            }
            Outcome::Failed(e) => {
                shared.fail(e);
                if Instant::now() + shared.options.retry_wait > give_up {
                    c.spans_abandoned.fetch_add(body.spans, Ordering::Relaxed);
                    return;
                }
                sleep(shared.options.retry_wait).await;
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, k: usize) {
    let target = shared.options.targets[k % shared.options.targets.len()];
    let mut client = match Client::connect(shared.options.protocol, target).await {
        Ok(c) => c,
        Err(e) => return shared.fail(e),
    };
    let deadline = shared.start + shared.options.duration;
    loop {
        let now = Instant::now();
        if let Some((_, pass, b)) = shared.next_late(now, false) {
            if let Some(late) = &shared.plan.batches[b].late {
                send(&shared, &mut client, late, pass, deadline).await;
                let c = &shared.counters;
                c.late_spans_sent.fetch_add(late.spans, Ordering::Relaxed);
            }
            continue;
        }
        if now >= deadline {
            break;
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        let (pass, b, request, spans_before) = shared.plan.item(i);
        if shared
            .options
            .max_spans
            .is_some_and(|max| spans_before >= max)
        {
            break;
        }
        if let Some(rate) = shared.options.rate {
            let at = shared.start + Duration::from_secs_f64(spans_before as f64 / rate);
            if at >= deadline {
                break;
            }
            sleep_until(at).await;
        }
        if request.has_roots && shared.plan.batches[b].late.is_some() {
            let due = Instant::now() + shared.options.late_delay;
            let mut late = shared.late.lock().unwrap_or_else(|e| e.into_inner());
            late.push_back((due, pass, b));
        }
        send(&shared, &mut client, request, pass, deadline).await;
    }
    // After the run, every late span already promised is still sent, so the
    // late share of the run is what was asked for.
    let give_up = deadline + shared.options.late_delay + Duration::from_secs(5);
    while let Some((due, pass, b)) = shared.next_late(Instant::now(), true) {
        sleep_until(due).await;
        if let Some(late) = &shared.plan.batches[b].late {
            send(&shared, &mut client, late, pass, give_up).await;
            let c = &shared.counters;
            c.late_spans_sent.fetch_add(late.spans, Ordering::Relaxed);
        }
    }
}

/// Runs the load against the targets and returns what came of it.
pub async fn run(corpus: Vec<Batch>, options: Options) -> Stats {
    let shared = Arc::new(Shared {
        plan: Plan::new(corpus, options.first_pass),
        next: AtomicU64::new(0),
        late: Mutex::default(),
        counters: Counters::default(),
        start: Instant::now(),
        options,
    });
    let tasks: Vec<_> = (0..shared.options.connections.max(1))
        .map(|k| tokio::spawn(connection(Arc::clone(&shared), k)))
        .collect();
    for task in tasks {
        if let Err(e) = task.await {
            shared.fail(format!("connection task: {e}"));
        }
    }
    let c = &shared.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Stats {
        requests: get(&c.requests),
        spans_sent: get(&c.spans_sent),
        spans_accepted: get(&c.spans_accepted),
        spans_rejected: get(&c.spans_rejected),
        spans_abandoned: get(&c.spans_abandoned),
        late_spans_sent: get(&c.late_spans_sent),
        pushback_429: get(&c.pushback[Pushback::Http429 as usize]),
        pushback_503: get(&c.pushback[Pushback::Http503 as usize]),
        pushback_resource_exhausted: get(&c.pushback[Pushback::ResourceExhausted as usize]),
        pushback_unavailable: get(&c.pushback[Pushback::Unavailable as usize]),
        errors: get(&c.errors),
        last_error: c
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        elapsed: shared.start.elapsed(),
    }
}
