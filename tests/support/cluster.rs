//! A gateway cluster for the tests: nodes that join through seeds, and
//! clients that spray spans over them as a load balancer would.

use super::{
    PATIENCE, amqp_url,
    gateway::{Gateway, metric_sum},
    otlp::{self, OrderSpan},
};
use std::time::Duration;

/// Cluster timing for tests: quick greetings, a short peer timeout.
pub const CLUSTER: &[(&str, &str)] = &[
    ("TAILGATE_CLUSTER__REFRESH_SECS", "0.1"),
    ("TAILGATE_CLUSTER__PEER_TIMEOUT_SECS", "1"),
    ("TAILGATE_CLUSTER__FORWARD_FLUSH_SECS", "0.02"),
    ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "1"),
    ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "20"),
];

/// Starts a node publishing to `exchange` that joins through `seeds` (peer addresses), with `extra` settings.
pub fn node(exchange: &str, seeds: &[&Gateway], extra: &[(&str, &str)]) -> Gateway {
    let seeds =
        serde_json::to_string(&seeds.iter().map(|g| g.peer.clone()).collect::<Vec<_>>()).unwrap();
    let mut env: Vec<(&str, &str)> = CLUSTER.to_vec();
    env.push(("TAILGATE_CLUSTER__PEERS", &seeds));
    env.extend_from_slice(extra);
    Gateway::start(&amqp_url(), exchange, &env)
}

/// Waits until every node sees `n` live nodes.
pub async fn converged(nodes: &[&Gateway], n: usize) {
    for g in nodes {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let peers = g.metric("tailgate_cluster_peers", &[]).await;
            if peers == n as f64 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} sees {peers} nodes, not {n}\n{}",
                g.peer,
                g.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A small deterministic generator for spreading spans over nodes.
pub struct Rng(pub u64);
impl Rng {
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from((self.0 >> 33) % n as u64).unwrap()
    }
}

/// Sends spans to the given nodes, each span to a random one, in requests
/// of up to 300 spans; a refused request is retried on another node, as a
/// client behind a load balancer would.
pub async fn spray(nodes: &[&Gateway], spans: &[OrderSpan], rng: &mut Rng) {
    let mut per_node: Vec<Vec<OrderSpan>> = vec![Vec::new(); nodes.len()];
    for s in spans {
        per_node[rng.below(nodes.len())].push(s.clone());
    }
    for (i, group) in per_node.iter().enumerate() {
        for chunk in group.chunks(300) {
            let req = otlp::request(chunk);
            let mut target = i;
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let resp = otlp::send_http_protobuf(&nodes[target].http_url(), &req).await;
                if resp.status() == 200 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no node accepts spans"
                );
                target = (target + 1) % nodes.len();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Children first, roots last: every trace is complete when its root wait starts.
pub async fn send_traces(nodes: &[&Gateway], traces: &[Vec<OrderSpan>], rng: &mut Rng) {
    let children: Vec<OrderSpan> = traces.iter().flat_map(|t| t[1..].iter().cloned()).collect();
    let roots: Vec<OrderSpan> = traces.iter().map(|t| t[0].clone()).collect();
    spray(nodes, &children, rng).await;
    spray(nodes, &roots, rng).await;
}

/// Waits until the nodes decided `traces` traces and the broker confirmed every kept one.
pub async fn settled(nodes: &[&Gateway], traces: f64) -> usize {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let decided = metric_sum(nodes, "tailgate_traces_decided_total", &[]).await;
        let kept = metric_sum(
            nodes,
            "tailgate_traces_decided_total",
            &[("decision", "keep")],
        )
        .await;
        let acked = metric_sum(
            nodes,
            "tailgate_broker_publishes_total",
            &[("outcome", "ack")],
        )
        .await;
        if decided >= traces && acked >= kept {
            assert_eq!(
                decided, traces,
                "a trace was decided more than once (split)"
            );
            return kept as usize;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "decided {decided} of {traces}, {acked} of {kept} kept confirmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
