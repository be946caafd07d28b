//! The request bodies and query strings: each type both describes its request in the OpenAPI
//! document and is what the handler reads it into (`body::typed`, `query::read`). `null` in a
//! body means "not set", as absent does, but where a field says otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value as Json};
use utoipa::{IntoParams, ToSchema};

use super::super::body::{self, Millis, Request};
use super::super::error::ApiError;
use crate::config::Settings;
use crate::registry::Mode;
use crate::scheduler::planning::RunOptions;

/// `POST /v1/runs`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"plugin": "event-pipeline", "params": {"event_id": "evt-1"}, "labels": {"env": "staging"}}))]
pub struct TriggerRunRequest {
    /// The plugin to run, by name.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub plugin: String,
    /// The run's params, checked against the plugin's `params_schema`.
    #[schema(value_type = Option<Object>)]
    pub params: Option<Map<String, Json>>,
    /// How long to wait between calls of a pending step; the grant's or the host's default
    /// when absent.
    // `Settings`' min_ and max_poll_interval, and max_run_timeout below: utoipa takes
    // literals only.
    #[schema(minimum = 50, maximum = 3_600_000)]
    pub poll_interval_ms: Option<u64>,
    /// The run's deadline from its creation; the host's default when absent.
    #[schema(minimum = 1, maximum = 604_800_000)]
    pub timeout_ms: Option<u64>,
    /// How long each named step may stay pending, in milliseconds, over the grant's
    /// `[steps.NAME] timeout_ms`, the plugin's own and the host's `default_step_timeout_ms`.
    pub step_timeouts: Option<BTreeMap<String, u64>>,
    /// The wait before calling a step again after an errored attempt, over the grant's
    /// `retry`; without either, the poll interval.
    #[schema(value_type = Option<crate::grant::RetryFile>)]
    pub retry: Option<Json>,
    /// At most 32 labels; keys of 1 to 63 bytes without `=`, values of at most 256 bytes.
    pub labels: Option<BTreeMap<String, String>>,
}

impl TriggerRunRequest {
    /// The plugin's name, the params and the run's options, each within its range: every
    /// check a trigger's body needs before the plugin is looked up.
    pub fn validate(self, settings: &Settings) -> Result<(String, Json, RunOptions), ApiError> {
        let step_timeouts = self
            .step_timeouts
            .unwrap_or_default()
            .into_iter()
            .map(|(name, ms)| {
                let ms = Duration::from_millis(ms);
                if ms.is_zero() || ms > settings.max_run_timeout {
                    return Err(Self::step_timeout(
                        format!("step_timeouts.{name}"),
                        settings,
                    ));
                }
                Ok((name, ms))
            })
            .collect::<Result<_, _>>()?;
        let retry = match &self.retry {
            None | Some(Json::Null) => None,
            Some(retry) => Some(
                crate::grant::parse_retry_json(retry)
                    .map_err(|error| ApiError::invalid("retry", format!("{error:#}")))?,
            ),
        };
        if let Some(labels) = &self.labels {
            body::check_labels(labels)?;
        }
        let options = RunOptions {
            poll_interval: Millis::poll_interval(settings).check(self.poll_interval_ms)?,
            timeout: Millis::timeout(settings).check(self.timeout_ms)?,
            step_timeouts,
            retry,
            labels: self.labels.unwrap_or_default(),
            idempotency_key: None,
            idempotency_fingerprint: None,
            schedule_id: None,
            created_by: None,
        };
        let params = Json::Object(self.params.unwrap_or_default());
        Ok((self.plugin, params, options))
    }

    /// A step's budget, from 1 ms to the longest run.
    pub fn step_timeout(field: String, settings: &Settings) -> ApiError {
        ApiError::invalid(
            field,
            format!(
                "a step timeout must be an integer from 1 to {}",
                settings.max_run_timeout.as_millis()
            ),
        )
    }
}

impl Request for TriggerRunRequest {
    fn problem(path: &str, settings: &Settings) -> Option<ApiError> {
        if path == "step_timeouts" {
            return Some(ApiError::invalid(
                path,
                "step_timeouts must be an object of step names and milliseconds",
            ));
        }
        if path.starts_with("step_timeouts.") {
            return Some(Self::step_timeout(path.to_owned(), settings));
        }
        body::plugin_type(path)
            .or_else(|| body::params_type(path))
            .or_else(|| Millis::poll_interval(settings).problem_at(path))
            .or_else(|| Millis::timeout(settings).problem_at(path))
            .or_else(|| body::labels_type(path))
    }
}

// `PATCH /v1/schedules/{id}` is read into this type too: any of its fields, none required
// (`ScheduleChangeRequest` is its schema).
/// `POST /v1/schedules`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"plugin": "event-pipeline", "params": {"event_id": "evt-1"}, "trigger": {"interval_ms": 60000}}))]
pub struct NewScheduleRequest {
    /// The plugin each fire runs, by name.
    #[schema(value_type = String, required = true, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub plugin: Option<String>,
    /// The params of each run, checked against the plugin's `params_schema`.
    #[schema(value_type = Option<Object>)]
    pub params: Option<Map<String, Json>>,
    #[schema(value_type = TriggerRequest, required = true)]
    pub trigger: Option<TriggerRequest>,
    /// How late a fire may start before it counts as missed; `null` for no limit (default
    /// 1000).
    #[serde(default, deserialize_with = "body::present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    pub misfire_grace_ms: Option<Option<i64>>,
    /// Fold a backlog of missed fires into one (default true).
    pub coalesce: Option<bool>,
    /// Runs of this schedule that may be unfinished at once, 1 to 10000 (default 1).
    #[schema(minimum = 1, maximum = 10000)]
    pub max_concurrent_runs: Option<u32>,
    pub paused: Option<bool>,
    pub labels: Option<BTreeMap<String, String>>,
    #[schema(minimum = 50, maximum = 3_600_000)]
    pub poll_interval_ms: Option<u64>,
    #[schema(minimum = 1, maximum = 604_800_000)]
    pub timeout_ms: Option<u64>,
}

impl NewScheduleRequest {
    /// Most unfinished runs of one schedule.
    pub const MAX_CONCURRENT_RUNS: u32 = 10_000;

    /// Every range the fields given must be within (a trigger's are checked as it is read).
    pub fn validate(&self, settings: &Settings) -> Result<(), ApiError> {
        Millis::poll_interval(settings).check(self.poll_interval_ms)?;
        Millis::timeout(settings).check(self.timeout_ms)?;
        if let Some(labels) = &self.labels {
            body::check_labels(labels)?;
        }
        if self
            .misfire_grace_ms
            .flatten()
            .is_some_and(|grace| grace < 0)
        {
            return Err(Self::problem("misfire_grace_ms", settings).expect("a rule"));
        }
        if self
            .max_concurrent_runs
            .is_some_and(|max| !(1..=Self::MAX_CONCURRENT_RUNS).contains(&max))
        {
            return Err(Self::max_concurrent_runs_problem());
        }
        Ok(())
    }

    fn max_concurrent_runs_problem() -> ApiError {
        ApiError::invalid(
            "max_concurrent_runs",
            format!(
                "max_concurrent_runs must be an integer from 1 to {}",
                Self::MAX_CONCURRENT_RUNS
            ),
        )
    }
}

impl Request for NewScheduleRequest {
    fn problem(path: &str, settings: &Settings) -> Option<ApiError> {
        let rule = match path {
            "misfire_grace_ms" => {
                "misfire_grace_ms must be a non-negative integer, or null for no limit"
            }
            "coalesce" => "coalesce must be true or false",
            "paused" => "paused must be true or false",
            "trigger" => "trigger must be an object",
            "max_concurrent_runs" => return Some(Self::max_concurrent_runs_problem()),
            _ => {
                return TriggerRequest::problem(path)
                    .or_else(|| body::plugin_type(path))
                    .or_else(|| body::params_type(path))
                    .or_else(|| Millis::poll_interval(settings).problem_at(path))
                    .or_else(|| Millis::timeout(settings).problem_at(path))
                    .or_else(|| body::labels_type(path));
            }
        };
        Some(ApiError::invalid(path, rule))
    }
}

/// `PATCH /v1/schedules/{id}`: any field of [`NewScheduleRequest`], none required; `plugin`
/// may be given only unchanged, `paused: false` resumes from now without making up for the
/// fires of the pause. Read as a [`NewScheduleRequest`]; only its schema differs.
pub struct ScheduleChangeRequest;

impl utoipa::PartialSchema for ScheduleChangeRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::Schema;
        let RefOr::T(Schema::Object(mut fields)) = NewScheduleRequest::schema() else {
            unreachable!("NewScheduleRequest is an object")
        };
        fields.required.clear();
        fields.description = Some(
            "Any field of NewScheduleRequest, to change it; `plugin` only unchanged. \
             `paused: false` resumes from now, without making up for the fires of the pause."
                .to_owned(),
        );
        fields.into()
    }
}

impl ToSchema for ScheduleChangeRequest {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        NewScheduleRequest::schemas(schemas);
    }
}

/// Exactly one of three forms: `cron` (with `timezone`), `interval_ms` (with `jitter_ms`,
/// `start_at` and `end_at`), or `at`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// A cron expression with seconds, e.g. `0 30 2 * * *`.
    pub cron: Option<String>,
    /// The cron expression's IANA zone (default UTC).
    pub timezone: Option<String>,
    /// Every `interval_ms`, each fire moved by up to `jitter_ms`, between the optional bounds.
    // `scheduler::trigger`'s MIN_ and MAX_INTERVAL_MS: utoipa takes literals only.
    #[schema(minimum = 100, maximum = 316_224_000_000_i64)]
    pub interval_ms: Option<i64>,
    #[schema(minimum = 0)]
    pub jitter_ms: Option<i64>,
    #[schema(format = DateTime)]
    pub start_at: Option<String>,
    #[schema(format = DateTime)]
    pub end_at: Option<String>,
    /// Once, at an RFC 3339 time.
    #[schema(format = DateTime)]
    pub at: Option<String>,
}

impl TriggerRequest {
    /// The fields each form may have, by the field that names the form.
    pub const FORMS: [(&'static str, &'static [&'static str]); 3] = [
        ("cron", &["cron", "timezone"]),
        (
            "interval_ms",
            &["interval_ms", "jitter_ms", "start_at", "end_at"],
        ),
        ("at", &["at"]),
    ];

    /// `jitter_ms`'s words.
    pub fn jitter_problem() -> ApiError {
        ApiError::invalid(
            "trigger.jitter_ms",
            "jitter_ms must be a non-negative integer",
        )
    }

    /// An RFC 3339 time's words, for `trigger.<field>`.
    pub fn time_problem(field: &str) -> ApiError {
        ApiError::invalid(
            format!("trigger.{field}"),
            format!("{field} must be an RFC 3339 time, e.g. 2026-12-01T02:30:00Z"),
        )
    }

    fn problem(path: &str) -> Option<ApiError> {
        let field = path.strip_prefix("trigger.")?;
        let rule = match field {
            "cron" => "cron must be a string",
            "timezone" => "timezone must be a string",
            "interval_ms" => "interval_ms must be an integer",
            "jitter_ms" => return Some(Self::jitter_problem()),
            "start_at" | "end_at" | "at" => return Some(Self::time_problem(field)),
            _ => return None,
        };
        Some(ApiError::invalid(path, rule))
    }
}

/// `POST /v1/plugins/{name}/activate`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    /// A kept version: the SHA-256 of its bytes, in lowercase hex.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub version: String,
    /// `active` (default): new runs use it. `shadow`: it runs beside the active version on
    /// every new run and decides nothing (`GET /v1/plugins/{name}/shadow` compares them).
    #[schema(schema_with = super::activation_mode)]
    pub mode: Option<String>,
}

impl Request for ActivateRequest {
    fn problem(path: &str, _: &Settings) -> Option<ApiError> {
        match path {
            "version" => Some(ApiError::invalid(path, "version must be a string")),
            "mode" => Some(ApiError::invalid(path, MODE_RULE)),
            _ => None,
        }
    }
}

const MODE_RULE: &str = "mode must be \"active\" or \"shadow\"";

/// An upload's or activation's `mode`.
pub fn parse_mode(mode: Option<&str>) -> Result<Mode, ApiError> {
    match mode {
        None | Some("active") => Ok(Mode::Active),
        Some("shadow") => Ok(Mode::Shadow),
        Some(_) => Err(ApiError::invalid("mode", MODE_RULE)),
    }
}

/// `PUT /v1/plugins/{name}`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// `active` (default), or `shadow`: the new version runs beside the active one and
    /// decides nothing, until it is promoted or dropped.
    #[param(schema_with = super::activation_mode)]
    pub mode: Option<String>,
}

/// `POST /v1/tokens`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"role": "viewer", "name": "grafana"}))]
pub struct NewTokenRequest {
    #[schema(schema_with = super::role)]
    pub role: String,
    /// Generated when absent. Names of revoked tokens, `cli`, `plugins-dir` and `anonymous`
    /// are taken.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: Option<String>,
    /// A lifetime such as `90d` or `12h` (at most 10 years); without it the token never
    /// expires.
    pub expires_in: Option<String>,
    /// Confines a runner or publisher token to the plugins whose names match one of these
    /// patterns (`*` stands for any characters, as in `team-a-*`): outside them it may not
    /// upload, activate, trigger, cancel or schedule (403). Absent: every plugin.
    #[schema(min_items = 1, max_items = 32)]
    pub plugins: Option<Vec<String>>,
}

impl Request for NewTokenRequest {
    fn problem(path: &str, _: &Settings) -> Option<ApiError> {
        let rule = match path {
            "role" => "role must be a string",
            "name" => "name must be a string",
            "expires_in" => "expires_in must be a duration such as \"90d\"",
            "plugins" => "plugins must be an array of name patterns, such as [\"team-a-*\"]",
            _ if path.starts_with("plugins.") => {
                return Some(ApiError::invalid(
                    "plugins",
                    "plugins must be an array of name patterns",
                ));
            }
            _ => return None,
        };
        Some(ApiError::invalid(path, rule))
    }
}

/// `PUT /v1/plugins/{name}` as `multipart/form-data`.
#[derive(ToSchema)]
pub struct UploadForm {
    /// The component (`.wasm`).
    #[schema(value_type = String, format = Binary)]
    pub component: Option<axum::body::Bytes>,
    /// The grant as TOML, or as JSON when the part's type is `application/json`. Needs admin.
    // Once read: the grant as manifest TOML, whichever form it came in.
    pub grant: Option<String>,
}

/// `GET /v1/runs`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs of this plugin.
    pub plugin: Option<String>,
    /// Only runs with this status.
    #[param(schema_with = super::run_status)]
    pub status: Option<String>,
    /// Only runs with this label, as `key=value` (split at the first `=`).
    #[param(pattern = "=")]
    pub label: Option<String>,
    /// Only runs this schedule started.
    pub schedule: Option<String>,
    /// With the runs of shadow versions (default false: only the runs that decide).
    #[param(value_type = Option<bool>)]
    pub shadow: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

/// `GET /v1/events`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only runs of this plugin.
    pub plugin: Option<String>,
    /// Only runs this schedule started.
    pub schedule: Option<String>,
    /// Only changes after which the run has this status.
    #[param(schema_with = super::run_status)]
    pub status: Option<String>,
    /// With the runs of shadow versions (default false).
    #[param(value_type = Option<bool>)]
    pub shadow: Option<String>,
}

/// A page of a list without filters.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

/// A page of a run's attempts.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AttemptPageQuery {
    /// Page size, 1 to 1000 (default 100); a page also ends at 4 MiB of JSON.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
    /// With each attempt's log lines (default false: `logs` is left out).
    #[param(value_type = Option<bool>)]
    pub logs: Option<String>,
}

/// `GET /v1/schedules`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SchedulesQuery {
    /// Only schedules of this plugin.
    pub plugin: Option<String>,
    /// Only paused (`true`) or active (`false`) schedules.
    #[param(value_type = Option<bool>)]
    pub paused: Option<String>,
    /// Schedules per page, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn problem<T: Request>(body: Json) -> (String, String) {
        let settings = Settings::for_data_dir("unused");
        let Json::Object(body) = body else {
            panic!("an object")
        };
        let Err(error) = body::typed::<T>(&body, &settings) else {
            panic!("{body:?} was read")
        };
        (
            error.field().unwrap_or_default().to_owned(),
            error.detail().to_owned(),
        )
    }

    /// Each mistake is named by its field, in the words the handlers used before requests had
    /// types (the API's contract).
    #[test]
    fn a_request_read_into_its_type_names_the_field_at_fault_in_its_rules_words() {
        let cases: [(Json, &str, &str); 9] = [
            (json!({}), "plugin", "plugin is required"),
            (json!({"plugin": 7}), "plugin", "plugin must be a string"),
            (
                json!({"plugin": "a", "params": []}),
                "params",
                "params must be a JSON object",
            ),
            (
                json!({"plugin": "a", "poll_interval_ms": "x"}),
                "poll_interval_ms",
                "poll_interval_ms must be an integer from 50 to 3600000",
            ),
            (
                json!({"plugin": "a", "timeout_ms": -1}),
                "timeout_ms",
                "timeout_ms must be an integer from 1 to 604800000",
            ),
            (
                json!({"plugin": "a", "step_timeouts": {"b": "c"}}),
                "step_timeouts.b",
                "a step timeout must be an integer from 1 to 604800000",
            ),
            (
                json!({"plugin": "a", "labels": {"env": 1}}),
                "labels.env",
                "a label value must be a string",
            ),
            (
                json!({"plugin": "a", "labels": []}),
                "labels",
                "labels must be an object of string values",
            ),
            (
                json!({"plugin": "a", "colour": "red"}),
                "colour",
                "unknown field \"colour\"; known fields: plugin, params, poll_interval_ms, timeout_ms, step_timeouts, retry, labels",
            ),
        ];
        for (body, field, message) in cases {
            assert_eq!(
                problem::<TriggerRunRequest>(body.clone()),
                (field.to_owned(), message.to_owned()),
                "{body}"
            );
        }
        let schedule_cases: [(Json, &str, &str); 4] = [
            (
                json!({"trigger": {"cron": 5}}),
                "trigger.cron",
                "cron must be a string",
            ),
            (
                json!({"trigger": {"at": 5}}),
                "trigger.at",
                "at must be an RFC 3339 time, e.g. 2026-12-01T02:30:00Z",
            ),
            (
                json!({"misfire_grace_ms": "soon"}),
                "misfire_grace_ms",
                "misfire_grace_ms must be a non-negative integer, or null for no limit",
            ),
            (
                json!({"max_concurrent_runs": "two"}),
                "max_concurrent_runs",
                "max_concurrent_runs must be an integer from 1 to 10000",
            ),
        ];
        for (body, field, message) in schedule_cases {
            assert_eq!(
                problem::<NewScheduleRequest>(body.clone()),
                (field.to_owned(), message.to_owned()),
                "{body}"
            );
        }
    }
}
