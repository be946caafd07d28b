//! The API's connections against hostile clients: a request head must arrive within
//! `header_read_timeout_ms`, connections are capped, every route checks `Host`, `/metrics`
//! is for loopback scrapers or its own token, and TLS is served when configured.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Setup, TestServer, poll_until};

fn address(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Opens a connection and sends the start of a request head, never its end.
async fn half_sent(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connecting");
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n").as_bytes())
        .await
        .expect("sending half a request");
    stream
}

/// Whether the server closed `stream` (a read returns end of file or an error).
async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // hyper may answer 408 before closing.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn half_sent_requests_are_closed_and_the_server_answers_beside_them() {
    let server =
        TestServer::start(Setup::default().with_config("header_read_timeout_ms = 500\n")).await;
    let address = address(&server);
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(half_sent(&address).await);
    }
    // An idle keep-alive connection is closed too: it has sent no new request head.
    let mut idle = TcpStream::connect(&address).await.expect("connecting");
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .expect("a whole request");
    slow.push(idle);
    for stream in &mut slow {
        assert!(
            closed(stream, Duration::from_secs(10)).await,
            "a connection without a whole request head stayed open"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn healthz_answers_while_a_thousand_half_sent_requests_are_open() {
    let server = TestServer::start(Setup::default()).await;
    let address = address(&server);
    let mut slow = Vec::new();
    for _ in 0..1_000 {
        slow.push(half_sent(&address).await);
    }
    let response = server
        .client
        .get(server.url("/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("/healthz answers");
    assert_eq!(response.status(), 200);
    drop(slow);
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let server = TestServer::start(Setup::default().with_config("max_connections = 16\n")).await;
    let address = address(&server);
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(half_sent(&address).await);
    }
    // Accepted by the kernel, but not served while the cap is reached (a new connection:
    // the test client's pooled one is among those counted).
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("a client")
    };
    let waiting = fresh()
        .get(server.url("/healthz"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(waiting.is_err(), "served past the cap: {waiting:?}");
    drop(open);
    let served = poll_until(|| async {
        let response = fresh().get(server.url("/healthz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_some(), "not served once a connection closed");
}

#[tokio::test]
async fn every_route_checks_host() {
    let server = TestServer::start(Setup::default()).await;
    for path in [
        "/",
        "/metrics",
        "/openapi.json",
        "/healthz",
        "/v1/runs",
        "/nowhere",
    ] {
        let response = server
            .client
            .get(server.url(path))
            .header("host", "rebound.example:8080")
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 421, "{path}");
    }
}

#[tokio::test]
async fn metrics_are_for_loopback_scrapers_or_their_token() {
    // This server listens on loopback, so the test client is a loopback peer.
    let server = TestServer::start(Setup::default()).await;
    let response = server.client.get(server.url("/metrics")).send().await;
    assert_eq!(response.expect("an answer").status(), 200);

    // With a scrape token (`[metrics] token_env` names the variable holding it), anyone who
    // presents it, and no one else.
    let token = "a-scrape-token-0123456789";
    let server = TestServer::start(Setup::default().with_metrics_token(token)).await;
    let without = server.client.get(server.url("/metrics")).send().await;
    assert_eq!(without.expect("an answer").status(), 401);
    let wrong = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth("a-scrape-token-0123456780")
        .send()
        .await;
    assert_eq!(wrong.expect("an answer").status(), 401);
    let with = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .expect("an answer");
    assert_eq!(with.status(), 200);
    assert!(
        with.text()
            .await
            .unwrap_or_default()
            .contains("stepwise_runs_active")
    );
}

#[test]
fn a_metrics_token_variable_that_is_not_set_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let error = crate::support::settings_from_config(
        dir.path(),
        "[metrics]\ntoken_env = \"STEPWISE_TEST_METRICS_TOKEN_NOT_SET\"\n",
    )
    .expect_err("the variable is not set");
    assert!(
        format!("{error:#}").contains("STEPWISE_TEST_METRICS_TOKEN_NOT_SET is not set"),
        "{error:#}"
    );
}

#[tokio::test]
async fn the_api_is_served_over_tls_when_configured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("writing the key");
    let mut settings = stepwise_host::config::Settings::for_data_dir(dir.path().join("data"));
    settings.tls = Some(stepwise_host::config::TlsFiles {
        cert: cert.clone(),
        key,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding port 0");
    let port = listener.local_addr().expect("bound").port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(stepwise_host::serve(listener, settings, shutdown.clone()));
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).expect("a PEM"),
        )
        .build()
        .expect("a TLS client");
    let ready = poll_until(|| async {
        let response = client
            .get(format!("https://localhost:{port}/readyz"))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "no answer over TLS");
    // Plain HTTP on the same port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://localhost:{port}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    shutdown.cancel();
    task.await
        .expect("server task")
        .expect("server exits cleanly");
}
