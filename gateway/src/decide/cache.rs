//! Decisions remembered for late spans.
//!
//! Spans can arrive after their trace was decided (slow exporters, retries).
//! The cache answers for them: a late span of a kept trace is published with
//! the same decision, one of a dropped trace is dropped and counted. Entries
//! expire after `ttl` and the cache holds at most `max_entries`; both evict
//! oldest first from one FIFO, since every entry has the same lifetime.

use crate::config;
// Trace IDs are random, but clients choose them: a seeded hash, and a fast one.
use dashmap::DashMap;
use foldhash::fast::RandomState;
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tailgate_sampling_rules::{Kept, TraceId};
use tokio::time::Instant;

/// A remembered decision. Kept traces carry what their late spans need to be
/// published the same way; dropped ones only their ID. One pointer wide, so
/// a cache entry is 32 bytes: the cache holds up to a million of them.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Keep(Arc<KeptTrace>),
    Drop,
}

#[derive(Debug, PartialEq)]
pub struct KeptTrace {
    pub kept: Kept,
    pub root_service: Arc<str>,
}

impl Verdict {
    pub fn keep(kept: Kept, root_service: Arc<str>) -> Self {
        Verdict::Keep(Arc::new(KeptTrace { kept, root_service }))
    }
}

#[derive(Debug)]
pub struct DecisionCache {
    map: DashMap<TraceId, (Verdict, u64), RandomState>,
    order: Mutex<VecDeque<(Instant, TraceId, u64)>>,
    stamp: AtomicU64,
    ttl: Duration,
    max_entries: usize,
}

impl DecisionCache {
    pub fn new(cfg: &config::DecisionCache) -> Self {
        let max_entries = cfg.max_entries.get();
        // Sized for the limit up front: growing a table of a million entries
        // by doubling copies it again and again while traffic is heaviest.
        // Pages are only resident once entries are written to them.
        Self {
            map: DashMap::with_capacity_and_hasher(max_entries, RandomState::default()),
            order: Mutex::new(VecDeque::with_capacity(max_entries)),
            stamp: AtomicU64::new(0),
            ttl: cfg.ttl,
            max_entries,
        }
    }

    pub fn get(&self, id: &TraceId) -> Option<Verdict> {
        self.map.get(id).map(|e| e.0.clone())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn insert(&self, id: TraceId, verdict: Verdict, now: Instant) {
        let stamp = self.stamp.fetch_add(1, Ordering::Relaxed);
        self.map.insert(id, (verdict, stamp));
        let over = {
            let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            order.push_back((now, id, stamp));
            order.len() > self.max_entries
        };
        if over {
            self.evict(|_, len| len > self.max_entries);
        }
    }

    /// Remembers a decision made elsewhere (a handoff), unless this node has one.
    pub fn insert_if_absent(&self, id: TraceId, verdict: Verdict, now: Instant) {
        if !self.map.contains_key(&id) {
            self.insert(id, verdict, now);
        }
    }

    /// Forgets a decision (handed to the trace's new owner).
    pub fn remove(&self, id: &TraceId) {
        self.map.remove(id);
    }

    /// Every remembered decision, for handing off.
    pub fn entries(&self) -> Vec<(TraceId, Verdict)> {
        self.map
            .iter()
            .map(|e| (*e.key(), e.value().0.clone()))
            .collect()
    }

    /// Forgets decisions older than the TTL.
    pub fn expire(&self, now: Instant) {
        self.evict(|at, _| now.saturating_duration_since(at) >= self.ttl);
    }

    fn evict(&self, evict_front: impl Fn(Instant, usize) -> bool) {
        loop {
            let popped = {
                let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
                match order.front() {
                    Some(&(at, _, _)) if evict_front(at, order.len()) => order.pop_front(),
                    _ => None,
                }
            };
            let Some((_, id, stamp)) = popped else { return };
            // A newer decision for the same trace keeps its own entry.
            self.map.remove_if(&id, |_, (_, s)| *s == stamp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    fn cache(max: usize) -> DecisionCache {
        DecisionCache::new(&config::DecisionCache {
            ttl: Duration::from_secs(300),
            max_entries: NonZeroUsize::new(max).unwrap(),
        })
    }

    /// A cache entry (trace ID, verdict, stamp) stays 32 bytes: at the
    /// default limit of a million entries, each byte more is a megabyte.
    #[test]
    fn entries_stay_small() {
        assert_eq!(size_of::<(TraceId, (Verdict, u64))>(), 32);
    }

    /// Decisions are forgotten after the TTL, and not before.
    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl() {
        let c = cache(10);
        c.insert(TraceId([1; 16]), Verdict::Drop, Instant::now());
        tokio::time::advance(Duration::from_secs(299)).await;
        c.expire(Instant::now());
        assert_eq!(c.get(&TraceId([1; 16])), Some(Verdict::Drop));
        tokio::time::advance(Duration::from_secs(1)).await;
        c.expire(Instant::now());
        assert_eq!(c.get(&TraceId([1; 16])), None);
        assert!(c.is_empty());
    }

    /// The entry bound evicts the oldest decision; a re-decided trace keeps its newer entry.
    #[tokio::test(start_paused = true)]
    async fn bounded() {
        let c = cache(2);
        let now = Instant::now();
        c.insert(TraceId([1; 16]), Verdict::Drop, now);
        c.insert(TraceId([2; 16]), Verdict::Drop, now);
        c.insert(TraceId([1; 16]), Verdict::Drop, now);
        // Three FIFO entries for a bound of two: the stale first one of
        // trace 1 goes, and trace 1's newer entry stays.
        assert_eq!(c.len(), 2);
        c.insert(TraceId([3; 16]), Verdict::Drop, now);
        assert_eq!(c.get(&TraceId([2; 16])), None);
        assert!(c.get(&TraceId([1; 16])).is_some());
        assert!(c.get(&TraceId([3; 16])).is_some());
    }
}
