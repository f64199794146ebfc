//! An ingester of a test's (or a benchmark run's) own: its queue, dead-letter
//! exchange and queue, and ClickHouse database, all named after the exchange.

use super::{
    amqp_url, broker,
    clickhouse::ClickHouse,
    gateway::Tailgate,
    otlp::{hex, trace_id},
};

/// Names of one run's ingest topology and database.
pub struct Ingest {
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
    pub db: String,
    /// CPU priority of the ingester process (0: normal).
    pub nice: i32,
}

impl Ingest {
    pub fn new(exchange: &str) -> Self {
        let db = format!(
            "t{}",
            hex(&trace_id(std::process::id().into(), exchange.len() as u64))[..12].to_owned()
        );
        let db = format!("{db}_{}", exchange.rsplit('.').next().unwrap_or("0"));
        Self {
            queue: format!("{exchange}.ingest"),
            dlx: format!("{exchange}.dlx"),
            dlq: format!("{exchange}.dlq"),
            db,
            nice: 0,
        }
    }

    /// `TAILGATE_*` settings of an ingester reading `exchange`, plus `extra`.
    pub fn env(
        &self,
        exchange: &str,
        ch: &ClickHouse,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("TAILGATE_RABBITMQ__URL", amqp_url()),
            ("TAILGATE_RABBITMQ__EXCHANGE", exchange.to_owned()),
            ("TAILGATE_RABBITMQ__QUEUE", self.queue.clone()),
            ("TAILGATE_RABBITMQ__DEAD_LETTER_EXCHANGE", self.dlx.clone()),
            ("TAILGATE_RABBITMQ__DEAD_LETTER_QUEUE", self.dlq.clone()),
            ("TAILGATE_CLICKHOUSE__URL", ch.url.clone()),
            ("TAILGATE_CLICKHOUSE__DATABASE", self.db.clone()),
            ("TAILGATE_BATCH__MAX_WAIT_SECS", "0.1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env
    }

    /// Starts an ingester and waits until it consumes (its queue topology exists).
    pub async fn start(&self, exchange: &str, ch: &ClickHouse, extra: &[(&str, &str)]) -> Tailgate {
        let env = self.env(exchange, ch, extra);
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ing = Tailgate::ingester_at_priority(&refs, self.nice);
        ing.wait_metric("tailgate_ingester_broker_connected", &[], 1.0)
            .await;
        ing
    }

    /// Deletes the queues and the dead-letter exchange (not the main exchange).
    pub async fn cleanup(&self) {
        broker::delete(&[&self.queue, &self.dlq], &[&self.dlx]).await;
    }
}
