//! wasmtime: one `Engine` with epoch interruption (`engine`), plugin versions inspected and
//! compiled once off the async threads, cached by content hash in memory and as precompiled
//! artifacts on disk (`plugin`), each compiled function kept for later compiles that share it
//! (`functions`), and a `Store` per call with memory and time limits
//! (`instance`): a new one for a run's first call, then the one that run left (`parked`). Knows nothing of storage or scheduling; the runner hands
//! it bytes, grants and inputs and gets `model` values back.

mod engine;
mod functions;
mod instance;
mod memory;
mod parked;
mod plugin;

pub use crate::priority::favour_host_threads;
pub use engine::Runtime;
pub use instance::{Capabilities, StepCall, StepReport};
pub use plugin::{Inspected, LoadedPlugin};
