//! `/v1/secrets` (admin): the secrets the operator declared, where each may be sent and which
//! plugins are granted it. Never a value: values live only in the host's memory.

use super::dto::{SecretDto, SecretListDto};
use super::error::ApiError;
use super::state::AppState;
use crate::config::SecretFrom;
use crate::grant::parse_grant;
use crate::model::Place;
use axum::Json;
use axum::extract::State;

/// `GET /v1/secrets`
#[utoipa::path(
    get, path = "/v1/secrets", tag = "secrets",
    summary = "Declared secrets: where each may be sent and who may send it, never a value",
    responses((status = 200, description = "Every declared secret", body = SecretListDto))
)]
pub async fn secrets_index(State(state): State<AppState>) -> Result<Json<SecretListDto>, ApiError> {
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
    let secrets = state
        .settings
        .secrets
        .iter()
        .map(|(name, declaration)| {
            let (env, file) = match &declaration.from {
                SecretFrom::Env(var) => (Some(var.clone()), None),
                SecretFrom::File(path) => (None, Some(path.display().to_string())),
            };
            let (header, format, query) = match &declaration.place {
                Some(Place::Header { name, format }) => {
                    (Some(name.to_string()), Some(format.clone()), None)
                }
                Some(Place::Query(name)) => (None, None, Some(name.clone())),
                None => (None, None, None),
            };
            SecretDto {
                name: name.clone(),
                hosts: declaration.hosts.iter().map(ToString::to_string).collect(),
                env,
                file,
                header,
                format,
                query,
                granted_to: grants
                    .iter()
                    .filter(|(_, secrets)| secrets.contains(name))
                    .map(|(plugin, _)| plugin.clone())
                    .collect(),
            }
        })
        .collect();
    Ok(Json(SecretListDto { secrets }))
}
