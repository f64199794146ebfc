//! Journey events: for every span that carries a journey's key, whatever
//! its trace's fate, one small event, batched per journey and published
//! through the outbox like a kept trace (same confirms, same retries, same
//! `message_id` on republish).
//!
//! Most spans carry no key, and they are never decoded here: a span is
//! decoded only if the key's attribute name occurs in its encoded bytes
//! ([`Journey::may_be_in`]), or if the key is a resource attribute its
//! (already decoded) resource has.

use crate::{
    config::Compression,
    metrics::Metrics,
    publish::{OutMessage, Outbox},
    trace::{Fragment, SPANS},
    wire,
};
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use prost::Message;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tailgate_contract::journey::{Captured, JourneyEvent, JourneyEvents};
use tailgate_sampling_rules::{Journey, Rules, SpanRef, TraceId};
use tokio::time::Instant;

/// How a span's trace was decided, as its events record it.
#[derive(Debug, Clone, Copy)]
pub struct Fate<'a> {
    pub kept: bool,
    pub rule: &'a str,
}

/// Events of one journey waiting to be sent.
#[derive(Debug, Default)]
struct Batch {
    events: Vec<JourneyEvent>,
    /// When the oldest event was recorded.
    since: Option<Instant>,
}

/// Batches events per journey and hands full or old batches to the outbox.
#[derive(Debug)]
pub struct Recorder {
    batches: Mutex<HashMap<Arc<str>, Batch>>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    compression: Compression,
    max_batch: usize,
    flush_after: Duration,
}

impl Recorder {
    pub fn new(
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        compression: Compression,
        max_batch: usize,
        flush_after: Duration,
    ) -> Self {
        Self {
            batches: Mutex::default(),
            outbox,
            metrics,
            compression,
            max_batch: max_batch.max(1),
            flush_after,
        }
    }

    fn batches(&self) -> MutexGuard<'_, HashMap<Arc<str>, Batch>> {
        // Every critical section pushes or takes whole values: a poisoned map is intact.
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the events of a trace's spans (or late spans of it).
    pub fn record(
        &self,
        rules: &Rules,
        trace_id: TraceId,
        fragments: &[Fragment],
        fate: Fate<'_>,
        now: Instant,
    ) {
        let journeys = rules.journeys();
        if journeys.is_empty() {
            return;
        }
        let wanted_attributes: Vec<&str> =
            journeys.iter().flat_map(Journey::span_attributes).collect();
        let reads_events = journeys.iter().any(Journey::reads_events);
        let mut events: Vec<(usize, JourneyEvent)> = Vec::new();
        for fragment in fragments {
            let resource = fragment.resource.decoded.resource.as_ref();
            let scope = fragment.scope.decoded.scope.as_ref();
            // A resource-attribute key is in every span of the fragment or in none.
            let resource_has_key = |j: &Journey| {
                j.resource_attribute_key().is_some_and(|k| {
                    resource.is_some_and(|r| r.attributes.iter().any(|kv| kv.key == k))
                })
            };
            let candidates: Vec<bool> = journeys
                .iter()
                .map(|j| j.span_attribute_key().is_some() || resource_has_key(j))
                .collect();
            if !candidates.contains(&true) {
                continue;
            }
            // The fragment was checked on receipt: it frames, and its spans decode.
            for field in wire::fields(&fragment.spans).flatten() {
                let Ok(bytes) = field.len("span") else {
                    continue;
                };
                if field.number != SPANS {
                    continue;
                }
                let wanted = journeys
                    .iter()
                    .zip(&candidates)
                    .any(|(j, &c)| c && j.may_be_in(bytes));
                if !wanted {
                    continue;
                }
                self.metrics.journeys.decoded(1);
                let Some(span) = lean_span(bytes, &wanted_attributes, reads_events) else {
                    continue;
                };
                let at = SpanRef {
                    resource,
                    scope,
                    span: &span,
                };
                for (i, journey) in journeys.iter().enumerate() {
                    if !candidates[i] {
                        continue;
                    }
                    if let Some(fields) = journey.event(&at) {
                        events.push((i, event(journey, fields, &at, trace_id, fate)));
                    }
                }
            }
        }
        if events.is_empty() {
            return;
        }
        let mut full = Vec::new();
        {
            let mut batches = self.batches();
            for (i, event) in events {
                let journey = &journeys[i];
                self.metrics.journeys.recorded(journey.name(), 1);
                let batch = match batches.get_mut(journey.name()) {
                    Some(b) => b,
                    None => batches.entry(Arc::from(journey.name())).or_default(),
                };
                batch.since.get_or_insert(now);
                batch.events.push(event);
                if batch.events.len() >= self.max_batch {
                    full.push((Arc::from(journey.name()), std::mem::take(batch)));
                }
            }
        }
        for (journey, batch) in full {
            self.send(journey, batch, now);
        }
    }

    /// Sends every batch older than the flush interval (or all, with `all`).
    pub fn flush(&self, now: Instant, all: bool) {
        let due: Vec<(Arc<str>, Batch)> = {
            let mut batches = self.batches();
            batches
                .iter_mut()
                .filter(|(_, b)| {
                    !b.events.is_empty()
                        && (all
                            || b.since.is_some_and(|s| {
                                now.saturating_duration_since(s) >= self.flush_after
                            }))
                })
                .map(|(j, b)| (Arc::clone(j), std::mem::take(b)))
                .collect()
        };
        for (journey, batch) in due {
            self.send(journey, batch, now);
        }
    }

    /// Events recorded and not yet handed to the outbox.
    pub fn pending(&self) -> usize {
        self.batches().values().map(|b| b.events.len()).sum()
    }

    fn send(&self, journey: Arc<str>, batch: Batch, now: Instant) {
        let events = JourneyEvents {
            events: batch.events,
        };
        self.outbox.push(OutMessage::journey_events(
            journey,
            &events,
            self.compression,
            batch.since.unwrap_or(now),
        ));
    }
}

/// `Span` field numbers a journey event reads besides the attributes.
const SPAN_ID: u32 = 2;
const TRACE_STATE: u32 = 3;
const NAME: u32 = 5;
const KIND: u32 = 6;
const START: u32 = 7;
const END: u32 = 8;
const ATTRIBUTES: u32 = 9;
const STATUS: u32 = 15;
/// `KeyValue.key`.
const KEY: u32 = 1;

/// The span with only what journeys read: its ID, name, kind, times,
/// status, trace state, and the attributes in `wanted`. Events, links and
/// every other attribute are skipped on the wire, never decoded: a span is
/// mostly those, and with journeys on every span with a key passes here.
/// The whole span is decoded only if a journey reads event names.
fn lean_span(bytes: &[u8], wanted: &[&str], with_events: bool) -> Option<Span> {
    if with_events {
        return Span::decode(bytes).ok();
    }
    let mut lean: Vec<u8> = Vec::with_capacity(128);
    for field in wire::fields(bytes) {
        let field = field.ok()?;
        let keep = match field.number {
            SPAN_ID | TRACE_STATE | NAME | KIND | START | END | STATUS => true,
            ATTRIBUTES => {
                let kv = field.len("attribute").ok()?;
                wire::fields(kv)
                    .flatten()
                    .find(|f| f.number == KEY)
                    .and_then(|f| f.len("key").ok())
                    .is_some_and(|key| wanted.iter().any(|w| w.as_bytes() == key))
            }
            _ => false,
        };
        if keep {
            lean.extend_from_slice(field.raw);
        }
    }
    Span::decode(lean.as_slice()).ok()
}

fn event(
    journey: &Journey,
    fields: tailgate_sampling_rules::JourneyFields,
    at: &SpanRef<'_>,
    trace_id: TraceId,
    fate: Fate<'_>,
) -> JourneyEvent {
    let span = at.span;
    JourneyEvent {
        journey: journey.name().to_owned(),
        key: fields.key,
        status: fields.status,
        time_unix_nano: span.start_time_unix_nano,
        service: at.service_name().unwrap_or("unknown").to_owned(),
        span_name: span.name.clone(),
        trace_id: trace_id.0.to_vec(),
        span_id: span.span_id.clone(),
        error: span
            .status
            .as_ref()
            .is_some_and(|s| s.code == StatusCode::Error as i32),
        kept: fate.kept,
        rule: fate.rule.to_owned(),
        captured: fields
            .captured
            .into_iter()
            .map(|(field, value)| Captured { field, value })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value::Value},
        trace::v1::{Status, span::Event},
    };

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    /// The lean decode keeps what journeys read, exactly as a full decode
    /// has it, and leaves out events, links and unwanted attributes.
    #[test]
    fn lean_span_keeps_only_what_journeys_read() {
        let full = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            trace_state: "ot=th:8".into(),
            name: "PUT /crm/orders/{id}".into(),
            kind: 2,
            start_time_unix_nano: 10,
            end_time_unix_nano: 20,
            attributes: vec![
                kv("user.email", "a@b.c"),
                kv("order.id", "4711"),
                kv("order.status", "NEW"),
            ],
            events: vec![Event {
                name: "exception".into(),
                ..Default::default()
            }],
            status: Some(Status {
                code: 2,
                message: "boom".into(),
            }),
            ..Default::default()
        };
        let bytes = full.encode_to_vec();
        let lean = lean_span(&bytes, &["order.id", "order.status"], false).unwrap();
        assert_eq!(lean.attributes, full.attributes[1..]);
        assert!(lean.events.is_empty() && lean.trace_id.is_empty());
        assert_eq!(
            (
                &lean.span_id,
                &lean.name,
                lean.kind,
                lean.start_time_unix_nano,
                lean.end_time_unix_nano
            ),
            (
                &full.span_id,
                &full.name,
                full.kind,
                full.start_time_unix_nano,
                full.end_time_unix_nano
            )
        );
        assert_eq!(
            (&lean.status, &lean.trace_state),
            (&full.status, &full.trace_state)
        );
        assert_eq!(
            lean_span(&bytes, &[], true),
            Some(full),
            "event names need the whole span"
        );
    }
}
