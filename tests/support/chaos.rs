//! The chaos run: a 3-node gateway cluster, the ingester, RabbitMQ (through
//! a proxy that can cut it) and the ClickHouse engine, under steady load,
//! with faults injected one at a time at random from a seed. At the end it
//! reconciles what the load generator saw acknowledged against ClickHouse
//! and the nodes' own accounting.
//!
//! The rules make each trace's fate known in advance: every span carries
//! `chaos.fate` (`keep` or `drop`), and the rules keep or drop by it. So any
//! part of a trace, decided anywhere, has the same fate, and the
//! reconciliation can check each span, not only totals:
//! - every acknowledged `keep` span is in ClickHouse once, unless a SIGKILL
//!   took it; then no more are missing than the killed nodes held;
//! - no `drop` span is stored, and each is counted in
//!   `tailgate_spans_dropped_total` (read from the final accounting each
//!   node logs at exit, or its last scrape before a SIGKILL);
//! - a SIGTERM loses nothing: the node exits 0 and counts no shutdown drop.
//!
//! Used by `tests/chaos.rs` (a short run in the suite) and `benches/chaos.rs`
//! (`scripts/chaos`, as long as you ask).

use super::{
    PATIENCE,
    broker::{self, Proxy},
    clickhouse::ClickHouse,
    gateway::{Gateway, Tailgate, sum_metric},
    ingest::Ingest,
    otlp::{self, OrderSpan, hex, kv, order_trace, trace_id},
    unique,
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Time under load with faults.
    pub duration: Duration,
    /// Seeds the faults, their targets and timing, and the traces' fates.
    pub seed: u64,
    /// New traces (3 spans each) per second.
    pub traces_per_sec: u32,
}

/// The faults, in the order they are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGTERM a gateway, then start a new one in its place.
    NodeRestart,
    /// SIGKILL a gateway, then start a new one in its place.
    NodeKill,
    /// Cut every connection to RabbitMQ (gateways and ingester), then restore.
    BrokerCut,
    /// ClickHouse answers every request with an error, then recovers.
    ClickHouseOutage,
    /// SIGKILL the ingester, then start a new one.
    IngesterKill,
    /// Rewrite the rules file: a broken one that every node must refuse,
    /// then an equivalent valid one that every node must take.
    RulesReload,
}

const FAULTS: [Fault; 6] = [
    Fault::NodeRestart,
    Fault::NodeKill,
    Fault::BrokerCut,
    Fault::ClickHouseOutage,
    Fault::IngesterKill,
    Fault::RulesReload,
];

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub duration: Duration,
    pub faults: BTreeMap<String, u32>,
    /// Distinct spans the generator saw acknowledged, by fate.
    pub acked_keep: u64,
    pub acked_drop: u64,
    /// Spans whose request failed after it was sent (the node died), and
    /// were sent again: they may have been taken twice.
    pub resent: u64,
    /// `keep` spans stored, distinct; rows stored more than once (of spans
    /// sent once); `drop` spans stored.
    pub stored_keep: u64,
    pub duplicates: u64,
    /// Of the spans stored more than once, those whose copies came in
    /// different messages (not a republished message stored twice).
    pub duplicates_across_messages: u64,
    pub stored_drop: u64,
    /// Kept traces with some acknowledged span missing from ClickHouse.
    pub incomplete_traces: u64,
    /// Spans the nodes counted as dropped, by reason, over every process.
    pub dropped: BTreeMap<String, u64>,
    /// Acknowledged spans neither stored nor counted as dropped.
    pub lost: i64,
    /// What the SIGKILLed nodes held, by their last accounting before the
    /// kill, plus what was acknowledged between that and the kill, plus what
    /// peers counted as delivered to them just before: the most a kill may
    /// take.
    pub kill_bound: u64,
    /// SIGTERMed nodes that did not exit 0.
    pub unclean_exits: Vec<String>,
    /// Rules reloads refused or applied as expected, out of those tried.
    pub rules_checks: u32,
}

impl Report {
    /// Problems found; empty when the run reconciles.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.duplicates > 0 {
            p.push(format!("{} rows stored more than once", self.duplicates));
        }
        if self.stored_drop > 0 {
            p.push(format!(
                "{} spans of dropped traces stored",
                self.stored_drop
            ));
        }
        for reason in [
            "shutdown_unpublished",
            "shutdown_undelivered",
            "invalid_span",
        ] {
            if let Some(n) = self.dropped.get(reason).filter(|n| **n > 0) {
                p.push(format!("{n} spans dropped as {reason}"));
            }
        }
        if !self.unclean_exits.is_empty() {
            p.push(format!("unclean exits: {:?}", self.unclean_exits));
        }
        let slack = i64::try_from(self.resent).unwrap_or(i64::MAX);
        let bound = i64::try_from(self.kill_bound).unwrap_or(i64::MAX);
        if self.lost < -slack || self.lost > bound {
            p.push(format!(
                "{} spans lost (neither stored nor counted), outside [-{slack}, {bound}]",
                self.lost
            ));
        }
        if self.kill_bound == 0 && self.incomplete_traces > 0 {
            p.push(format!(
                "{} kept traces incomplete with no SIGKILL",
                self.incomplete_traces
            ));
        }
        p
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.duration.as_secs_f64();
        let acked = self.acked_keep + self.acked_drop;
        writeln!(f, "chaos run: seed {}, {:.0} s under load", self.seed, secs)?;
        writeln!(
            f,
            "load: {acked} spans acknowledged ({:.0} per second): {} to keep, {} to drop; {} sent again after a failed request",
            acked as f64 / secs.max(1e-9),
            self.acked_keep,
            self.acked_drop,
            self.resent
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "faults: {}", faults.join(", "))?;
        writeln!(
            f,
            "stored: {} keep spans, {} rows more than once ({} spans in several messages), {} drop spans; {} kept traces incomplete",
            self.stored_keep,
            self.duplicates,
            self.duplicates_across_messages,
            self.stored_drop,
            self.incomplete_traces
        )?;
        let dropped: Vec<String> = self
            .dropped
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "counted as dropped: {}", dropped.join(", "))?;
        writeln!(
            f,
            "lost: {} (bound from SIGKILLed nodes' holdings: {}); rules reloads checked: {}",
            self.lost, self.kill_bound, self.rules_checks
        )
    }
}

/// Cluster timing: quick greetings and peer timeouts, short waits, a
/// shutdown grace well above what a healthy node needs.
const GATEWAY: &[(&str, &str)] = &[
    ("TAILGATE_CLUSTER__REFRESH_SECS", "0.1"),
    ("TAILGATE_CLUSTER__PEER_TIMEOUT_SECS", "1"),
    ("TAILGATE_CLUSTER__FORWARD_FLUSH_SECS", "0.02"),
    ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "1"),
    ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "5"),
    ("TAILGATE_RULES__CHECK_INTERVAL_SECS", "0.2"),
    ("TAILGATE_SHUTDOWN__GRACE_SECS", "15"),
];

fn rules(keep_rule: &str) -> String {
    format!(
        "rules:\n  - name: chaos-drop\n    when:\n      attributes.chaos.fate: drop\n    action: drop\n  - name: {keep_rule}\n    action: keep\n"
    )
}
const BROKEN_RULES: &str =
    "rules:\n  - name: chaos-drop\n    when: {attributes.chaos.fate: [drop\n";

/// A small seeded generator (PCG-style LCG).
#[derive(Debug, Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from))
    }
}

/// One trace as the generator knows it.
#[derive(Debug)]
struct TraceRecord {
    keep: bool,
    /// Span IDs (hex) acknowledged.
    acked: BTreeSet<String>,
}

/// The generator's own log of what was acknowledged.
#[derive(Debug, Default)]
struct Ledger {
    traces: HashMap<String, TraceRecord>,
    /// (when, spans) of every acknowledged request, for the kill windows.
    acks: Vec<(Instant, u64)>,
    /// (trace, span) sent again after a request failed once sent.
    resent: HashSet<(String, String)>,
}

impl Ledger {
    fn acked_between(&self, from: Instant, to: Instant) -> u64 {
        self.acks
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The gateways' HTTP URLs a client may send to (a load balancer's view).
type Targets = Arc<RwLock<Vec<String>>>;

/// A process's span accounting: from the "span accounting of this process"
/// line a gateway logs at exit, or from a scrape of its metrics.
#[derive(Debug, Default, Clone)]
struct Accounting {
    received: u64,
    delivered: u64,
    forwarded: u64,
    published: u64,
    dropped: BTreeMap<String, u64>,
}

impl Accounting {
    fn held(&self) -> u64 {
        let out = self.forwarded + self.published + self.dropped.values().sum::<u64>();
        (self.received + self.delivered).saturating_sub(out)
    }

    fn from_metrics(text: &str) -> Self {
        let n = |name: &str| sum_metric(text, name, &[]) as u64;
        let dropped = [
            "policy",
            "late_span_of_dropped_trace",
            "invalid_span",
            "shutdown_unpublished",
            "shutdown_undelivered",
        ]
        .iter()
        .map(|r| {
            let v = sum_metric(text, "tailgate_spans_dropped_total", &[("reason", r)]) as u64;
            ((*r).to_owned(), v)
        })
        .collect();
        Self {
            received: n("tailgate_spans_received_total"),
            delivered: n("tailgate_cluster_delivered_spans_total"),
            forwarded: n("tailgate_cluster_forwarded_spans_total"),
            published: n("tailgate_spans_published_total"),
            dropped,
        }
    }

    fn from_exit_log(logs: &str) -> Option<Self> {
        let line = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["fields"]["message"] == "span accounting of this process")?;
        let f = &line["fields"];
        let n = |k: &str| f[k].as_u64().unwrap_or(0);
        let dropped = f["dropped_by_reason"]
            .as_str()?
            .split_whitespace()
            .filter_map(|pair| {
                let (r, v) = pair.split_once('=')?;
                Some((r.to_owned(), v.parse().ok()?))
            })
            .collect();
        Some(Self {
            received: n("spans_received"),
            delivered: n("spans_from_peers"),
            forwarded: n("spans_to_peers"),
            published: n("spans_published"),
            dropped,
        })
    }
}

/// Everything a run started, and what it has learnt so far.
struct Stand {
    plan: Plan,
    rng: Rng,
    exchange: String,
    proxy: Proxy,
    ch: ClickHouse,
    names: Ingest,
    ingester: Option<Tailgate>,
    nodes: Vec<Gateway>,
    rules_path: PathBuf,
    rules_version: u32,
    targets: Targets,
    ledger: Arc<Mutex<Ledger>>,
    /// Accounting of every gateway process that has ended.
    ended: Vec<Accounting>,
    /// The last scrape of every gateway process that has ended.
    last_scrapes: Vec<String>,
    /// Peer addresses of the SIGKILLed gateways.
    killed: Vec<String>,
    report: Report,
}

impl Stand {
    async fn start(plan: Plan) -> Self {
        let exchange = unique("chaos");
        let upstream = broker_addr().expect("the broker's host:port in the AMQP URL");
        let proxy = Proxy::start(upstream, true).await;
        let ch = ClickHouse::start();
        let names = Ingest::new(&exchange);
        let rules_path = std::env::temp_dir().join(format!("{}.rules.yaml", unique("chaos")));
        std::fs::write(&rules_path, rules("chaos-keep")).expect("write rules");
        let mut stand = Self {
            rng: Rng(plan.seed),
            report: Report {
                seed: plan.seed,
                ..Report::default()
            },
            plan,
            exchange,
            proxy,
            ch,
            names,
            ingester: None,
            nodes: Vec::new(),
            rules_path,
            rules_version: 0,
            targets: Arc::default(),
            ledger: Arc::default(),
            ended: Vec::new(),
            last_scrapes: Vec::new(),
            killed: Vec::new(),
        };
        stand.ingester = Some(stand.start_ingester().await);
        for _ in 0..3 {
            let node = stand.start_node();
            stand.nodes.push(node);
        }
        stand.converged().await;
        stand.publish_targets();
        stand
    }

    async fn start_ingester(&self) -> Tailgate {
        let url = self.proxy.amqp_url();
        self.names
            .start(
                &self.exchange,
                &self.ch,
                &[("TAILGATE_RABBITMQ__URL", url.as_str())],
            )
            .await
    }

    fn start_node(&self) -> Gateway {
        let seeds: Vec<String> = self.nodes.iter().map(|g| g.peer.clone()).collect();
        let seeds = serde_json::to_string(&seeds).expect("seeds");
        let rules = self.rules_path.display().to_string();
        let mut env: Vec<(&str, &str)> = GATEWAY.to_vec();
        env.push(("TAILGATE_CLUSTER__PEERS", &seeds));
        env.push(("TAILGATE_RULES__FILE", &rules));
        Gateway::start(&self.proxy.amqp_url(), &self.exchange, &env)
    }

    fn publish_targets(&self) {
        let urls = self.nodes.iter().map(Gateway::http_url).collect();
        *self.targets.write().expect("targets") = urls;
    }

    /// Waits until every node sees all the others.
    async fn converged(&self) {
        let n = self.nodes.len() as f64;
        for g in &self.nodes {
            g.wait_metric_eq("tailgate_cluster_peers", &[], n).await;
        }
    }

    /// Waits until every process has its broker connection back.
    async fn connected(&self) {
        for g in &self.nodes {
            g.wait_metric_eq("tailgate_broker_connected", &[], 1.0)
                .await;
        }
        if let Some(ing) = &self.ingester {
            ing.wait_metric_eq("tailgate_ingester_broker_connected", &[], 1.0)
                .await;
        }
    }

    async fn inject(&mut self, fault: Fault) {
        *self.report.faults.entry(format!("{fault:?}")).or_default() += 1;
        let hold = self.rng.millis(1_000, 4_000);
        match fault {
            Fault::NodeRestart => {
                let node = self.take_node();
                self.terminate(node).await;
                self.replace_node().await;
            }
            Fault::NodeKill => {
                let node = self.take_node();
                let peer = node.peer.clone();
                let scraped_at = Instant::now();
                let scrape = node.metrics().await;
                let last = Accounting::from_metrics(&scrape);
                self.last_scrapes.push(scrape);
                tokio::task::spawn_blocking(move || node.kill())
                    .await
                    .expect("kill");
                let killed_at = Instant::now();
                self.converged().await;
                let window = self
                    .ledger
                    .lock()
                    .expect("ledger")
                    .acked_between(scraped_at, killed_at);
                self.report.kill_bound += last.held() + window;
                self.killed.push(peer);
                self.ended.push(last);
                self.replace_node().await;
            }
            Fault::BrokerCut => {
                self.proxy.set(false);
                tokio::time::sleep(hold).await;
                self.proxy.set(true);
                self.connected().await;
            }
            Fault::ClickHouseOutage => {
                self.ch.control(serde_json::json!({"down": true})).await;
                tokio::time::sleep(hold).await;
                self.ch.control(serde_json::json!({"down": false})).await;
            }
            Fault::IngesterKill => {
                if let Some(ing) = self.ingester.take() {
                    tokio::task::spawn_blocking(move || ing.kill())
                        .await
                        .expect("kill");
                }
                self.ingester = Some(self.start_ingester().await);
            }
            Fault::RulesReload => self.reload_rules().await,
        }
    }

    /// A node at random, out of the load balancer's view first.
    fn take_node(&mut self) -> Gateway {
        let i = self.rng.below(self.nodes.len());
        let node = self.nodes.remove(i);
        self.publish_targets();
        node
    }

    async fn replace_node(&mut self) {
        let node = self.start_node();
        self.nodes.push(node);
        self.converged().await;
        self.publish_targets();
    }

    /// SIGTERM; the node's exit accounting is kept, and an exit code other
    /// than 0 (something acknowledged was lost) is a finding.
    async fn terminate(&mut self, node: Gateway) {
        let peer = node.peer.clone();
        self.last_scrapes.push(node.metrics().await);
        let (status, logs) = tokio::task::spawn_blocking(move || node.terminate_with_logs())
            .await
            .expect("terminate");
        if !status.success() {
            self.report.unclean_exits.push(format!("{peer}: {status}"));
        }
        let accounting = Accounting::from_exit_log(&logs)
            .unwrap_or_else(|| panic!("no exit accounting from {peer}:\n{logs}"));
        self.ended.push(accounting);
    }

    /// A broken file first, refused by every node with the rules in force
    /// kept; then an equivalent valid file, taken by every node.
    async fn reload_rules(&mut self) {
        let before = self
            .rule_counts("tailgate_rules_reload_failures_total")
            .await;
        std::fs::write(&self.rules_path, BROKEN_RULES).expect("write rules");
        for (g, n) in self.nodes.iter().zip(before) {
            g.wait_metric("tailgate_rules_reload_failures_total", &[], n + 1.0)
                .await;
        }
        self.report.rules_checks += 1;
        let before = self.rule_counts("tailgate_rules_reloads_total").await;
        self.rules_version += 1;
        let text = rules(&format!("chaos-keep-v{}", self.rules_version));
        std::fs::write(&self.rules_path, text).expect("write rules");
        for (g, n) in self.nodes.iter().zip(before) {
            g.wait_metric("tailgate_rules_reloads_total", &[], n + 1.0)
                .await;
        }
        self.report.rules_checks += 1;
    }

    async fn rule_counts(&self, name: &str) -> Vec<f64> {
        let mut out = Vec::new();
        for g in &self.nodes {
            out.push(g.metric(name, &[]).await);
        }
        out
    }

    /// Stops every gateway with SIGTERM, the last one after it took a
    /// sentinel trace; returns the sentinel's trace ID.
    async fn stop_gateways(&mut self) -> String {
        while self.nodes.len() > 1 {
            let node = self.take_node();
            self.terminate(node).await;
        }
        let sentinel = fated_trace(trace_id(self.plan.seed, u64::MAX), true);
        let id = hex(&sentinel[0].span.trace_id);
        let last = self.nodes.pop().expect("one node left");
        let resp = otlp::send_http_protobuf(&last.http_url(), &otlp::request(&sentinel)).await;
        assert_eq!(resp.status(), 200, "sentinel refused");
        self.ledger.lock().expect("ledger").traces.insert(
            id.clone(),
            TraceRecord {
                keep: true,
                acked: sentinel.iter().map(|s| hex(&s.span.span_id)).collect(),
            },
        );
        self.terminate(last).await;
        id
    }

    /// Waits until the ingester has stored the sentinel, nothing is ready in
    /// its queue, and ClickHouse holds at least as many distinct spans as
    /// the gateways counted as published (exactly, from their exit
    /// accounting; a SIGKILLed one's last scrape can only count fewer).
    /// Counting the ingester's deliveries would not do: a batch cut off by a
    /// broker outage is delivered again, so its consumed count stays ahead
    /// of its acknowledgements for good.
    async fn drained(&self, sentinel: &str) {
        let table = self.table();
        let ing = self.ingester.as_ref().expect("ingester");
        let stored = format!("SELECT count() FROM {table} WHERE TraceId = '{sentinel}'");
        ing.poll(
            "sentinel trace stored",
            async || self.ch.try_query(&stored).await.unwrap_or_default(),
            |n| n.trim() == "3",
        )
        .await;
        let published: u64 = self.ended.iter().map(|a| a.published).sum();
        let distinct = format!("SELECT uniqExact(TraceId, SpanId) FROM {table}");
        ing.poll(
            "ingest queue empty, every published span stored",
            async || {
                let ready = queue_depth(&self.names.queue).await;
                let stored = self.ch.try_query(&distinct).await.unwrap_or_default();
                (ready, stored.trim().parse::<u64>().unwrap_or(0))
            },
            |(ready, stored)| *ready == 0 && *stored >= published,
        )
        .await;
    }

    fn table(&self) -> String {
        format!("{}.otel_traces", self.names.db)
    }

    async fn reconcile(&mut self) {
        let rows = self
            .ch
            .json_rows(&format!(
                "SELECT TraceId AS t, SpanId AS s, count() AS n, uniqExact(MessageId) AS m FROM {} GROUP BY t, s",
                self.table()
            ))
            .await;
        let mut stored: HashMap<(String, String), u64> = HashMap::new();
        for r in rows {
            let key = (
                r["t"].as_str().unwrap_or_default().to_owned(),
                r["s"].as_str().unwrap_or_default().to_owned(),
            );
            let n = r["n"]
                .as_u64()
                .or_else(|| r["n"].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0);
            let messages = r["m"]
                .as_u64()
                .or_else(|| r["m"].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0);
            if messages > 1 {
                self.report.duplicates_across_messages += 1;
            }
            stored.insert(key, n);
        }
        let ledger = self.ledger.lock().expect("ledger");
        let r = &mut self.report;
        r.resent = ledger.resent.len() as u64;
        for (trace, rec) in &ledger.traces {
            let mut missing = false;
            for span in &rec.acked {
                let n = stored
                    .get(&(trace.clone(), span.clone()))
                    .copied()
                    .unwrap_or(0);
                if rec.keep {
                    r.acked_keep += 1;
                    if n > 0 {
                        r.stored_keep += 1;
                    } else {
                        missing = true;
                    }
                    if n > 1 && !ledger.resent.contains(&(trace.clone(), span.clone())) {
                        r.duplicates += n - 1;
                    }
                } else {
                    r.acked_drop += 1;
                    r.stored_drop += n;
                }
            }
            if rec.keep && missing {
                r.incomplete_traces += 1;
            }
        }
        for a in &self.ended {
            for (reason, n) in &a.dropped {
                *r.dropped.entry(reason.clone()).or_default() += n;
            }
        }
        // What peers delivered to each killed node just before it died,
        // counted by each at its ring change.
        for text in &self.last_scrapes {
            for peer in &self.killed {
                let to_it = sum_metric(
                    text,
                    "tailgate_cluster_spans_lost_with_peer_total",
                    &[("peer", peer)],
                );
                r.kill_bound += to_it as u64;
            }
        }
        let counted: u64 = r.dropped.values().sum();
        let acked = i64::try_from(r.acked_keep + r.acked_drop).unwrap_or(i64::MAX);
        let explained = i64::try_from(r.stored_keep + counted).unwrap_or(i64::MAX);
        r.lost = acked - explained;
    }

    async fn cleanup(self) {
        drop(self.ingester);
        self.names.cleanup().await;
        broker::delete(&[], &[&self.exchange]).await;
        let _ = std::fs::remove_file(&self.rules_path);
    }
}

/// The broker the tests use, as a socket address (for the proxy).
fn broker_addr() -> Option<SocketAddr> {
    let url = super::amqp_url();
    let host = url.split('@').nth(1)?.split('/').next()?;
    host.parse().ok()
}

/// Ready messages in `queue` (a passive declare).
async fn queue_depth(queue: &str) -> u32 {
    let conn =
        lapin::Connection::connect(&super::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to the broker");
    let channel = conn.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare of the ingest queue");
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

/// An order trace whose every span says its fate.
fn fated_trace(id: [u8; 16], keep: bool) -> Vec<OrderSpan> {
    let fate = if keep { "keep" } else { "drop" };
    let mut spans = order_trace(id, 20, None);
    for s in &mut spans {
        s.span.attributes.push(kv("chaos.fate", fate));
    }
    spans
}

/// Sends `spans` to a random target until one acknowledges them, as a
/// client behind a load balancer would; records them in the ledger.
async fn deliver(
    targets: Targets,
    ledger: Arc<Mutex<Ledger>>,
    spans: Vec<OrderSpan>,
    mut pick: u64,
) {
    let req = otlp::request(&spans);
    let client = reqwest::Client::new();
    let body = prost::Message::encode_to_vec(&req);
    let deadline = Instant::now() + PATIENCE * 2;
    let mut failed_after_send = false;
    loop {
        let url = {
            let t = targets.read().expect("targets");
            (!t.is_empty()).then(|| t[usize::try_from(pick).unwrap_or(0) % t.len()].clone())
        };
        pick = pick.wrapping_add(1);
        if let Some(url) = url {
            let sent = client
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status() == 200 => break,
                Ok(_) => {}
                // Connection refused: nothing was taken. Anything else may
                // have reached a node that died before answering.
                Err(e) if e.is_connect() => {}
                Err(_) => failed_after_send = true,
            }
        }
        assert!(
            Instant::now() < deadline,
            "no gateway took a request in {:?}",
            PATIENCE * 2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut l = ledger.lock().expect("ledger");
    l.acks.push((Instant::now(), spans.len() as u64));
    for s in &spans {
        let (trace, span) = (hex(&s.span.trace_id), hex(&s.span.span_id));
        if failed_after_send {
            l.resent.insert((trace.clone(), span.clone()));
        }
        if let Some(rec) = l.traces.get_mut(&trace) {
            rec.acked.insert(span);
        }
    }
}

/// Steady load until `stop`: every 100 ms a tenth of the second's new
/// traces; their children go now, in two requests to random nodes, their
/// roots with the next tick's.
async fn load(plan: Plan, targets: Targets, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let mut rng = Rng(plan.seed ^ 0x5EED);
    let per_tick = (plan.traces_per_sec / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut roots: Vec<OrderSpan> = Vec::new();
    let mut sending = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut children: Vec<OrderSpan> = Vec::new();
        let mut new_roots = Vec::new();
        for _ in 0..per_tick {
            let keep = rng.below(2) == 0;
            let trace = fated_trace(trace_id(plan.seed, n), keep);
            n += 1;
            ledger.lock().expect("ledger").traces.insert(
                hex(&trace[0].span.trace_id),
                TraceRecord {
                    keep,
                    acked: BTreeSet::new(),
                },
            );
            new_roots.push(trace[0].clone());
            children.extend(trace[1..].iter().cloned());
        }
        let half = children.len() / 2;
        let second = children.split_off(half);
        for part in [children, second, std::mem::replace(&mut roots, new_roots)] {
            if !part.is_empty() {
                sending.spawn(deliver(
                    Arc::clone(&targets),
                    Arc::clone(&ledger),
                    part,
                    rng.next(),
                ));
            }
        }
        while sending.try_join_next().is_some() {}
    }
    if !roots.is_empty() {
        sending.spawn(deliver(
            Arc::clone(&targets),
            Arc::clone(&ledger),
            roots,
            rng.next(),
        ));
    }
    while let Some(done) = sending.join_next().await {
        done.expect("a delivery task panicked");
    }
}

/// Runs `plan` and returns what it found (see [`Report::problems`]).
pub async fn run(plan: Plan) -> Report {
    let started = Instant::now();
    let mut stand = Stand::start(plan.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let generator = tokio::spawn(load(
        plan.clone(),
        Arc::clone(&stand.targets),
        Arc::clone(&stand.ledger),
        Arc::clone(&stop),
    ));
    let load_started = Instant::now();
    while load_started.elapsed() < plan.duration {
        let calm = stand.rng.millis(1_000, 3_000);
        tokio::time::sleep(calm).await;
        let fault = FAULTS[stand.rng.below(FAULTS.len())];
        eprintln!(
            "chaos: {:>6.1} s: {fault:?}",
            load_started.elapsed().as_secs_f64()
        );
        stand.inject(fault).await;
    }
    stop.store(true, Ordering::Relaxed);
    generator.await.expect("load generator");
    stand.report.duration = load_started.elapsed();
    let sentinel = stand.stop_gateways().await;
    stand.drained(&sentinel).await;
    stand.reconcile().await;
    eprintln!(
        "chaos: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let report = std::mem::take(&mut stand.report);
    stand.cleanup().await;
    report
}
