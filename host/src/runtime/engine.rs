//! The shared `Engine`, its `Linker` and the epoch ticker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::instance::StepState;
use super::memory::PluginMemory;
use super::parked::{MAX_PARKED, Parked};
use super::plugin::LoadedPlugin;
use crate::bindings;
use crate::capabilities::kv::KvCapability;
use crate::capabilities::log::LogCapability;
use crate::capabilities::messages::MessagesCapability;
use crate::capabilities::sql::SqlCapability;
use crate::grant::Limits;
use crate::model::PluginVersion;

/// How often the epoch advances: the granularity of every call's time limit, and the longest
/// a call runs inline on a host thread before it moves to a plugin thread of its own.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The wasmtime side of the host: compiles plugins and calls them.
#[derive(Clone)]
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Arc<Linker<StepState>>,
    pub(super) compiled: Arc<Mutex<HashMap<PluginVersion, Arc<LoadedPlugin>>>>,
    /// One lock per version being loaded: see [`Runtime::loading_turn`].
    pub(super) loading: Arc<Mutex<HashMap<PluginVersion, Arc<tokio::sync::Mutex<()>>>>>,
    /// Where precompiled artifacts are kept; `None` compiles every time (the CLI's checks).
    pub(super) artifacts: Option<Arc<PathBuf>>,
    pub(super) engine_key: Arc<str>,
    /// Plugin calls run on their own threads, so that CPU-hungry plugins compete with each
    /// other, not with the API, the scheduler and the database writes of the host.
    pub(super) calls: tokio::runtime::Handle,
    /// Calls that have used more than a CPU quantum run only while holding one of these:
    /// one core fewer than the machine has (at least one), so that long, CPU-hungry calls
    /// (a plugin looping to its time limit) never take the CPU from short ones and the host.
    pub(super) long_calls: Arc<tokio::sync::Semaphore>,
    /// What all calls may hold at once beyond their allowances (`plugin_memory_mib`).
    pub(super) plugin_memory: PluginMemory,
    /// One compilation at a time: Cranelift already spreads one over every core, and each
    /// holds its component's code and compiler state in memory, so uploads sent at once
    /// queue here instead of multiplying both.
    pub(super) compiles: Arc<tokio::sync::Semaphore>,
    /// Instances kept for their runs' next calls.
    pub(super) parked: Parked,
    _calls: Arc<CallThreads>,
    _ticker: Arc<EpochTicker>,
}

impl Runtime {
    /// Builds the engine and linker and starts the epoch ticker thread (and, once per
    /// process, the allocator's trimmer). Precompiled artifacts, and the compiled functions
    /// that later compiles reuse, are kept in `artifacts` (created if missing) when given. The instance pool
    /// holds `concurrent_calls` calls at once, each up to the per-call counts of `limits`;
    /// together they hold at most the default `plugin_memory_mib` beyond each call's first
    /// [`CALL_ALLOWANCE`](super::memory::CALL_ALLOWANCE) (see [`Runtime::with_plugin_memory`]).
    pub fn new(
        artifacts: Option<PathBuf>,
        concurrent_calls: usize,
        limits: &Limits,
    ) -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        if let Some(dir) = &artifacts {
            std::fs::create_dir_all(dir)?;
            if let Some(functions) = super::functions::FunctionCache::shared(dir) {
                config.enable_incremental_compilation(functions)?;
            }
        }
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Deep recursion must trap inside the guest's own stack, far from the host's.
        config.max_wasm_stack(1 << 20);
        // Instances take pre-mapped slots instead of mapping and unmapping their memories on
        // every call: the per-call mmap/munmap and the TLB shootdowns it sends to every core
        // dominated the cost of a short call. Slots are virtual address space (reserved, not
        // committed); per-call limits still come from the store's limiter.
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(
            concurrent_calls,
            limits,
        )));
        let engine = Engine::new(&config)?;
        let engine_key = super::plugin::engine_key(&engine).into();

        let mut linker = Linker::<StepState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::log::add_to_linker::<_, LogCapability>(&mut linker, |state| &mut state.call.log)?;
        bindings::sql::add_to_linker::<_, SqlCapability>(&mut linker, |state| &mut state.call.sql)?;
        bindings::kv::add_to_linker::<_, KvCapability>(&mut linker, |state| &mut state.call.kv)?;
        bindings::messages::add_to_linker::<_, MessagesCapability>(&mut linker, |state| {
            &mut state.call.messages
        })?;

        let ticker = EpochTicker::start(engine.clone());
        super::memory::start_trimmer();
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        let calls = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("stepwise-plugin")
            .enable_all()
            .build()?;
        let long_calls = threads.saturating_sub(1).max(1);
        let parked = Parked::default();
        parked.start_expiry(calls.handle());
        Ok(Runtime {
            parked,
            long_calls: Arc::new(tokio::sync::Semaphore::new(long_calls)),
            plugin_memory: PluginMemory::new(crate::config::DEFAULT_PLUGIN_MEMORY_MIB << 20),
            compiles: Arc::new(tokio::sync::Semaphore::new(1)),
            calls: calls.handle().clone(),
            _calls: Arc::new(CallThreads(Some(calls))),
            engine,
            linker: Arc::new(linker),
            compiled: Arc::default(),
            loading: Arc::default(),
            artifacts: artifacts.map(Arc::new),
            engine_key,
            _ticker: Arc::new(ticker),
        })
    }

    /// The same runtime with `bytes` for all calls together beyond their allowances (the
    /// host's `plugin_memory_mib`). Before the first call: calls already made keep the old
    /// budget.
    pub fn with_plugin_memory(mut self, bytes: u64) -> Runtime {
        self.plugin_memory = PluginMemory::new(bytes);
        self
    }

    /// Bytes of `plugin_memory_mib` that calls hold now (memory beyond their allowances).
    pub fn plugin_memory_held(&self) -> u64 {
        self.plugin_memory.held()
    }
}

/// Calls the pool must hold besides the ticks and the parked instances: inspections of
/// uploads and `describe`.
const INSPECTIONS: usize = 8;
/// Instances, memories and tables of one call that the pool reserves room for. A grant may
/// allow more `instances`; such a call waits for room like any other host condition.
const MAX_POOLED_PER_CALL: usize = 64;
/// Memories and tables in the whole pool at most: each memory slot reserves (virtual, not
/// committed) address space.
const MAX_POOLED: usize = 8_192;
/// Dirty bytes of a memory or table that are reset in place rather than given back: a small
/// check's stack and heap.
const KEEP_RESIDENT: usize = 1 << 20;

/// The pool sized from the host's settings rather than wasmtime's defaults (1,000 slots,
/// 20,000 table elements): every call running at once gets the instances, memories and
/// table elements its limits allow, so one plugin cannot take another's slots. Running out
/// anyway is reported as a host condition, never as the plugin's fault.
fn pool_config(concurrent_calls: usize, limits: &Limits) -> PoolingAllocationConfig {
    let calls = concurrent_calls + INSPECTIONS + MAX_PARKED;
    let per_call = limits.instances.clamp(1, MAX_POOLED_PER_CALL);
    let slots = (calls * per_call).min(MAX_POOLED);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(calls as u32)
        .total_core_instances(slots as u32)
        .total_memories(slots as u32)
        .total_tables(slots as u32)
        .total_stacks(calls as u32)
        .table_elements(limits.table_elements)
        // A slot is reset after each call by rewriting only the pages the call dirtied (found
        // with Linux's PAGEMAP_SCAN, where the kernel has it), when they are at most this
        // much, instead of `madvise` over the whole memory: the page faults of the next call
        // and the TLB shootdowns the `madvise` sends to every core were half the cost of a
        // short call. What a slot keeps resident is bounded by this per slot in use or warm.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

/// Owns the plugin-call threads; shuts them down without blocking, because the last
/// `Runtime` may be dropped inside an async context, where blocking is not allowed.
struct CallThreads(Option<tokio::runtime::Runtime>);

impl Drop for CallThreads {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        // A plain thread, not a tokio task: it must tick even when every runtime worker is busy.
        std::thread::Builder::new()
            .name("stepwise-epoch".into())
            .spawn(move || {
                if !crate::priority::make_ticker_thread_real_time() {
                    tracing::debug!(
                        "the epoch ticker runs at normal priority (no permission for a real-time one)"
                    );
                }
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
