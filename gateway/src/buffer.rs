//! Stage 3, buffer: hold each trace's spans until the trace is due for a decision.
//!
//! Traces live in a sharded concurrent map. A trace becomes due when its root
//! span arrived `decision_wait` ago, when its first span arrived
//! `trace_timeout` ago, or at once when it outgrows the per-trace limits.
//! Both deadlines are "arrival + a constant", so each kind is kept in a FIFO
//! that is already in deadline order: finding due traces costs nothing per
//! buffered trace, and the timeout FIFO doubles as the oldest-first order for
//! memory-pressure eviction. Entries made stale by an earlier decision are
//! skipped when they reach the front (each trace incarnation has a `seq`).
//!
//! While a trace is being decided its entry stays in the map as a tombstone
//! that collects spans arriving meanwhile; they are handed back with the
//! decision, so no span can slip between the buffer and the decision cache.

use crate::{
    config,
    trace::{Fragment, TraceBatch},
};
// Trace IDs are random, but clients choose them: a seeded hash, and a fast one.
use dashmap::{DashMap, mapref::entry::Entry};
use foldhash::fast::RandomState;
use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tailgate_sampling_rules::TraceId;
use tokio::time::Instant;

/// What made a trace due for its decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    RootWait,
    Timeout,
    SpanLimit,
    ByteLimit,
    MemoryPressure,
    Shutdown,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::RootWait => "root_wait",
            Trigger::Timeout => "timeout",
            Trigger::SpanLimit => "span_limit",
            Trigger::ByteLimit => "byte_limit",
            Trigger::MemoryPressure => "memory_pressure",
            Trigger::Shutdown => "shutdown",
        }
    }
}

/// Identifies one incarnation of a trace in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub trace_id: TraceId,
    seq: u64,
}

/// The result of adding a batch.
#[derive(Debug)]
pub enum Added<V> {
    /// Buffered; the trace is not due yet.
    Buffered,
    /// Buffered, and the trace outgrew a per-trace limit: decide it now.
    Due(Ticket, Trigger),
    /// The trace was decided before; the batch was not buffered.
    Late(TraceBatch, V),
}

/// A trace taken out of the buffer for its decision.
#[derive(Debug)]
pub struct TakenTrace {
    pub trace_id: TraceId,
    pub fragments: Vec<Fragment>,
    pub span_count: usize,
    pub bytes: usize,
    /// When the root span arrived, or the first span if no root came.
    pub received_at: Instant,
    pub has_root: bool,
}

#[derive(Debug)]
enum State {
    Collecting,
    /// Taken for a decision; spans arriving meanwhile wait here.
    Deciding(Vec<TraceBatch>),
}

#[derive(Debug)]
struct Buffered {
    seq: u64,
    state: State,
    fragments: Vec<Fragment>,
    span_count: usize,
    bytes: usize,
    first_seen: Instant,
    root_seen: Option<Instant>,
}

#[derive(Debug)]
struct Deadline {
    at: Instant,
    ticket: Ticket,
}

#[derive(Debug)]
pub struct Buffer {
    traces: DashMap<TraceId, Buffered, RandomState>,
    root_due: Mutex<VecDeque<Deadline>>,
    timeout_due: Mutex<VecDeque<Deadline>>,
    bytes: AtomicUsize,
    next_seq: AtomicU64,
    decision_wait: Duration,
    trace_timeout: Duration,
    max_spans_per_trace: usize,
    max_trace_bytes: usize,
}

fn lock(queue: &Mutex<VecDeque<Deadline>>) -> std::sync::MutexGuard<'_, VecDeque<Deadline>> {
    // A poisoned lock only means another thread panicked holding it; every
    // operation on the queue is a single push or pop, so it is still valid.
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

fn push(queue: &Mutex<VecDeque<Deadline>>, deadline: Deadline) {
    lock(queue).push_back(deadline);
}

impl Buffer {
    pub fn new(cfg: &config::Buffer) -> Self {
        Self {
            traces: DashMap::with_hasher(RandomState::default()),
            root_due: Mutex::default(),
            timeout_due: Mutex::default(),
            bytes: AtomicUsize::new(0),
            next_seq: AtomicU64::new(0),
            decision_wait: cfg.decision_wait,
            trace_timeout: cfg.trace_timeout,
            max_spans_per_trace: cfg.max_spans_per_trace.get(),
            max_trace_bytes: cfg.max_trace_bytes.get(),
        }
    }

    /// Encoded bytes of all buffered spans.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn traces(&self) -> usize {
        self.traces.len()
    }

    /// Adds one trace's spans. `decided` is asked only when the trace is not
    /// in the buffer, so spans of buffered traces never touch the decision cache.
    pub fn add<V>(
        &self,
        batch: TraceBatch,
        now: Instant,
        decided: impl FnOnce(&TraceId) -> Option<V>,
    ) -> Added<V> {
        let trace_id = batch.trace_id;
        self.bytes.fetch_add(batch.bytes, Ordering::Relaxed);
        match self.traces.entry(trace_id) {
            Entry::Occupied(mut occupied) => {
                let t = occupied.get_mut();
                if let State::Deciding(waiting) = &mut t.state {
                    waiting.push(batch);
                    return Added::Buffered;
                }
                let ticket = Ticket {
                    trace_id,
                    seq: t.seq,
                };
                if batch.has_root && t.root_seen.is_none() {
                    t.root_seen = Some(now);
                    push(
                        &self.root_due,
                        Deadline {
                            at: now + self.decision_wait,
                            ticket,
                        },
                    );
                }
                t.span_count += batch.span_count;
                t.bytes += batch.bytes;
                t.fragments.extend(batch.fragments);
                self.over_limit(t.span_count, t.bytes)
                    .map_or(Added::Buffered, |trigger| Added::Due(ticket, trigger))
            }
            Entry::Vacant(vacant) => {
                if let Some(verdict) = decided(&trace_id) {
                    self.bytes.fetch_sub(batch.bytes, Ordering::Relaxed);
                    return Added::Late(batch, verdict);
                }
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                let ticket = Ticket { trace_id, seq };
                push(
                    &self.timeout_due,
                    Deadline {
                        at: now + self.trace_timeout,
                        ticket,
                    },
                );
                if batch.has_root {
                    push(
                        &self.root_due,
                        Deadline {
                            at: now + self.decision_wait,
                            ticket,
                        },
                    );
                }
                let over = self.over_limit(batch.span_count, batch.bytes);
                vacant.insert(Buffered {
                    seq,
                    state: State::Collecting,
                    span_count: batch.span_count,
                    bytes: batch.bytes,
                    fragments: batch.fragments,
                    first_seen: now,
                    root_seen: batch.has_root.then_some(now),
                });
                over.map_or(Added::Buffered, |trigger| Added::Due(ticket, trigger))
            }
        }
    }

    fn over_limit(&self, spans: usize, bytes: usize) -> Option<Trigger> {
        if spans > self.max_spans_per_trace {
            Some(Trigger::SpanLimit)
        } else if bytes > self.max_trace_bytes {
            Some(Trigger::ByteLimit)
        } else {
            None
        }
    }

    /// Takes a trace out for its decision, leaving a tombstone that collects
    /// late arrivals until [`Buffer::finish`]. `None` if that incarnation was
    /// already taken.
    pub fn take(&self, ticket: Ticket) -> Option<TakenTrace> {
        let mut t = self.traces.get_mut(&ticket.trace_id)?;
        if t.seq != ticket.seq || matches!(t.state, State::Deciding(_)) {
            return None;
        }
        t.state = State::Deciding(Vec::new());
        let bytes = std::mem::take(&mut t.bytes);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        Some(TakenTrace {
            trace_id: ticket.trace_id,
            fragments: std::mem::take(&mut t.fragments),
            span_count: t.span_count,
            bytes,
            received_at: t.root_seen.unwrap_or(t.first_seen),
            has_root: t.root_seen.is_some(),
        })
    }

    /// Removes a decided trace's tombstone; returns the batches that arrived
    /// while it was decided. Call after the decision is in the cache.
    pub fn finish(&self, trace_id: &TraceId) -> Vec<TraceBatch> {
        let Some((_, t)) = self.traces.remove(trace_id) else {
            return Vec::new();
        };
        match t.state {
            State::Deciding(waiting) => {
                let bytes: usize = waiting.iter().map(|b| b.bytes).sum();
                self.bytes.fetch_sub(bytes, Ordering::Relaxed);
                waiting
            }
            State::Collecting => Vec::new(),
        }
    }

    /// Traces whose deadline has passed, root waits first.
    pub fn due(&self, now: Instant) -> Vec<(Ticket, Trigger)> {
        let mut out = Vec::new();
        for (queue, trigger) in [
            (&self.root_due, Trigger::RootWait),
            (&self.timeout_due, Trigger::Timeout),
        ] {
            // Pop under the queue lock, check liveness after releasing it:
            // `add` takes a map shard and then a queue lock, never the reverse.
            let expired: Vec<Ticket> = {
                let mut q = lock(queue);
                let n = q.iter().take_while(|d| d.at <= now).count();
                q.drain(..n).map(|d| d.ticket).collect()
            };
            out.extend(
                expired
                    .into_iter()
                    .filter(|t| self.is_live(*t))
                    .map(|t| (t, trigger)),
            );
        }
        out
    }

    /// Puts due traces back, at the front of their queue and still due, for
    /// a later sweep: their decision is held while the outbox has no room.
    pub fn hold_due(&self, due: Vec<(Ticket, Trigger)>, now: Instant) {
        for (ticket, trigger) in due.into_iter().rev() {
            let queue = match trigger {
                Trigger::RootWait => &self.root_due,
                // Limits outgrown and timeouts are due now, whatever their kind.
                _ => &self.timeout_due,
            };
            lock(queue).push_front(Deadline { at: now, ticket });
        }
    }

    /// The oldest live trace, for deciding early under memory pressure.
    pub fn oldest(&self) -> Option<Ticket> {
        loop {
            let ticket = lock(&self.timeout_due).pop_front()?.ticket;
            if self.is_live(ticket) {
                return Some(ticket);
            }
        }
    }

    /// Every buffered trace, for the shutdown flush.
    pub fn all(&self) -> Vec<Ticket> {
        self.traces
            .iter()
            .map(|t| Ticket {
                trace_id: *t.key(),
                seq: t.seq,
            })
            .collect()
    }

    fn is_live(&self, ticket: Ticket) -> bool {
        self.traces
            .get(&ticket.trace_id)
            .is_some_and(|t| t.seq == ticket.seq && matches!(t.state, State::Collecting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::tests::{request, span, split_request};
    use std::num::NonZeroUsize;

    fn buffer(max_spans: usize) -> Buffer {
        Buffer::new(&config::Buffer {
            decision_wait: Duration::from_secs(2),
            trace_timeout: Duration::from_secs(30),
            max_spans_per_trace: NonZeroUsize::new(max_spans).unwrap(),
            max_trace_bytes: NonZeroUsize::new(1 << 20).unwrap(),
            max_buffer_bytes: NonZeroUsize::new(1 << 30).unwrap(),
        })
    }

    fn batch(trace: u8, span_id: u8, root: bool) -> TraceBatch {
        let parent = (!root).then_some(99);
        split_request(&request(vec![("svc", vec![span(trace, span_id, parent)])]))
            .batches
            .remove(0)
    }

    fn never(_: &TraceId) -> Option<()> {
        None
    }

    /// A trace with a root is due `decision_wait` after the root arrived, not before.
    #[tokio::test(start_paused = true)]
    async fn root_wait() {
        let b = buffer(100);
        let t0 = Instant::now();
        assert!(matches!(
            b.add(batch(1, 2, false), t0, never),
            Added::Buffered
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        assert!(matches!(
            b.add(batch(1, 1, true), t1, never),
            Added::Buffered
        ));
        assert!(b.due(t1 + Duration::from_millis(1999)).is_empty());
        let due = b.due(t1 + Duration::from_secs(2));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, Trigger::RootWait);
        let taken = b.take(due[0].0).unwrap();
        assert_eq!(taken.span_count, 2);
        assert_eq!(taken.received_at, t1);
        assert_eq!(b.bytes(), 0);
        assert!(b.finish(&taken.trace_id).is_empty());
        assert_eq!(b.traces(), 0);
        // The timeout deadline of a decided trace is stale and skipped.
        assert!(b.due(t0 + Duration::from_secs(31)).is_empty());
    }

    /// A trace whose root never arrives is due at `trace_timeout`.
    #[tokio::test(start_paused = true)]
    async fn timeout_without_root() {
        let b = buffer(100);
        let t0 = Instant::now();
        b.add(batch(1, 2, false), t0, never);
        assert!(b.due(t0 + Duration::from_secs(29)).is_empty());
        let due = b.due(t0 + Duration::from_secs(30));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, Trigger::Timeout);
    }

    /// Outgrowing `max_spans_per_trace` makes the trace due at once.
    #[tokio::test(start_paused = true)]
    async fn span_limit() {
        let b = buffer(2);
        let now = Instant::now();
        b.add(batch(1, 1, false), now, never);
        b.add(batch(1, 2, false), now, never);
        assert!(matches!(
            b.add(batch(1, 3, false), now, never),
            Added::Due(_, Trigger::SpanLimit)
        ));
    }

    /// Spans arriving while their trace is being decided are handed back with
    /// the decision; after it, the decision cache answers for the trace.
    #[tokio::test(start_paused = true)]
    async fn arrivals_during_decision_are_not_lost() {
        let b = buffer(100);
        let now = Instant::now();
        b.add(batch(1, 1, true), now, never);
        let ticket = b.oldest().unwrap();
        let taken = b.take(ticket).unwrap();
        assert!(b.take(ticket).is_none(), "taken twice");
        let during = b.add(batch(1, 2, false), now, |_| Some("cached"));
        assert!(matches!(during, Added::Buffered));
        assert!(b.bytes() > 0);
        let waiting = b.finish(&taken.trace_id);
        assert_eq!(waiting.len(), 1);
        assert_eq!(b.bytes(), 0);
        let after = b.add(batch(1, 3, false), now, |_| Some("cached"));
        assert!(matches!(after, Added::Late(_, "cached")));
        assert_eq!(b.traces(), 0);
    }

    /// Memory-pressure eviction picks traces oldest first.
    #[tokio::test(start_paused = true)]
    async fn oldest_first() {
        let b = buffer(100);
        b.add(batch(1, 1, false), Instant::now(), never);
        tokio::time::advance(Duration::from_millis(10)).await;
        b.add(batch(2, 1, false), Instant::now(), never);
        assert_eq!(b.oldest().unwrap().trace_id, TraceId([1; 16]));
        assert_eq!(b.oldest().unwrap().trace_id, TraceId([2; 16]));
        assert!(b.oldest().is_none());
    }
}
