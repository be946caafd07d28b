//! Sends a plugin's request over a connection the host opens itself, to one of the addresses
//! the policy has just checked. Letting a client resolve the name again would open a
//! DNS-rebinding window: the second answer may be an internal address. The name still goes
//! into TLS (SNI and certificate checks) and the `Host` header, as the server expects.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use rustls::pki_types::ServerName;

use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, WasiBody};

use crate::capabilities::wire::Io;

/// The time limits of one request, each already capped by the plugin's `http_timeout_ms`.
#[derive(Clone, Copy)]
pub(super) struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub between_bytes: Duration,
}

/// Where to send: the checked addresses, and the name the request was made for.
pub(super) struct Destination<'a> {
    pub addresses: &'a [SocketAddr],
    pub host: &'a str,
    pub tls: bool,
}

/// The same web PKI roots as wasmtime-wasi-http's own sender.
pub(in crate::capabilities) static TLS: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
});

/// Sends `request` to the first of `destination`'s addresses that accepts a connection.
/// Returns the response and a future that drives the connection until the body is read.
pub(super) async fn send(
    mut request: http::Request<WasiBody>,
    destination: Destination<'_>,
    timeouts: Timeouts,
) -> Result<
    (
        http::Response<IdleTimeoutBody>,
        impl Future<Output = Result<(), Error>> + Send + 'static,
    ),
    Error,
> {
    let stream = connect(destination.addresses, timeouts.connect).await?;
    let stream: Box<dyn Io> = if destination.tls {
        let name = match destination.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::from(ip),
            Err(_) => ServerName::try_from(destination.host.to_owned())
                .map_err(Error::InvalidDnsNameError)?,
        };
        let connector = tokio_rustls::TlsConnector::from(TLS.clone());
        let stream = tokio::time::timeout(timeouts.connect, connector.connect(name, stream))
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(stream)
    } else {
        Box::new(stream)
    };
    let (mut sender, connection) = tokio::time::timeout(
        timeouts.connect,
        hyper::client::conn::http1::Builder::new().handshake::<_, WasiBody>(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;

    // On the wire the request line carries only the path; the authority is in `Host`.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    *request.uri_mut() = path.parse().map_err(|_| Error::HttpRequestUriInvalid)?;

    // The response only arrives while the connection is driven, so both are polled together
    // until the head is in; the connection then goes back to the caller with the body.
    let mut connection = Box::pin(connection);
    let mut connection_done = false;
    let response = {
        let send = tokio::time::timeout(timeouts.first_byte, sender.send_request(request));
        let mut send = std::pin::pin!(send);
        loop {
            tokio::select! {
                response = &mut send => {
                    break response.map_err(|_| Error::ConnectionReadTimeout)??;
                }
                finished = &mut connection, if !connection_done => {
                    finished?;
                    connection_done = true;
                }
            }
        }
    };
    let io = async move {
        if !connection_done {
            connection.await.map_err(|error| {
                if error.is_timeout() {
                    Error::HttpResponseTimeout
                } else {
                    Error::from(error)
                }
            })?;
        }
        Ok(())
    };
    let response = response.map(|incoming| IdleTimeoutBody {
        incoming,
        limit: timeouts.between_bytes,
        idle: Box::pin(tokio::time::sleep(timeouts.between_bytes)),
    });
    Ok((response, io))
}

async fn connect(addresses: &[SocketAddr], timeout: Duration) -> Result<TcpStream, Error> {
    let mut last_error = Error::DestinationNotFound;
    for address in addresses {
        match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                last_error = Error::ConnectionRefused;
            }
            Ok(Err(error)) => last_error = Error::Connect(error),
            Err(_) => last_error = Error::ConnectionTimeout,
        }
    }
    Err(last_error)
}

/// A response body that fails when no data arrives for `limit`.
pub(super) struct IdleTimeoutBody {
    incoming: hyper::body::Incoming,
    limit: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl Body for IdleTimeoutBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.incoming).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + this.limit;
                this.idle.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) if error.is_timeout() => {
                Poll::Ready(Some(Err(Error::HttpResponseTimeout)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.idle.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
