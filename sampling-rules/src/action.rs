//! What a matching rule does with the trace.
//!
//! `keep`, `drop` and `sample` are stateless and consistent: the same trace
//! gets the same answer on every node. `rate_limit` and `throughput` keep
//! per-key state on the node that decides; `throughput` stays consistent
//! (it picks a probability per key and applies it to the trace's
//! randomness), `rate_limit` does not (it keeps whatever fits the budget).

use crate::{
    condition::Facts,
    decision::{Decision, Kept, RuleName},
    field::SpanField,
    threshold::{Probability, Randomness, Threshold},
    trace::TraceId,
};
use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// How often per-key traffic estimates are updated.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Weight of the newest window in the moving average.
const EMA_WEIGHT: f64 = 0.5;
/// Keys past the cardinality cap share this one.
pub const OVERFLOW_KEY: &str = "__overflow__";

#[derive(Debug)]
pub enum Action {
    Keep,
    Drop,
    /// Keep 1 in N at this threshold (`None`: N so large nothing is kept),
    /// on the trace's randomness or, with `by`, on that field's value's.
    Sample(Sample),
    RateLimit(RateLimit),
    Throughput(Throughput),
}

impl Action {
    /// The span fields the action reads: the key of a per-key sampler.
    pub fn span_fields(&self) -> &[SpanField] {
        match self {
            Action::RateLimit(limit) => &limit.key,
            Action::Throughput(t) => &t.key,
            Action::Sample(s) => s.by.as_slice(),
            Action::Keep | Action::Drop => &[],
        }
    }

    /// True for actions that decide every trace the same way whatever the
    /// traffic (used to spot rules shadowed by a catch-all).
    pub fn decide(
        &self,
        rule: &RuleName,
        facts: &Facts<'_>,
        id: TraceId,
        now: Instant,
    ) -> Decision {
        let randomness = || Randomness::of_trace(&id.0, facts.spans.iter().map(|s| s.span));
        let drop = || Decision::Drop { rule: rule.clone() };
        match self {
            Action::Keep => Decision::Keep(Kept::all(rule.clone())),
            Action::Drop => drop(),
            Action::Sample(Sample { threshold, by }) => {
                let Some(t) = threshold else { return drop() };
                // A trace without the key falls back to its own randomness.
                let key = by.as_ref().and_then(|f| facts.trace_value(f));
                match key.map(|v| Randomness::of_key(&v.text())) {
                    Some(r) if t.keeps(r) => Decision::Keep(Kept::by_key(rule.clone(), *t, r)),
                    Some(_) => drop(),
                    None if t.keeps(randomness()) => Decision::Keep(Kept::at(rule.clone(), *t)),
                    None => drop(),
                }
            }
            Action::RateLimit(limit) => match limit.admit(&key_of(&limit.key, facts), now) {
                Some(adjusted_count) => Decision::Keep(Kept {
                    rule: rule.clone(),
                    threshold: None,
                    adjusted_count,
                    randomness: None,
                }),
                None => drop(),
            },
            Action::Throughput(t) => {
                let threshold = t.threshold(&key_of(&t.key, facts), now);
                if threshold.keeps(randomness()) {
                    Decision::Keep(Kept::at(rule.clone(), threshold))
                } else {
                    drop()
                }
            }
        }
    }
}

/// `sample`: 1 in N, consistent on every node.
#[derive(Debug)]
pub struct Sample {
    pub threshold: Option<Threshold>,
    /// At most one field: with it, every trace with the same value of it
    /// gets the same answer (a whole order's traces, say).
    pub by: Option<SpanField>,
}

impl Sample {
    pub fn by_trace(threshold: Option<Threshold>) -> Self {
        Self {
            threshold,
            by: None,
        }
    }
}

/// The key of a trace for per-key samplers: each field's value for the
/// trace (root span first), joined with `|`.
fn key_of(fields: &[SpanField], facts: &Facts<'_>) -> String {
    let mut key = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            key.push('|');
        }
        if let Some(v) = facts.trace_value(f) {
            key.push_str(&v.text());
        }
    }
    key
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the state consistent, so a panic
    // elsewhere does not make it unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Traces per second per key: a moving average over `RATE_WINDOW`s,
/// never below what the current window has already seen.
#[derive(Debug)]
struct KeyedRates {
    max_keys: usize,
    window_start: Option<Instant>,
    counts: HashMap<String, u64>,
    averages: HashMap<String, f64>,
}

impl KeyedRates {
    fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            window_start: None,
            counts: HashMap::new(),
            averages: HashMap::new(),
        }
    }

    /// Counts one trace of `key` and returns the key used (capped) and its rate.
    fn observe(&mut self, key: &str, now: Instant) -> (String, f64) {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            let windows = (elapsed.as_secs_f64() / RATE_WINDOW.as_secs_f64()).floor();
            let secs = RATE_WINDOW.as_secs_f64();
            let mut next = HashMap::new();
            for key in self.averages.keys().chain(self.counts.keys()) {
                #[allow(clippy::cast_precision_loss)]
                let observed = self.counts.get(key).copied().unwrap_or(0) as f64 / secs;
                let old = self.averages.get(key).copied().unwrap_or(observed);
                // Windows with no traffic at all decay the average too.
                let mut avg = EMA_WEIGHT * observed + (1.0 - EMA_WEIGHT) * old;
                for _ in 1..(windows as u32).min(16) {
                    avg *= 1.0 - EMA_WEIGHT;
                }
                if avg >= 0.01 {
                    next.insert(key.clone(), avg);
                }
            }
            self.averages = next;
            self.counts.clear();
            self.window_start = Some(now);
        }
        let known = self.counts.contains_key(key) || self.averages.contains_key(key);
        let key = if known || self.counts.len().max(self.averages.len()) < self.max_keys {
            key.to_owned()
        } else {
            OVERFLOW_KEY.to_owned()
        };
        let count = self.counts.entry(key.clone()).or_insert(0);
        *count += 1;
        #[allow(clippy::cast_precision_loss)]
        let current = *count as f64 / RATE_WINDOW.as_secs_f64();
        let rate = self.averages.get(&key).copied().unwrap_or(0.0).max(current);
        (key, rate)
    }
}

/// Tokens left in a key's bucket, and when it was last filled.
type Bucket = (f64, Instant);

/// At most `per_sec` kept traces per second per key (a token bucket per key).
#[derive(Debug)]
pub struct RateLimit {
    pub per_sec: f64,
    pub key: Vec<SpanField>,
    state: Mutex<(KeyedRates, HashMap<String, Bucket>)>,
}

impl RateLimit {
    pub fn new(per_sec: f64, key: Vec<SpanField>, max_keys: usize) -> Self {
        Self {
            per_sec,
            key,
            state: Mutex::new((KeyedRates::new(max_keys), HashMap::new())),
        }
    }

    /// `Some(adjusted count)` if the trace fits the key's budget.
    fn admit(&self, key: &str, now: Instant) -> Option<f64> {
        let mut guard = lock(&self.state);
        let (rates, buckets) = &mut *guard;
        let (key, rate) = rates.observe(key, now);
        let capacity = self.per_sec.max(1.0);
        if buckets.len() > 4 * rates.max_keys {
            // Forget idle buckets; a full bucket is what a new one starts with.
            buckets.retain(|_, (tokens, _)| *tokens < capacity);
        }
        let (tokens, last) = buckets.entry(key).or_insert((capacity, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_sec;
        *tokens = (*tokens + refill).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Some((rate / self.per_sec).max(1.0))
        } else {
            None
        }
    }
}

/// Aims at `per_sec` kept traces per second per key: each key's sampling
/// probability is `per_sec / its rate`, so rare keys are kept whole and
/// frequent ones thinned. Like Refinery's throughput samplers.
#[derive(Debug)]
pub struct Throughput {
    pub per_sec: f64,
    pub key: Vec<SpanField>,
    rates: Mutex<KeyedRates>,
}

impl Throughput {
    pub fn new(per_sec: f64, key: Vec<SpanField>, max_keys: usize) -> Self {
        Self {
            per_sec,
            key,
            rates: Mutex::new(KeyedRates::new(max_keys)),
        }
    }

    fn threshold(&self, key: &str, now: Instant) -> Threshold {
        let (_, rate) = lock(&self.rates).observe(key, now);
        let p = if rate <= self.per_sec {
            1.0
        } else {
            self.per_sec / rate
        };
        Probability::new(p)
            .ok()
            .and_then(Threshold::from_probability)
            .unwrap_or(Threshold::ALWAYS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rate limit admits its budget per second per key, then refills.
    #[test]
    fn rate_limit_budget() {
        let limit = RateLimit::new(2.0, Vec::new(), 10);
        let t0 = Instant::now();
        let admitted = (0..10).filter(|_| limit.admit("a", t0).is_some()).count();
        assert_eq!(admitted, 2);
        assert!(limit.admit("b", t0).is_some(), "keys have separate budgets");
        assert!(limit.admit("a", t0 + Duration::from_millis(500)).is_some());
        assert!(limit.admit("a", t0 + Duration::from_millis(500)).is_none());
    }

    /// A key seen at 100/s with a target of 10/s is sampled at about 10%;
    /// a key at 1/s is kept whole; keys past the cap share one budget.
    #[test]
    fn throughput_adapts_per_key() {
        let t = Throughput::new(10.0, Vec::new(), 2);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            t.threshold("busy", now);
            if i % 100 == 0 {
                t.threshold("rare", now);
            }
        }
        let later = t0 + Duration::from_secs(10);
        let busy = t.threshold("busy", later).adjusted_count();
        assert!((7.0..14.0).contains(&busy), "busy adjusted count {busy}");
        assert_eq!(t.threshold("rare", later), Threshold::ALWAYS);
        let (key, _) = lock(&t.rates).observe("third", later);
        assert_eq!(key, OVERFLOW_KEY);
    }
}
