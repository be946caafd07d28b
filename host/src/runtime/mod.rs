//! wasmtime: one `Engine` with epoch interruption (`engine`), plugin versions inspected and
//! compiled once off the async threads, cached by content hash in memory and as precompiled
//! artifacts on disk (`plugin`), and one fresh `Store` per call with
//! memory and time limits (`instance`). Knows nothing of storage or scheduling; the runner hands
//! it bytes, grants and inputs and gets `model` values back.

mod engine;
mod instance;
mod memory;
mod plugin;

pub use crate::priority::favour_host_threads;
pub use engine::Runtime;
pub use instance::{Capabilities, StepCall, StepReport};
pub use plugin::{Inspected, LoadedPlugin};
