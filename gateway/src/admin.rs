//! `/metrics`, `/healthz` and `/readyz` on the admin port.

use crate::{metrics::Metrics, pipeline::Pipeline};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Admin {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
}

pub fn router(pipeline: Arc<Pipeline>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Admin { pipeline, metrics })
}

async fn metrics_text(State(a): State<Admin>) -> impl IntoResponse {
    a.pipeline.update_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        a.metrics.encode(),
    )
}

/// Ready means: the broker is connected and the node is not shedding load
/// or shutting down. A load balancer should send traffic elsewhere otherwise.
async fn ready(State(a): State<Admin>) -> (StatusCode, &'static str) {
    if a.pipeline.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !a.pipeline.cluster().membership.is_member() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not in the cluster's peer list (see logs)\n",
        )
    } else if a.metrics.broker_connected.get() == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the broker\n",
        )
    } else if a.pipeline.is_shedding() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "shedding load: buffer or outbox full\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}
