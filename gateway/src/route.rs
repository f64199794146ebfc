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
//! freed. They are decoded when their trace is decided ([`decode`]).

use crate::wire::{self, Field, WireError, len_field_size, put_len_field};
use bytes::Bytes;
use foldhash::HashMap;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message;
use std::sync::Arc;
use tailgate_sampling_rules::{SpanRef, TraceId, TraceView};

/// `ExportTraceServiceRequest.resource_spans`, `ResourceSpans.scope_spans`
/// and `ScopeSpans.spans` all have field number 1 or 2.
const RESOURCE_SPANS: u32 = 1;
const SCOPE_SPANS: u32 = 2;
const SPANS: u32 = 2;

/// A resource or a scope as one request reported it: the fields of its
/// `ResourceSpans` (or `ScopeSpans`) other than what it contains, encoded
/// to be written out again unchanged, and decoded for the rules.
#[derive(Debug)]
pub struct Header<M> {
    pub encoded: Bytes,
    /// With its `scope_spans` (or `spans`) empty.
    pub decoded: M,
}

impl<M: Message + Default> Header<M> {
    fn new(fields: &[Field<'_>], what: &str) -> Result<Self, WireError> {
        let encoded: Vec<u8> = fields.iter().flat_map(|f| f.raw).copied().collect();
        let decoded =
            M::decode(encoded.as_slice()).map_err(|e| WireError::new(format!("{what}: {e}")))?;
        Ok(Self {
            encoded: Bytes::from(encoded),
            decoded,
        })
    }
}

pub type ResourceHeader = Arc<Header<ResourceSpans>>;
pub type ScopeHeader = Arc<Header<ScopeSpans>>;

/// Spans of one trace that share a resource and a scope, encoded.
#[derive(Debug)]
pub struct Fragment {
    pub resource: ResourceHeader,
    pub scope: ScopeHeader,
    /// Each span as an encoded `ScopeSpans.spans` field (key, length, span),
    /// so that the fragment is a valid `ScopeSpans` body on its own.
    pub spans: Box<[u8]>,
    pub span_count: usize,
}

/// The spans of one trace found in one request.
#[derive(Debug)]
pub struct TraceBatch {
    pub trace_id: TraceId,
    pub fragments: Vec<Fragment>,
    pub span_count: usize,
    /// Encoded OTLP size of the spans: what the buffer accounts.
    pub bytes: usize,
    pub has_root: bool,
}

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

/// Writes fragments as one encoded `ExportTraceServiceRequest`, merging
/// fragments that came from the same request's resource and scope. Nothing
/// is decoded: this is how spans travel to their owner.
pub fn encode<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> Vec<u8> {
    let tree = group(fragments);
    // Encoded length of each resource's body, and of each of its scopes' bodies.
    let lengths: Vec<(usize, Vec<usize>)> = tree
        .iter()
        .map(|(resource, scopes)| {
            let scopes: Vec<usize> = scopes
                .iter()
                .map(|(scope, frags)| {
                    scope.encoded.len() + frags.iter().map(|f| f.spans.len()).sum::<usize>()
                })
                .collect();
            let body = resource.encoded.len()
                + scopes
                    .iter()
                    .map(|len| len_field_size(SCOPE_SPANS, *len))
                    .sum::<usize>();
            (body, scopes)
        })
        .collect();
    let total = lengths
        .iter()
        .map(|(len, _)| len_field_size(RESOURCE_SPANS, *len))
        .sum();
    let mut out = Vec::with_capacity(total);
    for ((resource, scopes), (resource_len, scope_lens)) in tree.iter().zip(&lengths) {
        put_len_field(&mut out, RESOURCE_SPANS, *resource_len);
        out.extend_from_slice(&resource.encoded);
        for ((scope, frags), scope_len) in scopes.iter().zip(scope_lens) {
            put_len_field(&mut out, SCOPE_SPANS, *scope_len);
            out.extend_from_slice(&scope.encoded);
            for f in frags {
                out.extend_from_slice(&f.spans);
            }
        }
    }
    out
}

/// Fragments by resource, then scope, in first-seen order.
type Tree<'a> = Vec<(
    &'a ResourceHeader,
    Vec<(&'a ScopeHeader, Vec<&'a Fragment>)>,
)>;

/// Groups fragments by their resource, then scope (compared by identity, so
/// only what came from one request merges).
fn group<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> Tree<'a> {
    let mut out: Tree<'a> = Vec::new();
    for item in fragments {
        let (resource, scope) = (&item.resource, &item.scope);
        let r = match out.iter().position(|(k, _)| Arc::ptr_eq(k, resource)) {
            Some(r) => r,
            None => {
                out.push((resource, Vec::new()));
                out.len() - 1
            }
        };
        let scopes = &mut out[r].1;
        match scopes.iter_mut().find(|(k, _)| Arc::ptr_eq(k, scope)) {
            Some((_, items)) => items.push(item),
            None => scopes.push((scope, vec![item])),
        }
    }
    out
}

/// A fragment with its spans decoded.
#[derive(Debug)]
pub struct Decoded {
    pub resource: ResourceHeader,
    pub scope: ScopeHeader,
    pub spans: Vec<Span>,
}

/// How much of each span to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Everything: for publishing, and for rules that read attributes.
    Full,
    /// All but attributes, events and links, which are most of a span's
    /// bytes and allocations, and the trace and span IDs: enough for rules
    /// that do not read attributes, and for nothing else.
    Summary,
}

/// A span without its attributes, events and links, nor its trace and span
/// IDs: the trace's ID is the buffer's key and no rule reads a span's own,
/// and each would be an allocation. The tags are those of `Span`; prost
/// skips the fields left out without allocating for them.
#[derive(Clone, PartialEq, Message)]
struct SpanSummary {
    #[prost(string, tag = "3")]
    trace_state: String,
    #[prost(bytes = "vec", tag = "4")]
    parent_span_id: Vec<u8>,
    #[prost(fixed32, tag = "16")]
    flags: u32,
    #[prost(string, tag = "5")]
    name: String,
    #[prost(int32, tag = "6")]
    kind: i32,
    #[prost(fixed64, tag = "7")]
    start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    end_time_unix_nano: u64,
    #[prost(message, optional, tag = "15")]
    status: Option<opentelemetry_proto::tonic::trace::v1::Status>,
}

/// `ScopeSpans` with summarised spans: a fragment's bytes decode as this.
#[derive(Clone, PartialEq, Message)]
struct ScopeSpansSummary {
    #[prost(message, repeated, tag = "2")]
    spans: Vec<SpanSummary>,
}

impl From<SpanSummary> for Span {
    fn from(s: SpanSummary) -> Self {
        Span {
            trace_state: s.trace_state,
            parent_span_id: s.parent_span_id,
            flags: s.flags,
            name: s.name,
            kind: s.kind,
            start_time_unix_nano: s.start_time_unix_nano,
            end_time_unix_nano: s.end_time_unix_nano,
            status: s.status,
            ..Span::default()
        }
    }
}

/// Decodes fragments' spans to `detail`. They were checked when they
/// arrived, so this does not fail; a fragment that did would be left out
/// and counted in the second value.
pub fn decode(fragments: &[Fragment], detail: Detail) -> (Vec<Decoded>, usize) {
    let mut undecodable = 0;
    let decoded = fragments
        .iter()
        .filter_map(|f| {
            let spans = match detail {
                Detail::Full => ScopeSpans::decode(&*f.spans).map(|body| body.spans),
                Detail::Summary => ScopeSpansSummary::decode(&*f.spans)
                    .map(|body| body.spans.into_iter().map(Span::from).collect()),
            };
            match spans {
                Ok(spans) => Some(Decoded {
                    resource: Arc::clone(&f.resource),
                    scope: Arc::clone(&f.scope),
                    spans,
                }),
                Err(_) => {
                    undecodable += f.span_count;
                    None
                }
            }
        })
        .collect();
    (decoded, undecodable)
}

/// A decoded trace, as the rules see it.
#[derive(Debug)]
pub struct DecodedTrace {
    pub trace_id: TraceId,
    pub fragments: Vec<Decoded>,
}

impl TraceView for DecodedTrace {
    fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    fn spans(&self) -> impl Iterator<Item = SpanRef<'_>> {
        self.fragments.iter().flat_map(|f| {
            f.spans.iter().map(move |span| SpanRef {
                resource: f.resource.decoded.resource.as_ref(),
                scope: f.scope.decoded.scope.as_ref(),
                span,
            })
        })
    }
}

/// Re-assembles decoded fragments into OTLP, merging fragments that came
/// from the same request's resource and scope.
pub fn into_request(fragments: Vec<Decoded>) -> ExportTraceServiceRequest {
    let mut out: Vec<ResourceSpans> = Vec::new();
    // Parallel to `out`: the headers each entry was built from.
    let mut keys: Vec<(ResourceHeader, Vec<ScopeHeader>)> = Vec::new();
    for f in fragments {
        let r = match keys.iter().position(|(k, _)| Arc::ptr_eq(k, &f.resource)) {
            Some(r) => r,
            None => {
                out.push(ResourceSpans {
                    resource: f.resource.decoded.resource.clone(),
                    scope_spans: Vec::new(),
                    schema_url: f.resource.decoded.schema_url.clone(),
                });
                keys.push((f.resource, Vec::new()));
                out.len() - 1
            }
        };
        let scopes = &mut keys[r].1;
        let s = match scopes.iter().position(|k| Arc::ptr_eq(k, &f.scope)) {
            Some(s) => s,
            None => {
                out[r].scope_spans.push(ScopeSpans {
                    scope: f.scope.decoded.scope.clone(),
                    spans: Vec::new(),
                    schema_url: f.scope.decoded.schema_url.clone(),
                });
                scopes.push(f.scope);
                scopes.len() - 1
            }
        };
        out[r].scope_spans[s].spans.extend(f.spans);
    }
    ExportTraceServiceRequest {
        resource_spans: out,
    }
}
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
        resource::v1::Resource,
    };

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

    /// A summary decode yields every span field a full decode does except
    /// attributes, events, links and the IDs, so rules that read no
    /// attributes see the same span either way (they read neither ID).
    #[test]
    fn summary_is_the_span_without_attributes_events_links_and_ids() {
        use opentelemetry_proto::tonic::trace::v1::{Status, span};
        let mut full = span(1, 2, Some(1));
        full.trace_state = "ot=rv:0123456789abcd".into();
        full.flags = 0x301;
        full.kind = 2;
        full.start_time_unix_nano = 1_000;
        full.end_time_unix_nano = 5_000;
        full.status = Some(Status {
            message: "timeout".into(),
            code: 2,
        });
        full.attributes = resource("x").attributes;
        full.dropped_attributes_count = 3;
        full.events = vec![span::Event {
            name: "exception".into(),
            ..Default::default()
        }];
        full.links = vec![span::Link {
            trace_id: vec![7; 16],
            span_id: vec![7; 8],
            ..Default::default()
        }];
        let routed = split_request(&request(vec![("svc", vec![full.clone()])]));
        let fragments = &routed.batches[0].fragments;
        let (decoded, failed) = decode(fragments, Detail::Summary);
        assert_eq!(failed, 0);
        let expected = Span {
            trace_id: Vec::new(),
            span_id: Vec::new(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Vec::new(),
            links: Vec::new(),
            ..full.clone()
        };
        assert_eq!(decoded[0].spans, vec![expected]);
        assert_eq!(decode(fragments, Detail::Full).0[0].spans, vec![full]);
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

    /// Fragments from the same request merge back into one resource and scope.
    #[test]
    fn reassembly_merges_shared_metadata() {
        let mut routed = split_request(&request(vec![(
            "a",
            vec![span(1, 1, None), span(1, 2, Some(1))],
        )]));
        let back = into_request(decode(&routed.batches.remove(0).fragments, Detail::Full).0);
        assert_eq!(back.resource_spans.len(), 1);
        assert_eq!(back.resource_spans[0].scope_spans[0].spans.len(), 2);
    }

    /// Fragments written back out without decoding make the same request:
    /// resources, scopes and spans byte for byte, merged as before.
    #[test]
    fn encoding_without_decoding_round_trips() {
        let req = request(vec![
            ("shop-api", vec![span(1, 1, None), span(1, 2, Some(1))]),
            ("crm-api", vec![span(1, 3, Some(1))]),
        ]);
        let routed = split_request(&req);
        let fragments = &routed.batches[0].fragments;
        let bytes = encode(fragments.iter());
        assert_eq!(bytes, req.encode_to_vec());
        assert_eq!(
            ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap(),
            req
        );
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
}
