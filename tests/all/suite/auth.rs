//! Who may do what (README, "Running it for a team"): tokens and roles on every route, grants that only an admin
//! changes and that stay within the operator's policy, browser-borne requests refused, and an
//! audit log of every change.

use reqwest::Method;
use serde_json::{Value, json};
use stepwise_host::config::AuthMode;
use stepwise_host::model::Role;

use crate::support::{
    Endpoint, MISBEHAVE_B_WASM, MISBEHAVE_WASM, PluginFile, Scheduling, Setup, TestServer,
};

/// A request body as the matrix sends it.
enum Body {
    Empty,
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Body,
) -> (u16, Value) {
    let mut request = server.client.request(method, server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request = match body {
        Body::Empty => request,
        Body::Json(value) => request.json(&value),
        Body::Raw(content_type, bytes) => request.header("content-type", content_type).body(bytes),
    };
    crate::support::read(request.send().await.expect("request")).await
}

fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).expect("reading a test plugin")
}

async fn tokens_server(setup: Setup) -> (TestServer, [String; 4]) {
    let server = TestServer::start(setup.with_auth(AuthMode::Tokens)).await;
    let tokens = [
        server.create_token(Role::Viewer).await,
        server.create_token(Role::Runner).await,
        server.create_token(Role::Publisher).await,
        server.create_token(Role::Admin).await,
    ];
    (server, tokens)
}

/// A run that stays pending until cancelled, so that every caller has one to cancel.
async fn pending_run(server: &TestServer, admin: &str) -> String {
    let (status, run) = call(
        server,
        Method::POST,
        "/v1/runs",
        Some(admin),
        Body::Json(
            json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending"}}}}),
        ),
    )
    .await;
    assert_eq!(status, 202, "{run}");
    run["id"].as_str().expect("id").to_owned()
}

async fn schedule(server: &TestServer, admin: &str) -> String {
    let (status, schedule) = call(
        server,
        Method::POST,
        "/v1/schedules",
        Some(admin),
        Body::Json(json!({"plugin": "misbehave", "trigger": {"interval_ms": 3_600_000}})),
    )
    .await;
    assert_eq!(status, 201, "{schedule}");
    schedule["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn every_route_answers_each_role_as_the_table_says() {
    let (server, tokens) = tokens_server(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 60000\n")),
    )
    .await;
    let admin = tokens[3].clone();
    let run_id = pending_run(&server, &admin).await;
    let schedule_id = schedule(&server, &admin).await;
    let version_a = stepwise_host::model::PluginVersion::of_bytes(&wasm(MISBEHAVE_WASM));

    // (what, least role, expected success status); each request is built afresh per caller,
    // so that every caller allowed to make it meets a resource it can act on.
    #[derive(Clone, Copy, Debug)]
    enum Call {
        ListRuns,
        ShowRun,
        RunAttempts,
        ListPlugins,
        ShowPlugin,
        ListSchedules,
        ShowSchedule,
        Trigger,
        Cancel,
        CreateSchedule,
        PatchSchedule,
        DeleteSchedule,
        Upload,
        Activate,
        UploadWithGrant,
        SetGrant,
        CreateToken,
        ListTokens,
        RevokeToken,
        Audit,
    }
    let table = [
        (Call::ListRuns, Role::Viewer, 200),
        (Call::ShowRun, Role::Viewer, 200),
        (Call::RunAttempts, Role::Viewer, 200),
        (Call::ListPlugins, Role::Viewer, 200),
        (Call::ShowPlugin, Role::Viewer, 200),
        (Call::ListSchedules, Role::Viewer, 200),
        (Call::ShowSchedule, Role::Viewer, 200),
        (Call::Trigger, Role::Runner, 202),
        (Call::Cancel, Role::Runner, 200),
        (Call::CreateSchedule, Role::Runner, 201),
        (Call::PatchSchedule, Role::Runner, 200),
        (Call::DeleteSchedule, Role::Runner, 204),
        (Call::Upload, Role::Publisher, 200),
        (Call::Activate, Role::Publisher, 200),
        (Call::UploadWithGrant, Role::Admin, 200),
        (Call::SetGrant, Role::Admin, 200),
        (Call::CreateToken, Role::Admin, 201),
        (Call::ListTokens, Role::Admin, 200),
        (Call::RevokeToken, Role::Admin, 204),
        (Call::Audit, Role::Admin, 200),
    ];
    let callers: Vec<(Option<&str>, Option<Role>)> = vec![
        (None, None),
        (Some(tokens[0].as_str()), Some(Role::Viewer)),
        (Some(tokens[1].as_str()), Some(Role::Runner)),
        (Some(tokens[2].as_str()), Some(Role::Publisher)),
        (Some(tokens[3].as_str()), Some(Role::Admin)),
    ];
    for (what, least, success) in table {
        for (token, role) in &callers {
            let (method, path, body) = match what {
                Call::ListRuns => (Method::GET, "/v1/runs".to_owned(), Body::Empty),
                Call::ShowRun => (Method::GET, format!("/v1/runs/{run_id}"), Body::Empty),
                Call::RunAttempts => (
                    Method::GET,
                    format!("/v1/runs/{run_id}/attempts"),
                    Body::Empty,
                ),
                Call::ListPlugins => (Method::GET, "/v1/plugins".to_owned(), Body::Empty),
                Call::ShowPlugin => (Method::GET, "/v1/plugins/misbehave".to_owned(), Body::Empty),
                Call::ListSchedules => (Method::GET, "/v1/schedules".to_owned(), Body::Empty),
                Call::ShowSchedule => (
                    Method::GET,
                    format!("/v1/schedules/{schedule_id}"),
                    Body::Empty,
                ),
                Call::Trigger => (
                    Method::POST,
                    "/v1/runs".to_owned(),
                    Body::Json(json!({"plugin": "misbehave"})),
                ),
                Call::Cancel => {
                    let id = pending_run(&server, &admin).await;
                    (Method::POST, format!("/v1/runs/{id}/cancel"), Body::Empty)
                }
                Call::CreateSchedule => (
                    Method::POST,
                    "/v1/schedules".to_owned(),
                    Body::Json(
                        json!({"plugin": "misbehave", "trigger": {"interval_ms": 3_600_000}}),
                    ),
                ),
                Call::PatchSchedule => (
                    Method::PATCH,
                    format!("/v1/schedules/{schedule_id}"),
                    Body::Json(json!({"paused": true})),
                ),
                Call::DeleteSchedule => {
                    let id = schedule(&server, &admin).await;
                    (Method::DELETE, format!("/v1/schedules/{id}"), Body::Empty)
                }
                Call::Upload => (
                    Method::PUT,
                    "/v1/plugins/misbehave".to_owned(),
                    Body::Raw("application/wasm", wasm(MISBEHAVE_WASM)),
                ),
                Call::Activate => (
                    Method::POST,
                    "/v1/plugins/misbehave/activate".to_owned(),
                    Body::Json(json!({"version": version_a.as_str()})),
                ),
                Call::UploadWithGrant => {
                    let boundary = "stepwise-boundary";
                    let mut form = format!(
                        "--{boundary}\r\ncontent-disposition: form-data; name=\"component\"; filename=\"m.wasm\"\r\n\
                         content-type: application/wasm\r\n\r\n"
                    )
                    .into_bytes();
                    form.extend(wasm(MISBEHAVE_WASM));
                    form.extend(
                        format!(
                            "\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"grant\"\r\n\r\n\
                             poll_interval_ms = 60000\r\n--{boundary}--\r\n"
                        )
                        .into_bytes(),
                    );
                    (
                        Method::PUT,
                        "/v1/plugins/misbehave".to_owned(),
                        Body::Raw("multipart/form-data; boundary=stepwise-boundary", form),
                    )
                }
                Call::SetGrant => (
                    Method::PUT,
                    "/v1/plugins/misbehave/grant".to_owned(),
                    Body::Json(json!({"poll_interval_ms": 60000})),
                ),
                Call::CreateToken => (
                    Method::POST,
                    "/v1/tokens".to_owned(),
                    Body::Json(json!({"role": "viewer"})),
                ),
                Call::ListTokens => (Method::GET, "/v1/tokens".to_owned(), Body::Empty),
                Call::RevokeToken => {
                    let (status, created) = call(
                        &server,
                        Method::POST,
                        "/v1/tokens",
                        Some(&admin),
                        Body::Json(json!({"role": "viewer"})),
                    )
                    .await;
                    assert_eq!(status, 201, "{created}");
                    let name = created["name"].as_str().expect("name").to_owned();
                    (Method::DELETE, format!("/v1/tokens/{name}"), Body::Empty)
                }
                Call::Audit => (Method::GET, "/v1/audit".to_owned(), Body::Empty),
            };
            let expected = match role {
                None => 401,
                Some(role) if !role.includes(least) => 403,
                Some(_) => success,
            };
            let (status, body) = call(&server, method.clone(), &path, *token, body).await;
            assert_eq!(
                status, expected,
                "{what:?} ({method} {path}) as {role:?}: {body}"
            );
            if expected >= 400 {
                assert_eq!(body["status"], expected, "problem+json: {body}");
                assert!(body["detail"].is_string(), "problem+json: {body}");
            }
        }
    }

    for open in ["/healthz", "/readyz"] {
        let (status, _) = call(&server, Method::GET, open, None, Body::Empty).await;
        assert_eq!(status, 200, "{open} needs no token");
    }
    let (status, _) = call(
        &server,
        Method::GET,
        "/v1/runs",
        Some(
            "swt_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
        ),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 401, "an unknown token");
}

#[tokio::test]
async fn a_publisher_upload_cannot_widen_a_grant() {
    let (server, tokens) = tokens_server(Setup::default()).await;
    let (publisher, admin) = (tokens[2].as_str(), tokens[3].as_str());
    let endpoint = Endpoint::start(200).await;

    // A new plugin from a publisher has no capabilities.
    let (status, plugin) = call(
        &server,
        Method::PUT,
        "/v1/plugins/misbehave",
        Some(publisher),
        Body::Raw("application/wasm", wasm(MISBEHAVE_WASM)),
    )
    .await;
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(plugin["grant"]["allowed_hosts"], json!([]), "{plugin}");

    let (status, _) = call(
        &server,
        Method::PUT,
        "/v1/plugins/misbehave/grant",
        Some(admin),
        Body::Json(json!({"allowed_hosts": [endpoint.host_port]})),
    )
    .await;
    assert_eq!(status, 200);

    // The publisher's grant part is refused, and the upload with it changes nothing.
    let form = reqwest::multipart::Form::new()
        .part(
            "component",
            reqwest::multipart::Part::bytes(wasm(MISBEHAVE_B_WASM)).file_name("m.wasm"),
        )
        .text("grant", "allowed_hosts = [\"evil.example.com:443\"]");
    let response = server
        .client
        .put(server.url("/v1/plugins/misbehave"))
        .bearer_auth(publisher)
        .multipart(form)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    let plugin = server_plugin(&server, admin).await;
    assert_eq!(plugin["versions"].as_array().expect("versions").len(), 1);

    // New bytes alone keep the admin's grant (and, since it reaches a host, wait for an
    // admin's review: see publishers.rs).
    let (status, plugin) = call(
        &server,
        Method::PUT,
        "/v1/plugins/misbehave",
        Some(publisher),
        Body::Raw("application/wasm", wasm(MISBEHAVE_B_WASM)),
    )
    .await;
    assert_eq!(status, 202, "{plugin}");
    assert_eq!(
        plugin["grant"]["allowed_hosts"],
        json!([endpoint.host_port]),
        "{plugin}"
    );
    assert_eq!(plugin["versions"].as_array().expect("versions").len(), 2);
}

async fn server_plugin(server: &TestServer, token: &str) -> Value {
    let (status, plugin) = call(
        server,
        Method::GET,
        "/v1/plugins/misbehave",
        Some(token),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 200, "{plugin}");
    plugin
}

#[tokio::test]
async fn a_grant_beyond_the_policy_is_422_and_the_old_grant_is_kept() {
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(
                "allowed_hosts = [\"127.0.0.1:9000\"]\n",
            ))
            // Beyond the policy: rejected at start like a bad upload, the plugin not created.
            .with_plugin(PluginFile::new(
                "too-wide",
                MISBEHAVE_WASM,
                "allowed_hosts = [\"evil.example.com:443\"]\n",
            ))
            .with_config(
                r#"
                [sources.warehouse]
                url = "sqlite::memory:"
                [sources.secrets]
                url = "sqlite::memory:"
                [policy]
                allowed_hosts = ["127.0.0.1:*", "https://*.example.org"]
                sql_sources = ["warehouse"]
                [policy.max_limits]
                memory_mib = 32
                "#,
            ),
    )
    .await;
    let (status, _) = server.get_json("/v1/plugins/too-wide").await;
    assert_eq!(status, 404, "a manifest beyond the policy is rejected");

    let within = json!({
        "allowed_hosts": ["127.0.0.1:9001", "https://api.example.org"],
        "sql_sources": ["warehouse"],
        "limits": {"memory_mib": 16},
    });
    let (status, plugin) = server
        .put_body(
            "/v1/plugins/misbehave/grant",
            "application/json",
            within.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{plugin}");

    let beyond = [
        (
            json!({"allowed_hosts": ["evil.example.com:443"]}),
            "grant.allowed_hosts",
        ),
        (
            json!({"allowed_hosts": ["http://api.example.org:443"]}),
            "grant.allowed_hosts",
        ),
        (json!({"sql_sources": ["secrets"]}), "grant.sql_sources"),
        (
            json!({"limits": {"memory_mib": 64}}),
            "grant.limits.memory_mib",
        ),
    ];
    for (grant, field) in beyond {
        let (status, problem) = server
            .put_body(
                "/v1/plugins/misbehave/grant",
                "application/json",
                grant.to_string().into_bytes(),
            )
            .await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (422, Some(field)),
            "{grant}: {problem}"
        );
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("policy"),
            "{problem}"
        );
    }
    let plugin = server.plugin("misbehave").await;
    assert_eq!(
        plugin["grant"]["allowed_hosts"],
        json!(["127.0.0.1:9001", "https://api.example.org"]),
        "the grant within the policy is kept: {plugin}"
    );
    assert_eq!(plugin["grant"]["sql_sources"], json!(["warehouse"]));
}

/// Runs the `stepwise` command line against `server`'s database; returns exit status and
/// standard output.
fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args(args)
        .arg("--data-dir")
        .arg(server.data_dir())
        .arg("--database-url")
        .arg(server.database_url())
        .env("STEPWISE_LOG", "warn")
        .output()
        .expect("running the stepwise binary");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once_on_every_node() {
    let (server, tokens) = tokens_server(Setup::default()).await;
    let admin = tokens[3].as_str();
    // A second node on the same database where the backend is made for several (PostgreSQL);
    // on SQLite the same server is asked again.
    let other = if server.database_url().starts_with("postgres") {
        Some(server.another_node(Scheduling::default()).await)
    } else {
        None
    };
    let other = other.as_ref().unwrap_or(&server);

    // From the command line, while the server runs: the secret is the last line.
    let (ok, stdout, stderr) = cli(
        &server,
        &["token", "create", "--role", "runner", "--name", "ci-bot"],
    );
    assert!(ok, "{stdout}{stderr}");
    let secret = stdout
        .lines()
        .last()
        .expect("a last line")
        .trim()
        .to_owned();
    assert!(secret.starts_with("swt_"), "{stdout}");
    let (status, _) = call(other, Method::GET, "/v1/runs", Some(&secret), Body::Empty).await;
    assert_eq!(status, 200);
    let (ok, listed, _) = cli(&server, &["token", "list"]);
    assert!(
        ok && listed.contains("ci-bot") && listed.contains("runner"),
        "{listed}"
    );
    assert!(!listed.contains(&secret[4..]), "list never shows a secret");

    let (ok, stdout, stderr) = cli(&server, &["token", "revoke", "ci-bot"]);
    assert!(ok, "{stdout}{stderr}");
    for node in [&server, other] {
        let (status, problem) =
            call(node, Method::GET, "/v1/runs", Some(&secret), Body::Empty).await;
        assert_eq!(status, 401, "{problem}");
    }

    // Over the API, on one node; refused on the other at once.
    let (status, created) = call(
        &server,
        Method::POST,
        "/v1/tokens",
        Some(admin),
        Body::Json(json!({"role": "viewer", "name": "dashboard"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert_eq!(
        call(other, Method::GET, "/v1/runs", Some(&secret), Body::Empty)
            .await
            .0,
        200
    );
    let (status, _) = call(
        &server,
        Method::DELETE,
        "/v1/tokens/dashboard",
        Some(admin),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        call(other, Method::GET, "/v1/runs", Some(&secret), Body::Empty)
            .await
            .0,
        401
    );
    let (status, _) = call(
        &server,
        Method::DELETE,
        "/v1/tokens/dashboard",
        Some(admin),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 404, "revoked already");
}

#[tokio::test]
async fn plain_text_posts_get_415_a_foreign_host_421_and_a_foreign_origin_403() {
    let server = TestServer::start(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 60000\n")),
    )
    .await;
    let body = json!({"plugin": "misbehave"}).to_string();
    for path in [
        "/v1/runs",
        "/v1/schedules",
        "/v1/plugins/misbehave/activate",
    ] {
        let response = server
            .client
            .post(server.url(path))
            .header("content-type", "text/plain")
            .body(body.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 415, "{path}");
        let problem: Value = response.json().await.expect("problem+json");
        assert_eq!(problem["code"], "unsupported_media_type", "{problem}");
    }
    let (status, _) = server
        .put_body("/v1/plugins/misbehave/grant", "text/plain", b"".to_vec())
        .await;
    assert_eq!(
        status, 415,
        "a grant is JSON or TOML, never a form's text/plain"
    );

    let response = server
        .client
        .get(server.url("/v1/runs"))
        .header("host", "rebound.attacker.example:8080")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 421);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let port = server.base.rsplit(':').next().expect("port");
    let response = server
        .client
        .get(server.url("/v1/runs"))
        .header("host", format!("localhost:{port}"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "localhost names a loopback server");

    // A page elsewhere posting a form to a loopback server without tokens.
    let response = server
        .client
        .post(server.url("/v1/runs"))
        .header("origin", "https://attacker.example")
        .json(&json!({"plugin": "misbehave"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    let (status, runs) = server.get_json("/v1/runs").await;
    assert_eq!(status, 200);
    assert_eq!(runs["runs"], json!([]), "nothing was triggered: {runs}");
}

#[tokio::test]
async fn the_secret_appears_nowhere_in_the_database() {
    let (server, tokens) = tokens_server(Setup::default()).await;
    let (status, created) = call(
        &server,
        Method::POST,
        "/v1/tokens",
        Some(&tokens[3]),
        Body::Json(json!({"role": "runner", "name": "stored"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let secrets: Vec<String> = tokens
        .iter()
        .cloned()
        .chain([created["secret"].as_str().expect("secret").to_owned()])
        .collect();
    let everything = database_text(&server).await;
    assert!(everything.contains("stored"), "the dump holds the tokens");
    for secret in &secrets {
        let secret_part = secret.rsplit('_').next().expect("secret part");
        assert!(
            !everything.contains(secret_part),
            "a token's secret was found in the database"
        );
    }
    let (status, listed) = call(
        &server,
        Method::GET,
        "/v1/tokens",
        Some(&tokens[3]),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 200);
    for secret in &secrets {
        assert!(!listed.to_string().contains(secret.as_str()), "{listed}");
    }
}

/// Everything the database holds, as text: the SQLite files byte for byte, or every row of
/// every PostgreSQL table.
async fn database_text(server: &TestServer) -> String {
    if server.database_url().starts_with("sqlite") {
        let mut text = String::new();
        for entry in std::fs::read_dir(server.data_dir())
            .expect("data dir")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("stepwise.db") {
                let bytes = std::fs::read(entry.path()).expect("reading the database");
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        return text;
    }
    use sqlx::{Connection, Row};
    let mut connection = sqlx::PgConnection::connect(server.database_url())
        .await
        .expect("connecting");
    let tables: Vec<String> =
        sqlx::query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(&mut connection)
            .await
            .expect("tables")
            .iter()
            .map(|row| row.get::<String, _>(0))
            .collect();
    let mut text = String::new();
    for table in tables {
        let rows = sqlx::query(&format!("SELECT CAST(t AS TEXT) FROM {table} t"))
            .fetch_all(&mut connection)
            .await
            .expect("rows");
        for row in rows {
            text.push_str(&row.get::<String, _>(0));
        }
    }
    text
}

#[tokio::test]
async fn an_idempotency_key_is_scoped_to_the_token_and_the_plugin() {
    let (server, tokens) = tokens_server(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 60000\n")),
    )
    .await;
    let trigger = |token: String| {
        let server = &server;
        async move {
            let response = server
                .client
                .post(server.url("/v1/runs"))
                .bearer_auth(token)
                .header("idempotency-key", "nightly-1")
                .json(&json!({"plugin": "misbehave"}))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 202);
            let run: Value = response.json().await.expect("json");
            run["id"].as_str().expect("id").to_owned()
        }
    };
    let first = trigger(tokens[1].clone()).await;
    assert_eq!(
        trigger(tokens[1].clone()).await,
        first,
        "same token, same run"
    );
    let other = trigger(tokens[3].clone()).await;
    assert_ne!(
        other, first,
        "another token never receives the first one's run"
    );
}

#[tokio::test]
async fn every_change_is_in_the_audit_log_with_who_made_it() {
    let (server, tokens) = tokens_server(Setup::default()).await;
    let (publisher, admin) = (tokens[2].as_str(), tokens[3].as_str());
    let publisher_name = token_name_of(&server, admin, "publisher").await;
    let admin_name = token_name_of(&server, admin, "admin").await;
    let a = wasm(MISBEHAVE_WASM);
    let version_a = stepwise_host::model::PluginVersion::of_bytes(&a);
    for (token, bytes) in [(publisher, a), (publisher, wasm(MISBEHAVE_B_WASM))] {
        let (status, body) = call(
            &server,
            Method::PUT,
            "/v1/plugins/misbehave",
            Some(token),
            Body::Raw("application/wasm", bytes),
        )
        .await;
        assert!(status == 200 || status == 201, "{body}");
    }
    let (status, _) = call(
        &server,
        Method::POST,
        "/v1/plugins/misbehave/activate",
        Some(publisher),
        Body::Json(json!({"version": version_a.as_str()})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &server,
        Method::PUT,
        "/v1/plugins/misbehave/grant",
        Some(admin),
        Body::Raw("application/toml", b"poll_interval_ms = 5000\n".to_vec()),
    )
    .await;
    assert_eq!(status, 200);

    let (status, page) = call(
        &server,
        Method::GET,
        "/v1/audit?limit=2",
        Some(admin),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let entries = page["entries"].as_array().expect("entries");
    assert_eq!(entries[0]["action"], "plugin.grant", "{page}");
    assert_eq!(entries[0]["actor"], admin_name, "{page}");
    assert_eq!(entries[0]["detail"]["grant"], "poll_interval_ms = 5000\n");
    assert_eq!(entries[1]["action"], "plugin.activate", "{page}");
    assert_eq!(entries[1]["actor"], publisher_name);
    assert_eq!(entries[1]["detail"]["version"], version_a.as_str());
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let (_, rest) = call(
        &server,
        Method::GET,
        &format!("/v1/audit?cursor={cursor}&limit=100"),
        Some(admin),
        Body::Empty,
    )
    .await;
    let actions: Vec<&str> = rest["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| entry["action"].as_str().unwrap_or_default())
        .collect();
    // Newest first: two uploads, then the four tokens the test began with.
    assert_eq!(
        actions,
        [
            "plugin.upload",
            "plugin.upload",
            "token.create",
            "token.create",
            "token.create",
            "token.create"
        ],
        "{rest}"
    );
    assert!(rest["next_cursor"].is_null());
}

async fn token_name_of(server: &TestServer, admin: &str, role: &str) -> String {
    let (_, listed) = call(server, Method::GET, "/v1/tokens", Some(admin), Body::Empty).await;
    listed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|token| token["role"] == role)
        .and_then(|token| token["name"].as_str())
        .expect("a token with the role")
        .to_owned()
}

#[tokio::test]
async fn an_activation_never_writes_back_a_grant_read_before_it() {
    // The race of an upload compiling while an admin changes the grant, made deterministic
    // at the store: the activation carries no grant, so the later grant stands.
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let store = stepwise_host::storage::Store::open(server.database_url())
        .await
        .expect("opening the database");
    let bytes = wasm(MISBEHAVE_B_WASM);
    let version = stepwise_host::model::PluginVersion::of_bytes(&bytes);
    let name = stepwise_host::model::PluginName::parse("misbehave").expect("name");
    let before = store
        .find_plugin("misbehave")
        .await
        .expect("read")
        .expect("plugin");
    let check_info = before.check_info.clone();
    store
        .save_plugin_version(
            &name,
            &version,
            &bytes,
            &check_info,
            // Now, not a fixed instant: retention prunes unused versions created long ago,
            // and would take this one before its activation.
            stepwise_host::model::now_millis(),
            stepwise_host::model::Actor {
                name: "test",
                reviews: true,
            },
        )
        .await
        .expect("saving a version");
    let (status, _) = server
        .put_body(
            "/v1/plugins/misbehave/grant",
            "application/toml",
            b"poll_interval_ms = 777\n".to_vec(),
        )
        .await;
    assert_eq!(status, 200);
    store
        .activate_plugin(
            &name,
            &version,
            None,
            stepwise_host::storage::AuditEntry::new("test", "plugin.upload", "misbehave", 2),
            stepwise_host::storage::Review::By("test"),
        )
        .await
        .expect("activating");
    let plugin = server.plugin("misbehave").await;
    assert_eq!(plugin["active_version"], version.as_str());
    assert_eq!(plugin["grant"]["poll_interval_ms"], 777, "{plugin}");
}

#[tokio::test]
async fn auth_none_on_a_public_address_refuses_to_start() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--auth",
            "none",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .output()
        .expect("running the stepwise binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--auth none is refused on 0.0.0.0"),
        "{stderr}"
    );
}

/// The audit log's names for changes made without a token cannot be a token's name, so no
/// token can pose as the command line, the plugins directory or an unauthenticated caller.
#[tokio::test]
async fn the_audit_logs_own_actor_names_are_not_token_names() {
    let (server, [.., admin]) = tokens_server(Setup::default()).await;
    for name in ["cli", "plugins-dir", "anonymous"] {
        let (status, problem) = call(
            &server,
            Method::POST,
            "/v1/tokens",
            Some(&admin),
            Body::Json(json!({"role": "viewer", "name": name})),
        )
        .await;
        assert_eq!(status, 422, "{name}: {problem}");
        assert!(problem.to_string().contains("reserved"), "{problem}");
        let (ok, stdout, stderr) = cli(
            &server,
            &["token", "create", "--role", "viewer", "--name", name],
        );
        assert!(!ok, "{name}: {stdout}");
        assert!(stderr.contains("reserved"), "{stderr}");
    }
}

/// A revoked token stays listed with `revoked_at`, refused, and its name is never given to a
/// new token (whose idempotency keys and audit entries would read as the old one's); a token
/// may be given a lifetime, after which it is refused.
#[tokio::test]
async fn revoked_tokens_keep_their_names_and_tokens_expire() {
    let (server, [.., admin]) = tokens_server(Setup::default()).await;
    let revoke = || {
        call(
            &server,
            Method::DELETE,
            "/v1/tokens/ci-bot",
            Some(&admin),
            Body::Empty,
        )
    };
    let create = |body: Value| {
        call(
            &server,
            Method::POST,
            "/v1/tokens",
            Some(&admin),
            Body::Json(body),
        )
    };
    let (status, created) = create(json!({"role": "runner", "name": "ci-bot"})).await;
    assert_eq!(status, 201, "{created}");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let (status, _) = revoke().await;
    assert_eq!(status, 204);
    let (status, problem) =
        call(&server, Method::GET, "/v1/runs", Some(&secret), Body::Empty).await;
    assert_eq!(status, 401);
    assert!(problem.to_string().contains("revoked"), "{problem}");
    let (_, list) = call(
        &server,
        Method::GET,
        "/v1/tokens",
        Some(&admin),
        Body::Empty,
    )
    .await;
    let listed = list["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|token| token["name"] == "ci-bot")
        .cloned()
        .expect("the revoked token is still listed");
    assert!(listed["revoked_at"].is_string(), "{listed}");
    let (status, problem) = create(json!({"role": "runner", "name": "ci-bot"})).await;
    assert_eq!(status, 409, "{problem}");
    let (status, _) = revoke().await;
    assert_eq!(status, 404, "revoking twice");

    // Expiry: over the API and from the command line.
    let (status, problem) = create(json!({"role": "viewer", "expires_in": "soon"})).await;
    assert_eq!(status, 422, "{problem}");
    assert!(problem.to_string().contains("expires_in"), "{problem}");
    let (status, created) =
        create(json!({"role": "viewer", "name": "brief", "expires_in": "2s"})).await;
    assert_eq!(status, 201, "{created}");
    assert!(created["expires_at"].is_string(), "{created}");
    let brief = created["secret"].as_str().expect("secret").to_owned();
    let (ok, stdout, stderr) = cli(
        &server,
        &[
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "brief-cli",
            "--expires-in",
            "2s",
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    let brief_cli = stdout.lines().last().expect("the secret").to_owned();
    for secret in [&brief, &brief_cli] {
        let (status, _) = call(&server, Method::GET, "/v1/runs", Some(secret), Body::Empty).await;
        assert_eq!(status, 200, "usable before it expires");
    }
    for secret in [&brief, &brief_cli] {
        let expired = crate::support::poll_until(|| async {
            let (status, problem) =
                call(&server, Method::GET, "/v1/runs", Some(secret), Body::Empty).await;
            (status == 401).then_some(problem)
        })
        .await
        .expect("the token expires");
        assert!(expired.to_string().contains("expired"), "{expired}");
    }
    let (ok, stdout, _) = cli(&server, &["token", "list"]);
    assert!(ok);
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("ci-bot") && line.contains("revoked")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("brief ") && line.contains("expires")),
        "{stdout}"
    );
}

#[tokio::test]
async fn runs_cancels_and_schedules_name_the_token_that_made_them() {
    let (server, tokens) = tokens_server(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 60000\n")),
    )
    .await;
    let [_, runner, _, admin] = &tokens;
    let name_of = async |secret: &str| {
        let (status, me) = call(
            &server,
            Method::GET,
            "/v1/whoami",
            Some(secret),
            Body::Empty,
        )
        .await;
        assert_eq!(status, 200, "{me}");
        me["name"].as_str().expect("name").to_owned()
    };
    let (runner_name, admin_name) = (name_of(runner).await, name_of(admin).await);
    let run_id = pending_run(&server, runner).await;
    let (status, cancelled) = call(
        &server,
        Method::POST,
        &format!("/v1/runs/{run_id}/cancel"),
        Some(admin),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    let (_, run) = call(
        &server,
        Method::GET,
        &format!("/v1/runs/{run_id}"),
        Some(admin),
        Body::Empty,
    )
    .await;
    assert_eq!(run["created_by"], runner_name.as_str(), "{run}");
    assert_eq!(run["cancelled_by"], admin_name.as_str(), "{run}");
    let schedule_id = schedule(&server, runner).await;
    let (_, schedule) = call(
        &server,
        Method::GET,
        &format!("/v1/schedules/{schedule_id}"),
        Some(admin),
        Body::Empty,
    )
    .await;
    assert_eq!(schedule["created_by"], runner_name.as_str(), "{schedule}");
    let (_, list) = call(&server, Method::GET, "/v1/runs", Some(admin), Body::Empty).await;
    assert_eq!(
        list["runs"][0]["created_by"],
        runner_name.as_str(),
        "{list}"
    );
}

#[tokio::test]
async fn a_scoped_token_from_the_command_line_shows_its_patterns() {
    let (server, tokens) = tokens_server(Setup::default()).await;
    let admin = tokens[3].as_str();
    let (ok, stdout, stderr) = cli(
        &server,
        &[
            "token",
            "create",
            "--role",
            "publisher",
            "--name",
            "ci-team-a",
            "--plugins",
            "team-a-*,shared",
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("for plugins team-a-*,shared"), "{stdout}");
    let secret = stdout
        .lines()
        .last()
        .expect("a last line")
        .trim()
        .to_owned();
    let (status, me) = call(
        &server,
        Method::GET,
        "/v1/whoami",
        Some(&secret),
        Body::Empty,
    )
    .await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["plugins"], json!(["team-a-*", "shared"]));
    let (ok, listed, _) = cli(&server, &["token", "list"]);
    assert!(ok && listed.contains("plugins team-a-*,shared"), "{listed}");
    let (_, list) = call(&server, Method::GET, "/v1/tokens", Some(admin), Body::Empty).await;
    assert!(
        list["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .any(|token| token["name"] == "ci-team-a"
                && token["plugins"] == json!(["team-a-*", "shared"])),
        "{list}"
    );
    for refused in [
        vec![
            "token",
            "create",
            "--role",
            "admin",
            "--plugins",
            "team-a-*",
        ],
        vec![
            "token",
            "create",
            "--role",
            "publisher",
            "--plugins",
            "Team A",
        ],
    ] {
        let (ok, stdout, stderr) = cli(&server, &refused);
        assert!(!ok, "{refused:?}: {stdout}");
        assert!(stderr.contains("--plugins"), "{stderr}");
    }
}
