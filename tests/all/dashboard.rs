//! The dashboard at `/`: served from the binary under a strict Content-Security-Policy, and
//! walked in a real browser (Debian's Chromium through Playwright, which `.ci/run` installs):
//! a run triggered from the page goes live to passed, the run shows its three steps, a plugin
//! is rolled back and a schedule paused, and a publisher's pending version is reviewed and
//! activated by an admin, a shadow version is compared, stopped and promoted, and a recorded
//! run shows its exchanges and downloads its recording, all without a console error.

use serde_json::json;
use stepwise_host::config::AuthMode;
use stepwise_host::model::Role;

use crate::support::{
    MISBEHAVE_B_WASM, MISBEHAVE_PARAMS_PATTERN_WASM, PluginFile, Setup, TestServer,
};

/// The Python with Playwright that walks the dashboard, or `None` (and a SKIPPED line).
fn browser_python() -> Option<String> {
    let python = std::env::var("STEPWISE_BROWSER_PYTHON").ok();
    if python.is_none() {
        eprintln!(
            "SKIPPED: the dashboard in a real browser; set STEPWISE_BROWSER_PYTHON to a Python \
             with Playwright, and STEPWISE_CHROMIUM to Chromium (.ci/run installs both)"
        );
    }
    python
}

/// Runs the browser walk `script` (in `tests/browser/`) with `args`, then the screenshot
/// directory, then `more`; asserts it succeeded and left `{name}.png` for each of `shots`,
/// and returns the directory.
async fn walk(
    python: &str,
    script: &str,
    args: &[&str],
    more: &[&str],
    shots: &[&str],
) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(script.replace('.', "-"));
    std::fs::create_dir_all(&dir).expect("a screenshot dir");
    let output = tokio::process::Command::new(python)
        .arg(format!("{}/browser/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .arg(&dir)
        .args(more)
        .output()
        .await
        .expect("running the browser walk");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the walk failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    for name in shots {
        let shot = dir.join(format!("{name}.png"));
        let bytes = std::fs::read(&shot).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "no screenshot {}",
            shot.display()
        );
    }
    dir
}

#[tokio::test]
async fn the_pages_and_assets_are_served_without_a_token_and_carry_no_data() {
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    for (path, content_type) in [
        ("/", "text/html"),
        ("/runs/01a22b65-864a-72f2-afe2-07434d4f567d", "text/html"),
        ("/plugins", "text/html"),
        ("/schedules", "text/html"),
        ("/health", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
    ] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("requesting");
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(content_type), "{path}");
        let policy = header("content-security-policy");
        assert!(policy.contains("script-src 'self'"), "{path}: {policy}");
        assert!(policy.contains("connect-src 'self'"), "{path}: {policy}");
        let body = response.text().await.expect("a body");
        if content_type == "text/html" {
            assert!(
                body.contains(r#"<meta name="stepwise-auth" content="tokens">"#),
                "{body}"
            );
            assert!(!body.contains("misbehave"), "a page names no plugin");
        }
    }
    // The API behind it still wants the token.
    let (status, _) = server.get_json("/v1/runs").await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_path_works_in_a_real_browser() {
    let Some(python) = browser_python() else {
        return;
    };
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    let token = server.create_token(Role::Admin).await;
    let authorized = |request: reqwest::RequestBuilder| request.bearer_auth(&token);
    // A second version to roll back from, and a schedule to pause.
    let first_version = {
        let response = authorized(server.client.get(server.url("/v1/plugins/misbehave")))
            .send()
            .await
            .expect("reading the plugin");
        let plugin: serde_json::Value = response.json().await.expect("the plugin");
        plugin["active_version"].as_str().unwrap().to_owned()
    };
    let response = authorized(server.client.put(server.url("/v1/plugins/misbehave")))
        .header("content-type", "application/wasm")
        .body(std::fs::read(MISBEHAVE_B_WASM).expect("variant b"))
        .send()
        .await
        .expect("uploading");
    assert_eq!(response.status(), 200);
    let response = authorized(server.client.post(server.url("/v1/schedules")))
        .json(&json!({"plugin": "misbehave", "trigger": {"interval_ms": 3_600_000}}))
        .send()
        .await
        .expect("creating a schedule");
    assert_eq!(response.status(), 201);
    let schedule: serde_json::Value = response.json().await.expect("the schedule");

    walk(
        &python,
        "walk.py",
        &[&server.base, &token],
        &[],
        &["runs", "run", "plugins", "schedules", "health"],
    )
    .await;
    // What the clicks did, as the API sees it.
    let plugin: serde_json::Value =
        authorized(server.client.get(server.url("/v1/plugins/misbehave")))
            .send()
            .await
            .expect("reading the plugin")
            .json()
            .await
            .expect("the plugin");
    assert_eq!(plugin["active_version"], first_version.as_str());
    let schedule: serde_json::Value = authorized(server.client.get(server.url(&format!(
        "/v1/schedules/{}",
        schedule["id"].as_str().unwrap()
    ))))
    .send()
    .await
    .expect("reading the schedule")
    .json()
    .await
    .expect("the schedule");
    assert_eq!(schedule["paused"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_version_is_reviewed_and_activated_in_a_real_browser() {
    let Some(python) = browser_python() else {
        return;
    };
    // A plugin whose grant reaches a host: a publisher's new code waits for an admin.
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::misbehave("allowed_hosts = [\"127.0.0.1:9\"]\n")),
    )
    .await;
    let admin = server.create_token(Role::Admin).await;
    let publisher = server.create_token(Role::Publisher).await;
    // This build's describe adds a params schema: the review lists that change.
    let bytes = std::fs::read(MISBEHAVE_PARAMS_PATTERN_WASM).expect("the variant");
    let version = stepwise_host::model::PluginVersion::of_bytes(&bytes).to_string();
    let response = server
        .client
        .put(server.url("/v1/plugins/misbehave"))
        .bearer_auth(&publisher)
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("uploading");
    assert_eq!(response.status(), 202);

    walk(
        &python,
        "review.py",
        &[&server.base, &publisher, &admin],
        &["misbehave", &version],
        &["review-publisher", "review-admin", "review-activated"],
    )
    .await;
    // What the click did, as the API sees it.
    let plugin: serde_json::Value = server
        .client
        .get(server.url("/v1/plugins/misbehave"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("reading the plugin")
        .json()
        .await
        .expect("the plugin");
    assert_eq!(plugin["active_version"], version.as_str(), "{plugin}");
}

#[tokio::test]
async fn a_shadow_version_is_compared_stopped_and_promoted_in_a_real_browser() {
    let Some(python) = browser_python() else {
        return;
    };
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let bytes = std::fs::read(MISBEHAVE_B_WASM).expect("the variant");
    let version = stepwise_host::model::PluginVersion::of_bytes(&bytes).to_string();
    let (status, plugin) = server
        .put_body(
            "/v1/plugins/misbehave?mode=shadow",
            "application/wasm",
            bytes,
        )
        .await;
    assert_eq!(status, 200, "{plugin}");
    // One pair that agrees, one where only the shadow fails.
    for params in [
        json!({}),
        json!({"steps": {"first": {"action": "fail_in_variant", "variant": "b"}}}),
    ] {
        let id = server
            .trigger(json!({"plugin": "misbehave", "params": params}))
            .await;
        server.wait_until_finished(&id).await;
    }
    crate::support::poll_until(|| async {
        let (_, shadow) = server.get_json("/v1/plugins/misbehave/shadow").await;
        (shadow["finished"] == 2).then_some(())
    })
    .await
    .expect("both pairs finished");

    walk(
        &python,
        "shadow.py",
        &[&server.base],
        &["misbehave", &version],
        &["shadow-panel"],
    )
    .await;
    let plugin = server.plugin("misbehave").await;
    assert_eq!(plugin["active_version"], version.as_str(), "{plugin}");
}

#[tokio::test]
async fn a_recorded_run_shows_its_exchanges_and_downloads_in_a_real_browser() {
    let Some(python) = browser_python() else {
        return;
    };
    let endpoint = crate::support::Endpoint::start(200).await;
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\nrecord = \"failures\"\n",
        endpoint.host_port
    );
    let server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(manifest))).await;
    let params = json!({"steps": {
        "first": {"action": "http", "url": endpoint.url},
        "second": {"action": "fail", "message": "the report is wrong"},
    }});
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["recording_bytes"].as_u64() > Some(0), "{run}");
    walk(
        &python,
        "recording.py",
        &[&server.base],
        &[&id],
        &["recording"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_page_reads_well_at_two_widths_in_a_real_browser() {
    let Some(python) = browser_python() else {
        return;
    };
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_config(
                "[[status_page]]\nslug = \"pipeline\"\ntitle = \"Event pipeline\"\n\
                 description = \"Events from the collector to the warehouse and the report.\"\n\
                 plugins = [\"misbehave\"]\npublic = true\n",
            )
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    let runner = server.create_token(Role::Runner).await;
    for params in [
        json!({}),
        json!({}),
        json!({"steps": {"third": {"action": "fail"}}}),
    ] {
        let response = server
            .client
            .post(server.url("/v1/runs"))
            .bearer_auth(&runner)
            .json(&json!({"plugin": "misbehave", "params": params}))
            .send()
            .await
            .expect("triggering");
        assert_eq!(response.status(), 202);
    }
    // The page's JSON shows the three runs once they are folded into today.
    let shown = crate::support::poll_until(|| async {
        let page: serde_json::Value = server
            .client
            .get(server.url("/status/pipeline.json"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let today = page["checks"][0]["history"].as_array()?.last()?.clone();
        (today["passed"] == 2 && today["failed"] == 1).then_some(())
    })
    .await;
    assert!(shown.is_some(), "the runs never reached the status page");

    let page = server.url("/status/pipeline");
    let dir = walk(
        &python,
        "status.py",
        &[&page],
        &["misbehave"],
        &["status-wide", "status-narrow"],
    )
    .await;
    // The README's pictures are these, refreshed on request.
    if std::env::var_os("STEPWISE_UPDATE_DOCS").is_some() {
        for name in ["status-wide", "status-narrow"] {
            let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");
            std::fs::copy(
                dir.join(format!("{name}.png")),
                format!("{docs}/{name}.png"),
            )
            .expect("writing docs");
        }
    }
}
