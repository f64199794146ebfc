//! Ingester configuration: deserialized into [`RawIngesterConfig`] (unknown
//! keys are errors, every key has a default; the `tailgate` binary loads it
//! with the same YAML-plus-`TAILGATE_<SECTION>__<KEY>` rules as the gateway's),
//! then checked by [`RawIngesterConfig::validate`] into [`IngesterConfig`].

use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, num::NonZeroU16, time::Duration};

#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidConfig {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> InvalidConfig {
    InvalidConfig {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngesterConfig {
    pub rabbitmq: RawRabbitmq,
    pub clickhouse: RawClickhouse,
    pub batch: RawBatch,
    pub retention: RawRetention,
    pub admin: RawAdmin,
    pub shutdown: RawShutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRabbitmq {
    pub url: String,
    /// The gateway's topic exchange.
    pub exchange: String,
    /// Durable quorum queue the ingester consumes.
    pub queue: String,
    pub binding_key: String,
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
            exchange: "tailgate.traces".into(),
            queue: "tailgate.ingest".into(),
            binding_key: "traces.#".into(),
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8889".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// After SIGTERM: longest wait for the insert in flight.
    pub grace_secs: u64,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self { grace_secs: 25 }
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
pub struct Clickhouse {
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    pub table: String,
    pub migrate_on_start: bool,
    pub max_backoff: Duration,
    pub dedup_window_days: NonZeroU16,
}

#[derive(Debug, Clone)]
pub struct IngesterConfig {
    pub rabbitmq: RawRabbitmq,
    pub clickhouse: Clickhouse,
    pub max_wait: Duration,
    pub retention: Retention,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
}

fn days(key: &'static str, v: u16) -> Result<NonZeroU16, InvalidConfig> {
    NonZeroU16::new(v).ok_or_else(|| invalid(key, "must be at least 1 day"))
}

/// Names that go into SQL unquoted must be plain identifiers.
fn identifier(key: &'static str, v: &str) -> Result<String, InvalidConfig> {
    let ok = !v.is_empty()
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(v.to_owned())
    } else {
        Err(invalid(key, format!("{v:?} must be letters, digits and _")))
    }
}

impl RawIngesterConfig {
    pub fn validate(&self) -> Result<IngesterConfig, InvalidConfig> {
        let r = &self.retention;
        let c = &self.clickhouse;
        let retention = Retention {
            hot_days: days("retention.hot_days", r.hot_days)?,
            warm_until_days: days("retention.warm_until_days", r.warm_until_days)?,
            storage_policy: (!r.storage_policy.is_empty())
                .then(|| identifier("retention.storage_policy", &r.storage_policy))
                .transpose()?,
            long_days: days("retention.long_days", r.long_days)?,
            short_days: days("retention.short_days", r.short_days)?,
            long_rules: r.long_rules.clone(),
            short_rules: r.short_rules.clone(),
        };
        if retention.warm_until_days <= retention.hot_days {
            return Err(invalid(
                "retention.warm_until_days",
                "must be later than retention.hot_days",
            ));
        }
        if self.rabbitmq.prefetch == 0 {
            return Err(invalid("rabbitmq.prefetch", "must be at least 1"));
        }
        let max_wait = Duration::try_from_secs_f64(self.batch.max_wait_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                invalid(
                    "batch.max_wait_secs",
                    "must be a positive number of seconds",
                )
            })?;
        Ok(IngesterConfig {
            rabbitmq: self.rabbitmq.clone(),
            clickhouse: Clickhouse {
                url: c.url.clone(),
                user: c.user.clone(),
                password: c.password.clone(),
                database: identifier("clickhouse.database", &c.database)?,
                table: identifier("clickhouse.table", &c.table)?,
                migrate_on_start: c.migrate_on_start,
                max_backoff: Duration::from_secs(c.max_backoff_secs.max(1)),
                dedup_window_days: days("clickhouse.dedup_window_days", c.dedup_window_days)?,
            },
            max_wait,
            retention,
            admin_listen: self
                .admin
                .listen
                .parse()
                .map_err(|e| invalid("admin.listen", format!("{:?}: {e}", self.admin.listen)))?,
            shutdown_grace: Duration::from_secs(self.shutdown.grace_secs),
        })
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
        assert_eq!(c.rabbitmq.prefetch, 256);
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
