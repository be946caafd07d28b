//! Leases: the claim and the renewal that runs, schedules, notifications and jobs share.
//!
//! A claim sets `lease_owner` (a run shows it as its `node`), `lease_expires_at` (the
//! database's now plus `lease_ms`) and bumps `lease_token`. The runner renews a run's lease
//! every `lease_ms / 3` while a call runs and releases it when the tick ends. Every result
//! write is conditional on the token (a step's, also on the step being unfinished), so a node
//! that lost its lease (killed, paused, partitioned) writes nothing after the takeover, and a
//! step's result is written exactly once, though its call may be made twice. Cancelling bumps
//! the token too.

use super::backend::Backend;
use super::{Result, Store};
use crate::model::{RunId, UnixMillis};

/// What a claim leases: rows of `table` whose `due` column is set and due, passing `filter`
/// (SQL after `AND`, which may use `$5`), answering with the `returning` columns.
pub(super) struct Claimable {
    pub table: &'static str,
    pub due: &'static str,
    pub filter: &'static str,
    pub returning: &'static str,
}

/// The lease claim that runs, schedules, notifications and jobs share: rows of `claimable` due
/// by `$3`, whose lease is free or expired by the database's clock, earliest first, at most
/// `$4`, leased to `$1` for `$2` ms by that clock with a new fencing token.
pub(super) fn claim_sql(backend: Backend, claimable: &Claimable) -> String {
    let Claimable {
        table,
        due,
        filter,
        returning,
    } = claimable;
    let db_now = backend.now_sql();
    let skip_locked = backend.skip_locked();
    format!(
        "UPDATE {table} SET lease_owner = $1, lease_expires_at = {db_now} + $2, lease_token = lease_token + 1 \
         WHERE id IN (SELECT id FROM {table} WHERE {due} IS NOT NULL AND {due} <= $3{filter} \
                      AND (lease_expires_at IS NULL OR lease_expires_at <= {db_now}) \
                      ORDER BY {due} LIMIT $4{skip_locked}) \
         RETURNING {returning}"
    )
}

/// The lease renewal that runs, notifications and jobs share: `$1` ms from now by the
/// database's clock for the row `$2` of `table`, only while the token `$3` holds.
pub(super) fn renew_sql(backend: Backend, table: &str) -> String {
    format!(
        "UPDATE {table} SET lease_expires_at = {} + $1 WHERE id = $2 AND lease_token = $3 \
         AND lease_owner IS NOT NULL",
        backend.now_sql()
    )
}

impl Store {
    /// Leases to `owner`, for `lease_ms` by the database's clock, up to `limit` rows of
    /// `claimable` due by `now`; `filter_value` is the filter's `$5`.
    pub(super) async fn claim<R>(
        &self,
        claimable: &Claimable,
        (owner, now, lease_ms, limit): (&str, UnixMillis, i64, usize),
        filter_value: Option<&str>,
    ) -> Result<Vec<R>>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
    {
        let sql = claim_sql(self.backend, claimable);
        let mut query = sqlx::query_as(&sql)
            .bind(owner)
            .bind(lease_ms)
            .bind(now)
            .bind(limit as i64);
        if let Some(value) = filter_value {
            query = query.bind(value);
        }
        let (pool, _turn) = self.writes.single().await;
        Ok(query.fetch_all(pool).await?)
    }

    /// Extends a lease held with `lease_token` to `lease_ms` from now by the database's clock.
    /// Returns false when the lease was lost (taken over, or the run cancelled).
    pub async fn renew_lease(&self, id: &RunId, lease_token: i64, lease_ms: i64) -> Result<bool> {
        if let Some(writer) = self.sqlite_writer() {
            return writer.renew(id.clone(), lease_token, lease_ms).await;
        }
        self.renew_row_lease("runs", id.as_str(), lease_token, lease_ms)
            .await
    }

    /// See [`renew_sql`].
    pub(super) async fn renew_row_lease(
        &self,
        table: &str,
        id: &str,
        lease_token: i64,
        lease_ms: i64,
    ) -> Result<bool> {
        let sql = renew_sql(self.backend, table);
        let (pool, _turn) = self.writes.single().await;
        let renewed = sqlx::query(&sql)
            .bind(lease_ms)
            .bind(id)
            .bind(lease_token)
            .execute(pool)
            .await?;
        Ok(renewed.rows_affected() == 1)
    }
}
