//! Configuration in two stages: `RawConfig` (clap flags + `STEPWISE_*` env + optional TOML file)
//! becomes a validated `Settings` with defaults applied, paths absolute and durations parsed.
//! The operator's secrets are read here too. Grants, the plugins' side, are `grant`'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::grant::{
    AllowedHost, HostPattern, LimitOverrides, Limits, LimitsFile, Policy, RetryFile,
};
use crate::model::{
    CheckSelection, Notifier, NotifyEvent, NotifyFormat, Place, RetentionPolicy, Retry, StatusPage,
    in_range,
};
use crate::storage::Backend;

/// Flags of `stepwise serve`; each has its env var.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080] (port 0 picks a free port; the bound
    /// address is logged).
    #[arg(long, env = "STEPWISE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the SQLite database, the compiled-plugin cache and the watched `plugins/`
    /// directory [default: ./stepwise-data].
    #[arg(long, env = "STEPWISE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `sqlite://PATH` [default: sqlite://<data-dir>/stepwise.db], or `postgres://…` for
    /// several nodes sharing one database.
    #[arg(long, env = "STEPWISE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A `stepwise.toml` (limits, sources, policy; unknown keys are errors) [default: none].
    #[arg(long, env = "STEPWISE_CONFIG")]
    pub config: Option<PathBuf>,
    /// `tokens`: every /v1 call needs a bearer token (`stepwise token create`). `none`: no
    /// authentication, refused unless the listen address is loopback. Default: `none` on a
    /// loopback address, `tokens` on any other.
    #[arg(long, env = "STEPWISE_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// A PEM certificate chain: serve HTTPS (with --tls-key) instead of plain HTTP.
    #[arg(long, env = "STEPWISE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "STEPWISE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Whether the API asks who is calling (README, "Running it for a team").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Bearer tokens with roles.
    Tokens,
    /// Everyone who can connect is an admin: only for a loopback listen address.
    None,
}

impl AuthMode {
    /// The mode to use when none is configured, and whether `configured` may serve on
    /// `listen`.
    pub fn resolve(configured: Option<AuthMode>, listen: SocketAddr) -> anyhow::Result<AuthMode> {
        let loopback = listen.ip().is_loopback();
        match configured {
            Some(AuthMode::None) if !loopback => anyhow::bail!(
                "--auth none is refused on {listen}: without tokens anyone who can reach that \
                 address could upload code and grant it capabilities. Listen on a loopback \
                 address (127.0.0.1) or use --auth tokens with a token from `stepwise token create`"
            ),
            Some(mode) => Ok(mode),
            None if loopback => Ok(AuthMode::None),
            None => Ok(AuthMode::Tokens),
        }
    }
}

/// `plugin_memory_mib` when the config does not say: four calls at the default `memory_mib`.
pub const DEFAULT_PLUGIN_MEMORY_MIB: u64 = 256;

/// The keys `stepwise.toml` may hold. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    max_concurrent_ticks: Option<usize>,
    default_poll_interval_ms: Option<u64>,
    default_run_timeout_ms: Option<u64>,
    default_step_timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    max_upload_mib: Option<usize>,
    events_buffer: Option<usize>,
    events_buffer_bytes: Option<usize>,
    events_replay_bytes: Option<usize>,
    events_keep_alive_ms: Option<u64>,
    max_event_streams: Option<usize>,
    max_event_streams_per_token: Option<usize>,
    run_log_bytes: Option<u64>,
    run_recording_bytes: Option<u64>,
    plugin_memory_mib: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    metrics: MetricsFile,
    auth: Option<AuthMode>,
    /// Where clients reach this server (behind a proxy, under a name): their hosts are the
    /// `Host` headers the API accepts besides the listen address.
    #[serde(default)]
    public_urls: Vec<String>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    sources: BTreeMap<String, SourceFile>,
    #[serde(default)]
    secrets: BTreeMap<String, SecretFile>,
    policy: Option<PolicyFile>,
    #[serde(default)]
    notify: Vec<NotifyFile>,
    #[serde(default)]
    retention: RetentionFile,
    #[serde(default)]
    status_page: Vec<StatusPageFile>,
}

/// `[[status_page]]`: one status page (README, "Status pages").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusPageFile {
    slug: String,
    title: String,
    description: Option<String>,
    #[serde(default)]
    schedules: Vec<String>,
    #[serde(default)]
    plugins: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    public: bool,
    time_zone: Option<String>,
    days: Option<u32>,
    #[serde(default)]
    show: Vec<String>,
}

/// `[metrics]`: who may scrape `GET /metrics`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    /// An environment variable holding the scrapers' bearer token.
    token_env: Option<String>,
}

/// `[[notify]]`: one notifier (README, "Alerts").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyFile {
    name: String,
    url: String,
    format: Option<String>,
    on: Option<Vec<String>>,
    #[serde(default)]
    plugins: Vec<String>,
    #[serde(default)]
    schedules: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    after_consecutive: Option<u32>,
    retry: Option<RetryFile>,
    timeout_ms: Option<u64>,
    max_delivery_ms: Option<u64>,
    secret: Option<String>,
}

/// `[retention]`: days may be fractions (a soak test keeps attempts for minutes).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    finished_runs_days: Option<f64>,
    keep_last_per_schedule: Option<u32>,
    attempts_days: Option<f64>,
    plugin_versions_days: Option<f64>,
    rollups_days: Option<f64>,
    interval_ms: Option<u64>,
}

/// `[secrets.NAME]`: where the value is read from, and where it may be sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    env: Option<String>,
    file: Option<PathBuf>,
    #[serde(default)]
    hosts: Vec<String>,
    header: Option<String>,
    format: Option<String>,
    query: Option<String>,
}

/// A secret the operator declared: never its value, which [`read_secret`] reads when the
/// host starts and again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretDeclaration {
    pub from: SecretFrom,
    /// Where the value may be sent (`allowed_hosts` syntax).
    pub hosts: Vec<AllowedHost>,
    /// Where in those requests the host puts it.
    pub place: Option<Place>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFrom {
    Env(String),
    File(PathBuf),
}

/// The value of a declared secret, read now: an env var, or a file without its final line
/// break.
pub fn read_secret(name: &str, declaration: &SecretDeclaration) -> anyhow::Result<String> {
    let value = match &declaration.from {
        SecretFrom::Env(var) => std::env::var(var).map_err(|_| {
            anyhow::anyhow!(
                "secret {name:?}: the environment variable {var} is not set (or not UTF-8)"
            )
        })?,
        SecretFrom::File(path) => {
            let mut text = std::fs::read_to_string(path)
                .with_context(|| format!("secret {name:?}: reading {}", path.display()))?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            text
        }
    };
    anyhow::ensure!(!value.is_empty(), "secret {name:?} is empty");
    Ok(value)
}

fn parse_secret(name: &str, file: SecretFile) -> anyhow::Result<SecretDeclaration> {
    anyhow::ensure!(
        crate::model::valid_name(name),
        "[secrets.{name}]: a secret's name must be 1-63 letters, digits, '_' or '-'"
    );
    let from = match (file.env, file.file) {
        (Some(var), None) => SecretFrom::Env(var),
        (None, Some(path)) => SecretFrom::File(path),
        _ => {
            anyhow::bail!("[secrets.{name}] needs exactly one of env = \"VAR\" or file = \"/path\"")
        }
    };
    let hosts = file
        .hosts
        .iter()
        .map(|host| match AllowedHost::parse(host) {
            // Without a scheme an entry would allow plain http too: the value in cleartext.
            Ok(parsed) if parsed.scheme.is_some() => Ok(parsed),
            _ => Err(anyhow::anyhow!(
                "secrets.{name}.hosts entry {host:?} must be scheme://host[:port], such as \"https://crm.example.com\" (the scheme is required: a secret goes over http only if you say so)"
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let place = match (file.header, file.format, file.query) {
        (Some(header), format, None) => Some(
            Place::header(&header, format.as_deref())
                .map_err(|error| anyhow::anyhow!("secrets.{name}.header: {error}"))?,
        ),
        (None, None, Some(query)) => Some(
            Place::query(&query)
                .map_err(|error| anyhow::anyhow!("secrets.{name}.query: {error}"))?,
        ),
        (None, None, None) => None,
        (None, Some(_), _) => anyhow::bail!("secrets.{name}.format goes with header = \"NAME\""),
        (Some(_), _, Some(_)) => {
            anyhow::bail!(
                "[secrets.{name}] takes one of header = \"NAME\" or query = \"NAME\", not both"
            )
        }
    };
    anyhow::ensure!(
        hosts.is_empty() || place.is_some(),
        "[secrets.{name}] has hosts but no place in their requests: add header = \"authorization\" \
         (with format = \"Bearer {{}}\" if the value needs a prefix) or query = \"api_key\"; the host \
         puts the value there itself"
    );
    anyhow::ensure!(
        place.is_none() || !hosts.is_empty(),
        "[secrets.{name}] says where the value goes in a request but lists no hosts to send it to"
    );
    Ok(SecretDeclaration { from, hosts, place })
}

/// `[policy]`: the ceilings every grant must stay within.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    allowed_hosts: Option<Vec<String>>,
    sql_sources: Option<Vec<String>>,
    #[serde(default)]
    max_limits: LimitsFile,
    /// Publishers may activate new code of a plugin whose grant reaches outside the sandbox
    /// without an admin's review.
    #[serde(default)]
    publishers_activate_granted: bool,
    /// When shadows of plugins whose grant sets no `shadow` are promoted or dropped.
    shadow: Option<crate::grant::ShadowFile>,
    /// The share of a plugin's runs a shadow version runs beside (above 0, at most 1).
    shadow_share: Option<f64>,
    /// Which runs of plugins whose grant sets no `record` keep a recording.
    #[serde(default)]
    record: crate::grant::RecordMode,
}

fn parse_notifiers(files: Vec<NotifyFile>) -> anyhow::Result<Vec<Notifier>> {
    let mut notifiers: Vec<Notifier> = Vec::with_capacity(files.len());
    for file in files {
        let name = file.name;
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "notify.name {name:?} must be 1 to 64 letters, digits, '-' or '_'"
        );
        anyhow::ensure!(
            notifiers.iter().all(|other| other.name != name),
            "notify.name {name:?} is given twice"
        );
        let prefix = format!("notify {name:?}: ");
        let url = reqwest::Url::parse(&file.url)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{prefix}url {:?} must be an http:// or https:// URL",
                    file.url
                )
            })?;
        let format = match file.format.as_deref() {
            None => NotifyFormat::Json,
            Some(text) => NotifyFormat::parse(text).ok_or_else(|| {
                anyhow::anyhow!("{prefix}format {text:?} must be \"json\" or \"slack\"")
            })?,
        };
        let on = match file.on {
            None => vec![
                NotifyEvent::Failed,
                NotifyEvent::TimedOut,
                NotifyEvent::Errored,
                NotifyEvent::Recovered,
            ],
            Some(events) => events
                .iter()
                .map(|text| {
                    NotifyEvent::parse(text).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{prefix}on: {text:?} is not an event; use failed, timed_out, errored, recovered, shadow_promoted or shadow_dropped"
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        for plugin in &file.plugins {
            crate::model::PluginName::parse(plugin)
                .map_err(|error| anyhow::anyhow!("{prefix}plugins: {error}"))?;
        }
        let after_consecutive =
            in_range(&prefix, "after_consecutive", file.after_consecutive)?.unwrap_or(1);
        let retry = match &file.retry {
            Some(retry) => retry.policy(&format!("{prefix}retry."))?,
            None => Retry {
                initial: Duration::from_secs(1),
                factor: 2.0,
                max: Duration::from_secs(300),
            },
        };
        let timeout_ms = file.timeout_ms.unwrap_or(10_000);
        anyhow::ensure!(
            (10..=600_000).contains(&timeout_ms),
            "{prefix}timeout_ms = {timeout_ms} is out of range: it must be from 10 to 600000"
        );
        let max_delivery_ms =
            in_range(&prefix, "max_delivery_ms", file.max_delivery_ms)?.unwrap_or(3_600_000);
        anyhow::ensure!(
            file.secret.is_none() || format == NotifyFormat::Json,
            "{prefix}secret signs json notifications; Slack's incoming webhooks do not check signatures"
        );
        notifiers.push(Notifier {
            name,
            url: url.to_string(),
            format,
            on,
            plugins: file.plugins,
            schedules: file.schedules,
            labels: file.labels,
            after_consecutive,
            retry,
            timeout: Duration::from_millis(timeout_ms),
            max_delivery: Duration::from_millis(max_delivery_ms),
            secret: file.secret,
        });
    }
    Ok(notifiers)
}

fn parse_status_pages(files: Vec<StatusPageFile>) -> anyhow::Result<Vec<StatusPage>> {
    let mut pages: Vec<StatusPage> = Vec::with_capacity(files.len());
    for file in files {
        let slug = file.slug;
        anyhow::ensure!(
            !slug.is_empty()
                && slug.len() <= 64
                && slug
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'),
            "status_page.slug {slug:?} must be 1 to 64 lowercase letters, digits, '-' or '_'"
        );
        anyhow::ensure!(
            pages.iter().all(|other| other.slug != slug),
            "status_page.slug {slug:?} is given twice"
        );
        let prefix = format!("status_page {slug:?}: ");
        anyhow::ensure!(
            !file.title.trim().is_empty() && file.title.len() <= 200,
            "{prefix}title must be 1 to 200 characters"
        );
        anyhow::ensure!(
            !(file.schedules.is_empty() && file.plugins.is_empty() && file.labels.is_empty()),
            "{prefix}name its checks with schedules, plugins or labels"
        );
        for plugin in &file.plugins {
            crate::model::PluginName::parse(plugin)
                .map_err(|error| anyhow::anyhow!("{prefix}plugins: {error}"))?;
        }
        let time_zone = match file.time_zone.as_deref() {
            None => chrono_tz::Tz::UTC,
            Some(name) => name.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{prefix}time_zone {name:?} is not an IANA time zone such as \"Europe/Berlin\""
                )
            })?,
        };
        let days = file.days.unwrap_or(90);
        anyhow::ensure!(
            (1..=400).contains(&days),
            "{prefix}days = {days} is out of range: it must be 1 to 400"
        );
        let mut show_messages = false;
        for field in &file.show {
            match field.as_str() {
                "messages" => show_messages = true,
                other => anyhow::bail!(
                    "{prefix}show {other:?} is not a field a page can show: only \"messages\" \
                     (params, outputs, logs and hosts are never shown)"
                ),
            }
        }
        pages.push(StatusPage {
            slug,
            title: file.title,
            description: file.description,
            checks: CheckSelection {
                schedules: file.schedules,
                plugins: file.plugins,
                labels: file.labels,
            },
            public: file.public,
            time_zone,
            days,
            show_messages,
        });
    }
    Ok(pages)
}

fn parse_retention(file: &RetentionFile) -> anyhow::Result<RetentionPolicy> {
    let defaults = RetentionPolicy::default();
    let days = |key: &str, value: Option<f64>, default: Duration| -> anyhow::Result<Duration> {
        let Some(days) = value else {
            return Ok(default);
        };
        anyhow::ensure!(
            days > 0.0 && days <= 36_500.0,
            "retention.{key} = {days} is out of range: it must be more than 0 and at most 36500"
        );
        Ok(Duration::from_secs_f64(days * 86_400.0))
    };
    Ok(RetentionPolicy {
        finished_runs: days(
            "finished_runs_days",
            file.finished_runs_days,
            defaults.finished_runs,
        )?,
        keep_last_per_schedule: in_range(
            "retention.",
            "keep_last_per_schedule",
            file.keep_last_per_schedule,
        )?
        .unwrap_or(defaults.keep_last_per_schedule),
        attempts: days("attempts_days", file.attempts_days, defaults.attempts)?,
        plugin_versions: days(
            "plugin_versions_days",
            file.plugin_versions_days,
            defaults.plugin_versions,
        )?,
        rollups: days("rollups_days", file.rollups_days, defaults.rollups)?,
        interval: in_range("retention.", "interval_ms", file.interval_ms)?
            .map(Duration::from_millis)
            .unwrap_or(defaults.interval),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    url: String,
    /// Writing is what an operator opts into, not what a forgotten key allows.
    #[serde(default = "read_only_unless_said")]
    read_only: bool,
    /// A message bus (`nats`, `mqtt`); without it the URL's scheme says SQL or Redis.
    kind: Option<String>,
    window_minutes: Option<u64>,
    window_mib: Option<u64>,
}

fn read_only_unless_said() -> bool {
    true
}

/// A data source: SQL and Redis for the `sql` and `kv` capabilities, a message bus (`kind`)
/// for `messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub url: String,
    /// `true` unless the config says `read_only = false`.
    pub read_only: bool,
    /// The bus of a message source (`nats`, `mqtt`).
    pub kind: Option<String>,
    /// How long and how many bytes of recent messages a message source's tap keeps.
    pub window: Duration,
    pub window_bytes: usize,
}

impl SourceConfig {
    /// A source with the default settings for its URL.
    pub fn new(url: impl Into<String>) -> SourceConfig {
        SourceConfig {
            url: url.into(),
            read_only: true,
            kind: None,
            window: Duration::from_secs(15 * 60),
            window_bytes: 64 << 20,
        }
    }
}

/// Validated settings, passed explicitly to everything that needs them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub limits: Limits,
    /// SQL sources; their URLs may hold secret placeholders, filled when the host connects.
    pub sources: BTreeMap<String, SourceConfig>,
    pub secrets: BTreeMap<String, SecretDeclaration>,
    /// Step calls running at once on this node.
    pub max_concurrent_ticks: usize,
    pub default_poll_interval: Duration,
    pub min_poll_interval: Duration,
    pub max_poll_interval: Duration,
    pub default_run_timeout: Duration,
    /// How long a step may stay pending when neither the run, the grant nor the plugin says.
    pub default_step_timeout: Duration,
    pub max_run_timeout: Duration,
    /// How long a claimed run stays ours without a write; every write renews it.
    pub lease: Duration,
    /// Longest the scheduler sleeps before looking for due work again.
    pub scheduler_backstop: Duration,
    pub body_limit_bytes: usize,
    /// Size of a plugin upload (`PUT /v1/plugins/{name}`); Python and JS components are
    /// 12-40 MB.
    pub upload_limit_bytes: usize,
    pub auth: AuthMode,
    /// `host[:port]` of each `public_urls` entry (lowercase; the scheme's port when none is
    /// given): `Host` headers accepted besides the listen address.
    pub public_hosts: Vec<String>,
    /// The operator's ceilings on grants.
    pub policy: Policy,
    /// The first `public_urls` entry without its trailing `/`: notifications link runs under
    /// it.
    pub public_url: Option<String>,
    pub notifiers: Vec<std::sync::Arc<Notifier>>,
    /// Changes an event stream may fall behind before it is reset.
    pub events_buffer: usize,
    /// Bytes of changes an event stream may fall behind before it is reset.
    pub events_buffer_bytes: usize,
    /// Bytes of runs one resume (`Last-Event-ID`) may send before it ends with a reset.
    pub events_replay_bytes: usize,
    /// How often an idle event stream sends a comment, and its token is checked again.
    pub events_keep_alive: Duration,
    /// Event streams open at once on this node, and per token.
    pub max_event_streams: usize,
    pub max_event_streams_per_token: usize,
    /// Bytes of plugin log lines stored per run; the runner drops the rest.
    pub run_log_bytes: u64,
    /// Bytes of recordings kept per run (uncompressed JSON Lines); a call past it records
    /// that the recording was cut there.
    pub run_recording_bytes: u64,
    /// Memory all plugin calls on this node may hold at once beyond each call's own first
    /// few MiB (`plugin_memory_mib`).
    pub plugin_memory_bytes: u64,
    pub retention: RetentionPolicy,
    /// `[[status_page]]`: pages any reader (or, unless public, any viewer) may see.
    pub status_pages: Vec<StatusPage>,
    /// How long a connection may take to send a request's head, from when it connects or
    /// its previous response ended (`header_read_timeout_ms`).
    pub header_read_timeout: Duration,
    /// Connections open at once; beyond them new ones wait in the listen backlog.
    pub max_connections: usize,
    /// PEM certificate chain and key: the API is served over TLS.
    pub tls: Option<TlsFiles>,
    /// The bearer token `GET /metrics` asks for (`[metrics] token_env`); without one, only
    /// loopback clients may scrape.
    pub metrics_token: Option<String>,
}

/// The certificate chain and key files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Settings {
    /// The defaults for a given data directory.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Settings {
        let data_dir = data_dir.into();
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: default_database_url(&data_dir),
            data_dir,
            limits: Limits::default(),
            sources: BTreeMap::new(),
            secrets: BTreeMap::new(),
            max_concurrent_ticks: 64,
            default_poll_interval: Duration::from_secs(1),
            min_poll_interval: Duration::from_millis(50),
            max_poll_interval: Duration::from_secs(3600),
            default_run_timeout: Duration::from_secs(600),
            default_step_timeout: Duration::from_secs(600),
            max_run_timeout: Duration::from_secs(7 * 24 * 3600),
            lease: Duration::from_secs(60),
            scheduler_backstop: Duration::from_secs(1),
            body_limit_bytes: 1 << 20,
            upload_limit_bytes: 64 << 20,
            auth: AuthMode::None,
            public_hosts: Vec::new(),
            policy: Policy::default(),
            public_url: None,
            notifiers: Vec::new(),
            events_buffer: 1024,
            events_buffer_bytes: 1 << 20,
            events_replay_bytes: 8 << 20,
            events_keep_alive: Duration::from_secs(15),
            max_event_streams: 1024,
            max_event_streams_per_token: 16,
            run_log_bytes: 1 << 20,
            run_recording_bytes: 1 << 20,
            plugin_memory_bytes: DEFAULT_PLUGIN_MEMORY_MIB << 20,
            retention: RetentionPolicy::default(),
            status_pages: Vec::new(),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            tls: None,
            metrics_token: None,
        }
    }

    /// Flags and env win over the file, the file over the defaults.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("stepwise-data"));
        let data_dir = std::path::absolute(&data_dir)
            .with_context(|| format!("resolving data dir {}", data_dir.display()))?;
        let mut settings = Settings::for_data_dir(data_dir);
        if let Some(listen) = args.listen.or(file.listen) {
            settings.listen = listen;
        }
        if let Some(url) = args.database_url.clone().or(file.database_url) {
            settings.database_url = url;
        }
        if Backend::of_url(&settings.database_url).is_none() {
            anyhow::bail!(
                "database_url {:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE",
                settings.database_url
            );
        }
        let config_error = |error: anyhow::Error| match &args.config {
            Some(path) => error.context(format!("in config {}", path.display())),
            None => error,
        };
        if let Some(ticks) =
            in_range("", "max_concurrent_ticks", file.max_concurrent_ticks).map_err(config_error)?
        {
            settings.max_concurrent_ticks = ticks;
        }
        if let Some(ms) = in_range(
            "",
            "default_poll_interval_ms",
            file.default_poll_interval_ms,
        )
        .map_err(config_error)?
        {
            settings.default_poll_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = in_range("", "default_run_timeout_ms", file.default_run_timeout_ms)
            .map_err(config_error)?
        {
            settings.default_run_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = in_range("", "default_step_timeout_ms", file.default_step_timeout_ms)
            .map_err(config_error)?
        {
            settings.default_step_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = in_range("", "lease_ms", file.lease_ms).map_err(config_error)? {
            settings.lease = Duration::from_millis(ms);
        }
        if let Some(mib) =
            in_range("", "max_upload_mib", file.max_upload_mib).map_err(config_error)?
        {
            settings.upload_limit_bytes = mib << 20;
        }
        if let Some(events) =
            in_range("", "events_buffer", file.events_buffer).map_err(config_error)?
        {
            settings.events_buffer = events;
        }
        if let Some(bytes) =
            in_range("", "events_buffer_bytes", file.events_buffer_bytes).map_err(config_error)?
        {
            settings.events_buffer_bytes = bytes;
        }
        if let Some(bytes) =
            in_range("", "events_replay_bytes", file.events_replay_bytes).map_err(config_error)?
        {
            settings.events_replay_bytes = bytes;
        }
        if let Some(ms) =
            in_range("", "events_keep_alive_ms", file.events_keep_alive_ms).map_err(config_error)?
        {
            settings.events_keep_alive = Duration::from_millis(ms);
        }
        if let Some(streams) =
            in_range("", "max_event_streams", file.max_event_streams).map_err(config_error)?
        {
            settings.max_event_streams = streams;
        }
        if let Some(streams) = in_range(
            "",
            "max_event_streams_per_token",
            file.max_event_streams_per_token,
        )
        .map_err(config_error)?
        {
            settings.max_event_streams_per_token = streams;
        }
        if let Some(bytes) =
            in_range("", "run_log_bytes", file.run_log_bytes).map_err(config_error)?
        {
            settings.run_log_bytes = bytes;
        }
        if let Some(bytes) =
            in_range("", "run_recording_bytes", file.run_recording_bytes).map_err(config_error)?
        {
            settings.run_recording_bytes = bytes;
        }
        if let Some(mib) =
            in_range("", "plugin_memory_mib", file.plugin_memory_mib).map_err(config_error)?
        {
            settings.plugin_memory_bytes = mib << 20;
        }
        if let Some(ms) = in_range("", "header_read_timeout_ms", file.header_read_timeout_ms)
            .map_err(config_error)?
        {
            settings.header_read_timeout = Duration::from_millis(ms);
        }
        if let Some(connections) =
            in_range("", "max_connections", file.max_connections).map_err(config_error)?
        {
            settings.max_connections = connections;
        }
        settings.tls = match (
            args.tls_cert.clone().or(file.tls_cert.clone()),
            args.tls_key.clone().or(file.tls_key.clone()),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => anyhow::bail!("tls_cert and tls_key go together: give both or neither"),
        };
        if let Some(var) = &file.metrics.token_env {
            let token = std::env::var(var).map_err(|_| {
                anyhow::anyhow!("metrics.token_env: the environment variable {var} is not set")
            })?;
            anyhow::ensure!(
                token.len() >= 16,
                "metrics.token_env: the token in {var} must be at least 16 bytes"
            );
            settings.metrics_token = Some(token);
        }
        let configured_limits = file.limits.overrides("limits.").map_err(config_error)?;
        settings.limits = settings.limits.with_overrides(&configured_limits);
        settings.sources = file
            .sources
            .into_iter()
            .map(|(name, source)| {
                let window_keys = source.window_minutes.is_some() || source.window_mib.is_some();
                anyhow::ensure!(
                    source.kind.is_some() || !window_keys,
                    "sources.{name}: window_minutes and window_mib are settings of a message source (one with a kind)"
                );
                let defaults = SourceConfig::new(source.url);
                let config = SourceConfig {
                    read_only: source.read_only,
                    kind: source.kind,
                    window: match source.window_minutes {
                        Some(0) => anyhow::bail!("sources.{name}.window_minutes must be at least 1"),
                        Some(minutes) => Duration::from_secs(minutes.saturating_mul(60)),
                        None => defaults.window,
                    },
                    window_bytes: match source.window_mib {
                        Some(0) => anyhow::bail!("sources.{name}.window_mib must be at least 1"),
                        Some(mib) => usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
                        None => defaults.window_bytes,
                    },
                    ..defaults
                };
                Ok((name, config))
            })
            .collect::<anyhow::Result<_>>()
            .map_err(config_error)?;
        settings.secrets = file
            .secrets
            .into_iter()
            .map(|(name, secret)| Ok((name.clone(), parse_secret(&name, secret)?)))
            .collect::<anyhow::Result<_>>()
            .map_err(config_error)?;
        settings.auth = AuthMode::resolve(args.auth.or(file.auth), settings.listen)?;
        settings.public_hosts = file
            .public_urls
            .iter()
            .map(|url| public_host(url))
            .collect::<anyhow::Result<_>>()?;
        settings.public_url = file
            .public_urls
            .first()
            .map(|url| url.trim_end_matches('/').to_owned());
        settings.notifiers = parse_notifiers(file.notify)
            .map_err(config_error)?
            .into_iter()
            .map(std::sync::Arc::new)
            .collect();
        for notifier in &settings.notifiers {
            if let Some(secret) = &notifier.secret {
                anyhow::ensure!(
                    settings.secrets.contains_key(secret),
                    "notify {:?}: secret {secret:?} is not a [secrets.{secret}] of this config",
                    notifier.name
                );
            }
        }
        settings.retention = parse_retention(&file.retention).map_err(config_error)?;
        settings.status_pages = parse_status_pages(file.status_page).map_err(config_error)?;
        if let Some(policy) = file.policy {
            settings.policy =
                parse_policy(policy, &settings, &configured_limits).map_err(config_error)?;
            // A default the operator did not set is lowered to the ceiling; one they set
            // above it was refused by `parse_policy`.
            let ceiling = settings.limits.with_overrides(&settings.policy.max_limits);
            settings.limits = settings
                .limits
                .capped_by(&ceiling, &settings.policy.max_limits);
        }
        Ok(settings)
    }

    /// The time zones whose days the status rollups keep: UTC and each page's.
    pub fn rollup_zones(&self) -> Vec<chrono_tz::Tz> {
        let mut zones = vec![chrono_tz::Tz::UTC];
        for page in &self.status_pages {
            if !zones.contains(&page.time_zone) {
                zones.push(page.time_zone);
            }
        }
        zones
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.data_dir.join("plugins")
    }

    /// Precompiled plugin artifacts, written and read only by this host.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.data_dir.join("cache").join("compiled")
    }
}

/// The `host[:port]` a client sends as `Host` when it uses `url`.
fn public_host(url: &str) -> anyhow::Result<String> {
    let invalid = || {
        anyhow::anyhow!(
            "public_urls entry {url:?} must be an http:// or https:// URL, such as https://stepwise.example.com"
        )
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(invalid)?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(invalid()),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let entry = AllowedHost::parse(&format!("{scheme}://{authority}")).map_err(|_| invalid())?;
    let host = if entry.host.contains(':') {
        format!("[{}]", entry.host)
    } else {
        entry.host
    };
    Ok(if entry.port == default_port {
        host
    } else {
        format!("{host}:{}", entry.port)
    })
}

fn parse_policy(
    file: PolicyFile,
    settings: &Settings,
    configured_limits: &LimitOverrides,
) -> anyhow::Result<Policy> {
    let allowed_hosts = file
        .allowed_hosts
        .map(|patterns| {
            patterns
                .iter()
                .map(|pattern| HostPattern::parse(pattern).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .transpose()?;
    if let Some(sources) = &file.sql_sources {
        for source in sources {
            anyhow::ensure!(
                settings.sources.contains_key(source),
                "policy.sql_sources names {source:?}, which is not a [sources.{source}] of this config"
            );
        }
    }
    let policy = Policy {
        allowed_hosts,
        sql_sources: file.sql_sources,
        max_limits: file.max_limits.overrides("policy.max_limits.")?,
        publishers_activate_granted: file.publishers_activate_granted,
        record: file.record,
        shadow: file
            .shadow
            .as_ref()
            .map(|shadow| shadow.policy("policy.shadow."))
            .transpose()?,
        shadow_share: file
            .shadow_share
            .map(|share| {
                anyhow::ensure!(
                    share > 0.0 && share <= 1.0,
                    "policy.shadow_share = {share} is out of range: it must be above 0 and at most 1"
                );
                Ok(share)
            })
            .transpose()?,
    };
    let ceiling = settings.limits.with_overrides(&policy.max_limits);
    if let Some((key, value, max)) = settings.limits.first_above(&ceiling, configured_limits) {
        anyhow::bail!(
            "limits.{key} = {value} is above policy.max_limits.{key} = {max}: the host's own default may not exceed the operator's ceiling"
        );
    }
    Ok(policy)
}

fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("stepwise.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::parse_grant;
    use crate::model::RANGES;

    #[test]
    fn config_file_rejects_unknown_keys() {
        assert!(toml::from_str::<FileConfig>("listn = \"127.0.0.1:1\"").is_err());
        let file: FileConfig =
            toml::from_str("[sources.warehouse]\nurl = \"sqlite://x.db\"\nread_only = true\n")
                .expect("valid config");
        assert!(file.sources["warehouse"].read_only);
        let file: FileConfig =
            toml::from_str("[sources.warehouse]\nurl = \"sqlite://x.db\"\n").expect("valid config");
        assert!(file.sources["warehouse"].read_only, "read-only by default");
    }

    fn settings_from(text: &str) -> anyhow::Result<Settings> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stepwise.toml");
        std::fs::write(&path, text).expect("writing config");
        Settings::from_args(&ServeArgs {
            listen: None,
            data_dir: Some(dir.path().to_owned()),
            database_url: None,
            config: Some(path),
            auth: None,
            tls_cert: None,
            tls_key: None,
        })
    }

    #[test]
    fn auth_defaults_to_tokens_off_loopback_and_refuses_none_there() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let public: SocketAddr = "0.0.0.0:8080".parse().expect("address");
        assert_eq!(AuthMode::resolve(None, loopback).ok(), Some(AuthMode::None));
        assert_eq!(AuthMode::resolve(None, public).ok(), Some(AuthMode::Tokens));
        assert_eq!(
            AuthMode::resolve(Some(AuthMode::Tokens), loopback).ok(),
            Some(AuthMode::Tokens)
        );
        let refused = AuthMode::resolve(Some(AuthMode::None), public).expect_err("refused");
        assert!(refused.to_string().contains("--auth tokens"), "{refused}");
        let settings = settings_from("listen = \"0.0.0.0:0\"").expect("valid");
        assert_eq!(settings.auth, AuthMode::Tokens);
    }

    #[test]
    fn policy_ceilings_are_checked_against_the_host_defaults() {
        let settings = settings_from(
            "public_urls = [\"https://Stepwise.Example.com/\", \"http://10.0.0.1:8081\"]\n\
             [policy]\nallowed_hosts = [\"*.example.com:443\"]\n[policy.max_limits]\nmemory_mib = 32\n",
        )
        .expect("valid");
        assert_eq!(
            settings.public_hosts,
            ["stepwise.example.com", "10.0.0.1:8081"]
        );
        assert_eq!(settings.limits.memory_bytes, 32 << 20, "default lowered");
        let error =
            settings_from("[limits]\nmemory_mib = 64\n[policy.max_limits]\nmemory_mib = 32\n")
                .expect_err("an explicit default above the ceiling");
        assert!(
            format!("{error:#}").contains("limits.memory_mib"),
            "{error:#}"
        );
        let error =
            settings_from("[policy]\nsql_sources = [\"nowhere\"]\n").expect_err("unknown source");
        assert!(format!("{error:#}").contains("nowhere"), "{error:#}");
        assert!(settings_from("[policy]\nallowed_hosts = [\"ex*ample.com\"]\n").is_err());
        assert!(settings_from("public_urls = [\"stepwise.example.com\"]").is_err());
    }

    #[test]
    fn notifiers_and_retention_are_read_with_their_defaults() {
        let settings = settings_from(
            "public_urls = [\"https://stepwise.example.com/\"]\n\
             [[notify]]\nname = \"ops\"\nurl = \"https://hooks.example.com/T/B/x\"\n\
             format = \"slack\"\non = [\"failed\", \"recovered\"]\nplugins = [\"crm\"]\n\
             labels = {env = \"prod\"}\nafter_consecutive = 3\nretry = {initial_ms = 500}\n\
             [[notify]]\nname = \"audit\"\nurl = \"http://127.0.0.1:9000/hook\"\n\
             [retention]\nattempts_days = 0.5\nkeep_last_per_schedule = 0\n",
        )
        .expect("a valid config");
        assert_eq!(
            settings.public_url.as_deref(),
            Some("https://stepwise.example.com")
        );
        let ops = &settings.notifiers[0];
        assert_eq!(ops.format, NotifyFormat::Slack);
        assert_eq!(ops.on, [NotifyEvent::Failed, NotifyEvent::Recovered]);
        assert_eq!(ops.plugins, ["crm"]);
        assert_eq!(ops.labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(ops.after_consecutive, 3);
        assert_eq!(ops.retry.initial, Duration::from_millis(500));
        assert_eq!(ops.max_delivery, Duration::from_secs(3600));
        let audit = &settings.notifiers[1];
        assert_eq!(audit.format, NotifyFormat::Json);
        assert_eq!(audit.on.len(), 4, "every event by default");
        assert_eq!(audit.timeout, Duration::from_secs(10));
        let retention = settings.retention;
        assert_eq!(retention.attempts, Duration::from_secs(12 * 3600));
        assert_eq!(retention.keep_last_per_schedule, 0);
        assert_eq!(retention.finished_runs, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(
            retention.plugin_versions,
            Duration::from_secs(90 * 24 * 3600)
        );

        let notify = |extra: &str| {
            format!("[[notify]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/\"\n{extra}")
        };
        for (bad, named) in [
            (notify("format = \"xml\"\n"), "format"),
            (notify("on = [\"passed\"]\n"), "on"),
            (notify("plugins = [\"Not A Name\"]\n"), "plugins"),
            (notify("timeout_ms = 0\n"), "timeout_ms"),
            (notify("retry = {initial_ms = 0}\n"), "retry.initial_ms"),
            (format!("{}{}", notify(""), notify("")), "given twice"),
            (
                "[[notify]]\nname = \"ops\"\nurl = \"ftp://example.com/\"\n".to_owned(),
                "url",
            ),
            (
                "[retention]\nattempts_days = 0\n".to_owned(),
                "attempts_days",
            ),
            (
                "[retention]\nfinished_runs_days = -1\n".to_owned(),
                "finished_runs_days",
            ),
        ] {
            let error = settings_from(&bad).expect_err(&bad);
            assert!(format!("{error:#}").contains(named), "{bad}: {error:#}");
        }
    }

    /// Every numeric setting, wherever it is read, refuses 0 (where 0 is out of its range), a
    /// negative and an absurd value, naming the key.
    #[test]
    fn every_setting_refuses_values_out_of_its_range() {
        let limit_keys: Vec<&str> = RANGES
            .iter()
            .map(|(key, ..)| *key)
            .filter(|key| {
                !matches!(
                    *key,
                    "max_concurrent_ticks"
                        | "default_poll_interval_ms"
                        | "default_run_timeout_ms"
                        | "default_step_timeout_ms"
                        | "timeout_ms"
                        | "lease_ms"
                        | "max_upload_mib"
                        | "events_buffer"
                        | "events_buffer_bytes"
                        | "events_replay_bytes"
                        | "events_keep_alive_ms"
                        | "max_event_streams"
                        | "max_event_streams_per_token"
                        | "run_log_bytes"
                        | "run_recording_bytes"
                        | "plugin_memory_mib"
                        | "header_read_timeout_ms"
                        | "max_connections"
                        | "poll_interval_ms"
                        | "after_consecutive"
                        | "max_delivery_ms"
                        | "keep_last_per_schedule"
                        | "interval_ms"
                )
            })
            .collect();
        for (key, min, _) in RANGES {
            let is_limit = limit_keys.contains(key);
            for value in ["0", "-1", "99999999999999999", "1e400"] {
                if value == "0" && *min == 0 {
                    continue;
                }
                let (file, grant) = if is_limit {
                    (
                        format!("[limits]\n{key} = {value}\n"),
                        Some(format!("[limits]\n{key} = {value}\n")),
                    )
                } else if *key == "poll_interval_ms" {
                    (String::new(), Some(format!("{key} = {value}\n")))
                } else if matches!(*key, "after_consecutive" | "max_delivery_ms") {
                    (
                        format!(
                            "[[notify]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/\"\n{key} = {value}\n"
                        ),
                        None,
                    )
                } else if matches!(*key, "keep_last_per_schedule" | "interval_ms") {
                    (format!("[retention]\n{key} = {value}\n"), None)
                } else if *key == "timeout_ms" {
                    (
                        String::new(),
                        Some(format!("[steps.first]\n{key} = {value}\n")),
                    )
                } else {
                    (format!("{key} = {value}\n"), None)
                };
                if !file.is_empty() {
                    let error = settings_from(&file).expect_err(&file);
                    assert!(format!("{error:#}").contains(key), "{file}: {error:#}");
                }
                if is_limit {
                    let ceiling = format!("[policy.max_limits]\n{key} = {value}\n");
                    let error = settings_from(&ceiling).expect_err(&ceiling);
                    assert!(format!("{error:#}").contains(key), "{ceiling}: {error:#}");
                }
                if let Some(grant) = grant {
                    let error = parse_grant(&grant).expect_err(&grant);
                    assert!(format!("{error:#}").contains(key), "{grant}: {error:#}");
                }
            }
        }
    }
}
