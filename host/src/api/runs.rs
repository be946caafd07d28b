//! `/v1/runs`: trigger, show, list, cancel, attempts.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json_};

use super::auth::Caller;
use super::dto::{
    AttemptDto, AttemptListDto, NotificationDto, NotificationListDto, RunDto, RunListDto,
};
use super::error::{ApiError, Problem};
use super::openapi::{AttemptPageQuery, RunsQuery, TriggerRunRequest};
use super::state::AppState;
use crate::model::{PluginName, RunId, RunStatus, now_millis};
use crate::scheduler::planning::{RunOptions, plan_run};
use crate::storage::{AttemptPage, Cancelled, Enqueued, RunFilter, RunRecord};

pub(super) const KNOWN_FIELDS: &[&str] = &[
    "plugin",
    "params",
    "poll_interval_ms",
    "timeout_ms",
    "step_timeouts",
    "retry",
    "labels",
];
/// The query parameters of `GET /v1/runs`.
pub(super) const INDEX_QUERY: &[&str] =
    &["plugin", "status", "label", "schedule", "limit", "cursor"];
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// `POST /v1/runs`: validates, makes the run durable, wakes the scheduler, answers 202.
#[utoipa::path(
    post, path = "/v1/runs", tag = "runs",
    summary = "Trigger a run",
    description = "Answers 202 once the run is committed; the scheduler starts it at once. \
        An `Idempotency-Key` repeated with the same request returns the first run.",
    request_body = TriggerRunRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; the same key and request give the same run")),
    responses(
        (status = 202, description = "The run, queued", body = RunDto,
            headers(("Location" = String, description = "`/v1/runs/{id}`"))),
        (status = 404, description = "No such plugin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The plugin's active version cannot run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn runs_create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = read_json_object(body, KNOWN_FIELDS, state.settings.body_limit_bytes)?;
    let plugin_name = match request.get("plugin") {
        Some(Json_::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::invalid("plugin", "plugin must be a string")),
        None => return Err(ApiError::invalid("plugin", "plugin is required")),
    };
    let params = match request.get("params") {
        None | Some(Json_::Null) => Json_::Object(Map::new()),
        Some(params @ Json_::Object(_)) => params.clone(),
        Some(_) => return Err(ApiError::invalid("params", "params must be a JSON object")),
    };
    let settings = &state.settings;
    let poll_interval = optional_millis(
        &request,
        "poll_interval_ms",
        settings.min_poll_interval,
        settings.max_poll_interval,
    )?;
    let run_timeout = optional_millis(
        &request,
        "timeout_ms",
        Duration::from_millis(1),
        settings.max_run_timeout,
    )?;
    let step_timeouts =
        parse_step_timeouts(request.get("step_timeouts"), settings.max_run_timeout)?;
    let retry = match request.get("retry") {
        None | Some(Json_::Null) => None,
        Some(retry) => Some(
            crate::config::parse_retry_json(retry)
                .map_err(|error| ApiError::invalid("retry", format!("{error:#}")))?,
        ),
    };
    let labels = parse_labels(request.get("labels"))?;
    let idempotency_key = match headers.get("idempotency-key") {
        Some(value) => {
            let key = value
                .to_str()
                .ok()
                .filter(|key| !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_BYTES);
            Some(
                key.ok_or_else(|| {
                    ApiError::invalid(
                        "Idempotency-Key",
                        "Idempotency-Key must be 1 to 255 visible ASCII characters",
                    )
                })?
                .to_owned(),
            )
        }
        None => None,
    };

    PluginName::parse(&plugin_name).map_err(|message| ApiError::invalid("plugin", message))?;
    caller.require_plugin(&plugin_name)?;
    let plugin = state
        .store
        .find_plugin(&plugin_name)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "plugin_not_found",
                format!("no plugin named {plugin_name:?}"),
            )
            .with_field("plugin")
        })?;
    // Scoped to the caller and the plugin: one client's key never finds another's run.
    // Token and plugin names cannot contain `/`, so the scoped key is unambiguous.
    let idempotency_key = idempotency_key.map(|key| format!("{}/{plugin_name}/{key}", caller.name));
    // serde_json keeps object keys sorted, so equal requests serialize to equal text.
    let idempotency_fingerprint = idempotency_key.as_ref().map(|_| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            Json_::Object(request.clone()).to_string(),
        ))
    });
    let options = RunOptions {
        poll_interval,
        timeout: run_timeout,
        step_timeouts,
        retry,
        labels,
        idempotency_key,
        idempotency_fingerprint,
        schedule_id: None,
        created_by: Some(caller.name.clone()),
    };
    let new_run = plan_run(&plugin, &params, options, &state.settings, now_millis()).await?;
    let run = match state.store.enqueue_run(&new_run).await? {
        Enqueued::Created(run) => {
            state.wakeup.wake();
            run
        }
        Enqueued::Existing(run) => run,
        Enqueued::KeyReused(run) => {
            return Err(ApiError::unprocessable(
                "idempotency_key_reused",
                format!(
                    "this Idempotency-Key was used with a different request (run {}); use a new key for a new request",
                    run.id
                ),
            )
            .with_field("Idempotency-Key"));
        }
    };
    let location = format!("/v1/runs/{}", run.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(RunDto::new(&run, true)),
    )
        .into_response())
}

/// The request body as a JSON object with only `known` fields: 400 for what is not a JSON
/// object, 413 over `limit`, 422 naming the first unknown field.
pub(super) fn read_json_object(
    body: Result<Bytes, BytesRejection>,
    known: &[&str],
    limit: usize,
) -> Result<Map<String, Json_>, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request("unreadable_body", rejection.body_text())
        }
    })?;
    let request: Json_ = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(
            "malformed_json",
            format!("request body is not valid JSON: {error}"),
        )
    })?;
    let Json_::Object(request) = request else {
        return Err(ApiError::bad_request(
            "malformed_json",
            "request body must be a JSON object",
        ));
    };
    if let Some(unknown) = request.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(ApiError::invalid(
            unknown.clone(),
            format!(
                "unknown field {unknown:?}; known fields: {}",
                known.join(", ")
            ),
        ));
    }
    Ok(request)
}

pub(super) fn optional_millis(
    request: &Map<String, Json_>,
    field: &str,
    min: Duration,
    max: Duration,
) -> Result<Option<Duration>, ApiError> {
    // Absent and `null` both mean "not set".
    let Some(value) = request.get(field).filter(|value| !value.is_null()) else {
        return Ok(None);
    };
    let millis = value
        .as_u64()
        .map(Duration::from_millis)
        .filter(|millis| (min..=max).contains(millis))
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!(
                    "{field} must be an integer from {} to {}",
                    min.as_millis(),
                    max.as_millis()
                ),
            )
        })?;
    Ok(Some(millis))
}

/// `step_timeouts`: an object of step names and milliseconds from 1 to `max`; whether each
/// name is a step of the plugin is checked with the plan. `null` means none.
fn parse_step_timeouts(
    value: Option<&Json_>,
    max: Duration,
) -> Result<BTreeMap<String, Duration>, ApiError> {
    let Some(value) = value.filter(|value| !value.is_null()) else {
        return Ok(BTreeMap::new());
    };
    let object = value.as_object().ok_or_else(|| {
        ApiError::invalid(
            "step_timeouts",
            "step_timeouts must be an object of step names and milliseconds",
        )
    })?;
    object
        .iter()
        .map(|(name, ms)| {
            let ms = ms
                .as_u64()
                .filter(|ms| (1..=max.as_millis() as u64).contains(ms))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("step_timeouts.{name}"),
                        format!(
                            "a step timeout must be an integer from 1 to {}",
                            max.as_millis()
                        ),
                    )
                })?;
            Ok((name.clone(), Duration::from_millis(ms)))
        })
        .collect()
}

/// Most labels on one run or schedule.
pub const MAX_LABELS: usize = 32;
/// Longest label key, and longest label value, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// Labels: an object of at most [`MAX_LABELS`] string values; keys of 1 to 63 bytes without
/// `=` (the filter `?label=key=value` splits at the first one) or control characters; values
/// of at most 256 bytes. `null` means none.
pub(super) fn parse_labels(value: Option<&Json_>) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(value) = value.filter(|value| !value.is_null()) else {
        return Ok(BTreeMap::new());
    };
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::invalid("labels", "labels must be an object of string values"))?;
    if object.len() > MAX_LABELS {
        return Err(ApiError::invalid(
            "labels",
            format!(
                "at most {MAX_LABELS} labels are allowed, not {}",
                object.len()
            ),
        ));
    }
    object
        .iter()
        .map(|(key, value)| {
            let field = format!("labels.{key}");
            if key.is_empty()
                || key.len() > MAX_LABEL_KEY_BYTES
                || key.contains('=')
                || key.chars().any(char::is_control)
            {
                return Err(ApiError::invalid(
                    field,
                    format!("a label key must be 1 to {MAX_LABEL_KEY_BYTES} bytes, without `=` or control characters"),
                ));
            }
            match value {
                Json_::String(text) if text.contains('\0') => Err(ApiError::invalid(
                    field,
                    "a label value may not contain a NUL character",
                )),
                Json_::String(text) if text.len() <= MAX_LABEL_VALUE_BYTES => {
                    Ok((key.clone(), text.clone()))
                }
                Json_::String(_) => Err(ApiError::invalid(
                    field,
                    format!("a label value may be at most {MAX_LABEL_VALUE_BYTES} bytes"),
                )),
                _ => Err(ApiError::invalid(field, "a label value must be a string")),
            }
        })
        .collect()
}

pub(super) fn parse_run_id(id: &str) -> Result<RunId, ApiError> {
    RunId::parse(id)
        .ok_or_else(|| ApiError::not_found("run_not_found", format!("no run with id {id:?}")))
}

/// The 404 of a run that is not there: `run_expired` when retention deleted it (as far as
/// the store can tell), else `run_not_found`.
async fn missing_run(state: &AppState, id: &RunId) -> ApiError {
    match state.store.run_expired(id).await {
        Ok(true) => ApiError::not_found(
            "run_expired",
            format!("run {id} finished long enough ago that retention deleted it"),
        ),
        Ok(false) => ApiError::not_found("run_not_found", format!("no run with id {id:?}")),
        Err(error) => error.into(),
    }
}

/// The run, or the 404 that says why it is not there.
pub(super) async fn existing_run(state: &AppState, id: &RunId) -> Result<RunRecord, ApiError> {
    match state.store.find_run(id).await? {
        Some(run) => Ok(run),
        None => Err(missing_run(state, id).await),
    }
}

/// `GET /v1/runs/{id}`
#[utoipa::path(
    get, path = "/v1/runs/{id}", tag = "runs",
    summary = "A run with its steps",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = RunDto),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn runs_show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunDto>, ApiError> {
    let run_id = parse_run_id(&id)?;
    let run = existing_run(&state, &run_id).await?;
    Ok(Json(RunDto::new(&run, true)))
}

/// The `status` query parameter of a run listing or stream.
pub(super) fn status_filter(
    query: &BTreeMap<String, String>,
) -> Result<Option<RunStatus>, ApiError> {
    match query.get("status") {
        Some(text) => Ok(Some(RunStatus::parse(text).ok_or_else(|| {
            let known: Vec<_> = RunStatus::ALL
                .iter()
                .map(|status| status.as_str())
                .collect();
            ApiError::invalid(
                "status",
                format!("status must be one of {}", known.join(", ")),
            )
        })?)),
        None => Ok(None),
    }
}

/// The query parameters of `GET /v1/runs/{id}/attempts`.
pub(super) const ATTEMPTS_QUERY: &[&str] = &["limit", "cursor", "logs"];

/// The most JSON one page of attempts holds (one attempt may be larger on its own): a page of
/// 1,000 attempts with full logs and messages would be hundreds of MB.
pub const ATTEMPT_PAGE_BYTES: usize = 4 << 20;

/// `GET /v1/runs/{id}/attempts?limit=&cursor=&logs=`: the calls of the run's steps in order, a
/// page at a time (a run polling for a day makes many), with the plugin's log lines if asked.
#[utoipa::path(
    get, path = "/v1/runs/{id}/attempts", tag = "runs",
    summary = "Every call of a run's steps, with log lines on request",
    description = "In order, by step then attempt. A page ends at `limit` attempts or at 4 MiB of \
                   JSON, whichever comes first (an attempt larger than that is a page of its \
                   own); `next_cursor` then continues. Log lines are included with `logs=true` \
                   only.",
    params(("id" = String, Path, description = "The run's id"), AttemptPageQuery),
    responses(
        (status = 200, description = "A page of attempts, in order", body = AttemptListDto),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn runs_attempts(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<AttemptListDto>, ApiError> {
    let query = super::query::parse(raw.as_deref(), ATTEMPTS_QUERY)?;
    let limit = super::query::limit(&query, 100, 1000)?;
    let after = super::query::cursor(&query, |text| {
        let (position, attempt) = text.split_once('.')?;
        Some((position.parse().ok()?, attempt.parse().ok()?))
    })?;
    let logs = super::query::flag(&query, "logs")?.unwrap_or(false);
    let run_id = parse_run_id(&id)?;
    existing_run(&state, &run_id).await?;
    let page = AttemptPage {
        after,
        limit,
        logs,
        bytes: ATTEMPT_PAGE_BYTES,
    };
    let listed = state.store.list_attempts(&run_id, page).await?;
    // The store's budget counts characters; the page's, the bytes of the JSON sent.
    let mut bytes = 0;
    let mut attempts = Vec::with_capacity(listed.attempts.len());
    for record in &listed.attempts {
        let attempt = AttemptDto::new(record);
        bytes += serde_json::to_vec(&attempt).map_or(0, |json| json.len() + 1);
        if !attempts.is_empty() && bytes > ATTEMPT_PAGE_BYTES {
            break;
        }
        attempts.push(attempt);
    }
    let more = listed.more || attempts.len() < listed.attempts.len();
    let next_cursor = listed.attempts[..attempts.len()]
        .last()
        .filter(|_| more)
        .map(|last| format!("{}.{}", last.position, last.attempt));
    Ok(Json(AttemptListDto {
        attempts,
        next_cursor,
    }))
}

/// `GET /v1/runs/{id}/notifications`: what the run's end told the operator's notifiers, with
/// every delivery attempt.
#[utoipa::path(
    get, path = "/v1/runs/{id}/notifications", tag = "runs",
    summary = "A run's notifications and their delivery attempts",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run's notifications, oldest first", body = NotificationListDto),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn runs_notifications(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<NotificationListDto>, ApiError> {
    let run_id = parse_run_id(&id)?;
    existing_run(&state, &run_id).await?;
    let notifications = state.store.list_notifications(&run_id).await?;
    Ok(Json(NotificationListDto {
        notifications: notifications.iter().map(NotificationDto::new).collect(),
    }))
}

/// `POST /v1/runs/{id}/cancel`
#[utoipa::path(
    post, path = "/v1/runs/{id}/cancel", tag = "runs",
    summary = "Cancel a run that has not finished",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run, cancelled", body = RunDto),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run has finished", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn runs_cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RunDto>, ApiError> {
    let run_id = parse_run_id(&id)?;
    if caller.plugins.is_some() {
        let run = existing_run(&state, &run_id).await?;
        caller.require_plugin(run.plugin_name.as_str())?;
    }
    match state
        .store
        .cancel_run(&run_id, now_millis(), &caller.name)
        .await
    {
        Ok(Cancelled::Cancelled(run)) => Ok(Json(RunDto::new(&run, true))),
        Ok(Cancelled::AlreadyFinished(status)) => Err(ApiError::conflict(
            "run_finished",
            format!("run {id} already finished with status {status}"),
        )),
        Err(crate::storage::Error::NotFound) => Err(missing_run(&state, &run_id).await),
        Err(error) => Err(error.into()),
    }
}

/// `GET /v1/runs?plugin=&status=&label=key=value&schedule=&limit=&cursor=`
#[utoipa::path(
    get, path = "/v1/runs", tag = "runs",
    summary = "Runs, newest first",
    params(RunsQuery),
    responses((status = 200, description = "A page of runs, without their steps", body = RunListDto))
)]
pub async fn runs_index(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<RunListDto>, ApiError> {
    let query = super::query::parse(raw.as_deref(), INDEX_QUERY)?;
    let status = status_filter(&query)?;
    let label = match query.get("label") {
        Some(text) => Some(
            text.split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .ok_or_else(|| ApiError::invalid("label", "label must be key=value"))?,
        ),
        None => None,
    };
    let limit = super::query::limit(&query, 50, 500)?;
    let before = super::query::cursor(&query, RunId::parse)?;
    let filter = RunFilter {
        plugin: query.get("plugin").cloned(),
        status,
        label,
        schedule: query.get("schedule").cloned(),
        before,
        limit,
    };
    let runs = state.store.list_runs(&filter).await?;
    let next_cursor = super::query::next_cursor(&runs, limit, |run| run.id.to_string());
    Ok(Json(RunListDto {
        runs: runs.iter().map(|run| RunDto::new(run, false)).collect(),
        next_cursor,
    }))
}
