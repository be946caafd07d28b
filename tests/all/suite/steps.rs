//! The run lifecycle: ticks, pending → passed, failure, timeouts, cancel, restart.

use serde_json::json;

use crate::support::{Endpoint, PluginFile, Setup, TestServer, millis, step_statuses};

fn fast_polling() -> PluginFile {
    PluginFile::misbehave("poll_interval_ms = 50\n")
}

#[tokio::test]
async fn pending_steps_are_polled_until_they_pass() {
    let server = TestServer::start(Setup::default().with_plugin(fast_polling())).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "pending_until", "attempt": 3}}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "passed", "passed"]);
    let steps = run["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["attempts"], 1);
    assert_eq!(steps[1]["attempts"], 3);
    assert_eq!(steps[2]["attempts"], 1);
    let passed_after: Vec<i64> = steps
        .iter()
        .map(|step| step["passed_after_ms"].as_i64().expect("passed_after_ms"))
        .collect();
    assert!(
        passed_after.windows(2).all(|pair| pair[0] <= pair[1]),
        "{passed_after:?}"
    );
    // Two pending answers at a 50 ms interval come before the second step passes.
    assert!(passed_after[1] >= 100, "{passed_after:?}");
    assert_eq!(steps[2]["output"]["step"], "third");
}

#[tokio::test]
async fn a_tick_claimed_ahead_of_its_time_calls_no_earlier_than_due() {
    // The scheduler claims ticks up to its lookahead (20 ms) before they are due; at a 50 ms
    // poll interval, a tick that called when claimed would start well before its due time.
    let server = TestServer::start(Setup::default().with_plugin(fast_polling())).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending_until", "attempt": 6}}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let attempts = server.attempts(&id).await;
    let polled: Vec<_> = attempts
        .iter()
        .filter(|attempt| attempt["step"] == "first" && attempt["attempt"].as_u64() > Some(1))
        .collect();
    assert_eq!(polled.len(), 5, "{attempts:#?}");
    for attempt in polled {
        let due = millis(&attempt["due_at"]);
        assert!(
            millis(&attempt["started_at"]) >= due,
            "a call started before its tick was due: {attempt:#}"
        );
    }
}

#[tokio::test]
async fn a_failing_step_fails_the_run_and_skips_the_rest() {
    let server = TestServer::start(Setup::default().with_plugin(fast_polling())).await;
    let id = server
        .trigger(
            json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "fail"}}}}),
        )
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "failed", "skipped"]);
    assert_eq!(
        run["steps"][0]["output"]["step"], "first",
        "the verified step is kept"
    );
    assert_eq!(run["steps"][1]["message"], "told to fail");
    assert_eq!(run["steps"][2]["attempts"], 0);
    assert!(
        run["message"]
            .as_str()
            .expect("message")
            .contains("told to fail")
    );
}

#[tokio::test]
async fn a_passed_step_is_written_while_the_next_call_of_its_tick_goes_on() {
    let grant = "[limits]\ncall_timeout_ms = 3000\nmax_errors = 1\n";
    let server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(grant))).await;
    let id = server
        .trigger(
            json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "loop"}}}}),
        )
        .await;
    // The second step's call spins until its 3 s limit; the first step's result, from the
    // same tick, is in the database long before.
    let run = server
        .wait_for_run(&id, "the first step passed", |run| {
            run["steps"][0]["status"] == "passed"
        })
        .await;
    assert_eq!(run["status"], "running", "{run:#}");
    assert_eq!(run["steps"][1]["attempts"], 0, "{run:#}");
    let run = server.wait_until_finished(&id).await;
    assert_eq!(
        step_statuses(&run),
        ["passed", "errored", "skipped"],
        "{run:#}"
    );
    assert_eq!(run["steps"][0]["output"]["step"], "first");
}

#[tokio::test]
async fn a_step_pending_beyond_its_timeout_times_out_the_run() {
    let server = TestServer::start(Setup::default().with_plugin(fast_polling())).await;
    let id = server
        .trigger(
            json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "pending"}}}}),
        )
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "timed_out", "skipped"]);
    let message = run["steps"][1]["message"].as_str().expect("message");
    assert!(message.contains("timeout of 1500 ms"), "{message}");
    assert!(run["steps"][1]["attempts"].as_u64().expect("attempts") >= 2);
}

#[tokio::test]
async fn the_run_deadline_times_out_the_run() {
    let server = TestServer::start(Setup::default().with_plugin(fast_polling())).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "timeout_ms": 700, "params": {"steps": {"first": {"action": "pending"}}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(step_statuses(&run), ["timed_out", "skipped", "skipped"]);
    assert!(
        run["message"]
            .as_str()
            .expect("message")
            .contains("deadline"),
        "{run:#}"
    );
}

#[tokio::test]
async fn cancel_stops_a_run_and_a_finished_run_cannot_be_cancelled() {
    let server = TestServer::start(Setup::default().with_plugin(fast_polling())).await;
    let id = server
        .trigger(
            json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending"}}}}),
        )
        .await;
    server
        .wait_for_run(&id, "a first attempt", |run| {
            run["steps"][0]["attempts"].as_u64() >= Some(1)
        })
        .await;
    let (status, run) = server
        .post_json(&format!("/v1/runs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "cancelled");
    assert_eq!(step_statuses(&run), ["cancelled", "cancelled", "cancelled"]);
    for step in run["steps"].as_array().expect("steps") {
        assert_eq!(step["finished_at"], run["finished_at"], "{run:#}");
    }
    let attempts_at_cancel = server.attempts(&id).await.len();

    // A later tick must not resurrect it: trigger and finish another run, then look again.
    let other = server
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    assert_eq!(server.wait_until_finished(&other).await["status"], "passed");
    let run = server.run(&id).await;
    assert_eq!(run["status"], "cancelled");
    assert!(
        server.attempts(&id).await.len() <= attempts_at_cancel + 1,
        "at most the tick in flight lands"
    );

    let (status, problem) = server
        .post_json(&format!("/v1/runs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "run_finished");
}

#[tokio::test]
async fn a_restart_mid_run_resumes_at_the_current_step() {
    let endpoint = Endpoint::start(503).await;
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\npoll_interval_ms = 50\n",
        endpoint.host_port
    );
    let server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(manifest))).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "http", "url": endpoint.url}}}}))
        .await;
    let before = server
        .wait_for_run(&id, "the second step pending", |run| {
            run["steps"][1]["attempts"].as_u64() >= Some(2)
        })
        .await;
    assert_eq!(step_statuses(&before), ["passed", "pending", "waiting"]);

    let server = server.restart().await;
    let after_restart = server.run(&id).await;
    assert_eq!(
        after_restart["steps"][0], before["steps"][0],
        "the passed step is kept as it was"
    );
    endpoint.set_status(200);
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(
        run["steps"][0]["attempts"], 1,
        "the passed step is not called again"
    );
    assert_eq!(run["steps"][1]["output"]["status"], 200);
}
