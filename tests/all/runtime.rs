//! The wasm runtime on its own, without a server: what happens when the instance pool is
//! full, or the host's memory for plugins is in use, is the host's condition, never a fault
//! charged to the plugin that happened to ask.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stepwise_host::capabilities::sources::DataSources;
use stepwise_host::grant::{Grant, Limits};
use stepwise_host::model::PluginVersion;
use stepwise_host::runtime::{Capabilities, LoadedPlugin, Runtime, StepCall};

use crate::support::{MISBEHAVE_WASM, SilentServer};

async fn load_misbehave(runtime: &Runtime) -> Arc<LoadedPlugin> {
    let bytes = std::fs::read(MISBEHAVE_WASM).expect("reading the plugin");
    let version = PluginVersion::of_bytes(&bytes);
    runtime
        .load(&version, bytes.into())
        .await
        .expect("compiles")
}

#[tokio::test]
async fn a_full_instance_pool_is_a_host_fault_not_the_plugins() {
    // A pool for the inspections' 8 calls, 16 parked instances and no ticks, each call one
    // instance: 40 calls at once cannot all have one.
    let limits = Limits {
        instances: 1,
        http_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let runtime = Runtime::new(None, 0, &limits).expect("a runtime");
    let plugin = load_misbehave(&runtime).await;
    // Each call holds its instance while it waits on a server that never answers.
    let silent = SilentServer::start().await;
    let capabilities = Capabilities {
        grant: Grant {
            allowed_hosts: vec![silent.host_port.clone()],
            ..Grant::default()
        },
        limits: Limits {
            instances: 64,
            ..limits
        },
        sources: DataSources::default(),
        secrets: Default::default(),
        http_requests_left: 100,
    };
    let call = StepCall {
        run_id: "pool".into(),
        step: "first".into(),
        attempt: 1,
        elapsed: Duration::ZERO,
        run_created_at_ms: 0,
        params: json!({"steps": {"first": {"action": "http", "url": format!("http://{}/", silent.host_port)}}})
            .to_string(),
        outputs: "{}".into(),
        traceparent: None,
        tape: Default::default(),
    };
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (runtime, plugin, call, capabilities) = (
            runtime.clone(),
            plugin.clone(),
            call.clone(),
            capabilities.clone(),
        );
        calls.spawn(async move { runtime.run_step(&plugin, call, &capabilities).await });
    }
    let (mut host_faults, mut made) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.expect("the call task") {
            Err(fault) => {
                host_faults += 1;
                assert!(fault.0.contains("instance pool"), "{fault}");
            }
            Ok(report) => {
                made += 1;
                let message = report.message.unwrap_or_default();
                assert!(
                    !message.contains("trapped"),
                    "a call was charged for the pool: {message}"
                );
            }
        }
    }
    assert!(host_faults > 0, "the pool never ran out");
    assert!(made > 0, "no call got an instance");
}

fn hold_call(bytes: u64) -> StepCall {
    action_call("memory", json!({"action": "hold", "bytes": bytes}))
}

/// A call of `run_id`'s step `first`, doing `action`.
fn action_call(run_id: &str, action: serde_json::Value) -> StepCall {
    StepCall {
        run_id: run_id.into(),
        step: "first".into(),
        attempt: 1,
        elapsed: Duration::ZERO,
        run_created_at_ms: 0,
        params: json!({"steps": {"first": action}}).to_string(),
        outputs: "{}".into(),
        traceparent: None,
        tape: Default::default(),
    }
}

fn with_call_timeout(limits: &Limits, call_timeout: Duration) -> Capabilities {
    Capabilities {
        grant: Grant::default(),
        limits: Limits {
            call_timeout,
            ..*limits
        },
        sources: DataSources::default(),
        secrets: Default::default(),
        http_requests_left: 0,
    }
}

#[tokio::test]
async fn a_call_waits_for_the_hosts_plugin_memory_and_is_not_charged_when_it_runs_out() {
    // 16 MiB for all calls beyond their first 4 MiB: one call holding 12 MiB takes most of it.
    let limits = Limits::default();
    let runtime = Runtime::new(None, 4, &limits)
        .expect("a runtime")
        .with_plugin_memory(16 << 20);
    let plugin = load_misbehave(&runtime).await;
    let holder = {
        let (runtime, plugin) = (runtime.clone(), plugin.clone());
        let capabilities = with_call_timeout(&limits, Duration::from_secs(2));
        tokio::spawn(async move {
            runtime
                .run_step(&plugin, hold_call(12 << 20), &capabilities)
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while runtime.plugin_memory_held() < 8 << 20 {
        assert!(
            Instant::now() < deadline,
            "the holder never took the memory"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The second call waits, paused, until its own time limit: the host's condition.
    let capabilities = with_call_timeout(&limits, Duration::from_millis(300));
    let fault = runtime
        .run_step(&plugin, hold_call(12 << 20), &capabilities)
        .await
        .expect_err("no memory for the second call");
    assert!(fault.0.contains("plugin_memory_mib = 16"), "{fault}");

    // The holder is stopped by its own limit, and gives the memory back.
    let report = holder.await.expect("the holder").expect("a report");
    assert_eq!(report.outcome.to_string(), "errored");
    let message = report.message.unwrap_or_default();
    assert!(message.contains("time limit of 2000 ms"), "{message}");
    assert_eq!(runtime.plugin_memory_held(), 0);

    // A call needing more than its 4 MiB plus all of the host's is refused as the plugin's own limit.
    let report = runtime
        .run_step(&plugin, hold_call(40 << 20), &capabilities)
        .await
        .expect("the plugin's fault, not the host's");
    let message = report.message.unwrap_or_default();
    assert!(
        message.contains("memory limit of 20 MiB exceeded")
            && message.contains("plugin_memory_mib of 16 MiB"),
        "{message}"
    );
    assert_eq!(runtime.plugin_memory_held(), 0);
}

/// The calls `run_id`'s instance has served, by the `count_calls` action, and the lines the
/// call logged.
async fn calls_served(
    runtime: &Runtime,
    plugin: &Arc<LoadedPlugin>,
    run_id: &str,
    capabilities: &Capabilities,
) -> (u64, usize) {
    let call = action_call(run_id, json!({"action": "count_calls"}));
    let report = runtime
        .run_step(plugin, call, capabilities)
        .await
        .expect("a report");
    assert_eq!(report.outcome.to_string(), "passed", "{:?}", report.message);
    let output: serde_json::Value =
        serde_json::from_str(report.output.as_deref().unwrap_or_default()).expect("JSON");
    (output["calls"].as_u64().expect("calls"), report.logs.len())
}

#[tokio::test]
async fn a_runs_instance_serves_its_next_calls_and_no_other_run() {
    let limits = Limits::default();
    let runtime = Runtime::new(None, 4, &limits).expect("a runtime");
    let plugin = load_misbehave(&runtime).await;
    let capabilities = with_call_timeout(&limits, Duration::from_secs(5));

    // The run's next calls take the instance its first call made; each call logs afresh.
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &capabilities).await,
        (1, 1)
    );
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &capabilities).await,
        (2, 1)
    );
    // Another run never sees it.
    assert_eq!(
        calls_served(&runtime, &plugin, "b", &capabilities).await,
        (1, 1)
    );
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &capabilities).await,
        (3, 1)
    );

    // A trap ends the instance: the run's next call gets a new one.
    let trap = action_call("a", json!({"action": "trap"}));
    let report = runtime
        .run_step(&plugin, trap, &capabilities)
        .await
        .expect("a report");
    assert_eq!(report.outcome.to_string(), "errored");
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &capabilities).await,
        (1, 1)
    );
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &capabilities).await,
        (2, 1)
    );

    // So do other limits, and the end of the run.
    let other_limits = with_call_timeout(&limits, Duration::from_secs(6));
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &other_limits).await,
        (1, 1)
    );
    runtime.end_run("a");
    assert_eq!(
        calls_served(&runtime, &plugin, "a", &other_limits).await,
        (1, 1)
    );

    // Waiting instances hold the host's budget for all their memory, until they leave.
    assert!(
        runtime.plugin_memory_held() > 0,
        "a kept instance is charged"
    );
    runtime.end_run("a");
    runtime.end_run("b");
    assert_eq!(runtime.plugin_memory_held(), 0);
}

#[tokio::test]
async fn a_changed_plugin_compiles_only_its_new_functions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let functions = dir.path().join("functions.cache");
    let cached_bytes = || std::fs::metadata(&functions).map_or(0, |file| file.len());
    let bytes = std::fs::read(MISBEHAVE_WASM).expect("reading the plugin");
    {
        let runtime =
            Runtime::new(Some(dir.path().to_path_buf()), 1, &Limits::default()).expect("a runtime");
        let version = PluginVersion::of_bytes(&bytes);
        runtime
            .load(&version, bytes.clone().into())
            .await
            .expect("compiles");
    }
    let first = cached_bytes();
    assert!(first > 0, "the first compile keeps its functions");

    // Another build of the same code (a custom section appended: new bytes, new version, no
    // artifact), compiled by a host started afresh, finds every function it needs.
    let mut changed = bytes;
    let name = b"stepwise-test";
    changed.extend_from_slice(&[0, (1 + name.len() + 4) as u8, name.len() as u8]);
    changed.extend_from_slice(name);
    changed.extend_from_slice(b"edit");
    let runtime =
        Runtime::new(Some(dir.path().to_path_buf()), 1, &Limits::default()).expect("a runtime");
    let version = PluginVersion::of_bytes(&changed);
    let plugin = runtime
        .load(&version, changed.into())
        .await
        .expect("the changed build compiles");
    // A few dozen small functions (of a thousand here, of tens of thousands in a Python
    // check) come out of wasmtime differently on each compile and are compiled again; all
    // the others are found.
    let added = cached_bytes() - first;
    assert!(
        added * 4 < first,
        "the changed build compiled {added} bytes of functions again, after {first}"
    );
    let report = runtime
        .run_step(
            &plugin,
            action_call("cached", json!({"action": "pass"})),
            &with_call_timeout(&Limits::default(), Duration::from_secs(5)),
        )
        .await
        .expect("no host fault");
    assert_eq!(report.message, None, "code from the cache runs");
}
