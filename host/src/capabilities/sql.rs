//! `stepwise:plugin/sql`: queries against the data sources named in the host's config
//! (`[sources.*]`) and granted to the plugin. Parameters are always bound, and a query is
//! exactly one statement of at most [`MAX_STATEMENT_BYTES`], never cached. A query is
//! confined to itself: it reaches nothing but the source (no other database, no file, no
//! program) and leaves nothing behind on the pooled connection for the next plugin
//! (`sqlite.rs`, `postgres.rs`, `mysql.rs`). A `read_only` source is read-only in the database itself,
//! not by inspecting SQL text. Rows, result bytes and time are capped, and the database
//! enforces time and value sizes too (PostgreSQL's `statement_timeout`, MySQL's and MariaDB's
//! statement timers, SQLite's progress handler and length limit), so a query that runs forever or builds a huge value is
//! stopped, not just abandoned. Exceeding a cap is a [`Violation`]: the attempt ends
//! `errored`. Waiting for a pooled connection has its own time limit and is the host's
//! problem, not the plugin's.
//!
//! This file holds what every backend shares: the source enum, the dispatch and the budgets.
//! Each backend's module owns its pool, its checks at start, its query with its
//! confinement, and the conversion of its values.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{Column, Row};
use wasmtime::component::HasData;

use super::Violation;
use super::recording::Tape;
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

/// The backends, one module each (`sql/sqlite.rs`, `sql/postgres.rs`, `sql/mysql.rs`): its
/// pool, the checks of its sources at start, its query with its confinement, and its values.
enum SourcePool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(mysql::Source),
}

/// Whether `url` names a source of one of the SQL backends.
pub fn is_sql_url(url: &str) -> bool {
    sqlite::is_url(url) || postgres::is_url(url) || mysql::is_url(url)
}

impl SqlSources {
    /// Builds a pool per SQL source (the others are another capability's) without connecting,
    /// so that a source that is down does not stop the host from starting; its queries fail
    /// until it is back.
    pub fn connect_lazy(configs: &BTreeMap<String, SourceConfig>) -> anyhow::Result<SqlSources> {
        let mut sources = HashMap::new();
        for (name, config) in configs {
            let pool = if sqlite::is_url(&config.url) {
                sqlite::pool(config).map(SourcePool::Sqlite)
            } else if postgres::is_url(&config.url) {
                postgres::pool(config).map(SourcePool::Postgres)
            } else if mysql::is_url(&config.url) {
                mysql::source(config).map(SourcePool::MySql)
            } else {
                continue;
            };
            let pool = pool.map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
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
    /// change), and checks the role of every PostgreSQL source (see [`postgres::RolePowers`])
    /// and the account of every MySQL source (see [`mysql::Privileges`]).
    /// A PostgreSQL source is the host's database when its URL names the same host, port and
    /// database, or when both answer with the same database of the same running server (the
    /// same server under another name). A source that cannot be reached is only logged: its
    /// queries fail until it is back, and every query checks the role again.
    pub async fn check_at_start(
        &self,
        configs: &BTreeMap<String, SourceConfig>,
        host_database_url: &str,
    ) -> anyhow::Result<()> {
        let mut host_identity = None;
        for (name, config) in configs {
            match self.sources.get(name).map(|source| &source.pool) {
                Some(SourcePool::Sqlite(_)) => {
                    sqlite::check_at_start(name, &config.url, host_database_url)?
                }
                Some(SourcePool::Postgres(_)) => {
                    postgres::check_at_start(
                        name,
                        &config.url,
                        host_database_url,
                        &mut host_identity,
                    )
                    .await?
                }
                Some(SourcePool::MySql(_)) => {
                    mysql::check_at_start(name, &config.url, config.read_only).await?
                }
                None => {}
            }
        }
        Ok(())
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
    /// Bytes of results the call's queries made the host read, all freed by now: the call's
    /// end gives them back to the system (the runtime's `Limiter`), as a flood of rows would
    /// otherwise stay in the allocator's arenas.
    pub read_bytes: u64,
    pub tape: Tape,
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
        let tape = self.tape.clone();
        if tape.is_off() {
            return self.query_live(source, statement, params).await;
        }
        let request = serde_json::json!({
            "source": source,
            "statement": statement,
            "params": params,
        });
        tape.exchange(
            "sql.query",
            || request,
            self.query_live(source, statement, params),
        )
        .await
    }
}

impl SqlState {
    async fn query_live(
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
                "sql source {source:?} is not an SQL source configured on this host"
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
                Ok(mut connection) => {
                    within_time(
                        self.timeout,
                        sqlite::query(&mut connection, &statement, params, limits),
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
            SourcePool::MySql(mysql_source) => {
                mysql_source.start_relay().map_err(|error| {
                    wasmtime::Error::new(super::HostFault(format!(
                        "sql source {source:?}: starting its relay: {error}"
                    )))
                })?;
                match acquire(&mysql_source.pool, &source).await? {
                    Ok(connection) => {
                        within_time(
                            self.timeout,
                            mysql::query(
                                connection,
                                mysql_source,
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
                }
            }
        };
        let result = result.map_err(|error| classify(error, &source, limits));
        self.read_bytes += match &result {
            Ok(set) => set.rows.iter().flatten().map(value_bytes).sum::<usize>() as u64,
            // Read up to the limit, or cut off at the row past it.
            Err(SqlError::LimitExceeded(_)) => limits.max_result_bytes as u64,
            Err(_) => 0,
        };
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

    /// Refuses a row of `bytes` that would pass the limit, before its values are copied.
    fn check(&self, bytes: usize) -> Result<(), QueryError> {
        if self.used.saturating_add(bytes) > self.limit {
            return Err(result_too_big(self.limit));
        }
        Ok(())
    }

    fn add(&mut self, row: &[Value]) -> Result<(), QueryError> {
        self.used += row.iter().map(value_bytes).sum::<usize>();
        if self.used > self.limit {
            return Err(result_too_big(self.limit));
        }
        Ok(())
    }
}

/// What a value counts against the result limit.
fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Null | Value::Boolean(_) => 1,
        Value::Int(_) | Value::Float(_) => 8,
        Value::Text(text) => text.len(),
        Value::Bytes(bytes) => bytes.len(),
    }
}

/// The error of a result past `limit`, whoever noticed it.
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

/// A column whose type a backend does not convert, with the cast (`cast`, for `COLUMN`) that
/// would make it one it does.
fn unconvertible(column: &str, kind: &str, cast: &str) -> QueryError {
    let cast = cast.replace("COLUMN", column);
    QueryError::Guest(SqlError::QueryFailed(format!(
        "column {column:?} has type {kind}, which the sql capability does not convert; cast it in the query (e.g. {cast})"
    )))
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
mod mysql;
mod postgres;
mod sqlite;

/// Why a source may not be used: it is the host's own database (`how` says how it was told).
fn own_database(name: &str, how: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "sql source {name:?} is the host's own database ({how}): a plugin granted it could read \
         and change the host's runs, plugins and tokens. Point the source at another database"
    )
}

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
