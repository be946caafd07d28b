//! Every input checked once, by the same rules, everywhere: ranges of settings and grants,
//! unknown and repeated query parameters, `null` for optional fields, labels, idempotency keys
//! reused with another request, schedules that could never fire, and what is in force shown
//! as it is.

use serde_json::{Value, json};

use crate::support::{
    MISBEHAVE_PARAMS_LOOKAROUND_WASM, MISBEHAVE_PARAMS_PATTERN_WASM, PluginFile, Setup, TestServer,
};

async fn server() -> TestServer {
    TestServer::start(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 60000\n")),
    )
    .await
}

async fn put_grant(server: &TestServer, grant: Value) -> (u16, Value) {
    server
        .put_body(
            "/v1/plugins/misbehave/grant",
            "application/json",
            grant.to_string().into_bytes(),
        )
        .await
}

#[tokio::test]
async fn a_grant_out_of_range_is_refused_naming_the_key() {
    let server = server().await;
    for (grant, key) in [
        (json!({"poll_interval_ms": 0}), "poll_interval_ms"),
        (json!({"limits": {"memory_mib": 0}}), "memory_mib"),
        (json!({"limits": {"step_timeout_ms": 0}}), "step_timeout_ms"),
        (json!({"limits": {"max_errors": 0}}), "max_errors"),
        (
            json!({"limits": {"memory_mib": 99_999_999_999_u64}}),
            "memory_mib",
        ),
        (json!({"limits": {"memory_mib": -1}}), "memory_mib"),
        (json!({"alowed_hosts": []}), "alowed_hosts"),
    ] {
        let (status, problem) = put_grant(&server, grant.clone()).await;
        assert_eq!(status, 422, "{grant}: {problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(key), "{grant}: {detail}");
        assert!(
            !detail.contains("TOML"),
            "a JSON grant's error speaks JSON: {detail}"
        );
    }
    // `null` is "not set", as for every optional field.
    let (status, plugin) = put_grant(
        &server,
        json!({"poll_interval_ms": null, "limits": {"memory_mib": 16}}),
    )
    .await;
    assert_eq!(status, 200, "{plugin}");
}

#[tokio::test]
async fn the_plugin_shows_every_limit_in_force_and_where_it_comes_from() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(
        "[limits]\nmemory_mib = 16\nmax_errors = 9\n",
    )))
    .await;
    let plugin = server.plugin("misbehave").await;
    let limits = &plugin["grant"]["limits"];
    assert_eq!(
        limits["memory_mib"],
        json!({"value": 16, "from": "grant"}),
        "{plugin:#}"
    );
    assert_eq!(limits["max_errors"], json!({"value": 9, "from": "grant"}));
    assert_eq!(
        limits["call_timeout_ms"],
        json!({"value": 10000, "from": "host"})
    );
    assert_eq!(limits["sql_result_bytes"]["from"], "host");
}

#[tokio::test]
async fn query_parameters_follow_one_rule_on_every_endpoint() {
    let server = server().await;
    for path in [
        "/v1/schedules?limit=0",
        "/v1/schedules?paused=maybe",
        "/v1/runs?status=passed&status=failed",
        "/v1/runs?colour=red",
        "/v1/runs?limit=0",
        "/v1/audit?x=1",
    ] {
        let (status, problem) = server.get_json(path).await;
        assert_eq!(status, 422, "{path}: {problem}");
        assert!(problem["field"].is_string(), "{path}: {problem}");
    }
    let (status, _) = server
        .get_json("/v1/schedules?paused=false&plugin=misbehave")
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn optional_fields_take_null_and_labels_are_bounded() {
    let server = server().await;
    let (status, run) = server
        .post_json(
            "/v1/runs",
            &json!({"plugin": "misbehave", "poll_interval_ms": null, "timeout_ms": null, "labels": null}),
        )
        .await;
    assert_eq!(status, 202, "{run}");
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (labels, field) in [
        (json!({"a=b": "c"}), "labels.a=b"),
        (json!({"k": "v".repeat(257)}), "labels.k"),
        (Value::Object(many), "labels"),
        (json!({"k": 1}), "labels.k"),
    ] {
        let (status, problem) = server
            .post_json(
                "/v1/runs",
                &json!({"plugin": "misbehave", "labels": labels}),
            )
            .await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (422, Some(field)),
            "{problem}"
        );
    }
    let (status, problem) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": "0".repeat(64), "colour": 1}),
        )
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("colour")),
        "{problem}"
    );
}

#[tokio::test]
async fn an_idempotency_key_reused_with_another_request_is_422() {
    let server = server().await;
    let trigger = |params: Value| {
        let server = &server;
        async move {
            let response = server
                .client
                .post(server.url("/v1/runs"))
                .header("idempotency-key", "order-42")
                .json(&json!({"plugin": "misbehave", "params": params}))
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (status, first) = trigger(json!({"n": 1})).await;
    assert_eq!(status, 202);
    let (status, again) = trigger(json!({"n": 1})).await;
    assert_eq!((status, &again["id"]), (202, &first["id"]));
    let (status, problem) = trigger(json!({"n": 2})).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["code"], "idempotency_key_reused");
}

#[tokio::test]
async fn schedules_that_could_never_fire_are_refused() {
    let server = server().await;
    for (trigger, field, says) in [
        (json!({"at": "2020-01-01T00:00:00Z"}), "trigger.at", "past"),
        (
            json!({"interval_ms": 1000, "jitter_ms": 1000}),
            "trigger.jitter_ms",
            "interval_ms",
        ),
        (
            json!({"cron": "0 0 0 30 2 *"}),
            "trigger.cron",
            "never fires",
        ),
        (json!({"cron": "61 * * * *"}), "trigger.cron", "minute"),
        (json!({"cron": "0 25 * * *"}), "trigger.cron", "hour"),
    ] {
        let (status, problem) = server
            .post_json(
                "/v1/schedules",
                &json!({"plugin": "misbehave", "trigger": trigger}),
            )
            .await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (422, Some(field)),
            "{trigger}: {problem}"
        );
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains(says),
            "{trigger}: {problem}"
        );
    }
    let (status, schedule) = server
        .post_json(
            "/v1/schedules",
            &json!({"plugin": "misbehave", "trigger": {"interval_ms": 60000}, "paused": true}),
        )
        .await;
    assert_eq!(status, 201, "{schedule}");
    assert!(schedule["next_fire_at"].is_null(), "paused: {schedule}");
    let id = schedule["id"].as_str().expect("id");
    let resumed = server
        .client
        .patch(server.url(&format!("/v1/schedules/{id}")))
        .json(&json!({"paused": false}))
        .send()
        .await
        .expect("request");
    assert_eq!(resumed.status(), 200);
    let (_, shown) = server.get_json(&format!("/v1/schedules/{id}")).await;
    assert!(shown["next_fire_at"].is_string(), "resumed: {shown}");
}

#[tokio::test]
async fn a_config_out_of_range_refuses_to_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (config, key) in [
        ("lease_ms = 0\n", "lease_ms"),
        ("[limits]\nmemory_mib = 0\n", "limits.memory_mib"),
        ("max_upload_mib = 0\n", "max_upload_mib"),
    ] {
        let path = dir.path().join("stepwise.toml");
        std::fs::write(&path, config).expect("writing the config");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("running the stepwise binary");
        assert!(!output.status.success(), "{config}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(key) && stderr.contains("out of range"),
            "{config}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_command_line_says_what_to_do() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stepwise = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
            .args(args)
            .env_remove("STEPWISE_SERVER")
            .output()
            .expect("running the stepwise binary");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = stepwise(&["run", "x", "--server", "127.0.0.1:8080"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("needs a scheme: http://127.0.0.1:8080"),
        "{stderr}"
    );
    let (code, stderr) = stepwise(&[
        "run",
        "x",
        "--server",
        "http://127.0.0.1:9",
        "--junit",
        "/nonexistent/dir/r.xml",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--junit /nonexistent/dir/r.xml is not writable"),
        "{stderr}"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("writing a file");
    let (code, stderr) = stepwise(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().expect("path"),
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("is a file, not a directory"), "{stderr}");
    let (_, help) = {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
            .args(["dev", "--help"])
            .output()
            .expect("running the stepwise binary");
        (
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    assert!(help.contains("--timeout"), "{help}");
}

#[tokio::test]
async fn a_listed_run_names_its_current_step_as_a_shown_one_does() {
    let server = server().await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    let shown = server.wait_until_finished(&id).await;
    assert_eq!(shown["status"], "passed", "{shown:#}");
    let (_, listed) = server.get_json("/v1/runs?limit=1").await;
    assert_eq!(listed["runs"][0]["id"], shown["id"]);
    assert_eq!(
        listed["runs"][0]["current_step"], shown["current_step"],
        "{listed:#}"
    );
    assert_eq!(shown["current_step"], "third");
}

#[tokio::test]
async fn the_command_line_reports_what_it_met() {
    // A server that is not Stepwise: its answer's status is shown.
    let endpoint = crate::support::Endpoint::start(200).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args([
            "run",
            "x",
            "--server",
            &format!("http://{}", endpoint.host_port),
        ])
        .output()
        .await
        .expect("running the stepwise binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("answered 404") && stderr.contains("not Stepwise's JSON"),
        "{stderr}"
    );
    // A refused database connection is reported at once, as refused.
    let dir = tempfile::tempdir().expect("temp dir");
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/nowhere",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .await
        .expect("running the stepwise binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

/// PostgreSQL's text cannot hold NUL: a NUL anywhere in a request is refused before it
/// reaches the database, on every backend.
#[tokio::test]
async fn a_nul_character_in_a_request_is_refused_not_a_server_error() {
    let server = server().await;
    for path in [
        "/v1/runs?schedule=a%00b",
        "/v1/runs?plugin=%00",
        "/v1/schedules?plugin=x%00",
    ] {
        let (status, problem) = server.get_json(path).await;
        assert_eq!(status, 422, "{path}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("NUL"),
            "{problem}"
        );
    }
    for path in ["/v1/schedules/a%00b", "/v1/plugins/a%00b", "/v1/runs/a%00b"] {
        let (status, problem) = server.get_json(path).await;
        assert_eq!(status, 400, "{path}: {problem}");
        assert_eq!(problem["code"], "malformed_path", "{problem}");
    }
    let (status, problem) = server
        .post_json(
            "/v1/runs",
            &json!({"plugin": "misbehave", "labels": {"team": "a\u{0}b"}}),
        )
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("labels.team")),
        "{problem}"
    );
}

// Several threads: if the check held the thread it runs on, the test still measures it.
#[tokio::test(flavor = "multi_thread")]
async fn params_checked_against_a_backtracking_pattern_are_answered_at_once() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::new(
        "patterned",
        MISBEHAVE_PARAMS_PATTERN_WASM,
        "",
    )))
    .await;
    // Nearly a MiB of names, each of which costs a backtracking engine a million steps.
    let names = vec![format!("{}!", "a".repeat(30)); 28_000];
    let body = json!({"plugin": "patterned", "params": {"names": names}});
    let started = std::time::Instant::now();
    let response = server
        .client
        .post(server.url("/v1/runs"))
        .json(&body)
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .await;
    let elapsed = started.elapsed();
    let response = response.unwrap_or_else(|error| panic!("no answer within 20 s: {error}"));
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "answered in {elapsed:?}"
    );
}

#[tokio::test]
async fn a_params_schema_whose_pattern_needs_backtracking_is_refused_on_upload() {
    let server = TestServer::start(Setup::default()).await;
    let bytes = std::fs::read(MISBEHAVE_PARAMS_LOOKAROUND_WASM).expect("reading the plugin");
    let (status, problem) = server.upload("lookaround", bytes).await;
    assert_eq!(status, 422, "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("^(?=a)") && detail.contains("lookaround or backreferences"),
        "{detail}"
    );
}
