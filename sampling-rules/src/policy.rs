//! The built-in policy: keep errors, keep slow traces, keep a consistent
//! random share of the rest. The rules file (a later addition) generalises it.

use crate::{
    decision::{Decision, Kept, RuleName},
    threshold::{Probability, Randomness, Threshold},
    trace::TraceView,
};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct DefaultPolicy {
    slow_threshold: Duration,
    random: Option<Threshold>,
    error_rule: RuleName,
    slow_rule: RuleName,
    random_rule: RuleName,
}

impl DefaultPolicy {
    pub fn new(slow_threshold: Duration, random_share: Probability) -> Self {
        Self {
            slow_threshold,
            random: Threshold::from_probability(random_share),
            error_rule: RuleName::new("error"),
            slow_rule: RuleName::new("slow"),
            random_rule: RuleName::new("random"),
        }
    }

    /// Decides one whole trace. Order of checks matters only for the rule
    /// name: an error trace that is also slow is reported as `error`.
    pub fn decide(&self, trace: &impl TraceView) -> Decision {
        let mut has_error = false;
        let mut start = u64::MAX;
        let mut end = 0u64;
        for s in trace.spans() {
            has_error |= s
                .span
                .status
                .as_ref()
                .is_some_and(|st| st.code == StatusCode::Error as i32);
            start = start.min(s.span.start_time_unix_nano);
            end = end.max(s.span.end_time_unix_nano);
        }
        let keep_all = |rule: &RuleName| {
            Decision::Keep(Kept {
                rule: rule.clone(),
                threshold: Threshold::ALWAYS,
            })
        };
        if has_error {
            return keep_all(&self.error_rule);
        }
        let duration = Duration::from_nanos(end.saturating_sub(start));
        if start <= end && duration >= self.slow_threshold {
            return keep_all(&self.slow_rule);
        }
        let id = trace.trace_id();
        let randomness = Randomness::of_trace(&id.0, trace.spans().map(|s| s.span));
        match self.random {
            Some(threshold) if threshold.keeps(randomness) => Decision::Keep(Kept {
                rule: self.random_rule.clone(),
                threshold,
            }),
            _ => Decision::Drop {
                rule: self.random_rule.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{SpanRef, TraceId};
    use opentelemetry_proto::tonic::trace::v1::{Span, Status};

    struct Spans(TraceId, Vec<Span>);

    impl TraceView for Spans {
        fn trace_id(&self) -> TraceId {
            self.0
        }
        fn spans(&self) -> impl Iterator<Item = SpanRef<'_>> {
            self.1.iter().map(|span| SpanRef {
                resource: None,
                scope: None,
                span,
            })
        }
    }

    fn span(start_ms: u64, end_ms: u64, code: StatusCode) -> Span {
        Span {
            start_time_unix_nano: start_ms * 1_000_000,
            end_time_unix_nano: end_ms * 1_000_000,
            status: Some(Status {
                code: code as i32,
                message: String::new(),
            }),
            ..Default::default()
        }
    }

    fn policy() -> DefaultPolicy {
        DefaultPolicy::new(Duration::from_secs(1), Probability::new(0.05).unwrap())
    }

    fn id(n: u64) -> TraceId {
        // Spread n over the random low bits with a fixed odd multiplier.
        let mut b = [1u8; 16];
        b[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        TraceId(b)
    }

    /// One ERROR span keeps the whole trace with adjusted count 1.
    #[test]
    fn error_trace_is_kept() {
        let t = Spans(
            id(1),
            vec![span(0, 10, StatusCode::Ok), span(1, 2, StatusCode::Error)],
        );
        let Decision::Keep(kept) = policy().decide(&t) else {
            panic!("error trace dropped")
        };
        assert_eq!(kept.rule.as_str(), "error");
        assert_eq!(kept.adjusted_count(), 1.0);
    }

    /// Duration is latest end minus earliest start across spans, not one span's length.
    #[test]
    fn slow_trace_is_kept() {
        let t = Spans(
            id(2),
            vec![
                span(0, 600, StatusCode::Unset),
                span(500, 1000, StatusCode::Unset),
            ],
        );
        assert_eq!(policy().decide(&t).rule().as_str(), "slow");
        let fast = Spans(
            id(2),
            vec![
                span(0, 600, StatusCode::Unset),
                span(500, 999, StatusCode::Unset),
            ],
        );
        assert_eq!(fast.1.len(), 2);
        assert_ne!(policy().decide(&fast).rule().as_str(), "slow");
    }

    /// The random share is close to 5% and depends only on the trace ID,
    /// so the decision is the same whatever order the spans are in.
    #[test]
    fn random_share_is_consistent() {
        let p = policy();
        let n = 20_000u64;
        let mut kept = 0u64;
        for i in 0..n {
            let mut spans = vec![span(0, 5, StatusCode::Unset), span(1, 3, StatusCode::Ok)];
            let a = p.decide(&Spans(id(i), spans.clone()));
            spans.reverse();
            assert_eq!(a, p.decide(&Spans(id(i), spans)));
            if let Decision::Keep(k) = a {
                assert!((k.adjusted_count() - 20.0).abs() < 0.01);
                kept += 1;
            }
        }
        // 20 000 × 5% = 1000, σ ≈ 30.8: ±5σ.
        assert!((846..=1154).contains(&kept), "kept {kept} of {n}");
    }

    /// A share of 0 keeps nothing but errors and slow traces; 1 keeps all.
    #[test]
    fn share_extremes() {
        let t = Spans(id(3), vec![span(0, 5, StatusCode::Unset)]);
        let none = DefaultPolicy::new(Duration::from_secs(1), Probability::new(0.0).unwrap());
        assert!(!none.decide(&t).is_keep());
        let all = DefaultPolicy::new(Duration::from_secs(1), Probability::new(1.0).unwrap());
        assert!(all.decide(&t).is_keep());
    }
}
