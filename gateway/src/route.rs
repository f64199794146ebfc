//! Stage 2, route: split an export request into one batch per trace.
//!
//! An OTLP request nests spans under resources and scopes, and mixes traces.
//! The buffer needs them the other way round: per trace, with the resource
//! and scope of every span kept (shared, not copied) so the trace can be
//! re-emitted as valid OTLP. This is also where spans with no valid trace or
//! span ID are rejected; the cluster's owner lookup follows in the pipeline.
//!
//! Spans stay encoded (see [`crate::wire`]): a batch holds each span's
//! protobuf bytes, copied out of the request so the request itself can be
//! freed. What a batch is, and how it is decoded when its trace is decided,
//! is the trace model's ([`crate::trace`]).

use crate::{
    trace::{
        Fragment, Header, RESOURCE_SPANS, ResourceHeader, SCOPE_SPANS, SPANS, ScopeHeader,
        TraceBatch,
    },
    wire::{self, Field, WireError},
};
use foldhash::HashMap;
use std::sync::Arc;
use tailgate_sampling_rules::TraceId;

/// A request split by trace.
#[derive(Debug, Default)]
pub struct Routed {
    pub batches: Vec<TraceBatch>,
    pub span_count: usize,
    pub bytes: usize,
    /// Spans refused for invalid IDs, reported in `partial_success`.
    pub rejected: usize,
    pub rejection: Option<String>,
}

/// What the router reads of a span; the rest stays encoded.
struct SpanIds<'a> {
    trace_id: &'a [u8],
    span_id: &'a [u8],
    parent_span_id: &'a [u8],
    name: &'a [u8],
}

impl<'a> SpanIds<'a> {
    /// Reads the IDs and checks every field, as decoding would.
    fn read(span: &'a [u8]) -> Result<Self, WireError> {
        let mut ids = SpanIds {
            trace_id: &[],
            span_id: &[],
            parent_span_id: &[],
            name: &[],
        };
        for field in wire::fields(span) {
            let field = field?;
            wire::SPAN.check_field(&field)?;
            // A repeated singular field: the last one counts, as in prost.
            match field.number {
                1 => ids.trace_id = field.len("Span.trace_id")?,
                2 => ids.span_id = field.len("Span.span_id")?,
                4 => ids.parent_span_id = field.len("Span.parent_span_id")?,
                5 => ids.name = field.len("Span.name")?,
                _ => {}
            }
        }
        Ok(ids)
    }

    fn name(&self) -> String {
        String::from_utf8_lossy(self.name).into_owned()
    }
}

/// Splits an encoded `ExportTraceServiceRequest` by trace. A request that
/// would not decode is refused whole, with what is wrong; spans with bad IDs
/// are rejected one by one.
pub fn split(request: &[u8]) -> Result<Routed, WireError> {
    let mut splitter = Splitter::default();
    for field in wire::fields(request) {
        let field = field?;
        if field.number == RESOURCE_SPANS {
            splitter.resource_spans(field.len("ExportTraceServiceRequest.resource_spans")?)?;
        }
    }
    Ok(splitter.routed)
}

#[derive(Default)]
struct Splitter {
    routed: Routed,
    /// Batch index of each trace seen so far.
    index: HashMap<TraceId, usize>,
}

impl Splitter {
    fn resource_spans(&mut self, message: &[u8]) -> Result<(), WireError> {
        let (scopes, header) = partition(message, SCOPE_SPANS)?;
        let resource: ResourceHeader = Arc::new(Header::new(&header, "ResourceSpans")?);
        for scope_spans in scopes {
            self.scope_spans(&resource, scope_spans.len("ResourceSpans.scope_spans")?)?;
        }
        Ok(())
    }

    fn scope_spans(&mut self, resource: &ResourceHeader, message: &[u8]) -> Result<(), WireError> {
        let (spans, header) = partition(message, SPANS)?;
        let scope: ScopeHeader = Arc::new(Header::new(&header, "ScopeSpans")?);
        // Spans of this scope per batch, copied out once their sizes are known.
        let mut open: Vec<(usize, Vec<&[u8]>)> = Vec::new();
        let mut open_index: HashMap<usize, usize> = HashMap::default();
        // Spans of one trace are usually next to each other.
        let mut last: Option<(TraceId, usize)> = None;
        for field in spans {
            let ids = SpanIds::read(field.len("ScopeSpans.spans")?)?;
            let Some(trace_id) = TraceId::from_slice(ids.trace_id) else {
                self.reject(format!(
                    "span {:?} has an invalid trace_id: {} bytes, must be 16 and not all zero",
                    ids.name(),
                    ids.trace_id.len()
                ));
                continue;
            };
            if ids.span_id.len() != 8 || ids.span_id.iter().all(|b| *b == 0) {
                self.reject(format!(
                    "span {:?} of trace {trace_id} has an invalid span_id: {} bytes, must be 8 and not all zero",
                    ids.name(),
                    ids.span_id.len()
                ));
                continue;
            }
            let routed = &mut self.routed;
            let b = match last {
                Some((id, b)) if id == trace_id => b,
                _ => *self.index.entry(trace_id).or_insert_with(|| {
                    routed.batches.push(TraceBatch {
                        trace_id,
                        fragments: Vec::new(),
                        span_count: 0,
                        bytes: 0,
                        has_root: false,
                    });
                    routed.batches.len() - 1
                }),
            };
            last = Some((trace_id, b));
            let bytes = field.raw.len();
            let batch = &mut routed.batches[b];
            batch.has_root |= ids.parent_span_id.is_empty();
            batch.span_count += 1;
            batch.bytes += bytes;
            routed.span_count += 1;
            routed.bytes += bytes;
            let o = *open_index.entry(b).or_insert_with(|| {
                open.push((b, Vec::new()));
                open.len() - 1
            });
            open[o].1.push(field.raw);
        }
        for (b, raws) in open {
            let mut spans = Vec::with_capacity(raws.iter().map(|r| r.len()).sum());
            for raw in &raws {
                spans.extend_from_slice(raw);
            }
            self.routed.batches[b].fragments.push(Fragment {
                resource: Arc::clone(resource),
                scope: Arc::clone(&scope),
                spans: spans.into_boxed_slice(),
                span_count: raws.len(),
            });
        }
        Ok(())
    }

    fn reject(&mut self, why: String) {
        self.routed.rejected += 1;
        // OTLP carries one message; the first one tells the client what is wrong.
        self.routed.rejection.get_or_insert(why);
    }
}

/// A message's fields with number `inner` (what it contains), and the others
/// (its header).
fn partition(message: &[u8], inner: u32) -> Result<(Vec<Field<'_>>, Vec<Field<'_>>), WireError> {
    let mut contained = Vec::new();
    let mut header = Vec::new();
    for field in wire::fields(message) {
        let field = field?;
        if field.number == inner {
            contained.push(field);
        } else {
            header.push(field);
        }
    }
    Ok((contained, header))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::trace::{Detail, decode, into_request};
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };
    use proptest::prelude::*;
    use prost::Message;

    pub(crate) fn span(trace: u8, span: u8, parent: Option<u8>) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![span; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("span-{span}"),
            ..Default::default()
        }
    }

    pub(crate) fn resource(service: &str) -> Resource {
        Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(Value::StringValue(service.into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Splits a request as the receivers do, from its encoding.
    pub(crate) fn split_request(request: &ExportTraceServiceRequest) -> Routed {
        split(&request.encode_to_vec()).unwrap()
    }

    pub(crate) fn request(groups: Vec<(&str, Vec<Span>)>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: groups
                .into_iter()
                .map(|(service, spans)| ResourceSpans {
                    resource: Some(resource(service)),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "test".into(),
                            ..Default::default()
                        }),
                        spans,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        }
    }

    /// Spans of two traces under two resources come out as two batches that
    /// keep each span's resource, and a root is noticed.
    #[test]
    fn splits_by_trace_keeping_resources() {
        let req = request(vec![
            ("shop-api", vec![span(1, 1, None), span(2, 2, Some(9))]),
            ("crm-api", vec![span(1, 3, Some(1))]),
        ]);
        let routed = split_request(&req);
        assert_eq!(routed.batches.len(), 2);
        assert_eq!(routed.span_count, 3);
        assert_eq!(routed.rejected, 0);
        let one = &routed.batches[0];
        assert_eq!(one.trace_id, TraceId([1; 16]));
        assert!(one.has_root);
        assert_eq!(one.span_count, 2);
        assert_eq!(one.fragments.len(), 2);
        assert!(!routed.batches[1].has_root);
        let mut routed = routed;
        let back = into_request(decode(&routed.batches.swap_remove(0).fragments, Detail::Full).0);
        assert_eq!(back.resource_spans.len(), 2);
        assert_eq!(back.resource_spans[1].resource, Some(resource("crm-api")));
    }

    /// Spans without a valid trace or span ID are rejected with a message; the rest pass.
    #[test]
    fn invalid_ids_are_rejected() {
        let mut short = span(1, 1, None);
        short.trace_id = vec![1; 8];
        let zero = span(0, 1, None);
        let mut no_span_id = span(3, 1, None);
        no_span_id.span_id.clear();
        let routed = split_request(&request(vec![(
            "a",
            vec![short, zero, no_span_id, span(4, 4, None)],
        )]));
        assert_eq!(routed.rejected, 3);
        assert_eq!(routed.span_count, 1);
        assert!(routed.rejection.unwrap().contains("trace_id"));
    }

    /// A request that prost would not decode is refused whole, saying why,
    /// even when the fault is deep inside one span.
    #[test]
    fn malformed_requests_are_refused() {
        assert!(split(&[0xff, 0xff]).is_err());
        let mut bad = span(1, 1, None);
        bad.name = "x".repeat(40);
        let mut bytes = request(vec![("a", vec![bad])]).encode_to_vec();
        let at = bytes.iter().position(|b| *b == b'x').unwrap();
        bytes[at] = 0xc0;
        let err = split(&bytes).unwrap_err();
        assert!(err.to_string().contains("Span.name"), "{err}");
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
    }

    /// A request of up to 12 spans of 4 traces under 2 services, with valid
    /// IDs (OTLP forbids all-zero ones), and names, parents and attributes
    /// of any content: what the fuzz properties start from.
    pub(crate) fn arb_request() -> impl Strategy<Value = ExportTraceServiceRequest> {
        let span = (
            1u8..5,
            1u8..=255,
            proptest::option::of(any::<u8>()),
            ".{0,12}",
            proptest::collection::vec((".{0,8}", ".{0,16}"), 0..3),
        )
            .prop_map(|(trace, id, parent, name, attributes)| {
                let mut s = span(trace, id, parent);
                s.name = name;
                s.attributes = attributes
                    .into_iter()
                    .map(|(key, value)| KeyValue {
                        key,
                        value: Some(AnyValue {
                            value: Some(Value::StringValue(value)),
                        }),
                        ..Default::default()
                    })
                    .collect();
                s
            });
        (
            proptest::collection::vec(span.clone(), 0..6),
            proptest::collection::vec(span, 0..6),
        )
            .prop_map(|(a, b)| request(vec![("shop-api", a), ("crm-api", b)]))
    }

    /// Every span a split accepted, decoded again from its fragments, in a
    /// comparable order: (trace ID, span ID, the whole span).
    fn accepted_spans(routed: &Routed) -> Vec<(Vec<u8>, Vec<u8>, Span)> {
        let mut spans: Vec<_> = routed
            .batches
            .iter()
            .flat_map(|b| decode(&b.fragments, Detail::Full).0)
            .flat_map(|d| d.spans)
            .map(|s| (s.trace_id.clone(), s.span_id.clone(), s))
            .collect();
        spans.sort_by(|a, b| (&a.0, &a.1, &a.2.name).cmp(&(&b.0, &b.1, &b.2.name)));
        spans
    }

    proptest! {
        /// Fuzz, the wire reader and the splitter: any bytes at all are
        /// refused with an error or split, never a panic; and whatever is
        /// accepted, prost decodes too, into the same spans (those with
        /// valid IDs), each once.
        #[test]
        fn fuzz_split_never_panics_and_agrees_with_prost(
            bytes in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            if let Ok(routed) = split(&bytes) {
                let request = ExportTraceServiceRequest::decode(bytes.as_slice());
                prop_assert!(
                    request.is_ok(),
                    "split accepted what prost refuses ({:?}): {:02x?}",
                    request.as_ref().err(),
                    bytes
                );
                let request = request.unwrap_or_default();
                let total: usize = request
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len())
                    .sum();
                prop_assert_eq!(routed.span_count + routed.rejected, total);
                prop_assert_eq!(accepted_spans(&routed).len(), routed.span_count);
            }
        }

        /// Fuzz, valid requests and damaged ones: a generated request
        /// splits into exactly its spans; the same bytes truncated or with
        /// a byte changed are refused or, where they still decode, agree
        /// with prost span for span.
        #[test]
        fn fuzz_split_of_real_and_damaged_requests(
            request in arb_request(),
            cut in any::<proptest::sample::Index>(),
            flip in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let bytes = request.encode_to_vec();
            let routed = split(&bytes);
            prop_assert!(routed.is_ok());
            let routed = routed.unwrap_or_default();
            let mut want: Vec<_> = request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| s.spans.clone())
                .map(|s| (s.trace_id.clone(), s.span_id.clone(), s))
                .collect();
            want.sort_by(|a, b| (&a.0, &a.1, &a.2.name).cmp(&(&b.0, &b.1, &b.2.name)));
            prop_assert_eq!(accepted_spans(&routed), want);
            for damaged in [
                bytes[..cut.index(bytes.len() + 1)].to_vec(),
                {
                    let mut b = bytes.clone();
                    if !b.is_empty() {
                        let at = flip.index(b.len());
                        b[at] = byte;
                    }
                    b
                },
            ] {
                if let Ok(routed) = split(&damaged) {
                    let decoded = ExportTraceServiceRequest::decode(damaged.as_slice());
                    prop_assert!(
                        decoded.is_ok(),
                        "split accepted what prost refuses ({:?}): {:02x?}",
                        decoded.err(),
                        damaged
                    );
                    prop_assert_eq!(accepted_spans(&routed).len(), routed.span_count);
                }
            }
        }
    }
}
