//! Journey events as RabbitMQ messages: the gateway records one event for
//! every span that carries a journey's key, kept or dropped, and publishes
//! them in batches; the ingester stores them.
//!
//! - Routing key: `journeys.<journey name>`; a queue binds `journeys.#`.
//! - `type` property: [`MESSAGE_TYPE`], which is how the ingester tells these
//!   from kept traces arriving on the same queue.
//! - Body: a [`JourneyEvents`] protobuf, compressed as `content_encoding` says.
//! - `message_id` unique per batch and unchanged when republished, as for
//!   traces: the ingester deduplicates on it.
//!
//! The messages are written with prost's derive, so the field numbers
//! below are the wire contract: add fields, never renumber.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// The `type` property of the journey events messages written now: v2
/// events leave out what repeats the event before them
/// ([`JourneyEvents::resolve`]).
pub const MESSAGE_TYPE: &str = "tailgate.journey-events.v2";

/// The `type` of the first gateways' messages, whose events are whole.
/// Still read, so that what they left in a queue is stored after an upgrade.
pub const MESSAGE_TYPE_V1: &str = "tailgate.journey-events.v1";

/// Binds a queue to every journey's events.
pub const ALL_JOURNEYS: &str = "journeys.#";

/// Header naming the journey.
pub const JOURNEY_HEADER: &str = "journey";
/// Header with the number of events in the message.
pub const EVENT_COUNT_HEADER: &str = "event_count";

/// `journeys.<name>`; journey names are checked to be routing-key words.
pub fn routing_key(journey: &str) -> String {
    format!("journeys.{journey}")
}

/// The field numbers below, for writers that encode events without these
/// types (the gateway encodes each event straight from a span's bytes).
pub mod tag {
    /// `JourneyEvents.events`.
    pub const EVENTS: u32 = 1;
    pub const JOURNEY: u32 = 1;
    pub const KEY: u32 = 2;
    pub const STATUS: u32 = 3;
    pub const TIME: u32 = 4;
    pub const SERVICE: u32 = 5;
    pub const SPAN_NAME: u32 = 6;
    pub const TRACE_ID: u32 = 7;
    pub const SPAN_ID: u32 = 8;
    pub const ERROR: u32 = 9;
    pub const KEPT: u32 = 10;
    pub const RULE: u32 = 11;
    pub const CAPTURED: u32 = 12;
    pub const REPEATS: u32 = 13;
    /// `Captured.field`, `Captured.value` and `Captured.field_index`.
    pub const CAPTURED_FIELD: u32 = 1;
    pub const CAPTURED_VALUE: u32 = 2;
    pub const CAPTURED_FIELD_INDEX: u32 = 3;
    /// `JourneyEvents.journey` and `JourneyEvents.fields`.
    pub const BATCH_JOURNEY: u32 = 2;
    pub const BATCH_FIELDS: u32 = 3;
}

/// A batch of events.
///
/// Events are short, because each span of an order gives one and most of
/// what an event says repeats the event before it (the spans of a trace
/// share an order, a trace and often a service and a status). So, read in
/// order ([`JourneyEvents::resolve`]):
/// - an event without `journey` is of the batch's `journey`;
/// - an event's `repeats` bits name the fields it takes from the event
///   before it ([`repeats`]);
/// - a captured field without a name is named by `fields[field_index]`.
///
/// Version 1 writers wrote every field of every event, which reads the same.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JourneyEvents {
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<JourneyEvent>,
    #[prost(string, tag = "2")]
    pub journey: String,
    /// Captured fields' names, referred to by `Captured.field_index`.
    #[prost(string, repeated, tag = "3")]
    pub fields: Vec<String>,
}

impl JourneyEvents {
    /// The events whole: each one's journey from the batch if it names
    /// none, what it repeats from the event before it, and its captured
    /// fields' names from the batch. A batch whose events repeat what
    /// nothing before them said, name a field past its names, or set
    /// `repeats` bits this version does not know is refused.
    pub fn resolve(self) -> Result<Vec<JourneyEvent>, String> {
        let Self {
            mut events,
            journey,
            fields,
        } = self;
        for n in 0..events.len() {
            let (before, rest) = events.split_at_mut(n);
            let (e, before) = (&mut rest[0], before.last());
            if e.journey.is_empty() {
                if journey.is_empty() {
                    return Err(format!("event {n} names no journey, nor does its batch"));
                }
                e.journey.clone_from(&journey);
            }
            if e.repeats & !repeats::ALL != 0 {
                return Err(format!(
                    "event {n} repeats unknown fields: {:#x}",
                    e.repeats
                ));
            }
            if e.repeats != 0 {
                let before = before.ok_or_else(|| format!("event {n} repeats a previous event"))?;
                let r = e.repeats;
                if r & repeats::KEY != 0 {
                    e.key.clone_from(&before.key);
                }
                if r & repeats::STATUS != 0 {
                    e.status.clone_from(&before.status);
                }
                if r & repeats::SERVICE != 0 {
                    e.service.clone_from(&before.service);
                }
                if r & repeats::TRACE != 0 {
                    e.trace_id.clone_from(&before.trace_id);
                    e.kept = before.kept;
                    e.rule.clone_from(&before.rule);
                }
                if r & repeats::CAPTURED != 0 {
                    e.captured.clone_from(&before.captured);
                }
                e.repeats = 0;
            }
            for c in &mut e.captured {
                if c.field.is_empty() {
                    let at = usize::try_from(c.field_index).unwrap_or(usize::MAX);
                    c.field = fields
                        .get(at)
                        .ok_or_else(|| {
                            format!("event {n} captures field {at} of {}", fields.len())
                        })?
                        .clone();
                    c.field_index = 0;
                }
            }
        }
        Ok(events)
    }
}

/// The bits of `JourneyEvent.repeats`: which of its fields an event takes
/// from the event before it in the batch, instead of writing them again.
pub mod repeats {
    pub const KEY: u32 = 1;
    pub const STATUS: u32 = 2;
    pub const SERVICE: u32 = 4;
    /// The trace ID, `kept` and `rule`.
    pub const TRACE: u32 = 8;
    /// The whole list of captured fields.
    pub const CAPTURED: u32 = 16;
    pub const ALL: u32 = KEY | STATUS | SERVICE | TRACE | CAPTURED;
}

/// What one span said about one journey.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JourneyEvent {
    #[prost(string, tag = "1")]
    pub journey: String,
    #[prost(string, tag = "2")]
    pub key: String,
    /// Empty when the span does not carry a status.
    #[prost(string, tag = "3")]
    pub status: String,
    /// The span's start.
    #[prost(fixed64, tag = "4")]
    pub time_unix_nano: u64,
    #[prost(string, tag = "5")]
    pub service: String,
    #[prost(string, tag = "6")]
    pub span_name: String,
    #[prost(bytes = "vec", tag = "7")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    pub span_id: Vec<u8>,
    /// The span's status is ERROR.
    #[prost(bool, tag = "9")]
    pub error: bool,
    /// Whether the span's trace was kept.
    #[prost(bool, tag = "10")]
    pub kept: bool,
    /// The rule that decided the trace.
    #[prost(string, tag = "11")]
    pub rule: String,
    #[prost(message, repeated, tag = "12")]
    pub captured: Vec<Captured>,
    /// Fields taken from the event before it: [`repeats`] bits.
    #[prost(uint32, tag = "13")]
    pub repeats: u32,
}

/// One captured field: its name as the rules file writes it (or its index
/// in the batch's `fields`), and its value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Captured {
    #[prost(string, tag = "1")]
    pub field: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(uint32, tag = "3")]
    pub field_index: u32,
}

/// The properties of a journey events message.
pub fn properties(
    message_id: &str,
    journey: &str,
    events: usize,
    compression: crate::compression::Compression,
    timestamp_secs: u64,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        JOURNEY_HEADER.into(),
        AMQPValue::LongString(LongString::from(journey)),
    );
    headers.insert(
        EVENT_COUNT_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(events).unwrap_or(i64::MAX)),
    );
    crate::message::persistent(message_id, headers, compression, timestamp_secs)
        .with_type(ShortString::from(MESSAGE_TYPE))
}

/// Whether a delivery's properties mark it as journey events (either version).
pub fn is_journey_events(props: &BasicProperties) -> bool {
    props
        .kind()
        .as_ref()
        .is_some_and(|k| k.as_str() == MESSAGE_TYPE || k.as_str() == MESSAGE_TYPE_V1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Compression;
    use prost::Message;

    /// A batch survives the wire, and its properties say what it is.
    #[test]
    fn events_round_trip() {
        let batch = JourneyEvents {
            events: vec![JourneyEvent {
                journey: "order".into(),
                key: "4711".into(),
                status: "NEW".into(),
                time_unix_nano: 1,
                trace_id: vec![1; 16],
                captured: vec![Captured {
                    field: "attributes.queue".into(),
                    value: "orders".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(JourneyEvents::decode(bytes.as_slice()).ok(), Some(batch));
        let props = properties("m-1", "order", 1, Compression::None, 0);
        assert!(is_journey_events(&props));
        assert!(!is_journey_events(&BasicProperties::default()));
        assert_eq!(routing_key("order"), "journeys.order");
        let v1 = BasicProperties::default().with_type(ShortString::from(MESSAGE_TYPE_V1));
        assert!(is_journey_events(&v1), "a version 1 batch is still read");
    }

    /// A batch whose later events leave out what repeats resolves to whole
    /// events: the batch's journey, each field its `repeats` bits name
    /// from the event before (the trace with its fate), captured names by
    /// index. A batch that repeats what nothing before it said, points past
    /// its names, or sets unknown bits is refused.
    #[test]
    fn short_events_resolve_from_the_batch_and_the_events_before() {
        let whole = |key: &str, service: &str, trace: u8, kept: bool, rule: &str| JourneyEvent {
            journey: "order".into(),
            key: key.into(),
            status: "NEW".into(),
            service: service.into(),
            span_name: "step".into(),
            trace_id: vec![trace; 16],
            kept,
            rule: rule.into(),
            captured: vec![Captured {
                field: "attributes.queue".into(),
                value: "orders".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let short = |e: &JourneyEvent, r: u32| {
            let mut s = e.clone();
            s.journey.clear();
            s.repeats = r;
            if r & repeats::KEY != 0 {
                s.key.clear();
            }
            if r & repeats::STATUS != 0 {
                s.status.clear();
            }
            if r & repeats::SERVICE != 0 {
                s.service.clear();
            }
            if r & repeats::TRACE != 0 {
                (s.trace_id, s.kept, s.rule) = (Vec::new(), false, String::new());
            }
            s.captured = if r & repeats::CAPTURED != 0 {
                Vec::new()
            } else {
                vec![Captured {
                    value: "orders".into(),
                    ..Default::default()
                }]
            };
            s
        };
        let expected = vec![
            whole("4711", "shop", 1, true, "error"),
            whole("4711", "shop", 1, true, "error"),
            whole("4711", "crm", 1, true, "error"),
            whole("4712", "crm", 2, false, "random"),
        ];
        let batch = JourneyEvents {
            events: vec![
                short(&expected[0], 0),
                short(&expected[1], repeats::ALL),
                short(&expected[2], repeats::KEY | repeats::TRACE),
                short(
                    &expected[3],
                    repeats::SERVICE | repeats::STATUS | repeats::CAPTURED,
                ),
            ],
            journey: "order".into(),
            fields: vec!["attributes.queue".into()],
        };
        let decoded = JourneyEvents::decode(batch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.resolve(), Ok(expected.clone()));

        let refused = |events: Vec<JourneyEvent>, fields: Vec<String>| {
            JourneyEvents {
                events,
                journey: "order".into(),
                fields,
            }
            .resolve()
            .unwrap_err()
        };
        let names = vec!["attributes.queue".to_owned()];
        assert_eq!(
            refused(vec![short(&expected[0], repeats::KEY)], names.clone()),
            "event 0 repeats a previous event"
        );
        assert_eq!(
            refused(vec![short(&expected[0], 0)], Vec::new()),
            "event 0 captures field 0 of 0"
        );
        assert_eq!(
            refused(vec![short(&expected[0], 0), short(&expected[1], 64)], names),
            "event 1 repeats unknown fields: 0x40"
        );
    }
}
