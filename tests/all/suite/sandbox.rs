//! Containment: a plugin's traps and limits end its own attempts as `errored` with a message
//! naming the limit, capabilities are default-deny, and the host and other runs carry on.

use serde_json::{Value, json};

use crate::support::{
    Endpoint, PluginFile, Setup, TestServer, postgres_reader_url, postgres_url, sqlite_source,
    sqlite_url, step_statuses,
};

async fn run_one(manifest: &str, params: Value) -> Value {
    let server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(manifest))).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    server.wait_until_finished(&id).await
}

fn first_step(action: Value) -> Value {
    json!({"steps": {"first": action}})
}

#[tokio::test]
async fn a_trapping_plugin_errors_until_max_errors() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(
        "poll_interval_ms = 50\n[limits]\nmax_errors = 2\n",
    )))
    .await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": first_step(json!({"action": "trap"}))}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert_eq!(step_statuses(&run), ["errored", "skipped", "skipped"]);
    assert_eq!(run["error_count"], 2);
    let attempts = server.attempts(&id).await;
    assert_eq!(attempts.len(), 2);
    for attempt in &attempts {
        assert_eq!(attempt["outcome"], "errored");
        let message = attempt["message"].as_str().expect("message");
        assert!(
            message.contains("plugin trapped") && message.contains("told to trap"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_by_the_time_limit() {
    let run = run_one(
        "[limits]\ncall_timeout_ms = 300\nmax_errors = 1\n",
        first_step(json!({"action": "loop"})),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("time limit of 300 ms exceeded"),
        "{message}"
    );
}

#[tokio::test]
async fn a_memory_bomb_is_stopped_by_the_memory_limit() {
    let run = run_one(
        "[limits]\nmemory_mib = 16\nmax_errors = 1\n",
        first_step(json!({"action": "oom"})),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("memory limit of 16 MiB exceeded"),
        "{message}"
    );
}

#[tokio::test]
async fn no_call_holds_more_than_the_hosts_plugin_memory_whatever_its_grant() {
    let server = TestServer::start(
        Setup::default()
            .with_config("plugin_memory_mib = 8\n")
            .with_plugin(PluginFile::misbehave(
                "[limits]\nmemory_mib = 64\nmax_errors = 1\n",
            )),
    )
    .await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": first_step(json!({"action": "oom"}))}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "errored", "{run:#}");
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("memory limit of 12 MiB exceeded")
            && message.contains("plugin_memory_mib of 8 MiB"),
        "{message}"
    );
}

#[tokio::test]
async fn deep_recursion_traps_inside_the_guest() {
    let run = run_one(
        "[limits]\nmax_errors = 1\n",
        first_step(json!({"action": "recurse"})),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    // A Rust guest keeps its stack in linear memory: overflowing it is an out-of-bounds access
    // inside the sandbox, not a host stack overflow.
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(message.contains("plugin trapped"), "{message}");
}

#[tokio::test]
async fn an_oversized_output_is_an_errored_attempt() {
    let run = run_one(
        "[limits]\nmax_errors = 1\n",
        first_step(json!({"action": "big_output", "bytes": 100_000})),
    )
    .await;
    assert_eq!(run["status"], "errored", "{run:#}");
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("output size limit of 65536 bytes exceeded"),
        "{message}"
    );
}

#[tokio::test]
async fn log_lines_are_capped_per_call() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": first_step(json!({"action": "log_spam", "count": 100_000}))}))
        .await;
    assert_eq!(server.wait_until_finished(&id).await["status"], "passed");
    let attempts = server.attempts(&id).await;
    let logs = attempts[0]["logs"].as_array().expect("logs");
    assert!(logs.len() <= 201, "{} lines kept", logs.len());
    let last = logs.last().expect("a line")["message"]
        .as_str()
        .expect("text");
    assert!(last.contains("more log lines dropped"), "{last}");
}

#[tokio::test]
async fn hostile_neighbours_do_not_stop_well_behaved_runs() {
    let manifest =
        "poll_interval_ms = 50\n[limits]\ncall_timeout_ms = 500\nmemory_mib = 16\nmax_errors = 2\n";
    let server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(manifest))).await;
    let mut hostile = Vec::new();
    for action in ["trap", "loop", "oom", "recurse"] {
        hostile.push(
            server
                .trigger(
                    json!({"plugin": "misbehave", "params": first_step(json!({"action": action}))}),
                )
                .await,
        );
    }
    let mut good = Vec::new();
    for _ in 0..4 {
        let params = json!({"steps": {"second": {"action": "pending_until", "attempt": 3}}});
        good.push(
            server
                .trigger(json!({"plugin": "misbehave", "params": params}))
                .await,
        );
    }
    for id in &good {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "passed", "{run:#}");
        assert!(
            server
                .attempts(id)
                .await
                .iter()
                .all(|attempt| attempt["outcome"] != "errored")
        );
    }
    for id in &hostile {
        assert_eq!(server.wait_until_finished(id).await["status"], "errored");
    }
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn http_to_a_host_not_in_the_grant_is_denied_and_logged() {
    let endpoint = Endpoint::start(200).await;
    let run_server = TestServer::start(
        Setup::default().with_plugin(PluginFile::misbehave("allowed_hosts = [\"127.0.0.1:1\"]\n")),
    )
    .await;
    let id = run_server
        .trigger(json!({"plugin": "misbehave", "params": first_step(json!({"action": "http", "url": endpoint.url}))}))
        .await;
    let run = run_server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(message.contains("denied"), "{message}");
    let attempts = run_server.attempts(&id).await;
    let logged = attempts[0]["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .any(|line| {
            let text = line["message"].as_str().unwrap_or_default();
            text.contains("denied") && text.contains(&endpoint.host_port)
        });
    assert!(logged, "the denial is in the attempt's log: {attempts:#?}");
}

#[tokio::test]
async fn http_to_a_granted_host_is_allowed() {
    let endpoint = Endpoint::start(200).await;
    let manifest = format!("allowed_hosts = [\"{}\"]\n", endpoint.host_port);
    let run = run_one(
        &manifest,
        first_step(json!({"action": "http", "url": endpoint.url})),
    )
    .await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["status"], 200);
}

#[tokio::test]
async fn sql_on_a_source_not_in_the_grant_is_denied() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = sqlite_source(dir.path()).await;
    let setup = Setup::default()
        .with_plugin(PluginFile::misbehave(""))
        .with_source("items", sqlite_url(&source), false);
    let server = TestServer::start(setup).await;
    let params = first_step(
        json!({"action": "sql", "source": "items", "statement": "SELECT name FROM items", "params": []}),
    );
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let message = run["steps"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("denied") && message.contains("not granted"),
        "{message}"
    );
}

fn read_then_write(source: &str, insert: &str) -> Value {
    json!({"steps": {
        "first": {"action": "sql", "source": source, "statement": "SELECT name FROM items WHERE id >= ? ORDER BY id", "params": [1]},
        "second": {"action": "sql", "source": source, "statement": insert, "params": [3, "three"]},
    }})
}

/// Runs a read, then a write, on the source `items`: the read passes with both rows, the write
/// is refused as read-only.
async fn reads_but_is_refused_a_write(server: &TestServer) {
    let params = read_then_write("items", "INSERT INTO items (id, name) VALUES (?, ?)");
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(
        step_statuses(&run),
        ["passed", "failed", "skipped"],
        "{run:#}"
    );
    assert_eq!(run["steps"][0]["output"]["rows"], json!([["one"], ["two"]]));
    let message = run["steps"][1]["message"].as_str().expect("message");
    assert!(message.contains("read-only"), "{message}");
}

#[tokio::test]
async fn a_read_only_sqlite_source_reads_but_refuses_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = sqlite_source(dir.path()).await;
    let setup = Setup::default()
        .with_plugin(PluginFile::misbehave("sql_sources = [\"items\"]\n"))
        .with_source("items", sqlite_url(&source), true);
    let server = TestServer::start(setup).await;
    reads_but_is_refused_a_write(&server).await;
}

#[tokio::test]
async fn a_source_is_read_only_unless_its_config_says_otherwise() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = sqlite_source(dir.path()).await;
    let config = format!("[sources.items]\nurl = \"{}\"\n", sqlite_url(&source));
    let server = TestServer::start(
        Setup::default()
            .with_config(&config)
            .with_plugin(PluginFile::misbehave("sql_sources = [\"items\"]\n")),
    )
    .await;
    reads_but_is_refused_a_write(&server).await;
}

#[tokio::test]
async fn sql_params_are_bound_not_interpolated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = sqlite_source(dir.path()).await;
    let setup = Setup::default()
        .with_plugin(PluginFile::misbehave("sql_sources = [\"items\"]\n"))
        .with_source("items", sqlite_url(&source), false);
    let server = TestServer::start(setup).await;
    let injection = "x' OR '1'='1";
    let params = first_step(
        json!({"action": "sql", "source": "items", "statement": "SELECT id FROM items WHERE name = ?", "params": [injection]}),
    );
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["rows"], json!([]));
}

#[tokio::test]
async fn a_read_only_postgres_source_reads_but_refuses_writes() {
    let Some(url) = postgres_url() else {
        return;
    };
    let table = format!("stepwise_items_{}", std::process::id());
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connecting to PostgreSQL");
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pool)
        .await
        .expect("drop");
    sqlx::query(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("create");
    sqlx::query(&format!(
        "INSERT INTO {table} VALUES (1, 'one'), (2, 'two')"
    ))
    .execute(&pool)
    .await
    .expect("insert");

    let reader = postgres_reader_url(&url, &table).await;
    let setup = Setup::default()
        .with_plugin(PluginFile::misbehave("sql_sources = [\"items\"]\n"))
        .with_source("items", reader, true);
    let server = TestServer::start(setup).await;
    let params = json!({"steps": {
        "first": {"action": "sql", "source": "items", "statement": format!("SELECT name FROM {table} WHERE id >= $1 ORDER BY id"), "params": [1]},
        "second": {"action": "sql", "source": "items", "statement": format!("INSERT INTO {table} (id, name) VALUES ($1, $2)"), "params": [3, "three"]},
    }});
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    let (count,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&pool)
        .await
        .expect("count");
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
    assert_eq!(
        step_statuses(&run),
        ["passed", "failed", "skipped"],
        "{run:#}"
    );
    assert_eq!(run["steps"][0]["output"]["rows"], json!([["one"], ["two"]]));
    let message = run["steps"][1]["message"].as_str().expect("message");
    assert!(message.contains("read-only"), "{message}");
    assert_eq!(count, 2, "the write did not happen");
}
