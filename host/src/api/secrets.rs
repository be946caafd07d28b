//! `/v1/secrets` (admin): the secrets the operator declared, where each may be sent and which
//! plugins are granted it. Never a value: values live only in the host's memory.

use axum::Json;
use axum::extract::State;
use serde_json::{Value as Json_, json};

use super::error::ApiError;
use super::state::AppState;
use crate::config::{SecretFrom, parse_grant};

/// `GET /v1/secrets`
pub async fn secrets_index(State(state): State<AppState>) -> Result<Json<Json_>, ApiError> {
    let plugins = state.store.list_plugins().await?;
    let grants: Vec<(String, Vec<String>)> = plugins
        .iter()
        .map(|plugin| {
            let secrets = parse_grant(&plugin.grant_toml)
                .map(|grant| grant.secrets)
                .unwrap_or_default();
            (plugin.name.to_string(), secrets)
        })
        .collect();
    let secrets: Vec<Json_> = state
        .settings
        .secrets
        .iter()
        .map(|(name, declaration)| {
            let hosts: Vec<String> = declaration.hosts.iter().map(ToString::to_string).collect();
            let granted_to: Vec<&str> = grants
                .iter()
                .filter(|(_, secrets)| secrets.contains(name))
                .map(|(plugin, _)| plugin.as_str())
                .collect();
            let (kind, from) = match &declaration.from {
                SecretFrom::Env(var) => ("env", var.clone()),
                SecretFrom::File(path) => ("file", path.display().to_string()),
            };
            json!({"name": name, "hosts": hosts, kind: from, "granted_to": granted_to})
        })
        .collect();
    Ok(Json(json!({ "secrets": secrets })))
}
