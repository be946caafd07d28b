//! `/v1/schedules`: recurring triggers that start runs. Create, list, show (with recent
//! fires), patch (pause, resume, edit) and delete.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value as Json_;

use super::auth::Caller;
use super::body;
use super::dto::{
    NewScheduleRequest, ScheduleChangeRequest, ScheduleDto, ScheduleListDto, SchedulesQuery,
    TriggerRequest,
};
use super::error::{ApiError, Problem};
use super::state::AppState;
use crate::model::{PluginName, TriggerSpec, UnixMillis, now_millis};
use crate::scheduler::planning::check_params;
use crate::scheduler::schedules::due_time;
use crate::scheduler::trigger::Trigger;
use crate::storage::{ScheduleFilter, ScheduleOptions, ScheduleRecord};

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
    let request: NewScheduleRequest = body::typed(
        &body::object(body, state.settings.body_limit_bytes)?,
        &state.settings,
    )?;
    let plugin_name = request
        .plugin
        .clone()
        .ok_or_else(|| ApiError::invalid("plugin", "plugin is required"))?;
    // Whether the plugin exists is checked with the params, in `apply_fields`.
    PluginName::parse(&plugin_name).map_err(|message| ApiError::invalid("plugin", message))?;
    caller.require_plugin(&plugin_name)?;
    if request.trigger.is_none() {
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
    apply_fields(&state, &mut schedule, request, now, true).await?;
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
    let query: SchedulesQuery = super::query::read(raw.as_deref())?;
    let paused = super::query::flag(query.paused.as_deref(), "paused")?;
    let limit = super::query::limit(query.limit.as_deref(), 100, 1000)?;
    // Schedule ids are UUIDs, which sort by creation time.
    let after = super::query::cursor(query.cursor.as_deref(), |text| {
        uuid::Uuid::parse_str(text).ok().map(|_| text.to_owned())
    })?;
    let filter = ScheduleFilter {
        plugin: query.plugin,
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
    let request: NewScheduleRequest = body::typed(
        &body::object(body, state.settings.body_limit_bytes)?,
        &state.settings,
    )?;
    if let Some(plugin) = &request.plugin
        && *plugin != schedule.plugin_name
    {
        return Err(ApiError::invalid(
            "plugin",
            "a schedule's plugin cannot change; create a new schedule",
        ));
    }
    let now = now_millis();
    apply_fields(&state, &mut schedule, request, now, false).await?;
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
    request: NewScheduleRequest,
    now: UnixMillis,
    creating: bool,
) -> Result<(), ApiError> {
    request.validate(&state.settings)?;
    let was_paused = schedule.options.paused;
    if let Some(params) = request.params {
        schedule.params = Json_::Object(params).to_string();
    }
    if let Some(labels) = request.labels {
        schedule.labels = labels;
    }
    let millis = |millis: u64| millis as i64;
    if request.poll_interval_ms.is_some() {
        schedule.poll_interval_ms = request.poll_interval_ms.map(millis);
    }
    if request.timeout_ms.is_some() {
        schedule.timeout_ms = request.timeout_ms.map(millis);
    }
    if let Some(grace) = request.misfire_grace_ms {
        schedule.options.misfire_grace_ms = grace;
    }
    if let Some(coalesce) = request.coalesce {
        schedule.options.coalesce = coalesce;
    }
    if let Some(max) = request.max_concurrent_runs {
        schedule.options.max_concurrent_runs = max;
    }
    if let Some(paused) = request.paused {
        schedule.options.paused = paused;
    }
    let new_trigger = request.trigger.map(trigger_spec).transpose()?;
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

/// The one form `trigger` gives, with only that form's fields.
fn trigger_spec(trigger: TriggerRequest) -> Result<TriggerSpec, ApiError> {
    let given = |field: &str| match field {
        "cron" => trigger.cron.is_some(),
        "timezone" => trigger.timezone.is_some(),
        "interval_ms" => trigger.interval_ms.is_some(),
        "jitter_ms" => trigger.jitter_ms.is_some(),
        "start_at" => trigger.start_at.is_some(),
        "end_at" => trigger.end_at.is_some(),
        _ => trigger.at.is_some(),
    };
    let forms: Vec<_> = TriggerRequest::FORMS
        .iter()
        .filter(|(kind, _)| given(kind))
        .collect();
    let [(_, allowed)] = forms[..] else {
        return Err(ApiError::invalid(
            "trigger",
            "trigger must have exactly one of cron, interval_ms or at",
        ));
    };
    let others = TriggerRequest::FORMS
        .iter()
        .flat_map(|(_, fields)| fields.iter())
        .filter(|field| !allowed.contains(field));
    if let Some(unknown) = others.into_iter().find(|field| given(field)) {
        return Err(ApiError::invalid(
            format!("trigger.{unknown}"),
            format!(
                "unknown field {unknown:?} for this trigger; known fields: {}",
                allowed.join(", ")
            ),
        ));
    }
    let time = |field: &str, text: Option<String>| {
        text.map(|text| {
            chrono::DateTime::parse_from_rfc3339(&text)
                .map(|time| time.timestamp_millis())
                .map_err(|_| TriggerRequest::time_problem(field))
        })
        .transpose()
    };
    if let Some(expr) = trigger.cron {
        return Ok(TriggerSpec::Cron {
            expr,
            timezone: trigger.timezone.unwrap_or_else(|| "UTC".to_owned()),
        });
    }
    if let Some(interval_ms) = trigger.interval_ms {
        return Ok(TriggerSpec::Interval {
            interval_ms,
            jitter_ms: match trigger.jitter_ms.unwrap_or(0) {
                jitter if jitter < 0 => return Err(TriggerRequest::jitter_problem()),
                jitter => jitter,
            },
            start_at: time("start_at", trigger.start_at)?,
            end_at: time("end_at", trigger.end_at)?,
        });
    }
    let at = time("at", trigger.at)?.ok_or_else(|| TriggerRequest::time_problem("at"))?;
    Ok(TriggerSpec::At { at })
}
