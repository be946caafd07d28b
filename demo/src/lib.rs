//! A simulated analytics pipeline for the demo (README, "The demo, step by step"): a collector that accepts events over
//! HTTP, a "warehouse" SQLite table that receives each event after a delay, and a report that
//! counts it after a further delay. With [`Stores`] (a MariaDB and a Redis server), the report
//! also books each event in a MariaDB table and counts it in Redis. Events can ask to be lost
//! or corrupted on the way, so the demo can show a failing and a timing-out check too.

pub mod mqtt;
pub mod nats;
pub mod redis;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, SqlitePool};
use tokio_util::sync::CancellationToken;

/// How long each async stage takes, and where the report books events besides its own count.
#[derive(Clone)]
pub struct PipelineConfig {
    pub warehouse_delay: Duration,
    pub report_delay: Duration,
    pub stores: Option<Stores>,
    /// A NATS server (`nats://host:port`) the collector publishes each event to, on
    /// [`COLLECTED_SUBJECT`].
    pub bus: Option<String>,
}

/// The subject the collector publishes each event on.
pub const COLLECTED_SUBJECT: &str = "events.collected";

/// The demo's MariaDB ledger table and Redis counter. The pipeline writes them as their
/// administrator; Stepwise reads them through accounts that may only read (README, "MySQL and
/// MariaDB sources", "Redis sources").
#[derive(Clone)]
pub struct Stores {
    ledger: MySqlPool,
    redis_url: String,
    /// The `[sources.ledger]` URL: an account that may only `SELECT` from the ledger.
    pub ledger_source: String,
    /// The `[sources.counters]` URL: an ACL user that may only read the demo's keys.
    pub counter_source: String,
}

/// The demo's Redis keys: `stepwise-demo:seen:<event_id>` counts each event.
const KEY_PREFIX: &str = "stepwise-demo:";
const LEDGER_READER: &str = "stepwise_demo_reader";
const READER_PASSWORD: &str = "stepwise-demo-reader";

impl Stores {
    /// Connects to both servers as administrators (`mysql://root@…/test`, `redis://…`),
    /// creates the ledger table and the two reader accounts. `Err` says which server could
    /// not be had, and why.
    pub async fn connect(mysql_url: &str, redis_url: &str) -> Result<Stores, String> {
        const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
        let options: MySqlConnectOptions = mysql_url
            .parse()
            .map_err(|error| format!("MariaDB at {mysql_url}: {error}"))?;
        let options = options.log_statements(tracing::log::LevelFilter::Debug);
        let ledger = MySqlPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|error| format!("MariaDB at {mysql_url}: {error}"))?;
        let database = options.get_database().unwrap_or("test").to_owned();
        for statement in [
            "CREATE TABLE IF NOT EXISTS stepwise_demo_ledger (event_id VARCHAR(64) PRIMARY KEY, \
             amount_cents BIGINT NOT NULL, booked_at DATETIME(3) NOT NULL)"
                .to_owned(),
            format!(
                "CREATE USER IF NOT EXISTS '{LEDGER_READER}'@'%' IDENTIFIED BY '{READER_PASSWORD}'"
            ),
            format!("GRANT SELECT ON `{database}`.stepwise_demo_ledger TO '{LEDGER_READER}'@'%'"),
        ] {
            sqlx::query(&statement)
                .execute(&ledger)
                .await
                .map_err(|error| format!("MariaDB at {mysql_url}: {error}"))?;
        }
        let ledger_source = format!(
            "mysql://{LEDGER_READER}:{READER_PASSWORD}@{}:{}/{database}",
            options.get_host(),
            options.get_port()
        );
        let unreachable = |error: std::io::Error| format!("Redis at {redis_url}: {error}");
        tokio::time::timeout(CONNECT_TIMEOUT, redis::command(redis_url, &[b"PING"]))
            .await
            .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
            .map_err(unreachable)?;
        // README's recipe, confined to the demo's keys. Redis before 6 has no ACL users: the
        // source then reads as the server's only user, and Stepwise warns that it could write.
        let keys = format!("~{KEY_PREFIX}*");
        let created = redis::command(
            redis_url,
            &[
                b"ACL",
                b"SETUSER",
                b"stepwise-demo-reader",
                b"reset",
                b"on",
                format!(">{READER_PASSWORD}").as_bytes(),
                keys.as_bytes(),
                b"resetchannels",
                b"-@all",
                b"+@read",
            ],
        )
        .await
        .map_err(unreachable)?;
        let address = redis::address(redis_url);
        let counter_source = if created == "+OK" {
            format!("redis://stepwise-demo-reader:{READER_PASSWORD}@{address}")
        } else {
            redis_url.to_owned()
        };
        Ok(Stores {
            ledger,
            redis_url: redis_url.to_owned(),
            ledger_source,
            counter_source,
        })
    }

    /// Books `event` in the ledger and counts it.
    async fn record(&self, event_id: &str, amount_cents: i64) -> Result<(), String> {
        sqlx::query(
            "REPLACE INTO stepwise_demo_ledger (event_id, amount_cents, booked_at) \
             VALUES (?, ?, UTC_TIMESTAMP(3))",
        )
        .bind(event_id)
        .bind(amount_cents)
        .execute(&self.ledger)
        .await
        .map_err(|error| format!("booking in the ledger: {error}"))?;
        let key = format!("{KEY_PREFIX}seen:{event_id}");
        redis::command(&self.redis_url, &[b"INCR", key.as_bytes()])
            .await
            .map_err(|error| format!("counting in Redis: {error}"))?;
        Ok(())
    }
}

/// A running pipeline.
pub struct Pipeline {
    pub addr: SocketAddr,
}

#[derive(Deserialize)]
struct IncomingEvent {
    event_id: Option<String>,
    name: String,
    amount_cents: i64,
    user_id: Option<String>,
    /// `"bus"`, `"warehouse"` or `"report"`: the event is lost before that stage.
    drop_at: Option<String>,
    /// `"amount"`: the warehouse stores a different amount.
    corrupt: Option<String>,
}

#[derive(Clone, Serialize)]
struct CollectedEvent {
    event_id: String,
    name: String,
    amount_cents: i64,
    user_id: Option<String>,
    received_at_ms: i64,
}

#[derive(Clone, Default)]
struct PipelineState {
    collected: Arc<Mutex<HashMap<String, CollectedEvent>>>,
    reported: Arc<Mutex<HashMap<String, i64>>>,
    warehouse: Option<SqlitePool>,
    config: Option<PipelineConfig>,
}

/// Creates the warehouse table in `warehouse_db` if needed and serves the pipeline on
/// `listener` until `shutdown` is cancelled.
pub async fn start_pipeline(
    listener: tokio::net::TcpListener,
    warehouse_db: &Path,
    config: PipelineConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Pipeline> {
    let options = SqliteConnectOptions::new()
        .filename(warehouse_db)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePool::connect_with(options).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, name TEXT NOT NULL, \
         amount_cents INTEGER NOT NULL, user_id TEXT, loaded_at_ms INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let state = PipelineState {
        warehouse: Some(pool),
        config: Some(config),
        ..PipelineState::default()
    };
    let app = axum::Router::new()
        .route("/collect", post(collect))
        .route("/events/{id}", get(collected_event))
        .route("/report/events/{id}", get(reported_event))
        .with_state(state);
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the simulated pipeline stopped");
        }
    });
    Ok(Pipeline { addr })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

async fn collect(State(state): State<PipelineState>, Json(event): Json<IncomingEvent>) -> Response {
    let event_id = event
        .event_id
        .clone()
        .unwrap_or_else(|| format!("evt-{}", now_ms()));
    let collected = CollectedEvent {
        event_id: event_id.clone(),
        name: event.name.clone(),
        amount_cents: event.amount_cents,
        user_id: event.user_id.clone(),
        received_at_ms: now_ms(),
    };
    state
        .collected
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .insert(event_id.clone(), collected.clone());
    if let Some(url) = state.config.as_ref().and_then(|config| config.bus.clone())
        && event.drop_at.as_deref() != Some("bus")
    {
        tokio::spawn(publish(url, collected.clone()));
    }
    // The async jobs of a real pipeline: the event moves on later, or gets lost on the way.
    tokio::spawn(deliver(state, collected, event.drop_at, event.corrupt));
    (StatusCode::ACCEPTED, Json(json!({"event_id": event_id}))).into_response()
}

/// Publishes what the collector received on the bus, with the event's id as a header.
async fn publish(url: String, event: CollectedEvent) {
    let published = async {
        let mut publisher = crate::nats::Publisher::connect(&url).await?;
        let payload = serde_json::to_vec(&event).map_err(std::io::Error::other)?;
        publisher
            .publish(
                COLLECTED_SUBJECT,
                &[("Event-Id", event.event_id.as_str())],
                &payload,
            )
            .await
    };
    if let Err(error) = published.await {
        tracing::error!(%error, "the collector could not publish the event on {COLLECTED_SUBJECT}");
    }
}

async fn deliver(
    state: PipelineState,
    event: CollectedEvent,
    drop_at: Option<String>,
    corrupt: Option<String>,
) {
    let (Some(pool), Some(config)) = (state.warehouse.clone(), state.config.clone()) else {
        return;
    };
    tokio::time::sleep(config.warehouse_delay).await;
    if drop_at.as_deref() == Some("warehouse") {
        return;
    }
    let amount = if corrupt.as_deref() == Some("amount") {
        event.amount_cents + 1
    } else {
        event.amount_cents
    };
    let loaded = sqlx::query(
        "INSERT OR REPLACE INTO events (event_id, name, amount_cents, user_id, loaded_at_ms) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&event.event_id)
    .bind(&event.name)
    .bind(amount)
    .bind(&event.user_id)
    .bind(now_ms())
    .execute(&pool)
    .await;
    if let Err(error) = loaded {
        tracing::error!(%error, "loading the event into the warehouse failed");
        return;
    }
    tokio::time::sleep(config.report_delay).await;
    if drop_at.as_deref() == Some("report") {
        return;
    }
    if let Some(stores) = &config.stores
        && let Err(error) = stores.record(&event.event_id, amount).await
    {
        tracing::error!(%error, "the report could not book the event");
    }
    state
        .reported
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .insert(event.event_id, amount);
}

async fn collected_event(
    State(state): State<PipelineState>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let event = state
        .collected
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .get(&id)
        .cloned();
    match event {
        Some(event) => Json(event).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))).into_response(),
    }
}

async fn reported_event(
    State(state): State<PipelineState>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let amount = state
        .reported
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .get(&id)
        .copied();
    match amount {
        Some(amount) => {
            Json(json!({"event_id": id, "count": 1, "amount_cents": amount})).into_response()
        }
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))).into_response(),
    }
}
