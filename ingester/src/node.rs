//! One ingester process: migrate, serve metrics and health, consume until SIGTERM.

use crate::{config::IngesterConfig, consume, metrics::Metrics, store::Store};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use std::{future::Future, sync::Arc};
use tokio::{net::TcpListener, sync::watch};
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum IngesterError {
    #[error("migrate failed")]
    Migrate(#[from] crate::store::StoreError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Creates or updates the schema and exits (`tailgate ingester migrate`).
pub async fn migrate(cfg: &IngesterConfig) -> Result<(), IngesterError> {
    let store = Store::new(cfg);
    store.migrate(cfg).await?;
    info!(table = %store.tables().spans, "schema is up to date");
    Ok(())
}

fn admin(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.encode() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.broker_connected.get() == 1 && m.clickhouse_up.get() == 1 {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not consuming, or ClickHouse unreachable\n",
                    )
                }
            }),
        )
        .with_state(metrics)
}

/// Runs until `shutdown`, then finishes the insert in flight, acks it, and returns.
pub async fn run(
    cfg: IngesterConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), IngesterError> {
    let store = Store::new(&cfg);
    if cfg.clickhouse.migrate_on_start {
        store.migrate(&cfg).await?;
    }
    let metrics = Arc::new(Metrics::new());
    if store.ping().await.is_ok() {
        metrics.clickhouse_up.set(1);
    }
    let listener = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| IngesterError::Bind {
            addr: cfg.admin_listen,
            source,
        })?;
    info!(
        admin = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        queue = %cfg.rabbitmq.queue,
        table = %store.tables().spans,
        "tailgate ingester ready"
    );
    let admin_metrics = Arc::clone(&metrics);
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(listener, admin(admin_metrics)).await;
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = {
        let metrics = Arc::clone(&metrics);
        async move { consume::run(&cfg, &store, &metrics, stop_rx).await }
    };
    tokio::pin!(consumer);
    tokio::select! {
        () = &mut consumer => {}
        () = shutdown => {
            info!("shutting down: finishing the insert in flight");
            let _ = stop_tx.send(true);
            consumer.await;
        }
    }
    admin_task.abort();
    info!("ingester stopped");
    Ok(())
}
