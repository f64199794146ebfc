//! Demo client for a running gateway: sends traces of the jewellery shop's
//! order pipeline over OTLP/HTTP JSON, then shows which traces the gateway
//! kept (read from its RabbitMQ exchange) and how many it dropped (from its
//! metrics). Run by `scripts/demo`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/otlp.rs"]
#[allow(dead_code)]
mod otlp;

use clap::Parser;
use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::{collections::BTreeMap, time::Duration};
use tailgate_contract::{
    amqp::declare_exchange,
    compression::message_body,
    message::{ALL_TRACES, header as names},
};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:4318")]
    http: String,
    #[arg(long, default_value = "http://127.0.0.1:8888")]
    admin: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    #[arg(long, default_value = "tailgate.traces")]
    exchange: String,
    /// Admin addresses of every node of a cluster (comma-separated): the demo
    /// then waits for the decisions of all of them.
    #[arg(long, value_delimiter = ',')]
    cluster_admins: Vec<String>,
    /// The admin address of an ingester running the stuck-journey finder:
    /// the demo then also sends three orders' journeys and waits until
    /// order 4711 is reported stuck.
    #[arg(long)]
    journeys_admin: Option<String>,
}

/// The order pipeline's status changes, in order, with the service and
/// span that make each one.
const STEPS: [(&str, &str, &str); 5] = [
    ("NEW", "shop-api", "POST /api/v1/orders"),
    ("PRICE_CALCULATED", "mes-api", "calculate price"),
    (
        "MANUFACTURING_APPROVED",
        "crm-api",
        "PUT /crm/orders/{id}/approve",
    ),
    ("MANUFACTURING_STARTED", "mes-api", "orders.status process"),
    ("SHIPPED", "crm-api", "PUT /crm/orders/{id}/ship"),
];

/// One trace per status change of `order`, up to `steps` of them, a
/// minute apart and the last a minute ago: the root carries the order and
/// its new status, the next span the order, and the last the queue the
/// change went through.
fn journey(order: &str, steps: usize, seed: u64) -> Vec<otlp::OrderSpan> {
    let mut spans = Vec::new();
    for (i, (status, service, name)) in STEPS[..steps].iter().enumerate() {
        let mut trace = otlp::order_trace(otlp::trace_id(seed, i as u64), 80, None);
        let back = (steps - i) as u64 * 60_000_000_000;
        for s in &mut trace {
            s.span.start_time_unix_nano -= back;
            s.span.end_time_unix_nano -= back;
            s.span.attributes = vec![otlp::kv("order.id", order)];
        }
        trace[0].service = *service;
        trace[0].span.name = (*name).into();
        trace[0]
            .span
            .attributes
            .push(otlp::kv("order.status", status));
        trace[2].span.attributes = vec![otlp::kv("messaging.destination.name", "orders.status")];
        spans.extend(trace);
    }
    spans
}

/// Sends three orders' journeys and waits until the finder reports 4711.
async fn journeys(args: &Args, ingester: &str) {
    let seed = u64::from(std::process::id()) << 8;
    let orders = [("4711", 2), ("4712", 5), ("4713", 3)];
    let spans: Vec<_> = orders
        .iter()
        .enumerate()
        .flat_map(|(n, (order, steps))| journey(order, *steps, seed + n as u64))
        .collect();
    let request = otlp::request(&spans);
    let resp = otlp::send_http_json(&format!("{}/v1/traces", args.http), &request).await;
    println!(
        "\nSent the journeys of orders 4711 (NEW, then PRICE_CALCULATED a minute ago, then nothing), 4712 (to SHIPPED) and 4713 (to MANUFACTURING_APPROVED), a minute a step: {} traces, {} spans, HTTP {}",
        orders.iter().map(|(_, s)| s).sum::<usize>(),
        spans.len(),
        resp.status()
    );
    println!(
        "Waiting for the ingester's finder to notice an order that stopped moving (PRICE_CALCULATED is allowed 30 s here)..."
    );
    // The gauge is set at each look of the finder (every second here).
    let series = "tailgate_journeys_stuck{journey=\"order\",status=\"PRICE_CALCULATED\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let gauge = loop {
        let gauge = metric(ingester, series).await;
        if gauge >= 1.0 {
            break gauge;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the finder did not report order 4711"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "Order 4711 is stuck at PRICE_CALCULATED (tailgate_journeys_stuck{{journey=\"order\",status=\"PRICE_CALCULATED\"}} = {gauge}), though the sampling kept none of its traces."
    );
}

/// Sum of a series over the nodes.
async fn metric_all(admins: &[String], series: &str) -> f64 {
    let mut total = 0.0;
    for admin in admins {
        total += metric(admin, series).await;
    }
    total
}

async fn metric(admin: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();

    // A queue of our own on the gateway's exchange, so we see what it publishes.
    let conn = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    declare_exchange(&channel, &args.exchange).await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    let queue_name = queue.name().as_str().to_owned();
    channel
        .queue_bind(
            queue_name.as_str().into(),
            args.exchange.as_str().into(),
            ALL_TRACES.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = channel
        .basic_consume(
            queue_name.as_str().into(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The story: most orders go through; one fails in the MES price
    // calculation, one hangs on the MES database, the rest are routine.
    let seed = std::process::id().into();
    let mut stories: BTreeMap<String, &str> = BTreeMap::new();
    let mut spans = Vec::new();
    let failed = otlp::trace_id(seed, 0);
    spans.extend(otlp::order_trace(
        failed,
        120,
        Some("PRICE_CALCULATED not reached: MES returned 500"),
    ));
    stories.insert(otlp::hex(&failed), "order failed in MES price calculation");
    let slow = otlp::trace_id(seed, 1);
    spans.extend(otlp::order_trace(slow, 2400, None));
    stories.insert(otlp::hex(&slow), "order hung 2.4 s on the MES database");
    let routine = 60;
    for n in 0..routine {
        let id = otlp::trace_id(seed, 2 + n);
        spans.extend(otlp::order_trace(id, 80, None));
        stories.insert(otlp::hex(&id), "routine order");
    }
    let request: ExportTraceServiceRequest = otlp::request(&spans);
    let total = stories.len();
    let resp = otlp::send_http_json(&format!("{}/v1/traces", args.http), &request).await;
    println!(
        "Sent {total} order traces ({} spans: shop-api → crm-api → mes-api) over OTLP/HTTP JSON: HTTP {}",
        spans.len(),
        resp.status()
    );

    // Wait for every decision, as reported by the gateway (or all nodes).
    let admins = if args.cluster_admins.is_empty() {
        vec![args.admin.clone()]
    } else {
        args.cluster_admins.clone()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric_all(&admins, "tailgate_traces_decided_total").await < total as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not decide in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept =
        metric_all(&admins, "tailgate_traces_decided_total{decision=\"keep\"").await as usize;
    println!(
        "\nKept {kept} of {total} traces; published to exchange {:?}:",
        args.exchange
    );
    for _ in 0..kept {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("kept trace published")
            .unwrap()
            .unwrap();
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = |k: &str| match headers.inner().get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            Some(AMQPValue::Double(d)) => format!("{d:.2}"),
            Some(AMQPValue::LongLongInt(n)) => n.to_string(),
            _ => "?".into(),
        };
        // Bodies are compressed as `content_encoding` says (rabbitmq.compression).
        let body = message_body(&delivery.properties, &delivery.data)
            .expect("a body the gateway compressed");
        let body = ExportTraceServiceRequest::decode(&*body).unwrap();
        let spans: usize = body
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        let trace = header(names::TRACE_ID);
        println!(
            "  {trace}  rule={:<6} adjusted_count={:<6} spans={spans}  key={}  ({})",
            header(names::SAMPLING_RULE),
            header(names::ADJUSTED_COUNT),
            delivery.routing_key,
            stories.get(&trace).copied().unwrap_or("?"),
        );
    }
    let dropped_traces =
        metric_all(&admins, "tailgate_traces_decided_total{decision=\"drop\"").await;
    let dropped_spans = metric_all(&admins, "tailgate_spans_dropped_total{reason=\"policy\"").await;
    println!(
        "\nDropped {dropped_traces} routine traces ({dropped_spans} spans, counted in tailgate_spans_dropped_total{{reason=\"policy\"}})."
    );
    if let Some(ingester) = &args.journeys_admin {
        println!(
            "Why: errors and traces slower than 1 s are always kept; of the rest, every trace of 1 order in 20 (adjusted count 20, the same orders on every node)."
        );
        journeys(&args, ingester).await;
    } else {
        println!(
            "Why: errors and traces slower than 1 s are always kept; of the rest, a consistent 5% (adjusted count 20)."
        );
    }
}
