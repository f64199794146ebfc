//! Helpers for the integration tests: a real `tailgate` process, a real
//! RabbitMQ queue per test, a TCP proxy that can cut the broker off, and
//! OTLP traces and clients.
#![allow(dead_code)] // each test binary uses a different part

pub mod broker;
pub mod chaos;
pub mod clickhouse;
pub mod cluster;
pub mod e2e;
pub mod gateway;
pub mod ingest;
pub mod otlp;

use std::{
    ffi::OsStr,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Generous bound for anything the tests wait for; reaching it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A name no other test run uses: exchanges and queues are per run.
pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tailgate.test.{tag}.{}.{nanos}", std::process::id())
}

/// The AMQP URL of the broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("TAILGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A command running `program` at CPU priority `nice` (through `nice(1)`, so
/// every thread it starts inherits it); 0 is the normal priority.
pub fn command(program: impl AsRef<OsStr>, nice: i32) -> Command {
    if nice == 0 {
        return Command::new(program);
    }
    let mut cmd = Command::new("nice");
    cmd.arg("-n").arg(nice.to_string()).arg(program);
    cmd
}
