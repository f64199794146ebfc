//! Ownership: rendezvous (highest-random-weight) hashing of trace IDs over
//! the live peers. Every node computes the same owner from the same peer
//! set, and when a peer joins or leaves only the traces it gains or loses
//! change owner.

use std::sync::Arc;
use tailgate_sampling_rules::TraceId;

/// A peer's identity: its advertised internal address (`host:port`).
pub type PeerId = Arc<str>;

/// The live peer set, ready for owner lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by id; each with a 64-bit key derived from it once.
    peers: Vec<(PeerId, u64)>,
}

/// FNV-1a: a stable hash of a peer's id (the same on every node and build).
fn peer_key(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A strong 64-bit mixer (MurmurHash3's finaliser).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The weight of `peer` for a trace: rendezvous hashing picks the heaviest.
fn weight(key: u64, hi: u64, lo: u64) -> u64 {
    mix(mix(hi ^ key) ^ lo.rotate_left(17) ^ key.rotate_left(31))
}

impl Ring {
    pub fn new(peers: impl IntoIterator<Item = PeerId>) -> Self {
        let mut peers: Vec<(PeerId, u64)> = peers
            .into_iter()
            .map(|p| {
                let k = peer_key(&p);
                (p, k)
            })
            .collect();
        peers.sort_by(|a, b| a.0.cmp(&b.0));
        peers.dedup_by(|a, b| a.0 == b.0);
        Self { peers }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.peers.iter().any(|(p, _)| &**p == id)
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.iter().map(|(p, _)| p)
    }

    /// The owner of a trace; `None` only for an empty ring.
    pub fn owner(&self, trace: &TraceId) -> Option<&PeerId> {
        let hi = u64::from_be_bytes(trace.0[..8].try_into().unwrap_or_default());
        let lo = u64::from_be_bytes(trace.0[8..].try_into().unwrap_or_default());
        self.peers
            .iter()
            .max_by_key(|(_, key)| weight(*key, hi, lo))
            .map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> Ring {
        Ring::new((0..n).map(|i| PeerId::from(format!("10.0.0.{}:4319", i + 1))))
    }

    fn id(n: u64) -> TraceId {
        let a = mix(n.wrapping_add(0x9E37_79B9_7F4A_7C15));
        let b = mix(a ^ n);
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&a.to_be_bytes());
        t[8..].copy_from_slice(&b.to_be_bytes());
        TraceId(t)
    }

    /// Over 1 million random trace IDs, the busiest of 3, 5 and 20 nodes
    /// gets at most 5% more than its fair share (figures in docs/cluster.md).
    #[test]
    fn spread_is_even() {
        for n in [3usize, 5, 20] {
            let r = ring(n);
            let mut counts = std::collections::HashMap::new();
            let total = 1_000_000u64;
            for i in 0..total {
                *counts
                    .entry(r.owner(&id(i)).unwrap().clone())
                    .or_insert(0u64) += 1;
            }
            let fair = total as f64 / n as f64;
            let busiest = *counts.values().max().unwrap() as f64;
            let excess = busiest / fair - 1.0;
            eprintln!(
                "spread: {n} nodes, busiest {busiest} of fair {fair:.0}: +{:.2}%",
                excess * 100.0
            );
            assert!(
                excess <= 0.05,
                "{n} nodes: busiest {busiest} vs fair {fair:.0} ({:.2}%)",
                excess * 100.0
            );
        }
    }

    /// Adding a node moves only the traces it takes; removing it moves them back.
    #[test]
    fn minimal_movement() {
        let three = ring(3);
        let four = ring(4);
        let new: PeerId = "10.0.0.4:4319".into();
        for i in 0..20_000 {
            let t = id(i);
            let before = three.owner(&t).unwrap();
            let after = four.owner(&t).unwrap();
            assert!(
                after == before || *after == new,
                "trace {i} moved between old nodes"
            );
        }
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let a = Ring::new(["b:1".into(), "a:1".into(), "b:1".into()]);
        let b = Ring::new(["a:1".into(), "b:1".into()]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert!(Ring::new(std::iter::empty()).owner(&id(1)).is_none());
    }
}
