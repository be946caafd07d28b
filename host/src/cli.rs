//! The `stepwise` command line: parses it, sets up telemetry, and either serves or acts as a
//! client of a running server. `main.rs` is only its entry point, so that the test suite can
//! build the same program as a binary of its own (the cluster test kills nodes with `kill -9`).

use std::process::ExitCode;
use std::time::Duration;

use crate::auth::{CreateError, TokenTerms};
use crate::config::{ServeArgs, Settings};
use crate::grant::Limits;
use crate::model::CLI_ACTOR;
use crate::model::{PluginName, PluginScope, PluginVersion, Role};
use crate::storage::{AuditEntry, Store};
use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "stepwise",
    version,
    about = "Multi-step asynchronous checks in sandboxed WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Trigger a run on a server; with --wait, follow it and exit 0 on passed, 1 on failed or
    /// timed_out, 2 otherwise.
    Run {
        /// The plugin to run, by name.
        plugin: String,
        /// The run's params, a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Follow the run to its end, printing each step as it changes.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        budgets: TriggerArgs,
        /// Write a JUnit XML report of the finished run to this file (implies --wait). The
        /// file is checked to be writable before the run starts.
        #[arg(long)]
        junit: Option<std::path::PathBuf>,
        /// The server's base URL, with its scheme.
        #[arg(long, env = "STEPWISE_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// Bearer token for a server that runs with `--auth tokens` (role runner or above).
        #[arg(long, env = "STEPWISE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run a plugin file locally to the end, printing every call (no server, no database).
    /// The grant is `<file>.toml` beside it, if any. Exit 0 on passed, 1 on failed or
    /// timed_out, 2 on errored.
    Dev {
        /// The plugin component (`.wasm`).
        file: std::path::PathBuf,
        /// The run's params, a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// A `stepwise.toml` for SQL sources and limits.
        #[arg(long, env = "STEPWISE_CONFIG")]
        config: Option<std::path::PathBuf>,
        /// The run's deadline in milliseconds (default: `default_run_timeout_ms`, 600000).
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
        /// A secret for this run: the value of a `[secrets.NAME]` of --config, or else one
        /// that the host sends as `authorization: Bearer VALUE` to any host the manifest
        /// allows (repeatable).
        #[arg(long = "secret", value_name = "NAME=VALUE")]
        secrets: Vec<String>,
        /// Record every capability call of the run to this file, as the server records a run
        /// (README, "Debugging a failed run").
        #[arg(long, value_name = "FILE", conflicts_with = "replay")]
        record: Option<std::path::PathBuf>,
        /// Replay a recording (`stepwise runs recording ID > run.rec`), or every `*.rec` of a
        /// directory: the recorded run's steps and params, every capability call answered
        /// from the recording, nothing sent anywhere. Exit 0 when every replay passes.
        #[arg(long, value_name = "FILE|DIR")]
        replay: Option<std::path::PathBuf>,
        /// With --replay: answer a call the recording does not have in that order by the
        /// nearest recorded call of its kind, instead of stopping at the mismatch.
        #[arg(long, requires = "replay")]
        lenient: bool,
        /// With --replay: write a JUnit XML report there, one test case per recording.
        #[arg(long, value_name = "FILE", requires = "replay")]
        junit: Option<std::path::PathBuf>,
    },
    /// Work with plugin components without a server.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Manage API tokens in the server's database (the same --data-dir, --database-url and
    /// --config as `serve`; works while the server runs).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Status pages' daily rollups in the server's database (the same --data-dir,
    /// --database-url and --config as `serve`; works while the server runs).
    Status {
        #[command(subcommand)]
        command: StatusCommand,
    },
    /// Runs on a server: list, show, cancel. Exit 0 on success, 1 when the server refuses
    /// (an unknown id, a missing role), 2 when it cannot be reached or answers oddly.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Plugins on a server (exit codes as for `runs`).
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Schedules on a server (exit codes as for `runs`).
    Schedules {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Print the API's OpenAPI 3.1 document, as `GET /openapi.json` serves it.
    Openapi,
}

fn print_openapi() -> anyhow::Result<ExitCode> {
    let document = crate::api::openapi_document();
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(ExitCode::SUCCESS)
}

/// What `stepwise run` sends besides the plugin and params.
#[derive(Debug, Clone, Default, clap::Args)]
struct TriggerArgs {
    /// The run's deadline in milliseconds from now [default: the server's
    /// default_run_timeout_ms].
    #[arg(long, value_name = "MS")]
    timeout: Option<u64>,
    /// How long the step NAME may stay pending, in milliseconds (repeatable) [default: the
    /// grant's [steps.NAME] timeout_ms, else the plugin's, else the server's
    /// default_step_timeout_ms].
    #[arg(long = "step-timeout", value_name = "NAME=MS")]
    step_timeouts: Vec<String>,
    /// Milliseconds between calls of a pending step [default: the grant's, else the server's].
    #[arg(long, value_name = "MS")]
    poll_interval: Option<u64>,
    /// A label of the run (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Sent as `Idempotency-Key`: the same key and request give the same run, not a second.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

impl TriggerArgs {
    /// The body of `POST /v1/runs`.
    fn body(&self, plugin: &str, params: Value) -> anyhow::Result<Value> {
        let pairs = |flag: &str, entries: &[String]| {
            entries
                .iter()
                .map(|entry| {
                    entry
                        .split_once('=')
                        .map(|(key, value)| (key.to_owned(), value.to_owned()))
                        .with_context(|| format!("{flag} {entry:?} must be NAME=VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let mut step_timeouts = serde_json::Map::new();
        for (step, ms) in pairs("--step-timeout", &self.step_timeouts)? {
            let ms: u64 = ms
                .parse()
                .with_context(|| format!("--step-timeout {step}={ms}: MS must be an integer"))?;
            step_timeouts.insert(step, ms.into());
        }
        let labels: serde_json::Map<String, Value> = pairs("--label", &self.labels)?
            .into_iter()
            .map(|(key, value)| (key, value.into()))
            .collect();
        let mut body = serde_json::json!({"plugin": plugin, "params": params});
        if let Some(ms) = self.timeout {
            body["timeout_ms"] = ms.into();
        }
        if let Some(ms) = self.poll_interval {
            body["poll_interval_ms"] = ms.into();
        }
        if !step_timeouts.is_empty() {
            body["step_timeouts"] = step_timeouts.into();
        }
        if !labels.is_empty() {
            body["labels"] = labels.into();
        }
        Ok(body)
    }
}

/// Whether a `--token` was given as an argument (rather than by `STEPWISE_TOKEN`).
fn token_on_command_line(matches: &clap::ArgMatches) -> bool {
    let here = matches.ids().any(|id| id.as_str() == "token")
        && matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine);
    here || matches
        .subcommand()
        .is_some_and(|(_, sub)| token_on_command_line(sub))
}

/// Where a client command finds the server, and how it prints.
#[derive(Debug, Clone, clap::Args)]
struct ClientArgs {
    /// The server's base URL, with its scheme.
    #[arg(long, env = "STEPWISE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Bearer token for a server that runs with `--auth tokens` (role viewer or above; runner
    /// to cancel). Prefer STEPWISE_TOKEN: an argument shows in the process list.
    #[arg(long, env = "STEPWISE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the server's JSON as it is, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// The newest runs first, one line each.
    List {
        #[arg(long)]
        plugin: Option<String>,
        /// queued, running, passed, failed, errored, timed_out or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// A schedule's id.
        #[arg(long)]
        schedule: Option<String>,
        /// At most this many (1-500) [default: 50].
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A run and its steps, as a table.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a run: it ends `cancelled`, the steps already verified stay as they are.
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a recorded run's recording (JSON Lines), for `stepwise dev --replay`:
    /// `stepwise runs recording ID > run.rec`.
    Recording {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// One line each.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a kept version of plugin NAME active (roll back or forward), or with `--shadow`
    /// its shadow version: it runs beside the active one on every new run and decides
    /// nothing.
    Activate {
        name: String,
        /// The version's sha256, as `plugins list` or the dashboard shows it.
        version: String,
        #[arg(long)]
        shadow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Compare plugin NAME's shadow version with its active one (the current shadow, else the
    /// one that ended last); `--stop` ends the shadow without promoting it.
    Shadow {
        name: String,
        #[arg(long)]
        stop: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum ListCommand {
    /// One line each.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum StatusCommand {
    /// Recompute the daily rollups from the runs still stored, for every day after the first
    /// that has runs (earlier days keep theirs): after changing a page's time_zone, say.
    Rebuild {
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret, once, as the last line.
    Create {
        /// viewer, runner, publisher or admin; each includes the ones before it.
        #[arg(long)]
        role: String,
        /// A name for the token ([a-z0-9][a-z0-9._-]{0,62}); default: the role and a random
        /// suffix.
        #[arg(long)]
        name: Option<String>,
        /// A lifetime (`90d`, `12h`, at most 10 years); default: the token never expires.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// Confine a runner or publisher token to the plugins whose names match these
        /// patterns (comma-separated; `*` stands for any characters): `team-a-*`. Default:
        /// every plugin.
        #[arg(long, value_name = "PATTERNS")]
        plugins: Option<String>,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// List tokens: name, role, when and by whom they were created, when they expire or were
    /// revoked (never the secrets).
    List {
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Revoke a token: every node refuses it from the next request on.
    Revoke {
        name: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

impl TokenCommand {
    fn serve_args(&self) -> &ServeArgs {
        match self {
            TokenCommand::Create { serve, .. }
            | TokenCommand::List { serve }
            | TokenCommand::Revoke { serve, .. } => serve,
        }
    }
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a component as an upload would (compiles, exports the stepwise:plugin/check
    /// world, describe answers) and print its steps and imports; exit 1 if it is invalid.
    Check { file: std::path::PathBuf },
    /// Scaffold a check in a new directory NAME that builds as is with `stepwise plugin build
    /// NAME`: a Rust crate, a Python project (componentize-py) or a JavaScript one
    /// (componentize-js), each with the WIT, a helper module and one example step.
    New {
        /// The plugin's name: [a-z0-9][a-z0-9-]{0,62}.
        name: String,
        /// The check's language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: crate::scaffold::Lang,
    },
    /// Build the check in DIR (default: the current directory) with its language's toolchain
    /// (cargo, componentize-py or componentize-js, installed into the project when missing)
    /// and print the component's path as the last line.
    Build {
        #[arg(default_value = ".")]
        dir: std::path::PathBuf,
    },
}

/// The whole program; the exit code is the process's.
pub fn main() -> ExitCode {
    crate::runtime::favour_host_threads();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    if token_on_command_line(&matches) {
        eprintln!(
            "warning: --token puts the token in the process list (ps) and your shell history; \
             set STEPWISE_TOKEN instead"
        );
    }
    crate::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => {
            let served = runtime.block_on(serve(args)).map(|()| ExitCode::SUCCESS);
            crate::telemetry::shutdown();
            served
        }
        Command::Run {
            plugin,
            params,
            wait,
            budgets,
            junit,
            server,
            token,
        } => runtime.block_on(run(
            &server,
            token.as_deref(),
            &plugin,
            &params,
            &budgets,
            wait,
            junit.as_deref(),
        )),
        Command::Token { command } => runtime.block_on(token(command)),
        Command::Status {
            command: StatusCommand::Rebuild { serve },
        } => runtime.block_on(rebuild_rollups(serve)),
        Command::Runs { command } => runtime.block_on(runs(command)),
        Command::Plugins { command } => runtime.block_on(plugins(command)),
        Command::Schedules {
            command: ListCommand::List { client },
        } => runtime.block_on(schedules_list(client)),
        Command::Openapi => print_openapi(),
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => runtime.block_on(check_plugin(&file)),
        Command::Plugin {
            command: PluginCommand::New { name, lang },
        } => new_plugin(&name, lang),
        Command::Plugin {
            command: PluginCommand::Build { dir },
        } => crate::plugin_build::build(&dir).map(|wasm| {
            println!("{}", wasm.display());
            ExitCode::SUCCESS
        }),
        Command::Dev {
            file,
            params,
            config,
            timeout,
            secrets,
            record,
            replay,
            lenient,
            junit,
        } => match replay {
            Some(recordings) => runtime.block_on(dev_replay(
                &file,
                &recordings,
                config,
                lenient,
                junit.as_deref(),
            )),
            None => runtime.block_on(dev(
                &file,
                &params,
                config,
                timeout,
                &secrets,
                record.as_deref(),
            )),
        },
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::from(2)
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::from_args(&args)?;
    if settings.data_dir.exists() && !settings.data_dir.is_dir() {
        anyhow::bail!(
            "--data-dir {} is a file, not a directory: give a directory (it is created if missing)",
            settings.data_dir.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    crate::serve(listener, settings, shutdown).await
}

fn new_plugin(name: &str, lang: crate::scaffold::Lang) -> anyhow::Result<ExitCode> {
    let name = PluginName::parse(name).map_err(anyhow::Error::msg)?;
    let dir = std::path::PathBuf::from(name.as_str());
    crate::scaffold::new_plugin(&dir, &name, lang)?;
    let wasm = match lang {
        crate::scaffold::Lang::Rust => format!(
            "{name}/target/wasm32-wasip2/release/{}.wasm",
            name.as_str().replace('-', "_")
        ),
        _ => format!("{name}/dist/{name}.wasm"),
    };
    println!("created {}/: stepwise plugin build {name}", dir.display());
    println!("then: stepwise dev {wasm} --params '{{\"expect\": \"hello\"}}'");
    Ok(ExitCode::SUCCESS)
}

/// The settings of `stepwise dev`: `--config`'s, without a server's flags.
fn dev_settings(config: Option<std::path::PathBuf>) -> anyhow::Result<Settings> {
    Settings::from_args(&ServeArgs {
        listen: None,
        data_dir: None,
        database_url: None,
        config,
        auth: None,
        tls_cert: None,
        tls_key: None,
    })
}

async fn dev_replay(
    file: &std::path::Path,
    recordings: &std::path::Path,
    config: Option<std::path::PathBuf>,
    lenient: bool,
    junit: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let settings = dev_settings(config)?;
    let replays = crate::dev::replay::replay(
        file,
        recordings,
        &settings,
        lenient,
        junit,
        crate::dev::user_artifacts_dir().as_deref(),
        &mut std::io::stdout(),
    )
    .await?;
    Ok(ExitCode::from(match replays.as_slice() {
        [one] => one.exit_code(),
        many if many.iter().all(|replayed| replayed.passed()) => 0,
        _ => 1,
    }))
}

async fn dev(
    file: &std::path::Path,
    params: &str,
    config: Option<std::path::PathBuf>,
    timeout: Option<u64>,
    secrets: &[String],
    record: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        timeout.is_none_or(|ms| (1..=604_800_000).contains(&ms)),
        "--timeout must be from 1 to 604800000 ms"
    );
    let params: Value = serde_json::from_str(params).context("--params must be JSON")?;
    anyhow::ensure!(params.is_object(), "--params must be a JSON object");
    let settings = dev_settings(config)?;
    let secrets = secrets
        .iter()
        .map(|secret| match secret.split_once('=') {
            Some((name, value)) if crate::model::valid_name(name) => {
                Ok((name.to_owned(), value.to_owned()))
            }
            _ => Err(anyhow::anyhow!(
                "--secret must be NAME=VALUE, NAME being letters, digits, '_' or '-'"
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timeout = timeout.map(Duration::from_millis);
    let outcome = crate::dev::run_file(
        file,
        &params,
        &settings,
        timeout,
        &secrets,
        crate::dev::user_artifacts_dir().as_deref(),
        record,
        &mut std::io::stdout(),
    )
    .await?;
    Ok(ExitCode::from(crate::dev::exit_code(outcome)))
}

async fn check_plugin(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let size = bytes.len();
    let version = PluginVersion::of_bytes(&bytes);
    let runtime = crate::runtime::Runtime::new(None, 1, &Limits::default())?;
    let inspected = match runtime
        .inspect(&version, bytes.into(), &Limits::default())
        .await
    {
        Ok(inspected) => inspected,
        Err(error) => {
            println!("{}: invalid: {error:#}", file.display());
            return Ok(ExitCode::from(1));
        }
    };
    let info = &inspected.check_info;
    println!("{}: valid stepwise:plugin/check component", file.display());
    println!("  version (sha256): {version}");
    println!(
        "  size: {size} bytes ({:.1} MiB); compile: {} ms; first call (describe): {} ms",
        size as f64 / f64::from(1 << 20),
        inspected.compile_time.as_millis(),
        inspected.describe_time.as_millis()
    );
    println!("  name: {}  reported version: {}", info.name, info.version);
    if !info.description.is_empty() {
        println!("  description: {}", info.description);
    }
    println!("  steps:");
    for (position, step) in info.steps.iter().enumerate() {
        let mut extras = Vec::new();
        if let Some(timeout) = step.timeout {
            extras.push(format!("timeout {} ms", timeout.as_millis()));
        }
        if let Some(attempts) = step.max_attempts {
            extras.push(format!("max {attempts} attempts"));
        }
        let extras = if extras.is_empty() {
            String::new()
        } else {
            format!(" ({})", extras.join(", "))
        };
        println!("    {}. {}{extras}", position + 1, step.name);
    }
    println!(
        "  params schema: {}",
        if info.params_schema.is_some() {
            "yes"
        } else {
            "none"
        }
    );
    println!("  imports:");
    for import in &inspected.plugin.imports {
        println!("    {import}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The settings of `serve`'s flags, and the database they name (created if it is the default).
async fn open_database(args: &ServeArgs) -> anyhow::Result<(Settings, Store)> {
    let settings = Settings::from_args(args)?;
    if settings.database_url == Settings::for_data_dir(&settings.data_dir).database_url {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
    }
    let store = Store::open(&settings.database_url)
        .await
        .with_context(|| format!("opening database {}", settings.database_url))?;
    Ok((settings, store))
}

async fn rebuild_rollups(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (settings, store) = open_database(&args).await?;
    let zones = settings.rollup_zones();
    // Long enough for a large database: no node folds runs meanwhile.
    let lease = std::time::Duration::from_secs(600);
    let counted = crate::rollups::rebuild(&store, &zones, lease).await?;
    let names: Vec<&str> = zones.iter().map(|zone| zone.name()).collect();
    println!(
        "rebuilt the status rollups from {counted} runs, in {}",
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

async fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    let (_, store) = open_database(command.serve_args()).await?;
    match command {
        TokenCommand::Create {
            role,
            name,
            expires_in,
            plugins,
            ..
        } => {
            let role = Role::parse(&role).map_err(anyhow::Error::msg)?;
            let lifetime = expires_in
                .as_deref()
                .map(crate::api::parse_lifetime)
                .transpose()
                .map_err(|message| anyhow::anyhow!("--expires-in: {message}"))?;
            let plugins = plugins
                .as_deref()
                .map(|patterns| PluginScope::parse(patterns.split(',')))
                .transpose()
                .map_err(|message| anyhow::anyhow!("--plugins: {message}"))?;
            let terms = TokenTerms { lifetime, plugins };
            let created = crate::auth::create_token(&store, name, role, CLI_ACTOR, terms).await;
            let token = match created {
                Ok(token) => token,
                Err(CreateError::InvalidName(message)) => anyhow::bail!(message),
                Err(CreateError::InvalidScope(message)) => anyhow::bail!("--plugins: {message}"),
                Err(CreateError::Taken(name)) => {
                    anyhow::bail!(
                        "a token named {name:?} exists or was revoked (names are never reused); \
                         pick another name"
                    )
                }
                Err(CreateError::Other(error)) => return Err(error),
            };
            let scope = match &token.stored.plugins {
                Some(plugins) => format!(" for plugins {plugins}"),
                None => String::new(),
            };
            println!(
                "created token {:?} with role {role}{scope}; it is shown once, here:",
                token.stored.name
            );
            println!("{}", token.secret);
        }
        TokenCommand::List { .. } => {
            let tokens = store.list_tokens().await?;
            if tokens.is_empty() {
                println!("no tokens");
            }
            let at = |millis: i64| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64),
                )
            };
            for token in tokens {
                let mut line = format!(
                    "{:<24} {:<10} created {} by {}",
                    token.name,
                    token.role,
                    at(token.created_at),
                    token.created_by
                );
                if let Some(plugins) = &token.plugins {
                    line.push_str(&format!(", plugins {plugins}"));
                }
                if let Some(expires_at) = token.expires_at {
                    line.push_str(&format!(", expires {}", at(expires_at)));
                }
                if let Some(revoked_at) = token.revoked_at {
                    line.push_str(&format!(", revoked {}", at(revoked_at)));
                }
                println!("{line}");
            }
        }
        TokenCommand::Revoke { name, .. } => {
            let audit =
                AuditEntry::new(CLI_ACTOR, "token.revoke", &name, crate::model::now_millis());
            match store.revoke_token(&name, &audit).await {
                Ok(()) => println!("revoked token {name:?}"),
                Err(crate::storage::Error::NotFound) => {
                    anyhow::bail!("no token in use named {name:?} (see `stepwise token list`)")
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}

async fn run(
    server: &str,
    token: Option<&str>,
    plugin: &str,
    params: &str,
    trigger: &TriggerArgs,
    wait: bool,
    junit: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let params: Value = serde_json::from_str(params).context("--params must be JSON")?;
    let body = trigger.body(plugin, params)?;
    check_server(server)?;
    if let Some(path) = junit {
        // Found out now, not after a run that may take an hour.
        let existed = path.exists();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--junit {} is not writable", path.display()))?;
        if !existed {
            let _ = std::fs::remove_file(path);
        }
    }
    let client = http_client(token)?;
    let server = server.trim_end_matches('/');
    let mut request = client.post(format!("{server}/v1/runs")).json(&body);
    if let Some(key) = &trigger.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let run = send(request, server).await?.accepted("request failed")?;
    let id = run["id"].as_str().unwrap_or_default().to_owned();
    println!("run {id} queued ({server}/v1/runs/{id})");
    if !wait && junit.is_none() {
        return Ok(ExitCode::SUCCESS);
    }
    let mut shown: Vec<String> = Vec::new();
    loop {
        let run = send(client.get(format!("{server}/v1/runs/{id}")), server)
            .await?
            .accepted("reading the run failed")?;
        let steps = run["steps"].as_array().cloned().unwrap_or_default();
        for (index, step) in steps.iter().enumerate() {
            let line = format!(
                "  {:<12} {:<10} attempts={:<3}{}{}",
                step["name"].as_str().unwrap_or(""),
                step["status"].as_str().unwrap_or(""),
                step["attempts"],
                step["passed_after_ms"]
                    .as_i64()
                    .map(|ms| format!(" passed_after_ms={ms}"))
                    .unwrap_or_default(),
                step["message"]
                    .as_str()
                    .map(|message| format!(" {message}"))
                    .unwrap_or_default(),
            );
            if shown.get(index) != Some(&line) {
                println!("{line}");
                if index < shown.len() {
                    shown[index] = line;
                } else {
                    shown.push(line);
                }
            }
        }
        let status = run["status"].as_str().unwrap_or("");
        let code = match status {
            "passed" => 0,
            "failed" | "timed_out" => 1,
            "errored" | "cancelled" => 2,
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        println!(
            "run {id} {status}{}",
            run["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
        if let Some(path) = junit {
            std::fs::write(path, crate::junit::render(&run))
                .with_context(|| format!("writing {}", path.display()))?;
            println!("JUnit report written to {}", path.display());
        }
        return Ok(ExitCode::from(code));
    }
}

fn check_server(server: &str) -> anyhow::Result<()> {
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        anyhow::bail!(
            "--server {server:?} needs a scheme: http://{} (or https://…)",
            server.trim_start_matches("//")
        );
    }
    Ok(())
}

/// A client that sends `token` as a bearer token on every request.
fn http_client(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("STEPWISE_TOKEN is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .context("building the HTTP client")
}

/// What a client command got: the server's JSON, or its refusal (exit 1).
enum Answer {
    Ok(Value),
    Refused(reqwest::StatusCode, Value),
}

impl Answer {
    /// The JSON of an accepted request; a refusal as an error saying why (`fallback` when
    /// the problem has no detail).
    fn accepted(self, fallback: &str) -> anyhow::Result<Value> {
        match self {
            Answer::Ok(body) => Ok(body),
            Answer::Refused(status, body) => {
                anyhow::bail!("{status}: {}", body["detail"].as_str().unwrap_or(fallback))
            }
        }
    }
}

/// Sends `request` to `server` and reads its JSON answer.
async fn send(request: reqwest::RequestBuilder, server: &str) -> anyhow::Result<Answer> {
    let response = request
        .send()
        .await
        .with_context(|| format!("calling {server}"))?;
    let status = response.status();
    let text = response.text().await.context("reading the response")?;
    let Ok(body) = serde_json::from_str::<Value>(&text) else {
        anyhow::bail!(
            "{server} answered {status} with a body that is not Stepwise's JSON (is it a Stepwise server?): {}",
            text.chars().take(200).collect::<String>()
        );
    };
    Ok(if status.is_success() {
        Answer::Ok(body)
    } else {
        Answer::Refused(status, body)
    })
}

/// Sends `method path` to the server of a client command.
async fn call(client: &ClientArgs, method: reqwest::Method, path: &str) -> anyhow::Result<Answer> {
    call_with(client, method, path, None).await
}

/// [`call`] with a JSON body.
async fn call_with(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    check_server(&client.server)?;
    let server = client.server.trim_end_matches('/');
    let mut request =
        http_client(client.token.as_deref())?.request(method, format!("{server}{path}"));
    if let Some(body) = body {
        request = request.json(body);
    }
    send(request, server).await
}

/// Prints the answer: as JSON with `--json`, else through `table`; a refusal on stderr.
fn print_answer(
    client: &ClientArgs,
    answer: Answer,
    table: impl FnOnce(&Value) -> String,
) -> ExitCode {
    match answer {
        Answer::Ok(body) if client.json => {
            println!("{body:#}");
            ExitCode::SUCCESS
        }
        Answer::Ok(body) => {
            print!("{}", table(&body));
            ExitCode::SUCCESS
        }
        Answer::Refused(status, body) => {
            if client.json {
                println!("{body:#}");
            }
            eprintln!(
                "error: {status}: {}",
                body["detail"]
                    .as_str()
                    .unwrap_or("the server refused the request")
            );
            ExitCode::from(1)
        }
    }
}

/// Rows of text in aligned columns, the first row a header.
fn columns(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

async fn runs(command: RunsCommand) -> anyhow::Result<ExitCode> {
    match command {
        RunsCommand::List {
            plugin,
            status,
            schedule,
            limit,
            client,
        } => {
            let query: Vec<(&str, String)> = [
                ("plugin", plugin),
                ("status", status),
                ("schedule", schedule),
                ("limit", limit.map(|limit| limit.to_string())),
            ]
            .into_iter()
            .filter_map(|(key, value)| value.map(|value| (key, value)))
            .collect();
            let query = serde_urlencoded::to_string(&query).context("encoding the filters")?;
            let path = if query.is_empty() {
                "/v1/runs".to_owned()
            } else {
                format!("/v1/runs?{query}")
            };
            let answer = call(&client, reqwest::Method::GET, &path).await?;
            Ok(print_answer(&client, answer, |body| {
                let mut rows = vec![
                    ["ID", "PLUGIN", "STATUS", "STEP", "CREATED", "MESSAGE"]
                        .map(str::to_owned)
                        .to_vec(),
                ];
                for run in body["runs"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        text(&run["id"]),
                        text(&run["plugin"]),
                        text(&run["status"]),
                        text(&run["current_step"]),
                        text(&run["created_at"]),
                        text(&run["message"]),
                    ]);
                }
                columns(rows)
            }))
        }
        RunsCommand::Show { id, client } => {
            let answer = call(&client, reqwest::Method::GET, &format!("/v1/runs/{id}")).await?;
            Ok(print_answer(&client, answer, |run| {
                let mut out = format!(
                    "run {} of {} ({}): {}{}\n",
                    text(&run["id"]),
                    text(&run["plugin"]),
                    text(&run["plugin_version"])
                        .chars()
                        .take(12)
                        .collect::<String>(),
                    text(&run["status"]),
                    run["message"]
                        .as_str()
                        .map(|message| format!(": {message}"))
                        .unwrap_or_default()
                );
                let mut rows = vec![
                    ["STEP", "STATUS", "ATTEMPTS", "PASSED_AFTER_MS", "MESSAGE"]
                        .map(str::to_owned)
                        .to_vec(),
                ];
                for step in run["steps"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        text(&step["name"]),
                        text(&step["status"]),
                        text(&step["attempts"]),
                        text(&step["passed_after_ms"]),
                        text(&step["message"]),
                    ]);
                }
                out.push_str(&columns(rows));
                out
            }))
        }
        RunsCommand::Recording { id, client } => {
            check_server(&client.server)?;
            let server = client.server.trim_end_matches('/');
            let response = http_client(client.token.as_deref())?
                .get(format!("{server}/v1/runs/{id}/recording"))
                .send()
                .await
                .with_context(|| format!("calling {server}"))?;
            let status = response.status();
            let text = response.text().await.context("reading the response")?;
            if status.is_success() {
                print!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            let problem: Value = serde_json::from_str(&text).unwrap_or_default();
            eprintln!(
                "error: {status}: {}",
                problem["detail"]
                    .as_str()
                    .unwrap_or("the server refused the request")
            );
            Ok(ExitCode::from(if status.is_client_error() { 1 } else { 2 }))
        }
        RunsCommand::Cancel { id, client } => {
            let path = format!("/v1/runs/{id}/cancel");
            let answer = call(&client, reqwest::Method::POST, &path).await?;
            Ok(print_answer(&client, answer, |run| {
                format!("run {} {}\n", text(&run["id"]), text(&run["status"]))
            }))
        }
    }
}

async fn plugins(command: PluginsCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginsCommand::List { client } => plugins_list(client).await,
        PluginsCommand::Activate {
            name,
            version,
            shadow,
            client,
        } => {
            let mode = if shadow { "shadow" } else { "active" };
            let body = serde_json::json!({"version": version, "mode": mode});
            let path = format!("/v1/plugins/{name}/activate");
            let answer = call_with(&client, reqwest::Method::POST, &path, Some(&body)).await?;
            Ok(print_answer(&client, answer, |plugin| {
                let version: String = text(if shadow {
                    &plugin["shadow_version"]
                } else {
                    &plugin["active_version"]
                })
                .chars()
                .take(12)
                .collect();
                format!(
                    "plugin {} {mode} version {version}\n",
                    text(&plugin["name"])
                )
            }))
        }
        PluginsCommand::Shadow { name, stop, client } => {
            let path = format!("/v1/plugins/{name}/shadow");
            if stop {
                let answer = call(&client, reqwest::Method::DELETE, &path).await?;
                return Ok(print_answer(&client, answer, |plugin| {
                    format!("plugin {}: shadow stopped\n", text(&plugin["name"]))
                }));
            }
            let answer = call(&client, reqwest::Method::GET, &path).await?;
            Ok(print_answer(&client, answer, shadow_table))
        }
    }
}

/// The comparison of `GET /v1/plugins/{name}/shadow` as text: the two sides' outcomes, the
/// disagreements, then the steps.
fn shadow_table(body: &Value) -> String {
    let short = |value: &Value| text(value).chars().take(12).collect::<String>();
    let mut out = format!(
        "plugin {}: active {}, shadow {} ({})\n",
        text(&body["plugin"]),
        short(&body["active_version"]),
        short(&body["shadow_version"]),
        text(&body["state"]),
    );
    out.push_str(&format!(
        "{} pairs, {} finished, {} disagreed\n",
        text(&body["pairs"]),
        text(&body["finished"]),
        text(&body["disagreed"]),
    ));
    let statuses = [
        "passed",
        "failed",
        "errored",
        "timed_out",
        "cancelled",
        "unfinished",
    ];
    let mut rows = vec![
        std::iter::once("")
            .chain(statuses)
            .map(|cell| cell.to_uppercase())
            .collect::<Vec<_>>(),
    ];
    for side in ["primary", "shadow"] {
        rows.push(
            std::iter::once(side.to_owned())
                .chain(statuses.iter().map(|status| text(&body[side][status])))
                .collect(),
        );
    }
    out.push_str(&columns(rows));
    let disagreements = body["disagreements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !disagreements.is_empty() {
        let mut rows = vec![
            ["PRIMARY", "STATUS", "SHADOW", "STATUS"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for pair in &disagreements {
            rows.push(vec![
                text(&pair["primary"]["id"]),
                text(&pair["primary"]["status"]),
                text(&pair["shadow"]["id"]),
                text(&pair["shadow"]["status"]),
            ]);
        }
        out.push_str(&columns(rows));
    }
    let mut rows = vec![
        ["STEP", "PASSED", "P50_MS", "P95_MS", "ATTEMPTS"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for step in body["steps"].as_array().into_iter().flatten() {
        let pair = |key: &str| {
            format!(
                "{} / {}",
                text(&step["primary"][key]),
                text(&step["shadow"][key])
            )
        };
        rows.push(vec![
            text(&step["name"]),
            pair("passed"),
            pair("passed_after_ms_p50"),
            pair("passed_after_ms_p95"),
            pair("attempts"),
        ]);
    }
    out.push_str(&columns(rows));
    out
}

async fn plugins_list(client: ClientArgs) -> anyhow::Result<ExitCode> {
    let answer = call(&client, reqwest::Method::GET, "/v1/plugins").await?;
    Ok(print_answer(&client, answer, |body| {
        let mut rows = vec![
            ["NAME", "ACTIVE_VERSION", "STEPS", "UPDATED"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for plugin in body["plugins"].as_array().into_iter().flatten() {
            let steps: Vec<String> = plugin["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|step| text(&step["name"]))
                .collect();
            rows.push(vec![
                text(&plugin["name"]),
                text(&plugin["active_version"]).chars().take(12).collect(),
                steps.join(","),
                text(&plugin["updated_at"]),
            ]);
        }
        columns(rows)
    }))
}

/// Every schedule, page after page (a server lists them a page at a time).
async fn schedules_list(client: ClientArgs) -> anyhow::Result<ExitCode> {
    let mut schedules = Vec::new();
    let mut path = "/v1/schedules?limit=1000".to_owned();
    let answer = loop {
        match call(&client, reqwest::Method::GET, &path).await? {
            Answer::Ok(mut page) => {
                if let Some(list) = page["schedules"].as_array_mut() {
                    schedules.append(list);
                }
                match page["next_cursor"].as_str() {
                    Some(cursor) => path = format!("/v1/schedules?limit=1000&cursor={cursor}"),
                    None => break Answer::Ok(serde_json::json!({"schedules": schedules})),
                }
            }
            refused => break refused,
        }
    };
    Ok(print_answer(&client, answer, |body| {
        let mut rows = vec![
            [
                "ID",
                "PLUGIN",
                "TRIGGER",
                "PAUSED",
                "NEXT_FIRE",
                "CREATED_BY",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for schedule in body["schedules"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&schedule["id"]),
                text(&schedule["plugin"]),
                text(&schedule["trigger"]),
                text(&schedule["paused"]),
                text(&schedule["next_fire_at"]),
                text(&schedule["created_by"]),
            ]);
        }
        columns(rows)
    }))
}
