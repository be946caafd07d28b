//! The wasm runtime on its own, without a server: what happens when the instance pool is
//! full is the host's condition, never a fault charged to the plugin that happened to ask.

use std::time::Duration;

use serde_json::json;
use stepwise_host::capabilities::sql::SqlSources;
use stepwise_host::model::{Grant, Limits, PluginVersion};
use stepwise_host::runtime::{Capabilities, Runtime, StepCall};

use crate::support::{MISBEHAVE_WASM, SilentServer};

#[tokio::test]
async fn a_full_instance_pool_is_a_host_fault_not_the_plugins() {
    // A pool for the inspections' 8 calls and no ticks, each call one instance.
    let limits = Limits {
        instances: 1,
        http_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let runtime = Runtime::new(None, 0, &limits).expect("a runtime");
    let bytes = std::fs::read(MISBEHAVE_WASM).expect("reading the plugin");
    let version = PluginVersion::of_bytes(&bytes);
    let plugin = runtime
        .load(&version, bytes.into())
        .await
        .expect("compiles");
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
        sources: SqlSources::default(),
        secrets: Default::default(),
        http_requests_left: 100,
    };
    let call = StepCall {
        run_id: "pool".into(),
        step: "first".into(),
        attempt: 1,
        elapsed: Duration::ZERO,
        params: json!({"steps": {"first": {"action": "http", "url": format!("http://{}/", silent.host_port)}}})
            .to_string(),
        outputs: "{}".into(),
        traceparent: None,
    };
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..24 {
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
