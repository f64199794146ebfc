//! OTLP trace protobuf at the wire level: walking a request's fields without
//! decoding them, checking a span the way prost's decoder would, and writing
//! a request back from encoded pieces.
//!
//! Why: spans wait in the buffer for seconds, and a decoded prost `Span`
//! costs about five times its encoded size and one allocation per string.
//! So spans are kept encoded from receive to decision, and decoded once,
//! when their trace is decided. They are still checked in full on receipt,
//! so a malformed request is refused with INVALID_ARGUMENT / 400 there, and
//! the decision's decode cannot fail.

use prost::{
    bytes::Buf,
    encoding::{
        WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
    },
};

/// What is wrong with a request, in prost's terms where prost has them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(String);

impl WireError {
    pub fn new(message: String) -> Self {
        Self(message)
    }
}

/// The value of one field as it is on the wire.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64,
    Fixed32,
    Len(&'a [u8]),
}

/// One field of a message.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub number: u32,
    pub value: Value<'a>,
    /// The whole field: key, length and value, as it can be copied elsewhere.
    pub raw: &'a [u8],
}

impl<'a> Field<'a> {
    /// The bytes of a length-delimited field (a message, string or bytes).
    pub fn len(&self, what: &str) -> Result<&'a [u8], WireError> {
        match self.value {
            Value::Len(bytes) => Ok(bytes),
            _ => Err(WireError(format!("invalid wire type for {what}"))),
        }
    }
}

/// The fields of one encoded message, in wire order.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields { rest: message }
}

pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn next_field(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.rest;
        let mut buf = self.rest;
        let (number, wire_type) = decode_key(&mut buf).map_err(|e| WireError(e.to_string()))?;
        let value = match wire_type {
            WireType::Varint => Value::Varint(
                decode_varint(&mut buf).map_err(|e| WireError(format!("field {number}: {e}")))?,
            ),
            WireType::SixtyFourBit => {
                take(&mut buf, 8, number)?;
                Value::Fixed64
            }
            WireType::ThirtyTwoBit => {
                take(&mut buf, 4, number)?;
                Value::Fixed32
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf)
                    .map_err(|e| WireError(format!("field {number}: {e}")))?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                Value::Len(take(&mut buf, len, number)?)
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(WireError(format!(
                    "field {number}: groups are not part of OTLP"
                )));
            }
        };
        let used = start.len() - buf.len();
        self.rest = buf;
        Ok(Field {
            number,
            value,
            raw: &start[..used],
        })
    }
}

fn take<'a>(buf: &mut &'a [u8], len: usize, number: u32) -> Result<&'a [u8], WireError> {
    if buf.remaining() < len {
        return Err(WireError(format!("field {number}: buffer underflow")));
    }
    let (head, tail) = buf.split_at(len);
    *buf = tail;
    Ok(head)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = self.next_field();
        if field.is_err() {
            // One error ends the walk: what follows cannot be framed.
            self.rest = &[];
        }
        Some(field)
    }
}

/// What a known field must hold.
#[derive(Clone, Copy)]
enum Kind {
    Bytes,
    Str,
    Varint,
    Fixed64,
    Fixed32,
    Message(&'static Schema),
}

/// The known fields of one OTLP message type; others are skipped, as
/// protobuf requires of unknown fields.
pub struct Schema {
    name: &'static str,
    fields: &'static [(u32, &'static str, Kind)],
}

static KEY_VALUE: Schema = Schema {
    name: "KeyValue",
    fields: &[
        (1, "key", Kind::Str),
        (2, "value", Kind::Message(&ANY_VALUE)),
    ],
};
static ANY_VALUE: Schema = Schema {
    name: "AnyValue",
    fields: &[
        (1, "string_value", Kind::Str),
        (2, "bool_value", Kind::Varint),
        (3, "int_value", Kind::Varint),
        (4, "double_value", Kind::Fixed64),
        (5, "array_value", Kind::Message(&ARRAY_VALUE)),
        (6, "kvlist_value", Kind::Message(&KEY_VALUE_LIST)),
        (7, "bytes_value", Kind::Bytes),
    ],
};
static ARRAY_VALUE: Schema = Schema {
    name: "ArrayValue",
    fields: &[(1, "values", Kind::Message(&ANY_VALUE))],
};
static KEY_VALUE_LIST: Schema = Schema {
    name: "KeyValueList",
    fields: &[(1, "values", Kind::Message(&KEY_VALUE))],
};
static EVENT: Schema = Schema {
    name: "Event",
    fields: &[
        (1, "time_unix_nano", Kind::Fixed64),
        (2, "name", Kind::Str),
        (3, "attributes", Kind::Message(&KEY_VALUE)),
        (4, "dropped_attributes_count", Kind::Varint),
    ],
};
static LINK: Schema = Schema {
    name: "Link",
    fields: &[
        (1, "trace_id", Kind::Bytes),
        (2, "span_id", Kind::Bytes),
        (3, "trace_state", Kind::Str),
        (4, "attributes", Kind::Message(&KEY_VALUE)),
        (5, "dropped_attributes_count", Kind::Varint),
        (6, "flags", Kind::Fixed32),
    ],
};
static STATUS: Schema = Schema {
    name: "Status",
    fields: &[(2, "message", Kind::Str), (3, "code", Kind::Varint)],
};
/// `opentelemetry.proto.trace.v1.Span`.
pub static SPAN: Schema = Schema {
    name: "Span",
    fields: &[
        (1, "trace_id", Kind::Bytes),
        (2, "span_id", Kind::Bytes),
        (3, "trace_state", Kind::Str),
        (4, "parent_span_id", Kind::Bytes),
        (5, "name", Kind::Str),
        (6, "kind", Kind::Varint),
        (7, "start_time_unix_nano", Kind::Fixed64),
        (8, "end_time_unix_nano", Kind::Fixed64),
        (9, "attributes", Kind::Message(&KEY_VALUE)),
        (10, "dropped_attributes_count", Kind::Varint),
        (11, "events", Kind::Message(&EVENT)),
        (12, "dropped_events_count", Kind::Varint),
        (13, "links", Kind::Message(&LINK)),
        (14, "dropped_links_count", Kind::Varint),
        (15, "status", Kind::Message(&STATUS)),
        (16, "flags", Kind::Fixed32),
    ],
};

/// prost's limit on nested messages.
const MAX_DEPTH: u32 = 100;

impl Schema {
    /// Checks one field of this message, and what it holds, recursively.
    pub fn check_field(&'static self, field: &Field<'_>) -> Result<(), WireError> {
        self.check(field, 0)
    }

    fn check(&'static self, field: &Field<'_>, depth: u32) -> Result<(), WireError> {
        let Some((_, name, kind)) = self.fields.iter().find(|(n, _, _)| *n == field.number) else {
            return Ok(());
        };
        let wrong = || WireError(format!("invalid wire type for {}.{name}", self.name));
        match (kind, field.value) {
            (Kind::Varint, Value::Varint(_))
            | (Kind::Fixed64, Value::Fixed64)
            | (Kind::Fixed32, Value::Fixed32)
            | (Kind::Bytes, Value::Len(_)) => Ok(()),
            (Kind::Str, Value::Len(bytes)) => std::str::from_utf8(bytes).map(drop).map_err(|_| {
                WireError(format!(
                    "invalid string value in {}.{name}: data is not UTF-8 encoded",
                    self.name
                ))
            }),
            (Kind::Message(schema), Value::Len(bytes)) => {
                if depth >= MAX_DEPTH {
                    return Err(WireError("recursion limit reached".into()));
                }
                fields(bytes).try_for_each(|f| schema.check(&f?, depth + 1))
            }
            _ => Err(wrong()),
        }
    }
}

/// Encoded size of a length-delimited field holding `len` bytes.
pub fn len_field_size(number: u32, len: usize) -> usize {
    prost::encoding::key_len(number) + encoded_len_varint(len as u64) + len
}

/// Writes the key and length of a length-delimited field; its `len` bytes follow.
pub fn put_len_field(out: &mut Vec<u8>, number: u32, len: usize) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value},
        trace::v1::Span,
    };
    use prost::Message;

    fn check_span(bytes: &[u8]) -> Result<(), WireError> {
        fields(bytes).try_for_each(|f| SPAN.check_field(&f?))
    }

    fn full_span() -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET /orders".into(),
            start_time_unix_nano: 5,
            attributes: vec![KeyValue {
                key: "order.status".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("PRICE_CALCULATED".into())),
                }),
                ..Default::default()
            }],
            flags: 1,
            ..Default::default()
        }
    }

    /// A well-formed span passes, and its fields come back with their raw
    /// bytes, which concatenate to the original message.
    #[test]
    fn walks_a_span() {
        let bytes = full_span().encode_to_vec();
        check_span(&bytes).unwrap();
        let raw: Vec<u8> = fields(&bytes)
            .flat_map(|f| f.unwrap().raw.to_vec())
            .collect();
        assert_eq!(raw, bytes);
    }

    /// Whatever prost refuses in a span, the check refuses too: bad UTF-8
    /// deep in an attribute, a wrong wire type, a truncated field.
    #[test]
    fn refuses_what_prost_refuses() {
        let mut bad_utf8 = full_span();
        bad_utf8.attributes[0].key = "order.status".into();
        let mut bytes = bad_utf8.encode_to_vec();
        let at = bytes.windows(5).position(|w| w == b"PRICE").unwrap();
        bytes[at] = 0xff;
        assert!(Span::decode(bytes.as_slice()).is_err());
        let err = check_span(&bytes).unwrap_err();
        assert!(err.to_string().contains("AnyValue.string_value"), "{err}");

        // Field 5 (name) sent as a varint.
        let wrong_type = [0x28, 0x01];
        assert!(Span::decode(&wrong_type[..]).is_err());
        assert!(
            check_span(&wrong_type)
                .unwrap_err()
                .to_string()
                .contains("Span.name")
        );

        let truncated = &full_span().encode_to_vec()[..20];
        assert!(Span::decode(truncated).is_err());
        assert!(check_span(truncated).is_err());

        // Unknown fields are skipped by both.
        let mut unknown = full_span().encode_to_vec();
        unknown.extend([0xf8, 0x01, 0x07]); // field 31, varint 7
        assert!(Span::decode(unknown.as_slice()).is_ok());
        check_span(&unknown).unwrap();
    }

    /// Field framing helpers agree with prost's own encoding.
    #[test]
    fn length_fields() {
        let mut out = Vec::new();
        put_len_field(&mut out, 2, 300);
        out.extend(std::iter::repeat_n(0, 300));
        assert_eq!(out.len(), len_field_size(2, 300));
    }
}
