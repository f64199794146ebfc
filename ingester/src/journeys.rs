//! The stuck-journey finder, and journey look-ups on the admin port.
//!
//! Every `journeys.interval` it reads the journey events that arrived since
//! its last look, folds them into each journey's latest state, which it
//! holds in memory, and sets the gauges: stuck journeys, the oldest one's
//! age, and open journeys, by journey and status. What it reads per look is
//! what arrived since the last one (plus a minute's overlap), from today's
//! partition: the cost does not grow with the history stored. At start it
//! reads the open journeys once from the state table.
//!
//! Folding an event is idempotent (latest status by span time, first time
//! each status was seen, min/max times), which is what makes the overlap
//! and a restart safe, and is the same fold the state table's materialized
//! view makes.

use crate::{
    config::IngesterConfig,
    metrics::{JourneyStatus, Metrics},
    store::Store,
};
use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::get,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tailgate_sampling_rules::Rules;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Events that arrived this long before the last one read are read again:
/// a row is stamped when its insert starts and visible when it ends.
const OVERLAP_MS: i64 = 60_000;
/// A finished journey is forgotten this long after it was last seen; until
/// then a late event cannot reopen it.
const FINISHED_RETENTION_NS: i64 = 3_600 * 1_000_000_000;
/// Most stuck journeys listed by `/journeys/stuck`.
const MAX_LISTED: usize = 1000;

/// One journey's state, as the finder folds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JourneyState {
    /// Latest status by span time; empty until a span carries one.
    pub status: String,
    #[serde(skip)]
    status_time: i64,
    /// First time each status was seen, nanoseconds.
    #[serde(skip)]
    first_by_status: Vec<(String, i64)>,
    pub first_seen_ns: i64,
    pub last_seen_ns: i64,
    pub error_seen: bool,
}

impl JourneyState {
    fn fold(&mut self, status: &str, time: i64, error: bool) {
        if self.first_seen_ns == 0 || time < self.first_seen_ns {
            self.first_seen_ns = time;
        }
        self.last_seen_ns = self.last_seen_ns.max(time);
        self.error_seen |= error;
        if status.is_empty() {
            return;
        }
        match self.first_by_status.iter_mut().find(|(s, _)| s == status) {
            Some((_, first)) => *first = (*first).min(time),
            None => self.first_by_status.push((status.to_owned(), time)),
        }
        if self.status.is_empty() || time >= self.status_time {
            // Equal times: the larger status, so that every order of
            // arrival gives the same answer (argMax does the same, by row).
            if time > self.status_time || status > self.status.as_str() {
                self.status = status.to_owned();
            }
            self.status_time = time;
        }
    }

    /// When the latest status was first seen, nanoseconds.
    pub fn since_ns(&self) -> i64 {
        self.first_by_status
            .iter()
            .find(|(s, _)| *s == self.status)
            .map_or(self.first_seen_ns, |(_, t)| *t)
    }
}

/// A stuck journey, as `/journeys/stuck` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stuck {
    pub journey: String,
    pub key: String,
    pub status: String,
    pub since: String,
    pub in_status_secs: u64,
    pub limit_secs: u64,
    pub last_seen: String,
    pub error_seen: bool,
}

#[derive(Debug, Default)]
struct Tracked {
    journeys: HashMap<(String, String), JourneyState>,
    /// `Ingested` (ms) of the newest event read.
    cursor_ms: i64,
    loaded: bool,
}

pub struct Finder {
    store: Store,
    metrics: Arc<Metrics>,
    rules_file: Option<std::path::PathBuf>,
    rules: Mutex<Option<(String, Arc<Rules>)>>,
    tracked: Mutex<Tracked>,
    /// Labels the gauges have now.
    shown: Mutex<Vec<JourneyStatus>>,
    trace_link: Option<String>,
    interval: Duration,
}

impl std::fmt::Debug for Finder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finder")
            .field("rules_file", &self.rules_file)
            .finish()
    }
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct EventFold {
    #[serde(rename = "Journey")]
    journey: String,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "T")]
    time: i64,
    #[serde(rename = "Error")]
    error: u8,
    #[serde(rename = "I")]
    ingested_ms: i64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct StateRow {
    #[serde(rename = "Journey")]
    journey: String,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "S")]
    status: String,
    #[serde(rename = "Since")]
    since: (Vec<String>, Vec<i64>),
    #[serde(rename = "T")]
    status_time: i64,
    #[serde(rename = "F")]
    first: i64,
    #[serde(rename = "L")]
    last: i64,
    #[serde(rename = "E")]
    error: u8,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the value whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Finder {
    pub fn new(cfg: &IngesterConfig, store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            rules_file: cfg.journeys.rules_file.clone(),
            rules: Mutex::new(None),
            tracked: Mutex::default(),
            shown: Mutex::default(),
            trace_link: cfg.journeys.trace_link.clone(),
            interval: cfg.journeys.interval,
        }
    }

    /// The journeys in force: the rules file read again if it changed; an
    /// invalid file is refused, counted, and the previous journeys stay.
    fn rules(&self) -> Option<Arc<Rules>> {
        let path = self.rules_file.as_ref()?;
        let current = lock(&self.rules).clone();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the rules file; keeping the journeys in force");
                return current.map(|(_, r)| r);
            }
        };
        if let Some((old, rules)) = &current
            && *old == text
        {
            return Some(Arc::clone(rules));
        }
        match Rules::from_yaml(&text, &path.display().to_string()) {
            Ok(rules) => {
                let rules = Arc::new(rules);
                info!(file = %path.display(), journeys = rules.journeys().len(), "journeys in force");
                *lock(&self.rules) = Some((text, Arc::clone(&rules)));
                Some(rules)
            }
            Err(e) => {
                error!(error = %e, "invalid rules file refused; the previous journeys stay in force");
                self.metrics.journeys.rules_reload_failures.inc();
                current.map(|(_, r)| r)
            }
        }
    }

    /// Reads the open journeys from the state table (once), then what
    /// arrived since the last look, and sets the gauges.
    pub async fn check(&self) -> Result<(), crate::store::StoreError> {
        let Some(rules) = self.rules() else {
            return Ok(());
        };
        let client = self.store.client();
        let tables = self.store.tables();
        if !lock(&self.tracked).loaded {
            let started = now_ns() / 1_000_000;
            let rows = client
                .query(&format!(
                    "SELECT Journey, Key, argMaxMerge(LastStatus) AS S, minMap(StatusSince) AS Since,
                        toUnixTimestamp64Nano(max(StatusTime)) AS T, toUnixTimestamp64Nano(min(FirstSeen)) AS F, toUnixTimestamp64Nano(max(LastSeen)) AS L,
                        max(ErrorSeen) AS E
                     FROM {} GROUP BY Journey, Key",
                    tables.journey_state
                ))
                .fetch_all::<StateRow>()
                .await?;
            let mut t = lock(&self.tracked);
            for row in rows {
                let Some(journey) = rules.journeys().iter().find(|j| j.name() == row.journey)
                else {
                    continue;
                };
                if journey.is_terminal(&row.status) {
                    continue;
                }
                let state = JourneyState {
                    status: row.status,
                    status_time: row.status_time,
                    first_by_status: row.since.0.into_iter().zip(row.since.1).collect(),
                    first_seen_ns: row.first,
                    last_seen_ns: row.last,
                    error_seen: row.error > 0,
                };
                t.journeys.insert((row.journey, row.key), state);
            }
            t.cursor_ms = started - OVERLAP_MS;
            t.loaded = true;
        }
        let from = lock(&self.tracked).cursor_ms - OVERLAP_MS;
        let rows = client
            .query(&format!(
                "SELECT Journey, Key, Status, toUnixTimestamp64Nano(Time) AS T, Error,
                    toUnixTimestamp64Milli(Ingested) AS I
                 FROM {} WHERE Ingested >= fromUnixTimestamp64Milli(toInt64(?))",
                tables.journey_events
            ))
            .bind(from)
            .fetch_all::<EventFold>()
            .await?;
        let now = now_ns();
        let mut t = lock(&self.tracked);
        for e in rows {
            t.cursor_ms = t.cursor_ms.max(e.ingested_ms);
            t.journeys
                .entry((e.journey, e.key))
                .or_default()
                .fold(&e.status, e.time, e.error > 0);
        }
        // Finished journeys are kept a while (so a late event cannot reopen
        // them), and journeys no rule names any more are forgotten.
        t.journeys.retain(|(name, _), state| {
            rules.journeys().iter().any(|j| {
                j.name() == name
                    && (!j.is_terminal(&state.status)
                        || now - state.last_seen_ns < FINISHED_RETENTION_NS)
            })
        });
        self.set_gauges(&rules, &t, now);
        self.metrics.journeys.checks.inc();
        self.metrics
            .journeys
            .last_check_seconds
            .set(now / 1_000_000_000);
        Ok(())
    }

    /// Sets the gauges from the journeys held. The new values are counted
    /// first and then set, and only labels that no longer apply are
    /// removed: a scrape in between never sees a gauge drop to nothing (an
    /// alert would resolve and fire again).
    fn set_gauges(&self, rules: &Rules, t: &Tracked, now: i64) {
        let m = &self.metrics.journeys;
        m.tracked
            .set(i64::try_from(t.journeys.len()).unwrap_or(i64::MAX));
        // (open, stuck, oldest stuck in seconds) by journey and status.
        let mut counts: HashMap<JourneyStatus, (i64, i64, i64)> = HashMap::new();
        for ((name, _), state) in &t.journeys {
            let Some(journey) = rules.journeys().iter().find(|j| j.name() == name) else {
                continue;
            };
            if journey.is_terminal(&state.status) {
                continue;
            }
            let c = counts
                .entry(JourneyStatus {
                    journey: name.clone(),
                    status: state.status.clone(),
                })
                .or_default();
            c.0 += 1;
            // Journeys already this old in their status are stuck.
            let age = Duration::from_nanos(
                u64::try_from(now.saturating_sub(state.since_ns())).unwrap_or(0),
            );
            if journey
                .max_time_in(&state.status)
                .is_some_and(|max| age > max)
            {
                c.1 += 1;
                c.2 = c.2.max(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
            }
        }
        let mut shown = lock(&self.shown);
        for label in shown.iter().filter(|l| !counts.contains_key(*l)) {
            m.open.remove(label);
            m.stuck.remove(label);
            m.oldest_stuck_seconds.remove(label);
        }
        for (label, (open, stuck, oldest)) in &counts {
            m.open.get_or_create(label).set(*open);
            if *stuck > 0 {
                m.stuck.get_or_create(label).set(*stuck);
                m.oldest_stuck_seconds.get_or_create(label).set(*oldest);
            } else {
                m.stuck.remove(label);
                m.oldest_stuck_seconds.remove(label);
            }
        }
        *shown = counts.into_keys().collect();
    }

    /// Stuck journeys, oldest first (at most [`MAX_LISTED`]).
    pub fn stuck(&self, only: Option<&str>) -> Vec<Stuck> {
        let Some((_, rules)) = lock(&self.rules).clone() else {
            return Vec::new();
        };
        let now = now_ns();
        let t = lock(&self.tracked);
        let mut out: Vec<Stuck> = t
            .journeys
            .iter()
            .filter(|((name, _), _)| only.is_none_or(|o| o == name))
            .filter_map(|((name, key), state)| {
                let journey = rules.journeys().iter().find(|j| j.name() == name)?;
                let max = journey.max_time_in(&state.status)?;
                let age = u64::try_from(now.saturating_sub(state.since_ns())).unwrap_or(0);
                (Duration::from_nanos(age) > max).then(|| Stuck {
                    journey: name.clone(),
                    key: key.clone(),
                    status: state.status.clone(),
                    since: rfc3339(state.since_ns()),
                    in_status_secs: age / 1_000_000_000,
                    limit_secs: max.as_secs(),
                    last_seen: rfc3339(state.last_seen_ns),
                    error_seen: state.error_seen,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.in_status_secs
                .cmp(&a.in_status_secs)
                .then(a.key.cmp(&b.key))
        });
        out.truncate(MAX_LISTED);
        out
    }

    /// Looks until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.check().await {
                self.metrics.journeys.check_failures.inc();
                warn!(error = %e, "could not look for stuck journeys; trying again next interval");
            }
        }
    }

    /// One journey's timeline from the events table.
    pub async fn timeline(
        &self,
        journey: &str,
        key: &str,
    ) -> Result<Timeline, crate::store::StoreError> {
        let rows = self
            .store
            .client()
            .query(&format!(
                "SELECT Status, toUnixTimestamp64Nano(Time) AS T, Service, SpanName, TraceId, Error, Kept, Rule
                 FROM {} WHERE Journey = ? AND Key = ? ORDER BY Time, SpanId LIMIT 10000",
                self.store.tables().journey_events
            ))
            .bind(journey)
            .bind(key)
            .fetch_all::<TimelineRow>()
            .await?;
        let rules = lock(&self.rules).clone().map(|(_, r)| r);
        let limits = rules
            .as_ref()
            .and_then(|r| r.journeys().iter().find(|j| j.name() == journey).cloned());
        Ok(timeline(
            journey,
            key,
            &rows,
            limits.as_ref(),
            self.trace_link.as_deref(),
            now_ns(),
        ))
    }
}

#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub struct TimelineRow {
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "T")]
    pub time: i64,
    #[serde(rename = "Service")]
    pub service: String,
    #[serde(rename = "SpanName")]
    pub span_name: String,
    #[serde(rename = "TraceId")]
    pub trace_id: String,
    #[serde(rename = "Error")]
    pub error: u8,
    #[serde(rename = "Kept")]
    pub kept: u8,
    #[serde(rename = "Rule")]
    pub rule: String,
}

/// One status of a journey and what happened while it lasted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// Empty for what happened before the first status.
    pub status: String,
    pub entered: String,
    /// Until the next status, or until now for the latest.
    pub lasted_secs: f64,
    /// Whether this is the latest status and it has lasted past its limit.
    pub stuck: bool,
    pub services: Vec<String>,
    pub span_names: Vec<String>,
    pub errors: usize,
    pub traces: Vec<TraceRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceRef {
    pub trace_id: String,
    pub kept: bool,
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub link: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    pub journey: String,
    pub key: String,
    pub status: String,
    pub finished: bool,
    pub events: usize,
    pub steps: Vec<Step>,
}

fn push_unique(list: &mut Vec<String>, value: &str) {
    if !list.iter().any(|v| v == value) {
        list.push(value.to_owned());
    }
}

/// Groups a journey's events (in time order) into steps, one per status change.
pub fn timeline(
    journey: &str,
    key: &str,
    rows: &[TimelineRow],
    limits: Option<&tailgate_sampling_rules::Journey>,
    trace_link: Option<&str>,
    now: i64,
) -> Timeline {
    let mut steps: Vec<(Step, i64)> = Vec::new();
    for row in rows {
        let changes =
            !row.status.is_empty() && steps.last().is_none_or(|(s, _)| s.status != row.status);
        if steps.is_empty() || changes {
            steps.push((
                Step {
                    status: row.status.clone(),
                    entered: rfc3339(row.time),
                    lasted_secs: 0.0,
                    stuck: false,
                    services: Vec::new(),
                    span_names: Vec::new(),
                    errors: 0,
                    traces: Vec::new(),
                },
                row.time,
            ));
        }
        let Some((step, _)) = steps.last_mut() else {
            continue;
        };
        push_unique(&mut step.services, &row.service);
        push_unique(&mut step.span_names, &row.span_name);
        step.errors += usize::from(row.error > 0);
        if !step.traces.iter().any(|t| t.trace_id == row.trace_id) {
            let kept = row.kept > 0;
            step.traces.push(TraceRef {
                trace_id: row.trace_id.clone(),
                kept,
                rule: row.rule.clone(),
                link: trace_link
                    .filter(|_| kept)
                    .map(|l| l.replace("{trace_id}", &row.trace_id)),
            });
        }
    }
    let starts: Vec<i64> = steps.iter().map(|(_, t)| *t).collect();
    let status = steps
        .iter()
        .rev()
        .find(|(s, _)| !s.status.is_empty())
        .map(|(s, _)| s.status.clone())
        .unwrap_or_default();
    let finished = limits.is_some_and(|j| j.is_terminal(&status));
    let last = steps.len().saturating_sub(1);
    for (i, (step, start)) in steps.iter_mut().enumerate() {
        let end = if i == last {
            if finished { *start } else { now }
        } else {
            starts[i + 1]
        };
        #[allow(clippy::cast_precision_loss)]
        {
            step.lasted_secs = (end.saturating_sub(*start)) as f64 / 1e9;
        }
        step.stuck = i == last
            && !finished
            && limits
                .and_then(|j| j.max_time_in(&step.status))
                .is_some_and(|max| step.lasted_secs > max.as_secs_f64());
    }
    Timeline {
        journey: journey.to_owned(),
        key: key.to_owned(),
        status,
        finished,
        events: rows.len(),
        steps: steps.into_iter().map(|(s, _)| s).collect(),
    }
}

/// `90s`, `12m 5s`, `3h 20m`, `2d 4h`: how long, for people.
pub fn human_secs(secs: f64) -> String {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A timeline as `tailgate journey <name> <key>` prints it.
pub fn render_timeline(t: &Timeline) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = if t.finished {
        "finished".to_owned()
    } else if t.steps.last().is_some_and(|s| s.stuck) {
        "STUCK".to_owned()
    } else {
        "open".to_owned()
    };
    let _ = writeln!(
        out,
        "{} {}: {} ({state}), {} events",
        t.journey,
        t.key,
        if t.status.is_empty() {
            "no status yet"
        } else {
            &t.status
        },
        t.events
    );
    for step in &t.steps {
        let name = if step.status.is_empty() {
            "(before any status)"
        } else {
            &step.status
        };
        let _ = writeln!(
            out,
            "  {}  {name:<24} {:>9}{}{}",
            step.entered,
            human_secs(step.lasted_secs),
            if step.stuck { "  STUCK" } else { "" },
            if step.errors > 0 {
                format!("  {} error span(s)", step.errors)
            } else {
                String::new()
            },
        );
        let _ = writeln!(out, "      services: {}", step.services.join(", "));
        let _ = writeln!(out, "      spans:    {}", step.span_names.join(", "));
        for trace in &step.traces {
            let fate = if trace.kept {
                format!("kept by {}", trace.rule)
            } else if trace.rule.is_empty() {
                "dropped".to_owned()
            } else {
                format!("dropped by {}", trace.rule)
            };
            let _ = writeln!(
                out,
                "      trace {} {fate}{}",
                trace.trace_id,
                trace
                    .link
                    .as_ref()
                    .map_or_else(String::new, |l| format!("  {l}"))
            );
        }
    }
    out
}

/// Stuck journeys as `tailgate journey <name> --stuck` prints them.
pub fn render_stuck(stuck: &[Stuck]) -> String {
    use std::fmt::Write;
    if stuck.is_empty() {
        return "no stuck journeys\n".to_owned();
    }
    let mut out = format!(
        "{:<10} {:<20} {:<24} {:<25} {:>10} {:>8}\n",
        "JOURNEY", "KEY", "STATUS", "SINCE", "FOR", "LIMIT"
    );
    for s in stuck {
        #[allow(clippy::cast_precision_loss)]
        let _ = writeln!(
            out,
            "{:<10} {:<20} {:<24} {:<25} {:>10} {:>8}{}",
            s.journey,
            s.key,
            s.status,
            s.since,
            human_secs(s.in_status_secs as f64),
            human_secs(s.limit_secs as f64),
            if s.error_seen { "  errors seen" } else { "" }
        );
    }
    out
}

#[derive(Debug, Deserialize)]
struct StuckQuery {
    journey: Option<String>,
}

/// `/journeys/stuck[?journey=order]` and `/journeys/{journey}/{key}`.
pub fn router(finder: Arc<Finder>) -> Router {
    Router::new()
        .route("/journeys/stuck", get(stuck_handler))
        .route("/journeys/{journey}/{key}", get(timeline_handler))
        .with_state(finder)
}

async fn stuck_handler(
    State(f): State<Arc<Finder>>,
    Query(q): Query<StuckQuery>,
) -> Json<Vec<Stuck>> {
    Json(f.stuck(q.journey.as_deref()))
}

async fn timeline_handler(
    State(f): State<Arc<Finder>>,
    Path((journey, key)): Path<(String, String)>,
) -> Result<Json<Timeline>, (StatusCode, String)> {
    match f.timeline(&journey, &key).await {
        Ok(t) if t.events == 0 => Err((
            StatusCode::NOT_FOUND,
            format!("no events of journey {journey:?} with key {key:?}\n"),
        )),
        Ok(t) => Ok(Json(t)),
        Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    /// Folding is order-free: any order of the same events gives the same
    /// state, and folding an event twice changes nothing (the overlap).
    #[test]
    fn folding_is_idempotent_and_order_free() {
        let events = [
            ("NEW", 10 * S, false),
            ("", 11 * S, true),
            ("PRICE_CALCULATED", 20 * S, false),
            ("PRICE_CALCULATED", 25 * S, false),
        ];
        let mut forward = JourneyState::default();
        for (s, t, e) in events {
            forward.fold(s, t, e);
        }
        let mut backward = JourneyState::default();
        for (s, t, e) in events.iter().rev().chain(events.iter()) {
            backward.fold(s, *t, *e);
        }
        backward.first_by_status.sort();
        forward.first_by_status.sort();
        assert_eq!(forward, backward);
        assert_eq!(forward.status, "PRICE_CALCULATED");
        assert_eq!(forward.since_ns(), 20 * S, "entered at its first event");
        assert_eq!(
            (forward.first_seen_ns, forward.last_seen_ns),
            (10 * S, 25 * S)
        );
        assert!(forward.error_seen);
    }

    fn row(status: &str, t: i64, service: &str, trace: &str, kept: bool) -> TimelineRow {
        TimelineRow {
            status: status.into(),
            time: t,
            service: service.into(),
            span_name: format!("{service} span"),
            trace_id: trace.into(),
            error: 0,
            kept: u8::from(kept),
            rule: if kept { "errors" } else { "random" }.into(),
        }
    }

    /// A timeline has one step per status change, each with how long it
    /// lasted, its services and its traces (kept ones linked), and the
    /// latest step is stuck once past its limit.
    #[test]
    fn timeline_steps() {
        let rules = Rules::from_yaml(
            "rules:\n  - name: all\n    action: keep\njourneys:\n  - name: order\n    key: attributes.order.id\n    status: attributes.order.status\n    max_time_in_status: { PRICE_CALCULATED: 10m }\n    terminal: [SHIPPED]\n",
            "r.yaml",
        )
        .unwrap();
        let j = &rules.journeys()[0];
        let rows = [
            row("NEW", 0, "shop", "t1", false),
            row("", S, "crm", "t1", false),
            row("PRICE_CALCULATED", 60 * S, "crm", "t2", true),
        ];
        let t = timeline(
            "order",
            "4711",
            &rows,
            Some(j),
            Some("http://jaeger/trace/{trace_id}"),
            60 * S + 3600 * S,
        );
        assert_eq!(t.status, "PRICE_CALCULATED");
        assert!(!t.finished);
        assert_eq!(t.steps.len(), 2);
        assert_eq!(t.steps[0].services, ["shop", "crm"]);
        assert!((t.steps[0].lasted_secs - 60.0).abs() < 1e-9);
        assert!(!t.steps[0].stuck);
        assert!(t.steps[1].stuck, "an hour at PRICE_CALCULATED, limit 10m");
        assert_eq!(
            t.steps[1].traces[0].link.as_deref(),
            Some("http://jaeger/trace/t2")
        );
        assert_eq!(
            t.steps[0].traces[0].link, None,
            "a dropped trace has no link"
        );
        let done = [
            row("NEW", 0, "shop", "t1", false),
            row("SHIPPED", S, "mes", "t3", false),
        ];
        let t = timeline("order", "1", &done, Some(j), None, 100 * S);
        assert!(t.finished);
        assert!(!t.steps[1].stuck);
    }

    /// The printed timeline names each status, how long it lasted, the
    /// services and every trace with its fate.
    #[test]
    fn rendering() {
        let rules = Rules::from_yaml(
            "rules:\n  - name: all\n    action: keep\njourneys:\n  - name: order\n    key: attributes.order.id\n    status: attributes.order.status\n    max_time_in_status: { PRICE_CALCULATED: 10m }\n",
            "r.yaml",
        )
        .unwrap();
        let rows = [
            row("NEW", 0, "shop", "t1", false),
            row("PRICE_CALCULATED", 60 * S, "crm", "t2", false),
        ];
        let t = timeline(
            "order",
            "4711",
            &rows,
            Some(&rules.journeys()[0]),
            None,
            7260 * S,
        );
        let text = render_timeline(&t);
        assert!(
            text.starts_with("order 4711: PRICE_CALCULATED (STUCK), 2 events"),
            "{text}"
        );
        assert!(text.contains("NEW"), "{text}");
        assert!(text.contains("2h 0m  STUCK"), "{text}");
        assert!(text.contains("trace t2 dropped by random"), "{text}");
        assert_eq!(human_secs(59.4), "59s");
        assert_eq!(human_secs(90_000.0), "1d 1h");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_796_300_000 * S + 123_000_000),
            "2026-12-03T12:13:20.123Z"
        );
    }
}
