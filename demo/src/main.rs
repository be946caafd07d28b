//! `stepwise-demo`: the demo of the README ("The demo, step by step") in one command. Starts the simulated pipeline on
//! 127.0.0.1:9000 (collector, warehouse table, report), installs the example plugins with their
//! grants into `./stepwise-data/plugins`, and serves Stepwise on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use stepwise_demo::{PipelineConfig, start_pipeline};
use stepwise_host::config::{Settings, SourceConfig};
use tokio_util::sync::CancellationToken;

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

const STEPWISE_ADDR: &str = "127.0.0.1:8080";
const PIPELINE_ADDR: &str = "127.0.0.1:9000";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stepwise_host::telemetry::init();
    let data_dir = std::path::absolute("stepwise-data").context("resolving ./stepwise-data")?;
    let plugins_dir = data_dir.join("plugins");
    std::fs::create_dir_all(&plugins_dir)
        .with_context(|| format!("creating {}", plugins_dir.display()))?;

    let pipeline_addr: SocketAddr = PIPELINE_ADDR.parse()?;
    let manifests = [
        (
            "event-pipeline",
            EVENT_PIPELINE_WASM,
            format!(
                "allowed_hosts = [\"{pipeline_addr}\"]\nsql_sources = [\"warehouse\"]\npoll_interval_ms = 1000\n"
            ),
        ),
        (
            "http-status",
            HTTP_STATUS_WASM,
            format!(
                "allowed_hosts = [\"{pipeline_addr}\", \"{STEPWISE_ADDR}\"]\npoll_interval_ms = 1000\n"
            ),
        ),
    ];
    for (name, wasm, manifest) in manifests {
        std::fs::copy(wasm, plugins_dir.join(format!("{name}.wasm")))
            .with_context(|| format!("installing {name}"))?;
        std::fs::write(plugins_dir.join(format!("{name}.toml")), manifest)?;
    }

    let shutdown = CancellationToken::new();
    let warehouse = data_dir.join("warehouse.db");
    let pipeline_listener = tokio::net::TcpListener::bind(pipeline_addr)
        .await
        .with_context(|| format!("binding the simulated pipeline on {pipeline_addr}"))?;
    let config = PipelineConfig {
        warehouse_delay: Duration::from_secs(3),
        report_delay: Duration::from_secs(2),
    };
    start_pipeline(pipeline_listener, &warehouse, config, shutdown.clone()).await?;
    tracing::info!(
        "simulated pipeline on http://{pipeline_addr}: POST /collect, GET /events/{{id}}, GET /report/events/{{id}}"
    );

    let mut settings = Settings::for_data_dir(&data_dir);
    settings.sources.insert(
        "warehouse".into(),
        SourceConfig {
            url: format!("sqlite://{}", warehouse.display()),
            read_only: true,
        },
    );
    let listener = tokio::net::TcpListener::bind(STEPWISE_ADDR)
        .await
        .with_context(|| format!("binding {STEPWISE_ADDR}"))?;
    let signal_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signal_shutdown.cancel();
    });
    stepwise_host::serve(listener, settings, shutdown).await
}
