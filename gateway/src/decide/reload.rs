//! Loading the sampling rules, and hot reload: the file is checked every
//! `rules.check_interval_secs`; a changed file is validated and swapped in,
//! a broken one is refused (its errors logged, counted) and the rules in
//! force stay.
//!
//! The file is polled by content rather than watched for events: reading
//! through the path follows a Kubernetes ConfigMap's `..data` symlink swap,
//! an editor's rename-over, and network file systems alike.
//!
//! Reading and compiling run on a thread of their own that ends with them.
//! Parsing a large file allocates many times its size; mimalloc keeps a
//! thread's freed pages until that thread allocates again, so on a runtime
//! worker they stayed in RSS long after the rules were replaced. A thread
//! that exits hands most of them back at once (docs/reliability.md has the
//! figures, and what stays).

use super::Decider;
use crate::{config::Config, metrics::Metrics};
use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::Path,
    sync::Arc,
    time::Duration,
};
use tailgate_sampling_rules::{Rules, RulesError};
use tracing::{error, info};

/// The rules the node starts with: the configured file, or the built-in policy.
pub fn initial(cfg: &Config) -> Result<Rules, RulesError> {
    match &cfg.rules.file {
        Some(path) => on_own_thread(|| Rules::load(path)),
        None => Ok(Rules::default_policy(
            cfg.policy.slow_threshold,
            cfg.policy.random_share,
        )),
    }
}

/// What one look at the rules file found.
enum Read {
    Unreadable(std::io::Error),
    Unchanged,
    Changed(u64, Box<Result<Rules, RulesError>>),
}

/// Checks `path` every `interval` and puts changed, valid rules in force. Runs until aborted.
pub async fn watch(path: &Path, interval: Duration, decider: &Decider, metrics: &Metrics) {
    // A digest of the text last seen, so an unchanged file is not compiled
    // again and a large one is not held twice.
    let mut last: Option<u64> =
        on_own_thread(|| std::fs::read(path).ok().map(|text| digest(&text)));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let owned = path.to_owned();
        let seen = last;
        let read = tokio::task::spawn_blocking(move || on_own_thread(|| read(&owned, seen))).await;
        match read {
            Err(e) => error!(error = %e, "the rules reader failed; keeping the rules in force"),
            Ok(Read::Unchanged) => {}
            Ok(Read::Unreadable(e)) => {
                // A ConfigMap update can briefly hide the file; the rules in force stay.
                if last.is_some() {
                    error!(path = %path.display(), error = %e, "cannot read the rules file; keeping the rules in force");
                    metrics.rules.reloaded(false);
                    last = None;
                }
            }
            Ok(Read::Changed(seen, compiled)) => {
                last = Some(seen);
                match *compiled {
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
    }
}

fn read(path: &Path, last: Option<u64>) -> Read {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return Read::Unreadable(e),
    };
    let seen = digest(&bytes);
    if last == Some(seen) {
        return Read::Unchanged;
    }
    let file = path.display().to_string();
    let compiled = match String::from_utf8(bytes) {
        Ok(text) => Rules::from_yaml(&text, &file),
        Err(e) => Err(RulesError::unreadable(file, &e)),
    };
    Read::Changed(seen, Box::new(compiled))
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Runs `work` on a new thread and waits for it, so the memory its parsing
/// used leaves with the thread (see the module's comment).
fn on_own_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(work).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}
