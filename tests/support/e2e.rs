//! The end-to-end benchmark: 1 and then 3 gateways and an ingester on
//! loopback, with the real RabbitMQ and the ClickHouse engine, under load
//! from the load generator. `benches/e2e.rs` runs it for the published
//! figures; `tests/bench_smoke.rs` runs it small, to keep it working.
//!
//! Per setup: an unthrottled phase measures capacity and gateway CPU per
//! span; a phase at half that rate measures decision latency; then every
//! accepted span must be accounted for (kept and confirmed by the broker,
//! or dropped with a reason) and every kept span must be a row in
//! ClickHouse. The ingester batches as in the tests (`batch.max_wait_secs`
//! 0.1, set by `Ingest`). The raw prost decode of the same payloads, the
//! limit the gateways are compared with, is measured before each setup and
//! again after its capacity phase. Memory per buffered span is measured on
//! its own gateway, which holds everything it receives.

use super::{
    PATIENCE, broker,
    clickhouse::ClickHouse,
    gateway::{Tailgate, sum_metric},
    ingest::Ingest,
    unique,
};
use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};
use tailgate_benches::{
    corpus::{Batch, Encoded, Workload, corpus},
    loadgen::{self, Options, Protocol, Stats},
    procfs, prost_decode_rate,
};
use tailgate_contract::compression::Compression;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Cluster sizes, one setup each.
    pub gateways: Vec<usize>,
    /// Length of the capacity phase's window (and of the latency phase,
    /// unless `latency_duration` says otherwise).
    pub duration: Duration,
    /// Length of the latency phase: a longer one holds more of the broker's
    /// occasional stalls (such as its write-ahead log rolling over) in
    /// their real proportion.
    pub latency_duration: Option<Duration>,
    /// Full-rate load before the capacity phase's measurement window, so
    /// the buffer holds `decision_wait` of spans and traces are decided as
    /// fast as they arrive: the window sees the steady state.
    pub warm_up: Duration,
    pub connections: usize,
    pub protocol: Protocol,
    pub workload: Workload,
    /// Distinct pre-encoded batches (later passes rename their traces).
    pub batches: u32,
    pub decision_wait: Duration,
    /// A sampling rules file for the gateways; the built-in policy if `None`.
    pub rules: Option<std::path::PathBuf>,
    /// How the gateways compress kept traces for RabbitMQ.
    pub compression: Compression,
    /// Spans held by the memory-measurement gateway.
    pub memory_spans: u64,
    /// CPU time spent on the raw prost decode baseline.
    pub decode_time: Duration,
    /// CPU priority (`nice`) of the ingester and the ClickHouse engine. In
    /// production they run on hosts of their own; here they share two cores
    /// with the gateways, the broker and the load generator, and at a lower
    /// priority they take the cores only when the pipeline under test
    /// leaves them idle. 0 runs them like everything else.
    pub stand_in_nice: i32,
    /// The ingester's `rabbitmq.prefetch`: messages per insert at most.
    /// The chDB stand-in pays a lot per insert; with the default (256) it
    /// fell behind the kept spans at half load, and the broker held the
    /// backlog.
    pub ingester_prefetch: u16,
    /// More `TAILGATE_*` settings for every gateway, after the plan's own
    /// (`--gateway-env KEY=VALUE`): for trying a setting without a new option.
    pub gateway_env: Vec<(String, String)>,
}

impl Plan {
    /// The published run: 20 s phases, one million buffered spans.
    pub fn full() -> Self {
        Self {
            gateways: vec![1, 3],
            duration: Duration::from_secs(20),
            latency_duration: None,
            warm_up: Duration::from_secs(5),
            connections: 8,
            protocol: Protocol::Grpc,
            workload: Workload::default(),
            batches: 200,
            decision_wait: Duration::from_secs(2),
            rules: None,
            compression: Compression::default(),
            memory_spans: 1_000_000,
            decode_time: Duration::from_secs(3),
            stand_in_nice: 19,
            ingester_prefetch: 2048,
            gateway_env: Vec::new(),
        }
    }

    /// A few seconds of small load: keeps the benchmark working in CI.
    pub fn smoke() -> Self {
        Self {
            duration: Duration::from_millis(1500),
            warm_up: Duration::from_millis(500),
            connections: 4,
            batches: 10,
            decision_wait: Duration::from_millis(300),
            memory_spans: 20_000,
            decode_time: Duration::from_millis(200),
            workload: Workload {
                late_share: 0.05,
                ..Workload::default()
            },
            ..Self::full()
        }
    }

    fn latency_duration(&self) -> Duration {
        self.latency_duration.unwrap_or(self.duration)
    }

    fn late_delay(&self) -> Duration {
        self.decision_wait + Duration::from_secs(1)
    }
}

/// One load phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// The load generator's account of the whole phase.
    pub load: Stats,
    /// Spans the gateways received from clients in the measurement window.
    pub spans: u64,
    /// Received spans per second of the window.
    pub rate: f64,
    /// CPU time of all gateway processes in the window: receiving its
    /// spans, and deciding those that fell due in it. For the capacity
    /// phase the window follows the warm-up, so the two match; for the
    /// half-load phase it runs until its last span was decided and confirmed.
    pub gateway_cpu: Duration,
}

/// Where every accepted span went, summed over the gateways.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accounting {
    /// Accepted by the gateways, as the load generator counted.
    pub accepted: u64,
    /// As the gateways counted them (`tailgate_spans_received_total`).
    pub received: u64,
    /// In messages the broker confirmed.
    pub kept: u64,
    /// Bodies of those messages, as sent to the broker.
    pub published_bytes: u64,
    /// By reason, from `tailgate_spans_dropped_total`.
    pub dropped: Vec<(String, u64)>,
    /// Accepted but neither kept nor dropped with a reason: must be 0.
    pub lost: i64,
    /// Rows in ClickHouse.
    pub rows: u64,
}

impl Accounting {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|(_, n)| n).sum()
    }

    /// What the broker stores per kept span.
    pub fn broker_bytes_per_kept_span(&self) -> f64 {
        self.published_bytes as f64 / self.kept.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct SetupReport {
    pub gateways: usize,
    pub capacity: Phase,
    pub half_load: Phase,
    /// Root span received → publish confirmed, at half load (seconds).
    pub latency_p50: f64,
    pub latency_p99: f64,
    /// Root span received → decision, at half load (seconds): the gateway's
    /// share of `latency_p99`; the rest is the outbox and the broker's confirm.
    pub decision_p99: f64,
    /// Publish → broker confirm, at half load (seconds).
    pub confirm_p99: f64,
    pub accounting: Accounting,
    pub ingester_cpu: Duration,
    /// Raw prost decode of the same payloads, spans per CPU-second, just
    /// before the setup started and just after its capacity phase.
    pub prost_decode: [f64; 2],
    /// The nice values the ingester and the chDB engine ran at, as /proc
    /// reports them.
    pub stand_ins_nice: Vec<i32>,
}

impl SetupReport {
    pub fn spans_per_cpu_second(&self) -> f64 {
        self.capacity.spans as f64 / self.capacity.gateway_cpu.as_secs_f64()
    }

    /// The limit the capacity phase is compared with: a shared host's
    /// speed drifts, so the decode rate is measured on both sides of it.
    pub fn raw_decode(&self) -> f64 {
        (self.prost_decode[0] + self.prost_decode[1]) / 2.0
    }

    pub fn ratio_to_raw_decode(&self) -> f64 {
        self.spans_per_cpu_second() / self.raw_decode()
    }

    pub fn ingester_rows_per_cpu_second(&self) -> f64 {
        self.accounting.rows as f64 / self.ingester_cpu.as_secs_f64()
    }

    pub fn kept_share(&self) -> f64 {
        self.accounting.kept as f64 / self.accounting.accepted.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct MemoryReport {
    pub spans: u64,
    /// Encoded OTLP bytes buffered (`tailgate_buffer_bytes`).
    pub buffered_bytes: u64,
    pub rss_before: u64,
    pub rss_after: u64,
}

impl MemoryReport {
    pub fn bytes_per_span(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.spans.max(1) as f64
    }

    pub fn ratio_to_encoded(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.buffered_bytes.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub machine: String,
    pub plan: Plan,
    pub bytes_per_span: f64,
    pub setups: Vec<SetupReport>,
    pub memory: MemoryReport,
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} × {model}")
}

fn cpu(nodes: &[&Tailgate]) -> Duration {
    nodes
        .iter()
        .map(|n| procfs::cpu(n.pid()).expect("gateway CPU time from /proc"))
        .sum()
}

/// Gateway CPU time and spans received from clients, summed over nodes, now.
async fn sample(nodes: &[&Tailgate]) -> (Duration, u64) {
    let cpu = cpu(nodes);
    let mut received = 0.0;
    for n in nodes {
        received += sum_metric(&n.metrics().await, "tailgate_spans_received_total", &[]);
    }
    (cpu, received as u64)
}

/// Cumulative histogram buckets `(le, count)` of `name`, summed over nodes.
async fn histogram(nodes: &[&Tailgate], name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for n in nodes {
        let text = n.metrics().await;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) else {
                continue;
            };
            let Some((le, count)) = rest.split_once("\"} ") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("bucket bound")
            };
            let count: f64 = count.trim().parse().expect("bucket count");
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += count,
                None => buckets.push((le, count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of the observations between two scrapes of a histogram,
/// interpolated within its bucket as Prometheus' `histogram_quantile` does.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let Some(&(_, total)) = diff.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, cum) in &diff {
        if cum >= rank {
            if le.is_infinite() {
                return lower;
            }
            return lower + (le - lower) * (rank - below) / (cum - below).max(f64::MIN_POSITIVE);
        }
        (lower, below) = (le, cum);
    }
    lower
}

/// Polls the row count until it reaches `want`, or until `PATIENCE` passes
/// without a new row (after a long latency phase the ingester, at a low
/// priority, may have minutes of kept traces to catch up on); the count.
async fn rows_at_least(ch: &ClickHouse, count: &str, want: u64) -> u64 {
    let (mut last, mut deadline) = (0, Instant::now() + PATIENCE);
    loop {
        let rows = match ch.try_query(count).await {
            Ok(r) => r.trim().parse().unwrap_or(0),
            Err(e) => panic!("{count}: {e}"),
        };
        if rows > last {
            (last, deadline) = (rows, Instant::now() + PATIENCE);
        }
        if rows >= want || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the gateways have decided and confirmed or dropped every
/// span offered so far (`offered` = accepted + rejected in partial
/// success); returns what they counted.
async fn settle(nodes: &[&Tailgate], offered: u64, patience: Duration) -> Accounting {
    let deadline = Instant::now() + patience;
    loop {
        // One scrape per node per poll, summed over nodes for each series.
        let mut texts = Vec::with_capacity(nodes.len());
        for node in nodes {
            texts.push(node.metrics().await);
        }
        let sum = |name: &str, labels: &[(&str, &str)]| -> u64 {
            texts
                .iter()
                .map(|t| sum_metric(t, name, labels))
                .sum::<f64>() as u64
        };
        let kept = sum("tailgate_spans_published_total", &[]);
        let dropped: Vec<(String, u64)> = [
            "policy",
            "late_span_of_dropped_trace",
            "invalid_span",
            "shutdown_unpublished",
            "shutdown_undelivered",
        ]
        .into_iter()
        .map(|reason| {
            let n = sum("tailgate_spans_dropped_total", &[("reason", reason)]);
            (reason.to_owned(), n)
        })
        .collect();
        let accounted: u64 = kept + dropped.iter().map(|(_, n)| n).sum::<u64>();
        if accounted >= offered || Instant::now() >= deadline {
            return Accounting {
                accepted: offered,
                received: sum("tailgate_spans_received_total", &[]),
                kept,
                published_bytes: sum("tailgate_broker_published_bytes_total", &[]),
                dropped,
                lost: offered as i64 - accounted as i64,
                rows: 0,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn options(plan: &Plan, nodes: &[&Tailgate], rate: Option<f64>, first_pass: u64) -> Options {
    Options {
        protocol: plan.protocol,
        targets: nodes
            .iter()
            .map(|n| match plan.protocol {
                Protocol::Grpc => n.grpc,
                Protocol::Http => n.http,
            })
            .collect(),
        connections: plan.connections,
        rate,
        duration: plan.duration,
        max_spans: None,
        first_pass,
        late_delay: plan.late_delay(),
        retry_wait: Duration::from_millis(100),
    }
}

/// A gateway's `TAILGATE_*` settings: the plan's, then `plan.gateway_env`,
/// then `extra` (a later setting of the same key wins).
fn gateway_env(plan: &Plan, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (
            "TAILGATE_BUFFER__DECISION_WAIT_SECS".into(),
            plan.decision_wait.as_secs_f64().to_string(),
        ),
        ("TAILGATE_CLUSTER__REFRESH_SECS".into(), "0.2".into()),
        ("TAILGATE_CLUSTER__PEER_TIMEOUT_SECS".into(), "5".into()),
        (
            "TAILGATE_RABBITMQ__COMPRESSION".into(),
            // Named as in the configuration file.
            serde_json::to_value(plan.compression)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .expect("compression names itself"),
        ),
    ];
    if let Some(path) = &plan.rules {
        env.push((
            "TAILGATE_RULES__FILE".into(),
            path.to_string_lossy().into_owned(),
        ));
    }
    env.extend(plan.gateway_env.iter().cloned());
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    env
}

fn start_gateway(exchange: &str, env: &[(String, String)]) -> Tailgate {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Tailgate::start(&super::amqp_url(), exchange, &env)
}

/// Raw prost decoding of the corpus's requests on one blocking thread for
/// `plan.decode_time`: spans per CPU-second.
async fn prost_decode(plan: &Plan, requests: &Arc<Vec<Encoded>>) -> f64 {
    let (requests, time) = (Arc::clone(requests), plan.decode_time);
    tokio::task::spawn_blocking(move || prost_decode_rate(&requests, time))
        .await
        .expect("decode task")
        .expect("decode rate")
}

async fn run_setup(
    plan: &Plan,
    n: usize,
    ch: &ClickHouse,
    batches: &[Batch],
    requests: &Arc<Vec<Encoded>>,
) -> SetupReport {
    let decode_before = prost_decode(plan, requests).await;
    let exchange = unique("bench");
    let ingest = Ingest {
        nice: plan.stand_in_nice,
        ..Ingest::new(&exchange)
    };
    let prefetch = plan.ingester_prefetch.to_string();
    let ingester = ingest
        .start(
            &exchange,
            ch,
            &[("TAILGATE_RABBITMQ__PREFETCH", prefetch.as_str())],
        )
        .await;
    let ingester_cpu0 = procfs::cpu(ingester.pid()).expect("ingester CPU");
    let stand_ins_nice: Vec<i32> = std::iter::once(ingester.pid())
        .chain(ch.pid())
        .map(|pid| procfs::nice(pid).expect("nice value"))
        .collect();

    let mut gateways: Vec<Tailgate> = Vec::new();
    for i in 0..n {
        // Seeds are every node started before: greetings make them known to each other.
        let seeds: Vec<String> = gateways.iter().map(|g| format!("\"{}\"", g.peer)).collect();
        let peers = [("TAILGATE_CLUSTER__PEERS", format!("[{}]", seeds.join(",")))];
        let env = gateway_env(plan, if i > 0 { &peers[..] } else { &[] });
        gateways.push(start_gateway(&exchange, &env));
    }
    let nodes: Vec<&Tailgate> = gateways.iter().collect();
    for node in &nodes {
        node.wait_metric("tailgate_cluster_peers", &[], n as f64)
            .await;
        node.wait_metric("tailgate_broker_connected", &[], 1.0)
            .await;
    }
    let patience = PATIENCE + plan.late_delay();

    // Capacity: as fast as the gateways accept, measured over a window
    // after the warm-up (one run, so the load does not pause in between).
    let run = loadgen::run(
        batches.to_vec(),
        Options {
            duration: plan.warm_up + plan.duration,
            ..options(plan, &nodes, None, 0)
        },
    );
    let window = async {
        tokio::time::sleep(plan.warm_up).await;
        let start = sample(&nodes).await;
        tokio::time::sleep(plan.duration).await;
        (start, sample(&nodes).await)
    };
    let (load, ((cpu0, received0), (cpu1, received1))) = tokio::join!(run, window);
    let offered = load.spans_accepted + load.spans_rejected;
    let kept = settle(&nodes, offered, patience).await.kept;
    // The latency phase starts once the ingester has written the capacity
    // phase's traces: while it catches up it competes for the same cores
    // and the broker is busy, which is not the steady state at half load.
    let count = format!("SELECT count() FROM {}.otel_traces", ingest.db);
    rows_at_least(ch, &count, kept).await;
    let decode_after = prost_decode(plan, requests).await;
    let capacity = Phase {
        spans: received1 - received0,
        rate: (received1 - received0) as f64 / plan.duration.as_secs_f64(),
        gateway_cpu: cpu1 - cpu0,
        load,
    };

    // Latency at half the measured capacity.
    let (publish, decision) = (
        "tailgate_traces_publish_latency_seconds",
        "tailgate_decision_latency_seconds",
    );
    let before = histogram(&nodes, publish).await;
    let decision_before = histogram(&nodes, decision).await;
    let confirm = "tailgate_broker_confirm_latency_seconds";
    let confirm_before = histogram(&nodes, confirm).await;
    let cpu0 = cpu(&nodes);
    let load = loadgen::run(
        batches.to_vec(),
        Options {
            duration: plan.latency_duration(),
            // Passes of their own: the capacity phase's traces are decided already.
            ..options(plan, &nodes, Some((capacity.rate / 2.0).max(1.0)), 1 << 32)
        },
    )
    .await;
    let offered = offered + load.spans_accepted + load.spans_rejected;
    let mut accounting = settle(&nodes, offered, patience).await;
    let half_load = Phase {
        spans: load.spans_accepted,
        rate: load.spans_accepted as f64 / plan.latency_duration().as_secs_f64(),
        gateway_cpu: cpu(&nodes) - cpu0,
        load,
    };
    let after = histogram(&nodes, publish).await;
    let decision_after = histogram(&nodes, decision).await;
    let confirm_after = histogram(&nodes, confirm).await;

    // Every kept span lands in ClickHouse exactly once.
    accounting.rows = rows_at_least(ch, &count, accounting.kept).await;
    let ingester_cpu = procfs::cpu(ingester.pid()).expect("ingester CPU") - ingester_cpu0;

    for g in gateways {
        g.terminate();
    }
    ingester.terminate();
    ingest.cleanup().await;
    broker::delete(&[], &[&exchange]).await;
    SetupReport {
        gateways: n,
        capacity,
        half_load,
        latency_p50: quantile(&before, &after, 0.5),
        latency_p99: quantile(&before, &after, 0.99),
        decision_p99: quantile(&decision_before, &decision_after, 0.99),
        confirm_p99: quantile(&confirm_before, &confirm_after, 0.99),
        accounting,
        ingester_cpu,
        prost_decode: [decode_before, decode_after],
        stand_ins_nice,
    }
}

/// One gateway that decides nothing for the length of the measurement:
/// resident memory before and after it buffers `plan.memory_spans` spans.
async fn run_memory(plan: &Plan) -> MemoryReport {
    let exchange = unique("bench-mem");
    let env = gateway_env(
        plan,
        &[
            ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "3600".into()),
            ("TAILGATE_BUFFER__TRACE_TIMEOUT_SECS", "7200".into()),
        ],
    );
    let gateway = start_gateway(&exchange, &env);
    let workload = Workload {
        late_share: 0.0,
        long_share: 0.0,
        giant_share: 0.0,
        ..plan.workload.clone()
    };
    let spans_per_trace = u64::from(workload.spans_per_trace);
    let rss_before = procfs::rss_bytes(gateway.pid()).expect("RSS");
    let load = loadgen::run(
        corpus(&workload, plan.batches),
        Options {
            duration: PATIENCE,
            max_spans: Some(plan.memory_spans),
            ..options(plan, &[&gateway], None, 0)
        },
    )
    .await;
    let traces = (load.spans_accepted / spans_per_trace) as f64;
    gateway
        .wait_metric("tailgate_buffer_traces", &[], traces)
        .await;
    let rss_after = procfs::rss_bytes(gateway.pid()).expect("RSS");
    let buffered_bytes = gateway.metric("tailgate_buffer_bytes", &[]).await as u64;
    gateway.kill();
    broker::delete(&[], &[&exchange]).await;
    MemoryReport {
        spans: load.spans_accepted,
        buffered_bytes,
        rss_before,
        rss_after,
    }
}

/// Runs the whole benchmark.
pub async fn run(plan: Plan) -> Report {
    let batches = corpus(&plan.workload, plan.batches);
    let requests: Arc<Vec<Encoded>> =
        Arc::new(batches.iter().flat_map(|b| b.requests.clone()).collect());
    let (bytes, spans) = requests.iter().fold((0u64, 0u64), |(b, s), r| {
        (b + r.body.len() as u64, s + r.spans)
    });

    let ch = ClickHouse::start_at_priority(plan.stand_in_nice);
    let mut setups = Vec::new();
    for &n in &plan.gateways {
        setups.push(run_setup(&plan, n, &ch, &batches, &requests).await);
    }
    let memory = run_memory(&plan).await;
    Report {
        machine: machine(),
        bytes_per_span: bytes as f64 / spans.max(1) as f64,
        setups,
        memory,
        plan,
    }
}

fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.plan;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "load: {:?} through {} connections, capacity for {} s after a {} s warm-up, latency for {} s, {} spans per trace, {:.0} B per span, decision_wait {} s",
            p.protocol,
            p.connections,
            p.duration.as_secs_f64(),
            p.warm_up.as_secs_f64(),
            p.latency_duration().as_secs_f64(),
            p.workload.spans_per_trace,
            self.bytes_per_span,
            p.decision_wait.as_secs_f64()
        )?;
        match &p.rules {
            Some(rules) => writeln!(f, "sampling: {}", rules.display())?,
            None => writeln!(f, "sampling: the built-in policy")?,
        }
        writeln!(
            f,
            "messages to RabbitMQ: {}",
            p.compression.content_encoding().unwrap_or("not compressed")
        )?;
        writeln!(
            f,
            "ingester and ClickHouse engine at nice {}; the ingester inserts up to {} messages at a time",
            p.stand_in_nice, p.ingester_prefetch
        )?;
        for (k, v) in &p.gateway_env {
            writeln!(f, "gateway setting: {k}={v}")?;
        }
        writeln!(
            f,
            "raw prost decode of the same payloads (one thread, spans per CPU-second): measured before each setup and after its capacity phase; × raw decode is against their mean\n"
        )?;
        writeln!(
            f,
            "| gateways | accepted spans/s | pushback | gateway CPU-s | spans per gateway CPU-s | raw decode before / after | × raw decode | p50 / p99 latency at 50% | p99 to decision / broker confirm | kept share | lost | ClickHouse rows | ingester rows per CPU-s |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for s in &self.setups {
            let a = &s.accounting;
            writeln!(
                f,
                "| {} | {} | {} | {:.2} | {} | {} / {} | {:.2} | {:.3} s / {:.3} s | {:.3} s / {:.3} s | {:.1}% | {} | {} of {} | {} |",
                s.gateways,
                si(s.capacity.rate),
                s.capacity.load.pushback() + s.half_load.load.pushback(),
                s.capacity.gateway_cpu.as_secs_f64(),
                si(s.spans_per_cpu_second()),
                si(s.prost_decode[0]),
                si(s.prost_decode[1]),
                s.ratio_to_raw_decode(),
                s.latency_p50,
                s.latency_p99,
                s.decision_p99,
                s.confirm_p99,
                100.0 * s.kept_share(),
                a.lost,
                a.rows,
                a.kept,
                si(s.ingester_rows_per_cpu_second()),
            )?;
        }
        writeln!(f)?;
        for s in &self.setups {
            let a = &s.accounting;
            writeln!(
                f,
                "{} gateway(s): accepted {} (gateways counted {}), kept {} ({:.0} bytes each in RabbitMQ), dropped {} {:?}, lost {}, abandoned by the client {}, late spans sent {}",
                s.gateways,
                a.accepted,
                a.received,
                a.kept,
                a.broker_bytes_per_kept_span(),
                a.dropped_total(),
                a.dropped,
                a.lost,
                s.capacity.load.spans_abandoned + s.half_load.load.spans_abandoned,
                s.capacity.load.late_spans_sent + s.half_load.load.late_spans_sent,
            )?;
        }
        let m = &self.memory;
        if m.spans == 0 {
            return writeln!(f, "\nmemory: not measured (--memory-spans 0)");
        }
        writeln!(
            f,
            "\nmemory: {} spans buffered ({} encoded bytes), RSS {} → {} bytes: {:.0} bytes per buffered span, {:.2} × the encoded OTLP bytes",
            m.spans,
            m.buffered_bytes,
            m.rss_before,
            m.rss_after,
            m.bytes_per_span(),
            m.ratio_to_encoded()
        )
    }
}
