//! Tailgate's load generator and benchmark corpus: traces of the order
//! pipeline with spans of about 300 encoded bytes, like the targets assume.

pub mod corpus;
pub mod loadgen;
pub mod procfs;

use corpus::{SERVICES, Workload, by_service};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::time::Duration;

pub use corpus::trace_id;

/// One request holding `traces` whole traces of `spans_per_trace` spans of
/// the default workload, starting at trace number `first`.
pub fn request(first: u64, traces: u64, spans_per_trace: u32) -> ExportTraceServiceRequest {
    let workload = Workload {
        spans_per_trace,
        ..Workload::default()
    };
    let mut spans = Vec::new();
    for n in first..first + traces {
        let shape = workload.shape(n);
        let shape = corpus::TraceShape {
            spans: spans_per_trace,
            ..shape
        };
        for s in 0..spans_per_trace {
            spans.push((s as usize % SERVICES.len(), workload.span(n, shape, s)));
        }
    }
    ExportTraceServiceRequest {
        resource_spans: by_service(spans)
            .into_iter()
            .flat_map(|(_, r)| r.resource_spans)
            .collect(),
    }
}

/// Raw prost decoding of `bodies` on the calling thread for about `time`:
/// spans decoded per CPU-second, the limit the gateway is compared with.
pub fn prost_decode_rate(bodies: &[corpus::Encoded], time: Duration) -> std::io::Result<f64> {
    let start = procfs::thread_cpu()?;
    let mut spans = 0u64;
    let mut elapsed = Duration::ZERO;
    while elapsed < time {
        for body in bodies {
            let request = ExportTraceServiceRequest::decode(body.body.as_slice())
                .map_err(std::io::Error::other)?;
            std::hint::black_box(&request);
            spans += body.spans;
        }
        elapsed = procfs::thread_cpu()? - start;
    }
    Ok(spans as f64 / elapsed.as_secs_f64())
}
