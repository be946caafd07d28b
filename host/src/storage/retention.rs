//! Retention (README, "Retention"): deleting finished work in small transactions, each at most `batch`
//! rows, so that deletion takes its turn between claims and tick writes instead of holding
//! the database; and the lease of the background job that one node at a time runs.

use sqlx::FromRow;

use super::backend::Backend;
use super::leases::Claimable;
use super::statement::{Value, arguments, placeholders};
use super::{Result, Store};
use crate::model::{RunId, UnixMillis};

/// Rows that go by their age alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aged {
    /// Attempt rows with their logs, of any run, by when they started.
    Attempts,
    /// Schedule fires, by their scheduled time.
    ScheduleFires,
    /// Notification streaks of series with no finished run since.
    NotifyStreaks,
    /// The change log behind live events, by when the change was made; never the newest
    /// change, whose id the next ones follow.
    Events,
    /// The status pages' daily aggregates, by the start of their day.
    RollupDays,
    RollupSteps,
    RollupLatency,
    /// Ended incidents, by their last failed run.
    Incidents,
}

/// What one deletion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub rows: u64,
    /// Rows deleted by the largest of its transactions.
    pub largest_transaction: u64,
}

impl Pruned {
    fn add(&mut self, rows: u64) {
        self.rows += rows;
        self.largest_transaction = self.largest_transaction.max(rows);
    }

    pub fn merge(&mut self, other: Pruned) {
        self.rows += other.rows;
        self.largest_transaction = self.largest_transaction.max(other.largest_transaction);
    }
}

fn run_id_binds(ids: &[&RunId]) -> Vec<Value<'static>> {
    ids.iter()
        .map(|id| Value::from(id.as_str().to_owned()))
        .collect()
}

/// The run `run_id` (a qualified column) has no notification still being delivered and is
/// not waiting to be counted in the status rollups: either keeps its run, whatever retention
/// says.
fn nothing_pending(run_id: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM notifications n WHERE n.run_id = {run_id} AND n.status = 'pending') \
         AND NOT EXISTS (SELECT 1 FROM rollup_queue q WHERE q.run_id = {run_id})"
    )
}

/// Free pages one step of SQLite's incremental vacuum gives back (256 KiB): each step is done
/// in a writer's batch, which the ticks in it wait for.
const VACUUM_PAGES: u32 = 64;

#[derive(FromRow)]
struct RunWeight {
    id: String,
    dependents: i64,
}

impl Store {
    /// Takes the lease of background job `job` if it is due by `now` and nobody holds it;
    /// returns the fencing token.
    pub async fn claim_job(
        &self,
        job: &str,
        owner: &str,
        now: UnixMillis,
        lease_ms: i64,
    ) -> Result<Option<i64>> {
        const DUE: Claimable = Claimable {
            table: "jobs",
            due: "next_due_at",
            filter: " AND id = $5",
            returning: "lease_token",
        };
        let tokens: Vec<(i64,)> = self
            .claim(&DUE, (owner, now, lease_ms, 1), Some(job))
            .await?;
        Ok(tokens.first().map(|(token,)| *token))
    }

    /// Extends a job's lease; false if it was lost.
    pub async fn renew_job(&self, job: &str, lease_token: i64, lease_ms: i64) -> Result<bool> {
        self.renew_row_lease("jobs", job, lease_token, lease_ms)
            .await
    }

    /// Releases a job's lease and sets when it is next due.
    pub async fn finish_job(
        &self,
        job: &str,
        lease_token: i64,
        next_due_at: UnixMillis,
    ) -> Result<()> {
        let (pool, _turn) = self.writes.single().await;
        sqlx::query(
            "UPDATE jobs SET next_due_at = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND lease_token = $3",
        )
        .bind(next_due_at)
        .bind(job)
        .bind(lease_token)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Deletes up to `batch` rows of `table` whose `key` columns a `SELECT … WHERE filter`
    /// picks, in one transaction.
    async fn delete_some(
        &self,
        table: &str,
        key: &str,
        from_where: &str,
        binds: Vec<Value<'static>>,
        batch: usize,
    ) -> Result<u64> {
        let sql = format!(
            "DELETE FROM {table} WHERE ({key}) IN (SELECT {key} {from_where} LIMIT {batch})"
        );
        let changed = self.run_together(vec![(sql, binds)]).await?;
        Ok(changed.iter().sum())
    }

    /// Deletes up to `batch` rows of `what` older than `before`.
    pub async fn delete_aged(&self, what: Aged, before: UnixMillis, batch: usize) -> Result<u64> {
        let (table, key, age, also) = match what {
            Aged::Attempts => ("attempts", "run_id, position, attempt", "started_at", ""),
            Aged::ScheduleFires => (
                "schedule_fires",
                "schedule_id, scheduled_at",
                "scheduled_at",
                "",
            ),
            Aged::NotifyStreaks => ("notify_streaks", "series", "updated_at", ""),
            Aged::RollupDays => (
                "rollup_days",
                "zone, plugin_name, schedule_id, day",
                "day_start",
                "",
            ),
            Aged::RollupSteps => (
                "rollup_steps",
                "zone, plugin_name, schedule_id, day, position",
                "day_start",
                "",
            ),
            Aged::RollupLatency => (
                "rollup_latency",
                "zone, plugin_name, schedule_id, day, position, bucket",
                "day_start",
                "",
            ),
            Aged::Incidents => (
                "incidents",
                "plugin_name, schedule_id, started_at",
                "last_failed_at",
                " AND ended_at IS NOT NULL",
            ),
            Aged::Events => (
                "events",
                "id",
                "at",
                " AND id < (SELECT MAX(id) FROM events)",
            ),
        };
        self.delete_some(
            table,
            key,
            &format!("FROM {table} WHERE {age} < $1{also}"),
            vec![Value::from(before)],
            batch,
        )
        .await
    }

    /// Up to `limit` runs that finished before `before`, oldest first.
    pub async fn runs_finished_before(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<Vec<RunId>> {
        let ids: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1 \
             AND {} ORDER BY finished_at LIMIT $2",
            nothing_pending("runs.id")
        ))
        .bind(before)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids
            .into_iter()
            .map(|(id,)| RunId::from_stored(id))
            .collect())
    }

    /// Up to `limit` finished runs of each schedule beyond its newest `keep` finished ones.
    pub async fn runs_beyond_schedule_keep(&self, keep: u32, limit: usize) -> Result<Vec<RunId>> {
        let schedules: Vec<(String,)> = sqlx::query_as("SELECT id FROM schedules")
            .fetch_all(&self.pool)
            .await?;
        let mut ids = Vec::new();
        for (schedule,) in schedules {
            let beyond: Vec<(String,)> = sqlx::query_as(&format!(
                "SELECT id FROM (SELECT id FROM runs WHERE schedule_id = $1 AND finished_at IS NOT NULL \
                 ORDER BY id DESC LIMIT $2 OFFSET $3) beyond WHERE {}",
                nothing_pending("beyond.id")
            ))
            .bind(&schedule)
            .bind(limit as i64)
            .bind(i64::from(keep))
            .fetch_all(&self.pool)
            .await?;
            // Their shadow runs go with them: a shadow's comparison is of pairs.
            if !beyond.is_empty() {
                let sql = format!(
                    "SELECT id FROM runs WHERE shadow_of IN ({}) AND finished_at IS NOT NULL AND {}",
                    placeholders(1, beyond.len()),
                    nothing_pending("runs.id")
                );
                let mut shadows = sqlx::query_as::<_, (String,)>(&sql);
                for (id,) in &beyond {
                    shadows = shadows.bind(id.as_str());
                }
                let shadows = shadows.fetch_all(&self.pool).await?;
                ids.extend(shadows.into_iter().map(|(id,)| RunId::from_stored(id)));
            }
            ids.extend(beyond.into_iter().map(|(id,)| RunId::from_stored(id)));
        }
        Ok(ids)
    }

    /// Deletes finished runs with everything that hangs off them (attempts, notifications
    /// and their attempts, labels, steps), no transaction deleting more than `batch` rows
    /// (a single run with more dependent rows than that goes alone). The logs go first; a run
    /// and its steps always go together. Unfinished runs are never deleted.
    pub async fn delete_runs(&self, ids: &[RunId], batch: usize) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        for chunk in ids.chunks(batch.clamp(1, 500)) {
            let ids: Vec<&RunId> = chunk.iter().collect();
            let list = placeholders(1, ids.len());
            // The logs first, a batch at a time: a run polled for a day has many attempts.
            let logs = [
                (
                    "attempts",
                    "run_id, position, attempt",
                    format!("FROM attempts WHERE run_id IN ({list})"),
                ),
                (
                    "notification_attempts",
                    "notification_id, attempt",
                    format!(
                        "FROM notification_attempts WHERE notification_id IN \
                         (SELECT id FROM notifications WHERE run_id IN ({list}))"
                    ),
                ),
            ];
            for (table, key, from_where) in &logs {
                loop {
                    let deleted = self
                        .delete_some(table, key, from_where, run_id_binds(&ids), batch)
                        .await?;
                    pruned.add(deleted);
                    if deleted < batch as u64 {
                        break;
                    }
                }
            }
            let weights: Vec<RunWeight> = sqlx::query_as_with(
                &format!(
                    "SELECT r.id, (SELECT COUNT(*) FROM steps s WHERE s.run_id = r.id) \
                     + (SELECT COUNT(*) FROM run_labels l WHERE l.run_id = r.id) \
                     + (SELECT COUNT(*) FROM notifications n WHERE n.run_id = r.id) AS dependents \
                     FROM runs r WHERE r.id IN ({list}) AND r.finished_at IS NOT NULL"
                ),
                arguments(&run_id_binds(&ids)),
            )
            .fetch_all(&self.pool)
            .await?;
            let mut group: Vec<RunId> = Vec::new();
            let mut group_rows = 0;
            for weight in weights {
                let rows = 1 + weight.dependents as usize;
                if !group.is_empty() && group_rows + rows > batch {
                    pruned.add(self.delete_run_rows(&group).await?);
                    group.clear();
                    group_rows = 0;
                }
                group.push(RunId::from_stored(weight.id));
                group_rows += rows;
            }
            if !group.is_empty() {
                pruned.add(self.delete_run_rows(&group).await?);
            }
        }
        Ok(pruned)
    }

    /// One transaction: the runs' notifications, labels, steps and rows, and the newest
    /// deleted id kept for `run_expired`.
    async fn delete_run_rows(&self, group: &[RunId]) -> Result<u64> {
        let ids: Vec<&RunId> = group.iter().collect();
        let list = placeholders(1, ids.len());
        let binds = run_id_binds(&ids);
        let mut deletion: super::store::SqlBatch = [
            ("notifications", "run_id"),
            ("run_labels", "run_id"),
            ("steps", "run_id"),
        ]
        .into_iter()
        .map(|(table, column)| {
            let sql = format!(
                "DELETE FROM {table} WHERE {column} IN (SELECT id FROM runs WHERE id IN ({list}) \
                 AND finished_at IS NOT NULL AND {})",
                nothing_pending("runs.id")
            );
            (sql, binds.clone())
        })
        .collect();
        let sql = format!(
            "DELETE FROM runs WHERE id IN ({list}) AND finished_at IS NOT NULL AND {}",
            nothing_pending("runs.id")
        );
        deletion.push((sql, binds));
        if let Some(newest) = group.iter().map(RunId::as_str).max() {
            deletion.push((
                "UPDATE jobs SET expired_runs_through = $1 WHERE id = 'retention' \
                 AND (expired_runs_through IS NULL OR expired_runs_through < $1)"
                    .to_owned(),
                vec![Value::from(newest.to_owned())],
            ));
        }
        let changed = self.run_together(deletion).await?;
        // The rows of the four deletes, not the job's row.
        Ok(changed.iter().take(4).sum())
    }

    /// Whether a run that is not found was deleted by retention, as far as can be told
    /// without a row per deleted run: a run id (a UUIDv7, which sorts by creation time) no
    /// newer than the newest run retention deleted.
    pub async fn run_expired(&self, id: &RunId) -> Result<bool> {
        let is_run_id = uuid::Uuid::parse_str(id.as_str())
            .is_ok_and(|uuid| uuid.get_version_num() == 7 && uuid.to_string() == id.as_str());
        if !is_run_id {
            return Ok(false);
        }
        let through: Option<(Option<String>,)> =
            sqlx::query_as("SELECT expired_runs_through FROM jobs WHERE id = 'retention'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(through
            .and_then(|(through,)| through)
            .is_some_and(|through| id.as_str() <= through.as_str()))
    }

    /// Deletes up to `batch` plugin versions created before `before` that are not active and
    /// that no run (finished or not) pins, with the component bytes no version uses any more.
    pub async fn delete_unused_plugin_versions(
        &self,
        before: UnixMillis,
        batch: usize,
    ) -> Result<Pruned> {
        const UNUSED: &str = "NOT EXISTS (SELECT 1 FROM plugins p WHERE p.name = pv.plugin_name \
             AND p.active_version = pv.version) \
             AND NOT EXISTS (SELECT 1 FROM shadows s WHERE s.plugin_name = pv.plugin_name \
             AND s.version = pv.version AND s.ended_at IS NULL) \
             AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.plugin_name = pv.plugin_name \
             AND r.plugin_version = pv.version)";
        let candidates: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT pv.plugin_name, pv.version FROM plugin_versions pv \
             WHERE pv.created_at < $1 AND {UNUSED} LIMIT $2"
        ))
        .bind(before)
        .bind(batch.div_ceil(2) as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut pruned = Pruned::default();
        if candidates.is_empty() {
            return Ok(pruned);
        }
        let mut deletion = super::store::SqlBatch::new();
        for (name, version) in candidates {
            // Checked again in the delete: the version may have been activated since.
            deletion.push((
                format!(
                    "DELETE FROM plugin_versions WHERE plugin_name = $1 AND version = $2 AND EXISTS \
                     (SELECT 1 FROM plugin_versions pv WHERE pv.plugin_name = $1 AND pv.version = $2 AND {UNUSED})"
                ),
                vec![Value::from(name), Value::from(version.clone())],
            ));
            deletion.push((
                "DELETE FROM components WHERE version = $1 \
                 AND NOT EXISTS (SELECT 1 FROM plugin_versions WHERE version = $1)"
                    .to_owned(),
                vec![Value::from(version)],
            ));
        }
        pruned.add(self.run_together(deletion).await?.iter().sum());
        Ok(pruned)
    }

    /// SQLite's free pages and all its pages; `None` on PostgreSQL, whose autovacuum gives
    /// space back by itself.
    pub async fn free_pages(&self) -> Result<Option<(u64, u64)>> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        let (free,): (i64,) = sqlx::query_as("PRAGMA freelist_count")
            .fetch_one(&self.pool)
            .await?;
        let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count")
            .fetch_one(&self.pool)
            .await?;
        Ok(Some((free as u64, pages as u64)))
    }

    /// Gives up to `VACUUM_PAGES` free pages back to the file system (SQLite, whose database is
    /// in incremental auto-vacuum mode), on the writer thread.
    pub async fn vacuum_step(&self) -> Result<()> {
        self.run_together(vec![(
            format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"),
            Vec::new(),
        )])
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{CheckInfo, PluginVersion};
    use crate::storage::runs::tests::store_with_plugin;

    /// On SQLite, deletions and the vacuum after them go through the writer thread: an unused
    /// version's component is deleted there, and the pages it held go back to the file system.
    #[tokio::test]
    async fn deleted_versions_give_their_pages_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let info = CheckInfo {
            name: "demo".into(),
            version: "2".into(),
            description: String::new(),
            steps: vec![],
            params_schema: None,
        };
        let name = crate::model::PluginName::parse("demo").expect("valid name");
        let big = vec![7u8; 4 << 20];
        store
            .save_plugin_version(
                &name,
                &PluginVersion::of_bytes(b"unused"),
                &big,
                &info,
                1,
                crate::model::Actor {
                    name: "test",
                    reviews: true,
                },
            )
            .await
            .expect("saving");
        let pages = async || {
            store
                .free_pages()
                .await
                .expect("free pages")
                .expect("SQLite")
        };
        let (_, before) = pages().await;

        let pruned = store
            .delete_unused_plugin_versions(2, 10)
            .await
            .expect("deleting");
        assert_eq!(pruned.rows, 2, "the version and its component");
        let (free, _) = pages().await;
        assert!(free >= 1000, "4 MiB of pages free: {free}");
        for _ in 0..free.div_ceil(u64::from(super::VACUUM_PAGES)) {
            store.vacuum_step().await.expect("vacuuming");
        }
        let (left, after) = pages().await;
        assert_eq!(left, 0, "every free page given back");
        assert!(
            after <= before - 1000,
            "the file shrank: {before} to {after} pages"
        );
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM plugin_versions")
            .fetch_one(&store.pool)
            .await
            .expect("counting");
        assert_eq!(left, 1, "the active version stays");
    }
}
