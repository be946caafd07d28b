//! The `http-status` example plugin.

use serde_json::json;

use crate::support::{Endpoint, HTTP_STATUS_WASM, PluginFile, Setup, TestServer};

#[tokio::test]
async fn http_status_is_pending_until_the_expected_status_then_passes() {
    let endpoint = Endpoint::start(503).await;
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\npoll_interval_ms = 50\n",
        endpoint.host_port
    );
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::new(
        "http-status",
        HTTP_STATUS_WASM,
        manifest,
    )))
    .await;
    let id = server
        .trigger(json!({"plugin": "http-status", "params": {"url": endpoint.url}}))
        .await;
    let pending = server
        .wait_for_run(&id, "a pending status step", |run| {
            run["steps"][0]["attempts"].as_u64() >= Some(2)
        })
        .await;
    assert_eq!(pending["steps"][0]["status"], "pending");
    assert!(
        pending["steps"][0]["message"]
            .as_str()
            .expect("message")
            .contains("503"),
        "{pending:#}"
    );
    endpoint.set_status(200);
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["status"], 200);
    assert!(run["steps"][0]["output"]["elapsed_ms"].is_u64());
}

#[tokio::test]
async fn http_status_rejects_params_without_a_url() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::new(
        "http-status",
        HTTP_STATUS_WASM,
        "",
    )))
    .await;
    let (status, problem) = server
        .post_json("/v1/runs", &json!({"plugin": "http-status", "params": {}}))
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "params");
}
