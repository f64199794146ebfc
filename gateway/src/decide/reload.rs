//! Loading the sampling rules, and hot reload: the file is checked every
//! `rules.check_interval_secs`; a changed file is validated and swapped in,
//! a broken one is refused (its errors logged, counted) and the rules in
//! force stay.
//!
//! The file is polled by content rather than watched for events: reading
//! through the path follows a Kubernetes ConfigMap's `..data` symlink swap,
//! an editor's rename-over, and network file systems alike.

use super::Decider;
use crate::{config::Config, metrics::Metrics};
use std::{path::Path, sync::Arc, time::Duration};
use tailgate_sampling_rules::{Rules, RulesError};
use tracing::{error, info};

/// The rules the node starts with: the configured file, or the built-in policy.
pub fn initial(cfg: &Config) -> Result<Rules, RulesError> {
    match &cfg.rules.file {
        Some(path) => Rules::load(path),
        None => Ok(Rules::default_policy(
            cfg.policy.slow_threshold,
            cfg.policy.random_share,
        )),
    }
}

/// Checks `path` every `interval` and puts changed, valid rules in force. Runs until aborted.
pub async fn watch(path: &Path, interval: Duration, decider: &Decider, metrics: &Metrics) {
    let mut last_text = std::fs::read_to_string(path).ok();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                // A ConfigMap update can briefly hide the file; the rules in force stay.
                if last_text.is_some() {
                    error!(path = %path.display(), error = %e, "cannot read the rules file; keeping the rules in force");
                    metrics.rules.reloaded(false);
                    last_text = None;
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        last_text = Some(text.clone());
        match Rules::from_yaml(&text, &path.display().to_string()) {
            Ok(rules) => {
                let rules = Arc::new(rules);
                metrics.rules.in_force(rules.hash_u48());
                info!(path = %path.display(), hash = %rules.hash_hex(), rules = rules.len(), "sampling rules reloaded");
                decider.set_rules(rules);
                metrics.rules.reloaded(true);
            }
            Err(e) => {
                error!(path = %path.display(), errors = %e, "rules file refused; keeping the rules in force");
                metrics.rules.reloaded(false);
            }
        }
    }
}
