//! Runs one tick of one run: resolves the pinned plugin version and the plugin's grant, calls
//! the current step through `runtime` (and the next ones at once while they pass), enforces the
//! step timeout and the run deadline, and writes every result through the lease-fenced
//! `Store::record_tick`. Plugin verdicts and plugin faults are data here; only our own failures
//! (database, lost lease) are `Err`, and the scheduler simply tries again later.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value as Json};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::capabilities::recording::{AttemptStart, Tape};
use crate::capabilities::secrets::Secrets;
use crate::capabilities::sources::DataSources;
use crate::config::Settings;
use crate::grant::{Grant, RecordMode, parse_stored_grant};
use crate::metrics::Metrics;
use crate::model::{
    AttemptOutcome, LogLevel, LogLine, PluginVersion, RunStatus, StepStatus, UnixMillis,
    notify_series, now_millis,
};
use crate::runtime::{Capabilities, LoadedPlugin, Runtime, StepCall, StepReport};
use crate::storage::{
    self, ClaimedRun, LoadedTick, NewAttempt, NotifyWrite, RunRecord, RunWrite, StepWrite, Store,
    TickWrite,
};
use crate::telemetry;

pub mod rules;

use rules::{CallResult, Ending, RunClock, StepClock, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Storage(#[from] storage::Error),
    /// The host could not make the call fairly (instance pool full, a data source
    /// unavailable); the plugin is not charged and the tick is tried again.
    #[error("host fault during the call: {0}")]
    HostFault(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a call may take before the results of the steps that passed before it in the
/// same tick are written without waiting for it: short enough that nobody sees the delay,
/// long enough for most calls (a Rust check answers in tens of microseconds).
const WRITE_BESIDE: Duration = Duration::from_millis(5);

/// Everything a tick needs; cheap to share between concurrent ticks.
pub struct Runner {
    store: Store,
    runtime: Runtime,
    sources: DataSources,
    secrets: Secrets,
    settings: Arc<Settings>,
    metrics: Metrics,
}

/// The call a report answers: its attempt number, when it started, and when its tick was due
/// (the tick's first call only).
struct NewCall {
    attempt: u32,
    started_at: UnixMillis,
    due_at: Option<UnixMillis>,
}

/// One tick of one run: the run as loaded, the claim its writes are fenced by, and where it
/// stands between the tick's calls.
struct Tick<'a> {
    run: &'a RunRecord,
    claim: &'a ClaimedRun,
    progress: Progress,
}

impl Tick<'_> {
    fn clock(&self) -> RunClock {
        RunClock {
            created_at: self.run.created_at,
            deadline_at: self.run.deadline_at,
            poll_interval_ms: self.run.poll_interval_ms,
            max_errors: self.run.max_errors,
        }
    }

    /// The step the tick is at.
    fn step(&self) -> StepClock<'_> {
        let step = &self.run.steps[self.progress.position];
        StepClock {
            name: &step.name,
            timeout_ms: step.timeout_ms,
            max_attempts: step.max_attempts,
            first_attempt_at: step.first_attempt_at,
        }
    }
}

/// Where a run stands between two steps of one tick.
struct Progress {
    /// The run's status when it was claimed.
    status_before: RunStatus,
    position: usize,
    error_count: u32,
    started_at: UnixMillis,
    outputs: Map<String, Json>,
    http_requests: u32,
    /// Bytes of log lines stored with the run's attempts, this tick's included.
    log_bytes: u64,
    /// Which of the plugin's runs are recorded, and what the run's recordings took so far.
    record: RecordMode,
    recording_bytes: u64,
}

impl Runner {
    pub fn new(
        store: Store,
        runtime: Runtime,
        sources: DataSources,
        secrets: Secrets,
        settings: Arc<Settings>,
    ) -> Runner {
        Runner {
            store,
            runtime,
            sources,
            secrets,
            settings,
            metrics: Metrics::default(),
        }
    }

    /// Where the runner records each call, its lag and each step's propagation latency.
    pub fn with_metrics(mut self, metrics: Metrics) -> Runner {
        self.metrics = metrics;
        self
    }

    /// Works on a claimed run until its current step is pending again or the run is finished.
    /// `calls` is dropped once the tick's calls are over, before its last write is committed:
    /// the scheduler's concurrency permit, so that the next runs are called while this one
    /// waits for the writer.
    pub async fn tick(&self, claim: ClaimedRun, calls: impl Send) -> Result<()> {
        let span = tracing::info_span!(target: telemetry::TARGET, "runner.tick", otel.name = "tick", run_id = %claim.id, plugin = tracing::field::Empty);
        if let Some(run) = telemetry::run_context(&claim.id) {
            // Before the span starts: its parent is the run's span, whatever node made it.
            let _ = span.set_parent(run);
        }
        let ticked = async {
            let Some((run, writes)) = self.tick_inner(&claim).await? else {
                return Ok(());
            };
            drop(calls);
            self.commit(&run, writes).await
        };
        match ticked.instrument(span).await {
            Err(Error::Storage(storage::Error::LeaseLost(_))) => {
                tracing::info!(run_id = %claim.id, "run was cancelled or taken over during the tick; result dropped");
                Ok(())
            }
            other => other,
        }
    }

    /// A tick in four phases: resolve the plugin, then for each step that runs in this tick
    /// check its budgets, call it, and decide what its report means; returns the writes that
    /// end the tick, which [`Runner::tick`] commits once the calls are over. A passed step's
    /// result is written while the next call goes on when that call takes a while.
    async fn tick_inner(&self, claim: &ClaimedRun) -> Result<Option<(RunRecord, Vec<TickWrite>)>> {
        let Some(LoadedTick { run, grant_toml }) = self.store.load_tick(claim).await? else {
            return Ok(None);
        };
        if run.status.is_terminal() {
            return Ok(None);
        }
        // Claimed ahead of its time (the scheduler's lookahead): loaded already, it calls no
        // earlier than due. A cancel meanwhile is found by the write's lease fence.
        let early = claim.due_at - now_millis();
        if early > 0 {
            tokio::time::sleep(Duration::from_millis(early as u64)).await;
        }
        tracing::Span::current().record("plugin", run.plugin_name.as_str());
        let mut tick = Tick {
            run: &run,
            claim,
            progress: Progress {
                status_before: run.status,
                position: run.current_step,
                error_count: run.error_count,
                started_at: run.started_at.unwrap_or_else(now_millis),
                outputs: passed_outputs(&run),
                http_requests: run.http_requests,
                log_bytes: run.log_bytes,
                record: RecordMode::Off,
                recording_bytes: run.recording_bytes,
            },
        };
        let (plugin, mut capabilities) = match self.resolve(&tick, grant_toml.as_deref()).await? {
            Ok(ready) => ready,
            Err(write) => return Ok(Some((run, vec![*write]))),
        };
        tick.progress.record = self.settings.policy.record_of(&capabilities.grant);
        // Only the tick's first call was due at a time; later steps of the tick run at once.
        let mut due_at = Some(claim.due_at);
        // Results of steps that passed in this tick and are not written yet: written with the
        // next one, or beside the next call once it takes a while (`written_beside`).
        let mut unwritten = Vec::new();
        loop {
            let now = now_millis();
            if let Some(ending) = rules::out_of_time(&tick.clock(), &tick.step(), now, due_at) {
                unwritten.push(self.end(&tick, None, ending));
                return Ok(Some((run, unwritten)));
            }
            let call = self.call(&tick, &plugin, &mut capabilities, now, due_at);
            let (attempt, report) = self.written_beside(&run, &mut unwritten, call).await?;
            let new_call = NewCall {
                attempt,
                started_at: now,
                due_at: due_at.take(),
            };
            let write = self.decide(&mut tick, &capabilities, report, new_call);
            let tick_goes_on = write.run.keep_lease_ms.is_some();
            unwritten.push(write);
            if !tick_goes_on {
                return Ok(Some((run, unwritten)));
            }
            tick.progress.position += 1;
        }
    }

    /// Awaits the next call of the tick. The results before it are written together with its
    /// own when it answers soon, as most calls do (one transaction and one round trip to the
    /// database for the tick instead of one per step); once it has taken `WRITE_BESIDE`,
    /// they are written while it goes on, so that a slow step never holds back the results
    /// before it. A result that cannot be written (the lease was lost) drops the call's.
    async fn written_beside<T>(
        &self,
        run: &RunRecord,
        unwritten: &mut Vec<TickWrite>,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut call = std::pin::pin!(call);
        if unwritten.is_empty() {
            return call.await;
        }
        tokio::select! {
            biased;
            output = &mut call => return output,
            () = tokio::time::sleep(WRITE_BESIDE) => {}
        }
        let (output, written) = tokio::join!(call, self.commit(run, std::mem::take(unwritten)));
        written?;
        output
    }

    /// Phase 1: the plugin and what it may do, or the write that ends the run without a call
    /// (its deadline passed, or the plugin is gone). The deadline is checked before the plugin
    /// is loaded: a host that cannot load it (a fault that is retried) must still end the run
    /// at its deadline.
    async fn resolve(
        &self,
        tick: &Tick<'_>,
        grant_toml: Option<&str>,
    ) -> Result<Result<(Arc<LoadedPlugin>, Capabilities), Box<TickWrite>>> {
        let now = now_millis();
        if now >= tick.run.deadline_at
            && let Some(ending) = rules::out_of_time(&tick.clock(), &tick.step(), now, None)
        {
            return Ok(Err(Box::new(self.end(tick, None, ending))));
        }
        let resolved = self.keeping_lease(tick.claim, self.resolve_plugin(tick.run, grant_toml));
        let (plugin, grant) = match resolved.await?? {
            Ok(resolved) => resolved,
            Err(PluginUnavailable(message)) => {
                let ending = Ending {
                    step: StepStatus::Errored,
                    run: RunStatus::Errored,
                    message,
                    step_message: None,
                };
                return Ok(Err(Box::new(self.end(tick, None, ending))));
            }
        };
        // A grant stored before the operator tightened the policy is cut down to it here.
        let (grant, limits) = self.settings.policy.confine(grant, &self.settings.limits);
        // Taps follow the grants; one another node stored is first seen here.
        self.sources
            .messages
            .tap(&grant.sql_sources, &grant.subjects);
        let capabilities = Capabilities {
            limits,
            grant,
            sources: self.sources.clone(),
            secrets: self.secrets.current(),
            http_requests_left: 0,
        };
        Ok(Ok((plugin, capabilities)))
    }

    /// Phase 2: one call of the current step (its budgets checked by `rules::out_of_time`),
    /// in its span, recorded in the metrics. Returns the attempt's number with the report. A
    /// call the host could not make fairly is `Err`.
    async fn call(
        &self,
        tick: &Tick<'_>,
        plugin: &Arc<LoadedPlugin>,
        capabilities: &mut Capabilities,
        now: UnixMillis,
        due_at: Option<UnixMillis>,
    ) -> Result<(u32, StepReport)> {
        let (run, progress) = (tick.run, &tick.progress);
        let step = &run.steps[progress.position];
        let attempt = step.attempts + 1;
        // Debug: the log does not need it, so without an exporter it costs nothing.
        let call_span = tracing::debug_span!(
            target: telemetry::TARGET,
            "step.call",
            otel.name = "step",
            step = %step.name,
            attempt,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        let call = StepCall {
            traceparent: telemetry::traceparent(&call_span),
            run_id: run.id.to_string(),
            step: step.name.clone(),
            attempt,
            elapsed: Duration::from_millis((now - progress.started_at).max(0) as u64),
            run_created_at_ms: run.created_at,
            params: run.params.clone(),
            outputs: Json::Object(progress.outputs.clone()).to_string(),
            // Once the run's budget is spent (its last recorded attempt says so), no more.
            tape: match progress.record {
                RecordMode::Off => Tape::default(),
                _ if progress.recording_bytes >= self.settings.run_recording_bytes => {
                    Tape::default()
                }
                RecordMode::Failures | RecordMode::All => Tape::recording(
                    AttemptStart {
                        step: step.name.clone(),
                        attempt,
                        elapsed_ms: (now - progress.started_at).max(0) as u64,
                        clock_ms: now,
                    },
                    self.settings
                        .run_recording_bytes
                        .saturating_sub(progress.recording_bytes),
                    capabilities.secrets.clone(),
                ),
            },
        };
        capabilities.http_requests_left = capabilities
            .limits
            .http_requests_per_run
            .saturating_sub(progress.http_requests);
        // Boxed: wasmtime's call future is large, and the tick's future holding it is moved
        // whole into its task (`memmove` was 5 % of the workers' samples).
        let step_call = Box::pin(self.runtime.run_step(plugin, call, capabilities));
        let report = self
            .keeping_lease(tick.claim, step_call)
            .instrument(call_span.clone())
            .await?
            .map_err(|fault| Error::HostFault(fault.0))?;
        // The span's status is the call's outcome; `pending` leaves it unset.
        call_span.record("outcome", report.outcome.as_str());
        match report.outcome {
            AttemptOutcome::Passed => {
                call_span.record("otel.status_code", "OK");
            }
            AttemptOutcome::Pending => {}
            _ => {
                call_span.record("otel.status_code", "ERROR");
                call_span.record(
                    "otel.status_message",
                    report.message.as_deref().unwrap_or(report.outcome.as_str()),
                );
            }
        }
        drop(call_span);
        tracing::info!(step = %step.name, attempt, outcome = %report.outcome, message = report.message.as_deref().unwrap_or(""), "step called");
        if let Some(due) = due_at {
            self.metrics.record_tick_lag(now - due);
        }
        // A shadow run's calls stay out of the plugin's figures, which alerts watch.
        if run.shadow_of.is_none() {
            self.metrics.record_call(
                &run.plugin_name,
                &step.name,
                report.outcome.as_str(),
                report.duration,
                report.message.as_deref(),
            );
        }
        Ok((attempt, report))
    }

    /// Phase 3: what a call's report means for the step and the run (`rules::decide`) — the
    /// next step at once, another tick after the poll interval or the retry backoff, or the
    /// end of the run — as the tick's write.
    fn decide(
        &self,
        tick: &mut Tick<'_>,
        capabilities: &Capabilities,
        mut report: StepReport,
        call: NewCall,
    ) -> TickWrite {
        let run = tick.run;
        let step = &run.steps[tick.progress.position];
        let progress = &mut tick.progress;
        progress.http_requests = progress.http_requests.saturating_add(report.http_requests);
        let budget = self.settings.run_recording_bytes;
        let recording = report.recording.take().and_then(|recorded| {
            progress.recording_bytes += recorded.lines.len() as u64;
            // A cut ends the run's recording: later attempts would replay without the calls
            // cut from this one.
            if recorded.cut {
                progress.recording_bytes = progress.recording_bytes.max(budget);
            }
            recorded.compressed
        });
        if report.outcome == AttemptOutcome::Errored {
            progress.error_count += 1;
        }
        let finished_at = now_millis();
        let verdict = rules::decide(
            &tick.clock(),
            &tick.step(),
            &CallResult {
                outcome: report.outcome,
                message: report.message.as_deref().unwrap_or_default(),
                attempt: call.attempt,
                started_at: call.started_at,
                finished_at,
                errors: tick.progress.error_count,
            },
            // The run's backoff, else the grant's; without either the poll interval.
            run.retry.or(capabilities.grant.retry),
        );
        let new_attempt = NewAttempt {
            attempt: call.attempt,
            outcome: report.outcome,
            message: report.message,
            logs: within_log_budget(
                report.logs,
                &mut tick.progress.log_bytes,
                self.settings.run_log_bytes,
            ),
            started_at: call.started_at,
            duration_ms: report.duration.as_millis() as i64,
            due_at: call.due_at,
            recording,
        };
        let progress = &mut tick.progress;
        match verdict {
            Verdict::Passed => {
                let passed_after_ms = finished_at - progress.started_at;
                if run.shadow_of.is_none() {
                    self.metrics
                        .record_passed_after(&run.plugin_name, &step.name, passed_after_ms);
                }
                let output = report.output.unwrap_or_else(|| "null".into());
                progress.outputs.insert(
                    step.name.clone(),
                    serde_json::from_str(&output).unwrap_or(Json::Null),
                );
                let step_write = StepWrite {
                    position: progress.position,
                    status: StepStatus::Passed,
                    message: None,
                    output: Some(output),
                    passed_after_ms: Some(passed_after_ms),
                    skip_rest: false,
                };
                let run_write = if progress.position + 1 == run.steps.len() {
                    self.runtime.end_run(&run.id.to_string());
                    self.run_write(
                        progress,
                        RunStatus::Passed,
                        None,
                        progress.position,
                        None,
                        None,
                    )
                } else {
                    self.run_write(
                        progress,
                        RunStatus::Running,
                        None,
                        progress.position + 1,
                        Some(finished_at),
                        Some(self.lease_ms()),
                    )
                };
                self.tick_write(tick.claim, finished_at, new_attempt, step_write, run_write)
            }
            Verdict::Again {
                next_tick_at,
                message,
            } => {
                let step_write = StepWrite {
                    position: progress.position,
                    status: StepStatus::Pending,
                    message: Some(message),
                    output: None,
                    passed_after_ms: None,
                    skip_rest: false,
                };
                let run_write = self.run_write(
                    progress,
                    RunStatus::Running,
                    None,
                    progress.position,
                    Some(next_tick_at),
                    None,
                );
                self.tick_write(tick.claim, finished_at, new_attempt, step_write, run_write)
            }
            Verdict::Ends(ending) => self.end(tick, Some(new_attempt), ending),
        }
    }

    fn lease_ms(&self) -> i64 {
        self.settings.lease.as_millis() as i64
    }

    /// Awaits `call` while renewing the run's lease every third of its length, so that a call
    /// longer than the lease is not taken over by another node. A lease found lost (the run
    /// was cancelled, or the node paused so long that another took over) drops the call's
    /// result: the other holder writes instead.
    async fn keeping_lease<T>(
        &self,
        claim: &ClaimedRun,
        call: impl Future<Output = T>,
    ) -> Result<T> {
        let every = self.settings.lease / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut call = std::pin::pin!(call);
        loop {
            tokio::select! {
                output = &mut call => return Ok(output),
                _ = renew.tick() => {
                    if !self.store.renew_lease(&claim.id, claim.lease_token, self.lease_ms()).await? {
                        return Err(storage::Error::LeaseLost(claim.id.clone()).into());
                    }
                }
            }
        }
    }

    /// Finds the pinned version's compiled component (compiling it if this process has not yet)
    /// and parses the plugin's current grant (`None`: the plugin no longer exists). Loading is
    /// the host's job: a database error or a compile failure of bytes that passed inspection
    /// is `Err` (retried, the run not charged); only the plugin's own state makes it
    /// unavailable.
    async fn resolve_plugin(
        &self,
        run: &RunRecord,
        grant_toml: Option<&str>,
    ) -> Result<Result<(Arc<LoadedPlugin>, Grant), PluginUnavailable>> {
        let unavailable = |what: String| {
            PluginUnavailable(format!(
                "plugin {} version {}: {what}",
                run.plugin_name, run.plugin_version
            ))
        };
        let Some(grant_toml) = grant_toml else {
            return Ok(Err(unavailable("the plugin no longer exists".into())));
        };
        let grant = match parse_stored_grant(grant_toml) {
            Ok(grant) => grant,
            Err(error) => return Ok(Err(unavailable(format!("invalid grant: {error:#}")))),
        };
        let loaded = match self.runtime.cached(&run.plugin_version) {
            Some(loaded) => loaded,
            None => self.load_version(&run.plugin_version).await?,
        };
        Ok(Ok((loaded, grant)))
    }

    async fn load_version(&self, version: &PluginVersion) -> Result<Arc<LoadedPlugin>> {
        let _turn = self.runtime.loading_turn(version).await;
        if let Some(loaded) = self.runtime.load_precompiled(version).await {
            return Ok(loaded);
        }
        let bytes = self.store.load_component(version).await?;
        self.runtime
            .load(version, bytes.into())
            .await
            .map_err(|error| Error::HostFault(format!("compiling {version}: {error:#}")))
    }

    fn run_write(
        &self,
        progress: &Progress,
        status: RunStatus,
        message: Option<String>,
        current_step: usize,
        next_tick_at: Option<UnixMillis>,
        keep_lease_ms: Option<i64>,
    ) -> RunWrite {
        // `off` too: a grant changed while the run went on keeps nothing of a passed run.
        let drop_recordings = status == RunStatus::Passed
            && progress.record != RecordMode::All
            && progress.recording_bytes > 0;
        RunWrite {
            status,
            status_before: progress.status_before,
            message,
            current_step,
            error_count: progress.error_count,
            http_requests: progress.http_requests,
            log_bytes: progress.log_bytes,
            recording_bytes: if drop_recordings {
                0
            } else {
                progress.recording_bytes
            },
            drop_recordings,
            started_at: progress.started_at,
            next_tick_at,
            keep_lease_ms,
        }
    }

    fn tick_write(
        &self,
        claim: &ClaimedRun,
        now: UnixMillis,
        attempt: NewAttempt,
        step: StepWrite,
        run: RunWrite,
    ) -> TickWrite {
        TickWrite {
            run_id: claim.id.clone(),
            lease_token: claim.lease_token,
            node: claim.owner.clone(),
            now,
            attempt: Some(attempt),
            step,
            run,
            notify: None,
        }
    }

    /// Records the tick's writes (in order, together); when the last ends the run, reports
    /// the run's span.
    async fn commit(&self, run: &RunRecord, mut writes: Vec<TickWrite>) -> Result<()> {
        // A run that passes without keeping its recording stores none of this tick's
        // attempts' either (the earlier ticks' go with the run's write).
        if writes.last().is_some_and(|last| last.run.drop_recordings) {
            for write in &mut writes {
                if let Some(attempt) = &mut write.attempt {
                    attempt.recording = None;
                }
            }
        }
        let Some(last) = writes.last_mut() else {
            return Ok(());
        };
        if last.run.status.is_terminal() {
            last.notify = self.notify_write(run);
        }
        let ended = last
            .run
            .status
            .is_terminal()
            .then(|| (last.run.status, last.run.message.clone(), last.now));
        self.store.record_tick(writes).await?;
        if let Some((status, message, finished_at)) = ended {
            telemetry::run_finished(
                &run.id,
                &run.plugin_name,
                status,
                message.as_deref(),
                run.created_at,
                finished_at,
            );
        }
        Ok(())
    }

    /// The notifiers whose filters select `run`, for the write that ends it. A shadow run
    /// decides nothing: it notifies no one and moves no streak.
    fn notify_write(&self, run: &RunRecord) -> Option<NotifyWrite> {
        if run.shadow_of.is_some() {
            return None;
        }
        let schedule = run.schedule_id.as_deref();
        let notifiers: Vec<_> = self
            .settings
            .notifiers
            .iter()
            .filter(|notifier| notifier.watches(&run.plugin_name, schedule, &run.labels))
            .cloned()
            .collect();
        (!notifiers.is_empty()).then(|| NotifyWrite {
            series: notify_series(&run.plugin_name, schedule, &run.labels),
            notifiers,
        })
    }

    /// Ends the run at the current step; later steps become `skipped`.
    fn end(&self, tick: &Tick<'_>, attempt: Option<NewAttempt>, ending: Ending) -> TickWrite {
        let Ending {
            step: step_status,
            run: run_status,
            message,
            step_message,
        } = ending;
        tracing::info!(run_id = %tick.run.id, status = %run_status, "{message}");
        self.runtime.end_run(&tick.run.id.to_string());
        let progress = &tick.progress;
        TickWrite {
            run_id: tick.claim.id.clone(),
            lease_token: tick.claim.lease_token,
            node: tick.claim.owner.clone(),
            now: now_millis(),
            attempt,
            step: StepWrite {
                position: progress.position,
                status: step_status,
                message: Some(step_message.unwrap_or_else(|| message.clone())),
                output: None,
                passed_after_ms: None,
                skip_rest: true,
            },
            run: self.run_write(
                progress,
                run_status,
                Some(message),
                progress.position,
                None,
                None,
            ),
            notify: None,
        }
    }
}

/// The pinned plugin version cannot be used; the run ends `errored` with this message.
struct PluginUnavailable(String);

/// The lines of a call that fit in what is left of the run's log budget, in order, counting
/// the bytes of their messages in `used`. Lines past the budget are dropped (and so is the
/// capability's own note of lines it dropped, which this note then counts), and one line, not
/// counted, says how many: a run polling for days must not fill the database with its logs.
fn within_log_budget(lines: Vec<LogLine>, used: &mut u64, budget: u64) -> Vec<LogLine> {
    let mut kept = Vec::with_capacity(lines.len());
    let mut dropped = 0_usize;
    for line in lines {
        let size = line.message.len() as u64;
        if dropped == 0 && used.saturating_add(size) <= budget {
            *used += size;
            kept.push(line);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        kept.push(LogLine {
            level: LogLevel::Warn,
            message: format!(
                "{dropped} log lines of this call dropped: the run has stored its {budget} bytes \
                 of log lines (run_log_bytes)"
            ),
        });
    }
    kept
}

/// Outputs of the steps that passed so far, by step name: the `outputs` of the next call.
fn passed_outputs(run: &RunRecord) -> Map<String, Json> {
    run.steps
        .iter()
        .filter(|step| step.status == StepStatus::Passed)
        .map(|step| {
            let output = step
                .output
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok());
            (step.name.clone(), output.unwrap_or(Json::Null))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_keeps_log_lines_up_to_its_budget_and_says_how_many_it_dropped() {
        let line = |text: &str| LogLine {
            level: LogLevel::Info,
            message: text.to_owned(),
        };
        let mut used = 90;
        let kept = within_log_budget(
            vec![line("0123456789"), line("abc"), line("x")],
            &mut used,
            100,
        );
        assert_eq!(used, 100);
        assert_eq!(kept[0], line("0123456789"));
        // Once a line is dropped so are the later ones, which might have fit: the stored lines
        // are the first of the run's, without holes.
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(
            kept[1].message.starts_with("2 log lines") && kept[1].level == LogLevel::Warn,
            "{kept:?}"
        );
        let kept = within_log_budget(vec![line("y")], &mut used, 100);
        assert_eq!((kept.len(), used), (1, 100), "{kept:?}");
    }
}
