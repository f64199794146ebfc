//! Prometheus metrics of a gateway node: one struct per stage, all in one
//! registry, each metric declared and registered in one place.
//!
//! Names follow one rule (docs/configuration.md, "Metrics"):
//! `tailgate_<subsystem>_<measure>[_<unit>]`, counters ending in `_total`
//! (added by the client library). The subsystem is the accounting that
//! every span and trace goes through (`spans`, `traces`), or the part of
//! the node that counts it (`receiver`, `buffer`, `decision`, `cluster`,
//! `outbox`, `broker`, `rules`). Every span that is not kept is counted in
//! `tailgate_spans_dropped_total` with its reason.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Why a span was not kept.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// The sampling policy dropped its trace.
    Policy,
    /// A late span of a trace that was already dropped.
    LateSpanOfDroppedTrace,
    /// Rejected in `partial_success`: no valid trace or span ID.
    InvalidSpan,
    /// Kept, but still unconfirmed by the broker when the shutdown grace period ended.
    ShutdownUnpublished,
    /// Bound for a peer, but unconfirmed by it when the shutdown grace
    /// period ended (the peer may still have received some).
    ShutdownUndelivered,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::Policy,
        DropReason::LateSpanOfDroppedTrace,
        DropReason::InvalidSpan,
        DropReason::ShutdownUnpublished,
        DropReason::ShutdownUndelivered,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::Policy => "policy",
            DropReason::LateSpanOfDroppedTrace => "late_span_of_dropped_trace",
            DropReason::InvalidSpan => "invalid_span",
            DropReason::ShutdownUnpublished => "shutdown_unpublished",
            DropReason::ShutdownUndelivered => "shutdown_undelivered",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Protocol {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestOutcome {
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionRule {
    decision: &'static str,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Trigger {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// Latency buckets from 5 ms to about 82 s, plus fine ones just past the
/// decision wait: a trace is decided at `decision_wait` after its root at
/// the earliest, so what operators watch (and the ≤ wait + 100 ms target)
/// is the overshoot, which doubling buckets could not resolve.
fn latency_buckets(decision_wait_secs: f64) -> Vec<f64> {
    let mut b: Vec<f64> =
        prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15).collect();
    b.extend(
        [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5]
            .iter()
            .map(|over| decision_wait_secs + over),
    );
    b.sort_by(f64::total_cmp);
    b.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    b
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Stage 1, receive.
#[derive(Debug, Default)]
pub struct ReceiverMetrics {
    spans: Family<Protocol, Counter>,
    /// `spans` over every protocol, for the totals logged at exit.
    spans_total: Counter,
    requests: Family<RequestOutcome, Counter>,
}

impl ReceiverMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_spans_received",
            "Spans accepted from clients, by protocol (grpc, http_protobuf, http_json)",
            self.spans.clone(),
        );
        r.register(
            "tailgate_receiver_requests",
            "Export requests by protocol and outcome (ok, partial, invalid, too_large, pushback, unsupported)",
            self.requests.clone(),
        );
    }

    pub fn received(&self, protocol: &'static str, spans: usize) {
        self.spans
            .get_or_create(&Protocol { protocol })
            .inc_by(spans as u64);
        self.spans_total.inc_by(spans as u64);
    }

    pub fn request(&self, protocol: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestOutcome { protocol, outcome })
            .inc();
    }
}

/// Stage 3, buffer: gauges, set when metrics are read.
#[derive(Debug, Default)]
pub struct BufferMetrics {
    traces: Gauge,
    bytes: Gauge,
}

impl BufferMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_buffer_traces",
            "Traces waiting for their decision",
            self.traces.clone(),
        );
        r.register(
            "tailgate_buffer_bytes",
            "Encoded OTLP bytes of buffered spans",
            self.bytes.clone(),
        );
    }

    pub fn set(&self, traces: usize, bytes: usize) {
        self.traces.set(gauge_value(traces));
        self.bytes.set(gauge_value(bytes));
    }
}

/// Stage 4, decide.
#[derive(Debug)]
pub struct DecisionMetrics {
    traces: Family<DecisionRule, Counter>,
    triggers: Family<Trigger, Counter>,
    late_spans: Family<Decision, Counter>,
    cache_entries: Gauge,
    latency: Histogram,
}

impl DecisionMetrics {
    fn new(buckets: &[f64]) -> Self {
        Self {
            traces: Family::default(),
            triggers: Family::default(),
            late_spans: Family::default(),
            cache_entries: Gauge::default(),
            latency: Histogram::new(buckets.iter().copied()),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_traces_decided",
            "Traces decided, by decision (keep, drop) and rule",
            self.traces.clone(),
        );
        r.register(
            "tailgate_decision_triggers",
            "What made a trace due for its decision (root_wait, timeout, span_limit, byte_limit, memory_pressure, shutdown)",
            self.triggers.clone(),
        );
        r.register(
            "tailgate_spans_late",
            "Spans that arrived after their trace was decided, by that decision",
            self.late_spans.clone(),
        );
        r.register(
            "tailgate_decision_cache_entries",
            "Remembered decisions, for late spans",
            self.cache_entries.clone(),
        );
        r.register(
            "tailgate_decision_latency_seconds",
            "From the root span's arrival (the first span's, if no root came) to the decision",
            self.latency.clone(),
        );
    }

    pub fn decided(&self, keep: bool, rule: &str, trigger: &'static str, latency_secs: f64) {
        let decision = if keep { "keep" } else { "drop" };
        self.traces
            .get_or_create(&DecisionRule {
                decision,
                rule: rule.to_owned(),
            })
            .inc();
        self.triggers.get_or_create(&Trigger { trigger }).inc();
        self.latency.observe(latency_secs);
    }

    pub fn late(&self, keep: bool, spans: usize) {
        let decision = if keep { "keep" } else { "drop" };
        self.late_spans
            .get_or_create(&Decision { decision })
            .inc_by(spans as u64);
    }

    pub fn set_cache_entries(&self, entries: usize) {
        self.cache_entries.set(gauge_value(entries));
    }
}

/// The sampling rules in force.
#[derive(Debug, Default)]
pub struct RulesMetrics {
    reloads: Counter,
    reload_failures: Counter,
    hash: Gauge,
}

impl RulesMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_rules_reloads",
            "Changed rules files validated and put in force",
            self.reloads.clone(),
        );
        r.register(
            "tailgate_rules_reload_failures",
            "Changed rules files refused as invalid (the previous rules stay in force)",
            self.reload_failures.clone(),
        );
        r.register(
            "tailgate_rules_hash",
            "First 48 bits of the SHA-256 of the rules in force; differs between nodes running different rules",
            self.hash.clone(),
        );
    }

    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads.inc();
        } else {
            self.reload_failures.inc();
        }
    }

    /// The rules in force, by their 48-bit hash.
    pub fn in_force(&self, hash_u48: u64) {
        self.hash.set(i64::try_from(hash_u48).unwrap_or(0));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JourneyLabel {
    journey: String,
}

/// Journey events: recorded from spans before sampling, published, or lost
/// at shutdown. Recorded = published + dropped + what the node still holds.
#[derive(Debug, Default)]
pub struct JourneyMetrics {
    recorded: Family<JourneyLabel, Counter>,
    published: Family<JourneyLabel, Counter>,
    dropped: Family<Reason, Counter>,
    decoded_spans: Counter,
    /// Totals over every journey, for the exit accounting.
    recorded_total: Counter,
    published_total: Counter,
    pending: Gauge,
}

impl JourneyMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_journey_events_recorded",
            "Journey events recorded from spans that carry a journey's key, before sampling",
            self.recorded.clone(),
        );
        r.register(
            "tailgate_journey_events_published",
            "Journey events confirmed by the broker",
            self.published.clone(),
        );
        r.register(
            "tailgate_journey_events_dropped",
            "Journey events not published, by reason",
            self.dropped.clone(),
        );
        r.register(
            "tailgate_journey_spans_decoded",
            "Spans decoded because their bytes hold a journey key's name (the rest are never decoded for journeys)",
            self.decoded_spans.clone(),
        );
        r.register(
            "tailgate_journey_events_pending",
            "Journey events recorded and not yet confirmed by the broker (batching, or in the outbox)",
            self.pending.clone(),
        );
    }

    pub fn decoded(&self, spans: u64) {
        self.decoded_spans.inc_by(spans);
    }

    pub fn recorded(&self, journey: &str, events: u64) {
        self.recorded
            .get_or_create(&JourneyLabel {
                journey: journey.to_owned(),
            })
            .inc_by(events);
        self.recorded_total.inc_by(events);
    }

    pub fn published(&self, journey: &str, events: u64) {
        self.published
            .get_or_create(&JourneyLabel {
                journey: journey.to_owned(),
            })
            .inc_by(events);
        self.published_total.inc_by(events);
    }

    /// Events still in the outbox when the shutdown grace period ended.
    pub fn dropped_at_shutdown(&self, events: u64) {
        self.dropped
            .get_or_create(&Reason {
                reason: DropReason::ShutdownUnpublished.label(),
            })
            .inc_by(events);
    }

    pub fn set_pending(&self, events: usize) {
        self.pending.set(gauge_value(events));
    }

    /// `(recorded, published, dropped)` over this process's life.
    pub fn totals(&self) -> (u64, u64, u64) {
        let dropped = self
            .dropped
            .get_or_create(&Reason {
                reason: DropReason::ShutdownUnpublished.label(),
            })
            .get();
        (
            self.recorded_total.get(),
            self.published_total.get(),
            dropped,
        )
    }
}

/// Between nodes: forwarding, handoff, membership.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    peers: Gauge,
    membership_changes: Counter,
    forwarded_spans: Family<Peer, Counter>,
    /// `forwarded_spans` over every peer, for the totals logged at exit.
    forwarded_spans_total: Counter,
    forwarded_bytes: Family<Peer, Counter>,
    peer_errors: Family<Peer, Counter>,
    spans_lost_with_peer: Family<Peer, Counter>,
    pub handoff_traces: Counter,
    pub handoff_decisions: Counter,
    pub delivered_spans: Counter,
    forward_queue_bytes: Gauge,
}

impl ClusterMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_cluster_peers",
            "Live nodes in the ring, this one included",
            self.peers.clone(),
        );
        r.register(
            "tailgate_cluster_membership_changes",
            "Changes of the live node set",
            self.membership_changes.clone(),
        );
        r.register(
            "tailgate_cluster_forwarded_spans",
            "Spans delivered to the peer that owns their trace, by peer",
            self.forwarded_spans.clone(),
        );
        r.register(
            "tailgate_cluster_forwarded_bytes",
            "Bytes of those spans, by peer",
            self.forwarded_bytes.clone(),
        );
        r.register(
            "tailgate_cluster_peer_errors",
            "Failed calls to a peer (deliveries are retried), by peer",
            self.peer_errors.clone(),
        );
        r.register(
            "tailgate_cluster_spans_lost_with_peer",
            "Spans this node delivered to a peer that then vanished without leaving, recently enough that it may not have decided them (an upper bound)",
            self.spans_lost_with_peer.clone(),
        );
        r.register(
            "tailgate_cluster_handoff_traces",
            "Buffered traces handed to their new owner after a membership change",
            self.handoff_traces.clone(),
        );
        r.register(
            "tailgate_cluster_handoff_decisions",
            "Remembered decisions handed to their trace's new owner",
            self.handoff_decisions.clone(),
        );
        r.register(
            "tailgate_cluster_delivered_spans",
            "Spans received from peers (forwarded or handed off)",
            self.delivered_spans.clone(),
        );
        r.register(
            "tailgate_cluster_forward_queue_bytes",
            "Bytes waiting to be delivered to peers",
            self.forward_queue_bytes.clone(),
        );
    }

    pub fn set_peers(&self, peers: usize) {
        self.peers.set(gauge_value(peers));
    }

    pub fn set_forward_queue_bytes(&self, bytes: usize) {
        self.forward_queue_bytes.set(gauge_value(bytes));
    }

    pub fn forwarded(&self, peer: &str, spans: usize, bytes: usize) {
        let label = Peer {
            peer: peer.to_owned(),
        };
        self.forwarded_spans
            .get_or_create(&label)
            .inc_by(spans as u64);
        self.forwarded_spans_total.inc_by(spans as u64);
        self.forwarded_bytes
            .get_or_create(&label)
            .inc_by(bytes as u64);
    }

    pub fn peer_error(&self, peer: &str) {
        self.peer_errors
            .get_or_create(&Peer {
                peer: peer.to_owned(),
            })
            .inc();
    }

    pub fn spans_lost_with(&self, peer: &str, spans: usize) {
        self.spans_lost_with_peer
            .get_or_create(&Peer {
                peer: peer.to_owned(),
            })
            .inc_by(spans as u64);
    }

    pub fn membership_change(&self) {
        self.membership_changes.inc();
    }
}

/// Stage 5, publish: the outbox and the broker.
#[derive(Debug)]
pub struct PublishMetrics {
    outbox_messages: Gauge,
    outbox_bytes: Gauge,
    publishes: Family<Outcome, Counter>,
    spans: Counter,
    bytes: Counter,
    connection_errors: Counter,
    connected: Gauge,
    latency: Histogram,
    confirm_latency: Histogram,
}

impl PublishMetrics {
    fn new(buckets: &[f64]) -> Self {
        Self {
            outbox_messages: Gauge::default(),
            outbox_bytes: Gauge::default(),
            publishes: Family::default(),
            spans: Counter::default(),
            bytes: Counter::default(),
            connection_errors: Counter::default(),
            connected: Gauge::default(),
            latency: Histogram::new(buckets.iter().copied()),
            // 1 ms to about 65 s: a broker's confirm takes its disk sync.
            confirm_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
            ),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tailgate_outbox_messages",
            "Kept-trace messages not yet confirmed by the broker",
            self.outbox_messages.clone(),
        );
        r.register(
            "tailgate_outbox_bytes",
            "Bytes of kept-trace messages not yet confirmed by the broker",
            self.outbox_bytes.clone(),
        );
        r.register(
            "tailgate_broker_publishes",
            "Publish attempts by broker outcome (ack, nack, returned, failed); nacked, returned and failed ones are retried",
            self.publishes.clone(),
        );
        r.register(
            "tailgate_spans_published",
            "Spans in messages the broker confirmed",
            self.spans.clone(),
        );
        r.register(
            "tailgate_broker_published_bytes",
            "Bytes of message bodies the broker confirmed, as sent (compressed)",
            self.bytes.clone(),
        );
        r.register(
            "tailgate_broker_connection_errors",
            "Failed or lost broker connections",
            self.connection_errors.clone(),
        );
        r.register(
            "tailgate_broker_connected",
            "1 while the publisher has a confirmed channel to the broker",
            self.connected.clone(),
        );
        r.register(
            "tailgate_traces_publish_latency_seconds",
            "From the root span's arrival (the first span's, if no root came) to the broker's confirm of the kept trace",
            self.latency.clone(),
        );
        r.register(
            "tailgate_broker_confirm_latency_seconds",
            "From publishing a kept trace to the broker's confirm of it",
            self.confirm_latency.clone(),
        );
    }

    pub fn set_outbox(&self, messages: usize, bytes: usize) {
        self.outbox_messages.set(gauge_value(messages));
        self.outbox_bytes.set(gauge_value(bytes));
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.publishes.get_or_create(&Outcome { outcome }).inc();
    }

    /// A kept trace confirmed: `latency_secs` since its root arrived,
    /// `confirm_secs` since it was published.
    pub fn confirmed(&self, spans: usize, bytes: usize, latency_secs: f64, confirm_secs: f64) {
        self.outcome("ack");
        self.spans.inc_by(spans as u64);
        self.bytes.inc_by(bytes as u64);
        self.latency.observe(latency_secs);
        self.confirm_latency.observe(confirm_secs);
    }

    pub fn connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    pub fn is_connected(&self) -> bool {
        self.connected.get() == 1
    }

    pub fn connection_error(&self) {
        self.connection_errors.inc();
    }
}

pub struct Metrics {
    registry: Registry,
    /// Every stage's drops, in one family: the accounting of what is not kept.
    dropped_spans: Family<Reason, Counter>,
    pub receiver: ReceiverMetrics,
    pub buffer: BufferMetrics,
    pub decision: DecisionMetrics,
    pub rules: RulesMetrics,
    pub cluster: ClusterMetrics,
    pub publish: PublishMetrics,
    pub journeys: JourneyMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_decision_wait(std::time::Duration::from_secs(2))
    }

    /// Metrics whose latency histograms resolve the overshoot past `decision_wait`.
    pub fn with_decision_wait(decision_wait: std::time::Duration) -> Self {
        let buckets = latency_buckets(decision_wait.as_secs_f64());
        let mut m = Self {
            registry: Registry::default(),
            dropped_spans: Family::default(),
            receiver: ReceiverMetrics::default(),
            buffer: BufferMetrics::default(),
            decision: DecisionMetrics::new(&buckets),
            rules: RulesMetrics::default(),
            cluster: ClusterMetrics::default(),
            publish: PublishMetrics::new(&buckets),
            journeys: JourneyMetrics::default(),
        };
        let r = &mut m.registry;
        r.register(
            "tailgate_spans_dropped",
            "Spans not kept, by reason",
            m.dropped_spans.clone(),
        );
        m.receiver.register(r);
        m.buffer.register(r);
        m.decision.register(r);
        m.rules.register(r);
        m.cluster.register(r);
        m.publish.register(r);
        m.journeys.register(r);
        m
    }

    pub fn dropped(&self, reason: DropReason, spans: usize) {
        self.dropped_spans
            .get_or_create(&Reason {
                reason: reason.label(),
            })
            .inc_by(spans as u64);
    }

    /// This process's span accounting so far: what it accepted from
    /// clients, took from peers, handed to peers, published, and dropped by
    /// reason. Logged at exit, since the counters end with the process.
    pub fn totals(&self) -> Totals {
        Totals {
            received: self.receiver.spans_total.get(),
            delivered: self.cluster.delivered_spans.get(),
            forwarded: self.cluster.forwarded_spans_total.get(),
            published: self.publish.spans.get(),
            dropped: DropReason::ALL
                .iter()
                .map(|&reason| {
                    let label = reason.label();
                    let n = self
                        .dropped_spans
                        .get_or_create(&Reason { reason: label })
                        .get();
                    (label, n)
                })
                .collect(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Span counts of one process's life; see [`Metrics::totals`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub delivered: u64,
    pub forwarded: u64,
    pub published: u64,
    pub dropped: Vec<(&'static str, u64)>,
}

impl Totals {
    /// Spans this process still held: taken in, and neither handed on,
    /// published nor dropped.
    pub fn held(&self) -> i128 {
        i128::from(self.received) + i128::from(self.delivered)
            - i128::from(self.forwarded)
            - i128::from(self.published)
            - i128::from(self.dropped())
    }

    /// Spans dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped.iter().map(|(_, n)| n).sum()
    }

    /// `reason=spans` pairs, space-separated.
    pub fn dropped_by_reason(&self) -> String {
        let pairs: Vec<String> = self
            .dropped
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        pairs.join(" ")
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The totals logged at exit add up: what came in (from clients and
    /// peers) less what went out (to peers, published, dropped) is what the
    /// process still holds, and every drop reason is listed, zeros too.
    #[test]
    fn totals_account_for_every_span() {
        let m = Metrics::default();
        m.receiver.received("grpc", 10);
        m.receiver.received("http_json", 5);
        m.cluster.delivered_spans.inc_by(4);
        m.cluster.forwarded("10.0.0.2:4319", 3, 300);
        m.publish.confirmed(6, 600, 0.1, 0.01);
        m.dropped(DropReason::Policy, 7);
        m.dropped(DropReason::ShutdownUnpublished, 1);
        let t = m.totals();
        assert_eq!(
            (t.received, t.delivered, t.forwarded, t.published),
            (15, 4, 3, 6)
        );
        assert_eq!(t.dropped(), 8);
        assert_eq!(t.held(), 2);
        assert_eq!(
            t.dropped_by_reason(),
            "policy=7 late_span_of_dropped_trace=0 invalid_span=0 shutdown_unpublished=1 shutdown_undelivered=0"
        );
    }

    /// The latency buckets resolve "decision wait + 100 ms" exactly, and stay ascending.
    #[test]
    fn latency_buckets_resolve_the_overshoot_past_the_wait() {
        let b = latency_buckets(2.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert!(b.iter().any(|&x| (x - 2.1).abs() < 1e-9));
        assert!(b.iter().any(|&x| (x - 2.05).abs() < 1e-9));
        assert_eq!(b.first().copied(), Some(0.005));
    }
}
