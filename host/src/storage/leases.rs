//! Leases: the claim and the renewal that runs, schedules, notifications and jobs share.

use super::backend::Backend;
use super::store::take_turn;
use super::{Result, Store};
use crate::model::RunId;

/// The lease claim that runs and schedules share: rows of `table` due by `$3` (in the `due`
/// column) and passing `filter`, whose lease is free or expired by the database's clock,
/// earliest first, at most `$4`, leased to `$1` for `$2` ms by that clock with a new fencing
/// token.
pub(super) fn claim_sql(
    backend: Backend,
    table: &str,
    due: &str,
    filter: &str,
    returning: &str,
) -> String {
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
    pub(super) fn claim_sql(
        &self,
        table: &str,
        due: &str,
        filter: &str,
        returning: &str,
    ) -> String {
        claim_sql(self.backend, table, due, filter, returning)
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
        let _turn = take_turn(&self.writer).await;
        let renewed = sqlx::query(&sql)
            .bind(lease_ms)
            .bind(id)
            .bind(lease_token)
            .execute(&self.pool)
            .await?;
        Ok(renewed.rows_affected() == 1)
    }
}
