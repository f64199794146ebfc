//! The end-to-end benchmark in smoke mode (a few seconds, small load), so it
//! keeps working. Speed is not checked here; what is checked holds at any
//! speed: no accepted span is lost, and every kept span is one row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::e2e::{Plan, run};

/// 1 and then 3 gateways with an ingester, under load from the load
/// generator: every accepted span is kept (and stored exactly once in
/// ClickHouse) or counted as dropped with a reason, kept traces reach the
/// broker compressed (fewer bytes per span than the OTLP the gateways
/// received), the ingester and the ClickHouse engine run at the plan's
/// lower CPU priority, and every figure of the report could be computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_benchmark_smoke_run_loses_nothing() {
    let plan = Plan::smoke();
    let niced =
        (tailgate_benches::procfs::nice(std::process::id()).unwrap() + plan.stand_in_nice).min(19);
    let report = run(plan).await;
    println!("{report}");
    assert_eq!(report.setups.len(), 2);
    for s in &report.setups {
        let a = &s.accounting;
        assert!(a.accepted > 0, "{report}");
        assert_eq!(a.lost, 0, "{report}");
        assert_eq!(a.received, a.accepted, "{report}");
        assert_eq!(a.rows, a.kept, "{report}");
        assert!(a.kept > 0 && a.dropped_total() > 0, "{report}");
        assert!(s.spans_per_cpu_second().is_finite(), "{report}");
        assert!(s.prost_decode.iter().all(|&r| r > 0.0), "{report}");
        assert!(!s.stand_ins_nice.is_empty(), "{report}");
        assert!(s.stand_ins_nice.iter().all(|&n| n == niced), "{report}");
        assert!(s.latency_p99 >= s.latency_p50, "{report}");
        assert!(s.capacity.load.late_spans_sent > 0, "{report}");
        assert!(a.broker_bytes_per_kept_span() > 0.0, "{report}");
        assert!(
            a.broker_bytes_per_kept_span() < report.bytes_per_span,
            "{report}"
        );
    }
    let m = &report.memory;
    assert!(m.spans >= 20_000 && m.buffered_bytes > 0, "{report}");
}
