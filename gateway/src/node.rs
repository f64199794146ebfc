//! One gateway node: binds the ports, joins the cluster, starts every stage,
//! and shuts down in order: leave the cluster, stop accepting, hand buffered
//! traces to their new owners (or decide them, alone), drain the outbox.

use crate::{
    admin,
    cluster::{Cluster, peer::PeerService, ring::PeerId},
    config::Config,
    decide::reload,
    metrics::{DropReason, Metrics},
    pipeline::Pipeline,
    publish::{Outbox, amqp},
    receive,
};
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{error, info};

/// How often due traces are looked for. Decisions are late by at most this.
const SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// How long the internal and admin servers may take to stop at the end of a
/// shutdown, once everything is flushed.
const SERVER_STOP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid sampling rules")]
    Rules(#[from] tailgate_sampling_rules::RulesError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} server failed: {message}")]
    Serve { what: &'static str, message: String },
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { what, addr, source })
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// Runs a gateway node until `shutdown` resolves, then flushes and returns.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    // Refuse to start on broken rules, before taking any port.
    let rules = Arc::new(reload::initial(&cfg)?);
    let grpc_listener = bind("OTLP/gRPC", cfg.receiver.grpc_listen).await?;
    let http_listener = bind("OTLP/HTTP", cfg.receiver.http_listen).await?;
    let admin_listener = bind("admin", cfg.admin_listen).await?;
    let peer_listener = bind("cluster", cfg.cluster.listen).await?;
    let me = advertise(&cfg, &peer_listener);

    let metrics = Arc::new(Metrics::with_decision_wait(cfg.buffer.decision_wait));
    let holding = cfg.buffer.trace_timeout + cfg.buffer.decision_wait;
    let (cluster, mut rerouted) =
        Cluster::new(&cfg.cluster, me.clone(), Arc::clone(&metrics), holding);
    let membership = Arc::clone(&cluster.membership);
    metrics
        .rules_hash
        .set(i64::try_from(rules.hash_u48()).unwrap_or(0));
    info!(rules = rules.len(), hash = %rules.hash_hex(), file = ?cfg.rules.file, "sampling rules in force");
    let outbox = Arc::new(Outbox::new(cfg.rabbitmq.outbox_max_bytes.get()));
    let pipeline = Arc::new(Pipeline::new(
        &cfg,
        rules,
        Arc::clone(&metrics),
        Arc::clone(&outbox),
        cluster,
    ));

    // The internal port serves peers from the start, so seeds can greet back.
    let (peer_stop_tx, peer_stop_rx) = watch::channel(false);
    let peer_server = {
        let service = PeerService::new(
            Arc::clone(&pipeline),
            4 * cfg.receiver.max_request_bytes.get(),
        );
        let mut stop = peer_stop_rx;
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(peer_listener),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await
        })
    };
    // Join before taking traffic: greet the seeds once, so routing starts agreed.
    membership.refresh().await;
    let refresher = {
        let pipeline = Arc::clone(&pipeline);
        let every = cfg.cluster.refresh;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                pipeline.cluster().membership.refresh().await;
                pipeline.hand_off_traces();
            }
        })
    };
    // On every membership change, hand off what this node no longer owns.
    let rebalancer = {
        let pipeline = Arc::clone(&pipeline);
        let mut changes = membership.changes();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let cluster = pipeline.cluster();
                for peer in cluster.membership.take_failed() {
                    let lost = cluster.forwarder.possibly_lost_with(&peer);
                    pipeline_metrics_lost(&pipeline, &peer, lost);
                }
                pipeline.rebalance();
            }
        })
    };
    // Hands its channel back when told to stop, so that a shutdown whose
    // handoff ran out of time can keep what is still waiting in it.
    let (reroute_stop_tx, mut reroute_stop) = watch::channel(false);
    let rerouter = {
        let pipeline = Arc::clone(&pipeline);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    spans = rerouted.recv() => match spans {
                        Some(spans) => pipeline.reroute(spans),
                        None => break,
                    },
                    _ = reroute_stop.wait_for(|stop| *stop) => break,
                }
            }
            rerouted
        })
    };

    // Tests and operators read the actual ports here (a configured port 0 is picked by the OS).
    info!(
        grpc = %local(&grpc_listener),
        http = %local(&http_listener),
        admin = %local(&admin_listener),
        peer = %me,
        peers = membership.ring().len(),
        exchange = %cfg.rabbitmq.exchange,
        "tailgate gateway ready"
    );
    let rules_watcher = cfg.rules.file.clone().map(|path| {
        let pipeline = Arc::clone(&pipeline);
        let metrics = Arc::clone(&metrics);
        let interval = cfg.rules.check_interval;
        tokio::spawn(async move {
            reload::watch(&path, interval, pipeline.decider(), &metrics).await;
        })
    });
    let max_request = cfg.receiver.max_request_bytes.get();

    let publisher = tokio::spawn(amqp::run(
        cfg.rabbitmq.clone(),
        Arc::clone(&outbox),
        Arc::clone(&metrics),
    ));
    let sweeper = {
        let pipeline = Arc::clone(&pipeline);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                pipeline.sweep();
            }
        })
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let grpc_service =
        receive::grpc::TraceService::new(Arc::clone(&pipeline), Arc::clone(&metrics), max_request);
    let grpc: JoinHandle<Result<(), NodeError>> = tokio::spawn({
        let stopped = stopped();
        async move {
            tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener),
                    stopped,
                )
                .await
                .map_err(|e| NodeError::Serve {
                    what: "OTLP/gRPC",
                    message: e.to_string(),
                })
        }
    });
    let http_router =
        receive::http::router(Arc::clone(&pipeline), Arc::clone(&metrics), max_request);
    let http = serve("OTLP/HTTP", http_listener, http_router, stopped());
    let admin_router = admin::router(Arc::clone(&pipeline), Arc::clone(&metrics));
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin = serve("admin", admin_listener, admin_router, async move {
        let mut rx = admin_stop_rx;
        let _ = rx.wait_for(|stop| *stop).await;
    });

    // Run until told to stop, or until a receiver fails (then flush and report it).
    let mut grpc = grpc;
    let mut http = http;
    let failure = tokio::select! {
        () = shutdown => None,
        r = &mut grpc => Some(server_failure("OTLP/gRPC", r)),
        r = &mut http => Some(server_failure("OTLP/HTTP", r)),
    };
    info!(
        "shutting down: leaving the cluster, refusing new requests, handing off or deciding buffered traces, draining the outbox"
    );
    membership.leave().await;
    pipeline.stop_accepting();
    let _ = stop_tx.send(true);
    if failure.is_none() {
        // In-flight requests finish; a client that holds its connection
        // open cannot delay the flush past the grace period.
        for (what, server) in [("OTLP/gRPC", grpc), ("OTLP/HTTP", http)] {
            match tokio::time::timeout(cfg.shutdown_grace, server).await {
                Ok(r) => {
                    if let Some(e) = server_failure(what, r) {
                        error!(error = %e, "receiver failed while stopping");
                    }
                }
                Err(_) => error!("{what} server did not stop within the grace period"),
            }
        }
    } else {
        grpc.abort();
        http.abort();
    }
    refresher.abort();
    if let Some(watcher) = rules_watcher {
        watcher.abort();
    }
    // Hand every buffered trace to its owner in the ring without this node,
    // and wait until the peers confirmed them; then decide whatever is still
    // here (everything, for a node alone).
    pipeline.rebalance();
    let handed_off =
        tokio::time::timeout(cfg.shutdown_grace, pipeline.cluster().forwarder.drained())
            .await
            .is_ok();
    let _ = reroute_stop_tx.send(true);
    // Held until the count below: what lands in it later stays pending.
    let mut rerouted = rerouter.await.ok();
    if !handed_off {
        error!(
            waiting_bytes = pipeline.cluster().forwarder.bytes(),
            "could not hand all buffered traces to peers within the grace period; deciding them here"
        );
        let mut waiting = Vec::new();
        if let Some(rerouted) = rerouted.as_mut() {
            while let Ok(spans) = rerouted.try_recv() {
                waiting.push(spans);
            }
        }
        pipeline.take_back_undelivered(waiting);
    }
    rebalancer.abort();
    sweeper.abort();
    pipeline.close();
    // Only after a handoff that ran out of time: spans on the wire to a peer
    // that never confirmed them, or put back or rerouted since.
    let stranded = pipeline.cluster().forwarder.pending_spans();
    drop(rerouted);
    if stranded > 0 {
        metrics.dropped(DropReason::ShutdownUndelivered, stranded);
        error!(
            spans = stranded,
            "exiting with spans that no peer confirmed receiving; they may be lost"
        );
    }
    let waiting = outbox.messages();
    let drained = tokio::time::timeout(cfg.shutdown_grace, outbox.drained())
        .await
        .is_ok();
    publisher.abort();
    if drained {
        info!(messages = waiting, "outbox drained; exiting");
    } else {
        let spans = outbox.spans();
        metrics.dropped(DropReason::ShutdownUnpublished, spans);
        error!(messages = outbox.messages(), spans, grace = ?cfg.shutdown_grace, "shutdown grace period over with kept traces unconfirmed by the broker; they are lost");
    }
    // A graceful stop waits for every open connection to close, and a hung
    // peer (or scraper) never closes its own: the calls still possible here
    // are short (hellos, refused deliveries, scrapes), so wait briefly.
    let _ = peer_stop_tx.send(true);
    let _ = admin_stop_tx.send(true);
    stopped_within(SERVER_STOP, "cluster", peer_server).await;
    stopped_within(SERVER_STOP, "admin", admin).await;
    failure.flatten().map_or(Ok(()), Err)
}

/// Waits up to `limit` for a server told to stop; past it, leaves it to the exit.
async fn stopped_within<T>(limit: Duration, what: &str, server: JoinHandle<T>) {
    if tokio::time::timeout(limit, server).await.is_err() {
        error!(
            "the {what} server still had open connections {limit:?} after it was told to stop; exiting anyway"
        );
    }
}

fn pipeline_metrics_lost(pipeline: &Pipeline, peer: &PeerId, spans: usize) {
    if spans > 0 {
        error!(peer = %peer, spans, "a peer vanished while it may still have held spans this node sent it; they are lost");
    }
    pipeline.metrics().spans_lost_with(peer, spans);
}

/// This node's identity for its peers: `cluster.advertise`, else `POD_IP`
/// with the cluster port, else the bound cluster address.
fn advertise(cfg: &Config, listener: &TcpListener) -> PeerId {
    let port = listener
        .local_addr()
        .map_or(cfg.cluster.listen.port(), |a| a.port());
    if let Some(a) = &cfg.cluster.advertise {
        return PeerId::from(a.as_str());
    }
    if let Ok(ip) = std::env::var("POD_IP") {
        return PeerId::from(format!("{ip}:{port}"));
    }
    let bound = listener.local_addr().map(|a| a.ip());
    match bound {
        Ok(ip) if !ip.is_unspecified() => PeerId::from(format!("{ip}:{port}")),
        _ => {
            if !cfg.cluster.peers.is_empty() || cfg.cluster.dns.is_some() {
                error!(
                    "cluster.listen is a wildcard address and neither cluster.advertise nor POD_IP is set: peers cannot reach this node"
                );
            }
            PeerId::from(format!("127.0.0.1:{port}"))
        }
    }
}

/// The error a finished receiver task ended with, if any.
fn server_failure(
    what: &'static str,
    joined: Result<Result<(), NodeError>, tokio::task::JoinError>,
) -> Option<NodeError> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(NodeError::Serve {
            what,
            message: e.to_string(),
        }),
    }
}

fn serve(
    what: &'static str,
    listener: TcpListener,
    router: axum::Router,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<(), NodeError>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stopped)
            .await
            .map_err(|e| NodeError::Serve {
                what,
                message: e.to_string(),
            })
    })
}
