//! Prometheus metrics of a gateway node.
//!
//! Counters are named `tailgate_<what>_<unit>_total` (the `_total` suffix is
//! added by the client library). Every span that is not kept is counted in
//! `tailgate_spans_dropped_total` with the reason.

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

pub struct Metrics {
    registry: Registry,
    received_spans: Family<Protocol, Counter>,
    requests: Family<RequestOutcome, Counter>,
    dropped_spans: Family<Reason, Counter>,
    decided_traces: Family<DecisionRule, Counter>,
    decision_triggers: Family<Trigger, Counter>,
    late_spans: Family<Decision, Counter>,
    published_messages: Family<Outcome, Counter>,
    published_spans: Counter,
    published_bytes: Counter,
    broker_connection_errors: Counter,
    forwarded_spans: Family<Peer, Counter>,
    forwarded_bytes: Family<Peer, Counter>,
    peer_errors: Family<Peer, Counter>,
    spans_lost_with_peer: Family<Peer, Counter>,
    membership_changes: Counter,
    pub handoff_traces: Counter,
    pub handoff_decisions: Counter,
    pub delivered_spans: Counter,
    pub cluster_peers: Gauge,
    pub forward_queue_bytes: Gauge,
    rules_reloads: Counter,
    rules_reload_failures: Counter,
    pub rules_hash: Gauge,
    pub buffer_traces: Gauge,
    pub buffer_bytes: Gauge,
    pub outbox_messages: Gauge,
    pub outbox_bytes: Gauge,
    pub decision_cache_entries: Gauge,
    pub broker_connected: Gauge,
    decision_latency: Histogram,
    publish_latency: Histogram,
    confirm_latency: Histogram,
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
            received_spans: Family::default(),
            requests: Family::default(),
            dropped_spans: Family::default(),
            decided_traces: Family::default(),
            decision_triggers: Family::default(),
            late_spans: Family::default(),
            published_messages: Family::default(),
            published_spans: Counter::default(),
            published_bytes: Counter::default(),
            broker_connection_errors: Counter::default(),
            forwarded_spans: Family::default(),
            forwarded_bytes: Family::default(),
            peer_errors: Family::default(),
            spans_lost_with_peer: Family::default(),
            membership_changes: Counter::default(),
            handoff_traces: Counter::default(),
            handoff_decisions: Counter::default(),
            delivered_spans: Counter::default(),
            cluster_peers: Gauge::default(),
            forward_queue_bytes: Gauge::default(),
            rules_reloads: Counter::default(),
            rules_reload_failures: Counter::default(),
            rules_hash: Gauge::default(),
            buffer_traces: Gauge::default(),
            buffer_bytes: Gauge::default(),
            outbox_messages: Gauge::default(),
            outbox_bytes: Gauge::default(),
            decision_cache_entries: Gauge::default(),
            broker_connected: Gauge::default(),
            decision_latency: Histogram::new(buckets.iter().copied()),
            publish_latency: Histogram::new(buckets),
            // 1 ms to about 65 s: a broker's confirm takes its disk sync.
            confirm_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
            ),
        };
        let r = &mut m.registry;
        r.register(
            "tailgate_received_spans",
            "Spans accepted from clients, by protocol (grpc, http_protobuf, http_json)",
            m.received_spans.clone(),
        );
        r.register(
            "tailgate_receiver_requests",
            "Export requests by protocol and outcome (ok, partial, invalid, too_large, pushback, unsupported)",
            m.requests.clone(),
        );
        r.register(
            "tailgate_spans_dropped",
            "Spans not kept, by reason",
            m.dropped_spans.clone(),
        );
        r.register(
            "tailgate_traces_decided",
            "Traces decided, by decision (keep, drop) and rule",
            m.decided_traces.clone(),
        );
        r.register(
            "tailgate_decision_triggers",
            "What made a trace due for its decision (root_wait, timeout, span_limit, byte_limit, memory_pressure, shutdown)",
            m.decision_triggers.clone(),
        );
        r.register(
            "tailgate_late_spans",
            "Spans that arrived after their trace was decided, by that decision",
            m.late_spans.clone(),
        );
        r.register(
            "tailgate_published_messages",
            "Publish attempts by broker outcome (ack, nack, returned, failed); nacked, returned and failed ones are retried",
            m.published_messages.clone(),
        );
        r.register(
            "tailgate_published_spans",
            "Spans in messages the broker confirmed",
            m.published_spans.clone(),
        );
        r.register(
            "tailgate_published_bytes",
            "Bytes of message bodies the broker confirmed, as sent (compressed)",
            m.published_bytes.clone(),
        );
        r.register(
            "tailgate_broker_connection_errors",
            "Failed or lost broker connections",
            m.broker_connection_errors.clone(),
        );
        r.register(
            "tailgate_cluster_peers",
            "Live nodes in the ring, this one included",
            m.cluster_peers.clone(),
        );
        r.register(
            "tailgate_cluster_membership_changes",
            "Changes of the live node set",
            m.membership_changes.clone(),
        );
        r.register(
            "tailgate_cluster_forwarded_spans",
            "Spans delivered to the peer that owns their trace, by peer",
            m.forwarded_spans.clone(),
        );
        r.register(
            "tailgate_cluster_forwarded_bytes",
            "Bytes of those spans, by peer",
            m.forwarded_bytes.clone(),
        );
        r.register(
            "tailgate_cluster_peer_errors",
            "Failed calls to a peer (deliveries are retried), by peer",
            m.peer_errors.clone(),
        );
        r.register(
            "tailgate_cluster_spans_lost_with_peer",
            "Spans this node delivered to a peer that then vanished without leaving, recently enough that it may not have decided them (an upper bound)",
            m.spans_lost_with_peer.clone(),
        );
        r.register(
            "tailgate_cluster_handoff_traces",
            "Buffered traces handed to their new owner after a membership change",
            m.handoff_traces.clone(),
        );
        r.register(
            "tailgate_cluster_handoff_decisions",
            "Remembered decisions handed to their trace's new owner",
            m.handoff_decisions.clone(),
        );
        r.register(
            "tailgate_cluster_delivered_spans",
            "Spans received from peers (forwarded or handed off)",
            m.delivered_spans.clone(),
        );
        r.register(
            "tailgate_cluster_forward_queue_bytes",
            "Bytes waiting to be delivered to peers",
            m.forward_queue_bytes.clone(),
        );
        r.register(
            "tailgate_rules_reloads",
            "Changed rules files validated and put in force",
            m.rules_reloads.clone(),
        );
        r.register(
            "tailgate_rules_reload_failures",
            "Changed rules files refused as invalid (the previous rules stay in force)",
            m.rules_reload_failures.clone(),
        );
        r.register(
            "tailgate_rules_hash",
            "First 48 bits of the SHA-256 of the rules in force; differs between nodes running different rules",
            m.rules_hash.clone(),
        );
        r.register(
            "tailgate_buffer_traces",
            "Traces waiting for their decision",
            m.buffer_traces.clone(),
        );
        r.register(
            "tailgate_buffer_bytes",
            "Encoded OTLP bytes of buffered spans",
            m.buffer_bytes.clone(),
        );
        r.register(
            "tailgate_outbox_messages",
            "Kept-trace messages not yet confirmed by the broker",
            m.outbox_messages.clone(),
        );
        r.register(
            "tailgate_outbox_bytes",
            "Bytes of kept-trace messages not yet confirmed by the broker",
            m.outbox_bytes.clone(),
        );
        r.register(
            "tailgate_decision_cache_entries",
            "Remembered decisions, for late spans",
            m.decision_cache_entries.clone(),
        );
        r.register(
            "tailgate_broker_connected",
            "1 while the publisher has a confirmed channel to the broker",
            m.broker_connected.clone(),
        );
        r.register(
            "tailgate_decision_latency_seconds",
            "From the root span's arrival (the first span's, if no root came) to the decision",
            m.decision_latency.clone(),
        );
        r.register(
            "tailgate_publish_latency_seconds",
            "From the root span's arrival (the first span's, if no root came) to the broker's confirm of the kept trace",
            m.publish_latency.clone(),
        );
        r.register(
            "tailgate_broker_confirm_latency_seconds",
            "From publishing a kept trace to the broker's confirm of it",
            m.confirm_latency.clone(),
        );
        m
    }

    pub fn received(&self, protocol: &'static str, spans: usize) {
        self.received_spans
            .get_or_create(&Protocol { protocol })
            .inc_by(spans as u64);
    }

    pub fn request(&self, protocol: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestOutcome { protocol, outcome })
            .inc();
    }

    pub fn dropped(&self, reason: DropReason, spans: usize) {
        self.dropped_spans
            .get_or_create(&Reason {
                reason: reason.label(),
            })
            .inc_by(spans as u64);
    }

    pub fn decided(&self, keep: bool, rule: &str, trigger: &'static str, latency_secs: f64) {
        let decision = if keep { "keep" } else { "drop" };
        self.decided_traces
            .get_or_create(&DecisionRule {
                decision,
                rule: rule.to_owned(),
            })
            .inc();
        self.decision_triggers
            .get_or_create(&Trigger { trigger })
            .inc();
        self.decision_latency.observe(latency_secs);
    }

    pub fn late(&self, keep: bool, spans: usize) {
        let decision = if keep { "keep" } else { "drop" };
        self.late_spans
            .get_or_create(&Decision { decision })
            .inc_by(spans as u64);
    }

    pub fn publish_outcome(&self, outcome: &'static str) {
        self.published_messages
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    /// A kept trace confirmed: `latency_secs` since its root arrived,
    /// `confirm_secs` since it was published.
    pub fn confirmed(&self, spans: usize, bytes: usize, latency_secs: f64, confirm_secs: f64) {
        self.publish_outcome("ack");
        self.published_spans.inc_by(spans as u64);
        self.published_bytes.inc_by(bytes as u64);
        self.publish_latency.observe(latency_secs);
        self.confirm_latency.observe(confirm_secs);
    }

    pub fn rules_reloaded(&self, ok: bool) {
        if ok {
            self.rules_reloads.inc();
        } else {
            self.rules_reload_failures.inc();
        }
    }

    pub fn forwarded(&self, peer: &str, spans: usize, bytes: usize) {
        let label = Peer {
            peer: peer.to_owned(),
        };
        self.forwarded_spans
            .get_or_create(&label)
            .inc_by(spans as u64);
        self.forwarded_bytes
            .get_or_create(&label)
            .inc_by(bytes as u64);
    }

    pub fn cluster_peer_error(&self, peer: &str) {
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

    pub fn cluster_membership_change(&self) {
        self.membership_changes.inc();
    }

    pub fn broker_connection_error(&self) {
        self.broker_connection_errors.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
