//! The gateway's admin port: the shared `/metrics`, `/healthz` and
//! `/readyz` ([`tailgate_contract::admin`]) over the gateway's metrics and
//! readiness.

use crate::{metrics::Metrics, pipeline::Pipeline};
use std::sync::Arc;
use tailgate_contract::admin::{self, Health};

#[derive(Debug)]
struct Gateway {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
}

impl Health for Gateway {
    fn metrics(&self) -> String {
        self.pipeline.update_gauges();
        self.metrics.encode()
    }

    /// Ready means: the broker is connected and the node is not shedding
    /// load or shutting down. A load balancer should send traffic elsewhere
    /// otherwise.
    fn readiness(&self) -> Result<(), &'static str> {
        if self.pipeline.is_closing() {
            Err("shutting down")
        } else if !self.pipeline.cluster().membership.is_member() {
            Err("not in the cluster's peer list (see logs)")
        } else if !self.metrics.publish.is_connected() {
            Err("not connected to the broker")
        } else if self.pipeline.is_shedding() {
            Err("shedding load: buffer or outbox full")
        } else {
            Ok(())
        }
    }
}

pub fn router(pipeline: Arc<Pipeline>, metrics: Arc<Metrics>) -> axum::Router {
    admin::router(Arc::new(Gateway { pipeline, metrics }))
}
