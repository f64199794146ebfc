//! A kept trace as a RabbitMQ message.
//!
//! - Exchange: a durable topic exchange ([`crate::amqp::declare_exchange`]).
//! - Routing key: `traces.<rule>.<root service>`, so a queue can bind to
//!   `traces.error.#` or `traces.*.checkout`.
//! - Body: an OTLP `ExportTraceServiceRequest`, compressed as the
//!   `content_encoding` says ([`crate::compression`]).
//! - Properties: persistent, `message_id` unique per message and unchanged
//!   when republished (the ingester deduplicates on it), and the headers
//!   below.

use crate::compression::Compression;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// The body's type.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Binds a queue to every kept trace.
pub const ALL_TRACES: &str = "traces.#";

/// Header names.
pub mod header {
    /// The trace ID in hex.
    pub const TRACE_ID: &str = "trace_id";
    /// The name of the rule that kept the trace.
    pub const SAMPLING_RULE: &str = "sampling_rule";
    /// How many traces this one stands for (1 / sampling probability).
    pub const ADJUSTED_COUNT: &str = "adjusted_count";
    pub const SPAN_COUNT: &str = "span_count";
    pub const ROOT_SERVICE: &str = "root_service";
    /// Added by the ingester to a message it dead-letters: why.
    pub const DEAD_LETTER_REASON: &str = "x-tailgate-dead-letter-reason";
    /// Added by the ingester to a message it dead-letters: the routing key it came with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-tailgate-original-routing-key";
}

/// Topic routing keys split on `.` and match on `*` and `#`; each
/// component is kept a single word.
fn routing_word(s: &str) -> String {
    let word: String = s
        .chars()
        .take(100)
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if word.is_empty() {
        "unknown".into()
    } else {
        word
    }
}

/// `traces.<rule>.<root service>`.
pub fn routing_key(rule: &str, root_service: &str) -> String {
    format!(
        "traces.{}.{}",
        routing_word(rule),
        routing_word(root_service)
    )
}

/// What the gateway says about a kept trace, in the message's headers.
#[derive(Debug, Clone, Copy)]
pub struct Annotations<'a> {
    pub trace_id: &'a str,
    pub rule: &'a str,
    pub adjusted_count: f64,
    pub span_count: usize,
    pub root_service: &'a str,
}

/// The properties of a kept trace's message.
pub fn properties(
    message_id: &str,
    annotations: &Annotations<'_>,
    compression: Compression,
    timestamp_secs: u64,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(header::TRACE_ID.into(), text(annotations.trace_id));
    headers.insert(header::SAMPLING_RULE.into(), text(annotations.rule));
    headers.insert(
        header::ADJUSTED_COUNT.into(),
        AMQPValue::Double(annotations.adjusted_count),
    );
    headers.insert(
        header::SPAN_COUNT.into(),
        AMQPValue::LongLongInt(i64::try_from(annotations.span_count).unwrap_or(i64::MAX)),
    );
    headers.insert(header::ROOT_SERVICE.into(), text(annotations.root_service));
    persistent(message_id, headers, compression, timestamp_secs)
}

/// What every message the gateway publishes has: persistent, protobuf,
/// its `message_id`, the time, `headers`, and its `content_encoding`.
pub fn persistent(
    message_id: &str,
    headers: FieldTable,
    compression: Compression,
    timestamp_secs: u64,
) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message_id))
        .with_timestamp(timestamp_secs)
        .with_headers(headers);
    match compression.content_encoding() {
        Some(encoding) => props.with_content_encoding(ShortString::from(encoding)),
        None => props,
    }
}

/// The sampling decision a message's headers record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    pub rule: String,
    pub adjusted_count: f64,
}

fn header_value<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(key)
}

impl Sampling {
    /// Read as other producers may write them too: the rule as either
    /// string type, the count as any number; missing: no rule, count 1.
    pub fn of(props: &BasicProperties) -> Self {
        let rule = match header_value(props, header::SAMPLING_RULE) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            Some(AMQPValue::ShortString(s)) => s.to_string(),
            _ => String::new(),
        };
        let adjusted_count = match header_value(props, header::ADJUSTED_COUNT) {
            Some(AMQPValue::Double(d)) => *d,
            Some(AMQPValue::Float(f)) => f64::from(*f),
            #[allow(clippy::cast_precision_loss)]
            Some(AMQPValue::LongLongInt(i)) => *i as f64,
            Some(AMQPValue::LongInt(i)) => f64::from(*i),
            _ => 1.0,
        };
        Self {
            rule,
            adjusted_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routing keys have exactly three words, whatever the names hold.
    #[test]
    fn routing_keys_are_three_words() {
        assert_eq!(routing_key("error", "shop-api"), "traces.error.shop-api");
        assert_eq!(routing_key("a.b", "x y#"), "traces.a_b.x_y_");
        assert_eq!(routing_key("a.b*c#d e", ""), "traces.a_b_c_d_e.unknown");
        assert_eq!(routing_key("", ""), "traces.unknown.unknown");
    }

    /// What the gateway writes, the ingester reads back.
    #[test]
    fn sampling_round_trips_through_the_headers() {
        let a = Annotations {
            trace_id: "0af7651916cd43dd8448eb211c80319c",
            rule: "slow",
            adjusted_count: 20.0,
            span_count: 3,
            root_service: "shop-api",
        };
        let props = properties("m-1", &a, Compression::Lz4, 1);
        assert_eq!(
            Sampling::of(&props),
            Sampling {
                rule: "slow".into(),
                adjusted_count: 20.0
            }
        );
        assert_eq!(props.content_encoding().as_ref().unwrap().as_str(), "lz4");
        assert_eq!(props.delivery_mode(), &Some(2));
        let none = Sampling::of(&BasicProperties::default());
        assert_eq!((none.rule.as_str(), none.adjusted_count), ("", 1.0));
    }
}
