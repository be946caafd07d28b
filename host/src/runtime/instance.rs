//! One call into a plugin: a fresh `Store` whose state bundles each capability's state, with a
//! memory limiter and an epoch deadline. A trap, a limit or invalid output becomes an `errored`
//! report naming the cause; it never becomes an `Err` of ours, and the `Store` (poisoned after a
//! trap) is dropped with the call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::engine::Runtime;
use super::memory::Limiter;
use super::parked::ParkedInstance;
use super::plugin::LoadedPlugin;
use crate::bindings::types::{CheckInfo as WitCheckInfo, StepInput, StepOutcome};
use crate::capabilities::grants::{WallClockShift, wasi_context};
use crate::capabilities::http::HttpPolicy;
use crate::capabilities::kv::{KvState, MAX_COMMANDS_PER_CALL};
use crate::capabilities::log::{LogBuffer, LogState, truncate_utf8};
use crate::capabilities::messages::MessagesState;
use crate::capabilities::recording::{AttemptEnd, AttemptRecording, Tape};
use crate::capabilities::secrets::SecretSet;
use crate::capabilities::sources::DataSources;
use crate::capabilities::sql::SqlState;
use crate::capabilities::{HostFault, Violation};
use crate::grant::{Grant, Limits};
use crate::model::{AttemptOutcome, CheckInfo, LogLine, StepInfo};

/// Everything a call may use: the plugin's grant, the data sources and the limits in force.
#[derive(Clone)]
pub struct Capabilities {
    pub grant: Grant,
    pub limits: Limits,
    pub sources: DataSources,
    /// The host's secrets: filled into granted requests, redacted from everything returned.
    pub secrets: Arc<SecretSet>,
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
    /// When the run was created (ms since the Unix epoch): messages count from then.
    pub run_created_at_ms: i64,
    pub params: String,
    pub outputs: String,
    /// The W3C `traceparent` of the call's span, sent with the plugin's HTTP requests.
    pub traceparent: Option<String>,
    /// Whether the call's capability calls are recorded, or answered from a recording.
    pub tape: Tape,
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
    /// The call's recording, when its tape was recording.
    pub recording: Option<AttemptRecording>,
}

/// The data of a `Store`: what lives as long as the instance (its wasi resources and
/// streams, its memory's accounting), and what each call into it gets afresh.
pub struct StepState {
    table: ResourceTable,
    wasi: WasiCtx,
    /// What the guest's wall clock is set off from the host's (a replay's recorded clock).
    wall_clock: WallClockShift,
    limiter: Limiter,
    resources: ResourceCount,
    pub(super) call: CallState,
}

/// What one call may do: its capabilities' policies and budgets, its log and the limit it
/// broke, if any. Replaced before each call, also when the run's instance is kept between
/// calls ([`super::parked`]), so that no budget or grant outlives its call.
pub(super) struct CallState {
    http_ctx: WasiHttpCtx,
    http: HttpPolicy,
    pub(super) log: LogState,
    pub(super) sql: SqlState,
    pub(super) kv: KvState,
    pub(super) messages: MessagesState,
    violation: Violation,
}

/// The wasi resources (headers, requests, bodies, streams, pollables) one call may hold at
/// once. Each lives in the host's memory, outside the guest's linear memory.
pub const MAX_RESOURCES: usize = 1_000;
/// Resources a call holds without counting against its memory: the stdio streams and a
/// request or two (an ordinary check holds a handful per request it has in flight).
const FREE_RESOURCES: usize = 8;
/// What each resource beyond [`FREE_RESOURCES`] counts against the call's memory: the most a
/// `fields` resource (a set of headers) may hold, [`FIELDS_BYTES`], with room for the rest of
/// its state.
const RESOURCE_BYTES: u64 = 2 * FIELDS_BYTES as u64;
/// The most one `fields` resource may hold (as wasmtime counts it: names, values and their
/// in-memory overhead): far above any real request's headers, which proxies cap at 8 KiB.
pub const FIELDS_BYTES: usize = 16 << 10;
/// The most data the host copies out of the guest in one piece (wasmtime's hostcall fuel):
/// the arguments of one host call (a log line, a query and its parameters, a header list),
/// or what a call returns. wasmtime's default, 128 MiB, would let a plugin make the host
/// copy that much of its memory at once, before any of the host's own checks could look at
/// its size. At least twice `output_bytes`, so that an output over that limit is refused
/// by the host's own check, with its own message.
fn hostcall_bytes(limits: &Limits) -> usize {
    (1usize << 20).max(limits.output_bytes.saturating_mul(2))
}

/// wasmtime's text when a copy goes past the hostcall fuel (its error type is private).
const FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

impl StepState {
    /// Counts the wasi resources the call holds against its memory, before a wasi call that
    /// may add one. When its limits refuse more, the table takes no new resource: the next
    /// one fails the call, and the attempt names the limit. Counting walks the table, so it
    /// is done only when the resources the call may hold by now (a wasi call adds at most
    /// two) could pass what was charged; each count charges [`CHARGE_AHEAD`] more.
    fn count_resources(&mut self) {
        let resources = &mut self.resources;
        let most = resources.counted + 2 * resources.calls_since_count;
        resources.calls_since_count += 1;
        if most + 2 < resources.charged.min(MAX_RESOURCES - 1) {
            return;
        }
        let held = self.table.iter_mut().count();
        resources.counted = held;
        resources.calls_since_count = 1;
        if held + 1 >= MAX_RESOURCES {
            // Kept for the attempt's message, should the call fail on the next resource.
            self.limiter.exceeded.get_or_insert_with(|| {
                format!(
                    "wasi resource limit of {MAX_RESOURCES} exceeded (headers, requests, \
                     bodies, streams and pollables held at once)"
                )
            });
        }
        let ahead = (held + CHARGE_AHEAD).min(MAX_RESOURCES);
        let bytes = ahead.saturating_sub(FREE_RESOURCES) as u64 * RESOURCE_BYTES;
        let capacity = match self.limiter.charge_host_side(bytes) {
            Ok(()) => {
                resources.charged = ahead;
                MAX_RESOURCES
            }
            Err(_limit) => {
                resources.charged = held;
                held
            }
        };
        self.table.set_max_capacity(capacity);
    }
}

impl StepState {
    /// Counts the rows the last call's queries read for the trim at the instance's end,
    /// then gives the instance `call`'s capabilities and a new deadline.
    fn next_call(&mut self, call: CallState, deadline: Instant) {
        self.count_rows_read();
        self.call = call;
        self.limiter.renew(deadline);
    }

    /// Bytes of every memory and table the instance has now.
    pub(super) fn memory_bytes(&self) -> u64 {
        self.limiter.in_use()
    }

    fn count_rows_read(&mut self) {
        self.limiter
            .held_outside_budget(self.call.sql.read_bytes + self.call.messages.read_bytes);
    }
}

impl Drop for StepState {
    /// Before the limiter's own drop, which trims the allocator after a call that made the
    /// host hold much: the rows its queries read count too.
    fn drop(&mut self) {
        self.count_rows_read();
    }
}

/// What [`StepState::count_resources`] last found and charged.
#[derive(Default)]
struct ResourceCount {
    /// Resources in the table at the last count.
    counted: usize,
    /// Wasi calls since then.
    calls_since_count: usize,
    /// Resources the call's memory has been charged for.
    charged: usize,
}

/// Resources charged beyond those counted, so that a call adding many is counted every few
/// calls rather than at each.
const CHARGE_AHEAD: usize = 16;

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.count_resources();
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StepState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        self.count_resources();
        WasiHttpCtxView {
            ctx: &mut self.call.http_ctx,
            table: &mut self.table,
            hooks: &mut self.call.http,
        }
    }
}

/// Why a call produced no valid answer.
enum Fault {
    /// The plugin's fault: the text for the `errored` attempt.
    Plugin(String),
    /// The host's: no slot in the instance pool, a data source unavailable.
    Host(HostFault),
}

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
    /// report; `Err` is a fault of the host's (the call could not be made fairly), for which
    /// the plugin is not charged.
    pub async fn run_step(
        &self,
        plugin: &Arc<LoadedPlugin>,
        call: StepCall,
        capabilities: &Capabilities,
    ) -> Result<StepReport, HostFault> {
        let (runtime, plugin, capabilities_here) =
            (self.clone(), plugin.clone(), capabilities.clone());
        let started = Instant::now();
        self.on_call_thread(async move {
            runtime
                .run_step_here(&plugin, call, &capabilities_here)
                .await
        })
        .await
        .unwrap_or_else(|panic| {
            let message = format!("the host's call into the plugin panicked: {panic}");
            Ok(StepReport {
                outcome: AttemptOutcome::Errored,
                message: Some(capabilities.secrets.redact(&message).into_owned()),
                output: None,
                logs: Vec::new(),
                duration: started.elapsed(),
                http_requests: 0,
                recording: None,
            })
        })
    }

    /// Runs one call: first inline, on the caller's thread, until it first waits — for I/O,
    /// or at the first epoch tick ([`EPOCH_TICK`](super::engine::EPOCH_TICK)) if it
    /// computes that long — and from there on a thread of its own. Most calls of a check are
    /// done within their first slice, and the two thread switches of a hand-off cost as much
    /// as the call. A call that goes on
    /// moves to the plugin runtime's blocking pool (never the host's: a thread made nicer
    /// below must not later serve the host's own blocking work), driven by the plugin
    /// runtime's reactor and timers. The operating system then shares the CPU between calls
    /// preemptively: a short call is not queued behind a plugin that burns its whole time
    /// limit, as it would be among the tasks of one async executor. The thread runs at a lower
    /// priority than the host's own, so that however much CPU plugins want, the scheduler
    /// still starts ticks on time and the API still answers. A panic comes back as its text.
    async fn on_call_thread<T: Send + 'static>(
        &self,
        call: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        let mut call = Box::pin(call);
        let first = std::future::poll_fn(|context| {
            // Timers and sockets the call creates belong to the plugin runtime even when
            // made here, so that they outlive the caller's runtime as the call may.
            let _plugin_runtime = self.calls.enter();
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                call.as_mut().poll(context)
            }));
            std::task::Poll::Ready(polled)
        })
        .await;
        match first {
            Ok(std::task::Poll::Ready(value)) => return Ok(value),
            Ok(std::task::Poll::Pending) => {}
            Err(panic) => return Err(panic_text(panic.as_ref())),
        }
        let handle = self.calls.clone();
        self.calls
            .spawn_blocking(move || {
                crate::priority::lower_thread_priority();
                handle.block_on(call)
            })
            .await
            .map_err(|error| match error.try_into_panic() {
                Ok(panic) => panic_text(panic.as_ref()),
                Err(error) => error.to_string(),
            })
    }

    /// Gives back the instance a run left for its next call: the run has ended.
    pub fn end_run(&self, run_id: &str) {
        drop(self.parked.forget(run_id));
    }

    async fn describe_here(
        &self,
        plugin: &LoadedPlugin,
        limits: &Limits,
    ) -> anyhow::Result<CheckInfo> {
        let capabilities = Capabilities {
            grant: Grant::default(),
            limits: *limits,
            sources: DataSources::default(),
            secrets: Arc::default(),
            http_requests_left: 0,
        };
        let (mut store, stderr) = self.new_store(&capabilities, &Tape::default());
        let deadline = Instant::now() + limits.call_timeout;
        let call = tokio::time::timeout(backstop(limits), async {
            let check = plugin.pre.instantiate_async(&mut store).await?;
            check.call_describe(&mut store).await
        })
        .await;
        let info = classify_call(
            call,
            &mut store,
            &stderr,
            deadline,
            limits,
            &SecretSet::default(),
        )
        .map_err(|fault| match fault {
            Fault::Plugin(message) => anyhow::anyhow!("describe failed: {message}"),
            Fault::Host(fault) => {
                anyhow::anyhow!("describe could not run on this host right now: {fault}")
            }
        })?;
        check_info_from_wit(info)
    }

    async fn run_step_here(
        &self,
        plugin: &LoadedPlugin,
        call: StepCall,
        capabilities: &Capabilities,
    ) -> Result<StepReport, HostFault> {
        let started = Instant::now();
        let limits = capabilities.limits;
        let run_id = call.run_id.clone();
        let (mut store, stderr, kept) = match self.parked.take(&run_id, &plugin.version, &limits) {
            Some(parked) => {
                let (mut store, stderr) = (parked.store, parked.stderr);
                self.renew_store(&mut store, capabilities, &call.tape);
                (store, stderr, Some(parked.check))
            }
            None => {
                let (store, stderr) = self.new_store(capabilities, &call.tape);
                (store, stderr, None)
            }
        };
        store.data().wall_clock.set(
            call.tape
                .replay_clock_ms()
                .map(|recorded| recorded - crate::model::now_millis()),
        );
        let tape = call.tape.clone();
        store.data_mut().call.http.traceparent = call
            .traceparent
            .as_deref()
            .and_then(|value| http::HeaderValue::from_str(value).ok());
        store.data_mut().call.messages.since_ms = call.run_created_at_ms;
        let log = store.data().call.log.buffer.clone();
        let deadline = started + limits.call_timeout;
        let input = StepInput {
            run_id: call.run_id,
            step: call.step,
            attempt: call.attempt,
            elapsed_ms: call.elapsed.as_millis() as u64,
            params: call.params,
            outputs: call.outputs,
        };
        let mut instance = None;
        let call = tokio::time::timeout(backstop(&limits), async {
            let check = match kept {
                Some(check) => check,
                None => plugin.pre.instantiate_async(&mut store).await?,
            };
            let outcome = check.call_run_step(&mut store, &input).await;
            instance = Some(check);
            outcome
        })
        .await;
        let secrets = &capabilities.secrets;
        let classified = classify_call(call, &mut store, &stderr, deadline, &limits, secrets);
        let violation = store.data().call.violation.take();
        // Nothing a plugin returns is kept before the values of secrets are taken out of it.
        let redact = |text: String| {
            let text = crate::capabilities::log::storable(text);
            match secrets.redact(&text) {
                std::borrow::Cow::Borrowed(_) => text,
                std::borrow::Cow::Owned(redacted) => redacted,
            }
        };
        // A replay reaches the limit its recorded attempt broke: the same answers, the same
        // verdict of the host's.
        let violation = violation.map(redact).or_else(|| tape.recorded_violation());
        let recorded_violation = violation.clone();
        // Sizes are judged before anything reads the text: redacting a step's output parses
        // it, and a 40 MB JSON array parses into ten times that.
        let classified = classified.and_then(|outcome| {
            let text = match &outcome {
                StepOutcome::Passed(text) => ("output", text),
                StepOutcome::Pending(text) | StepOutcome::Failed(text) => ("message", text),
            };
            within_size(text.0, text.1, limits.output_bytes).map_err(Fault::Plugin)?;
            Ok(match outcome {
                StepOutcome::Passed(output) => StepOutcome::Passed(secrets.redact_json(output)),
                StepOutcome::Pending(message) => StepOutcome::Pending(redact(message)),
                StepOutcome::Failed(message) => StepOutcome::Failed(redact(message)),
            })
        });
        let classified = classified.map_err(|fault| match fault {
            Fault::Plugin(message) => Fault::Plugin(redact(message)),
            Fault::Host(fault) => Fault::Host(HostFault(redact(fault.0))),
        });
        let http_requests = store.data().call.http.requests_made;
        // A replay that could not answer a call stops there, whatever the plugin made of it.
        let classified = match tape.first_mismatch() {
            Some(mismatch) => Err(Fault::Plugin(format!("replay mismatch: {mismatch}"))),
            None => classified,
        };
        let (outcome, message, output) = match (violation, classified) {
            (_, Err(Fault::Host(fault))) => return Err(fault),
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
                Err(Fault::Plugin(fault)) => (AttemptOutcome::Errored, Some(fault), None),
                Err(Fault::Host(fault)) => return Err(fault),
            },
        };
        // The instance waits for the run's next call, unless the call broke it (a trap poisons
        // the store), broke a limit, or ended the run, or the host's budget has no room for
        // its memory.
        let run_goes_on = matches!(outcome, AttemptOutcome::Passed | AttemptOutcome::Pending);
        let clean = store.data().limiter.exceeded.is_none() && stderr.contents().is_empty();
        if let (Some(check), true, true) = (instance, run_goes_on, clean)
            && store.data_mut().limiter.charge_allowance()
        {
            let parked = ParkedInstance::new(store, stderr, check, limits);
            drop(self.parked.park(run_id, plugin.version.clone(), parked));
        } else {
            drop(store);
        }
        let recording = tape.finish(AttemptEnd {
            outcome: outcome.as_str().to_owned(),
            message: message.clone(),
            output: output
                .as_deref()
                .and_then(|output| serde_json::from_str(output).ok()),
            violation: recorded_violation,
        });
        // The recording's lines were built as JSON values many times their text's size, all
        // freed by now; a kept instance's limiter would only ask for the trim much later.
        if let Some(recording) = &recording {
            super::memory::trim_after(8 * recording.lines.len() as u64);
        }
        Ok(StepReport {
            outcome,
            message,
            output,
            logs: log.take(),
            duration: started.elapsed(),
            http_requests,
            recording,
        })
    }

    fn new_store(
        &self,
        capabilities: &Capabilities,
        tape: &Tape,
    ) -> (Store<StepState>, MemoryOutputPipe) {
        let limits = capabilities.limits;
        let deadline = Instant::now() + limits.call_timeout;
        let wall_clock = WallClockShift::default();
        let (wasi, stderr) = wasi_context(wall_clock.clone());
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let state = StepState {
            table,
            wasi,
            wall_clock,
            limiter: Limiter::new(&limits, self.plugin_memory.clone(), deadline),
            resources: ResourceCount::default(),
            call: call_state(capabilities, tape),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter_async(|state| &mut state.limiter);
        store.set_max_component_handles(MAX_RESOURCES);
        self.arm(&mut store, &limits, deadline);
        (store, stderr)
    }

    /// Readies a kept instance's store for its next call, as [`Runtime::new_store`] readies a
    /// new one: the call's own capabilities, budgets and time limit.
    fn renew_store(&self, store: &mut Store<StepState>, capabilities: &Capabilities, tape: &Tape) {
        let deadline = Instant::now() + capabilities.limits.call_timeout;
        store
            .data_mut()
            .next_call(call_state(capabilities, tape), deadline);
        self.arm(store, &capabilities.limits, deadline);
    }

    /// Sets the call's limits that live in the store itself: the copies out of the guest, and
    /// the clock checked on every epoch tick.
    fn arm(&self, store: &mut Store<StepState>, limits: &Limits, deadline: Instant) {
        store.set_hostcall_fuel(hostcall_bytes(limits));
        let mut cpu = CallCpu::start();
        let long_calls = self.long_calls.clone();
        let long_call: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>> = Arc::default();
        // Check the clock on every epoch tick: yield to tokio so the call never hogs a worker,
        // trap once the wall-clock limit has passed, and once the call has used more than a
        // CPU quantum, go on only with a long-call permit (waiting for one, if need be, with
        // the guest paused, until the deadline).
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_store| {
            if Instant::now() >= deadline {
                return Err(wasmtime::Error::new(TimeLimitExceeded));
            }
            let holds_permit = long_call
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .is_some();
            if holds_permit || cpu.used() < CPU_QUANTUM {
                return Ok(UpdateDeadline::Yield(1));
            }
            let (long_calls, long_call) = (long_calls.clone(), long_call.clone());
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    let permit =
                        tokio::time::timeout_at(deadline.into(), long_calls.acquire_owned()).await;
                    if let Ok(Ok(permit)) = permit {
                        *long_call
                            .lock()
                            .unwrap_or_else(|poison| poison.into_inner()) = Some(permit);
                    }
                }),
            ))
        });
    }
}

/// A call's capabilities: its grant's policies and its limits' budgets, all unused.
fn call_state(capabilities: &Capabilities, tape: &Tape) -> CallState {
    let limits = capabilities.limits;
    let log = LogBuffer::redacting(capabilities.secrets.clone());
    let violation = Violation::default();
    let mut http_ctx = WasiHttpCtx::new();
    http_ctx.set_field_size_limit(FIELDS_BYTES);
    CallState {
        http_ctx,
        http: HttpPolicy {
            allowed_hosts: HttpPolicy::allowed(&capabilities.grant.allowed_hosts),
            response_limit_bytes: limits.http_response_bytes,
            timeout: limits.http_timeout,
            requests_per_run: limits.http_requests_per_run,
            requests_left: capabilities.http_requests_left,
            requests_made: 0,
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.http_concurrent_requests)),
            max_in_flight: limits.http_concurrent_requests,
            log: log.clone(),
            violation: violation.clone(),
            secrets: capabilities.secrets.clone(),
            granted_secrets: capabilities.grant.secrets.clone(),
            traceparent: None,
            tape: tape.clone(),
        },
        log: LogState {
            buffer: log,
            tape: tape.clone(),
        },
        sql: SqlState {
            sources: capabilities.sources.sql.clone(),
            granted: capabilities.grant.sql_sources.clone(),
            max_rows: limits.sql_rows,
            max_result_bytes: limits.sql_result_bytes,
            timeout: limits.sql_timeout,
            violation: violation.clone(),
            read_bytes: 0,
            tape: tape.clone(),
        },
        kv: KvState {
            sources: capabilities.sources.kv.clone(),
            granted: capabilities.grant.sql_sources.clone(),
            max_result_bytes: limits.sql_result_bytes,
            timeout: limits.sql_timeout,
            commands_left: MAX_COMMANDS_PER_CALL,
            violation: violation.clone(),
            tape: tape.clone(),
        },
        messages: MessagesState {
            sources: capabilities.sources.messages.clone(),
            granted: capabilities.grant.sql_sources.clone(),
            subjects: capabilities.grant.subjects.clone(),
            since_ms: 0,
            max_result_bytes: limits.sql_result_bytes,
            timeout: limits.sql_timeout,
            violation: violation.clone(),
            read_bytes: 0,
            tape: tape.clone(),
        },
        violation,
    }
}

/// CPU a call may use before it needs a long-call permit: far more than a check's step
/// takes, far less than a plugin burning its time limit.
const CPU_QUANTUM: Duration = Duration::from_millis(20);

/// What a panic's payload says.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// The CPU time one call has used, across the threads it runs on: inline on the caller's,
/// then on a call thread of its own. Read at each epoch tick; what ran on the first thread
/// after its last reading (less than a tick) is not counted.
struct CallCpu {
    thread: std::thread::ThreadId,
    seen: Duration,
    used: Duration,
}

impl CallCpu {
    fn start() -> CallCpu {
        CallCpu {
            thread: std::thread::current().id(),
            seen: thread_cpu_time(),
            used: Duration::ZERO,
        }
    }

    fn used(&mut self) -> Duration {
        let now = thread_cpu_time();
        let thread = std::thread::current().id();
        if thread == self.thread {
            self.used += now.saturating_sub(self.seen);
        } else {
            self.thread = thread;
        }
        self.seen = now;
        self.used
    }
}

/// CPU time the current thread has used.
fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid out-pointer; the clock id is a constant every Linux and BSD
    // knows. On failure `time` stays zero, and the call is simply never treated as long.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    Duration::new(
        time.tv_sec.max(0) as u64,
        time.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The epoch callback's trap at the call's deadline. Recognised by its type: the caller's own
/// deadline is taken a moment after the store's, so under load a trap at the store's could
/// come before it and read as an unexplained trap.
#[derive(Debug)]
struct TimeLimitExceeded;

impl std::fmt::Display for TimeLimitExceeded {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("time limit exceeded")
    }
}

impl std::error::Error for TimeLimitExceeded {}

/// The epoch callback stops guest code; this backstop also bounds time spent in host calls.
fn backstop(limits: &Limits) -> Duration {
    limits.call_timeout + Duration::from_millis(100)
}

/// Turns every way a guest call can go wrong into a [`Fault`] that names the cause.
fn classify_call<T>(
    result: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    store: &mut Store<StepState>,
    stderr: &MemoryOutputPipe,
    deadline: Instant,
    limits: &Limits,
    secrets: &SecretSet,
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
        Err(_elapsed) => return Err(Fault::Plugin(time_limit())),
    };
    for cause in error.chain() {
        if let Some(fault) = cause.downcast_ref::<HostFault>() {
            return Err(Fault::Host(HostFault(fault.0.clone())));
        }
        if let Some(exhausted) = cause.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
            return Err(Fault::Host(HostFault(format!(
                "no room in the instance pool: {exhausted}"
            ))));
        }
    }
    let stderr = String::from_utf8_lossy(&stderr.contents())
        .trim()
        .to_owned();
    let timed_out = error
        .chain()
        .any(|cause| cause.downcast_ref::<TimeLimitExceeded>().is_some());
    let cause = if let Some(limit) = store.data_mut().limiter.exceeded.take() {
        limit
    } else if timed_out || Instant::now() >= deadline {
        time_limit()
    } else if error.root_cause().to_string().contains(FUEL_EXHAUSTED) {
        format!(
            "copy limit of {} bytes exceeded: the plugin handed the host more data at once (an \
             output, a message or a host call's arguments) than the host copies; outputs and \
             messages may be {} bytes (output_bytes)",
            hostcall_bytes(limits),
            limits.output_bytes
        )
    } else {
        let mut text = format!("plugin trapped: {}", error.root_cause());
        if !stderr.is_empty() {
            text.push_str(&format!(" (stderr: {stderr})"));
        }
        text
    };
    // Redacted before it is cut: a cut value would no longer match.
    let mut text = secrets.redact(&cause).into_owned();
    truncate_utf8(&mut text, limits.output_bytes);
    Err(Fault::Plugin(text))
}

/// Whether a step's `output` or `message` is within `output_bytes`.
fn within_size(what: &str, text: &str, max_bytes: usize) -> Result<(), String> {
    if text.len() > max_bytes {
        return Err(format!(
            "{what} size limit of {max_bytes} bytes exceeded ({} bytes)",
            text.len()
        ));
    }
    Ok(())
}

/// Checked again after redaction, which may lengthen a text (a placeholder can be longer
/// than the value it replaces).
fn validate_output(output: &str, max_bytes: usize) -> Result<(), String> {
    within_size("output", output, max_bytes)?;
    serde_json::from_str::<serde::de::IgnoredAny>(output)
        .map(drop)
        .map_err(|error| format!("plugin returned invalid JSON output: {error}"))
}

fn bounded_message(
    outcome: AttemptOutcome,
    message: String,
    max_bytes: usize,
) -> (AttemptOutcome, Option<String>, Option<String>) {
    match within_size("message", &message, max_bytes) {
        Ok(()) => (outcome, Some(message), None),
        Err(fault) => (AttemptOutcome::Errored, Some(fault), None),
    }
}

/// Bounds on what `describe` may return: everything it says is stored, shown and used for
/// arithmetic on times, so none of it may be unbounded.
pub const MAX_STEPS: usize = 64;
pub const MAX_NAME_BYTES: usize = 128;
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
pub const MAX_PARAMS_SCHEMA_BYTES: usize = 64 << 10;
/// A step's own timeout may not exceed the longest run (the run timeout ceiling, 7 days).
pub const MAX_STEP_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
pub const MAX_STEP_ATTEMPTS: u32 = 1_000_000;

fn check_info_from_wit(info: WitCheckInfo) -> anyhow::Result<CheckInfo> {
    anyhow::ensure!(!info.steps.is_empty(), "describe returned no steps");
    anyhow::ensure!(
        info.steps.len() <= MAX_STEPS,
        "describe returned {} steps; at most {MAX_STEPS} are allowed",
        info.steps.len()
    );
    let bounded = |what: &str, text: &str, max: usize| {
        anyhow::ensure!(
            text.len() <= max,
            "describe returned a {what} of {} bytes; at most {max} are allowed",
            text.len()
        );
        Ok(())
    };
    bounded("name", &info.name, MAX_NAME_BYTES)?;
    bounded("version", &info.version, MAX_NAME_BYTES)?;
    bounded("description", &info.description, MAX_DESCRIPTION_BYTES)?;
    if let Some(schema) = &info.params_schema {
        bounded("params schema", schema, MAX_PARAMS_SCHEMA_BYTES)?;
    }
    let mut seen = std::collections::HashSet::new();
    for step in &info.steps {
        anyhow::ensure!(
            !step.name.is_empty(),
            "describe returned a step without a name"
        );
        bounded("step name", &step.name, MAX_NAME_BYTES)?;
        bounded("step description", &step.description, MAX_DESCRIPTION_BYTES)?;
        if let Some(timeout) = step.timeout_ms {
            anyhow::ensure!(
                (1..=MAX_STEP_TIMEOUT_MS).contains(&timeout),
                "describe gave step {:?} a timeout of {timeout} ms; it must be 1 to {MAX_STEP_TIMEOUT_MS}",
                step.name
            );
        }
        if let Some(attempts) = step.max_attempts {
            anyhow::ensure!(
                (1..=MAX_STEP_ATTEMPTS).contains(&attempts),
                "describe gave step {:?} max_attempts of {attempts}; it must be 1 to {MAX_STEP_ATTEMPTS}",
                step.name
            );
        }
        anyhow::ensure!(
            seen.insert(step.name.as_str()),
            "describe returned the step name {:?} twice",
            step.name
        );
    }
    if let Some(schema) = &info.params_schema {
        crate::params_schema::compile(schema).map_err(anyhow::Error::msg)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::types::StepInfo as WitStepInfo;

    fn info(steps: Vec<WitStepInfo>) -> WitCheckInfo {
        WitCheckInfo {
            name: "check".into(),
            version: "1".into(),
            description: String::new(),
            steps,
            params_schema: None,
        }
    }

    fn step(name: &str, timeout_ms: Option<u64>) -> WitStepInfo {
        WitStepInfo {
            name: name.into(),
            description: String::new(),
            timeout_ms,
            max_attempts: None,
        }
    }

    #[test]
    fn describe_output_is_bounded() {
        assert!(check_info_from_wit(info(vec![step("a", Some(1000))])).is_ok());
        let many = (0..=MAX_STEPS)
            .map(|i| step(&format!("s{i}"), None))
            .collect();
        assert!(check_info_from_wit(info(many)).is_err());
        assert!(check_info_from_wit(info(vec![step(&"x".repeat(129), None)])).is_err());
        assert!(check_info_from_wit(info(vec![step("a", Some(u64::MAX))])).is_err());
        assert!(check_info_from_wit(info(vec![step("a", Some(0))])).is_err());
        let mut long = info(vec![step("a", None)]);
        long.description = "d".repeat(MAX_DESCRIPTION_BYTES + 1);
        assert!(check_info_from_wit(long).is_err());
    }
}
