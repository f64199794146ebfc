//! Gateway configuration.
//!
//! The YAML file is deserialized into [`RawConfig`] (unknown keys are
//! errors, every key has a default), `TAILGATE_<SECTION>__<KEY>` environment
//! variables are laid over it, and one pure function, [`RawConfig::validate`],
//! turns it into the runtime [`Config`] with checked types (`Duration`,
//! `NonZeroUsize`, `Probability`). Option names carry their unit.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::{net::SocketAddr, num::NonZeroUsize, path::Path, time::Duration};
pub use tailgate_ingester::compression::Compression;
use tailgate_sampling_rules::{Probability, ProbabilityError};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TAILGATE_";
/// Separates the section from the key in an override: `TAILGATE_BUFFER__MAX_BUFFER_BYTES`.
const ENV_SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub receiver: RawReceiver,
    pub buffer: RawBuffer,
    pub rules: RawRules,
    pub policy: RawPolicy,
    pub decision_cache: RawDecisionCache,
    pub rabbitmq: RawRabbitmq,
    pub cluster: RawCluster,
    pub admin: RawAdmin,
    pub shutdown: RawShutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCluster {
    /// Internal gRPC address for forwarding and handoff between nodes.
    pub listen: String,
    /// This node's address as peers reach it (its identity); default:
    /// `POD_IP` with the listen port, else the bound listen address.
    pub advertise: String,
    /// Seed peers, `host:port` of their internal port.
    pub peers: Vec<String>,
    /// A DNS name (`host:port`) whose addresses are all peers: a Kubernetes headless Service.
    pub dns: String,
    /// How often peers are greeted and DNS is resolved.
    pub refresh_secs: f64,
    /// A peer silent this long is dropped from the ring.
    pub peer_timeout_secs: f64,
    /// Bound on spans waiting to be delivered to peers.
    pub forward_max_bytes: usize,
    /// How often queued spans are delivered to each peer.
    pub forward_flush_secs: f64,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:4319".into(),
            advertise: String::new(),
            peers: Vec::new(),
            dns: String::new(),
            refresh_secs: 5.0,
            peer_timeout_secs: 15.0,
            forward_max_bytes: 64 << 20,
            forward_flush_secs: 0.05,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReceiver {
    /// OTLP/gRPC listen address.
    pub grpc_listen: String,
    /// OTLP/HTTP listen address.
    pub http_listen: String,
    /// Largest accepted request, after decompression.
    pub max_request_bytes: usize,
    /// Delay suggested to clients that are pushed back (`Retry-After`, `RetryInfo`).
    pub retry_after_secs: u64,
}

impl Default for RawReceiver {
    fn default() -> Self {
        Self {
            grpc_listen: "0.0.0.0:4317".into(),
            http_listen: "0.0.0.0:4318".into(),
            max_request_bytes: 16 << 20,
            retry_after_secs: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBuffer {
    /// How long to wait for late children after the root span arrived.
    pub decision_wait_secs: f64,
    /// Longest a trace is buffered after its first span, root or not.
    pub trace_timeout_secs: f64,
    /// A trace is decided at once when it holds more spans than this.
    pub max_spans_per_trace: usize,
    /// A trace is decided at once when its spans take more than this.
    pub max_trace_bytes: usize,
    /// Bound on all buffered spans (encoded OTLP size).
    pub max_buffer_bytes: usize,
}

impl Default for RawBuffer {
    fn default() -> Self {
        Self {
            decision_wait_secs: 2.0,
            trace_timeout_secs: 30.0,
            max_spans_per_trace: 10_000,
            max_trace_bytes: 8 << 20,
            max_buffer_bytes: 512 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRules {
    /// The sampling rules file; without one, the `policy` section applies.
    pub file: Option<String>,
    /// How often the file is checked for changes (a changed file is
    /// validated and swapped in; a broken one is refused).
    pub check_interval_secs: f64,
}

impl Default for RawRules {
    fn default() -> Self {
        Self {
            file: None,
            check_interval_secs: 5.0,
        }
    }
}

/// The built-in policy, used when no rules file is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    /// Traces at least this long (latest end − earliest start) are kept.
    pub slow_threshold_secs: f64,
    /// Share of the remaining traces kept, decided from the trace ID.
    pub random_share: f64,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            slow_threshold_secs: 1.0,
            random_share: 0.05,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDecisionCache {
    /// How long a decision is remembered for late spans.
    pub ttl_secs: u64,
    /// Bound on remembered decisions; the oldest are forgotten first.
    pub max_entries: usize,
}

impl Default for RawDecisionCache {
    fn default() -> Self {
        Self {
            ttl_secs: 300,
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRabbitmq {
    /// AMQP URI; the virtual host is URL-encoded (`%2f` is `/`).
    pub url: String,
    /// Durable topic exchange that kept traces are published to.
    pub exchange: String,
    /// Bound on kept traces waiting for a publisher confirm.
    pub outbox_max_bytes: usize,
    /// Most messages awaiting a publisher confirm at once. The broker
    /// confirms after its next disk sync, tens of milliseconds; a window
    /// smaller than the kept traces of that long makes the publisher send
    /// a few messages per confirm, each batch a hand-off to lapin's I/O
    /// thread (see docs/performance.md, "Fixes").
    pub max_in_flight: usize,
    /// A confirm not received within this is treated as a lost connection.
    pub confirm_timeout_secs: u64,
    /// Longest wait between reconnect or republish attempts.
    pub max_backoff_secs: u64,
    /// How kept traces are compressed for the broker: `lz4`, `zstd` or `none`.
    pub compression: Compression,
}

impl Default for RawRabbitmq {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "tailgate.traces".into(),
            outbox_max_bytes: 256 << 20,
            max_in_flight: 4096,
            confirm_timeout_secs: 30,
            max_backoff_secs: 10,
            compression: Compression::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8888".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// After SIGTERM: longest wait for the outbox to drain before exiting.
    pub grace_secs: u64,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self { grace_secs: 25 }
    }
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub receiver: Receiver,
    pub buffer: Buffer,
    pub rules: RulesFile,
    pub policy: Policy,
    pub decision_cache: DecisionCache,
    pub rabbitmq: Rabbitmq,
    pub cluster: Cluster,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct Receiver {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub max_request_bytes: NonZeroUsize,
    pub retry_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Buffer {
    pub decision_wait: Duration,
    pub trace_timeout: Duration,
    pub max_spans_per_trace: NonZeroUsize,
    pub max_trace_bytes: NonZeroUsize,
    pub max_buffer_bytes: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub peers: Vec<String>,
    pub dns: Option<String>,
    pub refresh: Duration,
    pub peer_timeout: Duration,
    pub forward_max_bytes: NonZeroUsize,
    pub forward_flush: Duration,
}

#[derive(Debug, Clone)]
pub struct RulesFile {
    pub file: Option<std::path::PathBuf>,
    pub check_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub slow_threshold: Duration,
    pub random_share: Probability,
}

#[derive(Debug, Clone)]
pub struct DecisionCache {
    pub ttl: Duration,
    pub max_entries: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct Rabbitmq {
    pub url: String,
    pub exchange: String,
    pub outbox_max_bytes: NonZeroUsize,
    pub max_in_flight: NonZeroUsize,
    pub confirm_timeout: Duration,
    pub max_backoff: Duration,
    pub compression: Compression,
}

/// Loading for any configuration file of Tailgate (the gateway's, the
/// ingester's): YAML with every key defaulted, then environment overrides.
pub trait ConfigFile: Serialize + DeserializeOwned + Default {
    /// Reads `path` (or the defaults when `None`) and applies the overrides
    /// in `env`, which is `std::env::vars()` in production.
    fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let raw = match path {
            None => Self::default(),
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: shown.clone(),
                    source,
                })?;
                Self::from_yaml(&text).map_err(|message| ConfigError::Parse {
                    path: shown,
                    message,
                })?
            }
        };
        raw.with_env_overrides(env)
    }

    /// Parses YAML; the error names the line and column.
    fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Lays `TAILGATE_<SECTION>__<KEY>=value` variables over the file.
    /// A value is read as the type the key already has, so `TAILGATE_RABBITMQ__EXCHANGE=123`
    /// stays a string; other `TAILGATE_*` variables (without `__`) are not configuration.
    fn with_env_overrides(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains(ENV_SEPARATOR))
            .collect();
        if overrides.is_empty() {
            return Ok(self);
        }
        overrides.sort();
        let env_err = |var: &str, message: String| ConfigError::Env {
            var: var.to_owned(),
            message,
        };
        let mut tree = serde_json::to_value(&self).map_err(|e| env_err("*", e.to_string()))?;
        for (var, value) in &overrides {
            let path = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            let Some((section, key)) = path.split_once(ENV_SEPARATOR) else {
                continue;
            };
            let slot = tree
                .get_mut(section)
                .and_then(|s| s.get_mut(key))
                .ok_or_else(|| env_err(var, format!("no configuration key {section}.{key}")))?;
            *slot = match slot {
                serde_json::Value::String(_) => serde_json::Value::String(value.clone()),
                // An unset optional key: a number or boolean if it reads as one, else text.
                serde_json::Value::Null => serde_json::from_str(value)
                    .unwrap_or_else(|_| serde_json::Value::String(value.clone())),
                _ => serde_json::from_str(value)
                    .map_err(|e| env_err(var, format!("cannot read {value:?}: {e}")))?,
            };
        }
        serde_json::from_value(tree).map_err(|e| env_err("TAILGATE_*", e.to_string()))
    }
}

impl<T: Serialize + DeserializeOwned + Default> ConfigFile for T {}

impl RawConfig {
    /// Checks every value and converts it to its runtime type.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let r = &self.receiver;
        let b = &self.buffer;
        let q = &self.rabbitmq;
        let decision_wait = secs("buffer.decision_wait_secs", b.decision_wait_secs)?;
        let trace_timeout = secs("buffer.trace_timeout_secs", b.trace_timeout_secs)?;
        if trace_timeout < decision_wait {
            return Err(invalid(
                "buffer.trace_timeout_secs",
                "must not be shorter than buffer.decision_wait_secs",
            ));
        }
        if r.max_request_bytes > b.max_buffer_bytes {
            return Err(invalid(
                "receiver.max_request_bytes",
                "must not exceed buffer.max_buffer_bytes, or such a request could never be admitted",
            ));
        }
        if q.exchange.is_empty() {
            return Err(invalid(
                "rabbitmq.exchange",
                "must name an exchange (the default exchange cannot be a topic exchange)",
            ));
        }
        Ok(Config {
            receiver: Receiver {
                grpc_listen: addr("receiver.grpc_listen", &r.grpc_listen)?,
                http_listen: addr("receiver.http_listen", &r.http_listen)?,
                max_request_bytes: nonzero("receiver.max_request_bytes", r.max_request_bytes)?,
                retry_after: Duration::from_secs(r.retry_after_secs.max(1)),
            },
            buffer: Buffer {
                decision_wait,
                trace_timeout,
                max_spans_per_trace: nonzero("buffer.max_spans_per_trace", b.max_spans_per_trace)?,
                max_trace_bytes: nonzero("buffer.max_trace_bytes", b.max_trace_bytes)?,
                max_buffer_bytes: nonzero("buffer.max_buffer_bytes", b.max_buffer_bytes)?,
            },
            rules: RulesFile {
                file: self
                    .rules
                    .file
                    .as_deref()
                    .filter(|f| !f.is_empty())
                    .map(std::path::PathBuf::from),
                check_interval: secs("rules.check_interval_secs", self.rules.check_interval_secs)?
                    .max(Duration::from_millis(10)),
            },
            policy: Policy {
                slow_threshold: secs(
                    "policy.slow_threshold_secs",
                    self.policy.slow_threshold_secs,
                )?,
                random_share: Probability::new(self.policy.random_share).map_err(
                    |ProbabilityError(p)| {
                        invalid(
                            "policy.random_share",
                            format!("must be from 0 to 1, got {p}"),
                        )
                    },
                )?,
            },
            decision_cache: DecisionCache {
                ttl: Duration::from_secs(self.decision_cache.ttl_secs),
                max_entries: nonzero(
                    "decision_cache.max_entries",
                    self.decision_cache.max_entries,
                )?,
            },
            rabbitmq: Rabbitmq {
                url: q.url.clone(),
                exchange: q.exchange.clone(),
                outbox_max_bytes: nonzero("rabbitmq.outbox_max_bytes", q.outbox_max_bytes)?,
                max_in_flight: nonzero("rabbitmq.max_in_flight", q.max_in_flight)?,
                confirm_timeout: Duration::from_secs(q.confirm_timeout_secs.max(1)),
                max_backoff: Duration::from_secs(q.max_backoff_secs.max(1)),
                compression: q.compression,
            },
            cluster: {
                let c = &self.cluster;
                let refresh =
                    secs("cluster.refresh_secs", c.refresh_secs)?.max(Duration::from_millis(10));
                let peer_timeout = secs("cluster.peer_timeout_secs", c.peer_timeout_secs)?;
                if peer_timeout <= refresh {
                    return Err(invalid(
                        "cluster.peer_timeout_secs",
                        "must be longer than cluster.refresh_secs, or live peers would be dropped between greetings",
                    ));
                }
                Cluster {
                    listen: addr("cluster.listen", &c.listen)?,
                    advertise: (!c.advertise.is_empty()).then(|| c.advertise.clone()),
                    peers: c.peers.clone(),
                    dns: (!c.dns.is_empty()).then(|| c.dns.clone()),
                    refresh,
                    peer_timeout,
                    forward_max_bytes: nonzero("cluster.forward_max_bytes", c.forward_max_bytes)?,
                    forward_flush: secs("cluster.forward_flush_secs", c.forward_flush_secs)?
                        .max(Duration::from_millis(1)),
                }
            },
            admin_listen: addr("admin.listen", &self.admin.listen)?,
            shutdown_grace: Duration::from_secs(self.shutdown.grace_secs),
        })
    }
}

fn secs(key: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        invalid(
            key,
            format!("must be a non-negative number of seconds, got {value}"),
        )
    })
}

fn nonzero(key: &'static str, value: usize) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(value).ok_or_else(|| invalid(key, "must be greater than 0"))
}

fn addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|e| invalid(key, format!("{value:?} is not an address:port ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// No file at all gives a valid configuration with the documented defaults.
    #[test]
    fn defaults_are_valid() {
        let c = RawConfig::load(None, env(&[])).unwrap().validate().unwrap();
        assert_eq!(c.buffer.decision_wait, Duration::from_secs(2));
        assert_eq!(c.buffer.trace_timeout, Duration::from_secs(30));
        assert_eq!(c.buffer.max_buffer_bytes.get(), 512 << 20);
        assert_eq!(c.receiver.max_request_bytes.get(), 16 << 20);
        assert_eq!(c.rabbitmq.exchange, "tailgate.traces");
        assert_eq!(c.rabbitmq.compression, Compression::Lz4);
        assert_eq!(c.decision_cache.ttl, Duration::from_secs(300));
        assert_eq!(c.receiver.grpc_listen.port(), 4317);
        assert_eq!(c.admin_listen.port(), 8888);
    }

    /// The example configuration shipped in the docs parses and validates.
    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../docs/examples/gateway.yaml");
        let c = RawConfig::from_yaml(text).unwrap().validate().unwrap();
        assert_eq!(c.buffer.decision_wait, Duration::from_secs(2));
        assert_eq!(c.rabbitmq.compression, Compression::default());
    }

    /// A misspelt key is an error that names it and where it is.
    #[test]
    fn unknown_key_is_located() {
        let err = RawConfig::from_yaml("buffer:\n  decision_wait_sec: 2\n").unwrap_err();
        assert!(err.contains("decision_wait_sec"), "{err}");
        assert!(err.contains('2'), "no line number in {err}");
    }

    /// Environment variables override the file, typed by the key they replace;
    /// variables without `__` are not configuration.
    #[test]
    fn env_overrides() {
        let raw = RawConfig::from_yaml("buffer:\n  decision_wait_secs: 5\n")
            .unwrap()
            .with_env_overrides(env(&[
                ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "0.25"),
                ("TAILGATE_RABBITMQ__EXCHANGE", "123"),
                ("TAILGATE_TEST_SOMETHING", "ignored"),
                ("PATH", "/bin"),
            ]))
            .unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.buffer.decision_wait, Duration::from_millis(250));
        assert_eq!(c.rabbitmq.exchange, "123");
        let c = RawConfig::default()
            .with_env_overrides(env(&[("TAILGATE_RULES__FILE", "/etc/tailgate/rules.yaml")]))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            c.rules.file.unwrap().to_str(),
            Some("/etc/tailgate/rules.yaml")
        );
    }

    /// Compression is chosen by name, in the file or the environment; an
    /// unknown name is an error that lists the known ones.
    #[test]
    fn compression_by_name() {
        let c = RawConfig::from_yaml("rabbitmq:\n  compression: zstd\n")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.rabbitmq.compression, Compression::Zstd);
        let c = RawConfig::default()
            .with_env_overrides(env(&[("TAILGATE_RABBITMQ__COMPRESSION", "none")]))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.rabbitmq.compression, Compression::None);
        let err = RawConfig::from_yaml("rabbitmq:\n  compression: gzip\n").unwrap_err();
        assert!(err.contains("gzip") && err.contains("zstd"), "{err}");
    }

    #[test]
    fn env_override_errors_name_the_variable() {
        let err = RawConfig::default()
            .with_env_overrides(env(&[("TAILGATE_BUFFER__NOPE", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("TAILGATE_BUFFER__NOPE"), "{err}");
        let err = RawConfig::default()
            .with_env_overrides(env(&[("TAILGATE_BUFFER__MAX_BUFFER_BYTES", "lots")]))
            .unwrap_err();
        assert!(err.to_string().contains("lots"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let mut raw = RawConfig::default();
        raw.policy.random_share = 1.5;
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.random_share")
        );
        let mut raw = RawConfig::default();
        raw.buffer.trace_timeout_secs = 1.0;
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("trace_timeout")
        );
        let mut raw = RawConfig::default();
        raw.receiver.grpc_listen = "nowhere".into();
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("receiver.grpc_listen")
        );
        let mut raw = RawConfig::default();
        raw.receiver.max_request_bytes = 2 << 30;
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("max_request_bytes")
        );
        let mut raw = RawConfig::default();
        raw.buffer.max_buffer_bytes = 0;
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("max_buffer_bytes")
        );
    }
}
