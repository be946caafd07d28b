//! Guest memory: what one call may hold (`memory_mib`: all its linear memories and tables
//! together), and what all calls on this host may hold at once (`plugin_memory_mib`, beyond
//! each call's first [`CALL_ALLOWANCE`]). Without the second bound, every call running at once
//! could fill its own limit: 64 ticks of 64 MiB are 4 GiB of host memory, whatever the
//! per-call limit says. A call that would go past the host's budget is paused inside its
//! `memory.grow` until other calls give memory back, and no longer than its own time limit;
//! running out of time that way is a host condition (the tick is retried, the plugin is not
//! charged), because the plugin asked for no more than its grant allows.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::capabilities::HostFault;

/// Memory of each call that does not count against the host's budget: a small check's
/// stack, heap and tables fit, so that the many short calls of ordinary checks never wait
/// behind a large one.
pub const CALL_ALLOWANCE: u64 = 4 << 20;

/// The host's budget is handed out in wasm pages.
const UNIT: u64 = 64 << 10;

/// The memory all calls on this host may hold beyond their allowances, shared by every
/// call's [`Limiter`]. Waiters are served in order, so a large request is not starved by
/// small ones.
#[derive(Clone)]
pub struct PluginMemory {
    bytes: u64,
    units: Arc<Semaphore>,
}

impl PluginMemory {
    pub fn new(bytes: u64) -> PluginMemory {
        let units = (bytes / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        PluginMemory {
            bytes: units as u64 * UNIT,
            units: Arc::new(Semaphore::new(units)),
        }
    }

    /// Bytes of the budget no call holds now.
    fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }

    /// Bytes of the budget calls hold now.
    pub fn held(&self) -> u64 {
        self.bytes - self.available()
    }
}

/// Caps the memory of one call, all its linear memories and tables together, and its
/// instances, and remembers which cap was hit so that the attempt's message can name it. A
/// call may create many instances, each with memories of its own: a cap per memory would let
/// it use `instances` times the limit. Memory past [`CALL_ALLOWANCE`] is taken from the
/// host's [`PluginMemory`] and given back when the call's store is dropped.
pub struct Limiter {
    memory_bytes: u64,
    table_elements: usize,
    instances: usize,
    /// Bytes of every memory and table the call has now.
    in_use: u64,
    /// Bytes counted for what the call's wasi resources may hold in the host (headers,
    /// streams, requests): the most it has held at once, see [`Limiter::charge_host_side`].
    host_side: u64,
    /// Bytes the host held for the call outside any budget (see
    /// [`Limiter::held_outside_budget`]).
    outside_budget: u64,
    pub exceeded: Option<String>,
    host: PluginMemory,
    /// The part of the host's budget this call holds.
    held: Option<OwnedSemaphorePermit>,
    /// The call's own time limit: the longest it waits for the host's budget.
    deadline: Instant,
    /// While the instance waits for its run's next call: the part of the host's budget that
    /// stands for its allowance (see [`Limiter::charge_allowance`]).
    allowance: Option<OwnedSemaphorePermit>,
}

/// What one table element counts against `memory_mib` (a reference is a pointer).
const TABLE_ELEMENT_BYTES: u64 = std::mem::size_of::<usize>() as u64;

impl Limiter {
    pub fn new(limits: &crate::grant::Limits, host: PluginMemory, deadline: Instant) -> Limiter {
        Limiter {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.table_elements,
            instances: limits.instances,
            in_use: 0,
            host_side: 0,
            outside_budget: 0,
            exceeded: None,
            host,
            held: None,
            deadline,
            allowance: None,
        }
    }

    /// Readies a kept instance's limiter for its next call: that call's time limit, and no
    /// limit exceeded yet. What the instance holds stays counted.
    pub fn renew(&mut self, deadline: Instant) {
        self.deadline = deadline;
        self.exceeded = None;
        self.allowance = None;
    }

    /// Charges the memory the instance holds within its allowance to the host's budget as
    /// well, until its next call: an instance waiting between calls has no allowance, so that
    /// kept instances never add to what `plugin_memory_mib` bounds. False, charging nothing,
    /// when the budget has no room for it now.
    pub fn charge_allowance(&mut self) -> bool {
        let units = self.in_use.min(CALL_ALLOWANCE).div_ceil(UNIT) as u32;
        match self.host.units.clone().try_acquire_many_owned(units) {
            Ok(permit) => {
                self.allowance = Some(permit);
                true
            }
            Err(_) => false,
        }
    }

    /// Bytes of every memory and table the instance has now.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    async fn grow(&mut self, current: u64, desired: u64) -> wasmtime::Result<bool> {
        let in_use = self.in_use - current.min(self.in_use) + desired;
        if let Err(limit) = self.within_limits(in_use + self.host_side) {
            return self.refuse(limit);
        }
        let more = self.units_missing(in_use, self.host_side);
        if more > 0 {
            let acquired = tokio::time::timeout_at(
                self.deadline.into(),
                self.host.units.clone().acquire_many_owned(more),
            )
            .await;
            let Ok(Ok(permit)) = acquired else {
                return Err(wasmtime::Error::new(HostFault(format!(
                    "the host's memory for plugin calls (plugin_memory_mib = {}) stayed in use \
                     by other calls until this call's time limit",
                    self.host.bytes >> 20
                ))));
            };
            self.hold(permit);
        }
        self.in_use = in_use;
        Ok(true)
    }

    /// Counts `bytes` of host-side state against the same limits as the call's linear
    /// memory: what its wasi resources may hold in the host's own memory, which no
    /// `memory.grow` ever asks for. All of it comes from the host's budget (none from the
    /// call's allowance). A host call cannot be paused like a `memory.grow`, so the budget is
    /// taken only if it is free now. The count keeps its highest value until the call ends. `Err` is the text of the limit that refused it, also kept as
    /// the limit the call exceeded.
    pub fn charge_host_side(&mut self, bytes: u64) -> Result<(), String> {
        if bytes <= self.host_side {
            return Ok(());
        }
        let total = self.in_use + bytes;
        let refused = |limiter: &mut Limiter, limit: String| {
            limiter.exceeded.get_or_insert_with(|| limit.clone());
            Err(limit)
        };
        if let Err(limit) = self.within_limits(total) {
            return refused(self, limit);
        }
        let more = self.units_missing(self.in_use, bytes);
        if more > 0 {
            match self.host.units.clone().try_acquire_many_owned(more) {
                Ok(permit) => self.hold(permit),
                Err(_) => {
                    let limit = format!(
                        "memory limit of plugin_memory_mib = {} MiB exceeded: the host's \
                         memory for plugin calls is in use, and wasi resources cannot wait \
                         for it",
                        self.host.bytes >> 20
                    );
                    return refused(self, limit);
                }
            }
        }
        self.host_side = bytes;
        Ok(())
    }

    /// Counts `bytes` the host held for the call, freed by now, that no budget charged (the
    /// rows its queries read, bounded by their own result limit): only for the trim at the
    /// call's end.
    pub fn held_outside_budget(&mut self, bytes: u64) {
        self.outside_budget = self.outside_budget.max(bytes);
    }

    /// Whether a call may hold `total` bytes at all: within `memory_mib`, and within what
    /// the host could ever give it.
    fn within_limits(&self, total: u64) -> Result<(), String> {
        if total > self.memory_bytes {
            return Err(format!(
                "memory limit of {} MiB exceeded (all memories and tables of the call, and \
                 what its wasi resources hold in the host, together)",
                self.memory_bytes >> 20
            ));
        }
        // A call that alone needs more than the whole budget would wait for ever: it is
        // refused like any call over its limit, and the message says which limit it was.
        let most = CALL_ALLOWANCE + self.host.bytes;
        if total > most {
            return Err(format!(
                "memory limit of {} MiB exceeded: this host gives one call at most {} MiB \
                 ({} MiB of its own and the host's plugin_memory_mib of {} MiB)",
                most >> 20,
                most >> 20,
                CALL_ALLOWANCE >> 20,
                self.host.bytes >> 20
            ));
        }
        Ok(())
    }

    /// Units of the host's budget a call holding `in_use` bytes of memories and tables and
    /// `host_side` bytes of wasi resources needs beyond those it holds. Only memories and
    /// tables have the allowance: a resource flood in every call running at once would
    /// otherwise hold that many allowances of the host's memory outside any budget.
    fn units_missing(&self, in_use: u64, host_side: u64) -> u32 {
        let needed = (in_use.saturating_sub(CALL_ALLOWANCE) + host_side).div_ceil(UNIT) as usize;
        let held = self
            .held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        u32::try_from(needed.saturating_sub(held)).unwrap_or(u32::MAX)
    }

    fn hold(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
    }

    fn refuse(&mut self, limit: String) -> wasmtime::Result<bool> {
        self.exceeded = Some(limit.clone());
        Err(wasmtime::Error::msg(limit))
    }
}

/// Host-side bytes past which a call's end gives the allocator's free memory back to the
/// operating system.
const TRIM_AFTER_BYTES: u64 = 1 << 20;
/// The least time between two trims: a trim locks each arena of the allocator while it walks
/// it, and host threads that allocate there wait for it (trimming after every flooding call
/// raised the well-behaved tick lag p99 several times over).
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Asks the trimmer thread for a trim; holds at most one request.
static TRIMMER: std::sync::OnceLock<std::sync::mpsc::SyncSender<()>> = std::sync::OnceLock::new();

/// Starts the thread that gives the allocator's free memory back, once per process. It must
/// start on a host thread, whose priority it inherits: a trim done on the plugin call's own
/// thread held the arena locks at the call's low priority, while host threads that wanted to
/// allocate waited behind plugins burning the CPU.
pub(super) fn start_trimmer() {
    TRIMMER.get_or_init(|| {
        let (requests, pending) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("stepwise-trim".into())
            .spawn(move || {
                while pending.recv().is_ok() {
                    // SAFETY: `malloc_trim` only returns free memory of glibc's arenas to the
                    // system.
                    #[cfg(all(target_os = "linux", target_env = "gnu"))]
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    // A request that came meanwhile waits here, so the last flood is always
                    // trimmed, at most once per interval.
                    std::thread::sleep(TRIM_EVERY);
                }
            });
        if let Err(error) = spawned {
            tracing::warn!("no allocator trimmer thread ({error}): memory freed by plugin calls stays with the allocator");
        }
        requests
    });
}

impl Drop for Limiter {
    /// A call that held many wasi resources (or read large query results) made thousands of
    /// small allocations on its thread's allocator arena; freed, they stay in the arena and in the host's resident
    /// memory (measured: a header flood from twenty calls at once kept 100 MiB resident
    /// under a 32 MiB budget). Dropped after the call's resources (its store drops the
    /// limiter last), so their memory is free by now. The trimmer thread does the trim.
    fn drop(&mut self) {
        trim_after(self.host_side.max(self.outside_budget));
    }
}

/// Asks for a trim once a call has freed `bytes` it held in the host, when that is enough to
/// matter.
pub(super) fn trim_after(bytes: u64) {
    if bytes >= TRIM_AFTER_BYTES
        && let Some(trimmer) = TRIMMER.get()
    {
        // Full: a trim is asked for already, and covers this call's memory too.
        let _ = trimmer.try_send(());
    }
}

#[async_trait::async_trait]
impl wasmtime::ResourceLimiterAsync for Limiter {
    async fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current as u64, desired as u64).await
    }

    async fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            return self.refuse(format!(
                "table limit of {} elements exceeded",
                self.table_elements
            ));
        }
        self.grow(
            current as u64 * TABLE_ELEMENT_BYTES,
            desired as u64 * TABLE_ELEMENT_BYTES,
        )
        .await
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wasmtime::ResourceLimiterAsync;

    use super::*;
    use crate::grant::Limits;

    fn limits(memory_mib: u64) -> Limits {
        Limits {
            memory_bytes: memory_mib << 20,
            table_elements: 100_000,
            instances: 64,
            ..Limits::default()
        }
    }

    fn limiter(memory_mib: u64, host: &PluginMemory, wait: Duration) -> Limiter {
        Limiter::new(&limits(memory_mib), host.clone(), Instant::now() + wait)
    }

    #[tokio::test]
    async fn memory_is_counted_over_every_memory_and_table_of_a_call() {
        let host = PluginMemory::new(1 << 30);
        let mut limiter = limiter(64, &host, Duration::from_secs(5));
        for _ in 0..3 {
            assert!(limiter.memory_growing(0, 20 << 20, None).await.is_ok());
        }
        assert!(
            limiter.memory_growing(0, 20 << 20, None).await.is_err(),
            "a fourth memory"
        );
        assert!(
            limiter
                .exceeded
                .as_deref()
                .is_some_and(|text| text.contains("64 MiB"))
        );
        // Growing one memory counts only the growth.
        let mut limiter = self::limiter(64, &host, Duration::from_secs(5));
        assert!(limiter.memory_growing(0, 32 << 20, None).await.is_ok());
        assert!(
            limiter
                .memory_growing(32 << 20, 127 << 19, None)
                .await
                .is_ok()
        );
        assert!(
            limiter.table_growing(0, 100_000, None).await.is_err(),
            "800 KB of table on top of 63.5 MiB"
        );
    }

    #[tokio::test]
    async fn calls_share_the_hosts_budget_beyond_their_allowance_and_give_it_back() {
        let host = PluginMemory::new(32 << 20);
        // Within the allowance, nothing is taken from the host.
        let mut small = limiter(64, &host, Duration::from_secs(5));
        assert!(
            small
                .memory_growing(0, CALL_ALLOWANCE as usize, None)
                .await
                .is_ok()
        );
        assert_eq!(host.available(), 32 << 20);

        let mut big = limiter(64, &host, Duration::from_secs(5));
        let size = (CALL_ALLOWANCE + (24 << 20)) as usize;
        assert!(big.memory_growing(0, size, None).await.is_ok());
        assert_eq!(host.available(), 8 << 20);

        // A second large call waits for the first; it is given the memory once the first
        // call's store is dropped, before its own deadline.
        let mut second = limiter(64, &host, Duration::from_secs(30));
        let waiting = tokio::spawn(async move {
            let grown = second.memory_growing(0, size, None).await.is_ok();
            (grown, second)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the second call waits");
        drop(big);
        let (grown, second) = waiting.await.expect("the waiting call");
        assert!(grown);
        assert_eq!(host.available(), 8 << 20);
        drop(second);
        assert_eq!(host.available(), 32 << 20);
    }

    #[tokio::test]
    async fn waiting_past_the_deadline_is_the_hosts_fault_and_more_than_the_budget_the_calls() {
        let host = PluginMemory::new(16 << 20);
        let mut holder = limiter(64, &host, Duration::from_secs(5));
        let size = (CALL_ALLOWANCE + (16 << 20)) as usize;
        assert!(holder.memory_growing(0, size, None).await.is_ok());

        let mut late = limiter(64, &host, Duration::from_millis(20));
        let error = late
            .memory_growing(0, size, None)
            .await
            .expect_err("no memory before the deadline");
        assert!(error.downcast_ref::<HostFault>().is_some(), "{error:?}");
        assert!(late.exceeded.is_none(), "not charged as the plugin's limit");

        let mut greedy = limiter(64, &host, Duration::from_secs(5));
        assert!(greedy.memory_growing(0, size + 1, None).await.is_err());
        assert!(
            greedy
                .exceeded
                .as_deref()
                .is_some_and(|text| text.contains("plugin_memory_mib of 16 MiB")),
            "{:?}",
            greedy.exceeded
        );
    }
}
