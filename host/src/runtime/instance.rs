//! One call into a plugin: a fresh `Store` whose state bundles each capability's state, with a
//! memory limiter and an epoch deadline. A trap, a limit or invalid output becomes an `errored`
//! report naming the cause; it never becomes an `Err` of ours, and the `Store` (poisoned after a
//! trap) is dropped with the call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::engine::{EPOCH_TICK, Runtime};
use super::plugin::LoadedPlugin;
use crate::bindings::types::{CheckInfo as WitCheckInfo, StepInput, StepOutcome};
use crate::capabilities::Violation;
use crate::capabilities::grants::wasi_context;
use crate::capabilities::http::HttpPolicy;
use crate::capabilities::log::{LogBuffer, LogState};
use crate::capabilities::sql::{SqlSources, SqlState};
use crate::model::{AttemptOutcome, CheckInfo, Grant, Limits, LogLine, StepInfo};

/// Everything a call may use: the plugin's grant, the data sources and the limits in force.
#[derive(Clone)]
pub struct Capabilities {
    pub grant: Grant,
    pub limits: Limits,
    pub sources: SqlSources,
    /// Outbound HTTP requests the run may still make.
    pub http_requests_left: u32,
}

/// The input of one `run-step` call.
#[derive(Debug, Clone)]
pub struct StepCall {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    pub elapsed: Duration,
    pub params: String,
    pub outputs: String,
}

/// What one `run-step` call came to.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub outcome: AttemptOutcome,
    /// The pending/failed message, or the fault of an errored call.
    pub message: Option<String>,
    /// JSON text of a passed step's output.
    pub output: Option<String>,
    pub logs: Vec<LogLine>,
    pub duration: Duration,
    /// Outbound HTTP requests the call made, refused ones included.
    pub http_requests: u32,
}

/// The data of one call's `Store`.
pub struct StepState {
    table: ResourceTable,
    wasi: WasiCtx,
    http_ctx: WasiHttpCtx,
    http: HttpPolicy,
    pub(super) log: LogState,
    pub(super) sql: SqlState,
    limiter: Limiter,
    violation: Violation,
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StepState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

/// Caps linear memory, tables and instances, and remembers which cap was hit so that the
/// attempt's message can name it.
struct Limiter {
    memory_bytes: u64,
    table_elements: usize,
    instances: usize,
    exceeded: Option<String>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            let limit = format!("memory limit of {} MiB exceeded", self.memory_bytes >> 20);
            self.exceeded = Some(limit.clone());
            return Err(wasmtime::Error::msg(limit));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            let limit = format!("table limit of {} elements exceeded", self.table_elements);
            self.exceeded = Some(limit.clone());
            return Err(wasmtime::Error::msg(limit));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.instances
    }
}

/// A call that did not produce a valid answer: the text for the `errored` attempt.
struct Fault(String);

impl Runtime {
    /// Calls `describe` within `limits` and without capabilities, on a call thread.
    pub async fn describe(
        &self,
        plugin: &Arc<LoadedPlugin>,
        limits: &Limits,
    ) -> anyhow::Result<CheckInfo> {
        let (runtime, plugin, limits) = (self.clone(), plugin.clone(), *limits);
        self.on_call_thread(async move { runtime.describe_here(&plugin, &limits).await })
            .await
            .unwrap_or_else(|panic| {
                Err(anyhow::anyhow!(
                    "describe failed: the call panicked: {panic}"
                ))
            })
    }

    /// Calls `run-step` once, on the plugin threads. Plugin faults come back as an `errored`
    /// report, never as `Err`.
    pub async fn run_step(
        &self,
        plugin: &Arc<LoadedPlugin>,
        call: StepCall,
        capabilities: &Capabilities,
    ) -> StepReport {
        let (runtime, plugin, capabilities) = (self.clone(), plugin.clone(), capabilities.clone());
        let started = Instant::now();
        self.on_call_thread(
            async move { runtime.run_step_here(&plugin, call, &capabilities).await },
        )
        .await
        .unwrap_or_else(|panic| StepReport {
            outcome: AttemptOutcome::Errored,
            message: Some(format!("the host's call into the plugin panicked: {panic}")),
            output: None,
            logs: Vec::new(),
            duration: started.elapsed(),
            http_requests: 0,
        })
    }

    /// Runs one call on a thread of its own (from tokio's blocking pool), driven by the
    /// plugin runtime's reactor and timers. The operating system then shares the CPU between
    /// calls preemptively: a short call is not queued behind a plugin that burns its whole
    /// time limit, as it would be among the tasks of one async executor.
    async fn on_call_thread<T: Send + 'static>(
        &self,
        call: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let handle = self.calls.clone();
        tokio::task::spawn_blocking(move || handle.block_on(call)).await
    }

    async fn describe_here(
        &self,
        plugin: &LoadedPlugin,
        limits: &Limits,
    ) -> anyhow::Result<CheckInfo> {
        let capabilities = Capabilities {
            grant: Grant::default(),
            limits: *limits,
            sources: SqlSources::default(),
            http_requests_left: 0,
        };
        let (mut store, stderr) = self.new_store(&capabilities);
        let deadline = Instant::now() + limits.call_timeout;
        let call = tokio::time::timeout(backstop(limits), async {
            let check = plugin.pre.instantiate_async(&mut store).await?;
            check.call_describe(&mut store).await
        })
        .await;
        let info = classify_call(call, &mut store, &stderr, deadline, limits)
            .map_err(|Fault(message)| anyhow::anyhow!("describe failed: {message}"))?;
        check_info_from_wit(info)
    }

    async fn run_step_here(
        &self,
        plugin: &LoadedPlugin,
        call: StepCall,
        capabilities: &Capabilities,
    ) -> StepReport {
        let started = Instant::now();
        let limits = capabilities.limits;
        let (mut store, stderr) = self.new_store(capabilities);
        let log = store.data().log.buffer.clone();
        let deadline = started + limits.call_timeout;
        let input = StepInput {
            run_id: call.run_id,
            step: call.step,
            attempt: call.attempt,
            elapsed_ms: call.elapsed.as_millis() as u64,
            params: call.params,
            outputs: call.outputs,
        };
        let call = tokio::time::timeout(backstop(&limits), async {
            let check = plugin.pre.instantiate_async(&mut store).await?;
            check.call_run_step(&mut store, &input).await
        })
        .await;
        let classified = classify_call(call, &mut store, &stderr, deadline, &limits);
        let violation = store.data().violation.take();
        let http_requests = store.data().http.requests_made;
        let (outcome, message, output) = match (violation, classified) {
            (Some(limit), _) => (AttemptOutcome::Errored, Some(limit), None),
            (None, classified) => match classified {
                Ok(StepOutcome::Passed(output)) => {
                    match validate_output(&output, limits.output_bytes) {
                        Ok(()) => (AttemptOutcome::Passed, None, Some(output)),
                        Err(fault) => (AttemptOutcome::Errored, Some(fault), None),
                    }
                }
                Ok(StepOutcome::Pending(message)) => {
                    bounded_message(AttemptOutcome::Pending, message, limits.output_bytes)
                }
                Ok(StepOutcome::Failed(message)) => {
                    bounded_message(AttemptOutcome::Failed, message, limits.output_bytes)
                }
                Err(Fault(fault)) => (AttemptOutcome::Errored, Some(fault), None),
            },
        };
        drop(store);
        StepReport {
            outcome,
            message,
            output,
            logs: log.take(),
            duration: started.elapsed(),
            http_requests,
        }
    }

    fn new_store(&self, capabilities: &Capabilities) -> (Store<StepState>, MemoryOutputPipe) {
        let limits = capabilities.limits;
        let (wasi, stderr) = wasi_context();
        let log = LogBuffer::default();
        let violation = Violation::default();
        let state = StepState {
            table: ResourceTable::new(),
            wasi,
            http_ctx: WasiHttpCtx::new(),
            http: HttpPolicy {
                allowed_hosts: HttpPolicy::allowed(&capabilities.grant.allowed_hosts),
                response_limit_bytes: limits.http_response_bytes,
                timeout: limits.http_timeout,
                requests_per_run: limits.http_requests_per_run,
                requests_left: capabilities.http_requests_left,
                requests_made: 0,
                log: log.clone(),
                violation: violation.clone(),
            },
            log: LogState { buffer: log },
            sql: SqlState {
                sources: capabilities.sources.clone(),
                granted: capabilities.grant.sql_sources.clone(),
                max_rows: limits.sql_rows,
                timeout: limits.sql_timeout,
                violation: violation.clone(),
            },
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                instances: limits.instances,
                exceeded: None,
            },
            violation,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        let deadline = Instant::now() + limits.call_timeout;
        // Check the clock on every epoch tick: yield to tokio so the call never hogs a worker,
        // and trap once the wall-clock limit has passed.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_store| {
            if Instant::now() >= deadline {
                Err(wasmtime::Error::msg("time limit exceeded"))
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        (store, stderr)
    }
}

/// The epoch callback stops guest code; this backstop also bounds time spent in host calls.
fn backstop(limits: &Limits) -> Duration {
    limits.call_timeout + EPOCH_TICK * 10
}

/// Turns every way a guest call can go wrong into a [`Fault`] that names the cause.
fn classify_call<T>(
    result: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    store: &mut Store<StepState>,
    stderr: &MemoryOutputPipe,
    deadline: Instant,
    limits: &Limits,
) -> Result<T, Fault> {
    let time_limit = || {
        format!(
            "time limit of {} ms exceeded",
            limits.call_timeout.as_millis()
        )
    };
    let error = match result {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(error)) => error,
        Err(_elapsed) => return Err(Fault(time_limit())),
    };
    let stderr = String::from_utf8_lossy(&stderr.contents())
        .trim()
        .to_owned();
    let cause = if let Some(limit) = store.data_mut().limiter.exceeded.take() {
        limit
    } else if Instant::now() >= deadline {
        time_limit()
    } else {
        let mut text = format!("plugin trapped: {}", error.root_cause());
        if !stderr.is_empty() {
            text.push_str(&format!(" (stderr: {stderr})"));
        }
        text
    };
    let mut text = cause;
    truncate_utf8(&mut text, limits.output_bytes);
    Err(Fault(text))
}

fn validate_output(output: &str, max_bytes: usize) -> Result<(), String> {
    if output.len() > max_bytes {
        return Err(format!(
            "output size limit of {max_bytes} bytes exceeded ({} bytes)",
            output.len()
        ));
    }
    serde_json::from_str::<serde_json::Value>(output)
        .map(drop)
        .map_err(|error| format!("plugin returned invalid JSON output: {error}"))
}

fn bounded_message(
    outcome: AttemptOutcome,
    message: String,
    max_bytes: usize,
) -> (AttemptOutcome, Option<String>, Option<String>) {
    if message.len() > max_bytes {
        let fault = format!(
            "message size limit of {max_bytes} bytes exceeded ({} bytes)",
            message.len()
        );
        return (AttemptOutcome::Errored, Some(fault), None);
    }
    (outcome, Some(message), None)
}

fn truncate_utf8(text: &mut String, max_bytes: usize) {
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

fn check_info_from_wit(info: WitCheckInfo) -> anyhow::Result<CheckInfo> {
    anyhow::ensure!(!info.steps.is_empty(), "describe returned no steps");
    let mut seen = std::collections::HashSet::new();
    for step in &info.steps {
        anyhow::ensure!(
            seen.insert(step.name.as_str()),
            "describe returned the step name {:?} twice",
            step.name
        );
    }
    if let Some(schema) = &info.params_schema {
        let schema: serde_json::Value = serde_json::from_str(schema)
            .map_err(|error| anyhow::anyhow!("params schema is not JSON: {error}"))?;
        jsonschema::validator_for(&schema).map_err(|error| {
            anyhow::anyhow!("params schema is not a valid JSON Schema: {error}")
        })?;
    }
    Ok(CheckInfo {
        name: info.name,
        version: info.version,
        description: info.description,
        steps: info
            .steps
            .into_iter()
            .map(|step| StepInfo {
                name: step.name,
                description: step.description,
                timeout: step.timeout_ms.map(Duration::from_millis),
                max_attempts: step.max_attempts,
            })
            .collect(),
        params_schema: info.params_schema,
    })
}
