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

use prost::encoding::{WireType, encode_varint, encoded_len_varint};

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
    Fixed64(u64),
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
        let buf = self.rest;
        let mut pos = 0;
        let (number, value) = read_field(buf, &mut pos)?;
        let (raw, rest) = buf.split_at(pos);
        self.rest = rest;
        Ok(Field { number, value, raw })
    }
}

/// Reads a varint at `*pos`, as prost does: at most ten bytes, and the
/// tenth may hold only the 64th bit (more would overflow, which prost refuses).
#[inline(always)]
fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// Reads one field's key and value at `*pos`.
#[inline(always)]
fn read_field<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(u32, Value<'a>), WireError> {
    let key = read_varint(buf, pos).ok_or_else(|| malformed("invalid varint"))?;
    // As prost: the whole key must fit in 32 bits, not only the number.
    let key = u32::try_from(key).map_err(|_| malformed("invalid key value"))?;
    let number = key >> 3;
    if number == 0 {
        return Err(malformed("invalid tag value: 0"));
    }
    let value = match key & 7 {
        0 => Value::Varint(read_varint(buf, pos).ok_or_else(|| underflow(number))?),
        1 => {
            let bytes = take(buf, pos, 8, number)?;
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            Value::Fixed64(u64::from_le_bytes(le))
        }
        5 => {
            take(buf, pos, 4, number)?;
            Value::Fixed32
        }
        2 => {
            let len = read_varint(buf, pos).ok_or_else(|| underflow(number))?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            Value::Len(take(buf, pos, len, number)?)
        }
        3 | 4 => {
            return Err(malformed(&format!(
                "field {number}: groups are not part of OTLP"
            )));
        }
        other => return Err(malformed(&format!("invalid wire type value: {other}"))),
    };
    Ok((number, value))
}

#[inline(always)]
fn take<'a>(
    buf: &'a [u8],
    pos: &mut usize,
    len: usize,
    number: u32,
) -> Result<&'a [u8], WireError> {
    let end = pos
        .checked_add(len)
        .filter(|end| *end <= buf.len())
        .ok_or_else(|| underflow(number))?;
    let value = &buf[*pos..end];
    *pos = end;
    Ok(value)
}

#[cold]
fn malformed(what: &str) -> WireError {
    WireError(what.to_owned())
}

#[cold]
fn underflow(number: u32) -> WireError {
    WireError(format!("field {number}: buffer underflow"))
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

/// The fields of a message already checked on receipt, as they are read
/// again on the hot path: no error to carry (one that does not frame ends
/// the walk), and a shortcut for the one-byte keys and lengths that almost
/// every OTLP field has.
pub fn checked(message: &[u8]) -> Checked<'_> {
    Checked { rest: message }
}

pub struct Checked<'a> {
    rest: &'a [u8],
}

impl<'a> Checked<'a> {
    #[inline(always)]
    fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
        match buf.get(*pos) {
            Some(&b) if b < 0x80 => {
                *pos += 1;
                Some(u64::from(b))
            }
            _ => read_varint(buf, pos),
        }
    }

    #[inline(always)]
    fn read(&mut self) -> Option<(u32, Value<'a>)> {
        let buf = self.rest;
        let mut pos = 0;
        let key = u32::try_from(Self::varint(buf, &mut pos)?).ok()?;
        let value = match key & 7 {
            0 => Value::Varint(Self::varint(buf, &mut pos)?),
            1 => {
                let bytes = buf.get(pos..pos + 8)?;
                pos += 8;
                Value::Fixed64(u64::from_le_bytes(bytes.try_into().ok()?))
            }
            5 => {
                buf.get(pos..pos + 4)?;
                pos += 4;
                Value::Fixed32
            }
            2 => {
                let len = usize::try_from(Self::varint(buf, &mut pos)?).ok()?;
                let bytes = buf.get(pos..pos.checked_add(len)?)?;
                pos += len;
                Value::Len(bytes)
            }
            _ => return None,
        };
        self.rest = &buf[pos..];
        Some((key >> 3, value))
    }
}

impl<'a> Iterator for Checked<'a> {
    type Item = (u32, Value<'a>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let field = self.read();
        if field.is_none() {
            self.rest = &[];
        }
        field
    }
}

/// What a known field must hold.
#[derive(Clone, Copy)]
enum Kind {
    /// Not a field of this message (a gap in the numbering).
    Unknown,
    Bytes,
    Str,
    Varint,
    Fixed64,
    Fixed32,
    Message(&'static Schema),
}

/// The known fields of one OTLP message type, indexed by field number;
/// others are skipped, as protobuf requires of unknown fields. They must
/// follow the `opentelemetry-proto` version the workspace builds with: a
/// field missing here is skipped where prost checks it (the fuzz tests in
/// `route` find that).
pub struct Schema {
    name: &'static str,
    fields: &'static [(&'static str, Kind)],
}

static KEY_VALUE: Schema = Schema {
    name: "KeyValue",
    fields: &[
        ("", Kind::Unknown),
        ("key", Kind::Str),
        ("value", Kind::Message(&ANY_VALUE)),
        // For profiles; checked because prost checks it.
        ("key_strindex", Kind::Varint),
    ],
};
static ANY_VALUE: Schema = Schema {
    name: "AnyValue",
    fields: &[
        ("", Kind::Unknown),
        ("string_value", Kind::Str),
        ("bool_value", Kind::Varint),
        ("int_value", Kind::Varint),
        ("double_value", Kind::Fixed64),
        ("array_value", Kind::Message(&ARRAY_VALUE)),
        ("kvlist_value", Kind::Message(&KEY_VALUE_LIST)),
        ("bytes_value", Kind::Bytes),
        // For profiles; checked because prost checks it.
        ("string_value_strindex", Kind::Varint),
    ],
};
static ARRAY_VALUE: Schema = Schema {
    name: "ArrayValue",
    fields: &[("", Kind::Unknown), ("values", Kind::Message(&ANY_VALUE))],
};
static KEY_VALUE_LIST: Schema = Schema {
    name: "KeyValueList",
    fields: &[("", Kind::Unknown), ("values", Kind::Message(&KEY_VALUE))],
};
static EVENT: Schema = Schema {
    name: "Event",
    fields: &[
        ("", Kind::Unknown),
        ("time_unix_nano", Kind::Fixed64),
        ("name", Kind::Str),
        ("attributes", Kind::Message(&KEY_VALUE)),
        ("dropped_attributes_count", Kind::Varint),
    ],
};
static LINK: Schema = Schema {
    name: "Link",
    fields: &[
        ("", Kind::Unknown),
        ("trace_id", Kind::Bytes),
        ("span_id", Kind::Bytes),
        ("trace_state", Kind::Str),
        ("attributes", Kind::Message(&KEY_VALUE)),
        ("dropped_attributes_count", Kind::Varint),
        ("flags", Kind::Fixed32),
    ],
};
static STATUS: Schema = Schema {
    name: "Status",
    fields: &[
        ("", Kind::Unknown),
        ("", Kind::Unknown),
        ("message", Kind::Str),
        ("code", Kind::Varint),
    ],
};
/// `opentelemetry.proto.trace.v1.Span`.
pub static SPAN: Schema = Schema {
    name: "Span",
    fields: &[
        ("", Kind::Unknown),
        ("trace_id", Kind::Bytes),
        ("span_id", Kind::Bytes),
        ("trace_state", Kind::Str),
        ("parent_span_id", Kind::Bytes),
        ("name", Kind::Str),
        ("kind", Kind::Varint),
        ("start_time_unix_nano", Kind::Fixed64),
        ("end_time_unix_nano", Kind::Fixed64),
        ("attributes", Kind::Message(&KEY_VALUE)),
        ("dropped_attributes_count", Kind::Varint),
        ("events", Kind::Message(&EVENT)),
        ("dropped_events_count", Kind::Varint),
        ("links", Kind::Message(&LINK)),
        ("dropped_links_count", Kind::Varint),
        ("status", Kind::Message(&STATUS)),
        ("flags", Kind::Fixed32),
    ],
};

/// prost's limit on nested messages.
const MAX_DEPTH: u32 = 100;

impl Schema {
    /// Checks one field of this message, and what it holds, recursively.
    pub fn check_field(&'static self, field: &Field<'_>) -> Result<(), WireError> {
        self.check_value(field.number, field.value, 0)
    }

    /// Checks a nested message's fields.
    fn check_message(&'static self, bytes: &[u8], depth: u32) -> Result<(), WireError> {
        let mut pos = 0;
        while pos < bytes.len() {
            let (number, value) = read_field(bytes, &mut pos)?;
            self.check_value(number, value, depth)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn check_value(
        &'static self,
        number: u32,
        value: Value<'_>,
        depth: u32,
    ) -> Result<(), WireError> {
        let Some((name, kind)) = usize::try_from(number)
            .ok()
            .and_then(|n| self.fields.get(n))
        else {
            return Ok(());
        };
        let wrong = || WireError(format!("invalid wire type for {}.{name}", self.name));
        match (kind, value) {
            (Kind::Varint, Value::Varint(_))
            | (Kind::Fixed64, Value::Fixed64(_))
            | (Kind::Fixed32, Value::Fixed32)
            | (Kind::Bytes, Value::Len(_)) => Ok(()),
            (Kind::Str, Value::Len(bytes)) => std::str::from_utf8(bytes).map(drop).map_err(|_| {
                WireError(format!(
                    "invalid string value in {}.{name}: data is not UTF-8 encoded",
                    self.name
                ))
            }),
            (Kind::Unknown, _) => Ok(()),
            (Kind::Message(schema), Value::Len(bytes)) => {
                if depth >= MAX_DEPTH {
                    return Err(WireError("recursion limit reached".into()));
                }
                schema.check_message(bytes, depth + 1)
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
#[inline]
pub fn put_len_field(out: &mut Vec<u8>, number: u32, len: usize) {
    put_varint(
        out,
        u64::from(number << 3 | WireType::LengthDelimited as u32),
    );
    put_varint(out, len as u64);
}

/// Writes a varint: most keys and lengths take one byte, written inline
/// (prost's `encode_varint` is a call, and journey events make millions).
#[inline(always)]
pub fn put_varint(out: &mut Vec<u8>, value: u64) {
    if value < 0x80 {
        out.push(value as u8);
    } else {
        encode_varint(value, out);
    }
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
