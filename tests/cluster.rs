//! Gateway nodes as a cluster: real processes on loopback, the real broker.
//! Spans of one trace sent to different nodes meet on the trace's owner;
//! traces stay whole while nodes join and leave; a crash is survived.

// Test code reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};
use support::{
    PATIENCE, amqp_url,
    broker::{Received, TestQueue},
    cluster::{CLUSTER, Rng, converged, node, send_traces, settled, spray},
    gateway::{Gateway, logged_spans, metric_sum},
    otlp::{self, OrderSpan, hex, order_trace, trace_id},
};

/// Kept traces by ID, each checked to be one message with all its spans.
fn whole(messages: Vec<Received>, spans_per_trace: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for m in messages {
        assert_eq!(
            m.spans().len(),
            spans_per_trace,
            "trace {} split",
            m.trace_id()
        );
        let rule = m.header("sampling_rule").unwrap();
        assert!(
            out.insert(m.trace_id(), rule).is_none(),
            "trace {} in two messages",
            m.trace_id()
        );
    }
    out
}

fn workload(seed: u64, n: u64) -> Vec<Vec<OrderSpan>> {
    (0..n)
        .map(|i| order_trace(trace_id(seed, i), 20, (i % 25 == 0).then_some("MES failed")))
        .collect()
}

/// 3 nodes, 5 000 traces whose spans go to random nodes in many requests:
/// every kept trace is exactly one message holding all its spans, and the
/// decisions are those of a single node on the same input.
#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_keep_traces_whole_and_agree_with_one_node() {
    let traces = workload(61, 5000);

    let mut q = TestQueue::new("cluster3").await;
    let a = node(&q.exchange, &[], &[]);
    let b = node(&q.exchange, &[&a], &[]);
    let c = node(&q.exchange, &[&a, &b], &[]);
    let nodes = [&a, &b, &c];
    converged(&nodes, 3).await;
    send_traces(&nodes, &traces, &mut Rng(7)).await;
    let kept = settled(&nodes, 5000.0).await;
    let cluster = whole(q.take(kept).await, 3);
    let forwarded = metric_sum(&nodes, "tailgate_cluster_forwarded_spans_total", &[]).await;
    assert!(
        forwarded > 5000.0,
        "spans were forwarded to their owners ({forwarded})"
    );
    drop((a, b, c));
    q.delete().await;

    let mut q1 = TestQueue::new("cluster1").await;
    let solo = Gateway::start(&amqp_url(), &q1.exchange, CLUSTER);
    send_traces(&[&solo], &traces, &mut Rng(7)).await;
    let kept1 = settled(&[&solo], 5000.0).await;
    let single = whole(q1.take(kept1).await, 3);
    assert_eq!(cluster, single, "the cluster decides as one node does");
    assert!(cluster.len() > 200, "kept {}", cluster.len());
    q1.delete().await;
}

/// Scale 3 → 4 and 4 → 3 (SIGTERM) while traffic flows: no kept trace is
/// split, and every kept trace's spans all come out.
#[tokio::test(flavor = "multi_thread")]
async fn scaling_up_and_down_never_splits_a_trace() {
    let mut q = TestQueue::new("scale").await;
    // Keep every trace: any split would show as a second message.
    let keep_all = [("TAILGATE_POLICY__RANDOM_SHARE", "1")];
    let a = node(&q.exchange, &[], &keep_all);
    let b = node(&q.exchange, &[&a], &keep_all);
    let c = node(&q.exchange, &[&a, &b], &keep_all);
    converged(&[&a, &b, &c], 3).await;
    let mut rng = Rng(11);
    let mut sent = 0u64;
    let mut round = |n: u64| {
        let batch = workload(70 + sent, n);
        sent += 1;
        batch
    };

    send_traces(&[&a, &b, &c], &round(300), &mut rng).await;
    let joining = std::time::Instant::now();
    let d = node(&q.exchange, &[&a, &b, &c], &keep_all);
    converged(&[&a, &b, &c, &d], 4).await;
    let joined = joining.elapsed();
    send_traces(&[&a, &b, &c, &d], &round(300), &mut rng).await;
    send_traces(&[&a, &b, &c, &d], &round(300), &mut rng).await;
    // d leaves while its share of the traces waits in its buffer.
    let leaving = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let status = d.terminate();
        (status, started.elapsed())
    });
    send_traces(&[&a, &b, &c], &round(300), &mut rng).await;
    let (status, left) = leaving.await.unwrap();
    assert!(status.success(), "{status:?}");
    converged(&[&a, &b, &c], 3).await;
    send_traces(&[&a, &b, &c], &round(300), &mut rng).await;

    let total = 1500usize;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut messages = Vec::new();
    while messages.len() < total {
        match q.next().await {
            Some(m) => messages.push(m),
            None => panic!("{} of {total} traces arrived", messages.len()),
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    let kept = whole(messages, 3);
    assert_eq!(kept.len(), total);
    let handoffs = metric_sum(&[&a, &b, &c], "tailgate_cluster_handoff_traces_total", &[]).await;
    eprintln!(
        "join: start to 4 converged nodes {joined:?}; leave: SIGTERM to exit (handoff and outbox flush) {left:?}; traces handed off by the remaining nodes: {handoffs}"
    );
    q.delete().await;
}

/// A node leaves while its only peer hangs (SIGSTOP): the handoff is never
/// confirmed, so within `shutdown.grace_secs` the node exits anyway, counts
/// every span it had on the wire as possibly lost (`shutdown_undelivered`,
/// logged with the count) instead of dropping them silently, and says so
/// with exit code 3.
#[tokio::test(flavor = "multi_thread")]
async fn a_leaving_node_counts_what_a_hung_peer_never_confirmed() {
    let q = TestQueue::new("hung").await;
    // The hung peer stays in the ring for the whole test, and traces stay
    // buffered until the leave.
    let settings = [
        ("TAILGATE_CLUSTER__PEER_TIMEOUT_SECS", "60"),
        ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "60"),
        ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "120"),
        ("TAILGATE_SHUTDOWN__GRACE_SECS", "1"),
    ];
    let a = node(&q.exchange, &[], &settings);
    let b = node(&q.exchange, &[&a], &settings);
    converged(&[&a, &b], 2).await;
    let traces = workload(95, 200);
    send_traces(&[&b], &traces, &mut Rng(5)).await;
    // b forwarded a's share and buffers its own.
    let forwarded = a
        .wait_metric("tailgate_cluster_delivered_spans_total", &[], 1.0)
        .await;
    let all_spans = (traces.len() * 3) as f64;
    let mut own = b.metric("tailgate_buffer_traces", &[]).await * 3.0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while own
        + a.metric("tailgate_cluster_delivered_spans_total", &[])
            .await
        < all_spans
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b forwarded {forwarded} and buffers {own} of {all_spans} spans"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        own = b.metric("tailgate_buffer_traces", &[]).await * 3.0;
    }
    assert!(own > 0.0, "b owns some traces");

    a.signal("STOP");
    let (status, logs) = tokio::task::spawn_blocking(move || b.terminate_with_logs())
        .await
        .unwrap();
    a.signal("CONT");
    assert_eq!(status.code(), Some(3), "{status:?}\n{logs}");
    let stranded = logged_spans(&logs, "exiting with spans that no peer confirmed");
    assert_eq!(
        stranded, own,
        "every span handed to the hung peer is counted"
    );
    drop(a);
    q.delete().await;
}

/// SIGKILL one of 3 nodes mid-stream: the others drop it within
/// `peer_timeout_secs`, count what it may have taken with it, and route
/// everything sent afterwards correctly.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_node_is_routed_around() {
    let mut q = TestQueue::new("crash").await;
    let keep_all = [("TAILGATE_POLICY__RANDOM_SHARE", "1")];
    let a = node(&q.exchange, &[], &keep_all);
    let b = node(&q.exchange, &[&a], &keep_all);
    let c = node(&q.exchange, &[&a, &b], &keep_all);
    converged(&[&a, &b, &c], 3).await;
    // Traces in flight: children sent, roots not yet.
    let before = workload(80, 300);
    let children: Vec<OrderSpan> = before.iter().flat_map(|t| t[1..].iter().cloned()).collect();
    spray(&[&a, &b, &c], &children, &mut Rng(3)).await;
    // Let a and b deliver c's share before it dies, so c takes some with it.
    let peer_c = [("peer", c.peer.as_str())];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while metric_sum(&[&a, &b], "tailgate_cluster_forwarded_spans_total", &peer_c).await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing delivered to c"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.kill();
    let started = tokio::time::Instant::now();
    converged(&[&a, &b], 2).await;
    let recovered = started.elapsed();
    assert!(
        recovered < Duration::from_secs(3),
        "took {recovered:?} to drop the dead node"
    );
    // Counted by each survivor's rebalance, right after its ring changed.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let lost = loop {
        let lost = metric_sum(
            &[&a, &b],
            "tailgate_cluster_spans_lost_with_peer_total",
            &[],
        )
        .await;
        if lost > 0.0 {
            break lost;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans delivered to the dead node are counted as possibly lost"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let after = workload(81, 300);
    send_traces(&[&a, &b], &after, &mut Rng(4)).await;
    let want: BTreeSet<String> = after.iter().map(|t| hex(&t[0].span.trace_id)).collect();
    let mut got = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !want.iter().all(|id| got.contains_key(id)) {
        let m = q.next().await.expect("kept traces after the crash");
        if want.contains(&m.trace_id()) {
            assert_eq!(
                m.spans().len(),
                3,
                "trace {} split after the crash",
                m.trace_id()
            );
            assert!(
                got.insert(m.trace_id(), ()).is_none(),
                "trace {} twice",
                m.trace_id()
            );
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    eprintln!("dropped the dead node after {recovered:?}; possibly lost spans counted: {lost}");
    q.delete().await;
}

/// A delivery from a peer is buffered where it arrives even when this node
/// thinks another node owns the trace: it is never forwarded on arrival, so
/// nodes that disagree about membership cannot bounce spans between them.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivered_batch_is_not_forwarded_again() {
    use prost::Message;
    use tailgate_gateway::cluster::peer::{Delivery, PeerClient};
    let q = TestQueue::new("noloop").await;
    // Membership checks every 0.5 s: the assertions below read b between
    // the delivery and b's next check (which moves the stray), and 0.1 s
    // was too short a window on a loaded machine. The move still comes
    // well before the 1 s decision wait.
    let slower = [
        ("TAILGATE_CLUSTER__REFRESH_SECS", "0.5"),
        ("TAILGATE_CLUSTER__PEER_TIMEOUT_SECS", "5"),
    ];
    let a = node(&q.exchange, &[], &slower);
    let b = node(&q.exchange, &[&a], &slower);
    converged(&[&a, &b], 2).await;
    // A trace that a owns, delivered to b as if b's peer had a stale view.
    let ring = tailgate_gateway::cluster::ring::Ring::new([
        a.peer.as_str().into(),
        b.peer.as_str().into(),
    ]);
    let id = (0..)
        .map(|i| trace_id(90, i))
        .find(|t| &**ring.owner(&tailgate_sampling_rules::TraceId(*t)).unwrap() == a.peer.as_str())
        .unwrap();
    let delivery = Delivery {
        from: "10.9.9.9:4319".into(),
        spans: otlp::request(&order_trace(id, 5, None))
            .encode_to_vec()
            .into(),
        decisions: Vec::new(),
    };
    PeerClient::new(&b.peer)
        .unwrap()
        .deliver(&delivery)
        .await
        .unwrap();
    assert_eq!(
        b.metric("tailgate_cluster_delivered_spans_total", &[])
            .await,
        3.0
    );
    assert_eq!(
        b.metric("tailgate_buffer_traces", &[]).await,
        1.0,
        "buffered where it arrived"
    );
    assert_eq!(
        b.metric("tailgate_cluster_forwarded_spans_total", &[])
            .await,
        0.0,
        "not forwarded on arrival"
    );
    // The stray then moves to its owner once, at b's next membership check.
    a.wait_metric("tailgate_cluster_delivered_spans_total", &[], 3.0)
        .await;
    a.wait_metric("tailgate_traces_decided_total", &[], 1.0)
        .await;
    assert_eq!(b.metric("tailgate_traces_decided_total", &[]).await, 0.0);
    q.delete().await;
}

/// Sampling by key across nodes (`sample: {rate: 4, by: attributes.order.id}`):
/// 300 orders of 3 traces each (different trace IDs; every span carries its
/// order's `order.id`), their spans sprayed over 3 nodes. Every trace of a
/// sampled order is kept, each span with the rule's threshold and the
/// order's randomness as `rv` in its tracestate, and no trace of any other
/// order: the kept orders are exactly those the order ID alone selects.
#[tokio::test(flavor = "multi_thread")]
async fn key_sampling_keeps_whole_orders_across_nodes() {
    use tailgate_sampling_rules::{Probability, Randomness, Threshold};
    let dir = std::env::temp_dir().join(support::unique("key-sampling"));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: orders\n    action: { sample: { rate: 4, by: attributes.order.id } }\n",
    )
    .unwrap();
    let rules_file = rules.display().to_string();
    let with_rules = [("TAILGATE_RULES__FILE", rules_file.as_str())];
    let mut q = TestQueue::new("keysample").await;
    let a = node(&q.exchange, &[], &with_rules);
    let b = node(&q.exchange, &[&a], &with_rules);
    let c = node(&q.exchange, &[&a, &b], &with_rules);
    let nodes = [&a, &b, &c];
    converged(&nodes, 3).await;

    let mut traces = Vec::new();
    let mut order_of = BTreeMap::new();
    for o in 0..300u64 {
        let order = format!("ord-{o}");
        for t in 0..3 {
            let mut trace = order_trace(trace_id(90, o * 10 + t), 20, None);
            for s in &mut trace {
                s.span.attributes = vec![otlp::kv("order.id", &order)];
            }
            order_of.insert(hex(&trace[0].span.trace_id), order.clone());
            traces.push(trace);
        }
    }
    send_traces(&nodes, &traces, &mut Rng(11)).await;
    let kept = settled(&nodes, 900.0).await;
    let messages = q.take(kept).await;

    let threshold = Threshold::from_probability(Probability::new(0.25).unwrap()).unwrap();
    let selected = |order: &str| threshold.keeps(Randomness::of_key(order));
    let mut kept_by_order: BTreeMap<String, usize> = BTreeMap::new();
    for m in &messages {
        let order = &order_of[&m.trace_id()];
        *kept_by_order.entry(order.clone()).or_default() += 1;
        let rv = Randomness::of_key(order).to_rv();
        for span in m.spans() {
            assert_eq!(
                span.trace_state,
                format!("ot=th:{};rv:{rv}", threshold.to_th()),
                "trace {}",
                m.trace_id()
            );
        }
    }
    let expected: BTreeMap<String, usize> = (0..300)
        .map(|o| format!("ord-{o}"))
        .filter(|o| selected(o))
        .map(|o| (o, 3))
        .collect();
    assert_eq!(kept_by_order, expected, "whole orders kept, and only those");
    assert!(
        (40..=110).contains(&expected.len()),
        "about 1 in 4 of 300 orders: {}",
        expected.len()
    );
    drop((a, b, c));
    q.delete().await;
    let _ = std::fs::remove_dir_all(dir);
}
