//! The daily aggregates behind status pages (README, "Status pages"). The transaction that
//! finishes a run also queues it (`rollup_queue`); [`Store::fold_finished_runs`] takes queued
//! runs out and adds them to the day of each page time zone in the same transaction, so every
//! run is counted once, whichever node folds it. Pages read only these tables, which outlive
//! the runs (retention ages them by `day_start`). Shadow runs are taken out of the queue
//! uncounted: they decide nothing.

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;
use chrono_tz::Tz;
use sqlx::FromRow;

use super::statement::{Value, placeholders};
use super::store::SqlBatch;
use super::{Result, Store};
use crate::model::{
    CheckKey, DayRollup, FinishedRun, FinishedStep, Incident, Outcomes, RunStatus, StepRollup,
    StepStatus, UnixMillis, day_of, day_text, latency_bucket,
};

/// Queues a finished run for the aggregates: `$1` the run, `$2` when it finished.
pub(super) const QUEUE_FINISHED: &str =
    "INSERT INTO rollup_queue (run_id, finished_at) VALUES ($1, $2)";

const ADD_DAY: &str = "INSERT INTO rollup_days (zone, plugin_name, schedule_id, day, day_start, passed, failed, \
     errored, timed_out, cancelled, last_finished_at, last_status) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
     ON CONFLICT (zone, plugin_name, schedule_id, day) DO UPDATE SET \
     passed = rollup_days.passed + excluded.passed, failed = rollup_days.failed + excluded.failed, \
     errored = rollup_days.errored + excluded.errored, timed_out = rollup_days.timed_out + excluded.timed_out, \
     cancelled = rollup_days.cancelled + excluded.cancelled, \
     last_status = CASE WHEN excluded.last_finished_at >= rollup_days.last_finished_at \
     THEN excluded.last_status ELSE rollup_days.last_status END, \
     last_finished_at = CASE WHEN excluded.last_finished_at >= rollup_days.last_finished_at \
     THEN excluded.last_finished_at ELSE rollup_days.last_finished_at END";

const ADD_STEP: &str = "INSERT INTO rollup_steps (zone, plugin_name, schedule_id, day, position, name, day_start, \
     passed, ended_run, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (zone, plugin_name, schedule_id, day, position) DO UPDATE SET name = excluded.name, \
     passed = rollup_steps.passed + excluded.passed, ended_run = rollup_steps.ended_run + excluded.ended_run, \
     attempts = rollup_steps.attempts + excluded.attempts";

const ADD_LATENCY: &str = "INSERT INTO rollup_latency (zone, plugin_name, schedule_id, day, position, bucket, \
     day_start, runs) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (zone, plugin_name, schedule_id, day, position, bucket) DO UPDATE SET \
     runs = rollup_latency.runs + excluded.runs";

/// Failed runs extend the open incident of their plugin and schedule…
const EXTEND_INCIDENT: &str = "UPDATE incidents SET last_failed_at = $1, runs = runs + $2, failing_step = $3, \
     status = $4, message = $5 WHERE plugin_name = $6 AND schedule_id = $7 AND ended_at IS NULL";
/// …or open one (the same values, in the same order, then the first one's finish).
const OPEN_INCIDENT: &str = "INSERT INTO incidents (last_failed_at, runs, failing_step, status, message, \
     plugin_name, schedule_id, started_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE NOT EXISTS \
     (SELECT 1 FROM incidents WHERE plugin_name = $9 AND schedule_id = $10 AND ended_at IS NULL)";
/// A passed run ends it.
const END_INCIDENT: &str = "UPDATE incidents SET ended_at = $1 \
     WHERE plugin_name = $2 AND schedule_id = $3 AND ended_at IS NULL";

/// Runs folded per transaction. Their writes are summed per day, step and bucket first, so a
/// larger batch is barely more to write; each one takes a turn of SQLite's writer thread
/// (`steps` bench, runs triggered over HTTP meanwhile: 200 a batch cost 8 % of steps/s).
pub const FOLD_BATCH: usize = 1000;

#[derive(FromRow)]
struct RunRow {
    id: String,
    plugin_name: String,
    schedule_id: Option<String>,
    created_at: i64,
    finished_at: Option<i64>,
    status: String,
    message: Option<String>,
}

#[derive(FromRow)]
struct StepRow {
    run_id: String,
    position: i64,
    name: String,
    status: String,
    attempts: i64,
    passed_after_ms: Option<i64>,
}

#[derive(FromRow)]
struct DayRow {
    day: String,
    passed: i64,
    failed: i64,
    errored: i64,
    timed_out: i64,
    cancelled: i64,
    last_finished_at: i64,
    last_status: String,
}

#[derive(FromRow)]
struct IncidentRow {
    started_at: i64,
    ended_at: Option<i64>,
    last_failed_at: i64,
    runs: i64,
    failing_step: Option<String>,
    status: String,
    message: Option<String>,
}

/// The rows of `key`, as `$param`: one schedule's (its id is unique, and outlives the
/// schedule), or every row of a plugin's.
fn key_filter(key: &CheckKey, param: usize) -> (String, &str) {
    match &key.schedule {
        Some(schedule) => (format!("schedule_id = ${param}"), schedule),
        None => (format!("plugin_name = ${param}"), &key.plugin),
    }
}

impl Store {
    /// Folds up to `limit` queued runs, those that finished first first, into the aggregates
    /// of each of `zones` and into the incidents; returns how many it took out of the queue.
    /// One node at a time does it (the `rollups` job's lease), so incidents see runs in the
    /// order they finished.
    pub async fn fold_finished_runs(&self, zones: &[Tz], limit: usize) -> Result<usize> {
        let queued: Vec<(String,)> =
            sqlx::query_as("SELECT run_id FROM rollup_queue ORDER BY finished_at, run_id LIMIT $1")
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
        if queued.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = queued.into_iter().map(|(id,)| id).collect();
        let mut runs = self.finished_runs(&ids).await?;
        let mut batch: SqlBatch = vec![(
            format!(
                "DELETE FROM rollup_queue WHERE run_id IN ({})",
                placeholders(1, ids.len())
            ),
            ids.iter().map(|id| Value::from(id.clone())).collect(),
        )];
        let mut fold = Fold::default();
        for id in &ids {
            // A run retention already deleted is not counted.
            if let Some(run) = runs.remove(id) {
                fold.days(&run, zones);
                fold.incident(&run);
            }
        }
        fold.write(&mut batch);
        self.run_together(batch).await?;
        Ok(ids.len())
    }

    /// Whether finished runs wait to be folded: a read, so that an idle node takes no lease.
    pub async fn rollups_pending(&self) -> Result<bool> {
        let queued: Option<(String,)> = sqlx::query_as("SELECT run_id FROM rollup_queue LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(queued.is_some())
    }

    /// Recomputes the aggregates and incidents from the runs still stored, for every day after
    /// the first that has runs (that day's runs may be partly gone, and days before keep what
    /// was folded then). Empties the queue: every finished run is counted here. Returns the
    /// runs counted.
    pub async fn rebuild_rollups(&self, zones: &[Tz]) -> Result<u64> {
        let oldest: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT MIN(created_at) FROM runs WHERE finished_at IS NOT NULL")
                .fetch_optional(&self.pool)
                .await?;
        let mut batch: SqlBatch = vec![("DELETE FROM rollup_queue".to_owned(), Vec::new())];
        let Some(oldest) = oldest.and_then(|(at,)| at) else {
            self.run_together(batch).await?;
            return Ok(0);
        };
        // Each zone from the start of its day after the oldest run's; incidents from UTC's.
        let from = |zone: Tz| {
            let (day, _) = day_of(oldest, zone);
            crate::model::day_start(day.succ_opt().unwrap_or(day), zone)
        };
        for zone in zones {
            for table in ["rollup_days", "rollup_steps", "rollup_latency"] {
                batch.push((
                    format!("DELETE FROM {table} WHERE zone = $1 AND day_start >= $2"),
                    vec![
                        Value::from(zone.name().to_owned()),
                        Value::from(from(*zone)),
                    ],
                ));
            }
        }
        let incidents_from = from(Tz::UTC);
        batch.push((
            "DELETE FROM incidents WHERE ended_at IS NULL OR ended_at >= $1 OR started_at >= $2"
                .to_owned(),
            vec![Value::from(incidents_from), Value::from(incidents_from)],
        ));
        let ids: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM runs WHERE finished_at IS NOT NULL AND shadow_of IS NULL \
             ORDER BY finished_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
        let mut counted = 0;
        let mut fold = Fold::default();
        for page in ids.chunks(FOLD_BATCH) {
            let mut runs = self.finished_runs(page).await?;
            for id in page {
                let Some(run) = runs.remove(id) else { continue };
                let zones: Vec<Tz> = zones
                    .iter()
                    .copied()
                    .filter(|zone| run.created_at >= from(*zone))
                    .collect();
                fold.days(&run, &zones);
                if run.finished_at >= incidents_from {
                    fold.incident(&run);
                }
                counted += 1;
            }
        }
        fold.write(&mut batch);
        self.run_together(batch).await?;
        Ok(counted)
    }

    /// The finished runs among `ids`, with their steps.
    async fn finished_runs(&self, ids: &[String]) -> Result<HashMap<String, FinishedRun>> {
        let list = placeholders(1, ids.len());
        let sql = format!(
            "SELECT id, plugin_name, schedule_id, created_at, finished_at, status, message \
             FROM runs WHERE finished_at IS NOT NULL AND shadow_of IS NULL AND id IN ({list})"
        );
        let mut query = sqlx::query_as::<_, RunRow>(&sql);
        for id in ids {
            query = query.bind(id.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        let sql = format!(
            "SELECT run_id, position, name, status, attempts, passed_after_ms FROM steps \
             WHERE run_id IN ({list}) ORDER BY run_id, position"
        );
        let mut steps_query = sqlx::query_as::<_, StepRow>(&sql);
        for id in ids {
            steps_query = steps_query.bind(id.as_str());
        }
        let mut steps: HashMap<String, Vec<FinishedStep>> = HashMap::new();
        for step in steps_query.fetch_all(&self.pool).await? {
            let Some(status) = StepStatus::parse(&step.status) else {
                continue;
            };
            steps.entry(step.run_id).or_default().push(FinishedStep {
                position: step.position.max(0) as usize,
                name: step.name,
                status,
                attempts: step.attempts,
                passed_after_ms: step.passed_after_ms,
            });
        }
        let mut runs = HashMap::new();
        for row in rows {
            let (Some(status), Some(finished_at)) =
                (RunStatus::parse(&row.status), row.finished_at)
            else {
                continue;
            };
            let steps = steps.remove(&row.id).unwrap_or_default();
            runs.insert(
                row.id,
                FinishedRun {
                    plugin: row.plugin_name,
                    schedule: row.schedule_id,
                    created_at: row.created_at,
                    finished_at,
                    status,
                    message: row.message,
                    steps,
                },
            );
        }
        Ok(runs)
    }

    /// The days of `key` in `zone` from `from` on, oldest first; a plugin's
    /// schedules are added up per day.
    pub async fn rollup_days(
        &self,
        zone: Tz,
        key: &CheckKey,
        from: NaiveDate,
    ) -> Result<Vec<DayRollup>> {
        let (filter, value) = key_filter(key, 2);
        let sql = format!(
            "SELECT day, passed, failed, errored, timed_out, cancelled, last_finished_at, last_status \
             FROM rollup_days WHERE zone = $1 AND {filter} AND day >= $3 ORDER BY day"
        );
        let query = sqlx::query_as::<_, DayRow>(&sql)
            .bind(zone.name())
            .bind(value)
            .bind(day_text(from));
        let mut days: Vec<DayRollup> = Vec::new();
        for row in query.fetch_all(&self.pool).await? {
            let (Ok(day), Some(last_status)) = (
                chrono::NaiveDate::parse_from_str(&row.day, "%Y-%m-%d"),
                RunStatus::parse(&row.last_status),
            ) else {
                continue;
            };
            let outcomes = Outcomes {
                passed: row.passed,
                failed: row.failed,
                errored: row.errored,
                timed_out: row.timed_out,
                cancelled: row.cancelled,
            };
            match days.last_mut() {
                Some(same) if same.day == day => {
                    same.outcomes.merge(&outcomes);
                    if row.last_finished_at >= same.last_finished_at {
                        same.last_finished_at = row.last_finished_at;
                        same.last_status = last_status;
                    }
                }
                _ => days.push(DayRollup {
                    day,
                    outcomes,
                    last_finished_at: row.last_finished_at,
                    last_status,
                }),
            }
        }
        Ok(days)
    }

    /// The steps of `key` in `zone` added up from `from` on, by position.
    pub async fn rollup_steps(
        &self,
        zone: Tz,
        key: &CheckKey,
        from: NaiveDate,
    ) -> Result<Vec<StepRollup>> {
        let (filter, value) = key_filter(key, 2);
        let sql = format!(
            "SELECT position, MAX(name), CAST(SUM(passed) AS BIGINT), CAST(SUM(ended_run) AS BIGINT), \
             CAST(SUM(attempts) AS BIGINT) FROM rollup_steps \
             WHERE zone = $1 AND {filter} AND day >= $3 GROUP BY position ORDER BY position"
        );
        let query = sqlx::query_as::<_, (i64, String, i64, i64, i64)>(&sql)
            .bind(zone.name())
            .bind(value)
            .bind(day_text(from));
        let mut steps: BTreeMap<i64, StepRollup> = BTreeMap::new();
        for (position, name, passed, ended_run, attempts) in query.fetch_all(&self.pool).await? {
            steps.insert(
                position,
                StepRollup {
                    position: position.max(0) as usize,
                    name,
                    passed,
                    ended_run,
                    attempts,
                    latency: BTreeMap::new(),
                },
            );
        }
        let sql = format!(
            "SELECT position, bucket, CAST(SUM(runs) AS BIGINT) FROM rollup_latency \
             WHERE zone = $1 AND {filter} AND day >= $3 GROUP BY position, bucket"
        );
        let query = sqlx::query_as::<_, (i64, i64, i64)>(&sql)
            .bind(zone.name())
            .bind(value)
            .bind(day_text(from));
        for (position, bucket, runs) in query.fetch_all(&self.pool).await? {
            if let Some(step) = steps.get_mut(&position) {
                step.latency.insert(bucket, runs);
            }
        }
        Ok(steps.into_values().collect())
    }

    /// The newest `limit` incidents of `key`, newest first.
    pub async fn incidents(&self, key: &CheckKey, limit: u32) -> Result<Vec<Incident>> {
        let (filter, value) = key_filter(key, 1);
        let sql = format!(
            "SELECT started_at, ended_at, last_failed_at, runs, failing_step, status, message \
             FROM incidents WHERE {filter} ORDER BY started_at DESC LIMIT {limit}"
        );
        Ok(sqlx::query_as::<_, IncidentRow>(&sql)
            .bind(value)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .filter_map(|row| {
                Some(Incident {
                    started_at: row.started_at,
                    ended_at: row.ended_at,
                    last_failed_at: row.last_failed_at,
                    runs: row.runs,
                    failing_step: row.failing_step,
                    status: RunStatus::parse(&row.status)?,
                    message: row.message,
                })
            })
            .collect())
    }

    /// How the runs of `key` created since `since` came out, from the runs themselves: the
    /// last 24 hours are finer than a day. The range is on run ids, which begin with their
    /// creation time, so it reads only those runs' index entries.
    pub async fn recent_outcomes(&self, key: &CheckKey, since: UnixMillis) -> Result<Outcomes> {
        let (filter, value) = key_filter(key, 1);
        let since = since.max(0) as u64;
        let first_id = format!(
            "{:08x}-{:04x}-0000-0000-000000000000",
            since >> 16,
            since & 0xffff
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT status, COUNT(*) FROM runs WHERE {filter} AND id >= $2 \
             AND finished_at IS NOT NULL AND shadow_of IS NULL GROUP BY status"
        ))
        .bind(value)
        .bind(first_id)
        .fetch_all(&self.pool)
        .await?;
        let mut outcomes = Outcomes::default();
        for (status, runs) in rows {
            if let Some(status) = RunStatus::parse(&status) {
                outcomes.add(status, runs);
            }
        }
        Ok(outcomes)
    }
}

type DayKey = (String, String, String, String);

/// What a batch of finished runs adds, summed per row before anything is written: a batch is
/// a statement per day, step and latency bucket it touches, not per run (on SQLite the
/// writer thread runs them between ticks).
/// One step's figures on one day.
struct StepSums {
    name: String,
    day_start: i64,
    passed: i64,
    ended_run: i64,
    attempts: i64,
}

#[derive(Default)]
struct Fold {
    /// (zone, plugin, schedule, day) → the day's start, outcomes, and the last finish.
    days: BTreeMap<DayKey, (i64, Outcomes, i64, RunStatus)>,
    /// … and position.
    steps: BTreeMap<(DayKey, i64), StepSums>,
    /// … and position and bucket → day start, runs.
    latency: BTreeMap<(DayKey, i64, i64), (i64, i64)>,
    /// (plugin, schedule) → its decided runs in the order they finished.
    incidents: BTreeMap<(String, String), Vec<FinishedRun>>,
}

impl Fold {
    /// `run`'s day in each of `zones`.
    fn days(&mut self, run: &FinishedRun, zones: &[Tz]) {
        let schedule = run.schedule.clone().unwrap_or_default();
        let failing = run.failing_step().map(|step| step.position);
        for zone in zones {
            let (day, day_start) = day_of(run.created_at, *zone);
            let key: DayKey = (
                zone.name().to_owned(),
                run.plugin.clone(),
                schedule.clone(),
                day_text(day),
            );
            let entry = self.days.entry(key.clone()).or_insert((
                day_start,
                Outcomes::default(),
                run.finished_at,
                run.status,
            ));
            entry.1.add(run.status, 1);
            if run.finished_at >= entry.2 {
                (entry.2, entry.3) = (run.finished_at, run.status);
            }
            for step in run.steps.iter().filter(|step| step.status.is_decided()) {
                let position = step.position as i64;
                let passed = step.status == StepStatus::Passed;
                let sums = self
                    .steps
                    .entry((key.clone(), position))
                    .or_insert(StepSums {
                        name: step.name.clone(),
                        day_start,
                        passed: 0,
                        ended_run: 0,
                        attempts: 0,
                    });
                sums.passed += i64::from(passed);
                sums.ended_run += i64::from(failing == Some(step.position));
                sums.attempts += step.attempts;
                if let (true, Some(ms)) = (passed, step.passed_after_ms) {
                    self.latency
                        .entry((key.clone(), position, latency_bucket(ms)))
                        .or_insert((day_start, 0))
                        .1 += 1;
                }
            }
        }
    }

    /// `run`'s part in its plugin and schedule's incidents (passed or failed runs only).
    fn incident(&mut self, run: &FinishedRun) {
        if run.status == RunStatus::Passed || run.status.is_failure() {
            let key = (run.plugin.clone(), run.schedule.clone().unwrap_or_default());
            self.incidents.entry(key).or_default().push(run.clone());
        }
    }

    fn write(self, batch: &mut SqlBatch) {
        let key_values = |(zone, plugin, schedule, day): DayKey| {
            [zone, plugin, schedule, day].map(Value::from).to_vec()
        };
        for (key, (day_start, outcomes, last_at, last_status)) in self.days {
            let mut values = key_values(key);
            values.extend([
                Value::from(day_start),
                Value::from(outcomes.passed),
                Value::from(outcomes.failed),
                Value::from(outcomes.errored),
                Value::from(outcomes.timed_out),
                Value::from(outcomes.cancelled),
                Value::from(last_at),
                Value::from(last_status.as_str()),
            ]);
            batch.push((ADD_DAY.to_owned(), values));
        }
        for ((key, position), sums) in self.steps {
            let mut values = key_values(key);
            values.extend([
                Value::from(position),
                Value::from(sums.name),
                Value::from(sums.day_start),
                Value::from(sums.passed),
                Value::from(sums.ended_run),
                Value::from(sums.attempts),
            ]);
            batch.push((ADD_STEP.to_owned(), values));
        }
        for ((key, position, bucket), (day_start, runs)) in self.latency {
            let mut values = key_values(key);
            values.extend([
                Value::from(position),
                Value::from(bucket),
                Value::from(day_start),
                Value::from(runs),
            ]);
            batch.push((ADD_LATENCY.to_owned(), values));
        }
        for ((plugin, schedule), runs) in self.incidents {
            // Consecutive failed runs make one write; a passed run ends what is open.
            let mut failed: Vec<&FinishedRun> = Vec::new();
            for run in &runs {
                if run.status == RunStatus::Passed {
                    write_failures(batch, &plugin, &schedule, &failed);
                    failed.clear();
                    batch.push((
                        END_INCIDENT.to_owned(),
                        vec![
                            Value::from(run.finished_at),
                            Value::from(plugin.clone()),
                            Value::from(schedule.clone()),
                        ],
                    ));
                } else {
                    failed.push(run);
                }
            }
            write_failures(batch, &plugin, &schedule, &failed);
        }
    }
}

/// Extends the open incident by `failed` runs, or opens one with them.
fn write_failures(batch: &mut SqlBatch, plugin: &str, schedule: &str, failed: &[&FinishedRun]) {
    let (Some(first), Some(last)) = (failed.first(), failed.last()) else {
        return;
    };
    let values = vec![
        Value::from(last.finished_at),
        Value::from(failed.len() as i64),
        Value::from(last.failing_step().map(|step| step.name.clone())),
        Value::from(last.status.as_str()),
        Value::from(last.message.clone()),
        Value::from(plugin.to_owned()),
        Value::from(schedule.to_owned()),
    ];
    batch.push((EXTEND_INCIDENT.to_owned(), values.clone()));
    let mut open = values;
    open.extend([
        Value::from(first.finished_at),
        Value::from(plugin.to_owned()),
        Value::from(schedule.to_owned()),
    ]);
    batch.push((OPEN_INCIDENT.to_owned(), open));
}
