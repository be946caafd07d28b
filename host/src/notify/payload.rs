//! The run as a `json` notification carries it. It has the fields, in the order and form, of
//! `GET /v1/runs/{id}` (the notify tests compare the two), but is its own type: a receiver's
//! contract changes only when this file does, never as a side effect of the API's.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value as Json;

use crate::model::rfc3339;
use crate::storage::{RunRecord, StepRecord};

#[derive(Serialize)]
pub(super) struct RunPayload {
    id: String,
    plugin: String,
    plugin_version: String,
    status: &'static str,
    message: Option<String>,
    params: Json,
    labels: BTreeMap<String, String>,
    poll_interval_ms: i64,
    max_errors: u32,
    error_count: u32,
    http_requests: u32,
    recording_bytes: u64,
    schedule_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancelled_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow_of: Option<String>,
    retry: Option<RetryPayload>,
    current_step: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    deadline_at: String,
    next_tick_at: Option<String>,
    node: Option<String>,
    steps: Vec<StepPayload>,
}

#[derive(Serialize)]
struct RetryPayload {
    initial_ms: u64,
    factor: f64,
    max_ms: u64,
}

#[derive(Serialize)]
struct StepPayload {
    name: String,
    status: &'static str,
    attempts: u32,
    message: Option<String>,
    output: Option<Json>,
    timeout_ms: Option<i64>,
    first_attempt_at: Option<String>,
    last_attempt_at: Option<String>,
    finished_at: Option<String>,
    passed_after_ms: Option<i64>,
}

/// JSON text the store wrote; text that does not parse shows as `null`.
fn stored_json(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or(Json::Null)
}

impl RunPayload {
    pub(super) fn new(run: &RunRecord) -> RunPayload {
        RunPayload {
            id: run.id.to_string(),
            plugin: run.plugin_name.clone(),
            plugin_version: run.plugin_version.to_string(),
            status: run.status.as_str(),
            message: run.message.clone(),
            params: stored_json(&run.params),
            labels: run.labels.clone(),
            poll_interval_ms: run.poll_interval_ms,
            max_errors: run.max_errors,
            error_count: run.error_count,
            http_requests: run.http_requests,
            recording_bytes: run.recording_bytes,
            schedule_id: run.schedule_id.clone(),
            created_by: run.created_by.clone(),
            cancelled_by: run.cancelled_by.clone(),
            shadow_of: run.shadow_of.as_ref().map(ToString::to_string),
            retry: run.retry.map(|retry| RetryPayload {
                initial_ms: retry.initial.as_millis() as u64,
                factor: retry.factor,
                max_ms: retry.max.as_millis() as u64,
            }),
            current_step: run
                .steps
                .get(run.current_step)
                .map(|step| step.name.clone())
                .or_else(|| run.current_step_name.clone()),
            created_at: rfc3339(run.created_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: run.finished_at.map(rfc3339),
            deadline_at: rfc3339(run.deadline_at),
            next_tick_at: run.next_tick_at.map(rfc3339),
            node: run.lease_owner.clone(),
            steps: run.steps.iter().map(StepPayload::new).collect(),
        }
    }
}

impl StepPayload {
    fn new(step: &StepRecord) -> StepPayload {
        StepPayload {
            name: step.name.clone(),
            status: step.status.as_str(),
            attempts: step.attempts,
            message: step.message.clone(),
            output: step.output.as_deref().map(stored_json),
            timeout_ms: step.timeout_ms,
            first_attempt_at: step.first_attempt_at.map(rfc3339),
            last_attempt_at: step.last_attempt_at.map(rfc3339),
            finished_at: step.finished_at.map(rfc3339),
            passed_after_ms: step.passed_after_ms,
        }
    }
}
