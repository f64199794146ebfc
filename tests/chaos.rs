//! The chaos run, short: a 3-node cluster, the ingester, RabbitMQ behind a
//! proxy and the ClickHouse engine, under steady load for 45 seconds while
//! faults are injected one at a time from a fixed seed (SIGTERM and restart
//! of a node, SIGKILL of a node, a broker cut, a ClickHouse outage, an
//! ingester SIGKILL, a rules reload). `scripts/chaos` runs it as long as you
//! ask, with any seed; docs/reliability.md has the long runs' figures.

// Test code reports failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;
use support::chaos::{self, Plan};

/// Seed 1 draws every kind of fault within 45 s. At the end, from the load
/// generator's own log of acknowledged spans, ClickHouse and each node's
/// accounting: every acknowledged span is stored once or counted as dropped
/// with its reason; no span of a dropped trace is stored; every SIGTERMed
/// node exits 0; and spans go missing only with a SIGKILLed node, no more
/// than it held.
#[tokio::test(flavor = "multi_thread")]
async fn a_minute_of_faults_loses_nothing_unaccounted() {
    let report = chaos::run(Plan {
        duration: Duration::from_secs(45),
        seed: 1,
        traces_per_sec: 100,
    })
    .await;
    eprintln!("{report}");
    assert!(
        report.problems().is_empty(),
        "{:?}\n{report}",
        report.problems()
    );
    assert!(report.acked_keep > 0 && report.acked_drop > 0, "{report}");
    assert!(
        report.faults.len() >= 4,
        "too few kinds of fault drawn:\n{report}"
    );
}
