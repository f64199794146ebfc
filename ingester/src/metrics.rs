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
    pub inserted_bytes: Counter,
    pub insert_failures: Counter,
    pub insert_retries: Counter,
    pub insert_duration: Histogram,
    pub batch_rows: Histogram,
    pub batch_messages: Histogram,
    pub broker_connected: Gauge,
    pub clickhouse_up: Gauge,
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
            inserted_bytes: Counter::default(),
            insert_failures: Counter::default(),
            insert_retries: Counter::default(),
            insert_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            batch_messages: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            broker_connected: Gauge::default(),
            clickhouse_up: Gauge::default(),
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
