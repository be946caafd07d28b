//! Status pages and badges (README, "Status pages"): the daily rollups are exact for a scripted
//! history in two time zones (one a half-hour off UTC, with runs that straddle midnight), a
//! rebuild restores them, retention keeps them after the runs go, live runs reach them, the
//! public page and badge leak no params, outputs or messages, and a private page wants a token.

use std::time::Duration;

use serde_json::{Value, json};
use stepwise_host::config::AuthMode;
use stepwise_host::model::{PluginScope, RetentionPolicy, Role, now_millis};
use stepwise_host::retention::sweep;
use stepwise_host::storage::Store;

use crate::support::{PluginFile, Setup, TestServer, poll_until};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

const PAGES: &str = r#"
[[status_page]]
slug = "utc"
title = "Pipeline (UTC)"
plugins = ["misbehave"]
public = true
days = 30

[[status_page]]
slug = "india"
title = "Pipeline (India)"
plugins = ["misbehave"]
time_zone = "Asia/Kolkata"
public = true
show = ["messages"]

[[status_page]]
slug = "private"
title = "Private"
plugins = ["misbehave"]

[[status_page]]
slug = "team"
title = "Data team"
labels = { team = "data" }
public = true
"#;

/// Something a public reader must never see, planted in params, outputs and messages.
const PLANTED: &str = "PLANTED-sk-live-4f2a";

/// Runs SQL on the server's database (SQLite or PostgreSQL), as the tests' own client.
async fn execute(url: &str, sql: &str) {
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.expect("connecting");
        sqlx::raw_sql(sql).execute(&pool).await.expect("executing");
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.expect("connecting");
        sqlx::raw_sql(sql).execute(&pool).await.expect("executing");
    }
}

/// A UUIDv7 for a run created at `at`.
fn run_id(at: i64, n: u64) -> String {
    format!(
        "{:08x}-{:04x}-7000-8000-{n:012x}",
        (at as u64) >> 16,
        (at as u64) & 0xffff
    )
}

struct Scripted {
    created: i64,
    finished: i64,
    status: &'static str,
    /// (status, passed_after_ms) of steps first, second, third.
    steps: [(&'static str, Option<i64>); 3],
}

/// The SQL that writing and finishing `run` would have written, the rollup queue included.
fn insert_sql(version: &str, n: u64, run: &Scripted) -> String {
    let id = run_id(run.created, n);
    let mut sql = format!(
        "INSERT INTO runs (id, plugin_name, plugin_version, params, labels, status, message, \
         poll_interval_ms, max_errors, created_at, started_at, finished_at, deadline_at) VALUES \
         ('{id}', 'misbehave', '{version}', '{{\"token\": \"{PLANTED}\"}}', '{{}}', '{status}', \
         'failed at host db.internal: {PLANTED}', 1000, 3, {created}, {created}, {finished}, {deadline});\n",
        status = run.status,
        created = run.created,
        finished = run.finished,
        deadline = run.created + HOUR,
    );
    for (position, (name, (status, passed_after))) in ["first", "second", "third"]
        .iter()
        .zip(run.steps)
        .enumerate()
    {
        let passed_after = passed_after.map_or("NULL".to_owned(), |ms| ms.to_string());
        sql.push_str(&format!(
            "INSERT INTO steps (run_id, position, name, status, attempts, output, passed_after_ms) \
             VALUES ('{id}', {position}, '{name}', '{status}', 1, '{{\"secret\": \"{PLANTED}\"}}', {passed_after});\n"
        ));
    }
    sql.push_str(&format!(
        "INSERT INTO rollup_queue (run_id, finished_at) VALUES ('{id}', {});\n",
        run.finished
    ));
    sql
}

async fn status_json(server: &TestServer, slug: &str) -> Value {
    let (status, body) = server.get_json(&format!("/status/{slug}.json")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The page's first check's history, once it has `days` days (the rollup job folds about
/// once a second; the page keeps its figures for 5 s).
async fn history_of(server: &TestServer, slug: &str, days: usize) -> Value {
    poll_until(|| async {
        let page = status_json(server, slug).await;
        let check = page["checks"][0].clone();
        (check["history"].as_array().map_or(0, Vec::len) >= days).then_some(check)
    })
    .await
    .unwrap_or_else(|| panic!("page {slug} never showed {days} days"))
}

fn day(history: &Value, day: &str) -> Value {
    history["history"]
        .as_array()
        .and_then(|days| days.iter().find(|entry| entry["day"] == day))
        .cloned()
        .unwrap_or_else(|| panic!("no day {day} in {history:#}"))
}

fn counts(day: &Value) -> [i64; 5] {
    ["passed", "failed", "errored", "timed_out", "cancelled"].map(|key| day[key].as_i64().unwrap())
}

async fn get_with_token(server: &TestServer, path: &str, token: &str) -> reqwest::Response {
    server
        .client
        .get(server.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("requesting")
}

/// A server with [`PAGES`] and the misbehave plugin.
async fn server_with_pages(auth: AuthMode) -> TestServer {
    TestServer::start(
        Setup::default()
            .with_auth(auth)
            .with_config(PAGES)
            .with_plugin(PluginFile::misbehave("")),
    )
    .await
}

#[tokio::test]
async fn rollups_are_exact_in_each_time_zone_and_survive_a_rebuild_and_retention() {
    let server = server_with_pages(AuthMode::None).await;
    let version = server.plugin("misbehave").await["active_version"]
        .as_str()
        .unwrap()
        .to_owned();
    // U: midnight UTC three days ago; India's midnight is at 18:30 UTC.
    let today_utc = now_millis() / DAY * DAY;
    let u = today_utc - 3 * DAY;
    let day_text = |at: i64| {
        chrono::DateTime::from_timestamp_millis(at)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string()
    };
    let (before, d, after) = (day_text(u - DAY), day_text(u), day_text(u + DAY));
    let minutes = |n: i64| n * 60_000;
    let passed = [
        ("passed", Some(200)),
        ("passed", Some(3000)),
        ("passed", Some(6000)),
    ];
    let history = [
        // 23:50 UTC the day before (05:20 in India on D), finishing after UTC midnight.
        Scripted {
            created: u - minutes(10),
            finished: u + minutes(5),
            status: "passed",
            steps: passed,
        },
        Scripted {
            created: u + 2 * HOUR,
            finished: u + 2 * HOUR + minutes(1),
            status: "cancelled",
            steps: [
                ("passed", Some(10)),
                ("cancelled", None),
                ("cancelled", None),
            ],
        },
        Scripted {
            created: u + 3 * HOUR,
            finished: u + 3 * HOUR + minutes(1),
            status: "passed",
            steps: [
                ("passed", Some(100)),
                ("passed", Some(2000)),
                ("passed", Some(5000)),
            ],
        },
        // 23:55 in India on D, finishing after India's midnight.
        Scripted {
            created: u + 18 * HOUR + minutes(25),
            finished: u + 18 * HOUR + minutes(35),
            status: "failed",
            steps: [("passed", Some(50)), ("failed", None), ("skipped", None)],
        },
        // 00:10 in India on D+1.
        Scripted {
            created: u + 18 * HOUR + minutes(40),
            finished: u + 18 * HOUR + minutes(45),
            status: "errored",
            steps: [("errored", None), ("skipped", None), ("skipped", None)],
        },
    ];
    let sql: String = history
        .iter()
        .enumerate()
        .map(|(n, run)| insert_sql(&version, n as u64, run))
        .collect();
    execute(server.database_url(), &sql).await;

    let utc = history_of(&server, "utc", 2).await;
    assert_eq!(counts(&day(&utc, &before)), [1, 0, 0, 0, 0], "{utc:#}");
    assert_eq!(counts(&day(&utc, &d)), [1, 1, 1, 0, 1], "{utc:#}");
    assert_eq!(day(&utc, &d)["worst"], "failed");
    assert_eq!(day(&utc, &d)["uptime"], json!(1.0 / 3.0));
    let india = history_of(&server, "india", 2).await;
    assert_eq!(counts(&day(&india, &d)), [2, 1, 0, 0, 1], "{india:#}");
    assert_eq!(counts(&day(&india, &after)), [0, 0, 1, 0, 0], "{india:#}");
    // Cancelled runs are left out of uptime: 2 passed of 4 decided.
    assert_eq!(utc["uptime"]["7d"], json!(0.5));
    assert_eq!(utc["uptime"]["30d"], json!(0.5));
    assert_eq!(
        utc["uptime"]["24h"],
        Value::Null,
        "no run in the last 24 hours"
    );
    // The last run to finish decides the state.
    assert_eq!(utc["state"], "errored");
    // Steps: how often each passed, how often one stopped a run, and its latency (±2 %).
    let steps = utc["steps"].as_array().expect("steps");
    let step = |name: &str| {
        steps
            .iter()
            .find(|step| step["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (
            step("first")["passed"].as_i64(),
            step("first")["ended_run"].as_i64()
        ),
        (Some(4), Some(1))
    );
    assert_eq!(
        (
            step("second")["passed"].as_i64(),
            step("second")["ended_run"].as_i64()
        ),
        (Some(2), Some(1))
    );
    let near = |value: &Value, exact: f64| {
        let value = value.as_f64().expect("a number");
        assert!(
            (value - exact).abs() <= exact * 0.02,
            "{value} is not {exact} ±2 %"
        );
    };
    near(&step("first")["median_ms"], 50.0);
    near(&step("first")["p95_ms"], 200.0);
    near(&step("third")["median_ms"], 5000.0);
    near(&step("third")["p95_ms"], 6000.0);
    // One incident: the failed run opened it, the errored one after it extends it.
    let page = status_json(&server, "india").await;
    let incidents = page["incidents"].as_array().expect("incidents");
    assert_eq!(incidents.len(), 1, "{page:#}");
    assert_eq!(incidents[0]["runs"], 2);
    assert_eq!(incidents[0]["status"], "errored");
    assert_eq!(incidents[0]["failing_step"], "first");
    assert_eq!(incidents[0]["ended_at"], Value::Null);
    assert!(
        incidents[0]["message"].as_str().unwrap().contains(PLANTED),
        "a page with show = [\"messages\"] shows them"
    );
    assert_eq!(page["state"], "failing");

    // Nothing planted reaches the pages that do not opt in, in any form they are served.
    for path in [
        "/status/utc",
        "/status/utc.json",
        "/badge/utc.svg",
        "/badge/utc/misbehave.svg",
    ] {
        let body = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("requesting")
            .text()
            .await
            .expect("a body");
        assert!(!body.contains("PLANTED"), "{path} leaks: {body}");
        assert!(!body.contains("db.internal"), "{path} leaks a host: {body}");
    }
    let html = server
        .client
        .get(server.url("/status/utc"))
        .send()
        .await
        .expect("requesting")
        .text()
        .await
        .expect("a body");
    assert!(
        html.contains("Pipeline (UTC)") && html.contains("misbehave"),
        "{html}"
    );
    assert_eq!(
        html.matches("class=\"day state-").count(),
        30,
        "one bar a day"
    );

    // A rebuild (`stepwise status rebuild`) restores what was lost, from the runs still
    // stored.
    let store = Store::open(server.database_url()).await.expect("opening");
    execute(
        server.database_url(),
        &format!(
            "DELETE FROM rollup_days WHERE day_start >= {u}; DELETE FROM rollup_steps; \
             DELETE FROM rollup_latency; DELETE FROM incidents;"
        ),
    )
    .await;
    let config = server.data_dir().join("pages.toml");
    std::fs::write(&config, PAGES).expect("writing the config");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args(["status", "rebuild", "--database-url", server.database_url()])
        .arg("--data-dir")
        .arg(server.data_dir())
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .expect("running stepwise status rebuild");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("from 5 runs") && stdout.contains("Asia/Kolkata"),
        "{stdout}"
    );
    let page = poll_until(|| async {
        let page = status_json(&server, "india").await;
        (page["checks"][0]["history"].as_array().map_or(0, Vec::len) == 2).then_some(page)
    })
    .await
    .expect("the rebuilt page");
    assert_eq!(
        counts(&day(&page["checks"][0], &d)),
        [2, 1, 0, 0, 1],
        "{page:#}"
    );
    assert_eq!(
        counts(&day(&page["checks"][0], &after)),
        [0, 0, 1, 0, 0],
        "{page:#}"
    );
    assert_eq!(
        page["incidents"].as_array().map(Vec::len),
        Some(1),
        "{page:#}"
    );

    // Retention deletes the runs and keeps their days.
    let policy = RetentionPolicy {
        finished_runs: Duration::from_secs(3600),
        ..RetentionPolicy::default()
    };
    let swept = sweep(&store, &policy, now_millis(), 100)
        .await
        .expect("sweeping");
    assert!(swept.runs.rows >= 5, "{swept:?}");
    let (status, _) = server
        .get_json(&format!("/v1/runs/{}", run_id(history[0].created, 0)))
        .await;
    assert_eq!(status, 404);
    let utc = history_of(&server, "utc", 2).await;
    assert_eq!(counts(&day(&utc, &d)), [1, 1, 1, 0, 1], "{utc:#}");
    assert_eq!(utc["uptime"]["30d"], json!(0.5));
}

#[tokio::test]
async fn live_runs_reach_the_page_and_its_badges() {
    let server = server_with_pages(AuthMode::None).await;
    // The page's live events: `changed` when a run finishes, and nothing of the run.
    let mut events = server
        .client
        .get(server.url("/status/utc/events"))
        .send()
        .await
        .expect("opening the page's events");
    assert_eq!(events.status(), 200);
    let mut seen = String::new();
    while !seen.contains("event: open") {
        let chunk = events.chunk().await.expect("reading").expect("a chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    for params in [json!({}), json!({"steps": {"second": {"action": "fail"}}})] {
        let id = server
            .trigger(json!({"plugin": "misbehave", "params": params}))
            .await;
        server.wait_until_finished(&id).await;
    }
    let check = poll_until(|| async {
        let page = status_json(&server, "utc").await;
        let check = page["checks"][0].clone();
        let today = check["history"].as_array()?.last()?.clone();
        (today["passed"] == 1 && today["failed"] == 1).then_some(check)
    })
    .await
    .expect("the two runs on today's bar");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.contains("event: changed") {
        let chunk = tokio::time::timeout_at(deadline, events.chunk())
            .await
            .expect("no `changed` event")
            .expect("reading")
            .expect("a chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        !seen.contains("misbehave") && !seen.contains("run_id"),
        "{seen}"
    );
    assert_eq!(check["uptime"]["24h"], json!(0.5));
    assert_eq!(check["state"], "failed");

    for (path, expect) in [
        ("/badge/utc.svg", "failing"),
        ("/badge/utc/misbehave.svg", "failed"),
        ("/badge/utc.svg?metric=uptime_30d", "50%"),
        ("/badge/utc/misbehave.svg?metric=p95_ms", "ms"),
    ] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("requesting");
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response.headers()[name]
                .to_str()
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            header("content-type").starts_with("image/svg+xml"),
            "{path}"
        );
        assert!(header("cache-control").contains("max-age"), "{path}");
        let svg = response.text().await.expect("a body");
        let document = roxmltree::Document::parse(&svg)
            .unwrap_or_else(|error| panic!("{path} is not XML: {error}\n{svg}"));
        let root = document.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        assert!(
            root.attribute("width")
                .and_then(|w| w.parse::<u32>().ok())
                .is_some()
        );
        let text: String = root
            .descendants()
            .filter(|node| node.has_tag_name("text"))
            .filter_map(|node| node.text())
            .collect();
        assert!(text.contains(expect), "{path}: {text}");
    }
    let (status, body) = server.get_json("/badge/utc.svg?metric=nonsense").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "metric", "{body}");
    let (status, body) = server.get_json("/badge/utc/nothing.svg").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get_json("/status/nothing").await;
    assert_eq!(
        (status, &body["code"]),
        (404, &json!("status_page_not_found"))
    );
}

#[tokio::test]
async fn private_pages_want_a_viewer_and_anonymous_readers_are_limited() {
    let server = server_with_pages(AuthMode::Tokens).await;
    for path in [
        "/status/private",
        "/status/private.json",
        "/badge/private.svg",
    ] {
        let (status, body) = server.get_json(path).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    let viewer = server.create_token(Role::Viewer).await;
    let response = get_with_token(&server, "/status/private.json", &viewer).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["cache-control"]
            .to_str()
            .unwrap()
            .starts_with("private")
    );
    // A token scoped to other plugins may not read it.
    let store = Store::open(server.database_url()).await.expect("opening");
    let terms = stepwise_host::auth::TokenTerms {
        lifetime: None,
        plugins: Some(PluginScope::parse(["other-*"]).expect("a scope")),
    };
    let Ok(scoped) = stepwise_host::auth::create_token(
        &store,
        Some("scoped".into()),
        Role::Runner,
        "test",
        terms,
    )
    .await
    else {
        panic!("creating a scoped token failed");
    };
    let scoped = scoped.secret;
    let response = get_with_token(&server, "/status/private.json", &scoped).await;
    assert_eq!(response.status(), 403);
    // A public page needs no token, and still the Host check.
    let (status, _) = server.get_json("/status/utc").await;
    assert_eq!(status, 200);
    let response = server
        .client
        .get(server.url("/status/utc"))
        .header("host", "rebound.example:80")
        .send()
        .await
        .expect("requesting");
    assert_eq!(response.status(), 421);
    // Anonymous readers of one address get a burst, then 429 with a problem.
    let mut refused = None;
    for _ in 0..400 {
        let (status, body) = server.get_json("/badge/utc.svg").await;
        if status == 429 {
            refused = Some(body);
            break;
        }
        assert_eq!(status, 200);
    }
    let refused = refused.expect("no 429 after 400 quick requests");
    assert_eq!(refused["code"], "too_many_requests", "{refused}");
    // A reader with a token is not counted against the anonymous bucket.
    let response = get_with_token(&server, "/badge/utc.svg", &viewer).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_page_of_labels_shows_each_schedule_they_pick_as_a_check() {
    let server = server_with_pages(AuthMode::None).await;
    let mut ids = Vec::new();
    for labels in [
        json!({"team": "data", "name": "Nightly import"}),
        json!({"team": "web"}),
    ] {
        let (status, schedule) = server
            .post_json(
                "/v1/schedules",
                &json!({"plugin": "misbehave", "trigger": {"interval_ms": 3_600_000}, "labels": labels}),
            )
            .await;
        assert_eq!(status, 201, "{schedule}");
        ids.push(schedule["id"].as_str().unwrap().to_owned());
    }
    let page = status_json(&server, "team").await;
    let checks = page["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 1, "only the data team's schedule: {page:#}");
    assert_eq!(checks[0]["id"], ids[0].as_str());
    assert_eq!(checks[0]["name"], "Nightly import");
    assert_eq!(checks[0]["plugin"], "misbehave");
    let response = server
        .client
        .get(server.url(&format!("/badge/team/{}.svg", ids[0])))
        .send()
        .await
        .expect("requesting");
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .expect("a body")
            .contains("Nightly import")
    );
    let (status, _) = server
        .get_json(&format!("/badge/team/{}.svg", ids[1]))
        .await;
    assert_eq!(status, 404, "another team's schedule is not on the page");
}
