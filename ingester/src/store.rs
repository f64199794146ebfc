//! ClickHouse: migrate, and idempotent batch inserts.
//!
//! A batch holds the rows of up to `prefetch` messages. Two things make
//! storing it at-least-once without duplicates:
//!
//! 1. Before inserting, the batch's message IDs are looked up in the
//!    message-ID table (filled by a materialized view from the spans table, in
//!    the same insert): messages already stored, because they were redelivered
//!    after a crash between insert and ack, or republished by a gateway that
//!    lost its broker connection before the confirm, are skipped; so are
//!    second copies within the batch itself.
//! 2. The insert carries `insert_deduplication_token` = a hash of its message
//!    IDs, so retrying an insert whose answer was lost is deduplicated by
//!    ClickHouse itself (also in the materialized views).

use crate::{
    config::IngesterConfig,
    rows::{EventRow, SpanRow},
    schema::{Tables, create_database, statements},
};
use clickhouse::Client;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Why a ClickHouse call failed. Every kind is retried: a row is never
/// dropped because ClickHouse is down or refusing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The cause is in the message, not a `source`, so a report of the
    // whole chain does not print it twice.
    #[error("ClickHouse: {0}")]
    Clickhouse(clickhouse::error::Error),
}

impl From<clickhouse::error::Error> for StoreError {
    fn from(e: clickhouse::error::Error) -> Self {
        Self::Clickhouse(e)
    }
}

#[derive(Clone)]
pub struct Store {
    /// Every statement but `CREATE DATABASE` runs in the configured database.
    client: Client,
    /// No database context: for `CREATE DATABASE` only.
    server: Client,
    tables: Tables,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("tables", &self.tables)
            .finish()
    }
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct StoredId {
    #[serde(rename = "MessageId")]
    message_id: String,
}

/// One message's rows, ready to store: span rows of a kept trace, or the
/// events of a journey events message.
#[derive(Debug)]
pub struct Pending {
    pub message_id: String,
    pub rows: Vec<SpanRow>,
    pub events: Vec<EventRow>,
}

/// What [`Store::insert`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub rows: usize,
    pub events: usize,
    /// Messages skipped because they were already stored.
    pub duplicates: usize,
}

fn sql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl Store {
    pub fn new(cfg: &IngesterConfig) -> Self {
        let c = &cfg.clickhouse;
        let server = Client::default()
            .with_url(&c.url)
            .with_user(&c.user)
            .with_password(c.password.expose())
            .with_compression(clickhouse::Compression::Lz4);
        Self {
            client: server.clone().with_database(&c.database),
            server,
            tables: Tables::new(cfg),
        }
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// A client in the configured database, for readers of the tables.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates or updates the schema; every statement is idempotent.
    pub async fn migrate(&self, cfg: &IngesterConfig) -> Result<(), StoreError> {
        self.server.query(&create_database(cfg)).execute().await?;
        for sql in statements(cfg) {
            self.client.query(&sql).execute().await?;
        }
        Ok(())
    }

    /// Answers when ClickHouse does.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client.query("SELECT 1").execute().await?;
        Ok(())
    }

    /// Stores a batch exactly once, however often it is retried or redelivered.
    pub async fn insert(&self, batch: &[Pending]) -> Result<Stored, StoreError> {
        if batch.is_empty() {
            return Ok(Stored::default());
        }
        let ids: Vec<String> = batch.iter().map(|p| sql_string(&p.message_id)).collect();
        let stored: HashSet<String> = self
            .client
            .query(&format!(
                "SELECT DISTINCT MessageId FROM {} WHERE MessageId IN ({})",
                self.tables.message_ids,
                ids.join(",")
            ))
            .fetch_all::<StoredId>()
            .await?
            .into_iter()
            .map(|s| s.message_id)
            .collect();
        // Both copies of a republished message can arrive in one batch (the
        // ingester lost its connection in the same broker cut and got them
        // together on redelivery): only the first is fresh.
        let mut in_batch: HashSet<&str> = HashSet::with_capacity(batch.len());
        let fresh: Vec<&Pending> = batch
            .iter()
            .filter(|p| !stored.contains(&p.message_id) && in_batch.insert(&p.message_id))
            .collect();
        let mut result = Stored {
            rows: 0,
            events: 0,
            duplicates: batch.len() - fresh.len(),
        };
        if fresh.is_empty() {
            return Ok(result);
        }
        let mut token = Sha256::new();
        for p in &fresh {
            token.update(p.message_id.as_bytes());
            token.update([0]);
        }
        let token = const_hex::encode(token.finalize());
        // Each table's insert has its own token: the message-ID table is
        // filled from both, and one token there would make the second
        // view's block look like a repeat of the first's.
        let client = |table: &str| {
            self.client
                .clone()
                .with_setting("insert_deduplication_token", format!("{token}-{table}"))
                .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1")
        };
        if fresh.iter().any(|p| !p.rows.is_empty()) {
            let mut insert = client("spans")
                .insert::<SpanRow>(&self.tables.spans_name)
                .await?;
            for row in fresh.iter().flat_map(|p| &p.rows) {
                insert.write(row).await?;
                result.rows += 1;
            }
            insert.end().await?;
        }
        if fresh.iter().any(|p| !p.events.is_empty()) {
            let mut insert = client("journeys")
                .insert::<EventRow>(&self.tables.journey_events_name)
                .await?;
            for row in fresh.iter().flat_map(|p| &p.events) {
                insert.write(row).await?;
                result.events += 1;
            }
            insert.end().await?;
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(sql_string("a'b\\c"), r"'a\'b\\c'");
    }
}
