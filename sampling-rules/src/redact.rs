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

#[derive(Debug, Default)]
pub struct Redaction {
    pub remove: HashSet<String>,
    pub hash: HashSet<String>,
    pub mask: Vec<Mask>,
    pub salt: Vec<u8>,
}

impl Redaction {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.hash.is_empty() && self.mask.is_empty()
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

    pub fn attributes(&self, attributes: &mut Vec<KeyValue>) {
        attributes.retain(|kv| !self.remove.contains(&kv.key));
        for kv in attributes.iter_mut() {
            let Some(value) = kv.value.as_mut().and_then(|v| v.value.as_mut()) else {
                continue;
            };
            if self.hash.contains(&kv.key) {
                *value = Value::StringValue(self.hashed(&text(value)));
                continue;
            }
            for mask in self.mask.iter().filter(|m| m.key == kv.key) {
                let masked = mask
                    .pattern
                    .replace_all(&text(value), mask.replacement.as_str())
                    .into_owned();
                *value = Value::StringValue(masked);
            }
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

fn text(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!(
            "{:?}",
            AnyValue {
                value: Some(other.clone())
            }
        ),
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
