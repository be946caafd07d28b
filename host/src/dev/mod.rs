//! `stepwise dev`: one run of a plugin file, in this process, to the end, printing every
//! call. No server and no database: the inner loop of a plugin author. The rules are the
//! runner's own (`runner::rules`: a passed step moves on at once, pending waits for the next
//! tick, step timeouts, the run deadline, errored calls until `max_errors`), kept in memory.
//! `replay.rs` runs a plugin against recordings instead, offline.

pub mod replay;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value as Json};

use crate::capabilities::http::HttpPolicy;
use crate::capabilities::recording::{self, AttemptStart, Header, RunEnd, Tape};
use crate::capabilities::secrets::{Secret, SecretSet};
use crate::capabilities::sources::DataSources;
use crate::config::Settings;
use crate::grant::parse_grant;
use crate::model::{AttemptOutcome, CheckInfo, Place, PluginVersion, RunStatus, now_millis};
use crate::runner::rules::{self, CallResult, RunClock, StepClock, Verdict, step_budget};
use crate::runtime::{Capabilities, LoadedPlugin, Runtime, StepCall, StepReport};
use crate::scheduler::planning::check_params;

/// How a local run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevOutcome {
    Passed,
    Failed,
    TimedOut,
    Errored,
}

/// Compiled plugins `stepwise dev` keeps, the newest first: enough for the checks an author
/// switches between, few enough that a cache of 20–60 MB artifacts stays small.
const CACHED_BUILDS: usize = 8;

/// Where `stepwise dev` keeps compiled plugins between launches, so that running an
/// unchanged check again starts in a fraction of a second instead of compiling for seconds:
/// `$XDG_CACHE_HOME/stepwise/compiled`, else `~/.cache/stepwise/compiled`.
pub fn user_artifacts_dir() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(cache.join("stepwise").join("compiled"))
}

/// A plugin file made ready for local calls: compiled, described, with its grant's
/// capabilities (`<file>.toml` beside it, when there is one).
struct Prepared {
    runtime: Runtime,
    plugin: Arc<LoadedPlugin>,
    version: PluginVersion,
    info: CheckInfo,
    capabilities: Capabilities,
    poll: Duration,
}

/// Compiles `file` (its code kept in `artifacts` when given) and reads its grant. SQL sources,
/// secrets and limits come from `settings`; every secret is granted, and `secrets` (`--secret
/// NAME=VALUE`) add values that may go to any of the grant's `allowed_hosts`. The sources are
/// connected only with `connect`: a replay reaches nothing.
async fn prepare(
    file: &Path,
    settings: &Settings,
    secrets: &[(String, String)],
    artifacts: Option<&Path>,
    connect: bool,
) -> anyhow::Result<Prepared> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let manifest = file.with_extension("toml");
    let grant_toml = match std::fs::read_to_string(&manifest) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", manifest.display())),
    };
    let mut grant =
        parse_grant(&grant_toml).with_context(|| format!("in {}", manifest.display()))?;
    let mut known = crate::load_secrets(settings)?;
    for (name, value) in secrets {
        match known.iter_mut().find(|secret| &secret.name == name) {
            // Declared in the config: its hosts and place, with this value.
            Some(declared) => declared.value = value.clone(),
            // Otherwise the SDK's usual place (`http::secret_header`), to any host the
            // manifest allows.
            None => known.push(Secret {
                name: name.clone(),
                value: value.clone(),
                hosts: HttpPolicy::allowed(&grant.allowed_hosts),
                place: Some(
                    Place::header("authorization", Some("Bearer {}"))
                        .map_err(|error| anyhow::anyhow!(error))?,
                ),
            }),
        }
    }
    grant.secrets = known.iter().map(|secret| secret.name.clone()).collect();
    let secrets = Arc::new(SecretSet::new(known)?);
    let limits = settings.limits.with_overrides(&grant.limits);
    let runtime = Runtime::new(artifacts.map(Path::to_path_buf), 1, &limits)?;
    let version = PluginVersion::of_bytes(&bytes);
    let inspected = runtime
        .inspect(&version, bytes.into(), &limits)
        .await
        .context("the plugin is not valid")?;
    if let Some(dir) = artifacts {
        keep_newest(dir, CACHED_BUILDS);
    }
    let poll = grant
        .poll_interval
        .unwrap_or(settings.default_poll_interval);
    let sources = if connect {
        let sources = DataSources::connect_lazy(&secrets.fill_source_urls(&settings.sources)?)
            .map_err(|error| secrets.redact_error(error))?;
        // A tap sees what is published from its subscription on: subscribed before the run.
        sources
            .messages
            .tap_now(&grant.sql_sources, &grant.subjects, Duration::from_secs(5))
            .await;
        sources
    } else {
        DataSources::default()
    };
    Ok(Prepared {
        runtime,
        plugin: inspected.plugin,
        version,
        info: inspected.check_info,
        capabilities: Capabilities {
            grant,
            limits,
            sources,
            secrets,
            http_requests_left: limits.http_requests_per_run,
        },
        poll,
    })
}

/// A passed step's output, for the steps after it (`outputs` of their input).
fn keep_output(outputs: &mut Map<String, Json>, step: &str, report: &StepReport) {
    let output = report.output.as_deref().unwrap_or("null");
    outputs.insert(
        step.to_owned(),
        serde_json::from_str(output).unwrap_or(Json::Null),
    );
}

/// One line per call (`tick`, step, attempt, outcome, time, output or message), then its log.
fn print_call(
    out: &mut impl Write,
    tick: u32,
    step: &str,
    attempt: u32,
    report: &StepReport,
) -> std::io::Result<()> {
    let detail = match report.outcome {
        AttemptOutcome::Passed => report.output.clone().unwrap_or_default(),
        _ => report.message.clone().unwrap_or_default(),
    };
    writeln!(
        out,
        "tick {tick:<3} {step:<16} attempt {attempt:<3} {:<8} {:>6} ms  {detail}",
        report.outcome.to_string(),
        report.duration.as_millis()
    )?;
    for line in &report.logs {
        writeln!(
            out,
            "         log {}: {}",
            line.level.as_str(),
            line.message
        )?;
    }
    Ok(())
}

/// Runs `file` with `params` (a JSON object) to the end, or to `timeout` (default: the
/// configured run timeout), its compiled code kept in `artifacts` when given (see
/// [`prepare`] for its grant and secrets). Every call is written to `out` as one line, and
/// the verdict as the last. With `record`, every capability call is recorded there, as the
/// server records a run (README, "Debugging a failed run").
#[allow(clippy::too_many_arguments)]
pub async fn run_file(
    file: &Path,
    params: &Json,
    settings: &Settings,
    timeout: Option<std::time::Duration>,
    secrets: &[(String, String)],
    artifacts: Option<&Path>,
    record: Option<&Path>,
    out: &mut impl Write,
) -> anyhow::Result<DevOutcome> {
    let Prepared {
        runtime,
        plugin,
        version,
        info,
        mut capabilities,
        poll,
    } = prepare(file, settings, secrets, artifacts, true).await?;
    if let Some(schema) = &info.params_schema {
        check_params(schema, params, params.to_string().len())
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    writeln!(
        out,
        "{} {} ({} steps), polling every {} ms",
        info.name,
        info.version,
        info.steps.len(),
        poll.as_millis()
    )?;

    // The server's rules (`runner::rules`) on the server's clock: a step's budget starts at its
    // first call and is judged at each tick's due time, the next tick falls at the budget or
    // the deadline when those come first.
    let started_at = now_millis();
    let timeout = timeout.unwrap_or(settings.default_run_timeout);
    let run = RunClock {
        created_at: started_at,
        deadline_at: started_at + timeout.as_millis() as i64,
        poll_interval_ms: poll.as_millis() as i64,
        max_errors: capabilities.limits.max_errors,
    };
    let mut recorded = String::new();
    // Set once the budget cut the recording: no later attempt is recorded, as on the server.
    let mut recording_cut = false;
    let mut outputs = Map::new();
    let mut errors = 0;
    let mut tick = 1;
    // Only a tick's first call was due at a time; later steps of the tick run at once.
    let mut due_at = Some(started_at);
    let (outcome, ending) = 'run: {
        for step in &info.steps {
            let mut attempt = 0;
            let mut first_attempt_at = None;
            // The step budget as the server would set it, without a run's own.
            let budget = step_budget(
                None,
                capabilities.grant.step_timeouts.get(&step.name).copied(),
                step.timeout,
                settings.default_step_timeout,
            );
            loop {
                let clock = StepClock {
                    name: &step.name,
                    timeout_ms: Some(budget.as_millis() as i64),
                    max_attempts: step.max_attempts,
                    first_attempt_at,
                };
                let now = now_millis();
                if let Some(ending) = rules::out_of_time(&run, &clock, now, due_at.take()) {
                    break 'run (DevOutcome::TimedOut, ending);
                }
                attempt += 1;
                first_attempt_at.get_or_insert(now);
                let elapsed = Duration::from_millis((now - started_at).max(0) as u64);
                let tape = match record {
                    None => Tape::default(),
                    Some(_) if recording_cut => Tape::default(),
                    Some(_) => Tape::recording(
                        AttemptStart {
                            step: step.name.clone(),
                            attempt,
                            elapsed_ms: elapsed.as_millis() as u64,
                            clock_ms: now,
                        },
                        settings
                            .run_recording_bytes
                            .saturating_sub(recorded.len() as u64),
                        capabilities.secrets.clone(),
                    ),
                };
                let call = StepCall {
                    run_id: "dev".into(),
                    step: step.name.clone(),
                    attempt,
                    elapsed,
                    run_created_at_ms: started_at,
                    params: params.to_string(),
                    outputs: Json::Object(outputs.clone()).to_string(),
                    traceparent: None,
                    tape,
                };
                let report = runtime
                    .run_step(&plugin, call, &capabilities)
                    .await
                    .map_err(|fault| {
                        anyhow::anyhow!("the host could not make the call: {fault}")
                    })?;
                capabilities.http_requests_left = capabilities
                    .http_requests_left
                    .saturating_sub(report.http_requests);
                print_call(out, tick, &step.name, attempt, &report)?;
                if let Some(recording) = &report.recording {
                    recorded.push_str(&recording.lines);
                    recording_cut |= recording.cut;
                }
                if report.outcome == AttemptOutcome::Errored {
                    errors += 1;
                }
                let result = CallResult {
                    outcome: report.outcome,
                    message: report.message.as_deref().unwrap_or_default(),
                    attempt,
                    started_at: now,
                    finished_at: now_millis(),
                    errors,
                };
                match rules::decide(&run, &clock, &result, capabilities.grant.retry) {
                    Verdict::Passed => {
                        keep_output(&mut outputs, &step.name, &report);
                        break;
                    }
                    Verdict::Again { next_tick_at, .. } => {
                        tick += 1;
                        let wait = (next_tick_at - now_millis()).max(0) as u64;
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        due_at = Some(next_tick_at);
                    }
                    Verdict::Ends(ending) => {
                        let outcome = match ending.run {
                            RunStatus::Errored => DevOutcome::Errored,
                            RunStatus::TimedOut => DevOutcome::TimedOut,
                            _ => DevOutcome::Failed,
                        };
                        break 'run (outcome, ending);
                    }
                }
            }
        }
        writeln!(out, "passed in {} ms", now_millis() - started_at)?;
        let passed = rules::Ending {
            step: crate::model::StepStatus::Passed,
            run: RunStatus::Passed,
            message: String::new(),
            step_message: None,
        };
        (DevOutcome::Passed, passed)
    };
    if outcome != DevOutcome::Passed {
        writeln!(out, "{}: {}", ending.message, ending.run)?;
    }
    if let Some(path) = record {
        let header = Header {
            format: recording::FORMAT.into(),
            version: recording::VERSION,
            run_id: "dev".into(),
            plugin: info.name.clone(),
            plugin_version: version.to_string(),
            params: params.clone(),
            created_at_ms: started_at,
        };
        let end = RunEnd {
            status: ending.run.as_str().to_owned(),
            message: (!ending.message.is_empty()).then_some(ending.message),
        };
        let text = recording::assemble_lines(header, &recorded, Some(end));
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        writeln!(out, "recorded to {}", path.display())?;
    }
    Ok(outcome)
}

/// The exit code `stepwise dev` and `stepwise run --wait` share.
pub fn exit_code(outcome: DevOutcome) -> u8 {
    match outcome {
        DevOutcome::Passed => 0,
        DevOutcome::Failed | DevOutcome::TimedOut => 1,
        DevOutcome::Errored => 2,
    }
}

/// Removes all but the `count` most recently written files of `dir`. A file that cannot be
/// read or removed is left: the cache only saves time.
fn keep_newest(dir: &Path, count: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            let path = entry.path();
            // The function cache beside them bounds itself.
            (metadata.is_file()
                && path
                    .extension()
                    .is_some_and(|extension| extension == "cwasm"))
            .then(|| (metadata.modified().ok(), path))
        })
        .collect();
    files.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in files.into_iter().skip(count) {
        let _ = std::fs::remove_file(path);
    }
}
