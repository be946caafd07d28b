//! The plugin registry through the API and the watched plugins directory: uploads and their
//! validation, swaps under load with runs pinned to their version, rollback, grant changes,
//! and files dropped into `<data>/plugins`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Endpoint, HTTP_STATUS_WASM, MISBEHAVE_B_WASM, MISBEHAVE_DESCRIBE_LOOP_WASM,
    MISBEHAVE_DESCRIBE_TRAP_WASM, MISBEHAVE_DUPLICATE_STEPS_WASM, MISBEHAVE_WASM, OTHER_WORLD_WASM,
    PluginFile, Setup, TestServer, poll_until,
};

fn bytes_of(path: &str) -> Vec<u8> {
    std::fs::read(path).expect("reading a built plugin")
}

fn version_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn version_list(plugin: &Value) -> Vec<(String, bool)> {
    plugin["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|version| {
            (
                version["version"].as_str().expect("version").to_owned(),
                version["active"].as_bool().expect("active flag"),
            )
        })
        .collect()
}

/// Triggers a run of `misbehave` whose steps all pass and returns it once finished.
async fn passing_run(server: &TestServer) -> Value {
    let id = server.trigger(json!({"plugin": "misbehave"})).await;
    server.wait_until_finished(&id).await
}

#[tokio::test]
async fn an_upload_is_validated_stored_once_and_activated() {
    let server = TestServer::start(Setup::default()).await;
    let a = bytes_of(MISBEHAVE_WASM);
    let (status, plugin) = server.upload("misbehave", a.clone()).await;
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(plugin["active_version"], version_of(&a));
    assert_eq!(plugin["steps"].as_array().map(Vec::len), Some(3));

    let (status, plugin) = server.upload("misbehave", a.clone()).await;
    assert_eq!(status, 200, "re-uploading the same bytes: {plugin}");
    assert_eq!(version_list(&plugin), [(version_of(&a), true)]);

    // The compiled artifact is kept in the data dir, so a restart does not recompile.
    let artifacts: Vec<String> = std::fs::read_dir(server.data_dir().join("cache/compiled"))
        .expect("the artifacts dir exists")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        artifacts
            .iter()
            .any(|file| file.starts_with(&version_of(&a)) && file.ends_with(".cwasm")),
        "no artifact for the version among {artifacts:?}"
    );

    let run = passing_run(&server).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["plugin_version"], version_of(&a));
    assert_eq!(run["steps"][0]["output"]["variant"], "a");
}

#[tokio::test]
async fn invalid_uploads_get_422_naming_the_problem_and_the_active_version_keeps_serving() {
    let server = TestServer::start(Setup::default()).await;
    let a = bytes_of(MISBEHAVE_WASM);
    assert_eq!(server.upload("misbehave", a.clone()).await.0, 201);

    let truncated = a[..a.len() / 2].to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not wasm",
            b"this is not wasm".to_vec(),
            "not a WebAssembly binary",
        ),
        (
            "a core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "a core WebAssembly module, not a component",
        ),
        ("a truncated component", truncated, "does not compile"),
        (
            "a component of another world",
            bytes_of(OTHER_WORLD_WASM),
            "does not export the stepwise:plugin/check world",
        ),
        (
            "describe traps",
            bytes_of(MISBEHAVE_DESCRIBE_TRAP_WASM),
            "describe failed: plugin trapped",
        ),
        (
            "duplicate step names",
            bytes_of(MISBEHAVE_DUPLICATE_STEPS_WASM),
            "describe returned the step name \"first\" twice",
        ),
    ];
    for (case, bytes, reason) in cases {
        let (status, problem) = server.upload("misbehave", bytes).await;
        assert_eq!(status, 422, "{case}: {problem}");
        assert_eq!(problem["code"], "invalid_plugin", "{case}: {problem}");
        assert_eq!(problem["field"], "component", "{case}: {problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(reason),
            "{case}: {detail:?} lacks {reason:?}"
        );
    }

    // A describe that never returns is stopped by the time limit in the upload's own grant.
    let (status, problem) = server
        .upload_with_grant(
            "misbehave",
            bytes_of(MISBEHAVE_DESCRIBE_LOOP_WASM),
            "[limits]\ncall_timeout_ms = 300\n",
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("describe failed: time limit of 300 ms exceeded"),
        "{problem}"
    );

    let (status, problem) = server
        .upload_with_grant("misbehave", a.clone(), "allowed_hosts = [\"no-port\"]")
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("grant")),
        "{problem}"
    );
    let (status, problem) = server.upload("misbehave", Vec::new()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("component")),
        "{problem}"
    );
    let (status, problem) = server
        .put_body("/v1/plugins/misbehave", "text/plain", a.clone())
        .await;
    assert_eq!(status, 415, "{problem}");
    let (status, problem) = server.upload("Bad_Name", a.clone()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("name")),
        "{problem}"
    );

    let plugin = server.plugin("misbehave").await;
    assert_eq!(
        version_list(&plugin),
        [(version_of(&a), true)],
        "{plugin:#}"
    );
    let run = passing_run(&server).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["variant"], "a");
}

/// Phases of the swap as the trigger loop sees them.
const BEFORE_UPLOAD: u8 = 0;
const UPLOADING: u8 = 1;
const UPLOADED: u8 = 2;

#[tokio::test]
async fn runs_finish_on_the_version_they_started_with_through_a_swap_under_load() {
    let server = Arc::new(TestServer::start(Setup::default()).await);
    // Runs started before the swap wait at step 1 for this endpoint, so they are certainly
    // in flight while the new version is uploaded.
    let gate = Endpoint::start(503).await;
    let (a, b) = (bytes_of(MISBEHAVE_WASM), bytes_of(MISBEHAVE_B_WASM));
    let grant = format!("allowed_hosts = [\"{}\"]\n", gate.host_port);
    assert_eq!(
        server
            .upload_with_grant("misbehave", a.clone(), &grant)
            .await
            .0,
        201
    );

    let phase = Arc::new(AtomicU8::new(BEFORE_UPLOAD));
    // Runs answered before the upload began, and runs sent after its response.
    let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let trigger_loop = {
        let (server, phase, counts) = (server.clone(), phase.clone(), counts.clone());
        let url = gate.url.clone();
        tokio::spawn(async move {
            let mut runs = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            while !*stopped.borrow() {
                pace.tick().await;
                let sent_in = phase.load(Ordering::SeqCst);
                let id = server
                    .trigger(json!({
                        "plugin": "misbehave",
                        "poll_interval_ms": 50,
                        "params": {"steps": {"first": {"action": "http", "url": url}}},
                    }))
                    .await;
                let answered_in = phase.load(Ordering::SeqCst);
                if answered_in == BEFORE_UPLOAD {
                    counts[0].fetch_add(1, Ordering::SeqCst);
                }
                if sent_in == UPLOADED {
                    counts[1].fetch_add(1, Ordering::SeqCst);
                }
                runs.push((id, sent_in, answered_in));
            }
            runs
        })
    };

    let reached = |which: usize, count: usize| {
        let counts = counts.clone();
        async move {
            poll_until(|| async { (counts[which].load(Ordering::SeqCst) >= count).then_some(()) })
                .await
                .expect("the trigger loop keeps creating runs");
        }
    };
    reached(0, 20).await;
    phase.store(UPLOADING, Ordering::SeqCst);
    let (status, plugin) = server.upload("misbehave", b.clone()).await;
    assert_eq!(status, 200, "{plugin}");
    phase.store(UPLOADED, Ordering::SeqCst);
    gate.set_status(200);
    reached(1, 20).await;
    stop.send(true).expect("the trigger loop listens");
    let runs = trigger_loop.await.expect("trigger loop");

    let (mut before, mut after) = (0, 0);
    for (id, sent_in, answered_in) in &runs {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "passed", "{run:#}");
        assert_eq!(run["error_count"], 0, "{run:#}");
        let expected = if *answered_in == BEFORE_UPLOAD {
            before += 1;
            Some((version_of(&a), "a"))
        } else if *sent_in == UPLOADED {
            after += 1;
            Some((version_of(&b), "b"))
        } else {
            None
        };
        if let Some((version, variant)) = expected {
            assert_eq!(run["plugin_version"], version, "{run:#}");
            assert_eq!(run["steps"][1]["output"]["variant"], variant, "{run:#}");
            assert_eq!(run["steps"][2]["output"]["variant"], variant, "{run:#}");
        }
    }
    assert!(
        before >= 20 && after >= 20,
        "before {before}, after {after}"
    );
}

#[tokio::test]
async fn rollback_restores_the_previous_version_and_history_lists_both() {
    let server = TestServer::start(Setup::default()).await;
    let (a, b) = (bytes_of(MISBEHAVE_WASM), bytes_of(MISBEHAVE_B_WASM));
    assert_eq!(server.upload("misbehave", a.clone()).await.0, 201);
    assert_eq!(server.upload("misbehave", b.clone()).await.0, 200);
    assert_eq!(
        passing_run(&server).await["steps"][0]["output"]["variant"],
        "b"
    );

    let (status, plugin) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": version_of(&a)}),
        )
        .await;
    assert_eq!(status, 200, "{plugin}");
    let mut versions = version_list(&plugin);
    versions.sort();
    let mut expected = vec![(version_of(&a), true), (version_of(&b), false)];
    expected.sort();
    assert_eq!(versions, expected);
    let run = passing_run(&server).await;
    assert_eq!(run["plugin_version"], version_of(&a));
    assert_eq!(run["steps"][0]["output"]["variant"], "a");

    let unknown = "0".repeat(64);
    let (status, problem) = server
        .post_json(
            "/v1/plugins/misbehave/activate",
            &json!({"version": unknown}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("version_not_found")),
        "{problem}"
    );
    let (status, problem) = server
        .post_json("/v1/plugins/misbehave/activate", &json!({"version": "abc"}))
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("version")),
        "{problem}"
    );
    let (status, problem) = server
        .post_json(
            "/v1/plugins/nope/activate",
            &json!({"version": version_of(&a)}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("plugin_not_found")),
        "{problem}"
    );
}

#[tokio::test]
async fn a_grant_changes_without_new_bytes() {
    let server = TestServer::start(Setup::default()).await;
    let endpoint = Endpoint::start(200).await;
    let a = bytes_of(MISBEHAVE_WASM);
    assert_eq!(server.upload("misbehave", a.clone()).await.0, 201);
    let params = json!({"steps": {"first": {"action": "http", "url": endpoint.url}}});

    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "failed", "no grant yet: {run:#}");

    let (status, plugin) = server
        .put_body(
            "/v1/plugins/misbehave/grant",
            "application/json",
            json!({"allowed_hosts": [endpoint.host_port]})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!(
        plugin["grant"]["allowed_hosts"],
        json!([endpoint.host_port])
    );
    assert_eq!(version_list(&plugin), [(version_of(&a), true)]);
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "with the grant: {run:#}");

    let (status, problem) = server
        .put_body(
            "/v1/plugins/misbehave/grant",
            "application/toml",
            b"sql_sources = [\"nowhere\"]".to_vec(),
        )
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("grant")),
        "{problem}"
    );
    let (status, _) = server
        .put_body("/v1/plugins/nope/grant", "application/toml", Vec::new())
        .await;
    assert_eq!(status, 404);
}

/// Writes `bytes` next to `path` and renames it into place, as a careful deployer would.
fn write_complete(path: &std::path::Path, bytes: &[u8]) {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, bytes).expect("writing a plugin file");
    std::fs::rename(&temporary, path).expect("renaming a plugin file into place");
}

#[tokio::test]
async fn the_watched_directory_activates_complete_files_and_not_truncated_ones() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let (a, b) = (bytes_of(MISBEHAVE_WASM), bytes_of(MISBEHAVE_B_WASM));
    assert_eq!(
        server.plugin("misbehave").await["active_version"],
        version_of(&a)
    );
    let plugins = server.data_dir().join("plugins");

    write_complete(&plugins.join("misbehave.wasm"), &b);
    let activated = poll_until(|| async {
        let plugin = server.plugin("misbehave").await;
        (plugin["active_version"] == version_of(&b)).then_some(())
    })
    .await;
    assert!(activated.is_some(), "the new file was not activated");
    assert_eq!(
        passing_run(&server).await["steps"][0]["output"]["variant"],
        "b"
    );

    // A manifest change alone reloads the grant.
    std::fs::write(
        plugins.join("misbehave.toml"),
        "allowed_hosts = [\"127.0.0.1:9\"]\n",
    )
    .expect("writing a manifest");
    let reloaded = poll_until(|| async {
        let plugin = server.plugin("misbehave").await;
        (plugin["grant"]["allowed_hosts"] == json!(["127.0.0.1:9"])).then_some(())
    })
    .await;
    assert!(reloaded.is_some(), "the manifest change was not applied");

    // A half-written file is never activated. The sentinel plugin, written after it and
    // named to sort after it, shows that the watcher has dealt with it.
    std::fs::write(plugins.join("misbehave.wasm"), &a[..a.len() / 3]).expect("truncating");
    write_complete(
        &plugins.join("zz-sentinel.wasm"),
        &bytes_of(HTTP_STATUS_WASM),
    );
    let sentinel = poll_until(|| async {
        let (status, _) = server.get_json("/v1/plugins/zz-sentinel").await;
        (status == 200).then_some(())
    })
    .await;
    assert!(sentinel.is_some(), "the sentinel plugin was not activated");
    let plugin = server.plugin("misbehave").await;
    assert_eq!(plugin["active_version"], version_of(&b), "{plugin:#}");
    assert_eq!(version_list(&plugin).len(), 2, "{plugin:#}");
}

#[tokio::test]
async fn a_restart_keeps_the_version_activated_through_the_api() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let b = bytes_of(MISBEHAVE_B_WASM);
    assert_eq!(server.upload("misbehave", b.clone()).await.0, 200);

    // The directory still holds version A; it must not win over the upload after a restart.
    let server = server.restart().await;
    let plugin = server.plugin("misbehave").await;
    assert_eq!(plugin["active_version"], version_of(&b), "{plugin:#}");
    assert_eq!(
        passing_run(&server).await["steps"][0]["output"]["variant"],
        "b"
    );
}
