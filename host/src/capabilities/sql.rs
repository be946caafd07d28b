//! `stepwise:plugin/sql`: queries against the data sources named in the host's config
//! (`[sources.*]`) and granted to the plugin. Parameters are always bound, and a query is
//! exactly one statement of at most [`MAX_STATEMENT_BYTES`], never cached. A query is
//! confined to itself: it reaches nothing but the source (no other database, no file, no
//! program) and leaves nothing behind on the pooled connection for the next plugin
//! (`sqlite.rs`, `postgres.rs`). A `read_only` source is read-only in the database itself,
//! not by inspecting SQL text. Rows, result bytes and time are capped, and the database
//! enforces time and value sizes too (PostgreSQL's `statement_timeout`, SQLite's progress
//! handler and length limit), so a query that runs forever or builds a huge value is
//! stopped, not just abandoned. Exceeding a cap is a [`Violation`]: the attempt ends
//! `errored`. Waiting for a pooled connection has its own time limit and is the host's
//! problem, not the plugin's.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Column, Row, TypeInfo, ValueRef};
use wasmtime::component::HasData;

use super::Violation;
use crate::bindings::sql::{Host, RowSet, SqlError, Value};
use crate::config::SourceConfig;

/// Every configured data source, connected lazily, shared by all step calls.
#[derive(Clone, Default)]
pub struct SqlSources {
    sources: Arc<HashMap<String, SqlSource>>,
}

struct SqlSource {
    pool: SourcePool,
    read_only: bool,
}

/// The longest statement text a query may have, on every backend. A check's query is short;
/// without a bound, each query could make the source's server (or SQLite, on the host's own
/// thread) parse megabytes of SQL.
pub const MAX_STATEMENT_BYTES: usize = 64 << 10;

/// How long a query waits for one of its source's pooled connections. A source busy with
/// other plugins' slow queries is the host's condition: the wait does not count against the
/// plugin's `sql_timeout`, and running out of it is not the plugin's violation.
/// Short, so that the wait ends well inside the call's own time limit.
const POOL_WAIT: Duration = Duration::from_secs(2);

enum SourcePool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl SqlSources {
    /// Builds a pool per source without connecting, so that a source that is down does not stop
    /// the host from starting; its queries fail until it is back.
    pub fn connect_lazy(configs: &BTreeMap<String, SourceConfig>) -> anyhow::Result<SqlSources> {
        let mut sources = HashMap::new();
        for (name, config) in configs {
            let read_only = config.read_only;
            let pool = if config.url.starts_with("sqlite:") {
                let options = SqliteConnectOptions::from_str(&config.url)
                    .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?
                    .read_only(read_only)
                    .busy_timeout(Duration::from_secs(5));
                SourcePool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(POOL_WAIT)
                        .after_connect(move |connection, _| {
                            Box::pin(async move {
                                let mut handle = connection.lock_handle().await?;
                                // SAFETY: the locked handle is ours alone during the call.
                                unsafe { sqlite::confine(handle.as_raw_handle()) };
                                Ok(())
                            })
                        })
                        .connect_lazy_with(options),
                )
            } else if config.url.starts_with("postgres:") || config.url.starts_with("postgresql:") {
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(POOL_WAIT)
                    .connect_lazy(&config.url)
                    .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
                SourcePool::Postgres(pool)
            } else {
                anyhow::bail!("source {name}: url must start with sqlite: or postgres:");
            };
            sources.insert(
                name.clone(),
                SqlSource {
                    pool,
                    read_only: config.read_only,
                },
            );
        }
        Ok(SqlSources {
            sources: Arc::new(sources),
        })
    }

    /// Refuses to start with a source that is the host's own database (`host_database_url`,
    /// whose runs, plugins and tokens a plugin granted the source could then read and
    /// change), and checks the role of every PostgreSQL source: see [`postgres::RolePowers`].
    /// A PostgreSQL source is the host's database when its URL names the same host, port and
    /// database, or when both answer with the same database of the same running server (the
    /// same server under another name). A source that cannot be reached is only logged: its
    /// queries fail until it is back, and every query checks the role again.
    pub async fn check_at_start(
        &self,
        configs: &BTreeMap<String, SourceConfig>,
        host_database_url: &str,
    ) -> anyhow::Result<()> {
        let own = |name: &str, how: &str| {
            anyhow::anyhow!(
                "sql source {name:?} is the host's own database ({how}): a plugin granted it \
                 could read and change the host's runs, plugins and tokens. Point the source at \
                 another database"
            )
        };
        let mut host_identity = None;
        for (name, config) in configs {
            match self.sources.get(name).map(|source| &source.pool) {
                Some(SourcePool::Sqlite(_))
                    if sqlite::same_database(&config.url, host_database_url) =>
                {
                    return Err(own(name, "the same file"));
                }
                Some(SourcePool::Postgres(_)) => {
                    if postgres::same_database_by_url(&config.url, host_database_url) {
                        return Err(own(name, "the same host, port and database name"));
                    }
                    let Some(mut connection) = connect_at_start(name, &config.url).await else {
                        continue;
                    };
                    if host_identity.is_none() && postgres::is_url(host_database_url) {
                        host_identity = Some(postgres::host_identity(host_database_url).await?);
                    }
                    let identity = postgres::DatabaseIdentity::of(&mut connection)
                        .await
                        .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
                    if host_identity.as_ref() == Some(&identity) {
                        return Err(own(name, "the same database of the same running server"));
                    }
                    let powers =
                        postgres::RolePowers::of(&mut connection)
                            .await
                            .map_err(|error| {
                                anyhow::anyhow!("source {name}: reading its role: {error}")
                            })?;
                    if let Some(refusal) = powers.refusal(name) {
                        anyhow::bail!("{refusal}");
                    }
                    if let Some(warning) = powers.warning(name) {
                        tracing::warn!(source = %name, "{warning}");
                    }
                }
                Some(SourcePool::Sqlite(_)) | None => {}
            }
        }
        Ok(())
    }
}

/// A connection to the PostgreSQL source `name` for the checks at start, or `None` (logged)
/// when it cannot be reached now.
async fn connect_at_start(name: &str, url: &str) -> Option<sqlx::PgConnection> {
    use sqlx::Connection;
    match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url)).await {
        Ok(Ok(connection)) => Some(connection),
        Ok(Err(error)) => {
            tracing::warn!(source = %name, %error, "sql source unreachable at start; every query checks its role");
            None
        }
        Err(_) => {
            tracing::warn!(source = %name, "sql source did not answer within 5 s at start; every query checks its role");
            None
        }
    }
}

/// State of the `sql` interface for one step call.
pub struct SqlState {
    pub sources: SqlSources,
    /// Source names from the plugin's grant.
    pub granted: Vec<String>,
    pub max_rows: usize,
    pub max_result_bytes: usize,
    pub timeout: Duration,
    pub violation: Violation,
}

/// `HasData` marker so the generated `add_to_linker` hands the host `&mut SqlState`.
pub struct SqlCapability;

impl HasData for SqlCapability {
    type Data<'a> = &'a mut SqlState;
}

impl Host for SqlState {
    async fn query(
        &mut self,
        source: String,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, SqlError>> {
        if !self.granted.contains(&source) {
            return Ok(Err(SqlError::Denied(format!(
                "sql source {source:?} is not granted to this plugin"
            ))));
        }
        let Some(target) = self.sources.sources.get(&source) else {
            return Ok(Err(SqlError::Denied(format!(
                "sql source {source:?} is not configured on this host"
            ))));
        };
        let limits = QueryLimits {
            max_rows: self.max_rows,
            max_result_bytes: self.max_result_bytes,
            timeout: self.timeout,
        };
        let result = match &target.pool {
            _ if statement.len() > MAX_STATEMENT_BYTES => {
                Err(QueryError::Guest(SqlError::LimitExceeded(format!(
                    "sql statement length limit of {MAX_STATEMENT_BYTES} bytes exceeded ({} bytes)",
                    statement.len()
                ))))
            }
            SourcePool::Sqlite(pool) => match acquire(pool, &source).await? {
                Ok(connection) => {
                    let mut connection = connection;
                    within_time(
                        self.timeout,
                        query_sqlite(&mut connection, &statement, params, limits),
                    )
                    .await
                }
                Err(error) => Err(error),
            },
            SourcePool::Postgres(pool) => match acquire(pool, &source).await? {
                Ok(connection) => {
                    within_time(
                        self.timeout,
                        postgres::query(
                            connection,
                            &source,
                            target.read_only,
                            &statement,
                            params,
                            limits,
                        ),
                    )
                    .await
                }
                Err(error) => Err(error),
            },
        };
        let result = result.map_err(|error| classify(error, &source, limits));
        if let Err(SqlError::LimitExceeded(limit)) = &result {
            self.violation.record(limit.clone());
        }
        Ok(result)
    }
}

/// A pooled connection of `source`. Running out of the pool wait, or failing to connect, is
/// the host's fault (`Err`: the tick is retried and the run not charged).
async fn acquire<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    source: &str,
) -> wasmtime::Result<Result<sqlx::pool::PoolConnection<DB>, QueryError>> {
    match pool.acquire().await {
        Ok(connection) => Ok(Ok(connection)),
        Err(error) => Err(wasmtime::Error::new(super::HostFault(format!(
            "sql source {source:?} unavailable: {error}"
        )))),
    }
}

/// The query's own time limit, which starts once it has a connection.
async fn within_time(
    timeout: Duration,
    query: impl Future<Output = Result<RowSet, QueryError>>,
) -> Result<RowSet, QueryError> {
    match tokio::time::timeout(timeout, query).await {
        Ok(result) => result,
        Err(_elapsed) => Err(QueryError::Guest(time_limit(timeout))),
    }
}

#[derive(Clone, Copy)]
struct QueryLimits {
    max_rows: usize,
    max_result_bytes: usize,
    timeout: Duration,
}

/// Counts the bytes of a result as its rows arrive.
struct ResultBytes {
    used: usize,
    limit: usize,
}

impl ResultBytes {
    fn new(limit: usize) -> ResultBytes {
        ResultBytes { used: 0, limit }
    }

    fn add(&mut self, row: &[Value]) -> Result<(), QueryError> {
        for value in row {
            self.used += match value {
                Value::Null | Value::Boolean(_) => 1,
                Value::Int(_) | Value::Float(_) => 8,
                Value::Text(text) => text.len(),
                Value::Bytes(bytes) => bytes.len(),
            };
        }
        if self.used > self.limit {
            return Err(result_too_big(self.limit));
        }
        Ok(())
    }
}

fn result_too_big(limit: usize) -> QueryError {
    QueryError::Guest(SqlError::LimitExceeded(format!(
        "sql result size limit of {limit} bytes exceeded"
    )))
}

fn time_limit(timeout: Duration) -> SqlError {
    SqlError::LimitExceeded(format!(
        "sql time limit of {} ms exceeded",
        timeout.as_millis()
    ))
}

/// Either an answer for the guest already, or a database error still to be classified.
enum QueryError {
    Guest(SqlError),
    Database(sqlx::Error),
}

impl From<sqlx::Error> for QueryError {
    fn from(error: sqlx::Error) -> Self {
        QueryError::Database(error)
    }
}

fn classify(error: QueryError, source: &str, limits: QueryLimits) -> SqlError {
    let timeout = limits.timeout;
    let error = match error {
        QueryError::Guest(error) => return error,
        QueryError::Database(error) => error,
    };
    if let Some(database_error) = error.as_database_error() {
        let code = database_error.code().unwrap_or_default();
        let message = database_error.message();
        // 18 = SQLITE_TOOBIG: a value beyond the length limit, which is the result limit.
        if code == "18" || message.contains("string or blob too big") {
            return SqlError::LimitExceeded(format!(
                "sql result size limit of {} bytes exceeded",
                limits.max_result_bytes
            ));
        }
        // 23 = SQLITE_AUTH: the source's authorizer refused an action.
        if code == "23" || message.contains("not authorized") {
            return SqlError::Denied(format!(
                "sql source {source:?} refuses this statement ({message}): a query may only read the source{}",
                " (and change a writable source's own tables); no ATTACH, PRAGMA, TEMP objects, transactions or file access"
            ));
        }
        // 25006 = read_only_sql_transaction (PostgreSQL); SQLite says "readonly".
        if code == "25006" || message.contains("readonly") {
            return SqlError::ReadOnly(format!("sql source {source:?} is read-only: {message}"));
        }
        // 57014 = query_canceled, which is what statement_timeout raises; SQLite reports its
        // progress handler stopping a statement as "interrupted".
        if code == "57014" || message.contains("interrupted") {
            return time_limit(timeout);
        }
        return SqlError::QueryFailed(message.to_owned());
    }
    SqlError::QueryFailed(format!("sql source {source:?}: {error}"))
}

macro_rules! bind_params {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match param {
                Value::Null => query.bind(None::<i64>),
                Value::Int(value) => query.bind(value),
                Value::Float(value) => query.bind(value),
                Value::Text(value) => query.bind(value),
                Value::Bytes(value) => query.bind(value),
                Value::Boolean(value) => query.bind(value),
            };
        }
        query
    }};
}

// After `bind_params!`, which they use.
mod postgres;
mod sqlite;

fn too_many_rows(max_rows: usize) -> QueryError {
    QueryError::Guest(SqlError::LimitExceeded(format!(
        "sql row limit of {max_rows} rows exceeded"
    )))
}

fn column_names<R: Row>(row: &R) -> Vec<String> {
    row.columns()
        .iter()
        .map(|column| column.name().to_owned())
        .collect()
}

async fn query_sqlite(
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
            sqlite::limit_value_bytes(handle.as_raw_handle(), limits.max_result_bytes);
            sqlite::check_single_statement(handle.as_raw_handle(), statement)
        };
        match checked {
            Ok(()) => {}
            Err(sqlite::Refused::SeveralStatements) => {
                return Err(QueryError::Guest(SqlError::QueryFailed(
                    "a query must be exactly one statement; send each statement in its own query"
                        .into(),
                )));
            }
            Err(sqlite::Refused::Prepare { code, message }) => {
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
        let values = sqlite_values(&row)?;
        bytes.add(&values)?;
        set.rows.push(values);
    }
    Ok(set)
}

fn sqlite_values(row: &SqliteRow) -> Result<Vec<Value>, QueryError> {
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

fn postgres_values(row: &PgRow) -> Result<Vec<Value>, QueryError> {
    (0..row.len())
        .map(|index| {
            let raw = row.try_get_raw(index)?;
            if raw.is_null() {
                return Ok(Value::Null);
            }
            let type_name = raw.type_info().name().to_owned();
            let value = match type_name.as_str() {
                "INT2" => Value::Int(row.try_get::<i16, _>(index)?.into()),
                "INT4" => Value::Int(row.try_get::<i32, _>(index)?.into()),
                "INT8" => Value::Int(row.try_get(index)?),
                "FLOAT4" => Value::Float(row.try_get::<f32, _>(index)?.into()),
                "FLOAT8" => Value::Float(row.try_get(index)?),
                "BOOL" => Value::Boolean(row.try_get(index)?),
                "BYTEA" => Value::Bytes(row.try_get(index)?),
                "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "UNKNOWN" => Value::Text(row.try_get(index)?),
                other => {
                    let column = row.columns()[index].name().to_owned();
                    return Err(QueryError::Guest(SqlError::QueryFailed(format!(
                        "column {column:?} has type {other}, which the sql capability does not convert; cast it in the query (e.g. {column}::text)"
                    ))));
                }
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
                query_sqlite(&mut connection, statement, params, limits)
                    .await
                    .is_ok()
            );
        }
        assert_eq!(connection.cached_statements_size(), 0);
    }
}
