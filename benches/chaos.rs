//! The chaos run, as long as you ask (see tests/support/chaos.rs):
//!
//! ```sh
//! scripts/chaos                      # 10 minutes, seed 1
//! scripts/chaos --minutes 30 --seed 7 --traces-per-sec 200
//! ```
//!
//! Prints the report; exits non-zero when the run does not reconcile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;
use support::chaos::{self, Plan};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let minutes: f64 = value("--minutes").map_or(10.0, |m| m.parse().expect("--minutes"));
    let plan = Plan {
        duration: Duration::from_secs_f64(minutes * 60.0),
        seed: value("--seed").map_or(1, |s| s.parse().expect("--seed")),
        traces_per_sec: value("--traces-per-sec")
            .map_or(100, |s| s.parse().expect("--traces-per-sec")),
    };
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(chaos::run(plan));
    println!("{report}");
    let problems = report.problems();
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    if problems.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
