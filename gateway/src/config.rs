//! Gateway configuration.
//!
//! The YAML file is deserialized into [`RawConfig`] and loaded as every
//! Tailgate file is ([`tailgate_contract::config`]: unknown keys are
//! errors, every key has a default, `TAILGATE_<SECTION>__<KEY>` overrides).
//! Its [`Validate`] impl turns it into the runtime [`Config`] with checked
//! types (`Duration`, `NonZeroUsize`, `Probability`), reporting every
//! problem at once. Option names carry their unit.

use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, num::NonZeroUsize, time::Duration};
pub use tailgate_contract::compression::Compression;
use tailgate_contract::listen::ConnectionLimits;
use tailgate_contract::{
    amqp::AmqpConfig,
    backoff::Backoff,
    config::{Admin, DefaultPort, Problems, RawAdmin, RawShutdown, Validate},
};
use tailgate_sampling_rules::{Probability, ProbabilityError};

/// The gateway's admin port, 8888.
#[derive(Debug)]
pub enum AdminPort {}

impl DefaultPort for AdminPort {
    const PORT: u16 = 8888;
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub receiver: RawReceiver,
    pub buffer: RawBuffer,
    pub rules: RawRules,
    pub policy: RawPolicy,
    pub decision_cache: RawDecisionCache,
    pub journeys: RawJourneys,
    pub rabbitmq: RawRabbitmq,
    pub cluster: RawCluster,
    pub admin: RawAdmin<AdminPort>,
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
    /// Most connections open at once, per port; more wait to be accepted.
    pub max_connections: usize,
    /// OTLP/HTTP: a request's headers must arrive within this; also how
    /// long a keep-alive connection may stay idle.
    pub header_read_timeout_secs: f64,
    /// A request's whole body must arrive within this (both protocols).
    pub body_read_timeout_secs: f64,
    /// HTTP/2 pings on a connection with no traffic this long.
    pub keepalive_interval_secs: f64,
    /// A connection whose peer does not answer a ping within this is closed.
    pub keepalive_timeout_secs: f64,
}

impl Default for RawReceiver {
    fn default() -> Self {
        Self {
            grpc_listen: "0.0.0.0:4317".into(),
            http_listen: "0.0.0.0:4318".into(),
            max_request_bytes: 16 << 20,
            retry_after_secs: 1,
            max_connections: 1024,
            header_read_timeout_secs: 30.0,
            body_read_timeout_secs: 30.0,
            keepalive_interval_secs: 30.0,
            keepalive_timeout_secs: 20.0,
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

/// How journey events (the `journeys` of the rules file) are batched.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJourneys {
    /// A journey's batch is published when it holds this many events...
    pub max_batch_events: usize,
    /// ...or when its oldest event has waited this long.
    pub flush_interval_secs: f64,
}

impl Default for RawJourneys {
    fn default() -> Self {
        Self {
            max_batch_events: 1000,
            flush_interval_secs: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRabbitmq {
    /// AMQP URI; the virtual host is URL-encoded (`%2f` is `/`).
    pub url: String,
    /// A file holding the AMQP URI (a mounted Secret); when set, it is
    /// used instead of `url`.
    pub url_file: String,
    /// Durable topic exchange that kept traces are published to.
    pub exchange: String,
    /// Bound on kept traces waiting for a publisher confirm.
    pub outbox_max_bytes: usize,
    /// Most messages awaiting a publisher confirm at once. The broker
    /// confirms after its next disk sync, tens of milliseconds; a window
    /// smaller than the kept traces of that long makes the publisher send
    /// a few messages per confirm, each batch a hand-off to lapin's I/O
    /// thread (see docs/performance-log.md, "Fixes").
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
            url_file: String::new(),
            exchange: "tailgate.traces".into(),
            outbox_max_bytes: 256 << 20,
            max_in_flight: 4096,
            confirm_timeout_secs: 30,
            max_backoff_secs: 10,
            compression: Compression::default(),
        }
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
    pub journeys: Journeys,
    pub rabbitmq: Rabbitmq,
    pub cluster: Cluster,
    pub admin: Admin,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct Receiver {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub max_request_bytes: NonZeroUsize,
    pub retry_after: Duration,
    pub connections: ConnectionLimits,
    pub body_read_timeout: Duration,
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
    pub amqp: AmqpConfig,
    pub exchange: String,
    pub outbox_max_bytes: NonZeroUsize,
    pub max_in_flight: NonZeroUsize,
    pub confirm_timeout: Duration,
    /// Reconnects and republishes back off from [`Backoff::FIRST`] to `max_backoff_secs`.
    pub backoff: Backoff,
    pub compression: Compression,
}

impl Validate for RawConfig {
    type Valid = Config;

    fn check(&self, p: &mut Problems) -> Config {
        Config {
            receiver: self.receiver.check(p),
            buffer: self.buffer.check(p),
            rules: self.rules.check(p),
            policy: self.policy.check(p),
            decision_cache: self.decision_cache.check(p),
            journeys: self.journeys.check(p),
            rabbitmq: self.rabbitmq.check(p),
            cluster: self.cluster.check(p),
            admin: self.admin.check(p),
            shutdown_grace: self.shutdown.check(p),
        }
        .cross_checked(p)
    }
}

impl Config {
    /// The checks that span sections.
    fn cross_checked(self, p: &mut Problems) -> Self {
        if self.receiver.max_request_bytes > self.buffer.max_buffer_bytes {
            p.add(
                "receiver.max_request_bytes",
                "must not exceed buffer.max_buffer_bytes, or such a request could never be admitted",
            );
        }
        self
    }
}

/// Shorter timeouts would cut ordinary clients on a busy network.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);

impl Validate for RawReceiver {
    type Valid = Receiver;

    fn check(&self, p: &mut Problems) -> Receiver {
        Receiver {
            grpc_listen: p.addr("receiver.grpc_listen", &self.grpc_listen),
            http_listen: p.addr("receiver.http_listen", &self.http_listen),
            max_request_bytes: p.nonzero("receiver.max_request_bytes", self.max_request_bytes),
            retry_after: p.whole_secs_at_least(
                "receiver.retry_after_secs",
                self.retry_after_secs,
                1,
            ),
            connections: ConnectionLimits {
                max_connections: p
                    .nonzero("receiver.max_connections", self.max_connections)
                    .get(),
                header_read_timeout: p.secs_at_least(
                    "receiver.header_read_timeout_secs",
                    self.header_read_timeout_secs,
                    MIN_TIMEOUT,
                ),
                keepalive_interval: p.secs_at_least(
                    "receiver.keepalive_interval_secs",
                    self.keepalive_interval_secs,
                    MIN_TIMEOUT,
                ),
                keepalive_timeout: p.secs_at_least(
                    "receiver.keepalive_timeout_secs",
                    self.keepalive_timeout_secs,
                    MIN_TIMEOUT,
                ),
            },
            body_read_timeout: p.secs_at_least(
                "receiver.body_read_timeout_secs",
                self.body_read_timeout_secs,
                MIN_TIMEOUT,
            ),
        }
    }
}

impl Validate for RawBuffer {
    type Valid = Buffer;

    fn check(&self, p: &mut Problems) -> Buffer {
        let decision_wait = p.secs("buffer.decision_wait_secs", self.decision_wait_secs);
        let trace_timeout = p.secs("buffer.trace_timeout_secs", self.trace_timeout_secs);
        if trace_timeout < decision_wait {
            p.add(
                "buffer.trace_timeout_secs",
                "must not be shorter than buffer.decision_wait_secs",
            );
        }
        Buffer {
            decision_wait,
            trace_timeout,
            max_spans_per_trace: p.nonzero("buffer.max_spans_per_trace", self.max_spans_per_trace),
            max_trace_bytes: p.nonzero("buffer.max_trace_bytes", self.max_trace_bytes),
            max_buffer_bytes: p.nonzero("buffer.max_buffer_bytes", self.max_buffer_bytes),
        }
    }
}

impl Validate for RawRules {
    type Valid = RulesFile;

    fn check(&self, p: &mut Problems) -> RulesFile {
        RulesFile {
            file: self
                .file
                .as_deref()
                .filter(|f| !f.is_empty())
                .map(std::path::PathBuf::from),
            check_interval: p.secs_at_least(
                "rules.check_interval_secs",
                self.check_interval_secs,
                Duration::from_millis(10),
            ),
        }
    }
}

impl Validate for RawPolicy {
    type Valid = Policy;

    fn check(&self, p: &mut Problems) -> Policy {
        let share = Probability::new(self.random_share)
            .map_err(|ProbabilityError(v)| format!("must be from 0 to 1, got {v}"));
        Policy {
            slow_threshold: p.secs("policy.slow_threshold_secs", self.slow_threshold_secs),
            random_share: p
                .check("policy.random_share", share)
                .unwrap_or(Probability::ALWAYS),
        }
    }
}

impl Validate for RawDecisionCache {
    type Valid = DecisionCache;

    fn check(&self, p: &mut Problems) -> DecisionCache {
        DecisionCache {
            ttl: Duration::from_secs(self.ttl_secs),
            max_entries: p.nonzero("decision_cache.max_entries", self.max_entries),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Journeys {
    pub max_batch_events: NonZeroUsize,
    pub flush_interval: Duration,
}

impl Validate for RawJourneys {
    type Valid = Journeys;

    fn check(&self, p: &mut Problems) -> Journeys {
        Journeys {
            max_batch_events: p.nonzero("journeys.max_batch_events", self.max_batch_events),
            flush_interval: p.secs_at_least(
                "journeys.flush_interval_secs",
                self.flush_interval_secs,
                Duration::from_millis(10),
            ),
        }
    }
}

impl Validate for RawRabbitmq {
    type Valid = Rabbitmq;

    fn check(&self, p: &mut Problems) -> Rabbitmq {
        if self.exchange.is_empty() {
            p.add(
                "rabbitmq.exchange",
                "must name an exchange (the default exchange cannot be a topic exchange)",
            );
        }
        Rabbitmq {
            amqp: AmqpConfig::checked(p, &self.url, &self.url_file),
            exchange: self.exchange.clone(),
            outbox_max_bytes: p.nonzero("rabbitmq.outbox_max_bytes", self.outbox_max_bytes),
            max_in_flight: p.nonzero("rabbitmq.max_in_flight", self.max_in_flight),
            confirm_timeout: p.whole_secs_at_least(
                "rabbitmq.confirm_timeout_secs",
                self.confirm_timeout_secs,
                1,
            ),
            backoff: p.backoff("rabbitmq.max_backoff_secs", self.max_backoff_secs),
            compression: self.compression,
        }
    }
}

impl Validate for RawCluster {
    type Valid = Cluster;

    fn check(&self, p: &mut Problems) -> Cluster {
        let refresh = p.secs_at_least(
            "cluster.refresh_secs",
            self.refresh_secs,
            Duration::from_millis(10),
        );
        let peer_timeout = p.secs("cluster.peer_timeout_secs", self.peer_timeout_secs);
        if peer_timeout <= refresh {
            p.add(
                "cluster.peer_timeout_secs",
                "must be longer than cluster.refresh_secs, or live peers would be dropped between greetings",
            );
        }
        Cluster {
            listen: p.addr("cluster.listen", &self.listen),
            advertise: (!self.advertise.is_empty()).then(|| self.advertise.clone()),
            peers: self.peers.clone(),
            dns: (!self.dns.is_empty()).then(|| self.dns.clone()),
            refresh,
            peer_timeout,
            forward_max_bytes: p.nonzero("cluster.forward_max_bytes", self.forward_max_bytes),
            forward_flush: p.secs_at_least(
                "cluster.forward_flush_secs",
                self.forward_flush_secs,
                Duration::from_millis(1),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_contract::config::ConfigFile;

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
        assert_eq!(c.admin.listen.port(), 8888);
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
