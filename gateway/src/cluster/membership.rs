//! Who is in the cluster.
//!
//! Sources: seed addresses in the config, and a DNS name (a Kubernetes
//! headless Service) resolved every `refresh_secs`, every address a peer.
//! Every `refresh_secs` a node says hello to each peer it knows; a peer that
//! answers, or that says hello itself, is alive. A node joins by greeting its
//! seeds, which then know it too. A peer silent for `peer_timeout_secs` is
//! dropped; a peer that says it is leaving is dropped at once. The live set
//! (this node included, unless it is leaving) is the rendezvous ring.

use super::{
    peer::{Hello, PeerClient},
    ring::{PeerId, Ring},
};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tracing::{error, info, warn};

#[derive(Debug)]
struct Peer {
    client: PeerClient,
    /// Last time it answered a hello or sent one.
    last_seen: Option<Instant>,
    /// When it was first heard of.
    since: Instant,
    /// Listed by a seed or DNS (kept while listed, even if silent).
    listed: bool,
    /// Said it is leaving.
    left: Option<Instant>,
}

#[derive(Debug)]
pub struct Membership {
    me: PeerId,
    seeds: Vec<String>,
    dns: Option<String>,
    peer_timeout: Duration,
    peers: Mutex<HashMap<PeerId, Peer>>,
    ring: ArcSwap<Ring>,
    changes: watch::Sender<u64>,
    leaving: AtomicBool,
    listed_in_dns: AtomicBool,
    /// Peers that dropped out of the ring without saying they leave.
    failed: Mutex<Vec<PeerId>>,
    metrics: Arc<Metrics>,
}

impl Membership {
    pub fn new(
        me: PeerId,
        seeds: Vec<String>,
        dns: Option<String>,
        peer_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ring = Ring::new([me.clone()]);
        metrics.cluster.set_peers(1);
        Self {
            me,
            seeds,
            dns,
            peer_timeout,
            peers: Mutex::default(),
            ring: ArcSwap::from_pointee(ring),
            changes: watch::channel(0).0,
            leaving: AtomicBool::new(false),
            listed_in_dns: AtomicBool::new(true),
            failed: Mutex::default(),
            metrics,
        }
    }

    pub fn me(&self) -> &PeerId {
        &self.me
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }

    /// Ticks on every change of the live set.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Ready means: this node is in its own live set, and in DNS if DNS is used.
    pub fn is_member(&self) -> bool {
        !self.leaving.load(Ordering::Relaxed) && self.listed_in_dns.load(Ordering::Relaxed)
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<PeerId, Peer>> {
        // Each critical section leaves the map consistent.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add<'a>(
        peers: &'a mut HashMap<PeerId, Peer>,
        id: &str,
        now: Instant,
    ) -> Option<&'a mut Peer> {
        if !peers.contains_key(id) {
            let client = match PeerClient::new(id) {
                Ok(c) => c,
                Err(e) => {
                    warn!(peer = id, error = %e, "not a peer address");
                    return None;
                }
            };
            peers.insert(
                PeerId::from(id),
                Peer {
                    client,
                    last_seen: None,
                    since: now,
                    listed: false,
                    left: None,
                },
            );
        }
        peers.get_mut(id)
    }

    /// The client of a peer, if it is known.
    pub fn client(&self, peer: &str) -> Option<PeerClient> {
        self.peers().get(peer).map(|p| p.client.clone())
    }

    fn hello_message(&self) -> Hello {
        Hello {
            from: self.me.to_string(),
            leaving: self.is_leaving(),
        }
    }

    /// A peer greeted this node: it is alive, or leaving.
    pub fn greeted(&self, hello: &Hello) -> Hello {
        if hello.from != *self.me {
            let now = Instant::now();
            let mut peers = self.peers();
            if let Some(p) = Self::add(&mut peers, &hello.from, now) {
                if hello.leaving {
                    p.left = Some(now);
                } else {
                    p.left = None;
                    p.last_seen = Some(now);
                }
            }
            drop(peers);
            self.recompute();
        }
        self.hello_message()
    }

    async fn resolve(&self) -> Option<BTreeSet<String>> {
        let name = self.dns.as_deref()?;
        match tokio::net::lookup_host(name).await {
            Ok(addrs) => Some(addrs.map(|a| a.to_string()).collect()),
            Err(e) => {
                warn!(name, error = %e, "cannot resolve the peer DNS name");
                None
            }
        }
    }

    /// Re-reads the sources, greets every known peer, drops the silent ones.
    pub async fn refresh(&self) {
        let now = Instant::now();
        let resolved = self.resolve().await;
        if let Some(addrs) = &resolved {
            let listed = addrs.is_empty() || addrs.contains(&*self.me);
            if !listed && self.listed_in_dns.load(Ordering::Relaxed) {
                error!(me = %self.me, dns = ?self.dns, found = ?addrs, "this node is not among the addresses of its peer DNS name: check cluster.advertise (or POD_IP) and the headless Service");
            }
            self.listed_in_dns.store(listed, Ordering::Relaxed);
        }
        let targets: Vec<(PeerId, PeerClient)> = {
            let mut peers = self.peers();
            for p in peers.values_mut() {
                p.listed = false;
            }
            let listed = self.seeds.iter().chain(resolved.iter().flatten());
            for id in listed.filter(|id| **id != *self.me) {
                if let Some(p) = Self::add(&mut peers, id, now) {
                    p.listed = true;
                }
            }
            peers
                .iter()
                .filter(|(_, p)| p.left.is_none())
                .map(|(id, p)| (id.clone(), p.client.clone()))
                .collect()
        };
        let hello = self.hello_message();
        let mut calls = JoinSet::new();
        for (id, client) in targets {
            let hello = hello.clone();
            calls.spawn(async move { (id, client.hello(&hello).await) });
        }
        let mut answers = Vec::new();
        while let Some(Ok(answer)) = calls.join_next().await {
            answers.push(answer);
        }
        let now = Instant::now();
        {
            let mut peers = self.peers();
            for (id, answer) in answers {
                let Some(p) = peers.get_mut(&id) else {
                    continue;
                };
                match answer {
                    Ok(reply) if reply.leaving => p.left = Some(now),
                    Ok(_) => p.last_seen = Some(now),
                    Err(e) => {
                        if p.last_seen.is_some_and(|t| now - t >= self.peer_timeout) {
                            self.metrics.cluster.peer_error(&id);
                        }
                        tracing::debug!(peer = %id, error = %e, "peer did not answer");
                    }
                }
            }
            let timeout = self.peer_timeout;
            peers.retain(|_, p| {
                let heard = p.last_seen.unwrap_or(p.since);
                p.listed || now - heard < timeout * 4
            });
        }
        self.recompute();
    }

    /// Rebuilds the ring from the live peers; publishes it if it changed.
    fn recompute(&self) {
        let now = Instant::now();
        let mut live: Vec<PeerId> = self
            .peers()
            .iter()
            .filter(|(_, p)| {
                p.left.is_none() && p.last_seen.is_some_and(|t| now - t < self.peer_timeout)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !self.is_leaving() {
            live.push(self.me.clone());
        }
        let ring = Ring::new(live);
        let old = self.ring.load_full();
        if *old != ring {
            let peers = self.peers();
            let failed: Vec<PeerId> = old
                .peers()
                .filter(|p| !ring.contains(p) && **p != self.me)
                .filter(|p| peers.get(&***p).is_none_or(|peer| peer.left.is_none()))
                .cloned()
                .collect();
            drop(peers);
            for p in &failed {
                warn!(peer = %p, "peer stopped answering; dropped from the ring");
            }
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(failed);
            info!(peers = ?ring.peers().collect::<Vec<_>>(), "cluster membership changed");
            self.metrics.cluster.set_peers(ring.len());
            self.metrics.cluster.membership_change();
            self.ring.store(Arc::new(ring));
            self.changes.send_modify(|g| *g += 1);
        }
    }

    /// Peers that vanished since the last call, without leaving.
    pub fn take_failed(&self) -> Vec<PeerId> {
        std::mem::take(&mut *self.failed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Graceful exit: drop out of the ring, and tell every peer at once.
    pub async fn leave(&self, within: Duration) {
        self.leaving.store(true, Ordering::Relaxed);
        self.recompute();
        let hello = self.hello_message();
        let clients: Vec<PeerClient> = self.peers().values().map(|p| p.client.clone()).collect();
        let mut calls = JoinSet::new();
        for client in clients {
            let hello = hello.clone();
            calls.spawn(async move { client.hello(&hello).await });
        }
        let _ = tokio::time::timeout(within, async { while calls.join_next().await.is_some() {} })
            .await;
    }
}
