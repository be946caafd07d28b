//! The demo (README, "The demo, step by step"): an event followed through the simulated collector, warehouse and
//! report by the `event-pipeline` plugin, in each of its three languages (README, "Writing a check"): the Rust
//! one that `build.rs` compiles, and the Python and JavaScript ones that `stepwise plugin build`
//! builds. The Python and JavaScript checks run beside the Rust one on the same server and
//! check the same events: their verdicts, messages and outputs must be the Rust one's. With
//! MariaDB and Redis, the pipeline also books events in a ledger table and counts them, and
//! the Rust check's `stores` build verifies them in a fourth and fifth step.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use stepwise_demo::{Pipeline, PipelineConfig, Stores, start_pipeline};
use stepwise_host::scaffold::Lang;
use tokio_util::sync::CancellationToken;

use crate::support::{
    EVENT_PIPELINE_BUS_WASM, EVENT_PIPELINE_STORES_WASM, EVENT_PIPELINE_WASM, PluginFile, Setup,
    TestServer, built_in, mysql_url, nats_url, redis_url, repo_path, sqlite_url, step_statuses,
};

/// The plugin names the demo server holds: the check under test, the same component without
/// the HTTP grant, and (for Python and JavaScript) the Rust check as the reference.
const UNDER_TEST: &str = "event-pipeline";
const UNDER_TEST_DENIED: &str = "event-pipeline-denied";
const REFERENCE: &str = "event-pipeline-rust";
const REFERENCE_DENIED: &str = "event-pipeline-rust-denied";

struct Demo {
    server: TestServer,
    pipeline_url: String,
    /// The plugins each scenario runs, granted and denied: the check under test first.
    checks: Vec<(&'static str, &'static str)>,
    _pipeline_dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_demo(lang: Lang) -> Option<Demo> {
    let wasm = match lang {
        Lang::Rust => PathBuf::from(EVENT_PIPELINE_WASM),
        Lang::Python => built_in(lang, &repo_path("plugins/event-pipeline-py")).await?,
        Lang::Javascript => built_in(lang, &repo_path("plugins/event-pipeline-js")).await?,
    };
    let (pipeline, pipeline_dir, stop) = simulated_pipeline(None, None).await;
    let warehouse = pipeline_dir.path().join("warehouse.db");
    let manifest = |allowed: &str| {
        format!(
            "allowed_hosts = [{allowed}]\nsql_sources = [\"warehouse\"]\npoll_interval_ms = 100\n"
        )
    };
    let granted = manifest(&format!("\"{}\"", pipeline.addr));
    let denied = manifest("");
    let mut checks = vec![(UNDER_TEST, UNDER_TEST_DENIED)];
    // The same component twice is compiled once (versions are cached by content hash).
    let mut setup = Setup::default()
        .with_plugin(PluginFile::new(UNDER_TEST, &wasm, granted.clone()))
        .with_plugin(PluginFile::new(UNDER_TEST_DENIED, &wasm, denied.clone()))
        .with_source("warehouse", sqlite_url(&warehouse), true);
    if lang != Lang::Rust {
        checks.push((REFERENCE, REFERENCE_DENIED));
        setup = setup
            .with_plugin(PluginFile::new(REFERENCE, EVENT_PIPELINE_WASM, granted))
            .with_plugin(PluginFile::new(
                REFERENCE_DENIED,
                EVENT_PIPELINE_WASM,
                denied,
            ));
    }
    Some(Demo {
        server: TestServer::start(setup).await,
        pipeline_url: format!("http://{}", pipeline.addr),
        checks,
        _pipeline_dir: pipeline_dir,
        _stop: stop.drop_guard(),
    })
}

/// The simulated pipeline, fast: each stage 300 ms after the one before.
pub(super) async fn simulated_pipeline(
    stores: Option<Stores>,
    bus: Option<String>,
) -> (Pipeline, tempfile::TempDir, CancellationToken) {
    let pipeline_dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding port 0");
    let stop = CancellationToken::new();
    let config = PipelineConfig {
        warehouse_delay: Duration::from_millis(300),
        report_delay: Duration::from_millis(300),
        stores,
        bus,
    };
    let pipeline = start_pipeline(
        listener,
        &pipeline_dir.path().join("warehouse.db"),
        config,
        stop.clone(),
    )
    .await
    .expect("pipeline starts");
    (pipeline, pipeline_dir, stop)
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

    /// Checks `event_id` with every check (granted, or `denied` the HTTP grant) at once, and
    /// returns their finished runs, the check under test first, after asserting that the
    /// others reached the same verdict with the same messages and outputs.
    async fn check(&self, event_id: &str, extra: Value, denied: bool) -> Value {
        // Triggered one after the other, the runs then poll side by side.
        let mut ids = Vec::new();
        for (granted_name, denied_name) in &self.checks {
            let plugin = if denied { denied_name } else { granted_name };
            let mut body = json!({
                "plugin": plugin,
                "params": {"event_id": event_id, "name": "purchase", "amount_cents": 4200, "user_id": "u-7", "collector_url": self.pipeline_url},
            });
            if let Value::Object(extra) = &extra {
                body.as_object_mut().expect("object").extend(extra.clone());
            }
            ids.push(self.server.trigger(body).await);
        }
        let mut runs = Vec::new();
        for id in ids {
            runs.push(self.server.wait_until_finished(&id).await);
        }
        let under_test = runs.remove(0);
        for reference in runs {
            assert_eq!(
                verdict(&under_test),
                verdict(&reference),
                "the check differs from the Rust one:\n{under_test:#}\n{reference:#}"
            );
        }
        under_test
    }
}

/// What a run concluded, without its timing: status, and each step's status, message and
/// output.
fn verdict(run: &Value) -> Value {
    let steps: Vec<Value> = run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|step| {
            json!([
                step["name"],
                step["status"],
                step["message"],
                step["output"]
            ])
        })
        .collect();
    json!({"status": run["status"], "steps": steps})
}

fn event(event_id: &str) -> Value {
    json!({"event_id": event_id, "name": "purchase", "amount_cents": 4200, "user_id": "u-7"})
}

/// One test per language: the Rust check alone, and each of the others beside it.
macro_rules! in_every_language {
    ($($lang:ident: $test:ident;)*) => {$(
        #[tokio::test]
        async fn $test() {
            let Some(demo) = start_demo(Lang::$lang).await else {
                return;
            };
            tokio::join!(
                verified_through_all_three_stages(&demo),
                lost_before_the_warehouse(&demo),
                corrupted_in_the_warehouse(&demo),
                denied_without_a_grant(&demo),
            );
        }
    )*};
}

in_every_language! {
    Rust: the_rust_check_verifies_loses_and_fails_events;
    Python: the_python_check_gives_the_rust_checks_verdicts;
    Javascript: the_javascript_check_gives_the_rust_checks_verdicts;
}

async fn verified_through_all_three_stages(demo: &Demo) {
    let sent = std::time::Instant::now();
    demo.send_event(event("evt-happy")).await;
    let run = demo.check("evt-happy", json!({}), false).await;
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
    // The warehouse receives the event 300 ms after the collector, the report 300 ms later:
    // the run cannot pass before. (Its `passed_after_ms` count from the run's first tick,
    // which a loaded machine starts a while after the event was sent.)
    assert!(
        sent.elapsed() >= std::time::Duration::from_millis(600),
        "passed {:?} after the event was sent: {latencies:?}",
        sent.elapsed()
    );
    assert_eq!(
        steps[1]["output"],
        json!({"event_id": "evt-happy", "name": "purchase", "amount_cents": 4200, "user_id": "u-7"})
    );
}

async fn lost_before_the_warehouse(demo: &Demo) {
    let mut lost = event("evt-lost");
    lost["drop_at"] = json!("warehouse");
    demo.send_event(lost).await;
    let run = demo
        .check("evt-lost", json!({"timeout_ms": 2500}), false)
        .await;
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "timed_out", "skipped"]);
    assert!(run["steps"][0]["passed_after_ms"].is_i64());
}

async fn corrupted_in_the_warehouse(demo: &Demo) {
    let mut corrupted = event("evt-corrupt");
    corrupted["corrupt"] = json!("amount");
    demo.send_event(corrupted).await;
    let run = demo.check("evt-corrupt", json!({}), false).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(step_statuses(&run), ["passed", "failed", "skipped"]);
    assert_eq!(
        run["steps"][1]["message"], "warehouse: amount_cents is 4201, expected 4200",
        "{run:#}"
    );
}

/// The host's refusal reaches the check as its own error (not as a connection failure to be
/// polled until the timeout), and the check fails the step with it.
async fn denied_without_a_grant(demo: &Demo) {
    demo.send_event(event("evt-denied")).await;
    let run = demo.check("evt-denied", json!({}), true).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(step_statuses(&run), ["failed", "skipped", "skipped"]);
    let expected = format!(
        "request to {}/events/evt-denied denied by the host (the attempt's log says why: a host \
         outside allowed_hosts, an internal address, or a secret it may not carry there)",
        demo.pipeline_url
    );
    assert_eq!(run["steps"][0]["message"], expected.as_str(), "{run:#}");
    assert_eq!(run["steps"][0]["attempts"], 1, "{run:#}");
}

/// With MariaDB and Redis, the demo's five steps: the ledger and the counter are read through
/// the accounts that [`Stores`] creates (which may only read), an event sent twice is counted
/// twice, and the fourth step says so.
#[tokio::test]
async fn with_mariadb_and_redis_the_check_verifies_the_ledger_and_the_counter() {
    let (Some(mysql), Some(redis)) = (mysql_url(), redis_url()) else {
        return;
    };
    let stores = Stores::connect(&mysql, &redis)
        .await
        .expect("the demo's stores");
    let (pipeline, pipeline_dir, stop) = simulated_pipeline(Some(stores.clone()), None).await;
    let _stop = stop.drop_guard();
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::new(
                "event-pipeline",
                EVENT_PIPELINE_STORES_WASM,
                format!(
                    "allowed_hosts = [\"{}\"]\nsql_sources = [\"warehouse\", \"ledger\", \"counters\"]\npoll_interval_ms = 100\n",
                    pipeline.addr
                ),
            ))
            .with_source(
                "warehouse",
                sqlite_url(&pipeline_dir.path().join("warehouse.db")),
                true,
            )
            .with_source("ledger", stores.ledger_source.clone(), true)
            .with_source("counters", stores.counter_source.clone(), true),
    )
    .await;
    // Event ids of their own: the ledger and the counter outlive the test, and the SQLite
    // and PostgreSQL copies of it share them.
    let id = |name: &str| format!("evt-{name}-{}-{}", std::process::id(), uuid::Uuid::now_v7());
    let (once, twice) = (id("once"), id("twice"));
    let collect = |event_id: String| {
        let client = server.client.clone();
        let url = format!("http://{}/collect", pipeline.addr);
        async move {
            let response = client
                .post(url)
                .json(&event(&event_id))
                .send()
                .await
                .expect("collector");
            assert!(response.status().is_success(), "{}", response.status());
        }
    };
    collect(once.clone()).await;
    collect(twice.clone()).await;
    collect(twice.clone()).await;
    let check = |event_id: String| {
        let server = &server;
        let collector_url = format!("http://{}", pipeline.addr);
        async move {
            let id = server
                .trigger(json!({"plugin": "event-pipeline", "params": {"event_id": event_id, "amount_cents": 4200, "collector_url": collector_url}}))
                .await;
            server.wait_until_finished(&id).await
        }
    };
    let (run, counted_twice) = tokio::join!(check(once.clone()), check(twice));
    assert_eq!(run["status"], "passed", "{run:#}");
    let names: Vec<&str> = run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|step| step["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        ["collector", "warehouse", "report", "counter", "ledger"]
    );
    assert_eq!(run["steps"][3]["output"]["count"], 1, "{run:#}");
    assert_eq!(run["steps"][4]["output"]["event_id"], once.as_str());
    assert_eq!(run["steps"][4]["output"]["amount_cents"], 4200);
    // DATETIME comes as RFC 3339 text (README, "MySQL and MariaDB sources").
    let booked_at = run["steps"][4]["output"]["booked_at"]
        .as_str()
        .expect("booked_at as text");
    assert!(
        booked_at.len() >= 20 && booked_at.as_bytes()[10] == b'T',
        "{booked_at}"
    );
    assert_eq!(counted_twice["status"], "failed", "{counted_twice:#}");
    assert_eq!(
        step_statuses(&counted_twice),
        ["passed", "passed", "passed", "failed", "skipped"]
    );
    assert_eq!(
        counted_twice["steps"][3]["message"],
        "counter counts the event 2 times, expected once"
    );
}

/// With a NATS server, the demo's bus step: the collector publishes each event on
/// `events.collected`, and the check finds it there (through the host's tap: no stream keeps
/// the subject), with the same fields, before the warehouse step; an event the collector
/// never published leaves the step pending until its budget ends.
#[tokio::test]
async fn with_nats_the_check_finds_the_event_on_the_bus() {
    let Some(nats) = nats_url() else {
        return;
    };
    let (pipeline, pipeline_dir, stop) = simulated_pipeline(None, Some(nats.clone())).await;
    let _stop = stop.drop_guard();
    let server = TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::new(
                "event-pipeline",
                EVENT_PIPELINE_BUS_WASM,
                format!(
                    "allowed_hosts = [\"{}\"]\nsql_sources = [\"warehouse\", \"bus\"]\nsubjects = [\"events.collected\"]\npoll_interval_ms = 100\n[steps.bus]\ntimeout_ms = 1500\n",
                    pipeline.addr
                ),
            ))
            .with_source(
                "warehouse",
                sqlite_url(&pipeline_dir.path().join("warehouse.db")),
                true,
            )
            .with_bus("bus", "nats", nats, 64),
    )
    .await;
    let collector_url = format!("http://{}", pipeline.addr);
    let check = |event: Value| {
        let (server, client, collector_url) =
            (&server, server.client.clone(), collector_url.clone());
        async move {
            let event_id = event["event_id"].clone();
            let id = server
                .trigger(json!({"plugin": "event-pipeline", "params": {"event_id": event_id, "amount_cents": 4200, "collector_url": collector_url}}))
                .await;
            let response = client
                .post(format!("{collector_url}/collect"))
                .json(&event)
                .send()
                .await
                .expect("collector");
            assert!(response.status().is_success(), "{}", response.status());
            server.wait_until_finished(&id).await
        }
    };
    let id = |name: &str| format!("evt-{name}-{}-{}", std::process::id(), uuid::Uuid::now_v7());
    let mut lost = event(&id("lost"));
    lost["drop_at"] = json!("bus");
    let (run, lost) = tokio::join!(check(event(&id("bus"))), check(lost));
    assert_eq!(run["status"], "passed", "{run:#}");
    let names: Vec<&str> = run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|step| step["name"].as_str())
        .collect();
    assert_eq!(names, ["collector", "bus", "warehouse", "report"]);
    assert_eq!(
        run["steps"][1]["output"]["subject"], "events.collected",
        "{run:#}"
    );
    assert_eq!(lost["status"], "timed_out", "{lost:#}");
    assert_eq!(lost["steps"][1]["status"], "timed_out", "{lost:#}");
}
