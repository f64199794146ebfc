//! Evaluating a 20-rule file against 10-span traces: the per-trace cost of
//! a decision. Target: under 2 µs per trace at the median.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::{hint::black_box, time::Instant};
use tailgate_benches::request;
use tailgate_gateway::{
    route::split,
    trace::{DecodedTrace, Detail, decode},
};
use tailgate_sampling_rules::Rules;

/// Twenty rules of the kinds an SRE writes; most traces fall through to the
/// last ones, which is the expensive case.
const RULES: &str = r#"
rules:
  - { name: health, when: { root.span.name: { in: [GET /healthz, GET /readyz, GET /metrics] } }, action: drop }
  - { name: errors, when: { trace.has_error: true }, action: keep }
  - { name: slow, when: { trace.duration: { ">=": 5s } }, action: keep }
  - { name: rejected, when: { attributes.order.status: { matches: "(REJECTED|FAILED)$" } }, action: keep }
  - { name: mes-slow, when: { any_span: { service.name: mes-api, span.duration: { ">": 2s } } }, action: keep }
  - { name: big, when: { trace.span_count: { ">": 200 } }, action: keep }
  - { name: vip, when: { attributes.user.tier: { in: [gold, platinum] } }, action: keep }
  - { name: retries, when: { attributes.retries: { ">=": 3 } }, action: keep }
  - { name: db-errors, when: { any_span: { service.name: mes-db, status.message: exists } }, action: keep }
  - { name: payments, when: { span.name: { starts-with: payment. } }, action: keep }
  - { name: refunds, when: { attributes.http.route: { contains: refund } }, action: keep }
  - { name: canary, when: { resource.deployment.version: { starts-with: canary } }, action: keep }
  - { name: no-root, when: { trace.has_root: false }, action: { sample: { rate: 10 } } }
  - { name: consumers, when: { every_span: { span.kind: CONSUMER } }, action: { sample: { rate: 5 } } }
  - { name: staging, when: { resource.deployment.environment: staging }, action: { sample: { rate: 2 } } }
  - { name: batch, when: { root.service.name: batch-jobs }, action: { sample: { rate: 50 } } }
  - { name: internal, when: { not: { span.kind: { in: [SERVER, CONSUMER] } } }, action: drop }
  - { name: events, when: { event.name: exception }, action: keep }
  - { name: anonymous, when: { attributes.user.id: not-exists }, action: { sample: { rate: 100 } } }
  - { name: rest, action: { sample: { rate: 20 } } }
"#;

/// Decoded traces, as the rules see them at a decision.
fn traces() -> Vec<DecodedTrace> {
    let req: ExportTraceServiceRequest = request(1, 100, 10);
    split(&req.encode_to_vec())
        .unwrap()
        .batches
        .into_iter()
        .map(|b| DecodedTrace {
            trace_id: b.trace_id,
            fragments: decode(&b.fragments, Detail::Full).0,
        })
        .collect()
}

fn rules(c: &mut Criterion) {
    let rules = Rules::from_yaml(RULES, "bench.yaml").unwrap();
    assert_eq!(rules.len(), 20);
    let traces = traces();
    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(1));
    // The gateway passes the `now` it already has; reading the clock is not
    // part of a decision.
    let now = Instant::now();
    let mut cycle = traces.iter().cycle();
    g.bench_function("decide_20_rules_10_spans", |b| {
        b.iter(|| rules.decide(black_box(cycle.next().unwrap()), now))
    });
    g.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);
