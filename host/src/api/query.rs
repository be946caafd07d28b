//! Query strings, read by one rule on every endpoint: a parameter the endpoint does not know,
//! or one given twice, is a 422 naming it, never silently ignored or overwritten. Each
//! endpoint's parameters are a type in `dto` that also describes them in the OpenAPI document.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};
use utoipa::IntoParams;
use utoipa::openapi::path::ParameterIn;

use super::error::ApiError;
use crate::model::RunStatus;

/// The parameters of `raw` (the URI's query) read into `T`, each at most once and each one of
/// `T`'s.
pub fn read<T: DeserializeOwned + IntoParams + 'static>(raw: Option<&str>) -> Result<T, ApiError> {
    let known = names::<T>();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|error| {
            ApiError::bad_request(
                "malformed_query",
                format!("the query string is malformed: {error}"),
            )
        })?;
    let mut parameters = Map::new();
    for (name, value) in pairs {
        if name.contains('\0') || value.contains('\0') {
            // PostgreSQL's text cannot hold NUL; no name or id has one.
            return Err(ApiError::invalid(
                name.replace('\0', "\\0"),
                "a query parameter may not contain a NUL character",
            ));
        }
        if !known.contains(&name) {
            return Err(ApiError::invalid(
                name.clone(),
                format!(
                    "unknown query parameter {name:?}; known: {}",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        if parameters.contains_key(&name) {
            return Err(ApiError::invalid(
                name.clone(),
                format!("query parameter {name:?} is given more than once; give it once"),
            ));
        }
        parameters.insert(name, Json::String(value));
    }
    // Every parameter is text until the rules below read it, so this cannot fail.
    serde_json::from_value(Json::Object(parameters))
        .map_err(|error| ApiError::internal(format!("query parameters: {error}")))
}

/// The names of `T`'s parameters, worked out once per type: describing them builds their
/// whole OpenAPI objects, schemas and all, which no request should pay for.
fn names<T: IntoParams + 'static>() -> Arc<[String]> {
    static NAMES: LazyLock<Mutex<HashMap<TypeId, Arc<[String]>>>> = LazyLock::new(Mutex::default);
    let mut names = NAMES.lock().unwrap_or_else(|poison| poison.into_inner());
    names
        .entry(TypeId::of::<T>())
        .or_insert_with(|| {
            T::into_params(|| Some(ParameterIn::Query))
                .into_iter()
                .map(|parameter| parameter.name)
                .collect()
        })
        .clone()
}

/// `limit` from 1 to `max`, `default` when absent.
pub fn limit(limit: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    match limit {
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=max).contains(limit))
            .ok_or_else(|| {
                ApiError::invalid("limit", format!("limit must be an integer from 1 to {max}"))
            }),
        None => Ok(default),
    }
}

/// A `true`/`false` parameter, if given.
pub fn flag(value: Option<&str>, name: &str) -> Result<Option<bool>, ApiError> {
    match value {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::invalid(
            name,
            format!("{name} must be true or false"),
        )),
    }
}

/// `cursor`, read by `parse` (a `next_cursor` this endpoint handed out), if given.
pub fn cursor<T>(
    cursor: Option<&str>,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    cursor
        .map(|text| {
            parse(text).ok_or_else(|| {
                ApiError::invalid(
                    "cursor",
                    "cursor must be a next_cursor from an earlier page",
                )
            })
        })
        .transpose()
}

/// The `next_cursor` of a page: the last item's, when the page is full (there may be more).
pub fn next_cursor<T>(
    page: &[T],
    limit: u32,
    cursor_of: impl FnOnce(&T) -> String,
) -> Option<String> {
    (page.len() == limit as usize)
        .then(|| page.last().map(cursor_of))
        .flatten()
}

/// The `status` parameter of a run listing or stream.
pub fn run_status(status: Option<&str>) -> Result<Option<RunStatus>, ApiError> {
    status
        .map(|text| {
            RunStatus::parse(text).ok_or_else(|| {
                let known: Vec<_> = RunStatus::ALL
                    .iter()
                    .map(|status| status.as_str())
                    .collect();
                ApiError::invalid(
                    "status",
                    format!("status must be one of {}", known.join(", ")),
                )
            })
        })
        .transpose()
}
