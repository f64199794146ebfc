//! Stage 4, decide: apply the sampling rules to a whole trace, remember the
//! decision, and hand kept traces to the publisher, marked with the decision
//! and redacted as the rules say.
//!
//! The rules sit behind an atomic pointer: a reload swaps in a new version
//! between two decisions, never during one.

pub mod cache;
pub mod journeys;
pub mod reload;

use crate::{
    buffer::{TakenTrace, Trigger},
    config::Compression,
    metrics::{DropReason, Metrics},
    publish::{OutMessage, Outbox},
    trace::{Decoded, DecodedTrace, Detail, TraceBatch, decode, into_request},
};
use arc_swap::ArcSwap;
use cache::{DecisionCache, Verdict};
use journeys::{Fate, Recorder};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use std::sync::Arc;
use tailgate_sampling_rules::{Decision, Kept, Rules, SpanRef, TraceId, TraceView, with_threshold};
use tokio::time::Instant;

/// Attribute naming the rule that kept a span's trace.
pub const RULE_ATTRIBUTE: &str = "sampling.rule";
/// Attribute with how many traces the kept one stands for.
pub const ADJUSTED_COUNT_ATTRIBUTE: &str = "sampling.adjusted_count";

#[derive(Debug)]
pub struct Decider {
    rules: ArcSwap<Rules>,
    cache: DecisionCache,
    metrics: Arc<Metrics>,
    outbox: Arc<Outbox>,
    /// Kept traces are compressed here, on the deciding thread, once: the
    /// outbox holds them compressed and a retry publishes the same bytes.
    compression: Compression,
    journeys: Recorder,
}

impl Decider {
    pub fn new(
        rules: Arc<Rules>,
        cache: DecisionCache,
        metrics: Arc<Metrics>,
        outbox: Arc<Outbox>,
        compression: Compression,
        journeys: Recorder,
    ) -> Self {
        Self {
            rules: ArcSwap::new(rules),
            cache,
            metrics,
            outbox,
            compression,
            journeys,
        }
    }

    /// Journey events waiting to be batched out.
    pub fn journeys(&self) -> &Recorder {
        &self.journeys
    }

    pub fn cache(&self) -> &DecisionCache {
        &self.cache
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Puts new rules in force for every later decision.
    pub fn set_rules(&self, rules: Arc<Rules>) {
        self.rules.store(rules);
    }

    /// Decides a trace taken from the buffer, remembers the decision, and
    /// queues the trace for publishing if kept.
    pub fn decide(&self, trace: TakenTrace, trigger: Trigger, now: Instant) -> Verdict {
        let rules = self.rules.load();
        // Most traces are dropped: decode only what the rules read, and the
        // rest of a kept trace's spans once it is kept.
        let detail = if rules.reads_span_attributes() {
            Detail::Full
        } else {
            Detail::Summary
        };
        let (fragments, undecodable) = decode(&trace.fragments, detail);
        self.count_undecodable(undecodable);
        let view = DecodedTrace {
            trace_id: trace.trace_id,
            fragments,
        };
        let decision = rules.decide(&view, now.into_std());
        self.journeys.record(
            &rules,
            trace.trace_id,
            &trace.fragments,
            Fate {
                kept: decision.is_keep(),
                rule: decision.rule().as_str(),
            },
            now,
        );
        let latency = now.saturating_duration_since(trace.received_at);
        self.metrics.decision.decided(
            decision.is_keep(),
            decision.rule().as_str(),
            trigger.label(),
            latency.as_secs_f64(),
        );
        let verdict = match decision {
            Decision::Keep(kept) => {
                let root_service: Arc<str> = root_service(&view).unwrap_or("unknown").into();
                let fragments = match detail {
                    Detail::Full => view.fragments,
                    Detail::Summary => {
                        // A full decode fails wherever a summary does (and
                        // never should): count only spans not counted yet.
                        let (full, failed) = decode(&trace.fragments, Detail::Full);
                        self.count_undecodable(failed.saturating_sub(undecodable));
                        full
                    }
                };
                self.publish(
                    trace.trace_id,
                    &kept,
                    &root_service,
                    fragments,
                    trace.received_at,
                );
                Verdict::keep(kept, root_service)
            }
            Decision::Drop { .. } => {
                self.metrics.dropped(DropReason::Policy, trace.span_count);
                Verdict::Drop
            }
        };
        self.cache.insert(trace.trace_id, verdict.clone(), now);
        verdict
    }

    /// Spans that arrived after their trace was decided follow that decision.
    pub fn late(&self, batch: TraceBatch, verdict: &Verdict, now: Instant) {
        let fate = match verdict {
            Verdict::Keep(k) => Fate {
                kept: true,
                rule: k.kept.rule.as_str(),
            },
            Verdict::Drop => Fate {
                kept: false,
                rule: "",
            },
        };
        self.journeys.record(
            &self.rules.load(),
            batch.trace_id,
            &batch.fragments,
            fate,
            now,
        );
        match verdict {
            Verdict::Keep(k) => {
                self.metrics.decision.late(true, batch.span_count);
                let (fragments, undecodable) = decode(&batch.fragments, Detail::Full);
                self.count_undecodable(undecodable);
                self.publish(batch.trace_id, &k.kept, &k.root_service, fragments, now);
            }
            Verdict::Drop => {
                self.metrics.decision.late(false, batch.span_count);
                self.metrics
                    .dropped(DropReason::LateSpanOfDroppedTrace, batch.span_count);
            }
        }
    }

    /// Buffered spans were checked on arrival, so none should fail to
    /// decode; any that did are counted, never silently lost.
    fn count_undecodable(&self, spans: usize) {
        if spans > 0 {
            self.metrics.dropped(DropReason::InvalidSpan, spans);
        }
    }

    fn publish(
        &self,
        trace_id: TraceId,
        kept: &Kept,
        root_service: &Arc<str>,
        mut fragments: Vec<Decoded>,
        received_at: Instant,
    ) {
        let span_count = annotate(&mut fragments, kept);
        let mut request = into_request(fragments);
        self.rules.load().redaction().apply(&mut request);
        self.outbox.push(OutMessage::new(
            trace_id,
            kept,
            Arc::clone(root_service),
            span_count,
            &request,
            self.compression,
            received_at,
        ));
    }
}

/// The `service.name` of the trace's root span, if the root arrived.
fn root_service(trace: &DecodedTrace) -> Option<&str> {
    trace
        .spans()
        .find(SpanRef::is_root)
        .and_then(|s| s.service_name())
}

/// Marks every span with the decision: `sampling.rule`,
/// `sampling.adjusted_count`, and the OTEP 235 threshold in its tracestate.
/// Returns the number of spans.
fn annotate(fragments: &mut [Decoded], kept: &Kept) -> usize {
    let mut count = 0;
    for span in fragments.iter_mut().flat_map(|f| f.spans.iter_mut()) {
        let (trace_state, effective) =
            with_threshold(&span.trace_state, kept.threshold, kept.randomness);
        let adjusted_count = effective.map_or(kept.adjusted_count, |t| t.adjusted_count());
        span.trace_state = trace_state;
        span.attributes
            .retain(|kv| kv.key != RULE_ATTRIBUTE && kv.key != ADJUSTED_COUNT_ATTRIBUTE);
        span.attributes.push(KeyValue {
            key: RULE_ATTRIBUTE.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(kept.rule.as_str().into())),
            }),
            ..Default::default()
        });
        span.attributes.push(KeyValue {
            key: ADJUSTED_COUNT_ATTRIBUTE.into(),
            value: Some(AnyValue {
                value: Some(Value::DoubleValue(adjusted_count)),
            }),
            ..Default::default()
        });
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::tests::{request, span, split_request};
    use tailgate_sampling_rules::{RuleName, Threshold};

    /// Kept spans carry the rule, the adjusted count and `ot=th` in their tracestate.
    #[test]
    fn annotation() {
        let mut routed = split_request(&request(vec![(
            "svc",
            vec![span(1, 1, None), span(1, 2, Some(1))],
        )]));
        let mut fragments = decode(&routed.batches.remove(0).fragments, Detail::Full).0;
        fragments[0].spans[1].trace_state = "vendor=1".into();
        let kept = Kept::at(RuleName::new("random"), Threshold::from_th("8").unwrap());
        assert_eq!(annotate(&mut fragments, &kept), 2);
        let s = &fragments[0].spans[1];
        assert_eq!(s.trace_state, "ot=th:8,vendor=1");
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone())
        };
        assert_eq!(
            attr(RULE_ATTRIBUTE).and_then(|v| v.value),
            Some(Value::StringValue("random".into()))
        );
        assert_eq!(
            attr(ADJUSTED_COUNT_ATTRIBUTE).and_then(|v| v.value),
            Some(Value::DoubleValue(2.0))
        );
    }
}
