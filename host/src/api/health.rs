//! What probes and scrapers call, without a token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::dto::{ClusterHealthDto, HealthDto, ReadinessDto};
use super::state::AppState;

/// Liveness: the process answers.
#[utoipa::path(
    get, path = "/healthz", tag = "health",
    summary = "Liveness",
    responses((status = 200, description = "The process answers", body = HealthDto))
)]
pub async fn healthz() -> Json<HealthDto> {
    Json(HealthDto { status: "ok" })
}

/// `GET /v1/health`: the nodes sharing the database, the queue and the last minute's lag.
#[utoipa::path(
    get, path = "/v1/health", tag = "health",
    summary = "Nodes with the leases they hold, queue depth, and the last minute's tick lag",
    responses(
        (status = 200, description = "The cluster as the database sees it", body = ClusterHealthDto),
    )
)]
pub async fn cluster(
    State(state): State<AppState>,
) -> Result<Json<ClusterHealthDto>, super::error::ApiError> {
    let health = state
        .store
        .cluster_health(crate::model::now_millis())
        .await?;
    Ok(Json(ClusterHealthDto::new(&state.node_id, health)))
}

/// Ready once the database answers and the plugins directory has been loaded.
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    summary = "Readiness: the database answers and the plugins directory is loaded",
    responses(
        (status = 200, description = "Ready", body = ReadinessDto),
        (status = 503, description = "Not ready yet, and why", body = ReadinessDto),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<ReadinessDto>) {
    let database = state.store.ping().await.is_ok();
    let plugins = state.plugins_loaded();
    let status = if database && plugins {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ReadinessDto {
        status: if status == StatusCode::OK {
            "ready"
        } else {
            "not_ready"
        },
        database,
        plugins_loaded: plugins,
    };
    (status, Json(body))
}

/// `GET /metrics`: Prometheus text (README, "Metrics"); open like the probes, and names no run.
#[utoipa::path(
    get, path = "/metrics", tag = "health",
    summary = "Prometheus metrics (text format 0.0.4)",
    responses(
        (status = 200, description = "The metrics of the README's \"Metrics\" section", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 500, description = "The database did not answer", body = super::error::Problem,
            content_type = "application/problem+json"),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match state.store.metrics_counts(&state.node_id).await {
        Ok(mut stored) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            {
                stored.taps = state
                    .message_sources
                    .tap_stats()
                    .into_iter()
                    .map(|(source, tap)| crate::metrics::TapFigures {
                        source,
                        messages: tap.messages as u64,
                        bytes: tap.bytes as u64,
                        dropped: tap.dropped,
                    })
                    .collect();
                state.metrics.render(&stored)
            },
        )
            .into_response(),
        Err(error) => {
            super::error::ApiError::internal(format!("reading counts for /metrics: {error}"))
                .into_response()
        }
    }
}

/// Counts every API request by its route template and status, for `/metrics`.
pub async fn count_request(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", |path| path.as_str());
    state
        .metrics
        .record_request(route, response.status().as_u16());
    response
}
