//! Writes described once, for either driver: statements with `$n` placeholders and their
//! values, run through a [`Tx`]. `runs.rs`, `outbox.rs` and `retention.rs` describe what a
//! new run, a tick, a run's notifications and a deletion write; a sqlx transaction (both
//! backends, [`SqlxTx`]) or the SQLite writer thread's connection runs them, so a column
//! added to a write is added in one place.

use std::borrow::Cow;
use std::fmt::Write;

use sqlx::any::AnyArguments;
use sqlx::{AnyConnection, Arguments};

use super::Result;

/// A value bound to a placeholder. A null keeps its type: PostgreSQL refuses an integer
/// null for a text column.
#[derive(Debug, Clone)]
pub(super) enum Value<'a> {
    Int(Option<i64>),
    Text(Option<Cow<'a, str>>),
    Bytes(Option<Cow<'a, [u8]>>),
}

impl From<i64> for Value<'_> {
    fn from(value: i64) -> Self {
        Value::Int(Some(value))
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(value: Option<i64>) -> Self {
        Value::Int(value)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(text: &'a str) -> Self {
        Value::Text(Some(Cow::Borrowed(text)))
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(text: Option<&'a str>) -> Self {
        Value::Text(text.map(Cow::Borrowed))
    }
}

impl From<Option<String>> for Value<'_> {
    fn from(text: Option<String>) -> Self {
        Value::Text(text.map(Cow::Owned))
    }
}

impl<'a> From<Option<&'a [u8]>> for Value<'a> {
    fn from(bytes: Option<&'a [u8]>) -> Self {
        Value::Bytes(bytes.map(Cow::Borrowed))
    }
}

impl From<String> for Value<'_> {
    fn from(text: String) -> Self {
        Value::Text(Some(Cow::Owned(text)))
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Int(Some(value)) => ValueRef::Integer(*value),
            Value::Text(Some(text)) => ValueRef::Text(text.as_bytes()),
            Value::Bytes(Some(bytes)) => ValueRef::Blob(bytes),
            Value::Int(None) | Value::Text(None) | Value::Bytes(None) => ValueRef::Null,
        }))
    }
}

/// `values` as sqlx arguments.
pub(super) fn arguments<'q>(values: &[Value<'_>]) -> AnyArguments<'q> {
    let mut arguments = AnyArguments::default();
    for value in values {
        add(&mut arguments, value);
    }
    arguments
}

fn add(arguments: &mut AnyArguments<'_>, value: &Value<'_>) {
    // Adding an integer, a text, bytes or a null to `AnyArguments` cannot fail.
    let _ = match value {
        Value::Int(value) => arguments.add(*value),
        Value::Text(text) => arguments.add(text.as_deref().map(str::to_owned)),
        Value::Bytes(bytes) => arguments.add(bytes.as_deref().map(<[u8]>::to_vec)),
    };
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

    /// Binds `value` to a new placeholder at the end of the text.
    pub(super) fn bind<'v>(&mut self, value: impl Into<Value<'v>>) -> &mut Statement<'q> {
        add(&mut self.arguments, &value.into());
        let _ = write!(self.sql, "${}", self.arguments.len());
        self
    }
}

/// Most bind parameters in one statement (SQLite allows 32,766, PostgreSQL 65,535).
const MAX_BINDS: usize = 30_000;

/// Where a described write runs, inside a transaction that the caller begins and ends.
pub(super) trait Tx {
    /// Runs `sql`; the number of rows it changed.
    async fn execute(&mut self, sql: &str, values: &[Value<'_>]) -> Result<u64>;

    /// Runs `sql`, which returns one row of two integers.
    async fn query_pair(&mut self, sql: &str, values: &[Value<'_>]) -> Result<(i64, i64)>;

    /// Inserts rows of `columns` values each (`values` holds them one after the other) with
    /// `head`, an `INSERT … VALUES ` whose value lists follow.
    async fn insert(
        &mut self,
        head: &'static str,
        columns: usize,
        values: &[Value<'_>],
    ) -> Result<()>;
}

/// A sqlx connection inside its transaction.
pub(super) struct SqlxTx<'c>(pub &'c mut AnyConnection);

impl Tx for SqlxTx<'_> {
    async fn execute(&mut self, sql: &str, values: &[Value<'_>]) -> Result<u64> {
        let done = sqlx::query_with(sql, arguments(values))
            .execute(&mut *self.0)
            .await?;
        Ok(done.rows_affected())
    }

    async fn query_pair(&mut self, sql: &str, values: &[Value<'_>]) -> Result<(i64, i64)> {
        Ok(sqlx::query_as_with(sql, arguments(values))
            .fetch_one(&mut *self.0)
            .await?)
    }

    /// Many rows in one statement (as many as the bind limit allows): every statement is a
    /// round trip to the connection.
    async fn insert(
        &mut self,
        head: &'static str,
        columns: usize,
        values: &[Value<'_>],
    ) -> Result<()> {
        let rows_per_statement = (MAX_BINDS / columns).max(1);
        for rows in values.chunks(columns * rows_per_statement) {
            let mut statement = Statement::new(head.to_owned());
            for (index, row) in rows.chunks(columns).enumerate() {
                statement.push(if index == 0 { "(" } else { ", (" });
                for (column, value) in row.iter().enumerate() {
                    if column > 0 {
                        statement.push(", ");
                    }
                    statement.bind(value.clone());
                }
                statement.push(")");
            }
            sqlx::query_with(&statement.sql, statement.arguments)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }
}

/// `$first, $first+1, …` for `count` values: an `IN (…)` list.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A statement's placeholders for one row of `columns` values: `($1, $2, …)`.
pub(super) fn one_row(head: &str, columns: usize) -> String {
    let values: Vec<String> = (1..=columns).map(|n| format!("${n}")).collect();
    format!("{head}({})", values.join(", "))
}
