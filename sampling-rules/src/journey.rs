//! Journeys: an entity (an order) followed across traces by a key attribute
//! that every span touching it carries, and a status attribute that the spans
//! changing it carry.
//!
//! The gateway reads a journey's fields from every span that has its key,
//! before sampling ([`Journey::event`]); the ingester's stuck-journey finder
//! uses the limits ([`Journey::max_time_in`], [`Journey::is_terminal`]).

use crate::{
    field::{FieldValue, SpanField},
    node::Pos,
    trace::SpanRef,
};
use memchr::memmem;
use std::time::Duration;

/// Most fields a journey may capture per event: events are sent for every
/// span with a key, so each one must stay small.
pub const MAX_CAPTURE: usize = 16;
/// Longest captured or key value kept in an event, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub struct Journey {
    pub(crate) name: String,
    /// `(field name as written, field)`.
    pub(crate) key: (String, SpanField),
    pub(crate) status: Option<(String, SpanField)>,
    pub(crate) max_time_in_status: Vec<(String, Duration)>,
    pub(crate) default_max_time: Option<Duration>,
    pub(crate) terminal: Vec<String>,
    pub(crate) capture: Vec<(String, SpanField)>,
    pub(crate) pos: Pos,
    /// Finds the key's attribute name in an encoded span.
    pub(crate) finder: Option<memmem::Finder<'static>>,
}

/// How to read every journey from a span's attributes alone, made once
/// when the rules compile: the attributes some journey reads, each once,
/// and each journey's fields as indexes into them. A reader looks at each
/// of a span's attributes once, and finds a journey's values by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributePlans {
    /// Every span attribute some journey reads, each once.
    pub wanted: Vec<String>,
    /// One per journey, in the rules' order.
    pub journeys: Vec<AttributePlan>,
}

/// One journey's fields as indexes into [`AttributePlans::wanted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributePlan {
    pub key: usize,
    pub status: Option<usize>,
    /// `(field name as written in the rules, attribute)`.
    pub captures: Vec<(String, usize)>,
}

impl AttributePlans {
    /// `None` when some journey reads a field that is not a span attribute
    /// (a resource attribute, the span's name, ...).
    pub fn new(journeys: &[Journey]) -> Option<Self> {
        let mut wanted: Vec<String> = Vec::new();
        let mut index = |f: &SpanField| -> Option<usize> {
            let SpanField::Attribute(name) = f else {
                return None;
            };
            Some(match wanted.iter().position(|w| w == name) {
                Some(i) => i,
                None => {
                    wanted.push(name.clone());
                    wanted.len() - 1
                }
            })
        };
        let journeys = journeys
            .iter()
            .map(|j| {
                Some(AttributePlan {
                    key: index(&j.key.1)?,
                    status: match &j.status {
                        Some((_, f)) => Some(index(f)?),
                        None => None,
                    },
                    captures: j
                        .capture
                        .iter()
                        .map(|(label, f)| Some((label.clone(), index(f)?)))
                        .collect::<Option<Vec<_>>>()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { wanted, journeys })
    }
}

/// A value cut to [`MAX_VALUE_BYTES`] at a character boundary.
fn bounded_str(text: &str) -> &str {
    let mut end = text.len().min(MAX_VALUE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What one span says about a journey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JourneyFields {
    pub key: String,
    /// Empty when the span does not carry the status.
    pub status: String,
    /// `(field name as written in the rules, value)`.
    pub captured: Vec<(String, String)>,
}

fn bounded(value: &FieldValue<'_>) -> String {
    bounded_str(&value.text()).to_owned()
}

impl Journey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the journey is defined in the rules file.
    pub fn pos(&self) -> Pos {
        self.pos
    }

    /// The span attribute key that holds the journey's key, when it is a
    /// span attribute: a span whose encoded bytes do not contain it cannot
    /// carry the key, and need not be decoded. `None` for a resource
    /// attribute, which is read from the (already decoded) resource.
    pub fn span_attribute_key(&self) -> Option<&str> {
        match &self.key.1 {
            SpanField::Attribute(k) => Some(k),
            _ => None,
        }
    }

    /// Whether an encoded span may carry the key: false only when the key
    /// is a span attribute whose name is nowhere in the span's bytes. The
    /// name of an attribute is stored as is in protobuf, so a span that
    /// carries it contains it; a span that merely contains it (in a value)
    /// is decoded and found to have no key.
    pub fn may_be_in(&self, encoded_span: &[u8]) -> bool {
        self.finder
            .as_ref()
            .is_none_or(|f| f.find(encoded_span).is_some())
    }

    /// Every span attribute the journey reads (key, status, captures): a
    /// span can be decoded for it without the others.
    pub fn span_attributes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&self.key.1)
            .chain(self.status.as_ref().map(|(_, f)| f))
            .chain(self.capture.iter().map(|(_, f)| f))
            .filter_map(|f| match f {
                SpanField::Attribute(k) => Some(k.as_str()),
                _ => None,
            })
    }

    /// Whether the journey reads a span's events (`event.name`).
    pub fn reads_events(&self) -> bool {
        std::iter::once(&self.key.1)
            .chain(self.status.as_ref().map(|(_, f)| f))
            .chain(self.capture.iter().map(|(_, f)| f))
            .any(|f| matches!(f, SpanField::EventName))
    }

    /// The resource attribute that holds the key, when it is one.
    pub fn resource_attribute_key(&self) -> Option<&str> {
        match &self.key.1 {
            SpanField::ResourceAttribute(k) => Some(k),
            _ => None,
        }
    }

    /// The journey's fields in `span`, if it carries the key (a non-empty
    /// scalar).
    pub fn event(&self, span: &SpanRef<'_>) -> Option<JourneyFields> {
        let key = bounded(&self.key.1.value(span)?);
        if key.is_empty() {
            return None;
        }
        let status = self
            .status
            .as_ref()
            .and_then(|(_, f)| f.value(span))
            .map(|v| bounded(&v))
            .unwrap_or_default();
        let captured = self
            .capture
            .iter()
            .filter_map(|(name, f)| Some((name.clone(), bounded(&f.value(span)?))))
            .collect();
        Some(JourneyFields {
            key,
            status,
            captured,
        })
    }

    /// The longest normal wait in `status`; `None` for a terminal status, or
    /// one with no limit.
    pub fn max_time_in(&self, status: &str) -> Option<Duration> {
        if self.is_terminal(status) {
            return None;
        }
        self.max_time_in_status
            .iter()
            .find(|(s, _)| s == status)
            .map(|(_, d)| *d)
            .or(self.default_max_time)
    }

    pub fn is_terminal(&self, status: &str) -> bool {
        self.terminal.iter().any(|t| t == status)
    }

    /// The statuses with a limit, in the order the file lists them.
    pub fn limits(&self) -> &[(String, Duration)] {
        &self.max_time_in_status
    }

    pub fn default_max_time(&self) -> Option<Duration> {
        self.default_max_time
    }

    pub fn terminal(&self) -> &[String] {
        &self.terminal
    }

    /// One line per journey, for `rules check`.
    pub fn describe(&self) -> String {
        let limits: Vec<String> = self
            .max_time_in_status
            .iter()
            .map(|(s, d)| format!("{s} {}", human(*d)))
            .collect();
        format!(
            "journey {}: key {}, status {}, limits [{}]{}, terminal [{}], capture [{}]",
            self.name,
            self.key.0,
            self.status.as_ref().map_or("-", |(name, _)| name.as_str()),
            limits.join(", "),
            self.default_max_time
                .map_or_else(String::new, |d| format!(", other statuses {}", human(d))),
            self.terminal.join(", "),
            self.capture
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )
    }
}

/// A duration as an SRE writes it: `90s`, `10m`, `8h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
