//! The ingester's per-message work before the insert: decode a kept-trace
//! message (one 10-span trace, as the gateway publishes it) and turn its
//! spans into ClickHouse rows. The RowBinary encoding and the HTTP insert
//! itself are measured end to end (`cargo bench -p tailgate-gateway --bench e2e`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use std::hint::black_box;
use tailgate_benches::request;
use tailgate_ingester::{
    config::RawIngesterConfig,
    rows::{Sampling, rows},
};

fn ingest_rows(c: &mut Criterion) {
    let retention = RawIngesterConfig::default().validate().unwrap().retention;
    let sampling = Sampling {
        rule: "errors".into(),
        adjusted_count: 1.0,
    };
    let body = request(7, 1, 10).encode_to_vec();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(10));
    g.bench_function("message_to_rows", |b| {
        b.iter(|| rows(black_box(&body), "msg-1", &sampling, &retention).unwrap())
    });
    g.finish();
}

criterion_group!(benches, ingest_rows);
criterion_main!(benches);
