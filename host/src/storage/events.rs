//! The change log behind live events (README, "Live events"): every write that changes a run adds a row
//! in its own transaction; event ids are the order in which rows became visible, so a reader
//! that resumes after an id never misses one. On SQLite commits are serialised and the row id
//! is that order. On PostgreSQL concurrent commits are not, so a numbering task on each node
//! gives visible rows their `seq` one transaction at a time (an advisory lock), and tells every
//! node that new events are visible.

use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use tokio::sync::Notify;

use super::backend::Backend;
use super::{Change, Result, Store};
use crate::model::{RunId, UnixMillis};

/// One change to a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The event id: increasing in the order changes became visible.
    pub seq: i64,
    pub run_id: RunId,
    /// The step a tick wrote; `None` for a new or cancelled run.
    pub position: Option<usize>,
}

/// Wake-ups around the change log, shared by clones of a `Store`.
#[derive(Debug, Default)]
pub(super) struct EventSignals {
    /// Rows were committed (PostgreSQL: still to be numbered).
    written: Notify,
    /// Numbered rows may be there to read.
    visible: Notify,
}

/// Most rows one numbering transaction takes.
const NUMBERING_BATCH: i64 = 5000;

/// The advisory lock that makes numbering one transaction at a time across all nodes.
const NUMBERING_LOCK: i64 = 0x5354_4550_5749_5345; // "STEPWISE"

pub(super) const INSERT_EVENT: &str =
    "INSERT INTO events (run_id, position, at) VALUES ($1, $2, $3)";

/// Adds one change of `run_id` inside the caller's transaction.
pub(super) async fn record_event(
    connection: &mut AnyConnection,
    run_id: &RunId,
    position: Option<usize>,
    at: UnixMillis,
) -> Result<()> {
    sqlx::query(INSERT_EVENT)
        .bind(run_id.as_str())
        .bind(position.map(|position| position as i64))
        .bind(at)
        .execute(connection)
        .await?;
    Ok(())
}

impl Store {
    /// Call after committing rows of the change log.
    pub(super) fn events_written(&self) {
        match self.backend {
            Backend::Sqlite => self.events.visible.notify_one(),
            Backend::Postgres => self.events.written.notify_one(),
        }
    }

    /// Notified when new events may be visible (this node's writes, or another node's on
    /// PostgreSQL once `follow_changes` passes `Change::EventsVisible` on through
    /// [`Store::events_visible_elsewhere`]). One waiter: the node's event hub.
    pub fn event_signal(&self) -> &Notify {
        &self.events.visible
    }

    /// Another node numbered events.
    pub fn events_visible_elsewhere(&self) {
        self.events.visible.notify_one();
    }

    /// The column that orders events for readers.
    fn event_order(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "id",
            Backend::Postgres => "seq",
        }
    }

    /// Up to `limit` events after id `after`, in order. On SQLite a point read on the
    /// caller's thread: the event hub makes one after every commit.
    pub async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        let rows: Vec<(i64, String, Option<i64>)> = match self.sqlite_readers() {
            Some(readers) => readers.select(
                "SELECT id, run_id, position FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
                rusqlite::params![after, limit as i64],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )?,
            None => {
                let order = self.event_order();
                sqlx::query_as(&format!(
                    "SELECT {order}, run_id, position FROM events WHERE {order} > $1 ORDER BY {order} LIMIT $2"
                ))
                .bind(after)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(seq, run_id, position)| EventRecord {
                seq,
                run_id: RunId::from_stored(run_id),
                position: position.map(|position| position as usize),
            })
            .collect())
    }

    /// The id of `run_id`'s newest change after `after` and up to `until`, if it has one: a
    /// lookup in the index of each run's changes, however long the log is.
    pub async fn newest_change_of_run(
        &self,
        run_id: &RunId,
        after: i64,
        until: i64,
    ) -> Result<Option<i64>> {
        let order = self.event_order();
        let sql = format!(
            "SELECT MAX({order}) FROM events WHERE run_id = $1 AND {order} > $2 AND {order} <= $3"
        );
        if let Some(readers) = self.sqlite_readers() {
            let newest = readers.select(
                &sql,
                rusqlite::params![run_id.as_str(), after, until],
                |row| row.get(0),
            )?;
            return Ok(newest.into_iter().next().flatten());
        }
        let (newest,): (Option<i64>,) = sqlx::query_as(&sql)
            .bind(run_id.as_str())
            .bind(after)
            .bind(until)
            .fetch_one(&self.pool)
            .await?;
        Ok(newest)
    }

    /// The oldest and newest event ids kept (retention deletes old ones; never the newest).
    pub async fn event_bounds(&self) -> Result<(Option<i64>, Option<i64>)> {
        let order = self.event_order();
        let bounds: (Option<i64>, Option<i64>) =
            sqlx::query_as(&format!("SELECT MIN({order}), MAX({order}) FROM events"))
                .fetch_one(&self.pool)
                .await?;
        Ok(bounds)
    }

    /// The newest event's place in the order, if any: one indexed read, on SQLite on the
    /// caller's thread like `events_after`.
    pub async fn newest_event(&self) -> Result<Option<i64>> {
        if let Some(readers) = self.sqlite_readers() {
            let newest = readers.select("SELECT MAX(id) FROM events", [], |row| row.get(0))?;
            return Ok(newest.into_iter().next().flatten());
        }
        Ok(self.event_bounds().await?.1)
    }

    /// PostgreSQL: numbers the rows that are visible and not numbered yet, after the highest
    /// number so far, one transaction at a time across all nodes; tells every node when it
    /// numbered any. Returns how many.
    pub async fn number_events(&self) -> Result<u64> {
        if self.backend != Backend::Postgres {
            return Ok(0);
        }
        let mut transaction = self.writes.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(NUMBERING_LOCK)
            .execute(&mut *transaction)
            .await?;
        let numbered = sqlx::query(
            "WITH top AS (SELECT COALESCE(MAX(seq), 0) AS seq FROM events), \
             fresh AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM \
                       (SELECT id FROM events WHERE seq IS NULL ORDER BY id LIMIT $1) waiting) \
             UPDATE events SET seq = top.seq + fresh.n FROM top, fresh WHERE events.id = fresh.id",
        )
        .bind(NUMBERING_BATCH)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if numbered > 0 {
            self.backend
                .notify(&mut *transaction, &Change::EventsVisible)
                .await?;
        }
        transaction.commit().await?;
        if numbered > 0 {
            self.events.visible.notify_one();
        }
        Ok(numbered)
    }

    /// PostgreSQL: numbers events whenever this node wrote some, and every second in case a
    /// node died between its commit and its numbering. Runs until the store is dropped by
    /// every clone but this task's.
    pub(super) fn start_numbering(&self) {
        if self.backend != Backend::Postgres {
            return;
        }
        let store = self.clone();
        let signals: Arc<EventSignals> = self.events.clone();
        tokio::spawn(async move {
            loop {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), signals.written.notified()).await;
                if Arc::strong_count(&signals) <= 2 {
                    // Only this task (its store clone and `signals`) is left.
                    return;
                }
                loop {
                    match store.number_events().await {
                        Ok(numbered) if numbered as i64 == NUMBERING_BATCH => continue,
                        Ok(_) => break,
                        Err(error) => {
                            tracing::warn!(%error, "numbering events failed; retrying");
                            break;
                        }
                    }
                }
            }
        });
    }
}
