//! SQLite's hot point reads — a trigger's plugin, a request's token, the change log's next
//! rows after each commit — made on the calling thread through connections of their own
//! instead of being handed to sqlx's worker thread and back. An indexed lookup takes
//! microseconds, less than the two thread switches it saves; in WAL mode a reader never waits
//! for the writer, so the caller's thread is held only for the lookup itself.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::Result;

pub(super) struct SqliteReaders {
    path: PathBuf,
    /// Connections not in use. At most one per thread that reads at once: a read never
    /// awaits, so it holds its connection only for the lookup.
    idle: Mutex<Vec<Connection>>,
}

impl SqliteReaders {
    pub(super) fn new(path: PathBuf) -> SqliteReaders {
        SqliteReaders {
            path,
            idle: Mutex::default(),
        }
    }

    /// The row `sql` finds for `key`, read by `row`, if there is one.
    pub(super) fn find<T>(
        &self,
        sql: &str,
        key: &str,
        row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>> {
        self.with(|connection| {
            connection
                .prepare_cached(sql)
                .and_then(|mut statement| statement.query_row([key], row).optional())
        })
    }

    /// The rows `sql` selects with `params`, each read by `row`.
    pub(super) fn select<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        self.with(|connection| {
            connection
                .prepare_cached(sql)?
                .query_map(params, row)?
                .collect()
        })
    }

    fn with<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .pop();
        let connection = match idle {
            Some(connection) => connection,
            None => open(&self.path)?,
        };
        let read = read(&connection);
        self.idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push(connection);
        Ok(read?)
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.execute_batch("PRAGMA busy_timeout = 10000")?;
    Ok(connection)
}
