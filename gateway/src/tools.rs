//! `tailgate rules check` and `tailgate rules test`: try a rules file
//! before it ships.

use crate::{
    receive::decode_json,
    route,
    trace::{self, DecodedTrace},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::{fmt::Write, path::Path, time::Instant};
use tailgate_sampling_rules::{Decision, Rules, RulesError, SecretRef, SpanRef, TraceView};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: not OTLP/JSON traces (one ExportTraceServiceRequest, or a list of them): {message}"
    )]
    Traces { path: String, message: String },
}

/// Loads a rules file for checking on a workstation: a secret the file
/// refers to (a redaction salt in an environment variable or a file) that
/// cannot be read here is replaced by a placeholder and reported in the
/// returned notes, since the secret lives only where the gateway runs
/// (which refuses to start without it).
fn load(path: &Path) -> Result<(Rules, Vec<String>), ToolError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ToolError::Read {
        path: shown.clone(),
        source,
    })?;
    let missing = std::cell::RefCell::new(Vec::new());
    let secrets = |secret: SecretRef<'_>| {
        secret.read().or_else(|why| {
            missing.borrow_mut().push(format!(
                "note: {why}; the gateway needs it (checked with a placeholder)"
            ));
            Ok("placeholder".to_owned())
        })
    };
    let rules = Rules::from_yaml_with_secrets(&text, &shown, &secrets)?;
    Ok((rules, missing.into_inner()))
}

/// Validates a rules file; on success, a summary line (and notes).
pub fn check(path: &Path) -> Result<String, ToolError> {
    let (rules, notes) = load(path)?;
    let mut out = format!(
        "{}: ok, {} rules, sha256 {}",
        path.display(),
        rules.len(),
        rules.hash_hex()
    );
    for journey in rules.journeys() {
        out.push('\n');
        out.push_str(&journey.describe());
    }
    for note in notes {
        out.push('\n');
        out.push_str(&note);
    }
    Ok(out)
}

/// Decides every trace in an OTLP/JSON file with the rules in `rules_path`
/// and prints one line per trace: decision, rule, adjusted count.
pub fn test(rules_path: &Path, traces_path: &Path) -> Result<String, ToolError> {
    let (rules, _) = load(rules_path)?;
    let shown = traces_path.display().to_string();
    let text = std::fs::read(traces_path).map_err(|source| ToolError::Read {
        path: shown.clone(),
        source,
    })?;
    let traces = parse_traces(&text)
        .and_then(group)
        .map_err(|message| ToolError::Traces {
            path: shown,
            message,
        })?;
    let now = Instant::now();
    let mut out = format!(
        "{:<32}  {:<8}  {:<24}  {:>14}  {:>5}  root\n",
        "trace", "decision", "rule", "adjusted_count", "spans"
    );
    for t in &traces {
        let (decision, rule, adjusted) = match rules.decide(t, now) {
            Decision::Keep(k) => (
                "keep",
                k.rule.to_string(),
                format!("{}", round(k.adjusted_count)),
            ),
            Decision::Drop { rule } => ("drop", rule.to_string(), "-".to_owned()),
        };
        let root = t.spans().find(SpanRef::is_root).map_or_else(
            || "(no root)".to_owned(),
            |s| format!("{} {:?}", s.service_name().unwrap_or("?"), s.span.name),
        );
        let _ = writeln!(
            out,
            "{:<32}  {decision:<8}  {rule:<24}  {adjusted:>14}  {:>5}  {root}",
            t.trace_id.to_hex(),
            t.spans().count()
        );
    }
    Ok(out)
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn parse_traces(text: &[u8]) -> Result<Vec<ExportTraceServiceRequest>, String> {
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        serde_json::from_slice(text).map_err(|e| e.to_string())
    } else {
        decode_json(text)
            .map(|r| vec![r])
            .map_err(|e| e.to_string())
    }
}

/// Spans grouped by trace, in the order traces first appear, as the
/// gateway sees them at their decision.
fn group(requests: Vec<ExportTraceServiceRequest>) -> Result<Vec<DecodedTrace>, String> {
    let mut traces: Vec<DecodedTrace> = Vec::new();
    for request in requests {
        let routed = route::split(&request.encode_to_vec()).map_err(|e| e.to_string())?;
        for batch in routed.batches {
            let (fragments, _) = trace::decode(&batch.fragments, trace::Detail::Full);
            match traces.iter_mut().find(|t| t.trace_id == batch.trace_id) {
                Some(t) => t.fragments.extend(fragments),
                None => traces.push(DecodedTrace {
                    trace_id: batch.trace_id,
                    fragments,
                }),
            }
        }
    }
    Ok(traces)
}
