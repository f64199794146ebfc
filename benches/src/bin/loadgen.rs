//! `tailgate-loadgen`: order-pipeline traces against running gateway nodes.
//!
//! ```sh
//! tailgate-loadgen --target 10.0.0.1:4317 --target 10.0.0.2:4317 \
//!     --connections 8 --rate 50000 --duration-secs 60
//! ```

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use std::{net::SocketAddr, time::Duration};
use tailgate_benches::{
    corpus::{Workload, corpus},
    loadgen::{self, Options, Protocol},
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Proto {
    Grpc,
    Http,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Send order-pipeline traces to Tailgate gateways over OTLP"
)]
struct Args {
    /// A gateway node's OTLP address (gRPC or HTTP port, per --protocol); repeat for several nodes.
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Proto,
    /// Concurrent connections; connection k talks to target k mod N.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Spans per second over all connections; 0 sends as fast as the gateways accept.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 30.0)]
    duration_secs: f64,
    /// Stop after this many spans (0: no limit; the duration still applies).
    #[arg(long, default_value_t = 0)]
    spans: u64,
    #[arg(long, default_value_t = 10)]
    spans_per_trace: u32,
    #[arg(long, default_value_t = 5)]
    attributes_per_span: u32,
    /// Length of each attribute value.
    #[arg(long, default_value_t = 22)]
    attribute_bytes: usize,
    #[arg(long, default_value_t = 0.02)]
    error_share: f64,
    #[arg(long, default_value_t = 0.01)]
    slow_share: f64,
    #[arg(long, default_value_t = 0.01)]
    late_share: f64,
    /// Seconds after its trace's root that a late span is sent (beyond the decision wait).
    #[arg(long, default_value_t = 4.0)]
    late_delay_secs: f64,
    #[arg(long, default_value_t = 0.0)]
    long_share: f64,
    #[arg(long, default_value_t = 200)]
    long_spans: u32,
    #[arg(long, default_value_t = 0.0)]
    giant_share: f64,
    #[arg(long, default_value_t = 20_000)]
    giant_spans: u32,
    #[arg(long, default_value_t = 100)]
    traces_per_batch: u32,
    /// First pass of the corpus (trace IDs differ per pass); by default the
    /// current Unix time, so consecutive runs send different traces.
    #[arg(long)]
    first_pass: Option<u64>,
    /// Distinct batches pre-encoded; later passes reuse them with new trace IDs.
    #[arg(long, default_value_t = 200)]
    batches: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.rate < 0.0 || !a.duration_secs.is_finite() || a.duration_secs <= 0.0 {
        bail!("--rate must be ≥ 0 and --duration-secs > 0");
    }
    let workload = Workload {
        spans_per_trace: a.spans_per_trace,
        attributes_per_span: a.attributes_per_span,
        attribute_bytes: a.attribute_bytes,
        error_share: a.error_share,
        slow_share: a.slow_share,
        late_share: a.late_share,
        long_share: a.long_share,
        long_spans: a.long_spans,
        giant_share: a.giant_share,
        giant_spans: a.giant_spans,
        traces_per_batch: a.traces_per_batch,
        ..Workload::default()
    };
    let batches = corpus(&workload, a.batches);
    let (bytes, spans) = batches
        .iter()
        .flat_map(|b| &b.requests)
        .fold((0, 0), |(b, s), r| (b + r.body.len() as u64, s + r.spans));
    eprintln!(
        "corpus: {spans} spans, {} bytes per span, {} requests per pass",
        bytes / spans.max(1),
        batches.iter().map(|b| b.requests.len()).sum::<usize>()
    );
    let stats = loadgen::run(
        batches,
        Options {
            protocol: match a.protocol {
                Proto::Grpc => Protocol::Grpc,
                Proto::Http => Protocol::Http,
            },
            targets: a.targets,
            connections: a.connections,
            rate: (a.rate > 0.0).then_some(a.rate),
            duration: Duration::from_secs_f64(a.duration_secs),
            max_spans: (a.spans > 0).then_some(a.spans),
            first_pass: a.first_pass.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs())
            }),
            late_delay: Duration::from_secs_f64(a.late_delay_secs),
            retry_wait: Duration::from_millis(200),
        },
    )
    .await;
    let secs = stats.elapsed.as_secs_f64();
    println!("elapsed_secs      {secs:.2}");
    println!("requests          {}", stats.requests);
    println!("spans_sent        {}", stats.spans_sent);
    println!(
        "spans_accepted    {} ({:.0}/s)",
        stats.spans_accepted,
        stats.spans_accepted as f64 / secs
    );
    println!("spans_rejected    {}", stats.spans_rejected);
    println!("spans_abandoned   {}", stats.spans_abandoned);
    println!("late_spans_sent   {}", stats.late_spans_sent);
    println!(
        "pushback          {} (429: {}, 503: {}, RESOURCE_EXHAUSTED: {}, UNAVAILABLE: {})",
        stats.pushback(),
        stats.pushback_429,
        stats.pushback_503,
        stats.pushback_resource_exhausted,
        stats.pushback_unavailable
    );
    println!("errors            {}", stats.errors);
    if let Some(e) = &stats.last_error {
        println!("last_error        {e}");
    }
    if stats.spans_accepted == 0 {
        return Err(anyhow::anyhow!("no span was accepted")).context(
            stats
                .last_error
                .unwrap_or_else(|| "every request was pushed back".into()),
        );
    }
    Ok(())
}
