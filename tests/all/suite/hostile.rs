//! The hostile plugin suite, part two: what a plugin can try through its capabilities. Each
//! case asserts the documented outcome: resource limits end the attempt `errored` with a
//! message naming the limit and its value; policy refusals reach the plugin as errors (here it
//! reports them as `failed`) and are logged with the attempt. `sandbox.rs` has the CPU, memory,
//! stack, output and trap cases.

use serde_json::{Value, json};

use crate::support::{
    Endpoint, PluginFile, Setup, SilentServer, TestServer, sqlite_source, sqlite_url, step_statuses,
};

struct Finished {
    server: TestServer,
    id: String,
    run: Value,
}

impl Finished {
    async fn logs(&self) -> Vec<String> {
        self.server
            .attempts(&self.id)
            .await
            .iter()
            .flat_map(|attempt| attempt["logs"].as_array().cloned().unwrap_or_default())
            .filter_map(|line| line["message"].as_str().map(str::to_owned))
            .collect()
    }

    fn step_message(&self) -> &str {
        self.run["steps"][0]["message"].as_str().unwrap_or_default()
    }
}

/// Runs `misbehave` once with `action` as its first step, under `manifest`, to the end.
async fn run_first_step(setup: Setup, action: Value) -> Finished {
    let server = TestServer::start(setup).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": action}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    Finished { server, id, run }
}

fn with_manifest(manifest: &str) -> Setup {
    Setup::default().with_plugin(PluginFile::misbehave(manifest))
}

fn assert_errored_with(finished: &Finished, limit: &str) {
    assert_eq!(finished.run["status"], "errored", "{:#}", finished.run);
    assert_eq!(step_statuses(&finished.run)[0], "errored");
    let message = finished.step_message();
    assert!(
        message.contains(limit),
        "{message:?} does not name {limit:?}"
    );
}

#[tokio::test]
async fn a_redirect_to_a_host_not_granted_is_not_followed() {
    let target = Endpoint::start(200).await;
    let redirector = Endpoint::redirecting_to(&target.url).await;
    let manifest = format!("allowed_hosts = [\"{}\"]\n", redirector.host_port);
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({"action": "http", "url": redirector.url, "expect_status": 302}),
    )
    .await;
    // The plugin sees the 302 itself; the host sent nothing to the redirect's target.
    assert_eq!(finished.run["status"], "passed", "{:#}", finished.run);
    assert_eq!(finished.run["steps"][0]["output"]["status"], 302);
    assert_eq!(redirector.hits(), 1);
    assert_eq!(target.hits(), 0);
}

#[tokio::test]
async fn a_granted_name_that_resolves_to_loopback_is_refused() {
    let endpoint = Endpoint::start(200).await;
    let manifest = format!("allowed_hosts = [\"localhost:{}\"]\n", endpoint.port);
    let url = format!("http://localhost:{}/", endpoint.port);
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({"action": "http", "url": url}),
    )
    .await;
    assert_eq!(finished.run["status"], "failed", "{:#}", finished.run);
    assert!(
        finished.step_message().contains("denied"),
        "{}",
        finished.step_message()
    );
    let logs = finished.logs().await;
    assert!(
        logs.iter()
            .any(|line| line.contains("resolves to") && line.contains("a loopback address")),
        "{logs:#?}"
    );
    assert_eq!(endpoint.hits(), 0, "nothing reached the loopback endpoint");

    // Naming the address itself grants it.
    let manifest = format!(
        "allowed_hosts = [\"localhost:{port}\", \"127.0.0.1:{port}\", \"[::1]:{port}\"]\n",
        port = endpoint.port
    );
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({"action": "http", "url": url}),
    )
    .await;
    assert_eq!(finished.run["status"], "passed", "{:#}", finished.run);
}

#[tokio::test]
async fn proxy_headers_set_by_a_plugin_are_dropped() {
    let endpoint = Endpoint::start(200).await;
    let manifest = format!("allowed_hosts = [\"{}\"]\n", endpoint.host_port);
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({
            "action": "http",
            "url": format!("{}headers", endpoint.url),
            "headers": {"x-forwarded-for": "10.0.0.1", "x-check": "kept"},
        }),
    )
    .await;
    assert_eq!(finished.run["status"], "passed", "{:#}", finished.run);
    let logs = finished.logs().await;
    assert!(
        logs.iter()
            .any(|line| line.contains("header \"x-forwarded-for\" dropped")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn a_response_over_the_size_limit_errors_the_attempt() {
    let endpoint = Endpoint::start(200).await;
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\n[limits]\nhttp_response_bytes = 1024\nmax_errors = 1\n",
        endpoint.host_port
    );
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({"action": "http", "url": format!("{}big", endpoint.url)}),
    )
    .await;
    assert_errored_with(&finished, "http response size limit of 1024 bytes exceeded");
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_http_timeout() {
    let silent = SilentServer::start().await;
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\n[limits]\nhttp_timeout_ms = 300\nmax_errors = 1\n",
        silent.host_port
    );
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({"action": "http", "url": format!("http://{}/", silent.host_port)}),
    )
    .await;
    assert_errored_with(&finished, "http timeout of 300 ms exceeded");
}

#[tokio::test]
async fn the_run_has_a_cap_on_http_requests() {
    // The endpoint keeps answering 503, so the step stays pending and asks again every tick.
    let endpoint = Endpoint::start(503).await;
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\npoll_interval_ms = 50\n[limits]\nhttp_requests_per_run = 3\nmax_errors = 1\n",
        endpoint.host_port
    );
    let finished = run_first_step(
        with_manifest(&manifest),
        json!({"action": "http", "url": endpoint.url}),
    )
    .await;
    assert_errored_with(&finished, "http request limit of 3 per run exceeded");
    assert_eq!(endpoint.hits(), 3);
    assert_eq!(finished.run["http_requests"], 4, "{:#}", finished.run);
    assert_eq!(finished.run["steps"][0]["attempts"], 4);
}

#[tokio::test]
async fn a_query_that_runs_forever_is_stopped_by_the_sql_time_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = sqlite_source(dir.path()).await;
    let setup = with_manifest(
        "sql_sources = [\"warehouse\"]\n[limits]\nsql_timeout_ms = 300\nmax_errors = 1\n",
    )
    .with_source("warehouse", sqlite_url(&database), true);
    let forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                   SELECT count(*) FROM c";
    let finished = run_first_step(
        setup,
        json!({"action": "sql", "source": "warehouse", "statement": forever}),
    )
    .await;
    assert_errored_with(&finished, "sql time limit of 300 ms exceeded");
    // The statement was stopped inside SQLite: the call ended near the limit, not at the
    // step's 10 s wall-clock limit.
    let attempts = finished.server.attempts(&finished.id).await;
    let duration = attempts[0]["duration_ms"].as_i64().expect("duration");
    assert!(duration < 5_000, "the call took {duration} ms");
}

#[tokio::test]
async fn rows_over_the_limit_error_the_attempt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = sqlite_source(dir.path()).await;
    let setup =
        with_manifest("sql_sources = [\"warehouse\"]\n[limits]\nsql_rows = 1\nmax_errors = 1\n")
            .with_source("warehouse", sqlite_url(&database), true);
    let finished = run_first_step(
        setup,
        json!({"action": "sql", "source": "warehouse", "statement": "SELECT name FROM items"}),
    )
    .await;
    assert_errored_with(&finished, "sql row limit of 1 rows exceeded");
}

#[tokio::test]
async fn sql_injection_through_params_stays_a_value() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = sqlite_source(dir.path()).await;
    let setup = with_manifest("sql_sources = [\"warehouse\"]\n").with_source(
        "warehouse",
        sqlite_url(&database),
        false,
    );
    let finished = run_first_step(
        setup,
        json!({
            "action": "sql",
            "source": "warehouse",
            "statement": "SELECT name FROM items WHERE name = ?",
            "params": ["x'; DROP TABLE items; --"],
        }),
    )
    .await;
    assert_eq!(finished.run["status"], "passed", "{:#}", finished.run);
    assert_eq!(finished.run["steps"][0]["output"]["rows"], json!([]));
    let pool = sqlx::SqlitePool::connect(&sqlite_url(&database))
        .await
        .expect("opening the source");
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
        .fetch_one(&pool)
        .await
        .expect("the table is still there");
    assert_eq!(count, 2);
}

#[tokio::test]
async fn a_million_log_calls_are_counted_not_kept() {
    // A generous call limit: this is about the log limit, however loaded the machine is.
    let finished = run_first_step(
        with_manifest("[limits]\ncall_timeout_ms = 120000\n"),
        json!({"action": "log_spam", "count": 1_000_000}),
    )
    .await;
    assert_eq!(finished.run["status"], "passed", "{:#}", finished.run);
    let logs = finished.logs().await;
    assert_eq!(logs.len(), 201, "200 lines kept plus the summary");
    let last = logs.last().expect("a summary line");
    assert!(
        last.contains("999800 more log lines dropped (limit 200 per step call)"),
        "{last}"
    );
}

#[tokio::test]
async fn a_nul_character_from_a_plugin_is_kept_as_u_fffd_on_every_backend() {
    // The system under check answers with a NUL, which the plugin logs and returns.
    let app = axum::Router::new().route("/nul", axum::routing::get(|| async { "a\0b" }));
    let (address, _server) = crate::support::serve_locally(app).await;
    let finished = run_first_step(
        with_manifest(&format!("allowed_hosts = [\"{address}\"]\n")),
        json!({"action": "http", "url": format!("http://{address}/nul"), "echo": true}),
    )
    .await;
    assert_eq!(finished.run["status"], "passed", "{:#}", finished.run);
    assert_eq!(finished.run["steps"][0]["output"]["body"], "a\0b");
    let logs = finished.logs().await;
    assert!(logs.iter().any(|line| line == "a\u{FFFD}b"), "{logs:?}");
}

/// Memory a plugin makes the host hold outside its linear memory counts against its limits:
/// headers kept in `wasi:http` resources end the attempt at the resource or memory limit, and
/// a huge output, with a secret configured (whose redaction parses outputs), is refused by
/// its size. The host goes on serving other runs.
#[tokio::test]
async fn headers_kept_and_huge_outputs_end_their_own_attempts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("token");
    std::fs::write(&file, "a-secret-value-of-some-length").expect("writing the secret");
    let config = format!(
        "[secrets.tok]\nfile = {:?}\nhosts = [\"https://tok.example.com\"]\nheader = \"authorization\"\n",
        file.display().to_string()
    );
    let setup = || {
        with_manifest("secrets = [\"tok\"]\n[limits]\nmax_errors = 1\nmemory_mib = 16\n")
            .with_config(&config)
    };
    let flood = run_first_step(
        setup(),
        json!({"action": "fields_flood", "count": 20_000, "bytes": 12_000}),
    )
    .await;
    assert_errored_with(&flood, "memory limit of 16 MiB exceeded");
    assert!(
        flood
            .step_message()
            .contains("what its wasi resources hold"),
        "{}",
        flood.step_message()
    );
    let huge = run_first_step(setup(), json!({"action": "big_array", "bytes": 8_000_000})).await;
    assert_errored_with(&huge, "copy limit of 1048576 bytes exceeded");
    let over = run_first_step(setup(), json!({"action": "big_array", "bytes": 100_000})).await;
    assert_errored_with(&over, "output size limit of 65536 bytes exceeded");
    let id = over
        .server
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    assert_eq!(
        over.server.wait_until_finished(&id).await["status"],
        "passed"
    );
}
