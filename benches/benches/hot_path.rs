//! The gateway's hot path on one core: check, route and buffer a request of
//! 100 ten-span traces (spans stay encoded); decode, decide and encode
//! buffered traces. Raw prost decoding of the same bytes is the baseline. Also the pieces on their
//! own: buffering already-routed spans, and the owner lookup of a trace.

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
    let rules = Rules::default_policy(cfg.policy.slow_threshold, cfg.policy.random_share);
    let metrics = Arc::new(Metrics::new());
    let (cluster, _) = Cluster::new(
        &cfg.cluster,
        "127.0.0.1:4319".into(),
        Arc::clone(&metrics),
        std::time::Duration::from_secs(30),
    );
    Pipeline::new(
        &cfg,
        Arc::new(rules),
        metrics,
        Arc::new(Outbox::new(usize::MAX)),
        cluster,
    )
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
