//! The cluster: gateway nodes share traces by trace ID.
//!
//! Every node hashes a span's trace ID onto the live peer set ([`ring`]),
//! and sends spans it does not own to the owner ([`forward`], over the
//! [`peer`] protocol), so all spans of a trace meet on one node. When the
//! live set changes ([`membership`]), each node hands the buffered traces and
//! remembered decisions it no longer owns to their new owner.

pub mod forward;
pub mod membership;
pub mod peer;
pub mod ring;

use crate::{config, decide::cache::Verdict, metrics::Metrics};
use forward::{Forwarder, Rerouted};
use membership::Membership;
use peer::HandedDecision;
use ring::PeerId;
use std::{sync::Arc, time::Duration};
use tailgate_sampling_rules::{Kept, Randomness, RuleName, Threshold, TraceId};
use tokio::sync::mpsc;

/// Where a trace's spans go.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner {
    Me,
    Peer(PeerId),
}

#[derive(Debug)]
pub struct Cluster {
    pub membership: Arc<Membership>,
    pub forwarder: Arc<Forwarder>,
}

impl Cluster {
    /// `holding`: how long a peer may hold spans undecided (for loss accounting).
    pub fn new(
        cfg: &config::Cluster,
        me: PeerId,
        metrics: Arc<Metrics>,
        holding: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<Rerouted>) {
        let membership = Arc::new(Membership::new(
            me,
            cfg.peers.clone(),
            cfg.dns.clone(),
            cfg.peer_timeout,
            Arc::clone(&metrics),
        ));
        let (forwarder, rerouted) = Forwarder::new(
            Arc::clone(&membership),
            metrics,
            cfg.forward_max_bytes.get(),
            cfg.forward_flush,
            holding,
        );
        (
            Self {
                membership,
                forwarder,
            },
            rerouted,
        )
    }

    /// The owner of a trace in the current ring.
    pub fn owner(&self, trace: &TraceId) -> Owner {
        let ring = self.membership.ring();
        match ring.owner(trace) {
            Some(p) if p != self.membership.me() => Owner::Peer(p.clone()),
            _ => Owner::Me,
        }
    }
}

/// A remembered decision, as handed to a trace's new owner.
pub fn handed(trace_id: &TraceId, verdict: &Verdict) -> HandedDecision {
    match verdict {
        Verdict::Keep(k) => HandedDecision {
            trace_id: trace_id.0.to_vec(),
            keep: true,
            rule: k.kept.rule.to_string(),
            th: k.kept.threshold.map(|t| t.to_th()),
            adjusted_count: k.kept.adjusted_count,
            root_service: k.root_service.to_string(),
            rv: k.kept.randomness.map(Randomness::to_rv),
        },
        Verdict::Drop => HandedDecision {
            trace_id: trace_id.0.to_vec(),
            keep: false,
            ..Default::default()
        },
    }
}

/// A handed decision back as a verdict; `None` for a bad trace ID.
pub fn verdict(d: &HandedDecision) -> Option<(TraceId, Verdict)> {
    let id = TraceId::from_slice(&d.trace_id)?;
    let verdict = if d.keep {
        Verdict::keep(
            Kept {
                rule: RuleName::new(&d.rule),
                threshold: d.th.as_deref().and_then(Threshold::from_th),
                adjusted_count: d.adjusted_count,
                randomness: d.rv.as_deref().and_then(Randomness::from_rv),
            },
            d.root_service.as_str().into(),
        )
    } else {
        Verdict::Drop
    };
    Some((id, verdict))
}
