//! The storage methods, in SQL that SQLite and PostgreSQL share (`backend` holds the few
//! places where they differ).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value as Json, json};
use sqlx::any::AnyArguments;
use sqlx::{Any, AnyConnection, AnyPool, Arguments, Encode, FromRow, Row, Type};

use super::access::{AuditEntry, insert_audit};
use super::backend::{Backend, Changes};
use super::group_commit::GroupCommit;
use super::{
    AttemptRecord, Cancelled, Change, ClaimedRun, ClaimedSchedule, Enqueued, Error, FireRecord,
    FireWrite, NewRun, PluginRecord, PluginVersionRecord, Result, RunFilter, RunRecord,
    ScheduleOptions, ScheduleRecord, StepRecord, TickWrite,
};
use crate::model::{
    AttemptOutcome, CheckInfo, FireOutcome, LogLevel, LogLine, PluginName, PluginVersion, Retry,
    RunId, RunStatus, StepInfo, StepStatus, TriggerSpec, UnixMillis,
};

/// The database of one Stepwise deployment, shared by all its nodes.
#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
    url: String,
    /// New runs without an idempotency key, written by group commit.
    runs: Arc<GroupCommit<NewRun, ()>>,
    /// Tick results, written by group commit where the backend gains from it.
    ticks: Option<Arc<GroupCommit<TickWrite, ()>>>,
    /// SQLite has one writer at a time. The hot writers (claims, lease renewals, new runs,
    /// tick results) take turns here, in order and woken at once, instead of meeting on
    /// SQLite's lock, whose busy handler polls with sleeps that grow to tens of milliseconds
    /// (tick lag). `None` on PostgreSQL, where writers run in parallel.
    pub(super) writer: Option<Arc<tokio::sync::Mutex<()>>>,
    pub(super) events: Arc<super::events::EventSignals>,
}

const RUN_COLUMNS: &str = "id, plugin_name, plugin_version, params, labels, status, message, poll_interval_ms, \
     max_errors, error_count, current_step, created_at, started_at, finished_at, deadline_at, next_tick_at, lease_owner, \
     http_requests, schedule_id, retry";

impl Store {
    /// Opens the database at `url` (`sqlite://…`, created if needed, or `postgres://…`) and
    /// applies pending migrations.
    pub async fn open(url: &str) -> Result<Store> {
        let backend = Backend::of_url(url).ok_or_else(|| Error::UnsupportedUrl(url.to_owned()))?;
        let pool = backend.connect(url).await?;
        let writer = (backend == Backend::Sqlite).then(|| Arc::new(tokio::sync::Mutex::new(())));
        let runs = {
            let (pool, writer) = (pool.clone(), writer.clone());
            GroupCommit::start(move |runs| {
                let (pool, writer) = (pool.clone(), writer.clone());
                async move {
                    let _turn = take_turn(&writer).await;
                    write_runs(&pool, backend, runs).await
                }
            })
        };
        let ticks = backend.groups_tick_writes().then(|| {
            let (pool, writer) = (pool.clone(), writer.clone());
            Arc::new(GroupCommit::start(move |writes| {
                let (pool, writer) = (pool.clone(), writer.clone());
                async move {
                    let _turn = take_turn(&writer).await;
                    write_ticks(&pool, backend, writes).await
                }
            }))
        });
        let store = Store {
            pool,
            backend,
            url: url.to_owned(),
            runs: Arc::new(runs),
            ticks,
            writer,
            events: Arc::default(),
        };
        store.start_numbering();
        Ok(store)
    }

    /// Changes other nodes make, for a database that several nodes share; `None` for SQLite.
    pub async fn listen(&self) -> Result<Option<Changes>> {
        match self.backend {
            Backend::Sqlite => Ok(None),
            Backend::Postgres => Ok(Some(Changes::listen(&self.url).await?)),
        }
    }

    /// What `/metrics` reads from the database at each scrape: runs by plugin and status,
    /// each schedule's last passed run, and the leases `node` holds now.
    pub async fn metrics_counts(&self, node: &str) -> Result<crate::metrics::Stored> {
        let runs: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT plugin_name, status, count(*) FROM runs GROUP BY plugin_name, status \
             ORDER BY plugin_name, status",
        )
        .fetch_all(&self.pool)
        .await?;
        let schedule_successes: Vec<(String, i64)> = sqlx::query_as(
            "SELECT schedule_id, max(finished_at) FROM runs \
             WHERE schedule_id IS NOT NULL AND status = 'passed' GROUP BY schedule_id ORDER BY schedule_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let (leases_held,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM runs WHERE lease_owner = $1 AND lease_expires_at > {}",
            self.backend.now_sql()
        ))
        .bind(node)
        .fetch_one(&self.pool)
        .await?;
        Ok(crate::metrics::Stored {
            runs,
            schedule_successes,
            leases_held,
        })
    }

    /// What the dashboard's health page shows: leases held per node now, the nodes that made
    /// calls in the last minute, runs waiting and running, and the lag of the last minute's
    /// ticks (milliseconds).
    pub async fn cluster_health(&self, now: UnixMillis) -> Result<super::ClusterHealth> {
        let leases: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT lease_owner, count(*) FROM runs WHERE lease_owner IS NOT NULL \
             AND lease_expires_at > {} GROUP BY lease_owner ORDER BY lease_owner",
            self.backend.now_sql()
        ))
        .fetch_all(&self.pool)
        .await?;
        let minute_ago = now - 60_000;
        let calls: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT node, count(*) FROM attempts WHERE started_at > $1 GROUP BY node ORDER BY node",
        )
        .bind(minute_ago)
        .fetch_all(&self.pool)
        .await?;
        let (queued, running, due): (i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN next_tick_at <= $1 THEN 1 ELSE 0 END), 0) \
             FROM runs WHERE status IN ('queued', 'running')",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        let lags: Vec<(i64,)> = sqlx::query_as(
            "SELECT started_at - due_at FROM attempts WHERE started_at > $1 AND due_at IS NOT NULL",
        )
        .bind(minute_ago)
        .fetch_all(&self.pool)
        .await?;
        Ok(super::ClusterHealth {
            leases,
            calls: calls
                .into_iter()
                .map(|(node, count)| (node.unwrap_or_default(), count))
                .collect(),
            queued,
            running,
            due,
            lags_ms: lags.into_iter().map(|(lag,)| lag.max(0)).collect(),
        })
    }

    /// Fails when the database cannot answer.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stores a plugin version (bytes once per content hash). Saving the same version again is a
    /// no-op; returns whether the version was new for this plugin name.
    pub async fn save_plugin_version(
        &self,
        name: &PluginName,
        version: &PluginVersion,
        bytes: &[u8],
        check_info: &CheckInfo,
        now: UnixMillis,
    ) -> Result<bool> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("INSERT INTO components (version, bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(version.as_str())
            .bind(bytes)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO plugin_versions (plugin_name, version, check_info, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(name.as_str())
        .bind(version.as_str())
        .bind(check_info_to_json(check_info).to_string())
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Whether `version` was ever stored, under any plugin name.
    pub async fn component_exists(&self, version: &PluginVersion) -> Result<bool> {
        let found: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM components WHERE version = $1")
            .bind(version.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// One stored version of `name`, if the plugin ever had it.
    pub async fn find_plugin_version(
        &self,
        name: &str,
        version: &PluginVersion,
    ) -> Result<Option<PluginVersionRecord>> {
        let row: Option<(String, String, i64)> = sqlx::query_as(
            "SELECT version, check_info, created_at FROM plugin_versions WHERE plugin_name = $1 AND version = $2",
        )
        .bind(name)
        .bind(version.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(version_record).transpose()
    }

    /// Replaces the grant of a plugin without touching its versions, and records the change
    /// (with the grant it replaced) in the audit log.
    pub async fn update_grant(
        &self,
        name: &str,
        grant_toml: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let mut transaction = self
            .pool
            .begin_with(self.backend.begin_read_write())
            .await?;
        let previous: Option<(String,)> = sqlx::query_as(&format!(
            "SELECT grant_toml FROM plugins WHERE name = $1{}",
            self.backend.for_update()
        ))
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some((previous,)) = previous else {
            return Err(Error::NotFound);
        };
        sqlx::query("UPDATE plugins SET grant_toml = $1, updated_at = $2 WHERE name = $3")
            .bind(grant_toml)
            .bind(audit.at)
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        let audit = audit
            .with("grant", grant_toml)
            .with("previous_grant", previous);
        insert_audit(&mut transaction, &audit).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The versions something still needs compiled: every active version and the version of
    /// every unfinished run.
    pub async fn versions_in_use(&self) -> Result<HashSet<PluginVersion>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT active_version FROM plugins UNION \
             SELECT DISTINCT plugin_version FROM runs WHERE status IN ('queued', 'running')",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(version,)| PluginVersion::from_stored(version))
            .collect())
    }

    /// Makes `version` the one new runs of `name` use, and records it in the audit log with
    /// the version it replaced. `grant_toml` replaces the grant; `None` keeps the grant as it
    /// is *now* (none for a new plugin), so a grant changed while this version was being
    /// compiled is never overwritten by an older read.
    pub async fn activate_plugin(
        &self,
        name: &PluginName,
        version: &PluginVersion,
        grant_toml: Option<&str>,
        audit: AuditEntry,
    ) -> Result<()> {
        let mut transaction = self
            .pool
            .begin_with(self.backend.begin_read_write())
            .await?;
        let previous: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT active_version, grant_toml FROM plugins WHERE name = $1{}",
            self.backend.for_update()
        ))
        .bind(name.as_str())
        .fetch_optional(&mut *transaction)
        .await?;
        // The grant update is conditional in SQL, not decided from `previous`: on SQLite
        // nothing locks the row between the read and the write.
        sqlx::query(
            "INSERT INTO plugins (name, active_version, grant_toml, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET active_version = excluded.active_version, \
             grant_toml = CASE WHEN $5 = 1 THEN excluded.grant_toml ELSE plugins.grant_toml END, \
             updated_at = excluded.updated_at",
        )
        .bind(name.as_str())
        .bind(version.as_str())
        .bind(grant_toml.unwrap_or_default())
        .bind(audit.at)
        .bind(i64::from(grant_toml.is_some()))
        .execute(&mut *transaction)
        .await?;
        let mut audit = audit.with("version", version.as_str());
        if let Some((previous_version, _)) = &previous {
            audit = audit.with("previous_version", previous_version.as_str());
        }
        if let Some(grant_toml) = grant_toml {
            audit = audit.with("grant", grant_toml);
            if let Some((_, previous_grant)) = &previous {
                audit = audit.with("previous_grant", previous_grant.as_str());
            }
        }
        insert_audit(&mut transaction, &audit).await?;
        self.backend
            .notify(&mut *transaction, &Change::PluginActivated(version.clone()))
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The plugin with its active version, if the name is known.
    pub async fn find_plugin(&self, name: &str) -> Result<Option<PluginRecord>> {
        let row: Option<PluginRow> = sqlx::query_as(
            "SELECT p.name, p.active_version, p.grant_toml, p.updated_at, v.check_info FROM plugins p \
             JOIN plugin_versions v ON v.plugin_name = p.name AND v.version = p.active_version WHERE p.name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(PluginRow::into_record).transpose()
    }

    /// Every plugin with its active version, by name.
    pub async fn list_plugins(&self) -> Result<Vec<PluginRecord>> {
        let rows: Vec<PluginRow> = sqlx::query_as(
            "SELECT p.name, p.active_version, p.grant_toml, p.updated_at, v.check_info FROM plugins p \
             JOIN plugin_versions v ON v.plugin_name = p.name AND v.version = p.active_version ORDER BY p.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(PluginRow::into_record).collect()
    }

    /// All versions stored for `name`, newest first.
    pub async fn list_plugin_versions(&self, name: &str) -> Result<Vec<PluginVersionRecord>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT version, check_info, created_at FROM plugin_versions WHERE plugin_name = $1 \
             ORDER BY created_at DESC, version",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(version_record).collect()
    }

    /// The component bytes of a version.
    pub async fn load_component(&self, version: &PluginVersion) -> Result<Vec<u8>> {
        let bytes: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT bytes FROM components WHERE version = $1")
                .bind(version.as_str())
                .fetch_optional(&self.pool)
                .await?;
        bytes.map(|(bytes,)| bytes).ok_or(Error::NotFound)
    }

    /// Makes a run durable and due at once. With an idempotency key already used, returns that
    /// run instead, or `KeyReused` if the key came with another request then.
    pub async fn enqueue_run(&self, run: &NewRun) -> Result<Enqueued> {
        if let Some(key) = &run.idempotency_key
            && let Some(existing) = self.find_run_by_idempotency_key(key).await?
        {
            return Ok(existing.answer_to(run));
        }
        let written = if run.idempotency_key.is_some() {
            // Alone: its unique key may clash with a concurrent request's, which must not fail
            // a batch of others.
            let _turn = take_turn(&self.writer).await;
            write_runs_together(&self.pool, self.backend, std::slice::from_ref(run)).await
        } else {
            self.runs.submit(run.clone()).await
        };
        if let Err(error) = written {
            // Two requests with one key raced: the other one's run is the answer.
            if let Error::Database(database_error) = &error
                && is_unique_violation(database_error)
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
        let steps: Vec<StepRow> = sqlx::query_as(
            "SELECT position, name, status, attempts, timeout_ms, max_attempts, message, output, first_attempt_at, \
             last_attempt_at, finished_at, passed_after_ms FROM steps WHERE run_id = $1 ORDER BY position",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        steps.into_iter().map(StepRow::into_record).collect()
    }

    /// What a tick needs: the run with its steps, and its plugin's current grant (`None` if
    /// the plugin no longer exists), in two queries.
    pub async fn load_tick(&self, id: &RunId) -> Result<Option<(RunRecord, Option<String>)>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS}, grant_toml FROM runs LEFT JOIN plugins ON plugins.name = runs.plugin_name \
             WHERE runs.id = $1"
        );
        let Some(row) = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let grant_toml: Option<String> = row.try_get("grant_toml")?;
        let mut run = RunRow::from_row(&row)?.into_record()?;
        run.steps = self.load_steps(id).await?;
        Ok(Some((run, grant_toml)))
    }

    /// Runs newest first, without their steps.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        // The current step's name too, so that a listed run names it as a shown one does.
        let mut query = Statement::new(format!(
            "SELECT {RUN_COLUMNS}, (SELECT name FROM steps WHERE steps.run_id = runs.id \
             AND steps.position = runs.current_step) AS current_step_name FROM runs WHERE 1 = 1"
        ));
        if let Some(plugin) = &filter.plugin {
            query.push(" AND plugin_name = ").bind(plugin.as_str())?;
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").bind(status.as_str())?;
        }
        if let Some((key, value)) = &filter.label {
            query
                .push(" AND id IN (SELECT run_id FROM run_labels WHERE key = ")
                .bind(key.as_str())?
                .push(" AND value = ")
                .bind(value.as_str())?
                .push(")");
        }
        if let Some(schedule) = &filter.schedule {
            query.push(" AND schedule_id = ").bind(schedule.as_str())?;
        }
        if let Some(before) = &filter.before {
            query.push(" AND id < ").bind(before.as_str())?;
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .bind(i64::from(filter.limit))?;
        let rows: Vec<RunRow> = sqlx::query_as_with(&query.sql, query.arguments)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(RunRow::into_record).collect()
    }

    /// Up to `limit` attempts of a run in order (by step, then attempt), after the attempt
    /// `after` (a step position and attempt number) if given.
    pub async fn list_attempts(
        &self,
        id: &RunId,
        after: Option<(usize, u32)>,
        limit: u32,
    ) -> Result<Vec<AttemptRecord>> {
        let (position, attempt) = after.map_or((-1, 0), |(position, attempt)| {
            (position as i64, i64::from(attempt))
        });
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT a.position, s.name, a.attempt, a.outcome, a.message, a.logs, a.started_at, a.duration_ms, a.due_at, a.node \
             FROM attempts a JOIN steps s ON s.run_id = a.run_id AND s.position = a.position \
             WHERE a.run_id = $1 AND (a.position > $2 OR (a.position = $2 AND a.attempt > $3)) \
             ORDER BY a.position, a.attempt LIMIT $4",
        )
        .bind(id.as_str())
        .bind(position)
        .bind(attempt)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(AttemptRow::into_record).collect()
    }

    /// Cancels a run that has not finished. Bumping the lease token fences off a node that is
    /// in the middle of a tick, so its result is dropped.
    pub async fn cancel_run(&self, id: &RunId, now: UnixMillis) -> Result<Cancelled> {
        let mut transaction = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE runs SET status = 'cancelled', message = 'cancelled on request', finished_at = $1, \
             next_tick_at = NULL, lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1 \
             WHERE id = $2 AND status IN ('queued', 'running')",
        )
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            drop(transaction);
            let run = self.find_run(id).await?.ok_or(Error::NotFound)?;
            return Ok(Cancelled::AlreadyFinished(run.status));
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
        super::events::record_event(&mut transaction, id, None, now).await?;
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
        let sql = self.claim_sql("runs", "next_tick_at", "", "id, lease_token, next_tick_at");
        let _turn = take_turn(&self.writer).await;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(&sql)
            .bind(owner)
            .bind(lease_ms)
            .bind(now)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, lease_token, due_at)| ClaimedRun {
                id: RunId::from_stored(id),
                owner: owner.to_owned(),
                lease_token,
                due_at,
            })
            .collect())
    }

    /// The lease claim that runs and schedules share: rows of `table` due by `$3` (in the
    /// `due` column) and passing `filter`, whose lease is free or expired by the database's
    /// clock, earliest first, at most `$4`, leased to `$1` for `$2` ms by that clock with a
    /// new fencing token.
    pub(super) fn claim_sql(
        &self,
        table: &str,
        due: &str,
        filter: &str,
        returning: &str,
    ) -> String {
        let db_now = self.backend.now_sql();
        let skip_locked = self.backend.skip_locked();
        format!(
            "UPDATE {table} SET lease_owner = $1, lease_expires_at = {db_now} + $2, lease_token = lease_token + 1 \
             WHERE id IN (SELECT id FROM {table} WHERE {due} IS NOT NULL AND {due} <= $3{filter} \
                          AND (lease_expires_at IS NULL OR lease_expires_at <= {db_now}) \
                          ORDER BY {due} LIMIT $4{skip_locked}) \
             RETURNING {returning}"
        )
    }

    /// Extends a lease held with `lease_token` to `lease_ms` from now by the database's clock.
    /// Returns false when the lease was lost (taken over, or the run cancelled).
    pub async fn renew_lease(&self, id: &RunId, lease_token: i64, lease_ms: i64) -> Result<bool> {
        self.renew_row_lease("runs", id.as_str(), lease_token, lease_ms)
            .await
    }

    /// The lease renewal that runs, notifications and jobs share: `lease_ms` from now by the
    /// database's clock, only while `lease_token` holds.
    pub(super) async fn renew_row_lease(
        &self,
        table: &str,
        id: &str,
        lease_token: i64,
        lease_ms: i64,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE {table} SET lease_expires_at = {} + $1 WHERE id = $2 AND lease_token = $3 \
             AND lease_owner IS NOT NULL",
            self.backend.now_sql()
        );
        let _turn = take_turn(&self.writer).await;
        let renewed = sqlx::query(&sql)
            .bind(lease_ms)
            .bind(id)
            .bind(lease_token)
            .execute(&self.pool)
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// The earliest tick due after `now`, found through the due-time index. Ticks already due
    /// are either claimed or held by a lease; expired leases are found by the backstop poll.
    pub async fn next_due_after(&self, now: UnixMillis) -> Result<Option<UnixMillis>> {
        let next: Option<(i64,)> = sqlx::query_as(
            "SELECT next_tick_at FROM runs WHERE next_tick_at IS NOT NULL AND next_tick_at > $1 \
             ORDER BY next_tick_at LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(next.map(|(at,)| at))
    }

    /// Gives up every lease `owner` holds, so another node (or this one restarted) can go on at
    /// once instead of waiting for expiry.
    pub async fn release_leases(&self, owner: &str) -> Result<u64> {
        let released = sqlx::query(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected())
    }

    /// Writes one step's result, its attempt and the run's new state atomically, only if
    /// `lease_token` is still current, the run unfinished and the step not yet decided;
    /// otherwise nothing is written and `Error::LeaseLost` is returned (`Error::Conflict` if
    /// the step was already decided, which a held lease rules out). On SQLite, writes from
    /// concurrent ticks share one commit (group commit).
    pub async fn record_tick(&self, write: TickWrite) -> Result<()> {
        match &self.ticks {
            Some(ticks) => ticks.submit(write).await,
            None => write_tick_alone(&self.pool, self.backend, &write).await,
        }?;
        self.events_written();
        Ok(())
    }
}

/// Writes ticks in one transaction. If that fails, one transaction per tick, so that each
/// gets its own answer.
async fn write_ticks(pool: &AnyPool, backend: Backend, writes: Vec<TickWrite>) -> Vec<Result<()>> {
    if writes.len() == 1 {
        return vec![write_tick_alone(pool, backend, &writes[0]).await];
    }
    let together = async {
        let mut transaction = pool.begin().await?;
        let mut results = Vec::with_capacity(writes.len());
        for write in &writes {
            // A lost lease is found by the first statement, before anything is written, so it
            // leaves the transaction clean; any other error abandons the batch.
            match apply_tick(&mut transaction, backend, write).await {
                Ok(()) => results.push(Ok(())),
                Err(Error::LeaseLost(id)) => results.push(Err(Error::LeaseLost(id))),
                Err(error) => return Err(error),
            }
        }
        transaction.commit().await?;
        Ok::<_, Error>(results)
    };
    match together.await {
        Ok(results) => results,
        Err(error) => {
            tracing::warn!(%error, ticks = writes.len(), "writing ticks together failed; writing them one by one");
            let mut results = Vec::with_capacity(writes.len());
            for write in &writes {
                results.push(write_tick_alone(pool, backend, write).await);
            }
            results
        }
    }
}

async fn write_tick_alone(pool: &AnyPool, backend: Backend, write: &TickWrite) -> Result<()> {
    let mut transaction = pool.begin().await?;
    apply_tick(&mut transaction, backend, write).await?;
    transaction.commit().await?;
    Ok(())
}

/// One tick's writes inside the caller's transaction: the run (fenced by the lease token,
/// first, so that a lost lease is found before anything is written), the attempt, the step.
async fn apply_tick(
    transaction: &mut AnyConnection,
    backend: Backend,
    write: &TickWrite,
) -> Result<()> {
    let lease_sql = match write.run.keep_lease_ms {
        Some(_) => format!("lease_expires_at = {} + $9", backend.now_sql()),
        None => "lease_owner = NULL, lease_expires_at = $9".to_owned(),
    };
    let sql = format!(
        "UPDATE runs SET status = $1, message = $2, current_step = $3, error_count = $4, http_requests = $5, \
         started_at = COALESCE(started_at, $6), finished_at = $7, next_tick_at = $8, {lease_sql} \
         WHERE id = $10 AND lease_token = $11 AND status IN ('queued', 'running')"
    );
    let finished_at = write.run.status.is_terminal().then_some(write.now);
    let updated = sqlx::query(&sql)
        .bind(write.run.status.as_str())
        .bind(write.run.message.as_deref())
        .bind(write.run.current_step as i64)
        .bind(i64::from(write.run.error_count))
        .bind(i64::from(write.run.http_requests))
        .bind(write.run.started_at)
        .bind(finished_at)
        .bind(write.run.next_tick_at)
        .bind(write.run.keep_lease_ms)
        .bind(write.run_id.as_str())
        .bind(write.lease_token)
        .execute(&mut *transaction)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::LeaseLost(write.run_id.clone()));
    }
    let step = &write.step;
    if let Some(attempt) = &write.attempt {
        sqlx::query(
            "INSERT INTO attempts (run_id, position, attempt, outcome, message, logs, started_at, duration_ms, due_at, node) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(write.run_id.as_str())
        .bind(step.position as i64)
        .bind(i64::from(attempt.attempt))
        .bind(attempt.outcome.as_str())
        .bind(attempt.message.as_deref())
        .bind(logs_to_json(&attempt.logs).to_string())
        .bind(attempt.started_at)
        .bind(attempt.duration_ms)
        .bind(attempt.due_at)
        .bind(write.node.as_str())
        .execute(&mut *transaction)
        .await?;
    }
    let step_finished_at = step.status.is_decided().then_some(write.now);
    // A step's terminal result is written once: a step already finished is never updated.
    // The attempt columns change only when a call was made.
    let attempt = write.attempt.as_ref();
    let updated = sqlx::query(
        "UPDATE steps SET status = $1, message = $2, output = $3, passed_after_ms = $4, finished_at = $5, \
         attempts = COALESCE($6, attempts), first_attempt_at = COALESCE(first_attempt_at, $7), \
         last_attempt_at = COALESCE($7, last_attempt_at) \
         WHERE run_id = $8 AND position = $9 AND status IN ('waiting', 'pending')",
    )
    .bind(step.status.as_str())
    .bind(step.message.as_deref())
    .bind(step.output.as_deref())
    .bind(step.passed_after_ms)
    .bind(step_finished_at)
    .bind(attempt.map(|attempt| i64::from(attempt.attempt)))
    .bind(attempt.map(|attempt| attempt.started_at))
    .bind(write.run_id.as_str())
    .bind(step.position as i64)
    .execute(&mut *transaction)
    .await?;
    if updated.rows_affected() == 0 {
        // Unreachable while the lease is ours; after the run update, so not a clean refusal.
        return Err(Error::Conflict {
            constraint: "steps.status".into(),
        });
    }
    super::events::record_event(
        &mut *transaction,
        &write.run_id,
        Some(step.position),
        write.now,
    )
    .await?;
    if step.skip_rest {
        sqlx::query("UPDATE steps SET status = 'skipped' WHERE run_id = $1 AND position > $2")
            .bind(write.run_id.as_str())
            .bind(step.position as i64)
            .execute(&mut *transaction)
            .await?;
    }
    if let Some(notify) = &write.notify
        && write.run.status.is_terminal()
    {
        super::outbox::enqueue_notifications(transaction, write, notify).await?;
    }
    Ok(())
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|database_error| database_error.is_unique_violation())
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Corrupt(format!("{what} {value:?}"))
}

#[derive(FromRow)]
struct PluginRow {
    name: String,
    active_version: String,
    grant_toml: String,
    updated_at: i64,
    check_info: String,
}

impl PluginRow {
    fn into_record(self) -> Result<PluginRecord> {
        Ok(PluginRecord {
            name: PluginName::parse(&self.name).map_err(Error::Corrupt)?,
            active_version: PluginVersion::from_stored(self.active_version),
            grant_toml: self.grant_toml,
            check_info: check_info_from_json(&self.check_info)?,
            updated_at: self.updated_at,
        })
    }
}

#[derive(FromRow)]
struct RunRow {
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
    /// Only listings select it; a single run has its steps.
    #[sqlx(default)]
    current_step_name: Option<String>,
}

impl RunRow {
    fn into_record(self) -> Result<RunRecord> {
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&self.labels).map_err(|_| corrupt("run labels", &self.labels))?;
        Ok(RunRecord {
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| corrupt("run status", &self.status))?,
            id: RunId::from_stored(self.id),
            plugin_name: self.plugin_name,
            plugin_version: PluginVersion::from_stored(self.plugin_version),
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
            schedule_id: self.schedule_id,
            retry: self.retry.as_deref().map(retry_from_json).transpose()?,
            current_step_name: self.current_step_name,
            steps: Vec::new(),
        })
    }
}

fn retry_json(retry: Retry) -> String {
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
struct StepRow {
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
    fn into_record(self) -> Result<StepRecord> {
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
    logs: String,
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
            logs: logs_from_json(&self.logs)?,
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

fn check_info_to_json(info: &CheckInfo) -> Json {
    let steps: Vec<Json> = info
        .steps
        .iter()
        .map(|step| {
            json!({
                "name": step.name,
                "description": step.description,
                "timeout_ms": step.timeout.map(|timeout| timeout.as_millis() as u64),
                "max_attempts": step.max_attempts,
            })
        })
        .collect();
    json!({
        "name": info.name,
        "version": info.version,
        "description": info.description,
        "steps": steps,
        "params_schema": info.params_schema,
    })
}

fn check_info_from_json(text: &str) -> Result<CheckInfo> {
    let bad = || corrupt("check info", text);
    let value: Json = serde_json::from_str(text).map_err(|_| bad())?;
    let string = |value: &Json, key: &str| value[key].as_str().map(str::to_owned);
    let steps = value["steps"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|step| {
            Ok(StepInfo {
                name: string(step, "name").ok_or_else(bad)?,
                description: string(step, "description").unwrap_or_default(),
                timeout: step["timeout_ms"].as_u64().map(Duration::from_millis),
                max_attempts: step["max_attempts"].as_u64().map(|max| max as u32),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CheckInfo {
        name: string(&value, "name").unwrap_or_default(),
        version: string(&value, "version").unwrap_or_default(),
        description: string(&value, "description").unwrap_or_default(),
        steps,
        params_schema: string(&value, "params_schema"),
    })
}

fn logs_to_json(logs: &[LogLine]) -> Json {
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

/// Schedules: recurring triggers, their fires, and the runs they start.
impl Store {
    pub async fn insert_schedule(&self, schedule: &ScheduleRecord) -> Result<()> {
        let labels = labels_json(&schedule.labels)?;
        let query = sqlx::query(
            "INSERT INTO schedules (id, plugin_name, params, labels, poll_interval_ms, timeout_ms, trigger_kind, \
             cron_expr, timezone, interval_ms, jitter_ms, start_at, end_at, at, misfire_grace_ms, coalesce, \
             max_concurrent_runs, paused, next_fire_at, next_due_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
        )
        .bind(&schedule.id)
        .bind(&schedule.plugin_name);
        bind_schedule_fields(query, schedule, &labels)
            .bind(schedule.created_at)
            .bind(schedule.updated_at)
            .execute(&self.pool)
            .await?;
        self.schedules_changed().await
    }

    /// Replaces everything but the id and creation time. Bumping the lease token fences off a
    /// node that is firing the old version of the schedule at this moment.
    pub async fn update_schedule(&self, schedule: &ScheduleRecord) -> Result<()> {
        let labels = labels_json(&schedule.labels)?;
        let query = sqlx::query(
            "UPDATE schedules SET params = $1, labels = $2, poll_interval_ms = $3, timeout_ms = $4, trigger_kind = $5, \
             cron_expr = $6, timezone = $7, interval_ms = $8, jitter_ms = $9, start_at = $10, end_at = $11, at = $12, \
             misfire_grace_ms = $13, coalesce = $14, max_concurrent_runs = $15, paused = $16, next_fire_at = $17, \
             next_due_at = $18, updated_at = $19, lease_owner = NULL, lease_expires_at = NULL, \
             lease_token = lease_token + 1 WHERE id = $20",
        );
        let updated = bind_schedule_fields(query, schedule, &labels)
            .bind(schedule.updated_at)
            .bind(&schedule.id)
            .execute(&self.pool)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(Error::NotFound);
        }
        self.schedules_changed().await
    }

    async fn schedules_changed(&self) -> Result<()> {
        self.backend
            .notify(&self.pool, &Change::SchedulesChanged)
            .await
    }

    /// Deletes a schedule and its fire history; its runs stay. Returns whether it existed.
    pub async fn delete_schedule(&self, id: &str) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() == 1)
    }

    pub async fn find_schedule(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        let row: Option<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(ScheduleRow::into_record).transpose()
    }

    /// Every schedule, oldest first.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ScheduleRow::into_record).collect()
    }

    /// The latest `limit` fires of a schedule, newest first.
    pub async fn recent_fires(&self, id: &str, limit: u32) -> Result<Vec<FireRecord>> {
        let rows: Vec<FireRow> = sqlx::query_as(
            "SELECT scheduled_at, outcome, reason, run_id, recorded_at FROM schedule_fires \
             WHERE schedule_id = $1 ORDER BY scheduled_at DESC LIMIT $2",
        )
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(FireRecord {
                    outcome: FireOutcome::parse(&row.outcome)
                        .ok_or_else(|| corrupt("fire outcome", &row.outcome))?,
                    scheduled_at: row.scheduled_at,
                    reason: row.reason,
                    run_id: row.run_id,
                    recorded_at: row.recorded_at,
                })
            })
            .collect()
    }

    /// Leases unpaused schedules whose next fire is due by `now`, earliest first, for
    /// `lease_ms` by the database's clock.
    pub async fn claim_due_schedules(
        &self,
        owner: &str,
        now: UnixMillis,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedSchedule>> {
        let sql = self.claim_sql(
            "schedules",
            "next_due_at",
            " AND paused = 0",
            "id, lease_token",
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(&sql)
            .bind(owner)
            .bind(lease_ms)
            .bind(now)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, lease_token)| ClaimedSchedule { id, lease_token })
            .collect())
    }

    /// The earliest due time of an unpaused schedule after `now`.
    pub async fn next_schedule_due_after(&self, now: UnixMillis) -> Result<Option<UnixMillis>> {
        let due: Option<(i64,)> = sqlx::query_as(
            "SELECT next_due_at FROM schedules WHERE next_due_at IS NOT NULL AND paused = 0 \
             AND next_due_at > $1 ORDER BY next_due_at LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(due.map(|(due,)| due))
    }

    /// Runs of the schedule that have not finished.
    pub async fn count_unfinished_runs(&self, schedule_id: &str) -> Result<u32> {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM runs WHERE schedule_id = $1 AND status IN ('queued', 'running')",
        )
        .bind(schedule_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(count as u32)
    }

    /// Records the fires (starting their runs) and moves the schedule on, in one transaction,
    /// only while `lease_token` is current. A fire already recorded (the key is schedule +
    /// scheduled time) is not recorded again and starts no run. Returns the runs started.
    pub async fn record_fires(&self, write: &FireWrite) -> Result<usize> {
        let mut transaction = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE schedules SET next_fire_at = $1, next_due_at = $2, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $3 AND lease_token = $4",
        )
        .bind(write.next_fire_at)
        .bind(write.next_due_at)
        .bind(&write.schedule_id)
        .bind(write.lease_token)
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(Error::Conflict {
                constraint: "schedules.lease_token".into(),
            });
        }
        let mut started = 0;
        for fire in &write.fires {
            let inserted = sqlx::query(
                "INSERT INTO schedule_fires (schedule_id, scheduled_at, outcome, reason, run_id, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&write.schedule_id)
            .bind(fire.scheduled_at)
            .bind(fire.outcome.as_str())
            .bind(fire.reason.as_deref())
            .bind(fire.run.as_ref().map(|run| run.id.as_str()))
            .bind(write.now)
            .execute(&mut *transaction)
            .await?;
            if inserted.rows_affected() == 1
                && let Some(run) = &fire.run
            {
                insert_runs(&mut transaction, std::slice::from_ref(run)).await?;
                started += 1;
            }
        }
        if started > 0 {
            self.backend
                .notify(&mut *transaction, &Change::RunsQueued)
                .await?;
        }
        transaction.commit().await?;
        if started > 0 {
            self.events_written();
        }
        Ok(started)
    }
}

const SCHEDULE_COLUMNS: &str = "id, plugin_name, params, labels, poll_interval_ms, timeout_ms, trigger_kind, cron_expr, \
     timezone, interval_ms, jitter_ms, start_at, end_at, at, misfire_grace_ms, coalesce, max_concurrent_runs, paused, \
     next_fire_at, next_due_at, created_at, updated_at";

/// A trigger spread over the schedule table's columns.
struct TriggerColumns<'a> {
    kind: &'static str,
    cron_expr: Option<&'a str>,
    timezone: Option<&'a str>,
    interval_ms: Option<i64>,
    jitter_ms: Option<i64>,
    start_at: Option<i64>,
    end_at: Option<i64>,
    at: Option<i64>,
}

impl<'a> TriggerColumns<'a> {
    fn of(trigger: &'a TriggerSpec) -> TriggerColumns<'a> {
        let mut columns = TriggerColumns {
            kind: "",
            cron_expr: None,
            timezone: None,
            interval_ms: None,
            jitter_ms: None,
            start_at: None,
            end_at: None,
            at: None,
        };
        match trigger {
            TriggerSpec::Cron { expr, timezone } => {
                columns.kind = "cron";
                columns.cron_expr = Some(expr);
                columns.timezone = Some(timezone);
            }
            TriggerSpec::Interval {
                interval_ms,
                jitter_ms,
                start_at,
                end_at,
            } => {
                columns.kind = "interval";
                columns.interval_ms = Some(*interval_ms);
                columns.jitter_ms = Some(*jitter_ms);
                columns.start_at = *start_at;
                columns.end_at = *end_at;
            }
            TriggerSpec::At { at } => {
                columns.kind = "at";
                columns.at = Some(*at);
            }
        }
        columns
    }
}

#[derive(FromRow)]
struct FireRow {
    scheduled_at: i64,
    outcome: String,
    reason: Option<String>,
    run_id: Option<String>,
    recorded_at: i64,
}

#[derive(FromRow)]
struct ScheduleRow {
    id: String,
    plugin_name: String,
    params: String,
    labels: String,
    poll_interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    trigger_kind: String,
    cron_expr: Option<String>,
    timezone: Option<String>,
    interval_ms: Option<i64>,
    jitter_ms: Option<i64>,
    start_at: Option<i64>,
    end_at: Option<i64>,
    at: Option<i64>,
    misfire_grace_ms: Option<i64>,
    coalesce: i64,
    max_concurrent_runs: i64,
    paused: i64,
    next_fire_at: Option<i64>,
    next_due_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl ScheduleRow {
    fn into_record(self) -> Result<ScheduleRecord> {
        let trigger = match (
            self.trigger_kind.as_str(),
            self.cron_expr,
            self.timezone,
            self.interval_ms,
            self.at,
        ) {
            ("cron", Some(expr), Some(timezone), _, _) => TriggerSpec::Cron { expr, timezone },
            ("interval", _, _, Some(interval_ms), _) => TriggerSpec::Interval {
                interval_ms,
                jitter_ms: self.jitter_ms.unwrap_or(0),
                start_at: self.start_at,
                end_at: self.end_at,
            },
            ("at", _, _, _, Some(at)) => TriggerSpec::At { at },
            _ => return Err(corrupt("schedule trigger", &self.trigger_kind)),
        };
        let labels: BTreeMap<String, String> = serde_json::from_str(&self.labels)
            .map_err(|_| corrupt("schedule labels", &self.labels))?;
        Ok(ScheduleRecord {
            id: self.id,
            plugin_name: self.plugin_name,
            params: self.params,
            labels,
            poll_interval_ms: self.poll_interval_ms,
            timeout_ms: self.timeout_ms,
            trigger,
            options: ScheduleOptions {
                misfire_grace_ms: self.misfire_grace_ms,
                coalesce: self.coalesce != 0,
                max_concurrent_runs: self.max_concurrent_runs as u32,
                paused: self.paused != 0,
            },
            next_fire_at: self.next_fire_at,
            next_due_at: self.next_due_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;

/// Binds the columns from `params` to `next_due_at`, in table order.
fn bind_schedule_fields<'q>(
    query: AnyQuery<'q>,
    schedule: &'q ScheduleRecord,
    labels: &'q str,
) -> AnyQuery<'q> {
    let trigger = TriggerColumns::of(&schedule.trigger);
    query
        .bind(&schedule.params)
        .bind(labels)
        .bind(schedule.poll_interval_ms)
        .bind(schedule.timeout_ms)
        .bind(trigger.kind)
        .bind(trigger.cron_expr)
        .bind(trigger.timezone)
        .bind(trigger.interval_ms)
        .bind(trigger.jitter_ms)
        .bind(trigger.start_at)
        .bind(trigger.end_at)
        .bind(trigger.at)
        .bind(schedule.options.misfire_grace_ms)
        .bind(i64::from(schedule.options.coalesce))
        .bind(i64::from(schedule.options.max_concurrent_runs))
        .bind(i64::from(schedule.options.paused))
        .bind(schedule.next_fire_at)
        .bind(schedule.next_due_at)
}

fn labels_json(labels: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(labels).map_err(|error| Error::Corrupt(error.to_string()))
}

/// Waits for this process's turn to write, where the backend has one writer at a time.
pub(super) async fn take_turn(
    writer: &Option<Arc<tokio::sync::Mutex<()>>>,
) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    match writer {
        Some(writer) => Some(writer.clone().lock_owned().await),
        None => None,
    }
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

/// Most bind parameters in one statement (SQLite allows 32,766, PostgreSQL 65,535).
const MAX_BINDS: usize = 30_000;

/// Inserts queued runs with their labels and steps, due at once: one statement per table for
/// all of them, since every statement is a round trip to the connection.
async fn insert_runs(connection: &mut AnyConnection, runs: &[NewRun]) -> Result<()> {
    let labels: Vec<String> = runs
        .iter()
        .map(|run| labels_json(&run.labels))
        .collect::<Result<_>>()?;
    let retries: Vec<Option<String>> = runs.iter().map(|run| run.retry.map(retry_json)).collect();
    let mut rows = Inserts::new(
        "INSERT INTO runs (id, plugin_name, plugin_version, params, labels, status, poll_interval_ms, max_errors, \
         idempotency_key, idempotency_fingerprint, created_at, deadline_at, next_tick_at, schedule_id, retry) VALUES ",
    );
    for ((run, labels), retry) in runs.iter().zip(&labels).zip(&retries) {
        rows.row()
            .value(run.id.as_str())?
            .value(run.plugin_name.as_str())?
            .value(run.plugin_version.as_str())?
            .value(run.params.as_str())?
            .value(labels.as_str())?
            .value("queued")?
            .value(run.poll_interval_ms)?
            .value(i64::from(run.max_errors))?
            .value(run.idempotency_key.as_deref())?
            .value(run.idempotency_fingerprint.as_deref())?
            .value(run.created_at)?
            .value(run.deadline_at)?
            .value(run.created_at)?
            .value(run.schedule_id.as_deref())?
            .value(retry.as_deref())?;
        rows.end_row(connection).await?;
    }
    rows.flush(connection).await?;
    let mut rows = Inserts::new("INSERT INTO run_labels (run_id, key, value) VALUES ");
    for run in runs {
        for (key, value) in &run.labels {
            rows.row()
                .value(run.id.as_str())?
                .value(key.as_str())?
                .value(value.as_str())?;
            rows.end_row(connection).await?;
        }
    }
    rows.flush(connection).await?;
    let mut rows = Inserts::new("INSERT INTO events (run_id, at) VALUES ");
    for run in runs {
        rows.row().value(run.id.as_str())?.value(run.created_at)?;
        rows.end_row(connection).await?;
    }
    rows.flush(connection).await?;
    let mut rows = Inserts::new(
        "INSERT INTO steps (run_id, position, name, status, timeout_ms, max_attempts) VALUES ",
    );
    for run in runs {
        for (position, step) in run.steps.iter().enumerate() {
            rows.row()
                .value(run.id.as_str())?
                .value(position as i64)?
                .value(step.name.as_str())?
                .value("waiting")?
                .value(step.timeout_ms)?
                .value(step.max_attempts.map(i64::from))?;
            rows.end_row(connection).await?;
        }
    }
    rows.flush(connection).await
}

/// Writes runs in one transaction; if that fails, one transaction per run, so that each run
/// gets its own answer and one bad run does not fail the others.
async fn write_runs(pool: &AnyPool, backend: Backend, runs: Vec<NewRun>) -> Vec<Result<()>> {
    match write_runs_together(pool, backend, &runs).await {
        Ok(()) => runs.iter().map(|_| Ok(())).collect(),
        Err(error) if runs.len() == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, runs = runs.len(), "writing runs together failed; writing them one by one");
            let mut results = Vec::with_capacity(runs.len());
            for run in &runs {
                results.push(write_runs_together(pool, backend, std::slice::from_ref(run)).await);
            }
            results
        }
    }
}

async fn write_runs_together(pool: &AnyPool, backend: Backend, runs: &[NewRun]) -> Result<()> {
    let mut transaction = pool.begin().await?;
    insert_runs(&mut transaction, runs).await?;
    backend
        .notify(&mut *transaction, &Change::RunsQueued)
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// A multi-row `INSERT … VALUES (…), (…)`, sent in as few statements as the bind limit allows.
struct Inserts<'q> {
    head: &'static str,
    statement: Statement<'q>,
    rows: usize,
}

impl<'q> Inserts<'q> {
    fn new(head: &'static str) -> Inserts<'q> {
        Inserts {
            head,
            statement: Statement::new(head.to_owned()),
            rows: 0,
        }
    }

    /// Starts a row; bind its values, then call `end_row`.
    fn row(&mut self) -> Values<'_, 'q> {
        self.statement
            .push(if self.rows == 0 { "(" } else { ", (" });
        self.rows += 1;
        Values {
            statement: &mut self.statement,
            first: true,
        }
    }

    async fn end_row(&mut self, connection: &mut AnyConnection) -> Result<()> {
        self.statement.push(")");
        if self.statement.arguments.len() >= MAX_BINDS {
            self.flush(connection).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, connection: &mut AnyConnection) -> Result<()> {
        if self.rows > 0 {
            let statement =
                std::mem::replace(&mut self.statement, Statement::new(self.head.to_owned()));
            self.rows = 0;
            sqlx::query_with(&statement.sql, statement.arguments)
                .execute(&mut *connection)
                .await?;
        }
        Ok(())
    }
}

/// The values of one row of an `Inserts`.
struct Values<'s, 'q> {
    statement: &'s mut Statement<'q>,
    first: bool,
}

impl<'q> Values<'_, 'q> {
    fn value<T: Encode<'q, Any> + Type<Any> + 'q>(&mut self, value: T) -> Result<&mut Self> {
        if !self.first {
            self.statement.push(", ");
        }
        self.first = false;
        self.statement.bind(value)?;
        Ok(self)
    }
}

/// A statement assembled at run time, with `$n` placeholders (which both backends read).
struct Statement<'q> {
    sql: String,
    arguments: AnyArguments<'q>,
}

impl<'q> Statement<'q> {
    fn new(sql: String) -> Statement<'q> {
        Statement {
            sql,
            arguments: AnyArguments::default(),
        }
    }

    fn push(&mut self, sql: &str) -> &mut Statement<'q> {
        self.sql.push_str(sql);
        self
    }

    fn bind<T: Encode<'q, Any> + Type<Any> + 'q>(
        &mut self,
        value: T,
    ) -> Result<&mut Statement<'q>> {
        self.arguments
            .add(value)
            .map_err(|error| Error::Corrupt(format!("binding a value: {error}")))?;
        let _ = write!(self.sql, "${}", self.arguments.len());
        Ok(self)
    }
}

fn version_record(
    (version, check_info, created_at): (String, String, i64),
) -> Result<PluginVersionRecord> {
    Ok(PluginVersionRecord {
        version: PluginVersion::from_stored(version),
        check_info: check_info_from_json(&check_info)?,
        created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::NewStep;

    #[test]
    fn check_info_round_trips_through_json() {
        let info = CheckInfo {
            name: "demo".into(),
            version: "1".into(),
            description: "d".into(),
            steps: vec![StepInfo {
                name: "a".into(),
                description: String::new(),
                timeout: Some(Duration::from_millis(1500)),
                max_attempts: Some(3),
            }],
            params_schema: Some("{}".into()),
        };
        let text = check_info_to_json(&info).to_string();
        assert_eq!(check_info_from_json(&text).expect("valid"), info);
    }

    #[tokio::test]
    async fn the_record_enqueue_returns_is_what_is_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
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
            .save_plugin_version(&name, &version, b"component", &info, 1)
            .await
            .expect("saving");
        store
            .activate_plugin(
                &name,
                &version,
                Some(""),
                AuditEntry::new("test", "plugin.upload", "demo", 1),
            )
            .await
            .expect("activating");
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
            retry: None,
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
