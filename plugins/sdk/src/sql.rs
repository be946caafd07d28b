//! Queries on the data sources granted to the plugin. Parameters are bound by the host, never
//! interpolated: `?` placeholders on SQLite, `$1, $2, …` on PostgreSQL.

use serde_json::{Map, Value as Json};

pub use crate::bindings::stepwise::plugin::sql::{RowSet, SqlError, Value};

/// Runs `statement` on `source` with `params` bound in order.
pub fn query(source: &str, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
    crate::bindings::stepwise::plugin::sql::query(source, statement, params)
}

/// A readable message for an error, starting with its kind (`denied`, `read-only`, …).
pub fn error_message(error: &SqlError) -> String {
    match error {
        SqlError::Denied(message) => format!("denied: {message}"),
        SqlError::ReadOnly(message) => format!("read-only: {message}"),
        SqlError::LimitExceeded(message) => format!("limit exceeded: {message}"),
        SqlError::QueryFailed(message) => format!("query failed: {message}"),
    }
}

/// A value as JSON (bytes become an array of numbers).
pub fn value_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Int(number) => Json::from(*number),
        Value::Float(number) => Json::from(*number),
        Value::Text(text) => Json::from(text.as_str()),
        Value::Bytes(bytes) => Json::from(bytes.clone()),
        Value::Boolean(flag) => Json::from(*flag),
    }
}

/// A JSON scalar as a parameter; arrays and objects are passed as their JSON text.
pub fn value_from_json(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(flag) => Value::Boolean(*flag),
        Json::Number(number) => match number.as_i64() {
            Some(integer) => Value::Int(integer),
            None => Value::Float(number.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(text) => Value::Text(text.clone()),
        other => Value::Text(other.to_string()),
    }
}

/// Each row as a JSON object keyed by column name.
pub fn rows_as_objects(rows: &RowSet) -> Vec<Map<String, Json>> {
    rows.rows
        .iter()
        .map(|row| {
            rows.columns
                .iter()
                .cloned()
                .zip(row.iter().map(value_to_json))
                .collect()
        })
        .collect()
}
