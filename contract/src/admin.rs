//! The admin port of every process: `/metrics` (OpenMetrics text),
//! `/healthz` (the process is alive) and `/readyz` (send it work).

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use std::sync::Arc;

/// What a process shows on its admin port.
pub trait Health: Send + Sync + 'static {
    /// Every metric, encoded as OpenMetrics text.
    fn metrics(&self) -> String;
    /// `Ok` when the process should be sent work; else why not, for people.
    fn readiness(&self) -> Result<(), &'static str>;
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(health: Arc<dyn Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(health)
}

async fn metrics(State(h): State<Arc<dyn Health>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], h.metrics())
}

async fn ready(State(h): State<Arc<dyn Health>>) -> (StatusCode, String) {
    match h.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
