//! Spans (and handed-off decisions) on their way to the peer that owns them.
//!
//! One queue per peer, flushed every `forward_flush_secs` by one task per
//! peer as a single compressed delivery. A failed delivery stays queued and
//! is retried with backoff; if the peer drops out of the ring meanwhile, its
//! queued spans are routed again (to the new owner, maybe this node).
//!
//! Pending bytes (queued, in flight, or on their way to be routed again) are
//! bounded: past `forward_max_bytes`, receivers push back. They count until
//! the peer confirmed them, so a leaving node that waits for [`Forwarder::drained`]
//! does not exit with a delivery still on the wire.

use super::{
    membership::Membership,
    peer::{Delivery, HandedDecision},
    ring::PeerId,
};
use crate::{
    metrics::Metrics,
    trace::{self, TraceBatch},
};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tailgate_contract::backoff::Backoff;
use tokio::sync::{Notify, mpsc};
use tracing::warn;

#[derive(Default)]
struct Queue {
    batches: Vec<TraceBatch>,
    decisions: Vec<HandedDecision>,
    bytes: usize,
}

/// Spans delivered recently to one peer (time, count): what it may still
/// hold undecided, and would lose if it crashed. Kept apart from the queue,
/// which goes away with the peer.
type Delivered = std::collections::VecDeque<(tokio::time::Instant, usize)>;

pub struct Forwarder {
    membership: Arc<Membership>,
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<PeerId, Queue>>,
    delivered: Mutex<HashMap<PeerId, Delivered>>,
    /// Queued, in flight, or being routed again: released only once a peer
    /// confirmed the delivery or the spans were routed again.
    bytes: AtomicUsize,
    /// The spans in `bytes`: what a shutdown that cannot wait any longer
    /// counts as possibly lost.
    spans: AtomicUsize,
    max_bytes: usize,
    flush: Duration,
    /// How long a delivered span may stay undecided at its owner.
    holding: Duration,
    /// Spans whose peer left the ring, to be routed again.
    reroute: mpsc::UnboundedSender<Rerouted>,
    drained: Notify,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Spans taken off the forwarder to be routed again (their peer left) or
/// kept here (a shutdown's handoff ran out of time). Their bytes stay
/// pending in the forwarder until this is dropped, that is, until they
/// have been routed.
pub struct Rerouted {
    pub batches: Vec<TraceBatch>,
    forwarder: Arc<Forwarder>,
    bytes: usize,
    spans: usize,
}

impl Drop for Rerouted {
    fn drop(&mut self) {
        self.forwarder.release(self.bytes, self.spans);
    }
}

/// Bytes a handed-off decision counts for in the backlog.
const DECISION_BYTES: usize = 64;
/// Longest wait between deliveries to a peer that fails them: a peer is
/// usually back within seconds, or dropped from the ring by then.
const PEER_RETRY_MAX: Duration = Duration::from_secs(2);

impl Forwarder {
    pub fn new(
        membership: Arc<Membership>,
        metrics: Arc<Metrics>,
        max_bytes: usize,
        flush: Duration,
        holding: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Rerouted>) {
        let (reroute, rerouted) = mpsc::unbounded_channel();
        let f = Arc::new(Self {
            membership,
            metrics,
            queues: Mutex::default(),
            delivered: Mutex::default(),
            bytes: AtomicUsize::new(0),
            spans: AtomicUsize::new(0),
            max_bytes,
            flush,
            holding,
            reroute,
            drained: Notify::new(),
        });
        (f, rerouted)
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<PeerId, Queue>> {
        // Each critical section leaves the map consistent.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Spans queued for peers or on the wire, not yet confirmed.
    pub fn pending_spans(&self) -> usize {
        self.spans.load(Ordering::Relaxed)
    }

    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    /// Queues spans for `peer`, starting its sender if it has none.
    pub fn spans(self: &Arc<Self>, peer: &PeerId, batch: TraceBatch) {
        self.push(peer, |q| {
            let counted = (batch.bytes, batch.span_count);
            q.batches.push(batch);
            counted
        });
    }

    /// Queues decisions for `peer` (a handoff).
    pub fn decisions(self: &Arc<Self>, peer: &PeerId, decisions: Vec<HandedDecision>) {
        self.push(peer, |q| {
            let bytes = decisions.len() * DECISION_BYTES;
            q.decisions.extend(decisions);
            (bytes, 0)
        });
    }

    /// Adds to `peer`'s queue; `add` returns the bytes and spans it added.
    fn push(self: &Arc<Self>, peer: &PeerId, add: impl FnOnce(&mut Queue) -> (usize, usize)) {
        let mut queues = self.queues();
        let start = !queues.contains_key(peer);
        let q = queues.entry(peer.clone()).or_default();
        let (bytes, spans) = add(q);
        q.bytes += bytes;
        self.spans.fetch_add(spans, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        drop(queues);
        if start {
            let me = Arc::clone(self);
            let peer = peer.clone();
            tokio::spawn(async move { me.send_loop(peer).await });
        }
    }

    /// Marks `bytes` holding `spans` as delivered (or routed again).
    fn release(&self, bytes: usize, spans: usize) {
        self.spans.fetch_sub(spans, Ordering::Relaxed);
        if bytes > 0 && self.bytes.fetch_sub(bytes, Ordering::Relaxed) == bytes {
            self.drained.notify_waiters();
        }
    }

    /// Resolves once nothing is queued for, or on its way to, any peer.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.bytes() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Takes what is queued for `peer` (its delivery record stays); its
    /// bytes stay pending until released.
    fn take(&self, peer: &PeerId) -> (Vec<TraceBatch>, Vec<HandedDecision>, usize) {
        let mut queues = self.queues();
        let Some(q) = queues.get_mut(peer) else {
            return (Vec::new(), Vec::new(), 0);
        };
        let bytes = std::mem::take(&mut q.bytes);
        (
            std::mem::take(&mut q.batches),
            std::mem::take(&mut q.decisions),
            bytes,
        )
    }

    /// Puts an undelivered delivery back in front of what was queued since.
    fn put_back(
        &self,
        peer: &PeerId,
        mut batches: Vec<TraceBatch>,
        mut decisions: Vec<HandedDecision>,
        bytes: usize,
    ) {
        let mut queues = self.queues();
        let q = queues.entry(peer.clone()).or_default();
        batches.append(&mut q.batches);
        decisions.append(&mut q.decisions);
        q.batches = batches;
        q.decisions = decisions;
        q.bytes += bytes;
    }

    /// Takes every queued span back (decisions are dropped: this node is
    /// leaving and will decide the spans itself). Deliveries already on the
    /// wire are not recalled.
    pub fn reclaim(self: &Arc<Self>) -> Rerouted {
        let mut batches = Vec::new();
        let mut bytes = 0;
        for q in self.queues().values_mut() {
            batches.append(&mut q.batches);
            q.decisions.clear();
            bytes += std::mem::take(&mut q.bytes);
        }
        let spans = batches.iter().map(|b| b.span_count).sum();
        Rerouted {
            batches,
            forwarder: Arc::clone(self),
            bytes,
            spans,
        }
    }

    fn delivered(&self) -> MutexGuard<'_, HashMap<PeerId, Delivered>> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_delivery(&self, peer: &PeerId, spans: usize) {
        let now = tokio::time::Instant::now();
        let mut delivered = self.delivered();
        let recent = delivered.entry(peer.clone()).or_default();
        recent.push_back((now, spans));
        while recent.front().is_some_and(|(t, _)| now - *t > self.holding) {
            recent.pop_front();
        }
    }

    /// Spans delivered to `peer` recently enough that it may still have held
    /// them undecided: an upper bound of what its crash lost of ours.
    /// Forgets the record: a peer is counted once per failure.
    pub fn possibly_lost_with(&self, peer: &PeerId) -> usize {
        let now = tokio::time::Instant::now();
        self.delivered().remove(peer).map_or(0, |recent| {
            recent
                .iter()
                .filter(|(t, _)| now - *t <= self.holding)
                .map(|(_, n)| n)
                .sum()
        })
    }

    /// Ends the sender of a peer that left the ring once nothing is queued for it.
    fn retire_if_gone(&self, peer: &PeerId) -> bool {
        if self.membership.ring().contains(peer) {
            return false;
        }
        let mut queues = self.queues();
        let empty = queues.get(peer).is_none_or(|q| q.bytes == 0);
        if empty {
            queues.remove(peer);
        }
        empty
    }

    async fn send_loop(self: Arc<Self>, peer: PeerId) {
        // From one flush interval (never zero: the configuration refuses
        // that) to at most PEER_RETRY_MAX.
        let mut backoff =
            Backoff::try_new(self.flush, PEER_RETRY_MAX.max(self.flush)).unwrap_or_default();
        loop {
            tokio::time::sleep(self.flush).await;
            let (batches, decisions, bytes) = self.take(&peer);
            if bytes == 0 {
                if self.retire_if_gone(&peer) {
                    return;
                }
                continue;
            }
            let spans: usize = batches.iter().map(|b| b.span_count).sum();
            if !self.membership.ring().contains(&peer) {
                // The owner left: its spans go to whoever owns them now;
                // decisions are handed off again by the rebalance.
                let decision_bytes = decisions.len() * DECISION_BYTES;
                self.release(decision_bytes, 0);
                let rerouted = Rerouted {
                    batches,
                    forwarder: Arc::clone(&self),
                    bytes: bytes - decision_bytes,
                    spans,
                };
                // Fails only when the node is gone; dropping releases the bytes.
                let _ = self.reroute.send(rerouted);
                continue;
            }
            let delivery = Delivery {
                from: self.membership.me().to_string(),
                spans: trace::encode(batches.iter().flat_map(|b| &b.fragments)).into(),
                decisions,
            };
            let result = match self.membership.client(&peer) {
                Some(client) => client
                    .deliver(&delivery)
                    .await
                    .map_err(|s| s.message().to_owned()),
                None => Err("unknown peer".to_owned()),
            };
            match result {
                Ok(()) => {
                    self.metrics.cluster.forwarded(&peer, spans, bytes);
                    self.record_delivery(&peer, spans);
                    self.release(bytes, spans);
                    backoff.reset();
                }
                Err(error) => {
                    self.metrics.cluster.peer_error(&peer);
                    warn!(peer = %peer, %error, spans, "delivery to peer failed; retrying");
                    self.put_back(&peer, batches, delivery.decisions, bytes);
                    backoff.wait().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::peer::{Hello, PeerHandler, PeerService},
        route::tests::{request, span, split_request},
    };
    use futures_util::FutureExt;
    use std::sync::mpsc as blocking;
    use tokio::net::TcpListener;

    /// A peer that reports each delivery as it arrives and answers it only
    /// when the test says so.
    struct HeldPeer {
        arrived: mpsc::UnboundedSender<usize>,
        release: Mutex<blocking::Receiver<()>>,
    }

    impl PeerHandler for HeldPeer {
        fn hello(&self, hello: Hello) -> Hello {
            hello
        }
        fn deliver(&self, delivery: Delivery) -> Result<(), tonic::Status> {
            let _ = self.arrived.send(delivery.spans.len());
            let release = self.release.lock().unwrap();
            tokio::task::block_in_place(|| release.recv()).unwrap();
            Ok(())
        }
    }

    fn forwarder(peer: &str) -> (Arc<Forwarder>, mpsc::UnboundedReceiver<Rerouted>) {
        let metrics = Arc::new(Metrics::new());
        let membership = Arc::new(Membership::new(
            "127.0.0.1:1".into(),
            Vec::new(),
            None,
            Duration::from_secs(60),
            Arc::clone(&metrics),
        ));
        // The peer greets: it is in the ring from now on.
        membership.greeted(&Hello {
            from: peer.into(),
            leaving: false,
        });
        assert!(membership.ring().contains(peer));
        Forwarder::new(
            membership,
            metrics,
            1 << 20,
            Duration::from_millis(1),
            Duration::from_secs(30),
        )
    }

    fn batch(trace: u8) -> TraceBatch {
        let mut routed = split_request(&request(vec![("shop-api", vec![span(trace, 1, None)])]));
        routed.batches.remove(0)
    }

    /// A delivery on the wire still counts: `drained` (what a leaving node
    /// waits for before it exits) resolves only once the peer confirmed it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drained_waits_for_the_delivery_on_the_wire() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = listener.local_addr().unwrap().to_string();
        let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
        let (release, release_rx) = blocking::channel();
        let service = PeerService::new(
            Arc::new(HeldPeer {
                arrived: arrived_tx,
                release: Mutex::new(release_rx),
            }),
            1 << 20,
        );
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let (forwarder, _rerouted) = forwarder(&peer);

        forwarder.spans(&peer.as_str().into(), batch(1));
        assert!(arrived.recv().await.unwrap() > 0);
        assert!(forwarder.bytes() > 0, "in flight counts as pending");
        assert_eq!(forwarder.pending_spans(), 1);
        assert!(
            forwarder.drained().now_or_never().is_none(),
            "drained while a delivery was unconfirmed"
        );
        release.send(()).unwrap();
        forwarder.drained().await;
        assert_eq!(forwarder.bytes(), 0);
        assert_eq!(forwarder.pending_spans(), 0);
        server.abort();
    }

    /// Spans queued for a peer that left are handed back to be routed again,
    /// and stay pending until they have been; the decisions queued with them
    /// are released at once (the rebalance hands them off again).
    #[tokio::test(start_paused = true)]
    async fn spans_for_a_peer_that_left_stay_pending_until_rerouted() {
        let peer = "127.0.0.1:2";
        let (forwarder, mut rerouted) = forwarder(peer);
        let id: PeerId = peer.into();
        forwarder.spans(&id, batch(1));
        forwarder.decisions(&id, vec![HandedDecision::default()]);
        let queued = forwarder.bytes();
        forwarder.membership.greeted(&Hello {
            from: peer.into(),
            leaving: true,
        });
        let spans = rerouted.recv().await.unwrap();
        assert_eq!(spans.batches.len(), 1);
        assert_eq!(forwarder.bytes(), queued - DECISION_BYTES);
        assert_eq!(forwarder.pending_spans(), 1);
        assert!(forwarder.drained().now_or_never().is_none());
        drop(spans);
        forwarder.drained().await;
        assert_eq!(forwarder.pending_spans(), 0);
    }

    /// A shutdown that ran out of time takes back what is still queued:
    /// every span comes back, and nothing stays pending once it is handled.
    #[tokio::test(start_paused = true)]
    async fn reclaim_takes_back_every_queued_span() {
        let peer = "127.0.0.1:3";
        let (forwarder, _rerouted) = forwarder(peer);
        let id: PeerId = peer.into();
        forwarder.spans(&id, batch(1));
        forwarder.spans(&id, batch(2));
        let back = forwarder.reclaim();
        assert_eq!(back.batches.len(), 2);
        assert!(forwarder.bytes() > 0);
        assert_eq!(forwarder.pending_spans(), 2);
        drop(back);
        assert_eq!(forwarder.bytes(), 0);
        assert_eq!(forwarder.pending_spans(), 0);
        forwarder.drained().await;
    }
}
