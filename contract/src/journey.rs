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

/// The `type` property of a journey events message.
pub const MESSAGE_TYPE: &str = "tailgate.journey-events.v1";

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
    /// `Captured.field` and `Captured.value`.
    pub const CAPTURED_FIELD: u32 = 1;
    pub const CAPTURED_VALUE: u32 = 2;
}

/// A batch of events.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JourneyEvents {
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<JourneyEvent>,
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
}

/// One captured field: its name as the rules file writes it, and its value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Captured {
    #[prost(string, tag = "1")]
    pub field: String,
    #[prost(string, tag = "2")]
    pub value: String,
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

/// Whether a delivery's properties mark it as journey events.
pub fn is_journey_events(props: &BasicProperties) -> bool {
    props
        .kind()
        .as_ref()
        .is_some_and(|k| k.as_str() == MESSAGE_TYPE)
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
                }],
                ..Default::default()
            }],
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(JourneyEvents::decode(bytes.as_slice()).ok(), Some(batch));
        let props = properties("m-1", "order", 1, Compression::None, 0);
        assert!(is_journey_events(&props));
        assert!(!is_journey_events(&BasicProperties::default()));
        assert_eq!(routing_key("order"), "journeys.order");
    }
}
