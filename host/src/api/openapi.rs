//! `GET /openapi.json`: the OpenAPI 3.1 document. Its paths come from the handlers'
//! `#[utoipa::path]` attributes as the router is built from them (`super::routes`), and its
//! response schemas from the DTOs the handlers return, so a route cannot exist undescribed.
//! Here: the request bodies and query strings, which handlers read field by field so that each
//! error names its field (a test keeps the handlers' field lists and these schemas the same),
//! and what every guarded route shares: the bearer token, the role it needs, and its errors.

use std::collections::BTreeMap;

use axum::Extension;
use axum::body::Bytes;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use utoipa::openapi::RefOr;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::{IntoParams, ToSchema};

use super::auth::{is_open, required_role};
use crate::model::Role;

/// What `#[derive(OpenApi)]` fills in before the handlers' paths are added.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Stepwise",
        description = "Multi-step asynchronous checks in sandboxed WebAssembly plugins. \
            Every `/v1` call needs `Authorization: Bearer <token>` when the server runs with \
            `--auth tokens`; each operation names the least role it needs. Errors are \
            `application/problem+json` (RFC 9457) with a `code` and, where one is at fault, \
            the `field`.",
    ),
    components(schemas(super::error::Problem)),
    tags(
        (name = "runs", description = "Trigger, follow and cancel runs"),
        (name = "plugins", description = "Upload, activate and grant plugins"),
        (name = "schedules", description = "Recurring triggers"),
        (name = "tokens", description = "Bearer tokens (admin)"),
        (name = "audit", description = "Who changed what (admin)"),
        (name = "secrets", description = "Declared secrets, never their values (admin)"),
        (name = "health", description = "Probes, metrics and this document; no token"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`, as it was built with the router.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health",
    summary = "This document (OpenAPI 3.1)",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub async fn openapi_json(Extension(document): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document.0)
}

/// The serialized document, shared by every request.
#[derive(Clone)]
pub struct Document(pub Bytes);

/// The document as served: the handlers' paths with access rules and links added.
pub fn complete(mut document: OpenApi) -> Json {
    describe_access(&mut document);
    add_links(&mut document);
    let mut document = serde_json::to_value(&document).expect("the OpenAPI document serializes");
    name_link_fields(&mut document);
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Json::as_object_mut)
    {
        for name in NULL_LEAVES_UNSET {
            if let Some(schema) = schemas.get_mut(*name) {
                allow_null_for_optional_fields(schema);
            }
        }
    }
    document
}

/// Request bodies whose handlers read `null` as "not given" (a grant's JSON becomes TOML,
/// which has no null; a schedule's fields go through `set_fields`, where `null` on
/// `misfire_grace_ms` means "no limit").
const NULL_LEAVES_UNSET: &[&str] = &["Grant", "NewScheduleRequest", "ScheduleChangeRequest"];

/// Makes every property that `schema` does not require accept `null` too, in inline objects
/// below it as well.
fn allow_null_for_optional_fields(schema: &mut Json) {
    let required: Vec<Json> = schema
        .get("required")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(properties) = schema.get_mut("properties").and_then(Json::as_object_mut) else {
        return;
    };
    for (name, property) in properties.iter_mut() {
        allow_null_for_optional_fields(property);
        if !required.contains(&Json::String(name.clone())) {
            let field = property.take();
            *property = serde_json::json!({"anyOf": [field, {"type": "null"}]});
        }
    }
}

/// utoipa 5 writes a link's `operationId` and `requestBody` in snake case, which no OpenAPI
/// reader understands.
fn name_link_fields(document: &mut Json) {
    let Some(paths) = document.get_mut("paths").and_then(Json::as_object_mut) else {
        return;
    };
    let links = paths
        .values_mut()
        .filter_map(Json::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links")?.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(Json::as_object_mut);
    for link in links {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("request_body", "requestBody"),
        ] {
            if let Some(value) = link.remove(snake) {
                link.insert(camel.to_owned(), value);
            }
        }
    }
}

/// Adds to every operation of `document` what the guard in `super::auth` enforces: the bearer
/// token and least role of each route, its 401/403/421 answers, and a problem+json `default`
/// for the rest (400, 413, 415, 422, 500 …).
fn describe_access(document: &mut OpenApi) {
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    for (path, item) in document.paths.paths.iter_mut() {
        for (method, operation) in operations(item) {
            if !is_open(path) {
                let role = required_role(&method, path);
                guard_operation(operation, role);
            }
            add_problem(operation, "default", "An error, as problem+json");
        }
    }
}

/// The operations of a path, with their methods: the ones this API uses.
fn operations(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
        (Method::PATCH, &mut item.patch),
    ]
    .into_iter()
    .filter_map(|(method, operation)| Some((method, operation.as_mut()?)))
}

/// Where the answer of one operation gives the parameters of others, for clients and for
/// stateful API testing: (operation, status, link name, target operation, its parameter and
/// where the value comes from).
const LINKS: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "runs_create",
        "202",
        "show",
        "runs_show",
        "id",
        "$response.body#/id",
    ),
    (
        "runs_create",
        "202",
        "attempts",
        "runs_attempts",
        "id",
        "$response.body#/id",
    ),
    (
        "runs_create",
        "202",
        "notifications",
        "runs_notifications",
        "id",
        "$response.body#/id",
    ),
    (
        "runs_create",
        "202",
        "cancel",
        "runs_cancel",
        "id",
        "$response.body#/id",
    ),
    (
        "schedules_create",
        "201",
        "show",
        "schedules_show",
        "id",
        "$response.body#/id",
    ),
    (
        "schedules_create",
        "201",
        "update",
        "schedules_update",
        "id",
        "$response.body#/id",
    ),
    (
        "schedules_create",
        "201",
        "delete",
        "schedules_delete",
        "id",
        "$response.body#/id",
    ),
    (
        "plugins_upload",
        "201",
        "show",
        "plugins_show",
        "name",
        "$response.body#/name",
    ),
    (
        "plugins_show",
        "200",
        "activate",
        "plugins_activate",
        "name",
        "$response.body#/name",
    ),
    (
        "plugins_show",
        "200",
        "grant",
        "plugins_grant",
        "name",
        "$response.body#/name",
    ),
    (
        "tokens_create",
        "201",
        "revoke",
        "tokens_revoke",
        "name",
        "$response.body#/name",
    ),
];

/// Adds [`LINKS`] to the answers they start from.
fn add_links(document: &mut OpenApi) {
    let mut by_id: BTreeMap<String, &mut Operation> = BTreeMap::new();
    for item in document.paths.paths.values_mut() {
        for (_, operation) in operations(item) {
            if let Some(id) = operation.operation_id.clone() {
                by_id.insert(id, operation);
            }
        }
    }
    for &(from, status, name, to, parameter, value) in LINKS {
        let operation = by_id
            .get_mut(from)
            .unwrap_or_else(|| panic!("a link starts at {from}, which no route has"));
        let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) else {
            panic!("a link starts at {from}'s {status}, which it does not answer");
        };
        let link = LinkBuilder::new()
            .operation_id(to)
            .parameter(parameter, value)
            .build();
        response.links.insert(name.to_owned(), RefOr::T(link));
    }
}

fn guard_operation(operation: &mut Operation, role: Role) {
    operation.security = Some(vec![SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
    let needs = format!("Needs the `{role}` role (or one above it).");
    operation.description = Some(match operation.description.take() {
        Some(description) => format!("{description}\n\n{needs}"),
        None => needs,
    });
    add_problem(
        operation,
        "401",
        "No token, or one this server does not know",
    );
    add_problem(
        operation,
        "403",
        "The token's role does not allow this call, or a cross-site request",
    );
    add_problem(
        operation,
        "421",
        "`Host` names neither the listen address nor a public URL",
    );
}

fn add_problem(operation: &mut Operation, status: &str, description: &str) {
    let problem = ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build();
    operation
        .responses
        .responses
        .entry(status.to_owned())
        .or_insert(problem.into());
}

// The types below are never built: they describe bodies and query strings that handlers read
// one field at a time. `Deserialize` carries `deny_unknown_fields` into the schema.

/// `POST /v1/runs`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"plugin": "event-pipeline", "params": {"event_id": "evt-1"}, "labels": {"env": "staging"}}))]
#[allow(dead_code)]
pub struct TriggerRunRequest {
    /// The plugin to run, by name.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    plugin: String,
    /// The run's params, checked against the plugin's `params_schema`.
    #[schema(value_type = Option<Object>)]
    params: Option<Map<String, Json>>,
    /// How long to wait between calls of a pending step; the grant's or the host's default
    /// when absent.
    // `Settings`' min_ and max_poll_interval, and max_run_timeout below: utoipa takes
    // literals only.
    #[schema(minimum = 50, maximum = 3_600_000)]
    poll_interval_ms: Option<u64>,
    /// The run's deadline from its creation; the host's default when absent.
    #[schema(minimum = 1, maximum = 604_800_000)]
    timeout_ms: Option<u64>,
    /// How long each named step may stay pending, in milliseconds, over the grant's
    /// `[steps.NAME] timeout_ms`, the plugin's own and the host's `default_step_timeout_ms`.
    step_timeouts: Option<BTreeMap<String, u64>>,
    /// The wait before calling a step again after an errored attempt, over the grant's
    /// `retry`; without either, the poll interval.
    retry: Option<crate::config::RetryFile>,
    /// At most 32 labels; keys of 1 to 63 bytes without `=`, values of at most 256 bytes.
    labels: Option<BTreeMap<String, String>>,
}

/// `POST /v1/schedules`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"plugin": "event-pipeline", "params": {"event_id": "evt-1"}, "trigger": {"interval_ms": 60000}}))]
#[allow(dead_code)]
pub struct NewScheduleRequest {
    /// The plugin each fire runs, by name.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    plugin: String,
    /// The params of each run, checked against the plugin's `params_schema`.
    #[schema(value_type = Option<Object>)]
    params: Option<Map<String, Json>>,
    trigger: TriggerRequest,
    /// How late a fire may start before it counts as missed; `null` for no limit (default
    /// 1000).
    #[schema(minimum = 0)]
    misfire_grace_ms: Option<u64>,
    /// Fold a backlog of missed fires into one (default true).
    coalesce: Option<bool>,
    /// Runs of this schedule that may be unfinished at once, 1 to 10000 (default 1).
    #[schema(minimum = 1, maximum = 10000)]
    max_concurrent_runs: Option<u32>,
    paused: Option<bool>,
    labels: Option<BTreeMap<String, String>>,
    #[schema(minimum = 50, maximum = 3_600_000)]
    poll_interval_ms: Option<u64>,
    #[schema(minimum = 1, maximum = 604_800_000)]
    timeout_ms: Option<u64>,
}

/// `PATCH /v1/schedules/{id}`: any field of [`NewScheduleRequest`], none required; `plugin`
/// may be given only unchanged, `paused: false` resumes from now without making up for the
/// fires of the pause.
pub struct ScheduleChangeRequest;

impl utoipa::PartialSchema for ScheduleChangeRequest {
    fn schema() -> RefOr<Schema> {
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
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        NewScheduleRequest::schemas(schemas);
    }
}

/// Exactly one of the three forms.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum TriggerRequest {
    /// A cron expression with seconds, e.g. `0 30 2 * * *`, in an IANA zone (default UTC).
    Cron {
        cron: String,
        timezone: Option<String>,
    },
    /// Every `interval_ms`, each fire moved by up to `jitter_ms`, between the optional bounds.
    Interval {
        // `scheduler::trigger`'s MIN_ and MAX_INTERVAL_MS: utoipa takes literals only.
        #[schema(minimum = 100, maximum = 316_224_000_000_i64)]
        interval_ms: i64,
        #[schema(minimum = 0)]
        jitter_ms: Option<i64>,
        #[schema(format = DateTime)]
        start_at: Option<String>,
        #[schema(format = DateTime)]
        end_at: Option<String>,
    },
    /// Once, at an RFC 3339 time.
    At {
        #[schema(format = DateTime)]
        at: String,
    },
}

/// `POST /v1/plugins/{name}/activate`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ActivateRequest {
    /// A kept version: the SHA-256 of its bytes, in lowercase hex.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    version: String,
}

/// `POST /v1/tokens`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"role": "viewer", "name": "grafana"}))]
#[allow(dead_code)]
pub struct NewTokenRequest {
    #[schema(schema_with = super::dto::role)]
    role: String,
    /// Generated when absent. Names of revoked tokens, `cli`, `plugins-dir` and `anonymous`
    /// are taken.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    name: Option<String>,
    /// A lifetime such as `90d` or `12h` (at most 10 years); without it the token never
    /// expires.
    expires_in: Option<String>,
    /// Confines a runner or publisher token to the plugins whose names match one of these
    /// patterns (`*` stands for any characters, as in `team-a-*`): outside them it may not
    /// upload, activate, trigger, cancel or schedule (403). Absent: every plugin.
    #[schema(min_items = 1, max_items = 32)]
    plugins: Option<Vec<String>>,
}

/// `PUT /v1/plugins/{name}` as `multipart/form-data`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The component (`.wasm`).
    #[schema(value_type = String, format = Binary)]
    component: Vec<u8>,
    /// The grant as TOML, or as JSON when the part's type is `application/json`. Needs admin.
    grant: Option<String>,
}

/// `GET /v1/runs`
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct RunsQuery {
    /// Only runs of this plugin.
    plugin: Option<String>,
    /// Only runs with this status.
    #[param(schema_with = super::dto::run_status)]
    status: Option<String>,
    /// Only runs with this label, as `key=value` (split at the first `=`).
    #[param(pattern = "=")]
    label: Option<String>,
    /// Only runs this schedule started.
    schedule: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    cursor: Option<String>,
}

/// `GET /v1/events`
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventsQuery {
    /// Only runs of this plugin.
    plugin: Option<String>,
    /// Only runs this schedule started.
    schedule: Option<String>,
    /// Only changes after which the run has this status.
    #[param(schema_with = super::dto::run_status)]
    status: Option<String>,
}

/// A page of a list without filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PageQuery {
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    cursor: Option<String>,
}

/// A page of a run's attempts.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AttemptPageQuery {
    /// Page size, 1 to 1000 (default 100); a page also ends at 4 MiB of JSON.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    cursor: Option<String>,
    /// With each attempt's log lines (default false: `logs` is left out).
    logs: Option<bool>,
}

/// `GET /v1/schedules`
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SchedulesQuery {
    /// Only schedules of this plugin.
    plugin: Option<String>,
    /// Only paused (`true`) or active (`false`) schedules.
    paused: Option<bool>,
    /// Schedules per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::path::ParameterIn;

    use super::*;

    fn properties<T: ToSchema>() -> Vec<String> {
        match T::schema() {
            RefOr::T(Schema::Object(object)) => object.properties.keys().cloned().collect(),
            _ => panic!("{} is not an object schema", T::name()),
        }
    }

    fn parameters<T: IntoParams>() -> Vec<String> {
        T::into_params(|| Some(ParameterIn::Query))
            .into_iter()
            .map(|parameter| parameter.name)
            .collect()
    }

    #[test]
    fn the_document_names_the_fields_the_handlers_read() {
        assert_eq!(
            properties::<TriggerRunRequest>(),
            super::super::runs::KNOWN_FIELDS
        );
        assert_eq!(
            properties::<NewScheduleRequest>(),
            super::super::schedules::KNOWN_FIELDS
        );
        assert_eq!(
            properties::<ScheduleChangeRequest>(),
            super::super::schedules::KNOWN_FIELDS
        );
        assert_eq!(
            properties::<ActivateRequest>(),
            super::super::plugins::ACTIVATE_FIELDS
        );
        assert_eq!(
            properties::<NewTokenRequest>(),
            super::super::tokens::CREATE_FIELDS
        );
        assert_eq!(parameters::<RunsQuery>(), super::super::runs::INDEX_QUERY);
        assert_eq!(
            parameters::<EventsQuery>(),
            super::super::events::EVENTS_QUERY
        );
        assert_eq!(
            parameters::<SchedulesQuery>(),
            super::super::schedules::INDEX_QUERY
        );
        assert_eq!(parameters::<PageQuery>(), super::super::query::PAGE);
        assert_eq!(
            parameters::<AttemptPageQuery>(),
            super::super::runs::ATTEMPTS_QUERY
        );
    }

    /// The literals in `TriggerRequest`'s attributes are the validator's bounds.
    #[test]
    fn the_document_gives_the_interval_bounds_the_validator_uses() {
        fn interval(value: &Json) -> Option<&Json> {
            match value {
                Json::Object(object) => object
                    .get("properties")
                    .and_then(|properties| properties.get("interval_ms"))
                    .or_else(|| object.values().find_map(interval)),
                Json::Array(items) => items.iter().find_map(interval),
                _ => None,
            }
        }
        let schema = serde_json::to_value(<TriggerRequest as utoipa::PartialSchema>::schema())
            .expect("serializable");
        let interval = interval(&schema).expect("an interval_ms property");
        let bound = |name: &str| interval[name].as_f64().map(|bound| bound as i64);
        use crate::scheduler::trigger::{MAX_INTERVAL_MS, MIN_INTERVAL_MS};
        assert_eq!(bound("minimum"), Some(MIN_INTERVAL_MS), "{interval}");
        assert_eq!(bound("maximum"), Some(MAX_INTERVAL_MS), "{interval}");
    }

    /// The literals on `poll_interval_ms` and `timeout_ms` are the bounds the handlers take
    /// from `Settings`, on runs and schedules alike.
    #[test]
    fn the_document_gives_the_poll_interval_and_deadline_bounds_the_handlers_use() {
        fn bounds<T: ToSchema>(field: &str) -> (Option<i64>, Option<i64>) {
            let schema = serde_json::to_value(T::schema()).expect("serializable");
            let property = &schema["properties"][field];
            let bound = |name: &str| property[name].as_f64().map(|bound| bound as i64);
            (bound("minimum"), bound("maximum"))
        }
        let settings = crate::config::Settings::for_data_dir("unused");
        let millis = |duration: std::time::Duration| Some(duration.as_millis() as i64);
        let poll = (
            millis(settings.min_poll_interval),
            millis(settings.max_poll_interval),
        );
        let deadline = (Some(1), millis(settings.max_run_timeout));
        assert_eq!(bounds::<TriggerRunRequest>("poll_interval_ms"), poll);
        assert_eq!(bounds::<NewScheduleRequest>("poll_interval_ms"), poll);
        assert_eq!(bounds::<TriggerRunRequest>("timeout_ms"), deadline);
        assert_eq!(bounds::<NewScheduleRequest>("timeout_ms"), deadline);
    }
}
