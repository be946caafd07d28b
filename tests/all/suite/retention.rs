//! Retention (README, "Retention"): a sweep deletes old attempt logs, finished runs beyond their age or
//! their schedule's count, and plugin versions nothing needs — exactly those, in transactions
//! of at most the batch size — and a deleted run answers `run_expired`.

use std::time::Duration;

use serde_json::{Value, json};
use stepwise_host::model::{RetentionPolicy, now_millis};
use stepwise_host::retention::sweep;
use stepwise_host::storage::Store;

use crate::support::{
    MISBEHAVE_B_WASM, MISBEHAVE_WASM, PluginFile, Setup, TestServer, poll_until, rollups_folded,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

async fn versions(server: &TestServer, plugin: &str) -> Vec<String> {
    let (status, body) = server.get_json(&format!("/v1/plugins/{plugin}")).await;
    assert_eq!(status, 200, "{body}");
    let mut versions: Vec<String> = body["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|version| version["version"].as_str().unwrap().to_owned())
        .collect();
    versions.sort();
    versions
}

async fn schedule_runs(server: &TestServer, schedule: &str) -> Vec<Value> {
    let (status, body) = server
        .get_json(&format!("/v1/runs?schedule={schedule}&limit=100"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["runs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_sweep_deletes_exactly_what_retention_says_in_small_batches() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let mut finished = Vec::new();
    for params in [
        json!({}),
        json!({}),
        json!({"steps": {"second": {"action": "fail"}}}),
    ] {
        let id = server
            .trigger(json!({"plugin": "misbehave", "params": params, "labels": {"k": "v"}}))
            .await;
        server.wait_until_finished(&id).await;
        finished.push(id);
    }
    // A run still going, polled hourly after its first call.
    let going = server
        .trigger(
            json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending"}}},
                        "poll_interval_ms": 3_600_000}),
        )
        .await;
    server
        .wait_for_run(&going, "a first call", |run| {
            run["steps"][0]["attempts"] == 1
        })
        .await;
    // A schedule with more finished runs than it keeps.
    let (status, schedule) = server
        .post_json(
            "/v1/schedules",
            &json!({"plugin": "misbehave", "trigger": {"interval_ms": 200}}),
        )
        .await;
    assert_eq!(status, 201, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_owned();
    let enough =
        poll_until(|| async { (schedule_runs(&server, &schedule).await.len() >= 6).then_some(()) })
            .await;
    assert!(enough.is_some(), "the schedule did not fire six times");
    let response = server
        .client
        .patch(server.url(&format!("/v1/schedules/{schedule}")))
        .json(&json!({"paused": true}))
        .send()
        .await
        .expect("pausing");
    assert_eq!(response.status(), 200);
    let scheduled: Vec<String> = poll_until(|| async {
        let runs = schedule_runs(&server, &schedule).await;
        runs.iter()
            .all(|run| !matches!(run["status"].as_str(), Some("queued" | "running")))
            .then(|| {
                runs.iter()
                    .map(|run| run["id"].as_str().unwrap().to_owned())
                    .collect()
            })
    })
    .await
    .expect("the schedule's runs finish");
    // Versions: misbehave's first stays pinned by those runs when the second becomes active;
    // `spare` had the second, then the first: its second is needed by nothing.
    let version_a = server.plugin("misbehave").await["active_version"].clone();
    let b = std::fs::read(MISBEHAVE_B_WASM).unwrap();
    let a = std::fs::read(MISBEHAVE_WASM).unwrap();
    let (status, body) = server.upload("misbehave", b.clone()).await;
    assert_eq!(status, 200, "{body}");
    let version_b = body["active_version"].clone();
    assert_eq!(server.upload("spare", b).await.0, 201, "a new plugin");
    assert_eq!(server.upload("spare", a).await.0, 200);

    let store = Store::open(server.database_url()).await.expect("opening");
    let policy = RetentionPolicy {
        finished_runs: 2 * DAY,
        keep_last_per_schedule: 3,
        attempts: DAY / 24,
        plugin_versions: DAY / 24,
        rollups: 400 * DAY,
        interval: DAY,
    };
    let now = now_millis() + DAY.as_millis() as i64;
    rollups_folded(&store).await;
    let swept = sweep(&store, &policy, now, 7).await.expect("sweeping");
    assert!(swept.rows() > 0, "{swept:?}");
    assert!(swept.largest_transaction() <= 7, "{swept:?}");

    // Attempt logs went by age, of every run; runs and their steps stay.
    for id in finished.iter().chain([&going]) {
        assert!(server.attempts(id).await.is_empty(), "run {id}'s attempts");
        let run = server.run(id).await;
        assert_eq!(run["steps"].as_array().unwrap().len(), 3, "{run:#}");
        let labels = if id == &going {
            json!({})
        } else {
            json!({"k": "v"})
        };
        assert_eq!(run["labels"], labels);
    }
    assert_eq!(server.run(&going).await["status"], "running");
    // The schedule keeps its newest three (the listing is newest first).
    assert_eq!(swept.runs.rows > 0, scheduled.len() > 3);
    for (index, id) in scheduled.iter().enumerate() {
        let (status, body) = server.get_json(&format!("/v1/runs/{id}")).await;
        if index < 3 {
            assert_eq!(status, 200, "{body}");
        } else {
            assert_eq!(status, 404, "{body}");
            assert_eq!(body["code"], "run_expired", "{body}");
            let (status, body) = server
                .get_json(&format!("/v1/runs/{id}/notifications"))
                .await;
            assert_eq!((status, &body["code"]), (404, &json!("run_expired")));
        }
    }
    // An id newer than every deleted run was never known: not found, not expired.
    let fresh = uuid::Uuid::now_v7().to_string();
    let (status, body) = server.get_json(&format!("/v1/runs/{fresh}")).await;
    assert_eq!((status, &body["code"]), (404, &json!("run_not_found")));
    // Plugin versions: active and pinned ones stay; spare's unused first upload went.
    let mut both = vec![
        version_a.as_str().unwrap().to_owned(),
        version_b.as_str().unwrap().to_owned(),
    ];
    both.sort();
    assert_eq!(versions(&server, "misbehave").await, both);
    assert_eq!(
        versions(&server, "spare").await,
        [version_a.as_str().unwrap()]
    );
    let again = sweep(&store, &policy, now, 7)
        .await
        .expect("sweeping again");
    assert_eq!(again.rows(), 0, "a second sweep found more: {again:?}");
    // The active version of a plugin whose older version went still serves.
    let id = server
        .trigger(json!({"plugin": "spare", "params": {}}))
        .await;
    assert_eq!(server.wait_until_finished(&id).await["status"], "passed");
}

#[tokio::test]
async fn retention_runs_in_the_background_one_node_at_a_time() {
    let server = TestServer::start(
        Setup::default()
            .with_config("[retention]\nattempts_days = 0.00001\ninterval_ms = 200\n")
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    server.wait_until_finished(&id).await;
    // 0.00001 days is 864 ms: the attempts go, the run stays.
    let gone = poll_until(|| async { server.attempts(&id).await.is_empty().then_some(()) }).await;
    assert!(
        gone.is_some(),
        "the background job never deleted the attempts"
    );
    assert_eq!(server.run(&id).await["status"], "passed");

    // The job's lease: while one node holds it, another cannot take it.
    let store = Store::open(server.database_url()).await.expect("opening");
    let far = now_millis() + DAY.as_millis() as i64;
    let held = poll_until(|| async {
        store
            .claim_job("retention", "test-node-a", far, 60_000)
            .await
            .expect("claiming")
    })
    .await
    .expect("the job is claimable once the server's sweep is done");
    let taken = store
        .claim_job("retention", "test-node-b", far, 60_000)
        .await
        .expect("claiming");
    assert_eq!(taken, None);
    store
        .finish_job("retention", held, now_millis())
        .await
        .expect("releasing");
}
