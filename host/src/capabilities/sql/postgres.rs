//! PostgreSQL data sources: the pool, the checks at start, the query and its values.
//! Confinement of a PostgreSQL data source: "Read-only" is the database's own `READ ONLY`
//! transaction, and "writable" means the role's own tables; neither holds against a privileged
//! role: a superuser's transaction, read-only or not, still runs `COPY … TO PROGRAM` and reads
//! server files. So every source's role is checked at start (the host refuses to start, and
//! warns about powers a plugin should rarely have) and again in every query's transaction
//! (the query is denied). Each query runs alone in its transaction with a time limit and is
//! followed by `DISCARD ALL`, which the plugin's statement cannot undo, so no session setting,
//! prepared statement, cursor or lock outlives it on the pooled connection; a connection whose
//! query did not get that far is closed, not pooled.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::{Column, Connection, Row, TypeInfo, ValueRef};

use super::{
    POOL_WAIT, QueryError, QueryLimits, ResultBytes, column_names, own_database, too_many_rows,
    unconvertible,
};
use crate::bindings::sql::{RowSet, SqlError, Value};
use crate::config::SourceConfig;

/// The source's pool, connecting lazily.
pub(super) fn pool(config: &SourceConfig) -> Result<PgPool, String> {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(POOL_WAIT)
        .connect_lazy(&config.url)
        .map_err(|error| error.to_string())
}

/// Refuses a source that is the host's own database (by its URL, or as the same database of
/// the same running server, `host_identity` being the host's, read once) and a role with
/// powers no source may have (see [`RolePowers`]); warns about powers a plugin should rarely
/// have. A source that cannot be reached is only logged: every query checks its role again.
pub(super) async fn check_at_start(
    name: &str,
    url: &str,
    host_database_url: &str,
    host_identity: &mut Option<DatabaseIdentity>,
) -> anyhow::Result<()> {
    if same_database_by_url(url, host_database_url) {
        return Err(own_database(name, "the same host, port and database name"));
    }
    let Some(mut connection) = connect_at_start(name, url).await else {
        return Ok(());
    };
    if host_identity.is_none() && is_url(host_database_url) {
        *host_identity = Some(host_identity_of(host_database_url).await?);
    }
    let identity = DatabaseIdentity::of(&mut connection)
        .await
        .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
    if host_identity.as_ref() == Some(&identity) {
        return Err(own_database(
            name,
            "the same database of the same running server",
        ));
    }
    let powers = RolePowers::of(&mut connection)
        .await
        .map_err(|error| anyhow::anyhow!("source {name}: reading its role: {error}"))?;
    if let Some(refusal) = powers.refusal(name) {
        anyhow::bail!("{refusal}");
    }
    if let Some(warning) = powers.warning(name) {
        tracing::warn!(source = %name, "{warning}");
    }
    Ok(())
}

/// A connection to the PostgreSQL source `name` for the checks at start, or `None` (logged)
/// when it cannot be reached now.
async fn connect_at_start(name: &str, url: &str) -> Option<sqlx::PgConnection> {
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

/// Starts the text of a refusal.
const REFUSED: &str = "stepwise refuses this role for a sql source";

/// Predefined roles whose members reach beyond the database: programs and files on the
/// server. A source's role may not be one.
const REFUSED_ROLES: [&str; 3] = [
    "pg_execute_server_program",
    "pg_read_server_files",
    "pg_write_server_files",
];

/// Predefined roles whose members reach rows or sessions that are not the source's, and what
/// for. Warned about at start: a deliberate choice is possible, an accidental one likelier.
const WARNED_ROLES: [(&str, &str); 3] = [
    ("pg_read_all_data", "reads every table"),
    (
        "pg_monitor",
        "reads other sessions' queries and the server's statistics",
    ),
    ("pg_signal_backend", "cancels or ends other roles' sessions"),
];

/// What a source's role may do beyond the tables it was granted.
pub(super) struct RolePowers {
    role: String,
    /// Reaches beyond the database: refused.
    refused: Vec<String>,
    /// Reaches beyond the source's rows or into other sessions: warned about.
    warned: Vec<String>,
}

impl RolePowers {
    /// Reads the powers of the connection's role.
    pub(super) async fn of(connection: &mut PgConnection) -> Result<RolePowers, sqlx::Error> {
        let named: Vec<&str> = REFUSED_ROLES
            .iter()
            .chain(WARNED_ROLES.iter().map(|(role, _)| role))
            .copied()
            .collect();
        // Memberships through the roles that exist here: an older server lacks some, which
        // `pg_has_role` by name would fail on.
        let row = sqlx::query(
            "SELECT current_user::text, r.rolsuper, r.rolbypassrls, \
             ARRAY(SELECT m.rolname::text FROM pg_roles m WHERE m.rolname = ANY($1) \
             AND pg_has_role(current_user, m.oid, 'MEMBER') ORDER BY m.rolname) \
             FROM pg_roles r WHERE r.rolname = current_user",
        )
        .bind(named)
        .persistent(false)
        .fetch_one(&mut *connection)
        .await?;
        let role: String = row.try_get(0)?;
        if row.try_get::<bool, _>(1)? {
            return Ok(RolePowers {
                role,
                refused: vec!["is a superuser".into()],
                warned: Vec::new(),
            });
        }
        let members: Vec<String> = row.try_get(3)?;
        let member = |name: &str| members.iter().any(|member| member == name);
        let refused = REFUSED_ROLES
            .iter()
            .filter(|name| member(name))
            .map(|name| format!("is a member of {name}"))
            .collect();
        let mut warned = Vec::new();
        if row.try_get::<bool, _>(2)? {
            warned.push("has BYPASSRLS (reads rows that row-level security hides)".to_owned());
        }
        for (name, what) in WARNED_ROLES {
            if member(name) {
                warned.push(format!("is a member of {name} ({what})"));
            }
        }
        Ok(RolePowers {
            role,
            refused,
            warned,
        })
    }

    /// Why `source` may not use this role, naming the fix; `None` if it may.
    pub(super) fn refusal(&self, source: &str) -> Option<String> {
        if self.refused.is_empty() {
            return None;
        }
        Some(format!(
            "{REFUSED}: sql source {source:?} connects as role {:?}, which {}; a plugin could \
             run programs or read files on the database server through it. Connect as a role \
             that may only do what the source needs, e.g. `CREATE ROLE stepwise_reader LOGIN \
             PASSWORD '…'; GRANT USAGE ON SCHEMA public TO stepwise_reader; GRANT SELECT ON \
             ALL TABLES IN SCHEMA public TO stepwise_reader;`, and use it in the source's url",
            self.role,
            self.refused.join(" and ")
        ))
    }

    /// What a plugin granted `source` could do that it should rarely need; `None` if nothing.
    pub(super) fn warning(&self, source: &str) -> Option<String> {
        if self.warned.is_empty() {
            return None;
        }
        Some(format!(
            "sql source {source:?} connects as role {:?}, which {}; a plugin granted the source \
             can do the same. Give the source a role without these unless its plugins need them",
            self.role,
            self.warned.join(", ")
        ))
    }
}

/// Whether `url` is a PostgreSQL URL.
pub(super) fn is_url(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

/// Whether two PostgreSQL URLs name the same host, port and database (the user's name when
/// the URL names none, as PostgreSQL does).
pub(super) fn same_database_by_url(source: &str, host: &str) -> bool {
    use std::str::FromStr;
    if !is_url(source) || !is_url(host) {
        return false;
    }
    let (Ok(source), Ok(host)) = (
        PgConnectOptions::from_str(source),
        PgConnectOptions::from_str(host),
    ) else {
        return false;
    };
    let database = |options: &PgConnectOptions| {
        options
            .get_database()
            .unwrap_or(options.get_username())
            .to_owned()
    };
    source.get_host().eq_ignore_ascii_case(host.get_host())
        && source.get_port() == host.get_port()
        && database(&source) == database(&host)
}

/// Which database of which running server a connection reaches, as any role may read it: the
/// database's name and oid, and the server's start time to the microsecond, which tells two
/// servers apart however they are reached.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct DatabaseIdentity {
    name: String,
    oid: i64,
    server_started_micros: i64,
}

impl DatabaseIdentity {
    pub(super) async fn of(connection: &mut PgConnection) -> Result<DatabaseIdentity, sqlx::Error> {
        let (name, oid, server_started_micros) = sqlx::query_as(
            "SELECT d.datname::text, d.oid::bigint, \
             (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint \
             FROM pg_database d WHERE d.datname = current_database()",
        )
        .persistent(false)
        .fetch_one(&mut *connection)
        .await?;
        Ok(DatabaseIdentity {
            name,
            oid,
            server_started_micros,
        })
    }
}

/// The identity of the host's own PostgreSQL database.
async fn host_identity_of(url: &str) -> anyhow::Result<DatabaseIdentity> {
    let mut connection = PgConnection::connect(url)
        .await
        .map_err(|error| anyhow::anyhow!("connecting to the host's database: {error}"))?;
    DatabaseIdentity::of(&mut connection)
        .await
        .map_err(|error| anyhow::anyhow!("reading the host's database identity: {error}"))
}

/// Runs one plugin query in a transaction of its own, then resets the session.
pub(super) async fn query(
    connection: PoolConnection<Postgres>,
    source: &str,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    if let Some(refusal) = refuse_unwrappable(statement) {
        return Err(QueryError::Guest(refusal));
    }
    let deadline = Instant::now() + limits.timeout;
    let mut held = ResetOrClosed {
        connection,
        reset: false,
    };
    let result = run(
        &mut held.connection,
        source,
        read_only,
        statement,
        params,
        limits,
        deadline,
    )
    .await
    .map_err(|error| explain_refusal(error, source, read_only));
    // Outside any transaction (a failed one has been rolled back by now).
    held.reset = sqlx::query("DISCARD ALL")
        .persistent(false)
        .execute(&mut *held.connection)
        .await
        .is_ok();
    result
}

/// A pooled connection that goes back to the pool only once `DISCARD ALL` has reset its
/// session. Dropped before that (the host's time limit cut the query short, the reset failed),
/// it is closed instead: its session may still hold what the query took, an advisory lock say,
/// and a query whose answer was still on the way may have finished after all.
struct ResetOrClosed {
    connection: PoolConnection<Postgres>,
    reset: bool,
}

impl Drop for ResetOrClosed {
    fn drop(&mut self) {
        if !self.reset {
            self.connection.close_on_drop();
        }
    }
}

/// How much earlier than the host's time limit the server stops the plugin's statement
/// (`statement_timeout`): time for its error, the rollback and `DISCARD ALL` to come back, so
/// that a query that runs too long ends with a reset connection rather than a closed one.
fn statement_timeout_margin(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(250))
}

async fn run(
    connection: &mut PgConnection,
    source: &str,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
    deadline: Instant,
) -> Result<RowSet, QueryError> {
    let mut transaction = connection.begin().await?;
    // Again on every query: the role may have been granted more since the host started.
    if let Some(refusal) = RolePowers::of(&mut transaction).await?.refusal(source) {
        return Err(QueryError::Guest(SqlError::Denied(refusal)));
    }
    if read_only {
        sqlx::query("SET TRANSACTION READ ONLY")
            .persistent(false)
            .execute(&mut *transaction)
            .await?;
    }
    let statement_timeout = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(statement_timeout_margin(limits.timeout))
        .as_millis()
        // 0 would be no limit at all.
        .max(1);
    let set_timeout = format!("SET LOCAL statement_timeout = {statement_timeout}");
    sqlx::query(&set_timeout)
        .persistent(false)
        .execute(&mut *transaction)
        .await?;
    let mut set = RowSet {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    let mut bytes = ResultBytes::new(limits.max_result_bytes);
    {
        // Not persistent: the plugin's statement is never cached on the connection, so
        // `DISCARD ALL` (which drops prepared statements) leaves sqlx's cache truthful. The
        // extended protocol also refuses more than one statement.
        let guarded = guard_result_size(statement, limits.max_result_bytes, params.len() + 1);
        let query = bind_params!(sqlx::query(&guarded).persistent(false), params).bind(format!(
            "{GUARD_STOP} {} bytes exceeded (the database server stopped the query at %s bytes)",
            limits.max_result_bytes
        ));
        let mut stream = query.fetch(&mut *transaction);
        while let Some(row) = stream.try_next().await? {
            if set.rows.len() == limits.max_rows {
                return Err(too_many_rows(limits.max_rows));
            }
            if set.columns.is_empty() {
                set.columns = column_names(&row);
                set.columns.pop();
            }
            let mut values = values(&row)?;
            values.pop();
            bytes.add(&values)?;
            set.rows.push(values);
        }
    }
    transaction.commit().await?;
    Ok(set)
}

/// Name of the column the size guard adds; removed from what the plugin sees.
const GUARD_COLUMN: &str = "stepwise_result_size_guard";

/// How the size guard's error starts.
const GUARD_STOP: &str = "sql result size limit of";

/// A query's rows are built on the database server; the host only reads them, and sqlx reads
/// a row whole before the host could count it (a 300 MB value, or a small compressed one that
/// is sent decompressed). So every statement runs inside a wrapper whose running total of the
/// rows' text stops the query on the server, with an error, at the row that passes the limit,
/// before that row is sent. What cannot stand inside `WITH … AS (…)` (`SHOW`, DDL, a write
/// without `RETURNING`) does not run at all ([`refuse_unwrappable`], [`explain_refusal`]).
///
/// The plugin's text cannot leave the wrapper: what follows it holds no quote, dollar quote or
/// comment end that could close something the text left open (the server then refuses the
/// statement as unterminated; the guard's message is a bound parameter for that reason), and
/// the newline ends a trailing `--` comment. A text that closes the parenthesis early must
/// open another for the wrapper's to close, which leaves the wrapper's `SELECT` as the last
/// part of the statement, guard and all: after `WITH …` only more common table expressions
/// or an `INSERT INTO t (columns)`, which returns nothing, can take `) SELECT …` as their end.
fn guard_result_size(statement: &str, limit: usize, message_param: usize) -> String {
    let body = statement.trim_end().trim_end_matches(';');
    // Casting the message to an integer fails with the message in the error, which is how a
    // plain query can raise one. The running size in the text keeps the planner from folding
    // the cast (and failing) before any row exists.
    let running = "sum(octet_length(stepwise_result::text)) OVER stepwise_rows";
    format!(
        "WITH stepwise_result AS (\n{body}\n) SELECT stepwise_result.*, CASE WHEN {running} > {limit} \
         THEN CAST(format(${message_param}::text, {running}) AS integer) END AS {GUARD_COLUMN} \
         FROM stepwise_result WINDOW stepwise_rows AS (ROWS UNBOUNDED PRECEDING)"
    )
}

/// Statements that cannot stand inside `WITH … AS (…)`, by their first keyword.
const UNWRAPPABLE: &[&str] = &[
    "abort",
    "alter",
    "analyze",
    "begin",
    "call",
    "checkpoint",
    "close",
    "cluster",
    "comment",
    "commit",
    "copy",
    "create",
    "deallocate",
    "declare",
    "discard",
    "do",
    "drop",
    "end",
    "execute",
    "explain",
    "fetch",
    "grant",
    "import",
    "listen",
    "load",
    "lock",
    "move",
    "notify",
    "prepare",
    "reassign",
    "refresh",
    "reindex",
    "release",
    "reset",
    "revoke",
    "rollback",
    "savepoint",
    "security",
    "set",
    "show",
    "start",
    "truncate",
    "unlisten",
    "vacuum",
];

/// Refuses, before anything is sent, a statement that the size guard cannot wrap, saying what
/// to write instead.
fn refuse_unwrappable(statement: &str) -> Option<SqlError> {
    let mut words = leading_words(statement);
    let keyword = words.next()?.to_ascii_lowercase();
    if !UNWRAPPABLE.contains(&keyword.as_str()) {
        return None;
    }
    let keyword = keyword.to_ascii_uppercase();
    Some(SqlError::QueryFailed(if keyword == "SHOW" {
        let setting = words.next().unwrap_or("name");
        format!(
            "SHOW cannot run as a plugin query; read the setting with SELECT current_setting('{setting}')"
        )
    } else {
        format!(
            "{keyword} cannot run as a plugin query: a query is one SELECT, VALUES, TABLE or \
             WITH, or on a writable source one INSERT, UPDATE or DELETE with RETURNING"
        )
    }))
}

/// The words that open `statement`, after white space, comments (nested, as PostgreSQL
/// reads them) and opening parentheses.
fn leading_words(statement: &str) -> impl Iterator<Item = &str> {
    let mut rest = statement;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(comment) = rest.strip_prefix("--") {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if rest.starts_with("/*") {
            rest = after_block_comment(rest);
        } else {
            break;
        }
    }
    rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .take_while(|word| !word.is_empty())
}

/// What follows the block comment that opens `text`.
fn after_block_comment(text: &str) -> &str {
    let mut depth = 0usize;
    let mut index = 0;
    let bytes = text.as_bytes();
    while index + 1 < bytes.len() {
        match &bytes[index..index + 2] {
            b"/*" => {
                depth += 1;
                index += 2;
            }
            b"*/" => {
                depth -= 1;
                index += 2;
                if depth == 0 {
                    return &text[index..];
                }
            }
            _ => index += 1,
        }
    }
    ""
}

/// What the server's refusal of the wrapped statement means for the plugin: the guard's stop
/// is the result size limit (with the size the server counted), and a write without
/// `RETURNING` is told what to add, or on a read-only source that it may not write at all
/// (the server finds the missing `RETURNING` before the read-only transaction could refuse).
fn explain_refusal(error: QueryError, source: &str, read_only: bool) -> QueryError {
    let QueryError::Database(database) = &error else {
        return error;
    };
    let Some(database) = database.as_database_error() else {
        return error;
    };
    let message = database.message();
    if let Some(start) = message.find(GUARD_STOP) {
        return QueryError::Guest(SqlError::LimitExceeded(
            message[start..].trim_end_matches('"').to_owned(),
        ));
    }
    // 0A000 = feature_not_supported, which a data-modifying WITH without RETURNING raises.
    if database.code().as_deref() == Some("0A000") && message.contains("RETURNING") {
        if read_only {
            return QueryError::Guest(SqlError::ReadOnly(format!(
                "sql source {source:?} is read-only: it takes no INSERT, UPDATE or DELETE"
            )));
        }
        return QueryError::Guest(SqlError::QueryFailed(
            "a write on a PostgreSQL source must return its rows: add RETURNING (e.g. RETURNING \
             id), or count them with WITH changed AS (… RETURNING 1) SELECT count(*) FROM changed"
                .into(),
        ));
    }
    error
}

/// A row's values as the guest sees them; a type without a mapping is the query's error.
fn values(row: &PgRow) -> Result<Vec<Value>, QueryError> {
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
                "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "UNKNOWN" => {
                    Value::Text(row.try_get(index)?)
                }
                other => {
                    let column = row.columns()[index].name();
                    return Err(unconvertible(column, other, "COLUMN::text"));
                }
            };
            Ok(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_is_wrapped() {
        let guarded = guard_result_size("  select 1 as a; ", 10, 3);
        assert!(
            guarded.starts_with("WITH stepwise_result AS (\n  select 1 as a\n) SELECT"),
            "{guarded}"
        );
        assert!(guarded.contains("> 10"));
        assert!(guarded.contains("format($3::text"));
        for statement in [
            "/**/ SELECT 1",
            "(SELECT 1)",
            "INSERT INTO t VALUES (1) RETURNING *",
        ] {
            let guarded = guard_result_size(statement, 10, 1);
            assert!(guarded.contains(&format!("(\n{statement}\n)")), "{guarded}");
        }
    }

    #[test]
    fn what_follows_the_plugins_text_can_close_nothing_it_opened() {
        let suffix = guard_result_size("", 10, 1);
        let suffix = suffix.trim_start_matches("WITH stepwise_result AS (\n");
        assert!(suffix.starts_with('\n'));
        for opener_end in ["'", "\"", "$$", "*/"] {
            assert!(!suffix.contains(opener_end), "{opener_end} in {suffix}");
        }
    }

    #[test]
    fn urls_of_the_same_database_are_recognised() {
        let host = "postgres://stepwise@db.internal:5432/stepwise";
        for source in [
            "postgres://reader@DB.internal/stepwise",
            "postgresql://reader:secret@db.internal:5432/stepwise?sslmode=require",
        ] {
            assert!(same_database_by_url(source, host), "{source}");
        }
        for source in [
            "postgres://reader@db.internal/warehouse",
            "postgres://reader@db.internal:5433/stepwise",
            "postgres://reader@other.internal/stepwise",
            "sqlite://stepwise.db",
        ] {
            assert!(!same_database_by_url(source, host), "{source}");
        }
        assert!(same_database_by_url(
            "postgres://stepwise@db.internal/",
            "postgres://other@db.internal/stepwise"
        ));
    }

    #[test]
    fn what_cannot_be_wrapped_is_refused_with_what_to_write() {
        let refusal = |statement| match refuse_unwrappable(statement) {
            Some(SqlError::QueryFailed(message)) => message,
            other => panic!("{statement}: {other:?}"),
        };
        assert!(refusal("show search_path").contains("SELECT current_setting('search_path')"));
        assert!(
            refusal(" /* a /* nested */ comment */ -- and a line\n(CREATE TABLE t (a int)")
                .starts_with("CREATE cannot run")
        );
        for statement in [
            "SELECT 1",
            "with a AS (SELECT 1) SELECT * FROM a",
            "/* create */ SELECT 1",
            "-- drop\nVALUES (1)",
            "(TABLE t)",
            "UPDATE t SET a = 1 RETURNING a",
        ] {
            assert!(refuse_unwrappable(statement).is_none(), "{statement}");
        }
    }
}
