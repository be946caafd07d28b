//! A run's attempts (README, "HTTP API"): pages that end at a byte budget as well as at their
//! `limit`, log lines only on request, and a budget for the log lines a run stores.

use serde_json::{Value, json};

use crate::support::{PluginFile, Setup, TestServer};

/// The most JSON a page holds (`ATTEMPT_PAGE_BYTES`), and room for the object around the list.
const PAGE_BYTES: usize = (4 << 20) + 256;

/// The first step logs `count` lines of `bytes` of padding at each call, and passes at
/// call `calls`.
fn logging(count: u32, bytes: u32, calls: u32) -> Value {
    json!({"plugin": "misbehave", "poll_interval_ms": 50, "params": {"steps": {"first":
        {"action": "log_spam", "count": count, "bytes": bytes, "pending_until": calls}}}})
}

/// The pages of `GET /v1/runs/{id}/attempts?{query}` with their sizes, following
/// `next_cursor`.
async fn pages(server: &TestServer, id: &str, query: &str) -> Vec<(usize, Value)> {
    let mut pages = Vec::new();
    let mut path = format!("/v1/runs/{id}/attempts?{query}");
    loop {
        let response = server
            .client
            .get(server.url(&path))
            .send()
            .await
            .expect("a page");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("its body");
        let page: Value = serde_json::from_str(&text).expect("JSON");
        let next = page["next_cursor"].as_str().map(str::to_owned);
        pages.push((text.len(), page));
        match next {
            Some(cursor) => path = format!("/v1/runs/{id}/attempts?{query}&cursor={cursor}"),
            None => return pages,
        }
    }
}

#[tokio::test]
async fn attempt_pages_end_at_their_byte_budget_and_carry_logs_only_on_request() {
    let server = TestServer::start(
        Setup::default()
            .with_config("run_log_bytes = 67108864\n")
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    // Twelve calls of 200 lines of 2 KB: 5 MB of log lines, more than one page holds.
    let id = server.trigger(logging(200, 2000, 12)).await;
    assert_eq!(server.wait_until_finished(&id).await["status"], "passed");

    let with_logs = pages(&server, &id, "limit=1000&logs=true").await;
    assert!(with_logs.len() >= 2, "{} pages", with_logs.len());
    for (size, page) in &with_logs {
        assert!(*size <= PAGE_BYTES, "a page of {size} bytes");
        assert!(!page["attempts"].as_array().expect("attempts").is_empty());
    }
    let attempts: Vec<&Value> = with_logs
        .iter()
        .flat_map(|(_, page)| page["attempts"].as_array().expect("attempts"))
        .collect();
    let calls: Vec<(&str, u64)> = attempts
        .iter()
        .map(|attempt| {
            (
                attempt["step"].as_str().expect("a step"),
                attempt["attempt"].as_u64().expect("a number"),
            )
        })
        .collect();
    let expected: Vec<(&str, u64)> = (1..=12)
        .map(|attempt| ("first", attempt))
        .chain([("second", 1), ("third", 1)])
        .collect();
    assert_eq!(calls, expected, "every attempt once, in order");
    for attempt in &attempts[..12] {
        assert_eq!(attempt["logs"].as_array().expect("logs").len(), 200);
    }

    // Without `logs=true` the lines are left out, and the same attempts fit in one page.
    let without = pages(&server, &id, "limit=1000").await;
    assert_eq!(without.len(), 1);
    let (size, page) = &without[0];
    assert!(*size < 64 << 10, "{size} bytes without logs");
    let listed = page["attempts"].as_array().expect("attempts");
    assert_eq!(listed.len(), expected.len());
    assert!(
        listed.iter().all(|attempt| attempt.get("logs").is_none()),
        "{page}"
    );

    let (status, problem) = server
        .get_json(&format!("/v1/runs/{id}/attempts?logs=yes"))
        .await;
    assert_eq!(
        (status, &problem["field"]),
        (422, &json!("logs")),
        "{problem}"
    );
}

#[tokio::test]
async fn a_run_stores_log_lines_up_to_its_budget_and_says_how_many_it_dropped() {
    let budget = 65_536;
    let server = TestServer::start(
        Setup::default()
            .with_config(&format!("run_log_bytes = {budget}\n"))
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    // Three calls of 200 lines of 1 KB: 600 KB logged, ten times the budget.
    let id = server.trigger(logging(200, 1000, 3)).await;
    assert_eq!(server.wait_until_finished(&id).await["status"], "passed");

    let attempts = server.attempts(&id).await;
    let lines = |attempt: &Value| -> Vec<(String, String)> {
        attempt["logs"]
            .as_array()
            .expect("logs")
            .iter()
            .map(|line| {
                (
                    line["level"].as_str().expect("a level").to_owned(),
                    line["message"].as_str().expect("a message").to_owned(),
                )
            })
            .collect()
    };
    let first_step: Vec<Vec<(String, String)>> = attempts
        .iter()
        .filter(|attempt| attempt["step"] == "first")
        .map(lines)
        .collect();
    assert_eq!(first_step.len(), 3);
    let is_note = |line: &(String, String)| line.1.contains("dropped") && line.0 == "warn";
    let stored: usize = first_step
        .iter()
        .flatten()
        .filter(|line| !is_note(line))
        .map(|line| line.1.len())
        .sum();
    assert!(
        stored <= budget && stored > budget - 1100,
        "{stored} bytes of lines stored"
    );
    // Each call says what it dropped: the first most of its lines, the others all of them.
    for (call, lines) in first_step.iter().enumerate() {
        let note = lines.last().expect("a line");
        assert!(is_note(note), "call {}: {note:?}", call + 1);
        if call > 0 {
            assert_eq!(lines.len(), 1, "call {}: {lines:?}", call + 1);
            assert!(note.1.starts_with("200 log lines"), "{note:?}");
        }
    }
}
