//! Stage 2, route: split an export request into one batch per trace.
//!
//! An OTLP request nests spans under resources and scopes, and mixes traces.
//! The buffer needs them the other way round: per trace, with the resource
//! and scope of every span kept (shared, not copied) so the trace can be
//! re-emitted as valid OTLP. This is also where spans with no valid trace or
//! span ID are rejected; the cluster's owner lookup will sit here too.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::InstrumentationScope,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message;
use std::{collections::HashMap, sync::Arc};
use tailgate_sampling_rules::TraceId;

/// A resource as reported by one request, shared by all its spans' fragments.
#[derive(Debug, Default, PartialEq)]
pub struct ResourceMeta {
    pub resource: Option<Resource>,
    pub schema_url: String,
}

/// An instrumentation scope as reported by one request.
#[derive(Debug, Default, PartialEq)]
pub struct ScopeMeta {
    pub scope: Option<InstrumentationScope>,
    pub schema_url: String,
}

/// Spans of one trace that share a resource and a scope.
#[derive(Debug)]
pub struct Fragment {
    pub resource: Arc<ResourceMeta>,
    pub scope: Arc<ScopeMeta>,
    pub spans: Vec<Span>,
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

pub fn split_by_trace(request: ExportTraceServiceRequest) -> Routed {
    let mut routed = Routed::default();
    let mut index: HashMap<TraceId, usize> = HashMap::new();
    for rs in request.resource_spans {
        let ResourceSpans {
            resource,
            scope_spans,
            schema_url,
        } = rs;
        let resource = Arc::new(ResourceMeta {
            resource,
            schema_url,
        });
        for ss in scope_spans {
            let ScopeSpans {
                scope,
                spans,
                schema_url,
            } = ss;
            let scope = Arc::new(ScopeMeta { scope, schema_url });
            // Fragments opened for this (resource, scope), by batch index.
            let mut open: HashMap<usize, usize> = HashMap::new();
            for span in spans {
                let Some(trace_id) = TraceId::from_slice(&span.trace_id) else {
                    routed.reject(format!(
                        "span {:?} has an invalid trace_id: {} bytes, must be 16 and not all zero",
                        span.name,
                        span.trace_id.len()
                    ));
                    continue;
                };
                if span.span_id.len() != 8 || span.span_id.iter().all(|b| *b == 0) {
                    routed.reject(format!(
                        "span {:?} of trace {trace_id} has an invalid span_id: {} bytes, must be 8 and not all zero",
                        span.name,
                        span.span_id.len()
                    ));
                    continue;
                }
                let bytes = span.encoded_len();
                let b = *index.entry(trace_id).or_insert_with(|| {
                    routed.batches.push(TraceBatch {
                        trace_id,
                        fragments: Vec::new(),
                        span_count: 0,
                        bytes: 0,
                        has_root: false,
                    });
                    routed.batches.len() - 1
                });
                let batch = &mut routed.batches[b];
                let f = *open.entry(b).or_insert_with(|| {
                    batch.fragments.push(Fragment {
                        resource: Arc::clone(&resource),
                        scope: Arc::clone(&scope),
                        spans: Vec::new(),
                    });
                    batch.fragments.len() - 1
                });
                batch.has_root |= span.parent_span_id.is_empty();
                batch.span_count += 1;
                batch.bytes += bytes;
                routed.span_count += 1;
                routed.bytes += bytes;
                batch.fragments[f].spans.push(span);
            }
        }
    }
    routed
}

impl Routed {
    fn reject(&mut self, why: String) {
        self.rejected += 1;
        // OTLP carries one message; the first one tells the client what is wrong.
        self.rejection.get_or_insert(why);
    }
}

/// Re-assembles fragments into OTLP, merging fragments that came from the
/// same request's resource and scope.
pub fn into_request(fragments: Vec<Fragment>) -> ExportTraceServiceRequest {
    let mut out: Vec<ResourceSpans> = Vec::new();
    // Parallel to `out`: the shared metadata each entry was built from.
    let mut keys: Vec<(*const ResourceMeta, Vec<*const ScopeMeta>)> = Vec::new();
    for fragment in fragments {
        let rkey = Arc::as_ptr(&fragment.resource);
        let r = match keys.iter().position(|(k, _)| *k == rkey) {
            Some(r) => r,
            None => {
                keys.push((rkey, Vec::new()));
                out.push(ResourceSpans {
                    resource: fragment.resource.resource.clone(),
                    scope_spans: Vec::new(),
                    schema_url: fragment.resource.schema_url.clone(),
                });
                out.len() - 1
            }
        };
        let skey = Arc::as_ptr(&fragment.scope);
        let scopes = &mut keys[r].1;
        let s = match scopes.iter().position(|k| *k == skey) {
            Some(s) => s,
            None => {
                scopes.push(skey);
                out[r].scope_spans.push(ScopeSpans {
                    scope: fragment.scope.scope.clone(),
                    spans: Vec::new(),
                    schema_url: fragment.scope.schema_url.clone(),
                });
                scopes.len() - 1
            }
        };
        out[r].scope_spans[s].spans.extend(fragment.spans);
    }
    ExportTraceServiceRequest {
        resource_spans: out,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};

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
        let routed = split_by_trace(req);
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
        let back = into_request(routed.batches.swap_remove(0).fragments);
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
        let routed = split_by_trace(request(vec![(
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
        let mut routed = split_by_trace(request(vec![(
            "a",
            vec![span(1, 1, None), span(1, 2, Some(1))],
        )]));
        let back = into_request(routed.batches.remove(0).fragments);
        assert_eq!(back.resource_spans.len(), 1);
        assert_eq!(back.resource_spans[0].scope_spans[0].spans.len(), 2);
    }
}
