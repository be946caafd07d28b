//! Confinement of a PostgreSQL data source. "Read-only" is the database's own `READ ONLY`
//! transaction, which is not enough against a privileged role: a superuser's read-only
//! transaction still runs `COPY … TO PROGRAM` and reads server files. So a read-only source's
//! role is checked at start (the host refuses to start) and again in every query's
//! transaction (the query fails), and refused when it could reach beyond the database. Each query runs alone in its transaction with a time limit and
//! is followed by `DISCARD ALL`, which the plugin's statement cannot undo, so no session
//! setting, prepared statement, cursor or lock outlives it on the pooled connection.

use futures::TryStreamExt;
use sqlx::postgres::{PgConnection, Postgres};
use sqlx::{Connection, Row};

use super::{QueryError, QueryLimits, ResultBytes, column_names, postgres_values, too_many_rows};
use crate::bindings::sql::{RowSet, SqlError, Value};

/// Starts the text of a refusal.
const REFUSED: &str = "stepwise refuses this role for a read-only source";

/// Fails when the connection's role is a superuser or may run programs or touch files on the
/// database server. The message names the source and how to fix it.
pub(super) async fn refuse_privileged_role(
    connection: &mut PgConnection,
    source: &str,
) -> Result<(), sqlx::Error> {
    let row = sqlx::query(
        "SELECT current_user::text, rolsuper, \
         pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER'), \
         pg_has_role(current_user, 'pg_read_server_files', 'MEMBER'), \
         pg_has_role(current_user, 'pg_write_server_files', 'MEMBER') \
         FROM pg_roles WHERE rolname = current_user",
    )
    .persistent(false)
    .fetch_one(&mut *connection)
    .await?;
    let role: String = row.try_get(0)?;
    let mut powers = Vec::new();
    for (index, power) in [
        (1, "is a superuser"),
        (2, "is a member of pg_execute_server_program"),
        (3, "is a member of pg_read_server_files"),
        (4, "is a member of pg_write_server_files"),
    ] {
        if row.try_get::<bool, _>(index)? {
            powers.push(power);
        }
    }
    if powers.is_empty() {
        return Ok(());
    }
    Err(sqlx::Error::Configuration(
        format!(
            "{REFUSED}: sql source {source:?} connects as role {role:?}, which {}; a plugin \
             could run programs or read files on the database server through it. Connect as a \
             role that may only read, e.g. `CREATE ROLE stepwise_reader LOGIN PASSWORD '…'; \
             GRANT USAGE ON SCHEMA public TO stepwise_reader; GRANT SELECT ON ALL TABLES IN \
             SCHEMA public TO stepwise_reader;`, and use it in the source's url",
            powers.join(" and ")
        )
        .into(),
    ))
}

/// The refusal's text without sqlx's prefix.
pub(super) fn refusal_message(error: &sqlx::Error) -> String {
    let text = error.to_string();
    match text.find(REFUSED) {
        Some(start) => text[start..].to_owned(),
        None => text,
    }
}

/// Runs one plugin query in a transaction of its own, then resets the session.
pub(super) async fn query(
    mut connection: sqlx::pool::PoolConnection<Postgres>,
    source: &str,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    let result = run(
        &mut connection,
        source,
        read_only,
        statement,
        params,
        limits,
    )
    .await;
    // Outside any transaction (a failed one has been rolled back by now). If the reset
    // fails, the connection is not trusted again.
    let reset = sqlx::query("DISCARD ALL")
        .persistent(false)
        .execute(&mut *connection)
        .await;
    if reset.is_err() {
        connection.close_on_drop();
    }
    result
}

async fn run(
    connection: &mut PgConnection,
    source: &str,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    let mut transaction = connection.begin().await?;
    if read_only {
        // Again on every query: the role may have been granted more since the host started.
        if let Err(refusal) = refuse_privileged_role(&mut transaction, source).await {
            return Err(QueryError::Guest(SqlError::Denied(refusal_message(
                &refusal,
            ))));
        }
        sqlx::query("SET TRANSACTION READ ONLY")
            .persistent(false)
            .execute(&mut *transaction)
            .await?;
    }
    let set_timeout = format!(
        "SET LOCAL statement_timeout = {}",
        limits.timeout.as_millis()
    );
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
        let guarded = guard_result_size(statement, limits.max_result_bytes);
        let query = bind_params!(sqlx::query(&guarded).persistent(false), params);
        let mut stream = query.fetch(&mut *transaction);
        while let Some(row) = stream.try_next().await? {
            if set.rows.len() == limits.max_rows {
                return Err(too_many_rows(limits.max_rows));
            }
            if set.columns.is_empty() {
                set.columns = column_names(&row);
                set.columns
                    .truncate(row.len() - usize::from(guarded != statement));
            }
            let mut values = postgres_values(&row)?;
            if guarded != statement {
                values.pop();
            }
            bytes.add(&values)?;
            set.rows.push(values);
        }
    }
    transaction.commit().await?;
    Ok(set)
}

/// Name of the column the size guard adds; removed from what the plugin sees.
const GUARD_COLUMN: &str = "stepwise_result_size_guard";

/// A query's rows are built on the database server; the host only reads them. A `SELECT`
/// (or `VALUES`, `TABLE`, `WITH`) is wrapped so that the server itself stops with an error
/// once the running size of the rows passes the limit, before such a row is ever sent:
/// sqlx would otherwise read a 300 MB value whole before the host could count it. Other
/// statements (`SHOW`, writes with `RETURNING` on a writable source) run as they are, and
/// their rows are counted as they arrive.
fn guard_result_size(statement: &str, limit: usize) -> String {
    let body = statement.trim().trim_end_matches(';').trim_end();
    let first_word: String = body
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    if !matches!(first_word.as_str(), "select" | "values" | "table" | "with") || body.contains(';')
    {
        return statement.to_owned();
    }
    // Casting the message to an integer fails with the message in the error, which is how
    // a plain query can raise one. The running size in the text keeps the planner from
    // folding the cast (and failing) before any row exists; the newline ends a trailing `--`.
    format!(
        "SELECT stepwise_result.*, CASE WHEN sum(pg_column_size(stepwise_result.*)) OVER stepwise_rows > {limit} \
         THEN CAST(format('sql result size limit of {limit} bytes exceeded (%s bytes)', \
         sum(pg_column_size(stepwise_result.*)) OVER stepwise_rows) AS integer) END AS {GUARD_COLUMN} \
         FROM (\n{body}\n) AS stepwise_result WINDOW stepwise_rows AS (ROWS UNBOUNDED PRECEDING)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_guarded_and_other_statements_left_alone() {
        let guarded = guard_result_size("  select 1 as a; ", 10);
        assert!(guarded.contains("FROM (\nselect 1 as a\n)"), "{guarded}");
        assert!(guarded.contains("> 10"));
        assert_eq!(
            guard_result_size("SHOW search_path", 10),
            "SHOW search_path"
        );
        assert_eq!(
            guard_result_size("INSERT INTO t VALUES (1) RETURNING *", 10),
            "INSERT INTO t VALUES (1) RETURNING *"
        );
    }
}
