//! HTTP only: routes, JSON in and out, problem+json errors. Handlers validate input, call
//! `storage` or the plugin `registry` and wake the scheduler; they never call the runner or
//! wasmtime.

mod audit;
mod auth;
mod body;
mod dashboard;
mod dto;
mod error;
mod events;
mod health;
mod openapi;
mod plugins;
mod query;
mod runs;
mod schedules;
mod secrets;
mod server;
mod state;
mod status;
mod tokens;

use axum::extract::DefaultBodyLimit;
use axum::{Extension, Router};
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

pub use auth::{Caller, host_allowed, required_role};
pub use dto::RunDto;
pub use error::ApiError;
pub use events::EventHub;
pub use server::{Connections, Peer};
pub use state::{AppState, Shared};
pub use status::{
    Report as StatusReport, build as build_status_report, render as render_status_page,
};
pub use tokens::parse_lifetime;

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let (router, document) = routes(state.settings.upload_limit_bytes).split_for_parts();
    let document = openapi::complete(document);
    let document = openapi::Document(document.to_string().into());
    router
        // Only on routes that exist: a method a path does not have is a 405 (and a path that
        // does not exist a 404) before any check of the body's type or the token.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .merge(dashboard::routes())
        .merge(status::routes())
        .fallback(error::not_found_fallback)
        .method_not_allowed_fallback(error::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::host_guard,
        ))
        .layer(axum::middleware::from_fn(error::log_server_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            health::count_request,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(document))
        .with_state(state)
}

/// The OpenAPI document of [`router`], as `GET /openapi.json` serves it.
pub fn openapi_document() -> serde_json::Value {
    openapi::complete(routes(0).split_for_parts().1)
}

/// Every route with its handler; each handler's `#[utoipa::path]` gives its path, method and
/// description.
fn routes(upload_limit: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(runs::runs_create, runs::runs_index))
        .routes(routes!(runs::runs_show))
        .routes(routes!(runs::runs_attempts))
        .routes(routes!(runs::runs_notifications))
        .routes(routes!(runs::runs_recording))
        .routes(routes!(events::run_events))
        .routes(routes!(events::events_index))
        .routes(routes!(runs::runs_cancel))
        .routes(routes!(plugins::plugins_index))
        .routes(
            routes!(plugins::plugins_show, plugins::plugins_upload)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .routes(routes!(plugins::plugins_activate))
        .routes(routes!(
            plugins::plugins_shadow,
            plugins::plugins_shadow_stop
        ))
        .routes(routes!(plugins::plugins_grant))
        .routes(routes!(
            schedules::schedules_create,
            schedules::schedules_index
        ))
        .routes(routes!(
            schedules::schedules_show,
            schedules::schedules_update,
            schedules::schedules_delete
        ))
        .routes(routes!(tokens::tokens_create, tokens::tokens_index))
        .routes(routes!(tokens::tokens_revoke))
        .routes(routes!(tokens::whoami))
        .routes(routes!(audit::audit_index))
        .routes(routes!(secrets::secrets_index))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::cluster))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::openapi_json))
}
