//! The HTTP contract (README, "HTTP API"): status codes, problem+json errors naming the field, listing,
//! idempotency, plugins.

use serde_json::{Value, json};

use crate::support::{PluginFile, Setup, TestServer};

async fn server() -> TestServer {
    TestServer::start(
        Setup::default().with_plugin(PluginFile::misbehave("poll_interval_ms = 50\n")),
    )
    .await
}

async fn post_raw(server: &TestServer, body: impl Into<reqwest::Body>) -> (u16, String, Value) {
    let response = server
        .client
        .post(server.url("/v1/runs"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, content_type, body)
}

#[tokio::test]
async fn a_trigger_answers_202_with_the_queued_run_and_its_location() {
    let server = server().await;
    let response = server
        .client
        .post(server.url("/v1/runs"))
        .json(&json!({"plugin": "misbehave", "params": {}, "labels": {"suite": "api"}}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let run: Value = response.json().await.expect("json");
    assert_eq!(
        location,
        format!("/v1/runs/{}", run["id"].as_str().expect("id"))
    );
    assert_eq!(run["status"], "queued");
    assert_eq!(run["plugin"], "misbehave");
    assert_eq!(run["plugin_version"].as_str().expect("version").len(), 64);
    assert_eq!(run["steps"].as_array().expect("steps").len(), 3);
    let (status, shown) = server.get_json(&location).await;
    assert_eq!(status, 200);
    assert_eq!(shown["id"], run["id"]);
}

#[tokio::test]
async fn malformed_requests_get_problem_json_naming_the_field() {
    let server = server().await;
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("not json", "{\"plugin\": ".into(), 400, None),
        ("not an object", "[1]".into(), 400, None),
        ("missing plugin", "{}".into(), 422, Some("plugin")),
        (
            "plugin not a string",
            "{\"plugin\": 5}".into(),
            422,
            Some("plugin"),
        ),
        (
            "unknown field",
            "{\"plugin\": \"misbehave\", \"colour\": 1}".into(),
            422,
            Some("colour"),
        ),
        (
            "params not an object",
            "{\"plugin\": \"misbehave\", \"params\": 3}".into(),
            422,
            Some("params"),
        ),
        (
            "poll interval out of range",
            "{\"plugin\": \"misbehave\", \"poll_interval_ms\": 1}".into(),
            422,
            Some("poll_interval_ms"),
        ),
        (
            "labels not strings",
            "{\"plugin\": \"misbehave\", \"labels\": {\"a\": 1}}".into(),
            422,
            Some("labels.a"),
        ),
        (
            "params against the schema",
            "{\"plugin\": \"misbehave\", \"params\": {\"required_number\": \"x\"}}".into(),
            422,
            Some("params.required_number"),
        ),
        (
            "unknown plugin",
            "{\"plugin\": \"nope\"}".into(),
            404,
            Some("plugin"),
        ),
    ];
    for (case, body, expected_status, expected_field) in cases {
        let (status, content_type, problem) = post_raw(&server, body).await;
        assert_eq!(status, expected_status, "{case}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{case}");
        assert_eq!(problem["status"], expected_status, "{case}");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| !detail.is_empty()),
            "{case}: {problem}"
        );
        if let Some(field) = expected_field {
            assert_eq!(problem["field"], field, "{case}: {problem}");
        }
    }
    let (list, _) = server.get_json("/v1/runs").await;
    assert_eq!(list, 200);
    assert_eq!(
        server.get_json("/v1/runs").await.1["runs"],
        json!([]),
        "no bad request created a run"
    );
}

#[tokio::test]
async fn oversized_bodies_unknown_routes_and_ids_get_problems() {
    let server = server().await;
    let huge = format!(
        "{{\"plugin\": \"misbehave\", \"params\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(2 << 20)
    );
    let (status, content_type, problem) = post_raw(&server, huge).await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(content_type, "application/problem+json");

    let (status, problem) = server.get_json("/v2/nothing").await;
    assert_eq!(status, 404);
    assert_eq!(problem["code"], "route_not_found");
    let (status, problem) = server
        .get_json("/v1/runs/0194e0a0-0000-7000-8000-000000000000")
        .await;
    assert_eq!(status, 404);
    assert_eq!(problem["code"], "run_not_found");
    let (status, _) = server.get_json("/v1/runs/not-a-uuid").await;
    assert_eq!(status, 404);
    let response = server
        .client
        .delete(server.url("/v1/runs"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 405);
    let (status, problem) = server.get_json("/v1/runs?status=sleeping").await;
    assert_eq!(status, 422);
    assert_eq!(problem["field"], "status");
    let (status, problem) = server.get_json("/v1/runs?limit=0").await;
    assert_eq!(status, 422);
    assert_eq!(problem["field"], "limit");
}

#[tokio::test]
async fn runs_are_listed_newest_first_with_filters_and_cursor_pagination() {
    let server = server().await;
    let mut ids = Vec::new();
    for index in 0..5 {
        let labels = json!({"batch": if index % 2 == 0 { "even" } else { "odd" }});
        ids.push(
            server
                .trigger(json!({"plugin": "misbehave", "params": {}, "labels": labels}))
                .await,
        );
    }
    let failing = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "fail"}}}}))
        .await;
    server.wait_until_finished(&failing).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/runs?limit=2&cursor={cursor}"),
            None => "/v1/runs?limit=2".to_owned(),
        };
        let (status, page) = server.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        for run in page["runs"].as_array().expect("runs") {
            assert!(run.get("steps").is_none(), "listings leave steps out");
            seen.push(run["id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.push(failing.clone());
    expected.reverse();
    assert_eq!(seen, expected, "every run once, newest first");

    let (_, even) = server.get_json("/v1/runs?label=batch=even").await;
    assert_eq!(even["runs"].as_array().expect("runs").len(), 3);
    let (_, failed) = server
        .get_json("/v1/runs?status=failed&plugin=misbehave")
        .await;
    let failed: Vec<_> = failed["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|run| run["id"].clone())
        .collect();
    assert_eq!(failed, [json!(failing)]);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_run() {
    let server = server().await;
    let send = || async {
        let response = server
            .client
            .post(server.url("/v1/runs"))
            .header("Idempotency-Key", "order-42")
            .json(&json!({"plugin": "misbehave", "params": {}}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 202);
        response.json::<Value>().await.expect("json")["id"].clone()
    };
    let first = send().await;
    let second = send().await;
    assert_eq!(first, second);
    let (_, list) = server.get_json("/v1/runs").await;
    assert_eq!(list["runs"].as_array().expect("runs").len(), 1);
}

#[tokio::test]
async fn plugins_are_listed_with_steps_grant_and_versions() {
    let server = server().await;
    let (status, list) = server.get_json("/v1/plugins").await;
    assert_eq!(status, 200);
    let plugin = &list["plugins"][0];
    assert_eq!(plugin["name"], "misbehave");
    let steps: Vec<_> = plugin["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|step| step["name"].clone())
        .collect();
    assert_eq!(steps, [json!("first"), json!("second"), json!("third")]);
    let (status, shown) = server.get_json("/v1/plugins/misbehave").await;
    assert_eq!(status, 200);
    assert_eq!(shown["grant"]["poll_interval_ms"], 50);
    assert_eq!(shown["versions"][0]["version"], plugin["active_version"]);
    assert_eq!(shown["versions"][0]["active"], true);
    let (status, problem) = server.get_json("/v1/plugins/nope").await;
    assert_eq!(status, 404, "{problem}");
    let (status, ready) = server.get_json("/readyz").await;
    assert_eq!((status, ready["database"].clone()), (200, json!(true)));
}
