//! The end-to-end benchmark (declared by the root `tailgate` package,
//! because it runs the `tailgate` binary): 1 and then 3 gateways and an
//! ingester on loopback with the real RabbitMQ and the ClickHouse engine.
//!
//! ```sh
//! cargo bench --bench e2e
//! cargo bench --bench e2e -- --duration-secs 30 --protocol http
//! ```
//!
//! Options: `--smoke`, `--duration-secs S`, `--latency-secs S`, `--warm-up-secs S`, `--gateways 1,3`,
//! `--connections K`, `--protocol grpc|http`, `--rules FILE`,
//! `--compression lz4|zstd|none`, `--memory-spans N`, `--stand-in-nice N`, `--ingester-prefetch N`,
//! `--gateway-env KEY=VALUE` (repeatable: a `TAILGATE_*` setting for every gateway).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The gateway's allocator, so the raw-decode baseline measured in this
// process is comparable with the gateway's own decoding.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;
use support::e2e::{self, Plan};
use tailgate_benches::loadgen::Protocol;

fn plan() -> Plan {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut plan = if args.iter().any(|a| a == "--smoke") {
        Plan::smoke()
    } else {
        Plan::full()
    };
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(s) = value("--duration-secs") {
        plan.duration = Duration::from_secs_f64(s.parse().expect("--duration-secs"));
    }
    if let Some(s) = value("--latency-secs") {
        plan.latency_duration = Some(Duration::from_secs_f64(s.parse().expect("--latency-secs")));
    }
    if let Some(s) = value("--warm-up-secs") {
        plan.warm_up = Duration::from_secs_f64(s.parse().expect("--warm-up-secs"));
    }
    if let Some(g) = value("--gateways") {
        plan.gateways = g
            .split(',')
            .map(|n| n.parse().expect("--gateways"))
            .collect();
    }
    if let Some(k) = value("--connections") {
        plan.connections = k.parse().expect("--connections");
    }
    if let Some(p) = value("--protocol") {
        plan.protocol = match p.as_str() {
            "grpc" => Protocol::Grpc,
            "http" => Protocol::Http,
            other => panic!("--protocol grpc|http, not {other}"),
        };
    }
    if let Some(r) = value("--rules") {
        // Cargo runs benchmarks in the package's directory, the workspace
        // root; a path relative to where the command was typed works too.
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = std::fs::canonicalize(&r)
            .or_else(|_| std::fs::canonicalize(workspace.join(&r)))
            .unwrap_or_else(|e| panic!("--rules {r}: {e}"));
        plan.rules = Some(path);
    }
    if let Some(c) = value("--compression") {
        // Named as in the configuration file.
        plan.compression = serde_json::from_value(serde_json::Value::String(c))
            .unwrap_or_else(|e| panic!("--compression lz4|zstd|none: {e}"));
    }
    for (i, a) in args.iter().enumerate() {
        if a == "--gateway-env" {
            let setting = args.get(i + 1).expect("--gateway-env KEY=VALUE");
            let (k, v) = setting
                .split_once('=')
                .unwrap_or_else(|| panic!("--gateway-env KEY=VALUE, not {setting}"));
            plan.gateway_env.push((k.to_owned(), v.to_owned()));
        }
    }
    if let Some(n) = value("--ingester-prefetch") {
        plan.ingester_prefetch = n.parse().expect("--ingester-prefetch");
    }
    if let Some(n) = value("--stand-in-nice") {
        plan.stand_in_nice = n.parse().expect("--stand-in-nice");
    }
    if let Some(n) = value("--memory-spans") {
        plan.memory_spans = n.parse().expect("--memory-spans");
    }
    plan
}

#[tokio::main]
async fn main() {
    let report = e2e::run(plan()).await;
    println!("{report}");
}
