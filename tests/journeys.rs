//! Order journeys end to end: gateways record an event for every span that
//! carries an order's key, kept or dropped, the ingester stores them, and
//! its finder reports the orders that stopped moving. Real processes on
//! loopback, the real broker, the ClickHouse engine.

// Test code reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{collections::BTreeSet, path::PathBuf};
use support::{
    broker::{Proxy, TestQueue},
    clickhouse::ClickHouse,
    cluster::{Rng, converged, node, send_traces, settled},
    gateway::{Gateway, Tailgate},
    ingest::Ingest,
    otlp::{self, OrderSpan, kv, order_trace, trace_id},
};
use tailgate_sampling_rules::{Probability, Randomness, Threshold};

const JOURNEY_RULES: &str = "rules:
  - name: errors
    when: { trace.has_error: true }
    action: keep
  - name: orders
    action: { sample: { rate: 4, by: attributes.order.id } }
journeys:
  - name: order
    key: attributes.order.id
    status: attributes.order.status
    max_time_in_status:
      NEW: 1h
      PRICE_CALCULATED: 1s
      MANUFACTURING_STARTED: 8h
    terminal: [SHIPPED]
";

const PATH: [&str; 4] = [
    "NEW",
    "PRICE_CALCULATED",
    "MANUFACTURING_STARTED",
    "SHIPPED",
];

fn scratch(tag: &str, rules: &str) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(support::unique(tag));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rules.yaml");
    std::fs::write(&file, rules).unwrap();
    let shown = file.display().to_string();
    (dir, shown)
}

/// One trace of an order's step: three spans, the root carrying the order's
/// ID and the new status, the next only the ID, the last neither (a span
/// that does not touch the order). Steps are 10 ms apart in span time.
fn step(order: &str, n: u64, status_index: usize) -> Vec<OrderSpan> {
    let mut trace = order_trace(trace_id(71, n), 20, None);
    let shift = status_index as u64 * 10_000_000;
    for s in &mut trace {
        s.span.start_time_unix_nano += shift;
        s.span.end_time_unix_nano += shift;
        s.span.attributes.clear();
    }
    trace[0].span.attributes = vec![
        kv("order.id", order),
        kv("order.status", PATH[status_index]),
    ];
    trace[1].span.attributes = vec![kv("order.id", order)];
    trace
}

/// How far order `o` gets: orders 0, 3, 6, ... stop at PRICE_CALCULATED
/// (stuck after 1 s), 1, 4, ... at MANUFACTURING_STARTED (8 h allowed),
/// and 2, 5, ... are SHIPPED (finished).
fn steps_of(o: usize) -> usize {
    o % 3 + 2
}

fn the_ingester_env(rules: &str) -> Vec<(&str, &str)> {
    vec![
        ("TAILGATE_JOURNEYS__RULES_FILE", rules),
        ("TAILGATE_JOURNEYS__INTERVAL_SECS", "0.2"),
        (
            "TAILGATE_JOURNEYS__TRACE_LINK",
            "http://jaeger.example/trace/{trace_id}",
        ),
    ]
}

/// 60 orders of 2 to 4 traces each (one per status change), their spans
/// sprayed over 3 gateways that sample whole orders (1 in 4, by order ID):
///
/// - every span that carries an order ID becomes exactly one stored event,
///   kept or not, and no other span does; every status change of every
///   order is stored; each event says whether its trace was kept, which is
///   so exactly for the orders the key selects;
/// - the latest-state table has each order's last status;
/// - the finder lists as stuck exactly the orders left at
///   PRICE_CALCULATED past its 1 s limit, including orders none of whose
///   traces were kept, and the gauges count them and the open orders by
///   status; finished (SHIPPED) orders are not open;
/// - `tailgate journey order <id>` prints such an order's timeline, every
///   trace marked dropped, and `--stuck` lists it.
#[tokio::test(flavor = "multi_thread")]
async fn orders_are_followed_across_nodes_and_stuck_ones_found() {
    let (dir, rules) = scratch("journeys", JOURNEY_RULES);
    let ch = ClickHouse::start();
    let q = TestQueue::new("journeys").await;
    let names = Ingest::new(&q.exchange);
    let ing = names
        .start(&q.exchange, &ch, &the_ingester_env(&rules))
        .await;
    let with_rules = [("TAILGATE_RULES__FILE", rules.as_str())];
    let a = node(&q.exchange, &[], &with_rules);
    let b = node(&q.exchange, &[&a], &with_rules);
    let c = node(&q.exchange, &[&a, &b], &with_rules);
    let nodes = [&a, &b, &c];
    converged(&nodes, 3).await;

    let orders: Vec<String> = (0..60).map(|o| format!("ord-{o}")).collect();
    let mut traces = Vec::new();
    for (o, order) in orders.iter().enumerate() {
        for s in 0..steps_of(o) {
            traces.push(step(order, (o * 10 + s) as u64, s));
        }
    }
    send_traces(&nodes, &traces, &mut Rng(5)).await;
    settled(&nodes, traces.len() as f64).await;
    let events = 2 * traces.len();
    ing.wait_metric(
        "tailgate_ingester_inserted_journey_events_total",
        &[],
        events as f64,
    )
    .await;

    let table = format!("{}.journey_events", names.db);
    ch.assert_each_span_once(&table, events as f64).await;
    let threshold = Threshold::from_probability(Probability::new(0.25).unwrap()).unwrap();
    let selected = |order: &str| threshold.keeps(Randomness::of_key(order));
    let rows = ch
        .json_rows(&format!(
            "SELECT Key, arraySort(groupUniqArrayIf(Status, Status != '')) AS statuses,
                min(Kept) AS min_kept, max(Kept) AS max_kept, uniqExact(TraceId) AS traces
             FROM {table} GROUP BY Key"
        ))
        .await;
    assert_eq!(rows.len(), orders.len(), "every order has events");
    for row in &rows {
        let key = row["Key"].as_str().unwrap();
        let o: usize = key.trim_start_matches("ord-").parse().unwrap();
        let mut want: Vec<&str> = PATH[..steps_of(o)].to_vec();
        want.sort_unstable();
        let got: Vec<&str> = row["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(got, want, "every status change of {key}");
        let kept = u64::from(selected(key));
        assert_eq!(
            (row["min_kept"].as_u64(), row["max_kept"].as_u64()),
            (Some(kept), Some(kept)),
            "{key}: events say kept exactly when the key is sampled"
        );
        assert_eq!(row["traces"].as_u64(), Some(steps_of(o) as u64));
    }
    let shipped = ch
        .number(&format!(
            "SELECT count() FROM (SELECT argMaxMerge(LastStatus) AS s FROM {}.journey_state
             GROUP BY Journey, Key) WHERE s = 'SHIPPED'",
            names.db
        ))
        .await;
    assert_eq!(shipped, 20.0, "the latest-state table");

    let stuck_orders: BTreeSet<&str> = orders
        .iter()
        .enumerate()
        .filter(|(o, _)| steps_of(*o) == 2)
        .map(|(_, k)| k.as_str())
        .collect();
    let stuck_label = [("journey", "order"), ("status", "PRICE_CALCULATED")];
    ing.wait_metric_eq("tailgate_journeys_stuck", &stuck_label, 20.0)
        .await;
    let open = |status| [("journey", "order"), ("status", status)];
    assert_eq!(
        ing.metric("tailgate_journeys_open", &open("MANUFACTURING_STARTED"))
            .await,
        20.0
    );
    assert_eq!(
        ing.metric("tailgate_journeys_open", &open("SHIPPED")).await,
        0.0,
        "finished orders are not open"
    );
    assert!(
        ing.metric("tailgate_journeys_oldest_stuck_seconds", &stuck_label)
            .await
            >= 1.0
    );
    let listed = reqwest::get(format!("http://{}/journeys/stuck?journey=order", ing.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    let listed: BTreeSet<&str> = listed.iter().map(|s| s["key"].as_str().unwrap()).collect();
    assert_eq!(listed, stuck_orders);

    // A stuck order whose every trace was dropped is found all the same.
    let unseen = stuck_orders
        .iter()
        .find(|o| !selected(o))
        .expect("a stuck order the sampling dropped");
    let url = format!("http://{}", ing.admin);
    let out = Tailgate::run(&["journey", "order", unseen, "--url", &url], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(&format!(
            "order {unseen}: PRICE_CALCULATED (STUCK), 4 events"
        )),
        "{text}"
    );
    assert!(text.contains("  STUCK"), "{text}");
    assert_eq!(text.matches("dropped by orders").count(), 2, "{text}");
    assert!(!text.contains("kept by"), "{text}");
    let out = Tailgate::run(&["journey", "order", "--stuck", "--url", &url], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(unseen) && text.contains("PRICE_CALCULATED"),
        "{text}"
    );
    let missing = Tailgate::run(&["journey", "order", "no-such-order", "--url", &url], &[]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("404"),
        "an unknown order is an error"
    );

    drop((a, b, c, ing));
    names.cleanup().await;
    q.delete().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Journey events through broker trouble, and a bad `journeys` section:
///
/// - the gateway starts with the broker cut off: events wait in the outbox,
///   and every one is stored once the broker is back; a second cut, with
///   batches in flight, loses none and stores none twice;
/// - a batch published twice under one message ID (as a gateway does after
///   losing a confirm) is stored once, the second copy counted as a
///   duplicate;
/// - a rules file whose `journeys` section is broken is refused by the
///   gateway and by the finder, each naming the line and column, and the
///   journeys in force stay: events are still recorded, and the finder
///   still counts open orders;
/// - a restarted ingester's finder picks up the open orders again.
#[tokio::test(flavor = "multi_thread")]
async fn journey_events_survive_broker_cuts_once_each() {
    let (dir, rules) = scratch("journey-cut", JOURNEY_RULES);
    let ch = ClickHouse::start();
    let q = TestQueue::new("journey-cut").await;
    let names = Ingest::new(&q.exchange);
    let ing = names
        .start(&q.exchange, &ch, &the_ingester_env(&rules))
        .await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap(), false).await;
    let gw = Gateway::start(
        &proxy.amqp_url(),
        &q.exchange,
        &[
            ("TAILGATE_RULES__FILE", rules.as_str()),
            ("TAILGATE_RULES__CHECK_INTERVAL_SECS", "0.05"),
            ("TAILGATE_JOURNEYS__MAX_BATCH_EVENTS", "7"),
            ("TAILGATE_JOURNEYS__FLUSH_INTERVAL_SECS", "0.05"),
            ("TAILGATE_RABBITMQ__CONFIRM_TIMEOUT_SECS", "2"),
        ],
    );
    let send = |first: usize, count: usize| {
        let url = gw.http_url();
        async move {
            let spans: Vec<OrderSpan> = (first..first + count)
                .flat_map(|o| step(&format!("cut-{o}"), o as u64, 0))
                .collect();
            let resp = otlp::send_http_protobuf(&url, &otlp::request(&spans)).await;
            assert_eq!(resp.status(), 200);
        }
    };
    let recorded = |n: f64| gw.wait_metric("tailgate_journey_events_recorded_total", &[], n);

    // Down from the start: the events wait.
    send(0, 20).await;
    recorded(40.0).await;
    gw.wait_metric_eq("tailgate_journey_events_pending", &[], 40.0)
        .await;
    assert_eq!(
        gw.metric("tailgate_journey_events_published_total", &[])
            .await,
        0.0
    );
    proxy.set(true);
    gw.wait_metric("tailgate_journey_events_published_total", &[], 40.0)
        .await;
    // Cut again with batches on their way.
    send(20, 20).await;
    proxy.set(false);
    recorded(80.0).await;
    proxy.set(true);
    gw.wait_metric("tailgate_journey_events_published_total", &[], 80.0)
        .await;
    gw.wait_metric_eq("tailgate_journey_events_pending", &[], 0.0)
        .await;
    let table = format!("{}.journey_events", names.db);
    ing.wait_metric("tailgate_ingester_inserted_journey_events_total", &[], 80.0)
        .await;
    ch.assert_each_span_once(&table, 80.0).await;

    // The same batch twice under one message ID: stored once.
    let batch = tailgate_contract::journey::JourneyEvents {
        events: vec![tailgate_contract::journey::JourneyEvent {
            journey: "order".into(),
            key: "twice".into(),
            status: "NEW".into(),
            time_unix_nano: 1,
            trace_id: vec![9; 16],
            span_id: vec![9; 8],
            ..Default::default()
        }],
        ..Default::default()
    };
    let body = prost::Message::encode_to_vec(&batch);
    let duplicates = ing
        .metric("tailgate_ingester_duplicate_messages_total", &[])
        .await;
    for _ in 0..2 {
        q.publish_journey_events("order", &body, "journey-republished-1")
            .await;
    }
    ing.wait_metric(
        "tailgate_ingester_duplicate_messages_total",
        &[],
        duplicates + 1.0,
    )
    .await;
    ch.assert_each_span_once(&table, 81.0).await;

    // A broken journeys section: refused by both, the old journeys stay.
    let new_orders = [("journey", "order"), ("status", "NEW")];
    ing.wait_metric("tailgate_journeys_open", &new_orders, 41.0)
        .await;
    std::fs::write(
        &rules,
        JOURNEY_RULES.replace("    key: attributes.order.id", "    key: span.name"),
    )
    .unwrap();
    gw.wait_metric("tailgate_rules_reload_failures_total", &[], 1.0)
        .await;
    ing.wait_metric("tailgate_journeys_rules_reload_failures_total", &[], 1.0)
        .await;
    gw.wait_log("rules.yaml:9:10").await;
    ing.wait_log("rules.yaml:9:10").await;
    send(40, 5).await;
    recorded(90.0).await;
    gw.wait_metric("tailgate_journey_events_published_total", &[], 90.0)
        .await;
    let checks = ing.metric("tailgate_journeys_checks_total", &[]).await;
    ing.wait_metric("tailgate_journeys_checks_total", &[], checks + 2.0)
        .await;
    assert_eq!(
        ing.metric("tailgate_journeys_open", &new_orders).await,
        46.0,
        "the finder still follows the journeys in force"
    );

    // A new ingester's finder starts from the latest-state table.
    ing.terminate();
    std::fs::write(&rules, JOURNEY_RULES).unwrap();
    let ing = names
        .start(&q.exchange, &ch, &the_ingester_env(&rules))
        .await;
    ing.wait_metric("tailgate_journeys_checks_total", &[], 1.0)
        .await;
    assert_eq!(
        ing.metric("tailgate_journeys_open", &new_orders).await,
        46.0
    );

    drop((gw, ing));
    names.cleanup().await;
    q.delete().await;
    let _ = std::fs::remove_dir_all(dir);
}
