//! The ClickHouse schema and `migrate`.
//!
//! The spans table follows the OpenTelemetry Collector's ClickHouse exporter
//! (`otel_traces`), so Grafana's ClickHouse plugin reads it unchanged, plus
//! Tailgate's columns: the sampling rule, the adjusted count, the retention
//! class and the message ID.
//!
//! Retention: the class is part of the partition key, so every part holds
//! rows of one day and one class, and a single `DELETE` TTL whose interval
//! depends on the class drops whole parts (`ttl_only_drop_parts`). (`DELETE
//! WHERE` TTL rules would never fire with `ttl_only_drop_parts`.) The
//! retention days live in the TTL expression, not in the rows, so changing
//! them and running `migrate` again (`MODIFY TTL`) applies to stored data too.

use crate::config::{IngesterConfig, Retention};

/// Table names derived from the configuration.
#[derive(Debug, Clone)]
pub struct Tables {
    pub database: String,
    /// The spans table's name without the database (the client inserts into its database).
    pub spans_name: String,
    /// `db.otel_traces`
    pub spans: String,
    /// `db.otel_traces_trace_id_ts`: first and last timestamp of each trace.
    pub trace_ids: String,
    /// `db.otel_traces_message_ids`: messages already stored, to skip duplicates.
    pub message_ids: String,
    /// `journey_events`, without the database.
    pub journey_events_name: String,
    /// `db.journey_events`: one row per span that carried a journey's key.
    pub journey_events: String,
    /// `db.journey_state`: each journey's latest state.
    pub journey_state: String,
}

impl Tables {
    pub fn new(cfg: &IngesterConfig) -> Self {
        let db = &cfg.clickhouse.database;
        let t = &cfg.clickhouse.table;
        Self {
            database: db.clone(),
            spans_name: t.clone(),
            spans: format!("{db}.{t}"),
            trace_ids: format!("{db}.{t}_trace_id_ts"),
            message_ids: format!("{db}.{t}_message_ids"),
            journey_events_name: "journey_events".into(),
            journey_events: format!("{db}.journey_events"),
            journey_state: format!("{db}.journey_state"),
        }
    }
}

/// `toIntervalDay(...)` of a row's retention.
fn retention_days(r: &Retention, class_column: &str) -> String {
    format!(
        "toIntervalDay(if({class_column} = 'long', {}, {}))",
        r.long_days, r.short_days
    )
}

/// The spans table's TTL: volume moves (only with a storage policy), then deletion by class.
pub fn spans_ttl(r: &Retention) -> String {
    let ts = "toDateTime(Timestamp)";
    let mut parts = Vec::new();
    if r.storage_policy.is_some() {
        parts.push(format!(
            "{ts} + toIntervalDay({}) TO VOLUME 'warm'",
            r.hot_days
        ));
        parts.push(format!(
            "{ts} + toIntervalDay({}) TO VOLUME 'cold'",
            r.warm_until_days
        ));
    }
    parts.push(format!("{ts} + {}", retention_days(r, "RetentionClass")));
    parts.join(",\n    ")
}

fn trace_ids_ttl(r: &Retention) -> String {
    format!("Start + {}", retention_days(r, "RetentionClass"))
}

/// The first statement of `migrate`. It must be sent without a database
/// context: ClickHouse sets the context before it parses the query, and
/// refuses one that names a missing database (code 81), even for this.
pub fn create_database(cfg: &IngesterConfig) -> String {
    format!(
        "CREATE DATABASE IF NOT EXISTS {}",
        Tables::new(cfg).database
    )
}

/// The statements of `migrate` after [`create_database`], in order, each
/// in the configured database. Each is idempotent; the last ones re-apply
/// the TTLs from the configuration.
pub fn statements(cfg: &IngesterConfig) -> Vec<String> {
    let t = Tables::new(cfg);
    let r = &cfg.retention;
    let policy = r
        .storage_policy
        .as_ref()
        .map_or_else(String::new, |p| format!(", storage_policy = '{p}'"));
    let dedup_days = cfg.clickhouse.dedup_window_days;
    let mut out = vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {spans} (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    SamplingRule LowCardinality(String) CODEC(ZSTD(1)),
    AdjustedCount Float64 CODEC(ZSTD(1)),
    RetentionClass LowCardinality(String) CODEC(ZSTD(1)),
    MessageId String CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY (toDate(Timestamp), RetentionClass)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
TTL {ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000{policy}",
            spans = t.spans,
            ttl = spans_ttl(r),
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {trace_ids} (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1)),
    RetentionClass LowCardinality(String) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY (toDate(Start), RetentionClass)
ORDER BY (TraceId, Start)
TTL {ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000",
            trace_ids = t.trace_ids,
            ttl = trace_ids_ttl(r),
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {trace_ids}_mv TO {trace_ids} AS
SELECT TraceId, min(toDateTime(Timestamp)) AS Start, max(toDateTime(Timestamp)) AS End, any(RetentionClass) AS RetentionClass
FROM {spans} WHERE TraceId != '' GROUP BY TraceId",
            trace_ids = t.trace_ids,
            spans = t.spans,
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ids} (
    MessageId String,
    Inserted DateTime DEFAULT now()
) ENGINE = MergeTree
ORDER BY MessageId
TTL Inserted + toIntervalDay({dedup_days})
SETTINGS non_replicated_deduplication_window = 10000",
            ids = t.message_ids,
        ),
        message_ids_view(&t, "mv", &t.spans),
        format!("ALTER TABLE {} MODIFY TTL {}", t.spans, spans_ttl(r)),
        format!("ALTER TABLE {} MODIFY TTL {}", t.trace_ids, trace_ids_ttl(r)),
    ];
    out.extend(journey_statements(cfg, &t));
    out
}

/// The view `<message_ids>_<suffix>` that records the message IDs of the
/// rows inserted into `source`, for the duplicate check.
fn message_ids_view(t: &Tables, suffix: &str, source: &str) -> String {
    format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {ids}_{suffix} TO {ids} AS
SELECT MessageId FROM {source} GROUP BY MessageId",
        ids = t.message_ids,
    )
}

/// `TTL` of the events table: by the day rows arrived, whole parts at a time.
fn events_ttl(cfg: &IngesterConfig) -> String {
    format!(
        "toDateTime(Ingested) + toIntervalDay({})",
        cfg.journeys.events_ttl_days
    )
}

fn state_ttl(cfg: &IngesterConfig) -> String {
    format!(
        "toDateTime(LastSeen) + toIntervalDay({})",
        cfg.journeys.state_ttl_days
    )
}

/// The journey tables (docs/journeys.md, "Tables").
///
/// - Events are partitioned by the day they arrived (`Ingested`, set by
///   ClickHouse), so the finder's "what arrived since my last look" reads
///   today's partition only, and ordered by journey and key, so a look-up
///   of one order reads one granule range per partition.
/// - The state table is an `AggregatingMergeTree` filled by a materialized
///   view: the latest status (by span time), the first time each status was
///   seen (so the time the latest one was entered), first and last seen,
///   and whether any span of it failed. Rows of one key merge in the
///   background; readers merge what is not merged yet (`GROUP BY`).
fn journey_statements(cfg: &IngesterConfig, t: &Tables) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {events} (
    Journey LowCardinality(String) CODEC(ZSTD(1)),
    Key String CODEC(ZSTD(1)),
    Status LowCardinality(String) CODEC(ZSTD(1)),
    Time DateTime64(9) CODEC(Delta, ZSTD(1)),
    Service LowCardinality(String) CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    Error UInt8,
    Kept UInt8,
    Rule LowCardinality(String) CODEC(ZSTD(1)),
    Captured Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    MessageId String CODEC(ZSTD(1)),
    Ingested DateTime64(3) DEFAULT now64(3) CODEC(Delta, ZSTD(1)),
    INDEX idx_ingested Ingested TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toYYYYMMDD(Ingested)
ORDER BY (Journey, Key, Time)
TTL {ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000",
            events = t.journey_events,
            ttl = events_ttl(cfg),
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {state} (
    Journey LowCardinality(String),
    Key String,
    LastStatus AggregateFunction(argMax, String, DateTime64(9)),
    StatusSince SimpleAggregateFunction(minMap, Tuple(Array(String), Array(Int64))),
    StatusTime SimpleAggregateFunction(max, DateTime64(9)),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9)),
    ErrorSeen SimpleAggregateFunction(max, UInt8),
    Events SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree
ORDER BY (Journey, Key)
TTL {ttl}",
            state = t.journey_state,
            ttl = state_ttl(cfg),
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {state}_mv TO {state} AS
SELECT Journey, Key,
    argMaxStateIf(Status, Time, Status != '') AS LastStatus,
    minMap(if(Status != '', ([Status], [toUnixTimestamp64Nano(Time)]), ([], []))) AS StatusSince,
    maxIf(Time, Status != '') AS StatusTime,
    min(Time) AS FirstSeen, max(Time) AS LastSeen, max(Error) AS ErrorSeen, count() AS Events
FROM {events} GROUP BY Journey, Key",
            state = t.journey_state,
            events = t.journey_events,
        ),
        message_ids_view(t, "journeys_mv", &t.journey_events),
        format!("ALTER TABLE {} MODIFY TTL {}", t.journey_events, events_ttl(cfg)),
        format!("ALTER TABLE {} MODIFY TTL {}", t.journey_state, state_ttl(cfg)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawIngesterConfig;
    use tailgate_contract::config::Validate;

    /// Without a storage policy there are no volume moves; with one, hot →
    /// warm → cold, then a single DELETE whose interval depends on the class.
    #[test]
    fn ttl_expressions() {
        let mut raw = RawIngesterConfig::default();
        let plain = spans_ttl(&raw.validate().unwrap().retention);
        assert_eq!(
            plain,
            "toDateTime(Timestamp) + toIntervalDay(if(RetentionClass = 'long', 90, 14))"
        );
        raw.retention.storage_policy = "tiered".into();
        let tiered = spans_ttl(&raw.validate().unwrap().retention);
        assert!(
            tiered.contains("toIntervalDay(3) TO VOLUME 'warm'"),
            "{tiered}"
        );
        assert!(
            tiered.contains("toIntervalDay(30) TO VOLUME 'cold'"),
            "{tiered}"
        );
        assert!(!tiered.contains("DELETE WHERE"));
    }

    /// The class is in the partition key of both retained tables, and
    /// migrate re-applies the configured TTLs.
    #[test]
    fn statements_are_idempotent_and_partitioned_by_class() {
        let s = statements(&RawIngesterConfig::default().validate().unwrap());
        assert!(s.iter().take(5).all(|q| q.contains("IF NOT EXISTS")));
        assert!(s[0].contains("PARTITION BY (toDate(Timestamp), RetentionClass)"));
        assert!(s[1].contains("PARTITION BY (toDate(Start), RetentionClass)"));
        assert!(s[0].contains("ttl_only_drop_parts = 1"));
        assert!(s[5].starts_with("ALTER TABLE tailgate.otel_traces MODIFY TTL"));
    }
}
