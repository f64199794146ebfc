//! A compiled rules file: rule sets, one chosen per trace; the first rule
//! whose conditions hold decides.

use crate::{
    action::{Action, Sample},
    compile::{RulesError, Secrets, compile},
    condition::{CmpOp, Condition, Facts, Literal, Op, Test},
    decision::{Decision, RuleName},
    field::{FieldValue, SpanField, TraceField},
    journey::{AttributePlans, Journey},
    node::Pos,
    redact::Redaction,
    threshold::{Probability, Threshold},
    trace::TraceView,
};
use sha2::{Digest, Sha256};
use std::{
    path::Path,
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct Rule {
    pub name: RuleName,
    /// `None` matches every trace.
    pub when: Option<Condition>,
    pub action: Action,
    pub pos: Pos,
}

impl Rule {
    fn reads_span_attributes(&self) -> bool {
        let mut reads = false;
        if let Some(when) = &self.when {
            when.span_fields(&mut |f| reads |= f.reads_attributes_or_events());
        }
        reads
            || self
                .action
                .span_fields()
                .iter()
                .any(SpanField::reads_attributes_or_events)
    }
}

#[derive(Debug)]
pub struct Rules {
    select_by: Option<SpanField>,
    sets: Vec<(String, Vec<Rule>)>,
    default: Vec<Rule>,
    redaction: Redaction,
    journeys: Vec<Journey>,
    /// How journeys read spans' attributes, when they read nothing else.
    attribute_plans: Option<AttributePlans>,
    digest: [u8; 32],
    no_match: RuleName,
    reads_span_attributes: bool,
}

/// The rule name of traces no rule matched (they are dropped).
pub const NO_MATCH: &str = "no-rule-matched";

impl Rules {
    pub(crate) fn new(
        select_by: Option<String>,
        sets: Vec<(String, Vec<Rule>)>,
        default: Vec<Rule>,
        redaction: Redaction,
        journeys: Vec<Journey>,
        text: &str,
    ) -> Self {
        let reads_span_attributes = default
            .iter()
            .chain(sets.iter().flat_map(|(_, rules)| rules))
            .any(Rule::reads_span_attributes);
        Self {
            select_by: select_by.map(SpanField::ResourceAttribute),
            sets,
            default,
            redaction,
            attribute_plans: AttributePlans::new(&journeys),
            journeys,
            digest: Sha256::digest(text.as_bytes()).into(),
            no_match: RuleName::new(NO_MATCH),
            reads_span_attributes,
        }
    }

    /// Compiles rules from YAML text, reading the secrets it refers to
    /// (`salt_env`, `salt_file`) from this process's environment and files.
    pub fn from_yaml(text: &str, file: &str) -> Result<Self, RulesError> {
        Self::from_yaml_with_secrets(text, file, &|secret| secret.read())
    }

    /// Compiles rules from YAML text, reading the secrets it refers to
    /// with `secrets`.
    pub fn from_yaml_with_secrets(
        text: &str,
        file: &str,
        secrets: Secrets<'_>,
    ) -> Result<Self, RulesError> {
        compile(text, secrets).map_err(|errors| RulesError {
            file: file.to_owned(),
            errors,
        })
    }

    /// Reads and compiles a rules file.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| RulesError::unreadable(file.clone(), &e))?;
        Self::from_yaml(&text, &file)
    }

    /// The built-in policy, as rules: keep errors (`error`), keep traces at
    /// least `slow` long (`slow`), keep `share` of the rest (`random`).
    pub fn default_policy(slow: Duration, share: Probability) -> Self {
        let rule = |name: &str, when, action| Rule {
            name: RuleName::new(name),
            when,
            action,
            pos: Pos::default(),
        };
        let default = vec![
            rule(
                "error",
                Some(Condition::Trace(
                    TraceField::HasError,
                    Test::is(Op::Cmp(CmpOp::Eq, Literal::Bool(true))),
                )),
                Action::Keep,
            ),
            rule(
                "slow",
                Some(Condition::Trace(
                    TraceField::Duration,
                    Test::is(Op::Cmp(
                        CmpOp::Ge,
                        Literal::Duration(u64::try_from(slow.as_nanos()).unwrap_or(u64::MAX)),
                    )),
                )),
                Action::Keep,
            ),
            rule(
                "random",
                None,
                Action::Sample(Sample::by_trace(Threshold::from_probability(share))),
            ),
        ];
        let description = format!("default policy: slow >= {slow:?}, share {}", share.get());
        Self::new(
            None,
            Vec::new(),
            default,
            Redaction::default(),
            Vec::new(),
            &description,
        )
    }

    /// Decides one whole trace. `now` drives the per-key samplers only.
    pub fn decide(&self, trace: &impl TraceView, now: Instant) -> Decision {
        let facts = Facts::new(trace);
        for rule in self.select(&facts) {
            if rule.when.as_ref().is_none_or(|c| c.eval(&facts)) {
                return rule
                    .action
                    .decide(&rule.name, &facts, trace.trace_id(), now);
            }
        }
        Decision::Drop {
            rule: self.no_match.clone(),
        }
    }

    fn select(&self, facts: &Facts<'_>) -> &[Rule] {
        let chosen = self.select_by.as_ref().and_then(|field| {
            let value = facts.trace_value(field)?;
            let text = match &value {
                FieldValue::Str(s) => s.as_ref(),
                _ => return None,
            };
            self.sets
                .iter()
                .find(|(name, _)| name == text)
                .map(|(_, rules)| rules.as_slice())
        });
        chosen.unwrap_or(&self.default)
    }

    /// Whether any rule reads span attributes or event names. When none
    /// does, a trace can be decided without decoding them: they are most of
    /// a span's bytes, and most traces are dropped. (The rule-set selector
    /// reads a resource attribute, which is not a span's.)
    pub fn reads_span_attributes(&self) -> bool {
        self.reads_span_attributes
    }

    pub fn redaction(&self) -> &Redaction {
        &self.redaction
    }

    /// The journeys the file defines, in its order.
    pub fn journeys(&self) -> &[Journey] {
        &self.journeys
    }

    /// How to read every journey from a span's attributes alone, if they
    /// read nothing else.
    pub fn journey_attribute_plans(&self) -> Option<&AttributePlans> {
        self.attribute_plans.as_ref()
    }

    /// SHA-256 of the rules text, in hex: equal on every node running the same file.
    pub fn hash_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 48 bits of the hash, exact in a float64 gauge.
    pub fn hash_u48(&self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.digest[..6]);
        u64::from_be_bytes(b)
    }

    /// Number of rules across all sets.
    pub fn len(&self) -> usize {
        self.default.len() + self.sets.iter().map(|(_, r)| r.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
