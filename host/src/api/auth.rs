//! Who may call what (README, "Teams and tokens"), checked once for every request before any handler runs:
//! the `Host` header (DNS rebinding), the `Origin` of state-changing requests (cross-site
//! forms), the media type of request bodies, the bearer token, and the role the route needs.
//! Handlers receive the result as a [`Caller`].

use std::net::{IpAddr, SocketAddr};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AppState;
use crate::auth::PresentedToken;
use crate::config::AuthMode;
use crate::model::{PluginScope, Role};

/// The caller of a `/v1` request, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name; `anonymous` without authentication.
    pub name: String,
    pub role: Role,
    /// The plugins the token may act on; `None` is every plugin.
    pub plugins: Option<PluginScope>,
}

/// The name the audit log and idempotency scope give callers when `--auth none`.
pub const ANONYMOUS: &str = crate::model::ANONYMOUS_ACTOR;

impl Caller {
    /// 403 unless the caller's role includes `needed`.
    pub fn require(&self, needed: Role, what: &str) -> Result<(), ApiError> {
        if self.role.includes(needed) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{what} needs the {needed} role; token {:?} has the {} role",
                self.name, self.role
            )))
        }
    }

    /// 403 unless the token may act on the plugin `name` (its patterns match it). Out of
    /// scope is 403, not 404: which plugins exist is no secret from a token that may read.
    pub fn require_plugin(&self, name: &str) -> Result<(), ApiError> {
        match &self.plugins {
            Some(scope) if !scope.allows(name) => Err(ApiError::forbidden_code(
                "outside_token_scope",
                format!(
                    "token {:?} may act only on plugins matching {scope}, not on {name:?}",
                    self.name
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The registry's view of this caller: admins review the code they upload or activate.
    pub fn actor(&self) -> crate::model::Actor<'_> {
        crate::model::Actor {
            name: &self.name,
            reviews: self.role == Role::Admin,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("the request was not authenticated"))
    }
}

/// Routes that need no token: probes carry none, the API's description is no secret, and
/// scrapers of `GET /metrics` have their own rule ([`check_scraper`]). Like every route they
/// still need a `Host` of this server ([`host_guard`]).
pub(super) fn is_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
}

/// The least role that may make this call. Unknown state-changing routes need `admin`, so a
/// route added without a line here is closed rather than open.
pub fn required_role(method: &Method, path: &str) -> Role {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (_, ["v1", "tokens", ..]) | (_, ["v1", "audit", ..]) | (_, ["v1", "secrets", ..]) => {
            Role::Admin
        }
        (&Method::GET | &Method::HEAD, _) => Role::Viewer,
        (&Method::POST, ["v1", "runs"]) | (&Method::POST, ["v1", "runs", _, "cancel"]) => {
            Role::Runner
        }
        (&Method::POST, ["v1", "schedules"])
        | (&Method::PATCH | &Method::DELETE, ["v1", "schedules", _]) => Role::Runner,
        // A grant part in the upload needs admin; the handler checks that.
        (&Method::PUT, ["v1", "plugins", _]) => Role::Publisher,
        (&Method::POST, ["v1", "plugins", _, "activate"])
        | (&Method::DELETE, ["v1", "plugins", _, "shadow"]) => Role::Publisher,
        _ => Role::Admin,
    }
}

/// The media types a request body may have on this route (lowercase, without parameters).
fn accepted_media_types(method: &Method, path: &str) -> &'static [&'static str] {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::PUT, ["v1", "plugins", _]) => &[
            "application/wasm",
            "application/octet-stream",
            "multipart/form-data",
        ],
        (&Method::PUT, ["v1", "plugins", _, "grant"]) => &["application/json", "application/toml"],
        _ => &["application/json"],
    }
}

/// The checks of this module, in order: `Host` (421), `Origin` (403), body media type (415),
/// token (401) and role (403). Open routes skip them all.
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if path == "/metrics"
        && let Err(error) = check_scraper(&state, &request)
    {
        return error.into_response();
    }
    if is_open(&path) {
        return next.run(request).await;
    }
    let method = request.method().clone();
    if percent_encoding::percent_decode_str(&path).any(|byte| byte == 0) {
        // No name or id has one, and PostgreSQL's text cannot hold it.
        return ApiError::bad_request("malformed_path", "the path may not contain a NUL character")
            .into_response();
    }
    let checked = check_origin(&state, &method, request.headers())
        .and_then(|()| check_media_type(&method, &path, request.headers()));
    if let Err(error) = checked {
        return error.into_response();
    }
    let caller = match authenticate(&state, request.headers()).await {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let needed = required_role(&method, &path);
    if let Err(error) = caller.require(needed, &format!("{method} {path}")) {
        return error.into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The caller `headers` present; the event streams call it again at each keep-alive.
pub(super) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    if state.settings.auth == AuthMode::None {
        return Ok(Caller {
            name: ANONYMOUS.to_owned(),
            role: Role::Admin,
            plugins: None,
        });
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("this call needs Authorization: Bearer <token>"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be Bearer <token>"))?;
    let unknown = || ApiError::unauthorized("the bearer token is not a valid Stepwise token");
    let presented = PresentedToken::parse(token).ok_or_else(unknown)?;
    let stored = state
        .store
        .find_token(presented.key_id)
        .await?
        .ok_or_else(unknown)?;
    if !presented.matches(&stored) {
        return Err(unknown());
    }
    if let Some(refusal) = stored.refusal(crate::model::now_millis()) {
        return Err(ApiError::unauthorized(refusal));
    }
    Ok(Caller {
        name: stored.name,
        role: stored.role,
        plugins: stored.plugins,
    })
}

/// `Host` must name this server: the address it listens on (or, on a wildcard address, any IP
/// address), `localhost` when it listens on loopback, or a `public_urls` host. A DNS-rebinding
/// page reaches a loopback server under its own domain name, which none of these match.
/// The `Host` check (421) on every request, whatever its route, the dashboard's pages and
/// the probes included: a page on another origin that a DNS rebinding points at this server
/// reads nothing from it, not even its metrics.
pub async fn host_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match check_host(&state, &request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// `GET /metrics` is for scrapers: with `[metrics] token_env`, those that present its token;
/// without one, those on the server's own machine (a loopback peer).
fn check_scraper(state: &AppState, request: &Request) -> Result<(), ApiError> {
    match &state.settings.metrics_token {
        Some(token) => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().strip_prefix("Bearer "))
                .unwrap_or_default()
                .trim();
            // Compared in constant time: the token is a secret.
            let equal = presented.len() == token.len()
                && presented
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                    == 0;
            if equal {
                Ok(())
            } else {
                Err(ApiError::unauthorized(
                    "GET /metrics needs Authorization: Bearer <the token of [metrics] token_env>",
                ))
            }
        }
        None => {
            let peer = request.extensions().get::<super::server::Peer>();
            if peer.is_some_and(|peer| peer.0.ip().to_canonical().is_loopback()) {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "GET /metrics answers only clients on this machine; set [metrics] token_env \
                     for scrapers elsewhere",
                ))
            }
        }
    }
}

fn check_host(state: &AppState, request: &Request) -> Result<(), ApiError> {
    // HTTP/2 carries the host in the `:authority` pseudo-header, which ends up in the URI.
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| {
            request
                .uri()
                .authority()
                .map(|authority| authority.as_str())
        })
        .map(|host| host.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if host_allowed(&host, state.listen_address(), &state.settings.public_hosts) {
        Ok(())
    } else {
        Err(ApiError::misdirected(format!(
            "Host {host:?} is not this server's listen address or one of its public_urls"
        )))
    }
}

pub fn host_allowed(host: &str, listen: SocketAddr, public_hosts: &[String]) -> bool {
    if public_hosts.iter().any(|public| public == host) {
        return true;
    }
    let (name, port) = split_host_port(host);
    if port != Some(listen.port()) && !(port.is_none() && listen.port() == 80) {
        return false;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => listen.ip().is_unspecified() || ip == listen.ip(),
        Err(_) => {
            name == "localhost" && (listen.ip().is_loopback() || listen.ip().is_unspecified())
        }
    }
}

/// `example.com:8080` → (`example.com`, 8080); `[::1]:80` → (`::1`, 80).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(bracketed) = host.strip_prefix('[') {
        return match bracketed.split_once(']') {
            Some((name, rest)) => (name, rest.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) => match port.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, Some(0)),
        },
        None => (host, None),
    }
}

/// A browser sends `Origin` with every cross-site `POST`, `PUT`, `PATCH` and `DELETE`. A page
/// from elsewhere must not change anything, even on a loopback server without tokens: an
/// upload is a multipart form, which a page may post without asking.
fn check_origin(state: &AppState, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok())
        == Some("cross-site")
    {
        return Err(ApiError::forbidden(
            "cross-site requests may not change anything",
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, host)| host.trim_end_matches('/').to_ascii_lowercase());
    match host {
        Some(host) if host_allowed(&host, state.listen_address(), &state.settings.public_hosts) => {
            Ok(())
        }
        _ => Err(ApiError::forbidden(format!(
            "requests from origin {:?} may not change anything",
            origin.to_str().unwrap_or_default()
        ))),
    }
}

/// A body must come with a media type the route accepts, so that a plain HTML form (which can
/// only send `text/plain`, `multipart/form-data` and `application/x-www-form-urlencoded`)
/// cannot post JSON to the API.
fn check_media_type(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    // Only these carry a body here; any other method is answered 405 by the router.
    if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        return Ok(());
    }
    let content_type = headers.get(header::CONTENT_TYPE);
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|length| length.trim() != "0");
    if !has_body && content_type.is_none() {
        return Ok(());
    }
    let accepted = accepted_media_types(method, path);
    let media_type = content_type.map(media_type_of).unwrap_or_default();
    if accepted.contains(&media_type.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(format!(
            "content type {:?} is not accepted by {method} {path}: send {}",
            content_type
                .and_then(|value| value.to_str().ok())
                .unwrap_or("(none)"),
            accepted.join(" or ")
        )))
    }
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
pub fn media_type_of(value: &HeaderValue) -> String {
    value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_the_role_of_its_table_row() {
        let cases = [
            (Method::GET, "/v1/runs", Role::Viewer),
            (Method::GET, "/v1/plugins/x", Role::Viewer),
            (Method::POST, "/v1/runs", Role::Runner),
            (Method::POST, "/v1/runs/abc/cancel", Role::Runner),
            (Method::POST, "/v1/schedules", Role::Runner),
            (Method::PATCH, "/v1/schedules/s", Role::Runner),
            (Method::DELETE, "/v1/schedules/s", Role::Runner),
            (Method::PUT, "/v1/plugins/x", Role::Publisher),
            (Method::POST, "/v1/plugins/x/activate", Role::Publisher),
            (Method::DELETE, "/v1/plugins/x/shadow", Role::Publisher),
            (Method::GET, "/v1/plugins/x/shadow", Role::Viewer),
            (Method::PUT, "/v1/plugins/x/grant", Role::Admin),
            (Method::GET, "/v1/tokens", Role::Admin),
            (Method::POST, "/v1/tokens", Role::Admin),
            (Method::DELETE, "/v1/tokens/t", Role::Admin),
            (Method::GET, "/v1/audit", Role::Admin),
            (Method::POST, "/v1/something-new", Role::Admin),
        ];
        for (method, path, role) in cases {
            assert_eq!(required_role(&method, path), role, "{method} {path}");
        }
    }

    #[test]
    fn host_must_name_this_server() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let public = vec!["stepwise.example.com".to_owned()];
        assert!(host_allowed("127.0.0.1:8080", loopback, &public));
        assert!(host_allowed("localhost:8080", loopback, &public));
        assert!(host_allowed("stepwise.example.com", loopback, &public));
        assert!(!host_allowed("evil.example:8080", loopback, &public));
        assert!(!host_allowed("127.0.0.1:9999", loopback, &public));
        assert!(!host_allowed("10.0.0.1:8080", loopback, &public));
        assert!(!host_allowed("", loopback, &public));
        let wildcard: SocketAddr = "0.0.0.0:8080".parse().expect("address");
        assert!(host_allowed("10.0.0.1:8080", wildcard, &[]));
        assert!(!host_allowed("rebound.example:8080", wildcard, &[]));
        let v6: SocketAddr = "[::1]:8080".parse().expect("address");
        assert!(host_allowed("[::1]:8080", v6, &[]));
    }
}
