//! Ingester configuration: deserialized into [`RawIngesterConfig`] and
//! loaded as every Tailgate file is ([`tailgate_contract::config`]), then
//! checked by its [`Validate`] impl into [`IngesterConfig`], with every
//! problem reported at once.

use serde::{Deserialize, Serialize};
use std::{num::NonZeroU16, time::Duration};
use tailgate_contract::{
    amqp::AmqpConfig,
    backoff::Backoff,
    config::{Admin, DefaultPort, Problems, RawAdmin, RawShutdown, Secret, Validate},
};

/// The ingester's admin port, 8889.
#[derive(Debug)]
pub enum AdminPort {}

impl DefaultPort for AdminPort {
    const PORT: u16 = 8889;
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngesterConfig {
    pub rabbitmq: RawRabbitmq,
    pub clickhouse: RawClickhouse,
    pub batch: RawBatch,
    pub retention: RawRetention,
    pub journeys: RawJourneys,
    pub admin: RawAdmin<AdminPort>,
    pub shutdown: RawShutdown,
}

/// Journey events and the stuck-journey finder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJourneys {
    /// The rules file whose `journeys` the finder follows (the gateways'
    /// file); empty: events are stored, but nothing looks for stuck ones.
    pub rules_file: String,
    /// How often the finder reads new events and re-reads the rules file.
    pub interval_secs: f64,
    /// Days journey events are kept.
    pub events_ttl_days: u16,
    /// Days a journey's latest state is kept after it was last seen.
    pub state_ttl_days: u16,
    /// A link to open a kept trace, `{trace_id}` replaced by its hex ID, e.g.
    /// `http://jaeger:16686/trace/{trace_id}`; empty: no link.
    pub trace_link: String,
}

impl Default for RawJourneys {
    fn default() -> Self {
        Self {
            rules_file: String::new(),
            interval_secs: 30.0,
            events_ttl_days: 30,
            state_ttl_days: 90,
            trace_link: String::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Journeys {
    pub rules_file: Option<std::path::PathBuf>,
    pub interval: Duration,
    pub events_ttl_days: NonZeroU16,
    pub state_ttl_days: NonZeroU16,
    pub trace_link: Option<String>,
}

impl Validate for RawJourneys {
    type Valid = Journeys;

    fn check(&self, p: &mut Problems) -> Journeys {
        let j = Journeys {
            rules_file: (!self.rules_file.is_empty()).then(|| self.rules_file.clone().into()),
            interval: p.secs_at_least(
                "journeys.interval_secs",
                self.interval_secs,
                Duration::from_millis(100),
            ),
            events_ttl_days: days(p, "journeys.events_ttl_days", self.events_ttl_days),
            state_ttl_days: days(p, "journeys.state_ttl_days", self.state_ttl_days),
            trace_link: (!self.trace_link.is_empty()).then(|| self.trace_link.clone()),
        };
        if j.state_ttl_days < j.events_ttl_days {
            p.add(
                "journeys.state_ttl_days",
                "must be at least journeys.events_ttl_days: a journey's state outlives its events",
            );
        }
        j
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRabbitmq {
    pub url: String,
    /// A file holding the AMQP URI (a mounted Secret); when set, it is
    /// used instead of `url`.
    pub url_file: String,
    /// The gateway's topic exchange.
    pub exchange: String,
    /// Durable quorum queue the ingester consumes.
    pub queue: String,
    pub binding_key: String,
    /// Binds the queue to journey events too; empty: not bound.
    pub journeys_binding_key: String,
    /// Undecodable messages (and ones past the delivery limit) go here.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Unacknowledged messages in flight: bounds memory, and a batch.
    pub prefetch: u16,
    /// Deliveries of one message before RabbitMQ dead-letters it.
    pub delivery_limit: u32,
    pub max_backoff_secs: u64,
}

impl Default for RawRabbitmq {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            url_file: String::new(),
            exchange: "tailgate.traces".into(),
            queue: "tailgate.ingest".into(),
            binding_key: tailgate_contract::message::ALL_TRACES.into(),
            journeys_binding_key: tailgate_contract::journey::ALL_JOURNEYS.into(),
            dead_letter_exchange: "tailgate.ingest.dlx".into(),
            dead_letter_queue: "tailgate.ingest.dlq".into(),
            prefetch: 256,
            delivery_limit: 20,
            max_backoff_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClickhouse {
    /// ClickHouse HTTP interface.
    pub url: String,
    pub user: String,
    pub password: String,
    /// A file holding the password (a mounted Secret); when set, it is
    /// used instead of `password`.
    pub password_file: String,
    pub database: String,
    /// Spans table; the trace lookup table and message-ID table take it as prefix.
    pub table: String,
    /// Run `migrate` at start.
    pub migrate_on_start: bool,
    /// Longest wait between insert retries.
    pub max_backoff_secs: u64,
    /// How long message IDs are remembered to skip duplicates (republished or redelivered).
    pub dedup_window_days: u16,
}

impl Default for RawClickhouse {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            user: "default".into(),
            password: String::new(),
            password_file: String::new(),
            database: "tailgate".into(),
            table: "otel_traces".into(),
            migrate_on_start: true,
            max_backoff_secs: 30,
            dedup_window_days: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatch {
    /// A batch is inserted after this long, or when `rabbitmq.prefetch` messages are in.
    pub max_wait_secs: f64,
}

impl Default for RawBatch {
    fn default() -> Self {
        Self { max_wait_secs: 1.0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetention {
    /// Days on the default (hot) volume.
    pub hot_days: u16,
    /// Days until data moves from the `warm` to the `cold` volume.
    pub warm_until_days: u16,
    /// A storage policy with volumes `warm` and `cold`; empty: no moves.
    pub storage_policy: String,
    /// Retention of the long class (errors, slow traces: kept with adjusted count 1).
    pub long_days: u16,
    /// Retention of the short class (sampled shares).
    pub short_days: u16,
    /// Rules whose traces are always long, or always short, whatever their adjusted count.
    pub long_rules: Vec<String>,
    pub short_rules: Vec<String>,
}

impl Default for RawRetention {
    fn default() -> Self {
        Self {
            hot_days: 3,
            warm_until_days: 30,
            storage_policy: String::new(),
            long_days: 90,
            short_days: 14,
            long_rules: Vec::new(),
            short_rules: Vec::new(),
        }
    }
}

/// Where spans are kept, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub hot_days: NonZeroU16,
    pub warm_until_days: NonZeroU16,
    pub storage_policy: Option<String>,
    pub long_days: NonZeroU16,
    pub short_days: NonZeroU16,
    pub long_rules: Vec<String>,
    pub short_rules: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Rabbitmq {
    pub amqp: AmqpConfig,
    pub exchange: String,
    pub queue: String,
    pub binding_key: String,
    pub journeys_binding_key: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub prefetch: NonZeroU16,
    pub delivery_limit: u32,
    /// Reconnects back off from [`Backoff::FIRST`] to `max_backoff_secs`.
    pub backoff: Backoff,
}

#[derive(Debug, Clone)]
pub struct Clickhouse {
    pub url: String,
    pub user: String,
    pub password: Secret,
    pub database: String,
    pub table: String,
    pub migrate_on_start: bool,
    /// Insert retries back off from [`Backoff::FIRST`] to `max_backoff_secs`.
    pub backoff: Backoff,
    pub dedup_window_days: NonZeroU16,
}

#[derive(Debug, Clone)]
pub struct IngesterConfig {
    pub rabbitmq: Rabbitmq,
    pub clickhouse: Clickhouse,
    pub max_wait: Duration,
    pub retention: Retention,
    pub journeys: Journeys,
    pub admin: Admin,
    pub shutdown_grace: Duration,
}

fn days(p: &mut Problems, key: &'static str, v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).unwrap_or_else(|| {
        p.add(key, "must be at least 1 day");
        NonZeroU16::MIN
    })
}

/// Names that go into SQL unquoted must be plain identifiers.
fn identifier(p: &mut Problems, key: &'static str, v: &str) -> String {
    let ok = !v.is_empty()
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        p.add(key, format!("{v:?} must be letters, digits and _"));
    }
    v.to_owned()
}

impl Validate for RawIngesterConfig {
    type Valid = IngesterConfig;

    fn check(&self, p: &mut Problems) -> IngesterConfig {
        IngesterConfig {
            rabbitmq: self.rabbitmq.check(p),
            clickhouse: self.clickhouse.check(p),
            max_wait: p.secs_at_least(
                "batch.max_wait_secs",
                self.batch.max_wait_secs,
                Duration::from_millis(1),
            ),
            retention: self.retention.check(p),
            journeys: self.journeys.check(p),
            admin: self.admin.check(p),
            shutdown_grace: self.shutdown.check(p),
        }
    }
}

impl Validate for RawRabbitmq {
    type Valid = Rabbitmq;

    fn check(&self, p: &mut Problems) -> Rabbitmq {
        let prefetch = NonZeroU16::new(self.prefetch).unwrap_or_else(|| {
            p.add("rabbitmq.prefetch", "must be at least 1");
            NonZeroU16::MIN
        });
        Rabbitmq {
            amqp: AmqpConfig::checked(p, &self.url, &self.url_file),
            exchange: self.exchange.clone(),
            queue: self.queue.clone(),
            binding_key: self.binding_key.clone(),
            journeys_binding_key: self.journeys_binding_key.clone(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            prefetch,
            delivery_limit: self.delivery_limit,
            backoff: p.backoff("rabbitmq.max_backoff_secs", self.max_backoff_secs),
        }
    }
}

impl Validate for RawClickhouse {
    type Valid = Clickhouse;

    fn check(&self, p: &mut Problems) -> Clickhouse {
        Clickhouse {
            url: self.url.clone(),
            user: self.user.clone(),
            password: p
                .secret_file("clickhouse.password_file", &self.password_file)
                .unwrap_or_else(|| Secret::new(self.password.clone())),
            database: identifier(p, "clickhouse.database", &self.database),
            table: identifier(p, "clickhouse.table", &self.table),
            migrate_on_start: self.migrate_on_start,
            backoff: p.backoff("clickhouse.max_backoff_secs", self.max_backoff_secs),
            dedup_window_days: days(p, "clickhouse.dedup_window_days", self.dedup_window_days),
        }
    }
}

impl Validate for RawRetention {
    type Valid = Retention;

    fn check(&self, p: &mut Problems) -> Retention {
        let retention = Retention {
            hot_days: days(p, "retention.hot_days", self.hot_days),
            warm_until_days: days(p, "retention.warm_until_days", self.warm_until_days),
            storage_policy: (!self.storage_policy.is_empty())
                .then(|| identifier(p, "retention.storage_policy", &self.storage_policy)),
            long_days: days(p, "retention.long_days", self.long_days),
            short_days: days(p, "retention.short_days", self.short_days),
            long_rules: self.long_rules.clone(),
            short_rules: self.short_rules.clone(),
        };
        if retention.warm_until_days <= retention.hot_days {
            p.add(
                "retention.warm_until_days",
                "must be later than retention.hot_days",
            );
        }
        retention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example parses and validates; the defaults are the documented ones.
    #[test]
    fn example_and_defaults() {
        let raw: RawIngesterConfig =
            serde_saphyr::from_str(include_str!("../../docs/examples/ingester.yaml")).unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.retention.long_days.get(), 90);
        assert_eq!(c.retention.short_days.get(), 14);
        assert_eq!(c.rabbitmq.prefetch.get(), 256);
        assert_eq!(c.clickhouse.table, "otel_traces");
        let d = RawIngesterConfig::default().validate().unwrap();
        assert_eq!(d.retention.storage_policy, None);
    }

    #[test]
    fn bad_values_are_named() {
        let mut raw = RawIngesterConfig::default();
        raw.clickhouse.table = "spans; DROP".into();
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("clickhouse.table")
        );
        let mut raw = RawIngesterConfig::default();
        raw.retention.warm_until_days = 2;
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("warm_until_days")
        );
        let err = serde_saphyr::from_str::<RawIngesterConfig>("retention:\n  long_dayz: 1\n")
            .unwrap_err();
        assert!(err.to_string().contains("long_dayz"));
    }
}
