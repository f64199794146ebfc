//! The whole pipeline: gateway → RabbitMQ → ingester → ClickHouse engine.
//! Each test has its own exchange, queues and database, and its own
//! ClickHouse engine (the chDB front, or `TAILGATE_TEST_CLICKHOUSE_URL`).

// Test code reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use prost::Message;
use serde_json::json;
use support::{
    amqp_url,
    broker::TestQueue,
    clickhouse::ClickHouse,
    gateway::{Gateway, Tailgate},
    ingest::Ingest,
    otlp::{self, OrderSpan, hex, kv, order_trace, trace_id},
};
use tailgate_contract::compression::Compression;

/// A gateway that keeps every trace (rule `random` at 100%, adjusted count 1).
fn keep_all_gateway(q: &TestQueue) -> Gateway {
    Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[("TAILGATE_POLICY__RANDOM_SHARE", "1")],
    )
}

fn str_of(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// Every kept span arrives with every field right (attributes, events,
/// links, status, resource, scope, sampling columns), and the trace is found
/// by ID through the lookup table.
#[tokio::test(flavor = "multi_thread")]
async fn kept_spans_arrive_with_every_field() {
    let ch = ClickHouse::start();
    let q = TestQueue::new("ing-fields").await;
    let names = Ingest::new(&q.exchange);
    let ing = names.start(&q.exchange, &ch, &[]).await;
    let gw = Gateway::start(&amqp_url(), &q.exchange, &[]);
    let id = trace_id(31, 1);
    let mut spans: Vec<OrderSpan> = order_trace(id, 120, Some("PRICE_CALCULATED failed"));
    let mes = &mut spans[2].span;
    mes.trace_state = "vendor=x".into();
    mes.events.push(Event {
        time_unix_nano: mes.start_time_unix_nano + 5_000,
        name: "exception".into(),
        attributes: vec![kv("exception.type", "TimeoutError")],
        ..Default::default()
    });
    mes.links.push(Link {
        trace_id: trace_id(31, 2).to_vec(),
        span_id: vec![9; 8],
        trace_state: "a=b".into(),
        attributes: vec![kv("link.reason", "retry")],
        ..Default::default()
    });
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    ing.wait_metric("tailgate_ingester_inserted_rows_total", &[], 3.0)
        .await;

    let table = format!("{}.otel_traces", names.db);
    let rows = ch
        .json_rows(&format!(
            "SELECT * FROM {table} WHERE TraceId = '{}' ORDER BY SpanId",
            hex(&id)
        ))
        .await;
    assert_eq!(rows.len(), 3);
    let root = &rows[0];
    assert_eq!(str_of(&root["SpanId"]), "01".repeat(8));
    assert_eq!(str_of(&root["ParentSpanId"]), "");
    assert_eq!(str_of(&root["ServiceName"]), "shop-api");
    assert_eq!(str_of(&root["SpanName"]), "POST /orders");
    assert_eq!(str_of(&root["SpanKind"]), "Server");
    assert_eq!(str_of(&root["Duration"]), "120000000");
    assert_eq!(
        str_of(&root["ResourceAttributes"]["deployment.environment"]),
        "test"
    );
    assert_eq!(str_of(&root["ScopeName"]), "order-pipeline");
    assert_eq!(str_of(&root["ScopeVersion"]), "1.0");
    assert_eq!(str_of(&root["SpanAttributes"]["sampling.rule"]), "error");
    assert!(
        root["SpanAttributes"]["order.id"]
            .as_str()
            .unwrap()
            .starts_with("ord-")
    );
    assert_eq!(str_of(&root["TraceState"]), "ot=th:0");
    let m = &rows[2];
    assert_eq!(str_of(&m["ParentSpanId"]), "02".repeat(8));
    assert_eq!(str_of(&m["SpanKind"]), "Consumer");
    assert_eq!(str_of(&m["StatusCode"]), "Error");
    assert_eq!(str_of(&m["StatusMessage"]), "PRICE_CALCULATED failed");
    assert_eq!(str_of(&m["TraceState"]), "ot=th:0,vendor=x");
    assert_eq!(m["Events.Name"], json!(["exception"]));
    assert_eq!(
        m["Events.Attributes"][0]["exception.type"],
        json!("TimeoutError")
    );
    assert_eq!(m["Links.TraceId"], json!([hex(&trace_id(31, 2))]));
    assert_eq!(m["Links.SpanId"], json!(["09".repeat(8)]));
    assert_eq!(m["Links.TraceState"], json!(["a=b"]));
    assert_eq!(m["Links.Attributes"][0]["link.reason"], json!("retry"));
    for r in &rows {
        assert_eq!(str_of(&r["SamplingRule"]), "error");
        assert_eq!(r["AdjustedCount"], json!(1));
        assert_eq!(str_of(&r["RetentionClass"]), "long");
        assert!(!str_of(&r["MessageId"]).is_empty());
    }

    // Find the trace by ID: its time range from the lookup table bounds the span scan.
    let range = ch
        .json_rows(&format!(
            "SELECT Start, End FROM {table}_trace_id_ts WHERE TraceId = '{}'",
            hex(&id)
        ))
        .await;
    assert_eq!(range.len(), 1, "{range:?}");
    let found = ch
        .number(&format!(
            "SELECT count() FROM {table} WHERE TraceId = '{id}' AND Timestamp >= '{start}' AND Timestamp <= toDateTime('{end}') + 1",
            id = hex(&id),
            start = str_of(&range[0]["Start"]),
            end = str_of(&range[0]["End"]),
        ))
        .await;
    assert_eq!(found, 3.0);
    drop(gw);
    drop(ing);
    names.cleanup().await;
    q.delete().await;
}

/// Spans shifted into the past by `days`.
fn aged(mut spans: Vec<OrderSpan>, days: u64) -> Vec<OrderSpan> {
    let shift = days * 86_400 * 1_000_000_000;
    for s in &mut spans {
        s.span.start_time_unix_nano -= shift;
        s.span.end_time_unix_nano -= shift;
    }
    spans
}

/// A first deployment: ClickHouse has no `tailgate` database yet. The
/// database context names a database that does not exist, which ClickHouse
/// refuses for any statement (code 81), so `tailgate ingester migrate` must
/// create it without one. It does, exits 0, and an ingester started without
/// `migrate_on_start` then stores a kept trace there. (Every other test's
/// ingester migrates a database of its own on start, the other way in.)
#[tokio::test(flavor = "multi_thread")]
async fn migrate_sets_up_a_fresh_clickhouse() {
    let ch = ClickHouse::start();
    let q = TestQueue::new("ing-fresh").await;
    let names = Ingest::new(&q.exchange);
    let db = names.db.as_str();
    let exists = format!("SELECT count() FROM system.databases WHERE name = '{db}'");
    assert_eq!(ch.number(&exists).await, 0.0);
    let (status, code, _) = ch.request(&[("database", db)], &[], "SELECT 1").await;
    assert_eq!((status, code.as_deref()), (404, Some("81")));

    let env = names.env(&q.exchange, &ch, &[]);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = Tailgate::run(&["ingester", "migrate"], &refs);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ch.number(&exists).await, 1.0);

    let ing = names
        .start(
            &q.exchange,
            &ch,
            &[("TAILGATE_CLICKHOUSE__MIGRATE_ON_START", "false")],
        )
        .await;
    let gw = keep_all_gateway(&q);
    let spans = order_trace(trace_id(36, 1), 10, None);
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    ing.wait_metric("tailgate_ingester_inserted_rows_total", &[], 3.0)
        .await;
    let stored = format!("SELECT count() FROM {db}.otel_traces");
    assert_eq!(ch.number(&stored).await, 3.0);
    drop(gw);
    drop(ing);
    names.cleanup().await;
    q.delete().await;
}

/// The test engine refuses what a real ClickHouse server refuses, with the
/// same code and HTTP status (tests/support/clickhouse-http/README.md lists
/// the sources): a database context naming a missing database, credentials
/// the server does not know, and a setting it does not know. A request
/// without a database context runs in `default`, never in the database of
/// the request before it.
#[tokio::test(flavor = "multi_thread")]
async fn the_clickhouse_engine_refuses_what_clickhouse_refuses() {
    let ch = ClickHouse::start();
    let current = "SELECT currentDatabase()";
    let (status, code, body) = ch.request(&[("database", "nowhere")], &[], current).await;
    assert_eq!((status, code.as_deref()), (404, Some("81")), "{body}");
    assert!(body.contains("UNKNOWN_DATABASE"), "{body}");
    let (status, code, body) = ch
        .request(&[], &[("X-ClickHouse-Database", "nowhere")], current)
        .await;
    assert_eq!((status, code.as_deref()), (404, Some("81")), "{body}");

    ch.query("CREATE DATABASE IF NOT EXISTS somewhere").await;
    let (status, _, body) = ch.request(&[("database", "somewhere")], &[], current).await;
    assert_eq!((status, body.trim()), (200, "somewhere"));
    assert_eq!(ch.query(current).await.trim(), "default");

    let wrong = [
        ("X-ClickHouse-User", "default"),
        ("X-ClickHouse-Key", "guess"),
    ];
    let (status, code, body) = ch.request(&[], &wrong, "SELECT 1").await;
    assert_eq!((status, code.as_deref()), (403, Some("516")), "{body}");
    let stranger = [("X-ClickHouse-User", "mallory")];
    let (status, code, _) = ch.request(&[], &stranger, "SELECT 1").await;
    assert_eq!((status, code.as_deref()), (403, Some("516")));

    let (status, code, body) = ch
        .request(&[("no_such_setting", "1")], &[], "SELECT 1")
        .await;
    assert_eq!((status, code.as_deref()), (404, Some("115")), "{body}");
    let (status, _, body) = ch.request(&[("max_threads", "1")], &[], "SELECT 1").await;
    assert_eq!((status, body.trim()), (200, "1"));
}

/// The TTL tests' start: short retention 30 days (the short class given by
/// rule name), and one 20-day-old trace of each class stored through the
/// whole pipeline.
struct Aged {
    ch: ClickHouse,
    q: TestQueue,
    names: Ingest,
    gw: Gateway,
    ing: Tailgate,
    table: String,
}

const SHORT_RULES: (&str, &str) = ("TAILGATE_RETENTION__SHORT_RULES", r#"["random"]"#);

impl Aged {
    async fn start(tag: &str, seed: u64) -> Self {
        let ch = ClickHouse::start();
        let q = TestQueue::new(tag).await;
        let names = Ingest::new(&q.exchange);
        let ing = names
            .start(
                &q.exchange,
                &ch,
                &[SHORT_RULES, ("TAILGATE_RETENTION__SHORT_DAYS", "30")],
            )
            .await;
        let gw = keep_all_gateway(&q);
        let long = aged(order_trace(trace_id(seed, 1), 10, Some("boom")), 20);
        let short = aged(order_trace(trace_id(seed, 2), 10, None), 20);
        otlp::send_grpc(&gw.grpc_url(), otlp::request(&[long, short].concat()))
            .await
            .unwrap();
        ing.wait_metric("tailgate_ingester_inserted_rows_total", &[], 6.0)
            .await;
        let table = format!("{}.otel_traces", names.db);
        Self {
            ch,
            q,
            names,
            gw,
            ing,
            table,
        }
    }

    /// Runs `tailgate ingester migrate` with the short class's retention at 14 days.
    fn shorten_retention(&self) -> std::process::Output {
        let env = self.names.env(
            &self.q.exchange,
            &self.ch,
            &[SHORT_RULES, ("TAILGATE_RETENTION__SHORT_DAYS", "14")],
        );
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Tailgate::run(&["ingester", "migrate"], &refs)
    }

    async fn count(&self, class: &str) -> f64 {
        let table = &self.table;
        self.ch
            .number(&format!(
                "SELECT count() FROM {table} WHERE RetentionClass = '{class}'"
            ))
            .await
    }

    async fn finish(self) {
        drop(self.gw);
        drop(self.ing);
        self.names.cleanup().await;
        self.q.delete().await;
    }
}

/// TTL tiers: with short retention 30 days, 20-day-old traces of both
/// classes are stored; `migrate` with short retention 14 days alters the TTL
/// (no data loss for the long class), and then the short class's rows are
/// gone after forced merges while the long class's remain.
#[tokio::test(flavor = "multi_thread")]
async fn ttl_drops_the_short_class_after_its_retention() {
    let t = Aged::start("ing-ttl", 32).await;
    let (ch, table) = (&t.ch, &t.table);
    assert_eq!(t.count("long").await, 3.0);
    assert_eq!(t.count("short").await, 3.0);

    let out = t.shorten_retention();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ddl = ch.query(&format!("SHOW CREATE TABLE {table}")).await;
    assert!(ddl.contains("90, 14"), "TTL altered: {ddl}");

    ch.query(&format!("OPTIMIZE TABLE {table} FINAL")).await;
    ch.query(&format!("OPTIMIZE TABLE {table}_trace_id_ts FINAL"))
        .await;
    assert_eq!(
        t.count("short").await,
        0.0,
        "short class past its retention"
    );
    assert_eq!(t.count("long").await, 3.0, "long class kept");
    let lookup = format!("SELECT count() FROM {table}_trace_id_ts WHERE RetentionClass = 'short'");
    assert_eq!(ch.number(&lookup).await, 0.0);
    t.finish().await;
}

/// The same, left to ClickHouse's background work: after `migrate` shortens
/// the retention, the expired parts disappear without any forced merge.
#[tokio::test(flavor = "multi_thread")]
async fn ttl_applies_in_the_background() {
    let t = Aged::start("ing-ttl-bg", 33).await;
    assert!(t.shorten_retention().status.success());
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while t.count("short").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "short rows still there"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(t.count("long").await, 3.0);
    t.finish().await;
}

/// ClickHouse unavailable for a while: nothing is acknowledged meanwhile,
/// and afterwards every row is present, none twice.
#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_outage_loses_nothing() {
    let ch = ClickHouse::start();
    if !ch.is_test_engine() {
        return; // a real server cannot be taken down from here
    }
    let q = TestQueue::new("ing-outage").await;
    let names = Ingest::new(&q.exchange);
    let ing = names.start(&q.exchange, &ch, &[]).await;
    let gw = keep_all_gateway(&q);
    ch.control(json!({"down": true})).await;
    let spans: Vec<OrderSpan> = (0..5)
        .flat_map(|i| order_trace(trace_id(34, i), 10, None))
        .collect();
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    ing.wait_metric("tailgate_ingester_insert_failures_total", &[], 2.0)
        .await;
    assert_eq!(
        ing.metric("tailgate_ingester_acked_messages_total", &[])
            .await,
        0.0
    );
    assert_eq!(ing.ready_status().await, 503);
    ch.control(json!({"down": false})).await;
    ing.wait_metric("tailgate_ingester_acked_messages_total", &[], 5.0)
        .await;
    let table = format!("{}.otel_traces", names.db);
    ch.assert_each_span_once(&table, 15.0).await;
    drop(gw);
    drop(ing);
    names.cleanup().await;
    q.delete().await;
}

/// The ingester is killed after ClickHouse took a batch but before it
/// acknowledged the messages: after a restart the redelivered messages are
/// recognised as stored. No loss, no duplicates.
#[tokio::test(flavor = "multi_thread")]
async fn killed_between_insert_and_ack() {
    let ch = ClickHouse::start();
    if !ch.is_test_engine() {
        return; // needs the engine's insert hold
    }
    let q = TestQueue::new("ing-kill").await;
    let names = Ingest::new(&q.exchange);
    let first = names.start(&q.exchange, &ch, &[]).await;
    let gw = keep_all_gateway(&q);
    ch.control(json!({"hold_inserts": true})).await;
    let spans: Vec<OrderSpan> = (0..5)
        .flat_map(|i| order_trace(trace_id(35, i), 10, None))
        .collect();
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while ch.control(json!({})).await["held"] != json!(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no insert reached ClickHouse"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    first.kill();
    ch.control(json!({"hold_inserts": false})).await;
    let table = format!("{}.otel_traces", names.db);
    let stored = ch.number(&format!("SELECT count() FROM {table}")).await;
    assert!(stored > 0.0, "the held insert was executed");

    let second = names.start(&q.exchange, &ch, &[]).await;
    second
        .wait_metric("tailgate_ingester_duplicate_messages_total", &[], 1.0)
        .await;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while ch.number(&format!("SELECT count() FROM {table}")).await < 15.0 {
        assert!(tokio::time::Instant::now() < deadline, "rows missing");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    second
        .wait_metric(
            "tailgate_ingester_acked_messages_total",
            &[],
            second
                .metric("tailgate_ingester_consumed_messages_total", &[])
                .await,
        )
        .await;
    ch.assert_each_span_once(&table, 15.0).await;
    drop(gw);
    drop(second);
    names.cleanup().await;
    q.delete().await;
}

/// Both copies of a republished message in one batch: a gateway that lost
/// its broker connection before the confirm publishes the message again,
/// and an ingester cut off by the same outage gets both on redelivery. The
/// copies wait in the queue while no ingester runs, so the next one takes
/// them in one batch: the rows are stored once, and the second copy is
/// counted as a duplicate. Found by the chaos run (before the fix, every
/// row of such a message was stored twice).
#[tokio::test(flavor = "multi_thread")]
async fn two_copies_in_one_batch_are_stored_once() {
    let ch = ClickHouse::start();
    let q = TestQueue::new("ing-twice").await;
    let names = Ingest::new(&q.exchange);
    // The first ingester declares the queue; none runs while the copies arrive.
    names.start(&q.exchange, &ch, &[]).await.terminate();
    let body = otlp::request(&order_trace(trace_id(37, 1), 10, None)).encode_to_vec();
    for _ in 0..2 {
        q.publish_raw("traces.keep.shop-api", &body, "republished-1", None)
            .await;
    }
    let ing = names.start(&q.exchange, &ch, &[]).await;
    ing.wait_metric("tailgate_ingester_acked_messages_total", &[], 2.0)
        .await;
    assert_eq!(
        ing.metric("tailgate_ingester_batch_messages_count", &[])
            .await,
        1.0,
        "both copies in one batch"
    );
    assert_eq!(
        ing.metric("tailgate_ingester_duplicate_messages_total", &[])
            .await,
        1.0
    );
    ch.assert_each_span_once(&format!("{}.otel_traces", names.db), 3.0)
        .await;
    drop(ing);
    names.cleanup().await;
    q.delete().await;
}

/// The ingester's admin port holds its connections to `admin.*` limits:
/// with `max_connections` 2, two clients that connect and send nothing take
/// both places, and a probe is answered only once one of them has been
/// closed by `header_read_timeout_secs`, never alongside them.
#[tokio::test(flavor = "multi_thread")]
async fn the_ingester_admin_port_is_held_to_its_limits() {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };
    let ch = ClickHouse::start();
    let q = TestQueue::new("ing-admin").await;
    let names = Ingest::new(&q.exchange);
    let ing = names
        .start(
            &q.exchange,
            &ch,
            &[
                ("TAILGATE_ADMIN__MAX_CONNECTIONS", "2"),
                ("TAILGATE_ADMIN__HEADER_READ_TIMEOUT_SECS", "1"),
            ],
        )
        .await;
    let mut silent = [
        TcpStream::connect(ing.admin).await.unwrap(),
        TcpStream::connect(ing.admin).await.unwrap(),
    ];
    let mut probe = TcpStream::connect(ing.admin).await.unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: tailgate\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    probe.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let mut closed = 0;
    for held in &mut silent {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::ZERO, held.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("a silent client was sent something"),
            Err(_) => {}
        }
    }
    assert!(
        closed >= 1,
        "the probe was served while both silent clients were open"
    );
    drop(ing);
    names.cleanup().await;
    q.delete().await;
}

/// Messages that cannot be read (not protobuf, an unknown
/// `content_encoding`, a body that is not what its encoding says) go to the
/// dead-letter queue with a header saying why, and are counted. The
/// messages around them flow on, whether compressed by the gateway (lz4,
/// the default), by another producer (zstd) or not at all.
#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered() {
    let ch = ClickHouse::start();
    let q = TestQueue::new("ing-poison").await;
    let names = Ingest::new(&q.exchange);
    let ing = names.start(&q.exchange, &ch, &[]).await;
    let gw = keep_all_gateway(&q);
    let key = "traces.error.shop-api";
    let poison: [(&[u8], Option<&str>, &str); 3] = [
        (b"\xff\xff not protobuf", None, "not an OTLP"),
        (
            b"\x1f\x8b gzip?",
            Some("gzip"),
            "unknown content_encoding \"gzip\"",
        ),
        (
            b"\xff\xff not zstd",
            Some("zstd"),
            "zstd body does not decompress",
        ),
    ];
    for (n, (body, encoding, _)) in poison.iter().enumerate() {
        q.publish_raw(key, body, &format!("poison-{n}"), *encoding)
            .await;
    }
    let encoded = |n| otlp::request(&order_trace(trace_id(36, n), 10, None)).encode_to_vec();
    q.publish_raw(key, &encoded(2), "plain-1", None).await;
    let (_, zstd) = Compression::Zstd.compress(encoded(3));
    q.publish_raw(key, &zstd, "zstd-1", Some("zstd")).await;
    otlp::send_grpc(
        &gw.grpc_url(),
        otlp::request(&order_trace(trace_id(36, 1), 10, None)),
    )
    .await
    .unwrap();
    // One consumer, so they are dead-lettered in the order they were published.
    for (body, _, why) in poison {
        let dead = q.get_from(&names.dlq).await.expect("dead-lettered message");
        assert_eq!(dead.delivery.data, body);
        let headers = dead
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = match headers.inner().get("x-tailgate-dead-letter-reason") {
            Some(lapin::types::AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        assert!(reason.as_deref().unwrap_or("").contains(why), "{reason:?}");
    }
    ing.wait_metric("tailgate_ingester_inserted_rows_total", &[], 9.0)
        .await;
    ing.wait_metric("tailgate_ingester_acked_messages_total", &[], 6.0)
        .await;
    assert_eq!(
        ing.metric(
            "tailgate_ingester_dead_lettered_messages_total",
            &[("reason", "undecodable")]
        )
        .await,
        3.0
    );
    drop(gw);
    drop(ing);
    names.cleanup().await;
    q.delete().await;
}

/// Secrets from files, as a mounted Kubernetes Secret gives them: the
/// broker URL from `rabbitmq.url_file` and the ClickHouse password from
/// `clickhouse.password_file` are in force, and `--check-config` shows
/// neither; a file that cannot be read is named in the error, its content
/// never.
#[test]
fn secrets_come_from_files() {
    let dir = std::env::temp_dir().join(support::unique("secret-files"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = dir.join("rabbitmq-url");
    std::fs::write(&url, "amqp://tg:swordfish@rabbit-from-file:5672/%2f\n").unwrap();
    let password = dir.join("clickhouse-password");
    std::fs::write(&password, "hunter2\n").unwrap();
    let (url, password) = (url.display().to_string(), password.display().to_string());
    let out = Tailgate::run(
        &["ingester", "--check-config"],
        &[
            ("TAILGATE_RABBITMQ__URL_FILE", url.as_str()),
            ("TAILGATE_CLICKHOUSE__PASSWORD_FILE", password.as_str()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("amqp://tg:<redacted>@rabbit-from-file:5672/%2f"),
        "{stdout}"
    );
    assert!(stdout.contains("password: <redacted>"), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("swordfish"),
        "{stdout}"
    );

    let missing = dir.join("nope").display().to_string();
    let out = Tailgate::run(
        &["ingester", "--check-config"],
        &[("TAILGATE_CLICKHOUSE__PASSWORD_FILE", missing.as_str())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("clickhouse.password_file") && stderr.contains(&missing),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A run whose credentials all come from files leaks none of them. The
/// gateway and the ingester read the broker URL from `rabbitmq.url_file`
/// (the URL in the environment points nowhere, so the file's is in force),
/// and the ingester its ClickHouse password from `clickhouse.password_file`
/// (the engine has that one user, and refuses a wrong password). A trace
/// goes through and is stored; `migrate` with a wrong password fails.
/// Neither password, nor the broker URL with its password, appears in any
/// process's logs, `/metrics`, `--check-config` output or error output.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_logs_metrics_or_errors() {
    let password = support::unique("ch-secret");
    let ch = ClickHouse::start_with_user("tailgate", &password);
    if !ch.is_test_engine() {
        return; // a real server's users are not ours to set
    }
    let q = TestQueue::new("secret-scan").await;
    let dir = std::env::temp_dir().join(support::unique("secret-scan"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{content}\n")).unwrap();
        path.display().to_string()
    };
    let url = amqp_url();
    let url_file = file("rabbitmq-url", &url);
    let password_file = file("clickhouse-password", &password);
    let wrong = support::unique("wrong-secret");
    let wrong_file = file("wrong-password", &wrong);
    let nowhere = "amqp://nobody:unused@127.0.0.1:9/%2f";
    let from_files = [
        ("TAILGATE_RABBITMQ__URL", nowhere),
        ("TAILGATE_RABBITMQ__URL_FILE", url_file.as_str()),
        ("TAILGATE_POLICY__RANDOM_SHARE", "1"),
    ];
    let gw = Gateway::start(nowhere, &q.exchange, &from_files);
    let names = Ingest::new(&q.exchange);
    let ingester_env = [
        ("TAILGATE_RABBITMQ__URL_FILE", url_file.as_str()),
        ("TAILGATE_CLICKHOUSE__USER", "tailgate"),
        ("TAILGATE_CLICKHOUSE__PASSWORD_FILE", password_file.as_str()),
    ];
    let mut env = names.env(&q.exchange, &ch, &ingester_env);
    env.retain(|(k, _)| k != "TAILGATE_RABBITMQ__URL");
    env.push(("TAILGATE_RABBITMQ__URL".into(), nowhere.into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let ing = Tailgate::ingester(&env);
    ing.wait_metric("tailgate_ingester_broker_connected", &[], 1.0)
        .await;
    let spans = order_trace(trace_id(77, 1), 5, None);
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    ing.wait_metric("tailgate_ingester_acked_messages_total", &[], 1.0)
        .await;

    let mut seen = vec![gw.metrics().await, ing.metrics().await];
    for (args, env) in [
        (&["gateway", "--check-config"][..], &from_files[..]),
        (&["ingester", "--check-config"][..], &env[..]),
    ] {
        let out = Tailgate::run(args, env);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            shown.contains("<redacted>"),
            "{args:?} shows it hides: {shown}"
        );
        seen.push(shown);
    }
    let mut wrong_env = env.clone();
    wrong_env.retain(|(k, _)| *k != "TAILGATE_CLICKHOUSE__PASSWORD_FILE");
    wrong_env.push(("TAILGATE_CLICKHOUSE__PASSWORD_FILE", wrong_file.as_str()));
    let refused = Tailgate::run(&["ingester", "migrate"], &wrong_env);
    assert!(!refused.status.success(), "a wrong password is refused");
    let refused_text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        refused_text.contains("516") || refused_text.contains("AUTHENTICATION_FAILED"),
        "the refusal says why: {refused_text}"
    );
    seen.push(refused_text);
    let (gw_status, gw_logs) = gw.terminate_with_logs();
    let (ing_status, ing_logs) = ing.terminate_with_logs();
    assert!(gw_status.success() && ing_status.success());
    assert!(
        gw_logs.contains("ready") && ing_logs.contains("ready"),
        "the logs were read: {gw_logs}\n{ing_logs}"
    );
    seen.extend([gw_logs, ing_logs]);

    let broker_password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(credentials, _)| format!("{credentials}@"))
        .unwrap();
    for text in &seen {
        for secret in [password.as_str(), wrong.as_str(), broker_password.as_str()] {
            assert!(!text.contains(secret), "{secret} leaked in:\n{text}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
    names.cleanup().await;
    q.delete().await;
}

/// `tailgate ingester --check-config` prints the settings in force without
/// the ClickHouse password or the broker URL's password.
#[test]
fn ingester_check_config_hides_passwords() {
    let out = Tailgate::run(
        &["ingester", "--check-config"],
        &[
            ("TAILGATE_CLICKHOUSE__PASSWORD", "hunter2"),
            (
                "TAILGATE_RABBITMQ__URL",
                "amqp://tg:swordfish@rabbit:5672/%2f",
            ),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("swordfish"),
        "{stdout}"
    );
}
