//! `/v1/tokens` (admin): create a token (its secret is in the answer, and nowhere else ever
//! again), list tokens without their secrets, revoke one.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::auth::Caller;
use super::body;
use super::dto::{CallerDto, NewTokenDto, NewTokenRequest, TokenDto, TokenListDto};
use super::error::{ApiError, Problem};
use super::state::AppState;
use crate::auth::{CreateError, TokenTerms, create_token};
use crate::model::{PluginScope, Role, now_millis};
use crate::storage::{self, AuditEntry};

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
    let request: NewTokenRequest = body::typed(
        &body::object(body, state.settings.body_limit_bytes)?,
        &state.settings,
    )?;
    let role = Role::parse(&request.role).map_err(|message| ApiError::invalid("role", message))?;
    let name = request.name;
    let lifetime = request
        .expires_in
        .map(|text| {
            parse_lifetime(&text).map_err(|message| ApiError::invalid("expires_in", message))
        })
        .transpose()?;
    let plugins = request
        .plugins
        .map(|patterns| {
            PluginScope::parse(patterns.iter().map(String::as_str))
                .map_err(|message| ApiError::invalid("plugins", message))
        })
        .transpose()?;
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
