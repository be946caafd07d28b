//! The escapes an attack run found through the capabilities, each refused with a clear
//! message while the host and its data stay untouched: SQL that reaches beyond its source or
//! leaves state on a pooled connection, values built to exhaust the host's memory, requests
//! that resolve elsewhere or pile up, and `describe` answers without bounds.

use serde_json::{Value, json};

use crate::support::{
    MISBEHAVE_DESCRIBE_HUGE_WASM, PluginFile, Setup, SilentServer, TestServer, postgres_admin,
    postgres_behind_slow_network, postgres_reader_url, postgres_role_url, postgres_table,
    postgres_url, postgres_writer_url, sqlite_source, sqlite_url, step_statuses,
};

/// Runs `misbehave` with `action` as its first step and returns the finished run.
async fn run_action(server: &TestServer, action: Value) -> Value {
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": action}}}))
        .await;
    server.wait_until_finished(&id).await
}

fn sql(statement: &str) -> Value {
    json!({"action": "sql", "source": "warehouse", "statement": statement})
}

fn first_message(run: &Value) -> String {
    run["steps"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn sqlite_server(dir: &std::path::Path, read_only: bool) -> TestServer {
    let source = sqlite_source(dir).await;
    TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "sql_sources = [\"warehouse\"]\n[limits]\nmax_errors = 1\n",
            ))
            .with_source("warehouse", sqlite_url(&source), read_only),
    )
    .await
}

#[tokio::test]
async fn a_sqlite_query_reaches_nothing_but_its_source() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = sqlite_server(dir.path(), true).await;
    let host_database = server.data_dir().join("stepwise.db");
    let copy = dir.path().join("copy.db");
    let attacks = [
        format!("ATTACH DATABASE '{}' AS h", host_database.display()),
        format!("VACUUM INTO '{}'", copy.display()),
        "VACUUM".to_owned(),
        "CREATE TEMP VIEW items AS SELECT 'poisoned' AS name".to_owned(),
        "CREATE TEMP TABLE t (x)".to_owned(),
        "PRAGMA writable_schema = 1".to_owned(),
        "PRAGMA temp_store_directory = '/tmp'".to_owned(),
        "BEGIN".to_owned(),
        "SAVEPOINT s".to_owned(),
        "SELECT load_extension('/tmp/evil.so')".to_owned(),
        format!(
            "SELECT 1; ATTACH DATABASE '{}' AS h",
            host_database.display()
        ),
    ];
    for attack in &attacks {
        let run = run_action(&server, sql(attack)).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{attack}: {run:#}");
        let message = first_message(&run);
        assert!(
            message.contains("refuses this statement") || message.contains("exactly one statement"),
            "{attack}: {message}"
        );
    }
    assert!(!copy.exists(), "VACUUM INTO wrote a file");
    // Nothing an attack tried is left on the pooled connections: every later query of
    // another run sees the source's own table.
    for _ in 0..6 {
        let run = run_action(&server, sql("SELECT name FROM items ORDER BY id")).await;
        assert_eq!(run["status"], "passed", "{run:#}");
        assert_eq!(run["steps"][0]["output"]["rows"], json!([["one"], ["two"]]));
    }
    // A schema pragma that only reads is allowed.
    let run = run_action(&server, sql("PRAGMA table_info(items)")).await;
    assert_eq!(run["status"], "passed", "{run:#}");
}

#[tokio::test]
async fn a_writable_sqlite_source_changes_its_tables_and_nothing_else() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = sqlite_server(dir.path(), false).await;
    let run = run_action(
        &server,
        sql("INSERT INTO items (id, name) VALUES (3, 'three')"),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run:#}");
    for attack in [
        "CREATE TEMP TABLE t (x)",
        "ATTACH DATABASE ':memory:' AS m",
        "PRAGMA journal_mode = DELETE",
    ] {
        let run = run_action(&server, sql(attack)).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{attack}: {run:#}");
        assert!(
            first_message(&run).contains("refuses this statement"),
            "{run:#}"
        );
    }
}

#[tokio::test]
async fn a_huge_sqlite_result_is_stopped_at_the_result_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = sqlite_server(dir.path(), true).await;
    for attack in [
        "SELECT zeroblob(400000000)",
        "SELECT randomblob(300000000)",
        "SELECT hex(zeroblob(3000000))",
        // Each value small, the result large.
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100) \
         SELECT zeroblob(100000) FROM c",
    ] {
        let run = run_action(&server, sql(attack)).await;
        assert_eq!(run["status"], "errored", "{attack}: {run:#}");
        assert!(
            first_message(&run).contains("sql result size limit of 4194304 bytes exceeded"),
            "{attack}: {run:#}"
        );
    }
}

#[tokio::test]
async fn a_statement_longer_than_the_limit_is_refused_before_it_is_sent() {
    let long = format!("SELECT 1 -- {}", "x".repeat(64 << 10));
    let dir = tempfile::tempdir().expect("temp dir");
    let server = sqlite_server(dir.path(), true).await;
    let mut servers = vec![server];
    let mut postgres = None;
    if let Some(url) = postgres_url() {
        let table = postgres_table(&url, "stepwise_long").await;
        servers.push(postgres_server(postgres_reader_url(&url, &table).await, true).await);
        postgres = Some((url, table));
    }
    for server in &servers {
        let run = run_action(server, sql(&long)).await;
        assert_eq!(run["status"], "errored", "{run:#}");
        assert!(
            first_message(&run).contains("sql statement length limit of 65536 bytes exceeded"),
            "{run:#}"
        );
        let run = run_action(
            server,
            sql(&format!("SELECT 1 -- {}", "x".repeat(60 << 10))),
        )
        .await;
        assert_eq!(run["status"], "passed", "{run:#}");
    }
    if let Some((url, table)) = postgres {
        postgres_admin(&url, &format!("DROP TABLE {table}")).await;
    }
}

/// Starts `stepwise serve` with `config` as its `stepwise.toml` and `dir/data` as its data
/// dir, stops it once it serves, and returns what it logged: the checks of its sources at
/// start, which come before it serves.
pub(super) fn start_log(dir: &std::path::Path, config: &str) -> String {
    let config_path = dir.join("stepwise.toml");
    std::fs::write(&config_path, config).expect("writing the config");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.join("data"));
    let (mut child, _address, log) = crate::support::start_program(command);
    let _ = child.kill();
    let _ = child.wait();
    log.lock().expect("the log").join("\n")
}

/// Starts `stepwise serve` with `config` as its `stepwise.toml`, `dir/data` as its data dir
/// and `args` besides, and waits for it to exit on its own; returns its stderr, or fails the
/// test if it started serving.
pub(super) fn serve_refused(dir: &std::path::Path, config: &str, args: &[&str]) -> String {
    let config_path = dir.join("stepwise.toml");
    std::fs::write(&config_path, config).expect("writing the config");
    let stderr_path = dir.join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("creating the stderr file"))
        .spawn()
        .expect("running the stepwise binary");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the server") {
            break status;
        }
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if stderr.contains("listening on") || started.elapsed() > crate::support::DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started: {stderr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success(), "the server exited successfully");
    std::fs::read_to_string(&stderr_path).expect("reading stderr")
}

#[tokio::test]
async fn a_privileged_postgres_role_refuses_to_start_whether_its_source_is_read_only_or_not() {
    let Some(url) = postgres_url() else {
        return;
    };
    for read_only in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr = serve_refused(
            dir.path(),
            &format!("[sources.warehouse]\nurl = \"{url}\"\nread_only = {read_only}\n"),
            &[],
        );
        assert!(
            stderr.contains("\"warehouse\"")
                && stderr.contains("superuser")
                && stderr.contains("CREATE ROLE"),
            "read_only = {read_only}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_source_that_is_the_hosts_own_sqlite_database_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The host's database, spelled another way.
    let own = dir
        .path()
        .join("data")
        .join("..")
        .join("data")
        .join("stepwise.db");
    let stderr = serve_refused(
        dir.path(),
        &format!(
            "[sources.own]\nurl = \"sqlite://{}\"\nread_only = false\n",
            own.display()
        ),
        &[],
    );
    assert!(
        stderr.contains("sql source \"own\" is the host's own database"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_source_that_is_the_hosts_own_postgres_database_refuses_to_start() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_own").await;
    let database = format!("{table}_db");
    postgres_admin(&url, &format!("CREATE DATABASE {database}")).await;
    let (server, _) = url.rsplit_once('/').expect("a database in the URL");
    let host_url = format!("{server}/{database}");
    // Another role, and the server by another name: the same database all the same.
    let source = postgres_reader_url(&url, &table)
        .await
        .replace("127.0.0.1", "localhost")
        .replace(
            &format!("/{}", url.rsplit_once('/').expect("a database").1),
            &format!("/{database}"),
        );
    let dir = tempfile::tempdir().expect("temp dir");
    let stderr = serve_refused(
        dir.path(),
        &format!("[sources.own]\nurl = \"{source}\"\n"),
        &["--database-url", &host_url],
    );
    postgres_admin(&url, &format!("DROP DATABASE {database} WITH (FORCE)")).await;
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
    assert!(
        stderr.contains("sql source \"own\" is the host's own database")
            && stderr.contains("the same database of the same running server"),
        "{source}: {stderr}"
    );
}

#[tokio::test]
async fn a_postgres_role_that_reaches_beyond_its_tables_is_named_in_a_warning_at_start() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_warned").await;
    let role = format!("{table}_role");
    postgres_admin(&url, &format!("CREATE ROLE {role} LOGIN BYPASSRLS")).await;
    let source = postgres_role_url(&url, &role, &format!("GRANT pg_monitor TO {role}")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = start_log(
        dir.path(),
        &format!("[sources.warehouse]\nurl = \"{source}\"\nread_only = true\n"),
    );
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
    postgres_admin(&url, &format!("DROP ROLE {role}")).await;
    let warning = log
        .lines()
        .find(|line| line.contains("WARN") && line.contains("warehouse"))
        .unwrap_or_else(|| panic!("no warning names the source: {log}"));
    assert!(
        warning.contains("BYPASSRLS") && warning.contains("pg_monitor"),
        "{warning}"
    );
}

#[tokio::test]
async fn a_writable_postgres_source_whose_role_turns_superuser_is_refused_at_its_next_query() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_promoted").await;
    let role = format!("{table}_role");
    postgres_admin(&url, &format!("CREATE ROLE {role} LOGIN")).await;
    let source = postgres_role_url(
        &url,
        &role,
        &format!("GRANT SELECT, INSERT ON {table} TO {role}"),
    )
    .await;
    let server = postgres_server(source, false).await;
    let select = sql(&format!("SELECT name FROM {table}"));
    let before = run_action(&server, select.clone()).await;
    postgres_admin(&url, &format!("ALTER ROLE {role} SUPERUSER")).await;
    let after = run_action(&server, select).await;
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
    postgres_admin(&url, &format!("DROP ROLE {role}")).await;
    assert_eq!(before["status"], "passed", "{before:#}");
    assert_eq!(step_statuses(&after)[0], "failed", "{after:#}");
    let message = first_message(&after);
    assert!(
        message.contains("denied") && message.contains("superuser"),
        "{message}"
    );
}

#[tokio::test]
async fn a_postgres_query_leaves_nothing_behind_and_cannot_exhaust_the_host() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_escape").await;
    let reader = postgres_reader_url(&url, &table).await;
    // Generous time limits: the size limit must fire, however slow a loaded machine makes
    // PostgreSQL build a 300 MB value.
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "sql_sources = [\"warehouse\"]\n[limits]\nmax_errors = 1\nsql_timeout_ms = 120000\ncall_timeout_ms = 120000\n",
            ))
            .with_source("warehouse", reader, true),
    )
    .await;
    let run = run_action(
        &server,
        sql("SELECT set_config('search_path', 'poisoned', false)"),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run:#}");
    for _ in 0..6 {
        let run = run_action(&server, sql("SELECT current_setting('search_path')")).await;
        assert_eq!(run["status"], "passed", "{run:#}");
        assert_ne!(
            run["steps"][0]["output"]["rows"][0][0], "poisoned",
            "a session setting leaked into a later query"
        );
    }
    for attack in [
        "COPY (SELECT 1) TO PROGRAM 'touch /tmp/stepwise-escaped'",
        "SELECT pg_read_file('/etc/hostname')",
        "SELECT 1; SELECT 2",
    ] {
        let run = run_action(&server, sql(attack)).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{attack}: {run:#}");
    }
    for attack in [
        "SELECT repeat('x', 300000000)",
        "SELECT repeat('x', 100000) FROM generate_series(1, 100)",
    ] {
        let run = run_action(&server, sql(attack)).await;
        assert_eq!(run["status"], "errored", "{attack}: {run:#}");
        assert!(
            first_message(&run).contains("sql result size limit of 4194304 bytes exceeded"),
            "{attack}: {run:#}"
        );
    }
    let run = run_action(
        &server,
        sql(&format!(
            "SELECT name FROM {table} WHERE id = 1 -- a comment"
        )),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["rows"], json!([["one"]]));
}

/// A server whose `misbehave` may query the PostgreSQL source `warehouse` at `source`, with
/// time limits generous enough that the size limit fires first, however slow a loaded machine
/// makes PostgreSQL build a large value.
async fn postgres_server(source: String, read_only: bool) -> TestServer {
    TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "sql_sources = [\"warehouse\"]\n[limits]\nmax_errors = 1\nsql_timeout_ms = 120000\ncall_timeout_ms = 120000\n",
            ))
            .with_source("warehouse", source, read_only),
    )
    .await
}

/// The message of a result the database server stopped at the size limit, before sending it.
const STOPPED_BY_THE_SERVER: &str =
    "sql result size limit of 4194304 bytes exceeded (the database server stopped the query at";

#[tokio::test]
async fn a_postgres_result_is_measured_by_the_server_whatever_the_statement_looks_like() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_measured").await;
    // 20 MB that compress to a few hundred KB: stored compressed, sent whole.
    postgres_admin(
        &url,
        &format!("INSERT INTO {table} VALUES (2, repeat('x', 20000000))"),
    )
    .await;
    let server = postgres_server(postgres_reader_url(&url, &table).await, true).await;
    for attack in [
        "/**/ SELECT repeat('x', 30000000)".to_owned(),
        "(SELECT repeat('x', 30000000))".to_owned(),
        "SELECT repeat('x', 30000000), ';'".to_owned(),
        "SELECT repeat('x', 30000000);".to_owned(),
        "VALUES (repeat('x', 30000000))".to_owned(),
        format!("SELECT name FROM {table} WHERE id = 2"),
        format!("TABLE {table}"),
    ] {
        let run = run_action(&server, sql(&attack)).await;
        assert_eq!(run["status"], "errored", "{attack}: {run:#}");
        assert!(
            first_message(&run).contains(STOPPED_BY_THE_SERVER),
            "{attack}: {run:#}"
        );
    }
    // A statement that closes the wrapper's parenthesis only breaks itself.
    for attack in [
        "SELECT 1) SELECT repeat('x', 30000000) --",
        "SELECT 1) SELECT repeat('x', 30000000) /*",
        "SELECT 1) SELECT repeat('x', 30000000), '",
        "SELECT 1) SELECT repeat('x', 30000000), $$",
        "SELECT 1) SELECT repeat('x', 30000000) FROM (SELECT 1",
        "SELECT 1) INSERT INTO t (a",
    ] {
        let run = run_action(&server, sql(attack)).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{attack}: {run:#}");
    }
    // What cannot run inside the wrapper is refused with what to write instead.
    let run = run_action(&server, sql("SHOW search_path")).await;
    assert_eq!(step_statuses(&run)[0], "failed", "{run:#}");
    assert!(
        first_message(&run).contains("SELECT current_setting('search_path')"),
        "{run:#}"
    );
    let run = run_action(
        &server,
        sql("SELECT name, 2 AS two FROM (VALUES ('a')) AS t (name)"),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["rows"], json!([["a", 2]]));
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
}

#[tokio::test]
async fn a_write_on_a_postgres_source_returns_its_rows_through_the_size_guard() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_written").await;
    let server = postgres_server(postgres_writer_url(&url, &table).await, false).await;
    let run = run_action(
        &server,
        sql(&format!(
            "INSERT INTO {table} (id, name) VALUES (2, 'two') RETURNING id, name"
        )),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["rows"], json!([[2, "two"]]));
    let run = run_action(
        &server,
        sql(&format!(
            "DELETE FROM {table} WHERE id = 2 RETURNING repeat('x', 30000000)"
        )),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert!(
        first_message(&run).contains(STOPPED_BY_THE_SERVER),
        "{run:#}"
    );
    let run = run_action(
        &server,
        sql(&format!("UPDATE {table} SET name = 'changed' WHERE id = 2")),
    )
    .await;
    assert_eq!(step_statuses(&run)[0], "failed", "{run:#}");
    assert!(first_message(&run).contains("add RETURNING"), "{run:#}");
    for statement in [
        format!("CREATE INDEX ON {table} (name)"),
        format!("TRUNCATE {table}"),
        "SET search_path = poisoned".to_owned(),
    ] {
        let run = run_action(&server, sql(&statement)).await;
        assert_eq!(step_statuses(&run)[0], "failed", "{statement}: {run:#}");
        assert!(
            first_message(&run).contains("cannot run as a plugin query"),
            "{statement}: {run:#}"
        );
    }
    let run = run_action(
        &server,
        sql(&format!("SELECT id, name FROM {table} ORDER BY id")),
    )
    .await;
    assert_eq!(
        run["steps"][0]["output"]["rows"],
        json!([[1, "one"], [2, "two"]]),
        "only the write that returned its rows happened: {run:#}"
    );
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
}

#[tokio::test]
async fn a_postgres_query_cut_short_by_the_host_leaves_no_lock_behind() {
    use sqlx::Connection;
    let Some(url) = postgres_url() else {
        return;
    };
    let table = postgres_table(&url, "stepwise_cut_short").await;
    // Every answer of the server comes 200 ms late: the query below is done on the server
    // (well within its statement_timeout) when the host's 2 s are up, and its answer is still
    // on the way.
    let (source, _network) = postgres_behind_slow_network(
        &postgres_reader_url(&url, &table).await,
        std::time::Duration::from_millis(200),
    )
    .await;
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "sql_sources = [\"warehouse\"]\n[limits]\nmax_errors = 1\nsql_timeout_ms = 2000\n",
            ))
            .with_source("warehouse", source, true),
    )
    .await;
    // Advisory locks are the database's: a key of this test's own, apart from the other
    // backend's copy of it.
    let key = i64::from(std::process::id()) * 2 + i64::from(module_path!().contains("postgres"));
    let run = run_action(
        &server,
        sql(&format!("SELECT pg_advisory_lock({key}), pg_sleep(1.5)")),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert!(
        first_message(&run).contains("sql time limit of 2000 ms exceeded"),
        "{run:#}"
    );
    let mut other = sqlx::PgConnection::connect(&url)
        .await
        .expect("connecting to PostgreSQL");
    let started = std::time::Instant::now();
    loop {
        let (taken,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut other)
            .await
            .expect("trying the lock");
        if taken {
            break;
        }
        assert!(
            started.elapsed() < crate::support::DEADLINE,
            "the query's advisory lock is still held after {:?}",
            crate::support::DEADLINE
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
}

#[tokio::test]
async fn the_readmes_role_recipe_keeps_a_plugin_from_ending_its_roles_other_sessions() {
    use sqlx::Connection;
    let Some(url) = postgres_url() else {
        return;
    };
    let readme =
        std::fs::read_to_string(crate::support::repo_path("README.md")).expect("reading README.md");
    let revokes: Vec<&str> = readme
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("REVOKE "))
        .collect();
    assert!(!revokes.is_empty(), "the recipe revokes nothing");
    let table = postgres_table(&url, "stepwise_recipe").await;
    let database = format!("{table}_db");
    postgres_admin(&url, &format!("CREATE DATABASE {database}")).await;
    let (server, _) = url.rsplit_once('/').expect("a database in the URL");
    let admin = format!("{server}/{database}");
    for revoke in &revokes {
        postgres_admin(&admin, revoke).await;
    }
    let reader = postgres_reader_url(&url, &table).await.replace(
        &format!("/{}", url.rsplit_once('/').expect("a database").1),
        &format!("/{database}"),
    );
    let mut plugin = sqlx::PgConnection::connect(&reader)
        .await
        .expect("connecting");
    let mut other = sqlx::PgConnection::connect(&reader)
        .await
        .expect("connecting");
    let (other_pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut other)
        .await
        .expect("the other session's pid");
    let mut outcomes = Vec::new();
    for signal in ["pg_cancel_backend($1)", "pg_terminate_backend($1)"] {
        let outcome = sqlx::query(&format!("SELECT {signal}"))
            .bind(other_pid)
            .execute(&mut plugin)
            .await;
        outcomes.push((signal, outcome.map_err(|error| error.to_string())));
    }
    drop((plugin, other));
    postgres_admin(&url, &format!("DROP DATABASE {database} WITH (FORCE)")).await;
    postgres_admin(&url, &format!("DROP TABLE {table}")).await;
    for (signal, outcome) in outcomes {
        assert!(
            outcome
                .as_ref()
                .is_err_and(|error| error.contains("permission denied")),
            "{signal}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn a_forged_plugin_notification_makes_the_host_touch_nothing_outside_its_cache() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    // Notifications are PostgreSQL's: SQLite has no other nodes to hear from.
    if !server.database_url().starts_with("postgres") {
        return;
    }
    // Artifacts are `<version>-<engine key>.cwasm`; misbehave's is there since it was loaded.
    let artifact = std::fs::read_dir(server.data_dir().join("cache").join("compiled"))
        .expect("the artifact cache")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find(|name| name.ends_with(".cwasm"))
        .expect("misbehave's artifact");
    let engine_key = artifact
        .trim_end_matches(".cwasm")
        .rsplit_once('-')
        .expect("a version and an engine key")
        .1
        .to_owned();
    // A file where a version of "../../…/planted" would put its artifact.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let planted = elsewhere.path().join(format!("planted-{engine_key}.cwasm"));
    std::fs::write(&planted, b"not an artifact").expect("planting a file");
    let forged = format!(
        "plugin {}{}",
        "../".repeat(32),
        elsewhere
            .path()
            .join("planted")
            .display()
            .to_string()
            .trim_start_matches('/')
    );
    postgres_admin(
        server.database_url(),
        &format!("SELECT pg_notify('stepwise', '{forged}')"),
    )
    .await;
    for payload in ["plugin ", "plugin ABC", "cancel ../x", "plugin a b"] {
        postgres_admin(
            server.database_url(),
            &format!("SELECT pg_notify('stepwise', '{payload}')"),
        )
        .await;
    }
    // The host goes on, and by the time a run has passed it has long heard the notification.
    let run = run_action(&server, json!({"action": "pass"})).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(
        std::fs::read(&planted).ok().as_deref(),
        Some(&b"not an artifact"[..]),
        "the host opened (and removed) a file outside its cache"
    );
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_refused() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(
        "allowed_hosts = [\"stepwise-test.invalid:80\"]\n",
    )))
    .await;
    let run = run_action(
        &server,
        json!({"action": "http", "url": "http://stepwise-test.invalid/"}),
    )
    .await;
    assert_eq!(step_statuses(&run)[0], "failed", "{run:#}");
    let id = run["id"].as_str().expect("id");
    let logs: Vec<String> = server
        .attempts(id)
        .await
        .iter()
        .flat_map(|attempt| attempt["logs"].as_array().cloned().unwrap_or_default())
        .filter_map(|line| line["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        logs.iter()
            .any(|line| line.contains("looking up stepwise-test.invalid failed")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn requests_in_flight_at_once_are_capped() {
    // A server that never answers keeps every request that got through in flight.
    let silent = SilentServer::start().await;
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(format!(
        "allowed_hosts = [\"{}\"]\n[limits]\nhttp_concurrent_requests = 2\nhttp_timeout_ms = 500\nmax_errors = 1\n",
        silent.host_port
    ))))
    .await;
    let run = run_action(
        &server,
        json!({"action": "http_burst", "authority": silent.host_port, "count": 10}),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert!(
        first_message(&run).contains("http limit of 2 requests in flight at once exceeded"),
        "{run:#}"
    );
    let id = run["id"].as_str().expect("id");
    let refused = server
        .attempts(id)
        .await
        .iter()
        .flat_map(|attempt| attempt["logs"].as_array().cloned().unwrap_or_default())
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|text| text.contains("in flight at once exceeded"))
        })
        .count();
    assert_eq!(refused, 8, "two in flight, the other eight refused");
}

#[tokio::test]
async fn a_describe_without_bounds_is_rejected_on_upload() {
    let server = TestServer::start(Setup::default()).await;
    let bytes = std::fs::read(MISBEHAVE_DESCRIBE_HUGE_WASM).expect("reading the plugin");
    let (status, problem) = server.upload("huge", bytes).await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("100 steps; at most 64"),
        "{problem}"
    );
}

#[tokio::test]
async fn attempts_come_a_page_at_a_time() {
    let server = TestServer::start(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 50\n")),
    )
    .await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pass_after_ms", "ms": 400}}}}))
        .await;
    server.wait_until_finished(&id).await;
    let all = server.attempts(&id).await;
    assert!(all.len() >= 4, "{all:?}");
    let (status, page) = server
        .get_json(&format!("/v1/runs/{id}/attempts?limit=2&logs=true"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["attempts"].as_array().expect("attempts").len(), 2);
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let (_, next) = server
        .get_json(&format!(
            "/v1/runs/{id}/attempts?limit=2&logs=true&cursor={cursor}"
        ))
        .await;
    assert_eq!(next["attempts"][0], all[2]);
    for bad in ["limit=0", "limit=1001", "cursor=x", "colour=red"] {
        let (status, problem) = server
            .get_json(&format!("/v1/runs/{id}/attempts?{bad}"))
            .await;
        assert_eq!(status, 422, "{bad}: {problem}");
    }
}
