//! What Tailgate's gateway and ingester agree on, in one place.
//!
//! - [`message`]: a kept trace as a RabbitMQ message: the routing key, the
//!   headers, the content type; written by the gateway, read by the
//!   ingester and the tests.
//! - [`journey`]: journey events as RabbitMQ messages, likewise.
//! - [`compression`]: how its body is packed, named by `content_encoding`.
//! - [`amqp`]: the broker connection settings and the exchange declaration
//!   both sides make, identically, so either may start first.
//! - [`config`]: the YAML-plus-environment loader, the checks and sections
//!   every configuration file shares.
//! - [`backoff`]: the one exponential backoff every retry loop uses.
//! - [`admin`]: `/metrics`, `/healthz` and `/readyz`, the same in every process.
//! - [`listen`]: the connection limits every listening port is held to.

pub mod admin;
pub mod amqp;
pub mod backoff;
pub mod compression;
pub mod config;
pub mod journey;
pub mod listen;
pub mod message;
