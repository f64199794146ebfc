//! Tailgate's sampling policy: given a whole trace, decide whether to keep it.
//!
//! The gateway buffers every span of a trace, then hands the trace to a
//! policy through the [`TraceView`] trait. The answer is a [`Decision`]:
//! keep (with the rule that matched and an OTEP 235 [`Threshold`], from which
//! the adjusted count follows) or drop (with the rule that matched).
//!
//! Decisions depend only on the trace's content and its trace ID, never on
//! the order spans arrived in or on which node decides, so every gateway node
//! gives the same answer for the same trace.

mod decision;
mod policy;
mod threshold;
mod trace;

pub use decision::{Decision, Kept, RuleName};
pub use policy::DefaultPolicy;
pub use threshold::{Probability, ProbabilityError, Randomness, Threshold, with_threshold};
pub use trace::{SpanRef, TraceId, TraceView};
