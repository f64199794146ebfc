//! The ingester's per-message work before the insert: decode a kept-trace
//! message (one 10-span trace, as the gateway publishes it) and turn its
//! spans into ClickHouse rows. The RowBinary encoding and the HTTP insert
//! itself are measured end to end (`cargo bench --bench e2e`).
//! Also the message body's compression, both ends: the gateway compresses
//! each kept trace once, the ingester decompresses it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use std::hint::black_box;
use tailgate_benches::request;
use tailgate_contract::{compression::Compression, config::Validate};
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

    let mut g = c.benchmark_group("message_body");
    g.throughput(Throughput::Bytes(body.len() as u64));
    for c in [Compression::Zstd, Compression::Lz4] {
        let name = c.content_encoding().unwrap();
        let (_, packed) = c.compress(body.clone());
        eprintln!(
            "{name}: {} bytes → {} ({:.1} ×)",
            body.len(),
            packed.len(),
            body.len() as f64 / packed.len() as f64
        );
        g.bench_function(format!("compress_{name}"), |b| {
            b.iter(|| c.compress(black_box(body.clone())))
        });
        g.bench_function(format!("decompress_{name}"), |b| {
            b.iter(|| c.decompress(black_box(&packed)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, ingest_rows);
criterion_main!(benches);
