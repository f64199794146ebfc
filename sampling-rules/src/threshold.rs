//! OpenTelemetry consistent probability sampling (OTEP 235).
//!
//! Every trace carries 56 bits of randomness `R` (the low 56 bits of its
//! trace ID, or an explicit `rv` in the `ot` tracestate entry). A sampler with
//! rejection threshold `T` keeps the trace iff `R >= T`, so the sampling
//! probability is `(2^56 - T) / 2^56`. Because `R` belongs to the trace, every
//! node and every later stage that applies the same threshold agrees, and the
//! adjusted count `2^56 / (2^56 - T)` lets the backend count what was dropped.

use opentelemetry_proto::tonic::trace::v1::Span;
use sha2::{Digest, Sha256};
use std::fmt;

/// 2^56: the size of the randomness space.
const MAX: u64 = 1 << 56;
/// Hex digits of a full threshold.
const DIGITS: usize = 14;
/// Hex digits kept when a threshold is derived from a probability, as the
/// Collector's probabilistic sampler does by default: short tracestate, and
/// still within 0.0002% of the configured share.
const PRECISION: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("a probability must be a number from 0 to 1, got {0}")]
pub struct ProbabilityError(pub f64);

/// A sampling probability in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Probability(f64);

impl Probability {
    /// Keep everything.
    pub const ALWAYS: Self = Self(1.0);

    pub fn new(p: f64) -> Result<Self, ProbabilityError> {
        if p.is_finite() && (0.0..=1.0).contains(&p) {
            Ok(Self(p))
        } else {
            Err(ProbabilityError(p))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// The 56 random bits of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Randomness(u64);

impl Randomness {
    /// The low 56 bits of the trace ID (W3C trace context level 2 makes them random).
    pub fn from_trace_id(id: &[u8; 16]) -> Self {
        let mut low = [0u8; 8];
        low[1..].copy_from_slice(&id[9..]);
        Self(u64::from_be_bytes(low))
    }

    /// An explicit `rv` sub-key of the `ot` tracestate entry, which OTEP 235
    /// says takes precedence over the trace ID bits.
    pub fn from_tracestate(tracestate: &str) -> Option<Self> {
        let rv = ot_subkeys(tracestate)?.find_map(|(k, v)| (k == "rv").then_some(v))?;
        Self::from_rv(rv)
    }

    /// The randomness of a key's value (`sample: {by: …}`): 56 bits of its
    /// SHA-256, the same on every node and for every trace with that value.
    pub fn of_key(value: &str) -> Self {
        let digest = Sha256::digest(value.as_bytes());
        let mut low = [0u8; 8];
        low[1..].copy_from_slice(&digest[..7]);
        Self(u64::from_be_bytes(low))
    }

    /// Reads an `rv` sub-key value (14 hex digits).
    pub fn from_rv(rv: &str) -> Option<Self> {
        if rv.len() != DIGITS {
            return None;
        }
        u64::from_str_radix(rv, 16).ok().map(Self)
    }

    /// The `rv` sub-key value: 14 hex digits.
    pub fn to_rv(self) -> String {
        format!("{:014x}", self.0)
    }

    /// The randomness of a trace: the first explicit `rv` among its spans, else the trace ID.
    pub fn of_trace<'a>(id: &[u8; 16], mut spans: impl Iterator<Item = &'a Span>) -> Self {
        spans
            .find_map(|s| Self::from_tracestate(&s.trace_state))
            .unwrap_or_else(|| Self::from_trace_id(id))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// An OTEP 235 rejection threshold: a trace is kept iff its randomness is at least this.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Threshold(u64);

impl Threshold {
    /// Keep everything: adjusted count 1, written `th:0`.
    pub const ALWAYS: Threshold = Threshold(0);

    /// The threshold that keeps a share `p` of traces; `None` for `p == 0`
    /// (keep nothing), which no threshold expresses.
    pub fn from_probability(p: Probability) -> Option<Self> {
        let p = p.get();
        if p <= 0.0 {
            return None;
        }
        // Both products are below 2^64, so the casts are exact conversions of
        // already-rounded values.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let keep = ((p * MAX as f64).round() as u64).clamp(1, MAX);
        let exact = MAX - keep;
        let unit = 1u64 << (4 * (DIGITS - PRECISION));
        let rounded = (exact + unit / 2) / unit * unit;
        // Rounding must not turn a small non-zero share into "never".
        Some(Self(if rounded >= MAX { exact } else { rounded }))
    }

    /// Parses the hex `th` value of an `ot` tracestate entry.
    pub fn from_th(th: &str) -> Option<Self> {
        if th.is_empty() || th.len() > DIGITS || !th.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let value = u64::from_str_radix(th, 16).ok()?;
        Some(Self(value << (4 * (DIGITS - th.len()))))
    }

    /// The threshold a span already carries in its tracestate, if any.
    pub fn from_tracestate(tracestate: &str) -> Option<Self> {
        let th = ot_subkeys(tracestate)?.find_map(|(k, v)| (k == "th").then_some(v))?;
        Self::from_th(th)
    }

    pub fn keeps(self, r: Randomness) -> bool {
        r.0 >= self.0
    }

    /// `2^56 / (2^56 - T)`: how many traces a kept one stands for.
    pub fn adjusted_count(self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let ratio = MAX as f64 / (MAX - self.0) as f64;
        ratio
    }

    /// The `th` value: 14 hex digits with trailing zeros removed (`0` for keep-all).
    pub fn to_th(self) -> String {
        if self.0 == 0 {
            return "0".to_owned();
        }
        let full = format!("{:014x}", self.0);
        full.trim_end_matches('0').to_owned()
    }
}

impl fmt::Debug for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Threshold(th:{})", self.to_th())
    }
}

/// The `k:v` pairs of the `ot` entry of a W3C tracestate, if it has one.
fn ot_subkeys(tracestate: &str) -> Option<impl Iterator<Item = (&str, &str)>> {
    let ot = tracestate
        .split(',')
        .map(str::trim)
        .find_map(|member| member.strip_prefix("ot="))?;
    Some(ot.split(';').filter_map(|kv| kv.split_once(':')))
}

/// Returns `tracestate` with the `ot` entry's `th` set to `threshold`, keeping
/// every other entry and sub-key, and the threshold now in force. If the span
/// already carries a stricter threshold from an earlier sampler, that one
/// stays (thresholds compose by maximum). With `None` (a sampler that is not
/// consistent, such as a rate limit) `th` is erased, as OTEP 235 requires.
/// W3C trace context puts a modified entry first.
pub fn with_threshold(
    tracestate: &str,
    threshold: Option<Threshold>,
    randomness: Option<Randomness>,
) -> (String, Option<Threshold>) {
    // A decision on explicit randomness (a key's) restarts the composition:
    // an upstream threshold was against other randomness.
    let effective = threshold.map(|t| match randomness {
        Some(_) => t,
        None => Threshold::from_tracestate(tracestate).map_or(t, |upstream| upstream.max(t)),
    });
    let mut subkeys: Vec<String> = effective
        .map(|t| format!("th:{}", t.to_th()))
        .into_iter()
        .collect();
    if let Some(rv) = randomness.filter(|_| effective.is_some()) {
        subkeys.push(format!("rv:{}", rv.to_rv()));
    }
    let replaced_rv = randomness.is_some() && effective.is_some();
    if let Some(existing) = ot_subkeys(tracestate) {
        subkeys.extend(
            existing
                .filter(|(k, _)| *k != "th" && !(replaced_rv && *k == "rv"))
                .map(|(k, v)| format!("{k}:{v}")),
        );
    }
    let mut members: Vec<String> = Vec::new();
    if !subkeys.is_empty() {
        members.push(format!("ot={}", subkeys.join(";")));
    }
    members.extend(
        tracestate
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty() && !m.starts_with("ot="))
            .map(str::to_owned),
    );
    (members.join(","), effective)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(x: f64) -> Probability {
        Probability::new(x).unwrap()
    }

    /// Keep-all is `th:0` with adjusted count 1; keep-nothing has no threshold.
    #[test]
    fn extremes() {
        assert_eq!(Threshold::from_probability(p(1.0)), Some(Threshold::ALWAYS));
        assert_eq!(Threshold::ALWAYS.to_th(), "0");
        assert_eq!(Threshold::ALWAYS.adjusted_count(), 1.0);
        assert_eq!(Threshold::from_probability(p(0.0)), None);
    }

    /// The examples of OTEP 235: 50% is `th:8`, 25% is `th:c`, 1/3 is about `th:aaab`.
    #[test]
    fn known_thresholds() {
        assert_eq!(Threshold::from_probability(p(0.5)).unwrap().to_th(), "8");
        assert_eq!(Threshold::from_probability(p(0.25)).unwrap().to_th(), "c");
        assert_eq!(
            Threshold::from_probability(p(1.0 / 3.0)).unwrap().to_th(),
            "aaab"
        );
        let five = Threshold::from_probability(p(0.05)).unwrap();
        assert_eq!(five.to_th(), "f333");
        assert!((five.adjusted_count() - 20.0).abs() < 0.01);
    }

    /// A tiny share survives rounding to 4 digits instead of becoming "never".
    #[test]
    fn tiny_share_is_not_rounded_to_never() {
        let t = Threshold::from_probability(p(1e-9)).unwrap();
        assert!(t.adjusted_count() > 1e8);
        assert_eq!(Threshold::from_th(&t.to_th()), Some(t));
    }

    #[test]
    fn th_round_trips() {
        for th in ["0", "8", "c", "f333", "aaab", "fffffffffffff"] {
            assert_eq!(Threshold::from_th(th).unwrap().to_th(), th);
        }
        assert_eq!(Threshold::from_th(""), None);
        assert_eq!(Threshold::from_th("xyz"), None);
        assert_eq!(Threshold::from_th("123456789012345"), None);
    }

    #[test]
    fn probability_rejects_out_of_range() {
        assert!(Probability::new(-0.1).is_err());
        assert!(Probability::new(1.5).is_err());
        assert!(Probability::new(f64::NAN).is_err());
    }

    /// Randomness is the low 56 bits of the trace ID, or an explicit `rv`.
    #[test]
    fn randomness_sources() {
        let mut id = [0u8; 16];
        id[8] = 0xff; // not part of the 56 bits
        id[9] = 0x80;
        assert_eq!(Randomness::from_trace_id(&id).get(), 0x80 << 48);
        assert_eq!(
            Randomness::from_tracestate("vendor=x,ot=th:8;rv:0000000000000a").map(Randomness::get),
            Some(10)
        );
        assert_eq!(Randomness::from_tracestate("ot=rv:12"), None);
        let half = Threshold::from_probability(p(0.5)).unwrap();
        assert!(half.keeps(Randomness::from_trace_id(&id)));
        id[9] = 0x7f;
        assert!(!half.keeps(Randomness::from_trace_id(&id)));
    }

    /// The `ot` entry moves first, other entries and sub-keys stay, and a
    /// stricter upstream threshold wins over a looser local one.
    #[test]
    fn tracestate_editing() {
        let always = Some(Threshold::ALWAYS);
        assert_eq!(with_threshold("", always, None).0, "ot=th:0");
        assert_eq!(
            with_threshold("a=1, ot=th:8;rv:0123456789abcd ,b=2", always, None),
            (
                "ot=th:8;rv:0123456789abcd,a=1,b=2".to_owned(),
                Threshold::from_th("8")
            )
        );
        let c = Threshold::from_th("c");
        assert_eq!(
            with_threshold("ot=th:8", c, None),
            ("ot=th:c".to_owned(), c)
        );
        // A non-consistent decision erases th and keeps the rest.
        assert_eq!(
            with_threshold("a=1,ot=th:8;rv:0123456789abcd", None, None).0,
            "ot=rv:0123456789abcd,a=1"
        );
        assert_eq!(with_threshold("ot=th:8,a=1", None, None).0, "a=1");
    }

    /// A keep on a key's randomness writes that randomness as `rv` with
    /// its own threshold: an upstream `rv` and `th` (against other
    /// randomness) are replaced, other sub-keys stay; the same value always
    /// gives the same randomness.
    #[test]
    fn a_key_decision_writes_its_randomness() {
        let r = Randomness::of_key("ord-4711");
        assert_eq!(r, Randomness::of_key("ord-4711"));
        assert_ne!(r, Randomness::of_key("ord-4712"));
        assert_eq!(Randomness::from_rv(&r.to_rv()), Some(r));
        let half = Threshold::from_th("8");
        let (state, effective) = with_threshold("a=1,ot=th:c;rv:0123456789abcd;x:y", half, Some(r));
        assert_eq!(state, format!("ot=th:8;rv:{};x:y,a=1", r.to_rv()));
        assert_eq!(effective, half);
        // Dropped (no threshold): nothing is claimed, the upstream rv stays.
        assert_eq!(
            with_threshold("ot=rv:0123456789abcd", None, Some(r)).0,
            "ot=rv:0123456789abcd"
        );
    }
}
