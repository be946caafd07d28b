//! The `Store`: opening it, its writers, the probes and counts that read across aggregates,
//! and the statement builders the aggregates share.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::any::AnyArguments;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyConnection, AnyPool, Arguments, Encode, Type};

use super::backend::{Backend, Changes};
use super::group_commit::GroupCommit;
use super::runs::write_runs;
use super::sqlite_reader::SqliteReaders;
use super::sqlite_writer::SqliteWriter;
use super::{Error, NewRun, Result};
use crate::model::UnixMillis;

/// The database of one Stepwise deployment, shared by all its nodes.
#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
    url: String,
    pub(super) hot: HotPath,
    /// SQLite has one writer at a time. Writers in this process take turns here, in order and
    /// woken at once, instead of meeting on SQLite's lock, whose busy handler polls with
    /// sleeps that grow to tens of milliseconds (tick lag). `None` on PostgreSQL, where
    /// writers run in parallel.
    pub(super) writer: Option<Arc<tokio::sync::Mutex<()>>>,
    pub(super) events: Arc<super::events::EventSignals>,
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
        let (hot, writer) = match backend {
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
                let pool = pool.clone();
                let runs = GroupCommit::start(move |runs| {
                    let pool = pool.clone();
                    async move { write_runs(&pool, backend, runs).await }
                });
                (HotPath::Postgres(Arc::new(runs)), None)
            }
        };
        let store = Store {
            pool,
            backend,
            url: url.to_owned(),
            hot,
            writer,
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
}

pub(super) fn corrupt(what: &str, value: &str) -> Error {
    Error::Corrupt(format!("{what} {value:?}"))
}

pub(super) fn labels_json(labels: &BTreeMap<String, String>) -> Result<String> {
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

/// Most bind parameters in one statement (SQLite allows 32,766, PostgreSQL 65,535).
pub(super) const MAX_BINDS: usize = 30_000;

/// A multi-row `INSERT … VALUES (…), (…)`, sent in as few statements as the bind limit allows.
pub(super) struct Inserts<'q> {
    head: &'static str,
    statement: Statement<'q>,
    rows: usize,
}

impl<'q> Inserts<'q> {
    pub(super) fn new(head: &'static str) -> Inserts<'q> {
        Inserts {
            head,
            statement: Statement::new(head.to_owned()),
            rows: 0,
        }
    }

    /// Starts a row; bind its values, then call `end_row`.
    pub(super) fn row(&mut self) -> Values<'_, 'q> {
        self.statement
            .push(if self.rows == 0 { "(" } else { ", (" });
        self.rows += 1;
        Values {
            statement: &mut self.statement,
            first: true,
        }
    }

    pub(super) async fn end_row(&mut self, connection: &mut AnyConnection) -> Result<()> {
        self.statement.push(")");
        if self.statement.arguments.len() >= MAX_BINDS {
            self.flush(connection).await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self, connection: &mut AnyConnection) -> Result<()> {
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
pub(super) struct Values<'s, 'q> {
    statement: &'s mut Statement<'q>,
    first: bool,
}

impl<'q> Values<'_, 'q> {
    pub(super) fn value<T: Encode<'q, Any> + Type<Any> + 'q>(
        &mut self,
        value: T,
    ) -> Result<&mut Self> {
        if !self.first {
            self.statement.push(", ");
        }
        self.first = false;
        self.statement.bind(value)?;
        Ok(self)
    }
}

/// A statement assembled at run time, with `$n` placeholders (which both backends read).
pub(super) struct Statement<'q> {
    pub(super) sql: String,
    pub(super) arguments: AnyArguments<'q>,
}

impl<'q> Statement<'q> {
    pub(super) fn new(sql: String) -> Statement<'q> {
        Statement {
            sql,
            arguments: AnyArguments::default(),
        }
    }

    pub(super) fn push(&mut self, sql: &str) -> &mut Statement<'q> {
        self.sql.push_str(sql);
        self
    }

    pub(super) fn bind<T: Encode<'q, Any> + Type<Any> + 'q>(
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
