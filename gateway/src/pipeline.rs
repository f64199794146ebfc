//! The span path of one node, stage by stage: receivers call
//! [`Pipeline::ingest`], which routes the request into per-trace batches,
//! buffers them, and decides traces that are due; a sweeper task calls
//! [`Pipeline::sweep`] for traces whose wait is over. Kept traces go to the
//! outbox, which the publisher drains.
//!
//! Admission control lives here too: a request is refused (retryably) rather
//! than accepted and lost when the outbox is full or the buffer cannot make
//! room by deciding its oldest traces early.

use crate::{
    buffer::{Added, Buffer, Ticket, Trigger},
    cluster::{
        Cluster, Owner,
        forward::Rerouted,
        handed,
        peer::{Delivery, HandedDecision, Hello, PeerHandler},
        verdict,
    },
    config::Config,
    decide::{Decider, cache::DecisionCache, journeys::Recorder},
    metrics::{DropReason, Metrics},
    publish::Outbox,
    route::{self, Routed},
    trace::TraceBatch,
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tailgate_sampling_rules::Rules;
use tokio::time::Instant;

/// Why a request was refused. Every kind is retryable by the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the trace buffer is full; retry later")]
    BufferFull { retry_after: Duration },
    #[error("kept traces are waiting for the broker and the outbox is full; retry later")]
    OutboxFull { retry_after: Duration },
    #[error("this node is shutting down; send to another node")]
    ShuttingDown { retry_after: Duration },
    #[error("spans for other nodes are waiting and their queue is full; retry later")]
    PeerBacklog { retry_after: Duration },
}

impl Refusal {
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::BufferFull { retry_after }
            | Refusal::OutboxFull { retry_after }
            | Refusal::ShuttingDown { retry_after }
            | Refusal::PeerBacklog { retry_after } => *retry_after,
        }
    }
}

/// What happened to an accepted request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub spans: usize,
    /// Spans refused for invalid IDs (OTLP `partial_success`).
    pub rejected_spans: usize,
    pub rejection: Option<String>,
}

#[derive(Debug)]
pub struct Pipeline {
    buffer: Buffer,
    decider: Decider,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    cluster: Cluster,
    max_buffer_bytes: usize,
    retry_after: Duration,
    /// Set at shutdown: requests from clients and deliveries from peers are refused.
    closing: AtomicBool,
    /// How long decisions wait after a membership change (see `rebalance`).
    settle: Duration,
    /// Decisions are held until then.
    hold_until: std::sync::Mutex<Option<Instant>>,
}

impl Pipeline {
    pub fn new(
        cfg: &Config,
        rules: Arc<Rules>,
        metrics: Arc<Metrics>,
        outbox: Arc<Outbox>,
        cluster: Cluster,
    ) -> Self {
        let cache = DecisionCache::new(&cfg.decision_cache);
        Self {
            buffer: Buffer::new(&cfg.buffer),
            decider: Decider::new(
                rules,
                cache,
                Arc::clone(&metrics),
                Arc::clone(&outbox),
                cfg.rabbitmq.compression,
                Recorder::new(
                    Arc::clone(&outbox),
                    Arc::clone(&metrics),
                    cfg.rabbitmq.compression,
                    cfg.journeys.max_batch_events.get(),
                    cfg.journeys.flush_interval,
                ),
            ),
            outbox,
            metrics,
            cluster,
            max_buffer_bytes: cfg.buffer.max_buffer_bytes.get(),
            retry_after: cfg.receiver.retry_after,
            closing: AtomicBool::new(false),
            settle: 2 * (cfg.cluster.refresh + cfg.cluster.forward_flush),
            hold_until: std::sync::Mutex::new(None),
        }
    }

    /// Accepts one export request, already split by the router, or refuses
    /// it whole so the client retries.
    pub fn ingest(&self, routed: Routed, protocol: &'static str) -> Result<Accepted, Refusal> {
        let retry_after = self.retry_after;
        if self.closing.load(Ordering::Relaxed) {
            return Err(Refusal::ShuttingDown { retry_after });
        }
        if self.cluster.forwarder.is_full() {
            return Err(Refusal::PeerBacklog { retry_after });
        }
        let now = Instant::now();
        self.admit(routed.bytes, now)?;
        self.metrics.receiver.received(protocol, routed.span_count);
        if routed.rejected > 0 {
            self.metrics
                .dropped(DropReason::InvalidSpan, routed.rejected);
        }
        let accepted = Accepted {
            spans: routed.span_count,
            rejected_spans: routed.rejected,
            rejection: routed.rejection,
        };
        for batch in routed.batches {
            self.route(batch, now);
        }
        Ok(accepted)
    }

    /// Admission control for `bytes` more to buffer: a full outbox refuses;
    /// a full buffer first decides its oldest traces early, and refuses only
    /// if that cannot free enough.
    fn admit(&self, bytes: usize, now: Instant) -> Result<(), Refusal> {
        let retry_after = self.retry_after;
        if self.outbox.is_full() {
            return Err(Refusal::OutboxFull { retry_after });
        }
        while self.buffer.bytes() + bytes > self.max_buffer_bytes {
            // Each decision may publish a message: none while the outbox is full.
            if self.outbox.is_full() {
                return Err(Refusal::OutboxFull { retry_after });
            }
            let Some(oldest) = self.buffer.oldest() else {
                break;
            };
            self.decide(oldest, Trigger::MemoryPressure, now);
        }
        if self.buffer.bytes() + bytes > self.max_buffer_bytes {
            return Err(Refusal::BufferFull { retry_after });
        }
        Ok(())
    }

    /// Sends a trace's spans to their owner: this node's buffer, or a peer.
    fn route(&self, batch: TraceBatch, now: Instant) {
        match self.cluster.owner(&batch.trace_id) {
            Owner::Me => self.buffer_here(batch, now),
            Owner::Peer(peer) => self.cluster.forwarder.spans(&peer, batch),
        }
    }

    fn buffer_here(&self, batch: TraceBatch, now: Instant) {
        match self
            .buffer
            .add(batch, now, |id| self.decider.cache().get(id))
        {
            Added::Buffered => {}
            // Held for a sweep while the outbox is full, like any due trace.
            Added::Due(ticket, trigger) if self.outbox.is_full() => {
                self.buffer.hold_due(vec![(ticket, trigger)], now);
            }
            Added::Due(ticket, trigger) => self.decide(ticket, trigger, now),
            Added::Late(batch, verdict) => self.decider.late(batch, &verdict, now),
        }
    }

    /// Spans and decisions from a peer. Its spans are buffered here whoever
    /// owns them in this node's view: a delivery is never forwarded again.
    ///
    /// A node that is leaving refuses them: it has already told its peers,
    /// and a peer that had not heard yet keeps the spans, retries, and routes
    /// them to the new owner once it hears. Accepted here, they could arrive
    /// after this node handed off its buffer, and be published apart from the
    /// rest of their trace, or after the final flush, and be lost.
    pub fn deliver(&self, routed: Routed, decisions: &[HandedDecision]) -> Result<(), Refusal> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(Refusal::ShuttingDown {
                retry_after: self.retry_after,
            });
        }
        let now = Instant::now();
        self.admit(routed.bytes, now)?;
        for d in decisions {
            if let Some((id, verdict)) = verdict(d) {
                self.decider.cache().insert_if_absent(id, verdict, now);
            }
        }
        self.metrics
            .cluster
            .delivered_spans
            .inc_by(routed.span_count as u64);
        for batch in routed.batches {
            self.buffer_here(batch, now);
        }
        Ok(())
    }

    /// Routes again spans whose peer left before they were delivered.
    pub fn reroute(&self, mut rerouted: Rerouted) {
        let now = Instant::now();
        for batch in rerouted.batches.drain(..) {
            self.route(batch, now);
        }
    }

    /// At a shutdown whose handoff ran out of time: takes the spans still
    /// queued for peers, and `rerouted` (spans whose peer left, not yet
    /// routed again), into this node's buffer, so that [`Self::close`]
    /// decides them rather than the exit losing them.
    pub fn take_back_undelivered(&self, rerouted: Vec<Rerouted>) {
        let now = Instant::now();
        let queued = self.cluster.forwarder.reclaim();
        for mut spans in rerouted.into_iter().chain([queued]) {
            for batch in spans.batches.drain(..) {
                self.buffer_here(batch, now);
            }
        }
    }

    /// After a membership change: hands every buffered trace and remembered
    /// decision this node no longer owns to its new owner, and holds
    /// decisions for two membership checks plus two forward flushes. Peers
    /// learn of the change up to one check later, and only then move the
    /// spans they buffered or forwarded under the old ring; deciding before
    /// those arrive would publish the trace in two parts.
    pub fn rebalance(&self) {
        let until = Instant::now() + self.settle;
        *self.hold_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        self.hand_off_traces();
        self.hand_off_decisions();
    }

    /// Hands buffered traces this node does not own to their owner. Also run
    /// at every membership check: spans a peer delivered while its view of
    /// the ring differed from this node's are buffered here first (deliveries
    /// are never forwarded on arrival), and move to their owner from here,
    /// at most once per check, well before their decision is due.
    pub fn hand_off_traces(&self) -> usize {
        let mut moved = 0;
        for ticket in self.buffer.all() {
            let Owner::Peer(peer) = self.cluster.owner(&ticket.trace_id) else {
                continue;
            };
            let Some(trace) = self.buffer.take(ticket) else {
                continue;
            };
            self.cluster.forwarder.spans(
                &peer,
                TraceBatch {
                    trace_id: trace.trace_id,
                    fragments: trace.fragments,
                    span_count: trace.span_count,
                    bytes: trace.bytes,
                    has_root: trace.has_root,
                },
            );
            for late in self.buffer.finish(&ticket.trace_id) {
                self.cluster.forwarder.spans(&peer, late);
            }
            self.metrics.cluster.handoff_traces.inc();
            moved += 1;
        }
        moved
    }

    /// Hands remembered decisions of traces this node no longer owns to
    /// their new owner (and forgets them here), so late spans follow them.
    pub fn hand_off_decisions(&self) {
        let mut moved: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
        for (id, verdict) in self.decider.cache().entries() {
            if let Owner::Peer(peer) = self.cluster.owner(&id) {
                moved.entry(peer).or_default().push(handed(&id, &verdict));
                self.decider.cache().remove(&id);
            }
        }
        for (peer, decisions) in moved {
            self.metrics
                .cluster
                .handoff_decisions
                .inc_by(decisions.len() as u64);
            self.cluster.forwarder.decisions(&peer, decisions);
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Traces in the buffer.
    pub fn buffered_traces(&self) -> usize {
        self.buffer.traces()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn decide(&self, ticket: Ticket, trigger: Trigger, now: Instant) {
        let Some(trace) = self.buffer.take(ticket) else {
            return;
        };
        let verdict = self.decider.decide(trace, trigger, now);
        for batch in self.buffer.finish(&ticket.trace_id) {
            self.decider.late(batch, &verdict, now);
        }
    }

    /// Decides every trace whose wait is over and forgets expired decisions.
    pub fn sweep(&self) {
        let now = Instant::now();
        let held = self
            .hold_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| now < until);
        // While held, due traces stay queued; the first sweep after decides them.
        let due = if held || self.outbox.is_full() {
            Vec::new()
        } else {
            self.buffer.due(now)
        };
        let mut due = due.into_iter();
        // A decision publishes at most one message, and none is made once the
        // outbox is full: it never holds more than one message over its bound.
        // What is still due waits in the buffer, which pushes back when full.
        while !self.outbox.is_full() {
            let Some((ticket, trigger)) = due.next() else {
                break;
            };
            self.decide(ticket, trigger, now);
        }
        self.buffer.hold_due(due.collect(), now);
        self.decider.journeys().flush(now, false);
        self.decider.cache().expire(now);
        self.update_gauges();
    }

    /// Refuses requests from clients and deliveries from peers from now on.
    pub fn stop_accepting(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Stops accepting, then decides every buffered trace (the shutdown flush).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let now = Instant::now();
        for ticket in self.buffer.all() {
            self.decide(ticket, Trigger::Shutdown, now);
        }
        self.decider.journeys().flush(now, true);
        self.update_gauges();
    }

    pub fn decider(&self) -> &Decider {
        &self.decider
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// True while requests would be refused for lack of room.
    pub fn is_shedding(&self) -> bool {
        self.outbox.is_full()
            || self.buffer.bytes() >= self.max_buffer_bytes
            || self.cluster.forwarder.is_full()
    }

    pub fn update_gauges(&self) {
        let m = &self.metrics;
        m.buffer.set(self.buffer.traces(), self.buffer.bytes());
        m.publish
            .set_outbox(self.outbox.messages(), self.outbox.bytes());
        m.decision.set_cache_entries(self.decider.cache().len());
        m.journeys
            .set_pending(self.decider.journeys().pending() + self.outbox.journey_events());
        m.cluster
            .set_forward_queue_bytes(self.cluster.forwarder.bytes());
    }
}

impl PeerHandler for Pipeline {
    fn hello(&self, hello: Hello) -> Hello {
        self.cluster.membership.greeted(&hello)
    }

    fn deliver(&self, delivery: Delivery) -> Result<(), tonic::Status> {
        let routed = route::split(&delivery.spans)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad delivery: {e}")))?;
        Pipeline::deliver(self, routed, &delivery.decisions)
            .map_err(|r| tonic::Status::unavailable(r.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::{Owner, peer::Hello},
        config::RawConfig,
        route::tests::{request, span, split_request},
    };
    use opentelemetry_proto::tonic::trace::v1::{Status, status::StatusCode};
    use tailgate_contract::config::Validate;

    fn pipeline(
        max_buffer_bytes: usize,
        outbox_bytes: usize,
    ) -> (Pipeline, Arc<Outbox>, Arc<Metrics>) {
        let (p, outbox, metrics, _) = pipeline_and_reroutes(max_buffer_bytes, outbox_bytes);
        (p, outbox, metrics)
    }

    /// Also returns the channel of spans to route again, which a node's
    /// rerouting task reads.
    fn pipeline_and_reroutes(
        max_buffer_bytes: usize,
        outbox_bytes: usize,
    ) -> (
        Pipeline,
        Arc<Outbox>,
        Arc<Metrics>,
        tokio::sync::mpsc::UnboundedReceiver<Rerouted>,
    ) {
        pipeline_configured(max_buffer_bytes, outbox_bytes, |_| {})
    }

    /// The same, with more of the configuration set by `configure`.
    fn pipeline_configured(
        max_buffer_bytes: usize,
        outbox_bytes: usize,
        configure: impl FnOnce(&mut RawConfig),
    ) -> (
        Pipeline,
        Arc<Outbox>,
        Arc<Metrics>,
        tokio::sync::mpsc::UnboundedReceiver<Rerouted>,
    ) {
        let mut raw = RawConfig::default();
        raw.buffer.max_buffer_bytes = max_buffer_bytes;
        raw.receiver.max_request_bytes = max_buffer_bytes;
        raw.policy.random_share = 0.0;
        configure(&mut raw);
        let cfg = raw.validate().unwrap();
        let metrics = Arc::new(Metrics::new());
        let outbox = Arc::new(Outbox::new(outbox_bytes));
        let rules = Arc::new(Rules::default_policy(
            cfg.policy.slow_threshold,
            cfg.policy.random_share,
        ));
        let (cluster, reroutes) = Cluster::new(
            &cfg.cluster,
            "127.0.0.1:4319".into(),
            Arc::clone(&metrics),
            Duration::from_secs(30),
        );
        (
            Pipeline::new(
                &cfg,
                rules,
                Arc::clone(&metrics),
                Arc::clone(&outbox),
                cluster,
            ),
            outbox,
            metrics,
            reroutes,
        )
    }

    fn error_span(trace: u8) -> opentelemetry_proto::tonic::trace::v1::Span {
        let mut s = span(trace, 1, None);
        s.status = Some(Status {
            code: StatusCode::Error as i32,
            message: "boom".into(),
        });
        s
    }

    /// An error trace is kept when its root wait is over; a late span of it
    /// is published as its own message; a normal trace is dropped and counted.
    #[tokio::test(start_paused = true)]
    async fn decides_after_root_wait() {
        let (p, outbox, metrics) = pipeline(1 << 20, 1 << 20);
        p.ingest(
            split_request(&request(vec![(
                "shop-api",
                vec![error_span(1), span(2, 1, None)],
            )])),
            "test",
        )
        .unwrap();
        p.sweep();
        assert_eq!(outbox.messages(), 0, "decided before decision_wait");
        tokio::time::advance(Duration::from_secs(2)).await;
        p.sweep();
        assert_eq!(outbox.messages(), 1);
        p.ingest(
            split_request(&request(vec![(
                "crm-api",
                vec![span(1, 2, Some(1)), span(2, 2, Some(1))],
            )])),
            "test",
        )
        .unwrap();
        assert_eq!(
            outbox.messages(),
            2,
            "late span of a kept trace is published at once"
        );
        let text = metrics.encode();
        assert!(
            text.contains("tailgate_spans_dropped_total{reason=\"policy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tailgate_spans_dropped_total{reason=\"late_span_of_dropped_trace\"} 1"),
            "{text}"
        );
    }

    /// Journeys are recorded from every span that carries a key, before
    /// sampling: a kept error trace and a dropped trace of one order both
    /// give events, marked kept or not with the deciding rule. Spans without
    /// the key's name in their bytes are never decoded for it; one that
    /// holds the name only in a value is decoded and gives no event. Events
    /// wait for the flush interval, then leave as one message, redacted by
    /// the rules (they leave the gateway even for dropped traces).
    #[tokio::test(start_paused = true)]
    async fn journey_events_from_every_span_before_sampling() {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
        use prost::Message;
        use tailgate_contract::journey::JourneyEvents;
        let (p, outbox, metrics, _) = pipeline_configured(1 << 20, 1 << 20, |raw| {
            raw.rabbitmq.compression = crate::config::Compression::None;
        });
        p.decider().set_rules(Arc::new(
            Rules::from_yaml(
                "rules:
  - name: errors
    when: { trace.has_error: true }
    action: keep
  - name: rest
    action: drop
redact:
  values: [email]
journeys:
  - name: order
    key: attributes.order.id
    status: attributes.order.status
    capture: [attributes.customer]
",
                "rules.yaml",
            )
            .unwrap(),
        ));
        let attr = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
            ..Default::default()
        };
        let with = |mut s: opentelemetry_proto::tonic::trace::v1::Span, attrs: Vec<KeyValue>| {
            s.attributes = attrs;
            s
        };
        let kept = vec![
            with(
                error_span(1),
                vec![
                    attr("order.id", "A-1"),
                    attr("order.status", "NEW"),
                    attr("customer", "Ann <ann@example.com>"),
                ],
            ),
            span(1, 2, Some(1)),
        ];
        let dropped = vec![
            with(
                span(2, 1, None),
                vec![
                    attr("order.id", "A-1"),
                    attr("order.status", "PRICE_CALCULATED"),
                ],
            ),
            span(2, 2, Some(1)),
            with(span(2, 3, Some(1)), vec![attr("note", "see order.id")]),
        ];
        p.ingest(
            split_request(&request(vec![("shop-api", kept), ("crm-api", dropped)])),
            "test",
        )
        .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        p.sweep();
        assert_eq!(outbox.messages(), 1, "the kept trace; the events wait");
        tokio::time::advance(Duration::from_secs(1)).await;
        p.sweep();
        assert_eq!(outbox.messages(), 2);
        assert_eq!(outbox.journey_events(), 2);
        let messages = outbox.take(10).await;
        let journey = messages
            .iter()
            .find(|m| m.journey_event_count() > 0)
            .expect("a journey message");
        assert_eq!(journey.routing_key, "journeys.order");
        let mut events = JourneyEvents::decode(&journey.body[..])
            .unwrap()
            .resolve()
            .unwrap();
        events.sort_by_key(|e| e.kept);
        let summary: Vec<(&str, &str, &str, bool, &str, bool)> = events
            .iter()
            .map(|e| {
                (
                    e.key.as_str(),
                    e.status.as_str(),
                    e.service.as_str(),
                    e.kept,
                    e.rule.as_str(),
                    e.error,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("A-1", "PRICE_CALCULATED", "crm-api", false, "rest", false),
                ("A-1", "NEW", "shop-api", true, "errors", true),
            ]
        );
        assert_eq!(events[0].trace_id, vec![2; 16]);
        assert_eq!(
            events[1].captured[0].value, "Ann <***@***>",
            "events are redacted as kept spans are"
        );
        let text = metrics.encode();
        assert!(
            text.contains("tailgate_journey_spans_decoded_total 3"),
            "two spans with the key and one with its name in a value: {text}"
        );
        assert!(
            text.contains("tailgate_journey_events_recorded_total{journey=\"order\"} 2"),
            "{text}"
        );
    }

    /// The broker is away and nothing drains the outbox, whose bound is one
    /// byte: the first kept trace fills it, and no more decisions are made.
    /// It never holds more than one message over its bound; the traces still
    /// due wait in the buffer (nothing is lost, nothing dropped), new
    /// requests are pushed back, and the held traces are decided one by one
    /// as the broker confirms.
    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_holds_decisions_back() {
        let (p, outbox, metrics) = pipeline(1 << 20, 1);
        let traces: Vec<_> = (1..=5).map(error_span).collect();
        p.ingest(split_request(&request(vec![("shop-api", traces)])), "test")
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        p.sweep();
        p.sweep();
        assert_eq!(
            outbox.messages(),
            1,
            "one message past a full outbox at most"
        );
        assert_eq!(p.buffered_traces(), 4, "the other due traces wait");
        assert!(matches!(
            p.ingest(
                split_request(&request(vec![("shop-api", vec![error_span(9)])])),
                "test"
            ),
            Err(Refusal::OutboxFull { .. })
        ));
        for held in (0..4).rev() {
            for m in outbox.take(10).await {
                outbox.settle(&m);
            }
            p.sweep();
            assert_eq!((outbox.messages(), p.buffered_traces()), (1, held));
        }
        assert!(!metrics.encode().contains("tailgate_spans_dropped_total{"));
    }

    /// Spans for a peer that does not answer wait in its forward queue.
    /// Requests are admitted while the queue is under `forward_max_bytes`
    /// and refused once it is at it, so it never holds more than one
    /// request over its bound; nothing refused was counted as received.
    #[tokio::test]
    async fn the_forward_queue_holds_to_its_bound() {
        const BOUND: usize = 2_000;
        let (p, _, metrics, _) = pipeline_configured(1 << 20, 1 << 20, |raw| {
            raw.cluster.forward_max_bytes = BOUND;
        });
        let peer = "127.0.0.1:9";
        p.cluster().membership.greeted(&Hello {
            from: peer.into(),
            leaving: false,
        });
        let peers_traces: Vec<u8> = (1..=255)
            .filter(|&t| {
                let id = tailgate_sampling_rules::TraceId([t; 16]);
                matches!(p.cluster().owner(&id), Owner::Peer(ref owner) if owner.to_string() == peer)
            })
            .collect();
        let mut accepted = 0;
        let refused = peers_traces.iter().find_map(|&t| {
            let routed = split_request(&request(vec![("shop-api", vec![span(t, 1, None)])]));
            let bytes = routed.bytes;
            match p.ingest(routed, "test") {
                Ok(_) => {
                    accepted += 1;
                    assert!(
                        p.cluster().forwarder.bytes() < BOUND + bytes,
                        "more than one request over"
                    );
                    None
                }
                Err(refusal) => Some(refusal),
            }
        });
        assert!(
            matches!(refused, Some(Refusal::PeerBacklog { .. })),
            "{refused:?}"
        );
        assert!(p.cluster().forwarder.bytes() >= BOUND);
        let text = metrics.encode();
        let received = format!("tailgate_spans_received_total{{protocol=\"test\"}} {accepted}");
        assert!(text.contains(&received), "{text}");
    }

    /// After a membership change, due traces wait two membership checks
    /// (plus forward flushes) before being decided, so spans peers still
    /// route by the old ring reach this node first; then they are decided.
    #[tokio::test(start_paused = true)]
    async fn decisions_wait_for_the_ring_to_settle_after_a_change() {
        let (p, outbox, _) = pipeline(1 << 20, 1 << 20);
        p.ingest(
            split_request(&request(vec![("shop-api", vec![error_span(1)])])),
            "test",
        )
        .unwrap();
        tokio::time::advance(Duration::from_millis(1900)).await;
        p.rebalance();
        tokio::time::advance(Duration::from_millis(200)).await;
        p.sweep();
        assert_eq!(outbox.messages(), 0, "decided while the ring settles");
        // Defaults: refresh 5 s and flush 0.05 s, so the hold is 10.1 s.
        tokio::time::advance(Duration::from_secs(10)).await;
        p.sweep();
        assert_eq!(outbox.messages(), 1);
    }

    /// When the buffer is full the oldest traces are decided early; a full
    /// outbox refuses requests retryably instead of dropping them.
    #[tokio::test(start_paused = true)]
    async fn memory_pressure_then_pushback() {
        let one = split_request(&request(vec![("a", vec![error_span(1)])])).bytes;
        let (p, outbox, metrics) = pipeline(2 * one, 1);
        p.ingest(
            split_request(&request(vec![("a", vec![error_span(1)])])),
            "test",
        )
        .unwrap();
        p.ingest(
            split_request(&request(vec![("a", vec![error_span(2)])])),
            "test",
        )
        .unwrap();
        p.ingest(
            split_request(&request(vec![("a", vec![error_span(3)])])),
            "test",
        )
        .unwrap();
        assert!(
            metrics
                .encode()
                .contains("tailgate_decision_triggers_total{trigger=\"memory_pressure\"} 1")
        );
        assert_eq!(outbox.messages(), 1);
        let refused = p.ingest(
            split_request(&request(vec![("a", vec![error_span(4)])])),
            "test",
        );
        assert!(matches!(refused, Err(Refusal::OutboxFull { .. })));
        assert!(p.is_shedding());
    }

    /// A leaving node refuses deliveries from peers (they keep the spans and
    /// route them to the new owner), so none can land after its final flush.
    #[tokio::test(start_paused = true)]
    async fn a_leaving_node_refuses_deliveries() {
        let (p, _, _) = pipeline(1 << 20, 1 << 20);
        let delivery = || split_request(&request(vec![("a", vec![error_span(1)])]));
        p.deliver(delivery(), &[]).unwrap();
        p.stop_accepting();
        assert!(matches!(
            p.deliver(delivery(), &[]),
            Err(Refusal::ShuttingDown { .. })
        ));
        assert_eq!(p.buffered_traces(), 1);
    }

    /// A shutdown whose handoff ran out of time keeps spans that were
    /// waiting to be routed again (their peer left) and decides them here:
    /// nothing stays pending in the forwarder, and the kept trace is published.
    #[tokio::test(start_paused = true)]
    async fn a_late_shutdown_keeps_spans_waiting_to_be_rerouted() {
        let (p, outbox, _, mut reroutes) = pipeline_and_reroutes(1 << 20, 1 << 20);
        let peer = "127.0.0.1:2";
        let greet = |leaving| {
            p.cluster().membership.greeted(&Hello {
                from: peer.into(),
                leaving,
            })
        };
        greet(false);
        let trace = (1..=u8::MAX)
            .find(|t| {
                p.cluster()
                    .owner(&tailgate_sampling_rules::TraceId([*t; 16]))
                    == Owner::Peer(peer.into())
            })
            .unwrap();
        p.ingest(
            split_request(&request(vec![("a", vec![error_span(trace)])])),
            "test",
        )
        .unwrap();
        assert_eq!(p.buffered_traces(), 0, "queued for its owner");
        greet(true);
        let waiting = reroutes.recv().await.unwrap();
        assert_eq!(p.cluster().forwarder.pending_spans(), 1);
        p.take_back_undelivered(vec![waiting]);
        assert_eq!(p.buffered_traces(), 1);
        assert_eq!(p.cluster().forwarder.pending_spans(), 0);
        p.close();
        assert_eq!(outbox.messages(), 1);
    }

    /// Closing decides every buffered trace, and later requests are refused.
    #[tokio::test(start_paused = true)]
    async fn close_flushes() {
        let (p, outbox, _) = pipeline(1 << 20, 1 << 20);
        p.ingest(
            split_request(&request(vec![("a", vec![error_span(1), error_span(2)])])),
            "test",
        )
        .unwrap();
        p.close();
        assert_eq!(outbox.messages(), 2);
        assert!(matches!(
            p.ingest(
                split_request(&request(vec![("a", vec![error_span(3)])])),
                "test"
            ),
            Err(Refusal::ShuttingDown { .. })
        ));
    }

    proptest::proptest! {
        /// Fuzz, the peer protocol: what arrives on the cluster port, as a
        /// delivery (arbitrary bytes, or a delivery with spans and handed
        /// decisions of any content) or a hello, is refused with a status or
        /// taken, never a panic.
        #[test]
        fn fuzz_peer_messages(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            request in crate::route::tests::arb_request(),
            decisions in proptest::collection::vec(
                (
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
                    proptest::prelude::any::<bool>(),
                    ".{0,10}",
                    proptest::option::of("[0-9a-f]{0,16}|.{0,4}"),
                    proptest::prelude::any::<f64>(),
                ),
                0..4,
            ),
        ) {
            use crate::cluster::peer::{Delivery, HandedDecision, Hello, PeerHandler};
            use prost::Message;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _entered = runtime.enter();
            let (p, _, _) = pipeline(1 << 20, 1 << 20);
            if let Ok(delivery) = Delivery::decode(bytes.as_slice()) {
                let _ = PeerHandler::deliver(&p, delivery);
            }
            if let Ok(hello) = Hello::decode(bytes.as_slice()) {
                let _ = PeerHandler::hello(&p, hello);
            }
            let delivery = Delivery {
                from: "127.0.0.1:1".into(),
                spans: request.encode_to_vec().into(),
                decisions: decisions
                    .into_iter()
                    .map(|(trace_id, keep, rule, th, adjusted_count)| HandedDecision {
                        trace_id,
                        keep,
                        rule,
                        th,
                        adjusted_count,
                        root_service: "shop-api".into(),
                        rv: None,
                    })
                    .collect(),
            };
            proptest::prop_assert!(PeerHandler::deliver(&p, delivery).is_ok());
        }
    }
}
