//! The test harness: `TestServer` (a real server in-process on port 0 over a temp data dir),
//! plugin installation, a controllable HTTP endpoint, and polling with deadlines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stepwise_host::config::{AuthMode, ServeArgs, Settings, SourceConfig};
use stepwise_host::model::Role;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

/// How long any "eventually" assertion waits before failing.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Whether the toolchain for `lang` is installed for the suite (its variable is set); says
/// SKIPPED, naming `what` and the variable, when it is not.
pub fn toolchain_installed(lang: stepwise_host::scaffold::Lang, what: &Path) -> bool {
    use stepwise_host::scaffold::Lang;
    let (variable, tool) = match lang {
        Lang::Python => ("STEPWISE_COMPONENTIZE_PY", "componentize-py 0.25.x"),
        Lang::Javascript => ("STEPWISE_COMPONENTIZE_JS", "componentize-js 0.23.x"),
        Lang::Rust => return true,
    };
    if std::env::var_os(variable).is_none_or(|value| value.is_empty()) {
        eprintln!(
            "SKIPPED: the {lang:?} check in {}; set {variable} to {tool}'s executable (.ci/run \
             installs it under ~/.cache/stepwise/tools)",
            what.display()
        );
        return false;
    }
    true
}

/// `path` inside this repository.
pub fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A check in another language, built by `stepwise plugin build` with the toolchain that
/// `.ci/run` installs, once per test process: the component's path, or `None` after saying
/// SKIPPED when the toolchain's variable is unset (the Rust-only set-up has neither).
pub async fn built_in(lang: stepwise_host::scaffold::Lang, dir: &Path) -> Option<PathBuf> {
    if !toolchain_installed(lang, dir) {
        return None;
    }
    static BUILT: std::sync::Mutex<BTreeMap<PathBuf, Arc<tokio::sync::OnceCell<PathBuf>>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let cell = BUILT
        .lock()
        .expect("the build table")
        .entry(dir.to_owned())
        .or_default()
        .clone();
    let path = cell
        .get_or_init(|| async {
            let source = dir.to_owned();
            tokio::task::spawn_blocking(move || stepwise_host::plugin_build::build(&source))
                .await
                .expect("the build task")
                .unwrap_or_else(|error| {
                    panic!("stepwise plugin build {}: {error:#}", dir.display())
                })
        })
        .await;
    Some(path.clone())
}

/// A plugin to install into the data dir before the server starts.
pub struct PluginFile {
    pub name: &'static str,
    pub wasm: PathBuf,
    pub manifest: String,
}

impl PluginFile {
    pub fn new(
        name: &'static str,
        wasm: impl Into<PathBuf>,
        manifest: impl Into<String>,
    ) -> PluginFile {
        PluginFile {
            name,
            wasm: wasm.into(),
            manifest: manifest.into(),
        }
    }

    pub fn misbehave(manifest: impl Into<String>) -> PluginFile {
        PluginFile::new("misbehave", MISBEHAVE_WASM, manifest)
    }
}

/// The server's configuration beyond the defaults.
#[derive(Default)]
pub struct Setup {
    pub plugins: Vec<PluginFile>,
    pub sources: BTreeMap<String, SourceConfig>,
    pub scheduling: Scheduling,
    /// A `stepwise.toml` for the server, read the way `stepwise serve --config` reads it.
    pub config: Option<String>,
    pub auth: Option<AuthMode>,
    /// The scrape token of `GET /metrics` (what `[metrics] token_env` would read).
    pub metrics_token: Option<String>,
}

/// What a server is started with, kept for its restarts and its other nodes.
#[derive(Clone)]
struct Boot {
    sources: BTreeMap<String, SourceConfig>,
    scheduling: Scheduling,
    config: Option<String>,
    auth: Option<AuthMode>,
    metrics_token: Option<String>,
}

/// How a node schedules; the defaults keep the suite fast.
#[derive(Debug, Clone, Copy)]
pub struct Scheduling {
    pub max_concurrent_ticks: usize,
    /// How long the scheduler sleeps at most without a wake-up.
    pub backstop: Duration,
}

impl Default for Scheduling {
    fn default() -> Scheduling {
        Scheduling {
            max_concurrent_ticks: Settings::for_data_dir(".").max_concurrent_ticks,
            backstop: Duration::from_millis(200),
        }
    }
}

impl Setup {
    pub fn with_plugin(mut self, plugin: PluginFile) -> Setup {
        self.plugins.push(plugin);
        self
    }

    pub fn with_config(mut self, config: &str) -> Setup {
        self.config = Some(config.to_owned());
        self
    }

    pub fn with_metrics_token(mut self, token: &str) -> Setup {
        self.metrics_token = Some(token.to_owned());
        self
    }

    pub fn with_auth(mut self, auth: AuthMode) -> Setup {
        self.auth = Some(auth);
        self
    }

    /// A message source: `kind` (`nats`) at `url`, with a tap window of `window_mib`.
    pub fn with_bus(mut self, name: &str, kind: &str, url: String, window_mib: usize) -> Setup {
        self.sources.insert(
            name.to_owned(),
            SourceConfig {
                kind: Some(kind.to_owned()),
                window_bytes: window_mib << 20,
                ..SourceConfig::new(url)
            },
        );
        self
    }

    pub fn with_source(mut self, name: &str, url: String, read_only: bool) -> Setup {
        self.sources.insert(
            name.to_owned(),
            SourceConfig {
                read_only,
                ..SourceConfig::new(url)
            },
        );
        self
    }
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    data_dir: Arc<TempDir>,
    database: Arc<TestDatabase>,
    boot: Boot,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(setup: Setup) -> TestServer {
        let data_dir = Arc::new(tempfile::tempdir().expect("creating a temp dir"));
        let plugins_dir = data_dir.path().join("plugins");
        std::fs::create_dir_all(&plugins_dir).expect("creating the plugins dir");
        for plugin in &setup.plugins {
            std::fs::copy(
                &plugin.wasm,
                plugins_dir.join(format!("{}.wasm", plugin.name)),
            )
            .expect("copying a plugin");
            std::fs::write(
                plugins_dir.join(format!("{}.toml", plugin.name)),
                &plugin.manifest,
            )
            .expect("writing a manifest");
        }
        let database = Arc::new(TestDatabase::create(data_dir.path()).await);
        let boot = Boot {
            sources: setup.sources,
            scheduling: setup.scheduling,
            config: setup.config,
            auth: setup.auth,
            metrics_token: setup.metrics_token,
        };
        TestServer::boot(data_dir, database, boot).await
    }

    /// Another node on this server's database, with a data dir (and plugins dir) of its own.
    #[cfg_attr(not(postgres_suite), allow(dead_code))]
    pub async fn another_node(&self, scheduling: Scheduling) -> TestServer {
        let data_dir = Arc::new(tempfile::tempdir().expect("creating a temp dir"));
        let boot = Boot {
            scheduling,
            ..self.boot.clone()
        };
        TestServer::boot(data_dir, self.database.clone(), boot).await
    }

    async fn boot(data_dir: Arc<TempDir>, database: Arc<TestDatabase>, boot: Boot) -> TestServer {
        // Through the test writer, so that only a failing test's server logs are shown.
        let filter = tracing_subscriber::EnvFilter::try_from_env("STEPWISE_LOG")
            .unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let mut settings = match &boot.config {
            Some(text) => {
                let path = data_dir.path().join("stepwise.toml");
                std::fs::write(&path, text).expect("writing stepwise.toml");
                Settings::from_args(&ServeArgs {
                    listen: None,
                    data_dir: Some(data_dir.path().to_owned()),
                    database_url: Some(database.url.clone()),
                    config: Some(path),
                    auth: boot.auth,
                    tls_cert: None,
                    tls_key: None,
                })
                .expect("a valid test config")
            }
            None => Settings::for_data_dir(data_dir.path()),
        };
        settings.sources.extend(
            boot.sources
                .iter()
                .map(|(name, source)| (name.clone(), source.clone())),
        );
        settings.database_url = database.url.clone();
        if let Some(auth) = boot.auth {
            settings.auth = auth;
        }
        settings.metrics_token = boot.metrics_token.clone();
        let scheduling = boot.scheduling;
        // Short ticks keep the suite fast; the behaviour under test does not depend on them.
        settings.default_poll_interval = Duration::from_millis(100);
        settings.scheduler_backstop = scheduling.backstop;
        settings.max_concurrent_ticks = scheduling.max_concurrent_ticks;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding port 0");
        let base = format!("http://{}", listener.local_addr().expect("bound address"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(stepwise_host::serve(listener, settings, shutdown.clone()));
        let server = TestServer {
            base,
            client: reqwest::Client::new(),
            data_dir,
            database,
            boot,
            shutdown,
            task: Some(task),
        };
        server.wait_until_ready().await;
        server
    }

    async fn wait_until_ready(&self) {
        let ready = poll_until(|| async {
            let response = self.client.get(self.url("/readyz")).send().await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "server did not become ready within {DEADLINE:?}"
        );
    }

    /// Stops the server gracefully and starts a new one on the same data dir.
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        TestServer::boot(
            self.data_dir.clone(),
            self.database.clone(),
            self.boot.clone(),
        )
        .await
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server exits cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /v1/runs` with a JSON body; returns status and body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        read(response).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .delete(self.url(path))
            .send()
            .await
            .expect("request");
        read(response).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        read(response).await
    }

    /// `PUT` of a raw body with the given content type; returns status and body.
    pub async fn put_body(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .client
            .put(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        read(response).await
    }

    /// Uploads component bytes as `name` (`PUT /v1/plugins/{name}`, `application/wasm`).
    pub async fn upload(&self, name: &str, component: Vec<u8>) -> (u16, Value) {
        self.put_body(
            &format!("/v1/plugins/{name}"),
            "application/wasm",
            component,
        )
        .await
    }

    /// Uploads component bytes with a grant (multipart: `component` + `grant` as TOML).
    pub async fn upload_with_grant(
        &self,
        name: &str,
        component: Vec<u8>,
        grant_toml: &str,
    ) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .part(
                "component",
                reqwest::multipart::Part::bytes(component).file_name(format!("{name}.wasm")),
            )
            .text("grant", grant_toml.to_owned());
        let response = self
            .client
            .put(self.url(&format!("/v1/plugins/{name}")))
            .multipart(form)
            .send()
            .await
            .expect("request");
        read(response).await
    }

    /// The plugin as `GET /v1/plugins/{name}` shows it, asserting it exists.
    pub async fn plugin(&self, name: &str) -> Value {
        let (status, plugin) = self.get_json(&format!("/v1/plugins/{name}")).await;
        assert_eq!(status, 200, "{plugin}");
        plugin
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn database_url(&self) -> &str {
        &self.database.url
    }

    /// A new API token with `role`, made the way `stepwise token create` makes one; returns
    /// its secret.
    pub async fn create_token(&self, role: Role) -> String {
        let store = stepwise_host::storage::Store::open(&self.database.url)
            .await
            .expect("opening the server's database");
        let terms = stepwise_host::auth::TokenTerms::default();
        match stepwise_host::auth::create_token(&store, None, role, "test", terms).await {
            Ok(token) => token.secret,
            Err(_) => panic!("creating a {role} token failed"),
        }
    }

    /// Triggers a run and returns its id, asserting the 202.
    pub async fn trigger(&self, body: Value) -> String {
        let (status, run) = self.post_json("/v1/runs", &body).await;
        assert_eq!(status, 202, "trigger failed: {run}");
        run["id"].as_str().expect("run id").to_owned()
    }

    /// The run's recording (JSON Lines), which must exist.
    pub async fn recording(&self, id: &str) -> String {
        let response = self
            .client
            .get(self.url(&format!("/v1/runs/{id}/recording")))
            .send()
            .await
            .expect("GET recording");
        assert_eq!(response.status(), 200, "run {id} has no recording");
        response.text().await.expect("the recording")
    }

    pub async fn run(&self, id: &str) -> Value {
        let (status, run) = self.get_json(&format!("/v1/runs/{id}")).await;
        assert_eq!(status, 200, "{run}");
        run
    }

    /// Every attempt of the run with its log lines, following the pages.
    pub async fn attempts(&self, id: &str) -> Vec<Value> {
        self.attempt_pages(id, "limit=50&logs=true")
            .await
            .into_iter()
            .flat_map(|page| page["attempts"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The pages of `GET /v1/runs/{id}/attempts?{query}`, following `next_cursor`.
    pub async fn attempt_pages(&self, id: &str, query: &str) -> Vec<Value> {
        let mut pages = Vec::new();
        let mut path = format!("/v1/runs/{id}/attempts?{query}");
        loop {
            let (status, page) = self.get_json(&path).await;
            assert_eq!(status, 200, "{page}");
            let next = page["next_cursor"].as_str().map(str::to_owned);
            pages.push(page);
            match next {
                Some(cursor) => path = format!("/v1/runs/{id}/attempts?{query}&cursor={cursor}"),
                None => return pages,
            }
        }
    }

    /// Polls the run until `done` holds, and returns it.
    pub async fn wait_for_run(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let run = self.run(id).await;
            if done(&run) {
                return run;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "run {id} did not reach {what} within {DEADLINE:?}; last state: {run:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the run has a terminal status, and returns it.
    pub async fn wait_until_finished(&self, id: &str) -> Value {
        self.wait_for_run(id, "a terminal status", |run| {
            !matches!(run["status"].as_str(), Some("queued") | Some("running"))
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The database a test's servers share: a SQLite file in the data dir (the `sqlite` copy of the
/// suite, and the dashboard's tests, which need no second backend), or, for tests in the
/// `postgres` copy of the suite, a PostgreSQL database created for the test and dropped after.
pub struct TestDatabase {
    pub url: String,
    /// The server URL and the database name to drop.
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    pub async fn create(data_dir: &Path) -> TestDatabase {
        let test = std::thread::current().name().unwrap_or_default().to_owned();
        // The dashboard's and `dev`'s tests need a server of either kind: SQLite's.
        if ["sqlite::", "dashboard::", "dev::"]
            .iter()
            .any(|module| test.starts_with(module))
        {
            return TestDatabase {
                url: Settings::for_data_dir(data_dir).database_url,
                postgres: None,
            };
        }
        assert!(
            test.starts_with("postgres::") || test.starts_with("cluster::"),
            "TestServer::start must be called from a test's own thread in the sqlite, postgres or \
             cluster module (it picks the database by the test's name), not from {test:?}"
        );
        let server = std::env::var("STEPWISE_TEST_POSTGRES_URL")
            .expect("STEPWISE_TEST_POSTGRES_URL was set when the suite was built");
        let name = format!("stepwise_test_{}", uuid_like());
        postgres_admin(&server, &format!("CREATE DATABASE {name}")).await;
        let url = match server.rsplit_once('/') {
            Some((base, _)) if base.contains("://") && base.len() > "postgres://".len() => {
                format!("{base}/{name}")
            }
            _ => panic!("STEPWISE_TEST_POSTGRES_URL must name a database: {server}"),
        };
        TestDatabase {
            url,
            postgres: Some((server, name)),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((server, name)) = self.postgres.take() {
            // Drop has no runtime to await on; a thread of its own with one does.
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(postgres_admin(
                        &server,
                        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    ));
            })
            .join()
            .expect("dropping the test database");
        }
    }
}

/// Runs `statement` on the PostgreSQL server at `server` as its user, panicking on an error.
pub async fn postgres_admin(server: &str, statement: &str) {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(server)
        .await
        .expect("connecting to STEPWISE_TEST_POSTGRES_URL");
    sqlx::query(statement)
        .execute(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
}

/// A name unique among concurrent tests and earlier runs.
fn uuid_like() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    format!(
        "{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A response's status and its body as JSON (or as a string when it is not JSON).
pub async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("response body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Milliseconds since the epoch of an RFC 3339 time in a response.
pub fn millis(timestamp: &Value) -> i64 {
    let text = timestamp.as_str().expect("a timestamp");
    humantime::parse_rfc3339(text)
        .expect("RFC 3339")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// Calls `probe` every 50 ms until it returns `Some`, or gives up after [`DEADLINE`].
pub async fn poll_until<T, F, Fut>(mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    while started.elapsed() < DEADLINE {
        if let Some(value) = probe().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A local HTTP endpoint whose status code the test controls: `GET /` answers with it and
/// counts the request; `/big` answers 64 KiB; `/headers` echoes the request headers as JSON.
pub struct Endpoint {
    pub url: String,
    pub host_port: String,
    pub port: u16,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Endpoint {
    pub async fn start(initial_status: u16) -> Endpoint {
        Endpoint::serve(initial_status, None).await
    }

    /// An endpoint whose `GET /` answers `302 Found` with `Location: location`.
    pub async fn redirecting_to(location: &str) -> Endpoint {
        Endpoint::serve(302, Some(location.to_owned())).await
    }

    async fn serve(initial_status: u16, location: Option<String>) -> Endpoint {
        use axum::routing::get;
        let status = Arc::new(AtomicU16::new(initial_status));
        let hits = Arc::new(AtomicUsize::new(0));
        let (handler_status, handler_hits) = (status.clone(), hits.clone());
        let app = axum::Router::new()
            .route(
                "/",
                get(move || {
                    handler_hits.fetch_add(1, Ordering::SeqCst);
                    let status = handler_status.load(Ordering::SeqCst);
                    let location = location.clone();
                    async move {
                        let status =
                            axum::http::StatusCode::from_u16(status).expect("valid status");
                        let mut response =
                            axum::response::IntoResponse::into_response((status, "endpoint"));
                        if let Some(location) = location {
                            response
                                .headers_mut()
                                .insert("location", location.parse().expect("a valid location"));
                        }
                        response
                    }
                }),
            )
            .route("/big", get(|| async { "x".repeat(64 * 1024) }))
            .route(
                "/headers",
                get(|headers: axum::http::HeaderMap| async move {
                    let names: Vec<String> = headers.keys().map(|name| name.to_string()).collect();
                    axum::Json(names)
                }),
            );
        let (address, shutdown) = serve_locally(app).await;
        Endpoint {
            url: format!("http://{address}/"),
            host_port: address.to_string(),
            port: address.port(),
            status,
            hits,
            _shutdown: shutdown,
        }
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Requests `GET /` received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Serves `app` on 127.0.0.1 (a free port) until the returned guard is dropped.
pub async fn serve_locally(
    app: axum::Router,
) -> (std::net::SocketAddr, tokio_util::sync::DropGuard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding port 0");
    let address = listener.local_addr().expect("bound address");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .expect("a local server serves");
    });
    (address, shutdown.drop_guard())
}

/// A server that answers `GET /echo` with what it was sent: the `authorization` header and
/// the query, each also base64- and URL-encoded, as a system under check that reflects a
/// credential would. It keeps every value it received.
pub struct Reflector {
    pub host_port: String,
    received: Arc<std::sync::Mutex<Vec<String>>>,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Reflector {
    pub async fn start() -> Reflector {
        use axum::routing::get;
        use base64::Engine;
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = received.clone();
        let app = axum::Router::new().route(
            "/echo",
            get(
                move |headers: axum::http::HeaderMap, uri: axum::http::Uri| async move {
                    let header = headers
                        .get("authorization")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let query = uri.query().unwrap_or_default().to_owned();
                    let mut kept = kept.lock().unwrap();
                    kept.push(header.clone());
                    kept.push(query.clone());
                    let encoded = |text: &str| {
                        json!({
                            "base64": base64::engine::general_purpose::STANDARD.encode(text),
                            "url": percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string(),
                        })
                    };
                    // Every header back, as gateways echo a request id; and the credential
                    // in a response header too.
                    let all: serde_json::Map<String, Value> = headers
                        .iter()
                        .map(|(name, value)| {
                            (name.to_string(), json!(String::from_utf8_lossy(value.as_bytes())))
                        })
                        .collect();
                    (
                        [("x-echo-authorization", header.clone())],
                        axum::Json(json!({
                            "header": header,
                            "header_encoded": encoded(&header),
                            "query": query,
                            "query_encoded": encoded(&query),
                            "headers": all,
                        })),
                    )
                },
            ),
        );
        let (address, shutdown) = serve_locally(app).await;
        Reflector {
            host_port: address.to_string(),
            received,
            _shutdown: shutdown,
        }
    }

    /// Every header value and query received, in order.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

/// A TCP server that accepts connections and never answers: the system under check hangs.
pub struct SilentServer {
    pub host_port: String,
    _task: tokio_util::sync::DropGuard,
}

impl SilentServer {
    pub async fn start() -> SilentServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding port 0");
        let host_port = listener.local_addr().expect("bound address").to_string();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => {
                        if let Ok((socket, _)) = accepted {
                            held.push(socket);
                        }
                    }
                }
            }
        });
        SilentServer {
            host_port,
            _task: shutdown.drop_guard(),
        }
    }
}

/// The settings `stepwise serve --config` makes of `config`, written to a `stepwise.toml` in
/// `dir`, which is also the data dir.
pub fn settings_from_config(dir: &Path, config: &str) -> anyhow::Result<Settings> {
    let path = dir.join("stepwise.toml");
    std::fs::write(&path, config).expect("writing stepwise.toml");
    Settings::from_args(&ServeArgs {
        listen: None,
        data_dir: Some(dir.to_owned()),
        database_url: None,
        config: Some(path),
        auth: None,
        tls_cert: None,
        tls_key: None,
    })
}

pub fn postgres_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipping: STEPWISE_TEST_POSTGRES_URL unset");
            None
        }
    }
}

/// A new table `{prefix}_{pid}_{n}` in the PostgreSQL database at `url`, holding the row
/// `(1, 'one')`. Each call has its own: the SQLite and PostgreSQL copies of a test run at once,
/// and concurrent `CREATE TABLE IF NOT EXISTS` of one name can fail in PostgreSQL.
pub async fn postgres_table(url: &str, prefix: &str) -> String {
    static TABLES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = TABLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let table = format!("{prefix}_{}_{n}", std::process::id());
    let pool = sqlx::PgPool::connect(url).await.expect("connecting");
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("create");
    sqlx::query(&format!(
        "INSERT INTO {table} VALUES (1, 'one') ON CONFLICT DO NOTHING"
    ))
    .execute(&pool)
    .await
    .expect("insert");
    table
}

/// `url` with the user `stepwise_reader`, a role that may only read `table` (created if
/// missing): what the README tells operators to give a read-only source.
pub async fn postgres_reader_url(url: &str, table: &str) -> String {
    postgres_role_url(
        url,
        "stepwise_reader",
        &format!("GRANT SELECT ON {table} TO stepwise_reader"),
    )
    .await
}

/// `url` with the user `stepwise_writer`, a role that may read and change `table` (created if
/// missing) and nothing else: a writable source's role.
pub async fn postgres_writer_url(url: &str, table: &str) -> String {
    postgres_role_url(
        url,
        "stepwise_writer",
        &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO stepwise_writer"),
    )
    .await
}

/// `url` with the user `role` (created if missing, without a password), after `grant`.
pub async fn postgres_role_url(url: &str, role: &str, grant: &str) -> String {
    let pool = sqlx::PgPool::connect(url)
        .await
        .expect("connecting to PostgreSQL");
    // Roles are shared by every database of the server and tests run concurrently: a role
    // created by another test in between is fine.
    sqlx::query(&format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    ))
    .execute(&pool)
    .await
    .unwrap_or_else(|error| panic!("creating the role {role}: {error}"));
    sqlx::query(grant)
        .execute(&pool)
        .await
        .unwrap_or_else(|error| panic!("{grant}: {error}"));
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}@{host}")
}

/// A TCP proxy on 127.0.0.1 in front of the host:port of the PostgreSQL `url` that holds back
/// every chunk the server sends by `delay` (the client's bytes go through at once): a slow
/// network, on which an answer can arrive after the host stopped waiting for it. Returns `url`
/// through the proxy; the proxy stops when the guard is dropped.
pub async fn postgres_behind_slow_network(
    url: &str,
    delay: Duration,
) -> (String, tokio_util::sync::DropGuard) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user, rest) = rest.split_once('@').expect("a user in the URL");
    let (upstream, database) = rest.split_once('/').expect("a database in the URL");
    let upstream = if upstream.contains(':') {
        upstream.to_owned()
    } else {
        format!("{upstream}:5432")
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding port 0");
    let address = listener.local_addr().expect("bound address");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                _ = token.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let upstream = upstream.clone();
            let token = token.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let to_server = tokio::io::copy(&mut client_read, &mut server_write);
                let to_client = async {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let read = server_read.read(&mut buffer).await?;
                        if read == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        tokio::time::sleep(delay).await;
                        client_write.write_all(&buffer[..read]).await?;
                    }
                };
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = to_server => {}
                    _ = to_client => {}
                }
            });
        }
    });
    (
        format!("{scheme}://{user}@{address}/{database}"),
        shutdown.drop_guard(),
    )
}

/// A SQLite database file in `dir` with one table `items(id INTEGER, name TEXT)` and two rows.
pub async fn sqlite_source(dir: &Path) -> PathBuf {
    use sqlx::ConnectOptions;
    let path = dir.join(format!("source-{}.db", std::process::id()));
    let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .connect()
        .await
        .expect("creating the source database");
    sqlx::query("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        .execute(&mut connection)
        .await
        .expect("creating items");
    sqlx::query("INSERT OR IGNORE INTO items (id, name) VALUES (1, 'one'), (2, 'two')")
        .execute(&mut connection)
        .await
        .expect("filling items");
    path
}

pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Every step's status, in order.
pub fn step_statuses(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|step| step["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Starts `command` (a `stepwise serve`) with its stderr piped, and waits for the address it
/// says it listens on. The last 200 lines it logs are kept, to show when a test fails.
pub fn start_program(
    mut command: std::process::Command,
) -> (
    std::process::Child,
    String,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::BufRead;
    let mut child = command
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the stepwise program");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (address_sender, address) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        let mut address_sender = Some(address_sender);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let address: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                if let Some(sender) = address_sender.take() {
                    let _ = sender.send(address);
                }
            }
            let mut lines = lines.lock().expect("log lock");
            lines.push(line);
            if lines.len() > 200 {
                lines.remove(0);
            }
        }
    });
    let address = address
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the program did not start: {:#?}", log.lock()));
    (child, address, log)
}

/// How the [`Webhook`] answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// Never answers (until the sender gives up or dies).
    Hang,
}

/// One POST a [`Webhook`] received.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub path: String,
    pub delivery: String,
    pub event: String,
    pub body: Value,
    /// The body as sent, and its `stepwise-signature` header.
    pub raw: Vec<u8>,
    pub signature: String,
    pub at: std::time::Instant,
    #[cfg_attr(not(postgres_suite), allow(dead_code))]
    pub reply: Reply,
}

/// A notification receiver on 127.0.0.1: keeps every POST and answers them with the scripted
/// replies in order, then `200`.
pub struct Webhook {
    pub base: String,
    received: Arc<std::sync::Mutex<Vec<Delivered>>>,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Webhook {
    pub async fn start(script: Vec<Reply>) -> Webhook {
        let received = Arc::new(std::sync::Mutex::new(Vec::<Delivered>::new()));
        let script = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
            script,
        )));
        let kept = received.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (kept, script) = (kept.clone(), script.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|value| value.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let reply = script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(Reply::Status(200));
                    kept.lock().unwrap().push(Delivered {
                        path: uri.path().to_owned(),
                        delivery: header("x-stepwise-delivery"),
                        event: header("x-stepwise-event"),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        raw: body.to_vec(),
                        signature: header("stepwise-signature"),
                        at: std::time::Instant::now(),
                        reply,
                    });
                    match reply {
                        Reply::Status(status) => {
                            axum::http::StatusCode::from_u16(status).expect("a valid status")
                        }
                        Reply::Hang => std::future::pending().await,
                    }
                }
            },
        );
        let (address, shutdown) = serve_locally(app).await;
        Webhook {
            base: format!("http://{address}"),
            received,
            _shutdown: shutdown,
        }
    }

    /// Every POST so far, in the order they came.
    pub fn received(&self) -> Vec<Delivered> {
        self.received.lock().unwrap().clone()
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<i64>,
    pub data: Value,
}

/// A Server-Sent Events stream read event by event.
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    /// Opens `path` (sending `Last-Event-ID` when given), asserting a `200` event stream.
    pub async fn open(server: &TestServer, path: &str, last_event_id: Option<i64>) -> EventStream {
        EventStream::open_as(server, path, last_event_id, None).await
    }

    /// [`EventStream::open`] with a bearer token.
    pub async fn open_as(
        server: &TestServer,
        path: &str,
        last_event_id: Option<i64>,
        token: Option<&str>,
    ) -> EventStream {
        EventStream::from_response(EventStream::request(server, path, last_event_id, token).await)
    }

    /// The stream of a response, asserting it is a `200` event stream.
    pub fn from_response(response: reqwest::Response) -> EventStream {
        assert_eq!(response.status(), 200, "{}", response.url());
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The answer to a stream's request, whatever its status.
    pub async fn request(
        server: &TestServer,
        path: &str,
        last_event_id: Option<i64>,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = server
            .client
            .get(server.url(path))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("opening the stream")
    }

    /// The next event, skipping keep-alive comments; `None` when the stream ends. It must
    /// come within the deadline, however many comments come first.
    pub async fn next(&mut self) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = value.parse().ok(),
                        "data" => data.push_str(value),
                        _ => {}
                    }
                }
                if data.is_empty() && event.event == "message" {
                    continue;
                }
                event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an event within the deadline")
                .expect("reading the stream")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events until (and with) the first for which `last` holds.
    pub async fn until(&mut self, last: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await.expect("the stream ended early");
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

/// The MySQL or MariaDB server of the source tests (an account that may create databases and
/// accounts), or `None`, said, when `STEPWISE_TEST_MYSQL_URL` is unset.
pub fn mysql_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: the MySQL source test (set STEPWISE_TEST_MYSQL_URL, e.g. mysql://root@127.0.0.1:3306/test)"
            );
            None
        }
    }
}

/// Runs `statement` on the MySQL server at `url` as its administrator.
pub async fn mysql_admin(url: &str, statement: &str) {
    use sqlx::{ConnectOptions, Connection, Executor};
    let options: sqlx::mysql::MySqlConnectOptions = url.parse().expect("a MySQL URL");
    let mut connection = options.connect().await.expect("connecting to MySQL");
    connection
        .execute(statement)
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
    let _ = connection.close().await;
}

/// The first column of the rows of `statement` on the MySQL server at `url`, as text.
pub async fn mysql_column(url: &str, statement: &str) -> Vec<Option<String>> {
    use sqlx::{ConnectOptions, Connection, Executor, Row};
    let options: sqlx::mysql::MySqlConnectOptions = url.parse().expect("a MySQL URL");
    let mut connection = options.connect().await.expect("connecting to MySQL");
    let rows = connection
        .fetch_all(statement)
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
    let _ = connection.close().await;
    rows.iter()
        .map(|row| {
            row.try_get_unchecked::<Option<String>, _>(0)
                .expect("a text column")
        })
        .collect()
}

/// A MySQL database and the accounts of one test, dropped by [`MysqlFixture::drop_all`].
/// Each has names of its own: the SQLite and PostgreSQL copies of a test run at once.
pub struct MysqlFixture {
    pub admin_url: String,
    pub database: String,
    accounts: std::sync::Mutex<Vec<String>>,
}

impl MysqlFixture {
    /// A new database holding `items(id INT PRIMARY KEY, name VARCHAR(32))` with `(1, 'one')`.
    pub async fn create(admin_url: &str, prefix: &str) -> MysqlFixture {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let database = format!("{prefix}_{}_{n}", std::process::id());
        mysql_admin(admin_url, &format!("CREATE DATABASE {database}")).await;
        mysql_admin(
            admin_url,
            &format!(
                "CREATE TABLE {database}.items (id INT PRIMARY KEY, name VARCHAR(32) NOT NULL)"
            ),
        )
        .await;
        mysql_admin(
            admin_url,
            &format!("INSERT INTO {database}.items VALUES (1, 'one')"),
        )
        .await;
        MysqlFixture {
            admin_url: admin_url.to_owned(),
            database,
            accounts: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The URL of a new account `{database}_{suffix}` with a password, after `grants` (each
    /// `PRIVILEGES ON what`, e.g. `SELECT ON {database}.*`).
    pub async fn account_url(&self, suffix: &str, grants: &[String]) -> String {
        let account = format!("{}_{suffix}", self.database);
        mysql_admin(
            &self.admin_url,
            &format!("CREATE USER '{account}'@'%' IDENTIFIED BY 'pw-{account}'"),
        )
        .await;
        for grant in grants {
            mysql_admin(
                &self.admin_url,
                &format!("GRANT {grant} TO '{account}'@'%'"),
            )
            .await;
        }
        self.accounts
            .lock()
            .expect("accounts")
            .push(account.clone());
        let (scheme, rest) = self.admin_url.split_once("://").expect("a URL");
        let address = rest.split_once('@').map_or(rest, |(_, address)| address);
        let address = address.split('/').next().unwrap_or(address);
        format!(
            "{scheme}://{account}:pw-{account}@{address}/{}",
            self.database
        )
    }

    /// A least-privileged reader: `SELECT` on this database and nothing else.
    pub async fn reader_url(&self) -> String {
        self.account_url("r", &[format!("SELECT ON {}.*", self.database)])
            .await
    }

    pub async fn drop_all(&self) {
        let accounts: Vec<String> = std::mem::take(&mut *self.accounts.lock().expect("accounts"));
        for account in accounts {
            mysql_admin(&self.admin_url, &format!("DROP USER '{account}'@'%'")).await;
        }
        mysql_admin(&self.admin_url, &format!("DROP DATABASE {}", self.database)).await;
    }
}

/// The Redis server of the source tests, or `None`, said, when `STEPWISE_TEST_REDIS_URL` is
/// unset.
pub fn redis_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: the Redis source test (set STEPWISE_TEST_REDIS_URL, e.g. redis://127.0.0.1:6379)"
            );
            None
        }
    }
}

/// The NATS server of the message source tests, from `STEPWISE_TEST_NATS_URL`; `None` (and a
/// SKIPPED line) without it.
pub fn nats_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: the NATS source test (set STEPWISE_TEST_NATS_URL to a server with JetStream, e.g. nats://127.0.0.1:4222)"
            );
            None
        }
    }
}

/// The MQTT broker of the message source tests, from `STEPWISE_TEST_MQTT_URL`; `None` (and a
/// SKIPPED line) without it.
pub fn mqtt_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_MQTT_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: the MQTT source test (set STEPWISE_TEST_MQTT_URL to an MQTT 5 broker, e.g. mqtt://127.0.0.1:1883)"
            );
            None
        }
    }
}

/// A name of its own for one test's subjects, streams or queues (`{test}-{pid}-{n}`): the
/// SQLite and PostgreSQL copies run at once against one server.
pub fn unique_name(test: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{test}-{}-{n}", std::process::id())
}

/// A server with message source `bus` (`kind` at `url`, its tap keeping `window_mib`), which
/// the `misbehave` plugin may read on `subjects` (a TOML list's items).
pub async fn bus_server(kind: &str, url: &str, subjects: &str, window_mib: usize) -> TestServer {
    TestServer::start(
        Setup::default()
            .with_plugin(PluginFile::misbehave(format!(
                "sql_sources = [\"bus\"]\nsubjects = [{subjects}]\npoll_interval_ms = 100\n[limits]\nmax_errors = 1\n"
            )))
            .with_bus("bus", kind, url.to_owned(), window_mib),
    )
    .await
}

/// A `misbehave` run whose first step waits two polls and whose third is `find` (a
/// [`find_step`]): what is published right after the trigger comes before that step's first
/// poll.
pub async fn trigger_find(server: &TestServer, find: Value) -> String {
    server
        .trigger(
            json!({"plugin": "misbehave", "poll_interval_ms": 100, "params": {"steps": {
                "first": {"action": "pending_until", "attempt": 3},
                "third": find,
            }}}),
        )
        .await
}

/// A step that looks for messages on `subject` of source `bus` that meet `conditions`
/// (`[["json"|"header", name, value]]`), passing once it finds `expect`.
pub fn find_step(subject: &str, conditions: Value, expect: u64) -> Value {
    json!({"action": "messages", "source": "bus", "subject": subject, "where": conditions, "expect": expect})
}

/// The messages a [`trigger_find`] run's third step found.
pub fn found(run: &Value) -> Vec<Value> {
    run["steps"][2]["output"]["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The first message a run's steps give (why one failed).
pub fn step_message(run: &Value) -> String {
    let step = run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|step| step["message"].is_string());
    step.map(|step| step["message"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// Waits for run `id` and asserts that it failed, a step saying why in a message that starts
/// with `expected`; returns the run.
pub async fn assert_failed_with(server: &TestServer, id: &str, expected: &str) -> Value {
    let run = server.wait_until_finished(id).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        step_message(&run).starts_with(expected),
        "expected {expected:?}: {}",
        step_message(&run)
    );
    run
}

/// Runs one step that looks for messages on `subject` of `source`, and asserts that it fails
/// with a message that starts with `expected` (a refusal).
pub async fn assert_find_fails(server: &TestServer, source: &str, subject: &str, expected: &str) {
    let step = json!({"action": "messages", "source": source, "subject": subject, "where": [], "expect": 0});
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": step}}}))
        .await;
    assert_failed_with(server, &id, expected).await;
}

/// `GET /metrics`'s figure `name` for the `bus` source, with the whole text.
pub async fn tap_figure(server: &TestServer, name: &str) -> (u64, String) {
    let text = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let figure = text
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}{{source=\"bus\"}} ")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_default();
    (figure, text)
}

/// The Kafka-protocol broker of the message source tests, from `STEPWISE_TEST_KAFKA_URL`
/// (`kafka://host:port`); `None` (and a SKIPPED line) without it.
pub fn kafka_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_KAFKA_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: the Kafka source test (set STEPWISE_TEST_KAFKA_URL to a broker, e.g. kafka://127.0.0.1:9092; .ci/run starts tansu)"
            );
            None
        }
    }
}

/// The RabbitMQ broker of the message source tests, from `STEPWISE_TEST_RABBITMQ_URL`
/// (`amqp://host:port`, the guest user); `None` (and a SKIPPED line) without it.
pub fn rabbitmq_url() -> Option<String> {
    match std::env::var("STEPWISE_TEST_RABBITMQ_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: the RabbitMQ source test (set STEPWISE_TEST_RABBITMQ_URL to a broker with streams, e.g. amqp://127.0.0.1:5672)"
            );
            None
        }
    }
}

/// A key prefix of its own for one test: the SQLite and PostgreSQL copies run at once on one
/// Redis server.
pub fn redis_prefix(test: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("stepwise-test:{test}:{}:{n}:", std::process::id())
}

/// Sends one command to the Redis server at `url` (`redis://host:port`, no credentials) and
/// returns the reply's first line (`+OK`, `:1`, `$3`, …).
pub async fn redis_command(url: &str, command: &[&[u8]]) -> String {
    stepwise_demo::redis::command(url, command)
        .await
        .expect("a command to Redis")
}

/// Waits until every finished run is counted in the status rollups (the server folds them
/// about once a second): retention deletes no run before that.
pub async fn rollups_folded(store: &stepwise_host::storage::Store) {
    let folded = poll_until(|| async {
        (!store
            .rollups_pending()
            .await
            .expect("reading the rollup queue"))
        .then_some(())
    })
    .await;
    assert!(
        folded.is_some(),
        "finished runs were never folded into the rollups"
    );
}
