//! Outbound HTTP through `wasi:http/outgoing-handler`. Every request a plugin makes passes
//! through `send_request` below, so no guest-side client can route around the policy:
//!
//! - the scheme, host and port must be in the grant's `allowed_hosts`;
//! - the name is resolved once, every address it resolves to is checked, and the host
//!   connects to exactly those addresses itself (`connect.rs`), so a second DNS answer cannot
//!   swap in another one (DNS rebinding); a lookup that fails refuses the request;
//! - an address that is internal by the IANA special-purpose registries (loopback, private,
//!   link-local, shared, documentation, benchmarking, multicast, reserved, NAT64, ...) is
//!   refused unless that address itself is granted (SSRF through DNS);
//! - headers that would let a plugin pose as a proxy or smuggle hop-by-hop semantics are
//!   dropped (wasmtime already refuses `host`, `connection`, `transfer-encoding`, ...);
//! - redirects are never followed here: the plugin sees the 3xx, and a client that follows it
//!   sends a new request through this same check;
//! - the run has a cap on requests, a call a cap on requests in flight at once, every request
//!   a time limit and every response a size limit. Exceeding one of those limits is a
//!   [`Violation`]: the attempt ends `errored`;
//! - `TRACE` and `CONNECT` are refused, and the operator's secrets are set at their places
//!   for a granted plugin's requests to their hosts (`secrets.rs`); every response is
//!   redacted of their values before the guest reads it.
//!
//! A refused request returns `HTTP-request-denied` to the guest and leaves a line in the
//! attempt's log naming the host and the reason.

pub(super) mod connect;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http_body_util::{BodyExt, Limited};
use tokio::sync::Semaphore;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::Violation;
use super::log::LogBuffer;
use super::recording::{self, Tape};
use super::secrets::{SecretSet, StreamRedactor};
use crate::grant::AllowedHost;
use crate::model::LogLevel;

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), Error>> + Send>;

/// Request headers removed before a request leaves: they describe proxies and the path a
/// request took, which is the host's to say, not a plugin's.
const DROPPED_HEADERS: [&str; 8] = [
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "te",
    "trailer",
];

/// The HTTP policy of one step call.
pub struct HttpPolicy {
    pub allowed_hosts: Vec<AllowedHost>,
    pub response_limit_bytes: usize,
    pub timeout: Duration,
    /// The run's cap, and how many requests it may still make.
    pub requests_per_run: u32,
    pub requests_left: u32,
    /// Requests this call made (sent or refused), added to the run's count afterwards.
    pub requests_made: u32,
    /// Requests of this call in flight at once (`http_concurrent_requests`); a permit is
    /// held from sending until the response body is done.
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub log: LogBuffer,
    pub violation: Violation,
    /// The host's secrets, and the names this plugin is granted.
    pub secrets: Arc<SecretSet>,
    pub granted_secrets: Vec<String>,
    /// The step call's trace context, set on every request so the system under check joins
    /// the run's trace; `None` without OpenTelemetry.
    pub traceparent: Option<http::HeaderValue>,
    pub tape: Tape,
}

impl HttpPolicy {
    /// Parses the grant's entries; the registry validated them, so a bad one is skipped.
    pub fn allowed(entries: &[String]) -> Vec<AllowedHost> {
        entries
            .iter()
            .filter_map(|entry| AllowedHost::parse(entry).ok())
            .collect()
    }

    fn deny(&self, uri: &http::Uri, reason: &str) -> SendFuture {
        self.log.push(
            LogLevel::Warn,
            &format!("http request to {uri} denied: {reason}"),
        );
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}

/// Scheme, host (lowercase, no IPv6 brackets) and port of a request, default port filled in.
fn target(uri: &http::Uri) -> Option<(String, String, u16)> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = uri.port_u16().or(match scheme.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    })?;
    Some((scheme, host, port))
}

/// IPv4 blocks of the IANA special-purpose address registry that are not globally reachable
/// (or not unicast), with what they are.
const INTERNAL_V4: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 8, "unspecified (this network)"),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 64, 0, 0], 10, "shared (carrier-grade NAT)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 0, 0, 0], 24, "IETF protocol assignments"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 31, 196, 0], 24, "AS112"),
    ([192, 52, 193, 0], 24, "AMT"),
    ([192, 88, 99, 0], 24, "6to4 relay anycast"),
    ([192, 168, 0, 0], 16, "private"),
    ([192, 175, 48, 0], 24, "AS112"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

/// The same for IPv6. Blocks that embed an IPv4 address (mapped, NAT64, 6to4, Teredo) are
/// internal too: the host could not tell where they lead.
const INTERNAL_V6: &[([u16; 8], u8, &str)] = &[
    (
        [0, 0, 0, 0, 0, 0, 0, 0],
        96,
        "IPv4-compatible (deprecated) or unspecified",
    ),
    ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped"),
    ([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, "NAT64"),
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64"),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    (
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments (Teredo, benchmarking, ORCHID)",
    ),
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
    ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4"),
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
    ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "segment routing"),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "private (unique local)"),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (deprecated)"),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

/// What kind of internal address `ip` is, if it is not a public one.
fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4 == Ipv4Addr::BROADCAST {
                return Some("broadcast");
            }
            let address = u32::from(v4);
            INTERNAL_V4.iter().find_map(|(network, prefix, kind)| {
                let mask = u32::MAX << (32 - u32::from(*prefix));
                (address & mask == u32::from_be_bytes(*network) & mask).then_some(*kind)
            })
        }
        IpAddr::V6(v6) => {
            if v6 == Ipv6Addr::LOCALHOST {
                return Some("loopback");
            }
            let address = u128::from(v6);
            INTERNAL_V6.iter().find_map(|(network, prefix, kind)| {
                let mask = u128::MAX << (128 - u32::from(*prefix));
                (address & mask == u128::from(Ipv6Addr::from(*network)) & mask).then_some(*kind)
            })
        }
    }
}

fn is_timeout(error: &Error) -> bool {
    matches!(
        error,
        Error::ConnectionTimeout
            | Error::ConnectionReadTimeout
            | Error::ConnectionWriteTimeout
            | Error::HttpResponseTimeout
    )
}

impl WasiHttpHooks for HttpPolicy {
    /// Sends the request, or, on a call's tape, records it with its answer or answers it
    /// from the recording. A request is recorded as the plugin made it: before the host
    /// places secrets and its own headers. A recorded exchange streams as a live one does;
    /// copies of the bodies (their first [`RECORDED_BODY_BYTES`] each) are taken as they pass.
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: IoFuture,
    ) -> SendFuture {
        if self.tape.is_off() {
            return self.send_live(request, options, fut);
        }
        let tape = self.tape.clone();
        if tape.is_replaying() {
            drop(fut);
            self.requests_made += 1;
            let (parts, body) = request.into_parts();
            let head = request_head(&parts);
            return Box::new(async move {
                // The plugin's body, as it writes it; nothing is sent anywhere.
                let request = with_body(head, &first_bytes(body).await?);
                let answer = tape
                    .answer("http", &request)
                    .map_err(|mismatch| Error::InternalError(Some(mismatch.to_string())))?;
                if answer.get("Pending").is_some() {
                    // Unanswered when it was recorded: it waits as long now.
                    std::future::pending::<()>().await;
                }
                if answer["Ok"]["body"]["truncated"] == true {
                    let cut = tape.mismatch(format!(
                        "the recorded response to {} was kept only to its first {RECORDED_BODY_BYTES} bytes",
                        recording::describe("http", &request)
                    ));
                    return Err(Error::InternalError(Some(cut.to_string())));
                }
                replayed_response(&answer)
            });
        }
        // Its place among the call's exchanges is taken now, in the order the plugin made it.
        let (parts, body) = request.into_parts();
        let Some(slot) = tape.reserve_waiting("http", request_head(&parts)) else {
            return self.send_live(http::Request::from_parts(parts, body), options, fut);
        };
        let exchange = Arc::new(std::sync::Mutex::new(RecordedExchange {
            tape,
            slot,
            secrets: self.secrets.clone(),
            head: request_head(&parts),
            sent: Vec::new(),
            done: false,
        }));
        let body = Teed {
            inner: body,
            exchange: exchange.clone(),
        };
        let request = http::Request::from_parts(parts, body.boxed_unsync());
        let live = Box::into_pin(self.send_live(request, options, fut));
        Box::new(async move {
            let (response, io) = match live.await {
                Ok(sent) => sent,
                Err(error) => {
                    record(
                        &exchange,
                        serde_json::json!({ "Err": format!("{error:?}") }),
                    );
                    return Err(error);
                }
            };
            let (parts, body) = response.into_parts();
            let body = RecordedBody {
                inner: body,
                status: parts.status.as_u16(),
                headers: header_pairs(&parts.headers),
                received: Vec::new(),
                truncated: false,
                exchange,
            };
            Ok((http::Response::from_parts(parts, body.boxed_unsync()), io))
        })
    }
}

impl HttpPolicy {
    fn send_live(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: IoFuture,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri().clone();
        self.requests_made += 1;
        if self.requests_left == 0 {
            let limit = format!(
                "http request limit of {} per run exceeded",
                self.requests_per_run
            );
            let denied = self.deny(&uri, &limit);
            self.violation.record(limit);
            return denied;
        }
        self.requests_left -= 1;
        let Some((scheme, host, port)) = target(&uri) else {
            return self.deny(&uri, "the URL has no host");
        };
        if !self
            .allowed_hosts
            .iter()
            .any(|allowed| allowed.allows(&scheme, &host, port))
        {
            let reason = format!("{scheme}://{host}:{port} is not in this plugin's allowed_hosts");
            return self.deny(&uri, &reason);
        }
        if matches!(
            request.method(),
            &http::Method::TRACE | &http::Method::CONNECT
        ) {
            let reason = format!(
                "method {} is refused: a server answers it with the request it received, or \
                 opens a tunnel the host cannot check",
                request.method()
            );
            return self.deny(&uri, &reason);
        }
        if let Err(refusal) =
            self.secrets
                .place(&mut request, &self.granted_secrets, (&scheme, &host, port))
        {
            return self.deny(&uri, &refusal.0);
        }
        for name in DROPPED_HEADERS {
            if request
                .headers_mut()
                .remove(HeaderName::from_static(name))
                .is_some()
            {
                self.log.push(
                    LogLevel::Warn,
                    &format!(
                        "http request to {uri}: header {name:?} dropped (plugins may not set it)"
                    ),
                );
            }
        }
        if let Some(traceparent) = &self.traceparent {
            request
                .headers_mut()
                .insert(HeaderName::from_static("traceparent"), traceparent.clone());
        }
        // Internal addresses the grant names literally, e.g. `127.0.0.1:9000`.
        let granted_addresses: Vec<IpAddr> = self
            .allowed_hosts
            .iter()
            .filter(|allowed| allowed.port == port)
            .filter_map(|allowed| allowed.host.parse().ok())
            .collect();
        let timeout = self.timeout;
        let limit = self.response_limit_bytes;
        let log = self.log.clone();
        let violation = self.violation.clone();
        let secrets = self.secrets.clone();
        // The plugin may ask for shorter timeouts, never longer ones.
        let cap = |asked: Option<Duration>| Some(asked.map_or(timeout, |asked| asked.min(timeout)));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        let target = format!("{host}:{port}");
        let timeouts = connect::Timeouts {
            connect: options.connect_timeout.unwrap_or(timeout),
            first_byte: options.first_byte_timeout.unwrap_or(timeout),
            between_bytes: options.between_bytes_timeout.unwrap_or(timeout),
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let limit = format!(
                "http limit of {} requests in flight at once exceeded",
                self.max_in_flight
            );
            let denied = self.deny(&uri, &limit);
            self.violation.record(limit);
            return denied;
        };
        Box::new(async move {
            let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => {
                    let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host(&target));
                    let failed = |why: String| {
                        log.push(
                            LogLevel::Warn,
                            &format!("http request to {uri} denied: {why}"),
                        );
                    };
                    match lookup.await {
                        Ok(Ok(found)) => found.collect(),
                        Ok(Err(error)) => {
                            failed(format!("looking up {host} failed: {error}"));
                            return Err(Error::DnsError {
                                rcode: Some(error.to_string()),
                                info_code: None,
                            });
                        }
                        Err(_) => {
                            failed(format!(
                                "looking up {host} took longer than {} ms",
                                timeout.as_millis()
                            ));
                            return Err(Error::DnsTimeout);
                        }
                    }
                }
            };
            if addresses.is_empty() {
                log.push(
                    LogLevel::Warn,
                    &format!("http request to {uri} denied: {host} resolves to no address"),
                );
                return Err(Error::DestinationNotFound);
            }
            for address in &addresses {
                let ip = address.ip();
                if let Some(kind) = internal_kind(ip)
                    && !granted_addresses.contains(&ip)
                {
                    log.push(
                        LogLevel::Warn,
                        &format!(
                            "http request to {uri} denied: {host} resolves to {ip}, a {kind} address that this plugin's allowed_hosts do not name"
                        ),
                    );
                    return Err(Error::HttpRequestDenied);
                }
            }
            let time_limit = || {
                let limit = format!("http timeout of {} ms exceeded", timeout.as_millis());
                log.push(
                    LogLevel::Warn,
                    &format!("http request to {target}: {limit}"),
                );
                violation.record(limit);
            };
            let destination = connect::Destination {
                addresses: &addresses,
                host: &host,
                tls: scheme == "https",
            };
            let sent = tokio::time::timeout(timeout, connect::send(request, destination, timeouts));
            let (response, io) = match sent.await {
                Ok(Ok(sent)) => sent,
                Ok(Err(error)) => {
                    if is_timeout(&error) {
                        time_limit();
                    }
                    return Err(error);
                }
                Err(_elapsed) => {
                    time_limit();
                    return Err(Error::ConnectionTimeout);
                }
            };
            // The permit goes with the connection: the request is in flight until its body
            // has been read or dropped.
            let io = async move {
                let result = io.await;
                drop(permit);
                result
            };
            let mut response = response.map(|body| {
                Limited::new(body, limit)
                    .map_err(move |error| match error.downcast::<Error>() {
                        Ok(inner) => {
                            if is_timeout(&inner) {
                                let message =
                                    format!("http timeout of {} ms exceeded", timeout.as_millis());
                                log.push(
                                    LogLevel::Warn,
                                    &format!("http response from {target}: {message}"),
                                );
                                violation.record(message);
                            }
                            *inner
                        }
                        Err(_too_large) => {
                            let message =
                                format!("http response size limit of {limit} bytes exceeded");
                            log.push(
                                LogLevel::Warn,
                                &format!("http response from {target}: {message}"),
                            );
                            violation.record(message);
                            Error::HttpResponseBodySize(Some(limit as u64))
                        }
                    })
                    .boxed_unsync()
            });
            if !secrets.is_empty() {
                response = redacted(response, secrets);
            }
            Ok((response, Box::new(io) as IoFuture))
        })
    }
}

/// A request as recorded, without its body: method, URL and headers as the plugin set them.
fn request_head(parts: &http::request::Parts) -> serde_json::Value {
    serde_json::json!({
        "method": parts.method.as_str(),
        "url": parts.uri.to_string(),
        "headers": header_pairs(&parts.headers),
    })
}

fn with_body(mut head: serde_json::Value, body: &[u8]) -> serde_json::Value {
    head["body"] = recording::body_json(body);
    head
}

fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect()
}

/// The recorded answer to a request, as the response (or error) the plugin gets.
fn replayed_response(
    answer: &serde_json::Value,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let Some(recorded) = answer.get("Ok") else {
        let error = answer["Err"].as_str().unwrap_or_default();
        return Err(match error {
            "HttpRequestDenied" => Error::HttpRequestDenied,
            "ConnectionRefused" => Error::ConnectionRefused,
            "ConnectionTimeout" => Error::ConnectionTimeout,
            "DnsTimeout" => Error::DnsTimeout,
            "DestinationNotFound" => Error::DestinationNotFound,
            "HttpResponseTimeout" => Error::HttpResponseTimeout,
            "ConnectionReadTimeout" => Error::ConnectionReadTimeout,
            "ConnectionWriteTimeout" => Error::ConnectionWriteTimeout,
            "ConnectionTerminated" => Error::ConnectionTerminated,
            "DestinationUnavailable" => Error::DestinationUnavailable,
            "HttpResponseIncomplete" => Error::HttpResponseIncomplete,
            other => Error::InternalError(Some(format!("recorded: {other}"))),
        });
    };
    let status = recorded["status"]
        .as_u64()
        .and_then(|status| http::StatusCode::from_u16(status as u16).ok())
        .ok_or_else(|| Error::InternalError(Some("recorded response has no status".into())))?;
    let mut response = http::Response::builder().status(status);
    for pair in recorded["headers"].as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (pair[0].as_str(), pair[1].as_str()) else {
            continue;
        };
        // The body below is whole: its length is its own.
        if !name.eq_ignore_ascii_case("content-length")
            && !name.eq_ignore_ascii_case("transfer-encoding")
        {
            response = response.header(name, value);
        }
    }
    let body =
        http_body_util::Full::new(bytes::Bytes::from(recording::body_bytes(&recorded["body"])))
            .map_err(|never| match never {})
            .boxed_unsync();
    let response = response
        .body(body)
        .map_err(|error| Error::InternalError(Some(format!("recorded response: {error}"))))?;
    Ok((response, Box::new(async { Ok(()) }) as IoFuture))
}

/// The most of a body (request or response) a recording keeps, and a replay compares: a
/// plugin may stream a body of any length, and the copy is the host's memory.
const RECORDED_BODY_BYTES: usize = 1 << 20;

/// The first [`RECORDED_BODY_BYTES`] of `body`, read to its end.
async fn first_bytes(mut body: WasiBody) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            keep_first(&mut bytes, data);
        }
    }
    Ok(bytes)
}

/// Appends what of `data` fits in [`RECORDED_BODY_BYTES`]; whether all of it did.
fn keep_first(kept: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = RECORDED_BODY_BYTES.saturating_sub(kept.len());
    kept.extend_from_slice(&data[..data.len().min(room)]);
    data.len() <= room
}

/// One recorded request, until its answer is known: the response's end, its failure, or the
/// plugin dropping it.
struct RecordedExchange {
    tape: Tape,
    slot: usize,
    secrets: Arc<SecretSet>,
    head: serde_json::Value,
    /// What of the request body has been sent.
    sent: Vec<u8>,
    done: bool,
}

/// Records the exchange with `response`, once.
fn record(exchange: &std::sync::Mutex<RecordedExchange>, response: serde_json::Value) {
    let mut exchange = exchange.lock().unwrap_or_else(|poison| poison.into_inner());
    if std::mem::replace(&mut exchange.done, true) {
        return;
    }
    // Redacted as bytes: a body that is not UTF-8 is recorded in base64, which the
    // recording's own redaction of text cannot see into. A request that failed is recorded
    // without its body, which the host may not have read: its replay matches any body.
    let sent = std::mem::take(&mut exchange.sent);
    let request = match response.get("Err") {
        Some(_) => exchange.head.take(),
        None => with_body(exchange.head.take(), &exchange.secrets.redact_bytes(&sent)),
    };
    exchange.tape.fill(exchange.slot, "http", request, response);
}

/// A request body that keeps a copy of what it sends, for the recording.
struct Teed {
    inner: WasiBody,
    exchange: Arc<std::sync::Mutex<RecordedExchange>>,
}

impl http_body::Body for Teed {
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(context);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let mut exchange = this
                .exchange
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if !exchange.done {
                keep_first(&mut exchange.sent, data);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that streams to the plugin as it arrives and keeps a copy of it; the
/// exchange is recorded when it ends, fails, or is dropped unread (then as `incomplete`).
struct RecordedBody {
    inner: WasiBody,
    status: u16,
    headers: Vec<(String, String)>,
    received: Vec<u8>,
    truncated: bool,
    exchange: Arc<std::sync::Mutex<RecordedExchange>>,
}

impl RecordedBody {
    fn record(&mut self, incomplete: bool) {
        let secrets = {
            let exchange = self
                .exchange
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if exchange.done {
                return;
            }
            exchange.secrets.clone()
        };
        let received = std::mem::take(&mut self.received);
        let mut body = recording::body_json(&secrets.redact_bytes(&received));
        if self.truncated {
            body["truncated"] = true.into();
        }
        if incomplete {
            body["incomplete"] = true.into();
        }
        let response = serde_json::json!({ "Ok": {
            "status": self.status,
            "headers": std::mem::take(&mut self.headers),
            "body": body,
        }});
        record(&self.exchange, response);
    }
}

impl http_body::Body for RecordedBody {
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    if !keep_first(&mut this.received, data) {
                        this.truncated = true;
                    }
                }
                // Trailers end the body (wasmtime reads no further); they are not recorded.
                None => this.record(false),
            },
            Poll::Ready(Some(Err(error))) => {
                record(
                    &this.exchange,
                    serde_json::json!({ "Err": format!("{error:?}") }),
                );
            }
            Poll::Ready(None) => this.record(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordedBody {
    fn drop(&mut self) {
        self.record(true);
    }
}

/// `response` with the values of secrets taken out of its headers and body before the guest
/// reads any of it: a system that echoes what it received (a header, the query) would
/// otherwise hand the plugin a value, which it could transform past every later redaction.
/// The body's length may change, so its `content-length` goes.
fn redacted(
    response: http::Response<WasiBody>,
    secrets: Arc<SecretSet>,
) -> http::Response<WasiBody> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    redact_headers(&mut parts.headers, &secrets);
    let body = RedactedBody {
        inner: body,
        redactor: StreamRedactor::new(secrets.clone()),
        secrets,
        trailers: None,
        ended: false,
    };
    http::Response::from_parts(parts, body.boxed_unsync())
}

fn redact_headers(headers: &mut http::HeaderMap, secrets: &SecretSet) {
    for value in headers.values_mut() {
        if let std::borrow::Cow::Owned(redacted) = secrets.redact_bytes(value.as_bytes()) {
            // Placeholders are plain ASCII: a valid value stays valid.
            if let Ok(redacted) = http::HeaderValue::from_bytes(&redacted) {
                *value = redacted;
            }
        }
    }
}

/// A response body redacted as it streams (see [`StreamRedactor`]); trailers too.
struct RedactedBody {
    inner: WasiBody,
    redactor: StreamRedactor,
    secrets: Arc<SecretSet>,
    /// Trailers held back until the redacted rest of the body has gone out.
    trailers: Option<http::HeaderMap>,
    ended: bool,
}

impl http_body::Body for RedactedBody {
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let frame = match std::pin::Pin::new(&mut this.inner).poll_frame(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    this.ended = true;
                    let rest = this.redactor.finish();
                    if rest.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::data(rest.into()))));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => this.redactor.push(&data),
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        redact_headers(&mut trailers, &this.secrets);
                        this.trailers = Some(trailers);
                    }
                    this.redactor.finish()
                }
            };
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(data.into()))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_fills_in_default_ports_and_normalises_hosts() {
        let target = |uri: &str| super::target(&uri.parse().expect("uri"));
        assert_eq!(
            target("http://Example.com/x"),
            Some(("http".into(), "example.com".into(), 80))
        );
        assert_eq!(
            target("https://example.com/"),
            Some(("https".into(), "example.com".into(), 443))
        );
        assert_eq!(
            target("http://[::1]:9000/a"),
            Some(("http".into(), "::1".into(), 9000))
        );
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for (ip, kind) in [
            ("127.0.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("192.168.0.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("100.64.0.1", Some("shared (carrier-grade NAT)")),
            ("0.0.0.0", Some("unspecified (this network)")),
            ("192.0.0.170", Some("IETF protocol assignments")),
            ("198.19.255.1", Some("benchmarking")),
            ("240.0.0.1", Some("reserved")),
            ("255.255.255.255", Some("broadcast")),
            ("224.0.0.251", Some("multicast")),
            ("172.15.255.255", None),
            ("172.16.0.1", Some("private")),
            ("::1", Some("loopback")),
            ("::", Some("IPv4-compatible (deprecated) or unspecified")),
            ("::ffff:127.0.0.1", Some("IPv4-mapped")),
            ("::ffff:8.8.8.8", Some("IPv4-mapped")),
            ("64:ff9b::7f00:1", Some("NAT64")),
            ("2002:7f00:1::", Some("6to4")),
            ("2001:db8::1", Some("documentation")),
            ("fd00::1", Some("private (unique local)")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("93.184.216.34", None),
            ("8.8.8.8", None),
            ("2606:2800:220:1::1", None),
        ] {
            assert_eq!(internal_kind(ip.parse().expect("ip")), kind, "{ip}");
        }
    }
}
