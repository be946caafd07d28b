//! `/v1/runs`: trigger, show, list, cancel, attempts, recording.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value as Json_;

use super::auth::Caller;
use super::body;
use super::dto::{
    AttemptDto, AttemptListDto, AttemptPageQuery, NotificationDto, NotificationListDto, RunDto,
    RunListDto, RunsQuery, TriggerRunRequest,
};
use super::error::{ApiError, Problem};
use super::state::AppState;
use crate::capabilities::recording;
use crate::model::{PluginName, RunId, now_millis};
use crate::scheduler::planning::plan_run;
use crate::storage::{AttemptPage, Cancelled, Enqueued, RunFilter, RunRecord};

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
    let settings = &state.settings;
    let raw = body::object(body, settings.body_limit_bytes)?;
    let request: TriggerRunRequest = body::typed(&raw, settings)?;
    let (plugin_name, params, mut options) = request.validate(settings)?;
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
    // The request as sent, so that equal requests give equal fingerprints.
    let idempotency_fingerprint = idempotency_key.as_ref().map(|_| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(Json_::Object(raw).to_string()))
    });
    options.idempotency_key = idempotency_key;
    options.idempotency_fingerprint = idempotency_fingerprint;
    options.created_by = Some(caller.name.clone());
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
    let query: AttemptPageQuery = super::query::read(raw.as_deref())?;
    let limit = super::query::limit(query.limit.as_deref(), 100, 1000)?;
    let after = super::query::cursor(query.cursor.as_deref(), |text| {
        let (position, attempt) = text.split_once('.')?;
        Some((position.parse().ok()?, attempt.parse().ok()?))
    })?;
    let logs = super::query::flag(query.logs.as_deref(), "logs")?.unwrap_or(false);
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

/// `GET /v1/runs/{id}/recording`
#[utoipa::path(
    get, path = "/v1/runs/{id}/recording", tag = "runs",
    summary = "A recorded run's capability calls, for `stepwise dev --replay`",
    description = "JSON Lines (README, \"Debugging a failed run\"): the run, then each attempt with \
                   every HTTP request, query, key-value and message read it made and what it \
                   was answered, its log lines and outcome, then how the run ended. Recorded \
                   when the plugin's grant (or the policy) sets `record`.",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The recording", body = String, content_type = "application/x-ndjson"),
        (status = 404, description = "No such run, or it has no recording", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn runs_recording(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let run_id = parse_run_id(&id)?;
    let run = existing_run(&state, &run_id).await?;
    let attempts = state.store.run_recordings(&run_id).await?;
    if attempts.is_empty() {
        return Err(ApiError::not_found(
            "no_recording",
            format!(
                "run {run_id} has no recording: its plugin's `record` was off, it passed with \
                 record = \"failures\", or it has made no call yet"
            ),
        ));
    }
    let header = recording::Header {
        format: recording::FORMAT.into(),
        version: recording::VERSION,
        run_id: run_id.to_string(),
        plugin: run.plugin_name.clone(),
        plugin_version: run.plugin_version.to_string(),
        params: serde_json::from_str(&run.params).unwrap_or(Json_::Null),
        created_at_ms: run.created_at,
    };
    let end = run.status.is_terminal().then(|| recording::RunEnd {
        status: run.status.as_str().to_owned(),
        message: run.message.clone(),
    });
    let text = recording::assemble(header, &attempts, end);
    let disposition = format!("attachment; filename=\"{run_id}.rec\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        text,
    )
        .into_response())
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

/// `GET /v1/runs?plugin=&status=&label=key=value&schedule=&shadow=&limit=&cursor=`
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
    let query: RunsQuery = super::query::read(raw.as_deref())?;
    let status = super::query::run_status(query.status.as_deref())?;
    let label = match &query.label {
        Some(text) => Some(
            text.split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .ok_or_else(|| ApiError::invalid("label", "label must be key=value"))?,
        ),
        None => None,
    };
    let limit = super::query::limit(query.limit.as_deref(), 50, 500)?;
    let before = super::query::cursor(query.cursor.as_deref(), RunId::parse)?;
    let filter = RunFilter {
        plugin: query.plugin,
        status,
        label,
        schedule: query.schedule,
        shadow: super::query::flag(query.shadow.as_deref(), "shadow")?.unwrap_or(false),
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
