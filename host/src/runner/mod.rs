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

use crate::capabilities::secrets::Secrets;
use crate::capabilities::sql::SqlSources;
use crate::config::{Settings, parse_stored_grant};
use crate::metrics::Metrics;
use crate::model::{
    AttemptOutcome, Grant, PluginVersion, RunStatus, StepStatus, UnixMillis, notify_series,
    now_millis,
};
use crate::runtime::{Capabilities, LoadedPlugin, Runtime, StepCall, StepReport};
use crate::storage::{
    self, ClaimedRun, LoadedTick, NewAttempt, NotifyWrite, RunRecord, RunWrite, StepWrite, Store,
    TickWrite,
};
use crate::telemetry;

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
    sources: SqlSources,
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

/// Where a run stands between two steps of one tick.
struct Progress {
    /// The run's status when it was claimed.
    status_before: RunStatus,
    position: usize,
    error_count: u32,
    started_at: UnixMillis,
    outputs: Map<String, Json>,
    http_requests: u32,
}

impl Runner {
    pub fn new(
        store: Store,
        runtime: Runtime,
        sources: SqlSources,
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
        let mut progress = Progress {
            status_before: run.status,
            position: run.current_step,
            error_count: run.error_count,
            started_at: run.started_at.unwrap_or_else(now_millis),
            outputs: passed_outputs(&run),
            http_requests: run.http_requests,
        };
        let (plugin, mut capabilities) = match self
            .resolve(&run, claim, &progress, grant_toml.as_deref())
            .await?
        {
            Ok(ready) => ready,
            Err(write) => return Ok(Some((run, vec![*write]))),
        };
        // Only the tick's first call was due at a time; later steps of the tick run at once.
        let mut due_at = Some(claim.due_at);
        // Results of steps that passed in this tick and are not written yet: written with the
        // next one, or beside the next call once it takes a while (`written_beside`).
        let mut unwritten = Vec::new();
        loop {
            let now = now_millis();
            if let Some(write) = self.out_of_time(&run, claim, &progress, now, due_at) {
                unwritten.push(write);
                return Ok(Some((run, unwritten)));
            }
            let call = self.call(
                &run,
                claim,
                &plugin,
                &mut capabilities,
                &progress,
                now,
                due_at,
            );
            let (attempt, report) = self.written_beside(&run, &mut unwritten, call).await?;
            let write = self.decide(
                &run,
                claim,
                &mut progress,
                &capabilities,
                report,
                NewCall {
                    attempt,
                    started_at: now,
                    due_at: due_at.take(),
                },
            );
            let tick_goes_on = write.run.keep_lease_ms.is_some();
            unwritten.push(write);
            if !tick_goes_on {
                return Ok(Some((run, unwritten)));
            }
            progress.position += 1;
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
        run: &RunRecord,
        claim: &ClaimedRun,
        progress: &Progress,
        grant_toml: Option<&str>,
    ) -> Result<Result<(Arc<LoadedPlugin>, Capabilities), Box<TickWrite>>> {
        if now_millis() >= run.deadline_at {
            return Ok(Err(Box::new(self.deadline_passed(run, claim, progress))));
        }
        let resolved = self.keeping_lease(claim, self.resolve_plugin(run, grant_toml));
        let (plugin, grant) = match resolved.await?? {
            Ok(resolved) => resolved,
            Err(PluginUnavailable(message)) => {
                return Ok(Err(Box::new(self.finish(
                    run,
                    claim,
                    progress,
                    None,
                    StepStatus::Errored,
                    RunStatus::Errored,
                    message,
                ))));
            }
        };
        // A grant stored before the operator tightened the policy is cut down to it here.
        let (grant, limits) = self.settings.policy.confine(grant, &self.settings.limits);
        let capabilities = Capabilities {
            limits,
            grant,
            sources: self.sources.clone(),
            secrets: self.secrets.current(),
            http_requests_left: 0,
        };
        Ok(Ok((plugin, capabilities)))
    }

    /// Phase 2a: the write that ends the run when the run's deadline or the step's budget has
    /// passed before the next call. The step's budget is judged at the time the tick was due
    /// (`due_at`, the tick's first call), not when the host got to it: a poll that fell due
    /// within the budget is made however late a busy or restarted host is, so the host's lag
    /// never turns into the step's `timed_out`. A step still pending then is judged at its
    /// next poll, due after its budget, as it would have been on time.
    fn out_of_time(
        &self,
        run: &RunRecord,
        claim: &ClaimedRun,
        progress: &Progress,
        now: UnixMillis,
        due_at: Option<UnixMillis>,
    ) -> Option<TickWrite> {
        if now >= run.deadline_at {
            return Some(self.deadline_passed(run, claim, progress));
        }
        let step = &run.steps[progress.position];
        let (timeout_ms, first_attempt_at) = (step.timeout_ms?, step.first_attempt_at?);
        let judged_at = due_at.map_or(now, |due_at| due_at.min(now));
        if judged_at < first_attempt_at + timeout_ms {
            return None;
        }
        let message = format!(
            "step {:?} was still pending after its timeout of {timeout_ms} ms",
            step.name
        );
        Some(self.finish(
            run,
            claim,
            progress,
            None,
            StepStatus::TimedOut,
            RunStatus::TimedOut,
            message,
        ))
    }

    /// Phase 2b: one call of the current step, in its span, recorded in the metrics. Returns
    /// the attempt's number with the report. A call the host could not make fairly is `Err`.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        run: &RunRecord,
        claim: &ClaimedRun,
        plugin: &Arc<LoadedPlugin>,
        capabilities: &mut Capabilities,
        progress: &Progress,
        now: UnixMillis,
        due_at: Option<UnixMillis>,
    ) -> Result<(u32, StepReport)> {
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
            params: run.params.clone(),
            outputs: Json::Object(progress.outputs.clone()).to_string(),
        };
        capabilities.http_requests_left = capabilities
            .limits
            .http_requests_per_run
            .saturating_sub(progress.http_requests);
        // Boxed: wasmtime's call future is large, and the tick's future holding it is moved
        // whole into its task (`memmove` was 5 % of the workers' samples).
        let step_call = Box::pin(self.runtime.run_step(plugin, call, capabilities));
        let report = self
            .keeping_lease(claim, step_call)
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
        self.metrics.record_call(
            &run.plugin_name,
            &step.name,
            report.outcome.as_str(),
            report.duration,
            report.message.as_deref(),
        );
        Ok((attempt, report))
    }

    /// Phase 3: what a call's report means for the step and the run — the next step at once,
    /// another tick after the poll interval or the retry backoff, or the end of the run.
    fn decide(
        &self,
        run: &RunRecord,
        claim: &ClaimedRun,
        progress: &mut Progress,
        capabilities: &Capabilities,
        report: StepReport,
        call: NewCall,
    ) -> TickWrite {
        let step = &run.steps[progress.position];
        let attempt = call.attempt;
        progress.http_requests = progress.http_requests.saturating_add(report.http_requests);
        let finished_at = now_millis();
        if report.outcome == AttemptOutcome::Passed {
            self.metrics.record_passed_after(
                &run.plugin_name,
                &step.name,
                finished_at - progress.started_at,
            );
        }
        let new_attempt = NewAttempt {
            attempt,
            outcome: report.outcome,
            message: report.message.clone(),
            logs: report.logs,
            started_at: call.started_at,
            duration_ms: report.duration.as_millis() as i64,
            due_at: call.due_at,
        };
        let message = report.message.unwrap_or_default();
        let is_last = progress.position + 1 == run.steps.len();
        match report.outcome {
            AttemptOutcome::Passed => {
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
                    passed_after_ms: Some(finished_at - progress.started_at),
                    skip_rest: false,
                };
                let run_write = if is_last {
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
                self.tick_write(claim, finished_at, new_attempt, step_write, run_write)
            }
            AttemptOutcome::Pending => {
                if step.max_attempts.is_some_and(|max| attempt >= max) {
                    let message = format!(
                        "step {:?} was still pending after {attempt} attempts: {message}",
                        step.name
                    );
                    self.finish(
                        run,
                        claim,
                        progress,
                        Some(new_attempt),
                        StepStatus::Failed,
                        RunStatus::Failed,
                        message,
                    )
                } else {
                    self.wait_for_next_tick(
                        run,
                        claim,
                        progress,
                        new_attempt,
                        finished_at,
                        message,
                        run.poll_interval_ms,
                    )
                }
            }
            AttemptOutcome::Failed => {
                let run_message = format!("step {:?} failed: {message}", step.name);
                let mut write = self.finish(
                    run,
                    claim,
                    progress,
                    Some(new_attempt),
                    StepStatus::Failed,
                    RunStatus::Failed,
                    run_message,
                );
                write.step.message = Some(message);
                write
            }
            AttemptOutcome::Errored => {
                progress.error_count += 1;
                if progress.error_count >= run.max_errors {
                    let run_message = format!(
                        "step {:?} errored {} times (max_errors {}); last error: {message}",
                        step.name, progress.error_count, run.max_errors
                    );
                    let mut write = self.finish(
                        run,
                        claim,
                        progress,
                        Some(new_attempt),
                        StepStatus::Errored,
                        RunStatus::Errored,
                        run_message,
                    );
                    write.step.message = Some(message);
                    write
                } else {
                    // The run's backoff, else the grant's; without either the poll interval.
                    let backoff = run
                        .retry
                        .or(capabilities.grant.retry)
                        .map(|retry| retry.delay(progress.error_count));
                    self.wait_for_next_tick(
                        run,
                        claim,
                        progress,
                        new_attempt,
                        finished_at,
                        format!("errored: {message}"),
                        backoff.map_or(run.poll_interval_ms, |wait| wait.as_millis() as i64),
                    )
                }
            }
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

    /// The write that ends a run whose deadline has passed at its current step.
    fn deadline_passed(
        &self,
        run: &RunRecord,
        claim: &ClaimedRun,
        progress: &Progress,
    ) -> TickWrite {
        let message = format!(
            "run deadline passed ({} ms after creation) while step {:?} was not done",
            run.deadline_at - run.created_at,
            run.steps[progress.position].name
        );
        self.finish(
            run,
            claim,
            progress,
            None,
            StepStatus::TimedOut,
            RunStatus::TimedOut,
            message,
        )
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
        RunWrite {
            status,
            status_before: progress.status_before,
            message,
            current_step,
            error_count: progress.error_count,
            http_requests: progress.http_requests,
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

    /// The step is not done: keep it pending and come back after the poll interval, or sooner
    /// when the step timeout or the run deadline falls first.
    #[allow(clippy::too_many_arguments)]
    fn wait_for_next_tick(
        &self,
        run: &RunRecord,
        claim: &ClaimedRun,
        progress: &Progress,
        attempt: NewAttempt,
        now: UnixMillis,
        message: String,
        wait_ms: i64,
    ) -> TickWrite {
        let step = &run.steps[progress.position];
        let first_attempt_at = step.first_attempt_at.unwrap_or(attempt.started_at);
        let mut next_tick_at = (now + wait_ms).min(run.deadline_at);
        if let Some(timeout_ms) = step.timeout_ms {
            next_tick_at = next_tick_at.min(first_attempt_at + timeout_ms);
        }
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
        self.tick_write(claim, now, attempt, step_write, run_write)
    }

    /// Records the tick's writes (in order, together); when the last ends the run, reports
    /// the run's span.
    async fn commit(&self, run: &RunRecord, mut writes: Vec<TickWrite>) -> Result<()> {
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

    /// The notifiers whose filters select `run`, for the write that ends it.
    fn notify_write(&self, run: &RunRecord) -> Option<NotifyWrite> {
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
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        run: &RunRecord,
        claim: &ClaimedRun,
        progress: &Progress,
        attempt: Option<NewAttempt>,
        step_status: StepStatus,
        run_status: RunStatus,
        message: String,
    ) -> TickWrite {
        tracing::info!(run_id = %run.id, status = %run_status, "{message}");
        TickWrite {
            run_id: claim.id.clone(),
            lease_token: claim.lease_token,
            node: claim.owner.clone(),
            now: now_millis(),
            attempt,
            step: StepWrite {
                position: progress.position,
                status: step_status,
                message: Some(message.clone()),
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
