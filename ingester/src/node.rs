//! One ingester process: migrate, serve metrics and health, consume until SIGTERM.

use crate::{
    config::IngesterConfig,
    consume,
    journeys::{self, Finder},
    metrics::Metrics,
    store::Store,
};
use std::{future::Future, sync::Arc};
use tailgate_contract::{
    admin::{self, Health},
    listen,
};
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

impl Health for Metrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn readiness(&self) -> Result<(), &'static str> {
        if self.broker_connected.get() == 1 && self.clickhouse_up.get() == 1 {
            Ok(())
        } else {
            Err("not consuming, or ClickHouse unreachable")
        }
    }
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
    let listener = TcpListener::bind(cfg.admin.listen)
        .await
        .map_err(|source| IngesterError::Bind {
            addr: cfg.admin.listen,
            source,
        })?;
    info!(
        admin = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        queue = %cfg.rabbitmq.queue,
        table = %store.tables().spans,
        "tailgate ingester ready"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut router = admin::router(Arc::clone(&metrics) as Arc<dyn Health>);
    let mut finder_task = None;
    if cfg.journeys.rules_file.is_some() {
        let finder = Arc::new(Finder::new(&cfg, store.clone(), Arc::clone(&metrics)));
        router = router.merge(journeys::router(Arc::clone(&finder)));
        finder_task = Some(tokio::spawn(finder.run(stop_rx.clone())));
    }
    let limits = cfg.admin.limits;
    let admin_task = tokio::spawn(async move {
        let _ = listen::serve(listener, router, limits, std::future::pending()).await;
    });
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
    if let Some(task) = finder_task {
        task.abort();
    }
    admin_task.abort();
    info!("ingester stopped");
    Ok(())
}
