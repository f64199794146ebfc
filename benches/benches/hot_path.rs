//! The gateway's hot path on one core: check, route and buffer a request of
//! 100 ten-span traces (spans stay encoded); decode, decide and encode
//! buffered traces, under the built-in policy and under the journeys
//! budget's rules with and without journeys. Raw prost decoding of the same
//! bytes is the baseline. Also the pieces on their own: buffering
//! already-routed spans, and the owner lookup of a trace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::{hint::black_box, sync::Arc};
use tailgate_benches::request;
use tailgate_contract::config::Validate;
use tailgate_gateway::{
    buffer::Buffer,
    cluster::{Cluster, ring::Ring},
    config::RawConfig,
    metrics::Metrics,
    pipeline::Pipeline,
    publish::Outbox,
    route::split,
};
use tailgate_sampling_rules::Rules;

const TRACES: u64 = 100;
const SPANS: u32 = 10;

fn pipeline() -> Pipeline {
    let cfg = RawConfig::default().validate().unwrap();
    with_rules(Rules::default_policy(
        cfg.policy.slow_threshold,
        cfg.policy.random_share,
    ))
}

/// The rules of the end-to-end benchmark's journey budget (the built-in
/// policy as rules, with or without the order journey).
fn bench_rules(file: &str) -> Rules {
    let path = format!("{}/rules/{file}", env!("CARGO_MANIFEST_DIR"));
    Rules::load(std::path::Path::new(&path)).unwrap()
}

fn with_rules(rules: Rules) -> Pipeline {
    with_outbox(rules, Arc::new(Outbox::new(usize::MAX)), 2.0)
}

fn with_outbox(rules: Rules, outbox: Arc<Outbox>, decision_wait_secs: f64) -> Pipeline {
    let mut raw = RawConfig::default();
    raw.buffer.decision_wait_secs = decision_wait_secs;
    let cfg = raw.validate().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (cluster, _) = Cluster::new(
        &cfg.cluster,
        "127.0.0.1:4319".into(),
        Arc::clone(&metrics),
        std::time::Duration::from_secs(30),
    );
    Pipeline::new(&cfg, Arc::new(rules), metrics, outbox, cluster)
}

fn hot_path(c: &mut Criterion) {
    let body = request(0, TRACES, SPANS).encode_to_vec();
    let spans = TRACES * u64::from(SPANS);
    eprintln!(
        "corpus: {spans} spans in {} bytes ({} bytes per span)",
        body.len(),
        body.len() as u64 / spans
    );
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(spans));
    g.bench_function("prost_decode", |b| {
        b.iter(|| ExportTraceServiceRequest::decode(black_box(body.as_slice())).unwrap())
    });
    g.bench_function("check_route_buffer", |b| {
        b.iter_batched(
            pipeline,
            |p| {
                p.ingest(split(&body).unwrap(), "bench").unwrap();
                p
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decide_and_encode", |b| {
        b.iter_batched(
            || {
                let p = pipeline();
                p.ingest(split(&body).unwrap(), "bench").unwrap();
                p
            },
            |p| {
                p.close();
                p
            },
            BatchSize::SmallInput,
        )
    });
    // The journeys budget on one core, in a steady state: one long-lived
    // pipeline decides new traces every iteration, as a gateway does, so
    // its reused buffers are warm. Only the sweep that decides, encodes and
    // (with journeys) records events is timed; ingesting and emptying the
    // outbox are not. Every span of this corpus carries `order.id`, so with
    // journeys on every span gives an event.
    let encoded = tailgate_benches::corpus::Encoded::new(&request(0, TRACES, SPANS));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for (name, file) in [
        ("decide_steady_rules", "default-policy.yaml"),
        ("decide_steady_journeys", "default-policy-journeys.yaml"),
    ] {
        let outbox = Arc::new(Outbox::new(usize::MAX));
        let p = with_outbox(bench_rules(file), Arc::clone(&outbox), 0.0);
        let mut pass = 0;
        let mut journey_bytes = (0, 0);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = std::time::Duration::ZERO;
                for _ in 0..iters {
                    pass += 1;
                    let body = encoded.body_for_pass(pass);
                    p.ingest(split(&body).unwrap(), "bench").unwrap();
                    let start = std::time::Instant::now();
                    p.sweep();
                    timed += start.elapsed();
                    assert_eq!(p.buffered_traces(), 0, "every trace is decided");
                    for msg in runtime.block_on(outbox.take(usize::MAX)) {
                        let events = msg.journey_event_count();
                        if events > 0 {
                            journey_bytes.0 += msg.body.len();
                            journey_bytes.1 += events;
                        }
                        outbox.settle(&msg);
                    }
                }
                timed
            })
        });
        if let Some(per_event) = journey_bytes.0.checked_div(journey_bytes.1) {
            eprintln!("{name}: {per_event} bytes per journey event, compressed");
        }
    }
    g.bench_function("buffer_add", |b| {
        let cfg = RawConfig::default().validate().unwrap();
        b.iter_batched(
            || (Buffer::new(&cfg.buffer), split(&body).unwrap().batches),
            |(buffer, batches)| {
                let now = tokio::time::Instant::now();
                for batch in batches {
                    black_box(buffer.add(batch, now, |_| None::<()>));
                }
                buffer
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let ids: Vec<_> = (0..1000)
        .map(|n| tailgate_sampling_rules::TraceId(tailgate_benches::trace_id(n)))
        .collect();
    let mut g = c.benchmark_group("owner_lookup");
    g.throughput(Throughput::Elements(ids.len() as u64));
    for nodes in [3, 20] {
        let ring = Ring::new((0..nodes).map(|i| format!("10.0.0.{i}:4319").into()));
        g.bench_function(format!("{nodes}_nodes"), |b| {
            b.iter(|| {
                for id in &ids {
                    black_box(ring.owner(id));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
