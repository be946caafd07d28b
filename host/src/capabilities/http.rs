//! Outbound HTTP through `wasi:http/outgoing-handler`. Every request a plugin makes passes
//! through `send_request` below, so no guest-side client can route around the policy:
//!
//! - the scheme, host and port must be in the grant's `allowed_hosts`;
//! - a host *name* that resolves to a loopback, private, link-local or otherwise internal
//!   address is refused unless that address itself is granted (SSRF through DNS);
//! - headers that would let a plugin pose as a proxy or smuggle hop-by-hop semantics are
//!   dropped (wasmtime already refuses `host`, `connection`, `transfer-encoding`, ...);
//! - redirects are never followed here: the plugin sees the 3xx, and a client that follows it
//!   sends a new request through this same check;
//! - the run has a cap on requests, every request a time limit and every response a size
//!   limit. Exceeding one of those limits is a [`Violation`]: the attempt ends `errored`.
//!
//! A refused request returns `HTTP-request-denied` to the guest and leaves a line in the
//! attempt's log naming the host and the reason.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use http_body_util::{BodyExt, Limited};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks, default_send_request};

use super::Violation;
use super::log::LogBuffer;
use crate::model::{AllowedHost, LogLevel};

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
    pub log: LogBuffer,
    pub violation: Violation,
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

/// What kind of internal address `ip` is, if it is not a public one.
fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || v4.is_broadcast() || a == 0 {
                Some("unspecified")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (carrier-grade NAT)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_kind(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
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
    fn send_request(
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
        // The plugin may ask for shorter timeouts, never longer ones.
        let cap = |asked: Option<Duration>| Some(asked.map_or(timeout, |asked| asked.min(timeout)));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        let target = format!("{host}:{port}");
        Box::new(async move {
            if host.parse::<IpAddr>().is_err() {
                // A failed lookup is left to the real send, which reports it as a DNS error.
                let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host(&target));
                if let Ok(Ok(addresses)) = lookup.await {
                    for address in addresses {
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
            let sent = tokio::time::timeout(timeout, default_send_request(request, Some(options)));
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
            let response = response.map(|body| {
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
            Ok((response, Box::new(io) as IoFuture))
        })
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
            ("0.0.0.0", Some("unspecified")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("fd00::1", Some("private (unique local)")),
            ("fe80::1", Some("link-local")),
            ("93.184.216.34", None),
            ("2606:2800:220:1::1", None),
        ] {
            assert_eq!(internal_kind(ip.parse().expect("ip")), kind, "{ip}");
        }
    }
}
