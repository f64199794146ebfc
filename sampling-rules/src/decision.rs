//! The outcome of evaluating a policy against one trace.

use crate::threshold::Threshold;
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

/// A keep decision: which rule kept the trace and at what sampling threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    pub rule: RuleName,
    pub threshold: Threshold,
}

impl Kept {
    /// How many traces this one stands for (1 for keep-all rules).
    pub fn adjusted_count(&self) -> f64 {
        self.threshold.adjusted_count()
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
