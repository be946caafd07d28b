//! The server under measurement: `stepwise_host::serve` in this process on 127.0.0.1:0.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;
use stepwise_host::config::{AuthMode, Settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

pub struct BenchServer {
    pub client: reqwest::Client,
    /// The `Authorization` header's value, with `AuthMode::Tokens`.
    pub authorization: Option<String>,
    base: String,
    data_dir: PathBuf,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl BenchServer {
    pub async fn start(data_dir: &Path) -> anyhow::Result<BenchServer> {
        BenchServer::start_with_auth(data_dir, AuthMode::None).await
    }

    /// With `AuthMode::Tokens`, the client sends an admin token made for it.
    pub async fn start_with_auth(data_dir: &Path, auth: AuthMode) -> anyhow::Result<BenchServer> {
        BenchServer::start_configured(data_dir, auth, Default::default()).await
    }

    /// With SQL data sources for the plugins to query.
    pub async fn start_configured(
        data_dir: &Path,
        auth: AuthMode,
        sources: std::collections::BTreeMap<String, stepwise_host::config::SourceConfig>,
    ) -> anyhow::Result<BenchServer> {
        BenchServer::start_tuned(data_dir, |settings| {
            settings.auth = auth;
            settings.sources = sources;
        })
        .await
    }

    /// With the default settings changed by `tune`.
    pub async fn start_tuned(
        data_dir: &Path,
        tune: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<BenchServer> {
        let mut settings = Settings::for_data_dir(data_dir);
        tune(&mut settings);
        let auth = settings.auth;
        let mut headers = reqwest::header::HeaderMap::new();
        let mut authorization = None;
        if auth == AuthMode::Tokens {
            std::fs::create_dir_all(data_dir)?;
            let store = stepwise_host::storage::Store::open(&settings.database_url).await?;
            let token = stepwise_host::auth::create_token(
                &store,
                None,
                stepwise_host::model::Role::Admin,
                "bench",
                stepwise_host::auth::TokenTerms::default(),
            )
            .await
            .map_err(|_| anyhow::anyhow!("creating the bench's token"))?;
            let value = format!("Bearer {}", token.secret);
            headers.insert(reqwest::header::AUTHORIZATION, value.parse()?);
            authorization = Some(value);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(stepwise_host::serve(listener, settings, shutdown.clone()));
        let server = BenchServer {
            client: reqwest::Client::builder()
                .default_headers(headers)
                .build()?,
            authorization,
            base,
            data_dir: data_dir.to_owned(),
            shutdown,
            task: Some(task),
        };
        let started = Instant::now();
        loop {
            let ready = server.client.get(server.url("/readyz")).send().await;
            if ready.is_ok_and(|response| response.status() == 200) {
                return Ok(server);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "server not ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn restart(mut self) -> anyhow::Result<BenchServer> {
        self.stop().await?;
        BenchServer::start(&self.data_dir).await
    }

    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.context("server task")??;
        }
        Ok(())
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.host_port()
            .parse()
            .expect("the server listens on an IP address")
    }

    /// `host:port` the server listens on.
    pub fn host_port(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn upload(&self, name: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        self.upload_to(&format!("/v1/plugins/{name}"), bytes).await
    }

    /// Uploads `bytes` as the shadow version of `name`, beside its active one.
    pub async fn upload_shadow(&self, name: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        self.upload_to(&format!("/v1/plugins/{name}?mode=shadow"), bytes)
            .await
    }

    async fn upload_to(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        let response = self
            .client
            .put(self.url(path))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await?;
        upload_answer(response).await
    }

    pub async fn upload_with_grant(
        &self,
        name: &str,
        bytes: Vec<u8>,
        grant_toml: &str,
    ) -> anyhow::Result<Value> {
        let form = reqwest::multipart::Form::new()
            .part("component", reqwest::multipart::Part::bytes(bytes))
            .text("grant", grant_toml.to_owned());
        let response = self
            .client
            .put(self.url(&format!("/v1/plugins/{name}")))
            .multipart(form)
            .send()
            .await?;
        upload_answer(response).await
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<()> {
        let response = self
            .client
            .post(self.url(&format!("/v1/runs/{id}/cancel")))
            .send()
            .await?;
        // 409: it had finished already.
        anyhow::ensure!(
            response.status().is_success() || response.status() == 409,
            "cancel failed: {}",
            response.status()
        );
        Ok(())
    }

    pub async fn attempts(&self, id: &str) -> anyhow::Result<Vec<Value>> {
        let body: Value = self
            .client
            .get(self.url(&format!("/v1/runs/{id}/attempts?limit=1000")))
            .send()
            .await?
            .json()
            .await?;
        Ok(body["attempts"].as_array().cloned().unwrap_or_default())
    }

    pub async fn trigger(&self, body: &Value) -> anyhow::Result<String> {
        let response = self
            .client
            .post(self.url("/v1/runs"))
            .json(body)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 202,
            "trigger failed: {}",
            response.status()
        );
        let run: Value = response.json().await?;
        Ok(run["id"].as_str().context("run id")?.to_owned())
    }

    pub async fn run(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .client
            .get(self.url(&format!("/v1/runs/{id}")))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Polls the run every millisecond until `done` holds.
    pub async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        self.wait_for_every(id, Duration::from_millis(1), done)
            .await
    }

    /// Polls the run every `poll` until `done` holds.
    pub async fn wait_for_every(
        &self,
        id: &str,
        poll: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let run = self.run(id).await?;
            if done(&run) {
                return Ok(run);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "run {id} stuck: {run}"
            );
            tokio::time::sleep(poll).await;
        }
    }
}

async fn upload_answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(status.is_success(), "upload failed: {status} {body}");
    Ok(body)
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 timestamp from the API.
pub fn epoch_millis(timestamp: &Value) -> anyhow::Result<f64> {
    let text = timestamp.as_str().context("a timestamp")?;
    let time = humantime::parse_rfc3339(text)?;
    Ok(time.duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0)
}

pub fn now_millis() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// `bytes` with a custom section appended: the same component, under another sha256. Custom
/// sections may appear anywhere in a component, so the result is valid and behaves the same.
pub fn with_custom_section(bytes: &[u8], payload: &str) -> Vec<u8> {
    let name = b"stepwise-bench";
    let mut section = Vec::new();
    leb128(&mut section, name.len() as u64);
    section.extend_from_slice(name);
    section.extend_from_slice(payload.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0);
    leb128(&mut out, section.len() as u64);
    out.extend_from_slice(&section);
    out
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// What a plugin call may use when it is granted nothing: no hosts, sources or secrets, and
/// the default limits.
pub fn no_capabilities() -> stepwise_host::runtime::Capabilities {
    stepwise_host::runtime::Capabilities {
        grant: stepwise_host::grant::Grant::default(),
        limits: stepwise_host::grant::Limits::default(),
        sources: stepwise_host::capabilities::sources::DataSources::default(),
        secrets: Default::default(),
        http_requests_left: 0,
    }
}
