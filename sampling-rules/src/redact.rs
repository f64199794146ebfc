//! Redaction of kept spans before they leave the gateway: personal data
//! (emails, phone numbers, payment data) must not reach storage.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use regex::Regex;
use sha2::{Digest, Sha256};
use std::collections::HashSet;

#[derive(Debug)]
pub struct Mask {
    pub key: String,
    pub pattern: Regex,
    pub replacement: String,
}

/// Personal data found by its look in any string attribute, whatever its key.
#[derive(Debug)]
pub enum ValueRule {
    /// E-mail addresses, replaced by `***@***`.
    Email(Regex),
    /// Card numbers: runs of 13 to 19 digits (spaces or dashes between
    /// them allowed) that pass the Luhn check, replaced by `****`.
    CardNumber(Regex),
}

impl ValueRule {
    /// The rule a `redact.values` entry names.
    pub fn named(name: &str) -> Option<Self> {
        // Both patterns are constants that compile.
        match name {
            "email" => {
                Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
                    .ok()
                    .map(Self::Email)
            }
            "card_number" => Regex::new(r"\b\d(?:[ -]?\d){12,18}\b")
                .ok()
                .map(Self::CardNumber),
            _ => None,
        }
    }

    pub const NAMES: &'static str = "email, card_number";

    fn apply(&self, text: &str) -> Option<String> {
        match self {
            Self::Email(re) => re
                .is_match(text)
                .then(|| re.replace_all(text, "***@***").into_owned()),
            Self::CardNumber(re) => {
                let mut changed = false;
                let out = re.replace_all(text, |m: &regex::Captures<'_>| {
                    let run = &m[0];
                    if luhn(run) {
                        changed = true;
                        "****".to_owned()
                    } else {
                        run.to_owned()
                    }
                });
                changed.then(|| out.into_owned())
            }
        }
    }
}

/// The Luhn check over the digits of `run`.
fn luhn(run: &str) -> bool {
    let mut sum = 0;
    for (i, d) in run
        .bytes()
        .rev()
        .filter(u8::is_ascii_digit)
        .map(|b| u32::from(b - b'0'))
        .enumerate()
    {
        sum += if i % 2 == 1 {
            let x = d * 2;
            if x > 9 { x - 9 } else { x }
        } else {
            d
        };
    }
    sum % 10 == 0
}

#[derive(Debug, Default)]
pub struct Redaction {
    pub remove: HashSet<String>,
    pub hash: HashSet<String>,
    pub mask: Vec<Mask>,
    pub salt: Vec<u8>,
    /// Keys are matched ignoring ASCII case (`User.Email` is `user.email`);
    /// the keys above are then held in lower case.
    pub case_insensitive: bool,
    /// Applied to every string attribute no key above treats.
    pub values: Vec<ValueRule>,
}

/// What a matching key does to its value, and to everything nested in it.
#[derive(Clone, Copy)]
enum Treatment<'a> {
    Hash,
    Mask(&'a Mask),
}

impl Redaction {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.hash.is_empty()
            && self.mask.is_empty()
            && self.values.is_empty()
    }

    /// Applies the redaction to every attribute list of the request:
    /// resources, spans, span events and links.
    pub fn apply(&self, request: &mut ExportTraceServiceRequest) {
        if self.is_empty() {
            return;
        }
        for rs in &mut request.resource_spans {
            if let Some(resource) = rs.resource.as_mut() {
                self.attributes(&mut resource.attributes);
            }
            for ss in &mut rs.scope_spans {
                for span in &mut ss.spans {
                    self.attributes(&mut span.attributes);
                    for event in &mut span.events {
                        self.attributes(&mut event.attributes);
                    }
                    for link in &mut span.links {
                        self.attributes(&mut link.attributes);
                    }
                }
            }
        }
    }

    /// Redacts one attribute list. A key inside a key-value list is matched
    /// by its dotted path (`{user: {email: …}}` is `user.email`); each
    /// element of an array by its array's key; a key that names a list or an
    /// array treats every value within it.
    pub fn attributes(&self, attributes: &mut Vec<KeyValue>) {
        self.list(attributes, "");
    }

    fn list(&self, attributes: &mut Vec<KeyValue>, prefix: &str) {
        attributes.retain(|kv| !self.remove.contains(&self.path(prefix, &kv.key)));
        for kv in attributes.iter_mut() {
            let path = self.path(prefix, &kv.key);
            if let Some(value) = kv.value.as_mut() {
                let treatment = self.treatment(&path);
                self.value(value, &path, treatment);
            }
        }
    }

    /// The key of an entry of a list at `prefix`, as the sets hold keys.
    fn path(&self, prefix: &str, key: &str) -> String {
        let path = if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        if self.case_insensitive {
            path.to_ascii_lowercase()
        } else {
            path
        }
    }

    fn treatment(&self, path: &str) -> Option<Treatment<'_>> {
        if self.hash.contains(path) {
            return Some(Treatment::Hash);
        }
        self.mask
            .iter()
            .find(|m| m.key == path)
            .map(Treatment::Mask)
    }

    fn value(&self, value: &mut AnyValue, path: &str, treatment: Option<Treatment<'_>>) {
        match value.value.as_mut() {
            Some(Value::KvlistValue(list)) => match treatment {
                // Everything within a treated list is treated alike.
                Some(t) => {
                    for kv in &mut list.values {
                        if let Some(v) = kv.value.as_mut() {
                            self.value(v, path, Some(t));
                        }
                    }
                }
                None => self.list(&mut list.values, path),
            },
            Some(Value::ArrayValue(array)) => {
                for v in &mut array.values {
                    self.value(v, path, treatment);
                }
            }
            Some(scalar) => match treatment {
                Some(Treatment::Hash) => *scalar = Value::StringValue(self.hashed(&text(scalar))),
                Some(Treatment::Mask(mask)) => {
                    let original = text(scalar);
                    let masked = mask
                        .pattern
                        .replace_all(&original, mask.replacement.as_str());
                    // A string stays a string; another value changes only
                    // if the pattern matched it.
                    if matches!(scalar, Value::StringValue(_)) || masked != original {
                        *scalar = Value::StringValue(masked.into_owned());
                    }
                }
                None => {
                    if let Value::StringValue(text) = scalar {
                        for rule in &self.values {
                            if let Some(masked) = rule.apply(text) {
                                *text = masked;
                            }
                        }
                    }
                }
            },
            None => {}
        }
    }

    /// `sha256:` and the first 128 bits of SHA-256(salt ‖ value), in hex:
    /// equal values stay joinable, but cannot be read back without the salt.
    fn hashed(&self, value: &str) -> String {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(value.as_bytes());
        let digest = h.finalize();
        let mut out = String::from("sha256:");
        for b in &digest[..16] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

/// A scalar's text, as hashed and masked: the string itself, a number or
/// boolean as written, bytes in hex.
fn text(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::BytesValue(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
        // Lists and arrays are walked, never turned into text; only
        // profiles use string-table indexes, and a trace has no table.
        Value::ArrayValue(_) | Value::KvlistValue(_) | Value::StringValueStrindex(_) => {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn get(attrs: &[KeyValue], k: &str) -> Option<String> {
        attrs
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| match kv.value.clone()?.value? {
                Value::StringValue(s) => Some(s),
                _ => None,
            })
    }

    fn any(v: Value) -> Option<AnyValue> {
        Some(AnyValue { value: Some(v) })
    }

    fn list(entries: Vec<KeyValue>) -> Value {
        Value::KvlistValue(opentelemetry_proto::tonic::common::v1::KeyValueList { values: entries })
    }

    fn array(values: Vec<Value>) -> Value {
        Value::ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue {
            values: values
                .into_iter()
                .map(|v| AnyValue { value: Some(v) })
                .collect(),
        })
    }

    fn attr(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: any(v),
            ..Default::default()
        }
    }

    fn s(v: &str) -> Value {
        Value::StringValue(v.into())
    }

    fn redaction(case_insensitive: bool) -> Redaction {
        Redaction {
            remove: ["user.password".to_owned()].into(),
            hash: ["user.email".to_owned()].into(),
            mask: vec![Mask {
                key: "user.phone".into(),
                pattern: Regex::new(r"\d").unwrap(),
                replacement: "*".into(),
            }],
            salt: b"pepper".to_vec(),
            case_insensitive,
            values: Vec::new(),
        }
    }

    /// Nested key-value lists are matched by their dotted path, array
    /// elements by their array's key, at any depth; a hashed value hashes
    /// the same wherever it sits, and every value keeps its type (a masked
    /// array is an array of strings, never debug text).
    #[test]
    fn nested_lists_and_arrays() {
        let r = redaction(false);
        let mut flat = vec![attr("user.email", s("anna@example.com"))];
        r.attributes(&mut flat);
        let hash = get(&flat, "user.email").unwrap();
        let mut attrs = vec![
            attr(
                "user",
                list(vec![
                    attr("email", s("anna@example.com")),
                    attr("password", s("hunter2")),
                    attr(
                        "phone",
                        array(vec![s("+49 30 1234"), Value::IntValue(5551234)]),
                    ),
                    attr("name", s("Anna")),
                ]),
            ),
            attr(
                "user.email",
                array(vec![s("anna@example.com"), s("bob@example.com")]),
            ),
        ];
        r.attributes(&mut attrs);
        let Some(Value::KvlistValue(user)) = attrs[0].value.clone().and_then(|v| v.value) else {
            panic!("user stays a list: {attrs:?}");
        };
        assert_eq!(get(&user.values, "email").unwrap(), hash);
        assert_eq!(
            get(&user.values, "password"),
            None,
            "removed inside the list"
        );
        assert_eq!(get(&user.values, "name").unwrap(), "Anna");
        let phone = user.values.iter().find(|kv| kv.key == "phone").unwrap();
        assert_eq!(
            phone.value,
            any(array(vec![s("+** ** ****"), s("*******")])),
            "masked elements, as strings"
        );
        let Some(Value::ArrayValue(emails)) = attrs[1].value.clone().and_then(|v| v.value) else {
            panic!("user.email stays an array: {attrs:?}");
        };
        assert_eq!(emails.values[0].value, Some(s(&hash)));
        assert!(
            matches!(&emails.values[1].value, Some(Value::StringValue(h)) if h.starts_with("sha256:") && *h != hash)
        );
        let text = format!("{attrs:?}");
        assert!(
            !text.contains("anna@") && !text.contains("bob@") && !text.contains("hunter2"),
            "{text}"
        );
    }

    /// `values` masks e-mail addresses and Luhn-valid card numbers in any
    /// string attribute, nested ones too, whatever the key; digit runs that
    /// fail the Luhn check (an order number) and other text stay.
    #[test]
    fn value_rules() {
        let r = Redaction {
            values: vec![
                ValueRule::named("email").unwrap(),
                ValueRule::named("card_number").unwrap(),
            ],
            ..Redaction::default()
        };
        let mut attrs = vec![
            attr(
                "note",
                s("call anna.k@mail.example.com about 4111 1111 1111 1111"),
            ),
            attr("order.ref", s("4111111111111112")),
            attr(
                "payload",
                list(vec![attr("card", s("5500-0000-0000-0004"))]),
            ),
            attr("count", Value::IntValue(4_111_111_111_111_111)),
        ];
        r.attributes(&mut attrs);
        assert_eq!(get(&attrs, "note").unwrap(), "call ***@*** about ****");
        assert_eq!(get(&attrs, "order.ref").unwrap(), "4111111111111112");
        let Some(Value::KvlistValue(payload)) = attrs[2].value.clone().and_then(|v| v.value) else {
            panic!("{attrs:?}");
        };
        assert_eq!(get(&payload.values, "card").unwrap(), "****");
        assert_eq!(attrs[3].value, any(Value::IntValue(4_111_111_111_111_111)));
        assert!(ValueRule::named("phone").is_none());
    }

    /// With `case_insensitive`, `User.Email` is `user.email`; without it, it
    /// is another key.
    #[test]
    fn case_insensitive_keys() {
        let mut attrs = vec![attr("User.Email", s("anna@example.com"))];
        redaction(false).attributes(&mut attrs);
        assert_eq!(get(&attrs, "User.Email").unwrap(), "anna@example.com");
        redaction(true).attributes(&mut attrs);
        assert!(get(&attrs, "User.Email").unwrap().starts_with("sha256:"));
    }

    /// A masked number changes only if the pattern matches it; a hashed one
    /// becomes the hash of its text.
    #[test]
    fn non_string_scalars() {
        let r = Redaction {
            mask: vec![Mask {
                key: "n".into(),
                pattern: Regex::new("x").unwrap(),
                replacement: "*".into(),
            }],
            hash: ["h".to_owned()].into(),
            salt: b"pepper".to_vec(),
            ..Redaction::default()
        };
        let mut attrs = vec![
            attr("n", Value::IntValue(42)),
            attr("h", Value::IntValue(42)),
        ];
        r.attributes(&mut attrs);
        assert_eq!(attrs[0].value, any(Value::IntValue(42)));
        let mut text = vec![attr("h", s("42"))];
        r.attributes(&mut text);
        assert_eq!(attrs[1].value, text[0].value);
    }

    /// Removed keys go, hashed keys are salted hashes (stable, not the value),
    /// masked keys keep what the pattern does not match.
    #[test]
    fn remove_hash_mask() {
        let r = Redaction {
            remove: ["payment.card_number".to_owned()].into(),
            hash: ["user.email".to_owned()].into(),
            mask: vec![Mask {
                key: "user.phone".into(),
                pattern: Regex::new(r"\d(?:\d{4}$)?").unwrap(),
                replacement: "*".into(),
            }],
            salt: b"pepper".to_vec(),
            case_insensitive: false,
            values: Vec::new(),
        };
        let mut attrs = vec![
            kv("payment.card_number", "4111111111111111"),
            kv("user.email", "anna@example.com"),
            kv("user.phone", "12345"),
            kv("order.id", "42"),
        ];
        r.attributes(&mut attrs);
        assert_eq!(get(&attrs, "payment.card_number"), None);
        let email = get(&attrs, "user.email").unwrap();
        assert!(
            email.starts_with("sha256:") && !email.contains("anna"),
            "{email}"
        );
        let mut again = vec![kv("user.email", "anna@example.com")];
        r.attributes(&mut again);
        assert_eq!(
            get(&again, "user.email").unwrap(),
            email,
            "stable, so traces stay joinable"
        );
        assert_eq!(get(&attrs, "user.phone").unwrap(), "*");
        assert_eq!(get(&attrs, "order.id").unwrap(), "42");
    }
}
