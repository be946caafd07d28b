//! HTTP only: routes, JSON in and out, problem+json errors. Handlers validate input, call
//! `storage` or the plugin `registry` and wake the scheduler; they never call the runner or
//! wasmtime.

mod audit;
mod auth;
mod dto;
mod error;
mod health;
mod plugins;
mod query;
mod runs;
mod schedules;
mod secrets;
mod state;
mod tokens;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};

pub use auth::{Caller, host_allowed, required_role};
pub use error::ApiError;
pub use state::AppState;

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let upload_limit = state.settings.upload_limit_bytes;
    Router::new()
        .route("/v1/runs", post(runs::runs_create).get(runs::runs_index))
        .route("/v1/runs/{id}", get(runs::runs_show))
        .route("/v1/runs/{id}/attempts", get(runs::runs_attempts))
        .route("/v1/runs/{id}/cancel", post(runs::runs_cancel))
        .route("/v1/plugins", get(plugins::plugins_index))
        .route(
            "/v1/plugins/{name}",
            get(plugins::plugins_show)
                .put(plugins::plugins_upload)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/v1/plugins/{name}/activate",
            post(plugins::plugins_activate),
        )
        .route("/v1/plugins/{name}/grant", put(plugins::plugins_grant))
        .route(
            "/v1/schedules",
            post(schedules::schedules_create).get(schedules::schedules_index),
        )
        .route(
            "/v1/schedules/{id}",
            get(schedules::schedules_show)
                .patch(schedules::schedules_update)
                .delete(schedules::schedules_delete),
        )
        .route(
            "/v1/tokens",
            post(tokens::tokens_create).get(tokens::tokens_index),
        )
        .route("/v1/tokens/{name}", delete(tokens::tokens_revoke))
        .route("/v1/audit", get(audit::audit_index))
        .route("/v1/secrets", get(secrets::secrets_index))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(error::not_found_fallback)
        .method_not_allowed_fallback(error::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .layer(axum::middleware::from_fn(error::log_server_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            health::count_request,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
