//! `/v1/plugins`: what is loaded, with each plugin's steps, grant and versions.

use axum::Json;
use axum::extract::{Path, State};

use super::dto::PluginDto;
use super::error::ApiError;
use super::state::AppState;
use crate::config::parse_grant;

/// `GET /v1/plugins`
pub async fn plugins_index(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let plugins = state.store.list_plugins().await?;
    let plugins: Vec<PluginDto> = plugins.iter().map(PluginDto::new).collect();
    Ok(Json(serde_json::json!({ "plugins": plugins })))
}

/// `GET /v1/plugins/{name}`
pub async fn plugins_show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PluginDto>, ApiError> {
    let plugin = state.store.find_plugin(&name).await?.ok_or_else(|| {
        ApiError::not_found("plugin_not_found", format!("no plugin named {name:?}"))
    })?;
    let grant = parse_grant(&plugin.grant_toml).unwrap_or_default();
    let versions = state.store.list_plugin_versions(&name).await?;
    Ok(Json(
        PluginDto::new(&plugin).with_details(&grant, &versions),
    ))
}
