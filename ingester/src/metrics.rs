//! Prometheus metrics of the ingester (`tailgate_ingester_*`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub consumed_messages: Counter,
    pub acked_messages: Counter,
    pub duplicate_messages: Counter,
    dead_lettered: Family<Reason, Counter>,
    pub inserted_rows: Counter,
    pub inserted_events: Counter,
    pub inserted_bytes: Counter,
    pub insert_failures: Counter,
    pub insert_retries: Counter,
    pub insert_duration: Histogram,
    pub batch_rows: Histogram,
    pub batch_messages: Histogram,
    pub broker_connected: Gauge,
    pub clickhouse_up: Gauge,
    pub journeys: JourneyMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JourneyStatus {
    pub journey: String,
    pub status: String,
}

/// What the stuck-journey finder sees at its last look.
#[derive(Debug, Default)]
pub struct JourneyMetrics {
    /// Open journeys past their status's limit.
    pub stuck: Family<JourneyStatus, Gauge>,
    /// How long the oldest stuck journey has been in its status.
    pub oldest_stuck_seconds: Family<JourneyStatus, Gauge>,
    /// Open (not terminal) journeys by their latest status.
    pub open: Family<JourneyStatus, Gauge>,
    pub checks: Counter,
    pub check_failures: Counter,
    pub last_check_seconds: Gauge,
    pub rules_reload_failures: Counter,
    /// Journeys the finder holds in memory (open, and recently finished).
    pub tracked: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        use prometheus_client::metrics::histogram::exponential_buckets;
        let mut m = Self {
            registry: Registry::default(),
            consumed_messages: Counter::default(),
            acked_messages: Counter::default(),
            duplicate_messages: Counter::default(),
            dead_lettered: Family::default(),
            inserted_rows: Counter::default(),
            inserted_events: Counter::default(),
            inserted_bytes: Counter::default(),
            insert_failures: Counter::default(),
            insert_retries: Counter::default(),
            insert_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            batch_messages: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            broker_connected: Gauge::default(),
            clickhouse_up: Gauge::default(),
            journeys: JourneyMetrics::default(),
        };
        let r = &mut m.registry;
        r.register(
            "tailgate_ingester_consumed_messages",
            "Messages received from the queue",
            m.consumed_messages.clone(),
        );
        r.register("tailgate_ingester_acked_messages", "Messages acknowledged after ClickHouse confirmed their rows (or they were dead-lettered)", m.acked_messages.clone());
        r.register(
            "tailgate_ingester_duplicate_messages",
            "Messages skipped because their rows were already stored (redelivered or republished)",
            m.duplicate_messages.clone(),
        );
        r.register(
            "tailgate_ingester_dead_lettered_messages",
            "Messages sent to the dead-letter queue, by reason",
            m.dead_lettered.clone(),
        );
        r.register(
            "tailgate_ingester_inserted_rows",
            "Span rows ClickHouse confirmed",
            m.inserted_rows.clone(),
        );
        r.register(
            "tailgate_ingester_inserted_journey_events",
            "Journey event rows ClickHouse confirmed",
            m.inserted_events.clone(),
        );
        r.register(
            "tailgate_ingester_inserted_bytes",
            "OTLP bytes of the messages whose rows ClickHouse confirmed",
            m.inserted_bytes.clone(),
        );
        r.register(
            "tailgate_ingester_insert_failures",
            "Failed insert attempts (each is retried)",
            m.insert_failures.clone(),
        );
        r.register(
            "tailgate_ingester_insert_retries",
            "Insert attempts after a failure",
            m.insert_retries.clone(),
        );
        r.register(
            "tailgate_ingester_insert_duration_seconds",
            "Time of one successful insert",
            m.insert_duration.clone(),
        );
        r.register(
            "tailgate_ingester_batch_rows",
            "Rows per insert",
            m.batch_rows.clone(),
        );
        r.register(
            "tailgate_ingester_batch_messages",
            "Messages per insert",
            m.batch_messages.clone(),
        );
        r.register(
            "tailgate_ingester_broker_connected",
            "1 while consuming from RabbitMQ",
            m.broker_connected.clone(),
        );
        r.register(
            "tailgate_ingester_clickhouse_up",
            "1 when the last ClickHouse call succeeded",
            m.clickhouse_up.clone(),
        );
        let j = &m.journeys;
        r.register(
            "tailgate_journeys_stuck",
            "Open journeys whose latest status has lasted longer than its max_time_in_status",
            j.stuck.clone(),
        );
        r.register(
            "tailgate_journeys_oldest_stuck_seconds",
            "Time the oldest stuck journey has spent in its status",
            j.oldest_stuck_seconds.clone(),
        );
        r.register(
            "tailgate_journeys_open",
            "Open (not terminal) journeys by latest status",
            j.open.clone(),
        );
        r.register(
            "tailgate_journeys_checks",
            "Looks at new journey events by the stuck-journey finder",
            j.checks.clone(),
        );
        r.register(
            "tailgate_journeys_check_failures",
            "Looks that failed (ClickHouse unreachable or refusing); the gauges keep their last values",
            j.check_failures.clone(),
        );
        r.register(
            "tailgate_journeys_last_check_timestamp_seconds",
            "Unix time of the last successful look",
            j.last_check_seconds.clone(),
        );
        r.register(
            "tailgate_journeys_rules_reload_failures",
            "Changed rules files the finder refused as invalid (the previous journeys stay in force)",
            j.rules_reload_failures.clone(),
        );
        r.register(
            "tailgate_journeys_tracked",
            "Journeys the finder holds in memory: open ones, and finished ones for an hour",
            j.tracked.clone(),
        );
        m
    }

    pub fn dead_lettered(&self, reason: &'static str) {
        self.dead_lettered.get_or_create(&Reason { reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
