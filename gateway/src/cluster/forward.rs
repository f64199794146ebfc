//! Spans (and handed-off decisions) on their way to the peer that owns them.
//!
//! One queue per peer, flushed every `forward_flush_secs` by one task per
//! peer as a single compressed delivery. A failed delivery stays queued and
//! is retried with backoff; if the peer drops out of the ring meanwhile, its
//! queued spans are routed again (to the new owner, maybe this node). Queued
//! bytes are bounded: past `forward_max_bytes`, receivers push back.

use super::{
    membership::Membership,
    peer::{Delivery, HandedDecision},
    ring::PeerId,
};
use crate::{
    metrics::Metrics,
    route::{self, TraceBatch},
};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
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
    bytes: AtomicUsize,
    max_bytes: usize,
    flush: Duration,
    /// How long a delivered span may stay undecided at its owner.
    holding: Duration,
    /// Spans whose peer left the ring, to be routed again.
    reroute: mpsc::UnboundedSender<Vec<TraceBatch>>,
    drained: Notify,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Bytes a handed-off decision counts for in the backlog.
const DECISION_BYTES: usize = 64;

impl Forwarder {
    pub fn new(
        membership: Arc<Membership>,
        metrics: Arc<Metrics>,
        max_bytes: usize,
        flush: Duration,
        holding: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Vec<TraceBatch>>) {
        let (reroute, rerouted) = mpsc::unbounded_channel();
        let f = Arc::new(Self {
            membership,
            metrics,
            queues: Mutex::default(),
            delivered: Mutex::default(),
            bytes: AtomicUsize::new(0),
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

    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    /// Queues spans for `peer`, starting its sender if it has none.
    pub fn spans(self: &Arc<Self>, peer: &PeerId, batch: TraceBatch) {
        self.push(peer, |q| {
            let bytes = batch.bytes;
            q.batches.push(batch);
            bytes
        });
    }

    /// Queues decisions for `peer` (a handoff).
    pub fn decisions(self: &Arc<Self>, peer: &PeerId, decisions: Vec<HandedDecision>) {
        self.push(peer, |q| {
            let bytes = decisions.len() * DECISION_BYTES;
            q.decisions.extend(decisions);
            bytes
        });
    }

    fn push(self: &Arc<Self>, peer: &PeerId, add: impl FnOnce(&mut Queue) -> usize) {
        let mut queues = self.queues();
        let start = !queues.contains_key(peer);
        let q = queues.entry(peer.clone()).or_default();
        let bytes = add(q);
        q.bytes += bytes;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        drop(queues);
        if start {
            let me = Arc::clone(self);
            let peer = peer.clone();
            tokio::spawn(async move { me.send_loop(peer).await });
        }
    }

    /// Resolves once nothing is queued for any peer.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.bytes() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Takes what is queued for `peer` (its delivery record stays).
    fn take(&self, peer: &PeerId) -> (Vec<TraceBatch>, Vec<HandedDecision>, usize) {
        let mut queues = self.queues();
        let Some(q) = queues.get_mut(peer) else {
            return (Vec::new(), Vec::new(), 0);
        };
        let bytes = std::mem::take(&mut q.bytes);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
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
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
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
        let mut backoff = self.flush;
        loop {
            tokio::time::sleep(self.flush).await;
            let (batches, decisions, bytes) = self.take(&peer);
            if bytes == 0 {
                if self.bytes() == 0 {
                    self.drained.notify_waiters();
                }
                if self.retire_if_gone(&peer) {
                    return;
                }
                continue;
            }
            if !self.membership.ring().contains(&peer) {
                // The owner left: its spans go to whoever owns them now;
                // decisions are handed off again by the rebalance.
                let _ = self.reroute.send(batches);
                continue;
            }
            let spans: usize = batches.iter().map(|b| b.span_count).sum();
            let delivery = Delivery {
                from: self.membership.me().to_string(),
                spans: route::encode(batches.iter().flat_map(|b| &b.fragments)).into(),
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
                    self.metrics.forwarded(&peer, spans, bytes);
                    self.record_delivery(&peer, spans);
                    backoff = self.flush;
                }
                Err(error) => {
                    self.metrics.cluster_peer_error(&peer);
                    warn!(peer = %peer, %error, spans, "delivery to peer failed; retrying");
                    self.put_back(&peer, batches, delivery.decisions, bytes);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
