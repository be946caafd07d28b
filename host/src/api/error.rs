//! `ApiError`: every failure a handler returns, rendered as `application/problem+json`
//! (RFC 9457) with a `code`, the offending `field` where there is one, and the style guide's
//! `error` object. 5xx details are logged once, by `log_server_errors`, and never sent.

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::scheduler::planning::PlanError;
use crate::{registry, storage};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    field: Option<String>,
    message: String,
}

/// The body of every error response (`application/problem+json`, RFC 9457), with the code
/// and the field of the style guide's `error` object repeated at the top for RFC 9457 clients.
#[derive(Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: `code` tells the errors apart.
    #[serde(rename = "type")]
    kind: &'static str,
    /// The status' reason phrase.
    title: &'static str,
    status: u16,
    /// What went wrong, in words; `internal server error` for every 5xx.
    detail: String,
    /// Stable and machine-readable, e.g. `invalid_field`, `plugin_not_found`, `unauthorized`.
    code: &'static str,
    /// The request field, query parameter, header or part at fault, e.g. `params.amount`.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    error: ProblemError,
}

#[derive(Serialize, ToSchema)]
pub struct ProblemError {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

/// The detail of a 5xx, carried to the logging middleware in the response extensions.
#[derive(Clone)]
struct ServerErrorDetail(String);

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            field: None,
            message: message.into(),
        }
    }

    /// 422 for a well-formed request whose `field` is invalid.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field",
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// 422 with a code of its own, for a well-formed request that cannot be honoured.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code,
            field: None,
            message: message.into(),
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code,
            field: None,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            code,
            field: None,
            message: message.into(),
        }
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            field: None,
            message: message.into(),
        }
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            field: None,
            message: format!("request body is larger than the limit of {limit} bytes"),
        }
    }

    /// 401: no token, or one this server does not know.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            field: None,
            message: message.into(),
        }
    }

    /// 403: a known caller whose role does not allow the call, or a cross-site request.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::forbidden_code("forbidden", message)
    }

    /// 403 with its own problem code.
    pub fn forbidden_code(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code,
            field: None,
            message: message.into(),
        }
    }

    /// 421: the request names another server in `Host`.
    pub fn misdirected(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::MISDIRECTED_REQUEST,
            code: "misdirected_request",
            field: None,
            message: message.into(),
        }
    }

    /// 429: the caller has as much of something open as it may (the message names the cap).
    pub fn too_many_requests(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code,
            field: None,
            message: message.into(),
        }
    }

    /// 500 with a detail that is logged, never sent.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            field: None,
            message: message.into(),
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn status_code(&self) -> StatusCode {
        self.status
    }

    /// What went wrong, in words (for a 5xx, what is logged, not sent).
    pub fn detail(&self) -> &str {
        &self.message
    }

    /// The request field at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
}

impl From<storage::Error> for ApiError {
    fn from(error: storage::Error) -> ApiError {
        match error {
            storage::Error::NotFound => ApiError::not_found("not_found", "not found"),
            storage::Error::Conflict { constraint } => ApiError::conflict(
                "conflict",
                format!("conflicts with an existing record ({constraint})"),
            ),
            other => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "internal",
                field: None,
                message: format!("storage: {other}"),
            },
        }
    }
}

impl From<registry::Error> for ApiError {
    fn from(error: registry::Error) -> ApiError {
        let message = error.to_string();
        let (status, code, field) = match error {
            registry::Error::InvalidComponent(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_plugin",
                "component",
            ),
            registry::Error::InvalidGrant(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_grant", "grant")
            }
            registry::Error::GrantBeyondPolicy { key, .. } => {
                return ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code: "grant_beyond_policy",
                    field: Some(format!("grant.{key}")),
                    message,
                };
            }
            registry::Error::UnknownPlugin(_) => {
                return ApiError::not_found("plugin_not_found", message);
            }
            registry::Error::UnknownVersion { .. } => {
                (StatusCode::NOT_FOUND, "version_not_found", "version")
            }
            registry::Error::Unreviewed { .. } => {
                (StatusCode::FORBIDDEN, "review_required", "version")
            }
            registry::Error::ShadowIsActive { .. } => {
                (StatusCode::CONFLICT, "shadow_is_active", "version")
            }
            registry::Error::NoShadow(_) => {
                return ApiError::conflict("no_shadow", message);
            }
            registry::Error::Storage(error) => return error.into(),
        };
        ApiError {
            status,
            code,
            field: Some(field.to_owned()),
            message,
        }
    }
}

impl From<PlanError> for ApiError {
    fn from(error: PlanError) -> ApiError {
        match error {
            PlanError::InvalidParams { field, message } => ApiError::invalid(field, message),
            PlanError::ParamsTooCostly { message } => {
                ApiError::unprocessable("params_too_costly", message).with_field("params")
            }
            PlanError::PluginBroken { code, message } => ApiError::conflict(code, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let server_error = self.status.is_server_error();
        let message = if server_error {
            "internal server error".to_owned()
        } else {
            self.message.clone()
        };
        let body = Problem {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: message.clone(),
            code: self.code,
            field: self.field.clone(),
            error: ProblemError {
                code: self.code,
                message,
                field: self.field.clone(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stepwise\""),
            );
        }
        if server_error {
            response
                .extensions_mut()
                .insert(ServerErrorDetail(self.message));
        }
        response
    }
}

/// Logs the detail of every 5xx exactly once.
pub async fn log_server_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if let Some(ServerErrorDetail(detail)) = response.extensions().get::<ServerErrorDetail>() {
        tracing::error!(%method, %path, status = response.status().as_u16(), "{detail}");
    }
    response
}

pub async fn not_found_fallback(request: Request) -> ApiError {
    ApiError::not_found(
        "route_not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

pub async fn method_not_allowed_fallback(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        field: None,
        message: format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    }
}
