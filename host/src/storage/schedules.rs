//! Schedules: recurring triggers, their fires, and the runs they start.

use std::collections::BTreeMap;

use sqlx::any::AnyArguments;
use sqlx::{Any, FromRow};

use super::leases::Claimable;
use super::runs::insert_runs;
use super::statement::SqlxTx;
use super::store::{corrupt, labels_json};
use super::{
    Change, ClaimedSchedule, Error, FireRecord, FireWrite, Result, ScheduleFilter, ScheduleOptions,
    ScheduleRecord, Store,
};
use crate::model::{FireOutcome, TriggerSpec, UnixMillis};

/// Schedules: recurring triggers, their fires, and the runs they start.
impl Store {
    pub async fn insert_schedule(&self, schedule: &ScheduleRecord) -> Result<()> {
        let labels = labels_json(&schedule.labels)?;
        let (pool, _turn) = self.writes.single().await;
        let query = sqlx::query(
            "INSERT INTO schedules (id, plugin_name, params, labels, poll_interval_ms, timeout_ms, trigger_kind, \
             cron_expr, timezone, interval_ms, jitter_ms, start_at, end_at, at, misfire_grace_ms, coalesce, \
             max_concurrent_runs, paused, next_fire_at, next_due_at, created_at, updated_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)",
        )
        .bind(&schedule.id)
        .bind(&schedule.plugin_name);
        bind_schedule_fields(query, schedule, &labels)
            .bind(schedule.created_at)
            .bind(schedule.updated_at)
            .bind(schedule.created_by.as_deref())
            .execute(pool)
            .await?;
        self.schedules_changed().await
    }

    /// Replaces everything but the id and creation time. Bumping the lease token fences off a
    /// node that is firing the old version of the schedule at this moment.
    pub async fn update_schedule(&self, schedule: &ScheduleRecord) -> Result<()> {
        let labels = labels_json(&schedule.labels)?;
        let (pool, _turn) = self.writes.single().await;
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
            .execute(pool)
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
        let (pool, _turn) = self.writes.single().await;
        let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1")
            .bind(id)
            .execute(pool)
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

    /// Up to `limit` schedules that match `filter`, oldest first, after the schedule `after`.
    pub async fn list_schedules(
        &self,
        filter: &ScheduleFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ScheduleRecord>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE ($1 IS NULL OR plugin_name = $1) \
             AND ($2 < 0 OR paused = $2) AND ($3 IS NULL OR id > $3) ORDER BY id LIMIT $4"
        ))
        .bind(filter.plugin.as_deref())
        .bind(filter.paused.map_or(-1, i64::from))
        .bind(after)
        .bind(i64::from(limit))
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
        const DUE: Claimable = Claimable {
            table: "schedules",
            due: "next_due_at",
            filter: " AND paused = 0",
            returning: "id, lease_token",
        };
        let rows: Vec<(String, i64)> = self
            .claim(&DUE, (owner, now, lease_ms, limit), None)
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
        let mut transaction = self.writes.begin().await?;
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
                insert_runs(&mut SqlxTx(&mut transaction), std::slice::from_ref(run)).await?;
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
     next_fire_at, next_due_at, created_at, updated_at, created_by";

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
    created_by: Option<String>,
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
            created_by: self.created_by,
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
