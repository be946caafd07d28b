//! The connection layer under the router: accepts TCP connections (TLS when configured) up to
//! `max_connections` at once and serves each with hyper's HTTP/1.1 under a timer. A client
//! must send a whole request head within `header_read_timeout` of connecting or of its
//! previous response, so half-sent requests (slowloris) and idle keep-alive connections are
//! closed; a streaming response (Server-Sent Events) is not reading a head, so it is exempt
//! from that timeout, but it counts against the cap. A client that takes no byte of a response
//! for as long ([`WriteTimeout`]) is disconnected, so one that stops reading an event stream
//! holds neither its connection nor what is queued for it. At the cap, new connections wait in
//! the kernel's listen backlog, and the log says so.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{self, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::{Settings, TlsFiles};

/// The peer of the connection a request came on: `GET /metrics` without its token is for
/// loopback scrapers only.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// How often the log repeats that the connection cap is reached.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// What a connection is served with, from the settings.
pub struct Connections {
    header_read_timeout: Duration,
    max_connections: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Connections {
    /// Reads the TLS certificate and key, if configured: a bad file stops the start.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Connections> {
        Ok(Connections {
            header_read_timeout: settings.header_read_timeout,
            max_connections: settings.max_connections,
            tls: settings.tls.as_ref().map(tls_acceptor).transpose()?,
        })
    }

    /// Whether requests arrive over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accepts and serves connections until `shutdown`, then lets the open ones finish
    /// their requests (a connection waiting for a request head is closed at once).
    pub async fn serve(self, listener: TcpListener, router: Router, shutdown: CancellationToken) {
        let open = Arc::new(Semaphore::new(self.max_connections));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .keep_alive(true);
        let builder = Arc::new(builder);
        let mut cap_logged: Option<Instant> = None;
        loop {
            let permit = match open.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if cap_logged.is_none_or(|at| at.elapsed() >= CAP_LOG_EVERY) {
                        tracing::warn!(
                            max_connections = self.max_connections,
                            "connection cap reached: {} connections are open; new ones wait in \
                             the listen backlog until one closes (max_connections)",
                            self.max_connections
                        );
                        cap_logged = Some(Instant::now());
                    }
                    tokio::select! {
                        permit = open.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: the condition passes as connections
                        // close, so wait a moment rather than spin.
                        tracing::warn!("accepting a connection failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let stream = WriteTimeout::new(stream, self.header_read_timeout);
            let service = hyper::service::service_fn({
                let router = router.clone();
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(Peer(peer));
                    router.clone().oneshot(request)
                }
            });
            let builder = builder.clone();
            let tls = self.tls.clone();
            let handshake_limit = self.header_read_timeout;
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _open = permit;
                match tls {
                    None => {
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(connection).await;
                    }
                    Some(acceptor) => {
                        // The handshake has the same time limit as a request head.
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(handshake_limit, acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(connection).await;
                    }
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
    }
}

/// A connection that fails its writes once the client has taken no byte for `limit`: hyper then
/// closes it. An idle stream writes nothing and is not affected; a slow reader that takes
/// something now and then is not either.
struct WriteTimeout {
    stream: TcpStream,
    limit: Duration,
    /// Since when the socket has taken nothing, while it has not.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    fn new(stream: TcpStream, limit: Duration) -> WriteTimeout {
        WriteTimeout {
            stream,
            limit,
            stalled: None,
        }
    }

    /// What a write that the socket did not take returns: `Pending` until the limit has
    /// passed since the first such write (its timer wakes the connection to find out).
    fn waited<T>(
        &mut self,
        written: Poll<std::io::Result<T>>,
        cx: &mut task::Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no byte of the response within the write timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.waited(written, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.waited(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn tls_acceptor(files: &TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| anyhow::anyhow!("{error:?}"))
        .with_context(|| format!("reading the TLS certificate {}", files.cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "the TLS certificate file {} holds no certificate",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|error| anyhow::anyhow!("{error:?}"))
        .with_context(|| format!("reading the TLS key {}", files.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the TLS certificate and key do not go together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
