//! `stepwise-demo`: the demo of the README ("The demo, step by step") in one command. Starts the simulated pipeline on
//! 127.0.0.1:9000 (collector, warehouse table, report, when MariaDB and Redis are reachable a
//! ledger table and a counter, and when NATS is a bus the collector publishes to), installs the example plugins with their grants into
//! `./stepwise-data/plugins`, and serves Stepwise on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use stepwise_demo::{COLLECTED_SUBJECT, PipelineConfig, Stores, start_pipeline};
use stepwise_host::config::{Settings, SourceConfig};
use stepwise_host::model::{CheckSelection, StatusPage, Tz};
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
/// The demo's NATS server; an empty variable leaves the bus out.
const NATS_URL: (&str, &str) = ("STEPWISE_DEMO_NATS_URL", "nats://127.0.0.1:4222");

/// The value of a demo variable, or its default.
fn demo_url((variable, default): (&str, &str)) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_owned())
}

/// The demo's bus when its NATS server answers; otherwise says why, once.
async fn bus() -> Option<String> {
    let url = demo_url(NATS_URL);
    let skipped = if url.is_empty() {
        format!("{} is empty", NATS_URL.0)
    } else {
        let connected = tokio::time::timeout(
            Duration::from_secs(2),
            stepwise_demo::nats::Publisher::connect(&url),
        )
        .await;
        match connected {
            Ok(Ok(_)) => return Some(url),
            Ok(Err(error)) => format!("{url}: {error}"),
            Err(_) => format!("{url}: no answer within 2 s"),
        }
    };
    tracing::warn!(
        "the demo runs without its bus step: {skipped} (set {} to reach another NATS server)",
        NATS_URL.0
    );
    None
}

/// The demo's stores when both servers can be had; otherwise says why, once.
async fn stores() -> Option<Stores> {
    let (mysql, redis) = (demo_url(MYSQL_URL), demo_url(REDIS_URL));
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
    let bus = bus().await;
    let event_pipeline = match (&stores, &bus) {
        (Some(_), Some(_)) => EVENT_PIPELINE_STORES_BUS_WASM,
        (Some(_), None) => EVENT_PIPELINE_STORES_WASM,
        (None, Some(_)) => EVENT_PIPELINE_BUS_WASM,
        (None, None) => EVENT_PIPELINE_WASM,
    };
    let mut sources = vec!["\"warehouse\""];
    if stores.is_some() {
        sources.extend(["\"ledger\"", "\"counters\""]);
    }
    if bus.is_some() {
        sources.push("\"bus\"");
    }
    let sources = sources.join(", ");
    let manifests = [
        (
            "event-pipeline",
            event_pipeline,
            format!(
                "allowed_hosts = [\"{pipeline_addr}\"]\nsql_sources = [{sources}]\nsubjects = [\"{COLLECTED_SUBJECT}\"]\npoll_interval_ms = 1000\n\
                 shadow = {{ promote_after_runs = 5, max_disagreement = 0.0 }}\nrecord = \"failures\"\n"
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
        bus: bus.clone(),
    };
    start_pipeline(pipeline_listener, &warehouse, config, shutdown.clone()).await?;
    tracing::info!(
        "simulated pipeline on http://{pipeline_addr}: POST /collect, GET /events/{{id}}, GET /report/events/{{id}}"
    );

    let mut settings = Settings::for_data_dir(&data_dir);
    settings.sources.insert(
        "warehouse".into(),
        SourceConfig::new(format!("sqlite://{}", warehouse.display())),
    );
    if let Some(stores) = &stores {
        for (name, url) in [
            ("ledger", &stores.ledger_source),
            ("counters", &stores.counter_source),
        ] {
            settings
                .sources
                .insert(name.into(), SourceConfig::new(url.clone()));
        }
    }
    if let Some(url) = &bus {
        settings.sources.insert(
            "bus".into(),
            SourceConfig {
                kind: Some("nats".into()),
                ..SourceConfig::new(url.clone())
            },
        );
    }
    // A public status page of the check, at /status/pipeline, with its badge.
    settings.status_pages.push(StatusPage {
        slug: "pipeline".into(),
        title: "Event pipeline".into(),
        description: Some(
            "Events from the collector to the warehouse and the report, verified step by step."
                .into(),
        ),
        checks: CheckSelection {
            plugins: vec!["event-pipeline".into()],
            ..CheckSelection::default()
        },
        public: true,
        time_zone: Tz::UTC,
        days: 90,
        show_messages: false,
    });
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
