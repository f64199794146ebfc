//! The Tailgate ingester: kept traces from the RabbitMQ topic into
//! ClickHouse, at least once and without duplicates, aged through
//! retention tiers.
//!
//! A message's path: [`consume`] (queue topology, batches, acks, the body
//! as the gateway packed it) → [`rows`] (OTLP into span rows) → [`store`]
//! (idempotent inserts). Journey events take the same path into their own
//! tables, and [`journeys`] watches them for stuck journeys and answers
//! look-ups. [`schema`] is `migrate`; [`config`] and [`node`] set it all
//! up. The message contract itself is `tailgate_contract`'s.

// Public: what the `tailgate` binary, the tests and the benchmarks use.
pub mod config;
pub(crate) mod consume;
pub mod journeys;
pub(crate) mod metrics;
pub mod node;
pub mod rows;
pub(crate) mod schema;
pub(crate) mod store;
