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
    wire::{self, Value, len_field_size, put_len_field, put_varint},
};
use opentelemetry_proto::tonic::{
    common::v1::any_value,
    resource::v1::Resource,
    trace::v1::{Span, status::StatusCode},
};
use prost::{
    Message,
    encoding::{WireType, encoded_len_varint},
};
use smallvec::{SmallVec, smallvec};
use std::{
    borrow::Cow,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tailgate_sampling_rules::{Journey, MAX_VALUE_BYTES, Rules, SpanRef, TraceId};
use tokio::time::Instant;

/// How a span's trace was decided, as its events record it.
#[derive(Debug, Clone, Copy)]
pub struct Fate<'a> {
    pub kept: bool,
    pub rule: &'a str,
}

/// Events of one journey waiting to be sent, already encoded: the body of a
/// `JourneyEvents` message is its events' fields one after the other, then
/// the batch's own fields ([`finish`]).
#[derive(Debug, Default)]
struct Batch {
    encoded: Vec<u8>,
    events: usize,
    /// When the oldest event was recorded.
    since: Option<Instant>,
    said: Said,
}

/// What the batch's last event said, which the next one repeats by a bit
/// of `repeats` rather than writing it again, and the captured fields'
/// names the batch's events refer to by index (`JourneyEvents::resolve`
/// reads them back). The spans of a trace are decided together and share
/// an order, a trace, mostly a service and a status: repeating those makes
/// an event less than half as long to write, compress and send.
#[derive(Debug, Default)]
struct Said {
    any: bool,
    key: Vec<u8>,
    status: Vec<u8>,
    service: Vec<u8>,
    trace_id: Vec<u8>,
    kept: bool,
    rule: Vec<u8>,
    captured: Vec<(u64, Vec<u8>)>,
    fields: Vec<Vec<u8>>,
}

/// Whether `now` repeats `said`, which it then becomes.
fn repeats(said: &mut Vec<u8>, now: &[u8]) -> bool {
    if said == now {
        return true;
    }
    said.clear();
    said.extend_from_slice(now);
    false
}

/// Bytes reserved per event of a new batch, so that it rarely grows.
const EVENT_BYTES: usize = 192;
/// Batch buffers kept for reuse once their batch is compressed. A fresh
/// buffer of a few hundred kilobytes costs page faults (the kernel zeroes
/// every page): 8% of a gateway's CPU when every span gave an event.
const SPARE_BUFFERS: usize = 4;

/// Batches events per journey and hands full or old batches to the outbox.
#[derive(Debug)]
pub struct Recorder {
    batches: Mutex<Vec<(Arc<str>, Batch)>>,
    spare: Mutex<Vec<Vec<u8>>>,
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
            spare: Mutex::default(),
            outbox,
            metrics,
            compression,
            max_batch: max_batch.max(1),
            flush_after,
        }
    }

    fn batches(&self) -> MutexGuard<'_, Vec<(Arc<str>, Batch)>> {
        // Every critical section appends whole events or takes whole
        // batches: a poisoned lock's value is intact.
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the events of a trace's spans (or late spans of it),
    /// encoding each straight into its journey's batch.
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
        let mut full = Vec::new();
        {
            let mut batches = self.batches();
            // Journey i's batch is batches[slot[i]]; batches of journeys a
            // reload removed stay until they are sent.
            let slot: SmallVec<[usize; 4]> = journeys
                .iter()
                .map(
                    |j| match batches.iter().position(|(name, _)| **name == *j.name()) {
                        Some(s) => s,
                        None => {
                            batches.push((Arc::from(j.name()), Batch::default()));
                            batches.len() - 1
                        }
                    },
                )
                .collect();
            let mut counts: SmallVec<[u64; 4]> = smallvec![0; journeys.len()];
            let decoded = events(rules, trace_id, fragments, fate, true, &mut |i, event| {
                let batch = &mut batches[slot[i]].1;
                if batch.events == 0 {
                    if batch.encoded.capacity() == 0 {
                        batch.encoded = self.buffer();
                    }
                    batch.since = Some(now);
                }
                put_event(&mut batch.encoded, &mut batch.said, event);
                batch.events += 1;
                counts[i] += 1;
            });
            self.metrics.journeys.decoded(decoded);
            for (i, journey) in journeys.iter().enumerate() {
                if counts[i] == 0 {
                    continue;
                }
                self.metrics.journeys.recorded(journey.name(), counts[i]);
                let (name, batch) = &mut batches[slot[i]];
                if batch.events >= self.max_batch {
                    full.push((Arc::clone(name), std::mem::take(batch)));
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
                    b.events > 0
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
        self.batches().iter().map(|(_, b)| b.events).sum()
    }

    /// A buffer for a new batch: a spare one, or a fresh one.
    fn buffer(&self) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| Vec::with_capacity(self.max_batch * EVENT_BYTES))
    }

    fn send(&self, journey: Arc<str>, mut batch: Batch, now: Instant) {
        finish(&mut batch.encoded, &journey, &batch.said);
        let (compression, body) = match self.compression.compressed(&batch.encoded) {
            Some(compressed) => {
                let mut buffer = batch.encoded;
                buffer.clear();
                let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
                if spare.len() < SPARE_BUFFERS {
                    spare.push(buffer);
                }
                (self.compression, compressed)
            }
            None => (Compression::None, batch.encoded),
        };
        self.outbox.push(OutMessage::journey_events(
            journey,
            body,
            compression,
            batch.events,
            batch.since.unwrap_or(now),
        ));
    }
}

/// `service.name` of a resource, if it is a string.
fn service_name(resource: Option<&Resource>) -> &str {
    resource
        .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
}

/// Hands `sink` the events of a trace's spans, with the index of their
/// journey in the rules; returns how many spans were looked at. With
/// `fast`, journeys that read only span attributes, under rules that redact
/// nothing, are read from the wire without decoding anything
/// ([`wire_span`]); the others decode the span lean.
fn events(
    rules: &Rules,
    trace_id: TraceId,
    fragments: &[Fragment],
    fate: Fate<'_>,
    fast: bool,
    sink: &mut dyn FnMut(usize, &EventOut<'_>),
) -> u64 {
    let journeys = rules.journeys();
    let redaction = rules.redaction();
    let plans = rules
        .journey_attribute_plans()
        .filter(|_| fast && redaction.is_empty());
    let lean_wanted: Vec<&str> = if plans.is_none() {
        journeys.iter().flat_map(Journey::span_attributes).collect()
    } else {
        Vec::new()
    };
    let reads_events = journeys.iter().any(Journey::reads_events);
    // Journeys keyed by a span attribute may be in any span; the others
    // only under a resource that has their key.
    let all_span_keyed = journeys.iter().all(|j| j.span_attribute_key().is_some());
    // On the stack for the usual few journeys and attributes: this runs
    // for every decided trace.
    let mut candidates: SmallVec<[bool; 4]> = smallvec![true; journeys.len()];
    let mut values: SmallVec<[Option<&[u8]>; 8]> =
        smallvec![None; plans.map_or(0, |p| p.wanted.len())];
    let mut captured: SmallVec<[CapturedOut<'_>; 4]> = SmallVec::new();
    let mut looked_at = 0;
    for fragment in fragments {
        let resource = fragment.resource.decoded.resource.as_ref();
        let scope = fragment.scope.decoded.scope.as_ref();
        if !all_span_keyed {
            for (c, j) in candidates.iter_mut().zip(journeys) {
                *c = j.span_attribute_key().is_some()
                    || j.resource_attribute_key().is_some_and(|k| {
                        resource.is_some_and(|r| r.attributes.iter().any(|kv| kv.key == k))
                    });
            }
            if !candidates.contains(&true) {
                continue;
            }
        }
        let service = service_name(resource);
        // Events leave the gateway whatever the trace's fate: the rules'
        // redaction applies to what they carry, as to kept spans.
        let redacted_resource = (!redaction.is_empty()).then(|| {
            let mut r = resource.cloned().unwrap_or_default();
            redaction.attributes(&mut r.attributes);
            r
        });
        let resource = redacted_resource.as_ref().or(resource);
        // The fragment was checked on receipt: it frames, and its spans decode.
        for field in wire::checked(&fragment.spans) {
            let (SPANS, Value::Len(bytes)) = field else {
                continue;
            };
            let wanted = journeys
                .iter()
                .zip(&candidates)
                .any(|(j, &c)| c && j.may_be_in(bytes));
            if !wanted {
                continue;
            }
            looked_at += 1;
            if let Some(plans) = &plans {
                let Some(span) = wire_span(bytes, &plans.wanted, &mut values) else {
                    continue;
                };
                for (i, plan) in plans.journeys.iter().enumerate() {
                    let value = |at: usize| values[at].and_then(any_value_text).map(bounded);
                    let Some(key) = value(plan.key).filter(|k| !k.is_empty()) else {
                        continue;
                    };
                    let status = plan.status.and_then(value).unwrap_or_default();
                    captured.clear();
                    for (label, at) in &plan.captures {
                        if let Some(v) = value(*at) {
                            captured.push((label.as_bytes(), v));
                        }
                    }
                    sink(
                        i,
                        &EventOut {
                            key: &key,
                            status: &status,
                            time: span.start,
                            service: service.as_bytes(),
                            span_name: span.name,
                            trace_id: &trace_id.0,
                            span_id: span.span_id,
                            error: span.error,
                            fate,
                            captured: &captured,
                        },
                    );
                }
                continue;
            }
            let Some(mut span) = lean_span(bytes, &lean_wanted, reads_events) else {
                continue;
            };
            if !redaction.is_empty() {
                redaction.attributes(&mut span.attributes);
            }
            let at = SpanRef {
                resource,
                scope,
                span: &span,
            };
            for (i, journey) in journeys.iter().enumerate() {
                if !candidates[i] {
                    continue;
                }
                let Some(fields) = journey.event(&at) else {
                    continue;
                };
                let captured: Vec<(&[u8], Cow<'_, [u8]>)> = fields
                    .captured
                    .iter()
                    .map(|(f, v)| (f.as_bytes(), Cow::Borrowed(v.as_bytes())))
                    .collect();
                sink(
                    i,
                    &EventOut {
                        key: fields.key.as_bytes(),
                        status: fields.status.as_bytes(),
                        time: span.start_time_unix_nano,
                        service: at
                            .service_name()
                            .filter(|s| !s.is_empty())
                            .unwrap_or("unknown")
                            .as_bytes(),
                        span_name: span.name.as_bytes(),
                        trace_id: &trace_id.0,
                        span_id: &span.span_id,
                        error: span
                            .status
                            .as_ref()
                            .is_some_and(|s| s.code == StatusCode::Error as i32),
                        fate,
                        captured: &captured,
                    },
                );
            }
        }
    }
    looked_at
}

/// A value cut to [`tailgate_sampling_rules::MAX_VALUE_BYTES`] at a UTF-8
/// character boundary (the bytes were checked to be UTF-8 on receipt).
fn bounded(text: Cow<'_, [u8]>) -> Cow<'_, [u8]> {
    let mut end = text.len().min(MAX_VALUE_BYTES);
    // A continuation byte is 0b10xx_xxxx: back off to a character's start.
    while end < text.len() && end > 0 && text[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(&s[..end]),
        Cow::Owned(mut s) => {
            s.truncate(end);
            Cow::Owned(s)
        }
    }
}

/// What a span's wire bytes say, without decoding: its ID, name, start,
/// and whether it failed.
struct WireSpan<'a> {
    span_id: &'a [u8],
    name: &'a [u8],
    start: u64,
    error: bool,
}

/// Reads a span's [`WireSpan`], and in `values[i]` the encoded value of
/// the attribute named `wanted[i]` (the last one, as prost keeps it), if
/// the span has it. Strings stay bytes: they were checked to be UTF-8 on
/// receipt, and go out as they came in.
fn wire_span<'a>(
    bytes: &'a [u8],
    wanted: &[String],
    values: &mut [Option<&'a [u8]>],
) -> Option<WireSpan<'a>> {
    values.fill(None);
    let mut span = WireSpan {
        span_id: &[],
        name: &[],
        start: 0,
        error: false,
    };
    for (number, value) in wire::checked(bytes) {
        match (number, value) {
            (SPAN_ID, Value::Len(b)) => span.span_id = b,
            (NAME, Value::Len(b)) => span.name = b,
            (START, Value::Fixed64(t)) => span.start = t,
            (STATUS, Value::Len(b)) => {
                for (n, v) in wire::checked(b) {
                    if let (STATUS_CODE, Value::Varint(code)) = (n, v) {
                        span.error = code == StatusCode::Error as u64;
                    }
                }
            }
            (ATTRIBUTES, Value::Len(kv)) => {
                let mut key: &[u8] = &[];
                let mut value: &[u8] = &[];
                for part in wire::checked(kv) {
                    match part {
                        (KEY, Value::Len(k)) => key = k,
                        (VALUE, Value::Len(v)) => value = v,
                        _ => {}
                    }
                }
                if let Some(at) = wanted.iter().position(|w| w.as_bytes() == key) {
                    values[at] = Some(value);
                }
            }
            _ => {}
        }
    }
    Some(span)
}

/// An encoded `AnyValue` as the rules read it as text: scalars only.
fn any_value_text(bytes: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut text = None;
    // A oneof's last field wins, as in prost.
    for field in wire::checked(bytes) {
        text = match field {
            (1, Value::Len(s)) => Some(Cow::Borrowed(s)),
            (2, Value::Varint(b)) => Some(Cow::Owned((b != 0).to_string().into_bytes())),
            #[allow(clippy::cast_possible_wrap)]
            (3, Value::Varint(i)) => Some(Cow::Owned((i as i64).to_string().into_bytes())),
            (4, Value::Fixed64(bits)) => {
                Some(Cow::Owned(f64::from_bits(bits).to_string().into_bytes()))
            }
            (5..=7, _) => None,
            _ => continue,
        };
    }
    text
}

/// A captured field's name as the rules write it, and its value.
type CapturedOut<'a> = (&'a [u8], Cow<'a, [u8]>);

/// One event, borrowed, for [`put_event`]; text as UTF-8 bytes.
struct EventOut<'a> {
    key: &'a [u8],
    status: &'a [u8],
    time: u64,
    service: &'a [u8],
    span_name: &'a [u8],
    trace_id: &'a [u8],
    span_id: &'a [u8],
    error: bool,
    fate: Fate<'a>,
    captured: &'a [CapturedOut<'a>],
}

fn bytes_len(tag: u32, b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        len_field_size(tag, b.len())
    }
}

fn put_bytes(out: &mut Vec<u8>, tag: u32, b: &[u8]) {
    if !b.is_empty() {
        put_len_field(out, tag, b.len());
        out.extend_from_slice(b);
    }
}

fn put_bool(out: &mut Vec<u8>, tag: u32, b: bool) {
    if b {
        put_varint(out, u64::from(tag << 3 | WireType::Varint as u32));
        out.push(1);
    }
}

/// Appends one `JourneyEvents.events` field, encoded as prost encodes
/// `tailgate_contract::journey::JourneyEvent`, with what repeats the
/// batch's previous event left out (its tests decode and resolve it so).
fn put_event<'a>(out: &mut Vec<u8>, said: &mut Said, e: &EventOut<'a>) {
    use tailgate_contract::journey::{repeats as bit, tag};
    // Each captured field as its name's index in the batch and its value.
    let mut captured: SmallVec<[(u64, &[u8]); 4]> = SmallVec::new();
    for (label, value) in e.captured {
        let at = match said.fields.iter().position(|f| f == label) {
            Some(at) => at,
            None => {
                said.fields.push(label.to_vec());
                said.fields.len() - 1
            }
        };
        captured.push((at as u64, value));
    }
    let mut mask = 0;
    let mut check = |said: &mut Vec<u8>, now: &[u8], b: u32| {
        if repeats(said, now) {
            mask |= b;
        }
    };
    check(&mut said.key, e.key, bit::KEY);
    check(&mut said.status, e.status, bit::STATUS);
    check(&mut said.service, e.service, bit::SERVICE);
    let rule = e.fate.rule.as_bytes();
    let same_trace = said.trace_id == e.trace_id && said.kept == e.fate.kept && said.rule == rule;
    if same_trace {
        mask |= bit::TRACE;
    } else {
        said.trace_id.clear();
        said.trace_id.extend_from_slice(e.trace_id);
        said.kept = e.fate.kept;
        said.rule.clear();
        said.rule.extend_from_slice(rule);
    }
    let same_captured = said.captured.len() == captured.len()
        && said
            .captured
            .iter()
            .zip(&captured)
            .all(|((a, x), (b, y))| a == b && x == y);
    if same_captured {
        mask |= bit::CAPTURED;
    } else {
        said.captured.clear();
        said.captured
            .extend(captured.iter().map(|&(at, v)| (at, v.to_vec())));
    }
    // The first event of a batch repeats nothing.
    if !said.any {
        mask = 0;
        said.any = true;
    }
    let written = |b: u32, field: &'a [u8]| -> &'a [u8] { if mask & b == 0 { field } else { &[] } };
    let (key, status, service) = (
        written(bit::KEY, e.key),
        written(bit::STATUS, e.status),
        written(bit::SERVICE, e.service),
    );
    let (trace_id, kept, rule) = if mask & bit::TRACE == 0 {
        (e.trace_id, e.fate.kept, rule)
    } else {
        (&[][..], false, &[][..])
    };
    if mask & bit::CAPTURED != 0 {
        captured.clear();
    }
    let captured_len = |&(at, v): &(u64, &[u8])| {
        bytes_len(tag::CAPTURED_VALUE, v)
            + if at == 0 {
                0
            } else {
                1 + encoded_len_varint(at)
            }
    };
    let len = bytes_len(tag::KEY, key)
        + bytes_len(tag::STATUS, status)
        + if e.time == 0 { 0 } else { 1 + 8 }
        + bytes_len(tag::SERVICE, service)
        + bytes_len(tag::SPAN_NAME, e.span_name)
        + bytes_len(tag::TRACE_ID, trace_id)
        + bytes_len(tag::SPAN_ID, e.span_id)
        + 2 * usize::from(e.error)
        + 2 * usize::from(kept)
        + bytes_len(tag::RULE, rule)
        + captured
            .iter()
            .map(|c| len_field_size(tag::CAPTURED, captured_len(c)))
            .sum::<usize>()
        + if mask == 0 { 0 } else { 2 };
    put_len_field(out, tag::EVENTS, len);
    put_bytes(out, tag::KEY, key);
    put_bytes(out, tag::STATUS, status);
    if e.time != 0 {
        put_varint(
            out,
            u64::from(tag::TIME << 3 | WireType::SixtyFourBit as u32),
        );
        out.extend_from_slice(&e.time.to_le_bytes());
    }
    put_bytes(out, tag::SERVICE, service);
    put_bytes(out, tag::SPAN_NAME, e.span_name);
    put_bytes(out, tag::TRACE_ID, trace_id);
    put_bytes(out, tag::SPAN_ID, e.span_id);
    put_bool(out, tag::ERROR, e.error);
    put_bool(out, tag::KEPT, kept);
    put_bytes(out, tag::RULE, rule);
    for c @ &(at, value) in &captured {
        put_len_field(out, tag::CAPTURED, captured_len(c));
        put_bytes(out, tag::CAPTURED_VALUE, value);
        if at != 0 {
            put_varint(
                out,
                u64::from(tag::CAPTURED_FIELD_INDEX << 3 | WireType::Varint as u32),
            );
            put_varint(out, at);
        }
    }
    if mask != 0 {
        // Every bit fits in one varint byte.
        put_varint(out, u64::from(tag::REPEATS << 3 | WireType::Varint as u32));
        put_varint(out, u64::from(mask));
    }
}

/// Appends a batch's own fields after its events: the journey they belong
/// to, and the captured fields' names they refer to.
fn finish(out: &mut Vec<u8>, journey: &str, said: &Said) {
    use tailgate_contract::journey::tag;
    put_bytes(out, tag::BATCH_JOURNEY, journey.as_bytes());
    for name in &said.fields {
        put_len_field(out, tag::BATCH_FIELDS, name.len());
        out.extend_from_slice(name);
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
/// `Status.code`.
const STATUS_CODE: u32 = 3;
/// `KeyValue.key` and `KeyValue.value`.
const KEY: u32 = 1;
const VALUE: u32 = 2;

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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value::Value},
        trace::v1::{Status, span::Event},
    };
    use tailgate_sampling_rules::Rules;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    /// Reading journeys straight from the wire gives exactly the events the
    /// decoding path gives: string and integer keys, statuses, captures, the
    /// error flag, and no event for a span without the key (or with its
    /// name only in a value). Decoded, they are what the spans said.
    #[test]
    fn the_wire_path_agrees_with_decoding() {
        use crate::route::tests::{request, span, split_request};
        use tailgate_contract::journey::JourneyEvents;
        let rules = Rules::from_yaml(
            "rules:\n  - name: all\n    action: keep\njourneys:\n  - name: order\n    key: attributes.order.id\n    status: attributes.order.status\n    capture: [attributes.queue, attributes.attempt]\n",
            "r.yaml",
        )
        .unwrap();
        let with = |mut s: Span, attrs: Vec<KeyValue>| {
            s.attributes = attrs;
            s
        };
        let int = |k: &str, i: i64| KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::IntValue(i)),
            }),
            ..Default::default()
        };
        let mut failed = with(
            span(1, 2, Some(1)),
            vec![
                int("order.id", 4711),
                kv("queue", "orders"),
                int("attempt", 2),
            ],
        );
        failed.status = Some(Status {
            code: StatusCode::Error as i32,
            message: "boom".into(),
        });
        failed.start_time_unix_nano = 77;
        let spans = vec![
            with(
                span(1, 1, None),
                vec![
                    kv("x", "y"),
                    kv("order.id", "A-1"),
                    kv("order.status", "NEW"),
                ],
            ),
            failed,
            with(span(1, 3, Some(1)), vec![kv("note", "order.id")]),
            span(1, 4, Some(1)),
        ];
        let routed = split_request(&request(vec![("crm-api", spans)]));
        let fragments = &routed.batches[0].fragments;
        let fate = Fate {
            kept: true,
            rule: "all",
        };
        let id = TraceId([1; 16]);
        let encode = |fast| {
            let mut out = Vec::new();
            let mut said = Said::default();
            let looked_at = events(&rules, id, fragments, fate, fast, &mut |_, e| {
                put_event(&mut out, &mut said, e);
            });
            finish(&mut out, "order", &said);
            (looked_at, out)
        };
        let (fast, slow) = (encode(true), encode(false));
        assert_eq!(
            fast.0, 3,
            "the span without the key's name is not looked at"
        );
        assert_eq!(fast, slow);
        let short = JourneyEvents::decode(fast.1.as_slice()).unwrap();
        let trace_and_service = tailgate_contract::journey::repeats::TRACE
            | tailgate_contract::journey::repeats::SERVICE;
        assert_eq!(
            short.events[1].repeats & trace_and_service,
            trace_and_service,
            "the second event repeats the trace and service of the first"
        );
        assert!(short.events[1].trace_id.is_empty() && short.events[1].service.is_empty());
        let decoded = short.resolve().unwrap();
        assert_eq!(decoded.len(), 2);
        assert!(decoded.iter().all(|e| e.journey == "order"));
        assert_eq!(
            (decoded[0].key.as_str(), decoded[0].status.as_str()),
            ("A-1", "NEW")
        );
        assert_eq!((decoded[1].key.as_str(), decoded[1].error), ("4711", true));
        assert_eq!(decoded[1].time_unix_nano, 77);
        assert_eq!(decoded[1].service, "crm-api");
        assert_eq!(decoded[1].span_id, vec![2; 8]);
        let captured: Vec<(&str, &str)> = decoded[1]
            .captured
            .iter()
            .map(|c| (c.field.as_str(), c.value.as_str()))
            .collect();
        assert_eq!(
            captured,
            [("attributes.queue", "orders"), ("attributes.attempt", "2")]
        );
        assert!(
            decoded
                .iter()
                .all(|e| e.kept && e.rule == "all" && e.trace_id == vec![1; 16])
        );
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
