//! `/v1/schedules`: recurring triggers that start runs. Create, list, show (with recent
//! fires), patch (pause, resume, edit) and delete.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json_};

use super::auth::Caller;
use super::dto::{ScheduleDto, ScheduleListDto};
use super::error::{ApiError, Problem};
use super::openapi::{NewScheduleRequest, ScheduleChangeRequest, SchedulesQuery};
use super::runs::{optional_millis, parse_labels, read_json_object};
use super::state::AppState;
use crate::model::{PluginName, TriggerSpec, UnixMillis, now_millis};
use crate::scheduler::planning::check_params;
use crate::scheduler::schedules::due_time;
use crate::scheduler::trigger::Trigger;
use crate::storage::{ScheduleFilter, ScheduleOptions, ScheduleRecord};

pub(super) const KNOWN_FIELDS: &[&str] = &[
    "plugin",
    "params",
    "trigger",
    "misfire_grace_ms",
    "coalesce",
    "max_concurrent_runs",
    "paused",
    "labels",
    "poll_interval_ms",
    "timeout_ms",
];
/// The query parameters of `GET /v1/schedules`.
pub(super) const INDEX_QUERY: &[&str] = &["plugin", "paused", "limit", "cursor"];
/// Fires shown with a schedule.
const RECENT_FIRES: u32 = 20;
/// APScheduler's defaults: a fire more than a second late is missed, backlogs coalesce, one
/// run at a time.
const DEFAULT_MISFIRE_GRACE_MS: i64 = 1_000;
const DEFAULT_MAX_CONCURRENT_RUNS: u32 = 1;

/// `POST /v1/schedules`
#[utoipa::path(
    post, path = "/v1/schedules", tag = "schedules",
    summary = "Create a schedule",
    request_body = NewScheduleRequest,
    responses(
        (status = 201, description = "The schedule, with its first fire time", body = ScheduleDto,
            headers(("Location" = String, description = "`/v1/schedules/{id}`"))),
        (status = 404, description = "No such plugin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn schedules_create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = set_fields(read_json_object(
        body,
        KNOWN_FIELDS,
        state.settings.body_limit_bytes,
    )?);
    let plugin_name = match request.get("plugin") {
        Some(Json_::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::invalid("plugin", "plugin must be a string")),
        None => return Err(ApiError::invalid("plugin", "plugin is required")),
    };
    // Whether the plugin exists is checked with the params, in `apply_fields`.
    PluginName::parse(&plugin_name).map_err(|message| ApiError::invalid("plugin", message))?;
    caller.require_plugin(&plugin_name)?;
    if !request.contains_key("trigger") {
        return Err(ApiError::invalid("trigger", "trigger is required"));
    }
    let now = now_millis();
    let mut schedule = ScheduleRecord {
        id: uuid::Uuid::now_v7().to_string(),
        plugin_name,
        params: "{}".into(),
        labels: Default::default(),
        poll_interval_ms: None,
        timeout_ms: None,
        trigger: TriggerSpec::At { at: now },
        options: ScheduleOptions {
            misfire_grace_ms: Some(DEFAULT_MISFIRE_GRACE_MS),
            coalesce: true,
            max_concurrent_runs: DEFAULT_MAX_CONCURRENT_RUNS,
            paused: false,
        },
        next_fire_at: None,
        next_due_at: None,
        created_at: now,
        updated_at: now,
        created_by: Some(caller.name.clone()),
    };
    apply_fields(&state, &mut schedule, &request, now, true).await?;
    state.store.insert_schedule(&schedule).await?;
    tracing::info!(schedule = %schedule.id, plugin = %schedule.plugin_name, actor = %caller.name, "schedule created");
    state.schedule_wakeup.wake();
    let location = format!("/v1/schedules/{}", schedule.id);
    let body = ScheduleDto::new(&schedule, None);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

/// `GET /v1/schedules?plugin=&paused=&limit=&cursor=`: oldest first, a page at a time.
#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules",
    summary = "Schedules",
    params(SchedulesQuery),
    responses((status = 200, description = "A page of the schedules that match, oldest first", body = ScheduleListDto))
)]
pub async fn schedules_index(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ScheduleListDto>, ApiError> {
    let query = super::query::parse(raw.as_deref(), INDEX_QUERY)?;
    let paused = super::query::flag(&query, "paused")?;
    let limit = super::query::limit(&query, 100, 1000)?;
    // Schedule ids are UUIDs, which sort by creation time.
    let after = super::query::cursor(&query, |text| {
        uuid::Uuid::parse_str(text).ok().map(|_| text.to_owned())
    })?;
    let filter = ScheduleFilter {
        plugin: query.get("plugin").cloned(),
        paused,
    };
    let schedules = state
        .store
        .list_schedules(&filter, after.as_deref(), limit)
        .await?;
    let next_cursor = super::query::next_cursor(&schedules, limit, |last| last.id.clone());
    Ok(Json(ScheduleListDto {
        schedules: schedules
            .iter()
            .map(|schedule| ScheduleDto::new(schedule, None))
            .collect(),
        next_cursor,
    }))
}

/// `GET /v1/schedules/{id}`: with its recent fires, newest first.
#[utoipa::path(
    get, path = "/v1/schedules/{id}", tag = "schedules",
    summary = "A schedule with its recent fires",
    params(("id" = String, Path, description = "The schedule's id")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleDto),
        (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn schedules_show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ScheduleDto>, ApiError> {
    let schedule = find(&state, &id).await?;
    let fires = state.store.recent_fires(&schedule.id, RECENT_FIRES).await?;
    Ok(Json(ScheduleDto::new(&schedule, Some(&fires))))
}

/// `PATCH /v1/schedules/{id}`: any field of the create request but `plugin`. Resuming, or
/// changing the trigger, computes the next fire from now: fires that fell in a pause are not
/// made up for.
#[utoipa::path(
    patch, path = "/v1/schedules/{id}", tag = "schedules",
    summary = "Pause, resume or edit a schedule",
    params(("id" = String, Path, description = "The schedule's id")),
    request_body = ScheduleChangeRequest,
    responses(
        (status = 200, description = "The schedule as changed", body = ScheduleDto),
        (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn schedules_update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ScheduleDto>, ApiError> {
    let mut schedule = find(&state, &id).await?;
    caller.require_plugin(&schedule.plugin_name)?;
    let request = set_fields(read_json_object(
        body,
        KNOWN_FIELDS,
        state.settings.body_limit_bytes,
    )?);
    if let Some(plugin) = request.get("plugin")
        && plugin.as_str() != Some(schedule.plugin_name.as_str())
    {
        return Err(ApiError::invalid(
            "plugin",
            "a schedule's plugin cannot change; create a new schedule",
        ));
    }
    let now = now_millis();
    apply_fields(&state, &mut schedule, &request, now, false).await?;
    schedule.updated_at = now;
    state.store.update_schedule(&schedule).await?;
    tracing::info!(schedule = %schedule.id, paused = schedule.options.paused, actor = %caller.name, "schedule changed");
    state.schedule_wakeup.wake();
    let fires = state.store.recent_fires(&schedule.id, RECENT_FIRES).await?;
    Ok(Json(ScheduleDto::new(&schedule, Some(&fires))))
}

/// `DELETE /v1/schedules/{id}`: no more fires; runs it started are kept.
#[utoipa::path(
    delete, path = "/v1/schedules/{id}", tag = "schedules",
    summary = "Delete a schedule; the runs it started are kept",
    params(("id" = String, Path, description = "The schedule's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such schedule", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn schedules_delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if caller.plugins.is_some() {
        caller.require_plugin(&find(&state, &id).await?.plugin_name)?;
    }
    if state.store.delete_schedule(&id).await? {
        tracing::info!(schedule = %id, actor = %caller.name, "schedule deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&id))
    }
}

async fn find(state: &AppState, id: &str) -> Result<ScheduleRecord, ApiError> {
    state
        .store
        .find_schedule(id)
        .await?
        .ok_or_else(|| not_found(id))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("schedule_not_found", format!("no schedule with id {id:?}"))
}

/// Applies the fields present in `request` to `schedule` and validates the result; computes
/// the next fire when the trigger is new or the schedule resumes.
async fn apply_fields(
    state: &AppState,
    schedule: &mut ScheduleRecord,
    request: &Map<String, Json_>,
    now: UnixMillis,
    creating: bool,
) -> Result<(), ApiError> {
    let was_paused = schedule.options.paused;
    if let Some(params) = request.get("params") {
        if !params.is_object() {
            return Err(ApiError::invalid("params", "params must be a JSON object"));
        }
        schedule.params = params.to_string();
    }
    if let Some(labels) = request.get("labels") {
        schedule.labels = parse_labels(Some(labels))?;
    }
    let settings = &state.settings;
    if request.contains_key("poll_interval_ms") {
        schedule.poll_interval_ms = optional_millis(
            request,
            "poll_interval_ms",
            settings.min_poll_interval,
            settings.max_poll_interval,
        )?
        .map(|interval| interval.as_millis() as i64);
    }
    if request.contains_key("timeout_ms") {
        schedule.timeout_ms = optional_millis(
            request,
            "timeout_ms",
            Duration::from_millis(1),
            settings.max_run_timeout,
        )?
        .map(|timeout| timeout.as_millis() as i64);
    }
    match request.get("misfire_grace_ms") {
        None => {}
        Some(Json_::Null) => schedule.options.misfire_grace_ms = None,
        Some(value) => {
            schedule.options.misfire_grace_ms =
                Some(value.as_i64().filter(|grace| *grace >= 0).ok_or_else(|| {
                    ApiError::invalid(
                        "misfire_grace_ms",
                        "misfire_grace_ms must be a non-negative integer, or null for no limit",
                    )
                })?);
        }
    }
    if let Some(value) = request.get("coalesce") {
        schedule.options.coalesce = value
            .as_bool()
            .ok_or_else(|| ApiError::invalid("coalesce", "coalesce must be true or false"))?;
    }
    if let Some(value) = request.get("max_concurrent_runs") {
        schedule.options.max_concurrent_runs = value
            .as_u64()
            .filter(|max| (1..=10_000).contains(max))
            .ok_or_else(|| {
                ApiError::invalid(
                    "max_concurrent_runs",
                    "max_concurrent_runs must be an integer from 1 to 10000",
                )
            })? as u32;
    }
    if let Some(value) = request.get("paused") {
        schedule.options.paused = value
            .as_bool()
            .ok_or_else(|| ApiError::invalid("paused", "paused must be true or false"))?;
    }
    let new_trigger = match request.get("trigger") {
        Some(trigger) => Some(parse_trigger(trigger)?),
        None => None,
    };
    if let Some(spec) = &new_trigger {
        schedule.trigger = spec.clone();
    }
    let trigger = Trigger::new(&schedule.trigger, now)
        .map_err(|invalid| ApiError::invalid(invalid.field, invalid.message))?;
    if let TriggerSpec::Interval {
        start_at: None,
        interval_ms,
        jitter_ms,
        end_at,
    } = schedule.trigger
    {
        // Pin the default start, so that later fires count from creation, not from each edit.
        schedule.trigger = TriggerSpec::Interval {
            interval_ms,
            jitter_ms,
            start_at: Some(now + interval_ms),
            end_at,
        };
    }

    let plugin = state
        .store
        .find_plugin(&schedule.plugin_name)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "plugin_not_found",
                format!("no plugin named {:?}", schedule.plugin_name),
            )
            .with_field("plugin")
        })?;
    if let Some(schema) = &plugin.check_info.params_schema {
        let params: Json_ = serde_json::from_str(&schedule.params).unwrap_or(Json_::Null);
        check_params(schema, &params, schedule.params.len()).await?;
    }

    let resumed = was_paused && !schedule.options.paused;
    if creating || new_trigger.is_some() || resumed {
        let first = trigger.first_from(now);
        if creating || new_trigger.is_some() {
            match (&schedule.trigger, first) {
                // Earlier than its misfire grace allows, the one fire would only be missed.
                (TriggerSpec::At { at }, _)
                    if schedule
                        .options
                        .misfire_grace_ms
                        .is_some_and(|grace| *at < now - grace) =>
                {
                    return Err(ApiError::invalid(
                        "trigger.at",
                        "at is in the past, beyond misfire_grace_ms: the one fire would only be missed; give a time in the future",
                    ));
                }
                (TriggerSpec::Cron { expr, .. }, None) => {
                    return Err(ApiError::invalid(
                        "trigger.cron",
                        format!(
                            "the cron expression {expr:?} never fires (a date that does not exist, such as 30 February?)"
                        ),
                    ));
                }
                (TriggerSpec::Interval { .. }, None) => {
                    return Err(ApiError::invalid(
                        "trigger.end_at",
                        "end_at is before the first fire: this schedule would never fire",
                    ));
                }
                _ => {}
            }
        }
        schedule.next_fire_at = first;
        schedule.next_due_at = schedule
            .next_fire_at
            .map(|fire_at| due_time(&trigger, fire_at));
    }
    Ok(())
}

/// `{"cron": "...", "timezone"?: "..."}`, `{"interval_ms": n, "jitter_ms"?, "start_at"?,
/// "end_at"?}` or `{"at": "<RFC 3339>"}`.
fn parse_trigger(value: &Json_) -> Result<TriggerSpec, ApiError> {
    let Some(trigger) = value.as_object() else {
        return Err(ApiError::invalid("trigger", "trigger must be an object"));
    };
    let trigger: Map<String, Json_> = trigger
        .iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let trigger = &trigger;
    let kinds = ["cron", "interval_ms", "at"]
        .iter()
        .filter(|kind| trigger.contains_key(**kind))
        .count();
    if kinds != 1 {
        return Err(ApiError::invalid(
            "trigger",
            "trigger must have exactly one of cron, interval_ms or at",
        ));
    }
    let allowed: &[&str] = if trigger.contains_key("cron") {
        &["cron", "timezone"]
    } else if trigger.contains_key("interval_ms") {
        &["interval_ms", "jitter_ms", "start_at", "end_at"]
    } else {
        &["at"]
    };
    if let Some(unknown) = trigger.keys().find(|key| !allowed.contains(&key.as_str())) {
        return Err(ApiError::invalid(
            format!("trigger.{unknown}"),
            format!(
                "unknown field {unknown:?} for this trigger; known fields: {}",
                allowed.join(", ")
            ),
        ));
    }
    if let Some(expr) = trigger.get("cron") {
        let expr = expr
            .as_str()
            .ok_or_else(|| ApiError::invalid("trigger.cron", "cron must be a string"))?;
        let timezone = match trigger.get("timezone") {
            None => "UTC",
            Some(zone) => zone.as_str().ok_or_else(|| {
                ApiError::invalid("trigger.timezone", "timezone must be a string")
            })?,
        };
        return Ok(TriggerSpec::Cron {
            expr: expr.to_owned(),
            timezone: timezone.to_owned(),
        });
    }
    if let Some(interval) = trigger.get("interval_ms") {
        let interval_ms = interval.as_i64().ok_or_else(|| {
            ApiError::invalid("trigger.interval_ms", "interval_ms must be an integer")
        })?;
        let jitter_ms = match trigger.get("jitter_ms") {
            None => 0,
            Some(jitter) => jitter
                .as_i64()
                .filter(|jitter| *jitter >= 0)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "trigger.jitter_ms",
                        "jitter_ms must be a non-negative integer",
                    )
                })?,
        };
        return Ok(TriggerSpec::Interval {
            interval_ms,
            jitter_ms,
            start_at: optional_time(trigger, "start_at")?,
            end_at: optional_time(trigger, "end_at")?,
        });
    }
    let at = optional_time(trigger, "at")?
        .ok_or_else(|| ApiError::invalid("trigger.at", "at must be an RFC 3339 time"))?;
    Ok(TriggerSpec::At { at })
}

/// The fields that are set: `null` means "not set", as everywhere in the API, but for
/// `misfire_grace_ms`, where it means "no limit".
fn set_fields(request: Map<String, Json_>) -> Map<String, Json_> {
    request
        .into_iter()
        .filter(|(name, value)| !value.is_null() || name == "misfire_grace_ms")
        .collect()
}

fn optional_time(
    trigger: &Map<String, Json_>,
    field: &'static str,
) -> Result<Option<UnixMillis>, ApiError> {
    let Some(value) = trigger.get(field) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::invalid(
            format!("trigger.{field}"),
            format!("{field} must be an RFC 3339 time, e.g. 2026-12-01T02:30:00Z"),
        )
    };
    let text = value.as_str().ok_or_else(invalid)?;
    let time = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| invalid())?;
    Ok(Some(time.timestamp_millis()))
}
