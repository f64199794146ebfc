//! A Tailgate gateway node.
//!
//! A span's path, one module per stage, top to bottom:
//!
//! 1. [`receive`]: OTLP over gRPC and HTTP, with admission control.
//! 2. [`route`]: split a request into per-trace batches, spans still
//!    encoded ([`wire`] walks the protobuf; [`trace`] is what a batch is,
//!    and how it is written out or decoded).
//! 3. [`buffer`]: hold each trace until it is due.
//! 4. [`decide`]: apply the sampling policy; remember decisions for late spans.
//! 5. [`publish`]: the outbox and the RabbitMQ publisher with confirms.
//!
//! [`pipeline`] conducts stages 2 to 5 for each request, [`node`] starts
//! everything and shuts it down in order, [`admin`] serves metrics and
//! health, [`config`] turns the YAML file into checked settings, and
//! [`tools`] backs `tailgate rules check|test`.

// Public: what the `tailgate` binary, the integration tests and the
// benchmarks use. The rest is the gateway's own.
pub mod buffer;
pub mod cluster;
pub(crate) mod decide;
pub mod publish;
pub(crate) mod receive;
pub mod route;
pub mod trace;

pub(crate) mod admin;
pub mod config;
pub(crate) mod grpc_raw;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod tools;
pub(crate) mod wire;
