//! A small blocking HTTP client over `wasi:http/outgoing-handler`. The host checks every request
//! against the plugin's `allowed_hosts`; a denied request comes back as
//! [`HttpError::Denied`] with a message that says so (rather than a generic connection error).

use std::fmt;

use serde::de::DeserializeOwned;

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;

/// Largest chunk written to or read from a stream in one call.
const CHUNK: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|error| {
            HttpError::Other(format!("response body is not the expected JSON: {error}"))
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused the request: the target is not in the plugin's grant.
    Denied(String),
    /// The URL could not be parsed.
    InvalidUrl(String),
    /// Connection, protocol or limit errors, with a readable description.
    Other(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(message)
            | HttpError::InvalidUrl(message)
            | HttpError::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    pub fn is_denied(&self) -> bool {
        matches!(self, HttpError::Denied(_))
    }

    fn from_code(code: ErrorCode, url: &str) -> HttpError {
        let what = match code {
            ErrorCode::HttpRequestDenied => {
                return HttpError::Denied(format!(
                    "request to {url} denied by the host (the attempt's log says why: a host outside \
                     allowed_hosts, an internal address, or a secret it may not carry there)"
                ));
            }
            ErrorCode::ConnectionRefused => "connection refused".to_owned(),
            ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::HttpResponseTimeout => "timed out".to_owned(),
            ErrorCode::HttpResponseBodySize(limit) => match limit {
                Some(limit) => {
                    format!("response body larger than the host's limit of {limit} bytes")
                }
                None => "response body larger than the host's limit".to_owned(),
            },
            ErrorCode::DnsError(_) | ErrorCode::DestinationNotFound => "host not found".to_owned(),
            other => format!("{other:?}"),
        };
        HttpError::Other(format!("request to {url} failed: {what}"))
    }
}

/// An `authorization: Bearer <secret>` header carrying the operator's secret `name`, filled in
/// by the host (see [`crate::secret`]):
///
/// ```ignore
/// let (name, value) = http::secret_header("crm");
/// let response = http::request("GET", url, &[(name, &value)], None)?;
/// ```
pub fn secret_header(name: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", crate::secret(name)))
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    request("GET", url, &[], None)
}

/// Sends one request and reads the whole response.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, HttpError> {
    let (scheme, authority, path) = split_url(url)?;
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|error| HttpError::Other(format!("header {name}: {error:?}")))?;
    }
    let request = OutgoingRequest::new(fields);
    let method = match method.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_owned()),
    };
    let invalid = |what: &str| HttpError::InvalidUrl(format!("{url}: invalid {what}"));
    request
        .set_method(&method)
        .map_err(|()| invalid("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("scheme"))?;
    request
        .set_authority(Some(&authority))
        .map_err(|()| invalid("authority"))?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| invalid("path"))?;

    let outgoing_body = match body {
        Some(_) => Some(
            request
                .body()
                .map_err(|()| HttpError::Other("request body already taken".into()))?,
        ),
        None => None,
    };
    let future =
        outgoing_handler::handle(request, None).map_err(|code| HttpError::from_code(code, url))?;
    if let (Some(outgoing_body), Some(bytes)) = (outgoing_body, body) {
        {
            let stream = outgoing_body
                .write()
                .map_err(|()| HttpError::Other("request body stream unavailable".into()))?;
            for chunk in bytes.chunks(4096) {
                stream.blocking_write_and_flush(chunk).map_err(|error| {
                    HttpError::Other(format!("writing the request body: {error:?}"))
                })?;
            }
        }
        OutgoingBody::finish(outgoing_body, None)
            .map_err(|code| HttpError::from_code(code, url))?;
    }

    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(HttpError::from_code(code, url)),
        Some(Err(())) | None => {
            return Err(HttpError::Other(format!("request to {url}: no response")));
        }
    };
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
        .collect();
    let incoming = response
        .consume()
        .map_err(|()| HttpError::Other("response body already taken".into()))?;
    let mut body = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| HttpError::Other("response body stream unavailable".into()))?;
        loop {
            match stream.blocking_read(CHUNK) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(error)) => {
                    return Err(
                        match crate::bindings::wasi::http::types::http_error_code(&error) {
                            Some(code) => HttpError::from_code(code, url),
                            None => HttpError::Other(format!(
                                "reading the response from {url}: {}",
                                error.to_debug_string()
                            )),
                        },
                    );
                }
            }
        }
    }
    drop(IncomingBody::finish(incoming));
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn split_url(url: &str) -> Result<(Scheme, String, String), HttpError> {
    let invalid = || {
        HttpError::InvalidUrl(format!(
            "{url}: expected http://host[:port]/path or https://…"
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(invalid)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(invalid()),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(index) if rest[index..].starts_with('/') => (&rest[..index], rest[index..].to_owned()),
        Some(index) => (&rest[..index], format!("/{}", &rest[index..])),
        None => (rest, "/".to_owned()),
    };
    if authority.is_empty() {
        return Err(invalid());
    }
    Ok((scheme, authority.to_owned(), path))
}
