//! The time budgets, each named apart (README, "Time budgets"): `call_timeout_ms` limits one call; the step
//! budget (run, else grant, else plugin, else host) limits how long a step may stay pending;
//! the run deadline limits the run.

use serde_json::{Value, json};
use stepwise_host::model::now_millis;

use crate::support::{PluginFile, Setup, TestServer, millis, step_statuses};

const PENDING: &str = "pending";

fn pending_at(step: &str) -> Value {
    json!({"steps": {step: {"action": PENDING}}})
}

#[tokio::test]
async fn each_step_budget_ends_its_step_from_where_it_is_set() {
    let server = TestServer::start(
        Setup::default()
            .with_config("default_step_timeout_ms = 300\n")
            .with_plugin(PluginFile::misbehave(
                "poll_interval_ms = 50\n[steps.third]\ntimeout_ms = 400\n",
            )),
    )
    .await;
    // (params, step options, the step that ends, its budget)
    let cases = [
        (pending_at("first"), None, 0, 300),
        (pending_at("second"), None, 1, 1500),
        (pending_at("third"), None, 2, 400),
        (pending_at("third"), Some(json!({"third": 200})), 2, 200),
    ];
    let mut runs = Vec::new();
    for (params, step_timeouts, ..) in &cases {
        let mut body = json!({"plugin": "misbehave", "params": params});
        if let Some(step_timeouts) = step_timeouts {
            body["step_timeouts"] = step_timeouts.clone();
        }
        runs.push(server.trigger(body).await);
    }
    for (id, (_, _, position, budget)) in runs.iter().zip(&cases) {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "timed_out", "{run:#}");
        let step = &run["steps"][*position];
        assert_eq!(step["status"], "timed_out", "{run:#}");
        assert_eq!(step["timeout_ms"], *budget, "{run:#}");
        let message = step["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("timeout of {budget} ms")),
            "{message}"
        );
        // The steps before it passed: the budget is the step's own, not the run's.
        for earlier in &step_statuses(&run)[..*position] {
            assert_eq!(earlier, "passed", "{run:#}");
        }
    }

    for (step_timeouts, field) in [
        (json!({"nope": 100}), "step_timeouts.nope"),
        (json!({"first": 0}), "step_timeouts.first"),
    ] {
        let body = json!({"plugin": "misbehave", "step_timeouts": step_timeouts});
        let (status, problem) = server.post_json("/v1/runs", &body).await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (422, Some(field)),
            "{problem}"
        );
    }
    let plugin = server.plugin("misbehave").await;
    assert_eq!(
        plugin["grant"]["steps"]["third"]["timeout_ms"], 400,
        "{plugin:#}"
    );
}

#[tokio::test]
async fn call_timeout_ms_limits_one_call_and_step_timeout_ms_is_its_old_name() {
    for manifest in [
        "[limits]\ncall_timeout_ms = 300\nmax_errors = 1\n",
        "[limits]\nstep_timeout_ms = 300\nmax_errors = 1\n",
    ] {
        let server =
            TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(manifest))).await;
        let plugin = server.plugin("misbehave").await;
        assert_eq!(
            plugin["grant"]["limits"]["call_timeout_ms"],
            json!({"value": 300, "from": "grant"}),
            "{manifest}: {plugin:#}"
        );
        let id = server
            .trigger(
                json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "loop"}}}}),
            )
            .await;
        let run = server.wait_until_finished(&id).await;
        assert_eq!(run["status"], "errored", "{manifest}: {run:#}");
        let message = run["steps"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("time limit of 300 ms"),
            "{manifest}: {message}"
        );
    }

    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let (status, problem) = server
        .put_body(
            "/v1/plugins/misbehave/grant",
            "application/toml",
            b"[limits]\ncall_timeout_ms = 300\nstep_timeout_ms = 300\n".to_vec(),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("set only call_timeout_ms"),
        "{problem}"
    );
}

/// The times at which a run's attempts started, in milliseconds.
async fn attempt_starts(server: &TestServer, id: &str) -> Vec<u128> {
    server
        .attempts(id)
        .await
        .iter()
        .map(|attempt| {
            let at = attempt["started_at"].as_str().expect("started_at");
            humantime::parse_rfc3339(at)
                .expect("an RFC 3339 time")
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        })
        .collect()
}

#[tokio::test]
async fn errored_attempts_wait_the_backoff_not_the_poll_interval() {
    // A poll interval of a minute: any gap below it is the backoff's.
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(
        "poll_interval_ms = 60000\nretry = {initial_ms = 100, factor = 2.0, max_ms = 400}\n\
         [limits]\nmax_errors = 5\n",
    )))
    .await;
    let plugin = server.plugin("misbehave").await;
    assert_eq!(
        plugin["grant"]["retry"],
        json!({"initial_ms": 100, "factor": 2.0, "max_ms": 400})
    );
    let trap = json!({"steps": {"first": {"action": "trap"}}});
    let from_grant = server
        .trigger(json!({"plugin": "misbehave", "params": trap}))
        .await;
    let own = json!({"initial_ms": 50, "factor": 1.0});
    let from_run = server
        .trigger(json!({"plugin": "misbehave", "params": trap, "retry": own}))
        .await;
    for (id, waits) in [
        (&from_grant, [100, 200, 400, 400]),
        (&from_run, [50, 50, 50, 50]),
    ] {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "errored", "{run:#}");
        let starts = attempt_starts(&server, id).await;
        assert_eq!(starts.len(), 5, "max_errors ends it at the fifth: {run:#}");
        for (gap, wait) in starts.windows(2).map(|pair| pair[1] - pair[0]).zip(waits) {
            assert!(
                gap >= wait && gap < wait + 10_000,
                "waited {gap} ms where the backoff is {wait} ms: {starts:?}"
            );
        }
    }
    let run = server.run(&from_run).await;
    assert_eq!(
        run["retry"],
        json!({"initial_ms": 50, "factor": 1.0, "max_ms": 60000})
    );

    for retry in [
        json!({"initial_ms": 0}),
        json!({"initial_ms": 100, "max_ms": 50}),
        json!({"initial_ms": 100, "factor": 0.5}),
        json!({"initial_ms": 100, "jitter": 1}),
    ] {
        let body = json!({"plugin": "misbehave", "retry": retry});
        let (status, problem) = server.post_json("/v1/runs", &body).await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (422, Some("retry")),
            "{problem}"
        );
    }
}

#[tokio::test]
async fn a_poll_due_within_the_budget_is_made_however_late_the_host_gets_to_it() {
    // The step passes 1,000 ms into the run; its budget is 1,500 ms and it is polled every
    // 1,000 ms, so on time its second poll (due at about 1,000 ms) passes. The node is down
    // from just after the first poll until past the budget: the owed poll is made late and
    // passes, where judging the budget at the late hour would have timed the step out.
    let mut server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let id = server
        .trigger(json!({
            "plugin": "misbehave",
            "poll_interval_ms": 1000,
            "step_timeouts": {"first": 1500},
            "params": {"steps": {"first": {"action": "pass_after_ms", "ms": 1000}}},
        }))
        .await;
    let first_poll = server
        .wait_for_run(&id, "the first poll", |run| {
            run["steps"][0]["attempts"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(
        first_poll["steps"][0]["status"], "pending",
        "{first_poll:#}"
    );
    server.stop().await;
    let budget_ends = millis(&first_poll["steps"][0]["first_attempt_at"]) + 1500;
    // The scenario is a host that comes back after the budget: wait for the clock to pass it.
    while now_millis() <= budget_ends + 100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let server = server.restart().await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["attempts"], 2, "{run:#}");
    let attempts = server.attempts(&id).await;
    let late = &attempts[1];
    assert!(
        millis(&late["due_at"]) < budget_ends && millis(&late["started_at"]) > budget_ends,
        "the second poll was due within the budget and made after it: {late:#}"
    );
}
