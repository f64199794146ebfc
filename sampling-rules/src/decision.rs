//! The outcome of evaluating a policy against one trace.

use crate::threshold::{Randomness, Threshold};
use std::{fmt, sync::Arc};

/// The name of the rule that decided; it becomes `sampling.rule` on kept spans.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RuleName(Arc<str>);

impl RuleName {
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A keep decision: which rule kept the trace, and how many traces it stands for.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    pub rule: RuleName,
    /// The OTEP 235 threshold of a consistent sampler (`keep`, `sample`,
    /// `throughput`); `None` for a rate limit, whose choice does not follow
    /// the trace's randomness, so no threshold may be claimed.
    pub threshold: Option<Threshold>,
    /// How many traces this one stands for: 1 for `keep`, N for `sample: {rate: N}`,
    /// an estimate for rate limits.
    pub adjusted_count: f64,
    /// The randomness the threshold was applied to, when it is not the
    /// trace's own (`sample: {by: …}`): written as `rv` beside `th`.
    pub randomness: Option<Randomness>,
}

impl Kept {
    /// A keep-everything decision (adjusted count 1).
    pub fn all(rule: RuleName) -> Self {
        Self {
            rule,
            threshold: Some(Threshold::ALWAYS),
            adjusted_count: 1.0,
            randomness: None,
        }
    }

    /// A consistent-probability decision at `threshold`.
    pub fn at(rule: RuleName, threshold: Threshold) -> Self {
        Self {
            rule,
            threshold: Some(threshold),
            adjusted_count: threshold.adjusted_count(),
            randomness: None,
        }
    }

    /// A consistent-probability decision at `threshold` on a key's
    /// `randomness`, which every span then carries as `rv`.
    pub fn by_key(rule: RuleName, threshold: Threshold, randomness: Randomness) -> Self {
        Self {
            randomness: Some(randomness),
            ..Self::at(rule, threshold)
        }
    }

    pub fn adjusted_count(&self) -> f64 {
        self.adjusted_count
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Keep(Kept),
    Drop { rule: RuleName },
}

impl Decision {
    pub fn rule(&self) -> &RuleName {
        match self {
            Decision::Keep(kept) => &kept.rule,
            Decision::Drop { rule } => rule,
        }
    }

    pub fn is_keep(&self) -> bool {
        matches!(self, Decision::Keep(_))
    }
}
