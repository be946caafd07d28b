//! `/v1/plugins`: what is loaded, with each plugin's steps, grant and versions; uploads,
//! activation (roll back or forward) and grant changes, all through the registry.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value as Json_;

use super::auth::Caller;
use super::body;
use super::dto::{
    ActivateRequest, PluginDto, PluginListDto, ShadowDto, ShadowParts, UploadForm, UploadQuery,
    parse_mode,
};
use super::error::{ApiError, Problem};
use super::state::AppState;
use crate::grant::{ManifestFile, grant_toml_from_json, parse_grant};
use crate::model::{PluginName, PluginVersion, Role};
use crate::registry::Mode;
use crate::storage::PluginRecord;

/// `GET /v1/plugins`
#[utoipa::path(
    get, path = "/v1/plugins", tag = "plugins",
    summary = "Plugins with their active version and steps",
    responses((status = 200, description = "Every plugin", body = PluginListDto))
)]
pub async fn plugins_index(State(state): State<AppState>) -> Result<Json<PluginListDto>, ApiError> {
    let plugins = state.store.list_plugins().await?;
    Ok(Json(PluginListDto {
        plugins: plugins.iter().map(PluginDto::new).collect(),
    }))
}

/// `GET /v1/plugins/{name}`
#[utoipa::path(
    get, path = "/v1/plugins/{name}", tag = "plugins",
    summary = "A plugin with its grant, the limits in force and every version",
    params(("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "The plugin", body = PluginDto),
        (status = 404, description = "No such plugin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn plugins_show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PluginDto>, ApiError> {
    Ok(Json(plugin_details(&state, &name).await?))
}

/// `PUT /v1/plugins/{name}`: the body is the `.wasm` (`application/wasm` or
/// `application/octet-stream`), or `multipart/form-data` with a `component` part and an
/// optional `grant` part (TOML, or JSON when the part says `application/json`). Answers 201
/// for a new plugin, 200 otherwise, with the plugin as `GET` shows it; 202 when the version
/// is stored but waits for an admin's review. New bytes never change the grant; a `grant`
/// part does, and needs the admin role.
#[utoipa::path(
    put, path = "/v1/plugins/{name}", tag = "plugins",
    summary = "Upload a version",
    description = "Validated (it compiles, exports the world, `describe` answers) and activated; \
        a rejected upload changes nothing. A `grant` part needs the admin role. New code from a \
        non-admin for a plugin whose grant reaches outside the sandbox (hosts, sources or \
        secrets) is stored but stays inactive (202) until an admin activates it, unless the \
        operator's `[policy] publishers_activate_granted` is set. A token confined to plugin \
        patterns gets 403 outside them.",
    params(
        ("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"),
        UploadQuery,
    ),
    request_body(content(
        (Vec<u8> = "application/wasm"),
        (Vec<u8> = "application/octet-stream"),
        (UploadForm = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "A new version of a known plugin, or the same bytes again", body = PluginDto),
        (status = 201, description = "A new plugin", body = PluginDto,
            headers(("Location" = String, description = "`/v1/plugins/{name}`"))),
        (status = 202, description = "Stored, and waiting for an admin to activate it (its version is `pending`)", body = PluginDto),
        (status = 409, description = "`mode=shadow` for a plugin without an active version, or for the active version itself", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Outside the token's plugin patterns, or a grant part without the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than `max_upload_mib`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a valid check, or a grant beyond the policy", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn plugins_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let name = PluginName::parse(&name).map_err(|message| ApiError::invalid("name", message))?;
    caller.require_plugin(name.as_str())?;
    let query: UploadQuery = super::query::read(raw.as_deref())?;
    let mode = parse_mode(query.mode.as_deref())?;
    let limit = state.settings.upload_limit_bytes;
    let UploadForm { component, grant } = match media_type(&request).as_deref() {
        Some("multipart/form-data") => {
            let multipart =
                Multipart::from_request(request, &state)
                    .await
                    .map_err(|rejection| {
                        ApiError::bad_request("unreadable_body", rejection.body_text())
                    })?;
            read_upload_parts(multipart, limit).await?
        }
        None | Some("application/wasm") | Some("application/octet-stream") => {
            let body = Bytes::from_request(request, &state).await;
            UploadForm {
                component: Some(body::bytes(body, limit)?),
                grant: None,
            }
        }
        Some(other) => {
            return Err(ApiError::unsupported_media_type(format!(
                "content type {other:?} is not accepted: send application/wasm, or multipart/form-data with `component` and `grant` parts"
            )));
        }
    };
    let component = component
        .filter(|bytes| !bytes.is_empty())
        .ok_or_else(|| ApiError::invalid("component", "no component bytes: send the .wasm file"))?;
    if grant.is_some() {
        caller.require(Role::Admin, "a grant part in an upload")?;
        if mode == Mode::Shadow {
            // A shadow runs under the plugin's grant, the one its primaries have.
            return Err(ApiError::invalid(
                "grant",
                "a shadow runs under the plugin's grant: change the grant with PUT /v1/plugins/{name}/grant",
            ));
        }
    }
    let installed = state
        .registry
        .install(&name, component, grant, mode, caller.actor())
        .await?;
    let status = if installed.pending {
        StatusCode::ACCEPTED
    } else if installed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let details = plugin_details(&state, name.as_str()).await?;
    let mut response = (status, Json(details)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/plugins/{name}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `POST /v1/plugins/{name}/activate` with `{"version": "<sha256>"}`, and `"mode": "shadow"`
/// to run it beside the active version instead.
#[utoipa::path(
    post, path = "/v1/plugins/{name}/activate", tag = "plugins",
    summary = "Roll back or forward to a kept version, or make it the shadow version",
    params(("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = ActivateRequest,
    responses(
        (status = 200, description = "The plugin, with the version active", body = PluginDto),
        (status = 403, description = "Outside the token's plugin patterns, or an unreviewed version of a plugin whose grant reaches outside the sandbox, which only an admin may activate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such plugin or version", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`mode: shadow` for the active version", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn plugins_activate(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PluginDto>, ApiError> {
    caller.require_plugin(&name)?;
    let request: ActivateRequest = body::typed(
        &body::object(body, state.settings.body_limit_bytes)?,
        &state.settings,
    )?;
    let version = PluginVersion::parse(&request.version)
        .map_err(|message| ApiError::invalid("version", message))?;
    match parse_mode(request.mode.as_deref())? {
        Mode::Active => {
            state
                .registry
                .activate(&name, &version, caller.actor())
                .await?;
        }
        Mode::Shadow => {
            state
                .registry
                .shadow(&name, &version, caller.actor())
                .await?;
        }
    }
    Ok(Json(plugin_details(&state, &name).await?))
}

/// `GET /v1/plugins/{name}/shadow`
#[utoipa::path(
    get, path = "/v1/plugins/{name}/shadow", tag = "plugins",
    summary = "The shadow version against the active one",
    description = "Over the runs since the shadow began: how primaries and shadow runs ended, \
        side by side; the pairs that disagree, newest first; and per step, when it passed and \
        the calls it took. Without a current shadow, the one that ended last, with how it ended.",
    params(("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "The comparison", body = ShadowDto),
        (status = 404, description = "No such plugin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn plugins_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ShadowDto>, ApiError> {
    let plugin = find_plugin(&state, &name).await?;
    let shadow = state.store.latest_shadow(&name).await?;
    let (tally, disagreements, steps) = match &shadow {
        Some(shadow) => (
            state.store.shadow_tally(shadow).await?,
            state.store.shadow_disagreements(shadow, 50).await?,
            state.store.shadow_steps(shadow).await?,
        ),
        None => Default::default(),
    };
    Ok(Json(ShadowDto::new(ShadowParts {
        plugin: &plugin,
        shadow: shadow.as_ref(),
        policy: state.settings.policy.shadow_of(&plugin.grant_toml),
        share: state.settings.policy.shadow_share.unwrap_or(1.0),
        tally,
        disagreements: &disagreements,
        steps: &steps,
    })))
}

/// `DELETE /v1/plugins/{name}/shadow`
#[utoipa::path(
    delete, path = "/v1/plugins/{name}/shadow", tag = "plugins",
    summary = "Stop the shadow version without promoting it",
    description = "Runs already started beside their primaries finish; new runs have no shadow.",
    params(("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "The plugin, without a shadow", body = PluginDto),
        (status = 403, description = "Outside the token's plugin patterns", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such plugin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The plugin has no shadow version", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn plugins_shadow_stop(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<PluginDto>, ApiError> {
    caller.require_plugin(&name)?;
    find_plugin(&state, &name).await?;
    state.registry.stop_shadow(&name, &caller.name).await?;
    Ok(Json(plugin_details(&state, &name).await?))
}

/// `PUT /v1/plugins/{name}/grant`: replaces the grant (TOML, or JSON with the same keys)
/// without new bytes. Runs in flight use it from their next tick.
#[utoipa::path(
    put, path = "/v1/plugins/{name}/grant", tag = "plugins",
    summary = "Replace the grant",
    params(("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body(content(
        (ManifestFile = "application/json"),
        (String = "application/toml"),
    )),
    responses(
        (status = 200, description = "The plugin with its new grant", body = PluginDto),
        (status = 404, description = "No such plugin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "An invalid grant, or one beyond the policy", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn plugins_grant(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    request: Request,
) -> Result<Json<PluginDto>, ApiError> {
    let json = media_type(&request).as_deref() == Some("application/json");
    let limit = state.settings.body_limit_bytes;
    let body = body::bytes(Bytes::from_request(request, &state).await, limit)?;
    if body.is_empty() {
        plugin_details(&state, &name).await?;
        // Most likely a mistake, and it would take every capability away: an empty grant
        // must be said (`{}`, or an empty TOML document with a comment).
        return Err(ApiError::invalid(
            "grant",
            "the body is empty: send the grant as TOML or JSON (no capabilities: {})",
        ));
    }
    let grant = grant_text(&body, json)?;
    state
        .registry
        .set_grant(&name, &grant, &caller.name)
        .await?;
    Ok(Json(plugin_details(&state, &name).await?))
}

async fn find_plugin(state: &AppState, name: &str) -> Result<PluginRecord, ApiError> {
    state
        .store
        .find_plugin(name)
        .await?
        .ok_or_else(|| ApiError::not_found("plugin_not_found", format!("no plugin named {name:?}")))
}

async fn plugin_details(state: &AppState, name: &str) -> Result<PluginDto, ApiError> {
    let plugin = find_plugin(state, name).await?;
    let grant = parse_grant(&plugin.grant_toml).unwrap_or_default();
    let (_, effective) = state
        .settings
        .policy
        .confine(grant.clone(), &state.settings.limits);
    let versions = state.store.list_plugin_versions(name).await?;
    let review_needed =
        grant.grants_capabilities() && !state.settings.policy.publishers_activate_granted;
    let shadow_policy = state.settings.policy.shadow_of(&plugin.grant_toml);
    Ok(PluginDto::new(&plugin).with_details(
        &grant,
        shadow_policy,
        &effective,
        &versions,
        review_needed,
    ))
}

async fn read_upload_parts(mut multipart: Multipart, limit: usize) -> Result<UploadForm, ApiError> {
    let mut component = None;
    let mut grant = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|error| multipart_error(error, limit))?
    {
        let part = field.name().unwrap_or_default().to_owned();
        let json = field.content_type() == Some("application/json");
        let bytes = field
            .bytes()
            .await
            .map_err(|error| multipart_error(error, limit))?;
        match part.as_str() {
            "component" => component = Some(bytes),
            "grant" => grant = Some(grant_text(&bytes, json)?),
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown part {other:?}; known parts: component, grant"),
                ));
            }
        }
    }
    Ok(UploadForm { component, grant })
}

/// The grant as manifest TOML, whichever form it came in.
fn grant_text(body: &[u8], json: bool) -> Result<String, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid("grant", "the grant is not UTF-8 text"))?;
    let toml = if json {
        let value: Json_ = serde_json::from_str(text).map_err(|error| {
            ApiError::invalid("grant", format!("the grant is not valid JSON: {error}"))
        })?;
        grant_toml_from_json(&value)
            .map_err(|error| ApiError::invalid("grant", format!("{error:#}")))?
    } else {
        text.to_owned()
    };
    parse_grant(&toml).map_err(|error| ApiError::invalid("grant", format!("{error:#}")))?;
    Ok(toml)
}

fn multipart_error(error: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::bad_request("unreadable_body", error.body_text())
    }
}

/// The request's media type without parameters, lowercased.
fn media_type(request: &Request) -> Option<String> {
    let value = request.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase(),
    )
}
