//! OpenTelemetry: the `stepwise` program with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a local
//! OTLP/HTTP receiver (JSON encoding) exports a span per run, tick and step call, parented
//! run → tick → step, with the step's outcome as its status; the plugin's outbound request
//! carries the step span's `traceparent` to the system under check.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::support::{MISBEHAVE_WASM, poll_until, serve_locally, start_program};

/// Every span the receiver got, flattened from the OTLP JSON export requests.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Value>>>);

impl Received {
    fn spans(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }
}

async fn otlp_receiver() -> (String, Received, tokio_util::sync::DropGuard) {
    let received = Received::default();
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            let export: Value = serde_json::from_slice(&body).expect("an OTLP JSON export");
            let mut spans = kept.0.lock().unwrap();
            for resource in export["resourceSpans"].as_array().into_iter().flatten() {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    spans.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                }
            }
            axum::Json(json!({}))
        }),
    );
    let (address, guard) = serve_locally(app).await;
    (format!("http://{address}"), received, guard)
}

/// The system under check: answers 200 and keeps each request's `traceparent`.
async fn target() -> (String, Arc<Mutex<Vec<String>>>, tokio_util::sync::DropGuard) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let app = axum::Router::new().route(
        "/event",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let traceparent = headers
                .get("traceparent")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("(none)")
                .to_owned();
            kept.lock().unwrap().push(traceparent);
            "ok"
        }),
    );
    let (address, guard) = serve_locally(app).await;
    (address.to_string(), seen, guard)
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &std::path::Path, endpoint: &str, target: &str) -> Server {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(MISBEHAVE_WASM, plugins.join("misbehave.wasm")).unwrap();
    std::fs::write(
        plugins.join("misbehave.toml"),
        format!("allowed_hosts = [\"{target}\"]\n"),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_stepwise-node"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let (child, address, _) = start_program(command);
    Server {
        child,
        base: format!("http://{address}"),
    }
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|attribute| attribute["key"] == key)
        .map(|attribute| &attribute["value"])
}

/// OTLP JSON status codes: 0 unset, 1 ok, 2 error (absent means unset).
fn status_code(span: &Value) -> u64 {
    span["status"]["code"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_ticks_and_step_calls_are_exported_and_the_target_joins_the_trace() {
    let (endpoint, received, _receiver) = otlp_receiver().await;
    let (target, traceparents, _target) = target().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &endpoint, &target);
    let client = reqwest::Client::new();
    poll_until(|| {
        let url = format!("{}/readyz", server.base);
        async move {
            let ready = reqwest::get(url).await.ok()?.status() == 200;
            ready.then_some(())
        }
    })
    .await
    .expect("the server did not become ready");
    let params = json!({"steps": {
        "first": {"action": "pending_until", "attempt": 2},
        "second": {"action": "http", "url": format!("http://{target}/event")},
        "third": {"action": "fail"},
    }});
    let run: Value = client
        .post(format!("{}/v1/runs", server.base))
        .json(&json!({"plugin": "misbehave", "params": params, "poll_interval_ms": 50}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = run["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{run}"))
        .to_owned();
    let trace_id = run_id.replace('-', "");

    let spans = poll_until(|| {
        let received = received.clone();
        let trace_id = trace_id.clone();
        async move {
            let spans: Vec<Value> = received
                .spans()
                .into_iter()
                .filter(|span| span["traceId"] == trace_id.as_str())
                .collect();
            let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
            let steps = names.iter().filter(|name| **name == "step").count();
            (names.contains(&"run") && steps >= 4).then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|| panic!("no complete trace of run {run_id}: {:#?}", received.spans()));

    let by_id: BTreeMap<&str, &Value> = spans
        .iter()
        .map(|span| (span["spanId"].as_str().unwrap(), span))
        .collect();
    let run_span = spans.iter().find(|span| span["name"] == "run").unwrap();
    assert_eq!(
        status_code(run_span),
        2,
        "a failed run is an error: {run_span:#}"
    );
    assert_eq!(
        attribute(run_span, "stepwise.status"),
        Some(&json!({"stringValue": "failed"}))
    );
    let run_span_id = run_span["spanId"].as_str().unwrap();
    let ticks: Vec<&Value> = spans.iter().filter(|span| span["name"] == "tick").collect();
    assert!(
        ticks.len() >= 2,
        "a pending step makes a second tick: {spans:#?}"
    );
    for tick in &ticks {
        assert_eq!(tick["parentSpanId"], run_span_id, "{tick:#}");
    }
    let steps: Vec<&Value> = spans.iter().filter(|span| span["name"] == "step").collect();
    let mut outcomes: Vec<(String, u64)> = Vec::new();
    for step in &steps {
        let parent = by_id
            .get(step["parentSpanId"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("a step span without its tick: {step:#}"));
        assert_eq!(parent["name"], "tick", "{step:#}");
        let name = attribute(step, "step").unwrap()["stringValue"]
            .as_str()
            .unwrap()
            .to_owned();
        outcomes.push((name, status_code(step)));
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            ("first".to_owned(), 0),
            ("first".to_owned(), 1),
            ("second".to_owned(), 1),
            ("third".to_owned(), 2),
        ],
        "pending leaves the status unset, passed is ok, failed an error"
    );

    let second = steps
        .iter()
        .find(|span| attribute(span, "step") == Some(&json!({"stringValue": "second"})))
        .unwrap();
    let expected = format!("00-{trace_id}-{}-01", second["spanId"].as_str().unwrap());
    assert_eq!(*traceparents.lock().unwrap(), [expected]);
}
