//! Recordings (README, "Debugging a failed run"): a run of the event-pipeline check recorded on
//! the server, downloaded with `stepwise runs recording`, and replayed by `stepwise dev
//! --replay` with the pipeline stopped: the same build fails the same way, a fixed build
//! passes, a changed query is a mismatch. `record = "failures"` drops a passed run's
//! recording, `off` records nothing, and retention deletes recordings with their runs.

use std::path::Path;

use serde_json::{Value, json};
use stepwise_host::capabilities::recording;
use stepwise_host::model::{RetentionPolicy, RunId, now_millis};
use stepwise_host::retention::sweep;
use stepwise_host::storage::Store;

use super::cli::stepwise;
use super::demo::simulated_pipeline;
use crate::support::{
    EVENT_PIPELINE_REPLAY_BUG_WASM, EVENT_PIPELINE_REPLAY_CHANGED_QUERY_WASM, EVENT_PIPELINE_WASM,
    PluginFile, Setup, TestServer, rollups_folded, sqlite_url,
};

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn manifest(pipeline: &str, record: &str) -> String {
    format!(
        "allowed_hosts = [\"{pipeline}\"]\nsql_sources = [\"warehouse\"]\npoll_interval_ms = 100\nrecord = \"{record}\"\n"
    )
}

fn params(event_id: &str, pipeline_url: &str) -> Value {
    json!({"event_id": event_id, "name": "purchase", "amount_cents": 4200, "user_id": "u-7", "collector_url": pipeline_url})
}

/// `stepwise dev PLUGIN --replay RECORDINGS [extra]`: its exit code and stdout.
pub(super) async fn replay(plugin: &str, recordings: &Path, extra: &[&str]) -> (i32, String) {
    let recordings = recordings.display().to_string();
    let mut args = vec!["dev", plugin, "--replay", &recordings];
    args.extend(extra);
    let (code, out, err) = stepwise(&args).await;
    (code, format!("{out}{err}"))
}

#[tokio::test]
async fn a_failed_run_is_recorded_downloaded_and_replayed_offline() {
    let (pipeline, pipeline_dir, stop) = simulated_pipeline(None, None).await;
    let pipeline_url = format!("http://{}", pipeline.addr);
    let host = pipeline.addr.to_string();
    let warehouse = pipeline_dir.path().join("warehouse.db");
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::new(
                "buggy",
                EVENT_PIPELINE_REPLAY_BUG_WASM,
                manifest(&host, "failures"),
            ))
            .with_plugin(PluginFile::new(
                "fixed",
                EVENT_PIPELINE_WASM,
                manifest(&host, "failures"),
            ))
            .with_plugin(PluginFile::new(
                "unrecorded",
                EVENT_PIPELINE_WASM,
                manifest(&host, "off"),
            ))
            .with_source("warehouse", sqlite_url(&warehouse), true),
    )
    .await;
    let event =
        json!({"event_id": "evt-rec", "name": "purchase", "amount_cents": 4200, "user_id": "u-7"});
    let sent = server
        .client
        .post(format!("{pipeline_url}/collect"))
        .json(&event)
        .send()
        .await
        .expect("collector");
    assert!(sent.status().is_success());

    // The buggy build fails at the warehouse; the fixed one passes and, recording failures
    // only, keeps no recording; an unrecorded plugin has none either.
    let trigger =
        |plugin: &str| json!({"plugin": plugin, "params": params("evt-rec", &pipeline_url)});
    let failed = server.trigger(trigger("buggy")).await;
    let passed = server.trigger(trigger("fixed")).await;
    let unrecorded = server.trigger(trigger("unrecorded")).await;
    let failed_run = server.wait_until_finished(&failed).await;
    assert_eq!(failed_run["status"], "failed", "{failed_run}");
    assert_eq!(failed_run["steps"][1]["status"], "failed", "{failed_run}");
    for id in [&passed, &unrecorded] {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "passed", "{run}");
        let (status, problem) = server.get_json(&format!("/v1/runs/{id}/recording")).await;
        assert_eq!(status, 404, "{problem}");
        assert_eq!(problem["code"], "no_recording", "{problem}");
    }

    // Downloaded through the API and the command line alike.
    let response = server
        .client
        .get(server.url(&format!("/v1/runs/{failed}/recording")))
        .send()
        .await
        .expect("recording");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/x-ndjson",
        "{response:?}"
    );
    let text = response.text().await.expect("body");
    let (code, out, err) =
        stepwise(&["runs", "recording", &failed, "--server", &server.base]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, text);
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines[0]["recording"]["format"], "stepwise-recording");
    assert_eq!(lines[0]["recording"]["version"], 1);
    assert_eq!(lines[0]["recording"]["params"]["event_id"], "evt-rec");
    let calls: Vec<&Value> = lines.iter().filter_map(|line| line.get("call")).collect();
    let http = calls
        .iter()
        .find(|call| call["call"] == "http")
        .expect("an http call");
    assert_eq!(http["request"]["method"], "GET", "{http}");
    assert_eq!(
        http["request"]["url"],
        format!("{pipeline_url}/events/evt-rec")
    );
    assert_eq!(http["response"]["Ok"]["status"], 200, "{http}");
    // The last query found the row: the attempt that failed.
    let query = calls
        .iter()
        .rfind(|call| call["call"] == "sql.query")
        .expect("a query");
    assert_eq!(query["request"]["params"], json!([{"Text": "evt-rec"}]));
    assert!(
        query["response"]["Ok"]["rows"].to_string().contains("4200"),
        "{query}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line["outcome"]["outcome"] == "failed")
    );
    assert_eq!(lines.last().expect("lines")["end"]["status"], "failed");

    // Offline from here on: the pipeline and the server are gone.
    stop.cancel();
    drop(server);
    let dir = tempfile::tempdir().expect("temp dir");
    let recording = dir.path().join("failed.rec");
    std::fs::write(&recording, &text).expect("writing the recording");

    // The same build fails the same way, at the same step, with the same message.
    let (code, out) = replay(EVENT_PIPELINE_REPLAY_BUG_WASM, &recording, &[]).await;
    assert_eq!(code, 1, "{out}");
    let message = failed_run["message"].as_str().expect("message");
    assert!(
        message.contains("amount_cents is 42, expected 4200"),
        "{message}"
    );
    assert!(
        out.contains(&format!("replayed: failed at warehouse: {message}")),
        "{out}"
    );
    assert!(out.contains("(recorded: failed at warehouse)"), "{out}");

    // The fixed build passes on the same recording.
    let (code, out) = replay(EVENT_PIPELINE_WASM, &recording, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed: passed"), "{out}");

    // A changed query is a mismatch naming both; with --lenient it is answered anyway.
    let (code, out) = replay(EVENT_PIPELINE_REPLAY_CHANGED_QUERY_WASM, &recording, &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("replayed: mismatch attempt 1 of step warehouse asked sql.query on warehouse: `SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ? LIMIT 1` with [\"evt-rec\"], the recording has sql.query on warehouse: `SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ?` with [\"evt-rec\"]"),
        "{out}"
    );
    let (code, out) = replay(
        EVENT_PIPELINE_REPLAY_CHANGED_QUERY_WASM,
        &recording,
        &["--lenient"],
    )
    .await;
    assert_eq!(code, 0, "{out}");

    // A directory is a regression suite: a table, and a JUnit report.
    std::fs::write(dir.path().join("again.rec"), &text).expect("writing");
    let junit = dir.path().join("replays.xml");
    let junit_arg = junit.display().to_string();
    let (code, out) = replay(
        EVENT_PIPELINE_REPLAY_BUG_WASM,
        dir.path(),
        &["--junit", &junit_arg],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("recording"), "{out}");
    assert!(out.contains("0 of 2 replays passed"), "{out}");
    let xml = std::fs::read_to_string(&junit).expect("the report");
    assert!(xml.contains(r#"tests="2" failures="2""#), "{xml}");
    let (code, out) = replay(EVENT_PIPELINE_WASM, dir.path(), &["--junit", &junit_arg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 of 2 replays passed"), "{out}");
    let xml = std::fs::read_to_string(&junit).expect("the report");
    assert!(
        xml.contains(r#"tests="2" failures="0" errors="0""#),
        "{xml}"
    );
}

/// `stepwise dev --record` records a local run as the server does, and its replay passes.
#[tokio::test]
async fn a_local_run_is_recorded_and_replayed() {
    let (pipeline, pipeline_dir, stop) = simulated_pipeline(None, None).await;
    let pipeline_url = format!("http://{}", pipeline.addr);
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("check.wasm");
    std::fs::copy(EVENT_PIPELINE_WASM, &plugin).expect("copying the plugin");
    std::fs::write(
        dir.path().join("check.toml"),
        format!(
            "allowed_hosts = [\"{}\"]\nsql_sources = [\"warehouse\"]\npoll_interval_ms = 100\n",
            pipeline.addr
        ),
    )
    .expect("writing the manifest");
    let config = dir.path().join("stepwise.toml");
    let warehouse = sqlite_url(&pipeline_dir.path().join("warehouse.db"));
    std::fs::write(
        &config,
        format!("[sources.warehouse]\nurl = \"{warehouse}\"\n"),
    )
    .expect("writing the config");
    let client = reqwest::Client::new();
    let event = json!({"event_id": "evt-local", "name": "purchase", "amount_cents": 4200, "user_id": "u-7"});
    let sent = client
        .post(format!("{pipeline_url}/collect"))
        .json(&event)
        .send()
        .await
        .expect("collector");
    assert!(sent.status().is_success());

    let recording = dir.path().join("local.rec");
    let (plugin_arg, config_arg) = (plugin.display().to_string(), config.display().to_string());
    let recording_arg = recording.display().to_string();
    let params_arg = params("evt-local", &pipeline_url).to_string();
    let (code, out, err) = stepwise(&[
        "dev",
        &plugin_arg,
        "--config",
        &config_arg,
        "--params",
        &params_arg,
        "--record",
        &recording_arg,
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recorded to"), "{out}");
    let text = std::fs::read_to_string(&recording).expect("the recording");
    assert!(
        text.lines()
            .last()
            .unwrap_or_default()
            .contains(r#""end":{"status":"passed""#),
        "{text}"
    );

    stop.cancel();
    let (code, out) = replay(&plugin_arg, &recording, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed: passed (every step)"), "{out}");
}

/// `record = "all"` keeps a passed run's recording, and retention deletes it with the run.
#[tokio::test]
async fn recordings_are_kept_by_record_all_and_deleted_with_their_run() {
    let server = TestServer::start(
        Setup::default().with_plugin(PluginFile::misbehave("record = \"all\"\n")),
    )
    .await;
    let id = server.trigger(json!({"plugin": "misbehave"})).await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run}");
    let text = server.recording(&id).await;
    let passed = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["outcome"]["outcome"] == "passed")
        .count();
    assert_eq!(passed, 3, "{text}");
    assert!(
        text.lines()
            .last()
            .unwrap_or_default()
            .contains(r#""end":{"status":"passed""#),
        "{text}"
    );

    // Past the age of finished runs, the run goes, and its attempts' recordings with it.
    let store = Store::open(server.database_url()).await.expect("opening");
    let run_id = RunId::from_stored(id.clone());
    assert_eq!(
        store.run_recordings(&run_id).await.expect("reading").len(),
        3
    );
    let policy = RetentionPolicy {
        finished_runs: DAY,
        ..RetentionPolicy::default()
    };
    let later = now_millis() + 2 * DAY.as_millis() as i64;
    rollups_folded(&store).await;
    sweep(&store, &policy, later, 100).await.expect("sweeping");
    assert!(
        store
            .run_recordings(&run_id)
            .await
            .expect("reading")
            .is_empty()
    );
    let (status, _) = server.get_json(&format!("/v1/runs/{id}/recording")).await;
    assert_eq!(status, 404);
}

/// A large response is recorded as it streams to the plugin (the call does not wait on the
/// recording), whole up to 1 MiB; a run that passes in one tick under `record = "failures"`
/// keeps none of its attempts' recordings; and `run_recording_bytes` caps a run that polls on,
/// (a response of about 100 KiB at each attempt), whose recording then says where it was
/// cut, as its replay does.
#[tokio::test]
async fn recordings_stream_are_dropped_on_a_pass_and_stay_within_their_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(
        Setup::default()
            .with_config("run_recording_bytes = 300000\n")
            .with_plugin(PluginFile::misbehave("record = \"failures\"\n")),
    )
    .await;
    let host = server.base.trim_start_matches("http://").to_owned();
    let grant = format!("allowed_hosts = [\"{host}\"]\nrecord = \"all\"\n");
    let response = server
        .client
        .put(server.url("/v1/plugins/misbehave/grant"))
        .header("content-type", "application/toml")
        .body(grant)
        .send()
        .await
        .expect("grant");
    assert_eq!(response.status(), 200);

    // The server's own OpenAPI document, about 100 KiB, read through a recorded call.
    let openapi = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .text()
        .await
        .expect("body");
    assert!(openapi.len() > 16 << 10, "{}", openapi.len());
    let url = server.url("/openapi.json");
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "http", "url": url}, "second": {"action": "fail"}}}}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["steps"][0]["status"], "passed", "{run}");
    let store = Store::open(server.database_url()).await.expect("opening");
    let recording = recording::assemble(
        header(&id),
        &store
            .run_recordings(&RunId::from_stored(id.clone()))
            .await
            .expect("reading"),
        None,
    );
    let call = recording
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find_map(|line| line.get("call").cloned())
        .expect("the http call");
    assert_eq!(call["response"]["Ok"]["body"]["text"], openapi.as_str());

    // Passed in one tick, three steps, recording failures only: nothing kept.
    let grant = format!("allowed_hosts = [\"{host}\"]\nrecord = \"failures\"\n");
    let response = server
        .client
        .put(server.url("/v1/plugins/misbehave/grant"))
        .header("content-type", "application/toml")
        .body(grant)
        .send()
        .await
        .expect("grant");
    assert_eq!(response.status(), 200);
    let passed = server.trigger(json!({"plugin": "misbehave"})).await;
    let run = server.wait_until_finished(&passed).await;
    assert_eq!(run["status"], "passed", "{run}");
    assert_eq!(run["recording_bytes"], 0, "{run}");
    let kept = store
        .run_recordings(&RunId::from_stored(passed.clone()))
        .await
        .expect("reading");
    assert!(kept.is_empty(), "{} recordings kept", kept.len());

    // Polling on: the recording stops at its budget, and says so.
    let going = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "http", "url": url, "expect_status": 201}}}, "poll_interval_ms": 50}))
        .await;
    server
        .wait_for_run(&going, "10 attempts", |run| {
            run["steps"][0]["attempts"].as_u64() >= Some(10)
        })
        .await;
    let (status, _) = server
        .post_json(&format!("/v1/runs/{going}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let run = server.run(&going).await;
    let bytes = run["recording_bytes"].as_u64().expect("recording_bytes");
    assert!((300_000..300_000 + 1500).contains(&bytes), "{bytes}");
    let text = server.recording(&going).await;
    assert!(text.contains(r#"{"cut":"#), "{text}");
    let attempts = text.matches(r#"{"attempt":{"#).count();
    assert!((2..10).contains(&attempts), "{attempts} attempts recorded");
    let file = dir.path().join("going.rec");
    std::fs::write(&file, &text).expect("writing");
    let (code, out) = replay(crate::support::MISBEHAVE_WASM, &file, &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("replayed: cut "), "{out}");
    assert!(out.contains("the recording was cut"), "{out}");
}

fn header(id: &str) -> recording::Header {
    recording::Header {
        format: recording::FORMAT.into(),
        version: recording::VERSION,
        run_id: id.into(),
        plugin: "misbehave".into(),
        plugin_version: String::new(),
        params: json!({}),
        created_at_ms: 0,
    }
}
