//! A run's attempts (README, "HTTP API"): a budget for the log lines a run stores.

use serde_json::{Value, json};

use crate::support::{PluginFile, Setup, TestServer};

/// The first step logs `count` lines of `bytes` of padding at each call, and passes at
/// call `calls`.
fn logging(count: u32, bytes: u32, calls: u32) -> Value {
    json!({"plugin": "misbehave", "poll_interval_ms": 50, "params": {"steps": {"first":
        {"action": "log_spam", "count": count, "bytes": bytes, "pending_until": calls}}}})
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
