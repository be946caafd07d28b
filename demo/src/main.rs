//! `stepwise-demo`: the demo of the README ("The demo, step by step") in one command. Starts the simulated pipeline on
//! 127.0.0.1:9000 (collector, warehouse table, report, and when MariaDB and Redis are
//! reachable a ledger table and a counter), installs the example plugins with their grants into
//! `./stepwise-data/plugins`, and serves Stepwise on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use stepwise_demo::{PipelineConfig, Stores, start_pipeline};
use stepwise_host::config::{Settings, SourceConfig};
use tokio_util::sync::CancellationToken;

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

const STEPWISE_ADDR: &str = "127.0.0.1:8080";
const PIPELINE_ADDR: &str = "127.0.0.1:9000";
/// The demo's MariaDB and Redis, as administrators; an empty variable leaves the store out.
const MYSQL_URL: (&str, &str) = (
    "STEPWISE_DEMO_MYSQL_URL",
    "mysql://root@127.0.0.1:3306/test",
);
const REDIS_URL: (&str, &str) = ("STEPWISE_DEMO_REDIS_URL", "redis://127.0.0.1:6379");

/// The demo's stores when both servers can be had; otherwise says why, once.
async fn stores() -> Option<Stores> {
    let url = |(variable, default): (&str, &str)| {
        std::env::var(variable).unwrap_or_else(|_| default.to_owned())
    };
    let (mysql, redis) = (url(MYSQL_URL), url(REDIS_URL));
    let skipped = if mysql.is_empty() || redis.is_empty() {
        format!("{} or {} is empty", MYSQL_URL.0, REDIS_URL.0)
    } else {
        match Stores::connect(&mysql, &redis).await {
            Ok(stores) => return Some(stores),
            Err(error) => error,
        }
    };
    tracing::warn!(
        "the demo runs the three-step pipeline, without its MariaDB ledger and Redis counter: \
         {skipped} (set {} and {} to reach other servers)",
        MYSQL_URL.0,
        REDIS_URL.0
    );
    None
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stepwise_host::telemetry::init();
    let data_dir = std::path::absolute("stepwise-data").context("resolving ./stepwise-data")?;
    let plugins_dir = data_dir.join("plugins");
    std::fs::create_dir_all(&plugins_dir)
        .with_context(|| format!("creating {}", plugins_dir.display()))?;

    let pipeline_addr: SocketAddr = PIPELINE_ADDR.parse()?;
    let stores = stores().await;
    let (event_pipeline, sources) = match &stores {
        Some(_) => (
            EVENT_PIPELINE_STORES_WASM,
            r#""warehouse", "ledger", "counters""#,
        ),
        None => (EVENT_PIPELINE_WASM, r#""warehouse""#),
    };
    let manifests = [
        (
            "event-pipeline",
            event_pipeline,
            format!(
                "allowed_hosts = [\"{pipeline_addr}\"]\nsql_sources = [{sources}]\npoll_interval_ms = 1000\n"
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
        stores: stores.clone(),
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
    if let Some(stores) = &stores {
        for (name, url) in [
            ("ledger", &stores.ledger_source),
            ("counters", &stores.counter_source),
        ] {
            settings.sources.insert(
                name.into(),
                SourceConfig {
                    url: url.clone(),
                    read_only: true,
                },
            );
        }
    }
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
