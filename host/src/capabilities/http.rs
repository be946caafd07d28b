//! Outbound HTTP through `wasi:http/outgoing-handler`. The plugin's grant lists the `host:port`
//! pairs it may call; the check happens here, in the hook every request passes through, so no
//! guest-side client can route around it. A denied request returns `HTTP-request-denied` to the
//! guest and leaves a line in the attempt's log naming the host and the reason.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks, default_send_request};

use super::log::LogBuffer;
use crate::model::LogLevel;

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), Error>> + Send>;

/// The HTTP policy of one step call.
pub struct HttpPolicy {
    /// `host:port` pairs from the grant.
    pub allowed_hosts: Vec<String>,
    pub response_limit_bytes: usize,
    pub timeout: Duration,
    pub log: LogBuffer,
}

impl HttpPolicy {
    /// `host:port` of a request URI, with the scheme's default port filled in.
    fn target(uri: &http::Uri) -> Option<String> {
        let host = uri.host()?;
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })?;
        Some(format!("{host}:{port}"))
    }
}

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: IoFuture,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri().clone();
        let Some(target) = Self::target(&uri).filter(|target| self.allowed_hosts.contains(target))
        else {
            self.log.push(
                LogLevel::Warn,
                &format!(
                    "http request to {uri} denied: {} is not in this plugin's allowed_hosts",
                    Self::target(&uri).unwrap_or_else(|| "an unknown host".into())
                ),
            );
            return Box::new(async { Err(Error::HttpRequestDenied) });
        };
        let timeout = self.timeout;
        let limit = self.response_limit_bytes;
        let log = self.log.clone();
        // The plugin may ask for shorter timeouts, never longer ones.
        let cap = |asked: Option<Duration>| Some(asked.map_or(timeout, |asked| asked.min(timeout)));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        Box::new(async move {
            let sent = tokio::time::timeout(timeout, default_send_request(request, Some(options)));
            let (response, io) = match sent.await {
                Ok(result) => result?,
                Err(_elapsed) => {
                    log.push(
                        LogLevel::Warn,
                        &format!(
                            "http request to {target} exceeded the time limit of {} ms",
                            timeout.as_millis()
                        ),
                    );
                    return Err(Error::ConnectionTimeout);
                }
            };
            let response = response.map(|body| {
                Limited::new(body, limit)
                    .map_err(move |error| match error.downcast::<Error>() {
                        Ok(inner) => *inner,
                        Err(_too_large) => {
                            log.push(
                                LogLevel::Warn,
                                &format!("http response from {target} exceeded the limit of {limit} bytes"),
                            );
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
    fn target_fills_in_default_ports() {
        let target = |uri: &str| HttpPolicy::target(&uri.parse().expect("uri"));
        assert_eq!(
            target("http://example.com/x").as_deref(),
            Some("example.com:80")
        );
        assert_eq!(
            target("https://example.com/").as_deref(),
            Some("example.com:443")
        );
        assert_eq!(
            target("http://127.0.0.1:9000/a").as_deref(),
            Some("127.0.0.1:9000")
        );
    }
}
