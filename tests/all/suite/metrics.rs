//! `GET /metrics` (README, "Metrics"): Prometheus text with the README's names and labels, open like the
//! probes, counts that come from the database surviving a restart, and no run id anywhere.

use serde_json::json;

use crate::support::{PluginFile, Setup, TestServer};

async fn scrape(server: &TestServer) -> String {
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scraping /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.expect("the body")
}

/// The value of the sample `line_prefix` (a metric name with its labels), if present.
fn sample(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(line_prefix)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_runs_attempts_latency_and_violations() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(
        "[limits]\nmax_errors = 1\nmemory_mib = 16\n",
    )))
    .await;
    let passing = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "pending_until", "attempt": 2}}}}))
        .await;
    let run = server.wait_until_finished(&passing).await;
    assert_eq!(run["status"], "passed", "{run}");
    let hoarding = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "oom"}}}}))
        .await;
    let run = server.wait_until_finished(&hoarding).await;
    assert_eq!(run["status"], "errored", "{run}");
    // One run still going: active, and not counted among the finished.
    let waiting = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending_until", "attempt": 1000000}}}, "poll_interval_ms": 60000}))
        .await;
    server
        .wait_for_run(&waiting, "its first attempt", |run| {
            run["steps"][0]["attempts"] == 1
        })
        .await;

    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            r#"stepwise_runs_total{plugin="misbehave",status="passed"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"stepwise_runs_total{plugin="misbehave",status="errored"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"stepwise_runs_active{status="running"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains(r#"stepwise_runs_total{plugin="misbehave",status="running"}"#),
        "a counter of unfinished runs would go down: {text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"stepwise_step_attempts_total{plugin="misbehave",step="second",outcome="pending"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"stepwise_step_attempts_total{plugin="misbehave",step="second",outcome="passed"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"stepwise_step_passed_after_seconds_bucket{plugin="misbehave",step="third",le="+Inf"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"stepwise_sandbox_violations_total{plugin="misbehave",limit="memory_mib"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "stepwise_tick_lag_seconds_count").is_some_and(|count| count >= 3.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"stepwise_plugin_call_seconds_count{plugin="misbehave"}"#
        )
        .is_some_and(|count| count >= 5.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"stepwise_http_requests_total{route="/v1/runs",status="202"}"#
        )
        .is_some_and(|count| count >= 2.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"stepwise_http_requests_total{route="/v1/runs/{id}",status="200"}"#
        )
        .is_some(),
        "a request is counted by its route, not its path: {text}"
    );
    assert_eq!(sample(&text, "stepwise_leases_held"), Some(0.0), "{text}");
    for id in [&passing, &hoarding, &waiting] {
        assert!(!text.contains(id.as_str()), "a run id is a label: {text}");
    }

    // Counted in the database: a restarted server reports the same runs.
    let server = server.restart().await;
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            r#"stepwise_runs_total{plugin="misbehave",status="passed"}"#
        ),
        Some(1.0),
        "{text}"
    );
}
