//! `stepwise:plugin/sql`: queries against the data sources named in the host's config
//! (`[sources.*]`) and granted to the plugin. Parameters are always bound. A `read_only` source is
//! read-only in the database itself (a read-only SQLite connection, a `READ ONLY` PostgreSQL
//! transaction), not by inspecting SQL text. Rows and time are capped, and time is enforced by
//! the database too (PostgreSQL's `statement_timeout`, an SQLite progress handler), so a query
//! that runs forever is stopped, not just abandoned. Exceeding either cap is a [`Violation`]:
//! the attempt ends `errored`.

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
            let pool = if config.url.starts_with("sqlite:") {
                let options = SqliteConnectOptions::from_str(&config.url)
                    .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?
                    .read_only(config.read_only)
                    .busy_timeout(Duration::from_secs(5));
                SourcePool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        .connect_lazy_with(options),
                )
            } else if config.url.starts_with("postgres:") || config.url.starts_with("postgresql:") {
                let pool = PgPoolOptions::new()
                    .max_connections(4)
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
}

/// State of the `sql` interface for one step call.
pub struct SqlState {
    pub sources: SqlSources,
    /// Source names from the plugin's grant.
    pub granted: Vec<String>,
    pub max_rows: usize,
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
            timeout: self.timeout,
        };
        let query = async {
            match &target.pool {
                SourcePool::Sqlite(pool) => query_sqlite(pool, &statement, params, limits).await,
                SourcePool::Postgres(pool) => {
                    query_postgres(pool, target.read_only, &statement, params, limits).await
                }
            }
        };
        let result = match tokio::time::timeout(self.timeout, query).await {
            Ok(result) => result,
            Err(_elapsed) => Err(QueryError::Guest(time_limit(self.timeout))),
        };
        let result = result.map_err(|error| classify(error, &source, self.timeout));
        if let Err(SqlError::LimitExceeded(limit)) = &result {
            self.violation.record(limit.clone());
        }
        Ok(result)
    }
}

#[derive(Clone, Copy)]
struct QueryLimits {
    max_rows: usize,
    timeout: Duration,
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

fn classify(error: QueryError, source: &str, timeout: Duration) -> SqlError {
    let error = match error {
        QueryError::Guest(error) => return error,
        QueryError::Database(error) => error,
    };
    if let Some(database_error) = error.as_database_error() {
        let code = database_error.code().unwrap_or_default();
        let message = database_error.message();
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
    pool: &SqlitePool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    let mut connection = pool.acquire().await?;
    // Set before every query, replacing whatever an earlier (possibly abandoned) query left:
    // the handler stops the statement inside SQLite once the time limit has passed.
    let deadline = Instant::now() + limits.timeout;
    connection
        .lock_handle()
        .await?
        .set_progress_handler(1_000, move || Instant::now() < deadline);
    let query = bind_params!(sqlx::query(statement), params);
    let mut stream = query.fetch(&mut *connection);
    let mut set = RowSet {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    while let Some(row) = stream.try_next().await? {
        if set.rows.len() == limits.max_rows {
            return Err(too_many_rows(limits.max_rows));
        }
        if set.columns.is_empty() {
            set.columns = column_names(&row);
        }
        set.rows.push(sqlite_values(&row)?);
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

async fn query_postgres(
    pool: &PgPool,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    let mut transaction = pool.begin().await?;
    if read_only {
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *transaction)
            .await?;
    }
    let set_timeout = format!(
        "SET LOCAL statement_timeout = {}",
        limits.timeout.as_millis()
    );
    sqlx::query(&set_timeout).execute(&mut *transaction).await?;
    let mut set = RowSet {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    {
        let query = bind_params!(sqlx::query(statement), params);
        let mut stream = query.fetch(&mut *transaction);
        while let Some(row) = stream.try_next().await? {
            if set.rows.len() == limits.max_rows {
                return Err(too_many_rows(limits.max_rows));
            }
            if set.columns.is_empty() {
                set.columns = column_names(&row);
            }
            set.rows.push(postgres_values(&row)?);
        }
    }
    transaction.commit().await?;
    Ok(set)
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
