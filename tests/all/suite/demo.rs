//! The demo of SPEC §9: an event followed through the simulated collector, warehouse and
//! report by the `event-pipeline` plugin.

use std::time::Duration;

use serde_json::{Value, json};
use stepwise_demo::{PipelineConfig, start_pipeline};
use tokio_util::sync::CancellationToken;

use crate::support::{
    EVENT_PIPELINE_WASM, PluginFile, Setup, TestServer, sqlite_url, step_statuses,
};

struct Demo {
    server: TestServer,
    pipeline_url: String,
    _pipeline_dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_demo() -> Demo {
    let pipeline_dir = tempfile::tempdir().expect("temp dir");
    let warehouse = pipeline_dir.path().join("warehouse.db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding port 0");
    let stop = CancellationToken::new();
    let config = PipelineConfig {
        warehouse_delay: Duration::from_millis(300),
        report_delay: Duration::from_millis(300),
    };
    let pipeline = start_pipeline(listener, &warehouse, config, stop.clone())
        .await
        .expect("pipeline starts");
    let manifest = format!(
        "allowed_hosts = [\"{}\"]\nsql_sources = [\"warehouse\"]\npoll_interval_ms = 100\n",
        pipeline.addr
    );
    let setup = Setup::default()
        .with_plugin(PluginFile::new(
            "event-pipeline",
            EVENT_PIPELINE_WASM,
            manifest,
        ))
        .with_source("warehouse", sqlite_url(&warehouse), true);
    Demo {
        server: TestServer::start(setup).await,
        pipeline_url: format!("http://{}", pipeline.addr),
        _pipeline_dir: pipeline_dir,
        _stop: stop.drop_guard(),
    }
}

impl Demo {
    async fn send_event(&self, event: Value) {
        let response = self
            .server
            .client
            .post(format!("{}/collect", self.pipeline_url))
            .json(&event)
            .send()
            .await
            .expect("collector");
        assert!(
            response.status().is_success(),
            "collector answered {}",
            response.status()
        );
    }

    async fn check(&self, event_id: &str, extra: Value) -> Value {
        let mut body = json!({
            "plugin": "event-pipeline",
            "params": {"event_id": event_id, "name": "purchase", "amount_cents": 4200, "user_id": "u-7", "collector_url": self.pipeline_url},
        });
        if let Value::Object(extra) = extra {
            body.as_object_mut().expect("object").extend(extra);
        }
        let id = self.server.trigger(body).await;
        self.server.wait_until_finished(&id).await
    }
}

fn event(event_id: &str) -> Value {
    json!({"event_id": event_id, "name": "purchase", "amount_cents": 4200, "user_id": "u-7"})
}

#[tokio::test]
async fn an_event_is_verified_through_all_three_stages() {
    let demo = start_demo().await;
    demo.send_event(event("evt-happy")).await;
    let run = demo.check("evt-happy", json!({})).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "passed", "passed"]);
    let steps = run["steps"].as_array().expect("steps");
    let names: Vec<_> = steps
        .iter()
        .map(|step| step["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["collector", "warehouse", "report"]);
    let latencies: Vec<i64> = steps
        .iter()
        .map(|step| step["passed_after_ms"].as_i64().expect("passed_after_ms"))
        .collect();
    assert!(
        latencies.windows(2).all(|pair| pair[0] <= pair[1]),
        "{latencies:?}"
    );
    // The warehouse receives the event 300 ms after the collector, the report 300 ms later.
    assert!(latencies[2] >= 500, "{latencies:?}");
    assert_eq!(steps[1]["output"]["amount_cents"], 4200);
}

#[tokio::test]
async fn an_event_lost_before_the_warehouse_times_out_at_step_two() {
    let demo = start_demo().await;
    let mut lost = event("evt-lost");
    lost["drop_at"] = json!("warehouse");
    demo.send_event(lost).await;
    let run = demo.check("evt-lost", json!({"timeout_ms": 2500})).await;
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "timed_out", "skipped"]);
    assert!(run["steps"][0]["passed_after_ms"].is_i64());
}

#[tokio::test]
async fn an_event_corrupted_in_the_warehouse_fails_naming_the_field() {
    let demo = start_demo().await;
    let mut corrupted = event("evt-corrupt");
    corrupted["corrupt"] = json!("amount");
    demo.send_event(corrupted).await;
    let run = demo.check("evt-corrupt", json!({})).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "failed", "skipped"]);
    let message = run["steps"][1]["message"].as_str().expect("message");
    assert!(message.contains("amount_cents"), "{message}");
}
