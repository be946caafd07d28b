//! Instances kept between the calls of one run. Instantiating is most of what a call costs
//! for a large component (a Python or JavaScript check builds thousands of imports and
//! function references each time, about 2.5 ms, where its step itself takes 25 µs), and a
//! run's steps are called again and again while they poll. So after a call that leaves its
//! run going (passed or pending, no trap, no limit broken, nothing on stderr), the instance
//! is parked under the run's id and the plugin version, and the run's next call takes it
//! instead of instantiating. Nothing passes between runs: an instance serves only the run
//! it was made for, and each call still gets its own capabilities, budgets and time limit.
//!
//! What parked instances hold is bounded: at most [`MAX_PARKED`] of them, with at most
//! [`PARKED_BYTES`] of memories and tables together, all of it charged to
//! `plugin_memory_mib` while they wait (the allowance of a running call included, so an
//! instance is parked only when the budget has room), each for at most [`PARK_IDLE`].
//! Parking one more than that drops the one parked longest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::instance::StepState;
use crate::bindings::Check;
use crate::grant::Limits;
use crate::model::PluginVersion;

/// Instances parked at once at most; the instance pool holds room for them beside the calls.
pub(super) const MAX_PARKED: usize = 16;
/// Memories and tables of all parked instances together at most.
const PARKED_BYTES: u64 = 64 << 20;
/// How long an instance waits for its run's next call: longer than the poll interval of
/// most steps, short enough that a finished run's instance is soon given back.
const PARK_IDLE: Duration = Duration::from_secs(60);

/// An instance waiting for its run's next call.
pub(super) struct ParkedInstance {
    pub store: Store<StepState>,
    /// Its stderr, empty when parked: what a later call writes there explains its fault.
    pub stderr: MemoryOutputPipe,
    pub check: Check,
    /// The limits it was made with: a run whose limits changed gets a new instance.
    pub limits: Limits,
    /// Its memories and tables.
    pub bytes: u64,
    parked_at: Instant,
}

impl ParkedInstance {
    pub fn new(
        store: Store<StepState>,
        stderr: MemoryOutputPipe,
        check: Check,
        limits: Limits,
    ) -> Self {
        ParkedInstance {
            bytes: store.data().memory_bytes(),
            store,
            stderr,
            check,
            limits,
            parked_at: Instant::now(),
        }
    }
}

type Key = (String, PluginVersion);

/// The parked instances, by run and version.
#[derive(Clone, Default)]
pub(super) struct Parked(Arc<Mutex<HashMap<Key, ParkedInstance>>>);

impl Parked {
    /// Drops instances idle past [`PARK_IDLE`] every so often, on `runtime`, for as long as
    /// the map is alive.
    pub fn start_expiry(&self, runtime: &tokio::runtime::Handle) {
        let map: Weak<_> = Arc::downgrade(&self.0);
        runtime.spawn(async move {
            let mut every = tokio::time::interval(PARK_IDLE / 4);
            loop {
                every.tick().await;
                let Some(map) = map.upgrade() else { break };
                let now = Instant::now();
                let expired =
                    Parked(map).remove_where(|_, parked| now - parked.parked_at >= PARK_IDLE);
                // Dropped outside the lock: giving back a memory slot takes a system call.
                drop(expired);
            }
        });
    }

    /// The instance `run_id` left for `version`, if it was made with `limits`.
    pub fn take(
        &self,
        run_id: &str,
        version: &PluginVersion,
        limits: &Limits,
    ) -> Option<ParkedInstance> {
        let parked = self.lock().remove(&(run_id.to_owned(), version.clone()))?;
        (parked.limits == *limits).then_some(parked)
    }

    /// Keeps `instance` for `run_id`'s next call on `version`, if it fits beside the others
    /// once those parked longest make room. What leaves is dropped by the caller, outside the
    /// lock.
    pub fn park(
        &self,
        run_id: String,
        version: PluginVersion,
        instance: ParkedInstance,
    ) -> Vec<ParkedInstance> {
        if instance.bytes > PARKED_BYTES {
            return vec![instance];
        }
        let mut map = self.lock();
        let mut leaving = Vec::new();
        while map.len() >= MAX_PARKED
            || map.values().map(|parked| parked.bytes).sum::<u64>() + instance.bytes > PARKED_BYTES
        {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, parked)| parked.parked_at)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            leaving.extend(map.remove(&oldest));
        }
        leaving.extend(map.insert((run_id, version), instance));
        leaving
    }

    /// Drops what `run_id` left parked: its run has ended.
    pub fn forget(&self, run_id: &str) -> Vec<ParkedInstance> {
        self.remove_where(|(run, _), _| run == run_id)
    }

    /// Takes out the instances `leaves` picks, for the caller to drop outside the lock.
    fn remove_where(
        &self,
        mut leaves: impl FnMut(&Key, &ParkedInstance) -> bool,
    ) -> Vec<ParkedInstance> {
        self.lock()
            .extract_if(|key, parked| leaves(key, parked))
            .map(|(_, parked)| parked)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, ParkedInstance>> {
        self.0.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}
