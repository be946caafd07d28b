//! MySQL and MariaDB data sources: the pool, the checks at start, the query and its values.
//! Confinement rests on the server's own rules, checked rather than trusted: the account's
//! privileges (`SHOW GRANTS`, at start and in every query) may not reach files, other
//! sessions or the server's settings, and on a read-only source may do nothing but read;
//! each query runs alone in a `START TRANSACTION [READ ONLY]` under the server's own
//! statement timer. A query is one prepared statement (the binary protocol takes exactly
//! one, and neither `LOAD DATA` nor anything that is not a query of the source), and it has a
//! session of its own: sqlx cannot send `COM_RESET_CONNECTION`, so the connection is closed
//! after the query, which nothing the query did (user variables, `GET_LOCK`, session
//! settings) survives. A connection the host had to cut short is ended on the server too.
//! Replies reach sqlx through the host's [`relay`], which refuses a row larger than the
//! query's result budget before any of it is read.

mod relay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sqlx::mysql::{
    MySql, MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions, MySqlRow,
    MySqlSslMode,
};
use sqlx::pool::PoolConnection;
use sqlx::{Column, ConnectOptions, Connection, Executor, Row, TypeInfo, ValueRef};

use self::relay::Relay;
use super::{
    POOL_WAIT, QueryError, QueryLimits, ResultBytes, column_names, result_too_big, too_many_rows,
    unconvertible,
};
use crate::bindings::sql::{RowSet, SqlError, Value};
use crate::config::SourceConfig;

/// Whether `url` is a MySQL or MariaDB URL.
pub(super) fn is_url(url: &str) -> bool {
    url.starts_with("mysql:") || url.starts_with("mariadb:")
}

/// A MySQL source: its pool, connecting lazily (a connection serves one query and is
/// closed), and the relay its connections go through.
pub(super) struct Source {
    pub(super) pool: MySqlPool,
    relay: Option<Arc<Relay>>,
}

impl Source {
    /// Has the relay accept on the current runtime (once), before the pool first connects.
    pub(super) fn start_relay(&self) -> std::io::Result<()> {
        self.relay.as_ref().map_or(Ok(()), |relay| relay.serve())
    }
}

/// The largest part of a row's packet that is not its values as the host counts them
/// (`ResultBytes`): the packet's header, the null bitmap and a length prefix of up to nine
/// bytes for each of at most 4,096 columns. A row the result budget admits is never cut.
const ROW_OVERHEAD: usize = 64 << 10;

/// The source's pool and, unless the URL asks for TLS or a Unix socket of the server (the
/// relay reads the protocol in the clear, over TCP), its relay.
pub(super) fn source(config: &SourceConfig) -> Result<Source, String> {
    let options = options(&config.url)?;
    let url = options.to_url_lossy();
    let setting = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    let direct = setting("socket").is_some()
        || !matches!(
            setting("ssl-mode").as_deref(),
            None | Some("DISABLED" | "PREFERRED")
        );
    let (options, relay) = if direct {
        (options, None)
    } else {
        let relay = Relay::bind(options.get_host(), options.get_port())
            .map_err(|error| format!("starting the host's relay for the source: {error}"))?;
        let options = options
            .socket(relay.socket())
            .ssl_mode(MySqlSslMode::Disabled);
        (options, Some(Arc::new(relay)))
    };
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(POOL_WAIT)
        .connect_lazy_with(options);
    Ok(Source { pool, relay })
}

fn options(url: &str) -> Result<MySqlConnectOptions, String> {
    use std::str::FromStr;
    // sqlx reads `mysql://`; MariaDB's own name for the scheme is accepted too.
    let url = match url.strip_prefix("mariadb:") {
        Some(rest) => format!("mysql:{rest}"),
        None => url.to_owned(),
    };
    Ok(MySqlConnectOptions::from_str(&url)
        .map_err(|error| error.to_string())?
        // The plugin's statement is never cached: the connection is closed after it anyway.
        .statement_cache_capacity(0))
}

/// Refuses an account with powers no source may have, or, for a read-only source, any
/// privilege beyond reading (see [`Privileges`]). A source that cannot be reached is only
/// logged: every query checks the account again.
pub(super) async fn check_at_start(name: &str, url: &str, read_only: bool) -> anyhow::Result<()> {
    let options = options(url).map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
    let mut connection = match tokio::time::timeout(Duration::from_secs(5), options.connect()).await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::warn!(source = %name, %error, "sql source unreachable at start; every query checks its account");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(source = %name, "sql source did not answer within 5 s at start; every query checks its account");
            return Ok(());
        }
    };
    let privileges = Privileges::of(&mut connection)
        .await
        .map_err(|error| anyhow::anyhow!("source {name}: reading its account's grants: {error}"))?;
    let _ = connection.close().await;
    if let Some(refusal) = privileges.refusal(name, read_only) {
        anyhow::bail!("{refusal}");
    }
    Ok(())
}

/// Starts the text of a refusal.
const REFUSED: &str = "stepwise refuses this account for a sql source";

/// Privileges that reach beyond the source's tables: files on the server, other sessions, the
/// server's settings, other accounts. No source's account may hold one. MariaDB's and MySQL's
/// finer administrative privileges (`CONNECTION ADMIN`, `SYSTEM_VARIABLES_ADMIN`, …) are
/// refused by their `ADMIN`.
const REFUSED_PRIVILEGES: &[&str] = &[
    "ALL",
    "ALL PRIVILEGES",
    "FILE",
    "SUPER",
    "PROCESS",
    "SHUTDOWN",
    "CREATE USER",
    "GRANT OPTION",
    "RELOAD",
    "PROXY",
    "SET USER",
];

/// What a read-only source's account may hold: nothing but reading.
const READ_PRIVILEGES: &[&str] = &["USAGE", "SELECT", "SHOW VIEW", "SHOW DATABASES"];

/// How many roles deep the grants of an account's roles are followed.
const ROLE_DEPTH: usize = 8;

/// The privileges of the connection's account, with those of its roles.
pub(super) struct Privileges {
    account: String,
    /// Upper case, as `SHOW GRANTS` spells them, without column lists; `GRANT OPTION` for
    /// `WITH GRANT OPTION`.
    held: Vec<String>,
    /// Roles whose grants could not be read: their powers are unknown.
    unreadable_roles: Vec<String>,
}

impl Privileges {
    pub(super) async fn of(connection: &mut MySqlConnection) -> Result<Privileges, sqlx::Error> {
        let account: String = sqlx::query("SELECT CURRENT_USER()")
            .persistent(false)
            .fetch_one(&mut *connection)
            .await?
            .try_get_unchecked(0)?;
        let mut held = Vec::new();
        let mut unreadable_roles = Vec::new();
        let mut roles = parse_grants(&show_grants(connection, None).await?, &mut held);
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..ROLE_DEPTH {
            let mut next = Vec::new();
            for role in roles.drain(..) {
                if seen.contains(&role) {
                    continue;
                }
                seen.push(role.clone());
                match show_grants(connection, Some(&role)).await {
                    Ok(lines) => next.extend(parse_grants(&lines, &mut held)),
                    Err(_) => unreadable_roles.push(role),
                }
            }
            roles = next;
        }
        unreadable_roles.extend(roles);
        held.sort();
        held.dedup();
        Ok(Privileges {
            account,
            held,
            unreadable_roles,
        })
    }

    /// Why `source` may not use this account, naming the fix; `None` if it may.
    pub(super) fn refusal(&self, source: &str, read_only: bool) -> Option<String> {
        let refused: Vec<&str> = self
            .held
            .iter()
            .map(String::as_str)
            .filter(|privilege| {
                REFUSED_PRIVILEGES.contains(privilege) || privilege.contains("ADMIN")
            })
            .collect();
        let beyond_reading: Vec<&str> = self
            .held
            .iter()
            .map(String::as_str)
            .filter(|privilege| !READ_PRIVILEGES.contains(privilege))
            .collect();
        let why = if !refused.is_empty() {
            format!(
                "holds {}, which reach beyond the source's tables (files on the database server, \
                 other sessions, the server's settings or other accounts)",
                refused.join(", ")
            )
        } else if !self.unreadable_roles.is_empty() {
            format!(
                "has the role {} whose grants cannot be read",
                self.unreadable_roles.join(", ")
            )
        } else if read_only && !beyond_reading.is_empty() {
            format!(
                "holds {} on a read-only source, which may only read",
                beyond_reading.join(", ")
            )
        } else {
            return None;
        };
        Some(format!(
            "{REFUSED}: sql source {source:?} connects as {}, which {why}. Connect as an account \
             that may only do what the source needs, e.g. `CREATE USER 'stepwise_reader'@'%' \
             IDENTIFIED BY '…'; GRANT SELECT ON warehouse.* TO 'stepwise_reader'@'%';`, and use \
             it in the source's url",
            self.account
        ))
    }
}

async fn show_grants(
    connection: &mut MySqlConnection,
    role: Option<&str>,
) -> Result<Vec<String>, sqlx::Error> {
    let statement = match role {
        None => "SHOW GRANTS".to_owned(),
        Some(role) => format!("SHOW GRANTS FOR `{}`", role.replace('`', "``")),
    };
    // The text protocol: `SHOW GRANTS FOR` is not preparable on every server.
    let rows = connection.fetch_all(statement.as_str()).await?;
    rows.iter()
        .map(|row| row.try_get_unchecked::<String, _>(0))
        .collect()
}

/// Adds the privileges of `SHOW GRANTS` lines to `held` and returns the roles they grant.
fn parse_grants(lines: &[String], held: &mut Vec<String>) -> Vec<String> {
    let mut roles = Vec::new();
    for line in lines {
        let Some(rest) = line.strip_prefix("GRANT ") else {
            continue;
        };
        if line.contains(" WITH GRANT OPTION") {
            held.push("GRANT OPTION".into());
        }
        match rest.split_once(" ON ") {
            Some((privileges, _)) => {
                let mut depth = 0usize;
                let mut name = String::new();
                for character in privileges.chars().chain([',']) {
                    match character {
                        '(' => depth += 1,
                        ')' => depth = depth.saturating_sub(1),
                        ',' if depth == 0 => {
                            held.push(std::mem::take(&mut name).trim().to_ascii_uppercase());
                        }
                        _ if depth == 0 => name.push(character),
                        _ => {}
                    }
                }
            }
            // `GRANT role, … TO account`.
            None => {
                let granted = rest.split(" TO ").next().unwrap_or_default();
                roles.extend(
                    granted
                        .split(',')
                        .map(|role| role.trim().trim_matches(['`', '\'']).to_owned())
                        .filter(|role| !role.is_empty()),
                );
            }
        }
    }
    roles
}

/// The leading keywords of a statement a source runs: reads, and on a writable source the
/// writes of its tables. Anything else (`SET`, `LOAD`, `CALL`, `DO`, DDL, `HANDLER`, …) is
/// refused before anything is sent.
const READS: &[&str] = &["select", "with", "values", "table"];
const WRITES: &[&str] = &["insert", "update", "delete", "replace"];

/// Refuses, before anything is sent, what a query may not be on this source.
fn refuse_statement(source: &str, statement: &str, read_only: bool) -> Option<SqlError> {
    // `/*! … */` and `/*M! … */` are comments only to other databases: MySQL and MariaDB
    // run their text, which would hide a statement from the keyword check.
    if statement.contains("/*!") || statement.contains("/*M!") {
        return Some(SqlError::QueryFailed(
            "a query on a MySQL source may not hold an executable comment (/*! … */ or /*M! … */)"
                .into(),
        ));
    }
    let keyword = leading_keyword(statement).to_ascii_lowercase();
    if READS.contains(&keyword.as_str()) {
        return None;
    }
    if WRITES.contains(&keyword.as_str()) {
        if read_only {
            return Some(SqlError::ReadOnly(format!(
                "sql source {source:?} is read-only: it takes no INSERT, UPDATE, DELETE or REPLACE"
            )));
        }
        return None;
    }
    Some(SqlError::QueryFailed(format!(
        "{} cannot run as a plugin query: a query is one SELECT, WITH, VALUES or TABLE, or on a \
         writable source one INSERT, UPDATE, DELETE or REPLACE",
        if keyword.is_empty() {
            "this statement".to_owned()
        } else {
            keyword.to_ascii_uppercase()
        }
    )))
}

/// The word that opens `statement`, after white space, comments and opening parentheses.
fn leading_keyword(statement: &str) -> &str {
    let mut rest = statement;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(comment) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// Runs one plugin query in a session of its own.
pub(super) async fn query(
    connection: PoolConnection<MySql>,
    source: &Source,
    name: &str,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<RowSet, QueryError> {
    if let Some(refusal) = refuse_statement(name, statement, read_only) {
        return Err(QueryError::Guest(refusal));
    }
    let deadline = Instant::now() + limits.timeout;
    let mut session = Session {
        connection: Some(connection),
        id: None,
        options: source.pool.connect_options(),
        relay: source.relay.clone(),
    };
    let connection = session
        .connection
        .as_mut()
        .expect("the session's connection");
    let result = run(
        &mut *connection,
        &mut session.id,
        session.relay.as_deref(),
        name,
        read_only,
        statement,
        params,
        limits,
        deadline,
    )
    .await;
    session.end().await;
    result
}

/// A query's own connection, closed when the query ends; it counts against the pool's size
/// until then, which bounds the queries (and the rows they hold) at once. Dropped before that
/// (the host's time limit cut the query short), it ends the session on the server from
/// another connection: closing the socket alone would leave a running statement, and whatever
/// it holds, to the server until it next writes to the client.
struct Session {
    connection: Option<PoolConnection<MySql>>,
    /// The server's id of the session, once known.
    id: Option<u64>,
    options: Arc<MySqlConnectOptions>,
    relay: Option<Arc<Relay>>,
}

impl Session {
    async fn end(&mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close().await;
        }
        self.forget();
    }

    fn forget(&self) {
        if let (Some(relay), Some(id)) = (&self.relay, self.id) {
            relay.forget(id);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.forget();
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        connection.close_on_drop();
        let Some(id) = self.id else {
            return;
        };
        let options = self.options.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // An account may always end its own sessions.
                if let Ok(Ok(mut killer)) =
                    tokio::time::timeout(Duration::from_secs(5), options.connect()).await
                {
                    let _ = killer.execute(format!("KILL {id}").as_str()).await;
                    let _ = killer.close().await;
                }
            });
        }
    }
}

/// How much earlier than the host's time limit the server stops the plugin's statement: time
/// for its error and the session's end to come back.
fn statement_timeout_margin(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(250))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    connection: &mut MySqlConnection,
    session_id: &mut Option<u64>,
    relay: Option<&Relay>,
    source: &str,
    read_only: bool,
    statement: &str,
    params: Vec<Value>,
    limits: QueryLimits,
    deadline: Instant,
) -> Result<RowSet, QueryError> {
    let identity = sqlx::query("SELECT CONNECTION_ID(), VERSION()")
        .persistent(false)
        .fetch_one(&mut *connection)
        .await?;
    let id: u64 = identity.try_get_unchecked(0)?;
    let version: String = identity.try_get_unchecked(1)?;
    *session_id = Some(id);
    // Again on every query: the account may have been granted more since the host started.
    if let Some(refusal) = Privileges::of(connection).await?.refusal(source, read_only) {
        return Err(QueryError::Guest(SqlError::Denied(refusal)));
    }
    let statement_timeout = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(statement_timeout_margin(limits.timeout))
        .as_millis()
        // 0 would be no limit at all.
        .max(1);
    // MariaDB's timer (seconds) stops any statement; MySQL's (milliseconds) stops a SELECT.
    let set_timeout = if version.contains("MariaDB") {
        format!(
            "SET SESSION max_statement_time = {}.{:03}",
            statement_timeout / 1000,
            statement_timeout % 1000
        )
    } else {
        format!("SET SESSION max_execution_time = {statement_timeout}")
    };
    connection.execute(set_timeout.as_str()).await?;
    connection
        .execute(if read_only {
            "START TRANSACTION READ ONLY"
        } else {
            "START TRANSACTION"
        })
        .await?;
    let mut set = RowSet {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    let mut bytes = ResultBytes::new(limits.max_result_bytes);
    if let Some(relay) = relay {
        relay.bound(id, limits.max_result_bytes.saturating_add(ROW_OVERHEAD));
    }
    {
        // Prepared, which takes exactly one statement and refuses what cannot be prepared.
        let query = bind_params!(sqlx::query(statement).persistent(false), params);
        let mut stream = query.fetch(&mut *connection);
        loop {
            let row = match stream.try_next().await {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(error) => {
                    return Err(match relay.and_then(|relay| relay.cut(id)) {
                        Some(_) => result_too_big(limits.max_result_bytes),
                        None => error.into(),
                    });
                }
            };
            if set.rows.len() == limits.max_rows {
                return Err(too_many_rows(limits.max_rows));
            }
            if set.columns.is_empty() {
                set.columns = column_names(&row);
            }
            // Measured before a value is copied out of the row.
            bytes.check(row_bytes(&row)?)?;
            let values = values(&row)?;
            bytes.add(&values)?;
            set.rows.push(values);
        }
    }
    connection.execute("COMMIT").await?;
    Ok(set)
}

/// The bytes a row's values take as they arrived, which their conversion does not exceed by
/// more than a few bytes a value.
fn row_bytes(row: &MySqlRow) -> Result<usize, QueryError> {
    let mut total = 0usize;
    for index in 0..row.len() {
        if !row.try_get_raw(index)?.is_null() {
            total += row.try_get_unchecked::<&[u8], _>(index)?.len();
        }
    }
    Ok(total)
}

/// A row's values as the guest sees them (README, "MySQL and MariaDB sources"); a type
/// without a mapping is the query's error.
fn values(row: &MySqlRow) -> Result<Vec<Value>, QueryError> {
    (0..row.len())
        .map(|index| {
            let raw = row.try_get_raw(index)?;
            if raw.is_null() {
                return Ok(Value::Null);
            }
            let type_name = raw.type_info().name().to_owned();
            let value = match type_name.as_str() {
                "BOOLEAN" => Value::Boolean(row.try_get(index)?),
                "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" => {
                    Value::Int(row.try_get_unchecked(index)?)
                }
                "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "INT UNSIGNED"
                | "MEDIUMINT UNSIGNED" | "YEAR" => {
                    Value::Int(row.try_get_unchecked::<u32, _>(index)?.into())
                }
                // Beyond i64 only as its digits, so that no value is silently wrong.
                "BIGINT UNSIGNED" => {
                    let unsigned: u64 = row.try_get_unchecked(index)?;
                    match i64::try_from(unsigned) {
                        Ok(signed) => Value::Int(signed),
                        Err(_) => Value::Text(unsigned.to_string()),
                    }
                }
                "FLOAT" => Value::Float(row.try_get::<f32, _>(index)?.into()),
                "DOUBLE" => Value::Float(row.try_get(index)?),
                "DECIMAL" | "JSON" | "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT"
                | "LONGTEXT" | "ENUM" | "SET" => Value::Text(row.try_get_unchecked(index)?),
                "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB"
                | "BIT" | "GEOMETRY" => Value::Bytes(row.try_get_unchecked(index)?),
                "DATETIME" | "TIMESTAMP" => {
                    let time: chrono::NaiveDateTime = row.try_get_unchecked(index)?;
                    Value::Text(rfc3339(time))
                }
                "DATE" => {
                    let date: chrono::NaiveDate = row.try_get_unchecked(index)?;
                    Value::Text(date.format("%Y-%m-%d").to_string())
                }
                "TIME" => {
                    let time: sqlx::mysql::types::MySqlTime = row.try_get_unchecked(index)?;
                    Value::Text(time.to_string())
                }
                other => {
                    let column = row.columns()[index].name();
                    return Err(unconvertible(column, other, "CAST(COLUMN AS CHAR)"));
                }
            };
            Ok(value)
        })
        .collect()
}

/// A `DATETIME` or `TIMESTAMP` in RFC 3339. The session's time zone is UTC (sqlx sets it), so
/// a `TIMESTAMP` is UTC; a `DATETIME` has no zone and is read as UTC, the convention of
/// pipelines that store times.
fn rfc3339(time: chrono::NaiveDateTime) -> String {
    let format = if time.and_utc().timestamp_subsec_micros() == 0 {
        "%Y-%m-%dT%H:%M:%SZ"
    } else {
        "%Y-%m-%dT%H:%M:%S%.6fZ"
    };
    time.format(format).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_read_with_their_roles_and_column_lists() {
        let mut held = Vec::new();
        let roles = parse_grants(
            &[
                "GRANT USAGE ON *.* TO `reader`@`%` IDENTIFIED BY PASSWORD '*AB'".into(),
                "GRANT SELECT (a, b), Insert ON `test`.`t` TO `reader`@`%`".into(),
                "GRANT `analyst`,`ops` TO `reader`@`%`".into(),
                "GRANT PROXY ON ''@'%' TO 'root'@'localhost' WITH GRANT OPTION".into(),
                "SET DEFAULT ROLE `analyst` FOR `reader`@`%`".into(),
            ],
            &mut held,
        );
        assert_eq!(roles, ["analyst", "ops"]);
        assert_eq!(held, ["USAGE", "SELECT", "INSERT", "GRANT OPTION", "PROXY"]);
    }

    #[test]
    fn an_account_that_reaches_beyond_its_tables_is_refused_with_the_fix() {
        let privileges = |held: &[&str]| Privileges {
            account: "reader@%".into(),
            held: held.iter().map(|name| (*name).to_owned()).collect(),
            unreadable_roles: Vec::new(),
        };
        let refusal = privileges(&["SELECT", "FILE"])
            .refusal("warehouse", false)
            .expect("FILE is refused");
        assert!(refusal.contains("\"warehouse\"") && refusal.contains("FILE"));
        assert!(refusal.contains("CREATE USER") && refusal.contains("GRANT SELECT"));
        assert!(
            privileges(&["CONNECTION ADMIN"])
                .refusal("w", false)
                .is_some()
        );
        assert!(
            privileges(&["SELECT", "INSERT"])
                .refusal("w", true)
                .is_some()
        );
        assert!(
            privileges(&["SELECT", "INSERT"])
                .refusal("w", false)
                .is_none()
        );
        assert!(
            privileges(&["USAGE", "SELECT"])
                .refusal("w", true)
                .is_none()
        );
    }

    #[test]
    fn only_reads_and_a_writable_sources_writes_are_sent() {
        for statement in [
            "SELECT 1",
            " (select 1)",
            "-- x\nWITH a AS (SELECT 1) SELECT * FROM a",
            "/* c */ VALUES ROW(1)",
        ] {
            assert!(
                refuse_statement("w", statement, true).is_none(),
                "{statement}"
            );
        }
        for statement in [
            "SET GLOBAL max_connections = 1",
            "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
            "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(100)",
            "/*! SET GLOBAL x = 1 */ SELECT 1",
            "SELECT 1 /*M!100000 INTO OUTFILE '/tmp/x' */",
            "CALL p()",
            "DO GET_LOCK('x', 0)",
        ] {
            assert!(
                matches!(
                    refuse_statement("w", statement, false),
                    Some(SqlError::QueryFailed(_))
                ),
                "{statement}"
            );
        }
        assert!(matches!(
            refuse_statement("w", "INSERT INTO t VALUES (1)", true),
            Some(SqlError::ReadOnly(_))
        ));
        assert!(refuse_statement("w", "INSERT INTO t VALUES (1)", false).is_none());
    }
}
