//! `GET /openapi.json`: the OpenAPI 3.1 document. Its paths come from the handlers'
//! `#[utoipa::path]` attributes as the router is built from them (`super::routes`), and its
//! response schemas from the DTOs the handlers return, so a route cannot exist undescribed.
//! Request bodies and query strings are described by the types the handlers read them into
//! (`dto::requests`). Here: what every guarded route shares: the bearer token, the role it
//! needs, and its errors.

use std::collections::BTreeMap;

use axum::Extension;
use axum::body::Bytes;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use serde_json::Value as Json;
use utoipa::openapi::RefOr;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

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

#[cfg(test)]
mod tests {
    use serde_json::Value as Json;
    use utoipa::ToSchema;

    use super::super::dto::{NewScheduleRequest, TriggerRequest, TriggerRunRequest};

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
