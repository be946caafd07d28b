//! `/v1/tokens` (admin): create a token (its secret is in the answer, and nowhere else ever
//! again), list tokens without their secrets, revoke one.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value as Json_;

use super::auth::Caller;
use super::dto::{CallerDto, NewTokenDto, TokenDto, TokenListDto};
use super::error::{ApiError, Problem};
use super::openapi::NewTokenRequest;
use super::runs::read_json_object;
use super::state::AppState;
use crate::auth::{CreateError, TokenTerms, create_token};
use crate::model::{PluginScope, Role, now_millis};
use crate::storage::{self, AuditEntry};

/// The fields of `POST /v1/tokens`.
pub(super) const CREATE_FIELDS: &[&str] = &["role", "name", "expires_in", "plugins"];

/// The longest lifetime a token may be given: ten years.
const MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// A token's lifetime as `expires_in` or `--expires-in` gives it (`90d`, `12h`, `30m`).
pub fn parse_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let lifetime = humantime::parse_duration(text)
        .map_err(|error| format!("{text:?} is not a duration such as 90d or 12h: {error}"))?;
    if lifetime.is_zero() || lifetime > MAX_LIFETIME {
        return Err(format!("{text:?} must be more than 0 and at most 10 years"));
    }
    Ok(lifetime)
}

/// `POST /v1/tokens` with `{"role": "...", "name"?: "...", "expires_in"?: "90d",
/// "plugins"?: ["team-a-*"]}`: 201 with the secret.
#[utoipa::path(
    post, path = "/v1/tokens", tag = "tokens",
    summary = "Create a token",
    request_body = NewTokenRequest,
    responses(
        (status = 201, description = "The token with its secret, shown this once", body = NewTokenDto,
            headers(("Location" = String, description = "`/v1/tokens/{name}`"))),
        (status = 409, description = "A token with this name exists", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn tokens_create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = read_json_object(body, CREATE_FIELDS, state.settings.body_limit_bytes)?;
    let role = match request.get("role") {
        Some(Json_::String(role)) => {
            Role::parse(role).map_err(|message| ApiError::invalid("role", message))?
        }
        Some(_) => return Err(ApiError::invalid("role", "role must be a string")),
        None => return Err(ApiError::invalid("role", "role is required")),
    };
    let name = match request.get("name") {
        Some(Json_::String(name)) => Some(name.clone()),
        None | Some(Json_::Null) => None,
        Some(_) => return Err(ApiError::invalid("name", "name must be a string")),
    };
    let lifetime = match request.get("expires_in") {
        Some(Json_::String(text)) => {
            Some(parse_lifetime(text).map_err(|message| ApiError::invalid("expires_in", message))?)
        }
        None | Some(Json_::Null) => None,
        Some(_) => {
            return Err(ApiError::invalid(
                "expires_in",
                "expires_in must be a duration such as \"90d\"",
            ));
        }
    };
    let plugins = match request.get("plugins") {
        None | Some(Json_::Null) => None,
        Some(Json_::Array(patterns)) => {
            let patterns: Option<Vec<&str>> = patterns.iter().map(Json_::as_str).collect();
            let patterns = patterns.ok_or_else(|| {
                ApiError::invalid("plugins", "plugins must be an array of name patterns")
            })?;
            Some(
                PluginScope::parse(patterns)
                    .map_err(|message| ApiError::invalid("plugins", message))?,
            )
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "plugins",
                "plugins must be an array of name patterns, such as [\"team-a-*\"]",
            ));
        }
    };
    let terms = TokenTerms { lifetime, plugins };
    let token = create_token(&state.store, name, role, &caller.name, terms)
        .await
        .map_err(|error| match error {
            CreateError::InvalidName(message) => ApiError::invalid("name", message),
            CreateError::InvalidScope(message) => ApiError::invalid("plugins", message),
            CreateError::Taken(name) => ApiError::conflict(
                "token_exists",
                format!(
                    "a token named {name:?} exists or was revoked (names are never reused, so \
                     that audit entries and idempotency keys keep meaning one token)"
                ),
            )
            .with_field("name"),
            CreateError::Other(error) => ApiError::internal(format!("{error:#}")),
        })?;
    let location = format!("/v1/tokens/{}", token.stored.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(NewTokenDto::new(&token.stored, token.secret)),
    )
        .into_response())
}

/// `GET /v1/whoami`: the caller's token name, role and plugin patterns, so that a client (the
/// dashboard) offers only what the token may do.
#[utoipa::path(
    get, path = "/v1/whoami", tag = "tokens",
    summary = "The caller's token: name, role and plugin patterns",
    responses((status = 200, description = "The caller", body = CallerDto))
)]
pub async fn whoami(caller: Caller) -> Json<CallerDto> {
    Json(CallerDto {
        role: caller.role.as_str(),
        plugins: caller
            .plugins
            .as_ref()
            .map(|scope| scope.patterns().to_vec()),
        name: caller.name,
    })
}

/// `GET /v1/tokens`: names, roles and who created them; never the secrets.
#[utoipa::path(
    get, path = "/v1/tokens", tag = "tokens",
    summary = "Tokens, without their secrets",
    responses((status = 200, description = "Every token", body = TokenListDto))
)]
pub async fn tokens_index(State(state): State<AppState>) -> Result<Json<TokenListDto>, ApiError> {
    let tokens = state.store.list_tokens().await?;
    Ok(Json(TokenListDto {
        tokens: tokens.iter().map(TokenDto::new).collect(),
    }))
}

/// `DELETE /v1/tokens/{name}`: 204; the token fails on every node from now on, and stays
/// listed with `revoked_at`.
#[utoipa::path(
    delete, path = "/v1/tokens/{name}", tag = "tokens",
    summary = "Revoke a token on every node",
    params(("name" = String, Path, description = "The token's name")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn tokens_revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let audit = AuditEntry::new(&caller.name, "token.revoke", &name, now_millis());
    match state.store.revoke_token(&name, &audit).await {
        Ok(()) => {
            tracing::info!(token = %name, actor = %caller.name, "token revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(storage::Error::NotFound) => Err(ApiError::not_found(
            "token_not_found",
            format!("no token named {name:?}"),
        )),
        Err(error) => Err(error.into()),
    }
}
