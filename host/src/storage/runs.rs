//! Runs and their ticks: new runs, reads for the API, claims, and the lease-fenced results.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value as Json, json};
use sqlx::{FromRow, Row};

use super::backend::Backend;
use super::events::INSERT_EVENT;
use super::leases::Claimable;
use super::statement::{SqlxTx, Statement, Tx, Value};
use super::store::{HotPath, Writes, corrupt, labels_json};
use super::{
    AttemptList, AttemptPage, AttemptRecord, Cancelled, Change, ClaimedRun, Enqueued, Error,
    LoadedTick, NewRun, Result, RunFilter, RunRecord, StepRecord, Store, TickWrite,
};
use crate::model::{
    AttemptOutcome, LogLevel, LogLine, PluginVersion, Retry, RunId, RunStatus, StepStatus,
    UnixMillis,
};

const RUN_COLUMNS: &str = "id, plugin_name, plugin_version, params, labels, status, message, poll_interval_ms, \
     max_errors, error_count, current_step, created_at, started_at, finished_at, deadline_at, next_tick_at, lease_owner, \
     http_requests, schedule_id, retry, created_by, cancelled_by, log_bytes, shadow_of, recording_bytes";

// The statements of the hot path, shared by sqlx (both backends) and the SQLite writer thread.
// `INSERT_*` are heads: a `VALUES` list follows, one row or many.
pub(super) const INSERT_RUNS: &str = "INSERT INTO runs (id, plugin_name, plugin_version, params, labels, status, \
     poll_interval_ms, max_errors, idempotency_key, idempotency_fingerprint, created_at, deadline_at, next_tick_at, \
     schedule_id, retry, created_by, shadow_of) VALUES ";
pub(super) const INSERT_LABELS: &str = "INSERT INTO run_labels (run_id, key, value) VALUES ";
pub(super) const INSERT_RUN_EVENTS: &str = "INSERT INTO events (run_id, at) VALUES ";
pub(super) const INSERT_STEPS: &str =
    "INSERT INTO steps (run_id, position, name, status, timeout_ms, max_attempts) VALUES ";
pub(super) const STEPS_SQL: &str = "SELECT position, name, status, attempts, timeout_ms, max_attempts, message, \
     output, first_attempt_at, last_attempt_at, finished_at, passed_after_ms FROM steps WHERE run_id = $1 ORDER BY position";
pub(super) const NEXT_DUE_SQL: &str = "SELECT next_tick_at FROM runs WHERE next_tick_at IS NOT NULL \
     AND next_tick_at > $1 ORDER BY next_tick_at LIMIT 1";
pub(super) const INSERT_ATTEMPT: &str = "INSERT INTO attempts (run_id, position, attempt, outcome, message, logs, \
     started_at, duration_ms, due_at, node, recording) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
/// A run that passed with `record = "failures"` keeps no recording.
const DROP_RECORDINGS: &str =
    "UPDATE attempts SET recording = NULL WHERE run_id = $1 AND recording IS NOT NULL";
/// A step's terminal result is written once: a step already finished is never updated. The
/// attempt columns change only when a call was made.
pub(super) const UPDATE_STEP: &str = "UPDATE steps SET status = $1, message = $2, output = $3, passed_after_ms = $4, \
     finished_at = $5, attempts = COALESCE($6, attempts), first_attempt_at = COALESCE(first_attempt_at, $7), \
     last_attempt_at = COALESCE($7, last_attempt_at) \
     WHERE run_id = $8 AND position = $9 AND status IN ('waiting', 'pending')";
pub(super) const SKIP_REST: &str =
    "UPDATE steps SET status = 'skipped' WHERE run_id = $1 AND position > $2";

/// The run and its plugin's grant, by `$1`.
pub(super) fn load_tick_sql() -> String {
    format!(
        "SELECT {RUN_COLUMNS}, grant_toml FROM runs LEFT JOIN plugins ON plugins.name = runs.plugin_name \
         WHERE runs.id = $1"
    )
}

/// Runs whose next tick is due.
pub(super) const DUE_RUNS: Claimable = Claimable {
    table: "runs",
    due: "next_tick_at",
    filter: "",
    returning: "id, lease_token, next_tick_at",
};

/// What a tick's write does with its lease: keep it for `$param` ms more by the database's
/// clock, or release it (`$param` is then NULL).
pub(super) fn tick_lease_sql(backend: Backend, keep_lease: bool, param: usize) -> String {
    match keep_lease {
        true => format!("lease_expires_at = {} + ${param}", backend.now_sql()),
        false => format!("lease_owner = NULL, lease_expires_at = ${param}"),
    }
}

/// The run's side of a tick, fenced by the lease token (`$13`): a lost lease updates no row.
/// `$9` is how long to keep the lease, or NULL with `keep_lease` false (it is released).
/// Parameters are numbered in the order they appear: SQLite numbers `$n` that way.
pub(super) fn tick_run_sql(backend: Backend, keep_lease: bool) -> String {
    let lease = tick_lease_sql(backend, keep_lease, 9);
    format!(
        "UPDATE runs SET status = $1, message = $2, current_step = $3, error_count = $4, http_requests = $5, \
         started_at = COALESCE(started_at, $6), finished_at = $7, next_tick_at = $8, {lease}, log_bytes = $10, \
         recording_bytes = $11 WHERE id = $12 AND lease_token = $13 AND status IN ('queued', 'running')"
    )
}

impl Store {
    /// Makes a run durable and due at once. With an idempotency key already used, returns that
    /// run instead, or `KeyReused` if the key came with another request then.
    pub async fn enqueue_run(&self, run: &NewRun) -> Result<Enqueued> {
        if let Some(key) = &run.idempotency_key
            && let Some(existing) = self.find_run_by_idempotency_key(key).await?
        {
            return Ok(existing.answer_to(run));
        }
        let written = match &self.hot {
            HotPath::Sqlite { writer, .. } => writer.enqueue(run.clone()).await,
            // Alone: its unique key may clash with a concurrent request's, which must not fail
            // a batch of others.
            HotPath::Postgres(_) if run.idempotency_key.is_some() => {
                write_runs_together(&self.writes, self.backend, std::slice::from_ref(run)).await
            }
            HotPath::Postgres(runs) => runs.submit(run.clone()).await,
        };
        if let Err(error) = written {
            // Two requests with one key raced: the other one's run is the answer.
            if error.is_unique_violation_of("runs.idempotency_key")
                && let Some(key) = &run.idempotency_key
            {
                return match self.find_run_by_idempotency_key(key).await? {
                    Some(existing) => Ok(existing.answer_to(run)),
                    None => Err(Error::Conflict {
                        constraint: "runs.idempotency_key".into(),
                    }),
                };
            }
            return Err(error);
        }
        self.events_written();
        // What was just written, without reading it back.
        Ok(Enqueued::Created(run.queued_record()))
    }

    async fn find_run_by_idempotency_key(&self, key: &str) -> Result<Option<KeyedRun>> {
        let found: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, idempotency_fingerprint FROM runs WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, fingerprint)) = found else {
            return Ok(None);
        };
        Ok(self
            .find_run(&RunId::from_stored(id))
            .await?
            .map(|run| KeyedRun { run, fingerprint }))
    }

    /// The recordings of a run's attempts (compressed, as the runner stored them), in order:
    /// by step, then attempt. Empty when the run was not recorded.
    pub async fn run_recordings(&self, id: &RunId) -> Result<Vec<Vec<u8>>> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
            "SELECT recording FROM attempts WHERE run_id = $1 AND recording IS NOT NULL \
             ORDER BY position, attempt",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(recording,)| recording).collect())
    }

    /// A run with its steps.
    pub async fn find_run(&self, id: &RunId) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
        let Some(row) = sqlx::query_as::<_, RunRow>(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut run = row.into_record()?;
        run.steps = self.load_steps(id).await?;
        Ok(Some(run))
    }

    async fn load_steps(&self, id: &RunId) -> Result<Vec<StepRecord>> {
        let steps: Vec<StepRow> = sqlx::query_as(STEPS_SQL)
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        steps.into_iter().map(StepRow::into_record).collect()
    }

    /// What a tick needs: the run with its steps, and its plugin's current grant (`None` if
    /// the plugin no longer exists). On SQLite the claim loaded it already; else two queries.
    pub async fn load_tick(&self, claim: &ClaimedRun) -> Result<Option<LoadedTick>> {
        if let Some(loaded) = &claim.loaded {
            return Ok(Some(LoadedTick::clone(loaded)));
        }
        let id = &claim.id;
        let Some(row) = sqlx::query(&load_tick_sql())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let grant_toml: Option<String> = row.try_get("grant_toml")?;
        let mut run = RunRow::from_row(&row)?.into_record()?;
        run.steps = self.load_steps(id).await?;
        Ok(Some(LoadedTick { run, grant_toml }))
    }

    /// Runs newest first, without their steps.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        // The current step's name too, so that a listed run names it as a shown one does.
        let mut query = Statement::new(format!(
            "SELECT {RUN_COLUMNS}, (SELECT name FROM steps WHERE steps.run_id = runs.id \
             AND steps.position = runs.current_step) AS current_step_name FROM runs WHERE 1 = 1"
        ));
        if let Some(plugin) = &filter.plugin {
            query.push(" AND plugin_name = ").bind(plugin.as_str());
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").bind(status.as_str());
        }
        if let Some((key, value)) = &filter.label {
            query
                .push(" AND id IN (SELECT run_id FROM run_labels WHERE key = ")
                .bind(key.as_str())
                .push(" AND value = ")
                .bind(value.as_str())
                .push(")");
        }
        if let Some(schedule) = &filter.schedule {
            query.push(" AND schedule_id = ").bind(schedule.as_str());
        }
        if !filter.shadow {
            query.push(" AND shadow_of IS NULL");
        }
        if let Some(before) = &filter.before {
            query.push(" AND id < ").bind(before.as_str());
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .bind(i64::from(filter.limit));
        let rows: Vec<RunRow> = sqlx::query_as_with(&query.sql, query.arguments)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(RunRow::into_record).collect()
    }

    /// A page of a run's attempts in order (by step, then attempt). Their sizes are read
    /// first, so that a page of large attempts loads no more of them than its byte budget.
    pub async fn list_attempts(&self, id: &RunId, page: AttemptPage) -> Result<AttemptList> {
        let (position, attempt) = page.after.map_or((-1, 0), |(position, attempt)| {
            (position as i64, i64::from(attempt))
        });
        const AFTER: &str = "a.run_id = $1 AND (a.position > $2 OR (a.position = $2 AND a.attempt > $3)) \
             ORDER BY a.position, a.attempt LIMIT $4";
        let logs_size = if page.logs { " + LENGTH(a.logs)" } else { "" };
        let sizes: Vec<(i64,)> = sqlx::query_as(&format!(
            "SELECT CAST(COALESCE(LENGTH(a.message), 0){logs_size} AS BIGINT) FROM attempts a WHERE {AFTER}"
        ))
        .bind(id.as_str())
        .bind(position)
        .bind(attempt)
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        if sizes.is_empty() {
            return Ok(AttemptList::default());
        }
        // Lengths count characters, no more than the bytes they take: an attempt is read only
        // while those before it are known to hold less than the budget.
        let mut before = 0_u64;
        let count = sizes
            .iter()
            .take_while(|(size,)| {
                let fits = before < page.bytes as u64;
                before = before.saturating_add(*size as u64);
                fits
            })
            .count()
            .max(1);
        let logs = if page.logs { "a.logs" } else { "NULL AS logs" };
        let rows: Vec<AttemptRow> = sqlx::query_as(&format!(
            "SELECT a.position, s.name, a.attempt, a.outcome, a.message, {logs}, a.started_at, a.duration_ms, a.due_at, a.node \
             FROM attempts a JOIN steps s ON s.run_id = a.run_id AND s.position = a.position WHERE {AFTER}"
        ))
        .bind(id.as_str())
        .bind(position)
        .bind(attempt)
        .bind(count as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(AttemptList {
            attempts: rows
                .into_iter()
                .map(AttemptRow::into_record)
                .collect::<Result<_>>()?,
            more: count < sizes.len() || sizes.len() == page.limit as usize,
        })
    }

    /// Cancels a run that has not finished, and its shadow run with it. Bumping the lease
    /// token fences off a node that is in the middle of a tick, so its result is dropped.
    pub async fn cancel_run(&self, id: &RunId, now: UnixMillis, actor: &str) -> Result<Cancelled> {
        let mut transaction = self.writes.begin().await?;
        if !cancel_one(&mut transaction, id, now, actor).await? {
            drop(transaction);
            let run = self.find_run(id).await?.ok_or(Error::NotFound)?;
            return Ok(Cancelled::AlreadyFinished(run.status));
        }
        sqlx::query(super::rollups::QUEUE_FINISHED)
            .bind(id.as_str())
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        let shadow: Option<(String,)> = sqlx::query_as("SELECT id FROM runs WHERE shadow_of = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *transaction)
            .await?;
        if let Some((shadow,)) = shadow {
            cancel_one(&mut transaction, &RunId::from_stored(shadow), now, actor).await?;
        }
        self.backend
            .notify(&mut *transaction, &Change::RunCancelled(id.clone()))
            .await?;
        transaction.commit().await?;
        self.events_written();
        let run = self.find_run(id).await?.ok_or(Error::NotFound)?;
        Ok(Cancelled::Cancelled(Box::new(run)))
    }

    /// Claims up to `limit` runs whose next tick is due by `now` and whose lease is free or
    /// expired by the database's clock, for `lease_ms` from now by that clock.
    pub async fn claim_due_runs(
        &self,
        owner: &str,
        now: UnixMillis,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedRun>> {
        if let Some(writer) = self.sqlite_writer() {
            return writer.claim(owner, now, lease_ms, limit).await;
        }
        let rows: Vec<(String, i64, i64)> = self
            .claim(&DUE_RUNS, (owner, now, lease_ms, limit), None)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, lease_token, due_at)| ClaimedRun {
                id: RunId::from_stored(id),
                owner: owner.to_owned(),
                lease_token,
                due_at,
                loaded: None,
            })
            .collect())
    }
    /// The earliest tick due after `now`, found through the due-time index. Ticks already due
    /// are either claimed or held by a lease; expired leases are found by the backstop poll.
    pub async fn next_due_after(&self, now: UnixMillis) -> Result<Option<UnixMillis>> {
        if let Some(writer) = self.sqlite_writer() {
            return writer.next_due(now).await;
        }
        let next: Option<(i64,)> = sqlx::query_as(NEXT_DUE_SQL)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        Ok(next.map(|(at,)| at))
    }

    /// Gives up every lease `owner` holds, so another node (or this one restarted) can go on at
    /// once instead of waiting for expiry.
    pub async fn release_leases(&self, owner: &str) -> Result<u64> {
        let (pool, _turn) = self.writes.single().await;
        let released = sqlx::query(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(pool)
        .await?;
        Ok(released.rows_affected())
    }

    /// Writes one step's result, its attempt and the run's new state atomically, only if
    /// `lease_token` is still current, the run unfinished and the step not yet decided;
    /// otherwise nothing is written and `Error::LeaseLost` is returned (`Error::Conflict` if
    /// the step was already decided, which a held lease rules out). On SQLite, writes from
    /// concurrent ticks share one commit (the writer thread's batch).
    /// A tick's results, in the order they happened (the steps that passed one after the
    /// other, then the last), in one transaction: all of them stand, or none.
    pub async fn record_tick(&self, writes: Vec<TickWrite>) -> Result<()> {
        match self.sqlite_writer() {
            Some(writer) => writer.tick(writes).await,
            None => {
                let mut write = self.writes.begin().await?;
                write_tick(&mut SqlxTx(&mut write), self.backend, &writes).await?;
                write.commit().await
            }
        }?;
        self.events_written();
        Ok(())
    }
}

/// Cancels run `id` and every step of it not finished, if the run has not finished; whether
/// it had not.
async fn cancel_one(
    transaction: &mut sqlx::AnyConnection,
    id: &RunId,
    now: UnixMillis,
    actor: &str,
) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE runs SET status = 'cancelled', message = 'cancelled on request', finished_at = $1, \
         next_tick_at = NULL, lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1, \
         cancelled_by = $3 WHERE id = $2 AND status IN ('queued', 'running')",
    )
    .bind(now)
    .bind(id.as_str())
    .bind(actor)
    .execute(&mut *transaction)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(false);
    }
    // Every step that had not finished was cancelled with the run, when it was.
    sqlx::query(
        "UPDATE steps SET status = 'cancelled', finished_at = $1 \
         WHERE run_id = $2 AND status IN ('waiting', 'pending')",
    )
    .bind(now)
    .bind(id.as_str())
    .execute(&mut *transaction)
    .await?;
    super::events::record_event(transaction, id, None, now).await?;
    Ok(true)
}

/// One tick's writes: the run first, as the last write leaves it (each write carries the
/// whole run), fenced by the lease token, so that a lost lease is found before anything is
/// written; then each step's result in order. The caller's transaction holds them.
pub(super) async fn write_tick(
    tx: &mut impl Tx,
    backend: Backend,
    writes: &[TickWrite],
) -> Result<()> {
    let Some(last) = writes.last() else {
        return Ok(());
    };
    update_run(tx, backend, last).await?;
    if last.run.status.is_terminal() {
        let finished = [Value::from(last.run_id.as_str()), Value::from(last.now)];
        tx.execute(super::rollups::QUEUE_FINISHED, &finished)
            .await?;
    }
    for write in writes {
        record_step(tx, write).await?;
    }
    Ok(())
}

/// The run's side of a tick, fenced by the lease token. A run that was and stays `running`
/// (most ticks) is written without its status, start and finish: SQLite rewrites the entry
/// of every index whose column an `UPDATE` sets, changed or not, so setting `status` moved
/// `runs_status` once per tick, a page of its own in the commit (measured: 37 pages for ten
/// such updates against 27 without, `runs` of 20,000 rows).
async fn update_run(tx: &mut impl Tx, backend: Backend, write: &TickWrite) -> Result<()> {
    let run = &write.run;
    let still_running = run.status == RunStatus::Running && run.status_before == RunStatus::Running;
    let sql = run_update_sql(backend, still_running, run.keep_lease_ms.is_some());
    let progress = [
        Value::from(run.message.as_deref()),
        Value::from(run.current_step as i64),
        Value::from(i64::from(run.error_count)),
        Value::from(i64::from(run.http_requests)),
    ];
    let rest = [
        Value::from(run.next_tick_at),
        Value::from(run.keep_lease_ms),
        Value::from(run.log_bytes as i64),
        Value::from(run.recording_bytes as i64),
        Value::from(write.run_id.as_str()),
        Value::from(write.lease_token),
    ];
    let updated = if still_running {
        let values: Vec<Value> = progress.into_iter().chain(rest).collect();
        tx.execute(sql, &values).await?
    } else {
        let finished_at = run.status.is_terminal().then_some(write.now);
        let values: Vec<Value> = std::iter::once(Value::from(run.status.as_str()))
            .chain(progress)
            .chain([Value::from(run.started_at), Value::from(finished_at)])
            .chain(rest)
            .collect();
        tx.execute(sql, &values).await?
    };
    if updated == 0 {
        return Err(Error::LeaseLost(write.run_id.clone()));
    }
    if run.drop_recordings {
        tx.execute(DROP_RECORDINGS, &[Value::from(write.run_id.as_str())])
            .await?;
    }
    Ok(())
}

/// [`update_run`]'s statement, by backend, whether the run was and stays `running`, and
/// whether the tick keeps its lease; each built once.
fn run_update_sql(backend: Backend, still_running: bool, keep_lease: bool) -> &'static str {
    static TEXTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let mut texts = Vec::new();
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for still_running in [false, true] {
                for keep_lease in [false, true] {
                    texts.push(if still_running {
                        still_running_sql(backend, keep_lease)
                    } else {
                        tick_run_sql(backend, keep_lease)
                    });
                }
            }
        }
        texts
    });
    let backend = match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => 1,
    };
    &TEXTS[backend * 4 + usize::from(still_running) * 2 + usize::from(keep_lease)]
}

/// [`tick_run_sql`] for a run that was and stays `running`: the same fence, less written.
fn still_running_sql(backend: Backend, keep_lease: bool) -> String {
    let lease = tick_lease_sql(backend, keep_lease, 6);
    format!(
        "UPDATE runs SET message = $1, current_step = $2, error_count = $3, http_requests = $4, \
         next_tick_at = $5, {lease}, log_bytes = $7, recording_bytes = $8 WHERE id = $9 AND lease_token = $10 \
         AND status = 'running'"
    )
}

/// A step's attempt and result, its event, and what ending the run there writes.
async fn record_step(tx: &mut impl Tx, write: &TickWrite) -> Result<()> {
    let step = &write.step;
    let run_id = Value::from(write.run_id.as_str());
    let position = Value::from(step.position as i64);
    if let Some(attempt) = &write.attempt {
        let values = [
            run_id.clone(),
            position.clone(),
            Value::from(i64::from(attempt.attempt)),
            Value::from(attempt.outcome.as_str()),
            Value::from(attempt.message.as_deref()),
            Value::from(logs_to_json(&attempt.logs).to_string()),
            Value::from(attempt.started_at),
            Value::from(attempt.duration_ms),
            Value::from(attempt.due_at),
            Value::from(write.node.as_str()),
            Value::from(attempt.recording.as_deref()),
        ];
        tx.execute(INSERT_ATTEMPT, &values).await?;
    }
    let attempt = write.attempt.as_ref();
    let values = [
        Value::from(step.status.as_str()),
        Value::from(step.message.as_deref()),
        Value::from(step.output.as_deref()),
        Value::from(step.passed_after_ms),
        Value::from(step.status.is_decided().then_some(write.now)),
        Value::from(attempt.map(|attempt| i64::from(attempt.attempt))),
        Value::from(attempt.map(|attempt| attempt.started_at)),
        run_id.clone(),
        position.clone(),
    ];
    if tx.execute(UPDATE_STEP, &values).await? == 0 {
        // Unreachable while the lease is ours; after the run update, so not a clean refusal.
        return Err(Error::Conflict {
            constraint: "steps.status".into(),
        });
    }
    let event = [run_id.clone(), position.clone(), Value::from(write.now)];
    tx.execute(INSERT_EVENT, &event).await?;
    if step.skip_rest {
        tx.execute(SKIP_REST, &[run_id, position]).await?;
    }
    if let Some(notify) = &write.notify
        && write.run.status.is_terminal()
    {
        super::outbox::enqueue_notifications(tx, write, notify).await?;
    }
    Ok(())
}

#[derive(FromRow)]
pub(super) struct RunRow {
    id: String,
    plugin_name: String,
    plugin_version: String,
    params: String,
    labels: String,
    status: String,
    message: Option<String>,
    poll_interval_ms: i64,
    max_errors: i64,
    error_count: i64,
    current_step: i64,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    deadline_at: i64,
    next_tick_at: Option<i64>,
    lease_owner: Option<String>,
    http_requests: i64,
    schedule_id: Option<String>,
    retry: Option<String>,
    created_by: Option<String>,
    cancelled_by: Option<String>,
    log_bytes: i64,
    shadow_of: Option<String>,
    recording_bytes: i64,
    /// Only listings select it; a single run has its steps.
    #[sqlx(default)]
    current_step_name: Option<String>,
}

/// Column `index` of a row whose columns a constant lists (`RUN_COLUMNS`, `STEPS_SQL`). Read
/// by position: by name, rusqlite compares the name with every column before it, which was
/// about 9 % of the writer thread's time under `due-at-once`. Debug builds, and so the test
/// suite, check that the position holds the named column.
fn column<T: rusqlite::types::FromSql>(
    row: &rusqlite::Row<'_>,
    index: usize,
    name: &str,
) -> rusqlite::Result<T> {
    debug_assert_eq!(row.as_ref().column_name(index).ok(), Some(name));
    row.get(index)
}

impl RunRow {
    /// The columns of `RUN_COLUMNS`, in its order, from the SQLite writer thread's connection.
    pub(super) fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
        Ok(RunRow {
            id: column(row, 0, "id")?,
            plugin_name: column(row, 1, "plugin_name")?,
            plugin_version: column(row, 2, "plugin_version")?,
            params: column(row, 3, "params")?,
            labels: column(row, 4, "labels")?,
            status: column(row, 5, "status")?,
            message: column(row, 6, "message")?,
            poll_interval_ms: column(row, 7, "poll_interval_ms")?,
            max_errors: column(row, 8, "max_errors")?,
            error_count: column(row, 9, "error_count")?,
            current_step: column(row, 10, "current_step")?,
            created_at: column(row, 11, "created_at")?,
            started_at: column(row, 12, "started_at")?,
            finished_at: column(row, 13, "finished_at")?,
            deadline_at: column(row, 14, "deadline_at")?,
            next_tick_at: column(row, 15, "next_tick_at")?,
            lease_owner: column(row, 16, "lease_owner")?,
            http_requests: column(row, 17, "http_requests")?,
            schedule_id: column(row, 18, "schedule_id")?,
            retry: column(row, 19, "retry")?,
            created_by: column(row, 20, "created_by")?,
            cancelled_by: column(row, 21, "cancelled_by")?,
            log_bytes: column(row, 22, "log_bytes")?,
            shadow_of: column(row, 23, "shadow_of")?,
            recording_bytes: column(row, 24, "recording_bytes")?,
            current_step_name: None,
        })
    }

    pub(super) fn into_record(self) -> Result<RunRecord> {
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&self.labels).map_err(|_| corrupt("run labels", &self.labels))?;
        Ok(RunRecord {
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| corrupt("run status", &self.status))?,
            id: RunId::from_stored(self.id),
            plugin_name: self.plugin_name,
            plugin_version: PluginVersion::parse(&self.plugin_version).map_err(Error::Corrupt)?,
            params: self.params,
            labels,
            message: self.message,
            poll_interval_ms: self.poll_interval_ms,
            max_errors: self.max_errors as u32,
            error_count: self.error_count as u32,
            current_step: self.current_step as usize,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            deadline_at: self.deadline_at,
            next_tick_at: self.next_tick_at,
            lease_owner: self.lease_owner,
            http_requests: self.http_requests as u32,
            log_bytes: self.log_bytes.max(0) as u64,
            recording_bytes: self.recording_bytes.max(0) as u64,
            schedule_id: self.schedule_id,
            created_by: self.created_by,
            cancelled_by: self.cancelled_by,
            shadow_of: self.shadow_of.map(RunId::from_stored),
            retry: self.retry.as_deref().map(retry_from_json).transpose()?,
            current_step_name: self.current_step_name,
            steps: Vec::new(),
        })
    }
}

pub(super) fn retry_json(retry: Retry) -> String {
    serde_json::json!({
        "initial_ms": retry.initial.as_millis() as u64,
        "factor": retry.factor,
        "max_ms": retry.max.as_millis() as u64,
    })
    .to_string()
}

fn retry_from_json(text: &str) -> Result<Retry> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| corrupt("run retry", text))?;
    let millis = |key: &str| value[key].as_u64().map(Duration::from_millis);
    match (
        millis("initial_ms"),
        value["factor"].as_f64(),
        millis("max_ms"),
    ) {
        (Some(initial), Some(factor), Some(max)) => Ok(Retry {
            initial,
            factor,
            max,
        }),
        _ => Err(corrupt("run retry", text)),
    }
}

#[derive(FromRow)]
pub(super) struct StepRow {
    position: i64,
    name: String,
    status: String,
    attempts: i64,
    timeout_ms: Option<i64>,
    max_attempts: Option<i64>,
    message: Option<String>,
    output: Option<String>,
    first_attempt_at: Option<i64>,
    last_attempt_at: Option<i64>,
    finished_at: Option<i64>,
    passed_after_ms: Option<i64>,
}

impl StepRow {
    /// The columns of `STEPS_SQL`, in its order, from the SQLite writer thread's connection.
    pub(super) fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<StepRow> {
        Ok(StepRow {
            position: column(row, 0, "position")?,
            name: column(row, 1, "name")?,
            status: column(row, 2, "status")?,
            attempts: column(row, 3, "attempts")?,
            timeout_ms: column(row, 4, "timeout_ms")?,
            max_attempts: column(row, 5, "max_attempts")?,
            message: column(row, 6, "message")?,
            output: column(row, 7, "output")?,
            first_attempt_at: column(row, 8, "first_attempt_at")?,
            last_attempt_at: column(row, 9, "last_attempt_at")?,
            finished_at: column(row, 10, "finished_at")?,
            passed_after_ms: column(row, 11, "passed_after_ms")?,
        })
    }

    pub(super) fn into_record(self) -> Result<StepRecord> {
        Ok(StepRecord {
            status: StepStatus::parse(&self.status)
                .ok_or_else(|| corrupt("step status", &self.status))?,
            position: self.position as usize,
            name: self.name,
            attempts: self.attempts as u32,
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts.map(|max| max as u32),
            message: self.message,
            output: self.output,
            first_attempt_at: self.first_attempt_at,
            last_attempt_at: self.last_attempt_at,
            finished_at: self.finished_at,
            passed_after_ms: self.passed_after_ms,
        })
    }
}

#[derive(FromRow)]
struct AttemptRow {
    position: i64,
    name: String,
    attempt: i64,
    outcome: String,
    message: Option<String>,
    logs: Option<String>,
    started_at: i64,
    duration_ms: i64,
    due_at: Option<i64>,
    node: Option<String>,
}

impl AttemptRow {
    fn into_record(self) -> Result<AttemptRecord> {
        Ok(AttemptRecord {
            outcome: AttemptOutcome::parse(&self.outcome)
                .ok_or_else(|| corrupt("attempt outcome", &self.outcome))?,
            logs: self.logs.as_deref().map(logs_from_json).transpose()?,
            position: self.position as usize,
            step: self.name,
            attempt: self.attempt as u32,
            message: self.message,
            started_at: self.started_at,
            duration_ms: self.duration_ms,
            due_at: self.due_at,
            node: self.node,
        })
    }
}

pub(super) fn logs_to_json(logs: &[LogLine]) -> Json {
    Json::Array(
        logs.iter()
            .map(|line| json!({"level": line.level.as_str(), "message": line.message}))
            .collect(),
    )
}

fn logs_from_json(text: &str) -> Result<Vec<LogLine>> {
    let value: Json = serde_json::from_str(text).map_err(|_| corrupt("attempt logs", text))?;
    let lines = value
        .as_array()
        .ok_or_else(|| corrupt("attempt logs", text))?;
    Ok(lines
        .iter()
        .map(|line| LogLine {
            level: line["level"]
                .as_str()
                .and_then(LogLevel::parse)
                .unwrap_or(LogLevel::Info),
            message: line["message"].as_str().unwrap_or_default().to_owned(),
        })
        .collect())
}

/// A run found by its idempotency key, with the fingerprint of the request that made it.
struct KeyedRun {
    run: RunRecord,
    fingerprint: Option<String>,
}

impl KeyedRun {
    fn answer_to(self, request: &NewRun) -> Enqueued {
        match (&self.fingerprint, &request.idempotency_fingerprint) {
            (Some(first), Some(again)) if first != again => Enqueued::KeyReused(self.run),
            _ => Enqueued::Existing(self.run),
        }
    }
}

/// Inserts queued runs with their labels, events and steps, due at once: one call per table
/// for all of them.
pub(super) async fn insert_runs(tx: &mut impl Tx, runs: &[NewRun]) -> Result<()> {
    // A primary's shadow goes in with it, or neither does.
    let runs: Vec<&NewRun> = runs
        .iter()
        .flat_map(|run| std::iter::once(run).chain(run.shadow.as_deref()))
        .collect();
    let mut values = Vec::with_capacity(runs.len() * 17);
    for run in runs.iter().copied() {
        values.extend([
            Value::from(run.id.as_str()),
            Value::from(run.plugin_name.as_str()),
            Value::from(run.plugin_version.as_str()),
            Value::from(run.params.as_str()),
            Value::from(labels_json(&run.labels)?),
            Value::from("queued"),
            Value::from(run.poll_interval_ms),
            Value::from(i64::from(run.max_errors)),
            Value::from(run.idempotency_key.as_deref()),
            Value::from(run.idempotency_fingerprint.as_deref()),
            Value::from(run.created_at),
            Value::from(run.deadline_at),
            Value::from(run.created_at),
            Value::from(run.schedule_id.as_deref()),
            Value::from(run.retry.map(retry_json)),
            Value::from(run.created_by.as_deref()),
            Value::from(run.shadow_of.as_ref().map(RunId::as_str)),
        ]);
    }
    tx.insert(INSERT_RUNS, 17, &values).await?;
    let labels: Vec<Value> = runs
        .iter()
        .flat_map(|run| {
            run.labels.iter().flat_map(|(key, value)| {
                [
                    Value::from(run.id.as_str()),
                    Value::from(key.as_str()),
                    Value::from(value.as_str()),
                ]
            })
        })
        .collect();
    tx.insert(INSERT_LABELS, 3, &labels).await?;
    let events: Vec<Value> = runs
        .iter()
        .flat_map(|run| [Value::from(run.id.as_str()), Value::from(run.created_at)])
        .collect();
    tx.insert(INSERT_RUN_EVENTS, 2, &events).await?;
    let steps: Vec<Value> = runs
        .iter()
        .flat_map(|run| {
            run.steps.iter().enumerate().flat_map(|(position, step)| {
                [
                    Value::from(run.id.as_str()),
                    Value::from(position as i64),
                    Value::from(step.name.as_str()),
                    Value::from("waiting"),
                    Value::from(step.timeout_ms),
                    Value::from(step.max_attempts.map(i64::from)),
                ]
            })
        })
        .collect();
    tx.insert(INSERT_STEPS, 6, &steps).await
}

/// Writes runs in one transaction; if that fails, one transaction per run, so that each run
/// gets its own answer and one bad run does not fail the others.
pub(super) async fn write_runs(
    writes: &Writes,
    backend: Backend,
    runs: Vec<NewRun>,
) -> Vec<Result<()>> {
    match write_runs_together(writes, backend, &runs).await {
        Ok(()) => runs.iter().map(|_| Ok(())).collect(),
        Err(error) if runs.len() == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, runs = runs.len(), "writing runs together failed; writing them one by one");
            let mut results = Vec::with_capacity(runs.len());
            for run in &runs {
                results.push(write_runs_together(writes, backend, std::slice::from_ref(run)).await);
            }
            results
        }
    }
}

async fn write_runs_together(writes: &Writes, backend: Backend, runs: &[NewRun]) -> Result<()> {
    let mut write = writes.begin().await?;
    insert_runs(&mut SqlxTx(&mut write), runs).await?;
    backend.notify(&mut *write, &Change::RunsQueued).await?;
    write.commit().await
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::{CheckInfo, PluginName};
    use crate::storage::{AuditEntry, NewStep};

    /// A store in a temp dir with the plugin `demo` active.
    pub(in crate::storage) async fn store_with_plugin(dir: &std::path::Path) -> Store {
        let url = format!("sqlite://{}", dir.join("db.sqlite").display());
        let store = Store::open(&url).await.expect("opening");
        let name = PluginName::parse("demo").expect("valid name");
        let version = PluginVersion::of_bytes(b"component");
        let info = CheckInfo {
            name: "demo".into(),
            version: "1".into(),
            description: String::new(),
            steps: vec![],
            params_schema: None,
        };
        store
            .save_plugin_version(
                &name,
                &version,
                b"component",
                &info,
                1,
                crate::model::Actor {
                    name: "test",
                    reviews: true,
                },
            )
            .await
            .expect("saving");
        store
            .activate_plugin(
                &name,
                &version,
                Some(""),
                AuditEntry::new("test", "plugin.upload", "demo", 1),
                crate::storage::Review::By("test"),
            )
            .await
            .expect("activating");
        store
    }

    /// A run of `demo` with one step, due now.
    pub(in crate::storage) fn one_step_run(idempotency_key: Option<&str>) -> NewRun {
        NewRun {
            id: RunId::generate(),
            plugin_name: PluginName::parse("demo").expect("valid name"),
            plugin_version: PluginVersion::of_bytes(b"component"),
            params: "{}".into(),
            labels: BTreeMap::new(),
            poll_interval_ms: 1000,
            max_errors: 3,
            deadline_at: crate::model::now_millis() + 600_000,
            created_at: crate::model::now_millis(),
            idempotency_key: idempotency_key.map(str::to_owned),
            idempotency_fingerprint: None,
            schedule_id: None,
            created_by: None,
            retry: None,
            shadow: None,
            shadow_of: None,
            steps: vec![NewStep {
                name: "a".into(),
                timeout_ms: None,
                max_attempts: None,
            }],
        }
    }

    /// The write that passes a claimed run's only step and ends it.
    pub(in crate::storage) fn passing_tick(claim: &ClaimedRun, now: UnixMillis) -> TickWrite {
        TickWrite {
            run_id: claim.id.clone(),
            lease_token: claim.lease_token,
            node: claim.owner.clone(),
            now,
            attempt: Some(super::super::NewAttempt {
                attempt: 1,
                outcome: AttemptOutcome::Passed,
                message: None,
                logs: Vec::new(),
                started_at: now,
                duration_ms: 1,
                due_at: Some(claim.due_at),
                recording: None,
            }),
            step: super::super::StepWrite {
                position: 0,
                status: StepStatus::Passed,
                message: None,
                output: Some("{}".into()),
                passed_after_ms: Some(1),
                skip_rest: false,
            },
            run: super::super::RunWrite {
                status: RunStatus::Passed,
                status_before: RunStatus::Queued,
                message: None,
                current_step: 0,
                error_count: 0,
                http_requests: 0,
                log_bytes: 0,
                recording_bytes: 0,
                drop_recordings: false,
                started_at: now,
                next_tick_at: None,
                keep_lease_ms: None,
            },
            notify: None,
        }
    }

    #[tokio::test]
    async fn a_claim_carries_its_run_and_a_fenced_off_write_fails_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let (kept, cancelled) = (one_step_run(None), one_step_run(None));
        for run in [&kept, &cancelled] {
            store.enqueue_run(run).await.expect("enqueueing");
        }
        let now = crate::model::now_millis();
        let claims = store
            .claim_due_runs("node-a", now, 60_000, 10)
            .await
            .expect("claiming");
        assert_eq!(claims.len(), 2);
        for claim in &claims {
            let loaded = store
                .load_tick(claim)
                .await
                .expect("loading")
                .expect("a run");
            assert_eq!(loaded.run.id, claim.id);
            assert_eq!(loaded.run.steps.len(), 1);
            assert_eq!(loaded.grant_toml.as_deref(), Some(""));
        }
        // Cancelling bumps the lease token: the tick in flight for that run is fenced off.
        store
            .cancel_run(&cancelled.id, now, "test")
            .await
            .expect("cancelling");
        let claim_of = |id: &RunId| {
            claims
                .iter()
                .find(|claim| &claim.id == id)
                .expect("claimed")
        };
        let (fenced, written) = tokio::join!(
            store.record_tick(vec![passing_tick(claim_of(&cancelled.id), now)]),
            store.record_tick(vec![passing_tick(claim_of(&kept.id), now)]),
        );
        assert!(matches!(fenced, Err(Error::LeaseLost(_))), "{fenced:?}");
        written.expect("the other write stands");
        let kept = store
            .find_run(&kept.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_eq!(kept.status, RunStatus::Passed);
        assert_eq!(kept.steps[0].status, StepStatus::Passed);
        let cancelled_run = store
            .find_run(&cancelled.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_eq!(cancelled_run.status, RunStatus::Cancelled);
        assert_eq!(cancelled_run.steps[0].status, StepStatus::Cancelled);
        let attempts = store
            .list_attempts(&cancelled.id, AttemptPage::first(10))
            .await
            .expect("listing")
            .attempts;
        assert!(attempts.is_empty(), "a fenced-off write left {attempts:?}");
    }

    #[tokio::test]
    async fn two_runs_with_one_idempotency_key_at_once_make_one_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let (first, second) = (one_step_run(Some("key")), one_step_run(Some("key")));
        let (first, second) = tokio::join!(store.enqueue_run(&first), store.enqueue_run(&second));
        let ids: Vec<RunId> = [first, second]
            .into_iter()
            .map(|enqueued| match enqueued.expect("enqueueing") {
                Enqueued::Created(run) | Enqueued::Existing(run) | Enqueued::KeyReused(run) => {
                    run.id
                }
            })
            .collect();
        assert_eq!(ids[0], ids[1], "both requests answer with the one run");
        let runs = store
            .list_runs(&RunFilter {
                plugin: None,
                status: None,
                label: None,
                schedule: None,
                shadow: false,
                before: None,
                limit: 10,
            })
            .await
            .expect("listing");
        assert_eq!(runs.len(), 1);
    }

    #[tokio::test]
    async fn the_record_enqueue_returns_is_what_is_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let (name, version) = (
            PluginName::parse("demo").expect("valid name"),
            PluginVersion::of_bytes(b"component"),
        );
        let run = NewRun {
            id: RunId::generate(),
            plugin_name: name,
            plugin_version: version,
            params: "{}".into(),
            labels: [("team".to_owned(), "data".to_owned())].into(),
            poll_interval_ms: 1000,
            max_errors: 3,
            deadline_at: 600_000,
            created_at: 1_000,
            idempotency_key: None,
            idempotency_fingerprint: None,
            schedule_id: Some("schedule".into()),
            created_by: None,
            retry: None,
            shadow: None,
            shadow_of: None,
            steps: vec![
                NewStep {
                    name: "a".into(),
                    timeout_ms: Some(1500),
                    max_attempts: None,
                },
                NewStep {
                    name: "b".into(),
                    timeout_ms: None,
                    max_attempts: Some(4),
                },
            ],
        };
        let Enqueued::Created(returned) = store.enqueue_run(&run).await.expect("enqueueing") else {
            panic!("a new run");
        };
        let stored = store
            .find_run(&run.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_eq!(returned, stored);
    }
}
