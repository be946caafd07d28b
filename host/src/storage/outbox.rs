//! Notifications (README, "Alerts"): the outbox rows that the transaction finishing a run writes, and
//! their deliveries, claimed by any node with the same leases as runs. A row names its
//! notifier; the URL stays in the operator's config.

use std::sync::Arc;

use sqlx::FromRow;

use super::leases::Claimable;
use super::statement::{Tx, Value};
use super::{Error, Result, Store, TickWrite};
use crate::model::{DeliveryStatus, Notifier, NotifyEvent, RunId, Streak, UnixMillis};

/// The notifiers that watch a run, handed to the write that may end it: which events they are
/// sent depends on the run's series' streak, which only that transaction may read and update.
#[derive(Debug, Clone)]
pub struct NotifyWrite {
    /// `model::notify_series` of the run.
    pub series: String,
    pub notifiers: Vec<Arc<Notifier>>,
}

/// A delivery this node may attempt until `lease_token` is superseded.
#[derive(Debug, Clone)]
pub struct ClaimedNotification {
    pub id: String,
    pub run_id: RunId,
    pub notifier: String,
    pub event: NotifyEvent,
    /// Attempts made before this one.
    pub attempts: u32,
    pub created_at: UnixMillis,
    pub lease_token: i64,
}

/// One POST of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    pub attempt: u32,
    pub node: String,
    pub started_at: UnixMillis,
    pub duration_ms: i64,
    /// `None` when no answer came (refused, timed out).
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    Delivered,
    RetryAt(UnixMillis),
    /// `max_delivery_ms` ran out, or the notifier is gone from the config.
    GiveUp,
}

/// A notification as `GET /v1/runs/{id}/notifications` shows it.
#[derive(Debug, Clone)]
pub struct NotificationRecord {
    pub id: String,
    pub notifier: String,
    pub event: NotifyEvent,
    pub status: DeliveryStatus,
    pub created_at: UnixMillis,
    pub next_attempt_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub attempts: Vec<DeliveryAttempt>,
}

/// Moves a series' streak (`$1` series, `$2` 1 for a failure, `$3` now), returning the
/// failures in a row before and after. The upsert locks the streak row, so runs of one series
/// finishing at once on several nodes count one after the other.
const MOVE_STREAK: &str = "INSERT INTO notify_streaks (series, failures, previous_failures, updated_at) \
     VALUES ($1, $2, 0, $3) ON CONFLICT (series) DO UPDATE SET previous_failures = notify_streaks.failures, \
     failures = CASE WHEN $2 = 0 THEN 0 ELSE notify_streaks.failures + 1 END, updated_at = $3 \
     RETURNING previous_failures, failures";
pub(super) const INSERT_NOTIFICATION: &str = "INSERT INTO notifications (id, run_id, notifier, event, status, \
     created_at, next_attempt_at) VALUES ($1, $2, $3, $4, 'pending', $5, $5)";

/// Whether a write's notifiers need the streak moved: it ends the run with a verdict.
fn moves_streak(write: &TickWrite, notify: &NotifyWrite) -> bool {
    let status = write.run.status;
    !notify.notifiers.is_empty()
        && (status.is_failure() || status == crate::model::RunStatus::Passed)
}

/// The outbox rows `(notifier, event)` that a run ending with `write` makes, given the streak
/// `MOVE_STREAK` returned.
fn outbox_rows<'a>(
    write: &TickWrite,
    notify: &'a NotifyWrite,
    (before, now): (i64, i64),
) -> impl Iterator<Item = (&'a str, NotifyEvent)> {
    let status = write.run.status;
    let streak = Streak {
        before: before as u32,
        now: now as u32,
    };
    notify.notifiers.iter().filter_map(move |notifier| {
        notifier
            .event(status, streak)
            .map(|event| (notifier.name.as_str(), event))
    })
}

/// Inside the transaction that ends a run: moves its series' streak and writes one outbox row
/// per notifier whose rules make this an event.
pub(super) async fn enqueue_notifications(
    tx: &mut impl Tx,
    write: &TickWrite,
    notify: &NotifyWrite,
) -> Result<()> {
    if !moves_streak(write, notify) {
        return Ok(());
    }
    let streak = [
        Value::from(notify.series.as_str()),
        Value::from(i64::from(write.run.status.is_failure())),
        Value::from(write.now),
    ];
    let streak = tx.query_pair(MOVE_STREAK, &streak).await?;
    for (notifier, event) in outbox_rows(write, notify, streak) {
        let row = [
            Value::from(uuid::Uuid::now_v7().to_string()),
            Value::from(write.run_id.as_str()),
            Value::from(notifier),
            Value::from(event.as_str()),
            Value::from(write.now),
        ];
        tx.execute(INSERT_NOTIFICATION, &row).await?;
    }
    Ok(())
}

#[derive(FromRow)]
struct NotificationRow {
    id: String,
    notifier: String,
    event: String,
    status: String,
    created_at: i64,
    next_attempt_at: Option<i64>,
    finished_at: Option<i64>,
}

#[derive(FromRow)]
struct AttemptRow {
    notification_id: String,
    attempt: i64,
    node: String,
    started_at: i64,
    duration_ms: i64,
    status_code: Option<i64>,
    error: Option<String>,
}

impl AttemptRow {
    fn into_attempt(self) -> DeliveryAttempt {
        DeliveryAttempt {
            attempt: self.attempt as u32,
            node: self.node,
            started_at: self.started_at,
            duration_ms: self.duration_ms,
            status_code: self.status_code.map(|code| code as u16),
            error: self.error,
        }
    }
}

fn event_of(text: &str) -> Result<NotifyEvent> {
    NotifyEvent::parse(text).ok_or_else(|| Error::Corrupt(format!("notification event {text:?}")))
}

impl Store {
    /// Claims up to `limit` deliveries due by `now` whose lease is free or expired, for
    /// `lease_ms` by the database's clock.
    pub async fn claim_due_notifications(
        &self,
        owner: &str,
        now: UnixMillis,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedNotification>> {
        const DUE: Claimable = Claimable {
            table: "notifications",
            due: "next_attempt_at",
            filter: "",
            returning: "id, run_id, notifier, event, attempts, created_at, lease_token",
        };
        let rows: Vec<(String, String, String, String, i64, i64, i64)> = self
            .claim(&DUE, (owner, now, lease_ms, limit), None)
            .await?;
        rows.into_iter()
            .map(
                |(id, run_id, notifier, event, attempts, created_at, lease_token)| {
                    Ok(ClaimedNotification {
                        event: event_of(&event)?,
                        id,
                        run_id: RunId::from_stored(run_id),
                        notifier,
                        attempts: attempts as u32,
                        created_at,
                        lease_token,
                    })
                },
            )
            .collect()
    }

    /// Extends the lease on a delivery while its POST is in flight; false if it was lost.
    pub async fn renew_notification_lease(
        &self,
        id: &str,
        lease_token: i64,
        lease_ms: i64,
    ) -> Result<bool> {
        self.renew_row_lease("notifications", id, lease_token, lease_ms)
            .await
    }

    /// Records an attempt and what comes next, and releases the lease: only while
    /// `lease_token` holds (`Error::LeaseLost` otherwise, with nothing written).
    pub async fn record_delivery_attempt(
        &self,
        claim: &ClaimedNotification,
        attempt: &DeliveryAttempt,
        next: DeliveryNext,
    ) -> Result<()> {
        let (status, next_attempt_at, finished_at) = match next {
            DeliveryNext::Delivered => (DeliveryStatus::Delivered, None, Some(attempt.started_at)),
            DeliveryNext::RetryAt(at) => (DeliveryStatus::Pending, Some(at), None),
            DeliveryNext::GiveUp => (DeliveryStatus::Failed, None, Some(attempt.started_at)),
        };
        let finished_at = finished_at.map(|at| at + attempt.duration_ms);
        let mut transaction = self.writes.begin().await?;
        let updated = sqlx::query(
            "UPDATE notifications SET status = $1, attempts = $2, next_attempt_at = $3, finished_at = $4, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $5 AND lease_token = $6 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(i64::from(attempt.attempt))
        .bind(next_attempt_at)
        .bind(finished_at)
        .bind(&claim.id)
        .bind(claim.lease_token)
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(Error::LeaseLost(claim.run_id.clone()));
        }
        sqlx::query(
            "INSERT INTO notification_attempts (notification_id, attempt, node, started_at, duration_ms, status_code, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&claim.id)
        .bind(i64::from(attempt.attempt))
        .bind(&attempt.node)
        .bind(attempt.started_at)
        .bind(attempt.duration_ms)
        .bind(attempt.status_code.map(i64::from))
        .bind(attempt.error.as_deref())
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The earliest delivery attempt due after `now`.
    pub async fn next_notification_due_after(&self, now: UnixMillis) -> Result<Option<UnixMillis>> {
        let next: Option<(i64,)> = sqlx::query_as(
            "SELECT next_attempt_at FROM notifications WHERE next_attempt_at IS NOT NULL \
             AND next_attempt_at > $1 ORDER BY next_attempt_at LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(next.map(|(at,)| at))
    }

    /// A run's notifications with every attempt, oldest first.
    pub async fn list_notifications(&self, run_id: &RunId) -> Result<Vec<NotificationRecord>> {
        let rows: Vec<NotificationRow> = sqlx::query_as(
            "SELECT id, notifier, event, status, created_at, next_attempt_at, finished_at \
             FROM notifications WHERE run_id = $1 ORDER BY id",
        )
        .bind(run_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        let attempts: Vec<AttemptRow> = sqlx::query_as(
            "SELECT a.notification_id, a.attempt, a.node, a.started_at, a.duration_ms, a.status_code, a.error \
             FROM notification_attempts a JOIN notifications n ON n.id = a.notification_id \
             WHERE n.run_id = $1 ORDER BY a.notification_id, a.attempt",
        )
        .bind(run_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut attempts = attempts.into_iter().peekable();
        rows.into_iter()
            .map(|row| {
                let mut mine = Vec::new();
                while let Some(attempt) = attempts.next_if(|a| a.notification_id == row.id) {
                    mine.push(attempt.into_attempt());
                }
                Ok(NotificationRecord {
                    event: event_of(&row.event)?,
                    status: DeliveryStatus::parse(&row.status).ok_or_else(|| {
                        Error::Corrupt(format!("notification status {:?}", row.status))
                    })?,
                    id: row.id,
                    notifier: row.notifier,
                    created_at: row.created_at,
                    next_attempt_at: row.next_attempt_at,
                    finished_at: row.finished_at,
                    attempts: mine,
                })
            })
            .collect()
    }
}
