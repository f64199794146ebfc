//! Stage 5, publish: kept traces wait in the outbox until RabbitMQ confirms them.
//!
//! The outbox is the only place a kept trace lives between its decision and
//! the broker's confirm. A message leaves it only on an `ack`; a `nack`, a
//! return (unroutable), a timeout or a lost connection puts it back at the
//! front, and it is published again with the same `message_id`, which the
//! ingester deduplicates on. The outbox is bounded in bytes: when it is full,
//! the receivers push back instead of accepting more.

pub mod amqp;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};
use tailgate_contract::{compression::Compression, journey, message::routing_key};
use tailgate_sampling_rules::{Kept, TraceId};
use tokio::{sync::Notify, time::Instant};

/// One kept trace (or late spans of one), or a batch of journey events,
/// ready to publish.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// Unique per message, unchanged when republished.
    pub id: String,
    pub routing_key: String,
    /// The protobuf [`Content`] says, compressed as `compression` says.
    pub body: Bytes,
    pub compression: Compression,
    /// Spans in a trace message; 0 in a journey events message.
    pub span_count: usize,
    pub received_at: Instant,
    pub content: Content,
}

/// What a message carries.
#[derive(Debug, Clone)]
pub enum Content {
    /// An `ExportTraceServiceRequest`.
    Trace {
        trace_id: TraceId,
        rule: String,
        adjusted_count: f64,
        root_service: Arc<str>,
    },
    /// A `JourneyEvents` batch of one journey.
    JourneyEvents { journey: Arc<str>, events: usize },
}

/// Distinguishes messages of one process: a random prefix (so restarts do
/// not reuse IDs) and a counter.
fn next_message_number() -> (u64, u64) {
    use std::hash::{BuildHasher, RandomState};
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS's randomness once per process.
    let prefix = *PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    (prefix, COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl OutMessage {
    pub fn new(
        trace_id: TraceId,
        kept: &Kept,
        root_service: Arc<str>,
        span_count: usize,
        request: &ExportTraceServiceRequest,
        compression: Compression,
        received_at: Instant,
    ) -> Self {
        let (prefix, n) = next_message_number();
        let (compression, body) = compression.compress(request.encode_to_vec());
        Self {
            id: format!("{trace_id}-{prefix:016x}-{n}"),
            routing_key: routing_key(kept.rule.as_str(), &root_service),
            body: Bytes::from(body),
            compression,
            span_count,
            received_at,
            content: Content::Trace {
                trace_id,
                rule: kept.rule.as_str().to_owned(),
                adjusted_count: kept.adjusted_count(),
                root_service,
            },
        }
    }

    /// A batch of one journey's events: `body` is a `JourneyEvents`
    /// message holding `events` events, compressed as `compression` says.
    pub fn journey_events(
        journey: Arc<str>,
        body: Vec<u8>,
        compression: Compression,
        events: usize,
        received_at: Instant,
    ) -> Self {
        let (prefix, n) = next_message_number();
        Self {
            id: format!("journey-{journey}-{prefix:016x}-{n}"),
            routing_key: journey::routing_key(&journey),
            body: Bytes::from(body),
            compression,
            span_count: 0,
            received_at,
            content: Content::JourneyEvents { journey, events },
        }
    }

    /// Journey events in the message.
    pub fn journey_event_count(&self) -> usize {
        match self.content {
            Content::JourneyEvents { events, .. } => events,
            Content::Trace { .. } => 0,
        }
    }
}

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<VecDeque<OutMessage>>,
    /// Bytes of queued and in-flight messages.
    bytes: AtomicUsize,
    /// Number of queued and in-flight messages.
    messages: AtomicUsize,
    /// Spans in queued and in-flight messages.
    spans: AtomicUsize,
    /// Journey events in queued and in-flight messages.
    journey_events: AtomicUsize,
    max_bytes: usize,
    added: Notify,
    settled: Notify,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            queue: Mutex::default(),
            bytes: AtomicUsize::new(0),
            messages: AtomicUsize::new(0),
            spans: AtomicUsize::new(0),
            journey_events: AtomicUsize::new(0),
            max_bytes,
            added: Notify::new(),
            settled: Notify::new(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<OutMessage>> {
        // Every critical section is a push or pop; a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn spans(&self) -> usize {
        self.spans.load(Ordering::Relaxed)
    }

    pub fn journey_events(&self) -> usize {
        self.journey_events.load(Ordering::Relaxed)
    }

    /// Receivers push back while this is true.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    /// Queues a message. Never refuses: admission control happens before
    /// spans are accepted, so what was decided is always kept.
    pub fn push(&self, msg: OutMessage) {
        self.bytes.fetch_add(msg.body.len(), Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.spans.fetch_add(msg.span_count, Ordering::Relaxed);
        self.journey_events
            .fetch_add(msg.journey_event_count(), Ordering::Relaxed);
        self.queue().push_back(msg);
        self.added.notify_one();
    }

    /// Waits for messages and takes up to `max` of them; they stay counted
    /// until [`Outbox::settle`] or [`Outbox::requeue`].
    pub async fn take(&self, max: usize) -> Vec<OutMessage> {
        loop {
            let added = self.added.notified();
            {
                let mut q = self.queue();
                if !q.is_empty() {
                    let n = q.len().min(max);
                    return q.drain(..n).collect();
                }
            }
            added.await;
        }
    }

    /// A message the broker confirmed leaves the outbox for good.
    pub fn settle(&self, msg: &OutMessage) {
        self.bytes.fetch_sub(msg.body.len(), Ordering::Relaxed);
        self.messages.fetch_sub(1, Ordering::Relaxed);
        self.spans.fetch_sub(msg.span_count, Ordering::Relaxed);
        self.journey_events
            .fetch_sub(msg.journey_event_count(), Ordering::Relaxed);
        self.settled.notify_waiters();
    }

    /// Puts unconfirmed messages back at the front, in their order.
    pub fn requeue(&self, msgs: Vec<OutMessage>) {
        if msgs.is_empty() {
            return;
        }
        let mut q = self.queue();
        for msg in msgs.into_iter().rev() {
            q.push_front(msg);
        }
        drop(q);
        self.added.notify_one();
    }

    /// Resolves once every message has been confirmed.
    pub async fn drained(&self) {
        loop {
            let settled = self.settled.notified();
            if self.messages() == 0 {
                return;
            }
            settled.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_sampling_rules::RuleName;

    fn msg(n: u8) -> OutMessage {
        let kept = Kept::all(RuleName::new("error"));
        OutMessage::new(
            TraceId([n; 16]),
            &kept,
            "shop-api".into(),
            1,
            &ExportTraceServiceRequest::default(),
            Compression::None,
            Instant::now(),
        )
    }

    /// Requeued messages go back to the front in order, and stay counted until settled.
    #[tokio::test]
    async fn requeue_keeps_order() {
        let o = Outbox::new(1 << 20);
        for n in 1..=3 {
            o.push(msg(n));
        }
        let first = o.take(2).await;
        assert_eq!(o.messages(), 3);
        o.requeue(first);
        let all = o.take(10).await;
        let ids: Vec<u8> = all
            .iter()
            .map(|m| match &m.content {
                Content::Trace { trace_id, .. } => trace_id.0[0],
                Content::JourneyEvents { .. } => 0,
            })
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        for m in &all {
            o.settle(m);
        }
        assert_eq!(o.messages(), 0);
        o.drained().await;
    }

    /// Message IDs are unique; the routing key names the rule and the root
    /// service (tailgate_contract::message tests that it is topic-safe).
    #[test]
    fn ids_and_routing_keys() {
        let (a, b) = (msg(1), msg(1));
        assert_ne!(a.id, b.id);
        assert!(a.id.starts_with(&TraceId([1; 16]).to_hex()));
        assert_eq!(a.routing_key, "traces.error.shop-api");
    }
}
