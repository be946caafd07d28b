//! The `Store`: opening it, the one way into a write ([`Writes::begin`]), and the probes and
//! counts that read across aggregates.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyConnection, AnyPool};

use super::backend::{Backend, Changes};
use super::group_commit::GroupCommit;
use super::runs::write_runs;
use super::sqlite_reader::SqliteReaders;
use super::sqlite_writer::SqliteWriter;
use super::statement::{SqlxTx, Tx, Value};
use super::{Error, NewRun, Result};
use crate::model::UnixMillis;

/// The database of one Stepwise deployment, shared by all its nodes.
#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
    url: String,
    pub(super) hot: HotPath,
    pub(super) writes: Writes,
    pub(super) events: Arc<super::events::EventSignals>,
}

/// The one way into a write through sqlx: [`Writes::begin`], which on SQLite waits for this
/// process's turn first.
#[derive(Clone)]
pub(super) struct Writes {
    pool: AnyPool,
    /// SQLite has one writer at a time. Writers in this process (the writer thread among
    /// them) take turns here, in order and woken at once, instead of meeting on SQLite's lock,
    /// whose busy handler polls with sleeps that grow to tens of milliseconds (tick lag).
    /// `None` on PostgreSQL, where writers run in parallel.
    turn: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Writes {
    /// A transaction to write in, once it is this process's turn.
    pub(super) async fn begin(&self) -> Result<Write> {
        let (pool, turn) = self.single().await;
        Ok(Write {
            transaction: pool.begin().await?,
            _turn: turn,
        })
    }
}

impl Writes {
    /// For a write of one statement, which needs no transaction: the pool to run it on, and
    /// the turn to hold until it is done.
    pub(super) async fn single(&self) -> (&AnyPool, Option<tokio::sync::OwnedMutexGuard<()>>) {
        let turn = match &self.turn {
            Some(turn) => Some(turn.clone().lock_owned().await),
            None => None,
        };
        (&self.pool, turn)
    }
}

/// Statements that run together, in one transaction: SQL with `$n` placeholders, and its
/// values, owned, to be sent to SQLite's writer thread.
pub(super) type SqlBatch = Vec<(String, Vec<Value<'static>>)>;

/// A write's transaction, holding the turn until it ends (the transaction is dropped first:
/// fields drop in order).
pub(super) struct Write {
    transaction: sqlx::Transaction<'static, Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Write {
    pub(super) async fn commit(self) -> Result<()> {
        self.transaction.commit().await?;
        Ok(())
    }
}

impl std::ops::Deref for Write {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.transaction
    }
}

impl std::ops::DerefMut for Write {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.transaction
    }
}

/// Who writes new runs and tick results.
#[derive(Clone)]
pub(super) enum HotPath {
    /// The writer thread, which claims and renews leases too, and the point reads made on the
    /// caller's thread.
    Sqlite {
        writer: Arc<SqliteWriter>,
        readers: Arc<SqliteReaders>,
    },
    /// New runs without an idempotency key by group commit; the rest through the pool.
    Postgres(Arc<GroupCommit<NewRun, ()>>),
}

impl Store {
    /// Opens the database at `url` (`sqlite://…`, created if needed, or `postgres://…`) and
    /// applies pending migrations.
    pub async fn open(url: &str) -> Result<Store> {
        let backend = Backend::of_url(url).ok_or_else(|| Error::UnsupportedUrl(url.to_owned()))?;
        let pool = backend.connect(url).await?;
        let (hot, turn) = match backend {
            Backend::Sqlite => {
                let turn = Arc::new(tokio::sync::Mutex::new(()));
                let path = SqliteConnectOptions::from_str(url)?
                    .get_filename()
                    .to_owned();
                let hot = HotPath::Sqlite {
                    writer: Arc::new(SqliteWriter::start(&path, turn.clone())?),
                    readers: Arc::new(SqliteReaders::new(path)),
                };
                (hot, Some(turn))
            }
            Backend::Postgres => {
                let writes = Writes {
                    pool: pool.clone(),
                    turn: None,
                };
                let runs = GroupCommit::start(move |runs| {
                    let writes = writes.clone();
                    async move { write_runs(&writes, backend, runs).await }
                });
                (HotPath::Postgres(Arc::new(runs)), None)
            }
        };
        let store = Store {
            writes: Writes {
                pool: pool.clone(),
                turn,
            },
            pool,
            backend,
            url: url.to_owned(),
            hot,
            events: Arc::default(),
        };
        store.start_numbering();
        Ok(store)
    }

    /// SQLite's writer thread, which does the hot path's writes there.
    pub(super) fn sqlite_writer(&self) -> Option<&SqliteWriter> {
        match &self.hot {
            HotPath::Sqlite { writer, .. } => Some(writer),
            HotPath::Postgres(_) => None,
        }
    }

    /// SQLite's point readers, on the caller's thread.
    pub(super) fn sqlite_readers(&self) -> Option<&SqliteReaders> {
        match &self.hot {
            HotPath::Sqlite { readers, .. } => Some(readers),
            HotPath::Postgres(_) => None,
        }
    }

    /// Changes other nodes make, for a database that several nodes share; `None` for SQLite.
    pub async fn listen(&self) -> Result<Option<Changes>> {
        match self.backend {
            Backend::Sqlite => Ok(None),
            Backend::Postgres => Ok(Some(Changes::listen(&self.url).await?)),
        }
    }

    /// What `/metrics` reads from the database at each scrape: runs by plugin and status
    /// (the runs that decide: shadow runs would set off alerts on failures they cannot cause),
    /// each schedule's last passed run, and the leases `node` holds now.
    pub async fn metrics_counts(&self, node: &str) -> Result<crate::metrics::Stored> {
        let runs: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT plugin_name, status, count(*) FROM runs WHERE shadow_of IS NULL \
             GROUP BY plugin_name, status ORDER BY plugin_name, status",
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
            taps: Vec::new(),
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
}

pub(super) fn corrupt(what: &str, value: &str) -> Error {
    Error::Corrupt(format!("{what} {value:?}"))
}

pub(super) fn labels_json(labels: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(labels).map_err(|error| Error::Corrupt(error.to_string()))
}

impl Store {
    /// Runs `batch`'s statements in one transaction and returns the rows each changed. On
    /// SQLite the writer thread does it between (or with) the ticks it writes, so that no
    /// tick waits for a transaction that goes back and forth between threads; elsewhere a
    /// transaction of its own.
    pub(super) async fn run_together(&self, batch: SqlBatch) -> Result<Vec<u64>> {
        if let Some(writer) = self.sqlite_writer() {
            return writer.run_batch(batch).await;
        }
        let mut write = self.writes.begin().await?;
        let mut tx = SqlxTx(&mut write);
        let mut changed = Vec::with_capacity(batch.len());
        for (sql, values) in &batch {
            changed.push(tx.execute(sql, values).await?);
        }
        write.commit().await?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    /// Every write takes the one way in, [`super::Writes`]: no other file of `storage` begins
    /// a transaction on the pool or sends an `INSERT`, `UPDATE` or `DELETE` to it directly.
    #[test]
    fn every_write_goes_through_writes() {
        let sources = [
            ("access.rs", include_str!("access.rs")),
            ("events.rs", include_str!("events.rs")),
            ("leases.rs", include_str!("leases.rs")),
            ("outbox.rs", include_str!("outbox.rs")),
            ("plugins.rs", include_str!("plugins.rs")),
            ("retention.rs", include_str!("retention.rs")),
            ("rollups.rs", include_str!("rollups.rs")),
            ("runs.rs", include_str!("runs.rs")),
            ("schedules.rs", include_str!("schedules.rs")),
            ("mod.rs", include_str!("mod.rs")),
        ];
        for (file, source) in sources {
            assert!(
                !source.contains("pool.begin()"),
                "{file} begins a transaction without Writes"
            );
            for query in source.split("sqlx::query").skip(1) {
                let query = &query[..query.find(".await").unwrap_or(query.len())];
                let writes = ["INSERT ", "UPDATE ", "DELETE "]
                    .iter()
                    .any(|verb| query.contains(verb));
                assert!(
                    !(writes && query.contains("self.pool")),
                    "{file} writes on the pool without Writes: {query}"
                );
            }
        }
    }
}
