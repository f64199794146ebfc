//! The trace model: a trace's spans as the buffer holds them, grouped by
//! the resource and scope they came with, and the ways out of it.
//!
//! - Spans stay encoded, in [`Fragment`]s of one resource and scope, from
//!   the moment [`crate::route`] splits a request until their trace is
//!   decided. The resource and scope are shared between a request's
//!   fragments, not copied.
//! - [`encode`] writes fragments back out as an OTLP request without
//!   decoding anything: how spans travel to the node that owns them.
//! - [`decode`] reads them for the rules ([`DecodedTrace`]), fully or as
//!   summaries, and [`into_request`] makes the decoded spans the OTLP
//!   request that is published.

use crate::wire::{Field, WireError, len_field_size, put_len_field};
use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message;
use std::sync::Arc;
use tailgate_sampling_rules::{SpanRef, TraceId, TraceView};

/// `ExportTraceServiceRequest.resource_spans`, `ResourceSpans.scope_spans`
/// and `ScopeSpans.spans` all have field number 1 or 2.
pub(crate) const RESOURCE_SPANS: u32 = 1;
pub(crate) const SCOPE_SPANS: u32 = 2;
pub(crate) const SPANS: u32 = 2;

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
    pub(crate) fn new(fields: &[Field<'_>], what: &str) -> Result<Self, WireError> {
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

/// Fragments and decoded fragments alike: spans under a resource and a scope.
trait Headed {
    fn resource(&self) -> &ResourceHeader;
    fn scope(&self) -> &ScopeHeader;
}

impl Headed for &Fragment {
    fn resource(&self) -> &ResourceHeader {
        &self.resource
    }
    fn scope(&self) -> &ScopeHeader {
        &self.scope
    }
}

impl Headed for Decoded {
    fn resource(&self) -> &ResourceHeader {
        &self.resource
    }
    fn scope(&self) -> &ScopeHeader {
        &self.scope
    }
}

/// `items` by resource, then by scope, in first-seen order, as indices into
/// `items`. Headers compare by identity, so only what came from one request
/// merges. The one place a trace's spans are grouped for writing out.
fn group(items: &[impl Headed]) -> Vec<Vec<Vec<usize>>> {
    let mut out: Vec<Vec<Vec<usize>>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        // Every group holds at least one item: the one that opened it.
        let r = match out
            .iter()
            .position(|scopes| Arc::ptr_eq(items[scopes[0][0]].resource(), item.resource()))
        {
            Some(r) => r,
            None => {
                out.push(Vec::new());
                out.len() - 1
            }
        };
        let scopes = &mut out[r];
        match scopes
            .iter()
            .position(|members| Arc::ptr_eq(items[members[0]].scope(), item.scope()))
        {
            Some(s) => scopes[s].push(i),
            None => scopes.push(vec![i]),
        }
    }
    out
}

/// Writes fragments as one encoded `ExportTraceServiceRequest`, merging
/// fragments that came from the same request's resource and scope. Nothing
/// is decoded: this is how spans travel to their owner.
pub fn encode<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> Vec<u8> {
    let items: Vec<&Fragment> = fragments.into_iter().collect();
    let tree = group(&items);
    // Encoded length of each resource's body, and of each of its scopes' bodies.
    let lengths: Vec<(usize, Vec<usize>)> = tree
        .iter()
        .map(|scopes| {
            let scope_lens: Vec<usize> = scopes
                .iter()
                .map(|members| {
                    items[members[0]].scope.encoded.len()
                        + members.iter().map(|&i| items[i].spans.len()).sum::<usize>()
                })
                .collect();
            let body = items[scopes[0][0]].resource.encoded.len()
                + scope_lens
                    .iter()
                    .map(|len| len_field_size(SCOPE_SPANS, *len))
                    .sum::<usize>();
            (body, scope_lens)
        })
        .collect();
    let total = lengths
        .iter()
        .map(|(len, _)| len_field_size(RESOURCE_SPANS, *len))
        .sum();
    let mut out = Vec::with_capacity(total);
    for (scopes, (resource_len, scope_lens)) in tree.iter().zip(&lengths) {
        put_len_field(&mut out, RESOURCE_SPANS, *resource_len);
        out.extend_from_slice(&items[scopes[0][0]].resource.encoded);
        for (members, scope_len) in scopes.iter().zip(scope_lens) {
            put_len_field(&mut out, SCOPE_SPANS, *scope_len);
            out.extend_from_slice(&items[members[0]].scope.encoded);
            for &i in members {
                out.extend_from_slice(&items[i].spans);
            }
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
pub fn into_request(mut fragments: Vec<Decoded>) -> ExportTraceServiceRequest {
    let tree = group(&fragments);
    let resource_spans = tree
        .into_iter()
        .map(|scopes| {
            let resource = &fragments[scopes[0][0]].resource.decoded;
            let (resource, schema_url) = (resource.resource.clone(), resource.schema_url.clone());
            let scope_spans = scopes
                .into_iter()
                .map(|members| {
                    let scope = &fragments[members[0]].scope.decoded;
                    let (scope, schema_url) = (scope.scope.clone(), scope.schema_url.clone());
                    // Each fragment's spans are moved out exactly once.
                    let spans = members
                        .into_iter()
                        .flat_map(|i| std::mem::take(&mut fragments[i].spans))
                        .collect();
                    ScopeSpans {
                        scope,
                        spans,
                        schema_url,
                    }
                })
                .collect();
            ResourceSpans {
                resource,
                scope_spans,
                schema_url,
            }
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::tests::{request, resource, span, split_request};

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
}
