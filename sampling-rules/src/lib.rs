//! Tailgate's sampling rules: given a whole trace, decide whether to keep it.
//!
//! SREs write an ordered list of rules in YAML (see `docs/sampling-rules.md`);
//! [`Rules::from_yaml`] validates it, reporting every problem as
//! `file:line:column` with a hint, and compiles it. The gateway hands each
//! buffered trace to [`Rules::decide`] through the [`TraceView`] trait and
//! gets a [`Decision`]: keep (with the rule, an OTEP 235 [`Threshold`] where
//! the sampler is consistent, and the adjusted count) or drop.
//!
//! Decisions of `keep`, `drop`, `sample` and `throughput` rules depend only
//! on the trace's content and its trace ID, never on the order spans arrived
//! in, so every gateway node gives the same answer for the same trace.

mod action;
mod compile;
mod condition;
mod decision;
mod field;
mod journey;
mod node;
mod redact;
mod rules;
mod threshold;
mod trace;

#[cfg(test)]
mod tests;

pub use compile::{RuleError, RulesError, SecretRef, Secrets, parse_duration};
pub use decision::{Decision, Kept, RuleName};
pub use journey::{
    AttributePlan, AttributePlans, Journey, JourneyFields, MAX_CAPTURE, MAX_VALUE_BYTES, human,
};
pub use node::Pos;
pub use redact::Redaction;
pub use rules::{NO_MATCH, Rules};
pub use threshold::{Probability, ProbabilityError, Randomness, Threshold, with_threshold};
pub use trace::{SpanRef, TraceId, TraceView};
