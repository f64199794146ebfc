//! One gateway node end to end: OTLP in, buffer, decide, RabbitMQ out.
//! Every test runs a real `tailgate gateway` process against the real
//! broker, with an exchange and queue of its own.

// Test code reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceResponse, common::v1::any_value::Value,
};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use support::{
    amqp_url,
    broker::{Proxy, Received, TestQueue},
    gateway::{Gateway, logged_spans, sum_metric},
    otlp::{self, hex, order_trace, trace_id},
};

fn attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

/// An error trace sent over each protocol (gRPC, HTTP protobuf, HTTP JSON)
/// is kept: one persistent protobuf message per trace with all its spans,
/// the decision on every span, and the headers the ingester relies on.
#[tokio::test(flavor = "multi_thread")]
async fn every_protocol_is_accepted_and_kept_traces_are_published() {
    let mut q = TestQueue::new("protocols").await;
    let gw = Gateway::start(&amqp_url(), &q.exchange, &[]);

    let ids: Vec<[u8; 16]> = (0..3).map(|n| trace_id(1, n)).collect();
    let reqs: Vec<_> = ids
        .iter()
        .map(|id| otlp::request(&order_trace(*id, 50, Some("PRICE_CALCULATED failed"))))
        .collect();
    let grpc = otlp::send_grpc(&gw.grpc_url(), reqs[0].clone())
        .await
        .expect("grpc export");
    assert_eq!(grpc.partial_success, None);
    let http = otlp::send_http_protobuf(&gw.http_url(), &reqs[1]).await;
    assert_eq!(http.status(), 200);
    assert_eq!(http.headers()["content-type"], "application/x-protobuf");
    ExportTraceServiceResponse::decode(http.bytes().await.unwrap()).expect("protobuf answer");
    let json = otlp::send_http_json(&gw.http_url(), &reqs[2]).await;
    assert_eq!(json.status(), 200);
    assert_eq!(json.headers()["content-type"], "application/json");

    let mut got: BTreeMap<String, Received> = BTreeMap::new();
    for m in q.take(3).await {
        got.insert(m.trace_id(), m);
    }
    for id in &ids {
        let m = &got[&hex(id)];
        assert_eq!(m.spans().len(), 3, "all spans in one message");
        assert_eq!(m.routing_key, "traces.error.shop-api");
        assert_eq!(m.content_type, "application/x-protobuf");
        assert_eq!(
            m.content_encoding.as_deref(),
            Some("lz4"),
            "compressed by default"
        );
        assert!(m.persistent);
        assert!(!m.message_id.is_empty());
        assert_eq!(m.header("sampling_rule").as_deref(), Some("error"));
        assert_eq!(m.header("adjusted_count").as_deref(), Some("1"));
        assert_eq!(m.header("span_count").as_deref(), Some("3"));
        assert_eq!(m.header("root_service").as_deref(), Some("shop-api"));
        let services: BTreeSet<String> = m
            .request
            .resource_spans
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .flat_map(|r| &r.attributes)
            .filter(|kv| kv.key == "service.name")
            .filter_map(|kv| match kv.value.clone()?.value? {
                Value::StringValue(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(services.len(), 3, "resources kept: {services:?}");
        for span in m.spans() {
            assert_eq!(
                attr(span, "sampling.rule"),
                Some(Value::StringValue("error".into()))
            );
            assert_eq!(
                attr(span, "sampling.adjusted_count"),
                Some(Value::DoubleValue(1.0))
            );
            assert_eq!(span.trace_state, "ot=th:0");
            assert!(attr(span, "order.id").is_some(), "span attributes kept");
        }
    }
    for protocol in ["grpc", "http_protobuf", "http_json"] {
        assert_eq!(
            gw.metric("tailgate_spans_received_total", &[("protocol", protocol)])
                .await,
            3.0
        );
    }
    q.delete().await;
}

/// Sends `n` normal (fast, error-free) traces plus one error and one slow
/// trace, waits until all are decided and every kept one confirmed, and
/// returns the kept trace IDs with their rule.
async fn run_sampling(tag: &str, n: u64) -> BTreeMap<String, (String, String)> {
    let mut q = TestQueue::new(tag).await;
    let gw = Gateway::start(&amqp_url(), &q.exchange, &[]);
    let mut traces: Vec<_> = (0..n)
        .map(|i| order_trace(trace_id(42, i), 20, None))
        .collect();
    traces.push(order_trace(
        trace_id(43, 0),
        20,
        Some("MANUFACTURING_APPROVED failed"),
    ));
    traces.push(order_trace(trace_id(43, 1), 1500, None));
    for chunk in traces.chunks(100) {
        let spans: Vec<_> = chunk.iter().flatten().cloned().collect();
        let resp = otlp::send_http_protobuf(&gw.http_url(), &otlp::request(&spans)).await;
        assert_eq!(resp.status(), 200);
    }
    let total = traces.len() as f64;
    gw.wait_metric("tailgate_traces_decided_total", &[], total)
        .await;
    let kept = gw
        .metric("tailgate_traces_decided_total", &[("decision", "keep")])
        .await;
    gw.wait_metric(
        "tailgate_broker_publishes_total",
        &[("outcome", "ack")],
        kept,
    )
    .await;
    let mut out = BTreeMap::new();
    for m in q.take(kept as usize).await {
        let rule = m.header("sampling_rule").unwrap();
        let adjusted = m.header("adjusted_count").unwrap();
        out.insert(m.trace_id(), (rule, adjusted));
    }
    assert_eq!(
        gw.metric("tailgate_spans_dropped_total", &[("reason", "policy")])
            .await,
        (total - kept) * 3.0,
        "every dropped span is counted"
    );
    q.delete().await;
    out
}

/// The error trace and the slow trace are kept with their rule; of 2 000
/// normal traces the kept share is within binomial bounds of 5%, each
/// with adjusted count ≈ 20; and a second node on the same input keeps
/// exactly the same traces.
#[tokio::test(flavor = "multi_thread")]
async fn default_policy_keeps_errors_slow_and_a_consistent_share() {
    let n = 2000;
    let first = run_sampling("sampling-a", n).await;
    assert_eq!(first[&hex(&trace_id(43, 0))].0, "error");
    assert_eq!(first[&hex(&trace_id(43, 1))].0, "slow");
    let random: Vec<_> = first
        .values()
        .filter(|(rule, _)| rule == "random")
        .collect();
    // n·p = 100, σ ≈ 9.7: ±4σ.
    assert!(
        (61..=139).contains(&random.len()),
        "kept {} of {n}",
        random.len()
    );
    for (_, adjusted) in &random {
        let a: f64 = adjusted.parse().unwrap();
        assert!((a - 20.0).abs() < 0.01, "adjusted count {a}");
    }
    let second = run_sampling("sampling-b", n).await;
    assert_eq!(first, second, "decisions depend only on the traces");
}

/// Spans of one trace sent in three requests, over two protocols, come out
/// as one message holding all of them.
#[tokio::test(flavor = "multi_thread")]
async fn spans_sent_in_several_requests_come_out_together() {
    let mut q = TestQueue::new("assembly").await;
    let gw = Gateway::start(&amqp_url(), &q.exchange, &[]);
    let id = trace_id(7, 1);
    let spans = order_trace(id, 30, Some("MES DB timeout"));
    // Children first, root last: the root wait starts only when the root arrives.
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans[2..3]))
        .await
        .unwrap();
    assert_eq!(
        otlp::send_http_json(&gw.http_url(), &otlp::request(&spans[1..2]))
            .await
            .status(),
        200
    );
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans[0..1]))
        .await
        .unwrap();
    let m = q.next().await.expect("kept trace");
    assert_eq!(m.trace_id(), hex(&id));
    let mut ids: Vec<u8> = m.spans().iter().map(|s| s.span_id[0]).collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(gw.metric("tailgate_traces_decided_total", &[]).await, 1.0);
    q.delete().await;
}

/// A late span of a kept trace is published at once with the same
/// decision; a late span of a dropped trace is dropped and counted.
#[tokio::test(flavor = "multi_thread")]
async fn late_spans_follow_the_decision() {
    let mut q = TestQueue::new("late").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[("TAILGATE_POLICY__RANDOM_SHARE", "0")],
    );
    let kept_id = trace_id(9, 1);
    let dropped_id = trace_id(9, 2);
    let kept = order_trace(kept_id, 10, Some("failed"));
    let dropped = order_trace(dropped_id, 10, None);
    // Root and error span of one trace, root and child of the other; the
    // third span of each comes after the decisions.
    let first = vec![
        kept[0].clone(),
        kept[2].clone(),
        dropped[0].clone(),
        dropped[1].clone(),
    ];
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&first))
        .await
        .unwrap();
    let m = q.next().await.expect("kept trace");
    assert_eq!(m.trace_id(), hex(&kept_id));
    assert_eq!(m.spans().len(), 2);
    gw.wait_metric("tailgate_traces_decided_total", &[], 2.0)
        .await;

    otlp::send_grpc(
        &gw.grpc_url(),
        otlp::request(&[kept[1].clone(), dropped[2].clone()]),
    )
    .await
    .unwrap();
    let late = q.next().await.expect("late span published");
    assert_eq!(late.trace_id(), hex(&kept_id));
    assert_ne!(late.message_id, m.message_id);
    assert_eq!(late.header("sampling_rule").as_deref(), Some("error"));
    assert_eq!(late.routing_key, "traces.error.shop-api");
    assert_eq!(late.spans().len(), 1);
    assert_eq!(late.spans()[0].span_id, vec![2; 8]);
    assert_eq!(
        attr(late.spans()[0], "sampling.rule"),
        Some(Value::StringValue("error".into()))
    );
    gw.wait_metric(
        "tailgate_spans_dropped_total",
        &[("reason", "late_span_of_dropped_trace")],
        1.0,
    )
    .await;
    assert_eq!(
        gw.metric("tailgate_spans_late_total", &[("decision", "keep")])
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("tailgate_spans_late_total", &[("decision", "drop")])
            .await,
        1.0
    );
    q.delete().await;
}

/// Malformed and oversized requests get the OTLP status and a message
/// saying what was wrong, over both protocols; spans with invalid IDs are
/// rejected through `partial_success` while the rest of the request is kept.
#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors() {
    let mut q = TestQueue::new("bad").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[("TAILGATE_RECEIVER__MAX_REQUEST_BYTES", "4096")],
    );
    let client = reqwest::Client::new();
    let post = |ct: &'static str, body: Vec<u8>| {
        client
            .post(gw.http_url())
            .header("content-type", ct)
            .body(body)
            .send()
    };

    let garbage = post("application/x-protobuf", vec![0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let status = RpcStatus::decode(garbage.bytes().await.unwrap()).expect("google.rpc.Status body");
    assert_eq!(status.code, 3);
    assert!(
        status.message.contains("malformed OTLP request"),
        "{}",
        status.message
    );

    let bad_json = post("application/json", b"{\"resourceSpans\": 5}".to_vec())
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&bad_json.bytes().await.unwrap()).unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("malformed"),
        "{body}"
    );

    let big = post("application/x-protobuf", vec![0; 5000]).await.unwrap();
    assert_eq!(big.status(), 413);
    let status = RpcStatus::decode(big.bytes().await.unwrap()).unwrap();
    assert!(status.message.contains("4096"), "{}", status.message);

    // A small gzip body that expands past the limit is refused after decompression.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &[0u8; 100_000]).unwrap();
    let bomb = client
        .post(gw.http_url())
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(bomb.status(), 413);

    assert_eq!(
        post("text/plain", b"hi".to_vec()).await.unwrap().status(),
        415
    );

    let err = otlp::send_grpc_raw(
        &gw.grpc_url(),
        bytes::Bytes::from_static(&[0xff, 0xff, 0xff]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed OTLP request"), "{err:?}");
    let err = otlp::send_grpc_raw(&gw.grpc_url(), bytes::Bytes::from(vec![0u8; 5000]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    // One span with a 4-byte trace ID, next to a valid error trace.
    let mut spans = order_trace(trace_id(11, 1), 5, Some("boom"));
    let mut invalid = spans[1].clone();
    invalid.span.trace_id = vec![1, 2, 3, 4];
    spans.push(invalid);
    let resp = otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    let partial = resp.partial_success.expect("partial_success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.contains("trace_id"),
        "{}",
        partial.error_message
    );
    let m = q.next().await.expect("the valid trace is kept");
    assert_eq!(m.spans().len(), 3);
    assert_eq!(
        gw.metric(
            "tailgate_spans_dropped_total",
            &[("reason", "invalid_span")]
        )
        .await,
        1.0
    );
    assert_eq!(
        gw.metric(
            "tailgate_receiver_requests_total",
            &[("outcome", "invalid")]
        )
        .await,
        3.0
    );
    assert_eq!(
        gw.metric(
            "tailgate_receiver_requests_total",
            &[("outcome", "too_large")]
        )
        .await,
        3.0
    );
    q.delete().await;
}

/// `google.rpc.Status`, as OTLP/HTTP error bodies carry it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// The broker answers kept traces with a return (no queue bound yet), then
/// with nacks (the queue is full and rejects publishes): neither counts as
/// published. Every message stays in the outbox and is retried until the
/// broker acks it, so all traces arrive once there is room.
#[tokio::test(flavor = "multi_thread")]
async fn returned_and_nacked_messages_are_retried() {
    let mut q = TestQueue::unbound_single_slot("nack").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[("TAILGATE_RABBITMQ__MAX_BACKOFF_SECS", "1")],
    );
    let ids: Vec<_> = (0..3).map(|i| trace_id(77, i)).collect();
    let spans: Vec<_> = ids
        .iter()
        .flat_map(|id| order_trace(*id, 3, Some("nack test")))
        .collect();
    let resp = otlp::send_http_protobuf(&gw.http_url(), &otlp::request(&spans)).await;
    assert_eq!(resp.status(), 200);
    gw.wait_metric(
        "tailgate_broker_publishes_total",
        &[("outcome", "returned")],
        1.0,
    )
    .await;
    assert_eq!(gw.metric("tailgate_outbox_messages", &[]).await, 3.0);

    // Bound: one message fits, the broker nacks the others.
    q.bind().await;
    gw.wait_metric(
        "tailgate_broker_publishes_total",
        &[("outcome", "nack")],
        1.0,
    )
    .await;
    assert!(gw.metric("tailgate_outbox_messages", &[]).await >= 2.0);

    // Consumed: room again, and every trace arrives.
    q.consume().await;
    let got: BTreeSet<String> = q.take(3).await.iter().map(|m| m.trace_id()).collect();
    let want: BTreeSet<String> = ids.iter().map(|id| hex(id)).collect();
    assert_eq!(got, want);
    gw.wait_metric(
        "tailgate_broker_publishes_total",
        &[("outcome", "ack")],
        3.0,
    )
    .await;
    // The outbox gauge is refreshed by the sweep, so it can trail the ack counter.
    gw.wait_metric_eq("tailgate_outbox_messages", &[], 0.0)
        .await;
    q.delete().await;
}

/// The broker is unreachable when the gateway starts, and cut again
/// mid-run: kept traces wait in the outbox (the node says it is not
/// ready), requests are refused retryably once the outbox is full (and
/// due traces wait in the buffer meanwhile), and after the broker returns
/// every kept trace arrives with all its spans.
#[tokio::test(flavor = "multi_thread")]
async fn broker_outages_lose_nothing() {
    let mut q = TestQueue::new("outage").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap(), false).await;
    let gw = Gateway::start(
        &proxy.amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_RABBITMQ__OUTBOX_MAX_BYTES", "20000"),
            ("TAILGATE_RABBITMQ__CONFIRM_TIMEOUT_SECS", "2"),
        ],
    );
    // Error traces, all kept; `sent` holds those the gateway accepted.
    let batch = |round: u64| {
        let ids: Vec<_> = (0..10).map(|i| trace_id(100 + round, i)).collect();
        let spans: Vec<_> = ids
            .iter()
            .flat_map(|id| order_trace(*id, 5, Some("broker test")))
            .collect();
        (
            ids.iter().map(|id| hex(id)).collect::<Vec<_>>(),
            otlp::request(&spans),
        )
    };
    let mut sent = BTreeSet::new();

    // Down from the start.
    assert_eq!(gw.ready_status().await, 503);
    let (ids, req) = batch(0);
    assert_eq!(
        otlp::send_http_protobuf(&gw.http_url(), &req)
            .await
            .status(),
        200
    );
    sent.extend(ids);
    gw.wait_metric("tailgate_traces_decided_total", &[], 10.0)
        .await;
    // Fill the outbox until the node pushes back.
    let mut round = 1;
    let refused = loop {
        let (ids, req) = batch(round);
        let resp = otlp::send_http_protobuf(&gw.http_url(), &req).await;
        if resp.status() != 200 {
            break resp;
        }
        sent.extend(ids);
        // Decided, unless the outbox filled first: then the rest wait in
        // the buffer, as decisions are held while the outbox is full.
        let decided = 10.0 * (round + 1) as f64;
        gw.poll(
            &format!("{decided} traces decided, or the outbox full"),
            async || {
                let text = gw.metrics().await;
                (
                    sum_metric(&text, "tailgate_traces_decided_total", &[]),
                    sum_metric(&text, "tailgate_outbox_bytes", &[]),
                )
            },
            |(d, outbox)| *d >= decided || *outbox >= 20_000.0,
        )
        .await;
        round += 1;
        assert!(round < 50, "outbox never filled");
    };
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let err = otlp::send_grpc(&gw.grpc_url(), batch(round).1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(!err.details().is_empty(), "RetryInfo in the status details");

    proxy.set(true);
    gw.wait_metric("tailgate_broker_connected", &[], 1.0).await;
    let first: Vec<Received> = q.take(sent.len()).await;
    // The queue can hold a message before its confirm reaches the
    // gateway, so the outbox drains (and the node turns ready) just after.
    gw.wait_ready().await;

    // Cut mid-run, with traces in flight.
    let errors = gw
        .metric("tailgate_broker_connection_errors_total", &[])
        .await;
    proxy.set(false);
    let before = sent.len();
    let (ids, req) = batch(900);
    assert_eq!(
        otlp::send_http_protobuf(&gw.http_url(), &req)
            .await
            .status(),
        200
    );
    sent.extend(ids);
    gw.wait_metric("tailgate_broker_connection_errors_total", &[], errors + 1.0)
        .await;
    proxy.set(true);
    let second = q.take(sent.len() - before).await;

    let mut got = BTreeMap::new();
    for m in first.into_iter().chain(second) {
        assert_eq!(m.spans().len(), 3, "kept trace complete");
        got.entry(m.trace_id())
            .or_insert_with(BTreeSet::new)
            .insert(m.message_id.clone());
    }
    let got_ids: BTreeSet<String> = got.keys().cloned().collect();
    assert_eq!(got_ids, sent, "every accepted kept trace arrived");
    assert!(
        got.values().all(|ids| ids.len() == 1),
        "a republished message keeps its message_id"
    );
    q.delete().await;
}

/// SIGTERM makes the node decide every buffered trace at once and publish
/// the kept ones before it exits, although their wait is far from over.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_flushes_buffered_traces() {
    let mut q = TestQueue::new("sigterm").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "600"),
            ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "600"),
        ],
    );
    gw.wait_metric("tailgate_broker_connected", &[], 1.0).await;
    let ids: Vec<_> = (0..20).map(|i| trace_id(77, i)).collect();
    let spans: Vec<_> = ids
        .iter()
        .flat_map(|id| order_trace(*id, 5, Some("flush me")))
        .collect();
    assert_eq!(
        otlp::send_http_json(&gw.http_url(), &otlp::request(&spans))
            .await
            .status(),
        200
    );
    assert_eq!(gw.metric("tailgate_buffer_traces", &[]).await, 20.0);
    let status = gw.terminate();
    assert!(status.success(), "exit status {status:?}");
    let got: BTreeSet<String> = q.take(20).await.iter().map(Received::trace_id).collect();
    assert_eq!(got, ids.iter().map(|id| hex(id)).collect());
    q.delete().await;
}

/// Reads until the server closes the connection; returns what it sent.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    tokio::time::timeout(support::PATIENCE, stream.read_to_end(&mut got))
        .await
        .expect("the gateway closed the connection")
        .ok();
    got
}

/// Clients that hold a connection without finishing a request: one that
/// sends nothing, one that sends half its headers, one that sends half its
/// body, one with half an HTTP/2 preface on the gRPC port, and silent ones
/// on the cluster and admin ports. Each is closed once its timeout is over
/// (headers 1 s on every port, body 2 s; the slow body gets 408 with a message), while an
/// ordinary client is served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_closed_while_others_are_served() {
    use std::time::{Duration, Instant};
    use tokio::{io::AsyncWriteExt, net::TcpStream};
    let q = TestQueue::new("slow").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_RECEIVER__HEADER_READ_TIMEOUT_SECS", "1"),
            ("TAILGATE_RECEIVER__BODY_READ_TIMEOUT_SECS", "2"),
            ("TAILGATE_ADMIN__HEADER_READ_TIMEOUT_SECS", "1"),
        ],
    );
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.http).await.unwrap();
    let mut half_headers = TcpStream::connect(gw.http).await.unwrap();
    half_headers
        .write_all(b"POST /v1/traces HTTP/1.1\r\nhost: tailgate\r\n")
        .await
        .unwrap();
    let mut half_body = TcpStream::connect(gw.http).await.unwrap();
    half_body
        .write_all(
            b"POST /v1/traces HTTP/1.1\r\nhost: tailgate\r\ncontent-type: application/x-protobuf\r\n\
              content-length: 1000\r\n\r\nsome of it",
        )
        .await
        .unwrap();
    let mut half_preface = TcpStream::connect(gw.grpc).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The cluster port holds its connections to the receiver's limits, the
    // admin port to its own (`admin.header_read_timeout_secs`).
    let mut silent_peer = TcpStream::connect(gw.peer.as_str()).await.unwrap();
    let mut silent_admin = TcpStream::connect(gw.admin).await.unwrap();

    // Served while the others hold their connections.
    let spans = order_trace(trace_id(80, 1), 5, None);
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    assert_eq!(
        otlp::send_http_json(&gw.http_url(), &otlp::request(&spans))
            .await
            .status(),
        200
    );

    assert!(until_closed(&mut silent).await.is_empty());
    until_closed(&mut half_headers).await;
    until_closed(&mut half_preface).await;
    until_closed(&mut silent_peer).await;
    until_closed(&mut silent_admin).await;
    let headers_closed = started.elapsed();
    let answer = String::from_utf8(until_closed(&mut half_body).await).unwrap();
    let body_closed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_read_timeout_secs"), "{answer}");
    assert!(
        headers_closed < Duration::from_secs(3),
        "{headers_closed:?}"
    );
    assert!(body_closed < Duration::from_secs(4), "{body_closed:?}");
    assert_eq!(
        gw.metric(
            "tailgate_receiver_requests_total",
            &[("outcome", "timeout")]
        )
        .await,
        1.0
    );
    q.delete().await;
}

/// With `max_connections` 2 on a port, two clients holding their requests
/// open take both places: a third connection is served only once one of
/// them is closed (by its body timeout), never alongside them.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_serves_at_most_max_connections() {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };
    let q = TestQueue::new("maxconn").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_RECEIVER__MAX_CONNECTIONS", "2"),
            ("TAILGATE_RECEIVER__BODY_READ_TIMEOUT_SECS", "1"),
        ],
    );
    let holding =
        b"POST /v1/traces HTTP/1.1\r\nhost: tailgate\r\ncontent-type: application/x-protobuf\r\n\
                    content-length: 10\r\n\r\n";
    let mut first = TcpStream::connect(gw.http).await.unwrap();
    first.write_all(holding).await.unwrap();
    let mut second = TcpStream::connect(gw.http).await.unwrap();
    second.write_all(holding).await.unwrap();
    let mut third = TcpStream::connect(gw.http).await.unwrap();
    third
        .write_all(
            b"POST /v1/traces HTTP/1.1\r\nhost: tailgate\r\ncontent-type: application/x-protobuf\r\n\
              content-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    third.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    // By now one of the two holding it off has been answered 408 and closed.
    let mut closed = 0;
    for held in [&mut first, &mut second] {
        let mut buf = [0u8; 12];
        if let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::ZERO, held.read(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"HTTP/1.1 408");
            closed += 1;
        }
    }
    assert!(
        closed >= 1,
        "the third was served while both others were open"
    );
    q.delete().await;
}

/// SIGTERM while two clients hold requests open: one has sent the headers
/// of an OTLP/HTTP request and a little of its body, the other an OTLP/gRPC
/// stream whose message never ends. Each is known to be in flight first (the
/// 100-continue the server sends when it starts reading the body; an answer
/// on the same HTTP/2 connection, whose frames the server reads in order).
/// The node waits for them only briefly: it exits within
/// `shutdown.grace_secs` (plus 1 s for the process itself), with success,
/// and every trace it had buffered is published.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_within_grace_while_clients_hold_requests_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const GRACE_SECS: u64 = 3;
    let mut q = TestQueue::new("held").await;
    let gw = Gateway::start(
        &amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "600"),
            ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "600"),
            ("TAILGATE_SHUTDOWN__GRACE_SECS", &GRACE_SECS.to_string()),
        ],
    );
    gw.wait_metric("tailgate_broker_connected", &[], 1.0).await;
    let ids: Vec<_> = (0..20).map(|i| trace_id(78, i)).collect();
    let spans: Vec<_> = ids
        .iter()
        .flat_map(|id| order_trace(*id, 5, Some("flush me")))
        .collect();
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    assert_eq!(gw.metric("tailgate_buffer_traces", &[]).await, 20.0);

    // OTLP/HTTP: a 1 MB body announced, 100 bytes of it sent.
    let mut slow_body = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    slow_body
        .write_all(
            b"POST /v1/traces HTTP/1.1\r\nhost: tailgate\r\ncontent-type: application/x-protobuf\r\n\
              content-length: 1000000\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = [0u8; 25];
    slow_body.read_exact(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 100 Continue"), "{answer:?}");
    slow_body.write_all(&[0u8; 100]).await.unwrap();

    // OTLP/gRPC: a message of 4096 bytes announced, none sent.
    let tcp = tokio::net::TcpStream::connect(gw.grpc).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let export = || {
        http::Request::post(format!(
            "{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            gw.grpc_url()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
    };
    let mut h2 = h2.ready().await.unwrap();
    let (_held, mut held_stream) = h2.send_request(export(), false).unwrap();
    held_stream
        .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0x10, 0]), false)
        .unwrap();
    // An empty export on the same connection: once it is answered, the
    // server has read the held stream's frames too.
    let mut h2 = h2.ready().await.unwrap();
    let (answered, mut empty) = h2.send_request(export(), false).unwrap();
    empty
        .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    assert_eq!(answered.await.unwrap().status(), 200);

    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < std::time::Duration::from_secs(GRACE_SECS + 1),
        "exited {took:?} after SIGTERM, grace {GRACE_SECS} s"
    );
    let got: BTreeSet<String> = q.take(20).await.iter().map(Received::trace_id).collect();
    assert_eq!(got, ids.iter().map(|id| hex(id)).collect());
    drop((slow_body, held_stream));
    q.delete().await;
}

/// SIGTERM with the broker unreachable: the kept traces it buffered can
/// never be confirmed. The node still exits within `shutdown.grace_secs`
/// (plus 1 s for the process), logs how many acknowledged spans it lost
/// (counted as `shutdown_unpublished`), and exits with code 3, so that the
/// loss is not mistaken for a clean stop.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_the_broker_down_exits_3_within_grace() {
    const GRACE_SECS: u64 = 2;
    let q = TestQueue::new("down-exit").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap(), false).await;
    let gw = Gateway::start(
        &proxy.amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "600"),
            ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "600"),
            ("TAILGATE_SHUTDOWN__GRACE_SECS", &GRACE_SECS.to_string()),
        ],
    );
    let spans: Vec<_> = (0..5)
        .flat_map(|i| order_trace(trace_id(79, i), 5, Some("no broker")))
        .collect();
    otlp::send_grpc(&gw.grpc_url(), otlp::request(&spans))
        .await
        .unwrap();
    assert_eq!(gw.metric("tailgate_buffer_traces", &[]).await, 5.0);

    let started = std::time::Instant::now();
    let (status, logs) = tokio::task::spawn_blocking(move || gw.terminate_with_logs())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(3), "{status:?}\n{logs}");
    assert!(
        took < std::time::Duration::from_secs(GRACE_SECS + 1),
        "exited {took:?} after SIGTERM, grace {GRACE_SECS} s"
    );
    let lost = logged_spans(&logs, "shutdown grace period over");
    assert_eq!(lost, spans.len() as f64);
    q.delete().await;
}

/// `tailgate gateway --check-config` accepts the shipped example and rejects
/// a misspelt key with its file, line and column, without starting a node.
#[test]
fn check_config_validates_and_locates_errors() {
    let bin = env!("CARGO_BIN_EXE_tailgate");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples/gateway.yaml");
    let ok = std::process::Command::new(bin)
        .args(["gateway", "--check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration is valid"));

    let dir = std::env::temp_dir().join(support::unique("config"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "buffer:\n  decision_wait_secs: 2\n  max_bufer_bytes: 10\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["gateway", "--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("max_bufer_bytes"), "{stderr}");
    assert!(
        stderr.contains("3:3") || stderr.contains("line 3"),
        "no location in {stderr}"
    );

    let env = std::process::Command::new(bin)
        .args(["gateway", "--check-config"])
        .env("TAILGATE_BUFFER__DECISION_WAIT_SECS", "soon")
        .output()
        .unwrap();
    assert!(!env.status.success());
    assert!(String::from_utf8_lossy(&env.stderr).contains("TAILGATE_BUFFER__DECISION_WAIT_SECS"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--check-config` reports every invalid value of a file in one run, each
/// at its key's line and column, or naming the environment variable that
/// set it; out-of-range values are refused, not raised. The settings it
/// prints for a valid file show the broker URL without its password.
#[test]
fn check_config_lists_every_problem_and_hides_the_password() {
    let bin = env!("CARGO_BIN_EXE_tailgate");
    let dir = std::env::temp_dir().join(support::unique("config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.yaml");
    std::fs::write(
        &file,
        "buffer:\n  decision_wait_secs: 5\n  trace_timeout_secs: 1\nrabbitmq:\n  url: amqp://tg:hunter2@rabbit:5672/%2f\n  confirm_timeout_secs: 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["gateway", "--check-config", "--config"])
        .arg(&file)
        .env("TAILGATE_CLUSTER__LISTEN", "nowhere")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = file.display();
    assert!(stderr.contains("3 problems"), "{stderr}");
    for line in [
        format!("{shown}:3:23: buffer.trace_timeout_secs: must not be shorter"),
        format!("{shown}:6:25: rabbitmq.confirm_timeout_secs: must be at least 1, got 0"),
        "environment variable TAILGATE_CLUSTER__LISTEN: cluster.listen:".to_owned(),
    ] {
        assert!(stderr.contains(&line), "no {line:?} in {stderr}");
    }
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let valid = std::process::Command::new(bin)
        .args(["gateway", "--check-config", "--config"])
        .arg(&file)
        .env("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "30")
        .env("TAILGATE_RABBITMQ__CONFIRM_TIMEOUT_SECS", "30")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&valid.stdout);
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    assert!(
        stdout.contains("amqp://tg:<redacted>@rabbit:5672/%2f"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}
