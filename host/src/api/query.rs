//! Query strings, read by one rule on every endpoint: a parameter the endpoint does not know,
//! or one given twice, is a 422 naming it, never silently ignored or overwritten.

use std::collections::BTreeMap;

use super::error::ApiError;

/// The parameters of a paginated list that has no filters.
pub const PAGE: &[&str] = &["limit", "cursor"];

/// The parameters of `raw` (the URI's query), each at most once and each in `known`.
pub fn parse(raw: Option<&str>, known: &[&str]) -> Result<BTreeMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|error| {
            ApiError::bad_request(
                "malformed_query",
                format!("the query string is malformed: {error}"),
            )
        })?;
    let mut parameters = BTreeMap::new();
    for (name, value) in pairs {
        if name.contains('\0') || value.contains('\0') {
            // PostgreSQL's text cannot hold NUL; no name or id has one.
            return Err(ApiError::invalid(
                name.replace('\0', "\\0"),
                "a query parameter may not contain a NUL character",
            ));
        }
        if !known.contains(&name.as_str()) {
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
        parameters.insert(name, value);
    }
    Ok(parameters)
}

/// `limit` from 1 to `max`, `default` when absent.
pub fn limit(
    parameters: &BTreeMap<String, String>,
    default: u32,
    max: u32,
) -> Result<u32, ApiError> {
    match parameters.get("limit") {
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
pub fn flag(parameters: &BTreeMap<String, String>, name: &str) -> Result<Option<bool>, ApiError> {
    match parameters.get(name).map(String::as_str) {
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
    parameters: &BTreeMap<String, String>,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    parameters
        .get("cursor")
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
