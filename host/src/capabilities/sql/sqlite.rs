//! SQLite data sources: the pool, the check at start, the query and its values. Confinement
//! of a source's connections happens on SQLite's own raw handle: an
//! authorizer that lets a query read the source (and change its tables, which a read-only
//! connection refuses) and nothing else, limits on attached databases and value sizes, and exactly one
//! statement per query. Nothing a query may do outlives it on the pooled connection: no
//! `ATTACH`, no `TEMP` objects, no transactions or savepoints, no pragma that sets anything.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::{self, NonNull};
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use libsqlite3_sys as ffi;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, TypeInfo, ValueRef};

use super::{
    POOL_WAIT, QueryError, QueryLimits, ResultBytes, column_names, own_database, too_many_rows,
};
use crate::bindings::sql::{RowSet, SqlError, Value};
use crate::config::SourceConfig;

pub(super) fn is_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// The source's pool, connecting lazily; every connection is confined as it opens.
pub(super) fn pool(config: &SourceConfig) -> Result<SqlitePool, String> {
    let options = SqliteConnectOptions::from_str(&config.url)
        .map_err(|error| error.to_string())?
        .read_only(config.read_only)
        .busy_timeout(Duration::from_secs(5));
    Ok(SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(POOL_WAIT)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                let mut handle = connection.lock_handle().await?;
                // SAFETY: the locked handle is ours alone during the call.
                unsafe { confine(handle.as_raw_handle()) };
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

/// Refuses a source that is the host's own database file.
pub(super) fn check_at_start(name: &str, url: &str, host_database_url: &str) -> anyhow::Result<()> {
    if same_database(url, host_database_url) {
        return Err(own_database(name, "the same file"));
    }
    Ok(())
}

/// Whether two SQLite URLs name one database file, however spelled: the same file (device
/// and inode, so a hard link too) or, where that cannot be asked, the same canonical path.
fn same_database(source: &str, host: &str) -> bool {
    use std::str::FromStr;
    let file = |url: &str| {
        if !url.starts_with("sqlite:") {
            return None;
        }
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
        std::fs::canonicalize(options.get_filename()).ok()
    };
    let (Some(source), Some(host)) = (file(source), file(host)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(source), Ok(host)) = (std::fs::metadata(&source), std::fs::metadata(&host)) {
            return (source.dev(), source.ino()) == (host.dev(), host.ino());
        }
    }
    source == host
}

/// Read-only pragmas a check may use to look at a schema.
const ALLOWED_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

/// Functions refused even on a writable source: they reach outside the database or the
/// connection (loading code, registering tokenizers by pointer, reading or writing files in
/// builds that have them).
const REFUSED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "fts3_tokenizer",
    "readfile",
    "writefile",
    "edit",
];

/// Installs the authorizer and the fixed limits on a new connection to a source. A read-only
/// source is also opened read-only, which refuses the writes the authorizer lets through.
///
/// # Safety
/// `db` must be an open connection that the caller holds exclusively for the duration of
/// the call (sqlx's locked handle).
pub unsafe fn confine(db: NonNull<ffi::sqlite3>) {
    let db = db.as_ptr();
    // SAFETY: the callback is a plain function that uses no user data, so a null pointer is
    // what it gets, and it stays valid for the connection's whole life.
    unsafe {
        ffi::sqlite3_set_authorizer(db, Some(authorize), ptr::null_mut());
        // `ATTACH` and `VACUUM INTO` (which attaches its target) need a free slot.
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, 0);
    }
}

/// Sets the largest string or blob a query may build or return, for the next query.
///
/// # Safety
/// As for [`confine`].
pub unsafe fn limit_value_bytes(db: NonNull<ffi::sqlite3>, bytes: usize) {
    let bytes = c_int::try_from(bytes).unwrap_or(c_int::MAX);
    // SAFETY: see the function's contract.
    unsafe {
        ffi::sqlite3_limit(db.as_ptr(), ffi::SQLITE_LIMIT_LENGTH, bytes.max(1));
    }
}

/// Why a statement text may not run.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// More than one statement; the text names what follows the first.
    SeveralStatements,
    /// SQLite would not prepare it (syntax, a denied action, a limit): its result code and
    /// message.
    Prepare { code: c_int, message: String },
}

/// Checks that `statement` is exactly one statement that the authorizer lets through, by
/// preparing it (and whatever follows it) on the connection.
///
/// # Safety
/// As for [`confine`].
pub unsafe fn check_single_statement(
    db: NonNull<ffi::sqlite3>,
    statement: &str,
) -> Result<(), Refused> {
    let db = db.as_ptr();
    let mut rest = statement.as_bytes();
    let mut statements = 0;
    while !rest.is_empty() {
        let mut prepared: *mut ffi::sqlite3_stmt = ptr::null_mut();
        let mut tail: *const c_char = ptr::null();
        let length = c_int::try_from(rest.len()).map_err(|_| Refused::Prepare {
            code: ffi::SQLITE_TOOBIG,
            message: "statement too long".into(),
        })?;
        // SAFETY: `rest` is valid for `length` bytes; `prepared` and `tail` are out-pointers.
        let code = unsafe {
            ffi::sqlite3_prepare_v2(db, rest.as_ptr().cast(), length, &mut prepared, &mut tail)
        };
        if code != ffi::SQLITE_OK {
            // SAFETY: `db` is open; the message is copied before anything else touches it.
            let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: finalizing a null statement is a no-op.
            unsafe { ffi::sqlite3_finalize(prepared) };
            return Err(Refused::Prepare {
                code: code & 0xff,
                message,
            });
        }
        if !prepared.is_null() {
            statements += 1;
            // SAFETY: `prepared` came from prepare and is finalized exactly once.
            unsafe { ffi::sqlite3_finalize(prepared) };
            if statements > 1 {
                return Err(Refused::SeveralStatements);
            }
        }
        let consumed = if tail.is_null() {
            rest.len()
        } else {
            // SAFETY: SQLite sets `tail` to a point inside `rest`.
            (unsafe { tail.cast::<u8>().offset_from(rest.as_ptr()) }) as usize
        };
        if consumed == 0 {
            break;
        }
        rest = &rest[consumed.min(rest.len())..];
    }
    if statements == 0 {
        return Err(Refused::Prepare {
            code: ffi::SQLITE_MISUSE,
            message: "the query holds no statement".into(),
        });
    }
    Ok(())
}

/// The name an authorizer argument points to, if any.
///
/// # Safety
/// `text` is null or a NUL-terminated string that SQLite keeps alive during the callback.
unsafe fn name<'a>(text: *const c_char) -> Option<&'a str> {
    if text.is_null() {
        None
    } else {
        // SAFETY: see the function's contract.
        unsafe { CStr::from_ptr(text) }.to_str().ok()
    }
}

/// What both kinds of source allow: reading, functions that stay inside the query, recursive
/// queries, and the schema pragmas above.
fn common(action: c_int, first: Option<&str>, second: Option<&str>) -> Option<c_int> {
    match action {
        ffi::SQLITE_SELECT | ffi::SQLITE_READ | ffi::SQLITE_RECURSIVE => Some(ffi::SQLITE_OK),
        ffi::SQLITE_FUNCTION => {
            let function = second.unwrap_or_default().to_ascii_lowercase();
            Some(if REFUSED_FUNCTIONS.contains(&function.as_str()) {
                ffi::SQLITE_DENY
            } else {
                ffi::SQLITE_OK
            })
        }
        ffi::SQLITE_PRAGMA => {
            let pragma = first.unwrap_or_default().to_ascii_lowercase();
            Some(if ALLOWED_PRAGMAS.contains(&pragma.as_str()) {
                ffi::SQLITE_OK
            } else {
                ffi::SQLITE_DENY
            })
        }
        _ => None,
    }
}

/// Reading, the functions and pragmas above, and changes to the source's own (`main`)
/// tables, which a read-only connection then refuses as writes. Never `temp`, whose objects
/// would outlive the query on the pooled connection; never `ATTACH`, transactions or
/// savepoints.
unsafe extern "C" fn authorize(
    _user_data: *mut c_void,
    action: c_int,
    first: *const c_char,
    second: *const c_char,
    database: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    // SAFETY: SQLite passes null or valid strings for the length of the callback.
    let (first, second, database) = unsafe { (name(first), name(second), name(database)) };
    if let Some(verdict) = common(action, first, second) {
        return verdict;
    }
    let on_main = database.is_none_or(|database| database == "main");
    match action {
        ffi::SQLITE_INSERT
        | ffi::SQLITE_UPDATE
        | ffi::SQLITE_DELETE
        | ffi::SQLITE_CREATE_TABLE
        | ffi::SQLITE_CREATE_INDEX
        | ffi::SQLITE_CREATE_VIEW
        | ffi::SQLITE_CREATE_TRIGGER
        | ffi::SQLITE_DROP_TABLE
        | ffi::SQLITE_DROP_INDEX
        | ffi::SQLITE_DROP_VIEW
        | ffi::SQLITE_DROP_TRIGGER
        | ffi::SQLITE_ALTER_TABLE
        | ffi::SQLITE_REINDEX
        | ffi::SQLITE_ANALYZE
            if on_main =>
        {
            ffi::SQLITE_OK
        }
        _ => ffi::SQLITE_DENY,
    }
}

/// Runs one plugin query on a confined connection.
pub(super) async fn query(
    connection: &mut sqlx::SqliteConnection,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    {
        let mut handle = connection.lock_handle().await?;
        // Set before every query, replacing whatever an earlier (possibly abandoned) query
        // left: the handler stops the statement inside SQLite once the time limit has passed.
        let deadline = Instant::now() + limits.timeout;
        handle.set_progress_handler(1_000, move || Instant::now() < deadline);
        // SAFETY: the locked handle is ours alone while it is held.
        let checked = unsafe {
            limit_value_bytes(handle.as_raw_handle(), limits.max_result_bytes);
            check_single_statement(handle.as_raw_handle(), statement)
        };
        match checked {
            Ok(()) => {}
            Err(Refused::SeveralStatements) => {
                return Err(QueryError::Guest(SqlError::QueryFailed(
                    "a query must be exactly one statement; send each statement in its own query"
                        .into(),
                )));
            }
            Err(Refused::Prepare { code, message }) => {
                // A denied function is reported as a plain error with this text.
                let denied =
                    code == libsqlite3_sys::SQLITE_AUTH || message.contains("not authorized");
                let error = match code {
                    _ if denied => SqlError::Denied(format!(
                        "the source refuses this statement ({message}): a query may read the \
                         source and change a writable source's own tables, nothing else (no \
                         ATTACH, VACUUM, PRAGMA that sets anything, TEMP objects, transactions \
                         or file access)"
                    )),
                    libsqlite3_sys::SQLITE_TOOBIG => SqlError::LimitExceeded(format!(
                        "sql result size limit of {} bytes exceeded",
                        limits.max_result_bytes
                    )),
                    _ => SqlError::QueryFailed(message),
                };
                return Err(QueryError::Guest(error));
            }
        }
    }
    // Not persistent: a plugin's statement is used once, and a connection should not keep
    // every text it was sent (up to sqlx's cache of 100 per connection).
    let query = bind_params!(sqlx::query(statement).persistent(false), params);
    let mut stream = query.fetch(&mut *connection);
    let mut set = RowSet {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    let mut bytes = ResultBytes::new(limits.max_result_bytes);
    while let Some(row) = stream.try_next().await? {
        if set.rows.len() == limits.max_rows {
            return Err(too_many_rows(limits.max_rows));
        }
        if set.columns.is_empty() {
            set.columns = column_names(&row);
        }
        let values = values(&row)?;
        bytes.add(&values)?;
        set.rows.push(values);
    }
    Ok(set)
}

fn values(row: &SqliteRow) -> Result<Vec<Value>, QueryError> {
    (0..row.len())
        .map(|index| {
            let raw = row.try_get_raw(index)?;
            if raw.is_null() {
                return Ok(Value::Null);
            }
            // SQLite types values, not columns: the raw value's type is its storage class.
            let value = match raw.type_info().name() {
                "INTEGER" => Value::Int(row.try_get(index)?),
                "REAL" => Value::Float(row.try_get(index)?),
                "BLOB" => Value::Bytes(row.try_get(index)?),
                "BOOLEAN" => Value::Boolean(row.try_get(index)?),
                _ => Value::Text(row.try_get(index)?),
            };
            Ok(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, SqliteConnection};

    use super::*;

    #[tokio::test]
    async fn a_sqlite_query_leaves_no_statement_cached_on_its_connection() {
        let mut connection = SqliteConnection::connect("sqlite::memory:")
            .await
            .expect("an in-memory database");
        let limits = QueryLimits {
            max_rows: 10,
            max_result_bytes: 1 << 20,
            timeout: Duration::from_secs(10),
        };
        for statement in ["SELECT 1", "SELECT ? AS x"] {
            let params = vec![Value::Int(1)];
            let params = if statement.contains('?') {
                params
            } else {
                Vec::new()
            };
            assert!(
                query(&mut connection, statement, params, limits)
                    .await
                    .is_ok()
            );
        }
        assert_eq!(connection.cached_statements_size(), 0);
    }
}
