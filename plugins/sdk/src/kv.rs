//! Typed reads of the Redis sources granted to the plugin: one function per read command.
//! Keys, fields, members and patterns go as text; what comes back is bytes, as Redis keeps
//! them (`text` turns a value into a `String`). Errors have the same kinds as [`crate::sql`]'s.

use crate::bindings::stepwise::plugin::kv as host;

/// Field-value pairs (a hash, a stream entry), as Redis keeps them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
pub use crate::bindings::stepwise::plugin::kv::{KvError, ScanPage, ScoredMember, StreamEntry};

/// `GET`: the value, or `None` if there is no such key.
pub fn get(source: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
    host::get(source, key)
}

/// `GET` as text (invalid UTF-8 replaced), or `None` if there is no such key.
pub fn get_text(source: &str, key: &str) -> Result<Option<String>, KvError> {
    Ok(get(source, key)?.map(|value| text(&value)))
}

/// `MGET`: each key's value, in order.
pub fn mget(source: &str, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
    host::mget(source, keys)
}

/// `EXISTS` of one key.
pub fn exists(source: &str, key: &str) -> Result<bool, KvError> {
    host::exists(source, key)
}

/// `TTL`: seconds left; -1 without an expiry, -2 for no such key.
pub fn ttl(source: &str, key: &str) -> Result<i64, KvError> {
    host::ttl(source, key)
}

/// `TYPE`: "string", "list", "set", "zset", "hash", "stream", or "none".
pub fn r#type(source: &str, key: &str) -> Result<String, KvError> {
    host::type_(source, key)
}

/// `HGET`.
pub fn hget(source: &str, key: &str, field: &str) -> Result<Option<Vec<u8>>, KvError> {
    host::hget(source, key, field)
}

/// `HGETALL`: field-value pairs.
pub fn hgetall(source: &str, key: &str) -> Result<Pairs, KvError> {
    host::hgetall(source, key)
}

/// `HMGET`: each field's value, in order.
pub fn hmget(source: &str, key: &str, fields: &[String]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
    host::hmget(source, key, fields)
}

/// `SMEMBERS`.
pub fn smembers(source: &str, key: &str) -> Result<Vec<Vec<u8>>, KvError> {
    host::smembers(source, key)
}

/// `SISMEMBER`.
pub fn sismember(source: &str, key: &str, member: &str) -> Result<bool, KvError> {
    host::sismember(source, key, member)
}

/// `SCARD`.
pub fn scard(source: &str, key: &str) -> Result<u64, KvError> {
    host::scard(source, key)
}

/// `LRANGE` (inclusive; negative indexes count from the end).
pub fn lrange(source: &str, key: &str, start: i64, stop: i64) -> Result<Vec<Vec<u8>>, KvError> {
    host::lrange(source, key, start, stop)
}

/// `LLEN`.
pub fn llen(source: &str, key: &str) -> Result<u64, KvError> {
    host::llen(source, key)
}

/// `ZRANGE … WITHSCORES` by rank (inclusive; negative indexes count from the end).
pub fn zrange(
    source: &str,
    key: &str,
    start: i64,
    stop: i64,
) -> Result<Vec<ScoredMember>, KvError> {
    host::zrange(source, key, start, stop)
}

/// `ZSCORE`.
pub fn zscore(source: &str, key: &str, member: &str) -> Result<Option<f64>, KvError> {
    host::zscore(source, key, member)
}

/// `ZCARD`.
pub fn zcard(source: &str, key: &str) -> Result<u64, KvError> {
    host::zcard(source, key)
}

/// `XRANGE key start end COUNT count` (`"-"` and `"+"` for the ends; count 1 to 10000).
pub fn xrange(
    source: &str,
    key: &str,
    start: &str,
    end: &str,
    count: u32,
) -> Result<Vec<StreamEntry>, KvError> {
    host::xrange(source, key, start, end, count)
}

/// `XREVRANGE key end start COUNT count`, newest first.
pub fn xrevrange(
    source: &str,
    key: &str,
    end: &str,
    start: &str,
    count: u32,
) -> Result<Vec<StreamEntry>, KvError> {
    host::xrevrange(source, key, end, start, count)
}

/// `SCAN cursor [MATCH pattern] COUNT count` (count 1 to 1000): one page of keys. Start with
/// cursor `"0"`; the scan is complete when the page's cursor is `"0"` again.
pub fn scan(
    source: &str,
    cursor: &str,
    pattern: Option<&str>,
    count: u32,
) -> Result<ScanPage, KvError> {
    host::scan(source, cursor, pattern, count)
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A readable message for an error, starting with its kind (`denied`, `limit exceeded`, …),
/// as [`crate::sql::error_message`] writes them.
pub fn error_message(error: &KvError) -> String {
    match error {
        KvError::Denied(message) => format!("denied: {message}"),
        KvError::ReadOnly(message) => format!("read-only: {message}"),
        KvError::LimitExceeded(message) => format!("limit exceeded: {message}"),
        KvError::QueryFailed(message) => format!("query failed: {message}"),
    }
}
