//! One gateway node's life: [`Node::start`] binds the ports, joins the
//! cluster and starts every stage; [`Node::shutdown`] stops it in named
//! steps, in order, all within one deadline: `shutdown.grace_secs` from the
//! moment it begins, whatever clients and peers do.
//!
//! 1. [`leave the cluster`](Node::leave_cluster): peers stop routing here.
//! 2. [`stop receiving`](Node::stop_receiving): new requests are refused,
//!    idle connections closed, requests in flight get a short time, and
//!    connections still open after it are cut.
//! 3. [`hand off or decide`](Node::hand_off_or_decide): every buffered trace
//!    goes to its owner in the ring without this node, or, for whatever no
//!    peer confirmed in time, is decided here at once.
//! 4. [`drain the outbox`](Node::drain_outbox): kept traces wait for the
//!    broker's confirms until the deadline.
//!
//! What a shutdown loses (acknowledged spans neither confirmed by the broker
//! nor by a peer) is counted with its reason, logged, and returned as
//! [`NodeError::Lost`], so the process exits non-zero.

use crate::{
    admin,
    cluster::{Cluster, forward::Rerouted, peer::PeerService, ring::PeerId},
    config::Config,
    decide::reload,
    metrics::{DropReason, Metrics},
    pipeline::Pipeline,
    publish::{Outbox, amqp},
    receive,
};
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tailgate_contract::listen;
use tokio::{
    net::TcpListener,
    sync::{Mutex, mpsc},
    task::JoinHandle,
    time::{Instant, timeout, timeout_at},
};
use tracing::{error, info};

/// How often due traces are looked for. Decisions are late by at most this.
const SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// Longest wait for peers to hear this node leave.
const LEAVE_WAIT: Duration = Duration::from_secs(2);
/// Longest wait for requests in flight once receiving stops: an OTLP
/// export takes milliseconds; a client still sending after this is stalled.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(2);

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
    #[error(
        "the shutdown lost {spans} acknowledged spans (counted in tailgate_spans_dropped_total)"
    )]
    Lost { spans: u64 },
}

type Server = JoinHandle<Result<(), NodeError>>;

/// A running gateway node: the tasks of every stage, held until [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    outbox: Arc<Outbox>,
    grace: Duration,
    /// Drained once the receivers, and the loops that only serve them, have stopped.
    receiving: drain::Signal,
    grpc: Server,
    http: Server,
    refresher: JoinHandle<()>,
    rules_watcher: Option<JoinHandle<()>>,
    rebalancer: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    rerouter: JoinHandle<()>,
    /// Spans whose peer left, waiting to be routed again; shared with the
    /// rerouter, so that what it has not taken yet is still here after it stops.
    rerouted: Arc<Mutex<mpsc::UnboundedReceiver<Rerouted>>>,
    publisher: JoinHandle<()>,
    /// The internal and admin ports serve until the end: peers greet and
    /// scrapers scrape while the node shuts down.
    peer_server: JoinHandle<Result<(), tonic::transport::Error>>,
    admin_server: Server,
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

/// Runs a gateway node until `shutdown` resolves (or a receiver fails), then
/// shuts it down.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let mut node = Node::start(&cfg).await?;
    let failure = node.serve_until(shutdown).await;
    node.shutdown(failure).await
}

impl Node {
    /// Binds every port, joins the cluster, and starts every stage.
    pub async fn start(cfg: &Config) -> Result<Self, NodeError> {
        // Refuse to start on broken rules, before taking any port.
        let rules = Arc::new(reload::initial(cfg)?);
        let grpc_listener = bind("OTLP/gRPC", cfg.receiver.grpc_listen).await?;
        let http_listener = bind("OTLP/HTTP", cfg.receiver.http_listen).await?;
        let admin_listener = bind("admin", cfg.admin.listen).await?;
        let peer_listener = bind("cluster", cfg.cluster.listen).await?;
        let me = advertise(cfg, &peer_listener);

        let metrics = Arc::new(Metrics::with_decision_wait(cfg.buffer.decision_wait));
        let holding = cfg.buffer.trace_timeout + cfg.buffer.decision_wait;
        let (cluster, rerouted) =
            Cluster::new(&cfg.cluster, me.clone(), Arc::clone(&metrics), holding);
        let membership = Arc::clone(&cluster.membership);
        metrics.rules.in_force(rules.hash_u48());
        info!(rules = rules.len(), hash = %rules.hash_hex(), file = ?cfg.rules.file, "sampling rules in force");
        let outbox = Arc::new(Outbox::new(cfg.rabbitmq.outbox_max_bytes.get()));
        let pipeline = Arc::new(Pipeline::new(
            cfg,
            rules,
            Arc::clone(&metrics),
            Arc::clone(&outbox),
            cluster,
        ));

        // The OTLP and cluster ports hold their connections to the
        // receiver's limits; the admin port to its own.
        let limits = cfg.receiver.connections;
        let admin_limits = cfg.admin.limits;
        // The internal port serves peers from the start, so seeds can greet back.
        let peer_server = {
            let service = PeerService::new(
                Arc::clone(&pipeline),
                4 * cfg.receiver.max_request_bytes.get(),
            );
            tokio::spawn(
                tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(limits.keepalive_interval))
                    .http2_keepalive_timeout(Some(limits.keepalive_timeout))
                    // A delivery's message, like a client's, must be in within this.
                    .timeout(cfg.receiver.body_read_timeout)
                    .add_service(service)
                    .serve_with_incoming(listen::incoming(peer_listener, limits)),
            )
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
                        spans_lost_with(&pipeline, &peer, lost);
                    }
                    pipeline.rebalance();
                }
            })
        };
        let rerouted = Arc::new(Mutex::new(rerouted));
        let rerouter = {
            let pipeline = Arc::clone(&pipeline);
            let rerouted = Arc::clone(&rerouted);
            tokio::spawn(async move {
                let mut rerouted = rerouted.lock().await;
                // `recv` is cancel-safe: aborting this task loses nothing.
                while let Some(spans) = rerouted.recv().await {
                    pipeline.reroute(spans);
                }
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

        let (receiving, watch) = drain::channel();
        let max_request = cfg.receiver.max_request_bytes.get();
        let grpc_service = receive::grpc::TraceService::new(
            Arc::clone(&pipeline),
            Arc::clone(&metrics),
            max_request,
            cfg.receiver.body_read_timeout,
        );
        let grpc = {
            let watch = watch.clone();
            tokio::spawn(async move {
                let stopped = signaled(&watch);
                let served = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(limits.keepalive_interval))
                    .http2_keepalive_timeout(Some(limits.keepalive_timeout))
                    .add_service(grpc_service)
                    .serve_with_incoming_shutdown(listen::incoming(grpc_listener, limits), stopped)
                    .await;
                drop(watch);
                served.map_err(|e| NodeError::Serve {
                    what: "OTLP/gRPC",
                    message: e.to_string(),
                })
            })
        };
        let http_router = receive::http::router(
            Arc::clone(&pipeline),
            Arc::clone(&metrics),
            max_request,
            cfg.receiver.body_read_timeout,
        );
        let http = tokio::spawn(async move {
            let served = listen::serve(http_listener, http_router, limits, signaled(&watch)).await;
            drop(watch);
            served.map_err(|e| NodeError::Serve {
                what: "OTLP/HTTP",
                message: e.to_string(),
            })
        });
        let admin_router = admin::router(Arc::clone(&pipeline), Arc::clone(&metrics));
        let admin_server = tokio::spawn(async move {
            listen::serve(
                admin_listener,
                admin_router,
                admin_limits,
                std::future::pending(),
            )
            .await
            .map_err(|e| NodeError::Serve {
                what: "admin",
                message: e.to_string(),
            })
        });
        Ok(Self {
            pipeline,
            metrics,
            outbox,
            grace: cfg.shutdown_grace,
            receiving,
            grpc,
            http,
            refresher,
            rules_watcher,
            rebalancer,
            sweeper,
            rerouter,
            rerouted,
            publisher,
            peer_server,
            admin_server,
        })
    }

    /// Serves until `shutdown` resolves, or until a receiver fails (its error
    /// is returned, for the shutdown to report after flushing).
    pub async fn serve_until(&mut self, shutdown: impl Future<Output = ()>) -> Option<NodeError> {
        tokio::select! {
            () = shutdown => None,
            r = &mut self.grpc => Some(server_failure("OTLP/gRPC", r)),
            r = &mut self.http => Some(server_failure("OTLP/HTTP", r)),
        }
        .flatten()
    }

    /// Stops the node within `shutdown.grace_secs`; see the module's steps.
    /// A receiver's `failure` is returned once everything is flushed.
    pub async fn shutdown(self, failure: Option<NodeError>) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.grace;
        info!(
            grace = ?self.grace,
            "shutting down: leaving the cluster, refusing new requests, handing off or deciding buffered traces, draining the outbox"
        );
        let metrics = Arc::clone(&self.metrics);
        self.leave_cluster(deadline).await;
        let node = self.stop_receiving(deadline, failure.is_some()).await;
        let undelivered = node.hand_off_or_decide(deadline).await;
        let (unpublished, servers) = node.drain_outbox(deadline).await;
        servers.stop();
        let totals = metrics.totals();
        info!(
            spans_received = totals.received,
            spans_from_peers = totals.delivered,
            spans_to_peers = totals.forwarded,
            spans_published = totals.published,
            spans_dropped = totals.dropped(),
            dropped_by_reason = %totals.dropped_by_reason(),
            spans_held = totals.held(),
            "span accounting of this process"
        );
        let (recorded, published, dropped) = metrics.journeys.totals();
        if recorded > 0 {
            info!(
                journey_events_recorded = recorded,
                journey_events_published = published,
                journey_events_dropped = dropped,
                "journey event accounting of this process"
            );
        }
        if let Some(failure) = failure {
            return Err(failure);
        }
        match undelivered + unpublished {
            0 => Ok(()),
            spans => Err(NodeError::Lost { spans }),
        }
    }

    /// Step 1: out of the ring, and every peer told, so they stop routing here.
    async fn leave_cluster(&self, deadline: Instant) {
        let within = LEAVE_WAIT.min(share(deadline, 10));
        self.pipeline.cluster().membership.leave(within).await;
    }

    /// Step 2: refuse new requests, let those in flight finish for a short
    /// time, then cut what is still open. Nothing acknowledged is cut: a
    /// request is acknowledged only once its spans are in.
    async fn stop_receiving(self, deadline: Instant, failed: bool) -> Receiving {
        self.pipeline.stop_accepting();
        self.refresher.abort();
        if let Some(watcher) = &self.rules_watcher {
            watcher.abort();
        }
        // A failed receiver has nothing in flight worth waiting for.
        if !failed {
            let within = IN_FLIGHT_WAIT.min(share(deadline, 5));
            // Resolves once both receivers have returned, dropping their watches.
            if timeout(within, self.receiving.drain()).await.is_err() {
                error!(
                    "requests still open {within:?} after the receivers stopped accepting; closing their connections"
                );
            }
        }
        self.grpc.abort();
        self.http.abort();
        Receiving {
            pipeline: self.pipeline,
            metrics: self.metrics,
            outbox: self.outbox,
            rebalancer: self.rebalancer,
            sweeper: self.sweeper,
            rerouter: self.rerouter,
            rerouted: self.rerouted,
            publisher: self.publisher,
            servers: Servers {
                peer: self.peer_server,
                admin: self.admin_server,
            },
        }
    }
}

/// A node that no longer receives, with what the later steps need.
struct Receiving {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    outbox: Arc<Outbox>,
    rebalancer: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    rerouter: JoinHandle<()>,
    rerouted: Arc<Mutex<mpsc::UnboundedReceiver<Rerouted>>>,
    publisher: JoinHandle<()>,
    servers: Servers,
}

impl Receiving {
    /// Step 3: hand every buffered trace to its owner in the ring without
    /// this node, and wait for the peers' confirms until half the time left;
    /// then take back what is still queued and decide everything here (all
    /// of it, for a node alone). Returns the spans counted as possibly lost:
    /// on the wire to a peer that never confirmed them.
    async fn hand_off_or_decide(&self, deadline: Instant) -> u64 {
        let pipeline = &self.pipeline;
        pipeline.rebalance();
        let forwarder = &pipeline.cluster().forwarder;
        let handed_off = timeout(share(deadline, 2), forwarder.drained())
            .await
            .is_ok();
        self.rerouter.abort();
        // The rerouter has let go of the channel once it is aborted.
        let mut rerouted = self.rerouted.lock().await;
        if !handed_off {
            error!(
                waiting_bytes = forwarder.bytes(),
                "could not hand all buffered traces to peers in time; deciding them here"
            );
            let mut waiting = Vec::new();
            while let Ok(spans) = rerouted.try_recv() {
                waiting.push(spans);
            }
            pipeline.take_back_undelivered(waiting);
        }
        self.rebalancer.abort();
        self.sweeper.abort();
        pipeline.close();
        // Only after a handoff that ran out of time: spans on the wire to a
        // peer that never confirmed them, or put back or rerouted since.
        let stranded = forwarder.pending_spans();
        if stranded > 0 {
            self.metrics
                .dropped(DropReason::ShutdownUndelivered, stranded);
            error!(
                spans = stranded,
                "exiting with spans that no peer confirmed receiving; they may be lost"
            );
        }
        stranded as u64
    }

    /// Step 4: wait for the broker to confirm every kept trace, until the
    /// deadline. Returns the spans it did not confirm, and the servers left
    /// to stop.
    async fn drain_outbox(self, deadline: Instant) -> (u64, Servers) {
        let outbox = &self.outbox;
        let waiting = outbox.messages();
        let drained = timeout_at(deadline, outbox.drained()).await.is_ok();
        self.publisher.abort();
        let lost = if drained {
            info!(messages = waiting, "outbox drained; exiting");
            0
        } else {
            let spans = outbox.spans();
            self.metrics.dropped(DropReason::ShutdownUnpublished, spans);
            self.metrics
                .journeys
                .dropped_at_shutdown(outbox.journey_events() as u64);
            error!(
                messages = outbox.messages(),
                spans,
                "shutdown grace period over with kept traces unconfirmed by the broker; they are lost"
            );
            spans as u64
        };
        (lost, self.servers)
    }
}

/// The internal and admin servers, which serve to the end.
struct Servers {
    peer: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: Server,
}

impl Servers {
    /// Last: everything is flushed; the calls still possible here are short
    /// (hellos, refused deliveries, scrapes), and a hung peer or scraper
    /// must not hold the exit.
    fn stop(self) {
        self.peer.abort();
        self.admin.abort();
    }
}

/// `1 / parts` of the time left until `deadline`.
fn share(deadline: Instant, parts: u32) -> Duration {
    deadline.saturating_duration_since(Instant::now()) / parts
}

fn spans_lost_with(pipeline: &Pipeline, peer: &PeerId, spans: usize) {
    if spans > 0 {
        error!(peer = %peer, spans, "a peer vanished while it may still have held spans this node sent it; they are lost");
    }
    pipeline.metrics().cluster.spans_lost_with(peer, spans);
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

/// Resolves when the drain begins. The task that holds `watch` releases
/// the drain by dropping it when it ends.
fn signaled(watch: &drain::Watch) -> impl Future<Output = ()> + Send + 'static {
    let watch = watch.clone();
    async move { drop(watch.signaled().await) }
}
