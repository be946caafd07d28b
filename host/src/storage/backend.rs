//! Where SQLite and PostgreSQL differ. Everything else in `storage` is one SQL text for both
//! (sqlx's `Any` driver, `$n` placeholders, BIGINT millisecond times): connecting, migrations,
//! the database clock that judges leases, row locks on claims, and the change notifications
//! that wake other nodes. With SQLite's writer thread and point readers (`sqlite_writer.rs`,
//! `sqlite_reader.rs`) and the two migration directories, that is all:
//!
//! | | SQLite (default, one node) | PostgreSQL (several nodes) |
//! |---|---|---|
//! | connecting | file created if missing; WAL, `synchronous = FULL`, foreign keys | a pool of 16 |
//! | the clock that judges leases | `unixepoch('subsec')`: one machine anyway | the server's `clock_timestamp()`: nodes with skewed clocks agree on whose lease expired |
//! | claims | one writer at a time; nothing to lock | `FOR UPDATE SKIP LOCKED`: concurrent claimers take disjoint rows |
//! | hot path (new runs, claims, renewals, tick results) | the writer thread: everything queued in one transaction | sqlx, a transaction per tick; new runs by group commit |
//! | other writes | take turns with the writer thread on an in-process lock, never on SQLite's busy handler | in parallel |
//! | change notifications | none (the API wakes its own scheduler) | `pg_notify` in the writing transaction; every node `LISTEN`s |
//! | event ids | the change log's row id: commits take turns | `events.seq`, numbered after commit, one transaction at a time |
//!
//! Shared by all nodes: the database. Per node: the data dir (`node-id`, compiled artifacts,
//! the watched `plugins/`), the compiled-version cache, and `[sources]` (give every node the
//! same).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::PgListener;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor};

use super::{Change, Result};
use crate::model::{PluginVersion, RunId};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel every node of a PostgreSQL deployment listens on.
const CHANNEL: &str = "stepwise";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded, one node: WAL, `synchronous = FULL` (a `202` means the run is on disk).
    Sqlite,
    /// Several nodes on one database.
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    /// Opens a pool on `url` and applies pending migrations.
    pub(super) async fn connect(self, url: &str) -> Result<AnyPool> {
        sqlx::any::install_default_drivers();
        let pool = match self {
            Backend::Sqlite => {
                // Parsed here only to create the file: the `Any` driver opens it from the URL.
                let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
                let mut first = sqlx::SqliteConnection::connect_with(&options).await?;
                // Retention gives deleted pages back with `PRAGMA incremental_vacuum`, which
                // needs this mode; a file made before it needs one full VACUUM to switch.
                let (mode,): (i64,) = sqlx::query_as("PRAGMA auto_vacuum")
                    .fetch_one(&mut first)
                    .await?;
                if mode != 2 {
                    first.execute("PRAGMA auto_vacuum = INCREMENTAL").await?;
                    first.execute("VACUUM").await?;
                }
                drop(first);
                AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|connection, _| Box::pin(sqlite_pragmas(connection)))
                    .connect(url)
                    .await?
            }
            Backend::Postgres => {
                // One plain connection first: a refused or misconfigured server is reported
                // at once with its own error, where the pool would retry until its time-out
                // and report only that.
                let first = sqlx::PgConnection::connect(url);
                match tokio::time::timeout(Duration::from_secs(10), first).await {
                    Ok(connection) => drop(connection?),
                    Err(_) => return Err(sqlx::Error::PoolTimedOut.into()),
                }
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?
            }
        };
        match self {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(pool)
    }

    /// The database's clock in Unix milliseconds. Lease expiry is judged by it, never by a
    /// node's clock: nodes whose clocks disagree must still agree on whose lease has run out.
    pub(super) fn now_sql(self) -> &'static str {
        match self {
            Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Appended to the subquery that picks rows to claim. PostgreSQL: two nodes claiming at
    /// once each take different rows instead of waiting on, then re-checking, the same ones.
    /// SQLite has one writer at a time, so there is nothing to skip.
    pub(super) fn skip_locked(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Begins a transaction that reads rows and then writes. SQLite: `IMMEDIATE` takes the write
    /// lock first (waiting up to the busy timeout), because a deferred transaction that read
    /// while another connection committed cannot upgrade to a writer and fails at once with
    /// "database is locked". PostgreSQL locks the rows it reads with `for_update`.
    pub(super) fn begin_read_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// Appended to a read of a row that the same transaction then updates from what it read.
    /// PostgreSQL: a concurrent writer waits instead of being lost. SQLite holds the database's
    /// write lock already (`begin_read_write`).
    pub(super) fn for_update(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Tells the other nodes about `change`: when the transaction commits if `executor` is one
    /// (nothing if it rolls back), at once on the pool. SQLite has no other nodes.
    pub(super) async fn notify<'c>(
        self,
        executor: impl Executor<'c, Database = Any>,
        change: &Change,
    ) -> Result<()> {
        if self == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(change.to_payload())
                .execute(executor)
                .await?;
        }
        Ok(())
    }
}

async fn sqlite_pragmas(connection: &mut AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in [
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = FULL",
        "PRAGMA foreign_keys = ON",
        "PRAGMA busy_timeout = 10000",
    ] {
        connection.execute(pragma).await?;
    }
    Ok(())
}

/// Changes made by other nodes, from PostgreSQL's `LISTEN`.
pub struct Changes {
    listener: PgListener,
}

impl Changes {
    pub(super) async fn listen(url: &str) -> Result<Changes> {
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CHANNEL).await?;
        Ok(Changes { listener })
    }

    /// The next change. `None` when the connection dropped and notifications may have been
    /// missed: the listener reconnects, and the caller should look at everything again. A
    /// notification that is not one of ours is logged and skipped: anyone who may connect to
    /// the database may send one.
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            match self.listener.try_recv().await {
                Ok(Some(notification)) => {
                    if let Some(change) = Change::from_payload(notification.payload()) {
                        return Some(change);
                    }
                }
                Ok(None) => return None,
                Err(error) => {
                    tracing::warn!(%error, "listening for changes failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return None;
                }
            }
        }
    }
}

impl Change {
    fn to_payload(&self) -> String {
        match self {
            Change::RunsQueued => "runs".into(),
            Change::RunCancelled(id) => format!("cancel {id}"),
            Change::PluginActivated(version) => format!("plugin {version}"),
            Change::SchedulesChanged => "schedules".into(),
            Change::EventsVisible => "events".into(),
        }
    }

    /// The change a payload announces, its ids parsed (a version is 64 hex digits, a run id
    /// a UUID), or `None`, logged, for anything else.
    fn from_payload(payload: &str) -> Option<Change> {
        let change = match payload.split_once(' ') {
            None if payload == "runs" => Some(Change::RunsQueued),
            None if payload == "schedules" => Some(Change::SchedulesChanged),
            None if payload == "events" => Some(Change::EventsVisible),
            Some(("cancel", id)) => RunId::parse(id).map(Change::RunCancelled),
            Some(("plugin", version)) => PluginVersion::parse(version)
                .ok()
                .map(Change::PluginActivated),
            _ => None,
        };
        if change.is_none() {
            tracing::warn!(payload = ?payload, "ignoring a change notification that is not one of ours");
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_anything_else_is_ignored() {
        let version = PluginVersion::of_bytes(b"component");
        for change in [
            Change::RunsQueued,
            Change::RunCancelled(RunId::generate()),
            Change::PluginActivated(version.clone()),
            Change::SchedulesChanged,
            Change::EventsVisible,
        ] {
            assert_eq!(Change::from_payload(&change.to_payload()), Some(change));
        }
        for forged in [
            "plugin ../../../../tmp/planted".to_owned(),
            format!("plugin /{}", &version.as_str()[1..]),
            format!("plugin {}", version.as_str().to_uppercase()),
            format!("plugin {version} "),
            "plugin ".to_owned(),
            "cancel ../x".to_owned(),
            "runs ".to_owned(),
            "drop everything".to_owned(),
        ] {
            assert_eq!(Change::from_payload(&forged), None, "{forged}");
        }
    }
}
