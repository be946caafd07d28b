//! Reading a request: a JSON body into its type in `dto` (the same type that describes it in
//! the OpenAPI document), and the rules that several requests share. Every mistake is a 422
//! naming its field, in the words of the field's own rule; malformed JSON is a 400 and a body
//! over the limit a 413.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use crate::config::Settings;

/// A JSON request body: what each field must be, said when serde finds it is not.
pub trait Request: DeserializeOwned {
    /// The 422 for the value at `path` (dotted, as in `labels.env`) that serde could not read,
    /// in the words of the field's rule; `None` for serde's own words.
    fn problem(path: &str, settings: &Settings) -> Option<ApiError>;
}

/// The request body's bytes: 413 over `limit`, 400 when it cannot be read.
pub fn bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request("unreadable_body", rejection.body_text())
        }
    })
}

/// The request body as a JSON object: 400 for what is not one, 413 over `limit`.
pub fn object(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Map<String, Json>, ApiError> {
    let body = bytes(body, limit)?;
    let request: Json = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(
            "malformed_json",
            format!("request body is not valid JSON: {error}"),
        )
    })?;
    match request {
        Json::Object(request) => Ok(request),
        _ => Err(ApiError::bad_request(
            "malformed_json",
            "request body must be a JSON object",
        )),
    }
}

/// `request` read into `T`: a 422 naming the first field that is unknown, missing or not what
/// its rule says.
pub fn typed<T: Request>(request: &Map<String, Json>, settings: &Settings) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Json::Object(request.clone())).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        if let Some(unknown) = quoted(&message, "unknown field `") {
            let known = message
                .split_once("expected ")
                .map(|(_, expected)| {
                    expected
                        .split('`')
                        .skip(1)
                        .step_by(2)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let known = if known.is_empty() { "none" } else { &known };
            // The path ends with the unknown name itself.
            return ApiError::invalid(
                path,
                format!("unknown field {unknown:?}; known fields: {known}"),
            );
        }
        if let Some(missing) = quoted(&message, "missing field `") {
            return ApiError::invalid(child(&path, missing), format!("{missing} is required"));
        }
        T::problem(&path, settings).unwrap_or_else(|| ApiError::invalid(path, message))
    })
}

/// The name serde quotes after `prefix`, as in "unknown field `x`, expected …".
fn quoted<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// `name` under `path`; serde_path_to_error writes the top as `.`.
fn child(path: &str, name: &str) -> String {
    if path == "." {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// Set `null` apart from absent, for the one field where it means something (a schedule's
/// `misfire_grace_ms`: no limit): absent is `None`, `null` is `Some(None)`.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    serde::Deserialize::deserialize(deserializer).map(Some)
}

/// A plugin's name as the request gives it.
pub fn plugin_type(path: &str) -> Option<ApiError> {
    (path == "plugin").then(|| ApiError::invalid("plugin", "plugin must be a string"))
}

/// A run's params: any JSON object.
pub fn params_type(path: &str) -> Option<ApiError> {
    (path == "params").then(|| ApiError::invalid("params", "params must be a JSON object"))
}

/// A duration in milliseconds from `min` to `max`, the same words for a wrong type and a value
/// out of range.
pub struct Millis {
    pub field: &'static str,
    pub min: Duration,
    pub max: Duration,
}

impl Millis {
    /// A run's poll interval, within the host's bounds.
    pub fn poll_interval(settings: &Settings) -> Millis {
        Millis {
            field: "poll_interval_ms",
            min: settings.min_poll_interval,
            max: settings.max_poll_interval,
        }
    }

    /// A run's deadline, within the host's bounds.
    pub fn timeout(settings: &Settings) -> Millis {
        Millis {
            field: "timeout_ms",
            min: Duration::from_millis(1),
            max: settings.max_run_timeout,
        }
    }

    pub fn problem(&self) -> ApiError {
        ApiError::invalid(
            self.field,
            format!(
                "{} must be an integer from {} to {}",
                self.field,
                self.min.as_millis(),
                self.max.as_millis()
            ),
        )
    }

    /// The problem, if `path` is this field.
    pub fn problem_at(&self, path: &str) -> Option<ApiError> {
        (path == self.field).then(|| self.problem())
    }

    pub fn check(&self, millis: Option<u64>) -> Result<Option<Duration>, ApiError> {
        millis
            .map(Duration::from_millis)
            .map(|millis| {
                (self.min..=self.max)
                    .contains(&millis)
                    .then_some(millis)
                    .ok_or_else(|| self.problem())
            })
            .transpose()
    }
}

/// Most labels on one run or schedule.
pub const MAX_LABELS: usize = 32;
/// Longest label key, and longest label value, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// Labels whose shape serde could not read: not an object, or a value that is not a string.
pub fn labels_type(path: &str) -> Option<ApiError> {
    if path == "labels" {
        Some(ApiError::invalid(
            "labels",
            "labels must be an object of string values",
        ))
    } else if path.starts_with("labels.") {
        Some(ApiError::invalid(path, "a label value must be a string"))
    } else {
        None
    }
}

/// Labels: at most [`MAX_LABELS`]; keys of 1 to 63 bytes without `=` (the filter
/// `?label=key=value` splits at the first one) or control characters; values of at most 256
/// bytes without NUL.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::invalid(
            "labels",
            format!(
                "at most {MAX_LABELS} labels are allowed, not {}",
                labels.len()
            ),
        ));
    }
    for (key, value) in labels {
        let field = format!("labels.{key}");
        if key.is_empty()
            || key.len() > MAX_LABEL_KEY_BYTES
            || key.contains('=')
            || key.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(
                field,
                format!(
                    "a label key must be 1 to {MAX_LABEL_KEY_BYTES} bytes, without `=` or control characters"
                ),
            ));
        }
        if value.contains('\0') {
            return Err(ApiError::invalid(
                field,
                "a label value may not contain a NUL character",
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(ApiError::invalid(
                field,
                format!("a label value may be at most {MAX_LABEL_VALUE_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}
